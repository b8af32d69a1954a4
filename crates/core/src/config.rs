//! The virtual network's shape: addresses, MTU, DNS, shared by every engine and service.
//!
//! Everything here is fixed once usernet starts, except [`HostDns`]: what the host's
//! resolver configuration gives the gateway (upstream servers, search domains, options, the
//! names of /etc/hosts). It is a shared handle that the host side replaces while usernet runs
//! (`usernet_host::dns_watch`), read by the DNS forwarder, the DHCP server and the API. The
//! egress policy (`NetConfig::policy`, crate::policy) is live the same way: the API changes it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// MAC address the gateway (usernet itself) answers with. Locally administered.
pub const GATEWAY_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];

/// Default MTU for a network-namespace guest (`usernet run`).
pub const MTU_NETNS: u32 = 65520;
/// Default MTU for a VM guest (`usernet serve`).
pub const MTU_VM: u32 = 1500;

/// Names that resolve to the host address.
pub const HOST_NAMES: &[&str] = &["host.docker.internal", "host.containers.internal"];
/// Names that resolve to the gateway address.
pub const GATEWAY_NAMES: &[&str] = &["gateway.docker.internal", "gateway.containers.internal"];
/// The explicit proxy's name (served by the gateway's DNS).
pub const PROXY_NAMES: &[&str] = &["http.docker.internal"];

/// The gateway's IPv6 link-local address: the source of its router advertisements and so
/// the guests' IPv6 next hop (RFC 4861 wants routers to speak from link-local addresses).
pub const GATEWAY_LINK_LOCAL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// The default IPv6 prefix of the virtual network: a unique local /64 (RFC 4193) whose
/// global ID is "usern" in ASCII (75 73 65 72 6e), so it is recognisable in a capture.
pub const DEFAULT_PREFIX6: Ipv6Addr = Ipv6Addr::new(0xfd75, 0x7365, 0x726e, 0, 0, 0, 0, 0);

/// The IPv6 side of the virtual network: a /64 (SLAAC needs one) and usernet's addresses
/// in it, which mirror the IPv4 ones: ::1 the gateway (and its DNS), ::254 the host,
/// ::2 the first guest (`run` gives it to eth0; a VM takes its own by SLAAC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Net {
    /// The /64 prefix, host bits zero.
    pub prefix: Ipv6Addr,
    pub gateway: Ipv6Addr,
    /// Stands for the host's [::1].
    pub host: Ipv6Addr,
    /// Where the gateway's DNS answers (router advertisements' RDNSS, DHCPv6): the gateway
    /// itself, or another address as in slirp4netns's layout (::3).
    pub dns: Ipv6Addr,
    pub guest: Ipv6Addr,
}

impl Ipv6Net {
    /// The network of a /64 prefix.
    pub fn new(prefix: Ipv6Addr) -> Ipv6Net {
        let p = u128::from(prefix) & !u128::from(u64::MAX);
        let at = |n: u128| Ipv6Addr::from(p | n);
        Ipv6Net { prefix: Ipv6Addr::from(p), gateway: at(1), host: at(0x254), dns: at(1), guest: at(2) }
    }

    /// The address with interface identifier `n` (1 = ::1).
    pub fn at(&self, n: u64) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.prefix) | n as u128)
    }

    /// Whether `ip` is in the /64.
    pub fn contains(&self, ip: Ipv6Addr) -> bool {
        u128::from(ip) >> 64 == u128::from(self.prefix) >> 64
    }
}

impl Default for Ipv6Net {
    fn default() -> Self {
        Ipv6Net::new(DEFAULT_PREFIX6)
    }
}

impl std::str::FromStr for Ipv6Net {
    type Err = String;
    /// A /64, e.g. `fd00:1::/64` (the prefix length may be left out).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').unwrap_or((s, "64"));
        let ip: Ipv6Addr = addr.parse().map_err(|_| format!("invalid IPv6 subnet address: {addr}"))?;
        if prefix != "64" {
            return Err(format!(
                "invalid IPv6 subnet prefix: /{prefix} (must be /64: guests configure themselves by SLAAC)"
            ));
        }
        let net = Ipv6Net::new(ip);
        let p = net.prefix;
        if p.is_multicast() || p.is_unicast_link_local() || p.segments()[..4] == [0; 4] {
            return Err(format!("invalid IPv6 subnet: {s} (not a global or unique local /64)"));
        }
        Ok(net)
    }
}

