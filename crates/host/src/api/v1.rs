//! usernet's own resources under `/v1/`.
//!
//! | method and path        | body                                   | answer                    |
//! |------------------------|----------------------------------------|---------------------------|
//! | `GET /v1/ports`        |                                        | 200 `[Port]`              |
//! | `POST /v1/ports`       | `{"spec": "127.0.0.1:8080:80/tcp"}` or `{"host_ip", "host_port", "guest_port", "protocol", "guest_ip"}` | 201 `[Port]` (what was published) |
//! | `DELETE /v1/ports`     | `{"host_ip", "host_port", "protocol"}` | 200 `[Port]` (what was removed), 404 |
//! | `GET /v1/dns`          |                                        | 200 `[{"name", "ip"}]`    |
//! | `POST /v1/dns`         | `{"name", "ip"}` (`ip` IPv4, IPv6 or `host-gateway`) | 201 `{"name", "ip"}`, 400 |
//! | `GET /v1/dns/NAME`     |                                        | 200 `{"name", "ip"}` or `{"name", "ip", "ips"}`, 404 |
//! | `DELETE /v1/dns/NAME`  |                                        | 204, 404                  |
//! | `GET /v1/resolver`     |                                        | 200 `Resolver`            |
//! | `GET /v1/leases`       |                                        | 200 `[{"ip", "mac"}]`     |
//! | `GET /v1/stats`        |                                        | 200 engine counters       |
//! | `GET /v1/flows`        |                                        | 200 `[Flow]`              |
//! | `GET /v1/info`         |                                        | 200 `Info`                |
//! | `GET /v1/links`        |                                        | 200 `[LinkView]`          |
//! | `GET /v1/log/dns`      |                                        | 200 `{"total", "entries": [DnsLogEntry]}` |
//! | `GET /v1/log/proxy`    |                                        | 200 `{"total", "entries": [ProxyLogEntry]}` |
//! | `GET /v1/capture?proto=&host=&port=&snaplen=` |                 | 200 a pcap stream (see `capture`) |
//! | `GET /v1/proxy`        |                                        | 200 `Proxy`               |
//! | `PUT /v1/proxy`        | `Proxy` (fields absent: unchanged)     | 200 `Proxy`, 400          |
//! | `GET /v1/policy`       |                                        | 200 `Policy`              |
//! | `PUT /v1/policy`       | `{"allow", "deny", "allow_domains"}` (the whole set; absent: empty) | 200 `Policy`, 400 |
//! | `POST /v1/policy`      | the same, added to the rules in force  | 200 `Policy`, 400         |
//!
//! A `Port` is `{"host_ip", "host_port", "guest_ip", "guest_port", "protocol"}`. In a POST,
//! `host_ip` absent means both 0.0.0.0 and [::], `host_port` absent or 0 lets usernet pick
//! one, `guest_ip` absent means the first guest (its IPv4 address; an IPv6 `guest_ip` must be
//! in the network's /64); ports may also be strings with ranges
//! (`"8000-8001"`). Errors are `{"error": "..."}` with Docker's words: 400 for a bad body
//! or spec, 409 when the port is already allocated, 503 when the engine has stopped.
//!
//! `/v1/dns` is the gateway's own table (built-in names, `--add-host`, records added here);
//! the names of the host's /etc/hosts are answered behind it but not listed there. A record
//! is an A record (`ip` an IPv4 address) or an AAAA record (`ip` an IPv6 address); a name
//! has at most one of each. `GET /v1/dns` lists them by name, a name with both twice, its A
//! record first (the built-in names have AAAA records when the network has IPv6). A POST
//! with an IPv6 `ip` (brackets allowed, as in `--add-host`) adds or replaces the name's
//! AAAA record and leaves its A record, and the other way round; `host-gateway` is the
//! host's addresses, as in `--add-host`: an A record (192.168.65.254 by default) and an AAAA
//! record (fd75:7365:726e::254) when the network has both, answered as `GET /v1/dns/NAME`
//! answers for such a name. `GET /v1/dns/NAME`
//! answers one object: a name with one record as in the list; a name with both has its
//! IPv4 address in `ip` (what this answered before AAAA records were shown) and both in
//! `ips`, IPv4 first: `{"name": "db.test", "ip": "10.0.0.5", "ips": ["10.0.0.5",
//! "fd00::5"]}`. DELETE removes the name's records of both families.
//! `Resolver` shows where the gateway's DNS forwards and where that came from:
//! `{"source": "file"|"command-line"|"none", "path": "/etc/resolv.conf"|null, "servers":
//! ["127.0.0.53:53"], "search": ["corp.example"], "options": {"ndots", "timeout",
//! "attempts", "rotate"} (as the file gives them, null when absent), "timeout_ms",
//! "attempts" (what the forwarder uses per server and in rounds), "hosts": {"path", "names"}
//! (the hosts file followed and how many names it gives)}`. With source `file` the file is
//! followed: the answer changes when it does.
//!
//! `Policy` is `{"allow": ["10.0.0.0/8:443"], "deny": ["203.0.113.7"], "allow_domains":
//! ["example.com"], "default": "allow"|"deny", "learnt": [{"ip", "name", "expires_in_s"}]}`
//! (the egress policy, crates/core/src/policy.rs; `learnt`: addresses allowed by DNS answers
//! for the allow-domains). A change applies to new flows, connections and proxy requests;
//! those already open go on. A bad rule is a 400 that names it, and changes nothing.
//!
//! `LinkView` is one guest link: `{"index", "name", "rx_frames", "rx_bytes", "tx_frames",
//! "tx_bytes", "guests": [{"mac", "ips"}]}` (rx: from the guests; the guests as the switch
//! learnt them). The logs (`/v1/log/dns`, `/v1/log/proxy`) hold the last few hundred
//! entries, newest first (crates/core/src/services/activity.rs says what each field is);
//! `total` counts every entry since the start, kept or not.
//!
//! `Proxy` is `{"http_proxy": URL|null, "https_proxy": URL|null, "no_proxy": "a,b",
//! "ports": [80, 443]}`. GET shows passwords as `***`; a PUT that sends a URL back with
//! `***` as its password keeps the current password (same user, host and port). In a PUT,
//! `null` or `""` clears an upstream, and `ports` may also be a string (`"80,8080"`).

