//! The gvisor-tap-vsock (gvproxy) endpoints, as Podman, Lima and CRC call them.
//!
//! Shapes and status codes follow gvproxy's handlers:
//! - `POST /services/forwarder/expose` `{"local":"127.0.0.1:8000","remote":"192.168.65.2:80",
//!   "protocol":"tcp"}`: 200 with no body. `protocol` defaults to tcp; `remote` may omit its
//!   IP (`":80"`), which means the calling guest when the request comes from inside the
//!   guest network (as gvproxy takes the caller's address), else the first guest (a Unix
//!   socket has no address); an IPv6 remote (`"[fd75:7365:726e::2]:80"`) is a guest's IPv6
//!   address; `local` may omit its IP (`":8000"`: every address, 0.0.0.0 and [::]).
//!   A bad body or remote is 400, anything else that fails (already exposed, port taken) is
//!   500, each with a plain-text message.
//! - `POST /services/forwarder/unexpose` `{"local":...,"protocol":...}`: 200, or 500
//!   "proxy not found".
//! - `GET /services/forwarder/all`: `[{"local","remote","protocol"}]` sorted by local, then
//!   protocol. Ports published otherwise (`-p`, `/v1/ports`) are listed too, with their
//!   bound address as `local`.
//! - `GET /services/dhcp/leases` (and `/leases`): `{"192.168.65.2":"5a:94:ef:e4:0c:ee"}`.
//! - `GET /cam`: the switch's table, `{"5a:94:ef:e4:0c:ee":0}` (each guest's MAC and the
//!   index of the link it is behind).
//! - `GET /services/dns/all`: gvproxy's zones, `[{"Name":"docker.internal.","Records":
//!   [{"Name":"host","IP":"192.168.65.254"}],"DefaultIP":""}]`, built from the local table
//!   (the first label is the record, the rest the zone).
//! - `POST /services/dns/add` with one zone: each record becomes `NAME.ZONE` in the local
//!   table; regexp records and a zone default IP are not supported (400).
//! - `GET /stats`: gvproxy's counter names, filled from the engine's counters.
//!
//! A non-POST on a POST endpoint is 400 "post only", as in gvproxy.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use hyper::StatusCode;
use serde::{Deserialize, Serialize};

use usernet_core::engine::control::Command;
use usernet_core::ports::Proto;

use super::ports;
use super::state::{Exposed, Reply, State};

/// gvproxy's `types.ExposeRequest` (Go's decoder leaves absent fields empty).
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ExposeRequest {
    local: String,
    remote: String,
    protocol: String,
}

/// gvproxy's `types.UnexposeRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct UnexposeRequest {
    local: String,
    protocol: String,
}

/// One entry of `/services/forwarder/all`.
#[derive(Debug, Serialize, PartialEq, Eq, PartialOrd, Ord)]
struct Forward {
    local: String,
    remote: String,
    protocol: String,
}

fn text(status: StatusCode, msg: impl std::fmt::Display) -> Reply {
    Reply::text(status, msg)
}

/// The protocol of an expose/unexpose request, or gvproxy's 500 message.
fn protocol(p: &str) -> Result<Proto, Reply> {
    match p {
        "" | "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        "unix" | "npipe" => {
            Err(text(StatusCode::INTERNAL_SERVER_ERROR, format!("protocol {p} is not supported by usernet")))
        }
        _ => Err(text(StatusCode::INTERNAL_SERVER_ERROR, format!("unknown protocol {p}"))),
    }
}

/// Splits `host:port` as Go's `net.SplitHostPort` does (`[::1]:80`, `:80`).
fn split_host_port(s: &str) -> Result<(&str, &str), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("address {s}: missing ']' in address"))?;
        let port = after.strip_prefix(':').ok_or_else(|| format!("address {s}: missing port in address"))?;
        return Ok((host, port));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| format!("address {s}: missing port in address"))?;
    if host.contains(':') {
        return Err(format!("address {s}: too many colons in address"));
    }
    Ok((host, port))
}

/// The host IP of an expose `local`: None for every address.
fn local_ip(host: &str) -> Result<Option<IpAddr>, String> {
    match host {
        "" => Ok(None),
        "localhost" => Ok(Some(IpAddr::V4(Ipv4Addr::LOCALHOST))),
        _ => host.parse().map(Some).map_err(|_| format!("invalid local address: {host} (want an IP address)")),
    }
}

