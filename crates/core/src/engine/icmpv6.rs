//! ICMPv6 from the guests: neighbour discovery for usernet's own addresses, router
//! discovery, and echo.
//!
//! # Theory of operation
//!
//! usernet is the router of the virtual network's IPv6 /64 (`NetConfig::v6`), as it is the
//! IPv4 gateway. It never runs a neighbour cache of its own beyond the switch's table of
//! guest MACs, and answers only for its own addresses: the gateway's link-local fe80::1
//! (the source of its advertisements, so the guests' next hop), the gateway's ::1 and the
//! host's ::254 (`NetConfig::is_own_address6`).
//!
//! - A neighbour solicitation for one of them gets an advertisement with the gateway's MAC
//!   and the router flag. A duplicate address detection probe (from ::) for one of them
//!   gets an advertisement to all nodes, so no guest can take usernet's addresses; a probe
//!   for any other address gets nothing, so the guest keeps the address it chose.
//! - A router solicitation gets a router advertisement at once, to the guest that asked;
//!   all nodes get one when a link comes up and every [`RA_INTERVAL`]. The advertisement
//!   carries the prefix (on-link, for SLAAC), the link's MTU, the gateway as DNS server
//!   (RDNSS) and the host's search domains (DNSSL), so a guest needs no DHCPv6 at all; its
//!   O flag says that stateless DHCPv6 gives them too, for guests that ask that way.
//! - An echo request to usernet's gateway addresses is answered here; to the host address or
//!   beyond, it goes through a host ping socket as over IPv4 (`Engine::echo_through_host`).
//! - pasta's `--no-ra` and `--no-ndp` (`NetConfig::ipv6_services`) silence the
//!   advertisements of either kind: the guest's IPv6 is then configured otherwise.
//! - What a guest may not send (a router advertisement, a redirect) and what is invalid (a
//!   bad checksum, a discovery message whose hop limit is not 255, a malformed option) is
//!   dropped and counted (`usernet_dropped_frames_total{reason="icmpv6"}`). The rest (the
//!   guests' own advertisements, errors) teaches the switch through the frame's source,
//!   and goes no further.

use std::net::Ipv6Addr;
use std::time::{Duration, Instant};

use usernet_wire::icmp::IcmpHeader;
use usernet_wire::icmpv6::{self, Icmpv6Header};
use usernet_wire::ipv6::Ipv6Header;
use usernet_wire::ndp::{self, NeighborAdvert, NeighborSolicit, PrefixInfo, RouterAdvert, RouterSolicit};

use super::Engine;
use super::dispatch::Addrs;
use super::metrics::DropReason;
use super::switch::ICMP_DATA_OFF;
use crate::config::GATEWAY_LINK_LOCAL;

/// How often all nodes get an unsolicited router advertisement (RFC 4861 allows 4 s to
/// 1800 s; the lifetimes below are several of these).
pub const RA_INTERVAL: Duration = Duration::from_secs(300);
/// Advertisements to all nodes are at least this far apart (RFC 4861 section 6.2.6's
/// MIN_DELAY_BETWEEN_RAS): a guest soliciting from no address over and over, or links
/// coming up in a burst, cannot make usernet flood the network.
pub const MIN_MULTICAST_GAP: Duration = Duration::from_secs(3);
/// How long a guest keeps usernet as its default router without a new advertisement.
const ROUTER_LIFETIME_S: u16 = 1800;
/// Lifetimes of the prefix's addresses (RFC 4861's defaults are 30 and 7 days; usernet
/// repeats its advertisements far more often than these).
const VALID_LIFETIME_S: u32 = 86400;
const PREFERRED_LIFETIME_S: u32 = 14400;
/// Lifetime of the DNS options: three intervals, as RFC 8106 section 5.1 advises.
const DNS_LIFETIME_S: u32 = 3 * RA_INTERVAL.as_secs() as u32;

impl Engine {
    pub(super) fn on_icmpv6(&mut self, ip: &Ipv6Header, message: &[u8], src_mac: [u8; 6], now: Instant) {
        let Some((h, data)) = Icmpv6Header::parse(message, ip.src, ip.dst) else {
            self.switch.drop_in(DropReason::Icmpv6);
            return;
        };
        let ndp = (icmpv6::TYPE_ROUTER_SOLICIT..=icmpv6::TYPE_REDIRECT).contains(&h.kind);
        if ndp && ip.hop_limit != 255 {
            // RFC 4861 section 6.1.1 and 7.1.1: not from this link, so not to be believed.
            self.switch.drop_in(DropReason::Icmpv6);
            return;
        }
        match h.kind {
            icmpv6::TYPE_NEIGHBOR_SOLICIT => match NeighborSolicit::parse(message) {
                Some(ns) => self.on_neighbor_solicit(ip, &ns, src_mac),
                None => self.switch.drop_in(DropReason::Icmpv6),
            },
            icmpv6::TYPE_ROUTER_SOLICIT => match RouterSolicit::parse(message) {
                // A solicitation from an address gets its answer alone; one from none (a
                // guest that has no address yet) makes the next advertisement to all nodes
                // due, at most one every MIN_MULTICAST_GAP.
                Some(_) if !ip.src.is_unspecified() => self.advertise_router(Some((ip.src, src_mac))),
                Some(_) => {
                    let soonest = self.last_multicast_advert.map_or(now, |t| t + MIN_MULTICAST_GAP);
                    self.next_router_advert =
                        Some(self.next_router_advert.map_or(soonest, |t| t.min(soonest.max(now))));
                }
                None => self.switch.drop_in(DropReason::Icmpv6),
            },
            icmpv6::TYPE_NEIGHBOR_ADVERT if NeighborAdvert::parse(message).is_none() => {
                self.switch.drop_in(DropReason::Icmpv6);
            }
            icmpv6::TYPE_ROUTER_ADVERT | icmpv6::TYPE_REDIRECT => self.switch.drop_in(DropReason::Icmpv6),
            icmpv6::TYPE_ECHO_REQUEST => self.on_echo_request6(ip, h, data, message, now),
            _ => {}
        }
    }

