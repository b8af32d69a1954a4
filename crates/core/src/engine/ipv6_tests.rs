//! The engine over IPv6, with a recording link and socketpair "hosts": neighbour and
//! router discovery, ping of the gateway, TCP and UDP translated both ways, errors, and
//! what a guest may not send.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;

use super::synthetic::{PairDialer, RecordingLink};
use super::*;
use crate::config::{GATEWAY_LINK_LOCAL, GATEWAY_MAC, Ipv6Net};
use usernet_wire::ethernet::EthernetHeader;
use usernet_wire::icmpv6::{self, Icmpv6Header};
use usernet_wire::ipv6::Ipv6Header;
use usernet_wire::ndp::{self, NeighborAdvert, NeighborSolicit, RouterAdvert, RouterSolicit};
use usernet_wire::tcp::{ACK, FIN, RST, SYN, TcpHeader};
use usernet_wire::udp::UdpHeader;
use usernet_wire::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, ethernet, ipv6};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn net() -> Ipv6Net {
    Ipv6Net::default()
}

fn guest_ip() -> Ipv6Addr {
    net().guest
}

fn guest_ll() -> Ipv6Addr {
    "fe80::2".parse().unwrap()
}

fn remote() -> SocketAddr {
    "[2001:db8::10]:80".parse().unwrap()
}

fn engine_with(cfg: NetConfig) -> (Engine, RecordingLink, PairDialer) {
    let link = RecordingLink::default();
    let dialer = PairDialer::default();
    let mut e = Engine::with_dialer(Arc::new(cfg), Box::new(dialer.clone()), None).unwrap();
    e.add_link(Box::new(link.clone()));
    (e, link, dialer)
}

fn engine() -> (Engine, RecordingLink, PairDialer) {
    engine_with(NetConfig::default())
}

/// A guest frame carrying `l4` over IPv6 with hop limit `hops`, to `dst_mac`.
fn frame6(proto: u8, src: Ipv6Addr, dst: Ipv6Addr, hops: u8, dst_mac: [u8; 6], l4: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; ethernet::HEADER_LEN + ipv6::HEADER_LEN + l4.len()];
    EthernetHeader { dst: dst_mac, src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_IPV6 }.emit(&mut f);
    let mut h = Ipv6Header::new(src, dst, proto, l4.len());
    h.hop_limit = hops;
    h.emit(&mut f[ethernet::HEADER_LEN..]);
    f[ethernet::HEADER_LEN + ipv6::HEADER_LEN..].copy_from_slice(l4);
    f
}

/// An NDP message (as `ndp` emits it) with its checksum, in a frame.
fn ndp_frame(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hops: u8,
    dst_mac: [u8; 6],
    emit: impl FnOnce(&mut [u8]) -> usize,
) -> Vec<u8> {
    let mut m = vec![0u8; 256];
    let n = emit(&mut m);
    m.truncate(n);
    icmpv6::fill_checksum(&mut m, src, dst);
    frame6(PROTO_ICMPV6, src, dst, hops, dst_mac, &m)
}

/// The IPv6 packets the engine sent since the last call: Ethernet destination, IPv6
/// header, upper-layer payload.
fn take6(link: &RecordingLink) -> Vec<([u8; 6], Ipv6Header, Vec<u8>)> {
    std::mem::take(&mut *link.sent.borrow_mut())
        .iter()
        .filter_map(|f| {
            let (eth, p) = EthernetHeader::parse(f)?;
            if eth.ethertype != ethernet::ETHERTYPE_IPV6 {
                return None;
            }
            assert_eq!(eth.src, GATEWAY_MAC);
            let (ip, p) = Ipv6Header::parse(p).expect("a valid IPv6 header");
            Some((eth.dst, ip, p.to_vec()))
        })
        .collect()
}

fn tcp6(h: &TcpHeader, payload: &[u8]) -> Vec<u8> {
    let hl = h.emit_len();
    let mut seg = vec![0u8; hl + payload.len()];
    seg[hl..].copy_from_slice(payload);
    h.emit(&mut seg, payload.len(), guest_ip().into(), remote().ip());
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    frame6(PROTO_TCP, guest_ip(), dst, 64, GATEWAY_MAC, &seg)
}

/// A router advertisement such as a guest playing router would send.
fn guest_router_advert(mac: [u8; 6]) -> RouterAdvert {
    RouterAdvert {
        cur_hop_limit: 64,
        managed: false,
        other: false,
        router_lifetime: 1800,
        reachable_ms: 0,
        retrans_ms: 0,
        source_lladdr: Some(mac),
        mtu: None,
        prefixes: vec![],
        rdnss: None,
        dnssl: None,
    }
}

fn seg(seq: u32, ack: u32, flags: u8) -> TcpHeader {
    TcpHeader { src_port: 40000, dst_port: 80, seq, ack, flags, window: 65535, ..Default::default() }
}

/// The TCP segments sent to the guest, their checksums checked against etherparse's.
fn take_tcp6(link: &RecordingLink) -> Vec<(TcpHeader, Vec<u8>)> {
    take6(link)
        .into_iter()
        .filter(|(_, ip, _)| ip.protocol == PROTO_TCP)
        .map(|(_, ip, p)| {
            let (h, d) = TcpHeader::parse(&p).unwrap();
            let e = etherparse::TcpHeaderSlice::from_slice(&p).unwrap().to_header();
            assert_eq!(e.calc_checksum_ipv6_raw(ip.src.octets(), ip.dst.octets(), d).unwrap(), e.checksum);
            assert_eq!((IpAddr::V6(ip.src), IpAddr::V6(ip.dst)), (remote().ip(), IpAddr::V6(guest_ip())));
            (h, d.to_vec())
        })
        .collect()
}

