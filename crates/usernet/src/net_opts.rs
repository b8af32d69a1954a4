//! The options of the virtual network that `run` and `serve` share, and what they become:
//! the network configuration, the ports to publish (bound before anything runs), the proxy.
//!
//! DNS: without `--dns-upstream`, the gateway forwards to the servers of the host's
//! /etc/resolv.conf, with its search domains and options, and follows that file while
//! usernet runs ([`NetOpts::start_dns_watch`]); `--dns-upstream` fixes the servers instead.
//! The names of the host's /etc/hosts are answered by the gateway in both cases, and
//! followed too. In `run`, the guest's resolv.conf follows the host's search domains and
//! `ndots` when the servers do (not with `--dns-upstream`, which brings none).
//!
//! The egress policy (`--deny`, `--allow`, `--allow-domain`) becomes `NetConfig::policy`,
//! which the API may change at run time (crates/core/src/policy.rs says what it decides).

use clap::Args;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use usernet_core::config::{Ipv4Subnet, Ipv6Net, NetConfig, Upstreams};
use usernet_core::policy::{self, Policy, Rule, Rules};
use usernet_core::ports::{BoundListener, Proto};
use usernet_core::services::dns::records::{self, record_addresses};
use usernet_host::dns_watch::{self, DnsWatch, ForkedWatch, WatchSpec};
use usernet_host::netns::resolv::RESOLV_CONF;
use usernet_host::publish::listen::{self, BindError};
use usernet_host::publish::spec::{self, PortSpec, SpecError};

/// The longest `--busy-poll` window accepted, in microseconds.
pub const MAX_BUSY_POLL_US: u64 = 10_000;