pub async fn expose(state: &State, caller: Option<Ipv4Addr>, body: &[u8]) -> Reply {
    let req: ExposeRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let proto = match protocol(&req.protocol) {
        Ok(p) => p,
        Err(reply) => return reply,
    };
    let (remote_host, remote_port) = match split_host_port(&req.remote) {
        Ok(hp) => hp,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let guest_ip = if remote_host.is_empty() {
        caller.map_or(state.cfg.first_guest(), IpAddr::V4)
    } else {
        match remote_host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => return text(StatusCode::BAD_REQUEST, "invalid remote addr"),
        }
    };
    let guest_port = match remote_port.parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("invalid remote port: {remote_port}"));
        }
    };
    let (local_host, local_port) = match split_host_port(&req.local) {
        Ok(hp) => hp,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let host_ip = match local_ip(local_host) {
        Ok(ip) => ip,
        Err(e) => return text(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let host_port = match local_port.parse::<u16>() {
        Ok(p) => p,
        Err(_) => {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("invalid local port: {local_port}"));
        }
    };

    let mut exposed = state.exposed.lock().await;
    let key = (req.local.clone(), proto.as_str());
    // An entry whose listeners were all removed otherwise (`/v1/ports`) is stale.
    if let Some(entry) = exposed.get(&key) {
        let live = ports::list(state).await.unwrap_or_default();
        if !entry.hosts.iter().any(|h| live.iter().any(|p| p.host == *h && p.proto == proto)) {
            exposed.remove(&key);
        }
    }
    if exposed.contains_key(&key) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, format!("proxy already running for {proto} on {}", req.local));
    }
    let spec = ports::docker_spec(host_ip, host_port, guest_port, proto);
    match ports::publish(state, &spec, guest_ip).await {
        Ok(published) => {
            exposed.insert(
                key,
                Exposed {
                    remote: SocketAddr::new(guest_ip, guest_port).to_string(),
                    proto,
                    hosts: published.iter().map(|p| p.host).collect(),
                },
            );
            Reply::empty(StatusCode::OK)
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

pub async fn unexpose(state: &State, body: &[u8]) -> Reply {
    let req: UnexposeRequest = match serde_json::from_slice(body) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let proto = match protocol(&req.protocol) {
        Ok(p) => p,
        Err(reply) => return reply,
    };
    let mut exposed = state.exposed.lock().await;
    if let Some(entry) = exposed.remove(&(req.local.clone(), proto.as_str())) {
        return match ports::unpublish_exact(state, &entry.hosts, proto).await {
            Some(_) => Reply::empty(StatusCode::OK),
            None => text(StatusCode::INTERNAL_SERVER_ERROR, "the network engine is not running"),
        };
    }
    // Not exposed here: maybe published by `-p` or `/v1/ports` at that address.
    let parsed = split_host_port(&req.local).ok().and_then(|(h, p)| Some((local_ip(h).ok()?, p.parse::<u16>().ok()?)));
    if let Some((ip, port)) = parsed
        && port != 0
        && let Some(removed) = ports::unpublish(state, ip, port, proto).await
        && !removed.is_empty()
    {
        return Reply::empty(StatusCode::OK);
    }
    text(StatusCode::INTERNAL_SERVER_ERROR, "proxy not found")
}

pub async fn all(state: &State) -> Reply {
    let Some(published) = ports::list(state).await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "the network engine is not running");
    };
    let live: HashSet<(SocketAddr, Proto)> = published.iter().map(|p| (p.host, p.proto)).collect();
    let mut covered = HashSet::new();
    let mut list = Vec::new();
    let mut exposed = state.exposed.lock().await;
    // Forget exposures whose listeners are all gone (removed through /v1 or by the engine).
    exposed.retain(|_, e| e.hosts.iter().any(|h| live.contains(&(*h, e.proto))));
    for ((local, proto), e) in exposed.iter() {
        covered.extend(e.hosts.iter().map(|h| (*h, e.proto)));
        list.push(Forward { local: local.clone(), remote: e.remote.clone(), protocol: proto.to_string() });
    }
    drop(exposed);
    for p in &published {
        if !covered.contains(&(p.host, p.proto)) {
            list.push(Forward {
                local: p.host.to_string(),
                remote: SocketAddr::new(p.guest_ip, p.guest_port).to_string(),
                protocol: p.proto.as_str().to_string(),
            });
        }
    }
    list.sort();
    Reply::json(StatusCode::OK, &list)
}

pub async fn leases(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Leases { reply }).await {
        Some(list) => {
            let map: BTreeMap<String, String> =
                list.iter().map(|(ip, mac)| (ip.to_string(), super::v1::format_mac(mac))).collect();
            Reply::json(StatusCode::OK, &map)
        }
        None => text(StatusCode::INTERNAL_SERVER_ERROR, "the network engine is not running"),
    }
}

/// gvproxy's `/cam`: the switch's table, each guest MAC and the link it is behind.
pub async fn cam(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Metrics { reply }).await {
        Some(m) => {
            let map: BTreeMap<String, usize> = m
                .links
                .iter()
                .flat_map(|l| l.guests.iter().map(move |(mac, _)| (super::v1::format_mac(mac), l.index)))
                .collect();
            Reply::json(StatusCode::OK, &map)
        }
        None => text(StatusCode::INTERNAL_SERVER_ERROR, "the network engine is not running"),
    }
}

