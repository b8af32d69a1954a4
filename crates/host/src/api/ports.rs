//! Publishing and unpublishing ports for both API flavours.
//!
//! Every request, whatever its JSON shape, is first written as a Docker `-p` spec
//! (`127.0.0.1:8080:80/tcp`, `[::1]::53/udp`, `8080:80`) and parsed by
//! `publish::spec::parse_publish`, so the API accepts exactly what `-p` accepts and fails
//! with Docker's words. The specs are bound here with `publish::listen::bind` (all of them
//! before any is handed over, so a failure leaves nothing half-published) and the bound
//! listeners go to the engine with `Command::Publish`.

use std::net::{IpAddr, SocketAddr};

use hyper::StatusCode;

use crate::publish::listen::{self, BindError};
use crate::publish::spec::parse_publish;
use usernet_core::engine::control::{Command, Published};
use usernet_core::ports::BoundListener;
use usernet_core::ports::Proto;

use super::state::{Reply, State};

/// Why a port could not be published.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Bad spec, address or port: Docker's message.
    #[error("{0}")]
    Invalid(String),
    /// The host port is taken: "Bind for 0.0.0.0:8000 failed: port is already allocated".
    #[error("{0}")]
    InUse(String),
    /// Any other bind failure (no permission, address not available).
    #[error("{0}")]
    Bind(String),
    #[error("the network engine is not running")]
    EngineGone,
}

impl PublishError {
    /// usernet's status code for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            PublishError::Invalid(_) => StatusCode::BAD_REQUEST,
            PublishError::InUse(_) => StatusCode::CONFLICT,
            PublishError::Bind(_) => StatusCode::INTERNAL_SERVER_ERROR,
            PublishError::EngineGone => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn reply(&self) -> Reply {
        Reply::error(self.status(), self.to_string())
    }
}

/// Writes a Docker `-p` spec: `host_ip` None means every address (both 0.0.0.0 and [::]),
/// `host_port` 0 means "pick one".
pub fn docker_spec(host_ip: Option<IpAddr>, host_port: u16, guest_port: u16, proto: Proto) -> String {
    let host_port = if host_port == 0 { String::new() } else { host_port.to_string() };
    match host_ip {
        None if host_port.is_empty() => format!("{guest_port}/{proto}"),
        None => format!("{host_port}:{guest_port}/{proto}"),
        Some(IpAddr::V4(ip)) => format!("{ip}:{host_port}:{guest_port}/{proto}"),
        Some(IpAddr::V6(ip)) => format!("[{ip}]:{host_port}:{guest_port}/{proto}"),
    }
}

/// Parses `spec` (Docker's grammar), binds every host socket it names, and has the engine
/// serve them, forwarding to `guest_ip`: an IPv4 address, or an IPv6 one of the network's
/// /64. Returns what the engine now serves.
pub async fn publish(state: &State, spec: &str, guest_ip: IpAddr) -> Result<Vec<Published>, PublishError> {
    if let IpAddr::V6(ip) = guest_ip {
        match &state.cfg.v6 {
            None => {
                return Err(PublishError::Invalid(format!("cannot publish to {ip}: the guest network has no IPv6")));
            }
            Some(net) if !net.contains(ip) => {
                return Err(PublishError::Invalid(format!(
                    "cannot publish to {ip}: not in the guest network's {}/64",
                    net.prefix
                )));
            }
            Some(_) => {}
        }
    }
    let listeners = parse_and_bind(spec)?;
    state.control.ask(|reply| Command::Publish { listeners, guest_ip, reply }).await.ok_or(PublishError::EngineGone)
}

/// Parses a Docker `-p` spec and binds all of its host sockets (none when any fails).
fn parse_and_bind(spec: &str) -> Result<Vec<BoundListener>, PublishError> {
    let specs = parse_publish(spec).map_err(|e| PublishError::Invalid(e.to_string()))?;
    listen::bind_all(&specs).map_err(|e| match e {
        BindError::InUse { .. } => PublishError::InUse(e.to_string()),
        BindError::Os { .. } | BindError::Privileged { .. } => PublishError::Bind(e.to_string()),
    })
}

/// Unpublishes every published port on `port`/`proto`, at `ip` or at any address.
/// Returns the ones removed; `None` when the engine is gone.
pub async fn unpublish(state: &State, ip: Option<IpAddr>, port: u16, proto: Proto) -> Option<Vec<Published>> {
    let all = list(state).await?;
    let mut removed = Vec::new();
    for p in all {
        if p.host.port() == port && p.proto == proto && ip.is_none_or(|ip| same_ip(ip, p.host.ip())) {
            let host = p.host;
            let found = state.control.ask(|reply| Command::Unpublish { host, proto, reply }).await?;
            if found {
                removed.push(p);
            }
        }
    }
    Some(removed)
}

/// Unpublishes exactly the listeners at `hosts` for `proto`; `None` when the engine is gone.
pub async fn unpublish_exact(state: &State, hosts: &[SocketAddr], proto: Proto) -> Option<usize> {
    let mut n = 0;
    for &host in hosts {
        if state.control.ask(|reply| Command::Unpublish { host, proto, reply }).await? {
            n += 1;
        }
    }
    Some(n)
}

/// What the engine serves now; `None` when the engine is gone.
pub async fn list(state: &State) -> Option<Vec<Published>> {
    let mut all = state.control.ask(|reply| Command::ListPorts { reply }).await?;
    all.sort_by_key(|p| (p.guest_port, p.proto.as_str(), p.host));
    Some(all)
}

/// Compares addresses, taking an IPv4-mapped IPv6 address as its IPv4 one.
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    a.to_canonical() == b.to_canonical()
}

/// Parses a protocol name as Docker does ("tcp", "udp"; empty means tcp).
pub fn parse_proto(s: &str) -> Result<Proto, String> {
    match s.to_ascii_lowercase().as_str() {
        "" | "tcp" => Ok(Proto::Tcp),
        "udp" => Ok(Proto::Udp),
        _ => Err(format!("invalid proto: {s}")),
    }
}

/// Parses a host IP as `-p` does: `1.2.3.4`, `::1` or `[::1]`.
pub fn parse_host_ip(s: &str) -> Result<IpAddr, String> {
    let bare = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')).unwrap_or(s);
    bare.parse().map_err(|_| format!("invalid IP address: {s}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let v4 = Some("127.0.0.1".parse().unwrap());
        let v6 = Some("::1".parse().unwrap());
        assert_eq!(docker_spec(v4, 8080, 80, Proto::Tcp), "127.0.0.1:8080:80/tcp");
        assert_eq!(docker_spec(v4, 0, 80, Proto::Udp), "127.0.0.1::80/udp");
        assert_eq!(docker_spec(v6, 0, 53, Proto::Udp), "[::1]::53/udp");
        assert_eq!(docker_spec(None, 8080, 80, Proto::Tcp), "8080:80/tcp");
        assert_eq!(docker_spec(None, 0, 80, Proto::Tcp), "80/tcp");
    }

    #[test]
    fn protos_and_ips() {
        assert_eq!(parse_proto("UDP"), Ok(Proto::Udp));
        assert_eq!(parse_proto(""), Ok(Proto::Tcp));
        assert_eq!(parse_proto("sctp"), Err("invalid proto: sctp".into()));
        assert_eq!(parse_host_ip("[::1]"), Ok("::1".parse().unwrap()));
        assert!(parse_host_ip("nope").is_err());
        assert!(same_ip("::ffff:127.0.0.1".parse().unwrap(), "127.0.0.1".parse().unwrap()));
    }
}