/// An IPv4 subnet, e.g. 192.168.65.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix as u32) };
        Ipv4Addr::from(bits)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let m = u32::from(self.mask());
        u32::from(addr) & m == u32::from(self.network) & m
    }

    /// The address with host part `n` (1 = .1 in a /24).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.network) & u32::from(self.mask())) | n)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }
}

/// Ranges no guest network may overlap, and what they are. The guest's kernel refuses a
/// default route through a gateway in "this network" or multicast space (`Network is
/// unreachable`, late, from the sandbox); loopback addresses are martians off `lo`; reserved
/// space is routed nowhere (and holds 255.255.255.255, the limited broadcast); link-local
/// addresses are each link's own (gvproxy mode denies them to the guest:
/// crates/usernet/src/modes/gvproxy.rs).
const NOT_A_SUBNET: [(Ipv4Subnet, &str); 5] = [
    (Ipv4Subnet { network: Ipv4Addr::new(0, 0, 0, 0), prefix: 8 }, "\"this network\""),
    (Ipv4Subnet { network: Ipv4Addr::new(127, 0, 0, 0), prefix: 8 }, "loopback"),
    (Ipv4Subnet { network: Ipv4Addr::new(169, 254, 0, 0), prefix: 16 }, "link-local"),
    (Ipv4Subnet { network: Ipv4Addr::new(224, 0, 0, 0), prefix: 4 }, "multicast"),
    (Ipv4Subnet { network: Ipv4Addr::new(240, 0, 0, 0), prefix: 4 }, "reserved"),
];

impl Ipv4Subnet {
    /// The longest prefix [`FromStr`](std::str::FromStr) accepts: a gateway and a guest fit.
    pub const LONGEST_PREFIX: u8 = 30;

