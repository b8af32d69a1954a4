//! Dialling: the host socket behind each guest flow.
//!
//! The guest's destination is translated first: the host address (192.168.65.254, and
//! ::254 of the IPv6 prefix) becomes the host's 127.0.0.1 (or [::1]), the gateway's ports
//! go to the built-in services (one end of a socketpair), other addresses of the virtual
//! subnets are unreachable, and everything else is dialled as it is, so it follows the
//! host's routing table (an IPv6 destination the host has no route to fails at once with
//! ENETUNREACH, which the guest sees as an ICMPv6 no-route). The `Dialer` trait lets tests
//! give the engine sockets without any real network.
//!
//! The host's loopback is reached only through the host address, and only while
//! `NetConfig::host_loopback` is on (`--no-host-loopback` turns it off). A guest that writes
//! its own frames could address 127.0.0.0/8, 0.0.0.0/8, ::1, :: or an IPv4-mapped
//! ::ffff:127.0.0.1 directly (its kernel never sends such packets, but a VM or a raw socket
//! can): dialled as is, they would reach every
//! service of the host that listens on loopback only. They are refused instead (a RST, an
//! ICMP port unreachable, an echo request dropped), and each such destination is logged
//! once.
//!
//! The egress policy (crate::policy) is asked by [`admit`], once per new flow, before any
//! hook or dialler: it judges the destination the host would dial (the host address as the
//! host's 127.0.0.1), never the gateway's own services. A denial is `EACCES`, which the
//! engine turns into a RST (TCP) or an ICMP administratively prohibited (UDP, ping).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use super::sock::{self, Segmenting};
use crate::config::NetConfig;
use crate::guest::GuestKey;
use crate::policy::{DenyReason, Verdict, Via};
use crate::services::ServiceHub;

/// A freshly dialled TCP socket.
pub struct TcpDial {
    pub fd: OwnedFd,
    /// Already connected (a service socketpair); otherwise the connect is in progress.
    pub connected: bool,
    /// A kernel TCP socket (MSG_TRUNC discards without copying); false for a socketpair.
    pub is_tcp: bool,
}

/// How echo requests leave the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    /// SOCK_DGRAM/IPPROTO_ICMP: the kernel picks the identifier, no IP header on receive.
    Ping,
    /// SOCK_RAW/IPPROTO_ICMP (root): the IP header comes with each received packet.
    Raw,
}

/// A UDP flow's socket, dialled.
pub struct UdpDial {
    pub fd: OwnedFd,
    /// Whether, and how far, its sends may be segmented (udp_batch.rs).
    pub segmenting: Segmenting,
}

pub trait Dialer {
    fn tcp(&mut self, dst: SocketAddr, guest: SocketAddr, who: GuestKey) -> io::Result<TcpDial>;
    fn udp(&mut self, dst: SocketAddr, guest: SocketAddr, who: GuestKey) -> io::Result<UdpDial>;
    fn icmp(&mut self, dst: IpAddr) -> io::Result<(OwnedFd, IcmpKind)>;
}

/// The real dialler: host sockets and the gateway's services.
pub struct HostDialer {
    cfg: Arc<NetConfig>,
    services: ServiceHub,
    icmp_kind: Option<IcmpKind>,
    /// The same for ICMPv6.
    icmp6_kind: Option<IcmpKind>,
    /// The kernel segments UDP sends (UDP_SEGMENT).
    udp_segment: bool,
    /// Whether flow sockets ask the kernel to coalesce arriving datagrams (UDP_GRO, Linux
    /// 5.0); false once the kernel has refused it.
    udp_gro: bool,
    /// The guest was told (in the log) that ping cannot work here.
    told_no_icmp: bool,
    /// Destinations refused because they are the host's loopback, each logged once (at
    /// most [`MAX_DENIED_LOGGED`] of them; then one line says the rest are not).
    denied: HashSet<(&'static str, SocketAddr)>,
}

/// Refused destinations remembered for the log (bounds the set a guest can grow).
pub const MAX_DENIED_LOGGED: usize = 1024;

/// Where a guest destination really goes.
enum Target {
    Host(IpAddr),
    Gateway,
    Unreachable,
    /// The host's loopback: addressed directly (127.0.0.0/8, 0.0.0.0/8), or through the
    /// host address when it is closed to the guest (`host_loopback` off).
    Refused,
}

impl HostDialer {
    pub fn new(cfg: Arc<NetConfig>, services: ServiceHub) -> HostDialer {
        let icmp_kind = probe_icmp(false);
        let icmp6_kind = probe_icmp(true);
        match icmp_kind {
            Some(k) => tracing::debug!("ICMP echo through {k:?} sockets (ICMPv6: {icmp6_kind:?})"),
            None => tracing::debug!("no ping or raw ICMP sockets allowed"),
        }
        let udp_segment = probe_udp_segment();
        HostDialer {
            cfg,
            services,
            icmp_kind,
            icmp6_kind,
            udp_segment,
            udp_gro: true,
            told_no_icmp: false,
            denied: HashSet::new(),
        }
    }

