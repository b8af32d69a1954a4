//! pasta mode: usernet started as `pasta` (a symlink of that name, or `usernet pasta
//! ARGS...`) takes pasta's command line, attaches to or creates the namespace as pasta does,
//! goes to the background once the namespace is configured and exits when it goes away, so
//! that Podman (containers/common's libnetwork/pasta) and rootlesskit 2 use it unchanged.
//!
//! Theory of operation.
//! 1. Parse the command line as pasta does (getopt_long with a leading `+`: the first
//!    positional ends the options). What usernet cannot honour is an error naming it
//!    (exit 1), never ignored.
//! 2. The network. pasta copies the host's address, prefix, gateway and interface name into
//!    the namespace; usernet does not copy the addresses (see "Addresses" below). Without
//!    `-a`/`-n`/`-g` the namespace gets slirp4netns's layout: 10.0.2.100/24, gateway
//!    10.0.2.2 (an `-a` address without a length gets its class's, as in pasta); the
//!    interface takes the name of the host's default-route interface, as pasta's, unless
//!    `--ns-ifname`. The gateway stands for the host's 127.0.0.1 unless
//!    `--no-map-gw`; `--map-host-loopback ADDR` names the address that does instead (as in
//!    pasta: then the gateway is only the gateway; `none` maps nothing), and
//!    `--map-guest-addr ADDR` one that stands for the host's own address (on its default
//!    route). `--dns-forward ADDR` is where the gateway's DNS answers (following the host's
//!    resolv.conf as `run` does); without it there is none, as in pasta, except for `pasta
//!    -- COMMAND`, whose resolv.conf names 10.0.2.3 (see 4). IPv6 likewise on usernet's own
//!    /64: the namespace gets fd75:7365:726e::2/64 (or `-a ADDR6`'s /64) and its route via
//!    fe80::1 (or `-g ADDR6`, link-local or in the /64), ::254 stands for the host's [::1]
//!    unless `--no-map-gw` (or `--map-host-loopback ADDR6` does), DNS answers on ::1 of the
//!    /64 (or `--dns-forward`'s ADDR6), and each IPv6 address has one role but the gateway's
//!    (a DNS address that is also a host address would take every port to usernet's
//!    services). Each address option takes one address of each family, as pasta's. `-4`
//!    turns IPv6 off, `-6` IPv4.
//! 3. `--netns PATH|NAME` or PID: bind the `-t`/`-u` ports on the host first (a taken port
//!    fails here, exit 1, nothing started), attach a TAP to the namespace (entering
//!    `--userns` first, or the PID's user namespace when not root), configured with
//!    `--config-net`; then, unless `-f`, fork: the caller's process waits until the child
//!    says the network runs and exits 0 (or 1 with the child's error), while the child,
//!    in a new session, writes `-P`'s PID file, runs the engine and closes the caller's
//!    stdout and stderr (which Podman reads until they close). The child exits when the
//!    namespace file is removed or unmounted (or PID exits), on SIGINT or SIGTERM.
//! 4. `pasta [OPTIONS] [--] COMMAND [ARGS]` (or no command: $SHELL): COMMAND runs in new
//!    namespaces exactly as `usernet run` runs it (its sandbox, its resolv.conf naming the
//!    DNS address, since the host's would not work inside), in the foreground; the exit
//!    status is COMMAND's.
//!
//! Addresses. usernet keeps the namespace on a private subnet instead of copying the host's
//! address, for three reasons: (a) with the host's own address inside, that address is
//! local to the namespace, so the namespace cannot reach the host's services by it (the
//! reason Podman adds `--map-guest-addr`), while a private subnet has no such ambiguity;
//! (b) a copied prefix puts the host's whole LAN on-link in the namespace, so usernet would
//! have to answer ARP for every neighbour and dial the real router's address as a plain
//! destination, where usernet's engine models one gateway that it is; (c) the host's
//! address changes under a running namespace (DHCP, Wi-Fi roaming, a VPN), which would
//! leave a copied one stale, while a private one never changes. Callers that need given
//! addresses pass them (rootlesskit passes `--address`, `--netmask`, `--gateway`), and
//! those are used exactly.
//!
//! Ports: `-t`/`-u` take pasta's specs (`none`, `[ADDR/]PORT[-LAST][:TARGET[-LAST]]`
//! lists with `~` exclusions) and `auto`, pasta's default: every port bound in the namespace
//! is published on the host as it appears; `-T`/`-U` (namespace to host) take ports of the
//! namespace's loopback or `auto`, also the default: every port bound on the host is
//! reachable on the namespace's loopback (see `forward`; `auto` leaves the ephemeral range
//! alone). Not implemented, and an error: `all`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

mod forward;

use super::getopt::{self, Opt, Positionals, flag, valued};
use super::lifecycle::{SignalSupervisor, stop_when_netns_file_gone, stop_when_process_exits};
use crate::net_opts::NetOpts;
use crate::network::{Network, start_network};
use forward::Forwarding;
use usernet_core::config::{GATEWAY_LINK_LOCAL, Ipv4Subnet, Ipv6Net, NetConfig};
use usernet_core::link::tap::Tap;
use usernet_core::pcap::PcapWriter;
use usernet_core::ports::{BoundListener, Proto};
use usernet_core::services::proxy::ProxyConfig;
use usernet_host::dns_watch;
use usernet_host::netns::Interface;
use usernet_host::netns::attach::{AttachSpec, Attached, NetnsTarget};
use usernet_host::netns::resolv;
use usernet_host::netns::sandbox::{GUEST_MAC, SandboxSpec};
use usernet_host::publish::spec::PortSpec;

/// Snap length of `--pcap` captures: whole frames.
const PCAP_SNAPLEN: u32 = 262_144;

const USAGE: &str = "Usage: pasta [OPTION]... [COMMAND] [ARGS]...
       pasta [OPTION]... PID
       pasta [OPTION]... --netns [PATH|NAME]

Without PID or --netns, run the given command or a
default shell in a new network and user namespace, and
connect it via pasta (usernet).
";