/// gvproxy's `types.Zone` (Go's JSON field names, matched case-insensitively by Go).
#[derive(Debug, Default, Serialize, Deserialize)]
struct Zone {
    #[serde(rename = "Name", alias = "name", default)]
    name: String,
    #[serde(rename = "Records", alias = "records", default)]
    records: Vec<Record>,
    #[serde(
        rename = "DefaultIP",
        alias = "defaultIP",
        alias = "defaultip",
        default,
        deserialize_with = "null_as_empty"
    )]
    default_ip: String,
}

/// gvproxy's `types.Record`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    #[serde(rename = "Name", alias = "name", default)]
    name: String,
    #[serde(rename = "IP", alias = "ip", alias = "Ip", default, deserialize_with = "null_as_empty")]
    ip: String,
    #[serde(rename = "Regexp", alias = "regexp", default, skip_serializing_if = "Option::is_none")]
    regexp: Option<serde_json::Value>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

pub fn dns_all(state: &State) -> Reply {
    let mut zones: BTreeMap<String, Vec<Record>> = BTreeMap::new();
    // gvproxy's zones hold A records (dns_add takes IPv4 addresses only): the AAAA records
    // are /v1/dns's.
    for (name, ip) in state.dns.list() {
        let IpAddr::V4(ip) = ip else { continue };
        let (label, zone) = match name.split_once('.') {
            Some((label, zone)) => (label.to_string(), format!("{zone}.")),
            None => (name.clone(), String::new()),
        };
        zones.entry(zone).or_default().push(Record { name: label, ip: ip.to_string(), regexp: None });
    }
    let list: Vec<Zone> =
        zones.into_iter().map(|(name, records)| Zone { name, records, default_ip: String::new() }).collect();
    Reply::json(StatusCode::OK, &list)
}

pub fn dns_add(state: &State, body: &[u8]) -> Reply {
    let zone: Zone = match serde_json::from_slice(body) {
        Ok(z) => z,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    if !zone.default_ip.is_empty() {
        return text(StatusCode::BAD_REQUEST, "a zone DefaultIP is not supported by usernet");
    }
    let suffix = zone.name.trim_end_matches('.');
    // Check every record before adding any.
    let mut records = Vec::new();
    for r in &zone.records {
        if r.regexp.as_ref().is_some_and(|v| !v.is_null()) {
            return text(StatusCode::BAD_REQUEST, "regexp records are not supported by usernet");
        }
        if r.name.is_empty() {
            return text(StatusCode::BAD_REQUEST, "a record needs a Name");
        }
        let Ok(ip) = r.ip.parse::<Ipv4Addr>() else {
            return text(StatusCode::BAD_REQUEST, format!("invalid IPv4 address for {}: {:?}", r.name, r.ip));
        };
        let fqdn =
            if suffix.is_empty() { r.name.clone() } else { format!("{}.{suffix}", r.name.trim_end_matches('.')) };
        if fqdn.len() > 253 || hickory_proto::rr::Name::from_ascii(&fqdn).is_err() {
            return text(StatusCode::BAD_REQUEST, format!("invalid DNS name: {fqdn:?}"));
        }
        records.push((fqdn, ip));
    }
    for (fqdn, ip) in records {
        if let Err(e) = state.dns.add(&fqdn, ip) {
            return text(StatusCode::BAD_REQUEST, e);
        }
    }
    Reply::empty(StatusCode::OK)
}

pub async fn stats(state: &State) -> Reply {
    let Some(s) = state.control.ask(|reply| Command::Stats { reply }).await else {
        return text(StatusCode::INTERNAL_SERVER_ERROR, "the network engine is not running");
    };
    // gvproxy's BytesSent counts what went to the guests, BytesReceived what came from them.
    let value = serde_json::json!({
        "BytesSent": s.bytes_out,
        "BytesReceived": s.bytes_in,
        "UnknownProtocolRcvdPackets": 0,
        "MalformedRcvdPackets": 0,
        "DroppedPackets": s.dropped_in,
        "IP": {
            "PacketsReceived": s.frames_in,
            "InvalidDestinationAddressesReceived": 0,
            "InvalidSourceAddressesReceived": 0,
            "PacketsDelivered": s.frames_in.saturating_sub(s.dropped_in),
            "PacketsSent": s.frames_out,
            "OutgoingPacketErrors": 0,
            "MalformedPacketsReceived": 0,
            "MalformedFragmentsReceived": 0,
        },
        "TCP": {
            "CurrentEstablished": s.tcp_flows,
            "CurrentConnected": s.tcp_flows,
        },
        "UDP": {
            "CurrentFlows": s.udp_flows,
        },
    });
    Reply::json(StatusCode::OK, &value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("127.0.0.1:80"), Ok(("127.0.0.1", "80")));
        assert_eq!(split_host_port(":80"), Ok(("", "80")));
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1", "80")));
        assert!(split_host_port("::1:80").is_err());
        assert!(split_host_port("127.0.0.1").is_err());
        assert!(split_host_port("[::1]").is_err());
    }
}
