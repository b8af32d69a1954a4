//! vpnkit mode: usernet started as `vpnkit` (a symlink of that name, or `usernet vpnkit
//! ARGS...`) takes vpnkit's command line and network, and serves its ethernet protocol, so
//! that rootlesskit's `--net=vpnkit --vpnkit-binary=PATH` (and anything else that speaks
//! vmnet to a Unix socket) uses it unchanged.
//!
//! Theory of operation.
//! 1. Parse vpnkit's options (cmdliner's grammar: `--opt V` or `--opt=V`). What rootlesskit
//!    passes is `--ethernet PATH --mtu N`, plus `--host-ip 0.0.0.0` for
//!    `--disable-host-loopback`. Also honoured: `--gateway-ip`, `--lowest-ip` (the first
//!    guest address), `--dns` (the upstream server, instead of the host's resolv.conf),
//!    `--pcap`, `--debug`. Any other vpnkit option is an error naming it, never ignored.
//! 2. The network is vpnkit's: 192.168.65.0/24, gateway and DNS .1, the host's loopback at
//!    .2 (`--host-ip`; 0.0.0.0 refuses the host's loopback), guests from .3 by DHCP, MTU
//!    1500.
//! 3. Listen on the `--ethernet` socket (`usernet_core::link::vpnkit`): each client's
//!    handshake gives it a MAC (kept per interface UUID), then its frames flow; several
//!    clients share the network, each bound to its MAC and address.
//! 4. Run until SIGINT or SIGTERM (rootlesskit kills it when it ends, and its death signal
//!    covers a crash): exit 0, the socket file removed. A client that goes away is logged
//!    and the others carry on.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;

use super::getopt::{self, Opt, Positionals, flag, valued};
use super::lifecycle::SignalSupervisor;
use crate::net_opts::NetOpts;
use crate::network::{Network, start_network};
use usernet_core::config::{Ipv4Subnet, NetConfig};
use usernet_core::link::vpnkit::VpnkitAcceptor;
use usernet_core::pcap::PcapWriter;
use usernet_core::services::proxy::ProxyConfig;
use usernet_host::dns_watch;

const USAGE: &str = "Usage: vpnkit --ethernet PATH [OPTION]...\n";

const HELP: &str = "usernet in vpnkit mode: proxy TCP/IP connections from an ethernet link via sockets.

  --ethernet PATH      listen on this Unix socket for vmnet (virtio-vpnkit) clients
  --mtu N              the guests' MTU (default 1500)
  --host-ip IP         the address that leads to the host's 127.0.0.1 (default 192.168.65.2;
                       0.0.0.0: none, the host's loopback is closed to the guests)
  --gateway-ip IP      the gateway and DNS server (default 192.168.65.1)
  --lowest-ip IP       the first address DHCP hands out (default 192.168.65.3)
  --dns IP             the upstream DNS server (default: the host's resolv.conf, followed)
  --pcap FILE          write every frame to FILE
  --debug              log what happens
  --help, --version

Other vpnkit options (--port, --introspection, --db, --vsock-path, ...) are refused: usernet
does not serve them.
";

const OPTS: &[Opt] = &[
    valued("ethernet", None),
    valued("mtu", None),
    valued("host-ip", None),
    valued("gateway-ip", None),
    valued("lowest-ip", None),
    valued("dns", None),
    valued("pcap", None),
    flag("debug", None),
    flag("help", None),
    flag("version", None),
    // vpnkit's, refused by name below.
    valued("port", None),
    valued("introspection", None),
    valued("diagnostics", None),
    valued("db", None),
    valued("vsock-path", None),
    valued("highest-ip", None),
    valued("max-connections", None),
    valued("hosts", None),
    valued("host-names", None),
    valued("gateway-names", None),
    valued("vm-names", None),
    valued("allowed-bind-addresses", None),
    valued("http", None),
    valued("udpv4-forwards", None),
    valued("tcpv4-forwards", None),
    valued("gateway-forwards", None),
    valued("listen-backlog", None),
    valued("gc-compact-interval", None),
    flag("select", None),
];

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub ethernet: PathBuf,
    pub mtu: u32,
    /// None: `--host-ip 0.0.0.0`, no way to the host's loopback.
    pub host_ip: Option<Ipv4Addr>,
    pub gateway_ip: Ipv4Addr,
    pub lowest_ip: Ipv4Addr,
    pub dns: Option<SocketAddr>,
    pub pcap: Option<PathBuf>,
    pub debug: bool,
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Run(Box<Options>),
    Help,
    Version,
}

