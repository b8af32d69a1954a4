//! Docker's `-p/--publish` and `--expose` grammar.
//!
//! Theory of operation. This is a port of docker/go-connections' `nat` package
//! (`ParsePortSpec`, `ParsePortRange`, `SplitProtoPort`, `validateProto`) and of the
//! docker CLI's `convertToStandardNotation` (the long form `published=8000,target=80`) and
//! `--expose` parsing, so that every spec Docker accepts means the same here and every spec
//! it rejects is rejected with Docker's own message (the `Display` of [`SpecError`]).
//!
//! A short spec is split on `:` from the right: the last part is `containerPort[/proto]`,
//! the one before it the host port (empty: any), and everything before that the host IP
//! (`[::1]`, or the legacy unbracketed `::1`). Both ports may be ranges `A-B`:
//!
//! - equal-sized ranges map pairwise (`8000-8010:80-90`);
//! - a host range with a single container port (`8000-8010:80`) is one mapping that takes
//!   the first free host port of the range;
//! - a container range without host ports (`80-90`) maps each port to a port of the
//!   kernel's choosing.
//!
//! [`parse_publish`] expands every range into one [`PortSpec`] per container port.
//! Docker also accepts `sctp`; usernet publishes TCP and UDP only and says so.

use std::fmt;
use std::net::IpAddr;

use usernet_core::ports::Proto;

/// One port to publish: host address and port(s) to listen on, guest port to forward to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortSpec {
    /// Where to listen; `None` means both 0.0.0.0 and [::].
    pub host_ip: Option<IpAddr>,
    /// The host port range to pick from, inclusive. `None` or `(0, 0)`: the kernel picks.
    pub host_ports: Option<(u16, u16)>,
    pub container_port: u16,
    pub proto: Proto,
}

impl PortSpec {
    /// True when usernet (or the kernel) chooses the host port: none given, 0, or a range.
    pub fn picks_port(&self) -> bool {
        match self.host_ports {
            None => true,
            Some((lo, hi)) => lo == 0 || lo != hi,
        }
    }
}

impl fmt::Display for PortSpec {
    /// Docker's short form: `[ip:][hostPort:]containerPort/proto`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.host_ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(IpAddr::V4(ip)) => write!(f, "{ip}:")?,
            None => {}
        }
        match self.host_ports {
            Some((lo, hi)) if lo == hi => write!(f, "{lo}:")?,
            Some((lo, hi)) => write!(f, "{lo}-{hi}:")?,
            None if self.host_ip.is_some() => f.write_str(":")?,
            None => {}
        }
        write!(f, "{}/{}", self.container_port, self.proto)
    }
}

/// Why a spec was rejected; `Display` is Docker's message, word for word.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("no port specified: {0}<empty>")]
    NoPort(String),
    #[error("invalid proto: {0}")]
    InvalidProto(String),
    /// Docker accepts it; usernet does not publish it.
    #[error("unsupported proto: {0} (usernet publishes tcp and udp)")]
    UnsupportedProto(String),
    /// A bracketed IP that Go's `net.SplitHostPort` rejects.
    #[error("invalid IP address {ip}: {detail}")]
    BadBracketedIp { ip: String, detail: String },
    #[error("invalid IP address: {0}")]
    InvalidIp(String),
    #[error("invalid containerPort: {0}")]
    InvalidContainerPort(String),
    #[error("invalid hostPort: {0}")]
    InvalidHostPort(String),
    #[error("invalid ranges specified for container and host Ports: {container} and {host}")]
    InvalidRanges { container: String, host: String },
    #[error("invalid publish opts format (should be name=value but got '{0}')")]
    BadLongForm(String),
    #[error("invalid port format for --expose: {0}")]
    ExposeFormat(String),
    #[error("invalid range format for --expose: {spec}, error: {error}")]
    ExposeRange { spec: String, error: RangeError },
}