/// Options of the virtual network, shared by `run` and `serve`.
#[derive(Args, Debug, Clone)]
pub struct NetOpts {
    /// Where the gateway's DNS forwards what it does not answer itself (IP[:PORT]; repeatable).
    /// Default: the nameservers of the host's /etc/resolv.conf, followed while usernet runs.
    #[arg(long = "dns-upstream", value_name = "IP[:PORT]", value_parser = parse_dns_upstream)]
    pub dns_upstream: Vec<SocketAddr>,
    /// A DNS search domain for the guest (repeatable), as Docker's `--dns-search`: these
    /// stand instead of the host's (its resolv.conf's, followed) in the guest's resolv.conf
    /// (`run`), DHCP, DHCPv6 and router advertisements. `.` alone: none.
    #[arg(long = "dns-search", value_name = "DOMAIN", value_parser = parse_dns_search)]
    pub dns_search: Vec<String>,
    /// Extra DNS record NAME:IP or NAME=IP (repeatable), as Docker's: an IPv6 address gives
    /// an AAAA record, in brackets or not (`NAME:[fd00::5]`); IP `host-gateway` is the host's
    /// addresses (an A record, and an AAAA record when the network has IPv6).
    #[arg(long = "add-host", value_name = "NAME:IP")]
    pub add_host: Vec<String>,
    /// MTU of the guest link.
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=65520))]
    pub mtu: Option<u32>,
    /// The virtual network's IPv4 subnet (gateway .1, guest .2, host .254).
    #[arg(long, value_name = "CIDR", default_value = "192.168.65.0/24", value_parser = parse_subnet)]
    pub subnet: Ipv4Subnet,
    /// The virtual network's IPv6 /64 (gateway ::1, guest ::2 in `run`, host ::254); guests
    /// configure themselves from usernet's router advertisements (SLAAC, RDNSS).
    #[arg(long, value_name = "PREFIX/64", default_value = "fd75:7365:726e::/64", conflicts_with = "ipv4_only")]
    pub subnet6: Ipv6Net,
    /// No IPv6 in the virtual network: no router advertisements, the guest's IPv6 dropped.
    #[arg(long = "ipv4-only", short = '4')]
    pub ipv4_only: bool,
    /// No IPv4 in the virtual network: the guest has IPv6 only (no IPv4 address, no DHCP,
    /// no A records from the gateway's DNS); published ports reach it over IPv6.
    #[arg(long = "ipv6-only", short = '6', conflicts_with = "ipv4_only")]
    pub ipv6_only: bool,
    /// Write every frame of the guest link to FILE (pcap, for tcpdump and Wireshark).
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    #[command(flatten)]
    pub limits: crate::limit_opts::LimitOpts,
    /// Publish a guest port on the host, as `docker run -p` (repeatable):
    /// `[IP:][HOSTPORT:]PORT[/PROTO]`, ranges `8000-8010:80-90`, `[::1]:8000:80`,
    /// `127.0.0.1::80`, or `published=8000,target=80[,protocol=udp][,host_ip=IP]`.
    #[arg(short = 'p', long = "publish", value_name = "SPEC")]
    pub publish: Vec<String>,
    /// Close the host's loopback to the guest: the host address (`host.docker.internal`,
    /// .254 of the subnet) then no longer leads to the host's 127.0.0.1 (connections to it
    /// are refused). The guest never reaches 127.0.0.0/8 by addressing it, with or without.
    #[arg(long = "no-host-loopback")]
    pub no_host_loopback: bool,
    /// Deny the guest this destination (repeatable): `CIDR[:PORTS]`, PORTS `N`, `N-M` or a
    /// comma list (`10.0.0.0/8`, `203.0.113.7:22`, `[2001:db8::/32]:443`). Deny rules win over
    /// allow rules. The host address is judged as 127.0.0.1. New connections get a RST (TCP)
    /// or an ICMP administratively prohibited (UDP, ping); the proxy answers 403.
    #[arg(long = "deny", value_name = "CIDR[:PORTS]", value_parser = parse_rule)]
    pub deny: Vec<Rule>,
    /// Allow the guest this destination (repeatable, same form as `--deny`). With any
    /// `--allow` or `--allow-domain`, every destination not allowed is denied (the host's
    /// 127.0.0.1 included; the gateway's DNS and DHCP stay open).
    #[arg(long = "allow", value_name = "CIDR[:PORTS]", value_parser = parse_rule)]
    pub allow: Vec<Rule>,
    /// Allow NAME and every name below it (repeatable): the addresses the gateway's DNS
    /// forwards in answers for them are allowed for their TTL (at least 5 minutes); the proxy
    /// allows the names themselves. Makes every destination not allowed denied, as `--allow`.
    #[arg(long = "allow-domain", value_name = "NAME", value_parser = parse_domain)]
    pub allow_domain: Vec<String>,
    /// Publish every `--expose` port to a random host port (on 0.0.0.0 and [::]).
    #[arg(short = 'P', long = "publish-all")]
    pub publish_all: bool,
    /// A guest port that `--publish-all` publishes: PORT[/PROTO] or a range (repeatable).
    #[arg(long = "expose", value_name = "PORT[/PROTO]")]
    pub expose: Vec<String>,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket.
    #[arg(long = "api", value_name = "PATH")]
    pub api: Option<PathBuf>,
    /// Serve a web dashboard (guests, ports, flows, throughput, DNS and proxy logs) and the
    /// API's read-only endpoints and /metrics on this TCP address, e.g. 127.0.0.1:8080 (port
    /// 0: any free port). Every request needs the token of the URL printed on stderr at start.
    #[arg(long = "web", value_name = "ADDR:PORT", value_parser = parse_web_addr)]
    pub web: Option<SocketAddr>,
    /// Upstream proxy for the guest's plain HTTP: `http://[user:password@]host[:port]`.
    #[arg(long = "http-proxy", value_name = "URL")]
    pub http_proxy: Option<String>,
    /// Upstream proxy for the guest's HTTPS (CONNECT): `http://[user:password@]host[:port]`.
    #[arg(long = "https-proxy", value_name = "URL")]
    pub https_proxy: Option<String>,
    /// Destinations that bypass the upstream proxy, comma or space separated: hosts,
    /// domains (`corp.example`, `.corp.example`, `*.corp.example`), IPs, CIDRs, `localhost`, `*`.
    #[arg(long = "no-proxy", value_name = "LIST")]
    pub no_proxy: Vec<String>,
    /// Take HTTP_PROXY, HTTPS_PROXY and NO_PROXY (either case) from the environment.
    #[arg(long = "proxy-from-env")]
    pub proxy_from_env: bool,
    /// Guest TCP ports intercepted transparently when an upstream proxy is set
    /// (default `80,443`; an empty list turns interception off).
    #[arg(long = "proxy-ports", value_name = "PORTS")]
    pub proxy_ports: Option<String>,
    /// When the event loop runs out of work after a request or an answer, poll without
    /// sleeping for up to this many microseconds, so that the next one arriving soon needs no
    /// wakeup: this halves request/response latency where waking an idle CPU is slow (VMs).
    /// The window adapts and shrinks away when spinning does not pay off, and bulk transfers
    /// never spin. 0 turns it off. Also USERNET_BUSY_POLL, which the drop-in modes read too.
    #[arg(long = "busy-poll", value_name = "MICROSECONDS", env = "USERNET_BUSY_POLL",
          default_value_t = usernet_core::engine::busy_poll::DEFAULT_MAX.as_micros() as u64,
          value_parser = clap::value_parser!(u64).range(0..=MAX_BUSY_POLL_US))]
    pub busy_poll: u64,
    /// Keep every privilege once set up: no capability lowered, no no_new_privs, no seccomp
    /// filter (for debugging). Also USERNET_NO_SANDBOX=1, which the drop-in modes read too.
    #[arg(long = "no-sandbox", env = "USERNET_NO_SANDBOX")]
    pub no_sandbox: bool,
}

