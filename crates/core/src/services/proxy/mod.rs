//! HTTP/HTTPS proxy support: guest web traffic through the host's (corporate) proxy.
//!
//! Theory of operation. Two ways in, one set of routing rules.
//!
//! - The explicit proxy: the guest connects to the gateway's port [`PROXY_PORT`] (3128,
//!   `http.docker.internal`, which the DNS serves), like to any HTTP proxy, and sends
//!   absolute-form requests (`GET http://name/path`) or `CONNECT name:port`. The engine
//!   binds such a connection to a socketpair through `ServiceHub::connect_tcp`, as for DNS.
//! - Transparent interception: [`hook`] builds the engine's [`TcpHook`]. When an upstream
//!   proxy is configured and the guest opens TCP to one of the configured ports (80 and 443
//!   by default) of an outside address, the hook takes the connection over: the engine's end
//!   of a socketpair goes back to the engine, the other end, with the original destination,
//!   to the service runtime. Connections to the gateway, the host address, the virtual
//!   subnet, and addresses the no-proxy list excludes by IP are left alone. The service then
//!   peeks at the first bytes without consuming them ([`sniff`]): a TLS ClientHello is
//!   relayed untouched through `CONNECT <sni>:<port>` ([`tls`] reads the name; the IP when
//!   there is none); an HTTP request goes to [`http`], which reads each request of the
//!   keep-alive connection and routes it by its Host header; anything else is relayed to the
//!   original destination as it is.
//!
//! Both ways in take guests of either family, and destinations of either family: names are
//! resolved to their A record, or their AAAA one when they have none.
//!
//! Routing, per request or tunnel: a destination the no-proxy list matches (by name or by
//! IP), the host address or the virtual subnet (`host.docker.internal` included), or one
//! with no upstream set for its kind (`http_proxy` for plain HTTP, `https_proxy` for CONNECT
//! and TLS) goes direct; everything else to the upstream, with `Proxy-Authorization: Basic`
//! when its URL has credentials. Direct connections of the explicit proxy resolve names
//! through the gateway's DNS (what the guest itself would get); transparent ones dial the
//! address the guest dialled. The host's loopback follows the engine's rule
//! (engine/dial.rs): only the host address (and the names for it, `host.docker.internal`)
//! leads there, and only while `host_loopback` is on; a loopback destination (127.0.0.0/8,
//! 0.0.0.0/8, `::1`, `localhost`, or a name that resolves to one) is refused with 403 and
//! never sent to an upstream (which may itself run on the host's loopback). The configuration is read at each new connection or request
//! from [`ProxySettings`], which the control API may change at any time.
//!
//! The egress policy (crate::policy) applies to every request and tunnel
//! ([`Proxy::admit`]): a direct hop is judged by the address it dials (and the name, for
//! `--allow-domain`), a hop through the upstream by the name it asks for (looked up through
//! the gateway's DNS when the rules need an address). Intercepted connections were already
//! judged by the engine on the address the guest dialled. A denial is a 403 with a one-line
//! reason (a reset for intercepted TLS).
//!
//! Failures are visible: an upstream that is down or refuses (407, 403, 502 ...) gives the
//! guest an HTTP error with a one-line reason (plain HTTP and CONNECT; a 407 of the upstream
//! becomes a 502, since it is about usernet's credentials, not the guest's), or, for
//! intercepted TLS, a reset: the ClientHello was only peeked, so closing our end with it
//! unread makes the engine's end fail with ECONNRESET, which the engine turns into a RST.
//! Each failure is one `warn` log line; no log line ever carries a password
//! ([`ProxyUrl`]'s `Display` redacts it).
//!
//! Bounds (`NetConfig::limits`), each counted in `usernet_limit_reached_total` and logged
//! (rate-limited) when reached: at most `--max-proxy-connections` connections are served at
//! once, explicit and transparent together (a CONNECT tunnel holds its connection's place);
//! one more is closed at once. A request's header must come whole within
//! `--proxy-header-timeout` (hyper's header read timeout, which also closes a kept-alive
//! connection waiting that long for its next request, uncounted), and so must an
//! intercepted ClientHello once begun; otherwise the connection is closed. A connection,
//! tunnel or relay whose guest side carries nothing either way for `--proxy-idle-timeout`
//! is closed (`idle.rs`).

pub mod config;
pub mod http;
mod idle;
pub mod tls;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, timeout};
use tracing::{debug, info, warn};

pub use config::{ConfigError, NoProxy, ProxyConfig, ProxyOptions, ProxySettings, ProxyUrl};

use crate::config::{NetConfig, is_host_local};
use crate::policy::{DenyReason, Verdict, Via};
use crate::services::TcpHook;
use crate::services::dns::hosts::{is_loopback_name, normalize_name};
use crate::services::dns::{DnsServer, Transport};
use crate::services::metrics::{ProxyOutcome, ServiceLimit};
use idle::Watch;

/// The explicit proxy's port on the gateway.
pub const PROXY_PORT: u16 = 3128;
/// How long a connect to an upstream proxy or a destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an intercepted connection may stay silent before it is relayed unclassified.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);
/// A deadline as good as never (about 30 years on), for a timeout too long to add to a time.
const NEVER: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
/// Largest response head accepted from an upstream proxy to a CONNECT.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a request or tunnel could not be served: the one line the guest and the log get.
/// An I/O error is part of that line, so it is not also a `source` (printed as a chain,
/// `{:#}`, it would come twice); the rule of `BindError` in
/// crates/host/src/publish/listen.rs.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("upstream proxy {proxy} unreachable: {err}")]
    Unreachable { proxy: String, err: io::Error },
    #[error("upstream proxy {proxy} refused {target}: {status} {reason}")]
    Refused { proxy: String, target: String, status: u16, reason: String },
    #[error("upstream proxy {proxy} sent no valid answer to CONNECT {target}")]
    BadAnswer { proxy: String, target: String },
    #[error("cannot reach {target}: {err}")]
    Dial { target: String, err: io::Error },
    #[error("cannot resolve {0}")]
    Resolve(String),
    #[error("{0} is not reachable through the proxy")]
    Forbidden(String),
    #[error("{target} is denied by the egress policy: {}", reason.explain())]
    Denied { target: String, reason: DenyReason },
}

impl ProxyError {
    /// The HTTP status the guest gets: the upstream's own refusal (403 ...) except 401 and
    /// 407, which concern usernet's credentials (tinyproxy answers a wrong password with
    /// 401) and become 502; 502 for everything else (504 for timeouts).
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::Refused { status, .. } if (400..600).contains(status) && !matches!(status, 401 | 407) => {
                *status
            }
            ProxyError::Unreachable { err, .. } | ProxyError::Dial { err, .. }
                if err.kind() == io::ErrorKind::TimedOut =>
            {
                504
            }
            ProxyError::Forbidden(_) | ProxyError::Denied { .. } => 403,
            _ => 502,
        }
    }
}