    /// Parses `A.B.C.D/N` (host bits are dropped) with N from /8 to `longest`; `room` says
    /// what a longer prefix would leave no room for. Networks in (or overlapping) "this
    /// network" 0.0.0.0/8, loopback, link-local, multicast and reserved space are refused.
    pub fn parse_up_to(s: &str, longest: u8, room: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| format!("invalid subnet: {s} (want A.B.C.D/N)"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| format!("invalid subnet address: {addr}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("invalid subnet prefix: {prefix}"))?;
        if prefix < 8 {
            return Err(format!("invalid subnet prefix: /{prefix} (must be between /8 and /{longest})"));
        }
        if prefix > longest {
            return Err(format!("invalid subnet prefix: /{prefix} (must be between /8 and /{longest}: {room})"));
        }
        let mut subnet = Ipv4Subnet { network, prefix };
        subnet.network = Ipv4Addr::from(u32::from(network) & u32::from(subnet.mask()));
        if let Some((range, what)) = NOT_A_SUBNET.iter().find(|(r, _)| r.overlaps(&subnet)) {
            return Err(format!(
                "invalid subnet: {s} (overlaps {what} {}/{}: not a private, shared or public unicast network)",
                range.network, range.prefix
            ));
        }
        Ok(subnet)
    }

    /// Whether the two networks have an address in common.
    pub fn overlaps(&self, other: &Ipv4Subnet) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

impl std::str::FromStr for Ipv4Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ipv4Subnet::parse_up_to(s, Ipv4Subnet::LONGEST_PREFIX, "no room for a gateway and a guest")
    }
}

/// Everything the engine and the gateway services need to know about the virtual network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub subnet: Ipv4Subnet,
    /// The IPv6 network; None with `--ipv4-only`.
    pub v6: Option<Ipv6Net>,
    /// Whether guests have IPv4 (false with `--ipv6-only`: their ARP and IPv4 frames are
    /// dropped, DHCP is not answered, DNS gives no A records, and the first guest is its
    /// IPv6 address).
    pub ipv4: bool,
    /// usernet itself: ARP, DHCP, DNS, ping.
    pub gateway: Ipv4Addr,
    /// Stands for the host's 127.0.0.1 (may be the gateway's own address, as slirp4netns has it).
    pub host: Ipv4Addr,
    /// Whether the host address reaches the host's loopback (slirp4netns's
    /// `--disable-host-loopback` turns it off: connections to it are refused).
    pub host_loopback: bool,
    /// Where the gateway's DNS answers: the gateway itself by default, another address of
    /// the subnet in slirp4netns's layout (10.0.2.3), or nowhere.
    pub dns: Option<Ipv4Addr>,
    /// The host address outbound connections leave from (slirp4netns's `--outbound-addr`);
    /// None: the kernel chooses by route.
    pub outbound_addr: Option<Ipv4Addr>,
    /// The same for IPv6 destinations (slirp4netns's `--outbound-addr6`, pasta's `-o` with
    /// an IPv6 address).
    pub outbound_addr6: Option<Ipv6Addr>,
    /// The first guest's address (static in `run`, first DHCP lease in `serve`).
    pub guest: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    pub mtu: u32,
    /// The upstreams, search domains and options of the gateway's DNS, and the host's
    /// /etc/hosts names: live (a shared handle; a clone of the config shares it).
    pub host_dns: HostDns,
    /// Extra DNS A and AAAA records (`--add-host`), names lower-case without trailing dot.
    pub extra_hosts: Vec<(String, IpAddr)>,
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
    /// More addresses that stand for the host, each with the host address it is dialled as:
    /// pasta's `--map-host-loopback ADDR` (the host's 127.0.0.1) and `--map-guest-addr ADDR`
    /// (the host's own address on its default route).
    pub host_aliases: Vec<(Ipv4Addr, Ipv4Addr)>,
    /// The same over IPv6: the host's [::1] and its own IPv6 address on its default route.
    pub host_aliases6: Vec<(Ipv6Addr, Ipv6Addr)>,
    /// The bounds of what guests may make usernet hold (see [`Limits`]).
    pub limits: Limits,
    /// The egress policy (`--allow`, `--deny`, `--allow-domain`): live, shared like
    /// `host_dns` (a clone of the config shares it); see crate::policy.
    pub policy: Arc<crate::policy::Policy>,
    /// Which of usernet's IPv6 link services answer (pasta's `--no-ra`, `--no-ndp`,
    /// `--no-dhcpv6` turn them off, for a guest whose IPv6 is configured otherwise).
    pub ipv6_services: Ipv6Services,
    /// Whether DHCP answers (pasta's `--no-dhcp` turns it off, for a guest whose IPv4 is
    /// configured otherwise: then its DHCP requests are dropped).
    pub dhcp: bool,
}

/// usernet's IPv6 services on the link (engine/icmpv6.rs, services/dhcp6.rs): all on
/// unless turned off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Services {
    /// Router advertisements: unsolicited, and in answer to solicitations.
    pub router_adverts: bool,
    /// Neighbour advertisements for usernet's own addresses (and the defence of them
    /// against duplicate address detection).
    pub neighbour_adverts: bool,
    /// Stateless DHCPv6 (the router advertisements' O flag follows it).
    pub dhcpv6: bool,
}

impl Default for Ipv6Services {
    fn default() -> Self {
        Ipv6Services { router_adverts: true, neighbour_adverts: true, dhcpv6: true }
    }
}

/// How often at most the log says that one limit was reached (an episode's first time,
/// then at most once per this, with the count since).
pub const LIMIT_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// A warning for an error that repeats while its cause lasts (an accept retried every
/// 50-100 ms while the process is out of descriptors): logged the first time, then at most
/// once per [`LIMIT_LOG_EVERY`], with the count since.
#[derive(Debug, Default)]
pub struct LogEvery {
    logged: Option<std::time::Instant>,
    since: u64,
}

impl LogEvery {
    /// Counts one occurrence at `now`: Some(occurrences since the last line, this one
    /// included) when a line is due.
    pub fn due(&mut self, now: std::time::Instant) -> Option<u64> {
        self.since += 1;
        match self.logged {
            Some(at) if now.saturating_duration_since(at) < LIMIT_LOG_EVERY => None,
            _ => {
                self.logged = Some(now);
                Some(std::mem::take(&mut self.since))
            }
        }
    }
}