/// Why `ParsePortRange` rejected a string (Go's wording).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("empty string specified for ports")]
    Empty,
    #[error("strconv.ParseUint: parsing {0:?}: invalid syntax")]
    Syntax(String),
    #[error("strconv.ParseUint: parsing {0:?}: value out of range")]
    OutOfRange(String),
    #[error("invalid range specified for port: {0}")]
    Reversed(String),
    /// Port 0 exposed: nothing can connect to it.
    #[error("port numbers must be between 1 and 65535")]
    Zero,
}

/// Go's `strconv.ParseUint(s, 10, 16)`: ASCII digits only (no sign, no spaces), at most 65535.
/// Like Go, an overflow is reported as soon as it happens, before any later bad character.
fn parse_u16(s: &str) -> Result<u16, RangeError> {
    if s.is_empty() {
        return Err(RangeError::Syntax(s.to_string()));
    }
    let mut n: u32 = 0;
    for c in s.bytes() {
        if !c.is_ascii_digit() {
            return Err(RangeError::Syntax(s.to_string()));
        }
        n = n * 10 + u32::from(c - b'0');
        if n > u32::from(u16::MAX) {
            return Err(RangeError::OutOfRange(s.to_string()));
        }
    }
    // n <= u16::MAX was checked above.
    Ok(n as u16)
}

/// go-connections' `ParsePortRange`: `8000` or `8000-9000` (inclusive). Like Docker, a
/// third `-part` is ignored (`1-2-3` is `1-2`).
pub fn parse_port_range(ports: &str) -> Result<(u16, u16), RangeError> {
    if ports.is_empty() {
        return Err(RangeError::Empty);
    }
    if !ports.contains('-') {
        let p = parse_u16(ports)?;
        return Ok((p, p));
    }
    let mut parts = ports.split('-');
    let start = parse_u16(parts.next().unwrap_or(""))?;
    let end = parse_u16(parts.next().unwrap_or(""))?;
    if end < start {
        return Err(RangeError::Reversed(ports.to_string()));
    }
    Ok((start, end))
}

/// go-connections' `SplitProtoPort`: `80/udp` -> ("udp", "80"); no proto -> "tcp";
/// no port -> ("", ""). Neither part is validated.
pub fn split_proto_port(raw: &str) -> (&str, &str) {
    let (port, proto) = raw.split_once('/').unwrap_or((raw, ""));
    if port.is_empty() {
        return ("", "");
    }
    (if proto.is_empty() { "tcp" } else { proto }, port)
}

/// go-connections' `validateProto` (already lowercased), then usernet's own limit.
pub fn validate_proto(proto: &str) -> Result<Proto, SpecError> {
    match proto {
        "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        "sctp" => Err(SpecError::UnsupportedProto(proto.to_string())),
        _ => Err(SpecError::InvalidProto(proto.to_string())),
    }
}

/// go-connections' `splitParts`: (hostIP, hostPort, containerPort).
fn split_parts(raw: &str) -> (&str, &str, &str) {
    let parts: Vec<&str> = raw.split(':').collect();
    match parts.as_slice() {
        [c] => ("", "", c),
        [h, c] => ("", h, c),
        [ip, h, c] => (ip, h, c),
        _ => {
            // More colons: an unbracketed IPv6 address; the last two parts are the ports.
            let n = parts.len();
            let ip_len = raw.len() - parts[n - 2].len() - parts[n - 1].len() - 2;
            (&raw[..ip_len], parts[n - 2], parts[n - 1])
        }
    }
}

/// Go's `net.SplitHostPort(ip + ":")` for an IP starting with `[`: the address inside
/// the brackets, or the detail of Go's error.
fn strip_brackets(ip: &str) -> Result<&str, String> {
    let hostport = format!("{ip}:");
    let addr_err = |what: &str| format!("address {hostport}: {what}");
    let Some(end) = hostport.find(']') else {
        return Err(addr_err("missing ']' in address"));
    };
    let last_colon = hostport.len() - 1;
    if end + 1 == hostport.len() {
        return Err(addr_err("missing port in address"));
    }
    if end + 1 != last_colon {
        if hostport.as_bytes()[end + 1] == b':' {
            return Err(addr_err("too many colons in address"));
        }
        return Err(addr_err("missing port in address"));
    }
    let host = &ip[1..end];
    if host.contains('[') || ip[1..].contains('[') {
        return Err(addr_err("unexpected '[' in address"));
    }
    if ip[end + 1..].contains(']') {
        return Err(addr_err("unexpected ']' in address"));
    }
    Ok(host)
}