const HELP: &str = "
  -d, --debug		Be verbose
      --trace		Be extra verbose, implies --debug
  -q, --quiet		Don't print informational messages
  -f, --foreground	Don't run in background
  -e, --stderr		Log to stderr too (until in the background)
  -l, --log-file PATH	Log (only) to given file
  -h, --help		Display this help message and exit
  --version		Show version and exit
  -I, --ns-ifname NAME	namespace interface name
    default: same interface name as external one
  -i, --interface NAME	Interface for addresses and routes
    (usernet: the external one, named in the namespace unless -I;
    its addresses and routes are not copied)
  --ns-mac-addr ADDR	Set MAC address on tap interface
  -M, --mac-addr ADDR	Use source MAC address ADDR
    default (usernet): 5a:94:ef:e4:0c:dd
  -p, --pcap FILE	Log tap-facing traffic to pcap file
  -P, --pid FILE	Write own PID to the given file
  -m, --mtu MTU	Assign MTU (default: 65520)
  -a, --address ADDR	Assign IPv4 or IPv6 address ADDR[/PREFIXLEN]
    can be specified zero to two times (for IPv4 and IPv6)
    default (usernet): 10.0.2.100 and fd75:7365:726e::2; the host's are not copied
    (usernet: an IPv6 address is in a /64)
  -n, --netmask MASK	Assign IPv4 MASK, dot-decimal or bits
    default (usernet): 24
  -g, --gateway ADDR	Pass IPv4 or IPv6 address as gateway
    default (usernet): 10.0.2.2 and fe80::1
    (usernet: an IPv6 gateway is link-local or in the /64)
  -o, --outbound ADDR	Bind to address as outbound source
    can be specified zero to two times (for IPv4 and IPv6)
  --outbound-if4 NAME	Bind to the first IPv4 address of NAME as outbound source
  --outbound-if6 NAME	Bind to the first global IPv6 address of NAME as outbound source
  -D, --dns ADDR	Use IPv4 or IPv6 address as DNS
    can be specified multiple times
    (usernet: the servers its DNS forwards to, instead of the host's
    resolv.conf's; with the --dns-forward or gateway address among them,
    the host's)
  -S, --search LIST	Space-separated list, search domains
    'none': no search list
    (usernet: given in DHCP, DHCPv6 and NDP, instead of the host's)
  --dhcp-dns, --dhcp-search
			accepted: usernet's DHCP, DHCPv6 and NDP give both
  --dns-forward ADDR	Forward DNS queries sent to ADDR
    can be specified zero to two times (for IPv4 and IPv6)
    default: don't forward DNS queries
  --dns-host ADDR	Host nameserver to direct queries to
    can be specified zero to two times (for IPv4 and IPv6)
    default: first nameserver from host's /etc/resolv.conf
  --no-map-gw		Don't map gateway address to host
  --map-host-loopback ADDR	Translate ADDR to refer to host
    loopback; can be specified zero to two times (for IPv4 and IPv6)
    default: gateway address (usernet: ::254 of the /64 for IPv6);
    none: none
  --map-guest-addr ADDR	Translate ADDR to the host's own address
    can be specified zero to two times (for IPv4 and IPv6)
  --no-dhcp		Disable DHCP server
  --no-ndp		Disable NDP responses
  --no-dhcpv6		Disable DHCPv6 server
  --no-ra		Disable router advertisements
  --no-copy-routes, --no-copy-addrs
			accepted: usernet copies neither
  -4, --ipv4-only	Enable IPv4 operation only
  -6, --ipv6-only	Enable IPv6 operation only
  -t, --tcp-ports SPEC	TCP port forwarding to namespace
    can be specified multiple times
    SPEC can be:
      'none': don't forward any ports
      a comma-separated list, optionally ranged with '-'
        and optional target ports after ':', with optional
        address specification suffixed by '/'. Examples:
        -t 22	Forward local port 22 to port 22 in netns
        -t 22:23	Forward local port 22 to port 23
        -t 22-80:32-90	Forward ports 22 to 80 to 32 to 90
        -t 192.0.2.1/5	Bind port 5 of 192.0.2.1 to namespace
        -t 5-25,~10-20	Forward ports 5 to 9, and 21 to 25
      'auto': forward all ports currently bound in namespace
    default: auto
  -u, --udp-ports SPEC	UDP port forwarding to namespace
    SPEC is as described for TCP above
    default: auto
  -T, --tcp-ns SPEC	TCP port forwarding to init namespace
    SPEC is as described above (ports of the namespace's loopback)
    default: auto
  -U, --udp-ns SPEC	UDP port forwarding to init namespace
    SPEC is as described above
    default: auto
  --userns NSPATH 	Target user namespace to join
  --netns PATH|NAME	Target network namespace to join
  --netns-only		Don't join existing user namespace
  --no-netns-quit	Don't quit if filesystem-bound target
  			network namespace is deleted
  --config-net		Configure tap interface in namespace
";

/// pasta's options (getopt_long's table), those usernet honours and those it refuses.
const OPTS: &[Opt] = &[
    flag("debug", Some('d')),
    flag("trace", None),
    flag("quiet", Some('q')),
    flag("foreground", Some('f')),
    flag("stderr", Some('e')),
    valued("log-file", Some('l')),
    flag("help", Some('h')),
    flag("version", None),
    valued("ns-ifname", Some('I')),
    valued("interface", Some('i')),
    valued("ns-mac-addr", None),
    valued("mac-addr", Some('M')),
    valued("pcap", Some('p')),
    valued("pid", Some('P')),
    valued("mtu", Some('m')),
    valued("address", Some('a')),
    valued("netmask", Some('n')),
    valued("gateway", Some('g')),
    valued("outbound", Some('o')),
    valued("outbound-if4", None),
    valued("outbound-if6", None),
    valued("dns-forward", None),
    valued("dns", Some('D')),
    valued("search", Some('S')),
    flag("dhcp-dns", None),
    flag("dhcp-search", None),
    valued("dns-host", None),
    flag("no-map-gw", None),
    valued("map-host-loopback", None),
    valued("map-guest-addr", None),
    flag("no-ndp", None),
    flag("no-dhcp", None),
    flag("no-dhcpv6", None),
    flag("no-ra", None),
    flag("no-copy-routes", None),
    flag("no-copy-addrs", None),
    flag("ipv4-only", Some('4')),
    valued("tcp-ports", Some('t')),
    valued("udp-ports", Some('u')),
    valued("tcp-ns", Some('T')),
    valued("udp-ns", Some('U')),
    valued("userns", None),
    valued("netns", None),
    flag("netns-only", None),
    flag("no-netns-quit", None),
    flag("config-net", None),
    flag("ipv6-only", Some('6')),
    // pasta's, refused by name below.
    valued("log-size", None),
    valued("runas", None),
    valued("fd", Some('F')),
    flag("no-tcp", None),
    flag("no-udp", None),
    flag("no-icmp", None),
];

/// Where the network goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// `--netns PATH|NAME` (a NAME is /run/netns/NAME).
    Netns(PathBuf),
    /// A PID: its network namespace (and user namespace when not root).
    Pid(i32),
    /// COMMAND in new namespaces.
    Command(Vec<OsString>),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub debug: bool,
    pub trace: bool,
    pub quiet: bool,
    pub foreground: bool,
    pub stderr: bool,
    pub log_file: Option<PathBuf>,
    pub ns_ifname: Option<String>,
    /// `-i`: the host's interface pasta would copy the namespace's from (usernet copies
    /// only its name, as the namespace's interface's unless `-I`).
    pub interface: Option<String>,
    pub ns_mac: Option<[u8; 6]>,
    /// `-M`: usernet's own MAC address on the link (the gateway's).
    pub mac: Option<[u8; 6]>,
    pub pcap: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub mtu: u32,
    pub address: Option<Ipv4Addr>,
    /// `-a` with an IPv6 address: the namespace's, in its /64.
    pub address6: Option<Ipv6Addr>,
    pub ipv4_only: bool,
    pub ipv6_only: bool,
    /// `--no-dhcp`: DHCP does not answer.
    pub no_dhcp: bool,
    pub prefix: Option<u8>,
    pub gateway: Option<Ipv4Addr>,
    /// `-g` with an IPv6 address: the namespace's IPv6 default route goes through it.
    pub gateway6: Option<Ipv6Addr>,
    pub outbound: Option<Ipv4Addr>,
    /// `-o` with an IPv6 address, or `--outbound-if6`'s.
    pub outbound6: Option<Ipv6Addr>,
    pub dns_forward: Option<Ipv4Addr>,
    /// `--dns-forward` with an IPv6 address.
    pub dns_forward6: Option<Ipv6Addr>,
    /// `-D`: DNS servers, in order.
    pub dns: Vec<IpAddr>,
    /// `--dns-host`: where forwarded queries go (one of each family at most).
    pub dns_host: Remap,
    /// `-S`: the search domains (`none`: Some, empty).
    pub search: Option<Vec<String>>,
    pub no_map_gw: bool,
    /// `--no-ra`, `--no-ndp`, `--no-dhcpv6`: usernet's IPv6 services on the link.
    pub ipv6_services: usernet_core::config::Ipv6Services,
    /// `--map-host-loopback`: the addresses given (`none` clears both, and sets
    /// `no_map_gw`, as in pasta).
    pub map_host_loopback: Remap,
    /// `--map-guest-addr` (`none` clears both).
    pub map_guest_addr: Remap,
    pub ports: Vec<PortSpec>,
    /// `-T` and the TCP `auto`s (see `forward`).
    pub forwarding: Forwarding,
    pub userns: Option<PathBuf>,
    pub netns_only: bool,
    pub no_netns_quit: bool,
    pub config_net: bool,
    pub target: Target,
}

/// The addresses of `--map-host-loopback` or `--map-guest-addr`: one of each family at most
/// (a second of one family replaces the first, as in pasta).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Remap {
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

impl Remap {
    /// One option's value: an address of either family ([`unicast_address`]), or `none`,
    /// which clears both (then true).
    fn set(&mut self, v: &str) -> Result<bool, String> {
        if v == "none" {
            *self = Remap::default();
            return Ok(true);
        }
        match unicast_address(v, "address to remap to host")? {
            IpAddr::V4(a) => self.v4 = Some(a),
            IpAddr::V6(a) => self.v6 = Some(a),
        }
        Ok(false)
    }
}

/// The value of `-g`, `--dns-forward`, `--map-host-loopback` or `--map-guest-addr`: an
/// address of either family that names one host (not unspecified, loopback, multicast,
/// broadcast or IPv4-mapped); else pasta's message, "Invalid `what`: value".
fn unicast_address(v: &str, what: &str) -> Result<IpAddr, String> {
    match v.parse::<IpAddr>() {
        Ok(IpAddr::V6(a))
            if !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.to_ipv4_mapped().is_some()) =>
        {
            Ok(IpAddr::V6(a))
        }
        Ok(IpAddr::V4(a)) if !(a.is_unspecified() || a.is_loopback() || a.is_multicast() || a.is_broadcast()) => {
            Ok(IpAddr::V4(a))
        }
        _ => Err(format!("Invalid {what}: {v}")),
    }
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Box<Options>),
    Help,
    Version,
}

/// The default MTU: pasta's, the largest an 802.3 frame carries, rounded to 32 bits.
const DEFAULT_MTU: u32 = 65520;

/// `-n`: dot-decimal (contiguous) or a prefix length.
fn parse_netmask(v: &str) -> Option<u8> {
    if let Ok(bits) = v.parse::<u8>() {
        return (bits <= 32).then_some(bits);
    }
    let mask = u32::from(v.parse::<Ipv4Addr>().ok()?);
    let bits = mask.leading_ones();
    (mask.checked_shl(bits).unwrap_or(0) == 0).then_some(bits as u8)
}

/// One `-t`/`-u` spec (pasta's grammar) as the ports to publish. `flag` is how it was given
/// (`-t`), for the messages.
pub fn parse_port_spec(flag: &str, spec: &str, proto: Proto) -> Result<Vec<PortSpec>, String> {
    let invalid = || format!("Invalid port specifier {spec}");
    match spec {
        "none" => return Ok(Vec::new()),
        "all" => return Err(format!("{flag} all: not supported by usernet's pasta mode (use auto or ports)")),
        "auto" => return Err(format!("{flag} auto: auto cannot be part of a list")),
        _ => {}
    }
    let (host_ip, list) = match spec.rsplit_once('/') {
        Some((addr, list)) => {
            if addr.contains('%') {
                return Err(format!("{flag} {spec}: usernet cannot bind a forwarded port to an interface (%)"));
            }
            let ip: IpAddr = addr.trim_start_matches('[').trim_end_matches(']').parse().map_err(|_| invalid())?;
            (Some(ip), list)
        }
        None => (None, spec),
    };
    let range = |s: &str| -> Result<(u16, u16), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let a: u16 = a.parse().map_err(|_| invalid())?;
        let b: u16 = b.parse().map_err(|_| invalid())?;
        if a == 0 || b < a {
            return Err(invalid());
        }
        Ok((a, b))
    };
    let mut pairs: Vec<(u16, u16)> = Vec::new();
    let mut excluded: Vec<(u16, u16)> = Vec::new();
    for item in list.split(',') {
        if let Some(ex) = item.strip_prefix('~') {
            excluded.push(range(ex)?);
            continue;
        }
        let (from, to) = item.split_once(':').unwrap_or((item, ""));
        let (first, last) = range(from)?;
        let (tfirst, tlast) = if to.is_empty() { (first, last) } else { range(to)? };
        if tlast - tfirst != last - first {
            return Err(invalid());
        }
        pairs.extend((first..=last).zip(tfirst..=tlast));
    }
    if pairs.is_empty() {
        return Err(format!("{flag} {spec}: exclusions alone mean 'all but', which usernet's pasta mode does not do"));
    }
    Ok(pairs
        .into_iter()
        .filter(|(h, _)| !excluded.iter().any(|(a, b)| (a..=b).contains(&h)))
        .map(|(h, c)| PortSpec { host_ip, host_ports: Some((h, h)), container_port: c, proto })
        .collect())
}