#[test]
fn a_router_solicitation_gets_the_prefix_mtu_and_dns() {
    let cfg = NetConfig { mtu: 1500, ..NetConfig::default() };
    cfg.host_dns.set_upstreams(crate::config::Upstreams {
        search: vec!["corp.example".into()],
        ..crate::config::Upstreams::default()
    });
    let (mut e, link, _) = engine_with(cfg);
    link.sent.borrow_mut().clear();
    let rs = RouterSolicit { source_lladdr: Some(GUEST_MAC) };
    let f = ndp_frame(guest_ll(), ndp::ALL_ROUTERS, 255, ndp::multicast_mac(ndp::ALL_ROUTERS), |b| rs.emit(b));
    e.on_frame(0, &f, Instant::now());
    let out = take6(&link);
    assert_eq!(out.len(), 1, "one advertisement");
    let (mac, ip, msg) = &out[0];
    assert_eq!(*mac, GUEST_MAC, "to the guest that asked");
    assert_eq!((ip.src, ip.dst, ip.hop_limit), (GATEWAY_LINK_LOCAL, guest_ll(), 255));
    Icmpv6Header::parse(msg, ip.src, ip.dst).expect("a valid checksum");
    let ra = RouterAdvert::parse(msg).unwrap();
    assert!(ra.router_lifetime > 0, "usernet is the default router");
    assert_eq!(ra.source_lladdr, Some(GATEWAY_MAC));
    assert_eq!(ra.mtu, Some(1500));
    assert_eq!(ra.prefixes.len(), 1);
    let p = ra.prefixes[0];
    assert_eq!((p.prefix, p.prefix_len, p.on_link, p.autonomous), (net().prefix, 64, true, true));
    assert!(p.preferred_lifetime <= p.valid_lifetime);
    assert!(!ra.managed && ra.other, "addresses by SLAAC, DNS by stateless DHCPv6 too");
    assert_eq!(ra.rdnss.unwrap().1, vec![net().gateway]);
    assert_eq!(ra.dnssl.unwrap().1, vec!["corp.example".to_string()]);
}

#[test]
fn all_nodes_hear_an_advertisement_when_a_link_comes_up_and_then_every_interval() {
    let (mut e, link, _) = engine();
    let t0 = Instant::now();
    e.advertise_router_when_due(t0);
    let out = take6(&link);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1.dst), (ndp::multicast_mac(ndp::ALL_NODES), ndp::ALL_NODES));
    e.advertise_router_when_due(t0 + std::time::Duration::from_secs(1));
    assert!(take6(&link).is_empty(), "not again at once");
    e.advertise_router_when_due(t0 + super::icmpv6::RA_INTERVAL);
    assert_eq!(take6(&link).len(), 1, "again after the interval");
}

#[test]
fn neighbour_solicitations_for_usernet_addresses_are_answered() {
    let (mut e, link, _) = engine();
    link.sent.borrow_mut().clear();
    for target in [GATEWAY_LINK_LOCAL, net().gateway, net().host] {
        let ns = NeighborSolicit { target, source_lladdr: Some(GUEST_MAC) };
        let group = ndp::solicited_node(target);
        let f = ndp_frame(guest_ll(), group, 255, ndp::multicast_mac(group), |b| ns.emit(b));
        e.on_frame(0, &f, Instant::now());
        let out = take6(&link);
        assert_eq!(out.len(), 1, "an answer for {target}");
        let (mac, ip, msg) = &out[0];
        assert_eq!((*mac, ip.src, ip.dst, ip.hop_limit), (GUEST_MAC, target, guest_ll(), 255));
        Icmpv6Header::parse(msg, ip.src, ip.dst).expect("a valid checksum");
        let na = NeighborAdvert::parse(msg).unwrap();
        assert_eq!(na.target, target);
        assert_eq!(na.target_lladdr, Some(GATEWAY_MAC));
        assert!(na.router && na.solicited && na.override_);
    }
}

#[test]
fn duplicate_address_detection_is_answered_only_for_usernet_addresses() {
    let (mut e, link, _) = engine();
    link.sent.borrow_mut().clear();
    let probe = |target: Ipv6Addr| {
        let ns = NeighborSolicit { target, source_lladdr: None };
        let group = ndp::solicited_node(target);
        ndp_frame(Ipv6Addr::UNSPECIFIED, group, 255, ndp::multicast_mac(group), |b| ns.emit(b))
    };
    // The guest probes its own address: nobody has it, so no answer, and it keeps it.
    e.on_frame(0, &probe(guest_ip()), Instant::now());
    assert!(take6(&link).is_empty());
    // A guest that would take the gateway's address hears that it is taken, as every node does.
    e.on_frame(0, &probe(net().gateway), Instant::now());
    let out = take6(&link);
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].0, out[0].1.dst), (ndp::multicast_mac(ndp::ALL_NODES), ndp::ALL_NODES));
    let na = NeighborAdvert::parse(&out[0].2).unwrap();
    assert!(!na.solicited && na.target == net().gateway);
}

#[test]
fn discovery_messages_from_off_link_or_not_for_guests_are_dropped_and_counted() {
    use super::metrics::DropReason;
    let (mut e, link, _) = engine();
    link.sent.borrow_mut().clear();
    let ns = NeighborSolicit { target: net().gateway, source_lladdr: Some(GUEST_MAC) };
    let group = ndp::solicited_node(net().gateway);
    // A hop limit below 255: it came from beyond the link.
    e.on_frame(0, &ndp_frame(guest_ll(), group, 64, ndp::multicast_mac(group), |b| ns.emit(b)), Instant::now());
    // A router advertisement from a guest.
    let ra = guest_router_advert(GUEST_MAC);
    e.on_frame(
        0,
        &ndp_frame(guest_ll(), ndp::ALL_NODES, 255, ndp::multicast_mac(ndp::ALL_NODES), |b| ra.emit(b)),
        Instant::now(),
    );
    // A bad checksum.
    let mut bad = ndp_frame(guest_ll(), group, 255, ndp::multicast_mac(group), |b| ns.emit(b));
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    e.on_frame(0, &bad, Instant::now());
    assert!(take6(&link).is_empty(), "nothing answered");
    let drops: Vec<_> = e.metrics().counters.drops().collect();
    assert!(drops.contains(&(DropReason::Icmpv6, 3)), "{drops:?}");
}