use std::net::{IpAddr, Ipv4Addr};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use usernet_core::engine::control::{Command, Published};

use usernet_core::services::dns::records::{self, record_addresses};
use usernet_core::services::proxy::config::{NoProxy, ProxyConfig, ProxyUrl, REDACTED, parse_ports};

use super::ports::{self, PublishError};
use super::state::{Reply, State, engine_gone};

/// A published port as `/v1/ports` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub guest_ip: IpAddr,
    pub guest_port: u16,
    pub protocol: String,
}

impl From<&Published> for Port {
    fn from(p: &Published) -> Port {
        Port {
            host_ip: p.host.ip(),
            host_port: p.host.port(),
            guest_ip: p.guest_ip,
            guest_port: p.guest_port,
            protocol: p.proto.as_str().to_string(),
        }
    }
}

fn ports_reply(status: StatusCode, list: &[Published]) -> Reply {
    let view: Vec<Port> = list.iter().map(Port::from).collect();
    Reply::json(status, &view)
}

fn bad_request(msg: impl Into<String>) -> Reply {
    Reply::error(StatusCode::BAD_REQUEST, msg)
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Reply> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

pub async fn list_ports(state: &State) -> Reply {
    match ports::list(state).await {
        Some(list) => ports_reply(StatusCode::OK, &list),
        None => engine_gone(),
    }
}

/// A port number in a POST: a JSON number or a string (which may be a range).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortValue {
    Number(i64),
    Text(String),
}