/// Parses pasta's command line (without the program name); a mistake is the message.
pub fn parse(args: &[OsString]) -> Result<Parsed, String> {
    let given = getopt::parse("pasta", OPTS, args, Positionals::EndOptions)?;
    let mut o = Options {
        debug: false,
        trace: false,
        quiet: false,
        foreground: false,
        stderr: false,
        log_file: None,
        ns_ifname: None,
        interface: None,
        ns_mac: None,
        mac: None,
        pcap: None,
        pid_file: None,
        mtu: DEFAULT_MTU,
        address: None,
        address6: None,
        ipv4_only: false,
        ipv6_only: false,
        no_dhcp: false,
        prefix: None,
        gateway: None,
        gateway6: None,
        outbound: None,
        outbound6: None,
        dns_forward: None,
        dns_forward6: None,
        dns: Vec::new(),
        dns_host: Remap::default(),
        search: None,
        no_map_gw: false,
        ipv6_services: usernet_core::config::Ipv6Services::default(),
        map_host_loopback: Remap::default(),
        map_guest_addr: Remap::default(),
        ports: Vec::new(),
        forwarding: Forwarding::default(),
        userns: None,
        netns_only: false,
        no_netns_quit: false,
        config_net: false,
        target: Target::Command(Vec::new()),
    };
    let mut netns: Option<String> = None;
    // pasta's rule for prefix lengths: `-a ADDR/LEN` after `-n`, or `-n` right after an
    // `-a` that had one, is redundant.
    let (mut netmask_given, mut address_had_prefix) = (false, false);
    // pasta's default for each of -t, -u, -T and -U is auto.
    let mut given_specs: std::collections::BTreeSet<&str> = Default::default();
    for (name, value) in given.options {
        let v = value.unwrap_or_default();
        match name {
            "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            "debug" => o.debug = true,
            "trace" => (o.debug, o.trace) = (true, true),
            "quiet" => o.quiet = true,
            "foreground" => o.foreground = true,
            "stderr" => o.stderr = true,
            "log-file" => o.log_file = Some(PathBuf::from(v)),
            "ns-ifname" => {
                if v.is_empty() || v.len() >= libc::IFNAMSIZ || v.contains(['/', ' ']) {
                    return Err(format!("Invalid interface name: {v}"));
                }
                o.ns_ifname = Some(v)
            }
            "ns-mac-addr" => o.ns_mac = Some(super::parse_mac(&v).ok_or_else(|| format!("Invalid MAC address: {v}"))?),
            // A group address would be no station's: the namespace's frames to it would go
            // nowhere.
            "mac-addr" => {
                o.mac = Some(
                    super::parse_mac(&v)
                        .filter(|m| m[0] & 1 == 0 && *m != [0; 6])
                        .ok_or_else(|| format!("Invalid MAC address: {v}"))?,
                )
            }
            "pcap" => o.pcap = Some(PathBuf::from(v)),
            "pid" => o.pid_file = Some(PathBuf::from(v)),
            "mtu" => {
                o.mtu = v
                    .parse::<u32>()
                    .ok()
                    .filter(|m| (576..=65520).contains(m))
                    .ok_or_else(|| format!("Invalid MTU: {v} (usernet: 576 to 65520)"))?
            }
            "address" => {
                let (addr, len) = v.split_once('/').map_or((v.as_str(), None), |(a, l)| (a, Some(l)));
                if len.is_some() && netmask_given {
                    return Err("Redundant prefix length specification".into());
                }
                address_had_prefix = len.is_some();
                match addr.parse::<IpAddr>() {
                    Ok(IpAddr::V6(a)) if len.is_none_or(|l| l == "64") => o.address6 = Some(a),
                    Ok(IpAddr::V6(_)) => return Err(format!("-a {v}: usernet gives the namespace a /64")),
                    Ok(IpAddr::V4(a)) => {
                        o.address = Some(a);
                        if let Some(l) = len {
                            let bits = l.parse::<u8>().ok().filter(|b| *b <= 32);
                            o.prefix = Some(bits.ok_or_else(|| format!("Invalid prefix length: {v}"))?);
                        }
                    }
                    Err(_) => return Err(format!("Invalid address: {v}")),
                }
            }
            "netmask" => {
                if address_had_prefix {
                    return Err("Redundant prefix length specification".into());
                }
                o.prefix = Some(parse_netmask(&v).ok_or_else(|| format!("Invalid netmask: {v}"))?);
                netmask_given = true;
            }
            "gateway" => match unicast_address(&v, "gateway address")? {
                IpAddr::V4(a) => o.gateway = Some(a),
                IpAddr::V6(a) => o.gateway6 = Some(a),
            },
            "outbound" => match v.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if !(a.is_unspecified() || a.is_broadcast() || a.is_multicast()) => {
                    o.outbound = Some(a)
                }
                // (A link-local address binds only with an interface, which -o does not give.)
                Ok(IpAddr::V6(a)) if super::usable_outbound6(a) => o.outbound6 = Some(a),
                _ => return Err(format!("Invalid or redundant outbound address: {v}")),
            },
            "outbound-if6" => {
                o.outbound6 =
                    Some(super::interface_ipv6(&v).ok_or_else(|| format!("No global IPv6 address on interface {v}"))?)
            }
            "outbound-if4" => {
                o.outbound = Some(super::interface_ipv4(&v).ok_or_else(|| format!("No IPv4 address on interface {v}"))?)
            }
            "dns-forward" => match unicast_address(&v, "DNS forwarding address")? {
                IpAddr::V4(a) => o.dns_forward = Some(a),
                IpAddr::V6(a) => o.dns_forward6 = Some(a),
            },
            "dns" if v == "none" => {
                return Err("-D none: not supported by usernet's pasta mode (its DNS answers at the \
                            --dns-forward address; -D ADDR names the servers it forwards to)"
                    .into());
            }
            "dns" => o.dns.push(v.parse::<IpAddr>().map_err(|_| format!("Cannot use DNS address {v}"))?),
            "dns-host" => match v.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if !a.is_unspecified() && !a.is_broadcast() => o.dns_host.v4 = Some(a),
                Ok(IpAddr::V6(a)) if !a.is_unspecified() => o.dns_host.v6 = Some(a),
                _ => return Err(format!("Invalid host nameserver address: {v}")),
            },
            "search" if v == "none" => o.search = Some(Vec::new()),
            "search" => {
                let list = o.search.get_or_insert_with(Vec::new);
                for d in v.split_whitespace() {
                    list.push(
                        crate::net_opts::parse_dns_search(d)
                            .ok()
                            .filter(|d| d != ".")
                            .ok_or_else(|| format!("Cannot use DNS search domain {d}"))?,
                    );
                }
            }
            // usernet's DHCP, DHCPv6 and NDP give the DNS address and the search list
            // unless turned off (--no-dhcp, ...): pasta's off-by-default is not kept.
            "dhcp-dns" | "dhcp-search" => {}
            "no-map-gw" => o.no_map_gw = true,
            "map-host-loopback" => {
                if o.map_host_loopback.set(&v)? {
                    o.no_map_gw = true;
                }
            }
            "map-guest-addr" => {
                o.map_guest_addr.set(&v)?;
            }
            "no-ra" => o.ipv6_services.router_adverts = false,
            "no-ndp" => o.ipv6_services.neighbour_adverts = false,
            "no-dhcpv6" => o.ipv6_services.dhcpv6 = false,
            // usernet never copies addresses or routes: honoured as they are.
            "no-copy-routes" | "no-copy-addrs" => {}
            // The last of -4 and -6 counts, as in pasta.
            "ipv4-only" => (o.ipv4_only, o.ipv6_only) = (true, false),
            "ipv6-only" => (o.ipv4_only, o.ipv6_only) = (false, true),
            "no-dhcp" => o.no_dhcp = true,
            "interface" => {
                if nix::net::if_::if_nametoindex(v.as_str()).is_err() {
                    return Err(format!("Invalid interface name {v}: No such device"));
                }
                o.interface = Some(v)
            }
            "tcp-ports" | "udp-ports" | "tcp-ns" | "udp-ns" => {
                let proto = if name.starts_with("tcp") { Proto::Tcp } else { Proto::Udp };
                let to_host = name.ends_with("-ns");
                let flag = match (proto, to_host) {
                    (Proto::Tcp, false) => "-t",
                    (Proto::Udp, false) => "-u",
                    (Proto::Tcp, true) => "-T",
                    (Proto::Udp, true) => "-U",
                };
                given_specs.insert(flag);
                if v == "auto" {
                    let autos = if to_host { &mut o.forwarding.to_host_auto } else { &mut o.forwarding.to_ns_auto };
                    if !autos.contains(&proto) {
                        autos.push(proto);
                    }
                    continue;
                }
                let specs = parse_port_spec(flag, &v, proto)?;
                if !to_host {
                    o.ports.extend(specs);
                } else if specs.iter().any(|s| s.host_ip.is_some()) {
                    return Err(format!("{flag} {v}: usernet binds {flag} ports on the namespace's loopback only"));
                } else {
                    o.forwarding
                        .to_host
                        .extend(specs.iter().map(|s| (proto, s.host_ports.map_or(0, |p| p.0), s.container_port)));
                }
            }
            "userns" => o.userns = Some(PathBuf::from(v)),
            "netns" => netns = Some(v),
            "netns-only" => o.netns_only = true,
            "no-netns-quit" => o.no_netns_quit = true,
            "config-net" => o.config_net = true,
            other => return Err(format!("--{other}: not supported by usernet's pasta mode")),
        }
    }
    // usernet's link takes no frame from its own address: the namespace's would all be lost.
    if let Some(m) = o.mac
        && m == o.ns_mac.unwrap_or(GUEST_MAC)
    {
        let m: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
        return Err(format!("-M {}: that is the namespace's own MAC address (--ns-mac-addr)", m.join(":")));
    }
    if o.ipv6_only && o.mtu < 1280 {
        return Err(format!("--ipv6-only needs an MTU of at least 1280 (IPv6's minimum), not {}", o.mtu));
    }
    check_ipv6_addresses(&o)?;
    // With -4 or -6 a port is bound on the host in that family only, as pasta binds it.
    let one_family = match (o.ipv4_only, o.ipv6_only) {
        (true, _) => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        (_, true) => Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        _ => None,
    };
    for spec in o.ports.iter_mut().filter(|s| s.host_ip.is_none()) {
        spec.host_ip = one_family;
    }
    o.forwarding.to_ns_host_ip = one_family;
    for (flag, proto, to_host) in
        [("-t", Proto::Tcp, false), ("-u", Proto::Udp, false), ("-T", Proto::Tcp, true), ("-U", Proto::Udp, true)]
    {
        let autos = if to_host { &mut o.forwarding.to_host_auto } else { &mut o.forwarding.to_ns_auto };
        if !given_specs.contains(flag) && !autos.contains(&proto) {
            autos.push(proto);
        }
    }
    let mut positionals = given.positionals;
    o.target = match netns {
        Some(n) => {
            if !positionals.is_empty() {
                return Err("Both --netns and PID or command given".into());
            }
            let path = if n.contains('/') {
                PathBuf::from(n)
            } else {
                Path::new(usernet_host::netns::attach::NETNS_RUN_DIR).join(n)
            };
            Target::Netns(path)
        }
        None if positionals.len() == 1 && positionals[0].to_string_lossy().bytes().all(|b| b.is_ascii_digit()) => {
            let pid = positionals.remove(0).to_string_lossy().parse::<i32>().ok().filter(|p| *p > 0);
            Target::Pid(pid.ok_or("Invalid PID")?)
        }
        None => Target::Command(positionals),
    };
    Ok(Parsed::Run(Box::new(o)))
}

