//! `usernet ps`: the usernets running for this user, one line each: pid, mode, guests,
//! uptime, published ports, API socket and command. Stale entries of the runtime directory
//! are removed on the way. `--json` prints `/v1/info` of each instead.

use clap::Args;

use usernet_host::api::registry;
use usernet_host::api::{Info, Port};

use super::{LIST_TIMEOUT, get_within, human_duration, table};

#[derive(Args, Debug)]
pub struct PsArgs {
    /// Print each instance's `/v1/info` as a JSON array.
    #[arg(long)]
    pub json: bool,
}

/// `127.0.0.1:8080->80/tcp`, as `docker ps` shows a published port.
pub fn port_text(p: &Port) -> String {
    let host = match p.host_ip {
        std::net::IpAddr::V6(ip) => format!("[{ip}]:{}", p.host_port),
        std::net::IpAddr::V4(ip) => format!("{ip}:{}", p.host_port),
    };
    format!("{host}->{}/{}", p.guest_port, p.protocol)
}

/// One `ps` line's cells.
pub fn row(pid: u32, info: Option<&Info>, socket: &std::path::Path) -> Vec<String> {
    let Some(i) = info else {
        return vec![pid.to_string(), "?".into(), "?".into(), "?".into(), "?".into(), socket.display().to_string()];
    };
    let guests: Vec<String> = i.guests.iter().map(|g| g.ip.to_string()).collect();
    let ports: Vec<String> = i.ports.iter().map(port_text).collect();
    let or_dash = |v: Vec<String>| if v.is_empty() { "-".to_string() } else { v.join(",") };
    vec![
        pid.to_string(),
        i.mode.clone(),
        or_dash(guests),
        human_duration(i.uptime_ms),
        or_dash(ports),
        i.api.clone().unwrap_or_else(|| socket.display().to_string()),
        i.command.join(" "),
    ]
}

pub fn main(args: PsArgs) -> anyhow::Result<i32> {
    let found = registry::instances(&registry::runtime_dir());
    let infos: Vec<(u32, std::path::PathBuf, Option<Info>)> = found
        .into_iter()
        .map(|i| {
            let info = get_within::<Info>(&i.socket, "/v1/info", LIST_TIMEOUT);
            if let Err(e) = &info {
                tracing::debug!("pid {}: {e:#}", i.pid);
            }
            (i.pid, i.socket, info.ok())
        })
        .collect();
    if args.json {
        let list: Vec<&Info> = infos.iter().filter_map(|(_, _, i)| i.as_ref()).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(0);
    }
    let mut rows = vec![["PID", "MODE", "GUESTS", "UPTIME", "PORTS", "API", "COMMAND"].map(String::from).to_vec()];
    rows.extend(infos.iter().map(|(pid, socket, info)| row(*pid, info.as_ref(), socket)));
    print!("{}", table(&rows));
    Ok(0)
}