impl PortValue {
    fn to_spec_part(&self) -> String {
        match self {
            PortValue::Number(0) => String::new(),
            PortValue::Number(n) => n.to_string(),
            PortValue::Text(s) if s == "0" => String::new(),
            PortValue::Text(s) => s.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddPorts {
    spec: Option<String>,
    host_ip: Option<String>,
    host_port: Option<PortValue>,
    guest_port: Option<PortValue>,
    protocol: Option<String>,
    guest_ip: Option<String>,
}

impl AddPorts {
    /// The request as a Docker `-p` spec.
    fn to_spec(&self) -> Result<String, String> {
        if let Some(spec) = &self.spec {
            if self.host_ip.is_some()
                || self.host_port.is_some()
                || self.guest_port.is_some()
                || self.protocol.is_some()
            {
                return Err("give either \"spec\" or the port fields, not both".into());
            }
            return Ok(spec.trim().to_string());
        }
        let guest_port = self.guest_port.as_ref().ok_or("missing \"guest_port\" (or \"spec\")")?.to_spec_part();
        if guest_port.is_empty() {
            return Err("invalid containerPort: 0".into());
        }
        let host_port = self.host_port.as_ref().map(PortValue::to_spec_part).unwrap_or_default();
        let proto = self.protocol.as_deref().unwrap_or("tcp");
        let mut spec = String::new();
        match self.host_ip.as_deref().map(str::trim) {
            None | Some("") => {
                if !host_port.is_empty() {
                    spec.push_str(&format!("{host_port}:"));
                }
            }
            Some(ip) if ip.contains(':') && !ip.starts_with('[') => spec.push_str(&format!("[{ip}]:{host_port}:")),
            Some(ip) => spec.push_str(&format!("{ip}:{host_port}:")),
        }
        spec.push_str(&format!("{guest_port}/{proto}"));
        Ok(spec)
    }
}

pub async fn add_ports(state: &State, body: &[u8]) -> Reply {
    let req: AddPorts = match parse_body(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let spec = match req.to_spec() {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    let guest_ip = match req.guest_ip.as_deref() {
        None | Some("") => state.cfg.first_guest(),
        Some(s) => match ports::parse_host_ip(s) {
            Ok(ip) => ip,
            Err(_) => return bad_request(format!("invalid guest IP: {s}")),
        },
    };
    match ports::publish(state, &spec, guest_ip).await {
        Ok(published) => ports_reply(StatusCode::CREATED, &published),
        Err(e) => e.reply(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RemovePorts {
    host_ip: Option<String>,
    host_port: u16,
    protocol: Option<String>,
}

pub async fn remove_ports(state: &State, body: &[u8]) -> Reply {
    let req: RemovePorts = match parse_body(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let proto = match ports::parse_proto(req.protocol.as_deref().unwrap_or("")) {
        Ok(p) => p,
        Err(e) => return bad_request(e),
    };
    let ip = match req.host_ip.as_deref() {
        None | Some("") => None,
        Some(s) => match ports::parse_host_ip(s) {
            Ok(ip) => Some(ip),
            Err(e) => return bad_request(e),
        },
    };
    match ports::unpublish(state, ip, req.host_port, proto).await {
        None => PublishError::EngineGone.reply(),
        Some(removed) if removed.is_empty() => {
            let at = match ip {
                Some(IpAddr::V6(ip)) => format!("[{ip}]:{}", req.host_port),
                Some(ip) => format!("{ip}:{}", req.host_port),
                None => req.host_port.to_string(),
            };
            Reply::error(StatusCode::NOT_FOUND, format!("no port published at {at}/{proto}"))
        }
        Some(removed) => ports_reply(StatusCode::OK, &removed),
    }
}

/// One local DNS record: an A record (`ip` an IPv4 address) or an AAAA record (`ip` an
/// IPv6 address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    pub ip: IpAddr,
}

/// `GET /v1/dns/NAME`: the name's record, as `DnsRecord`; a name with both an A and an
/// AAAA record has the IPv4 address in `ip` (as before AAAA records were shown) and both,
/// IPv4 first, in `ips`, which a name with one record does not have.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsNameView {
    pub name: String,
    pub ip: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<IpAddr>>,
}

pub fn list_dns(state: &State) -> Reply {
    let list: Vec<DnsRecord> = state.dns.list().into_iter().map(|(name, ip)| DnsRecord { name, ip }).collect();
    Reply::json(StatusCode::OK, &list)
}

pub fn get_dns(state: &State, name: &str) -> Reply {
    let ips = state.dns.get(name);
    let Some(&ip) = ips.first() else {
        return Reply::error(StatusCode::NOT_FOUND, format!("no record for {name}"));
    };
    let ips = if ips.len() > 1 { Some(ips) } else { None };
    Reply::json(StatusCode::OK, &DnsNameView { name: records::normalize(name), ip, ips })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddDns {
    name: String,
    ip: String,
}

pub fn add_dns(state: &State, body: &[u8]) -> Reply {
    let req: AddDns = match parse_body(body) {
        Ok(r) => r,
        Err(reply) => return reply,
    };
    let Some(ips) = record_addresses(&req.ip, &state.cfg.host_addresses()) else {
        return bad_request(format!(
            "invalid IP address: {:?} (want an IPv4 or IPv6 address, or host-gateway)",
            req.ip
        ));
    };
    // host-gateway's records share one name: when the first is added, its check of the
    // name stands for the second's.
    for ip in &ips {
        let added = match *ip {
            IpAddr::V4(ip) => state.dns.add(&req.name, ip),
            IpAddr::V6(ip) => state.dns.add6(&req.name, ip),
        };
        if let Err(e) = added {
            return bad_request(e.to_string());
        }
    }
    let name = records::normalize(&req.name);
    match ips.as_slice() {
        [ip] => Reply::json(StatusCode::CREATED, &DnsRecord { name, ip: *ip }),
        // host-gateway with both families: the shape of `GET /v1/dns/NAME` for such a name.
        [ip, ..] => Reply::json(StatusCode::CREATED, &DnsNameView { name, ip: *ip, ips: Some(ips.clone()) }),
        [] => bad_request("the network has no host address for host-gateway"),
    }
}

pub fn remove_dns(state: &State, name: &str) -> Reply {
    if state.dns.remove(name) {
        Reply::empty(StatusCode::NO_CONTENT)
    } else {
        Reply::error(StatusCode::NOT_FOUND, format!("no record for {name}"))
    }
}

/// `/v1/resolver`: the gateway's upstream DNS configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverView {
    pub source: String,
    pub path: Option<String>,
    pub servers: Vec<String>,
    pub search: Vec<String>,
    pub options: ResolverOptionsView,
    pub timeout_ms: u64,
    pub attempts: u32,
    pub hosts: HostsView,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolverOptionsView {
    pub ndots: Option<u8>,
    pub timeout: Option<u8>,
    pub attempts: Option<u8>,
    pub rotate: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostsView {
    pub path: Option<String>,
    /// Names with an IPv4 address (A records).
    pub names: usize,
    /// Names with an IPv6 address (AAAA records).
    #[serde(default)]
    pub names6: usize,
}

pub fn resolver(state: &State) -> Reply {
    use usernet_core::config::DnsOrigin;
    use usernet_core::services::dns::{UPSTREAM_ATTEMPTS, UPSTREAM_TIMEOUT};
    let host_dns = state.dns.host_dns();
    let up = host_dns.upstreams();
    let hosts = host_dns.hosts();
    let (source, path) = match &up.origin {
        DnsOrigin::Unset => ("none", None),
        DnsOrigin::CommandLine => ("command-line", None),
        DnsOrigin::File(p) => ("file", Some(p.display().to_string())),
    };
    let o = up.options;
    let view = ResolverView {
        source: source.to_string(),
        path,
        servers: up.servers.iter().map(ToString::to_string).collect(),
        search: up.search.clone(),
        options: ResolverOptionsView { ndots: o.ndots, timeout: o.timeout, attempts: o.attempts, rotate: o.rotate },
        timeout_ms: o.timeout.map_or(UPSTREAM_TIMEOUT.as_millis() as u64, |s| u64::from(s) * 1000),
        attempts: o.attempts.map_or(UPSTREAM_ATTEMPTS, u32::from),
        hosts: HostsView {
            path: hosts.path.as_ref().map(|p| p.display().to_string()),
            names: hosts.names.len(),
            names6: hosts.names6.len(),
        },
    };
    Reply::json(StatusCode::OK, &view)
}

/// One DHCP lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    pub mac: String,
}

/// `5a:94:ef:e4:0c:ee`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

pub async fn leases(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Leases { reply }).await {
        Some(list) => {
            let view: Vec<Lease> = list.iter().map(|(ip, mac)| Lease { ip: *ip, mac: format_mac(mac) }).collect();
            Reply::json(StatusCode::OK, &view)
        }
        None => engine_gone(),
    }
}

pub async fn stats(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Stats { reply }).await {
        Some(s) => Reply::json(StatusCode::OK, &s),
        None => engine_gone(),
    }
}

/// `/v1/info`: the instance, for `usernet ps`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Info {
    pub pid: u32,
    /// `run` or `serve` (`unknown` if the instance did not say).
    pub mode: String,
    pub command: Vec<String>,
    /// Seconds since the Unix epoch.
    pub started: u64,
    pub uptime_ms: u64,
    pub api: Option<String>,
    pub subnet: String,
    pub gateway: Ipv4Addr,
    /// The guests the gateway knows (`run`'s static address, DHCP leases).
    pub guests: Vec<Lease>,
    pub ports: Vec<Port>,
}

pub async fn info(state: &State) -> Reply {
    let Some(leases) = state.control.ask(|reply| Command::Leases { reply }).await else {
        return engine_gone();
    };
    let Some(ports) = ports::list(state).await else {
        return engine_gone();
    };
    let about = state.about.get();
    let started = about.map_or(std::time::UNIX_EPOCH, |a| a.started);
    let view = Info {
        pid: std::process::id(),
        mode: about.map_or("unknown".to_string(), |a| a.mode.clone()),
        command: about.map(|a| a.command.clone()).unwrap_or_default(),
        started: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        uptime_ms: about.map_or(0, |_| started.elapsed().map_or(0, |d| d.as_millis() as u64)),
        api: about.and_then(|a| a.api.clone()),
        subnet: format!("{}/{}", state.cfg.subnet.network, state.cfg.subnet.prefix),
        gateway: state.cfg.gateway,
        guests: leases.iter().map(|(ip, mac)| Lease { ip: *ip, mac: format_mac(mac) }).collect(),
        ports: ports.iter().map(Port::from).collect(),
    };
    Reply::json(StatusCode::OK, &view)
}

/// One guest link as `/v1/links` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkView {
    pub index: usize,
    pub name: String,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub guests: Vec<LinkGuest>,
}

/// A guest behind a link: its MAC and the addresses it uses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkGuest {
    pub mac: String,
    pub ips: Vec<std::net::IpAddr>,
}

pub async fn links(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Metrics { reply }).await {
        Some(m) => {
            let view: Vec<LinkView> = m
                .links
                .iter()
                .map(|l| LinkView {
                    index: l.index,
                    name: l.name.clone(),
                    rx_frames: l.counters.rx_frames,
                    rx_bytes: l.counters.rx_bytes,
                    tx_frames: l.counters.tx_frames,
                    tx_bytes: l.counters.tx_bytes,
                    guests: l
                        .guests
                        .iter()
                        .map(|(mac, ips)| LinkGuest { mac: format_mac(mac), ips: ips.clone() })
                        .collect(),
                })
                .collect();
            Reply::json(StatusCode::OK, &view)
        }
        None => engine_gone(),
    }
}

/// `/v1/log/dns` and `/v1/log/proxy`: a log, newest first.
#[derive(Serialize)]
struct LogView<T> {
    total: u64,
    entries: Vec<T>,
}

fn log_reply<T: Clone + Serialize>(ring: &usernet_core::services::activity::Ring<T>) -> Reply {
    let mut entries = ring.snapshot();
    entries.reverse();
    Reply::json(StatusCode::OK, &LogView { total: ring.total(), entries })
}

pub fn dns_log(state: &State) -> Reply {
    match state.activity.get() {
        Some(a) => log_reply(&a.dns),
        None => Reply::error(StatusCode::SERVICE_UNAVAILABLE, "no DNS log in this usernet"),
    }
}

pub fn proxy_log(state: &State) -> Reply {
    match state.activity.get() {
        Some(a) => log_reply(&a.proxy),
        None => Reply::error(StatusCode::SERVICE_UNAVAILABLE, "no proxy log in this usernet"),
    }
}

/// One flow as `/v1/flows` shows it (the engine's `FlowInfo`, for clients to read).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FlowView {
    pub proto: String,
    pub guest: String,
    pub remote: String,
    pub host: Option<String>,
    pub state: String,
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    pub age_ms: u64,
    pub idle_ms: u64,
}

/// `/v1/stats` as clients read it (the engine's `Stats`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsView {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_in: u64,
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub icmp_flows: usize,
    #[serde(default)]
    pub capture_dropped: u64,
}