#[test]
fn the_gateway_answers_ping_over_ipv6() {
    let (mut e, link, _) = engine();
    link.sent.borrow_mut().clear();
    for dst in [net().gateway, GATEWAY_LINK_LOCAL] {
        let mut m = vec![0u8; 8 + 5];
        m[8..].copy_from_slice(b"hello");
        Icmpv6Header::echo(icmpv6::TYPE_ECHO_REQUEST, 0x77, 3).emit(&mut m, 5, guest_ip(), dst);
        e.on_frame(0, &frame6(PROTO_ICMPV6, guest_ip(), dst, 64, GATEWAY_MAC, &m), Instant::now());
        let out = take6(&link);
        assert_eq!(out.len(), 1);
        let (mac, ip, msg) = &out[0];
        assert_eq!((*mac, ip.src, ip.dst), (GUEST_MAC, dst, guest_ip()));
        let (h, data) = Icmpv6Header::parse(msg, ip.src, ip.dst).expect("a valid checksum");
        assert_eq!((h.kind, h.ident(), h.seq(), data), (icmpv6::TYPE_ECHO_REPLY, 0x77, 3, &b"hello"[..]));
    }
}

#[test]
fn tcp_over_ipv6_is_translated_both_ways() {
    let (mut e, link, dialer) = engine();
    let now = Instant::now();
    let mut syn = seg(1000, 0, SYN);
    syn.mss = Some(1440);
    e.on_frame(0, &tcp6(&syn, b""), now);
    let out = take_tcp6(&link);
    assert_eq!(out.len(), 1, "one SYN-ACK");
    let synack = out[0].0;
    assert!(synack.has(SYN) && synack.has(ACK) && synack.ack == 1001);
    // The MSS offered fits the link's MTU with IPv6's larger header.
    assert_eq!(synack.mss, Some((e.switch.mtu - 60) as u16));
    let isn = synack.seq;
    let mut peer = dialer.tcp_peers.borrow_mut().pop().unwrap();
    peer.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    e.on_frame(0, &tcp6(&seg(1001, isn + 1, ACK), b""), now);
    e.on_frame(0, &tcp6(&seg(1001, isn + 1, ACK | usernet_wire::tcp::PSH), b"GET /"), now);
    e.flush_acks(now);
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"GET /");
    peer.write_all(b"200 OK").unwrap();
    e.deliver_readiness(true, false, now);
    let out = take_tcp6(&link);
    let data: Vec<u8> = out.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(data, b"200 OK");
    assert!(out.iter().any(|(h, _)| h.ack == 1006), "the guest's bytes are acknowledged");
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    e.deliver_readiness(true, false, now);
    assert!(take_tcp6(&link).iter().any(|(h, _)| h.has(FIN)), "the host's close reaches the guest");
}

#[test]
fn a_refused_ipv6_connect_is_reset_and_an_unreachable_one_gets_icmpv6() {
    let (mut e, link, _) = engine_with(NetConfig::default());
    // Refused by the dialler: RST|ACK.
    let mut refusing = PairDialer { refuse: true, ..Default::default() };
    e.dialer = Box::new(refusing.clone());
    e.on_frame(0, &tcp6(&seg(1000, 0, SYN), b""), Instant::now());
    let out = take_tcp6(&link);
    assert_eq!(out.len(), 1);
    assert!(out[0].0.has(RST) && out[0].0.ack == 1001);
    // An address of the virtual prefix that is nobody's: unreachable, said by ICMPv6.
    refusing.refuse = false;
    e.dialer = Box::new(refusing);
    let unreachable_dst: Ipv6Addr = "2001:db8::99".parse().unwrap();
    super::flows::tcp::refuse(
        &mut e.switch,
        SocketAddr::new(guest_ip().into(), 40001),
        SocketAddr::new(unreachable_dst.into(), 80),
        7,
        libc::ENETUNREACH,
    );
    let out = take6(&link);
    assert_eq!(out.len(), 1);
    let (_, ip, msg) = &out[0];
    assert_eq!((ip.src, ip.dst), (unreachable_dst, guest_ip()));
    let (h, data) = Icmpv6Header::parse(msg, ip.src, ip.dst).expect("a valid checksum");
    assert_eq!((h.kind, h.code), (icmpv6::TYPE_DEST_UNREACHABLE, icmpv6::CODE_NO_ROUTE));
    // It quotes the guest's packet: its IPv6 header, then the ports and sequence number.
    // (A truncated quote: its header's payload length says more than is quoted.)
    assert_eq!((data[0] >> 4, data[6]), (6, PROTO_TCP));
    assert_eq!(Ipv6Addr::from(<[u8; 16]>::try_from(&data[8..24]).unwrap()), guest_ip());
    assert_eq!(Ipv6Addr::from(<[u8; 16]>::try_from(&data[24..40]).unwrap()), unreachable_dst);
    assert_eq!(&data[40..48], &[0x9c, 0x41, 0, 80, 0, 0, 0, 7]);
}

#[test]
fn udp_over_ipv6_both_ways() {
    let (mut e, link, dialer) = engine();
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    let mut d = vec![0u8; 8 + 4];
    d[8..].copy_from_slice(b"ping");
    UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut d, 4, guest_ip().into(), dst.into());
    e.on_frame(0, &frame6(PROTO_UDP, guest_ip(), dst, 64, GATEWAY_MAC, &d), Instant::now());
    e.udp_batch.flush();
    let peer = dialer.udp_peers.borrow_mut().pop().unwrap();
    let mut got = [0u8; 16];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], b"ping");
    peer.send(b"pong").unwrap();
    let key =
        flows::FlowKey::Udp { guest: SocketAddr::new(guest_ip().into(), 5000), remote: SocketAddr::new(dst.into(), 7) };
    let id = e.flows.lookup(&key).unwrap();
    e.on_socket(id, true, false, false, Instant::now());
    let out = take6(&link);
    assert_eq!(out.len(), 1);
    let (_, ip, p) = &out[0];
    assert_eq!((ip.src, ip.dst, ip.protocol), (dst, guest_ip(), PROTO_UDP));
    let e2 = etherparse::UdpHeaderSlice::from_slice(p).unwrap().to_header();
    assert_eq!(e2.calc_checksum_ipv6_raw(ip.src.octets(), ip.dst.octets(), &p[8..]).unwrap(), e2.checksum);
    assert_eq!(&p[8..], b"pong");
}