    fn on_neighbor_solicit(&mut self, ip: &Ipv6Header, ns: &NeighborSolicit, src_mac: [u8; 6]) {
        if !self.cfg.ipv6_services.neighbour_adverts || !self.cfg.is_own_address6(ns.target) {
            return;
        }
        let dad = ip.src.is_unspecified();
        let na = NeighborAdvert {
            router: true,
            solicited: !dad,
            override_: true,
            target: ns.target,
            target_lladdr: Some(self.cfg.gateway_mac),
        };
        let n = na.emit(self.switch.l4_buf());
        if dad {
            // The prober has no address yet: every node hears that this one is taken.
            self.switch.send_icmpv6_message(ns.target, ndp::ALL_NODES, n, None);
        } else {
            // To the frame's sender: a link-layer option naming another MAC does not steer it.
            self.switch.send_icmpv6_message(ns.target, ip.src, n, Some(src_mac));
        }
    }

    fn on_echo_request6(&mut self, ip: &Ipv6Header, h: Icmpv6Header, data: &[u8], message: &[u8], now: Instant) {
        if ip.dst.is_multicast() || !self.guest_addr6(ip.src) {
            return;
        }
        let gateway = self.cfg.v6.is_some_and(|n| ip.dst == n.gateway) || ip.dst == GATEWAY_LINK_LOCAL;
        if !gateway {
            let addrs = Addrs { src: ip.src.into(), dst: ip.dst.into() };
            self.echo_through_host(addrs, h.ident(), message, now);
            return;
        }
        // A request that came in fragments is answered whole, in fragments too.
        let len = data.len().min(super::switch::max_l4_len(true) - icmpv6::HEADER_LEN);
        self.switch.buf()[ICMP_DATA_OFF..ICMP_DATA_OFF + len].copy_from_slice(&data[..len]);
        let reply = IcmpHeader { kind: icmpv6::TYPE_ECHO_REPLY, code: 0, rest: h.rest };
        self.switch.send_icmpv6(ip.dst, ip.src, &reply, len, None);
    }

    /// Sends a router advertisement: to the guest that solicited it (`to`: its address and
    /// MAC; an unspecified address means all nodes), or to all nodes.
    pub(super) fn advertise_router(&mut self, to: Option<(Ipv6Addr, [u8; 6])>) {
        let Some(ra) = self.router_advert() else { return };
        let n = ra.emit(self.switch.l4_buf());
        match to {
            Some((ip, mac)) if !ip.is_unspecified() => {
                self.switch.send_icmpv6_message(GATEWAY_LINK_LOCAL, ip, n, Some(mac));
            }
            _ => self.switch.send_icmpv6_message(GATEWAY_LINK_LOCAL, ndp::ALL_NODES, n, None),
        }
    }

    /// The unsolicited advertisement when it is due (a link came up, or [`RA_INTERVAL`]
    /// passed): called once per round of the loop.
    pub(super) fn advertise_router_when_due(&mut self, now: Instant) {
        // (Of a set of engines, engine 0 alone speaks for the router: see shard.rs.)
        if self.cfg.v6.is_none() || self.next_router_advert.is_some_and(|t| now < t) || self.shard_index() != 0 {
            return;
        }
        if let Some(last) = self.last_multicast_advert
            && now < last + MIN_MULTICAST_GAP
        {
            // Links coming up in a burst: one advertisement for them all.
            self.next_router_advert = Some(last + MIN_MULTICAST_GAP);
            return;
        }
        self.next_router_advert = Some(now + RA_INTERVAL);
        self.last_multicast_advert = Some(now);
        if self.switch.links.iter().flatten().next().is_some() {
            self.advertise_router(None);
        }
    }

    /// What usernet advertises (None with `--ipv4-only`, or with router advertisements
    /// turned off).
    fn router_advert(&self) -> Option<RouterAdvert> {
        let net = self.cfg.v6.filter(|_| self.cfg.ipv6_services.router_adverts)?;
        let search = self.cfg.host_dns.upstreams().search.clone();
        Some(RouterAdvert {
            cur_hop_limit: 64,
            managed: false,
            // Stateless DHCPv6 answers too (services/dhcp6.rs): the same DNS server and list.
            other: self.cfg.ipv6_services.dhcpv6,
            router_lifetime: ROUTER_LIFETIME_S,
            reachable_ms: 0,
            retrans_ms: 0,
            source_lladdr: Some(self.cfg.gateway_mac),
            mtu: Some(self.cfg.mtu),
            prefixes: vec![PrefixInfo {
                prefix: net.prefix,
                prefix_len: 64,
                on_link: true,
                autonomous: true,
                valid_lifetime: VALID_LIFETIME_S,
                preferred_lifetime: PREFERRED_LIFETIME_S,
            }],
            rdnss: Some((DNS_LIFETIME_S, vec![net.dns])),
            dnssl: (!search.is_empty()).then_some((DNS_LIFETIME_S, search)),
        })
    }
}
