//! `usernet port ls|add|rm --api PATH`: manage the published ports of a running usernet
//! through its control API.
//!
//! - `ls` prints one `docker port` line per published port: `80/tcp -> 127.0.0.1:8080`.
//! - `add SPEC...` publishes Docker `-p` specs (`8080:80`, `127.0.0.1::80/udp`) and prints
//!   the lines of what was published (so a picked port is learnt).
//! - `rm [IP:]HOSTPORT[/PROTO]...` stops publishing; without IP, at every address.
//!
//! Errors are one line on stderr and exit status 125, as for every usernet failure.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

use usernet_host::api::client;

#[derive(Args, Debug)]
pub struct PortArgs {
    #[command(subcommand)]
    pub command: PortCommand,
}

/// The API socket of the usernet to manage.
#[derive(Args, Debug)]
pub struct ApiOpt {
    /// The control API socket (`--api` of `usernet run` or `usernet serve`).
    #[arg(long, value_name = "PATH")]
    pub api: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum PortCommand {
    /// List published ports, one `docker port` line each.
    Ls {
        #[command(flatten)]
        api: ApiOpt,
    },
    /// Publish ports: Docker's `[ip:][hostPort:]containerPort[/proto]`.
    Add {
        #[command(flatten)]
        api: ApiOpt,
        /// Guest address to forward to, IPv4 or IPv6 (default: the first guest's IPv4 one).
        #[arg(long, value_name = "IP")]
        guest_ip: Option<std::net::IpAddr>,
        #[arg(required = true, value_name = "SPEC")]
        specs: Vec<String>,
    },
    /// Stop publishing ports: `[IP:]HOSTPORT[/PROTO]`.
    Rm {
        #[command(flatten)]
        api: ApiOpt,
        #[arg(required = true, value_name = "[IP:]HOSTPORT[/PROTO]")]
        ports: Vec<String>,
    },
}

/// One port as `/v1/ports` shows it.
#[derive(Debug, serde::Deserialize)]
struct Port {
    host_ip: IpAddr,
    host_port: u16,
    guest_port: u16,
    protocol: String,
}

impl Port {
    /// `80/tcp -> 127.0.0.1:8080`, as `docker port` prints it.
    fn line(&self) -> String {
        let host = match self.host_ip {
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.host_port),
            IpAddr::V4(ip) => format!("{ip}:{}", self.host_port),
        };
        format!("{}/{} -> {host}", self.guest_port, self.protocol)
    }
}

pub fn main(args: PortArgs) -> anyhow::Result<i32> {
    match args.command {
        PortCommand::Ls { api } => {
            for p in call(&api.api, "GET", "/v1/ports", None)? {
                println!("{}", p.line());
            }
        }
        PortCommand::Add { api, guest_ip, specs } => {
            for spec in specs {
                let mut body = json!({ "spec": spec });
                if let Some(ip) = guest_ip {
                    body["guest_ip"] = json!(ip.to_string());
                }
                for p in call(&api.api, "POST", "/v1/ports", Some(&body))? {
                    println!("{}", p.line());
                }
            }
        }
        PortCommand::Rm { api, ports } => {
            for target in ports {
                let (ip, port, proto) = parse_target(&target)?;
                let mut body = json!({ "host_port": port, "protocol": proto });
                if let Some(ip) = ip {
                    body["host_ip"] = json!(ip.to_string());
                }
                call(&api.api, "DELETE", "/v1/ports", Some(&body))?;
            }
        }
    }
    Ok(0)
}

/// Sends a request and reads the list of ports it answers with.
fn call(socket: &Path, method: &str, path: &str, body: Option<&serde_json::Value>) -> anyhow::Result<Vec<Port>> {
    let resp = match body {
        Some(b) => client::request_json(socket, method, path, b)?,
        None => client::request(socket, method, path, None)?,
    };
    if !(200..300).contains(&resp.status) {
        bail!("{}", resp.error_message());
    }
    let mut ports: Vec<Port> = serde_json::from_slice(&resp.body).context("malformed answer from the usernet API")?;
    ports.sort_by_key(|p| (p.guest_port, p.protocol.clone(), p.host_ip, p.host_port));
    Ok(ports)
}

/// Parses `[IP:]HOSTPORT[/PROTO]` (`8080`, `127.0.0.1:8080/udp`, `[::1]:8080`).
fn parse_target(s: &str) -> anyhow::Result<(Option<IpAddr>, u16, &str)> {
    let (addr, proto) = match s.rsplit_once('/') {
        Some((a, p)) => (a, p),
        None => (s, "tcp"),
    };
    if proto != "tcp" && proto != "udp" {
        bail!("invalid proto: {proto}");
    }
    let (ip, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:").with_context(|| format!("invalid port: {s}"))?;
        (Some(ip), port)
    } else {
        match addr.rsplit_once(':') {
            Some((ip, _)) if ip.contains(':') => bail!("invalid port: {s} (write IPv6 as [IP]:PORT)"),
            Some((ip, port)) => (Some(ip), port),
            None => (None, addr),
        }
    };
    let ip = match ip {
        None | Some("") => None,
        Some(ip) => Some(ip.parse::<IpAddr>().map_err(|_| anyhow::anyhow!("invalid IP address: {ip}"))?),
    };
    let port: u16 = match port.parse() {
        Ok(p) if p != 0 => p,
        _ => bail!("invalid hostPort: {port}"),
    };
    Ok((ip, port, proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(parse_target("8080").unwrap(), (None, 8080, "tcp"));
        assert_eq!(parse_target("127.0.0.1:8080/udp").unwrap(), (Some("127.0.0.1".parse().unwrap()), 8080, "udp"));
        assert_eq!(parse_target("[::1]:53/udp").unwrap(), (Some("::1".parse().unwrap()), 53, "udp"));
        assert!(parse_target("::1:53").is_err());
        assert!(parse_target("70000").is_err());
        assert!(parse_target("8080/sctp").is_err());
        assert!(parse_target("x:8080").is_err());
    }

    #[test]
    fn lines() {
        let p = Port { host_ip: "::".parse().unwrap(), host_port: 49153, guest_port: 80, protocol: "tcp".into() };
        assert_eq!(p.line(), "80/tcp -> [::]:49153");
    }
}