    pub fn services(&self) -> &ServiceHub {
        &self.services
    }

    fn target(&self, ip: IpAddr) -> Target {
        target(&self.cfg, ip)
    }
}

fn target(cfg: &NetConfig, ip: IpAddr) -> Target {
    match ip {
        IpAddr::V4(ip) => target_v4(cfg, ip),
        IpAddr::V6(ip) => target_v6(cfg, ip),
    }
}

fn target_v6(cfg: &NetConfig, ip: Ipv6Addr) -> Target {
    let Some(net) = cfg.v6 else { return Target::Unreachable };
    // The host address before the gateway's, as for IPv4: they are one in slirp4netns's
    // layout, where that address leads to the host.
    if ip == net.dns {
        Target::Gateway
    } else if let Some(to) = cfg.host_alias6(ip) {
        Target::Host(to.into())
    } else if ip == net.host {
        if cfg.host_loopback { Target::Host(Ipv6Addr::LOCALHOST.into()) } else { Target::Refused }
    } else if ip == net.gateway || ip == crate::config::GATEWAY_LINK_LOCAL {
        Target::Gateway
    } else if crate::config::is_host_local(ip.into()) || ip.to_ipv4_mapped().is_some() || ip.segments()[..6] == [0; 6] {
        // An IPv4-mapped destination would leave as IPv4 and skip the IPv4 checks, and an
        // IPv4-compatible one (::a.b.c.d, deprecated) means nothing else: refused.
        Target::Refused
    } else if net.contains(ip) || ip.is_multicast() || ip.is_unicast_link_local() || ip.is_unspecified() {
        Target::Unreachable
    } else {
        Target::Host(ip.into())
    }
}

fn target_v4(cfg: &NetConfig, ip: Ipv4Addr) -> Target {
    if cfg.dns == Some(ip) {
        Target::Gateway
    } else if let Some(to) = cfg.host_alias(ip) {
        Target::Host(to.into())
    } else if ip == cfg.host {
        if cfg.host_loopback { Target::Host(Ipv4Addr::LOCALHOST.into()) } else { Target::Refused }
    } else if ip == cfg.gateway {
        Target::Gateway
    } else if crate::config::is_host_local(ip.into()) {
        Target::Refused
    } else if cfg.subnet.contains(ip) || ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        Target::Unreachable
    } else {
        Target::Host(ip.into())
    }
}