fn parse(args: &[OsString]) -> Result<Parsed, String> {
    let given = getopt::parse("vpnkit", OPTS, args, Positionals::Anywhere)?;
    if let Some(p) = given.positionals.first() {
        return Err(format!("vpnkit: too many arguments, don't know what to do with '{}'", p.to_string_lossy()));
    }
    let mut ethernet = None;
    let mut o = Options {
        ethernet: PathBuf::new(),
        mtu: 1500,
        host_ip: Some(Ipv4Addr::new(192, 168, 65, 2)),
        gateway_ip: Ipv4Addr::new(192, 168, 65, 1),
        lowest_ip: Ipv4Addr::new(192, 168, 65, 3),
        dns: None,
        pcap: None,
        debug: false,
    };
    let ip = |name: &str, v: &str| -> Result<Ipv4Addr, String> {
        v.parse().map_err(|_| format!("vpnkit: option '--{name}': invalid IPv4 address '{v}'"))
    };
    for (name, value) in given.options {
        let v = value.unwrap_or_default();
        match name {
            "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            "ethernet" => {
                // vpnkit takes a path; `unix:PATH` as other listeners write it is the same.
                let path = v.strip_prefix("unix://").or_else(|| v.strip_prefix("unix:")).unwrap_or(&v);
                if path.is_empty() {
                    return Err("vpnkit: option '--ethernet': empty path".into());
                }
                if path.contains("://") {
                    return Err(format!("vpnkit: --ethernet {v}: usernet listens on Unix socket paths only"));
                }
                ethernet = Some(PathBuf::from(path));
            }
            "mtu" => {
                o.mtu = v
                    .parse()
                    .ok()
                    .filter(|m| (576..=65520).contains(m))
                    .ok_or_else(|| format!("vpnkit: option '--mtu': invalid value '{v}' (576 to 65520)"))?
            }
            "host-ip" => {
                let a = ip(name, &v)?;
                o.host_ip = (!a.is_unspecified()).then_some(a);
            }
            "gateway-ip" => o.gateway_ip = ip(name, &v)?,
            "lowest-ip" => o.lowest_ip = ip(name, &v)?,
            "dns" => o.dns = Some(SocketAddr::new(ip(name, &v)?.into(), 53)),
            "pcap" => o.pcap = Some(PathBuf::from(v)),
            "debug" => o.debug = true,
            other => return Err(format!("vpnkit: --{other}: not supported by usernet's vpnkit mode")),
        }
    }
    o.ethernet = ethernet.ok_or("vpnkit: --ethernet PATH is required (usernet serves Unix sockets)")?;
    let subnet = subnet_of(o.gateway_ip);
    for (what, a) in [("--host-ip", o.host_ip), ("--lowest-ip", Some(o.lowest_ip))] {
        if let Some(a) = a
            && (!subnet.contains(a) || a == o.gateway_ip || a == subnet.network || a == subnet.broadcast())
        {
            return Err(format!("vpnkit: {what} {a}: not a free address of {}/24 (the gateway's)", subnet.network));
        }
    }
    if o.host_ip == Some(o.lowest_ip) {
        return Err(format!("vpnkit: --lowest-ip {} is the host's address (--host-ip)", o.lowest_ip));
    }
    Ok(Parsed::Run(Box::new(o)))
}

/// vpnkit's network is the /24 of its gateway.
fn subnet_of(gateway: Ipv4Addr) -> Ipv4Subnet {
    let o = gateway.octets();
    Ipv4Subnet { network: Ipv4Addr::new(o[0], o[1], o[2], 0), prefix: 24 }
}

/// vpnkit's network for these options.
pub fn network_config(o: &Options) -> anyhow::Result<NetConfig> {
    let mut net = NetOpts::defaults();
    let subnet = subnet_of(o.gateway_ip);
    net.subnet = subnet;
    net.mtu = Some(o.mtu);
    net.dns_upstream = o.dns.into_iter().collect();
    let mut cfg = net.to_config(o.mtu)?;
    // vpnkit has no IPv6, and neither does usernet in its place.
    cfg.v6 = None;
    cfg.gateway = o.gateway_ip;
    cfg.dns = Some(o.gateway_ip);
    cfg.guest = o.lowest_ip;
    // With `--host-ip 0.0.0.0` there is no host address: the .2 vpnkit would use stays, and
    // refuses what is sent to it.
    cfg.host = o.host_ip.unwrap_or(subnet.host(2));
    cfg.host_loopback = o.host_ip.is_some();
    let loopback_to = cfg.host_loopback.then_some(cfg.host);
    cfg.host_dns.set_hosts(dns_watch::hosts_from_file(std::path::Path::new(dns_watch::HOSTS), loopback_to));
    Ok(cfg)
}