/// `l4` behind one Fragment header per entry of `frags` (start, end, more): the fragments of
/// one datagram of `proto`, identification 9, as frames from the guest with hop limit `hops`.
fn fragments6(proto: u8, dst: Ipv6Addr, hops: u8, l4: &[u8], frags: &[(usize, usize, bool)]) -> Vec<Vec<u8>> {
    frags
        .iter()
        .map(|&(start, end, more)| {
            let mut p = vec![0u8; ipv6::FRAGMENT_HEADER_LEN + end - start];
            ipv6::Fragment { offset: start, more, ident: 9 }.emit(proto, &mut p);
            p[ipv6::FRAGMENT_HEADER_LEN..].copy_from_slice(&l4[start..end]);
            frame6(ipv6::EXT_FRAGMENT, guest_ip(), dst, hops, GATEWAY_MAC, &p)
        })
        .collect()
}

/// Over IPv6 as over IPv4 (reassembly.rs, `Switch::fragment`): a guest's datagram in two
/// fragments, the last first, reaches the host whole; a 3,000-byte answer goes back at MTU
/// 1500 in fragments with a Fragment header, one identification, that make it whole. A
/// router solicitation in a fragment is ignored (RFC 6980), and so are Fragment headers
/// nested in the fragmentable part, however deep.
#[test]
fn udp_beyond_the_mtu_goes_in_fragments_over_ipv6() {
    let (mut e, link, dialer) = engine_with(NetConfig { mtu: 1500, ..NetConfig::default() });
    link.sent.borrow_mut().clear();
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    let data: Vec<u8> = (0..3000).map(|i| (i * 7 % 251) as u8).collect();
    let mut d = vec![0u8; 8 + data.len()];
    d[8..].copy_from_slice(&data);
    UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut d, data.len(), guest_ip().into(), dst.into());
    for f in fragments6(PROTO_UDP, dst, 64, &d, &[(1448, d.len(), false), (0, 1448, true)]) {
        e.on_frame(0, &f, Instant::now());
    }
    e.udp_batch.flush();
    let peer = dialer.udp_peers.borrow_mut().pop().unwrap();
    let mut got = vec![0u8; 4000];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &data[..]);

    let reply: Vec<u8> = (0..3000).map(|i| (i * 13 % 253) as u8).collect();
    peer.send(&reply).unwrap();
    let key =
        flows::FlowKey::Udp { guest: SocketAddr::new(guest_ip().into(), 5000), remote: SocketAddr::new(dst.into(), 7) };
    let id = e.flows.lookup(&key).unwrap();
    e.on_socket(id, true, false, false, Instant::now());
    let out = take6(&link);
    assert_eq!(out.len(), 3, "3,008 bytes in fragments of 1,448");
    let mut whole = Vec::new();
    let mut ident = None;
    for (i, (_, ip, p)) in out.iter().enumerate() {
        assert!(ipv6::HEADER_LEN + ipv6::FRAGMENT_HEADER_LEN + p.len() <= 1500);
        let f = ip.fragment.expect("a Fragment header");
        assert_eq!((ip.protocol, f.offset, f.more), (PROTO_UDP, whole.len(), i < 2));
        assert!(ident.is_none_or(|id| id == f.ident));
        ident = Some(f.ident);
        whole.extend_from_slice(p);
    }
    let h = etherparse::UdpHeaderSlice::from_slice(&whole).unwrap().to_header();
    assert_eq!(h.calc_checksum_ipv6_raw(dst.octets(), guest_ip().octets(), &whole[8..]).unwrap(), h.checksum);
    assert_eq!(&whole[8..], &reply[..]);

    // A router solicitation in an atomic fragment, hop limit 255: no advertisement (whole,
    // it gets one: `a_router_solicitation_gets_the_prefix_mtu_and_dns`).
    let rs = RouterSolicit { source_lladdr: Some(GUEST_MAC) };
    let mut m = vec![0u8; 64];
    let n = rs.emit(&mut m);
    m.truncate(n);
    icmpv6::fill_checksum(&mut m, guest_ip(), GATEWAY_LINK_LOCAL);
    for f in fragments6(PROTO_ICMPV6, GATEWAY_LINK_LOCAL, 255, &m, &[(0, m.len(), false)]) {
        e.on_frame(0, &f, Instant::now());
    }
    assert!(take6(&link).is_empty(), "no answer to discovery in a fragment");

    // 5,000 atomic Fragment headers, one in another: refused at the second, not recursed.
    let mut nested = b"payload!".to_vec();
    for _ in 0..5000 {
        let mut p = vec![0u8; ipv6::FRAGMENT_HEADER_LEN];
        ipv6::Fragment { offset: 0, more: false, ident: 1 }.emit(ipv6::EXT_FRAGMENT, &mut p);
        p.extend_from_slice(&nested);
        nested = p;
    }
    let dropped = e.metrics().counters.dropped_count(metrics::DropReason::Fragment);
    e.on_frame(0, &frame6(ipv6::EXT_FRAGMENT, guest_ip(), dst, 64, GATEWAY_MAC, &nested), Instant::now());
    assert_eq!(e.metrics().counters.dropped_count(metrics::DropReason::Fragment), dropped + 1);
}

#[test]
fn ipv4_only_ignores_ipv6_and_advertises_nothing() {
    use super::metrics::DropReason;
    let (mut e, link, _) = engine_with(NetConfig { v6: None, ..NetConfig::default() });
    e.advertise_router_when_due(Instant::now());
    let rs = RouterSolicit { source_lladdr: Some(GUEST_MAC) };
    let f = ndp_frame(guest_ll(), ndp::ALL_ROUTERS, 255, ndp::multicast_mac(ndp::ALL_ROUTERS), |b| rs.emit(b));
    e.on_frame(0, &f, Instant::now());
    e.on_frame(0, &tcp6(&seg(1000, 0, SYN), b""), Instant::now());
    assert!(take6(&link).is_empty());
    let drops: Vec<_> = e.metrics().counters.drops().collect();
    assert!(drops.contains(&(DropReason::Ethertype, 2)), "{drops:?}");
}