/// `--subnet`: a network a guest can have, with room for the addresses
/// [`NetConfig::new`] gives out (/24 at the longest).
pub fn parse_subnet(s: &str) -> Result<Ipv4Subnet, String> {
    Ipv4Subnet::parse_up_to(s, NetConfig::LONGEST_PREFIX, "the gateway is .1, the guest .2 and the host .254")
}

/// A `--deny` or `--allow` rule.
pub fn parse_rule(s: &str) -> Result<Rule, String> {
    s.parse::<Rule>().map_err(|e| e.to_string())
}

/// An `--allow-domain` name, normalized.
pub fn parse_domain(s: &str) -> Result<String, String> {
    policy::normalize_domain(s).map_err(|e| e.to_string())
}

/// A `--dns-search` domain (lower case, no trailing dot), or `.` (none), as Docker takes it;
/// else Docker's message.
pub fn parse_dns_search(s: &str) -> Result<String, String> {
    if s == "." {
        return Ok(s.into());
    }
    if s.starts_with(['*', '.']) || s.parse::<IpAddr>().is_ok() {
        return Err(format!("{s} is not a valid domain"));
    }
    policy::normalize_domain(s).map_err(|_| format!("{s} is not a valid domain"))
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

/// `--web`'s address: `IP:PORT` (`[::1]:PORT` for IPv6), or `localhost:PORT`.
pub fn parse_web_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Some(port) = s.strip_prefix("localhost:")
        && let Ok(port) = port.parse::<u16>()
    {
        return Ok(SocketAddr::from((Ipv4Addr::LOCALHOST, port)));
    }
    Err(format!("invalid web address: {s} (want ADDR:PORT, e.g. 127.0.0.1:8080)"))
}

/// An `--add-host` record, as Docker reads one: the name ends at the first `=` or else at
/// the first `:` (so that an IPv6 address keeps its colons) and has none itself; the
/// address may be in brackets. `host-gateway` stands for each of `host_gateway`'s addresses
/// (the host as the guest sees it: IPv4, and IPv6 when the network has it), a record each,
/// as Docker 28 gives the default bridge's IPv4 and IPv6 gateways.
pub fn parse_add_host(spec: &str, host_gateway: &[IpAddr]) -> anyhow::Result<Vec<(String, IpAddr)>> {
    let bad = |what: String| anyhow::anyhow!("invalid argument \"{spec}\" for \"--add-host\" flag: {what}");
    let (name, ip) = match spec.split_once('=').or_else(|| spec.split_once(':')) {
        Some((name, ip)) if !name.contains(':') => (name, ip),
        _ => return Err(bad("want NAME:IP".into())),
    };
    let ips = record_addresses(ip, host_gateway).ok_or_else(|| bad(format!("invalid IP address: {ip}")))?;
    let name = records::normalize(name);
    if name.is_empty() {
        return Err(bad("empty name".into()));
    }
    Ok(ips.into_iter().map(|ip| (name.clone(), ip)).collect())
}

/// The dashboard's socket and token (`--web`), made before anything starts.
pub struct WebPort {
    pub listener: std::net::TcpListener,
    /// Where it listens (with the port the kernel picked for port 0).
    pub addr: SocketAddr,
    pub token: String,
}