/// The bounds on everything a guest can make usernet hold: each is a flag of `run` and
/// `serve` (crates/usernet/src/limit_opts.rs), each is counted in
/// `usernet_limit_reached_total` and logged (rate-limited) when reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// TCP flows at once, all guests together (published ports' included); a new guest SYN
    /// beyond it gets a RST.
    pub max_tcp_flows: usize,
    /// TCP flows at once from one guest address.
    pub max_tcp_flows_per_guest: usize,
    /// Guest connects in progress at once; beyond it the oldest is abandoned.
    pub max_pending_connects: usize,
    /// UDP flows at once; beyond it the least recently used is closed.
    pub max_udp_flows: usize,
    /// Guest bytes held, all flows together, that host sockets did not take yet.
    pub max_buffered: usize,
    /// A TCP flow whose host peer takes none of the guest's data for this long is reset
    /// (zero: never).
    pub tcp_stall_timeout: std::time::Duration,
    /// Descriptors kept free for listeners, services and the API: a new guest flow whose
    /// socket would reach into them is refused.
    pub fd_reserve: usize,
    /// DHCP offers (leases not yet requested) at once; the oldest goes first.
    pub max_dhcp_offers: usize,
    /// DNS queries in flight to the upstreams from one guest (its MAC where known).
    pub max_dns_queries_per_guest: usize,
    /// Connections to the HTTP proxy (explicit and transparent) at once.
    pub max_proxy_connections: usize,
    /// How long the proxy waits for a request's whole header (or an intercepted TLS
    /// ClientHello, once begun); beyond it the connection is closed.
    pub proxy_header_timeout: std::time::Duration,
    /// A proxied connection (a CONNECT tunnel, a relay, a request waiting on its answer)
    /// that carries nothing either way for this long is closed.
    pub proxy_idle_timeout: std::time::Duration,
}

impl Limits {
    /// One engine's share when `n` engines serve the guest (`engine::shard`): the bounds
    /// on flows and on held data are divided among them, so that together they hold no
    /// more than one engine would. The others (descriptors, DHCP, the services') are the
    /// process's or engine 0's.
    pub fn per_engine(&self, n: usize) -> Limits {
        let n = n.max(1);
        let share = |v: usize| (v / n).max(1);
        Limits {
            max_tcp_flows: share(self.max_tcp_flows),
            max_tcp_flows_per_guest: share(self.max_tcp_flows_per_guest),
            max_pending_connects: share(self.max_pending_connects),
            max_udp_flows: share(self.max_udp_flows),
            max_buffered: share(self.max_buffered),
            ..*self
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_tcp_flows: 32768,
            max_tcp_flows_per_guest: 16384,
            max_pending_connects: 1024,
            max_udp_flows: 4096,
            max_buffered: 64 << 20,
            tcp_stall_timeout: std::time::Duration::from_secs(600),
            fd_reserve: 256,
            max_dhcp_offers: 256,
            max_dns_queries_per_guest: 256,
            max_proxy_connections: 1024,
            proxy_header_timeout: std::time::Duration::from_secs(30),
            proxy_idle_timeout: std::time::Duration::from_secs(7200),
        }
    }
}

impl NetConfig {
    /// The longest subnet prefix [`NetConfig::new`] can lay out: its host address is .254,
    /// which takes a whole last octet of host part.
    pub const LONGEST_PREFIX: u8 = 24;

    /// The network on `subnet`: gateway and DNS .1, guest .2, host .254 (so `subnet` is
    /// [`NetConfig::LONGEST_PREFIX`] or shorter).
    pub fn new(subnet: Ipv4Subnet, mtu: u32) -> Self {
        NetConfig {
            subnet,
            v6: Some(Ipv6Net::default()),
            ipv4: true,
            gateway: subnet.host(1),
            host: subnet.host(254),
            host_loopback: true,
            dns: Some(subnet.host(1)),
            outbound_addr: None,
            outbound_addr6: None,
            guest: subnet.host(2),
            gateway_mac: GATEWAY_MAC,
            mtu,
            host_dns: HostDns::default(),
            extra_hosts: Vec::new(),
            lease_secs: 3600,
            host_aliases: Vec::new(),
            host_aliases6: Vec::new(),
            limits: Limits::default(),
            policy: Arc::default(),
            ipv6_services: Ipv6Services::default(),
            dhcp: true,
        }
    }
}