/// gvproxy's and vpnkit's networks have no IPv6, and bind guests to their links: a VM's
/// neighbour discovery at boot, from its link-local address, is not taken for a spoof (it
/// was, with a warning for every VM); it is dropped as a protocol the network lacks.
#[test]
fn ipv4_only_with_bound_links_drops_link_local_ipv6_as_ethertype() {
    use super::metrics::DropReason;
    let (mut e, link, _) = engine_with(NetConfig { v6: None, ..NetConfig::default() });
    e.bind_guests_to_links();
    let rs = RouterSolicit { source_lladdr: Some(GUEST_MAC) };
    let f = ndp_frame(guest_ll(), ndp::ALL_ROUTERS, 255, ndp::multicast_mac(ndp::ALL_ROUTERS), |b| rs.emit(b));
    e.on_frame(0, &f, Instant::now());
    assert!(take6(&link).is_empty());
    let drops: Vec<_> = e.metrics().counters.drops().collect();
    assert!(drops.contains(&(DropReason::Ethertype, 1)), "{drops:?}");
    assert!(drops.contains(&(DropReason::Spoofed, 0)), "{drops:?}");
}

#[test]
fn tcp_and_udp_from_a_source_that_is_not_a_guest_address_are_dropped() {
    let (mut e, link, dialer) = engine();
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    for src in [Ipv6Addr::UNSPECIFIED, net().gateway, "ff02::1".parse().unwrap(), "2001:db8::5".parse().unwrap()] {
        let mut d = vec![0u8; 8];
        UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut d, 0, src.into(), dst.into());
        e.on_frame(0, &frame6(PROTO_UDP, src, dst, 64, GATEWAY_MAC, &d), Instant::now());
    }
    e.udp_batch.flush();
    assert!(dialer.udp_peers.borrow().is_empty());
    assert!(take6(&link).is_empty());
}

proptest! {
    /// Whatever a guest sends over IPv6, ICMPv6 above all, the engine does not panic.
    #[test]
    fn arbitrary_ipv6_packets_never_panic(
        proto in prop_oneof![Just(PROTO_ICMPV6), Just(PROTO_TCP), Just(PROTO_UDP), Just(0u8), Just(44u8), any::<u8>()],
        hops in prop_oneof![Just(255u8), any::<u8>()],
        kind in prop_oneof![128u8..=137, any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..200),
        dst in prop_oneof![Just(GATEWAY_LINK_LOCAL), Just(net().gateway), Just(ndp::ALL_ROUTERS), Just("2001:db8::1".parse::<Ipv6Addr>().unwrap())],
        fix_checksum in any::<bool>(),
    ) {
        let (mut e, _link, _) = engine();
        let mut l4 = body.clone();
        if proto == PROTO_ICMPV6 && l4.len() >= 8 {
            l4[0] = kind;
            if fix_checksum {
                icmpv6::fill_checksum(&mut l4, guest_ll(), dst);
            }
        }
        let f = frame6(proto, guest_ll(), dst, hops, GATEWAY_MAC, &l4);
        e.on_frame(0, &f, Instant::now());
        for cut in [0, 13, 14, 20, 53, 54, f.len().saturating_sub(1)] {
            e.on_frame(0, &f[..cut.min(f.len())], Instant::now());
        }
    }
}

/// A guest's DHCPv6 Information-request (transaction [7, 7, 7]) to all servers, in a frame.
fn dhcp6_information_request() -> Vec<u8> {
    use dhcproto::v6::{DhcpOption, Message, MessageType};
    use dhcproto::{Encodable, Encoder};
    let mut m = Message::new_with_id(MessageType::InformationRequest, [7, 7, 7]);
    m.opts_mut().insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 2]));
    let mut body = Vec::new();
    m.encode(&mut Encoder::new(&mut body)).unwrap();
    let all_servers = crate::services::dhcp6::ALL_SERVERS;
    let mut d = vec![0u8; 8 + body.len()];
    d[8..].copy_from_slice(&body);
    UdpHeader { src_port: 546, dst_port: 547 }.emit(&mut d, body.len(), guest_ll().into(), all_servers.into());
    frame6(PROTO_UDP, guest_ll(), all_servers, 1, ndp::multicast_mac(all_servers), &d)
}

#[test]
fn stateless_dhcpv6_answers_the_guest_that_asks() {
    use dhcproto::v6::{DhcpOption, Message, MessageType, OptionCode};
    use dhcproto::{Decodable, Decoder};
    let (mut e, link, _) = engine();
    link.sent.borrow_mut().clear();
    e.on_frame(0, &dhcp6_information_request(), Instant::now());
    let out = take6(&link);
    assert_eq!(out.len(), 1);
    let (mac, ip, p) = &out[0];
    assert_eq!((*mac, ip.src, ip.dst, ip.protocol), (GUEST_MAC, GATEWAY_LINK_LOCAL, guest_ll(), PROTO_UDP));
    let (h, payload) = UdpHeader::parse(p).unwrap();
    assert_eq!((h.src_port, h.dst_port), (547, 546));
    let reply = Message::decode(&mut Decoder::new(payload)).unwrap();
    assert_eq!((reply.msg_type(), reply.xid()), (MessageType::Reply, [7, 7, 7]));
    assert_eq!(
        reply.opts().get(OptionCode::DomainNameServers),
        Some(&DhcpOption::DomainNameServers(vec![net().gateway]))
    );
}

/// Frames of a guest on link `link` with MAC `mac`.
fn frame6_from(
    mac: [u8; 6],
    proto: u8,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hops: u8,
    dst_mac: [u8; 6],
    l4: &[u8],
) -> Vec<u8> {
    let mut f = frame6(proto, src, dst, hops, dst_mac, l4);
    f[6..12].copy_from_slice(&mac);
    f
}

fn ndp_from(mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, emit: impl FnOnce(&mut [u8]) -> usize) -> Vec<u8> {
    let mut m = vec![0u8; 256];
    let n = emit(&mut m);
    m.truncate(n);
    icmpv6::fill_checksum(&mut m, src, dst);
    frame6_from(mac, PROTO_ICMPV6, src, dst, 255, ndp::multicast_mac(dst), &m)
}