/// Go's `net.ParseIP`: dotted IPv4 or IPv6 (IPv4-mapped included), no zone.
fn parse_ip(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>().ok()
}

/// The docker CLI's `convertToStandardNotation` for the long form
/// (`published=8000,target=80,protocol=udp`), extended with `host_ip=ADDR`, which the
/// docker CLI ignores for `run`. Other keys (`mode`) are ignored as Docker does.
fn long_to_short(spec: &str) -> Result<String, SpecError> {
    let mut published = "";
    let mut target = "";
    let mut protocol = "tcp";
    let mut host_ip = "";
    for param in spec.split(',') {
        let (k, v) = match param.split_once('=') {
            Some((k, v)) if !k.is_empty() => (k, v),
            _ => return Err(SpecError::BadLongForm(param.to_string())),
        };
        match k {
            "published" => published = v,
            "target" => target = v,
            "protocol" => protocol = v,
            "host_ip" => host_ip = v,
            _ => {}
        }
    }
    let short = format!("{published}:{target}/{protocol}");
    Ok(match host_ip {
        "" => short,
        ip if ip.contains(':') && !ip.starts_with('[') => format!("[{ip}]:{short}"),
        ip => format!("{ip}:{short}"),
    })
}

/// Parses one `-p/--publish` value, expanding ranges into one spec per container port.
pub fn parse_publish(raw: &str) -> Result<Vec<PortSpec>, SpecError> {
    if raw.contains('=') {
        let short = long_to_short(raw)?;
        return parse_port_spec(&short);
    }
    parse_port_spec(raw)
}

/// go-connections' `ParsePortSpec`, check for check in the same order.
fn parse_port_spec(raw: &str) -> Result<Vec<PortSpec>, SpecError> {
    let (ip, host_port, container) = split_parts(raw);
    let (proto, container) = split_proto_port(container);
    if container.is_empty() {
        return Err(SpecError::NoPort(raw.to_string()));
    }
    let proto = validate_proto(&proto.to_ascii_lowercase())?;

    let mut ip = ip;
    if ip.starts_with('[') {
        ip = strip_brackets(ip).map_err(|detail| SpecError::BadBracketedIp { ip: ip.to_string(), detail })?;
    }
    let host_ip =
        if ip.is_empty() { None } else { Some(parse_ip(ip).ok_or_else(|| SpecError::InvalidIp(ip.to_string()))?) };

    let (start, end) =
        parse_port_range(container).map_err(|_| SpecError::InvalidContainerPort(container.to_string()))?;
    // Port 0 cannot be connected to: its listener would reset every client (Podman refuses
    // it too).
    if start == 0 {
        return Err(SpecError::InvalidContainerPort(container.to_string()));
    }

    let mut host_range = None;
    if !host_port.is_empty() {
        let (hs, he) = parse_port_range(host_port).map_err(|_| SpecError::InvalidHostPort(host_port.to_string()))?;
        // Sizes may differ only when the container port is a single port: then the host
        // range is where a free port is picked.
        if end - start != he - hs && end != start {
            return Err(SpecError::InvalidRanges { container: container.to_string(), host: host_port.to_string() });
        }
        host_range = Some((hs, he));
    }

    let count = usize::from(end - start) + 1;
    let specs = (0..count)
        .map(|i| {
            // i < count <= 65536 and start + i <= end, so these fit in u16.
            let offset = i as u16;
            let host_ports = host_range.map(|(hs, he)| if count == 1 { (hs, he) } else { (hs + offset, hs + offset) });
            PortSpec { host_ip, host_ports, container_port: start + offset, proto }
        })
        .collect();
    Ok(specs)
}