impl NetConfig {
    /// The host as the guest sees it, each address the network has: IPv4 (unless
    /// `--ipv6-only`), then IPv6 (unless `--ipv4-only`). What `host-gateway` stands for in a
    /// DNS record (see `services::dns::records::record_addresses`).
    pub fn host_addresses(&self) -> Vec<IpAddr> {
        let v4 = self.ipv4.then_some(IpAddr::V4(self.host));
        v4.into_iter().chain(self.v6.map(|net| IpAddr::V6(net.host))).collect()
    }

    /// Where published ports and the API's requests without a guest address go: the first
    /// guest's IPv4 address, or with `--ipv6-only` its IPv6 one.
    pub fn first_guest(&self) -> std::net::IpAddr {
        match (&self.v6, self.ipv4) {
            (Some(v6), false) => v6.guest.into(),
            _ => self.guest.into(),
        }
    }

    /// The addresses usernet itself answers for (ARP, ping): the gateway, the host address
    /// and the DNS address.
    pub fn is_own_address(&self, ip: Ipv4Addr) -> bool {
        ip == self.gateway || ip == self.host || self.dns == Some(ip) || self.host_alias(ip).is_some()
    }

    /// The addresses usernet itself answers for over IPv6 (neighbour discovery, ping): the
    /// gateway's link-local and global addresses, the host address, the DNS address and
    /// the host's aliases.
    pub fn is_own_address6(&self, ip: Ipv6Addr) -> bool {
        ip == GATEWAY_LINK_LOCAL
            || self.v6.is_some_and(|n| ip == n.gateway || ip == n.host || ip == n.dns)
            || self.host_alias6(ip).is_some()
    }

    /// The host address that `ip` stands for, if it is one of `host_aliases`.
    pub fn host_alias(&self, ip: Ipv4Addr) -> Option<Ipv4Addr> {
        self.host_aliases.iter().find(|(alias, _)| *alias == ip).map(|(_, to)| *to)
    }

    /// The host address that `ip` stands for, if it is one of `host_aliases6`.
    pub fn host_alias6(&self, ip: Ipv6Addr) -> Option<Ipv6Addr> {
        self.host_aliases6.iter().find(|(alias, _)| *alias == ip).map(|(_, to)| *to)
    }
}

/// True for the addresses that mean "this machine" to the host's kernel: 127.0.0.0/8 and
/// 0.0.0.0/8 (Linux delivers a connect to 0.0.0.0 locally), `::1` and `::`, and their
/// IPv4-mapped forms. A guest never reaches them by addressing them: the host's loopback
/// is reached only through the host address (`NetConfig::host`), and only while
/// `host_loopback` is on (see engine/dial.rs and services/proxy/mod.rs).
pub fn is_host_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback() || v4.octets()[0] == 0,
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.is_unspecified() || v6.to_ipv4_mapped().is_some_and(|v4| is_host_local(v4.into()))
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new(Ipv4Subnet { network: Ipv4Addr::new(192, 168, 65, 0), prefix: 24 }, MTU_NETNS)
    }
}

/// Where the gateway's upstream servers came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum DnsOrigin {
    /// None configured.
    #[default]
    Unset,
    /// `--dns-upstream`: fixed for the life of usernet.
    CommandLine,
    /// A resolv.conf file, followed while usernet runs.
    File(PathBuf),
}

/// The `options` of resolv.conf(5) that usernet honours; None where the file says nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResolvOptions {
    /// `ndots:N` (at most 15): passed on to the guest's resolv.conf in `run`.
    pub ndots: Option<u8>,
    /// `timeout:N` seconds (1 to 30): how long the forwarder waits for one server's answer.
    pub timeout: Option<u8>,
    /// `attempts:N` (1 to 5): how many rounds over the servers the forwarder makes.
    pub attempts: Option<u8>,
    /// `rotate`: each query starts at the next server (round robin).
    pub rotate: bool,
}