/// What every proxy connection shares.
pub struct Proxy {
    pub settings: ProxySettings,
    pub cfg: Arc<NetConfig>,
    pub dns: Arc<DnsServer>,
    /// One permit per connection being served, explicit and transparent together
    /// (`--max-proxy-connections`).
    slots: Arc<Semaphore>,
}

/// A connection's place among the `--max-proxy-connections`: held until it is done
/// (a CONNECT tunnel's relay included).
pub type Slot = Arc<OwnedSemaphorePermit>;

impl Proxy {
    pub fn new(settings: ProxySettings, cfg: Arc<NetConfig>, dns: Arc<DnsServer>) -> Proxy {
        let slots = Arc::new(Semaphore::new(cfg.limits.max_proxy_connections.min(Semaphore::MAX_PERMITS)));
        Proxy { settings, cfg, dns, slots }
    }

    /// A place for a new connection from `guest`, or None (counted and logged) when
    /// `--max-proxy-connections` are being served already.
    fn slot(&self, guest: SocketAddr) -> Option<Slot> {
        match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Some(Arc::new(permit)),
            Err(_) => {
                let max = self.cfg.limits.max_proxy_connections;
                self.dns.metrics().limit_reached(ServiceLimit::ProxyConnections, || {
                    format!("the proxy serves {max} connections (--max-proxy-connections): {guest}'s new one is closed")
                });
                None
            }
        }
    }

    /// Counts and logs a connection closed after `--proxy-idle-timeout` of silence.
    fn idle_closed(&self, what: &str) {
        let secs = self.cfg.limits.proxy_idle_timeout.as_secs();
        self.dns.metrics().limit_reached(ServiceLimit::ProxyIdleTimeout, || {
            format!("{what} carried nothing for {secs} s (--proxy-idle-timeout): closed")
        });
    }

    /// Counts and logs a connection closed after `--proxy-header-timeout` without a whole
    /// request header (or TLS ClientHello).
    fn header_timed_out(&self, what: &str) {
        let secs = self.cfg.limits.proxy_header_timeout.as_secs_f64();
        self.dns.metrics().limit_reached(ServiceLimit::ProxyHeaderTimeout, || {
            format!("{what} sent no whole header in {secs} s (--proxy-header-timeout): closed")
        });
    }

    /// Where a direct connection to `host` (a name or an IP literal) goes, as the guest's
    /// DNS sees it: its A record, or its AAAA one when it has none (or the network is
    /// IPv6-only, whose DNS gives no A). The host address (either family) becomes the
    /// host's loopback; the gateway and the rest of the virtual network are refused.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, ProxyError> {
        let forbidden = || ProxyError::Forbidden(config::authority(host, port));
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip.to_canonical(),
            Err(_) if names_loopback(host) => return Err(forbidden()),
            Err(_) => match self.local_lookup(host) {
                Some(ip) => ip,
                None => self.lookup(host).await.ok_or_else(|| ProxyError::Resolve(host.to_string()))?,
            },
        };
        self.map_ip(ip, port).ok_or_else(forbidden)
    }

    /// `host` in the gateway DNS's own table: its IPv4 address, or its IPv6 one when the
    /// network is IPv6-only.
    fn local_lookup(&self, host: &str) -> Option<IpAddr> {
        let v4 = self.dns.records().lookup(host).filter(|_| self.cfg.ipv4).map(IpAddr::V4);
        v4.or_else(|| self.dns.records().lookup6(host).map(IpAddr::V6))
    }

    /// A name's address through the gateway's DNS: A first, else AAAA.
    async fn lookup(&self, name: &str) -> Option<IpAddr> {
        match self.lookup_type(name, RecordType::A).await {
            Some(ip) => Some(ip),
            None => self.lookup_type(name, RecordType::AAAA).await,
        }
    }

    /// The egress policy's word on a request or tunnel to `host` (a name or an IP literal)
    /// at `port`; `dialled` is the address a direct hop dials (None when an upstream proxy
    /// resolves the name). A name that the allow-domains do not cover is looked up through
    /// the gateway's DNS to be judged by its address, when the rules want one. A denial is
    /// counted and logged once per destination (crate::policy).
    pub async fn admit(
        &self,
        host: &str,
        dialled: Option<IpAddr>,
        port: u16,
        guest: SocketAddr,
    ) -> Result<(), ProxyError> {
        let policy = &self.cfg.policy;
        if !policy.is_active() {
            return Ok(());
        }
        let literal = host.parse::<IpAddr>().ok();
        let mut ip = dialled.or(literal);
        if ip.is_none() && policy.needs_address(host) {
            ip = match self.local_lookup(host) {
                Some(local) => self.map_ip(local, port).map(|a| a.ip()),
                None => self.lookup(host).await,
            };
        }
        let verdict = match (literal, ip) {
            (Some(_), Some(ip)) => policy.check(ip, Some(port)),
            _ => policy.check_name(host, ip, port),
        };
        match verdict {
            Verdict::Allow => Ok(()),
            Verdict::Deny(reason) => {
                let target = config::authority(host, port);
                policy.denied(Via::Proxy, reason, &target, Some(guest));
                Err(ProxyError::Denied { target, reason })
            }
        }
    }

    /// The host socket address behind a guest-side address, None when there is none. An
    /// address that stands for the host (pasta's `--map-host-loopback` and
    /// `--map-guest-addr`) is the host address it stands for, as the engine dials it.
    fn map_ip(&self, ip: IpAddr, port: u16) -> Option<SocketAddr> {
        let alias = match ip {
            IpAddr::V4(v4) => self.cfg.host_alias(v4).map(IpAddr::V4),
            IpAddr::V6(v6) => self.cfg.host_alias6(v6).map(IpAddr::V6),
        };
        if let Some(to) = alias {
            return Some(SocketAddr::new(to, port));
        }
        match ip {
            IpAddr::V4(ip) if ip == self.cfg.host => {
                self.cfg.host_loopback.then(|| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
            }
            IpAddr::V6(ip) if self.cfg.v6.is_some_and(|n| ip == n.host) => {
                self.cfg.host_loopback.then(|| SocketAddr::from((Ipv6Addr::LOCALHOST, port)))
            }
            _ if is_host_local(ip) || self.in_network(ip) || self.is_own(ip) || ip.is_multicast() => None,
            IpAddr::V4(v4) if v4.is_broadcast() => None,
            IpAddr::V6(v6) if v6.is_unicast_link_local() => None,
            _ => Some(SocketAddr::new(ip, port)),
        }
    }

    /// Whether usernet answers for `ip` (its gateway, host, DNS and alias addresses, which
    /// may lie outside the subnet, as pasta's `--dns-forward 169.254.1.1` does).
    fn is_own(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.cfg.is_own_address(ip),
            IpAddr::V6(ip) => self.cfg.is_own_address6(ip),
        }
    }

    /// Whether `ip` is of the virtual network (its IPv4 subnet or IPv6 /64).
    fn in_network(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(ip) => self.cfg.subnet.contains(ip),
            IpAddr::V6(ip) => self.cfg.v6.is_some_and(|n| n.contains(ip)),
        }
    }

    /// True when `host` is the host address or in the virtual subnet, or a name of the
    /// gateway's DNS table for one (`host.docker.internal`), or the host's loopback (an
    /// address or a name for it): never sent upstream.
    pub fn is_local(&self, host: &str) -> bool {
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => Some(ip.to_canonical()),
            Err(_) if names_loopback(host) => return true,
            Err(_) => self.local_lookup(host),
        };
        ip.is_some_and(|ip| self.in_network(ip) || self.is_own(ip) || is_host_local(ip))
    }

    /// The first record of `rtype` (A or AAAA) of `name` through the gateway's DNS server.
    async fn lookup_type(&self, name: &str, rtype: RecordType) -> Option<IpAddr> {
        let mut q = Message::query();
        q.metadata.id = rand_id();
        q.metadata.recursion_desired = true;
        q.add_query(Query::query(Name::from_ascii(name).ok()?, rtype));
        let answer = self.dns.handle(&q.to_vec().ok()?, Transport::Tcp).await?;
        let m = Message::from_vec(&answer).ok()?;
        m.answers.iter().find_map(|r| match &r.data {
            RData::A(a) if rtype == RecordType::A => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) if rtype == RecordType::AAAA => Some(IpAddr::V6(a.0)),
            _ => None,
        })
    }
}

