//! Proxy configuration: upstream proxy URLs, the no-proxy list, the intercepted ports.
//!
//! Theory of operation: everything here is pure (no I/O) so it can be tested exhaustively.
//!
//! - [`ProxyUrl`] is an upstream proxy, `[http://][user:password@]host[:port]`. Only plain
//!   `http://` proxies are supported (the proxy itself speaks HTTP; HTTPS goes through it
//!   with CONNECT); the port defaults to 80, as Go's `ProxyFromEnvironment` does. Its
//!   `Display` and `Debug` forms never show the password (`user:***@`), and parse errors
//!   never echo the input, so credentials cannot reach a log line.
//! - [`NoProxy`] is the exclusion list, comma or space separated, with curl's and Go's forms:
//!   `*` (everything), `name` and `.name` (the name and every name below it), `*.name`
//!   (only names below it), an IP, a CIDR, any of these with `:port`, and `localhost`
//!   (also every loopback address). [`NoProxy::matches`] takes the destination's name (when
//!   one is known: Host header, SNI, CONNECT authority) and its IP (when known): excludes
//!   match names, not only addresses.
//! - [`ProxyConfig`] is the whole configuration; [`ProxySettings`] is the shared, runtime
//!   changeable copy (an `Arc<RwLock<..>>`) that the proxy service, the engine's hook and the
//!   control API all hold.

use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

/// Ports intercepted transparently by default.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// What `Display` shows in place of a password.
pub const REDACTED: &str = "***";

/// A configuration error; the message never contains the offending URL (it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid proxy URL: {0}")]
    Url(&'static str),
    #[error("invalid no-proxy entry {0:?}")]
    NoProxy(String),
    #[error("invalid proxy port {0:?}")]
    Port(String),
}

/// An upstream HTTP proxy.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Host name or IP (IPv6 without brackets), lower case.
    pub host: String,
    pub port: u16,
    /// Decoded user name and password.
    pub credentials: Option<(String, String)>,
}

impl ProxyUrl {
    /// Parses `[http://][user:password@]host[:port][/]`. User and password may be
    /// percent-encoded.
    pub fn parse(s: &str) -> Result<ProxyUrl, ConfigError> {
        let s = s.trim();
        let rest = match s.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) if scheme.eq_ignore_ascii_case("https") => {
                return Err(ConfigError::Url("https:// proxies are not supported (use http://)"));
            }
            Some(_) => return Err(ConfigError::Url("unsupported scheme (use http://)")),
            None => s,
        };
        // Only a trailing "/" may follow the authority.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#']) {
            return Err(ConfigError::Url("a proxy URL has no path"));
        }
        let (userinfo, hostport) = match rest.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, rest),
        };
        let credentials = match userinfo {
            None => None,
            Some(u) => {
                let (user, pass) = u.split_once(':').unwrap_or((u, ""));
                let user = percent_decode(user).ok_or(ConfigError::Url("bad percent-encoding in the user name"))?;
                let pass = percent_decode(pass).ok_or(ConfigError::Url("bad percent-encoding in the password"))?;
                if user.is_empty() {
                    return Err(ConfigError::Url("empty user name"));
                }
                Some((user, pass))
            }
        };
        let (host, port) = split_host_port(hostport).ok_or(ConfigError::Url("bad host or port"))?;
        if host.is_empty() || !valid_host(&host) {
            return Err(ConfigError::Url("bad host"));
        }
        Ok(ProxyUrl { host, port: port.unwrap_or(80), credentials })
    }

    /// `host:port` (IPv6 in brackets), as a CONNECT line or a dial wants it.
    pub fn authority(&self) -> String {
        authority(&self.host, self.port)
    }

    /// The `Proxy-Authorization` header value, when the URL has credentials.
    pub fn basic_auth(&self) -> Option<String> {
        self.credentials.as_ref().map(|(u, p)| format!("Basic {}", BASE64.encode(format!("{u}:{p}"))))
    }

    /// The full URL with its password: only for handing back to whoever configured it.
    pub fn to_secret_string(&self) -> String {
        match &self.credentials {
            Some((u, p)) => format!("http://{}:{}@{}", percent_encode(u), percent_encode(p), self.authority()),
            None => format!("http://{}", self.authority()),
        }
    }
}