/// The host's IPv4 default route: its interface and that interface's first address
/// (`/proc/net/route`, lowest metric).
fn default_route() -> Option<(String, Option<Ipv4Addr>)> {
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    let (ifname, _) = text
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            (f.len() >= 8 && f[1] == "00000000" && f[7] == "00000000")
                .then(|| (f[0].to_string(), f[6].parse::<u32>().unwrap_or(u32::MAX)))
        })
        .min_by_key(|(_, metric)| *metric)?;
    let addr = super::interface_ipv4(&ifname);
    Some((ifname, addr))
}

/// The host's own IPv6 address on its IPv6 default route (`/proc/net/ipv6_route`, lowest
/// metric, not a reject route): that interface's first global address.
fn default_route6_address() -> Option<Ipv6Addr> {
    let text = std::fs::read_to_string("/proc/net/ipv6_route").ok()?;
    let (ifname, _) = text
        .lines()
        .filter_map(|l| {
            // dest plen src plen nexthop metric refcnt use flags ifname, in hex
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            let default = f[0].bytes().all(|b| b == b'0') && f[1] == "00";
            (default && flags & 0x0200 == 0 && f[9] != "lo")
                .then(|| (f[9].to_string(), u32::from_str_radix(f[5], 16).unwrap_or(u32::MAX)))
        })
        .min_by_key(|(_, metric)| *metric)?;
    super::interface_ipv6(&ifname)
}

/// The namespace's interface and address.
fn interface(o: &Options) -> Interface {
    let address = o.address.unwrap_or(Ipv4Addr::new(10, 0, 2, 100));
    // pasta's: an address given without a length (`-n`, `-a ADDR/LEN`) gets its class's.
    let prefix = o.prefix.unwrap_or_else(|| o.address.map_or(24, class_prefix));
    let subnet = Ipv4Subnet { network: address, prefix };
    let gateway = o.gateway.unwrap_or_else(|| {
        let two = subnet.host(2);
        if two == address { subnet.host(1) } else { two }
    });
    let ifname = o
        .ns_ifname
        .clone()
        .or_else(|| o.interface.clone())
        .or_else(|| default_route().map(|(name, _)| name))
        .unwrap_or("eth0".into());
    Interface {
        ifname,
        mac: o.ns_mac.unwrap_or(GUEST_MAC),
        ipv4: !o.ipv6_only,
        address,
        prefix,
        gateway,
        mtu: o.mtu,
        // IPv6 needs an MTU of 1280 (RFC 8200); below, the network is IPv4-only.
        ipv6: ipv6_on(o).then(|| (ipv6_net(o).guest, o.gateway6.unwrap_or(GATEWAY_LINK_LOCAL))),
    }
}

/// The prefix length of `a`'s address class (A /8, B /16, C /24), as pasta gives an address
/// without one; 24 past class C, whose addresses are multicast (refused) or reserved.
fn class_prefix(a: Ipv4Addr) -> u8 {
    match a.octets()[0] {
        0..=127 => 8,
        128..=191 => 16,
        _ => 24,
    }
}

/// IPv6 needs an MTU of 1280 (RFC 8200); below, the network is IPv4-only.
fn ipv6_on(o: &Options) -> bool {
    !o.ipv4_only && o.mtu >= 1280
}

/// The namespace's IPv6 network: usernet's /64, or `-a ADDR6`'s with ADDR6 as the guest;
/// `-g ADDR6` is its gateway, `--dns-forward ADDR6` its DNS address (else ::1 of the /64,
/// a global address a resolv.conf can name), `--map-host-loopback ADDR6` its host address
/// (else ::254).
fn ipv6_net(o: &Options) -> Ipv6Net {
    let mut net = match o.address6 {
        Some(a) => Ipv6Net { guest: a, ..Ipv6Net::new(a) },
        None => Ipv6Net::default(),
    };
    net.gateway = o.gateway6.unwrap_or(net.gateway);
    net.dns = o.dns_forward6.unwrap_or(net.dns);
    net.host = o.map_host_loopback.v6.unwrap_or(net.host);
    net
}

/// The IPv6 addresses given must make a network usernet can serve: the gateway is where
/// the namespace's route goes (link-local, or in the /64, where the kernel finds it on the
/// link), and none of them is the namespace's own address.
fn check_ipv6_addresses(o: &Options) -> Result<(), String> {
    if !ipv6_on(o) {
        return Ok(());
    }
    let net = ipv6_net(o);
    if let Some(g) = o.gateway6
        && !g.is_unicast_link_local()
        && !net.contains(g)
    {
        return Err(format!(
            "-g {g}: usernet's IPv6 gateway is a link-local address or one of the namespace's /64 ({}/64)",
            net.prefix
        ));
    }
    // Each address has one role, but the gateway's, which may be the DNS's too (::1 is
    // both by default) or stand for the host (pasta's mapping of its gateway). A DNS address
    // that is also a host address would take every port to usernet's services.
    // (what gives it, the address, whether the gateway may have it too)
    let roles = [
        ("-a (the namespace's own)", Some(net.guest), false),
        ("--dns-forward (::1 of the /64 unless given)", Some(net.dns), true),
        ("--map-host-loopback (::254 of the /64 unless given)", Some(net.host), true),
        ("--map-guest-addr", o.map_guest_addr.v6, true),
    ];
    let both = |a: Ipv6Addr, first: &str, second: &str| {
        Err(format!("{a} is both {first} and {second}: give one of them another address"))
    };
    for (i, &(first, a, gateway_may)) in roles.iter().enumerate() {
        let Some(a) = a else { continue };
        if let Some((second, ..)) = roles[i + 1..].iter().find(|(_, b, _)| *b == Some(a)) {
            return both(a, first, second);
        }
        if o.gateway6 == Some(a) && !gateway_may {
            return both(a, first, "-g");
        }
    }
    Ok(())
}

/// usernet's network options as pasta's command line sets them: defaults (DNS following
/// the host's resolv.conf and /etc/hosts), with `--pcap`, and the DNS servers and search
/// domains of `--dns-host`, `-D` and `-S`.
fn net_opts(o: &Options) -> NetOpts {
    let mut net = NetOpts::defaults();
    net.mtu = Some(o.mtu);
    net.pcap = o.pcap.clone();
    net.dns_upstream = dns_servers(o).into_iter().map(|a| SocketAddr::new(a, 53)).collect();
    net.dns_search = match &o.search {
        Some(list) if list.is_empty() => vec![".".into()],
        Some(list) => list.clone(),
        None => Vec::new(),
    };
    net
}

/// The servers usernet's DNS forwards to, when the command line names them: `--dns-host`'s
/// (where pasta sends forwarded queries), else `-D`'s, unless one of them is an address of
/// the namespace's own network that usernet's DNS answers at (the `--dns-forward` address, the
/// gateway): that tells the namespace to use usernet's DNS itself, which then forwards as
/// pasta's does, to the host's resolvers. Empty: the host's resolv.conf's.
fn dns_servers(o: &Options) -> Vec<IpAddr> {
    let hosts: Vec<IpAddr> = o.dns_host.v4.map(IpAddr::V4).into_iter().chain(o.dns_host.v6.map(IpAddr::V6)).collect();
    if !hosts.is_empty() {
        return hosts;
    }
    let iface = interface(o);
    let own = |a: &IpAddr| match *a {
        IpAddr::V4(a) => Some(a) == o.dns_forward || a == iface.gateway,
        IpAddr::V6(a) => {
            let net = ipv6_net(o);
            a == net.dns || a == net.gateway || a.is_unicast_link_local()
        }
    };
    if o.dns.iter().any(own) {
        return Vec::new();
    }
    let mut servers: Vec<IpAddr> = Vec::new();
    for a in &o.dns {
        if !servers.contains(a) {
            servers.push(*a);
        }
    }
    servers
}