/// A name that stands for the resolving machine's loopback (`localhost`, `*.localhost` ...).
fn names_loopback(host: &str) -> bool {
    normalize_name(host).is_some_and(|n| is_loopback_name(&n))
}

fn rand_id() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64));
    h.finish() as u16
}

/// Does the hook take over a guest connection to `dst`? Outside addresses only: never
/// the gateway, the host address or the virtual network (either family), loopback,
/// multicast or link-local.
pub fn intercepts(proxy: &ProxyConfig, net: &NetConfig, dst: SocketAddr) -> bool {
    let outside = match dst.ip() {
        IpAddr::V4(ip) => {
            let inside = net.is_own_address(ip) || net.subnet.contains(ip);
            !(inside || ip.is_loopback() || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
        }
        IpAddr::V6(ip) => {
            let inside = net.v6.is_some_and(|n| n.contains(ip)) || net.is_own_address6(ip);
            let special = ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_unicast_link_local();
            !(inside || special || ip.to_ipv4_mapped().is_some())
        }
    };
    outside
        && proxy.has_upstream()
        && proxy.ports.contains(&dst.port())
        && !proxy.no_proxy.matches_ip_only(dst.ip(), dst.port())
}

/// The engine's hook for transparent interception. `submit` hands the service's end of the
/// socketpair, the destination and the guest to the service runtime; it returns false when
/// the runtime is gone, and the connection is then left to the engine.
pub fn hook(
    settings: ProxySettings,
    net: Arc<NetConfig>,
    submit: impl Fn(OwnedFd, SocketAddr, SocketAddr) -> bool + 'static,
) -> TcpHook {
    Box::new(move |dst, guest| {
        if !settings.with(|p| intercepts(p, &net, dst)) {
            return None;
        }
        let pair = StdUnixStream::pair().and_then(|(ours, theirs)| {
            ours.set_nonblocking(true)?;
            theirs.set_nonblocking(true)?;
            Ok((ours, theirs))
        });
        match pair {
            Ok((ours, theirs)) => submit(theirs.into(), dst, guest).then(|| Ok(ours.into())),
            Err(e) => Some(Err(e)),
        }
    })
}

/// What the first bytes of an intercepted connection are.
#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    Tls(Option<String>),
    Http,
    Other,
    /// Not enough bytes yet to tell.
    More,
    Closed,
    /// A ClientHello begun but not finished within the header timeout.
    HelloTimeout,
}

/// Serves one connection to the explicit proxy (the gateway's port 3128), unless
/// `--max-proxy-connections` are being served already (then it is closed at once).
pub async fn serve_explicit(proxy: Arc<Proxy>, sock: UnixStream, guest: SocketAddr) {
    let Some(slot) = proxy.slot(guest) else {
        return;
    };
    http::serve(proxy, sock, http::Mode::Explicit, guest, slot).await
}

/// Serves one transparently intercepted connection whose original destination is `dst`,
/// unless `--max-proxy-connections` are being served already (then it is closed at once).
pub async fn serve_transparent(proxy: Arc<Proxy>, sock: UnixStream, dst: SocketAddr, guest: SocketAddr) {
    let Some(slot) = proxy.slot(guest) else {
        return;
    };
    match sniff(&sock, proxy.cfg.limits.proxy_header_timeout).await {
        Sniffed::Tls(sni) => tls_tunnel(proxy, sock, dst, guest, sni).await,
        Sniffed::Http => http::serve(proxy, sock, http::Mode::Transparent(dst), guest, slot).await,
        Sniffed::Other => {
            debug!("proxy: {guest} -> {dst}: neither HTTP nor TLS, relayed as it is");
            match dial(dst).await {
                Ok(stream) => {
                    let (sock, watch) = idle::watch(sock);
                    relay(&proxy, sock, &watch, stream, Vec::new(), &format!("{guest} -> {dst} (relayed)")).await
                }
                Err(e) => debug!("proxy: {guest} -> {dst}: {e}"),
            }
        }
        Sniffed::HelloTimeout => proxy.header_timed_out(&format!("{guest} -> {dst} (TLS)")),
        Sniffed::Closed | Sniffed::More => {}
    }
}