impl NetOpts {
    /// Every option at its default, as `run` would take them with none given (for the
    /// drop-in modes, which set a few from their own command lines).
    pub fn defaults() -> NetOpts {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            net: NetOpts,
        }
        <Defaults as clap::Parser>::parse_from(["usernet"]).net
    }

    /// Binds `--web`'s address and makes its token: a taken port or an address this host
    /// does not have is an error here, before anything runs. A non-loopback address is
    /// served (the token still guards every request) with a warning: the dashboard is plain
    /// HTTP, its token readable on the network.
    pub fn bind_web(&self) -> anyhow::Result<Option<WebPort>> {
        let Some(addr) = self.web else {
            return Ok(None);
        };
        let listener = std::net::TcpListener::bind(addr).map_err(|e| {
            let why = match e.kind() {
                std::io::ErrorKind::AddrInUse => "address already in use".to_string(),
                _ => e.to_string(),
            };
            anyhow::anyhow!("cannot serve the dashboard on {addr}: {why}")
        })?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(
                "the dashboard listens on {addr}, beyond this host's loopback: it is plain HTTP, and its token \
                 crosses the network in clear text"
            );
        }
        let token = usernet_host::api::web::new_token().map_err(|e| anyhow::anyhow!("dashboard token: {e}"))?;
        Ok(Some(WebPort { listener, addr, token }))
    }

    /// Every port to publish: the `--publish` specs (ranges expanded), then, with
    /// `--publish-all`, each `--expose` port that no `--publish` spec already maps, to a
    /// random host port. Errors are Docker's messages.
    pub fn published_specs(&self) -> Result<Vec<PortSpec>, SpecError> {
        let mut specs = Vec::new();
        for raw in &self.publish {
            specs.extend(spec::parse_publish(raw)?);
        }
        let mut exposed: Vec<(u16, Proto)> = Vec::new();
        for raw in &self.expose {
            for port in spec::parse_expose(raw)? {
                if !exposed.contains(&port) {
                    exposed.push(port);
                }
            }
        }
        if self.publish_all {
            let mapped: Vec<(u16, Proto)> = specs.iter().map(|s| (s.container_port, s.proto)).collect();
            for (container_port, proto) in exposed {
                if !mapped.contains(&(container_port, proto)) {
                    specs.push(PortSpec { host_ip: None, host_ports: None, container_port, proto });
                }
            }
        }
        Ok(specs)
    }

    /// The HTTP proxy configuration of the flags (and, with `--proxy-from-env`, the environment).
    pub fn proxy_config(&self) -> anyhow::Result<usernet_core::services::proxy::ProxyConfig> {
        use usernet_core::services::proxy::{ProxyConfig, ProxyOptions};
        let opts = ProxyOptions {
            http_proxy: self.http_proxy.clone(),
            https_proxy: self.https_proxy.clone(),
            no_proxy: self.no_proxy.clone(),
            ports: self.proxy_ports.clone(),
            from_env: self.proxy_from_env,
        };
        ProxyConfig::from_options(&opts, |k| std::env::var(k).ok()).map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Builds the network configuration; `default_mtu` differs for namespaces and VMs.
    pub fn to_config(&self, default_mtu: u32) -> anyhow::Result<NetConfig> {
        let mut cfg = NetConfig::new(self.subnet, self.mtu.unwrap_or(default_mtu));
        cfg.v6 = (!self.ipv4_only).then_some(self.subnet6);
        if cfg.v6.is_some() && cfg.mtu < 1280 {
            // IPv6 needs links of at least 1280 bytes (RFC 8200 section 5); Linux turns it
            // off on a smaller one.
            if self.ipv6_only {
                anyhow::bail!("--ipv6-only needs an MTU of at least 1280 (IPv6's minimum), not {}", cfg.mtu);
            }
            tracing::warn!("--mtu {} is below IPv6's minimum of 1280: the network is IPv4-only", cfg.mtu);
            cfg.v6 = None;
        }
        cfg.ipv4 = !self.ipv6_only;
        cfg.host_loopback = !self.no_host_loopback;
        cfg.limits = self.limits.to_limits();
        let mut allow_domains: Vec<String> = Vec::new();
        for d in &self.allow_domain {
            if !allow_domains.contains(d) {
                allow_domains.push(d.clone());
            }
        }
        let rules = Rules { allow: self.allow.clone(), deny: self.deny.clone(), allow_domains };
        if !rules.is_empty() {
            tracing::info!("egress policy: {}", policy::describe(&rules));
        }
        cfg.policy = std::sync::Arc::new(Policy::new(rules));
        let host_gateway = cfg.host_addresses();
        for spec in &self.add_host {
            cfg.extra_hosts.extend(parse_add_host(spec, &host_gateway)?);
        }
        let search = self.fixed_search();
        if self.dns_upstream.is_empty() {
            let path = std::path::Path::new(RESOLV_CONF);
            cfg.host_dns.set_upstreams(dns_watch::upstreams_from_file(path, search.as_deref()));
        } else {
            let fixed = Upstreams::command_line(self.dns_upstream.clone());
            cfg.host_dns.set_upstreams(Upstreams { search: search.unwrap_or_default(), ..fixed });
        }
        let loopback_to = cfg.host_loopback.then_some(cfg.host);
        cfg.host_dns.set_hosts(dns_watch::hosts_from_file(std::path::Path::new(dns_watch::HOSTS), loopback_to));
        Ok(cfg)
    }

    /// `--dns-search`'s domains, which stand instead of the host's (`.` stands for none);
    /// None when not given.
    pub fn fixed_search(&self) -> Option<Vec<String>> {
        (!self.dns_search.is_empty()).then(|| self.dns_search.iter().filter(|d| *d != ".").cloned().collect())
    }

    /// Starts following the host's resolv.conf (unless `--dns-upstream` was given) and
    /// /etc/hosts into `cfg.host_dns`. Call after any fork: this starts a thread.
    pub fn start_dns_watch(&self, cfg: &NetConfig) -> anyhow::Result<DnsWatch> {
        let forked = self.fork_dns_watch(cfg)?;
        forked.begin(cfg.host_dns.clone()).map(|p| p.finish(None)).map_err(dns_watch_error)
    }

    /// The first step of [`NetOpts::start_dns_watch`]: the follower forked from the calling
    /// thread (which it dies with), no thread started. `usernet run` forks it while it waits
    /// for its sandbox; `ForkedWatch::begin` starts the thread, and `PendingWatch::finish`
    /// takes `run`'s guest's resolv.conf, which then follows the host's search domains and
    /// options (it stays as it is with `--dns-upstream`).
    pub fn fork_dns_watch(&self, cfg: &NetConfig) -> anyhow::Result<ForkedWatch> {
        let spec = WatchSpec {
            resolv_conf: self.dns_upstream.is_empty().then(|| RESOLV_CONF.into()),
            search: self.fixed_search(),
            hosts: Some(dns_watch::HOSTS.into()),
            host_addr: cfg.host_loopback.then_some(cfg.host),
            interval: dns_watch::POLL_INTERVAL,
        };
        DnsWatch::fork(spec).map_err(dns_watch_error)
    }
}