/// Entry point: the exit status.
pub fn main(args: &[OsString]) -> i32 {
    let o = match parse(args) {
        Ok(Parsed::Help) => {
            print!("{USAGE}\n{HELP}");
            return 0;
        }
        Ok(Parsed::Version) => {
            println!("usernet {} (vpnkit mode)", env!("USERNET_VERSION"));
            return 0;
        }
        Ok(Parsed::Run(o)) => o,
        Err(m) => {
            eprintln!("{m}");
            eprint!("{USAGE}");
            return 1;
        }
    };
    crate::init_logging(if o.debug { "debug" } else { "info" });
    match run(&o) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vpnkit (usernet): {e:#}");
            1
        }
    }
}

fn run(o: &Options) -> anyhow::Result<i32> {
    let cfg = Arc::new(network_config(o)?);
    let pcap = match &o.pcap {
        Some(p) => Some(PcapWriter::create(p, 262_144).with_context(|| format!("cannot create {}", p.display()))?),
        None => None,
    };
    let mut sup = SignalSupervisor::new()?;
    let net = NetOpts { dns_upstream: o.dns.into_iter().collect(), ..NetOpts::defaults() };
    let _dns_watch = net.start_dns_watch(&cfg).map_err(|e| tracing::warn!("{e:#}")).ok();
    let acceptor = VpnkitAcceptor::bind(&o.ethernet, o.mtu as u16, cfg.subnet, usernet_host::netns::sandbox::GUEST_MAC)
        .with_context(|| format!("cannot listen on {}", o.ethernet.display()))?;
    let Network { mut engine, proxy_hook, .. } = start_network(&cfg, ProxyConfig::default(), pcap, None)?;
    engine.add_tcp_hook(proxy_hook);
    engine.bind_guests_to_links();
    engine.add_acceptor(Box::new(acceptor)).context("watching the ethernet socket")?;
    tracing::info!(
        "vpnkit mode: ethernet on {}, gateway {}, host {}",
        o.ethernet.display(),
        cfg.gateway,
        o.host_ip.map_or("none".to_string(), |h| h.to_string())
    );
    crate::network::confine(usernet_host::confine::disabled_by_env());
    engine.run(&mut sup).context("network engine failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Parsed, String> {
        let args: Vec<OsString> = s.split_whitespace().map(OsString::from).collect();
        parse(&args)
    }

    fn opts(s: &str) -> Options {
        match p(s) {
            Ok(Parsed::Run(o)) => *o,
            other => panic!("{s}: {other:?}"),
        }
    }

    /// rootlesskit 1.1.0's command lines, with and without --disable-host-loopback.
    #[test]
    fn rootlesskit_command_lines() {
        let o = opts("--ethernet /run/user/1000/rk/vpnkit-ethernet.sock --mtu 1500");
        assert_eq!(o.ethernet, PathBuf::from("/run/user/1000/rk/vpnkit-ethernet.sock"));
        assert_eq!((o.mtu, o.host_ip), (1500, Some(Ipv4Addr::new(192, 168, 65, 2))));
        let o = opts("--ethernet=/tmp/e.sock --mtu=65520 --host-ip 0.0.0.0");
        assert_eq!((o.mtu, o.host_ip), (65520, None));
        let cfg = network_config(&o).unwrap();
        assert!(!cfg.host_loopback);
        let cfg = network_config(&opts("--ethernet /tmp/e.sock")).unwrap();
        assert_eq!(cfg.gateway, Ipv4Addr::new(192, 168, 65, 1));
        assert_eq!(cfg.dns, Some(Ipv4Addr::new(192, 168, 65, 1)));
        assert_eq!(cfg.host, Ipv4Addr::new(192, 168, 65, 2));
        assert_eq!(cfg.guest, Ipv4Addr::new(192, 168, 65, 3));
        assert!(cfg.host_loopback);
    }

    #[test]
    fn mistakes_name_the_option() {
        for (line, want) in [
            ("--mtu 1500", "--ethernet PATH is required"),
            ("--ethernet /x --port /tmp/p", "--port: not supported"),
            ("--ethernet /x --db file:///x", "--db: not supported"),
            ("--ethernet /x --bogus", "unrecognized option '--bogus'"),
            ("--ethernet /x --mtu 9", "invalid value '9'"),
            ("--ethernet /x --host-ip 10.0.0.1", "--host-ip 10.0.0.1: not a free address"),
            ("--ethernet /x --lowest-ip 192.168.65.2", "is the host's address"),
            ("--ethernet hyperv-connect://vm", "Unix socket paths only"),
            ("--ethernet /x extra", "too many arguments"),
        ] {
            let e = p(line).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
        assert_eq!(p("--help"), Ok(Parsed::Help));
        assert_eq!(p("--version"), Ok(Parsed::Version));
    }
}