/// Redacted: `http://user:***@host:port`.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.credentials {
            Some((u, _)) => write!(f, "http://{}:{REDACTED}@{}", percent_encode(u), self.authority()),
            None => write!(f, "http://{}", self.authority()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

/// `host:port`, with brackets around an IPv6 host.
pub fn authority(host: &str, port: u16) -> String {
    if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// Splits `host`, `host:port`, `[v6]` or `[v6]:port`; the host comes back lower case,
/// without brackets or a trailing dot. None when the port is not a number in 1..=65535.
pub fn split_host_port(s: &str) -> Option<(String, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after {
            "" => (h, None),
            _ => (h, Some(after.strip_prefix(':')?)),
        }
    } else if s.matches(':').count() > 1 {
        // A bare IPv6 address.
        (s, None)
    } else {
        match s.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (s, None),
        }
    };
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
            _ => return None,
        },
    };
    Some((host.trim_end_matches('.').to_ascii_lowercase(), port))
}

/// A host name or IP literal safe to put in a request line or a header.
pub fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && (h.parse::<IpAddr>().is_ok()
            || h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'))
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One no-proxy entry.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    /// `*`: everything.
    All,
    /// `name` or `.name`: the name and every name below it.
    Domain(String),
    /// `*.name`: only the names below it.
    Below(String),
    /// An IP address or a CIDR (prefix length).
    Net(IpAddr, u8),
    /// `localhost`: the name and every loopback address.
    Localhost,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    pattern: Pattern,
    /// `entry:port`: only this destination port.
    port: Option<u16>,
}

/// The no-proxy list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    entries: Vec<Entry>,
    /// The entries as written, for showing the list back.
    raw: Vec<String>,
}