/// `serve` (guests bound to their links): over IPv6 no guest speaks for usernet or for
/// another guest, nor plays router.
#[test]
fn bound_guests_cannot_speak_for_usernet_or_each_other_over_ipv6() {
    use super::metrics::DropReason;
    let (a_mac, b_mac) = ([0x02, 0, 0, 0, 0, 0xa], [0x02, 0, 0, 0, 0, 0xb]);
    let (a_link, b_link) = (RecordingLink::default(), RecordingLink::default());
    let mut e = Engine::with_dialer(Arc::new(NetConfig::default()), Box::new(PairDialer::default()), None).unwrap();
    e.bind_guests_to_links();
    e.add_link(Box::new(a_link.clone()));
    e.add_link(Box::new(b_link.clone()));
    let now = Instant::now();
    let a_ip: Ipv6Addr = "fd75:7365:726e::a".parse().unwrap();
    // A uses its address first: it is A's.
    let hello = |mac, src: Ipv6Addr| {
        let mut m = vec![0u8; 8 + 4];
        Icmpv6Header::echo(icmpv6::TYPE_ECHO_REQUEST, 1, 1).emit(&mut m, 4, src, net().gateway);
        frame6_from(mac, PROTO_ICMPV6, src, net().gateway, 64, GATEWAY_MAC, &m)
    };
    e.on_frame(0, &hello(a_mac, a_ip), now);
    let spoofed =
        |e: &Engine| e.metrics().counters.drops().find(|(r, _)| *r == DropReason::Spoofed).map_or(0, |(_, n)| n);
    assert_eq!(spoofed(&e), 0);
    b_link.sent.borrow_mut().clear();
    // B cannot use it, nor usernet's addresses.
    e.on_frame(1, &hello(b_mac, a_ip), now);
    e.on_frame(1, &hello(b_mac, net().gateway), now);
    e.on_frame(1, &hello(b_mac, GATEWAY_LINK_LOCAL), now);
    assert_eq!(spoofed(&e), 3);
    assert!(take6(&b_link).is_empty(), "no reply to a spoofed source");
    // B's advertisement that it is fe80::1, or A: dropped, and A never hears them.
    a_link.sent.borrow_mut().clear();
    let b_ll: Ipv6Addr = "fe80::b".parse().unwrap();
    for target in [GATEWAY_LINK_LOCAL, a_ip] {
        let na = NeighborAdvert { router: true, solicited: false, override_: true, target, target_lladdr: Some(b_mac) };
        e.on_frame(1, &ndp_from(b_mac, b_ll, ndp::ALL_NODES, |b| na.emit(b)), now);
    }
    // A router advertisement from B, and a solicitation naming A's MAC: dropped too.
    let ra = guest_router_advert(b_mac);
    e.on_frame(1, &ndp_from(b_mac, b_ll, ndp::ALL_NODES, |b| ra.emit(b)), now);
    let ns = NeighborSolicit { target: a_ip, source_lladdr: Some(a_mac) };
    e.on_frame(1, &ndp_from(b_mac, b_ll, ndp::solicited_node(a_ip), |b| ns.emit(b)), now);
    assert_eq!(spoofed(&e), 7);
    assert!(a_link.sent.borrow().is_empty(), "nothing of B's reached A");
    // B's own neighbour advertisement for its own address goes through to A.
    let own =
        NeighborAdvert { router: false, solicited: false, override_: true, target: b_ll, target_lladdr: Some(b_mac) };
    e.on_frame(1, &ndp_from(b_mac, b_ll, ndp::ALL_NODES, |b| own.emit(b)), now);
    assert_eq!(spoofed(&e), 7);
    assert_eq!(a_link.sent.borrow().len(), 1);
    // A link holds at most MAX_IPV6_PER_LINK addresses: past them, its oldest is free again
    // (B may take it then), and A keeps working with its new ones.
    for i in 0..super::switch::MAX_IPV6_PER_LINK as u16 {
        e.on_frame(0, &hello(a_mac, Ipv6Addr::new(0xfd75, 0x7365, 0x726e, 0, 0, 0, 1, i)), now);
    }
    assert_eq!(spoofed(&e), 7, "A's new addresses are all its own");
    e.on_frame(1, &hello(b_mac, a_ip), now);
    assert_eq!(spoofed(&e), 7, "A's first address was freed: B may take it");
    e.on_frame(0, &hello(a_mac, a_ip), now);
    assert_eq!(spoofed(&e), 8, "and then it is B's");
}

#[test]
fn solicitations_from_no_address_make_at_most_one_advertisement_every_few_seconds() {
    let (mut e, link, _) = engine();
    let t0 = Instant::now();
    e.advertise_router_when_due(t0);
    assert_eq!(take6(&link).len(), 1, "the link came up");
    let rs = RouterSolicit { source_lladdr: None };
    let f =
        ndp_frame(Ipv6Addr::UNSPECIFIED, ndp::ALL_ROUTERS, 255, ndp::multicast_mac(ndp::ALL_ROUTERS), |b| rs.emit(b));
    for i in 0..100u64 {
        let t = t0 + std::time::Duration::from_millis(10 * i);
        e.on_frame(0, &f, t);
        e.advertise_router_when_due(t);
    }
    assert!(take6(&link).is_empty(), "not within the gap");
    let later = t0 + super::icmpv6::MIN_MULTICAST_GAP;
    e.advertise_router_when_due(later);
    assert_eq!(take6(&link).len(), 1, "one, once the gap has passed");
}

#[test]
fn a_link_local_source_reaches_no_further_than_the_link() {
    let (mut e, link, dialer) = engine();
    let mut syn = seg(1000, 0, SYN);
    syn.mss = Some(1440);
    let hl = syn.emit_len();
    let mut s = vec![0u8; hl];
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    syn.emit(&mut s, 0, guest_ll().into(), dst.into());
    e.on_frame(0, &frame6(PROTO_TCP, guest_ll(), dst, 64, GATEWAY_MAC, &s), Instant::now());
    assert!(dialer.tcp_peers.borrow().is_empty());
    let out = take6(&link);
    assert_eq!(out.len(), 1, "an ICMPv6 error, no SYN-ACK");
    let (h, _) = Icmpv6Header::parse(&out[0].2, out[0].1.src, out[0].1.dst).unwrap();
    assert_eq!((h.kind, h.code), (icmpv6::TYPE_DEST_UNREACHABLE, icmpv6::CODE_BEYOND_SCOPE));
}