/// Parses one `--expose` value: `80`, `80/udp`, `8000-8010/tcp`.
pub fn parse_expose(raw: &str) -> Result<Vec<(u16, Proto)>, SpecError> {
    if raw.contains(':') {
        return Err(SpecError::ExposeFormat(raw.to_string()));
    }
    let (proto, port) = split_proto_port(raw);
    let (start, end) =
        parse_port_range(port).map_err(|error| SpecError::ExposeRange { spec: raw.to_string(), error })?;
    let proto = validate_proto(&proto.to_ascii_lowercase())?;
    if start == 0 {
        return Err(SpecError::ExposeRange { spec: raw.to_string(), error: RangeError::Zero });
    }
    Ok((start..=end).map(|p| (p, proto)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn spec(ip: Option<&str>, host: Option<(u16, u16)>, port: u16, proto: Proto) -> PortSpec {
        PortSpec { host_ip: ip.map(|s| s.parse().expect("test IP")), host_ports: host, container_port: port, proto }
    }

    fn one(raw: &str) -> PortSpec {
        let v = parse_publish(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
        assert_eq!(v.len(), 1, "{raw}: {v:?}");
        v[0]
    }

    fn err(raw: &str) -> String {
        match parse_publish(raw) {
            Ok(v) => panic!("{raw} was accepted: {v:?}"),
            Err(e) => e.to_string(),
        }
    }

    // --- ParsePortRange (nat/parse_test.go TestParsePortRange) ---

    #[test]
    fn port_range_valid() {
        for (input, want) in [
            ("1234", (1234, 1234)),
            ("1234-1234", (1234, 1234)),
            ("1234-1235", (1234, 1235)),
            ("8000-9000", (8000, 9000)),
            ("0", (0, 0)),
            ("0-0", (0, 0)),
            ("0123", (123, 123)),
            ("65535", (65535, 65535)),
            // Docker's quirk: a third part is ignored.
            ("1-2-3", (1, 2)),
        ] {
            assert_eq!(parse_port_range(input), Ok(want), "{input}");
        }
    }

    #[test]
    fn port_range_errors() {
        for (input, want) in [
            ("", "empty string specified for ports"),
            ("asdf", r#"strconv.ParseUint: parsing "asdf": invalid syntax"#),
            ("9000-8000", "invalid range specified for port: 9000-8000"),
            ("8000-", r#"strconv.ParseUint: parsing "": invalid syntax"#),
            ("-9000", r#"strconv.ParseUint: parsing "": invalid syntax"#),
            ("8000-a", r#"strconv.ParseUint: parsing "a": invalid syntax"#),
            ("8000-9000a", r#"strconv.ParseUint: parsing "9000a": invalid syntax"#),
            ("a-9000", r#"strconv.ParseUint: parsing "a": invalid syntax"#),
            ("8000a-9000", r#"strconv.ParseUint: parsing "8000a": invalid syntax"#),
            ("-8000-", r#"strconv.ParseUint: parsing "": invalid syntax"#),
            ("-", r#"strconv.ParseUint: parsing "": invalid syntax"#),
            ("70000", r#"strconv.ParseUint: parsing "70000": value out of range"#),
            ("+80", r#"strconv.ParseUint: parsing "+80": invalid syntax"#),
            (" 80", r#"strconv.ParseUint: parsing " 80": invalid syntax"#),
            ("80 ", r#"strconv.ParseUint: parsing "80 ": invalid syntax"#),
            ("٣", r#"strconv.ParseUint: parsing "٣": invalid syntax"#),
        ] {
            let e = parse_port_range(input).expect_err(input);
            assert_eq!(e.to_string(), want, "{input}");
        }
    }

    // --- SplitProtoPort (nat_test.go TestSplitProtoPort) ---

    #[test]
    fn split_proto_port_cases() {
        for (input, proto, port) in [
            ("", "", ""),
            ("0", "tcp", "0"),
            ("/udp", "", ""),
            ("1234", "tcp", "1234"),
            ("1234/", "tcp", "1234"),
            ("1234/udp", "udp", "1234"),
            ("80-8080", "tcp", "80-8080"),
            ("80-8080/", "tcp", "80-8080"),
            ("80-8080/udp", "udp", "80-8080"),
            ("-1", "tcp", "-1"),
            ("1234/UDP", "UDP", "1234"),
            ("any port value", "tcp", "any port value"),
            ("any port value/any proto value", "any proto value", "any port value"),
        ] {
            assert_eq!(split_proto_port(input), (proto, port), "{input:?}");
        }
    }

    #[test]
    fn validate_proto_cases() {
        assert_eq!(validate_proto("tcp"), Ok(Proto::Tcp));
        assert_eq!(validate_proto("udp"), Ok(Proto::Udp));
        assert_eq!(validate_proto("xyz").unwrap_err().to_string(), "invalid proto: xyz");
        assert!(matches!(validate_proto("sctp"), Err(SpecError::UnsupportedProto(_))));
    }

    // --- The short forms ---

    #[test]
    fn container_port_only() {
        assert_eq!(one("80"), spec(None, None, 80, Proto::Tcp));
        assert_eq!(one("80/tcp"), spec(None, None, 80, Proto::Tcp));
        assert_eq!(one("53/udp"), spec(None, None, 53, Proto::Udp));
        assert_eq!(one("53/UDP"), spec(None, None, 53, Proto::Udp));
        assert_eq!(one("80/"), spec(None, None, 80, Proto::Tcp));
        assert!(one("80").picks_port());
    }

    #[test]
    fn host_and_container_port() {
        let s = one("8000:80");
        assert_eq!(s, spec(None, Some((8000, 8000)), 80, Proto::Tcp));
        assert!(!s.picks_port());
        assert_eq!(one("5353:53/udp"), spec(None, Some((5353, 5353)), 53, Proto::Udp));
        assert_eq!(one(":80"), spec(None, None, 80, Proto::Tcp));
        let zero = one("0:80");
        assert_eq!(zero, spec(None, Some((0, 0)), 80, Proto::Tcp));
        assert!(zero.picks_port());
    }

    #[test]
    fn with_ipv4() {
        assert_eq!(one("127.0.0.1:8000:80"), spec(Some("127.0.0.1"), Some((8000, 8000)), 80, Proto::Tcp));
        let s = one("127.0.0.1::80");
        assert_eq!(s, spec(Some("127.0.0.1"), None, 80, Proto::Tcp));
        assert!(s.picks_port());
        // TestParseNetworkOptsPrivateOnly / Public / Udp
        assert_eq!(one("192.168.1.100::80"), spec(Some("192.168.1.100"), None, 80, Proto::Tcp));
        assert_eq!(one("192.168.1.100:8080:80"), spec(Some("192.168.1.100"), Some((8080, 8080)), 80, Proto::Tcp));
        assert_eq!(one("192.168.1.100::6000/udp"), spec(Some("192.168.1.100"), None, 6000, Proto::Udp));
        assert_eq!(one("0.0.0.0:1234:1234/udp"), spec(Some("0.0.0.0"), Some((1234, 1234)), 1234, Proto::Udp));
    }

    #[test]
    fn with_ipv6() {
        // TestPartPortSpecIPV6
        assert_eq!(one("[2001:4860:0:2001::68]::333"), spec(Some("2001:4860:0:2001::68"), None, 333, Proto::Tcp));
        assert_eq!(one("[::1]:80:80"), spec(Some("::1"), Some((80, 80)), 80, Proto::Tcp));
        assert_eq!(one("2001:4860:0:2001::68::333"), spec(Some("2001:4860:0:2001::68"), None, 333, Proto::Tcp));
        assert_eq!(one("::1:80:80"), spec(Some("::1"), Some((80, 80)), 80, Proto::Tcp));
        assert_eq!(one("::::80"), spec(Some("::"), None, 80, Proto::Tcp));
        assert_eq!(one("[::1]:8000:80"), spec(Some("::1"), Some((8000, 8000)), 80, Proto::Tcp));
        assert_eq!(one("[::1]::80"), spec(Some("::1"), None, 80, Proto::Tcp));
        assert_eq!(one("[::1]::6000/udp"), spec(Some("::1"), None, 6000, Proto::Udp));
        // Bracketed IPv4 is accepted too (Go strips the brackets).
        assert_eq!(one("[127.0.0.1]:8000:80"), spec(Some("127.0.0.1"), Some((8000, 8000)), 80, Proto::Tcp));
        // Empty brackets mean no IP, as in Docker.
        assert_eq!(one("[]:8000:80"), spec(None, Some((8000, 8000)), 80, Proto::Tcp));
        assert_eq!(one("[::ffff:127.0.0.1]:8000:80").host_ip, Some(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped())));
    }

    #[test]
    fn full_range_pairwise() {
        // TestParsePortSpecFull
        assert_eq!(
            parse_publish("0.0.0.0:1234-1235:3333-3334/tcp").expect("valid"),
            vec![
                spec(Some("0.0.0.0"), Some((1234, 1234)), 3333, Proto::Tcp),
                spec(Some("0.0.0.0"), Some((1235, 1235)), 3334, Proto::Tcp),
            ]
        );
        let v = parse_publish("8000-8010:80-90").expect("valid");
        assert_eq!(v.len(), 11);
        for (i, s) in v.iter().enumerate() {
            let i = i as u16;
            assert_eq!(*s, spec(None, Some((8000 + i, 8000 + i)), 80 + i, Proto::Tcp));
            assert!(!s.picks_port());
        }
    }

    #[test]
    fn host_range_single_container_port() {
        let s = one("8000-8010:80");
        assert_eq!(s, spec(None, Some((8000, 8010)), 80, Proto::Tcp));
        assert!(s.picks_port());
        assert_eq!(one("127.0.0.1:8000-8010:80/udp"), spec(Some("127.0.0.1"), Some((8000, 8010)), 80, Proto::Udp));
        // A one-port range is a fixed port.
        assert!(!one("8000-8000:80").picks_port());
    }

    #[test]
    fn container_range_random_host_ports() {
        // TestParsePortSpecsWithRange
        let v = parse_publish("1234-1236/tcp").expect("valid");
        assert_eq!(
            v,
            vec![
                spec(None, None, 1234, Proto::Tcp),
                spec(None, None, 1235, Proto::Tcp),
                spec(None, None, 1236, Proto::Tcp),
            ]
        );
        let v = parse_publish("80-90").expect("valid");
        assert_eq!(v.len(), 11);
        assert!(v.iter().all(|s| s.host_ports.is_none() && s.picks_port()));
        let v = parse_publish("2345-2347:2345-2347/udp").expect("valid");
        assert_eq!(v[1], spec(None, Some((2346, 2346)), 2346, Proto::Udp));
        // The whole port space is a valid (if large) range; port 0 is no port to connect to.
        assert_eq!(parse_publish("1-65535").expect("valid").len(), 65535);
    }

    #[test]
    fn long_form() {
        assert_eq!(one("published=8000,target=80"), spec(None, Some((8000, 8000)), 80, Proto::Tcp));
        assert_eq!(one("published=8000,target=80,protocol=udp"), spec(None, Some((8000, 8000)), 80, Proto::Udp));
        assert_eq!(
            one("target=80,published=8000,protocol=udp,host_ip=127.0.0.1"),
            spec(Some("127.0.0.1"), Some((8000, 8000)), 80, Proto::Udp)
        );
        assert_eq!(one("published=8000,target=80,host_ip=::1"), spec(Some("::1"), Some((8000, 8000)), 80, Proto::Tcp));
        assert_eq!(
            one("published=8000,target=80,host_ip=[::1]"),
            spec(Some("::1"), Some((8000, 8000)), 80, Proto::Tcp)
        );
        assert_eq!(one("target=80"), spec(None, None, 80, Proto::Tcp));
        assert_eq!(one("target=80,mode=host,published=8000-8010"), spec(None, Some((8000, 8010)), 80, Proto::Tcp));
        assert_eq!(err("published=8000,target"), "invalid publish opts format (should be name=value but got 'target')");
        assert_eq!(err("=8000,target=80"), "invalid publish opts format (should be name=value but got '=8000')");
        assert_eq!(err("published=8000"), "no port specified: 8000:/tcp<empty>");
        assert_eq!(err("target=abc"), "invalid containerPort: abc");
        assert_eq!(err("target=80,protocol=xyz"), "invalid proto: xyz");
        assert_eq!(err("target=80,published=8000,host_ip=1.2.3"), "invalid IP address: 1.2.3");
    }

    // --- Errors, word for word ---

    #[test]
    fn empty_container_port() {
        // TestParsePortSpecEmptyContainerPort
        assert_eq!(err(""), "no port specified: <empty>");
        assert_eq!(err("0.0.0.0:1234-1235:/tcp"), "no port specified: 0.0.0.0:1234-1235:/tcp<empty>");
        assert_eq!(err("0.0.0.0:1234-1235:"), "no port specified: 0.0.0.0:1234-1235:<empty>");
        assert_eq!(err("/udp"), "no port specified: /udp<empty>");
        assert_eq!(err("8000:"), "no port specified: 8000:<empty>");
    }

    #[test]
    fn bad_ports() {
        assert_eq!(err("70000:80"), "invalid hostPort: 70000");
        assert_eq!(err("8000:70000"), "invalid containerPort: 70000");
        assert_eq!(err("abc"), "invalid containerPort: abc");
        assert_eq!(err("8000:abc"), "invalid containerPort: abc");
        assert_eq!(err("8000:0"), "invalid containerPort: 0");
        assert_eq!(err("0"), "invalid containerPort: 0");
        assert_eq!(err("0-5"), "invalid containerPort: 0-5");
        assert_eq!(err("abc:80"), "invalid hostPort: abc");
        assert_eq!(err("-1"), "invalid containerPort: -1");
        // TestParseNetworkOptsNegativePorts
        assert_eq!(err("192.168.1.100:-1:-1"), "invalid containerPort: -1");
        assert_eq!(err("192.168.1.100:-1:80"), "invalid hostPort: -1");
        assert_eq!(err("90-80"), "invalid containerPort: 90-80");
        assert_eq!(err("8010-8000:80"), "invalid hostPort: 8010-8000");
        assert_eq!(err("8000-:80"), "invalid hostPort: 8000-");
        assert_eq!(err(" 80"), "invalid containerPort:  80");
    }

    #[test]
    fn bad_ranges() {
        assert_eq!(
            err("8000-8005:80-90"),
            "invalid ranges specified for container and host Ports: 80-90 and 8000-8005"
        );
        assert_eq!(err("8000:80-81"), "invalid ranges specified for container and host Ports: 80-81 and 8000");
        assert_eq!(
            err("127.0.0.1:8000-8001:80-82/udp"),
            "invalid ranges specified for container and host Ports: 80-82 and 8000-8001"
        );
    }

    #[test]
    fn bad_proto() {
        assert_eq!(err("80/xyz"), "invalid proto: xyz");
        assert_eq!(err("8000:80/xyz"), "invalid proto: xyz");
        assert_eq!(err("80/tcp/udp"), "invalid proto: tcp/udp");
        // Checked before the IP, as Docker does.
        assert_eq!(err("1.2.3:8000:80/xyz"), "invalid proto: xyz");
        assert_eq!(err("3456/sctp"), "unsupported proto: sctp (usernet publishes tcp and udp)");
    }

    #[test]
    fn bad_ip() {
        assert_eq!(err("1.2.3:8000:80"), "invalid IP address: 1.2.3");
        // TestParsePortSpecs: a hostname is not an IP.
        assert_eq!(err("localhost:1234:1234/tcp"), "invalid IP address: localhost");
        assert_eq!(err("localhost:1234-1236:1234-1236/tcp"), "invalid IP address: localhost");
        assert_eq!(err("[1.2.3]:8000:80"), "invalid IP address: 1.2.3");
        assert_eq!(err("::1x:8000:80"), "invalid IP address: ::1x");
        assert_eq!(err("fe80::1%eth0:8000:80"), "invalid IP address: fe80::1%eth0");
        assert_eq!(err("01.2.3.4:8000:80"), "invalid IP address: 01.2.3.4");
        assert_eq!(err("[::1:8000:80"), "invalid IP address [::1: address [::1:: missing ']' in address");
        assert_eq!(err("[::1]x:8000:80"), "invalid IP address [::1]x: address [::1]x:: missing port in address");
        assert_eq!(err("[::1]::8000:80"), "invalid IP address [::1]:: address [::1]::: too many colons in address");
        // TestParseNetworkOptsPublicNoPort
        assert_eq!(err("192.168.1.100"), "invalid containerPort: 192.168.1.100");
    }

    #[test]
    fn display_is_docker_short_form() {
        // TestStringer, adapted: usernet always names the proto.
        for (input, want) in [
            (":8080:6000/tcp", "8080:6000/tcp"),
            ("192.168.1.100:8080:6000", "192.168.1.100:8080:6000/tcp"),
            ("192.168.1.100::6000/udp", "192.168.1.100::6000/udp"),
            ("::6000", "6000/tcp"),
            ("[::1]:8080:6000/udp", "[::1]:8080:6000/udp"),
            ("[::1]::6000/udp", "[::1]::6000/udp"),
            ("::1:8080:6000/udp", "[::1]:8080:6000/udp"),
            ("::::6000/udp", "[::]::6000/udp"),
            ("8000-8010:80", "8000-8010:80/tcp"),
        ] {
            assert_eq!(one(input).to_string(), want, "{input}");
        }
    }

    #[test]
    fn expose() {
        assert_eq!(parse_expose("80"), Ok(vec![(80, Proto::Tcp)]));
        assert_eq!(parse_expose("80/udp"), Ok(vec![(80, Proto::Udp)]));
        assert_eq!(parse_expose("80/UDP"), Ok(vec![(80, Proto::Udp)]));
        assert_eq!(parse_expose("80/"), Ok(vec![(80, Proto::Tcp)]));
        assert_eq!(
            parse_expose("0").unwrap_err().to_string(),
            "invalid range format for --expose: 0, error: port numbers must be between 1 and 65535"
        );
        let v = parse_expose("8000-8010/tcp").expect("valid");
        assert_eq!(v.len(), 11);
        assert_eq!(v[0], (8000, Proto::Tcp));
        assert_eq!(v[10], (8010, Proto::Tcp));
    }

    #[test]
    fn expose_errors() {
        let e = |s: &str| parse_expose(s).expect_err(s).to_string();
        assert_eq!(e("8000:80"), "invalid port format for --expose: 8000:80");
        assert_eq!(
            e("abc"),
            r#"invalid range format for --expose: abc, error: strconv.ParseUint: parsing "abc": invalid syntax"#
        );
        assert_eq!(
            e("70000/udp"),
            r#"invalid range format for --expose: 70000/udp, error: strconv.ParseUint: parsing "70000": value out of range"#
        );
        assert_eq!(
            e("90-80"),
            "invalid range format for --expose: 90-80, error: invalid range specified for port: 90-80"
        );
        assert_eq!(e(""), "invalid range format for --expose: , error: empty string specified for ports");
        assert_eq!(e("/udp"), "invalid range format for --expose: /udp, error: empty string specified for ports");
        assert_eq!(e("80/xyz"), "invalid proto: xyz");
    }

    #[test]
    fn never_panics_on_junk() {
        for s in [
            "[",
            "]",
            "[]",
            "[:",
            ":",
            "::",
            ":::",
            "::::",
            "[::1]",
            "[::1]:",
            "-",
            "--",
            "/",
            "//",
            "=",
            ",",
            "a=b,",
            "1-",
            "ünïcødé:80",
            "[ü]:1:1",
            "::ffff:1.2.3.4::80",
            "65535-0",
        ] {
            let _ = parse_publish(s);
            let _ = parse_expose(s);
        }
        let v6 = one("[::]:1:1").host_ip;
        assert_eq!(v6, Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)));
    }
}