impl NoProxy {
    /// Parses a comma or space separated list; empty entries are ignored.
    pub fn parse(list: &str) -> Result<NoProxy, ConfigError> {
        let mut np = NoProxy::default();
        for item in list.split([',', ' ', '\t', '\n']).map(str::trim).filter(|s| !s.is_empty()) {
            np.entries.push(parse_entry(item).ok_or_else(|| ConfigError::NoProxy(item.to_string()))?);
            np.raw.push(item.to_string());
        }
        Ok(np)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entries as written, joined with commas.
    pub fn to_list(&self) -> String {
        self.raw.join(",")
    }

    /// Does the list exclude a destination? `name` is the destination's name when one is
    /// known (it may also be an IP literal), `ip` its address when known.
    pub fn matches(&self, name: Option<&str>, ip: Option<IpAddr>, port: u16) -> bool {
        let name = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        let name = name.as_deref().filter(|n| !n.is_empty());
        let name_ip = name.and_then(|n| n.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().ok());
        self.entries.iter().any(|e| {
            if e.port.is_some_and(|p| p != port) {
                return false;
            }
            match &e.pattern {
                Pattern::All => true,
                Pattern::Domain(d) => name.is_some_and(|n| n == d || n.ends_with(&format!(".{d}"))),
                Pattern::Below(d) => name.is_some_and(|n| n.ends_with(&format!(".{d}"))),
                Pattern::Net(net, prefix) => [ip, name_ip].into_iter().flatten().any(|a| in_net(a, *net, *prefix)),
                Pattern::Localhost => {
                    name.is_some_and(|n| n == "localhost" || n.ends_with(".localhost"))
                        || [ip, name_ip].into_iter().flatten().any(|a| a.is_loopback())
                }
            }
        })
    }

    /// Does the list exclude this address whatever its name? (IP and CIDR entries, `*`,
    /// loopback for `localhost`.) The engine's hook asks this before any byte is read.
    pub fn matches_ip_only(&self, ip: IpAddr, port: u16) -> bool {
        self.entries.iter().any(|e| {
            if e.port.is_some_and(|p| p != port) {
                return false;
            }
            match &e.pattern {
                Pattern::All => true,
                Pattern::Net(net, prefix) => in_net(ip, *net, *prefix),
                Pattern::Localhost => ip.is_loopback(),
                Pattern::Domain(_) | Pattern::Below(_) => false,
            }
        })
    }
}

fn parse_entry(item: &str) -> Option<Entry> {
    let lower = item.to_ascii_lowercase();
    if lower == "*" {
        return Some(Entry { pattern: Pattern::All, port: None });
    }
    // A CIDR first: its '/' makes it unambiguous.
    if let Some((addr, prefix)) = lower.split_once('/') {
        let addr: IpAddr = addr.trim_start_matches('[').trim_end_matches(']').parse().ok()?;
        let prefix: u8 = prefix.parse().ok()?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return None;
        }
        return Some(Entry { pattern: Pattern::Net(addr, prefix), port: None });
    }
    if let Ok(ip) = lower.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
        let full = if ip.is_ipv4() { 32 } else { 128 };
        return Some(Entry { pattern: Pattern::Net(ip, full), port: None });
    }
    let (host, port) = split_host_port(&lower)?;
    if let Ok(ip) = host.parse::<IpAddr>() {
        let full = if ip.is_ipv4() { 32 } else { 128 };
        return Some(Entry { pattern: Pattern::Net(ip, full), port });
    }
    let pattern = if host == "localhost" {
        Pattern::Localhost
    } else if let Some(d) = host.strip_prefix("*.") {
        Pattern::Below(valid_domain(d)?)
    } else {
        Pattern::Domain(valid_domain(host.strip_prefix('.').unwrap_or(&host))?)
    };
    Some(Entry { pattern, port })
}

fn valid_domain(d: &str) -> Option<String> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
        && !d.starts_with('.');
    ok.then(|| d.to_string())
}

fn in_net(a: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (a, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - u32::from(prefix)) };
            u128::from(a) & mask == u128::from(n) & mask
        }
        // An IPv4-mapped IPv6 address matches IPv4 entries.
        (IpAddr::V6(a), IpAddr::V4(_)) => a.to_ipv4_mapped().is_some_and(|a| in_net(IpAddr::V4(a), net, prefix)),
        (IpAddr::V4(_), IpAddr::V6(_)) => false,
    }
}

/// Parses a port list (`80,443`, `80 8080`); an empty string is an empty list.
pub fn parse_ports(s: &str) -> Result<Vec<u16>, ConfigError> {
    let mut ports = Vec::new();
    for p in s.split([',', ' ']).map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => {
                if !ports.contains(&n) {
                    ports.push(n);
                }
            }
            _ => return Err(ConfigError::Port(p.to_string())),
        }
    }
    Ok(ports)
}

/// The proxy configuration of one usernet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Upstream for plain HTTP requests.
    pub http: Option<ProxyUrl>,
    /// Upstream for CONNECT tunnels and intercepted TLS.
    pub https: Option<ProxyUrl>,
    pub no_proxy: NoProxy,
    /// Guest TCP ports intercepted transparently (when an upstream is set).
    pub ports: Vec<u16>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig { http: None, https: None, no_proxy: NoProxy::default(), ports: DEFAULT_PORTS.to_vec() }
    }
}

/// What the command line gives, before validation.
#[derive(Clone, Debug, Default)]
pub struct ProxyOptions {
    pub http_proxy: Option<String>,
    pub https_proxy: Option<String>,
    /// `--no-proxy` values (each a list).
    pub no_proxy: Vec<String>,
    pub ports: Option<String>,
    /// Take HTTP_PROXY/HTTPS_PROXY/NO_PROXY (either case) from the environment for
    /// whatever the flags leave unset.
    pub from_env: bool,
}