/// pasta's network for these options (the theory of operation, 2).
pub fn network_config(o: &Options, iface: &Interface, net: &NetOpts) -> anyhow::Result<NetConfig> {
    let mut cfg = net.to_config(o.mtu)?;
    cfg.v6 = iface.ipv6.map(|_| ipv6_net(o));
    cfg.ipv4 = iface.ipv4;
    let prefix = iface.prefix.clamp(8, 30);
    cfg.subnet = Ipv4Subnet { network: Ipv4Addr::from(u32::from(iface.address) & !(u32::MAX >> prefix)), prefix };
    cfg.guest = iface.address;
    cfg.gateway = iface.gateway;
    // The gateway stands for the host, reaching its loopback unless --no-map-gw, or unless
    // --map-host-loopback names another address for that (as in pasta: then the gateway is
    // only the gateway).
    cfg.host = o.map_host_loopback.v4.unwrap_or(iface.gateway);
    cfg.host_loopback = !o.no_map_gw;
    cfg.ipv6_services = o.ipv6_services;
    cfg.dhcp = !o.no_dhcp;
    cfg.dns = o.dns_forward;
    if matches!(o.target, Target::Command(_)) && cfg.dns.is_none() {
        let free = (3..254).map(|n| cfg.subnet.host(n)).find(|a| *a != cfg.guest && *a != cfg.gateway);
        cfg.dns = free;
    }
    cfg.outbound_addr = o.outbound;
    cfg.outbound_addr6 = o.outbound6;
    cfg.gateway_mac = o.mac.unwrap_or(cfg.gateway_mac);
    // An address given to --map-host-loopback reaches the host's loopback even with
    // --no-map-gw, which is about the gateway's (as in pasta).
    if let Some(a) = o.map_host_loopback.v4 {
        cfg.host_aliases.push((a, Ipv4Addr::LOCALHOST));
    }
    if let Some(a) = o.map_guest_addr.v4 {
        match default_route().and_then(|(_, addr)| addr) {
            Some(host) => cfg.host_aliases.push((a, host)),
            None => tracing::warn!("--map-guest-addr {a}: the host has no IPv4 default route; {a} reaches nothing"),
        }
    }
    if cfg.v6.is_some() {
        if let Some(a) = o.map_host_loopback.v6 {
            cfg.host_aliases6.push((a, Ipv6Addr::LOCALHOST));
        }
        if let Some(a) = o.map_guest_addr.v6 {
            match default_route6_address() {
                Some(host) => cfg.host_aliases6.push((a, host)),
                None => tracing::warn!(
                    "--map-guest-addr {a}: the host has no IPv6 default route with a global address; {a} reaches nothing"
                ),
            }
        }
    }
    // host.docker.internal and host.containers.internal name an address that reaches the
    // host: the host address, unless --no-map-gw closed it (then what --map-host-loopback or
    // --map-guest-addr gave, as Podman's /etc/hosts does with the latter; without them the
    // host's own address on its default route, reached as any address outside the
    // namespace, which Podman 5.0 to 5.2's /etc/hosts gives), in each family.
    if o.no_map_gw {
        let first4 = cfg.host_aliases.first().map(|(a, _)| *a).or_else(|| default_route().and_then(|(_, a)| a));
        let first6 = cfg.host_aliases6.first().map(|(a, _)| *a).or_else(default_route6_address);
        let first4 = first4.filter(|_| cfg.ipv4).map(IpAddr::V4);
        let first6 = first6.filter(|_| cfg.v6.is_some()).map(IpAddr::V6);
        for alias in first4.into_iter().chain(first6) {
            cfg.extra_hosts.extend(usernet_core::config::HOST_NAMES.iter().map(|n| (n.to_string(), alias)));
        }
    }
    // /etc/hosts' loopback names stand for the host address.
    let loopback_to = cfg.host_loopback.then_some(cfg.host);
    cfg.host_dns.set_hosts(dns_watch::hosts_from_file(Path::new(dns_watch::HOSTS), loopback_to));
    Ok(cfg)
}

/// Entry point: the exit status.
pub fn main(args: &[OsString]) -> i32 {
    let o = match parse(args) {
        Ok(Parsed::Help) => {
            crate::init_logging("warn");
            print!("{USAGE}{HELP}");
            return 0;
        }
        Ok(Parsed::Version) => {
            println!("pasta (usernet {})", env!("USERNET_VERSION"));
            return 0;
        }
        Ok(Parsed::Run(o)) => o,
        Err(message) => {
            eprintln!("{message}");
            eprint!("{USAGE}");
            return 1;
        }
    };
    crate::init_logging(if o.trace {
        "trace"
    } else if o.debug {
        "debug"
    } else if o.quiet {
        "error"
    } else {
        "warn"
    });
    match run(&o) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pasta (usernet): {e:#}");
            1
        }
    }
}

fn run(o: &Options) -> anyhow::Result<i32> {
    let iface = interface(o);
    let net = net_opts(o);
    let cfg = Arc::new(network_config(o, &iface, &net)?);
    let pcap = match &o.pcap {
        Some(path) => {
            Some(PcapWriter::create(path, PCAP_SNAPLEN).with_context(|| format!("cannot create {}", path.display()))?)
        }
        None => None,
    };
    let log_file = match &o.log_file {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?,
        ),
        None => None,
    };
    // Bound before anything starts: a taken port is one line and exit 1.
    let listeners = usernet_host::publish::listen::bind_all(&o.ports)
        .map_err(|e| anyhow::anyhow!("Failed to bind forwarded port: {e}"))?;

    if let Target::Command(command) = &o.target {
        let command = if command.is_empty() {
            vec![std::env::var_os("SHELL").unwrap_or_else(|| "/bin/sh".into())]
        } else {
            command.clone()
        };
        if let Some(path) = &o.pid_file {
            write_pid_file(path)?;
        }
        let dns: IpAddr = match (&cfg.v6, cfg.ipv4) {
            (Some(v6), false) => v6.dns.into(),
            _ => cfg.dns.unwrap_or(cfg.gateway).into(),
        };
        let cfg_guest = cfg.first_guest();
        let upstreams = cfg.host_dns.upstreams();
        let spec = SandboxSpec {
            iface,
            resolv_conf: resolv::render_guest(dns, &upstreams.search, upstreams.options.ndots),
            queues: 1,
        };
        return crate::run::execute(crate::run::Launch {
            net: &net,
            cfg,
            pcap,
            listeners,
            web: None,
            spec,
            command: &command,
            no_engine: false,
            with_engine: (!o.forwarding.is_empty()).then(|| {
                let (forwarding, guest) = (o.forwarding.clone(), cfg_guest);
                Box::new(move |control, netns| forward::start(forwarding, netns, control, guest))
                    as crate::run::WithEngine<'_>
            }),
            register: false,
        });
    }

    let target = match &o.target {
        Target::Netns(path) => NetnsTarget::Path(path.clone()),
        Target::Pid(pid) => NetnsTarget::Pid(*pid),
        Target::Command(_) => unreachable!("handled above"),
    };
    let spec = AttachSpec {
        target: target.clone(),
        // --netns-only: stay in our user namespace even for a PID.
        userns: o.userns.clone().or_else(|| {
            (o.netns_only && matches!(target, NetnsTarget::Pid(_))).then(|| PathBuf::from("/proc/self/ns/user"))
        }),
        configure: o.config_net,
        iface: iface.clone(),
    };
    // Attaching forks: it must happen while usernet is single-threaded.
    let attached = usernet_host::netns::attach::attach(&spec)?;
    // Rootless, the namespace belongs to a user namespace of the caller's (rootlesskit's child,
    // `unshare -rn`): join it now, while single-threaded (the kernel's rule), so that usernet's
    // threads may enter the namespace (loopback clients' sockets, `-T` and `auto`). Root keeps
    // its own: it may enter any namespace, and binds privileged host ports.
    if !nix::unistd::geteuid().is_root()
        && let Some(path) = spec.userns.clone().or_else(|| match &target {
            NetnsTarget::Pid(pid) => Some(PathBuf::from(format!("/proc/{pid}/ns/user"))),
            NetnsTarget::Path(_) => None,
        })
        && let Err(e) = join_user_namespace(&path)
    {
        tracing::info!("cannot join the user namespace {}: {e}", path.display());
    }

    let ready = if o.foreground { None } else { Some(daemonize()?) };
    let served = serve(o, &cfg, &net, attached, pcap, listeners, &iface, &target, ready, log_file);
    if let Err(e) = &served {
        tracing::error!("{e:#}");
    }
    served
}

/// Enters the user namespace at `path` (only while single-threaded).
fn join_user_namespace(path: &Path) -> anyhow::Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    if std::fs::read_link(path)? == std::fs::read_link("/proc/self/ns/user")? {
        return Ok(());
    }
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWUSER).map_err(|e| anyhow::anyhow!("{}", e.desc()))
}

/// Writes our PID to `path` (pasta's `-P`).
fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    std::fs::write(path, format!("{}\n", std::process::id()))
        .with_context(|| format!("cannot write PID file {}", path.display()))
}

/// Goes to the background: forks; the caller's process waits for the child's word and
/// exits 0 when it comes (1, or the child's status, when the child ends without it). The
/// child, in a new session, gets the write end to report readiness on.
fn daemonize() -> anyhow::Result<OwnedFd> {
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    // SAFETY: usernet is single-threaded here (nothing has started a thread yet), so the
    // child may go on running Rust code.
    match unsafe { nix::unistd::fork() }.context("fork")? {
        nix::unistd::ForkResult::Child => {
            drop(read_end);
            let _ = nix::unistd::setsid();
            Ok(write_end)
        }
        nix::unistd::ForkResult::Parent { child } => {
            drop(write_end);
            let mut word = [0u8; 1];
            let mut f = std::fs::File::from(read_end);
            let code = match f.read(&mut word) {
                Ok(1) => 0,
                _ => match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, c)) if c != 0 => c,
                    _ => 1,
                },
            };
            std::process::exit(code);
        }
    }
}

