//! usernet's own resources under `/v1/`.
//!
//! | method and path        | body                                   | answer                    |
//! |------------------------|----------------------------------------|---------------------------|
//! | `GET /v1/ports`        |                                        | 200 `[Port]`              |
//! | `POST /v1/ports`       | `{"spec": "127.0.0.1:8080:80/tcp"}` or `{"host_ip", "host_port", "guest_port", "protocol", "guest_ip"}` | 201 `[Port]` (what was published) |
//! | `DELETE /v1/ports`     | `{"host_ip", "host_port", "protocol"}` | 200 `[Port]` (what was removed), 404 |
//! | `GET /v1/dns`          |                                        | 200 `[{"name", "ip"}]`    |
//! | `POST /v1/dns`         | `{"name", "ip"}` (`ip` may be `host-gateway`) | 201 `{"name", "ip"}` |
//! | `GET/DELETE /v1/dns/NAME` |                                     | 200 `{"name","ip"}` / 204, 404 |
//! | `GET /v1/leases`       |                                        | 200 `[{"ip", "mac"}]`     |
//! | `GET /v1/stats`        |                                        | 200 engine counters       |
//! | `GET /v1/flows`        |                                        | 200 `[{"proto", "guest", "remote"}]` |
//!
//! A `Port` is `{"host_ip", "host_port", "guest_ip", "guest_port", "protocol"}`. In a POST,
//! `host_ip` absent means both 0.0.0.0 and [::], `host_port` absent or 0 lets usernet pick
//! one, `guest_ip` absent means the first guest; ports may also be strings with ranges
//! (`"8000-8001"`). Errors are `{"error": "..."}` with Docker's words: 400 for a bad body
//! or spec, 409 when the port is already allocated, 503 when the engine has stopped.

use std::net::{IpAddr, Ipv4Addr};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use crate::engine::control::{Command, Published};

use super::ports::{self, PublishError};
use super::routes::{Reply, State, engine_gone};

/// A published port as `/v1/ports` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub host_ip: IpAddr,
    pub host_port: u16,
    pub guest_ip: Ipv4Addr,
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
        None | Some("") => state.cfg.guest,
        Some(s) => match s.parse::<Ipv4Addr>() {
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

/// One local DNS record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DnsRecord {
    pub name: String,
    pub ip: Ipv4Addr,
}

pub fn list_dns(state: &State) -> Reply {
    let list: Vec<DnsRecord> = state.dns.list().into_iter().map(|(name, ip)| DnsRecord { name, ip }).collect();
    Reply::json(StatusCode::OK, &list)
}

pub fn get_dns(state: &State, name: &str) -> Reply {
    match state.dns.lookup(name) {
        Some(ip) => {
            Reply::json(StatusCode::OK, &DnsRecord { name: name.trim_end_matches('.').to_ascii_lowercase(), ip })
        }
        None => Reply::error(StatusCode::NOT_FOUND, format!("no record for {name}")),
    }
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
    let ip = if req.ip == "host-gateway" {
        state.cfg.host
    } else {
        match req.ip.parse::<Ipv4Addr>() {
            Ok(ip) => ip,
            Err(_) => return bad_request(format!("invalid IPv4 address: {}", req.ip)),
        }
    };
    match state.dns.add(&req.name, ip) {
        Ok(()) => Reply::json(
            StatusCode::CREATED,
            &DnsRecord { name: req.name.trim_end_matches('.').to_ascii_lowercase(), ip },
        ),
        Err(e) => bad_request(e.to_string()),
    }
}

pub fn remove_dns(state: &State, name: &str) -> Reply {
    if state.dns.remove(name) {
        Reply::empty(StatusCode::NO_CONTENT)
    } else {
        Reply::error(StatusCode::NOT_FOUND, format!("no record for {name}"))
    }
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