/// The resolver configuration the gateway's DNS forwards with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Upstreams {
    /// In order of preference.
    pub servers: Vec<SocketAddr>,
    /// Search domains (lower case, no trailing dot) for the guest: its resolv.conf in `run`,
    /// DHCP options 15 and 119 in `serve`.
    pub search: Vec<String>,
    pub options: ResolvOptions,
    pub origin: DnsOrigin,
}

impl Upstreams {
    /// Servers given on the command line: no search domains or options.
    pub fn command_line(servers: Vec<SocketAddr>) -> Upstreams {
        Upstreams { servers, origin: DnsOrigin::CommandLine, ..Upstreams::default() }
    }
}

/// The names of the host's /etc/hosts as the gateway answers them (see
/// `services::dns::hosts` for how the file becomes this table).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostsTable {
    /// The file it was read from.
    pub path: Option<PathBuf>,
    /// Lower-case name without trailing dot -> the IPv4 address a guest gets for it.
    pub names: HashMap<String, Ipv4Addr>,
    /// Address -> the name of its PTR record.
    pub ptr: HashMap<Ipv4Addr, String>,
    /// Lower-case name -> its first global IPv6 address in the file (an AAAA record).
    pub names6: HashMap<String, std::net::Ipv6Addr>,
    /// IPv6 address -> the name of its PTR record (`ip6.arpa`).
    pub ptr6: HashMap<std::net::Ipv6Addr, String>,
}

/// The live DNS configuration: an `Arc` snapshot of each part behind a lock. Readers take
/// the current snapshot (a reference count, no copy), so a query being forwarded finishes
/// against the servers it started with while a new configuration is swapped in.
#[derive(Clone, Debug, Default)]
pub struct HostDns {
    upstreams: Arc<RwLock<Arc<Upstreams>>>,
    hosts: Arc<RwLock<Arc<HostsTable>>>,
}

impl HostDns {
    pub fn new(upstreams: Upstreams) -> HostDns {
        let dns = HostDns::default();
        dns.set_upstreams(upstreams);
        dns
    }

    /// The current upstream configuration.
    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the upstream configuration; returns the one it replaced.
    pub fn set_upstreams(&self, new: Upstreams) -> Arc<Upstreams> {
        std::mem::replace(&mut *self.upstreams.write().unwrap_or_else(|e| e.into_inner()), Arc::new(new))
    }

    /// The current /etc/hosts table.
    pub fn hosts(&self) -> Arc<HostsTable> {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the /etc/hosts table; returns the one it replaced.
    pub fn set_hosts(&self, new: HostsTable) -> Arc<HostsTable> {
        std::mem::replace(&mut *self.hosts.write().unwrap_or_else(|e| e.into_inner()), Arc::new(new))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_repeated_error_is_logged_first_then_once_per_interval_with_its_count() {
        let t = std::time::Instant::now();
        let ms = |n| t + std::time::Duration::from_millis(n);
        let mut e = LogEvery::default();
        assert_eq!(e.due(t), Some(1));
        assert_eq!(e.due(ms(50)), None);
        assert_eq!(e.due(ms(100)), None);
        assert_eq!(e.due(t + LIMIT_LOG_EVERY), Some(3), "the two kept quiet and this one");
        assert_eq!(e.due(t + LIMIT_LOG_EVERY + LIMIT_LOG_EVERY / 2), None);
        assert_eq!(e.due(t + 3 * LIMIT_LOG_EVERY), Some(2));
    }

    use super::*;

    #[test]
    fn ipv6_subnets() {
        let n: Ipv6Net = "fd00:1:2:3::/64".parse().unwrap();
        assert_eq!((n.gateway, n.host, n.guest), (n.at(1), n.at(0x254), n.at(2)));
        assert_eq!(n.gateway.to_string(), "fd00:1:2:3::1");
        assert_eq!("2001:db8:0:1:dead::".parse::<Ipv6Net>().unwrap().prefix.to_string(), "2001:db8:0:1::");
        assert!(n.contains("fd00:1:2:3:ffff::1".parse().unwrap()) && !n.contains("fd00:1:2:4::1".parse().unwrap()));
        // Not a /64, or no unicast prefix: loopback's (::2/64), link-local, multicast.
        for bad in ["fd00::/48", "fd00::/65", "::2/64", "fe80::/64", "ff02::/64", "::ffff:10.0.0.0/64", "nonsense"] {
            assert!(bad.parse::<Ipv6Net>().is_err(), "{bad}");
        }
    }

    #[test]
    fn host_local_addresses() {
        for local in
            ["127.0.0.1", "127.0.0.53", "127.255.255.254", "0.0.0.0", "0.1.2.3", "::1", "::", "::ffff:127.0.0.1"]
        {
            assert!(is_host_local(local.parse().unwrap()), "{local}");
        }
        for not in ["192.168.65.254", "10.0.0.1", "128.0.0.1", "1.0.0.0", "::2", "::ffff:10.0.0.1", "fe80::1"] {
            assert!(!is_host_local(not.parse().unwrap()), "{not}");
        }
    }

    #[test]
    fn default_addresses() {
        let c = NetConfig::default();
        assert_eq!(c.gateway, Ipv4Addr::new(192, 168, 65, 1));
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 65, 254));
        assert_eq!(c.guest, Ipv4Addr::new(192, 168, 65, 2));
        assert_eq!(c.subnet.broadcast(), Ipv4Addr::new(192, 168, 65, 255));
    }