/// How a DNS watcher that could not start is reported.
pub fn dns_watch_error(e: std::io::Error) -> anyhow::Error {
    anyhow::anyhow!("cannot follow the host's DNS configuration: {e}")
}

/// Binds the host sockets of every spec, all or nothing, before any guest runs. Whenever
/// the host port was picked (none given, 0, a range, `-P`), prints where on stderr, one
/// `docker port` line per address (`80/tcp -> 0.0.0.0:49153`).
pub fn bind_published(specs: &[PortSpec]) -> Result<Vec<BoundListener>, BindError> {
    let mut bound = Vec::new();
    let mut lines = Vec::new();
    for s in specs {
        let listeners = listen::bind(s)?;
        if s.picks_port() {
            lines.extend(listeners.iter().map(|l| listen::docker_port_line(s.container_port, s.proto, l.local)));
        }
        bound.extend(listeners);
    }
    // Printed only once everything is bound: a failure prints nothing but its error.
    for line in lines {
        eprintln!("{line}");
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Line {
        #[command(flatten)]
        net: NetOpts,
    }

    /// `--subnet` as the command line takes it: the subnet, or clap's error (which
    /// crates/usernet/src/main.rs turns into exit 125).
    fn subnet(value: &str) -> Result<Ipv4Subnet, clap::Error> {
        use clap::Parser;
        Line::try_parse_from(["usernet", "--subnet", value]).map(|l| l.net.subnet)
    }

    /// `--subnet` needs room for the gateway .1, the guest .2 and the host .254: /24 at the
    /// longest; and a network a guest can have (no loopback, multicast ...).
    #[test]
    fn subnet_flag() {
        for (ok, network, prefix) in [
            ("10.9.8.0/24", Ipv4Addr::new(10, 9, 8, 0), 24),
            ("172.16.0.0/12", Ipv4Addr::new(172, 16, 0, 0), 12),
            ("192.168.7.0/24", Ipv4Addr::new(192, 168, 7, 0), 24),
            ("100.64.3.0/24", Ipv4Addr::new(100, 64, 3, 0), 24),
            ("203.0.113.0/24", Ipv4Addr::new(203, 0, 113, 0), 24),
            ("10.0.0.0/8", Ipv4Addr::new(10, 0, 0, 0), 8),
        ] {
            assert_eq!(subnet(ok).unwrap(), Ipv4Subnet { network, prefix }, "{ok}");
            let cfg = NetConfig::new(subnet(ok).unwrap(), 1500);
            let s = cfg.subnet;
            for a in [cfg.gateway, cfg.guest, cfg.host] {
                assert!(s.contains(a) && a != s.network && a != s.broadcast(), "{ok}: {a}");
            }
        }
        for (bad, why) in [
            ("10.0.0.0/25", "invalid subnet prefix: /25"),
            ("10.0.0.128/25", "invalid subnet prefix: /25"),
            ("10.0.0.0/30", "invalid subnet prefix: /30"),
            ("10.0.0.0/31", "invalid subnet prefix: /31"),
            ("10.0.0.0/7", "invalid subnet prefix: /7"),
            ("127.0.0.0/24", "loopback"),
            ("0.0.0.0/24", "0.0.0.0/8"),
            ("169.254.1.0/24", "link-local"),
            ("224.0.0.0/24", "multicast"),
            ("255.255.255.0/24", "reserved"),
        ] {
            let e = subnet(bad).unwrap_err();
            assert!(e.use_stderr(), "{bad}");
            let text = e.to_string();
            assert!(text.contains("'--subnet <CIDR>'") && text.contains(why), "{bad}: {text}");
        }
    }

    /// `--add-host` as Docker reads it: the name ends at `=` or the first `:`, an IPv6
    /// address (bracketed or not) is whole, `host-gateway` is the host; bad input names
    /// what is wrong.
    #[test]
    fn add_host_records() {
        let host = IpAddr::V4(Ipv4Addr::new(192, 168, 65, 254));
        let host6: IpAddr = "fd75:7365:726e::254".parse().unwrap();
        let one = |records: Vec<(String, IpAddr)>| {
            assert_eq!(records.len(), 1, "{records:?}");
            records.into_iter().next().unwrap()
        };
        let ok = |spec: &str| one(parse_add_host(spec, &[host, host6]).unwrap());
        let err = |spec: &str| parse_add_host(spec, &[host]).unwrap_err().to_string();
        let v6: IpAddr = "fd00::5".parse().unwrap();
        assert_eq!(ok("foo:10.1.2.3"), ("foo".into(), IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
        assert_eq!(ok("Foo.Example.:10.1.2.3").0, "foo.example");
        // host-gateway: a record for each of the host's addresses the network has.
        let gateway = |addresses: &[IpAddr]| parse_add_host("Foo:host-gateway", addresses).unwrap();
        assert_eq!(gateway(&[host, host6]), vec![("foo".into(), host), ("foo".into(), host6)]);
        assert_eq!(gateway(&[host]), vec![("foo".into(), host)]);
        assert_eq!(gateway(&[host6]), vec![("foo".into(), host6)]);
        assert_eq!(ok("bar:fd00::5"), ("bar".into(), v6));
        assert_eq!(ok("bar:[fd00::5]"), ("bar".into(), v6));
        assert_eq!(ok("bar=fd00::5"), ("bar".into(), v6));
        assert_eq!(ok("bar=[fd00::5]"), ("bar".into(), v6));
        assert_eq!(ok("bar=10.1.2.3").1, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(ok("bar:[10.1.2.3]").1, IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(ok("bar:::1").1, IpAddr::V6(std::net::Ipv6Addr::LOCALHOST));
        assert_eq!(err("foo"), "invalid argument \"foo\" for \"--add-host\" flag: want NAME:IP");
        assert_eq!(err("fd00::5=bar"), "invalid argument \"fd00::5=bar\" for \"--add-host\" flag: want NAME:IP");
        assert_eq!(
            err("foo:1.2.3"),
            "invalid argument \"foo:1.2.3\" for \"--add-host\" flag: invalid IP address: 1.2.3"
        );
        assert!(err("foo:[fd00::5").ends_with("invalid IP address: [fd00::5"));
        assert!(err("foo:[]").ends_with("invalid IP address: []"));
        assert!(err("a:b:10.1.2.3").ends_with("invalid IP address: b:10.1.2.3"));
        assert!(err(":10.1.2.3").ends_with("empty name"));
        assert!(err(".:10.1.2.3").ends_with("empty name"));
    }
}