impl ProxyConfig {
    /// Builds the configuration from options; `env` looks up environment variables
    /// (`std::env::var` in real use). Errors name the flag, never the URL.
    pub fn from_options(opts: &ProxyOptions, env: impl Fn(&str) -> Option<String>) -> Result<ProxyConfig, String> {
        let from_env = |upper: &str, lower: &str| -> Option<String> {
            if !opts.from_env {
                return None;
            }
            env(upper).or_else(|| env(lower)).filter(|v| !v.trim().is_empty())
        };
        let url = |flag: &str, v: Option<String>| -> Result<Option<ProxyUrl>, String> {
            match v {
                None => Ok(None),
                Some(v) if v.trim().is_empty() => Ok(None),
                Some(v) => ProxyUrl::parse(&v).map(Some).map_err(|e| format!("{flag}: {e}")),
            }
        };
        let http = url("--http-proxy", opts.http_proxy.clone().or_else(|| from_env("HTTP_PROXY", "http_proxy")))?;
        let https = url("--https-proxy", opts.https_proxy.clone().or_else(|| from_env("HTTPS_PROXY", "https_proxy")))?;
        let no_proxy_text = if opts.no_proxy.is_empty() {
            from_env("NO_PROXY", "no_proxy").unwrap_or_default()
        } else {
            opts.no_proxy.join(",")
        };
        let no_proxy = NoProxy::parse(&no_proxy_text).map_err(|e| format!("--no-proxy: {e}"))?;
        let ports = match &opts.ports {
            Some(p) => parse_ports(p).map_err(|e| format!("--proxy-ports: {e}"))?,
            None => DEFAULT_PORTS.to_vec(),
        };
        Ok(ProxyConfig { http, https, no_proxy, ports })
    }

    /// True when some upstream proxy is set: transparent interception is on.
    pub fn has_upstream(&self) -> bool {
        self.http.is_some() || self.https.is_some()
    }
}

/// The shared, runtime-changeable proxy configuration.
#[derive(Clone, Debug, Default)]
pub struct ProxySettings {
    inner: Arc<RwLock<ProxyConfig>>,
}

impl ProxySettings {
    pub fn new(cfg: ProxyConfig) -> ProxySettings {
        ProxySettings { inner: Arc::new(RwLock::new(cfg)) }
    }