    #[test]
    fn host_dns_is_shared_and_swapped_whole() {
        let c = NetConfig::default();
        let copy = c.clone();
        let before = c.host_dns.upstreams();
        assert_eq!(before.origin, DnsOrigin::Unset);
        let new = Upstreams::command_line(vec!["127.0.0.2:53".parse().unwrap()]);
        let old = copy.host_dns.set_upstreams(new.clone());
        assert!(Arc::ptr_eq(&old, &before));
        // A clone of the configuration sees the change; a snapshot taken before does not.
        assert_eq!(*c.host_dns.upstreams(), new);
        assert!(before.servers.is_empty());
        let table = HostsTable { names: [("a".to_string(), Ipv4Addr::LOCALHOST)].into(), ..HostsTable::default() };
        c.host_dns.set_hosts(table.clone());
        assert_eq!(*copy.host_dns.hosts(), table);
    }

    #[test]
    fn subnet_parse() {
        let s: Ipv4Subnet = "10.0.5.7/16".parse().unwrap();
        assert_eq!(s.network, Ipv4Addr::new(10, 0, 0, 0));
        assert!(s.contains(Ipv4Addr::new(10, 0, 200, 1)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 0, 1)));
        assert!("10.0.0.0".parse::<Ipv4Subnet>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Subnet>().is_err());
        assert!("x/24".parse::<Ipv4Subnet>().is_err());
    }

    /// Private, shared and public unicast networks are subnets; "this network", loopback,
    /// link-local, multicast and reserved ones (broadcast too) are refused, saying which.
    #[test]
    fn subnet_address_ranges() {
        for ok in [
            "10.0.0.0/8",
            "10.9.8.0/24",
            "172.16.0.0/12",
            "172.31.255.0/24",
            "192.168.65.0/24",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "100.127.0.0/24",
            "203.0.113.0/24",
            "8.8.8.0/24",
            "1.0.0.0/8",
            "169.253.0.0/16",
            "169.255.0.0/16",
            "223.255.255.0/24",
        ] {
            assert!(ok.parse::<Ipv4Subnet>().is_ok(), "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0/24", "0.0.0.0/8"),
            ("0.255.0.0/16", "0.0.0.0/8"),
            ("127.0.0.0/24", "loopback 127.0.0.0/8"),
            ("127.0.0.1/8", "loopback 127.0.0.0/8"),
            ("169.254.0.0/16", "link-local 169.254.0.0/16"),
            ("169.254.7.0/24", "link-local 169.254.0.0/16"),
            ("169.0.0.0/8", "link-local 169.254.0.0/16"),
            ("224.0.0.0/24", "multicast 224.0.0.0/4"),
            ("239.1.2.0/24", "multicast 224.0.0.0/4"),
            ("240.0.0.0/8", "reserved 240.0.0.0/4"),
            ("255.255.255.0/24", "reserved 240.0.0.0/4"),
        ] {
            let e = bad.parse::<Ipv4Subnet>().unwrap_err();
            assert!(e.starts_with(&format!("invalid subnet: {bad} (")) && e.contains(why), "{bad}: {e}");
        }
    }
}