/// Peeks (never consumes) until the first bytes say TLS, HTTP or something else. A silent
/// connection, or one whose first bytes cannot tell, is classified after [`SNIFF_TIMEOUT`];
/// a ClientHello begun must be whole within `hello_timeout` (the header timeout).
async fn sniff(sock: &UnixStream, hello_timeout: Duration) -> Sniffed {
    let start = Instant::now();
    let deadline = start + SNIFF_TIMEOUT;
    // A timeout too long to add to a time (no flag allows one) is as good as never.
    let hello_deadline = start.checked_add(hello_timeout).unwrap_or_else(|| start + NEVER);
    let mut buf = vec![0u8; tls::MAX_HELLO + 5];
    let mut seen = 0;
    loop {
        // Once the first bytes say TLS, the ClientHello has until the header timeout.
        let tls = seen > 0 && buf[0] == 0x16;
        let deadline = if tls { hello_deadline } else { deadline };
        if tokio::time::timeout_at(deadline, sock.readable()).await.is_err() {
            return match seen {
                0 => Sniffed::Other,
                _ if tls => Sniffed::HelloTimeout,
                _ => classify(&buf[..seen], true),
            };
        }
        let n = match sock.try_io(Interest::READABLE, || peek(sock, &mut buf)) {
            Ok(0) => return Sniffed::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(_) => return Sniffed::Closed,
        };
        let verdict = classify(&buf[..n], n == buf.len());
        if verdict != Sniffed::More {
            return verdict;
        }
        if n == seen {
            // Nothing new since the last peek, and the socket stays readable: wait a little.
            if Instant::now() >= deadline {
                return if tls { Sniffed::HelloTimeout } else { classify(&buf[..n], true) };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        seen = n;
    }
}

/// Classifies the first bytes; `More` when they are not enough to tell, unless `last` says
/// no more will come.
fn classify(data: &[u8], last: bool) -> Sniffed {
    if data.first() == Some(&0x16) {
        return match tls::parse_client_hello(data) {
            tls::Hello::Done(sni) => Sniffed::Tls(sni),
            tls::Hello::NotTls => Sniffed::Other,
            tls::Hello::Incomplete if last => Sniffed::Tls(None),
            tls::Hello::Incomplete => Sniffed::More,
        };
    }
    // An HTTP request starts with a method token (upper-case letters) and a space.
    let method_len = data.iter().take_while(|b| b.is_ascii_uppercase()).count();
    match data.get(method_len) {
        Some(b' ') if (3..=16).contains(&method_len) => Sniffed::Http,
        None if method_len <= 16 && !last => Sniffed::More,
        _ => Sniffed::Other,
    }
}

fn peek(sock: &UnixStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv(2) into a buffer valid for buf.len() bytes.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// An intercepted TLS connection: through `CONNECT` to the HTTPS upstream, or direct.
async fn tls_tunnel(proxy: Arc<Proxy>, sock: UnixStream, dst: SocketAddr, guest: SocketAddr, sni: Option<String>) {
    let cfg = proxy.settings.get();
    let port = dst.port();
    // A name of the host's loopback (or of the host address, or the subnet) never goes to
    // the upstream, which may itself run on the host's loopback: the original destination
    // is dialled instead, as for HTTP (http.rs).
    let excluded =
        cfg.no_proxy.matches(sni.as_deref(), Some(dst.ip()), port) || sni.as_deref().is_some_and(|n| proxy.is_local(n));
    let target = config::authority(&sni.clone().unwrap_or_else(|| dst.ip().to_string()), port);
    let upstream = match (&cfg.https, excluded) {
        (Some(up), false) => Some(up),
        _ => None,
    };
    // The engine judged the address the guest dialled; an upstream dials the name instead.
    let admitted = match (upstream, &sni) {
        (Some(_), Some(name)) => proxy.admit(name, None, port, guest).await,
        _ => Ok(()),
    };
    let result = match (admitted, upstream) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(up)) => open_tunnel(up, &target).await.map(|(s, rest)| (s, rest, up.authority())),
        (Ok(()), None) => dial(dst).await.map(|s| (s, Vec::new(), "direct".to_string())),
    };
    match result {
        Ok((stream, rest, via)) => {
            info!("proxy: {guest} -> {target} (TLS, {dst}) via {via}");
            proxy.dns.metrics().proxy_request(ProxyOutcome::Forwarded);
            log_tls(&proxy, guest, &target, ProxyOutcome::Forwarded, &via);
            let (sock, watch) = idle::watch(sock);
            relay(&proxy, sock, &watch, stream, rest, &format!("{guest} -> {target} (TLS)")).await;
        }
        Err(e) => {
            let outcome = match e {
                ProxyError::Denied { .. } => ProxyOutcome::Denied,
                _ => ProxyOutcome::UpstreamError,
            };
            // A denial was logged by the policy, once per destination.
            if outcome != ProxyOutcome::Denied {
                warn!("proxy: {guest} -> {target} (TLS, {dst}): {e}; resetting the connection");
            }
            proxy.dns.metrics().proxy_request(outcome);
            log_tls(&proxy, guest, &target, outcome, "");
            // The ClientHello is still unread in `sock`: closing it resets the engine's end.
            drop(sock);
        }
    }
}

/// An intercepted TLS connection, in the proxy log.
fn log_tls(proxy: &Proxy, guest: SocketAddr, target: &str, outcome: ProxyOutcome, via: &str) {
    use super::activity::{ProxyLogEntry, clip, now_ms};
    proxy.dns.activity().proxy.push(ProxyLogEntry {
        time_ms: now_ms(),
        guest: guest.to_string(),
        mode: "tls",
        method: "TLS".to_string(),
        host: clip(target),
        status: None,
        outcome: outcome.as_str(),
        via: clip(via),
    });
}

/// Connects to a host socket, bounded by [`CONNECT_TIMEOUT`].
pub async fn dial(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    let target = addr.to_string();
    let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => return Err(ProxyError::Dial { target, err }),
        Err(_) => return Err(ProxyError::Dial { target, err: io::ErrorKind::TimedOut.into() }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// Connects to an upstream proxy (its name, if any, through the host's resolver).
pub async fn dial_upstream(up: &ProxyUrl) -> Result<TcpStream, ProxyError> {
    let proxy = up.authority();
    let stream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(proxy.as_str())).await {
        Ok(Ok(s)) => s,
        Ok(Err(err)) => return Err(ProxyError::Unreachable { proxy, err }),
        Err(_) => return Err(ProxyError::Unreachable { proxy, err: io::ErrorKind::TimedOut.into() }),
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// A tunnel to `target` (`host:port`) through `up`: the connected stream and whatever the
/// proxy sent after its response head (already the destination's bytes).
pub async fn open_tunnel(up: &ProxyUrl, target: &str) -> Result<(TcpStream, Vec<u8>), ProxyError> {
    let mut stream = dial_upstream(up).await?;
    let proxy = up.authority();
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(auth) = up.basic_auth() {
        req.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    req.push_str("\r\n");
    let bad = || ProxyError::BadAnswer { proxy: proxy.clone(), target: target.to_string() };
    let unreachable = |err| ProxyError::Unreachable { proxy: proxy.clone(), err };
    stream.write_all(req.as_bytes()).await.map_err(unreachable)?;
    let mut head = Vec::with_capacity(1024);
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if head.len() >= MAX_HEAD {
            return Err(bad());
        }
        let mut chunk = [0u8; 4096];
        let n = match timeout(CONNECT_TIMEOUT, stream.read(&mut chunk)).await {
            Ok(Ok(0)) => return Err(bad()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(unreachable(e)),
            Err(_) => return Err(unreachable(io::ErrorKind::TimedOut.into())),
        };
        head.extend_from_slice(&chunk[..n]);
    };
    let (status, reason) = status_line(&head).ok_or_else(bad)?;
    if !(200..300).contains(&status) {
        return Err(ProxyError::Refused { proxy, target: target.to_string(), status, reason });
    }
    Ok((stream, head.split_off(end)))
}

/// `HTTP/1.x NNN reason` -> (NNN, reason), the reason cleaned to printable ASCII.
fn status_line(head: &[u8]) -> Option<(u16, String)> {
    let line_end = head.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    let rest = line.strip_prefix("HTTP/1.")?.get(1..)?.strip_prefix(' ')?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 {
        return None;
    }
    let status = code.parse().ok()?;
    let reason: String = reason.chars().filter(|c| c.is_ascii_graphic() || *c == ' ').take(100).collect();
    Some((status, reason))
}

/// Relays both ways until both sides are done, or until the guest's stream, which `watch`
/// follows, has carried nothing either way for `--proxy-idle-timeout` (then both are
/// closed; `what` says which connection in the log); `first` goes to the guest before
/// anything else.
async fn relay<G: AsyncRead + AsyncWrite + Unpin>(
    proxy: &Proxy,
    mut guest: G,
    watch: &Watch,
    mut remote: TcpStream,
    first: Vec<u8>,
    what: &str,
) {
    let copy = async {
        if !first.is_empty() && guest.write_all(&first).await.is_err() {
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut guest, &mut remote).await {
            debug!("proxy: relay ended: {e}");
        }
    };
    tokio::select! {
        () = copy => {}
        () = watch.idle(proxy.cfg.limits.proxy_idle_timeout) => proxy.idle_closed(what),
    }
}

/// One line describing the configuration, without passwords (for logs).
pub fn describe(cfg: &ProxyConfig) -> String {
    let show = |u: &Option<ProxyUrl>| u.as_ref().map_or("none".to_string(), |u| u.to_string());
    let ports: Vec<String> = cfg.ports.iter().map(u16::to_string).collect();
    format!(
        "http={} https={} no_proxy=[{}] transparent={}",
        show(&cfg.http),
        show(&cfg.https),
        cfg.no_proxy.to_list(),
        if cfg.has_upstream() && !ports.is_empty() { ports.join(",") } else { "off".to_string() }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net() -> NetConfig {
        NetConfig::default()
    }

    fn with_upstream() -> ProxyConfig {
        ProxyConfig { http: Some(ProxyUrl::parse("127.0.0.1:3128").unwrap()), ..ProxyConfig::default() }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn interception_rules() {
        let n = net();
        assert!(!intercepts(&ProxyConfig::default(), &n, sa("203.0.113.5:80")));
        let p = with_upstream();
        assert!(intercepts(&p, &n, sa("203.0.113.5:80")));
        assert!(intercepts(&p, &n, sa("203.0.113.5:443")));
        assert!(!intercepts(&p, &n, sa("203.0.113.5:8080")));
        for not in ["192.168.65.1:80", "192.168.65.254:80", "192.168.65.7:80", "127.0.0.1:80", "224.0.0.1:80"] {
            assert!(!intercepts(&p, &n, sa(not)), "{not}");
        }
        let p = ProxyConfig { no_proxy: NoProxy::parse("203.0.113.0/24,name.test").unwrap(), ..with_upstream() };
        assert!(!intercepts(&p, &n, sa("203.0.113.5:80")));
        assert!(intercepts(&p, &n, sa("198.51.100.5:80")));
        let p = ProxyConfig { ports: vec![8080], ..with_upstream() };
        assert!(intercepts(&p, &n, sa("203.0.113.5:8080")));
        assert!(!intercepts(&p, &n, sa("203.0.113.5:80")));
    }

    /// Over IPv6 the hook takes what it takes over IPv4: outside addresses on the proxy's
    /// ports, never usernet's own, the virtual network's, loopback or link-local ones.
    #[test]
    fn ipv6_connections_are_intercepted_as_ipv4_ones() {
        let settings = ProxySettings::default();
        let taken = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let seen = taken.clone();
        let mut hook = hook(settings.clone(), Arc::new(net()), move |_, dst, guest| {
            seen.borrow_mut().push((dst, guest));
            true
        });
        let guest: SocketAddr = "[fd75:7365:726e::2]:40000".parse().unwrap();
        let web: SocketAddr = "[2001:db8::5]:80".parse().unwrap();
        assert!(hook(web, guest).is_none(), "no upstream: nothing intercepted");
        settings.set(with_upstream());
        assert!(hook(web, guest).expect("taken").is_ok());
        assert_eq!(*taken.borrow(), vec![(web, guest)]);
        for not in [
            "[2001:db8::5]:8080",
            "[fd75:7365:726e::1]:80",
            "[fd75:7365:726e::254]:80",
            "[fd75:7365:726e::9]:80",
            "[fe80::1]:80",
            "[::1]:80",
            "[::ffff:203.0.113.5]:80",
        ] {
            assert!(hook(not.parse().unwrap(), guest).is_none(), "{not}");
        }
    }

    /// The explicit proxy over IPv6: literals, the host's ::254 to its [::1], names with
    /// AAAA records only; the virtual network refused.
    #[test]
    fn ipv6_destinations_of_the_explicit_proxy() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let p = proxy_for(net());
        let loopback6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 22));
        assert_eq!(rt.block_on(p.resolve("fd75:7365:726e::254", 22)).unwrap(), loopback6);
        assert_eq!(rt.block_on(p.resolve("2001:db8::5", 80)).unwrap(), sa("[2001:db8::5]:80"));
        for denied in ["fd75:7365:726e::1", "fd75:7365:726e::2", "fe80::1", "ff02::1"] {
            let r = rt.block_on(p.resolve(denied, 22));
            assert!(matches!(r, Err(ProxyError::Forbidden(_))), "{denied}: {r:?}");
        }
        for local in ["fd75:7365:726e::1", "fd75:7365:726e::254", "::1"] {
            assert!(p.is_local(local), "{local} must never go upstream");
        }
        // IPv6-only: the built-in names by their AAAA.
        let p = proxy_for(NetConfig { ipv4: false, ..net() });
        assert_eq!(rt.block_on(p.resolve("host.docker.internal", 22)).unwrap(), loopback6);
    }

    fn proxy_for(cfg: NetConfig) -> Proxy {
        let records = Arc::new(crate::services::dns::DnsRecords::from_config(&cfg));
        let dns = Arc::new(DnsServer::new(&cfg, records));
        Proxy::new(ProxySettings::default(), Arc::new(cfg), dns)
    }

    /// The explicit proxy reaches the host's loopback only through the host address and
    /// its names, and not at all without host loopback.
    #[test]
    fn loopback_only_through_the_host_address() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut cfg = net();
        cfg.extra_hosts.push(("sneaky.test".into(), Ipv4Addr::new(127, 0, 0, 53).into()));
        let p = proxy_for(cfg.clone());
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 22));
        for via in ["192.168.65.254", "host.docker.internal", "host.containers.internal", "::ffff:192.168.65.254"] {
            assert_eq!(rt.block_on(p.resolve(via, 22)).unwrap(), loopback, "{via}");
        }
        for denied in [
            "127.0.0.1",
            "127.0.0.53",
            "0.0.0.0",
            "0.1.2.3",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "localhost",
            "LOCALHOST.",
            "foo.localhost",
            "ip6-localhost",
            "sneaky.test",
        ] {
            let r = rt.block_on(p.resolve(denied, 22));
            assert!(matches!(r, Err(ProxyError::Forbidden(_))), "{denied}: {r:?}");
            assert!(p.is_local(denied), "{denied} must never go upstream");
        }
        assert!(!p.is_local("203.0.113.5") && !p.is_local("2001:db8::1"));
        assert_eq!(rt.block_on(p.resolve("203.0.113.5", 80)).unwrap(), SocketAddr::from(([203, 0, 113, 5], 80)));

        cfg.host_loopback = false;
        let p = proxy_for(cfg);
        for denied in ["192.168.65.254", "host.docker.internal", "127.0.0.1"] {
            let r = rt.block_on(p.resolve(denied, 22));
            assert!(matches!(r, Err(ProxyError::Forbidden(_))), "{denied}: {r:?}");
        }
    }

    /// Addresses that stand for the host (pasta's `--map-host-loopback` and
    /// `--map-guest-addr`), in or outside the subnet, are what they stand for, as in the
    /// engine; usernet's own DNS address outside the subnet is refused; none goes upstream.
    #[test]
    fn host_aliases_are_the_host_addresses_they_stand_for() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut cfg = net();
        cfg.dns = Some(Ipv4Addr::new(169, 254, 1, 1));
        cfg.host_aliases = vec![
            (Ipv4Addr::new(169, 254, 1, 5), Ipv4Addr::LOCALHOST),
            (Ipv4Addr::new(169, 254, 1, 2), Ipv4Addr::new(203, 0, 113, 9)),
        ];
        cfg.host_aliases6 = vec![("fd75:7365:726e::5".parse().unwrap(), std::net::Ipv6Addr::LOCALHOST)];
        let p = proxy_for(cfg.clone());
        assert_eq!(rt.block_on(p.resolve("169.254.1.5", 22)).unwrap(), sa("127.0.0.1:22"));
        assert_eq!(rt.block_on(p.resolve("169.254.1.2", 80)).unwrap(), sa("203.0.113.9:80"));
        assert_eq!(rt.block_on(p.resolve("fd75:7365:726e::5", 22)).unwrap(), sa("[::1]:22"));
        let r = rt.block_on(p.resolve("169.254.1.1", 80));
        assert!(matches!(r, Err(ProxyError::Forbidden(_))), "{r:?}");
        for local in ["169.254.1.5", "169.254.1.2", "169.254.1.1", "fd75:7365:726e::5"] {
            assert!(p.is_local(local), "{local} must never go upstream");
        }
        for not in ["169.254.1.2:80", "169.254.1.5:80", "169.254.1.1:80"] {
            assert!(!intercepts(&with_upstream(), &cfg, sa(not)), "{not}");
        }
        assert!(intercepts(&with_upstream(), &cfg, sa("169.254.1.9:80")));
    }

    /// The egress policy in the proxy: IP literals by the rules, names by the allow-domains
    /// (or, when no allow-domain covers them, by the address the gateway's DNS gives, here
    /// none), the address a direct hop dials by the rules; each denial is counted.
    #[test]
    fn policy_decides_by_name_and_address() {
        use crate::policy::{DenyReason, Policy, Rules};
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let rules = Rules::parse(&["198.51.100.0/24"], &["198.51.100.66"], &["ok.test"]).unwrap();
        let mut cfg = NetConfig { policy: Arc::new(Policy::new(rules)), ..net() };
        cfg.extra_hosts.push(("named.test".into(), Ipv4Addr::new(198, 51, 100, 7).into()));
        let p = proxy_for(cfg);
        let guest = sa("192.168.65.2:40000");
        let admit = |host: &str, ip: Option<&str>, port| {
            rt.block_on(p.admit(host, ip.map(|i| i.parse().unwrap()), port, guest)).map_err(|e| match e {
                ProxyError::Denied { reason, .. } => reason,
                other => panic!("{other}"),
            })
        };
        assert_eq!(admit("198.51.100.5", None, 80), Ok(()));
        assert_eq!(admit("198.51.100.66", None, 80), Err(DenyReason::DenyRule));
        assert_eq!(admit("203.0.113.5", None, 80), Err(DenyReason::NotAllowed));
        assert_eq!(admit("www.ok.test", None, 443), Ok(()));
        assert_eq!(admit("www.ok.test", Some("198.51.100.66"), 443), Err(DenyReason::DenyRule));
        assert_eq!(admit("other.test", None, 443), Err(DenyReason::NotAllowed));
        assert_eq!(admit("other.test", Some("198.51.100.9"), 443), Ok(()));
        // A name of the gateway's own table is judged by its address.
        assert_eq!(admit("named.test", None, 80), Ok(()));
        // The host address is dialled as 127.0.0.1, which no allow rule covers.
        assert_eq!(admit("host.docker.internal", Some("127.0.0.1"), 80), Err(DenyReason::NotAllowed));
        let e = rt.block_on(p.admit("203.0.113.5", None, 80, guest)).unwrap_err();
        assert_eq!(e.status(), 403);
        assert_eq!(
            e.to_string(),
            "203.0.113.5:80 is denied by the egress policy: no --allow rule or --allow-domain covers it"
        );
        let counted: u64 = p.cfg.policy.denied_counts().iter().map(|(_, _, n)| n).sum();
        assert_eq!(counted, 6);
    }

    #[test]
    fn classification() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n", false), Sniffed::Http);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1\r\n", false), Sniffed::Http);
        assert_eq!(classify(b"GE", false), Sniffed::More);
        assert_eq!(classify(b"GE", true), Sniffed::Other);
        assert_eq!(classify(b"get / HTTP/1.1", false), Sniffed::Other);
        assert_eq!(classify(b"SSH-2.0", false), Sniffed::Other);
        assert_eq!(classify(&[0x16, 3, 1], false), Sniffed::More);
        assert_eq!(classify(&[0x16, 3, 1], true), Sniffed::Tls(None));
        assert_eq!(
            classify(include_bytes!("testdata/curl_hello.bin"), false),
            Sniffed::Tls(Some("curl.example".into()))
        );
        assert_eq!(classify(&[0x16, 9, 9, 9, 9, 9], false), Sniffed::Other);
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            status_line(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, "Connection established".into()))
        );
        assert_eq!(
            status_line(b"HTTP/1.0 407 Proxy Authentication Required\r\n"),
            Some((407, "Proxy Authentication Required".into()))
        );
        assert_eq!(status_line(b"HTTP/1.1 502\r\n"), Some((502, String::new())));
        assert_eq!(status_line(b"HTTP/1.1 20 x\r\n"), None);
        assert_eq!(status_line(b"SSH-2.0\r\n"), None);
        assert_eq!(status_line(b"HTTP/1.1 200 ok"), None);
    }

    #[test]
    fn error_statuses() {
        let refused =
            |status| ProxyError::Refused { proxy: "p".into(), target: "t".into(), status, reason: String::new() };
        assert_eq!(refused(407).status(), 502);
        assert_eq!(refused(401).status(), 502);
        assert_eq!(refused(403).status(), 403);
        assert_eq!(refused(502).status(), 502);
        assert_eq!(refused(302).status(), 502);
        let down = ProxyError::Unreachable { proxy: "p".into(), err: io::ErrorKind::ConnectionRefused.into() };
        assert_eq!(down.status(), 502);
        assert!(down.to_string().starts_with("upstream proxy p unreachable"));
    }

    /// A loopback port nothing listens on (it was bound, then closed).
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:24731").or_else(|_| std::net::TcpListener::bind("127.0.0.1:0"));
        l.unwrap().local_addr().unwrap()
    }

    /// The connect error is in the message, and only once in the chain `usernet` prints
    /// (`{:#}`), not again as a cause.
    #[tokio::test]
    async fn a_cause_is_printed_once() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED).to_string();
        let closed = closed_port();
        for e in [
            dial(closed).await.err().unwrap(),
            dial_upstream(&ProxyUrl::parse(&closed.to_string()).unwrap()).await.err().unwrap(),
        ] {
            let text = e.to_string();
            assert!(text.contains(&closed.to_string()) && text.ends_with(&format!(": {refused}")), "{text}");
            assert_eq!(format!("{:#}", anyhow::Error::from(e)).matches(&refused).count(), 1);
        }
    }

    /// A proxy with these bounds (and no upstream).
    fn bounded(max: usize, header: Duration, idle: Duration) -> Arc<Proxy> {
        let mut cfg = net();
        cfg.limits.max_proxy_connections = max;
        cfg.limits.proxy_header_timeout = header;
        cfg.limits.proxy_idle_timeout = idle;
        Arc::new(proxy_for(cfg))
    }

    fn reached(p: &Proxy, limit: ServiceLimit) -> u64 {
        p.dns.metrics().sample(&[]).limits.iter().find(|(l, _)| *l == limit).map_or(0, |(_, n)| *n)
    }

    /// Sends the explicit proxy a request it answers itself (origin-form: 400), returns
    /// the start of the answer.
    async fn ask(c: &mut UnixStream) -> String {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until the proxy closes its end (end of file or a reset).
    async fn until_closed(c: &mut UnixStream) {
        let mut buf = [0u8; 1024];
        while let Ok(n) = c.read(&mut buf).await
            && n > 0
        {}
    }

    /// Explicit and transparent connections share `--max-proxy-connections`: one more is
    /// closed at once and counted; a place that frees takes a new one.
    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed() {
        let p = bounded(2, Duration::from_secs(30), Duration::from_secs(7200));
        let guest = sa("192.168.65.2:40000");
        let dst = sa("203.0.113.5:80");
        let (mut a, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve_explicit(p.clone(), theirs, guest));
        let (b, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve_transparent(p.clone(), theirs, dst, guest));
        assert!(ask(&mut a).await.starts_with("HTTP/1.1 400 "));
        assert_eq!(p.slots.available_permits(), 0);

        let (mut c, theirs) = UnixStream::pair().unwrap();
        timeout(Duration::from_secs(1), serve_explicit(p.clone(), theirs, guest)).await.expect("closed at once");
        assert_eq!(c.read(&mut [0u8; 64]).await.unwrap(), 0);
        let (mut d, theirs) = UnixStream::pair().unwrap();
        timeout(Duration::from_secs(1), serve_transparent(p.clone(), theirs, dst, guest))
            .await
            .expect("closed at once");
        assert_eq!(d.read(&mut [0u8; 64]).await.unwrap(), 0);
        assert_eq!(reached(&p, ServiceLimit::ProxyConnections), 2);
        // The connection that was served still is.
        assert!(ask(&mut a).await.starts_with("HTTP/1.1 400 "));

        drop(a);
        timeout(Duration::from_secs(5), async {
            while p.slots.available_permits() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the closed connection's place frees");
        let (mut e, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve_explicit(p.clone(), theirs, guest));
        assert!(ask(&mut e).await.starts_with("HTTP/1.1 400 "));
        assert_eq!(reached(&p, ServiceLimit::ProxyConnections), 2);
        drop(b);
    }

    /// A request header, or a TLS ClientHello, not whole within the header timeout closes
    /// the connection (counted); a kept-alive connection that waits after its answer is
    /// closed too, but that is no limit reached.
    #[tokio::test(start_paused = true)]
    async fn a_header_cut_short_is_closed_after_the_header_timeout() {
        let p = bounded(8, Duration::from_secs(2), Duration::from_secs(7200));
        let guest = sa("192.168.65.2:40000");
        let within = |start: Instant| {
            let waited = start.elapsed();
            assert!(waited >= Duration::from_secs(2) && waited < Duration::from_millis(2100), "{waited:?}");
        };

        let (mut a, theirs) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let served = tokio::spawn(serve_explicit(p.clone(), theirs, guest));
        a.write_all(b"GET http://a.test/ HTTP/1.1\r\nHost: a.te").await.unwrap();
        until_closed(&mut a).await;
        within(start);
        served.await.unwrap();
        assert_eq!(reached(&p, ServiceLimit::ProxyHeaderTimeout), 1);

        let (mut b, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve_explicit(p.clone(), theirs, guest));
        assert!(ask(&mut b).await.starts_with("HTTP/1.1 400 "));
        let start = Instant::now();
        until_closed(&mut b).await;
        within(start);
        assert_eq!(reached(&p, ServiceLimit::ProxyHeaderTimeout), 1);

        // Intercepted TLS: the first 40 bytes of a ClientHello, and no more.
        let hello = include_bytes!("testdata/curl_hello.bin");
        let (mut c, theirs) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let served = tokio::spawn(serve_transparent(p.clone(), theirs, sa("203.0.113.5:443"), guest));
        c.write_all(&hello[..40]).await.unwrap();
        until_closed(&mut c).await;
        within(start);
        served.await.unwrap();
        assert_eq!(reached(&p, ServiceLimit::ProxyHeaderTimeout), 2);
    }

    /// Timeouts too long to add to a time (no flag allows them) are no deadline: the
    /// connections are served, and nothing panics.
    #[tokio::test]
    async fn endless_timeouts_are_no_deadline() {
        let p = bounded(8, Duration::MAX, Duration::MAX);
        let guest = sa("192.168.65.2:40000");
        let (mut a, theirs) = UnixStream::pair().unwrap();
        let served = tokio::spawn(serve_explicit(p.clone(), theirs, guest));
        assert!(ask(&mut a).await.starts_with("HTTP/1.1 400 "));
        drop(a);
        served.await.unwrap();

        let hello = include_bytes!("testdata/curl_hello.bin");
        let (mut c, theirs) = UnixStream::pair().unwrap();
        let served = tokio::spawn(serve_transparent(p.clone(), theirs, sa("203.0.113.5:443"), guest));
        c.write_all(&hello[..40]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!served.is_finished(), "still waiting for the rest of the ClientHello");
        served.abort();
    }

    /// A CONNECT tunnel that carries nothing either way for the idle timeout is closed
    /// (counted); one that carries a byte now and then is not, until it falls silent.
    #[tokio::test]
    async fn idle_tunnels_are_closed_active_ones_are_not() {
        let p = bounded(8, Duration::from_secs(30), Duration::from_secs(1));
        let guest = sa("192.168.65.2:40000");
        // An echo server on the host's loopback, reached through the host address.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        let tunnel = || async {
            let (mut c, theirs) = UnixStream::pair().unwrap();
            tokio::spawn(serve_explicit(p.clone(), theirs, guest));
            let req = format!("CONNECT 192.168.65.254:{port} HTTP/1.1\r\nHost: 192.168.65.254:{port}\r\n\r\n");
            c.write_all(req.as_bytes()).await.unwrap();
            let mut head = Vec::new();
            while !head.ends_with(b"\r\n\r\n") {
                let mut one = [0u8; 1];
                assert_eq!(c.read(&mut one).await.unwrap(), 1, "{}", String::from_utf8_lossy(&head));
                head.push(one[0]);
            }
            assert!(head.starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&head));
            c
        };
        let mut quiet = tunnel().await;
        let mut busy = tunnel().await;
        let start = Instant::now();
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            busy.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            busy.read_exact(&mut one).await.expect("the busy tunnel stays open");
            assert_eq!(&one, b"x");
        }
        assert!(start.elapsed() > Duration::from_secs(2));
        timeout(Duration::from_millis(100), until_closed(&mut quiet)).await.expect("the quiet tunnel is closed");
        assert_eq!(reached(&p, ServiceLimit::ProxyIdleTimeout), 1);
        let silent = Instant::now();
        timeout(Duration::from_secs(3), until_closed(&mut busy)).await.expect("the busy tunnel, silent, is closed");
        assert!(silent.elapsed() >= Duration::from_millis(900), "{:?}", silent.elapsed());
        assert_eq!(reached(&p, ServiceLimit::ProxyIdleTimeout), 2);
    }

    /// A request waiting on a next hop that never answers: nothing either way for the idle
    /// timeout, and the guest's connection is closed (counted).
    #[tokio::test]
    async fn a_request_waiting_on_a_silent_server_is_closed_when_idle() {
        let p = bounded(8, Duration::from_secs(30), Duration::from_secs(1));
        let guest = sa("192.168.65.2:40000");
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            // Reads the request, answers nothing, holds the connection.
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await
                && n > 0
            {}
        });
        let (mut c, theirs) = UnixStream::pair().unwrap();
        tokio::spawn(serve_explicit(p.clone(), theirs, guest));
        let req = format!("GET http://192.168.65.254:{port}/ HTTP/1.1\r\nHost: 192.168.65.254:{port}\r\n\r\n");
        c.write_all(req.as_bytes()).await.unwrap();
        let start = Instant::now();
        timeout(Duration::from_secs(5), until_closed(&mut c)).await.expect("closed when idle");
        assert!(start.elapsed() >= Duration::from_millis(900), "{:?}", start.elapsed());
        assert_eq!(reached(&p, ServiceLimit::ProxyIdleTimeout), 1);
        assert_eq!(reached(&p, ServiceLimit::ProxyHeaderTimeout), 0);
        // The connection to the server goes with it.
        timeout(Duration::from_secs(5), server).await.expect("the server's connection is closed").unwrap();
    }

    /// An upstream proxy on loopback answering one CONNECT with `answer`, returning what it got.
    fn fake_upstream(answer: &'static [u8]) -> (ProxyUrl, std::thread::JoinHandle<String>) {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).unwrap();
            String::from_utf8_lossy(&got).into_owned()
        });
        (ProxyUrl::parse(&format!("http://us%3Aer:p@ss@127.0.0.1:{port}")).unwrap(), t)
    }

    #[test]
    fn tunnel_through_fake_upstream() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (up, t) = fake_upstream(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\nearly");
        let (_, rest) = rt.block_on(open_tunnel(&up, "secure.test:443")).unwrap();
        assert_eq!(rest, b"early");
        let req = t.join().unwrap();
        assert!(req.starts_with("CONNECT secure.test:443 HTTP/1.1\r\nHost: secure.test:443\r\n"), "{req}");
        // base64("us:er:p@ss")
        assert!(req.contains("Proxy-Authorization: Basic dXM6ZXI6cEBzcw==\r\n"), "{req}");

        let (up, t) = fake_upstream(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
        let e = rt.block_on(open_tunnel(&up, "secure.test:443")).unwrap_err();
        t.join().unwrap();
        assert_eq!(e.status(), 502);
        assert!(e.to_string().contains("407 Proxy Authentication Required"), "{e}");
        assert!(!e.to_string().contains("p@ss"));

        let (up, t) = fake_upstream(b"garbage\r\n\r\n");
        assert!(matches!(rt.block_on(open_tunnel(&up, "x.test:443")), Err(ProxyError::BadAnswer { .. })));
        t.join().unwrap();
    }
}