/// A guest whose global address is still tentative speaks from its link-local one, to
/// usernet's own addresses on the link: that is on-link, and goes through.
#[test]
fn a_link_local_source_reaches_usernets_own_addresses() {
    let (mut e, _link, dialer) = engine();
    let host = net().host;
    let mut s = vec![0u8; 20];
    seg(1000, 0, SYN).emit(&mut s, 0, guest_ll().into(), host.into());
    e.on_frame(0, &frame6(PROTO_TCP, guest_ll(), host, 64, GATEWAY_MAC, &s), Instant::now());
    assert_eq!(dialer.tcp_peers.borrow().len(), 1);
}

/// A VM's IPv6 address, for its published ports, is the one it was seen to use in the
/// prefix: its EUI-64 SLAAC address when it uses one, else the lowest; none outside the
/// prefix, none of another guest's, none for a guest never seen over IPv6.
#[test]
fn a_guests_ipv6_address_is_the_one_seen_on_its_link() {
    let (mut e, _link, _) = engine();
    let v4 = std::net::Ipv4Addr::new(192, 168, 65, 2);
    e.set_guest_mac(GUEST_MAC, v4);
    assert_eq!(e.switch.ipv6_of(v4, &net()), None, "never seen over IPv6");
    let ping_from = |e: &mut Engine, mac: [u8; 6], src: Ipv6Addr| {
        let mut m = vec![0u8; 8];
        Icmpv6Header::echo(icmpv6::TYPE_ECHO_REQUEST, 1, 1).emit(&mut m, 0, src, net().gateway);
        let mut f = frame6(PROTO_ICMPV6, src, net().gateway, 64, GATEWAY_MAC, &m);
        f[6..12].copy_from_slice(&mac);
        e.on_frame(0, &f, Instant::now());
    };
    let privacy: Ipv6Addr = "fd75:7365:726e:0:9c3a:1b2c:3d4e:5f60".parse().unwrap();
    let other: Ipv6Addr = "fd75:7365:726e:0:1111:2222:3333:4444".parse().unwrap();
    ping_from(&mut e, GUEST_MAC, guest_ll());
    ping_from(&mut e, GUEST_MAC, privacy);
    ping_from(&mut e, [0x02, 0, 0, 0, 0, 9], other);
    assert_eq!(e.switch.ipv6_of(v4, &net()), Some(privacy));
    let eui = switch::eui64_address(net().prefix, GUEST_MAC);
    assert_eq!(eui, "fd75:7365:726e:0:0:ff:fe00:2".parse::<Ipv6Addr>().unwrap());
    ping_from(&mut e, GUEST_MAC, eui);
    assert_eq!(e.switch.ipv6_of(v4, &net()), Some(eui), "the SLAAC address first");
}

/// RFC 4291's modified EUI-64: ff:fe in the middle, the universal/local bit flipped.
#[test]
fn eui64_addresses() {
    let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let prefix: Ipv6Addr = "2001:db8:1:2::".parse().unwrap();
    assert_eq!(switch::eui64_address(prefix, mac), "2001:db8:1:2:5054:ff:fe12:3456".parse::<Ipv6Addr>().unwrap());
}

/// `--ipv6-only`: a guest's ARP and IPv4 frames are dropped and counted, nothing answers
/// them; IPv6 goes on.
#[test]
fn ipv6_only_drops_arp_and_ipv4() {
    use super::metrics::DropReason;
    use usernet_wire::arp::{self, ArpPacket};
    let (mut e, link, _) = engine_with(NetConfig { ipv4: false, ..NetConfig::default() });
    link.sent.borrow_mut().clear();
    let req = ArpPacket {
        op: arp::OP_REQUEST,
        sender_mac: GUEST_MAC,
        sender_ip: std::net::Ipv4Addr::new(192, 168, 65, 2),
        target_mac: [0; 6],
        target_ip: std::net::Ipv4Addr::new(192, 168, 65, 1),
    };
    let mut f = vec![0u8; 42];
    EthernetHeader { dst: [0xff; 6], src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_ARP }.emit(&mut f);
    req.emit(&mut f[14..]);
    e.on_frame(0, &f, Instant::now());
    let mut v4 = vec![0u8; 14 + 20 + 8];
    EthernetHeader { dst: GATEWAY_MAC, src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_IPV4 }.emit(&mut v4);
    e.on_frame(0, &v4, Instant::now());
    assert!(link.sent.borrow().is_empty(), "nothing answered");
    let drops: Vec<_> = e.metrics().counters.drops().collect();
    assert!(drops.contains(&(DropReason::Ethertype, 2)), "{drops:?}");
    // IPv6 still works: the gateway answers a solicitation.
    let rs = RouterSolicit { source_lladdr: Some(GUEST_MAC) };
    let f = ndp_frame(guest_ll(), ndp::ALL_ROUTERS, 255, ndp::multicast_mac(ndp::ALL_ROUTERS), |b| rs.emit(b));
    e.on_frame(0, &f, Instant::now());
    assert!(!take6(&link).is_empty(), "a router advertisement");
}

/// A port published to a guest's IPv6 address: a TCP client and a UDP datagram from the
/// host's loopback reach it over IPv6, from the host address (::254); with `--ipv6-only`
/// the network's first guest address (::2) stands for the first VM seen over IPv6 when no
/// guest has it.
#[test]
fn ports_published_to_an_ipv6_guest_address() {
    use crate::ports::{BoundListener, Proto};
    let (mut e, link, _) = engine_with(NetConfig { ipv4: false, ..NetConfig::default() });
    // A VM that took a SLAAC address, seen on its link.
    let vm: Ipv6Addr = switch::eui64_address(net().prefix, GUEST_MAC);
    let mut m = vec![0u8; 8];
    Icmpv6Header::echo(icmpv6::TYPE_ECHO_REQUEST, 1, 1).emit(&mut m, 0, vm, net().gateway);
    e.on_frame(0, &frame6(PROTO_ICMPV6, vm, net().gateway, 64, GATEWAY_MAC, &m), Instant::now());
    link.sent.borrow_mut().clear();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    tcp.set_nonblocking(true).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let (tcp_at, udp_at) = (tcp.local_addr().unwrap(), udp.local_addr().unwrap());
    let bound = vec![
        BoundListener { fd: tcp.into(), local: tcp_at, proto: Proto::Tcp, guest_port: 80 },
        BoundListener { fd: udp.into(), local: udp_at, proto: Proto::Udp, guest_port: 53 },
    ];
    assert_eq!(e.publish(bound, net().guest.into()).len(), 2);
    let _client = std::net::TcpStream::connect(tcp_at).unwrap();
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().send_to(b"ping", udp_at).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    e.on_listener(0, Instant::now());
    e.on_listener(1, Instant::now());
    let out = take6(&link);
    let tcp6: Vec<_> = out.iter().filter(|(_, ip, _)| ip.protocol == PROTO_TCP).collect();
    let udp6: Vec<_> = out.iter().filter(|(_, ip, _)| ip.protocol == PROTO_UDP).collect();
    assert_eq!(tcp6.len(), 1, "our SYN: {out:?}");
    assert_eq!(udp6.len(), 1, "the datagram: {out:?}");
    for (mac, ip, _) in tcp6.iter().chain(&udp6) {
        assert_eq!((*mac, ip.src, ip.dst), (GUEST_MAC, net().host, vm));
    }
    assert_eq!(&udp6[0].2[8..], b"ping");
    // IPv4-only networks publish nothing to an IPv6 address.
    let (mut e4, _, _) = engine_with(NetConfig { v6: None, ..NetConfig::default() });
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let local = l.local_addr().unwrap();
    let b = BoundListener { fd: l.into(), local, proto: Proto::Tcp, guest_port: 80 };
    assert!(e4.publish(vec![b], net().guest.into()).is_empty());
}