/// Points descriptors 0, 1 and 2 away from the caller's: /dev/null, and the log file for
/// 2 when there is one. `--stderr` does not keep 2, as pasta's does not once in the
/// background: callers read its output to the end (rootlesskit 2, which always passes
/// `--stderr`, and containers/common, by Go's `CombinedOutput`), so a descriptor kept would
/// hold them until the namespace is gone.
fn detach_stdio(log_file: Option<std::fs::File>) -> anyhow::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").context("/dev/null")?;
    let err_to = log_file.as_ref().map_or(null.as_raw_fd(), |f| f.as_raw_fd());
    for (fd, to) in [(0, null.as_raw_fd()), (1, null.as_raw_fd()), (2, err_to)] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns.
        if unsafe { libc::dup2(to, fd) } < 0 {
            return Err(std::io::Error::last_os_error()).context("redirecting standard descriptors");
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn serve(
    o: &Options,
    cfg: &Arc<NetConfig>,
    net: &NetOpts,
    attached: Attached,
    pcap: Option<PcapWriter>,
    listeners: Vec<BoundListener>,
    iface: &Interface,
    target: &NetnsTarget,
    ready: Option<OwnedFd>,
    log_file: Option<std::fs::File>,
) -> anyhow::Result<i32> {
    let mut sup = SignalSupervisor::new()?;
    if let Some(path) = &o.pid_file {
        write_pid_file(path)?;
    }
    let tap = Tap::from_fd(attached.tap).context("TAP device")?;
    // Follows the host's resolv.conf and /etc/hosts (a thread: after the fork above).
    let _dns_watch = net.start_dns_watch(cfg).map_err(|e| tracing::warn!("{e:#}")).ok();
    let Network { mut engine, proxy_hook, .. } = start_network(cfg, ProxyConfig::default(), pcap, Some(Box::new(tap)))?;
    engine.add_tcp_hook(proxy_hook);
    engine.add_static_lease(iface.mac, cfg.guest);
    if o.config_net {
        // usernet set the interface's MAC itself: no ARP before the first forwarded frame.
        engine.set_guest_mac(iface.mac, cfg.guest);
        if let Some((ip6, _)) = iface.ipv6 {
            engine.set_guest_ipv6(iface.mac, cfg.guest, ip6);
        }
    }
    engine.stop_without_links();
    if !o.forwarding.is_empty() {
        let netns = attached.netns.try_clone().context("namespace descriptor")?;
        forward::start(o.forwarding.clone(), netns, engine.control_handle()?, cfg.first_guest())?;
    }
    if let Err(e) = engine.set_guest_netns(attached.netns) {
        tracing::info!("loopback clients of forwarded ports go through the TAP: {e}");
    }
    for p in engine.publish(listeners, cfg.first_guest()) {
        tracing::debug!("forwarding {}/{} from {}", p.guest_port, p.proto, p.host);
    }
    match target {
        NetnsTarget::Path(path) if !o.no_netns_quit => stop_when_netns_file_gone(path.clone())?,
        NetnsTarget::Path(_) => {}
        NetnsTarget::Pid(pid) => stop_when_process_exits(*pid)?,
    }
    if let Some(ready) = ready {
        detach_stdio(log_file)?;
        let _ = std::fs::File::from(ready).write_all(b"1");
    } else if let Some(f) = log_file {
        // SAFETY: dup2 onto descriptor 2, which this process owns.
        unsafe { libc::dup2(f.as_raw_fd(), 2) };
    }
    crate::network::confine(net.no_sandbox);
    engine.run(&mut sup).context("network engine failed")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn run_opts(s: &str) -> Options {
        match parse(&args(s)) {
            Ok(Parsed::Run(o)) => *o,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn ports(o: &Options) -> Vec<(Option<IpAddr>, u16, u16, Proto)> {
        o.ports.iter().map(|p| (p.host_ip, p.host_ports.unwrap().0, p.container_port, p.proto)).collect()
    }

    #[test]
    fn ipv6_services_turned_off_by_name() {
        use usernet_core::config::Ipv6Services;
        let o = run_opts("--config-net --netns /run/netns/x");
        assert_eq!(o.ipv6_services, Ipv6Services::default());
        let o = run_opts("--config-net --no-ra --no-dhcpv6 --netns /run/netns/x");
        assert_eq!(o.ipv6_services, Ipv6Services { router_adverts: false, neighbour_adverts: true, dhcpv6: false });
        let o = run_opts("--no-ndp --netns /run/netns/x");
        assert!(!o.ipv6_services.neighbour_adverts && o.ipv6_services.router_adverts);
    }

    /// Podman 5.0 to 5.2 pass `--no-map-gw` without `--map-guest-addr`: the host's names then
    /// stand for the host's own address on its default route (reached as any address
    /// outside), not the closed gateway; with no such route, they are left as they were.
    #[test]
    fn host_names_without_map_gw_or_aliases() {
        let o = run_opts("--config-net --dns-forward 169.254.0.1 --no-map-gw -t none -u none --netns /run/netns/x");
        let cfg = network_config(&o, &interface(&o), &net_opts(&o)).unwrap();
        let named = |ip: IpAddr| cfg.extra_hosts.contains(&("host.containers.internal".into(), ip));
        match default_route().and_then(|(_, a)| a) {
            Some(own) => assert!(named(own.into()), "{:?}", cfg.extra_hosts),
            None => assert!(!cfg.extra_hosts.iter().any(|(_, a)| a.is_ipv4()), "{:?}", cfg.extra_hosts),
        }
        if let Some(own6) = default_route6_address() {
            assert!(named(own6.into()), "{:?}", cfg.extra_hosts);
        }
        assert!(!named(cfg.gateway.into()), "the closed gateway");
    }

    /// containers/common's libnetwork/pasta, as current Podman runs it for `-p 18091:80`.
    #[test]
    fn podman_command_line() {
        let o = run_opts(
            "--config-net -t 18091-18091:80-80 --dns-forward 169.254.1.1 -u none -T none -U none --no-map-gw \
             --quiet --map-guest-addr 169.254.1.2 --pid /tmp/pasta123/pasta.pid --netns /run/user/1000/netns/netns-x",
        );
        assert!(o.config_net && o.no_map_gw && o.quiet);
        assert_eq!(ports(&o), [(None, 18091, 80, Proto::Tcp)]);
        assert_eq!(o.dns_forward, Some(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(o.map_guest_addr, Remap { v4: Some(Ipv4Addr::new(169, 254, 1, 2)), v6: None });
        assert_eq!(o.pid_file, Some(PathBuf::from("/tmp/pasta123/pasta.pid")));
        assert_eq!(o.target, Target::Netns(PathBuf::from("/run/user/1000/netns/netns-x")));
        assert!(o.forwarding.is_empty(), "podman passes -T none and ports: {:?}", o.forwarding);
        let iface = interface(&o);
        let cfg = network_config(&o, &iface, &net_opts(&o)).unwrap();
        assert_eq!(
            (cfg.guest, cfg.gateway, cfg.subnet.prefix),
            (Ipv4Addr::new(10, 0, 2, 100), Ipv4Addr::new(10, 0, 2, 2), 24)
        );
        assert!(!cfg.host_loopback, "--no-map-gw: the gateway does not reach the host's loopback");
        assert_eq!(cfg.dns, Some(Ipv4Addr::new(169, 254, 1, 1)));
        // IPv6 on usernet's /64, as in `run`.
        assert_eq!(iface.ipv6, Some(("fd75:7365:726e::2".parse().unwrap(), GATEWAY_LINK_LOCAL)));
        assert_eq!(cfg.v6, Some(Ipv6Net::default()));
    }

    /// `-4`, `-6` and `-a ADDR6`.
    #[test]
    fn ip_versions() {
        let config = |s: &str| {
            let o = run_opts(s);
            let iface = interface(&o);
            (network_config(&o, &iface, &net_opts(&o)).unwrap(), iface)
        };
        let (cfg, iface) = config("--config-net -4 1");
        assert_eq!((cfg.v6, iface.ipv6, cfg.ipv4, iface.ipv4), (None, None, true, true));
        let (cfg, iface) = config("--config-net -6 1");
        assert!(cfg.v6.is_some() && iface.ipv6.is_some() && !cfg.ipv4 && !iface.ipv4);
        let (cfg, iface) = config("--config-net -a 2001:db8:1:2::7 -a 10.0.3.5 1");
        let net = cfg.v6.unwrap();
        assert_eq!((net.prefix, net.guest), ("2001:db8:1:2::".parse().unwrap(), "2001:db8:1:2::7".parse().unwrap()));
        assert_eq!(iface.ipv6.map(|(a, _)| a), Some(net.guest));
        assert_eq!(cfg.guest, Ipv4Addr::new(10, 0, 3, 5));
        let (cfg, iface) = config("--config-net -m 1000 1");
        assert_eq!((cfg.v6, iface.ipv6), (None, None), "below 1280, IPv4 only");
    }

    /// pasta's address options in both families: `-g`, `--dns-forward`,
    /// `--map-host-loopback` and `--map-guest-addr` each once for IPv4 and once for IPv6.
    #[test]
    fn address_options_in_both_families() {
        let o = run_opts(
            "--config-net -a fc00::3 -g fc00::1 --dns-forward 169.254.1.1 --dns-forward fc00::53 \
             --map-host-loopback fc00::5 --map-guest-addr fc00::2 --map-guest-addr 169.254.1.2 --no-map-gw 1",
        );
        let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!((o.gateway6, o.dns_forward6), (Some(v6("fc00::1")), Some(v6("fc00::53"))));
        assert_eq!(o.dns_forward, Some(Ipv4Addr::new(169, 254, 1, 1)));
        assert_eq!(o.map_host_loopback, Remap { v4: None, v6: Some(v6("fc00::5")) });
        assert_eq!(o.map_guest_addr, Remap { v4: Some(Ipv4Addr::new(169, 254, 1, 2)), v6: Some(v6("fc00::2")) });
        let iface = interface(&o);
        assert_eq!(iface.ipv6, Some((v6("fc00::3"), v6("fc00::1"))), "the route goes through -g's address");
        let cfg = network_config(&o, &iface, &net_opts(&o)).unwrap();
        let net = cfg.v6.unwrap();
        assert_eq!(
            (net.prefix, net.guest, net.gateway, net.dns, net.host),
            (v6("fc00::"), v6("fc00::3"), v6("fc00::1"), v6("fc00::53"), v6("fc00::5"))
        );
        assert_eq!(cfg.host_alias6(v6("fc00::5")), Some(Ipv6Addr::LOCALHOST), "with --no-map-gw too");
        assert_eq!(cfg.host_alias6(v6("fc00::2")), default_route6_address(), "the host's own address");
        assert!(!cfg.host_loopback);
        assert!(cfg.extra_hosts.contains(&("host.containers.internal".into(), v6("fc00::5").into())));
        // -g alone: DNS stays on ::1 of the /64.
        let o = run_opts("--config-net -a fc00::3 -g fc00::7 1");
        let net = network_config(&o, &interface(&o), &net_opts(&o)).unwrap().v6.unwrap();
        assert_eq!((net.gateway, net.dns, net.host), (v6("fc00::7"), v6("fc00::1"), v6("fc00::254")));
        // A link-local gateway: DNS on a global address, which a resolv.conf can name.
        let o = run_opts("--config-net -6 -g fe80::9 1");
        assert_eq!(interface(&o).ipv6, Some((v6("fd75:7365:726e::2"), v6("fe80::9"))));
        let net = network_config(&o, &interface(&o), &net_opts(&o)).unwrap().v6.unwrap();
        assert_eq!(net.dns, v6("fd75:7365:726e::1"));
        // pasta's mapping of its gateway to the host: with DNS elsewhere.
        let o = run_opts("--config-net -a fc00::3 -g fc00::1 --map-host-loopback fc00::1 --dns-forward fc00::53 1");
        let cfg = network_config(&o, &interface(&o), &net_opts(&o)).unwrap();
        let net = cfg.v6.unwrap();
        assert_eq!((net.gateway, net.host, net.dns), (v6("fc00::1"), v6("fc00::1"), v6("fc00::53")));
        assert_eq!(cfg.host_alias6(v6("fc00::1")), Some(Ipv6Addr::LOCALHOST));
        // IPv4 only: the IPv6 options are moot.
        let o = run_opts("--config-net -4 -g fc01::1 --map-host-loopback fc01::5 1");
        let cfg = network_config(&o, &interface(&o), &net_opts(&o)).unwrap();
        assert!(cfg.v6.is_none() && cfg.host_aliases6.is_empty());
    }

    /// As in pasta, an address given to `--map-host-loopback` is what reaches the host's
    /// loopback instead of the gateway, `--no-map-gw` or not; `none` maps nothing.
    #[test]
    fn map_host_loopback_replaces_the_gateway() {
        let config = |s: &str| {
            let o = run_opts(s);
            (network_config(&o, &interface(&o), &net_opts(&o)).unwrap(), o)
        };
        let lo = Some(Ipv4Addr::LOCALHOST);
        let (cfg, _) = config("--config-net --map-host-loopback 10.0.2.5 1");
        assert_eq!((cfg.gateway, cfg.host), (Ipv4Addr::new(10, 0, 2, 2), Ipv4Addr::new(10, 0, 2, 5)));
        assert_eq!(cfg.host_alias(Ipv4Addr::new(10, 0, 2, 5)), lo);
        assert_eq!(cfg.host_alias(cfg.gateway), None);
        let (cfg, _) = config("--config-net --no-map-gw --map-host-loopback 169.254.1.5 1");
        assert!(!cfg.host_loopback);
        assert_eq!(cfg.host_alias(Ipv4Addr::new(169, 254, 1, 5)), lo, "an explicit address maps anyway");
        let (cfg, o) = config("--config-net --map-host-loopback none 1");
        assert!(o.no_map_gw && !cfg.host_loopback && cfg.host_aliases.is_empty(), "none: nothing reaches it");
        let (cfg, o) = config("--config-net --map-host-loopback 10.0.2.5 --map-host-loopback none 1");
        assert!(o.no_map_gw && cfg.host_aliases.is_empty());
        let (cfg, o) = config("--config-net --map-host-loopback none --map-host-loopback 10.0.2.5 1");
        assert!(o.no_map_gw && !cfg.host_loopback);
        assert_eq!(cfg.host_alias(Ipv4Addr::new(10, 0, 2, 5)), lo);
        let (cfg, _) = config("--config-net --map-host-loopback fd75:7365:726e::5 1");
        assert_eq!(cfg.v6.unwrap().host, "fd75:7365:726e::5".parse::<Ipv6Addr>().unwrap(), "instead of ::254");
        assert_eq!(cfg.host, cfg.gateway, "IPv4 keeps the gateway");
    }

    /// `-a ADDR/PREFIXLEN`: an IPv4 prefix length as `-n` gives it (not both), an IPv6 one
    /// of 64.
    #[test]
    fn address_prefix_lengths() {
        let o = run_opts("--config-net -a 10.0.3.5/16 -a fc00::3/64 1");
        assert_eq!((o.address, o.prefix), (Some(Ipv4Addr::new(10, 0, 3, 5)), Some(16)));
        assert_eq!(o.address6, Some("fc00::3".parse().unwrap()));
        let err = |s: &str| parse(&args(s)).unwrap_err();
        assert_eq!(err("-a 10.0.3.5/16 -n 24 1"), "Redundant prefix length specification");
        assert_eq!(err("-n 24 -a 10.0.3.5/16 1"), "Redundant prefix length specification");
        // As pasta: -n again, -a with lengths again, or -n after an -a without one are fine.
        assert_eq!(run_opts("-n 24 -n 16 1").prefix, Some(16));
        assert_eq!(run_opts("-a 10.0.3.5/16 -a 10.0.3.6/20 1").prefix, Some(20));
        assert_eq!(run_opts("-a 10.0.3.5/16 -a fc00::3 -n 24 1").prefix, Some(24));
        assert!(err("-a fc00::3/112 1").contains("/64"));
        assert!(err("-a 10.0.0.1/33 1").contains("prefix length"));
        assert_eq!(err("-a bogus 1"), "Invalid address: bogus");
        // Without a length, the address's class gives it, as in pasta (a gateway outside a
        // /24 of the address was unreachable); the default address keeps its /24.
        for (opts, prefix, gateway) in [
            ("-a 172.16.5.5 -g 172.16.0.1 1", 16, [172, 16, 0, 1]),
            ("-a 10.1.2.3 1", 8, [10, 0, 0, 2]),
            ("-a 192.168.7.9 1", 24, [192, 168, 7, 2]),
            ("-a 10.1.2.3 -n 24 1", 24, [10, 1, 2, 2]),
            ("-g 10.0.2.1 1", 24, [10, 0, 2, 1]),
        ] {
            let iface = interface(&run_opts(opts));
            assert_eq!((iface.prefix, iface.gateway), (prefix, Ipv4Addr::from(gateway)), "{opts}");
        }
    }

    /// rootlesskit 2's `--net=pasta`.
    #[test]
    fn rootlesskit_command_line() {
        let o = run_opts(
            "--stderr --ns-ifname=tap0 --mtu=65520 --config-net --address=10.0.2.100 --netmask=24 \
             --gateway=10.0.2.2 --dns-forward=10.0.2.3 --no-map-gw --ipv4-only --tcp-ports=none --udp-ports=none \
             --userns=/proc/42/ns/user --netns=/proc/42/ns/net",
        );
        assert!(o.stderr && o.config_net && o.no_map_gw && o.ports.is_empty());
        assert_eq!(o.userns, Some(PathBuf::from("/proc/42/ns/user")));
        let iface = interface(&o);
        assert_eq!(iface.ifname, "tap0");
        assert_eq!(
            (iface.address, iface.prefix, iface.gateway),
            (Ipv4Addr::new(10, 0, 2, 100), 24, Ipv4Addr::new(10, 0, 2, 2))
        );
        let cfg = network_config(&o, &iface, &net_opts(&o)).unwrap();
        assert_eq!(cfg.dns, Some(Ipv4Addr::new(10, 0, 2, 3)));
    }

    /// The example of Podman's documentation (podman-run(1), `--network pasta:...`, "equivalent
    /// to default slirp4netns(1) options"), `-i`, `--no-dhcp`, and `-4`/`-6`, of which the
    /// last counts, and which bind ports in their family only, as in pasta.
    #[test]
    fn podman_documentation_example_and_family_options() {
        let o = run_opts(
            "--config-net --ipv4-only -a 10.0.2.0 -n 24 -g 10.0.2.2 --dns-forward 10.0.2.3 -m 1500 \
             --no-ndp --no-dhcpv6 --no-dhcp --netns /run/netns/x",
        );
        let iface = interface(&o);
        assert_eq!(
            (iface.address, iface.prefix, iface.gateway),
            (Ipv4Addr::new(10, 0, 2, 0), 24, Ipv4Addr::new(10, 0, 2, 2))
        );
        let cfg = network_config(&o, &iface, &net_opts(&o)).unwrap();
        assert!(!cfg.dhcp && cfg.v6.is_none() && !cfg.ipv6_services.dhcpv6 && !cfg.ipv6_services.neighbour_adverts);
        assert!(network_config(&run_opts("1"), &interface(&run_opts("1")), &net_opts(&run_opts("1"))).unwrap().dhcp);
        assert_eq!(interface(&run_opts("-i lo 1")).ifname, "lo", "-i names the namespace's interface");
        assert_eq!(interface(&run_opts("-i lo -I eth7 1")).ifname, "eth7", "unless -I");
        let o = run_opts("-4 -6 1");
        assert!(o.ipv6_only && !o.ipv4_only);
        let o = run_opts("-6 -4 1");
        assert!(o.ipv4_only && !o.ipv6_only);
        // A port without an address is bound in that family only (both otherwise), as pasta's.
        let ips = |opts: &str| {
            let o = run_opts(opts);
            (o.ports.iter().map(|p| p.host_ip).collect::<Vec<_>>(), o.forwarding.to_ns_host_ip)
        };
        let any4 = Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert_eq!(ips("-4 -t 8080 -u 53 1"), (vec![any4, any4], any4));
        assert_eq!(
            ips("-t 8080 -6 1"),
            (vec![Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED))], Some(Ipv6Addr::UNSPECIFIED.into()))
        );
        assert_eq!(ips("-t 8080 1"), (vec![None], None));
        assert_eq!(ips("-4 -t 127.0.0.1/8080 1"), (vec![Some(Ipv4Addr::LOCALHOST.into())], any4));
    }

    /// pasta's TCP defaults are auto both ways; `none` or ports given turn them off.
    #[test]
    fn tcp_forwarding_defaults_and_specs() {
        let both = vec![Proto::Tcp, Proto::Udp];
        let f = run_opts("--config-net -- true").forwarding;
        assert_eq!((&f.to_ns_auto, &f.to_host_auto, f.to_host.is_empty()), (&both, &both, true));
        let f = run_opts("-t none -u none -U none -T 5432,6000-6001:7000-7001 1").forwarding;
        assert!(f.to_ns_auto.is_empty() && f.to_host_auto.is_empty());
        let t = Proto::Tcp;
        assert_eq!(f.to_host, [(t, 5432, 5432), (t, 6000, 7000), (t, 6001, 7001)]);
        let f = run_opts("-t auto -u none -T auto -U 53 1").forwarding;
        assert_eq!((f.to_ns_auto, f.to_host_auto), (vec![Proto::Tcp], vec![Proto::Tcp]));
        assert_eq!(f.to_host, [(Proto::Udp, 53, 53)]);
        let f = run_opts("-t 8080 -u none -T none -U none 1").forwarding;
        assert!(f.is_empty());
    }

    #[test]
    fn command_and_pid_targets() {
        let o = run_opts("--config-net -- sh -c true");
        assert_eq!(o.target, Target::Command(args("sh -c true")));
        let o = run_opts("-q sh -c -q");
        assert!(o.quiet);
        assert_eq!(o.target, Target::Command(args("sh -c -q")));
        assert_eq!(run_opts("-f 1234").target, Target::Pid(1234));
        assert_eq!(run_opts("--netns ci").target, Target::Netns(PathBuf::from("/run/netns/ci")));
        let cfg = {
            let o = run_opts("--config-net -- true");
            network_config(&o, &interface(&o), &net_opts(&o)).unwrap()
        };
        assert_eq!(cfg.dns, Some(Ipv4Addr::new(10, 0, 2, 3)), "COMMAND gets a DNS address");
        assert!(cfg.host_loopback, "the gateway maps to the host by default");
    }

    #[test]
    fn port_specs() {
        let p = |s: &str| {
            parse_port_spec("-t", s, Proto::Tcp)
                .map(|v| v.iter().map(|p| (p.host_ip, p.host_ports.unwrap().0, p.container_port)).collect::<Vec<_>>())
        };
        assert_eq!(p("none").unwrap(), []);
        assert_eq!(p("22").unwrap(), [(None, 22, 22)]);
        assert_eq!(p("22:23").unwrap(), [(None, 22, 23)]);
        assert_eq!(p("22,25").unwrap(), [(None, 22, 22), (None, 25, 25)]);
        assert_eq!(p("22-24:32-34").unwrap(), [(None, 22, 32), (None, 23, 33), (None, 24, 34)]);
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert_eq!(p("127.0.0.1/5").unwrap(), [(Some(lo), 5, 5)]);
        let v6: IpAddr = "::1".parse().unwrap();
        assert_eq!(p("::1/8080:80").unwrap(), [(Some(v6), 8080, 80)]);
        assert_eq!(p("5-9,~6-8").unwrap(), [(None, 5, 5), (None, 9, 9)]);
        for bad in ["", "0", "x", "22-", "24-22", "22-24:30-31", "1.2.3/22", "99999"] {
            assert_eq!(p(bad).unwrap_err(), format!("Invalid port specifier {bad}"), "{bad}");
        }
        assert!(p("auto").unwrap_err().contains("auto"));
        assert!(p("all").unwrap_err().contains("all"));
        assert!(p("~22").unwrap_err().contains("exclusions"));
        assert!(p("127.0.0.1%lo/22").unwrap_err().contains("interface"));
    }

    /// -D, --dns-host and -S: the servers usernet's DNS forwards to and the search list,
    /// instead of the host's resolv.conf's.
    #[test]
    fn dns_servers_and_search_domains() {
        let net = |s: &str| net_opts(&run_opts(s));
        let sa = |s: &str| s.parse::<SocketAddr>().unwrap();
        // None given: the host's, followed.
        let n = net("1");
        assert!(n.dns_upstream.is_empty() && n.dns_search.is_empty());
        // -D: those servers, in order, once each.
        let n = net("-D 192.0.2.53 -D 2001:db8::53 -D 192.0.2.53 1");
        assert_eq!(n.dns_upstream, vec![sa("192.0.2.53:53"), sa("[2001:db8::53]:53")]);
        // A -D naming usernet's own DNS (the --dns-forward address, the gateway) is no server.
        let n = net("--dns-forward 169.254.1.1 -D 169.254.1.1 -D 10.0.2.2 -D fe80::1 1");
        assert!(n.dns_upstream.is_empty(), "{:?}", n.dns_upstream);
        // ... and with it among them, the others are for the namespace to ask directly:
        // usernet's DNS forwards to the host's resolvers, as pasta's does.
        let n = net("--dns-forward 169.254.1.1 -D 169.254.1.1 -D 192.0.2.53 1");
        assert!(n.dns_upstream.is_empty(), "{:?}", n.dns_upstream);
        // --dns-host: where forwarded queries go, whatever -D says; the last of each family.
        let n = net("-D 192.0.2.53 --dns-host 192.0.2.1 --dns-host 192.0.2.7 --dns-host ::1 1");
        assert_eq!(n.dns_upstream, vec![sa("192.0.2.7:53"), sa("[::1]:53")]);
        // -S: a space-separated list, each option adding to it; none: no search list.
        let mut a = args("--dhcp-search -S Corp.Example. -S");
        a.extend(["a.example b.example".into(), "--dhcp-dns".into(), "1".into()]);
        let Ok(Parsed::Run(o)) = parse(&a) else { panic!("{a:?}") };
        assert_eq!(o.search, Some(vec!["corp.example".into(), "a.example".into(), "b.example".into()]));
        assert_eq!(net_opts(&o).fixed_search().unwrap(), vec!["corp.example", "a.example", "b.example"]);
        assert_eq!(net("-S x.example -S none 1").fixed_search(), Some(Vec::new()));
        assert_eq!(net("-S none -S x.example 1").fixed_search(), Some(vec!["x.example".to_string()]));
    }

    /// -o: one outbound address of each family; --outbound-if6: an interface's global one.
    #[test]
    fn outbound_addresses() {
        let o = run_opts("-o 198.18.0.1 -o 2001:db8::7 -o 198.18.0.2 1");
        assert_eq!(
            (o.outbound, o.outbound6),
            (Some(Ipv4Addr::new(198, 18, 0, 2)), Some("2001:db8::7".parse().unwrap()))
        );
        let err = |s: &str| parse(&args(s)).unwrap_err();
        for bad in
            ["::1", "::", "0.0.0.0", "255.255.255.255", "224.0.0.1", "ff02::1", "::ffff:10.0.0.1", "fe80::1", "x"]
        {
            assert_eq!(err(&format!("-o {bad} 1")), format!("Invalid or redundant outbound address: {bad}"));
        }
        assert_eq!(err("--outbound-if6 lo 1"), "No global IPv6 address on interface lo");
    }

    /// -M: usernet's MAC address on the link, a station's (not a group's).
    #[test]
    fn own_mac_address() {
        let o = run_opts("-M 02:aa:bb:cc:dd:ee 1");
        assert_eq!(o.mac, Some([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]));
        let cfg = network_config(&o, &interface(&o), &net_opts(&o)).unwrap();
        assert_eq!(cfg.gateway_mac, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
        let err = |s: &str| parse(&args(s)).unwrap_err();
        assert!(err("-M 02:aa:bb:cc:dd:ee --ns-mac-addr 02:aa:bb:cc:dd:ee 1").contains("namespace's own"));
        let guest: Vec<String> = GUEST_MAC.iter().map(|b| format!("{b:02x}")).collect();
        assert!(err(&format!("-M {} 1", guest.join(":"))).contains("namespace's own"));
        for bad in ["01:00:5e:00:00:01", "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "02:aa:bb:cc:dd"] {
            assert_eq!(err(&format!("--mac-addr {bad} 1")), format!("Invalid MAC address: {bad}"));
        }
    }

    #[test]
    fn mistakes_name_the_option() {
        let err = |s: &str| parse(&args(s)).unwrap_err();
        assert_eq!(err("--bogus"), "pasta: unrecognized option '--bogus'");
        assert_eq!(err("-t"), "pasta: option requires an argument -- 't'");
        assert!(err("-T 127.0.0.1/8080").contains("loopback"));
        assert!(err("-i no-such-if0 1").contains("Invalid interface name no-such-if0"));
        assert!(err("-6 -m 1000 1").contains("1280"));
        assert!(err("--runas 1000").contains("--runas"));
        assert!(err("-D none 1").contains("-D none"));
        assert_eq!(err("-D nowhere 1"), "Cannot use DNS address nowhere");
        assert_eq!(err("--dns-host 0.0.0.0 1"), "Invalid host nameserver address: 0.0.0.0");
        assert_eq!(err("-S bad_*domain 1"), "Cannot use DNS search domain bad_*domain");
        assert!(err("--no-tcp 1").contains("--no-tcp"));
        assert!(err("--netns x 1234").contains("Both"));
        assert!(err("-m 70000").contains("MTU"));
        assert!(err("-n 255.0.255.0").contains("netmask"));
        assert_eq!(err("-g 0.0.0.0 1"), "Invalid gateway address: 0.0.0.0");
        assert_eq!(err("-g ::1 1"), "Invalid gateway address: ::1");
        assert_eq!(err("--dns-forward :: 1"), "Invalid DNS forwarding address: ::");
        assert_eq!(err("--map-host-loopback ::1 1"), "Invalid address to remap to host: ::1");
        assert_eq!(err("--map-guest-addr 224.0.0.1 1"), "Invalid address to remap to host: 224.0.0.1");
        assert!(err("-a fc00::3 -g fc01::1 1").contains("/64"), "a gateway the namespace cannot reach");
        assert!(err("-a fc00::3 --map-guest-addr fc00::3 1").contains("own"));
        assert!(err("-a fc00::3 -g fc00::3 1").contains("own"));
        // One address, two roles: the defaults ::1 (DNS) and ::254 (host) count.
        assert!(err("-a fc00::1 1").contains("fc00::1 is both -a"));
        assert!(err("-a fc00::254 1").contains("fc00::254 is both -a"));
        assert!(err("--map-host-loopback fd75:7365:726e::1 1").contains("--dns-forward"));
        assert!(err("-a fc00::3 -g fc00::1 --map-host-loopback fc00::1 1").contains("--dns-forward"));
        assert!(err("-a fc00::3 --dns-forward fc00::9 --map-guest-addr fc00::9 1").contains("--map-guest-addr"));
        assert_eq!(parse(&args("--help")), Ok(Parsed::Help));
        assert_eq!(parse(&args("--version")), Ok(Parsed::Version));
    }

    #[test]
    fn netmasks() {
        assert_eq!(parse_netmask("24"), Some(24));
        assert_eq!(parse_netmask("255.255.0.0"), Some(16));
        assert_eq!(parse_netmask("255.255.255.255"), Some(32));
        assert_eq!(parse_netmask("0.0.0.0"), Some(0));
        assert_eq!(parse_netmask("255.0.255.0"), None);
        assert_eq!(parse_netmask("33"), None);
    }

    /// Every option the help shows is one the parser takes.
    #[test]
    fn help_matches_the_table() {
        for word in HELP.split_whitespace().filter(|w| w.starts_with("--")) {
            let name = word.trim_start_matches("--").trim_end_matches(',');
            assert!(OPTS.iter().any(|o| o.long == name), "{name}");
        }
    }
}
