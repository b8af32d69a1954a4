//! The command line: one file per command.

pub mod bench;
pub mod run;

use clap::{Args, Parser, Subcommand};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use crate::config::{Ipv4Subnet, NetConfig};

/// Exit status when usernet itself fails (as `docker run`).
pub const EXIT_USERNET_FAILED: i32 = 125;
/// Exit status when the command cannot be invoked.
pub const EXIT_CANNOT_INVOKE: i32 = 126;
/// Exit status when the command is not found.
pub const EXIT_NOT_FOUND: i32 = 127;

#[derive(Parser, Debug)]
#[command(
    name = "usernet",
    version,
    about = "User-mode networking for containers and virtual machines"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run COMMAND in new network and mount namespaces with full outbound networking.
    Run(run::RunArgs),
    /// Measure usernet against pasta, slirp4netns and a veth pair, side by side.
    Bench(bench::BenchArgs),
}

/// Options of the virtual network, shared by `run` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct NetOpts {
    /// Where the gateway's DNS forwards what it does not answer itself (IP[:PORT]; repeatable).
    /// Default: the nameservers of the host's /etc/resolv.conf.
    #[arg(long = "dns-upstream", value_name = "IP[:PORT]", value_parser = parse_dns_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
    /// Extra DNS record NAME:IP (repeatable); IP `host-gateway` is the host address.
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// MTU of the guest link.
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=65520))]
    pub mtu: Option<u32>,
    /// The virtual network's IPv4 subnet (gateway .1, guest .2, host .254).
    #[arg(long, value_name = "CIDR", default_value = "192.168.65.0/24")]
    pub subnet: Ipv4Subnet,
    /// Write every frame of the guest link to FILE (pcap, for tcpdump and Wireshark).
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
}

pub fn parse_dns_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(format!("invalid DNS upstream: {s} (want IP or IP:PORT)"))
}

impl NetOpts {
    /// Builds the network configuration; `default_mtu` differs for namespaces and VMs.
    pub fn to_config(&self, default_mtu: u32) -> anyhow::Result<NetConfig> {
        let mut cfg = NetConfig::new(self.subnet, self.mtu.unwrap_or(default_mtu));
        for spec in &self.add_host {
            let (name, ip) = spec.rsplit_once(':').ok_or_else(|| {
                anyhow::anyhow!("invalid argument \"{spec}\" for \"--add-host\" flag: want NAME:IP")
            })?;
            let ip: Ipv4Addr = if ip == "host-gateway" {
                cfg.host
            } else {
                ip.parse()
                    .map_err(|_| anyhow::anyhow!("invalid argument \"{spec}\" for \"--add-host\" flag: invalid IP address: {ip}"))?
            };
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name.is_empty() {
                anyhow::bail!("invalid argument \"{spec}\" for \"--add-host\" flag: empty name");
            }
            cfg.extra_hosts.push((name, ip));
        }
        if self.dns_upstream.is_empty() {
            let host =
                crate::netns::resolv::host_resolvers(std::path::Path::new("/etc/resolv.conf"));
            cfg.dns_upstreams = host.nameservers;
            cfg.search_domains = host.search;
        } else {
            cfg.dns_upstreams = self.dns_upstream.clone();
        }
        Ok(cfg)
    }
}

/// Entry point: parses the command line, runs the command, returns the exit status.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                EXIT_USERNET_FAILED
            } else {
                0
            };
            let _ = e.print();
            return code;
        }
    };
    init_logging();
    let result = match cli.command {
        Command::Run(args) => run::main(args),
        Command::Bench(args) => bench::main(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("usernet: {e:#}");
            EXIT_USERNET_FAILED
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