/// The egress policy's word on a new guest flow to `dst` (the port is ignored for `Via::Icmp`):
/// Ok, or `EACCES` once the denial is counted and logged. Only destinations the host would
/// dial are judged, as what the host dials (the host address as 127.0.0.1); the gateway,
/// the refused and the unreachable ones are left to the dialler.
pub fn admit(cfg: &NetConfig, via: Via, dst: SocketAddr, guest: Option<SocketAddr>) -> io::Result<()> {
    if !cfg.policy.is_active() {
        return Ok(());
    }
    let Target::Host(ip) = target(cfg, dst.ip()) else {
        return Ok(());
    };
    let port = (via != Via::Icmp).then_some(dst.port());
    // The host's loopback is one thing to the rules, whichever family reaches it: the IPv6
    // host address is judged as 127.0.0.1 too.
    let judged = if ip == IpAddr::V6(Ipv6Addr::LOCALHOST) { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { ip };
    match cfg.policy.check(judged, port) {
        Verdict::Allow => Ok(()),
        Verdict::Deny(reason) => {
            let what = if via == Via::Icmp { dst.ip().to_string() } else { dst.to_string() };
            cfg.policy.denied(via, reason, what, guest);
            Err(io::Error::from_raw_os_error(libc::EACCES))
        }
    }
}

impl HostDialer {
    /// A connection to the host's loopback refused: logged once per destination.
    fn refused(&mut self, proto: &'static str, dst: SocketAddr, guest: Option<SocketAddr>) -> io::Error {
        let via = match proto {
            "tcp" => Via::Tcp,
            "udp" => Via::Udp,
            _ => Via::Icmp,
        };
        self.cfg.policy.count(via, DenyReason::Loopback);
        if self.denied.len() < MAX_DENIED_LOGGED && self.denied.insert((proto, dst)) {
            let why = if dst.ip() == IpAddr::V4(self.cfg.host) || self.cfg.v6.is_some_and(|n| dst.ip() == n.host) {
                "the host address does not lead to the host's loopback (--no-host-loopback)"
            } else {
                "the host's loopback is reached only through the host address"
            };
            let from = guest.map_or(String::new(), |g| format!(" from {g}"));
            tracing::warn!("refused guest {proto}{from} to {dst}: {why}; not logged again for this destination");
            if self.denied.len() == MAX_DENIED_LOGGED {
                tracing::warn!("{MAX_DENIED_LOGGED} destinations refused: further ones are not logged");
            }
        }
        io::Error::from_raw_os_error(libc::ECONNREFUSED)
    }

    /// Binds a socket bound for `dst` to the outbound address of its family
    /// (`--outbound-addr`, `--outbound-addr6`), if one is set and `dst` is not the host's
    /// loopback.
    fn bind_outbound(&self, fd: BorrowedFd<'_>, dst: IpAddr) -> io::Result<()> {
        if dst.is_loopback() {
            return Ok(());
        }
        let from = match dst {
            IpAddr::V4(_) => self.cfg.outbound_addr.map(IpAddr::V4),
            IpAddr::V6(_) => self.cfg.outbound_addr6.map(IpAddr::V6),
        };
        let Some(from) = from else {
            return Ok(());
        };
        let (ss, len) = sock::sockaddr(SocketAddr::new(from, 0));
        // SAFETY: ss holds a valid sockaddr of the family's length `len`.
        let r = unsafe { libc::bind(fd.as_raw_fd(), &ss as *const _ as *const libc::sockaddr, len) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
    }
}

fn unreachable() -> io::Error {
    io::Error::from_raw_os_error(libc::EHOSTUNREACH)
}

impl Dialer for HostDialer {
    fn tcp(&mut self, dst: SocketAddr, guest: SocketAddr, who: GuestKey) -> io::Result<TcpDial> {
        match self.target(dst.ip()) {
            Target::Gateway => match self.services.connect_tcp(dst.port(), guest, who) {
                Some(fd) => Ok(TcpDial { fd, connected: true, is_tcp: false }),
                None => Err(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            },
            Target::Unreachable => Err(unreachable()),
            Target::Refused => Err(self.refused("tcp", dst, Some(guest))),
            Target::Host(ip) => {
                let fd = sock::socket_for(ip, libc::SOCK_STREAM, 0)?;
                self.bind_outbound(fd.as_fd(), ip)?;
                sock::set_int(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)?;
                // The host's loopback answers within connect(2) (see connect_completed);
                // another address rarely does, and is not asked.
                let connected = sock::connect(fd.as_fd(), SocketAddr::new(ip, dst.port()))?
                    || (ip.is_loopback() && sock::connect_completed(fd.as_fd()));
                Ok(TcpDial { fd, connected, is_tcp: true })
            }
        }
    }

    fn udp(&mut self, dst: SocketAddr, guest: SocketAddr, who: GuestKey) -> io::Result<UdpDial> {
        match self.target(dst.ip()) {
            Target::Gateway => match self.services.connect_udp(dst.port(), guest, who) {
                Some(fd) => Ok(UdpDial { fd, segmenting: Segmenting::Never }),
                None => Err(io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            },
            Target::Unreachable => Err(unreachable()),
            Target::Refused => Err(self.refused("udp", dst, Some(guest))),
            Target::Host(ip) => {
                let fd = sock::socket_for(ip, libc::SOCK_DGRAM, 0)?;
                self.bind_outbound(fd.as_fd(), ip)?;
                sock::connect(fd.as_fd(), SocketAddr::new(ip, dst.port()))?;
                let segmenting = match (self.udp_segment, ip) {
                    (false, _) => Segmenting::Never,
                    (true, IpAddr::V4(_)) => Segmenting::RouteMtu,
                    (true, IpAddr::V6(_)) => Segmenting::Full,
                };
                // Datagrams of one size that arrive together (a QUIC server's burst, sent
                // segmented or coalesced by the host's NIC) are read at once, and go to the
                // guest in one segmented frame where its link takes them (flows/udp.rs).
                if self.udp_gro && sock::set_int(fd.as_fd(), libc::SOL_UDP, sock::UDP_GRO, 1).is_err() {
                    tracing::debug!("this kernel does not coalesce UDP datagrams (UDP_GRO): each is read on its own");
                    self.udp_gro = false;
                }
                Ok(UdpDial { fd, segmenting })
            }
        }
    }

    fn icmp(&mut self, dst: IpAddr) -> io::Result<(OwnedFd, IcmpKind)> {
        let ip = match self.target(dst) {
            Target::Host(ip) => ip,
            Target::Refused => return Err(self.refused("ping", SocketAddr::new(dst, 0), None)),
            _ => return Err(unreachable()),
        };
        let kind = if ip.is_ipv6() { self.icmp6_kind } else { self.icmp_kind };
        let Some(kind) = kind else {
            // Said once, when it first matters: many users never ping.
            if !self.told_no_icmp {
                self.told_no_icmp = true;
                tracing::warn!(
                    "the guest pings {dst}, but this host gives usernet neither ping sockets \
                     (sysctl net.ipv4.ping_group_range must include its group) nor raw sockets: \
                     echo requests are dropped"
                );
            }
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        };
        let fd = match kind {
            IcmpKind::Ping => sock::socket_for(ip, libc::SOCK_DGRAM, icmp_proto(ip.is_ipv6()))?,
            IcmpKind::Raw => sock::socket_for(ip, libc::SOCK_RAW, icmp_proto(ip.is_ipv6()))?,
        };
        sock::connect(fd.as_fd(), SocketAddr::new(ip, 0))?;
        Ok((fd, kind))
    }
}

/// Whether the kernel segments UDP sends (UDP_SEGMENT, Linux 4.18). An older one ignores
/// the control message and sends the whole buffer as one datagram, so it is asked first.
pub(super) fn probe_udp_segment() -> bool {
    let Ok(fd) = sock::socket_for(Ipv4Addr::UNSPECIFIED.into(), libc::SOCK_DGRAM, 0) else { return false };
    let ok = sock::set_int(fd.as_fd(), libc::SOL_UDP, sock::UDP_SEGMENT, 1400).is_ok();
    if !ok {
        tracing::debug!("this kernel does not segment UDP sends: each datagram goes on its own");
    }
    ok
}

fn icmp_proto(v6: bool) -> libc::c_int {
    if v6 { libc::IPPROTO_ICMPV6 } else { libc::IPPROTO_ICMP }
}

/// Which kind of ICMP (or ICMPv6) socket this process may open: ping sockets first, raw
/// as root.
fn probe_icmp(v6: bool) -> Option<IcmpKind> {
    let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    if sock::socket_for(any, libc::SOCK_DGRAM, icmp_proto(v6)).is_ok() {
        Some(IcmpKind::Ping)
    } else if sock::socket_for(any, libc::SOCK_RAW, icmp_proto(v6)).is_ok() {
        Some(IcmpKind::Raw)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(cfg: &NetConfig, ip: &str) -> &'static str {
        match target(cfg, ip.parse().unwrap()) {
            Target::Host(IpAddr::V6(to)) if to.is_loopback() => "host-loopback6",
            Target::Host(IpAddr::V4(to)) if to.is_loopback() => "host-loopback4",
            Target::Host(_) => "as-is",
            Target::Gateway => "gateway",
            Target::Unreachable => "unreachable",
            Target::Refused => "refused",
        }
    }

    /// slirp4netns's layout: the host and the gateway are one address (the host wins, as
    /// for IPv4), DNS another.
    #[test]
    fn ipv6_destinations_in_slirp4netns_layout() {
        let mut net = crate::config::Ipv6Net::new("fd00::".parse().unwrap());
        (net.gateway, net.host, net.dns) = (net.at(2), net.at(2), net.at(3));
        let cfg = NetConfig { v6: Some(net), ..NetConfig::default() };
        assert_eq!(t(&cfg, "fd00::2"), "host-loopback6");
        assert_eq!(t(&cfg, "fd00::3"), "gateway");
        assert_eq!(t(&cfg, "fe80::1"), "gateway");
        assert!(cfg.is_own_address6("fd00::3".parse().unwrap()));
    }

    /// pasta's `--map-host-loopback ADDR6` and `--map-guest-addr ADDR6`: addresses of the /64
    /// (or beyond it) that stand for the host's [::1] and its own address, whether or not the
    /// host address leads to the loopback; usernet answers neighbour discovery for them.
    #[test]
    fn ipv6_host_aliases() {
        let net = crate::config::Ipv6Net::new("fc00::".parse().unwrap());
        let host_own: Ipv6Addr = "2001:db8::7".parse().unwrap();
        let cfg = NetConfig {
            v6: Some(net),
            host_loopback: false,
            host_aliases6: vec![
                (net.at(5), Ipv6Addr::LOCALHOST),
                (net.at(2), host_own),
                ("fd99::1".parse().unwrap(), Ipv6Addr::LOCALHOST),
            ],
            ..NetConfig::default()
        };
        assert_eq!(t(&cfg, "fc00::5"), "host-loopback6");
        assert_eq!(t(&cfg, "fd99::1"), "host-loopback6");
        assert!(matches!(target(&cfg, "fc00::2".parse().unwrap()), Target::Host(IpAddr::V6(to)) if to == host_own));
        assert_eq!(t(&cfg, "fc00::254"), "refused", "the host address stays closed");
        assert_eq!(t(&cfg, "fc00::6"), "unreachable");
        for own in ["fc00::5", "fc00::2", "fd99::1"] {
            assert!(cfg.is_own_address6(own.parse().unwrap()), "{own}");
        }
        assert!(!cfg.is_own_address6("fc00::6".parse().unwrap()));
    }

    #[test]
    fn ipv6_destinations() {
        let cfg = NetConfig::default();
        assert_eq!(t(&cfg, "fd75:7365:726e::254"), "host-loopback6", "the host address is the host's [::1]");
        assert_eq!(t(&cfg, "fd75:7365:726e::1"), "gateway");
        assert_eq!(t(&cfg, "fe80::1"), "gateway");
        assert_eq!(t(&cfg, "2001:db8::1"), "as-is", "beyond the prefix: through the host's routes");
        for local in ["::1", "::", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "::10.0.0.1"] {
            assert_eq!(t(&cfg, local), "refused", "{local}: the host's loopback, or IPv4 in disguise");
        }
        for nobody in ["fd75:7365:726e::9", "fe80::9", "ff02::1"] {
            assert_eq!(t(&cfg, nobody), "unreachable", "{nobody}");
        }
        let closed = NetConfig { host_loopback: false, ..NetConfig::default() };
        assert_eq!(t(&closed, "fd75:7365:726e::254"), "refused");
        // The rules judge the IPv6 host address as 127.0.0.1, as the IPv4 one.
        let rules = crate::policy::Rules::parse(&[] as &[&str], &["127.0.0.1/32:5432"], &[] as &[&str]).unwrap();
        let denying =
            NetConfig { policy: std::sync::Arc::new(crate::policy::Policy::new(rules)), ..NetConfig::default() };
        let host6: SocketAddr = "[fd75:7365:726e::254]:5432".parse().unwrap();
        assert!(admit(&denying, Via::Tcp, host6, None).is_err());
        assert!(admit(&denying, Via::Tcp, "[fd75:7365:726e::254]:5433".parse().unwrap(), None).is_ok());
        let v4_only = NetConfig { v6: None, ..NetConfig::default() };
        assert_eq!(t(&v4_only, "2001:db8::1"), "unreachable");
        assert_eq!(t(&cfg, "192.168.65.254"), "host-loopback4");
    }
}