pub async fn flows(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Flows { reply }).await {
        Some(f) => Reply::json(StatusCode::OK, &f),
        None => engine_gone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Result<String, String> {
        serde_json::from_str::<AddPorts>(json).unwrap().to_spec()
    }

    #[test]
    fn json_to_docker_spec() {
        assert_eq!(
            spec(r#"{"host_ip":"127.0.0.1","host_port":0,"guest_port":80,"protocol":"tcp"}"#),
            Ok("127.0.0.1::80/tcp".into())
        );
        assert_eq!(spec(r#"{"host_port":8080,"guest_port":80}"#), Ok("8080:80/tcp".into()));
        assert_eq!(spec(r#"{"guest_port":"53","protocol":"udp"}"#), Ok("53/udp".into()));
        assert_eq!(
            spec(r#"{"host_ip":"::1","host_port":"8000-8001","guest_port":"80-81"}"#),
            Ok("[::1]:8000-8001:80-81/tcp".into())
        );
        assert_eq!(spec(r#"{"host_port":70000,"guest_port":80}"#), Ok("70000:80/tcp".into()));
        assert_eq!(spec(r#"{"spec":" 8080:80 "}"#), Ok("8080:80".into()));
        assert!(spec(r#"{"spec":"8080:80","guest_port":1}"#).is_err());
        assert!(spec(r#"{"host_port":1}"#).is_err());
        assert!(spec(r#"{"guest_port":0}"#).is_err());
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&[0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]), "5a:94:ef:e4:0c:ee");
    }
}

/// `/v1/proxy` as GET shows it (passwords redacted).
#[derive(Debug, Serialize)]
pub struct ProxyView {
    pub http_proxy: Option<String>,
    pub https_proxy: Option<String>,
    pub no_proxy: String,
    pub ports: Vec<u16>,
}

impl From<&ProxyConfig> for ProxyView {
    fn from(c: &ProxyConfig) -> ProxyView {
        ProxyView {
            http_proxy: c.http.as_ref().map(|u| u.to_string()),
            https_proxy: c.https.as_ref().map(|u| u.to_string()),
            no_proxy: c.no_proxy.to_list(),
            ports: c.ports.clone(),
        }
    }
}

/// A PUT body: absent fields stay as they are; `null` clears an upstream.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyUpdate {
    #[serde(default, deserialize_with = "present")]
    http_proxy: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    https_proxy: Option<Option<String>>,
    #[serde(default)]
    no_proxy: Option<String>,
    #[serde(default)]
    ports: Option<PortList>,
}

/// Tells a field given as `null` (Some(None)) from an absent one (None).
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortList {
    List(Vec<u16>),
    Text(String),
}

fn no_proxy_service() -> Reply {
    Reply::error(StatusCode::SERVICE_UNAVAILABLE, "no proxy service in this usernet")
}

pub fn get_proxy(state: &State) -> Reply {
    match &state.proxy {
        Some(p) => Reply::json(StatusCode::OK, &ProxyView::from(&p.get())),
        None => no_proxy_service(),
    }
}

/// An upstream URL of a PUT; `***` as the password means "the current one".
fn updated_url(given: Option<String>, current: Option<&ProxyUrl>, field: &str) -> Result<Option<ProxyUrl>, Reply> {
    let Some(text) = given.filter(|t| !t.trim().is_empty()) else {
        return Ok(None);
    };
    let mut url = ProxyUrl::parse(&text).map_err(|e| bad_request(format!("{field}: {e}")))?;
    if let (Some((user, pass)), Some(cur)) = (url.credentials.as_mut(), current)
        && pass == REDACTED
        && let Some((cur_user, cur_pass)) = &cur.credentials
        && cur_user == user
        && cur.host == url.host
        && cur.port == url.port
    {
        *pass = cur_pass.clone();
    }
    Ok(Some(url))
}

pub fn put_proxy(state: &State, body: &[u8]) -> Reply {
    let Some(settings) = &state.proxy else {
        return no_proxy_service();
    };
    let update: ProxyUpdate = match parse_body(body) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let mut cfg = settings.get();
    let result = (|| -> Result<(), Reply> {
        if let Some(given) = update.http_proxy {
            cfg.http = updated_url(given, cfg.http.as_ref(), "http_proxy")?;
        }
        if let Some(given) = update.https_proxy {
            cfg.https = updated_url(given, cfg.https.as_ref(), "https_proxy")?;
        }
        if let Some(list) = update.no_proxy {
            cfg.no_proxy = NoProxy::parse(&list).map_err(|e| bad_request(format!("no_proxy: {e}")))?;
        }
        match update.ports {
            Some(PortList::List(p)) if p.contains(&0) => return Err(bad_request("ports: invalid proxy port \"0\"")),
            Some(PortList::List(p)) => cfg.ports = p,
            Some(PortList::Text(t)) => cfg.ports = parse_ports(&t).map_err(|e| bad_request(format!("ports: {e}")))?,
            None => {}
        }
        Ok(())
    })();
    if let Err(r) = result {
        return r;
    }
    tracing::info!("proxy: configuration changed: {}", usernet_core::services::proxy::describe(&cfg));
    settings.set(cfg.clone());
    Reply::json(StatusCode::OK, &ProxyView::from(&cfg))
}

/// `/v1/policy` as GET shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PolicyView {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
    pub allow_domains: Vec<String>,
    /// What no rule allows: `allow` without allow rules and allow-domains, else `deny`.
    pub default: String,
    #[serde(default)]
    pub learnt: Vec<LearntView>,
}

/// An address allowed by a DNS answer for an allow-domain.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LearntView {
    pub ip: IpAddr,
    pub name: String,
    pub expires_in_s: u64,
}

fn policy_view(policy: &usernet_core::policy::Policy) -> PolicyView {
    let rules = policy.rules();
    PolicyView {
        allow: rules.allow.iter().map(ToString::to_string).collect(),
        deny: rules.deny.iter().map(ToString::to_string).collect(),
        allow_domains: rules.allow_domains.clone(),
        default: if rules.default_deny() { "deny" } else { "allow" }.to_string(),
        learnt: policy
            .learnt()
            .into_iter()
            .map(|l| LearntView { ip: l.ip, name: l.name, expires_in_s: l.expires_in.as_secs() })
            .collect(),
    }
}

/// A PUT or POST body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyUpdate {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    #[serde(default)]
    allow_domains: Vec<String>,
}

pub fn get_policy(state: &State) -> Reply {
    Reply::json(StatusCode::OK, &policy_view(&state.cfg.policy))
}

/// `PUT` (`add` false) replaces the rules, `POST` (`add` true) adds to them.
pub fn set_policy(state: &State, body: &[u8], add: bool) -> Reply {
    use usernet_core::policy::{Rules, describe};
    let update: PolicyUpdate = match parse_body(body) {
        Ok(u) => u,
        Err(r) => return r,
    };
    let mut rules = match Rules::parse(&update.allow, &update.deny, &update.allow_domains) {
        Ok(r) => r,
        Err(e) => return bad_request(e.to_string()),
    };
    let policy = &state.cfg.policy;
    if add {
        let current = policy.rules();
        let mut merged = (*current).clone();
        for r in rules.allow.drain(..) {
            if !merged.allow.contains(&r) {
                merged.allow.push(r);
            }
        }
        for r in rules.deny.drain(..) {
            if !merged.deny.contains(&r) {
                merged.deny.push(r);
            }
        }
        for d in rules.allow_domains.drain(..) {
            if !merged.allow_domains.contains(&d) {
                merged.allow_domains.push(d);
            }
        }
        rules = merged;
    }
    tracing::info!("egress policy changed: {}", describe(&rules));
    policy.set_rules(rules);
    Reply::json(StatusCode::OK, &policy_view(policy))
}