    /// A copy of the current configuration.
    pub fn get(&self) -> ProxyConfig {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the configuration in place (cheap: for the engine's hook).
    pub fn with<R>(&self, f: impl FnOnce(&ProxyConfig) -> R) -> R {
        f(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Replaces the configuration; new connections use it at once.
    pub fn set(&self, cfg: ProxyConfig) {
        *self.inner.write().unwrap_or_else(|e| e.into_inner()) = cfg;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn url_forms() {
        let u = ProxyUrl::parse("http://127.0.0.1:3128").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.credentials.clone()), ("127.0.0.1", 3128, None));
        let u = ProxyUrl::parse("proxy.corp.example:8080/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("proxy.corp.example", 8080));
        let u = ProxyUrl::parse("HTTP://Proxy.Example").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("proxy.example", 80));
        let u = ProxyUrl::parse("http://[::1]:3128").unwrap();
        assert_eq!((u.host.as_str(), u.authority()), ("::1", "[::1]:3128".to_string()));
        let u = ProxyUrl::parse("http://al%40ice:p%3Ass@host:1").unwrap();
        assert_eq!(u.credentials, Some(("al@ice".into(), "p:ss".into())));
        // Passwords may hold '@': the last '@' ends the user info.
        let u = ProxyUrl::parse("http://u:a@b@host:1").unwrap();
        assert_eq!(u.credentials, Some(("u".into(), "a@b".into())));
        assert_eq!(u.host, "host");
    }

    #[test]
    fn url_errors_never_echo_the_input() {
        for bad in [
            "https://u:secret@h:1",
            "socks5://u:secret@h:1",
            "http://u:secret@h:99999",
            "http://u:secret@h:1/path",
            "http://u:secret@",
            "http://:secret@h",
            "http://u:sec%zzret@h",
            "http://u:secret@h h:1",
            "",
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err().to_string();
            assert!(!e.contains("secret"), "{bad}: {e}");
        }
    }

    #[test]
    fn display_redacts_and_auth_header() {
        let u = ProxyUrl::parse("http://user:secret@127.0.0.1:3128").unwrap();
        assert_eq!(u.to_string(), "http://user:***@127.0.0.1:3128");
        assert!(!format!("{u:?}").contains("secret"));
        // RFC 7617's example.
        let u = ProxyUrl::parse("http://Aladdin:open%20sesame@h").unwrap();
        assert_eq!(u.basic_auth().unwrap(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert_eq!(ProxyUrl::parse(&u.to_secret_string()).unwrap(), u);
        assert_eq!(ProxyUrl::parse("h:1").unwrap().basic_auth(), None);
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a.B.:80"), Some(("a.b".into(), Some(80))));
        assert_eq!(split_host_port("[::1]:443"), Some(("::1".into(), Some(443))));
        assert_eq!(split_host_port("[::1]"), Some(("::1".into(), None)));
        assert_eq!(split_host_port("::1"), Some(("::1".into(), None)));
        assert_eq!(split_host_port("h:0"), None);
        assert_eq!(split_host_port("h:+1"), None);
        assert_eq!(split_host_port("h:x"), None);
        assert_eq!(split_host_port("[::1]x"), None);
    }

    #[test]
    fn no_proxy_exact_and_suffix() {
        let np = NoProxy::parse("corp.example").unwrap();
        assert!(np.matches(Some("corp.example"), None, 80));
        assert!(np.matches(Some("WWW.Corp.Example."), None, 80));
        assert!(!np.matches(Some("notcorp.example"), None, 80));
        assert!(!np.matches(Some("example"), None, 80));
        assert!(!np.matches(None, ip("1.2.3.4"), 80));
        let np = NoProxy::parse(".corp.example").unwrap();
        assert!(np.matches(Some("a.b.corp.example"), None, 443));
        assert!(np.matches(Some("corp.example"), None, 443));
        assert!(!np.matches(Some("xcorp.example"), None, 443));
    }

    #[test]
    fn no_proxy_wildcards() {
        let np = NoProxy::parse("*.corp.example").unwrap();
        assert!(np.matches(Some("www.corp.example"), None, 80));
        assert!(np.matches(Some("a.www.corp.example"), None, 80));
        assert!(!np.matches(Some("corp.example"), None, 80));
        assert!(!np.matches(Some("www.xcorp.example"), None, 80));
        let np = NoProxy::parse("*").unwrap();
        assert!(np.matches(Some("anything"), None, 1));
        assert!(np.matches(None, ip("8.8.8.8"), 1));
        assert!(np.matches_ip_only("8.8.8.8".parse().unwrap(), 1));
    }

    #[test]
    fn no_proxy_ips_and_cidrs() {
        let np = NoProxy::parse("10.0.0.0/8, 192.168.1.5 2001:db8::/32 [::2]").unwrap();
        assert!(np.matches(None, ip("10.200.1.1"), 80));
        assert!(np.matches(Some("10.1.2.3"), None, 80));
        assert!(np.matches(Some("named.example"), ip("10.1.2.3"), 80));
        assert!(!np.matches(None, ip("11.0.0.1"), 80));
        assert!(np.matches(None, ip("192.168.1.5"), 80));
        assert!(!np.matches(None, ip("192.168.1.6"), 80));
        assert!(np.matches(None, ip("2001:db8:1::1"), 80));
        assert!(np.matches(Some("[::2]"), None, 80));
        assert!(np.matches(None, Some(IpAddr::V6(Ipv4Addr::new(10, 1, 1, 1).to_ipv6_mapped())), 80));
        assert!(np.matches_ip_only("10.9.9.9".parse().unwrap(), 443));
        assert!(!np.matches_ip_only(IpAddr::V6(Ipv6Addr::LOCALHOST), 443));
        let np = NoProxy::parse("0.0.0.0/0").unwrap();
        assert!(np.matches(None, ip("203.0.113.1"), 80));
        for bad in ["10.0.0.0/33", "::/129", "1.2.3.4/x", "a b/8", "*.", "..x", "h:0", "h:99999", "bad!name"] {
            assert!(NoProxy::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn no_proxy_localhost_and_ports() {
        let np = NoProxy::parse("localhost,svc.example:8080,127.0.0.2:81").unwrap();
        assert!(np.matches(Some("localhost"), None, 80));
        assert!(np.matches(None, ip("127.0.0.1"), 80));
        assert!(np.matches(None, ip("::1"), 80));
        assert!(np.matches(Some("svc.example"), None, 8080));
        assert!(!np.matches(Some("svc.example"), None, 80));
        assert!(np.matches(None, ip("127.0.0.2"), 81));
        assert!(!np.matches_ip_only("198.51.100.1".parse().unwrap(), 80));
        assert_eq!(np.to_list(), "localhost,svc.example:8080,127.0.0.2:81");
    }

    #[test]
    fn no_proxy_empty_entries() {
        let np = NoProxy::parse(" , ,").unwrap();
        assert!(np.is_empty());
        assert!(!np.matches(Some("x"), ip("1.1.1.1"), 80));
    }

    #[test]
    fn ports() {
        assert_eq!(parse_ports("80,443 8080,80").unwrap(), vec![80, 443, 8080]);
        assert_eq!(parse_ports("").unwrap(), Vec::<u16>::new());
        assert!(parse_ports("0").is_err());
        assert!(parse_ports("70000").is_err());
    }

    #[test]
    fn options_and_environment() {
        let env = |k: &str| match k {
            "HTTP_PROXY" => Some("http://u:pw@127.0.0.1:1".to_string()),
            "https_proxy" => Some("127.0.0.1:2".to_string()),
            "no_proxy" => Some(".corp.example,10.0.0.0/8".to_string()),
            _ => None,
        };
        let opts = ProxyOptions { from_env: true, ..Default::default() };
        let c = ProxyConfig::from_options(&opts, env).unwrap();
        assert_eq!(c.http.as_ref().unwrap().port, 1);
        assert_eq!(c.https.as_ref().unwrap().port, 2);
        assert!(c.no_proxy.matches(Some("x.corp.example"), None, 80));
        assert_eq!(c.ports, DEFAULT_PORTS.to_vec());
        assert!(c.has_upstream());
        // Flags win over the environment; without --proxy-from-env it is ignored.
        let opts = ProxyOptions {
            from_env: true,
            https_proxy: Some("h:9".into()),
            ports: Some("8080".into()),
            ..Default::default()
        };
        let c = ProxyConfig::from_options(&opts, env).unwrap();
        assert_eq!(c.https.unwrap().authority(), "h:9");
        assert_eq!(c.ports, vec![8080]);
        let c = ProxyConfig::from_options(&ProxyOptions::default(), env).unwrap();
        assert!(!c.has_upstream());
        let e = ProxyConfig::from_options(
            &ProxyOptions { http_proxy: Some("ftp://u:secret@h".into()), ..Default::default() },
            |_| None,
        )
        .unwrap_err();
        assert!(e.starts_with("--http-proxy") && !e.contains("secret"), "{e}");
    }

    #[test]
    fn settings_are_shared() {
        let s = ProxySettings::default();
        let t = s.clone();
        let c = ProxyConfig { ports: vec![1], ..ProxyConfig::default() };
        s.set(c.clone());
        assert_eq!(t.get(), c);
        assert_eq!(t.with(|c| c.ports.clone()), vec![1]);
    }
}