/// A guest that rotates through IPv6 addresses of the prefix (privacy addresses, or a
/// hostile guest) is still one guest for `--max-tcp-flows-per-guest`: its flows count
/// against its MAC, not against each address.
#[test]
fn a_guest_rotating_ipv6_addresses_is_one_guest_for_its_flow_cap() {
    let limits = crate::config::Limits { max_tcp_flows_per_guest: 2, ..Default::default() };
    let (mut e, link, _) = engine_with(NetConfig { limits, ..NetConfig::default() });
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    for i in 0..3u16 {
        let src: Ipv6Addr = format!("fd75:7365:726e::{:x}", 0x100 + i).parse().unwrap();
        let h =
            TcpHeader { src_port: 40000 + i, dst_port: 80, seq: 7, flags: SYN, window: 65535, ..Default::default() };
        let mut l4 = vec![0u8; h.emit_len()];
        h.emit(&mut l4, 0, src.into(), dst.into());
        e.on_frame(0, &frame6(PROTO_TCP, src, dst, 64, GATEWAY_MAC, &l4), Instant::now());
    }
    let out: Vec<TcpHeader> = take6(&link)
        .into_iter()
        .filter(|(_, ip, _)| ip.protocol == PROTO_TCP)
        .map(|(_, _, p)| TcpHeader::parse(&p).unwrap().0)
        .collect();
    assert_eq!(out.iter().filter(|h| h.has(SYN) && h.has(ACK)).count(), 2, "{out:?}");
    let rst: Vec<_> = out.iter().filter(|h| h.has(RST)).collect();
    assert_eq!(rst.len(), 1, "{out:?}");
    assert_eq!(rst[0].dst_port, 40002);
}

/// The gateway services count a guest's DNS queries against the guest the engine names
/// (`--max-dns-queries-per-guest`): its MAC, whichever of its addresses a query comes from.
#[test]
fn each_dial_names_the_guest_by_its_mac_whatever_its_address() {
    let (mut e, _link, dialer) = engine();
    let IpAddr::V6(dst) = remote().ip() else { unreachable!() };
    for i in 0..3u16 {
        let src: Ipv6Addr = format!("fd75:7365:726e::{:x}", 0x100 + i).parse().unwrap();
        let mut d = vec![0u8; 8 + 5];
        d[8..].copy_from_slice(b"query");
        UdpHeader { src_port: 5000 + i, dst_port: 53 }.emit(&mut d, 5, src.into(), dst.into());
        e.on_frame(0, &frame6(PROTO_UDP, src, dst, 64, GATEWAY_MAC, &d), Instant::now());
    }
    let guests = dialer.guests.borrow().clone();
    assert_eq!(guests, vec![crate::guest::GuestKey::Mac(GUEST_MAC); 3]);
}

/// pasta's `--no-ra`, `--no-ndp` and `--no-dhcpv6` (`NetConfig::ipv6_services`): each
/// service turned off answers nothing, and the others still do.
#[test]
fn ipv6_services_turned_off_answer_nothing() {
    use crate::config::Ipv6Services;
    let rs = || {
        let rs = RouterSolicit { source_lladdr: Some(GUEST_MAC) };
        ndp_frame(guest_ll(), ndp::ALL_ROUTERS, 255, ndp::multicast_mac(ndp::ALL_ROUTERS), |b| rs.emit(b))
    };
    let ns = || {
        let ns = NeighborSolicit { target: GATEWAY_LINK_LOCAL, source_lladdr: Some(GUEST_MAC) };
        let group = ndp::solicited_node(GATEWAY_LINK_LOCAL);
        ndp_frame(guest_ll(), group, 255, ndp::multicast_mac(group), |b| ns.emit(b))
    };
    let on = Ipv6Services::default();
    for (services, answers) in [
        (Ipv6Services { router_adverts: false, ..on }, [false, true, true]),
        (Ipv6Services { neighbour_adverts: false, ..on }, [true, false, true]),
        (Ipv6Services { dhcpv6: false, ..on }, [true, true, false]),
    ] {
        let (mut e, link, _) = engine_with(NetConfig { ipv6_services: services, ..NetConfig::default() });
        let t0 = Instant::now();
        e.advertise_router_when_due(t0);
        let unsolicited = take6(&link);
        assert_eq!(unsolicited.len(), usize::from(answers[0]), "{services:?}: unsolicited advertisement");
        for (frame, answered) in [(rs(), answers[0]), (ns(), answers[1]), (dhcp6_information_request(), answers[2])] {
            e.on_frame(0, &frame, t0);
            let out = take6(&link);
            assert_eq!(out.len(), usize::from(answered), "{services:?}");
            if let Some((_, ip, msg)) = out.first()
                && ip.protocol == PROTO_ICMPV6
                && let Some(ra) = RouterAdvert::parse(msg)
            {
                assert_eq!(ra.other, services.dhcpv6, "the O flag says whether DHCPv6 answers");
            }
        }
    }
}
