//! The engine driven with synthetic frames: a fake link records what goes to the guest,
//! a fake dialer hands out socketpairs instead of real connections (no network at all;
//! both from `synthetic`).

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use proptest::prelude::*;

use super::flows::FlowId;
use super::synthetic::{PairDialer as FakeDialer, RecordingLink as FakeLink};
use super::*;
use usernet_wire::arp::ArpPacket;
use usernet_wire::ethernet::EthernetHeader;
use usernet_wire::icmp::{self, IcmpHeader};
use usernet_wire::ipv4::Ipv4Header;
use usernet_wire::tcp::{ACK, FIN, RST, SYN, TcpHeader};
use usernet_wire::udp::UdpHeader;
use usernet_wire::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};
use usernet_wire::{arp, ethernet, ipv4, udp};

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

fn engine(refuse: bool) -> (Engine, FakeLink, FakeDialer) {
    let link = FakeLink::default();
    let dialer = FakeDialer { refuse, ..Default::default() };
    let cfg = Arc::new(NetConfig::default());
    let mut e = Engine::with_dialer(cfg, Box::new(dialer.clone()), None).unwrap();
    e.add_link(Box::new(link.clone()));
    (e, link, dialer)
}

fn guest() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 2), 40000)
}

fn remote() -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80)
}

fn frame_ipv4(proto: u8, src: Ipv4Addr, dst: Ipv4Addr, l4: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; ethernet::HEADER_LEN + ipv4::HEADER_LEN + l4.len()];
    EthernetHeader { dst: crate::config::GATEWAY_MAC, src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_IPV4 }
        .emit(&mut f);
    Ipv4Header::new(src, dst, proto, l4.len()).emit(&mut f[ethernet::HEADER_LEN..]);
    f[ethernet::HEADER_LEN + ipv4::HEADER_LEN..].copy_from_slice(l4);
    f
}

fn tcp_frame(h: &TcpHeader, payload: &[u8]) -> Vec<u8> {
    let hl = h.emit_len();
    let mut seg = vec![0u8; hl + payload.len()];
    seg[hl..].copy_from_slice(payload);
    h.emit(&mut seg, payload.len(), IpAddr::V4(*guest().ip()), IpAddr::V4(*remote().ip()));
    frame_ipv4(PROTO_TCP, *guest().ip(), *remote().ip(), &seg)
}

fn seg(seq: u32, ack: u32, flags: u8) -> TcpHeader {
    TcpHeader {
        src_port: guest().port(),
        dst_port: remote().port(),
        seq,
        ack,
        flags,
        window: 65535,
        ..Default::default()
    }
}

/// The TCP segments the engine sent to the guest since the last call.
fn take_tcp(link: &FakeLink) -> Vec<(TcpHeader, Vec<u8>)> {
    let frames = std::mem::take(&mut *link.sent.borrow_mut());
    frames
        .iter()
        .filter_map(|f| {
            let (_, p) = EthernetHeader::parse(f)?;
            let (ip, p) = Ipv4Header::parse(p)?;
            if ip.protocol != PROTO_TCP {
                return None;
            }
            let (h, d) = TcpHeader::parse(p)?;
            // Every segment to the guest carries a valid checksum.
            let e = etherparse::TcpHeaderSlice::from_slice(p).ok()?.to_header();
            assert_eq!(e.calc_checksum_ipv4_raw(ip.src.octets(), ip.dst.octets(), d).unwrap(), e.checksum);
            Some((h, d.to_vec()))
        })
        .collect()
}

/// An open connection from the guest (its MSS `mss`, window scaling on): the engine, the
/// guest link, the host end of the connection, and our ISN.
fn open_connection(mss: u16, now: Instant) -> (Engine, FakeLink, UnixStream, u32) {
    let (mut e, link, dialer) = engine(false);
    let mut syn = seg(1000, 0, SYN);
    syn.mss = Some(mss);
    syn.window_scale = Some(7);
    e.on_frame(0, &tcp_frame(&syn, b""), now);
    let isn = take_tcp(&link)[0].0.seq;
    let peer = dialer.tcp_peers.borrow_mut().pop().unwrap();
    e.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK), b""), now);
    (e, link, peer, isn)
}

/// Drives one connection through handshake, data both ways, retransmission and close.
#[test]
fn tcp_translator_end_to_end() {
    let (mut e, link, dialer) = engine(false);
    let now = Instant::now();
    let mut syn = seg(1000, 0, SYN);
    syn.mss = Some(1460);
    syn.window_scale = Some(7);
    e.on_frame(0, &tcp_frame(&syn, b""), now);
    let out = take_tcp(&link);
    assert_eq!(out.len(), 1, "one SYN-ACK");
    let (sa, _) = &out[0];
    assert!(sa.has(SYN) && sa.has(ACK));
    assert_eq!(sa.ack, 1001);
    let isn = sa.seq;
    let mut peer = dialer.tcp_peers.borrow_mut().pop().unwrap();

    // Handshake completes; guest sends data, which lands in the host socket and is acked.
    e.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK), b""), now);
    e.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK | PSH_FLAG), b"hello"), now);
    e.flush_acks(now);
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // A lone small segment's ACK waits (at most ACK_DELAY) for data to ride on; none comes.
    assert!(take_tcp(&link).is_empty(), "the ACK of a lone small segment is delayed");
    e.run_timers(now + Duration::from_millis(5));
    let acks = take_tcp(&link);
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0].0.ack, 1006);

    // Out of order: a gap gets a duplicate ACK at once, nothing is written.
    e.on_frame(0, &tcp_frame(&seg(1010, isn + 1, ACK), b"later"), now);
    let dup = take_tcp(&link);
    assert_eq!(dup.len(), 1);
    assert_eq!(dup[0].0.ack, 1006);

    // Host data goes to the guest within its window, from the socket without copying.
    peer.write_all(b"world").unwrap();
    e.deliver_readiness(true, false, now);
    let data = take_tcp(&link);
    assert_eq!(data.len(), 1);
    assert_eq!(data[0].1, b"world");
    assert_eq!(data[0].0.seq, isn + 1);

    // Three duplicate ACKs: the same bytes are sent again.
    for _ in 0..3 {
        e.on_frame(0, &tcp_frame(&seg(1006, isn + 1, ACK), b""), now);
    }
    let again = take_tcp(&link);
    assert_eq!(again.last().unwrap().1, b"world");
    assert_eq!(again.last().unwrap().0.seq, isn + 1);

    // The guest acknowledges; the host closes; the guest gets a FIN after the data.
    e.on_frame(0, &tcp_frame(&seg(1006, isn + 6, ACK), b""), now);
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    e.deliver_readiness(true, false, now);
    let fin = take_tcp(&link);
    assert!(fin.iter().any(|(h, _)| h.has(FIN) && h.seq == isn + 6), "{fin:?}");

    // The guest's FIN half-closes the host socket; both acked: the flow ends.
    e.on_frame(0, &tcp_frame(&seg(1006, isn + 7, ACK | FIN), b""), now);
    let mut rest = Vec::new();
    peer.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "EOF after the guest's FIN");
    assert_eq!(e.flow_count(), 0);
    // ... and the guest heard its FIN acknowledged before the flow went (no LAST_ACK limbo).
    let last = take_tcp(&link);
    assert!(last.iter().any(|(h, _)| h.has(ACK) && h.ack == 1007), "{last:?}");
}

/// After a gap, the guest's retransmissions are acknowledged at once until it has resent
/// everything it had sent past the gap; then ACKs may wait again. The segments after the
/// gap were kept: the retransmission that fills it is acknowledged with them.
#[test]
fn acks_go_at_once_while_the_guest_recovers_from_a_gap() {
    let now = Instant::now();
    let (mut e, link, mut peer, isn) = open_connection(1000, now);
    let chunk = [5u8; 1000];
    // Segment 1 (1001) is lost; 2 and 3 arrive, are kept, and get duplicate ACKs.
    e.on_frame(0, &tcp_frame(&seg(2001, isn + 1, ACK), &chunk), now);
    e.on_frame(0, &tcp_frame(&seg(3001, isn + 1, ACK), &chunk), now);
    assert_eq!(take_tcp(&link).iter().filter(|(h, _)| h.ack == 1001).count(), 2);
    // The retransmissions, one per round, each acknowledged at once: the first with the
    // two kept, the others (sent again all the same) as old.
    for (i, seq) in [1001u32, 2001, 3001].into_iter().enumerate() {
        e.on_frame(0, &tcp_frame(&seg(seq, isn + 1, ACK), &chunk), now);
        e.flush_acks(now);
        let out = take_tcp(&link);
        assert_eq!(out.len(), 1, "retransmission {i}: {out:?}");
        assert_eq!(out[0].0.ack, 4001);
    }
    // Recovered: a lone new segment's ACK waits again (one with PSH: without, the segment
    // itself would wait for the rest of the guest's write).
    e.on_frame(0, &tcp_frame(&seg(4001, isn + 1, ACK | PSH_FLAG), &chunk), now);
    e.flush_acks(now);
    assert!(take_tcp(&link).is_empty());
    let mut sink = vec![0u8; 4000];
    peer.read_exact(&mut sink).unwrap();
}

/// The ACK of a request rides on the answer; two full segments are acknowledged at once.
#[test]
fn delayed_ack_rides_on_data_and_every_second_segment_is_acked() {
    let now = Instant::now();
    let (mut e, link, mut peer, isn) = open_connection(1460, now);

    // Request, then the host's answer within the delay: one segment, data and ACK.
    e.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK | PSH_FLAG), b"ping"), now);
    e.flush_acks(now);
    assert!(take_tcp(&link).is_empty());
    let mut got = [0u8; 4];
    peer.read_exact(&mut got).unwrap();
    peer.write_all(b"pong").unwrap();
    e.deliver_readiness(true, false, now);
    let out = take_tcp(&link);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((out[0].1.as_slice(), out[0].0.ack), (&b"pong"[..], 1005));
    e.run_timers(now + Duration::from_millis(5));
    assert!(take_tcp(&link).is_empty(), "no ACK left owed");

    // Full-sized segments one per round, each the end of a write (PSH): the first's ACK
    // waits, the second acknowledges both. (Segments of the guest's MSS, 1460, as it
    // announced in its SYN.)
    let mtu_payload = 1460;
    let big = vec![7u8; mtu_payload];
    e.on_frame(0, &tcp_frame(&seg(1005, isn + 5, ACK | PSH_FLAG), &big), now);
    e.flush_acks(now);
    assert!(take_tcp(&link).is_empty());
    e.on_frame(0, &tcp_frame(&seg(1005 + mtu_payload as u32, isn + 5, ACK | PSH_FLAG), &big), now);
    e.flush_acks(now);
    let out = take_tcp(&link);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0.ack, 1005 + 2 * mtu_payload as u32);
    let mut sink = vec![0u8; 2 * mtu_payload];
    peer.read_exact(&mut sink).unwrap();
}

/// Without offloads, one read of host data goes to the guest as segments of its MSS, in order.
#[test]
fn host_data_is_cut_into_mss_segments() {
    let now = Instant::now();
    let (mut e, link, mut peer, isn) = open_connection(1000, now);
    let data: Vec<u8> = (0..10_500u32).map(|i| (i % 251) as u8).collect();
    peer.write_all(&data).unwrap();
    e.deliver_readiness(true, false, now);
    let out = take_tcp(&link);
    assert_eq!(out.len(), 11, "ten full segments and a short one");
    let mut got = Vec::new();
    for (i, (h, d)) in out.iter().enumerate() {
        assert_eq!(h.seq, isn + 1 + got.len() as u32);
        assert_eq!(d.len(), if i < 10 { 1000 } else { 500 });
        assert_eq!(h.has(PSH_FLAG), i == 10, "PSH on the last segment only");
        got.extend_from_slice(d);
    }
    assert_eq!(got, data);
}

/// A keep-alive probe (one old sequence number) is answered with an ACK; no data moves.
#[test]
fn keepalive_probe_is_answered() {
    let (mut e, link, _dialer) = engine(false);
    let now = Instant::now();
    e.on_frame(0, &tcp_frame(&seg(1000, 0, SYN), b""), now);
    let isn = take_tcp(&link)[0].0.seq;
    e.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK), b""), now);
    e.flush_acks(now);
    take_tcp(&link);
    e.on_frame(0, &tcp_frame(&seg(1000, isn + 1, ACK), b""), now);
    let out = take_tcp(&link);
    assert_eq!(out.len(), 1);
    assert!(out[0].0.has(ACK) && !out[0].0.has(RST));
    assert_eq!(out[0].0.ack, 1001);
    // Hours of silence later the flow is still there: no idle expiry.
    e.run_timers(now + std::time::Duration::from_secs(7200));
    assert_eq!(e.flow_count(), 1);
}

#[test]
fn refused_connect_gets_rst() {
    let (mut e, link, _) = engine(true);
    e.on_frame(0, &tcp_frame(&seg(5, 0, SYN), b""), Instant::now());
    let out = take_tcp(&link);
    assert_eq!(out.len(), 1);
    assert!(out[0].0.has(RST));
    assert_eq!(out[0].0.ack, 6);
    assert_eq!(e.flow_count(), 0);
}

/// The counters `/metrics` shows move with what the engine does: failed connects by
/// reason, dropped frames by reason, frames sent per link, flows by state.
#[test]
fn metrics_count_failures_drops_and_flows() {
    use super::metrics::{ConnectFailure, DropReason};
    let (mut e, _link, _) = engine(true);
    e.on_frame(0, &tcp_frame(&seg(5, 0, SYN), b""), Instant::now());
    // A fragment (more-fragments flag set), an LLDP frame and an IPv4 packet said to be
    // IPv6: dropped.
    let mut frag = tcp_frame(&seg(9, 0, SYN), b"");
    let ip = ethernet::HEADER_LEN;
    frag[ip + 6] |= 0x20;
    frag[ip + 10..ip + 12].fill(0);
    let sum = usernet_wire::checksum::checksum(&frag[ip..ip + ipv4::HEADER_LEN]);
    frag[ip + 10..ip + 12].copy_from_slice(&sum.to_be_bytes());
    e.on_frame(0, &frag, Instant::now());
    let mut lldp = tcp_frame(&seg(9, 0, SYN), b"");
    lldp[12..14].copy_from_slice(&0x88ccu16.to_be_bytes());
    e.on_frame(0, &lldp, Instant::now());
    let mut v6 = tcp_frame(&seg(9, 0, SYN), b"");
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    e.on_frame(0, &v6, Instant::now());
    let m = e.metrics();
    let failures: Vec<_> = m.counters.connect_failures().collect();
    assert!(failures.contains(&(ConnectFailure::Refused, 1)), "{failures:?}");
    assert!(failures.contains(&(ConnectFailure::Timeout, 0)), "{failures:?}");
    let drops: Vec<_> = m.counters.drops().collect();
    assert!(drops.contains(&(DropReason::Fragment, 1)), "{drops:?}");
    assert!(drops.contains(&(DropReason::Ethertype, 1)), "{drops:?}");
    assert!(drops.contains(&(DropReason::Malformed, 1)), "{drops:?}");
    assert_eq!(e.stats().dropped_in, 3);
    // The RST went out on link 0.
    assert_eq!(m.links.len(), 1);
    assert_eq!(m.links[0].counters.tx_frames, 1);
    assert_eq!(m.links[0].counters.tx_bytes, 54);

    // An open connection is one established TCP flow.
    let (e, _link, _peer, _) = open_connection(1460, Instant::now());
    let m = e.metrics();
    let established = m.flows.iter().find(|(k, _)| *k == ("tcp", "established")).map(|(_, n)| *n);
    assert_eq!(established, Some(1));
    assert_eq!(m.flows.iter().map(|(_, n)| n).sum::<u64>(), 1);
}

#[test]
fn stray_segment_gets_rst() {
    let (mut e, link, _) = engine(false);
    e.on_frame(0, &tcp_frame(&seg(5, 77, ACK), b"x"), Instant::now());
    let out = take_tcp(&link);
    assert!(out[0].0.has(RST));
    assert_eq!(out[0].0.seq, 77);
}

#[test]
fn arp_for_gateway_and_host() {
    let (mut e, link, _) = engine(false);
    for target in [Ipv4Addr::new(192, 168, 65, 1), Ipv4Addr::new(192, 168, 65, 254)] {
        let req = ArpPacket {
            op: arp::OP_REQUEST,
            sender_mac: GUEST_MAC,
            sender_ip: Ipv4Addr::new(192, 168, 65, 2),
            target_mac: [0; 6],
            target_ip: target,
        };
        let mut f = vec![0u8; 42];
        EthernetHeader { dst: [0xff; 6], src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_ARP }.emit(&mut f);
        req.emit(&mut f[14..]);
        e.on_frame(0, &f, Instant::now());
        let sent = std::mem::take(&mut *link.sent.borrow_mut());
        let reply = ArpPacket::parse(&sent[0][14..]).unwrap();
        assert_eq!(reply.op, arp::OP_REPLY);
        assert_eq!(reply.sender_ip, target);
        assert_eq!(reply.sender_mac, crate::config::GATEWAY_MAC);
    }
}

/// The guest sends "ping" from port 5000 to the remote's port 7: the flow's host socket's
/// peer, which got it.
fn udp_flow_pinged(e: &mut Engine, dialer: &FakeDialer) -> std::os::unix::net::UnixDatagram {
    let mut d = vec![0u8; 8 + 4];
    d[8..].copy_from_slice(b"ping");
    UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut d, 4, IpAddr::V4(*guest().ip()), IpAddr::V4(*remote().ip()));
    e.on_frame(0, &frame_ipv4(PROTO_UDP, *guest().ip(), *remote().ip(), &d), Instant::now());
    // The loop sends a round's datagrams together at its end.
    e.udp_batch.flush();
    let peer = dialer.udp_peers.borrow_mut().pop().unwrap();
    let mut b = [0u8; 16];
    assert_eq!(peer.recv(&mut b).unwrap(), 4);
    peer
}

#[test]
fn udp_datagrams_both_ways() {
    let (mut e, link, dialer) = engine(false);
    let peer = udp_flow_pinged(&mut e, &dialer);
    peer.send(b"pong").unwrap();
    e.deliver_readiness(true, false, Instant::now());
    let sent = std::mem::take(&mut *link.sent.borrow_mut());
    let (_, p) = EthernetHeader::parse(&sent[0]).unwrap();
    let (ip, p) = Ipv4Header::parse(p).unwrap();
    let (h, payload) = UdpHeader::parse(p).unwrap();
    assert_eq!((ip.src, h.src_port, h.dst_port), (*remote().ip(), 7, 5000));
    assert_eq!(payload, b"pong");
    let _ = udp::HEADER_LEN;
}

/// Replies that queue up on a flow's socket reach the guest all, in order and intact, though
/// read two at a time with the second in the switch's spare buffer.
#[test]
fn udp_replies_queued_together_all_reach_the_guest_in_order() {
    let (mut e, link, dialer) = engine(false);
    let peer = udp_flow_pinged(&mut e, &dialer);
    let replies: Vec<Vec<u8>> = (0..5u8).map(|i| vec![b'a' + i; 100 + 700 * i as usize]).collect();
    for r in &replies {
        peer.send(r).unwrap();
    }
    e.deliver_readiness(true, false, Instant::now());
    let sent = std::mem::take(&mut *link.sent.borrow_mut());
    let got: Vec<Vec<u8>> = sent
        .iter()
        .map(|f| {
            let (_, p) = EthernetHeader::parse(f).unwrap();
            let (_, p) = Ipv4Header::parse(p).unwrap();
            UdpHeader::parse(p).unwrap().1.to_vec()
        })
        .collect();
    assert_eq!(got, replies);
}

/// The whole UDP datagrams of `frames` (checked: IPv4 header checksum, UDP length and
/// checksum), as (source port, destination port, payload).
fn whole_udp(frames: &[Vec<u8>]) -> Vec<(u16, u16, Vec<u8>)> {
    use usernet_wire::checksum;
    frames
        .iter()
        .map(|f| {
            let (_, p) = EthernetHeader::parse(f).unwrap();
            let (ip, l4) = Ipv4Header::parse(p).expect("a valid IPv4 header");
            assert_eq!(usize::from(u16::from_be_bytes([l4[4], l4[5]])), l4.len(), "UDP length");
            let sum = checksum::add(checksum::pseudo(ip.src.into(), ip.dst.into(), PROTO_UDP, l4.len()), l4);
            assert_eq!(checksum::finish(sum), 0, "UDP checksum");
            let (h, payload) = UdpHeader::parse(l4).unwrap();
            (h.src_port, h.dst_port, payload.to_vec())
        })
        .collect()
}

/// Datagrams that the host's kernel coalesced into one read (UDP_GRO) reach each guest as
/// the datagrams they were: one segmented frame (USO) of up to 64 of them to a guest whose
/// link takes it, which its kernel cuts exactly as `vnet_hdr::finish` does; whole datagrams,
/// one by one, to a guest whose link does not, and to any guest when they do not fit the MTU
/// (then each in fragments).
#[test]
fn udp_datagrams_read_together_reach_each_guest_as_its_link_takes_them() {
    use super::switch::UDP_PAYLOAD_OFF;
    use usernet_wire::vnet_hdr::{self, VnetHdr};
    let (mut e, plain, _dialer) = engine(false);
    let fast = FakeLink::default();
    fast.takes_offloads.set(true);
    fast.takes_uso.set(true);
    e.add_link(Box::new(fast.clone()));
    let (a, b) = (Ipv4Addr::new(192, 168, 65, 2), Ipv4Addr::new(192, 168, 65, 3));
    e.switch.learn(0, GUEST_MAC, Some(IpAddr::V4(a)));
    e.switch.learn(1, [0x02, 0, 0, 0, 0, 0x0b], Some(IpAddr::V4(b)));
    let from = std::net::SocketAddr::new(IpAddr::V4(*remote().ip()), 443);
    // (total, datagram size, frames to the guest that takes USO)
    for (len, size, uso_frames) in [(3000usize, 1000usize, 1usize), (2999, 1000, 1), (10_000, 100, 2), (1500, 1000, 1)]
    {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 7) as u8).collect();
        let expect: Vec<(u16, u16, Vec<u8>)> = data.chunks(size).map(|c| (443, 40000, c.to_vec())).collect();
        for to in [a, b] {
            e.switch.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + len].copy_from_slice(&data);
            e.switch.send_udp_segments(from, std::net::SocketAddr::new(IpAddr::V4(to), 40000), len, size);
        }
        let to_plain = std::mem::take(&mut *plain.sent.borrow_mut());
        assert!(plain.sent_offloaded.borrow().is_empty());
        assert_eq!(whole_udp(&to_plain), expect, "{len} bytes in {size}: one by one");
        let to_fast = std::mem::take(&mut *fast.sent_offloaded.borrow_mut());
        assert_eq!(to_fast.len(), uso_frames, "{len} bytes in {size}: segmented frames");
        let mut cut = Vec::new();
        for (frame, hdr) in &to_fast {
            let payload = frame.len() - 42;
            if payload > size {
                // As Linux takes it from a TAP (virtio_net_hdr_to_skb, __udp_gso_segment):
                // the checksum at the UDP header's offset 6, holding the pseudo-header's
                // sum over the whole length, which the UDP length field says too.
                let want = VnetHdr {
                    flags: vnet_hdr::F_NEEDS_CSUM,
                    gso_type: vnet_hdr::GSO_UDP_L4,
                    hdr_len: 42,
                    gso_size: size as u16,
                    csum_start: 34,
                    csum_offset: 6,
                };
                assert_eq!(*hdr, want);
                assert!(payload <= size * vnet_hdr::MAX_UDP_SEGMENTS);
                let udp_len = usize::from(u16::from_be_bytes([frame[38], frame[39]]));
                assert_eq!(udp_len, 8 + payload, "the UDP length is the whole frame's");
                let mut sum =
                    usernet_wire::checksum::pseudo(IpAddr::V4(*remote().ip()), IpAddr::V4(b), PROTO_UDP, udp_len);
                while sum >> 16 != 0 {
                    sum = (sum & 0xffff) + (sum >> 16);
                }
                assert_eq!(u16::from_be_bytes([frame[40], frame[41]]), sum as u16, "the pseudo-header's sum");
            }
            vnet_hdr::finish(frame, hdr, &mut Vec::new(), |f| cut.push(f.to_vec())).unwrap();
        }
        cut.extend(std::mem::take(&mut *fast.sent.borrow_mut()));
        assert_eq!(whole_udp(&cut), expect, "{len} bytes in {size}: as the guest's kernel cuts them");
    }
    // Datagrams longer than the MTU: never segmented, each in fragments.
    let cfg = Arc::new(NetConfig { mtu: 1500, ..NetConfig::default() });
    let mut e = Engine::with_dialer(cfg, Box::new(FakeDialer::default()), None).unwrap();
    e.add_link(Box::new(fast.clone()));
    e.switch.learn(0, GUEST_MAC, Some(IpAddr::V4(a)));
    e.switch.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + 6000].fill(9);
    e.switch.send_udp_segments(from, std::net::SocketAddr::new(IpAddr::V4(a), 40000), 6000, 3000);
    assert!(fast.sent_offloaded.borrow().is_empty());
    let sent = std::mem::take(&mut *fast.sent.borrow_mut());
    assert_eq!(sent.len(), 6, "two datagrams of 3,000 bytes in three fragments each");
    assert!(sent.iter().all(|f| f.len() <= ethernet::HEADER_LEN + 1500));
}

/// A guest's segmented UDP send (USO: one frame from a TAP whose kernel knows it) is the
/// datagrams it stands for: each reaches the host's socket as the guest sent it, each is
/// counted as a frame, and one for another guest reaches it whole.
#[test]
fn a_guest_s_segmented_udp_frame_goes_out_datagram_by_datagram() {
    use usernet_wire::vnet_hdr::{self, VnetHdr};
    let (mut e, link, dialer) = engine(false);
    let peer = udp_flow_pinged(&mut e, &dialer);
    let before = e.switch.stats.frames_in;
    let (g, r) = (*guest().ip(), *remote().ip());
    let data: Vec<u8> = (0..5000).map(|i| (i * 7 % 251) as u8).collect();
    let mut dgram = vec![0u8; udp::HEADER_LEN + data.len()];
    dgram[udp::HEADER_LEN..].copy_from_slice(&data);
    UdpHeader { src_port: 5000, dst_port: 7 }.emit_partial(&mut dgram, data.len(), IpAddr::V4(g), IpAddr::V4(r));
    let uso = VnetHdr {
        flags: vnet_hdr::F_NEEDS_CSUM,
        gso_type: vnet_hdr::GSO_UDP_L4,
        hdr_len: 42,
        gso_size: 1200,
        csum_start: 34,
        csum_offset: 6,
    };
    link.recv_offloads.set(uso);
    e.on_frame(0, &frame_ipv4(PROTO_UDP, g, r, &dgram), Instant::now());
    e.udp_batch.flush();
    assert_eq!(e.switch.stats.frames_in - before, 5, "5,000 bytes in datagrams of 1,200: five frames");
    let mut got = Vec::new();
    let mut b = [0u8; 70000];
    while got.len() < 5 {
        let n = peer.recv(&mut b).unwrap();
        got.push(b[..n].to_vec());
    }
    assert_eq!(got, data.chunks(1200).map(|c| c.to_vec()).collect::<Vec<_>>(), "each datagram as the guest sent it");
    // One cut short is dropped as malformed, and counted once.
    let before = e.switch.stats.frames_in;
    let f = frame_ipv4(PROTO_UDP, g, r, &dgram);
    e.on_frame(0, &f[..f.len() - 1], Instant::now());
    assert_eq!(e.switch.stats.frames_in - before, 1);
    // To another guest on the switch: whole datagrams.
    let other = FakeLink::default();
    e.add_link(Box::new(other.clone()));
    let other_mac = [0x02, 0, 0, 0, 0, 0x0b];
    e.switch.learn(1, other_mac, Some(IpAddr::V4(Ipv4Addr::new(192, 168, 65, 3))));
    let mut to_other = frame_ipv4(PROTO_UDP, g, Ipv4Addr::new(192, 168, 65, 3), &dgram);
    to_other[..6].copy_from_slice(&other_mac);
    let mut d3 = dgram.clone();
    UdpHeader { src_port: 5000, dst_port: 7 }.emit_partial(
        &mut d3,
        data.len(),
        IpAddr::V4(g),
        IpAddr::V4(Ipv4Addr::new(192, 168, 65, 3)),
    );
    to_other[34..].copy_from_slice(&d3);
    e.on_frame(0, &to_other, Instant::now());
    let got = whole_udp(&other.sent.borrow());
    assert_eq!(got, data.chunks(1200).map(|c| (5000, 7, c.to_vec())).collect::<Vec<_>>());
    link.recv_offloads.set(VnetHdr::default());
}

/// A datagram beyond the MTU (reassembly.rs, `Switch::fragment`): the guest's fragments, in
/// any order, make one datagram on the host socket, once the last is in; the host's answer,
/// longer than the MTU too, goes to the guest in fragments of at most the MTU that make it
/// whole again (offsets, flags, one identification, the UDP checksum over the whole).
#[test]
fn udp_beyond_the_mtu_goes_in_fragments_both_ways() {
    let link = FakeLink::default();
    let dialer = FakeDialer::default();
    let cfg = Arc::new(NetConfig { mtu: 1500, ..NetConfig::default() });
    let mut e = Engine::with_dialer(cfg, Box::new(dialer.clone()), None).unwrap();
    e.add_link(Box::new(link.clone()));
    let (g, r) = (*guest().ip(), *remote().ip());
    let data: Vec<u8> = (0..5000).map(|i| (i * 7 % 251) as u8).collect();
    let mut dgram = vec![0u8; udp::HEADER_LEN + data.len()];
    dgram[udp::HEADER_LEN..].copy_from_slice(&data);
    UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut dgram, data.len(), IpAddr::V4(g), IpAddr::V4(r));
    let pieces: Vec<&[u8]> = dgram.chunks(1480).collect();
    for (n, &i) in [3, 1, 0, 2].iter().enumerate() {
        let mut f = frame_ipv4(PROTO_UDP, g, r, pieces[i]);
        let mut h = Ipv4Header::parse(&f[ethernet::HEADER_LEN..]).unwrap().0;
        (h.ident, h.dont_frag, h.more_fragments, h.frag_offset) = (77, false, i < 3, i * 1480);
        h.emit(&mut f[ethernet::HEADER_LEN..]);
        e.on_frame(0, &f, Instant::now());
        e.udp_batch.flush();
        assert_eq!(dialer.udp_peers.borrow().is_empty(), n < 3, "a flow only once whole");
    }
    let peer = dialer.udp_peers.borrow_mut().pop().unwrap();
    let mut b = vec![0u8; 70000];
    let n = peer.recv(&mut b).unwrap();
    assert_eq!(&b[..n], &data[..]);

    let reply: Vec<u8> = (0..4000).map(|i| (i * 13 % 253) as u8).collect();
    peer.send(&reply).unwrap();
    e.deliver_readiness(true, false, Instant::now());
    let sent = std::mem::take(&mut *link.sent.borrow_mut());
    assert_eq!(sent.len(), 3, "4,008 bytes of UDP in fragments of 1,480");
    let mut whole = Vec::new();
    let mut ident = None;
    for (i, f) in sent.iter().enumerate() {
        assert!(f.len() <= ethernet::HEADER_LEN + 1500);
        let e = etherparse::Ipv4HeaderSlice::from_slice(&f[ethernet::HEADER_LEN..]).unwrap();
        assert_eq!((e.more_fragments(), e.fragments_offset().byte_offset() as usize), (i < 2, whole.len()));
        assert!(ident.is_none_or(|id| id == e.identification()));
        ident = Some(e.identification());
        let (_, p) = Ipv4Header::parse(&f[ethernet::HEADER_LEN..]).unwrap();
        whole.extend_from_slice(p);
    }
    let (h, payload) = UdpHeader::parse(&whole).unwrap();
    assert_eq!((h.src_port, h.dst_port, payload), (7, 5000, &reply[..]));
    use usernet_wire::checksum;
    let sum = checksum::add(checksum::pseudo(IpAddr::V4(r), IpAddr::V4(g), PROTO_UDP, whole.len()), &whole);
    assert_eq!(checksum::finish(sum), 0, "the UDP checksum covers the whole datagram");
}

#[test]
fn ping_gateway() {
    let (mut e, link, _) = engine(false);
    let mut m = vec![0u8; 8 + 3];
    m[8..].copy_from_slice(b"abc");
    IcmpHeader::echo(icmp::TYPE_ECHO_REQUEST, 9, 1).emit(&mut m, 3);
    e.on_frame(0, &frame_ipv4(PROTO_ICMP, *guest().ip(), Ipv4Addr::new(192, 168, 65, 1), &m), Instant::now());
    let sent = std::mem::take(&mut *link.sent.borrow_mut());
    let (_, p) = EthernetHeader::parse(&sent[0]).unwrap();
    let (_, p) = Ipv4Header::parse(p).unwrap();
    let (h, data) = IcmpHeader::parse(p).unwrap();
    assert_eq!((h.kind, h.ident(), h.seq(), data), (icmp::TYPE_ECHO_REPLY, 9, 1, &b"abc"[..]));
}

/// DHCP answers a guest's DISCOVER (broadcast, from 0.0.0.0) with an OFFER, unless turned
/// off (pasta's `--no-dhcp`): then nothing answers, and nothing is dialled for it.
#[test]
fn dhcp_answers_unless_turned_off() {
    use dhcproto::{Decodable, Encodable, v4};
    let mut discover = v4::Message::new_with_id(
        0x1234_5678,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &GUEST_MAC,
    );
    discover.opts_mut().insert(v4::DhcpOption::MessageType(v4::MessageType::Discover));
    let payload = discover.to_vec().unwrap();
    let mut d = vec![0u8; 8 + payload.len()];
    d[8..].copy_from_slice(&payload);
    let (src, dst) = (Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST);
    UdpHeader { src_port: 68, dst_port: 67 }.emit(&mut d, payload.len(), IpAddr::V4(src), IpAddr::V4(dst));
    for dhcp in [true, false] {
        let link = FakeLink::default();
        let dialer = FakeDialer::default();
        let cfg = Arc::new(NetConfig { dhcp, ..NetConfig::default() });
        let mut e = Engine::with_dialer(cfg, Box::new(dialer.clone()), None).unwrap();
        e.add_link(Box::new(link.clone()));
        e.on_frame(0, &frame_ipv4(PROTO_UDP, src, dst, &d), Instant::now());
        let sent = std::mem::take(&mut *link.sent.borrow_mut());
        let offers = sent
            .iter()
            .filter_map(|f| {
                let (_, p) = Ipv4Header::parse(EthernetHeader::parse(f)?.1)?;
                let (h, msg) = UdpHeader::parse(p)?;
                (h.src_port == 67).then(|| v4::Message::decode(&mut dhcproto::Decoder::new(msg)).ok()).flatten()
            })
            .filter(|m| m.opts().msg_type() == Some(v4::MessageType::Offer))
            .count();
        assert_eq!(offers, usize::from(dhcp), "dhcp {dhcp}: {} frames", sent.len());
        assert!(dialer.guests.borrow().is_empty(), "dhcp {dhcp}: dialled for a DHCP request");
    }
}

/// A SYN from the guest to `dst`.
fn syn_to(dst: SocketAddrV4) -> Vec<u8> {
    let h = TcpHeader {
        src_port: guest().port(),
        dst_port: dst.port(),
        seq: 1000,
        flags: SYN,
        window: 65535,
        ..Default::default()
    };
    let mut s = vec![0u8; h.emit_len()];
    h.emit(&mut s, 0, IpAddr::V4(*guest().ip()), IpAddr::V4(*dst.ip()));
    frame_ipv4(PROTO_TCP, *guest().ip(), *dst.ip(), &s)
}

/// An engine with the real dialler (host sockets, loopback only in these tests).
fn host_engine(host_loopback: bool) -> (Engine, FakeLink) {
    let link = FakeLink::default();
    let cfg = Arc::new(NetConfig { host_loopback, ..NetConfig::default() });
    let services = crate::services::ServiceHub::start(cfg.clone()).unwrap();
    let e = Engine::new(cfg, Box::new(link.clone()), services, None).unwrap();
    (e, link)
}

/// Waits (at most 2 s) for a connection on `l`; false when none came.
fn accepts(l: &std::net::TcpListener) -> bool {
    l.set_nonblocking(true).unwrap();
    for _ in 0..200 {
        match l.accept() {
            Ok(_) => return true,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("{e}"),
        }
    }
    false
}

/// A guest that writes its own frames cannot reach the host's loopback by addressing it:
/// a SYN to 127.0.0.1 or 0.0.0.0 is answered with a RST and never dialled, a datagram with
/// an ICMP port unreachable; the host address is dialled to the host's 127.0.0.1.
#[test]
fn host_loopback_only_through_the_host_address() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let (mut e, link) = host_engine(true);
    let now = Instant::now();
    for direct in [Ipv4Addr::LOCALHOST, Ipv4Addr::new(127, 0, 0, 53), Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(0, 1, 2, 3)]
    {
        e.on_frame(0, &syn_to(SocketAddrV4::new(direct, port)), now);
        let out = take_tcp(&link);
        assert_eq!(out.len(), 1, "{direct}: {out:?}");
        assert!(out[0].0.has(RST) && out[0].0.has(ACK) && out[0].0.ack == 1001, "{direct}: {out:?}");
        assert_eq!(e.flow_count(), 0, "{direct}");
    }
    assert!(!accepts(&server), "a SYN to 127.0.0.1 reached the host's server");

    // UDP to 127.0.0.1: an ICMP port unreachable, no flow.
    let mut d = vec![0u8; 8 + 4];
    d[8..].copy_from_slice(b"ping");
    UdpHeader { src_port: 5000, dst_port: port }.emit(&mut d, 4, IpAddr::V4(*guest().ip()), Ipv4Addr::LOCALHOST.into());
    e.on_frame(0, &frame_ipv4(PROTO_UDP, *guest().ip(), Ipv4Addr::LOCALHOST, &d), now);
    let sent = std::mem::take(&mut *link.sent.borrow_mut());
    assert_eq!(sent.len(), 1);
    let (_, p) = EthernetHeader::parse(&sent[0]).unwrap();
    let (ip, p) = Ipv4Header::parse(p).unwrap();
    let (h, _) = IcmpHeader::parse(p).unwrap();
    assert_eq!((ip.protocol, h.kind, h.code), (PROTO_ICMP, icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_PORT_UNREACHABLE));
    assert_eq!(e.flow_count(), 0);

    // The host address leads to the host's 127.0.0.1.
    e.on_frame(0, &syn_to(SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 254), port)), now);
    assert_eq!(e.flow_count(), 1);
    assert!(accepts(&server), "the host address was not dialled to 127.0.0.1");
}

/// Without host loopback (`--no-host-loopback`), the host address is refused too.
#[test]
fn no_host_loopback_refuses_the_host_address() {
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let (mut e, link) = host_engine(false);
    for dst in [Ipv4Addr::new(192, 168, 65, 254), Ipv4Addr::LOCALHOST] {
        e.on_frame(0, &syn_to(SocketAddrV4::new(dst, port)), Instant::now());
        let out = take_tcp(&link);
        assert!(out.len() == 1 && out[0].0.has(RST), "{dst}: {out:?}");
    }
    assert_eq!(e.flow_count(), 0);
    assert!(!accepts(&server));
}

/// Has the engine send a UDP datagram `text` to the guest (as a published port would).
fn udp_to_guest(e: &mut Engine, text: &[u8]) {
    let off = super::switch::UDP_PAYLOAD_OFF;
    e.switch.buf()[off..off + text.len()].copy_from_slice(text);
    e.switch.send_udp(remote().into(), guest().into(), text.len());
}

/// UDP payloads sent to the guest, each with its destination MAC.
type UdpToMac = Vec<([u8; 6], Vec<u8>)>;

/// The frames sent to the guest since the last call: ARP requests (their target) and UDP
/// payloads (with their destination MAC).
fn take_arp_and_udp(link: &FakeLink) -> (Vec<Ipv4Addr>, UdpToMac) {
    let (mut asked, mut udp) = (Vec::new(), Vec::new());
    for f in std::mem::take(&mut *link.sent.borrow_mut()) {
        let (eth, p) = EthernetHeader::parse(&f).unwrap();
        if eth.ethertype == ethernet::ETHERTYPE_ARP {
            let a = ArpPacket::parse(p).unwrap();
            assert_eq!((a.op, eth.dst), (arp::OP_REQUEST, [0xff; 6]));
            asked.push(a.target_ip);
        } else {
            let (ip, p) = Ipv4Header::parse(p).unwrap();
            assert_eq!(ip.protocol, PROTO_UDP);
            udp.push((eth.dst, UdpHeader::parse(p).unwrap().1.to_vec()));
        }
    }
    (asked, udp)
}

/// The guest answers the gateway's ARP request for its address.
fn arp_reply_from_guest(e: &mut Engine) {
    let reply = ArpPacket {
        op: arp::OP_REPLY,
        sender_mac: GUEST_MAC,
        sender_ip: *guest().ip(),
        target_mac: crate::config::GATEWAY_MAC,
        target_ip: Ipv4Addr::new(192, 168, 65, 1),
    };
    let mut f = vec![0u8; 42];
    EthernetHeader { dst: crate::config::GATEWAY_MAC, src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_ARP }.emit(&mut f);
    reply.emit(&mut f[14..]);
    e.on_frame(0, &f, Instant::now());
}

/// Frames for a guest whose MAC is not known yet wait for the answer to one ARP request
/// (the last three of them, as the kernel keeps), and go out when it comes.
#[test]
fn frames_for_an_unknown_guest_wait_for_its_arp_reply() {
    let (mut e, link, _) = engine(false);
    for text in [&b"one"[..], b"two", b"three", b"four"] {
        udp_to_guest(&mut e, text);
    }
    let (asked, udp) = take_arp_and_udp(&link);
    assert_eq!(asked, vec![*guest().ip()], "one ARP request");
    assert!(udp.is_empty(), "nothing goes before the MAC is known");
    arp_reply_from_guest(&mut e);
    let (asked, udp) = take_arp_and_udp(&link);
    assert!(asked.is_empty());
    assert_eq!(udp, vec![(GUEST_MAC, b"two".to_vec()), (GUEST_MAC, b"three".to_vec()), (GUEST_MAC, b"four".to_vec())]);
    // Known now: the next one goes at once.
    udp_to_guest(&mut e, b"five");
    assert_eq!(take_arp_and_udp(&link), (vec![], vec![(GUEST_MAC, b"five".to_vec())]));
}

/// Held frames that get no answer within PENDING_TTL are dropped, not sent late.
#[test]
fn held_frames_expire() {
    let (mut e, link, _) = engine(false);
    udp_to_guest(&mut e, b"stale");
    assert_eq!(take_arp_and_udp(&link).0.len(), 1);
    std::thread::sleep(super::switch::PENDING_TTL + Duration::from_millis(100));
    arp_reply_from_guest(&mut e);
    assert_eq!(take_arp_and_udp(&link), (vec![], vec![]));
}

/// A guest whose MAC usernet set itself (`run`) needs no ARP before its first frame; a
/// static lease alone (an interface others configured) does not say its MAC.
#[test]
fn guest_with_a_known_mac_needs_no_arp() {
    let (mut e, link, _) = engine(false);
    e.add_static_lease(GUEST_MAC, *guest().ip());
    udp_to_guest(&mut e, b"asked");
    assert_eq!(take_arp_and_udp(&link), (vec![*guest().ip()], vec![]));
    let (mut e, link, _) = engine(false);
    e.set_guest_mac(GUEST_MAC, *guest().ip());
    udp_to_guest(&mut e, b"first");
    assert_eq!(take_arp_and_udp(&link), (vec![], vec![(GUEST_MAC, b"first".to_vec())]));
}

/// A guest flooding frames from made-up source MACs fills its link's share of the MAC
/// table and no more; the MACs learned before still work.
#[test]
fn mac_flood_is_bounded_per_link() {
    let (mut e, link, _) = engine(false);
    arp_reply_from_guest(&mut e);
    for i in 0..5000u32 {
        // Frames of a local experimental ethertype: learned from, otherwise dropped.
        let mut f = vec![0u8; 60];
        let src = [0x02, 0xaa, (i >> 16) as u8, (i >> 8) as u8, i as u8, 1];
        EthernetHeader { dst: crate::config::GATEWAY_MAC, src, ethertype: 0x88b5 }.emit(&mut f);
        e.on_frame(0, &f, Instant::now());
    }
    assert_eq!(e.switch.mac_count(), super::switch::MAX_MACS_PER_LINK);
    link.sent.borrow_mut().clear();
    udp_to_guest(&mut e, b"still here");
    assert_eq!(take_arp_and_udp(&link), (vec![], vec![(GUEST_MAC, b"still here".to_vec())]));
}

/// `serve` binds each guest to its link: another link's frames from the guest's MAC or
/// address are dropped (the switch keeps the guest where it is), and a guest cannot change
/// its own address either; DHCP's 0.0.0.0 stays allowed.
#[test]
fn guests_are_bound_to_their_link() {
    let (mut e, link, _) = engine(false);
    e.bind_guests_to_links();
    let spoofer = FakeLink::default();
    e.add_link(Box::new(spoofer.clone()));
    let other_mac = [0x02, 0, 0, 0, 0, 0x99];
    let now = Instant::now();
    // The guest on link 0 speaks first: it is GUEST_MAC at 192.168.65.2.
    arp_reply_from_guest(&mut e);
    let spoofed_before = e.switch.counters.dropped_count(super::metrics::DropReason::Spoofed);
    // Link 1 sends an ARP reply claiming the guest's address with its own MAC, then a frame
    // from the guest's MAC: both refused.
    let mut arp = [0u8; ethernet::HEADER_LEN + arp::LEN];
    EthernetHeader { dst: crate::config::GATEWAY_MAC, src: other_mac, ethertype: ethernet::ETHERTYPE_ARP }
        .emit(&mut arp);
    ArpPacket {
        op: arp::OP_REPLY,
        sender_mac: other_mac,
        sender_ip: *guest().ip(),
        target_mac: crate::config::GATEWAY_MAC,
        target_ip: Ipv4Addr::new(192, 168, 65, 1),
    }
    .emit(&mut arp[ethernet::HEADER_LEN..]);
    e.on_frame(1, &arp, now);
    // Link 1's first frame bound it to other_mac; now it claims the guest's MAC.
    let f = frame_ipv4(PROTO_UDP, *guest().ip(), *remote().ip(), &[0u8; 8]);
    e.on_frame(1, &f, now);
    let spoofed = e.switch.counters.dropped_count(super::metrics::DropReason::Spoofed) - spoofed_before;
    assert_eq!(spoofed, 2, "the ARP claim and the frame from the guest's MAC");
    // Frames for the guest still go to link 0, to its real MAC.
    link.sent.borrow_mut().clear();
    spoofer.sent.borrow_mut().clear();
    udp_to_guest(&mut e, b"to the real one");
    assert_eq!(take_arp_and_udp(&link), (vec![], vec![(GUEST_MAC, b"to the real one".to_vec())]));
    assert!(spoofer.sent.borrow().is_empty(), "nothing for the guest on the spoofer's link");
    // The guest itself may not take another address, but 0.0.0.0 (DHCP) passes.
    let mut f = frame_ipv4(PROTO_UDP, Ipv4Addr::new(192, 168, 65, 7), *remote().ip(), &[0u8; 8]);
    e.on_frame(0, &f, now);
    assert_eq!(e.switch.counters.dropped_count(super::metrics::DropReason::Spoofed) - spoofed_before, 3);
    f = frame_ipv4(PROTO_UDP, Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, &[0u8; 8]);
    e.on_frame(0, &f, now);
    assert_eq!(e.switch.counters.dropped_count(super::metrics::DropReason::Spoofed) - spoofed_before, 3);
}

/// A guest link over one end of a socketpair, whose other end plays the guest: dropping it
/// hangs the link up, as a VM that goes away does.
struct HangingLink {
    ours: UnixStream,
    inner: FakeLink,
}

impl Link for HangingLink {
    fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.ours)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.recv(buf)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.inner.send(frame)
    }
}

/// A guest that comes back on a new link before the engine read the old one's end (QEMU's
/// `reconnect` after a restart) keeps its MAC and address: the old link's guest hung up, so
/// its claim goes. While the old guest is still there, the new link is refused as a spoofer.
#[test]
fn a_guest_back_on_a_new_link_before_the_old_ones_end_is_read_is_served() {
    let (mut e, _link0, _) = engine(false);
    e.bind_guests_to_links();
    let (ours, vm) = UnixStream::pair().unwrap();
    let old = FakeLink::default();
    e.add_link(Box::new(HangingLink { ours, inner: old.clone() }));
    let new = FakeLink::default();
    e.add_link(Box::new(new.clone()));
    let now = Instant::now();
    let spoofed = |e: &Engine| e.switch.counters.dropped_count(super::metrics::DropReason::Spoofed);
    // The guest speaks on link 1: it is GUEST_MAC at 192.168.65.2 there.
    let f = frame_ipv4(PROTO_UDP, *guest().ip(), *remote().ip(), &[0u8; 8]);
    e.on_frame(1, &f, now);
    assert_eq!(spoofed(&e), 0);
    // Its twin on link 2 while the guest of link 1 is still there: refused.
    e.on_frame(2, &f, now);
    assert_eq!(spoofed(&e), 1, "a live guest keeps its MAC");
    // The guest of link 1 hangs up; the engine has not read that yet. Link 2 takes over.
    drop(vm);
    e.on_frame(2, &f, now);
    assert_eq!(spoofed(&e), 1, "a guest that hung up holds nothing");
    new.sent.borrow_mut().clear();
    old.sent.borrow_mut().clear();
    udp_to_guest(&mut e, b"to the new link");
    assert_eq!(take_arp_and_udp(&new), (vec![], vec![(GUEST_MAC, b"to the new link".to_vec())]));
    assert!(old.sent.borrow().is_empty(), "nothing for the guest on the old link");
    // Link 1 is link 2's spoofer now: what was left to read of it is refused.
    e.on_frame(1, &f, now);
    assert_eq!(spoofed(&e), 2);
}

/// Without `serve`'s binding (`run`, the drop-in modes), a link's frames are not checked.
#[test]
fn links_are_unbound_by_default() {
    let (mut e, _link, _) = engine(false);
    let f = frame_ipv4(PROTO_UDP, Ipv4Addr::new(192, 168, 65, 7), *remote().ip(), &[0u8; 8]);
    e.on_frame(0, &f, Instant::now());
    assert_eq!(e.switch.counters.dropped_count(super::metrics::DropReason::Spoofed), 0);
}

/// Gateway DNS flows are bounded (MAX_GATEWAY_DNS, the least recently used closes), and a
/// flow whose query was answered goes after IDLE_DNS_ANSWERED, not IDLE_DNS.
#[test]
fn gateway_dns_flows_are_bounded_and_short_lived() {
    use super::flow_policy::MAX_GATEWAY_DNS;
    let (mut e, _link, dialer) = engine(false);
    let gw = Ipv4Addr::new(192, 168, 65, 1);
    let dns_query = |e: &mut Engine, port: u16, now: Instant| {
        let mut d = vec![0u8; 8 + 12];
        UdpHeader { src_port: port, dst_port: 53 }.emit(&mut d, 12, IpAddr::V4(*guest().ip()), gw.into());
        e.on_frame(0, &frame_ipv4(PROTO_UDP, *guest().ip(), gw, &d), now);
        e.udp_batch.flush();
    };
    let now = Instant::now();
    for port in 0..(MAX_GATEWAY_DNS as u16 + 50) {
        dns_query(&mut e, 10000 + port, now);
    }
    assert_eq!(e.flow_count(), MAX_GATEWAY_DNS);
    assert_eq!(e.flows.gateway_dns_count, MAX_GATEWAY_DNS);
    // The newest flow's query is answered: it goes 1 s later; the others wait IDLE_DNS.
    let peer = dialer.udp_peers.borrow_mut().pop().unwrap();
    let mut q = [0u8; 64];
    assert_eq!(peer.recv(&mut q).unwrap(), 12);
    peer.send(b"answer").unwrap();
    e.deliver_readiness(true, false, now);
    e.run_timers(now + flows::udp::IDLE_DNS_ANSWERED + Duration::from_millis(10));
    assert_eq!(e.flow_count(), MAX_GATEWAY_DNS - 1);
    e.run_timers(now + flows::udp::IDLE_DNS + Duration::from_millis(10));
    assert_eq!(e.flow_count(), 0);
    assert_eq!(e.flows.gateway_dns_count, 0);
}

const PSH_FLAG: u8 = usernet_wire::tcp::PSH;

fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    let raw = proptest::collection::vec(any::<u8>(), 0..120);
    let structured =
        (0u8..3, proptest::collection::vec(any::<u8>(), 0..80), any::<bool>()).prop_map(|(p, l4, to_gw)| {
            let proto = [PROTO_TCP, PROTO_UDP, PROTO_ICMP][p as usize];
            let dst = if to_gw { Ipv4Addr::new(192, 168, 65, 1) } else { *remote().ip() };
            frame_ipv4(proto, *guest().ip(), dst, &l4)
        });
    prop_oneof![raw, structured]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Whatever the guest sends, the engine neither panics nor loses its footing.
    #[test]
    fn engine_survives_arbitrary_frames(frames in proptest::collection::vec(arb_frame(), 1..20), refuse in any::<bool>()) {
        let (mut e, _link, _d) = engine(refuse);
        let now = Instant::now();
        for f in &frames {
            e.on_frame(0, f, now);
        }
        e.deliver_readiness(true, true, now);
        e.run_timers(now + std::time::Duration::from_secs(120));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    /// Whatever offloads a guest claims for whatever frame it sends to another guest (or
    /// to all), the switch neither panics nor sends on a frame larger than a link carries.
    #[test]
    fn switched_frames_with_any_offloads_never_panic(
        frames in proptest::collection::vec((arb_frame(), any::<bool>(), 0usize..3000), 1..10),
        hdr in (any::<u8>(), prop::sample::select(vec![0u8, 1, 3, 4, 0x81, 0x7f]), any::<u16>(),
                prop_oneof![Just(0u16), 1u16..1600, any::<u16>()], any::<u16>(), any::<u16>()),
        takes in any::<bool>(),
    ) {
        use usernet_wire::vnet_hdr::VnetHdr;
        let (mut e, sender, _d) = engine(false);
        let other = FakeLink::default();
        other.takes_offloads.set(takes);
        e.add_link(Box::new(other.clone()));
        let now = Instant::now();
        let mac_b = [0x02, 0, 0, 0, 0, 0x0b];
        let mut hello = frame_ipv4(PROTO_UDP, Ipv4Addr::new(192, 168, 65, 3), Ipv4Addr::new(192, 168, 65, 1), &[0, 9, 0, 9, 0, 8, 0, 0]);
        hello[6..12].copy_from_slice(&mac_b);
        e.on_frame(1, &hello, now);
        sender.recv_offloads.set(VnetHdr {
            flags: hdr.0, gso_type: hdr.1, hdr_len: hdr.2, gso_size: hdr.3, csum_start: hdr.4, csum_offset: hdr.5,
        });
        for (f, broadcast, grow) in &frames {
            let mut f = f.clone();
            if f.len() >= 6 {
                f[..6].copy_from_slice(if *broadcast { &[0xff; 6] } else { &mac_b });
            }
            f.resize(f.len() + grow, 0x5a);
            e.on_frame(0, &f, now);
        }
        for f in other.sent.borrow().iter() {
            prop_assert!(f.len() <= crate::link::MAX_FRAME);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Host data of any length reaches a guest of any MSS whole and in order, in segments
    /// no larger than its MSS, however the guest's ACKs trail behind.
    #[test]
    fn host_data_reaches_the_guest_in_mss_segments(len in 1usize..200_000, mss in 64u16..9000, seed in any::<u8>()) {
        let now = Instant::now();
        let (mut e, link, mut peer, isn) = open_connection(mss, now);
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        peer.set_nonblocking(true).unwrap();
        let mut written = 0;
        let mut got = Vec::new();
        for _ in 0..10_000 {
            if written < data.len() {
                match peer.write(&data[written..]) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            e.deliver_readiness(true, false, now);
            for (h, d) in take_tcp(&link) {
                prop_assert!(d.len() <= mss as usize);
                if !d.is_empty() {
                    prop_assert_eq!(h.seq, isn + 1 + got.len() as u32);
                    got.extend_from_slice(&d);
                }
            }
            // The guest acknowledges everything so far, with a 64 KiB window (scaled).
            let mut ack = seg(1001, isn + 1 + got.len() as u32, ACK);
            ack.window = 512;
            e.on_frame(0, &tcp_frame(&ack, b""), now);
            if got.len() == data.len() {
                break;
            }
        }
        prop_assert_eq!(got.len(), data.len());
        prop_assert!(got == data);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A guest's UDP datagram of any length in fragments of any size a link takes (520 to
    /// 1,480 bytes: at most 128 of them, so never more than `reassembly::MAX_RANGES` apart),
    /// in any order, some sent twice, among fragments of other datagrams that never
    /// complete: the host gets exactly that datagram (none at all when it is past the 65,507
    /// bytes IPv4 carries).
    #[test]
    fn fragmented_datagrams_reach_the_host_whole(
        len in 0usize..66_000, units in 65usize..186, order in any::<u64>(), dups in 0usize..4, junk in 0usize..60
    ) {
        let (mut e, _link, dialer) = engine(false);
        let (g, r) = (*guest().ip(), *remote().ip());
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let mut dgram = vec![0u8; udp::HEADER_LEN + len];
        dgram[udp::HEADER_LEN..].copy_from_slice(&data);
        UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut dgram, len, IpAddr::V4(g), IpAddr::V4(r));
        let size = units * 8;
        let count = dgram.len().div_ceil(size);
        // (A datagram in one piece is no fragment: sent twice, it would arrive twice.)
        let dups = if count > 1 { dups } else { 0 };
        let mut pieces: Vec<usize> = (0..count).chain((0..dups).map(|i| i % count)).collect();
        let mut x = order | 1;
        for i in (1..pieces.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            pieces.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let fragment = |ident: u16, offset: usize, more: bool, bytes: &[u8]| {
            let mut f = frame_ipv4(PROTO_UDP, g, r, bytes);
            let mut h = Ipv4Header::parse(&f[ethernet::HEADER_LEN..]).unwrap().0;
            (h.ident, h.dont_frag, h.more_fragments, h.frag_offset) = (ident, false, more, offset);
            h.emit(&mut f[ethernet::HEADER_LEN..]);
            f
        };
        for (n, &i) in pieces.iter().enumerate() {
            if n < junk {
                e.on_frame(0, &fragment(1000 + n as u16, 8 * n, true, &[0xee; 64]), Instant::now());
            }
            let start = i * size;
            let end = (start + size).min(dgram.len());
            if start > 0xffff / 8 * 8 {
                continue; // beyond what the offset field says: not a fragment a guest can send
            }
            e.on_frame(0, &fragment(77, start, end < dgram.len(), &dgram[start..end]), Instant::now());
        }
        e.udp_batch.flush();
        let peers = dialer.udp_peers.borrow();
        if len > 65507 {
            prop_assert!(peers.is_empty());
        } else {
            prop_assert_eq!(peers.len(), 1);
            let mut b = vec![0u8; 70_000];
            peers[0].set_nonblocking(true).unwrap();
            let mut received = 0;
            while let Ok(n) = peers[0].recv(&mut b) {
                prop_assert!(b[..n] == data[..]);
                received += 1;
            }
            // Once; or again when duplicates came after it was whole and make it whole anew,
            // as they would in any IP stack.
            prop_assert!(received == 1 || (received > 1 && dups > 0), "{received}");
        }
    }

    /// Fragments of anything, over IPv4 and IPv6, to the gateway, a remote host and the
    /// host's address, with time passing: never a panic (`fuzz_guest_frames`' operation 5).
    #[test]
    fn fragments_of_anything_never_panic(
        frags in proptest::collection::vec(
            (any::<u8>(), 0u8..4, 0u16..8200, proptest::collection::vec(any::<u8>(), 0..1600), 0u8..3), 0..48)
    ) {
        let mut program = Vec::new();
        for (kind, ident, offset, bytes, then) in frags {
            program.extend_from_slice(&[5, kind, ident]);
            program.extend_from_slice(&offset.to_le_bytes());
            program.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
            program.extend_from_slice(&bytes);
            // Then maybe 10 s pass, or the sockets are read.
            program.extend_from_slice(match then { 0 => &[4, 40][..], 1 => &[3][..], _ => &[][..] });
        }
        super::synthetic::fuzz_guest_frames(&program);
    }
}

/// An engine whose limits are `limits`, with the fake link and dialer.
fn engine_with_limits(limits: crate::config::Limits, in_progress: bool) -> (Engine, FakeLink, FakeDialer) {
    let link = FakeLink::default();
    let dialer = FakeDialer { in_progress, ..Default::default() };
    let cfg = Arc::new(NetConfig { limits, ..NetConfig::default() });
    let mut e = Engine::with_dialer(cfg, Box::new(dialer.clone()), None).unwrap();
    e.add_link(Box::new(link.clone()));
    (e, link, dialer)
}

/// A SYN from `src` to `remote()`.
fn syn_from(src: SocketAddrV4, isn: u32) -> Vec<u8> {
    let h = TcpHeader {
        src_port: src.port(),
        dst_port: remote().port(),
        seq: isn,
        flags: SYN,
        window: 65535,
        ..Default::default()
    };
    let mut s = vec![0u8; h.emit_len()];
    h.emit(&mut s, 0, IpAddr::V4(*src.ip()), IpAddr::V4(*remote().ip()));
    frame_ipv4(PROTO_TCP, *src.ip(), *remote().ip(), &s)
}

fn limit_count(e: &Engine, limit: metrics::Limit) -> u64 {
    e.switch.counters.limits().find(|(l, _)| *l == limit).map_or(0, |(_, n)| n)
}

#[test]
fn tcp_flows_are_capped_in_all_and_per_guest() {
    use super::flows::GuestKey;
    let limits = crate::config::Limits { max_tcp_flows: 3, max_tcp_flows_per_guest: 2, ..Default::default() };
    let (mut e, link, _) = engine_with_limits(limits, false);
    let now = Instant::now();
    let a = Ipv4Addr::new(192, 168, 65, 2);
    let b = Ipv4Addr::new(192, 168, 65, 3);
    let b_mac = [0x02, 0, 0, 0, 0, 0x03];
    let from_b = |port| {
        let mut f = syn_from(SocketAddrV4::new(b, port), 7);
        f[6..12].copy_from_slice(&b_mac);
        f
    };
    // Guest a, from two addresses of its own (one MAC): one guest.
    let a2 = Ipv4Addr::new(192, 168, 65, 9);
    for (ip, port) in [(a, 1000), (a2, 1001), (a, 1002)] {
        e.on_frame(0, &syn_from(SocketAddrV4::new(ip, port), 7), now);
    }
    // Two SYN-ACKs, then a RST for the third of guest a.
    let out = take_tcp(&link);
    assert_eq!(out.iter().filter(|(h, _)| h.has(SYN) && h.has(ACK)).count(), 2, "{out:?}");
    let rst: Vec<_> = out.iter().filter(|(h, _)| h.has(RST)).collect();
    assert_eq!(rst.len(), 1);
    assert_eq!((rst[0].0.dst_port, rst[0].0.ack), (1002, 8));
    assert_eq!(e.flow_count(), 2);
    assert_eq!(limit_count(&e, metrics::Limit::TcpFlowsPerGuest), 1);
    // Another guest (another MAC) still gets one, up to the total.
    e.on_frame(0, &from_b(2000), now);
    e.on_frame(0, &from_b(2001), now);
    let out = take_tcp(&link);
    assert_eq!(out.iter().filter(|(h, _)| h.has(SYN) && h.has(ACK)).count(), 1, "{out:?}");
    assert_eq!(out.iter().filter(|(h, _)| h.has(RST)).count(), 1);
    assert_eq!(e.flow_count(), 3);
    assert_eq!(limit_count(&e, metrics::Limit::TcpFlows), 1);
    assert_eq!(e.flows.tcp_of_guest(GuestKey::Mac(GUEST_MAC)), 2);
    assert_eq!(e.flows.tcp_of_guest(GuestKey::Mac(b_mac)), 1);
    // Closed, they count no more.
    let ids: Vec<_> = e.flows.ids().map(|(id, _)| id).collect();
    for id in ids {
        e.after(id, super::flows::Verdict::Close);
    }
    assert_eq!(e.flows.tcp_of_guest(GuestKey::Mac(GUEST_MAC)), 0);
    assert_eq!(e.flows.tcp_of_guest(GuestKey::Mac(b_mac)), 0);
}

#[test]
fn pending_connects_are_capped_oldest_first_and_leave_nothing_behind() {
    let limits = crate::config::Limits { max_pending_connects: 2, ..Default::default() };
    let (mut e, link, _) = engine_with_limits(limits, true);
    let now = Instant::now();
    for port in [1000, 1001, 1002] {
        e.on_frame(0, &syn_from(SocketAddrV4::new(*guest().ip(), port), 7), now);
    }
    // The oldest (port 1000) was abandoned: the guest got a RST for it.
    let out = take_tcp(&link);
    let rst: Vec<_> = out.iter().filter(|(h, _)| h.has(RST)).collect();
    assert_eq!(rst.len(), 1, "{out:?}");
    assert_eq!(rst[0].0.dst_port, 1000);
    assert_eq!(e.flows.count(flows::Kind::Connecting), 2);
    assert_eq!(limit_count(&e, metrics::Limit::PendingConnects), 1);
    // Connected flows leave the list of connects in progress.
    let ids: Vec<FlowId> = e.flows.ids().map(|(id, _)| id).collect();
    for id in ids {
        e.on_socket(id, false, true, false, now);
    }
    assert_eq!(e.flows.count(flows::Kind::Connecting), 0);
    assert_eq!(e.flow_count(), 2);
}

fn udp_from(e: &mut Engine, port: u16) {
    let mut d = vec![0u8; 8 + 1];
    UdpHeader { src_port: port, dst_port: 7 }.emit(&mut d, 1, IpAddr::V4(*guest().ip()), IpAddr::V4(*remote().ip()));
    e.on_frame(0, &frame_ipv4(PROTO_UDP, *guest().ip(), *remote().ip(), &d), Instant::now());
    e.udp_batch.flush();
}

#[test]
fn udp_flows_are_capped_least_recently_used_first() {
    let limits = crate::config::Limits { max_udp_flows: 2, ..Default::default() };
    let (mut e, _, _) = engine_with_limits(limits, false);
    let to = SocketAddrV4::new(*remote().ip(), 7);
    let key = |port| flows::FlowKey::Udp { guest: SocketAddrV4::new(*guest().ip(), port).into(), remote: to.into() };
    udp_from(&mut e, 5001);
    udp_from(&mut e, 5002);
    udp_from(&mut e, 5001);
    udp_from(&mut e, 5003);
    assert!(e.flows.lookup(&key(5001)).is_some());
    assert!(e.flows.lookup(&key(5002)).is_none(), "the least recently used goes");
    assert!(e.flows.lookup(&key(5003)).is_some());
    assert_eq!(e.flows.udp_count, 2);
    assert_eq!(limit_count(&e, metrics::Limit::UdpFlows), 1);
}

#[test]
fn guest_flows_keep_out_of_the_descriptor_reserve() {
    let (mut e, link, _) = engine(false);
    // As if the open-file limit less the reserve were already reached.
    e.fd_ceiling = 0;
    e.on_frame(0, &syn_from(guest(), 7), Instant::now());
    let out = take_tcp(&link);
    assert!(out.len() == 1 && out[0].0.has(RST), "{out:?}");
    assert_eq!(e.flow_count(), 0);
    udp_from(&mut e, 5001);
    assert_eq!(e.flow_count(), 0);
    assert_eq!(limit_count(&e, metrics::Limit::Descriptors), 2);
}

/// An engine whose configuration carries this egress policy (fake dialler).
fn policy_engine(allow: &[&str], deny: &[&str]) -> (Engine, FakeLink, FakeDialer, Arc<NetConfig>) {
    let link = FakeLink::default();
    let dialer = FakeDialer::default();
    let rules = crate::policy::Rules::parse(allow, deny, &[]).unwrap();
    let cfg = Arc::new(NetConfig { policy: Arc::new(crate::policy::Policy::new(rules)), ..NetConfig::default() });
    let mut e = Engine::with_dialer(cfg.clone(), Box::new(dialer.clone()), None).unwrap();
    e.add_link(Box::new(link.clone()));
    (e, link, dialer, cfg)
}

/// The ICMP errors sent to the guest since the last call: (type, code, quoted protocol).
fn take_icmp_errors(link: &FakeLink) -> Vec<(u8, u8, u8)> {
    std::mem::take(&mut *link.sent.borrow_mut())
        .iter()
        .filter_map(|f| {
            let (_, p) = EthernetHeader::parse(f)?;
            let (ip, p) = Ipv4Header::parse(p)?;
            if ip.protocol != PROTO_ICMP {
                return None;
            }
            let (h, quoted) = IcmpHeader::parse(p)?;
            Some((h.kind, h.code, quoted.get(9).copied().unwrap_or(0)))
        })
        .collect()
}

fn udp_frame(dst: SocketAddrV4) -> Vec<u8> {
    let mut d = vec![0u8; 8 + 4];
    d[8..].copy_from_slice(b"ping");
    UdpHeader { src_port: 5000, dst_port: dst.port() }.emit(
        &mut d,
        4,
        IpAddr::V4(*guest().ip()),
        IpAddr::V4(*dst.ip()),
    );
    frame_ipv4(PROTO_UDP, *guest().ip(), *dst.ip(), &d)
}

fn echo_frame(dst: Ipv4Addr) -> Vec<u8> {
    let mut m = vec![0u8; 8 + 4];
    IcmpHeader::echo(icmp::TYPE_ECHO_REQUEST, 7, 1).emit(&mut m, 4);
    frame_ipv4(PROTO_ICMP, *guest().ip(), dst, &m)
}

/// The egress policy: a denied SYN gets a RST and is never dialled, a denied datagram or
/// echo request an ICMP administratively prohibited; an allowed destination is dialled; the
/// host address is judged as 127.0.0.1; the gateway's DNS is never subject to the policy;
/// each denial is counted; a change applies to the next new flow.
#[test]
fn egress_policy_refuses_new_flows() {
    use crate::policy::{DenyReason, Rules, Via};
    let denied = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 66), 80);
    let (mut e, link, dialer, cfg) = policy_engine(&[], &["203.0.113.66", "127.0.0.1/32:22"]);
    let now = Instant::now();

    e.on_frame(0, &syn_to(denied), now);
    let out = take_tcp(&link);
    assert!(out.len() == 1 && out[0].0.has(RST) && out[0].0.ack == 1001, "{out:?}");
    assert_eq!(e.flow_count(), 0);
    assert!(dialer.tcp_peers.borrow().is_empty(), "a denied destination was dialled");
    // The host address is 127.0.0.1 to the policy: port 22 denied, 80 allowed.
    let host = Ipv4Addr::new(192, 168, 65, 254);
    e.on_frame(0, &syn_to(SocketAddrV4::new(host, 22)), now);
    assert!(take_tcp(&link).iter().any(|(h, _)| h.has(RST)));
    e.on_frame(0, &syn_to(SocketAddrV4::new(host, 80)), now);
    assert_eq!(e.flow_count(), 1);

    e.on_frame(0, &udp_frame(denied), now);
    assert_eq!(take_icmp_errors(&link), vec![(icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_ADMIN_PROHIBITED, PROTO_UDP)]);
    e.on_frame(0, &echo_frame(*denied.ip()), now);
    assert_eq!(take_icmp_errors(&link), vec![(icmp::TYPE_DEST_UNREACHABLE, icmp::CODE_ADMIN_PROHIBITED, PROTO_ICMP)]);
    assert!(dialer.udp_peers.borrow().is_empty());
    // Allowed: dialled.
    e.on_frame(0, &udp_frame(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 67), 53)), now);
    assert_eq!(dialer.udp_peers.borrow().len(), 1);

    // An allow list: everything else denied, the gateway's DNS still served.
    cfg.policy.set_rules(Rules::parse(&["198.51.100.0/24:443"], &[], &[]).unwrap());
    e.on_frame(0, &udp_frame(SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 1), 53)), now);
    assert_eq!(dialer.udp_peers.borrow().len(), 2, "the gateway's DNS is not subject to the policy");
    e.on_frame(0, &syn_to(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 5), 80)), now);
    assert!(take_tcp(&link).iter().any(|(h, _)| h.has(RST)), "port 80 is not allowed");
    e.on_frame(0, &syn_to(SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 5), 443)), now);
    assert_eq!(dialer.tcp_peers.borrow().len(), 2);

    let counts = cfg.policy.denied_counts();
    let of = |v, r| counts.iter().find(|(cv, cr, _)| *cv == v && *cr == r).unwrap().2;
    assert_eq!(of(Via::Tcp, DenyReason::DenyRule), 2);
    assert_eq!(of(Via::Tcp, DenyReason::NotAllowed), 1);
    assert_eq!(of(Via::Udp, DenyReason::DenyRule), 1);
    assert_eq!(of(Via::Icmp, DenyReason::DenyRule), 1);
    let failures: Vec<_> = e.metrics().counters.connect_failures().collect();
    assert!(failures.contains(&(super::metrics::ConnectFailure::Denied, 3)), "{failures:?}");
}

/// A published port refuses a client that a `--deny` rule without ports covers (reset, no
/// flow, counted as `publish`); once the rule goes, the next client is served.
#[test]
fn published_ports_refuse_denied_clients() {
    use crate::policy::{DenyReason, Rules, Via};
    let (mut e, link, _dialer, cfg) = policy_engine(&[], &["127.0.0.1/32"]);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let local = l.local_addr().unwrap();
    let bound =
        crate::ports::BoundListener { fd: OwnedFd::from(l), local, proto: crate::ports::Proto::Tcp, guest_port: 80 };
    e.publish(vec![bound], (*guest().ip()).into());
    e.set_guest_mac(GUEST_MAC, *guest().ip());
    let mut client = std::net::TcpStream::connect(local).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    e.on_listener(0, Instant::now());
    assert_eq!(e.flow_count(), 0);
    assert!(take_tcp(&link).is_empty(), "no SYN to the guest");
    client.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 8];
    assert!(matches!(client.read(&mut buf), Err(_) | Ok(0)), "the client is reset");
    let counts = cfg.policy.denied_counts();
    assert!(counts.contains(&(Via::Publish, DenyReason::DenyRule, 1)), "{counts:?}");

    cfg.policy.set_rules(Rules::default());
    let _client = std::net::TcpStream::connect(local).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    e.on_listener(0, Instant::now());
    assert_eq!(e.flow_count(), 1);
    assert!(take_tcp(&link).iter().any(|(h, _)| h.has(SYN)), "our SYN to the guest");
}

/// A burst of more connections than a round accepts (ACCEPT_BATCH) is taken whole: the
/// listener, watched edge-triggered, is reported again while connections wait, where before
/// the rest stayed in the backlog until another client connected.
#[test]
fn a_burst_larger_than_a_round_is_accepted_whole() {
    use std::os::fd::{AsFd, AsRawFd};
    let (mut e, _link, _dialer, _cfg) = policy_engine(&[], &[]);
    // A backlog larger than the burst (std's listeners have 128).
    let fd = sock::socket(libc::SOCK_STREAM, 0).unwrap();
    sock::bind(fd.as_fd(), (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    // SAFETY: listen(2) on a socket we own.
    assert_eq!(unsafe { libc::listen(fd.as_raw_fd(), 1024) }, 0);
    let l = std::net::TcpListener::from(fd);
    let local = l.local_addr().unwrap();
    let bound =
        crate::ports::BoundListener { fd: OwnedFd::from(l), local, proto: crate::ports::Proto::Tcp, guest_port: 80 };
    e.publish(vec![bound], (*guest().ip()).into());
    e.set_guest_mac(GUEST_MAC, *guest().ip());
    let burst = 300;
    let _clients: Vec<_> = (0..burst).map(|_| std::net::TcpStream::connect(local).unwrap()).collect();
    // Room for every flow socket's event too (each new flow's socket is writable at once).
    let mut events = mio::Events::with_capacity(4096);
    let listener_events = |e: &mut Engine, events: &mut mio::Events| {
        e.poll.poll(events, Some(Duration::from_millis(100))).unwrap();
        events.iter().filter(|ev| ev.token().0 & listeners::LISTENER_BIT != 0).count()
    };
    // As the loop does: the event, then a round of accepts.
    assert_eq!(listener_events(&mut e, &mut events), 1);
    e.on_listener(0, Instant::now());
    assert_eq!(e.flow_count(), 256, "one round takes ACCEPT_BATCH");
    assert_eq!(listener_events(&mut e, &mut events), 1, "the listener is reported again while connections wait");
    e.on_listener(0, Instant::now());
    assert_eq!(e.flow_count(), burst);
}

/// A failed accept (out of descriptors) leaves its connection in the listener's backlog,
/// where no new event would report it: the listeners are watched again after
/// ACCEPT_RETRY, not at once (which would spin while the shortage lasts).
#[test]
fn a_failed_accept_is_tried_again_later() {
    use std::os::fd::AsFd;
    let (mut e, _link, _dialer, _cfg) = policy_engine(&[], &[]);
    // Listener 0 makes accept(2) fail (EINVAL: it was never put to listen); listener 1 is a
    // real one.
    let broken = sock::socket(libc::SOCK_STREAM, 0).unwrap();
    sock::bind(broken.as_fd(), (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let real = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    real.set_nonblocking(true).unwrap();
    let local = real.local_addr().unwrap();
    let tcp = crate::ports::Proto::Tcp;
    let broken_local = std::net::TcpListener::from(broken.try_clone().unwrap());
    let bound = vec![
        crate::ports::BoundListener {
            fd: broken,
            local: broken_local.local_addr().unwrap(),
            proto: tcp,
            guest_port: 80,
        },
        crate::ports::BoundListener { fd: OwnedFd::from(real), local, proto: tcp, guest_port: 80 },
    ];
    e.publish(bound, (*guest().ip()).into());
    e.set_guest_mac(GUEST_MAC, *guest().ip());
    e.accept_retry = None;
    let now = Instant::now();
    e.on_listener(0, now);
    assert_eq!(e.accept_retry, Some(now + listeners::ACCEPT_RETRY));
    // A client waits on listener 1, its event taken (as by a round whose accept failed).
    let _client = std::net::TcpStream::connect(local).unwrap();
    let mut events = mio::Events::with_capacity(64);
    // (The broken listener, an unconnected socket, reports a hang-up of its own: only the
    // real one's events are counted.)
    let real_events = |e: &mut Engine, events: &mut mio::Events| {
        e.poll.poll(events, Some(Duration::from_millis(50))).unwrap();
        events.iter().filter(|ev| ev.token().0 == listeners::LISTENER_BIT | 1).count()
    };
    assert_eq!(real_events(&mut e, &mut events), 1);
    assert_eq!(real_events(&mut e, &mut events), 0, "edge-triggered: reported once");
    e.run_timers(now + Duration::from_millis(10));
    assert_eq!(real_events(&mut e, &mut events), 0, "not before ACCEPT_RETRY");
    assert!(e.next_timeout().unwrap() <= listeners::ACCEPT_RETRY, "the loop wakes for it");
    e.run_timers(now + listeners::ACCEPT_RETRY);
    assert_eq!(e.accept_retry, None);
    assert_eq!(real_events(&mut e, &mut events), 1, "watched again");
    e.on_listener(1, now + listeners::ACCEPT_RETRY);
    assert_eq!(e.flow_count(), 1, "the waiting connection is taken");
}

/// The same for a published UDP port: a burst of more datagrams than a round reads (1024)
/// reaches the guest whole. The listener is reported again while datagrams wait, where
/// before the rest stayed queued until another datagram arrived.
#[test]
fn a_udp_burst_larger_than_a_round_reaches_the_guest_whole() {
    use std::os::fd::AsFd;
    let (mut e, link, _dialer, _cfg) = policy_engine(&[], &[]);
    let fd = sock::socket(libc::SOCK_DGRAM, 0).unwrap();
    // Room for the burst: a socket's default buffer holds about 256 small datagrams. Past
    // net.core.rmem_max only CAP_NET_ADMIN may raise it (SO_RCVBUFFORCE).
    let room = 4 << 20;
    if sock::set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, room).is_err() {
        sock::set_int(fd.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, room).unwrap();
    }
    sock::bind(fd.as_fd(), (Ipv4Addr::LOCALHOST, 0).into()).unwrap();
    let l = std::net::UdpSocket::from(fd);
    let local = l.local_addr().unwrap();
    let bound =
        crate::ports::BoundListener { fd: OwnedFd::from(l), local, proto: crate::ports::Proto::Udp, guest_port: 53 };
    e.publish(vec![bound], (*guest().ip()).into());
    e.set_guest_mac(GUEST_MAC, *guest().ip());
    let client = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let burst = 1100u32;
    for i in 0..burst {
        client.send_to(&i.to_be_bytes(), local).unwrap();
    }
    let mut events = mio::Events::with_capacity(64);
    let listener_events = |e: &mut Engine, events: &mut mio::Events| {
        e.poll.poll(events, Some(Duration::from_millis(100))).unwrap();
        events.iter().filter(|ev| ev.token().0 & listeners::LISTENER_BIT != 0).count()
    };
    let delivered = |link: &FakeLink| -> Vec<u32> {
        std::mem::take(&mut *link.sent.borrow_mut())
            .iter()
            .filter_map(|f| {
                let (_, p) = EthernetHeader::parse(f)?;
                let (_, p) = Ipv4Header::parse(p)?;
                let (_, payload) = UdpHeader::parse(p)?;
                Some(u32::from_be_bytes(payload.try_into().ok()?))
            })
            .collect()
    };
    assert_eq!(listener_events(&mut e, &mut events), 1);
    e.on_listener(0, Instant::now());
    let mut got = delivered(&link);
    assert!(
        got.len() == 1024,
        "one round reads 1024 datagrams; {} here (a socket buffer too small for the burst?)",
        got.len()
    );
    assert_eq!(listener_events(&mut e, &mut events), 1, "the listener is reported again while datagrams wait");
    e.on_listener(0, Instant::now());
    got.extend(delivered(&link));
    assert_eq!(got, (0..burst).collect::<Vec<_>>(), "every datagram, in order");
}

/// A published UDP port's answers leave on its socket with the rest of the round's
/// datagrams: a guest's datagrams of one length to a client on the loopback go as one
/// segmented send, which the client receives one by one, in order. When the client behind
/// the flow's address moves within the round (another loopback address, the same port),
/// the answers before go to the first and those after to the second.
#[test]
fn a_published_udp_port_s_answers_go_segmented_to_their_client() {
    let (mut e, _link, _dialer, cfg) = policy_engine(&[], &[]);
    let (local, first) = published_udp_port(&mut e, Ipv4Addr::LOCALHOST.into());
    let port = first.local_addr().unwrap().port();
    let second = std::net::UdpSocket::bind((Ipv4Addr::new(127, 0, 0, 2), port)).unwrap();
    second.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The client appears in the guest network from the host address, with its own port.
    let remote = SocketAddrV4::new(cfg.host, port);
    let answer = |e: &mut Engine, i: usize| guest_udp_answer(e, remote, i);
    first.send_to(b"question", local).unwrap();
    e.on_listener(0, Instant::now());
    let to_first: Vec<_> = (0..5).map(|i| answer(&mut e, i)).collect();
    second.send_to(b"moved", local).unwrap();
    e.on_listener(0, Instant::now());
    let to_second: Vec<_> = (5..8).map(|i| answer(&mut e, i)).collect();
    // The loop sends a round's datagrams together at its end.
    e.udp_batch.flush();
    let mut buf = [0u8; 2000];
    for (s, want) in [(&first, to_first), (&second, to_second)] {
        for w in want {
            let (n, from) = s.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&w[..], local));
        }
    }
    assert_eq!(e.udp_batch.segmented, (2, 8), "two segmented sends, of 5 and 3");
}

/// The same from a port published on [::1] to a client there: one segmented send of 5.
#[test]
fn a_published_udp_port_s_answers_go_segmented_to_an_ipv6_client() {
    let (mut e, _link, _dialer, cfg) = policy_engine(&[], &[]);
    let (local, client) = published_udp_port(&mut e, std::net::Ipv6Addr::LOCALHOST.into());
    let port = client.local_addr().unwrap().port();
    client.send_to(b"question", local).unwrap();
    e.on_listener(0, Instant::now());
    let remote = SocketAddrV4::new(cfg.host, port);
    let want: Vec<_> = (0..5).map(|i| guest_udp_answer(&mut e, remote, i)).collect();
    e.udp_batch.flush();
    let mut buf = [0u8; 2000];
    for w in want {
        let (n, from) = client.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&w[..], local));
    }
    assert_eq!(e.udp_batch.segmented, (1, 5));
}

/// Answers gathered for a published port that is unpublished within the round leave
/// before its socket closes: a socket opened next, which takes the same descriptor number,
/// never sends them (found by review: without the flush, the client got the answer from
/// the new socket's port).
#[test]
fn answers_gathered_for_an_unpublished_port_leave_from_it() {
    let (mut e, _link, _dialer, cfg) = policy_engine(&[], &[]);
    let (local, client) = published_udp_port(&mut e, Ipv4Addr::LOCALHOST.into());
    let port = client.local_addr().unwrap().port();
    client.send_to(b"question", local).unwrap();
    e.on_listener(0, Instant::now());
    let want = guest_udp_answer(&mut e, SocketAddrV4::new(cfg.host, port), 0);
    assert!(e.unpublish(local, crate::ports::Proto::Udp));
    let next = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    e.udp_batch.flush();
    let mut buf = [0u8; 2000];
    let (n, from) = client.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&want[..], local));
    drop(next);
}

/// A UDP flow that closes within the round sends what was gathered for it first.
#[test]
fn datagrams_gathered_for_a_flow_that_closes_leave_before_it() {
    let (mut e, _link, dialer) = engine(false);
    let peer = udp_flow_pinged(&mut e, &dialer);
    let mut d = vec![0u8; 8 + 4];
    d[8..].copy_from_slice(b"last");
    UdpHeader { src_port: 5000, dst_port: 7 }.emit(&mut d, 4, IpAddr::V4(*guest().ip()), IpAddr::V4(*remote().ip()));
    e.on_frame(0, &frame_ipv4(PROTO_UDP, *guest().ip(), *remote().ip(), &d), Instant::now());
    let key = super::flows::FlowKey::Udp {
        guest: std::net::SocketAddr::new((*guest().ip()).into(), 5000),
        remote: std::net::SocketAddr::new((*remote().ip()).into(), 7),
    };
    let id = e.flows.lookup(&key).expect("the flow");
    e.after(id, super::flows::Verdict::Close);
    e.udp_batch.flush();
    let mut b = [0u8; 16];
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(peer.recv(&mut b).map(|n| b[..n].to_vec()).ok(), Some(b"last".to_vec()));
}

/// A UDP port published on `at` (port 0: the kernel picks) forwarding to the guest's port
/// 53, and a client bound on `at` too: (the port's address, the client).
fn published_udp_port(e: &mut Engine, at: IpAddr) -> (std::net::SocketAddr, std::net::UdpSocket) {
    let l = std::net::UdpSocket::bind((at, 0)).unwrap();
    let local = l.local_addr().unwrap();
    let bound =
        crate::ports::BoundListener { fd: OwnedFd::from(l), local, proto: crate::ports::Proto::Udp, guest_port: 53 };
    e.publish(vec![bound], (*guest().ip()).into());
    e.set_guest_mac(GUEST_MAC, *guest().ip());
    let client = std::net::UdpSocket::bind((at, 0)).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    (local, client)
}

/// The guest's answer `i` (1,000 bytes) from its port 53 to `remote`: its payload.
fn guest_udp_answer(e: &mut Engine, remote: SocketAddrV4, i: usize) -> Vec<u8> {
    let payload: Vec<u8> = (0..1000).map(|b| (i * 31 + b * 7) as u8).collect();
    let mut d = vec![0u8; udp::HEADER_LEN + payload.len()];
    d[udp::HEADER_LEN..].copy_from_slice(&payload);
    UdpHeader { src_port: 53, dst_port: remote.port() }.emit(
        &mut d,
        payload.len(),
        IpAddr::V4(*guest().ip()),
        IpAddr::V4(*remote.ip()),
    );
    e.on_frame(0, &frame_ipv4(PROTO_UDP, *guest().ip(), *remote.ip(), &d), Instant::now());
    payload
}

/// How far a published port's answers segment: over IPv4 only to the loopback (the
/// port's unconnected socket cannot read a route's MTU), over IPv6 as a flow's; never on
/// a kernel that does not segment.
#[test]
fn a_published_port_s_answers_segment_to_the_loopback_and_over_ipv6() {
    use super::flows::udp::published_segmenting;
    use super::sock::Segmenting;
    let at = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
    for (client, want) in [
        ("127.0.0.1:5000", Segmenting::Full),
        ("127.1.2.3:5000", Segmenting::Full),
        ("[::ffff:127.0.0.1]:5000", Segmenting::Full),
        ("[::1]:5000", Segmenting::Full),
        ("[2001:db8::2]:5000", Segmenting::Full),
        ("198.51.100.2:5000", Segmenting::Never),
        ("[::ffff:198.51.100.2]:5000", Segmenting::Never),
    ] {
        assert_eq!(published_segmenting(true, at(client)), want, "{client}");
        assert_eq!(published_segmenting(false, at(client)), Segmenting::Never, "{client}");
    }
}

/// A destination the egress policy denies is refused before any hook sees it (the
/// transparent proxy never takes it over); an allowed one goes to the hook as before.
#[test]
fn egress_policy_comes_before_tcp_hooks() {
    let (mut e, link, dialer, _cfg) = policy_engine(&[], &["203.0.113.66"]);
    let asked = Rc::new(RefCell::new(Vec::new()));
    let seen = asked.clone();
    e.add_tcp_hook(Box::new(move |dst, _guest| {
        seen.borrow_mut().push(dst);
        None
    }));
    let now = Instant::now();
    e.on_frame(0, &syn_to(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 66), 80)), now);
    assert!(take_tcp(&link).iter().any(|(h, _)| h.has(RST)));
    assert!(asked.borrow().is_empty(), "the hook saw a denied destination");
    let allowed = SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 67), 80);
    e.on_frame(0, &syn_to(allowed), now);
    assert_eq!(*asked.borrow(), vec![std::net::SocketAddr::V4(allowed)]);
    assert_eq!(dialer.tcp_peers.borrow().len(), 1);
}

/// Regression (review of the hold): a guest segment held for the rest of its write whose
/// round also sent host data (the ACK rode on it, so no delayed ACK was armed) had no timer
/// until the retransmission timeout; the hold's deadline is now put on the timer heap.
#[test]
fn held_guest_data_has_a_timer_of_its_own() {
    let now = Instant::now();
    let (mut e, link, dialer) = engine(false);
    let mut syn = seg(1000, 0, SYN);
    syn.mss = Some(1460);
    syn.window_scale = Some(7);
    syn.window = 128;
    e.on_frame(0, &tcp_frame(&syn, b""), now);
    let isn = take_tcp(&link)[0].0.seq;
    let mut peer = dialer.tcp_peers.borrow_mut().pop().unwrap();
    // The SYN and the handshake's ACK offer a 128-byte window (1 << 7): the host's 300 bytes go in part.
    let mut small = seg(1001, isn + 1, ACK);
    small.window = 1;
    e.on_frame(0, &tcp_frame(&small, b""), now);
    peer.write_all(&[9u8; 300]).unwrap();
    e.deliver_readiness(true, false, now);
    assert_eq!(take_tcp(&link).iter().map(|(_, d)| d.len()).sum::<usize>(), 128);
    // A full segment without PSH that opens the window: the rest of the host data goes,
    // carrying the ACK; the segment waits for the rest of its write.
    let full = vec![4u8; 1460];
    e.on_frame(0, &tcp_frame(&seg(1001, isn + 1 + 128, ACK), &full), now);
    e.flush_acks(now);
    assert_eq!(take_tcp(&link).iter().map(|(_, d)| d.len()).sum::<usize>(), 172);
    peer.set_nonblocking(true).unwrap();
    let mut got = vec![0u8; 4096];
    assert!(peer.read(&mut got).is_err(), "held, not written yet");
    e.run_timers(now + Duration::from_millis(2));
    assert_eq!(peer.read(&mut got).unwrap(), 1460, "written at the hold's deadline");
    let acks = take_tcp(&link);
    assert_eq!(acks.last().map(|(h, _)| h.ack), Some(1001 + 1460), "{acks:?}");
}

/// Two engines made shards of one guest, in this thread: each handles what its own link
/// brings, and hands the other the frames of the other's flows (shard.rs).
fn two_shards() -> [(Engine, FakeLink, FakeDialer); 2] {
    let mut engines = [engine(false), engine(false)];
    let (set, mut inboxes) = shard::ShardSet::new(2);
    let next = engines[1].0.control_handle().unwrap();
    let inbox1 = inboxes.pop().unwrap();
    engines[1].0.join_shards(set.clone(), 1, inbox1, None).unwrap();
    engines[0].0.join_shards(set, 0, inboxes.pop().unwrap(), Some(next)).unwrap();
    engines
}

#[test]
fn shards_hand_each_other_the_frames_of_their_flows() {
    let [(mut e0, link0, _), (mut e1, link1, dialer1)] = two_shards();
    let now = Instant::now();
    // The SYN reaches engine 1: the flow is its own.
    e1.on_frame(0, &tcp_frame(&seg(1000, 0, SYN), b""), now);
    let isn = take_tcp(&link1)[0].0.seq;
    let mut peer = dialer1.tcp_peers.borrow_mut().pop().unwrap();
    let key = flows::FlowKey::Tcp { guest: guest().into(), remote: remote().into() };
    assert_eq!(e1.shard.as_ref().unwrap().set.owner(&key), Some(1));
    // Its next segments reach engine 0's queue: handed over, not refused.
    e0.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK), b""), now);
    e0.on_frame(0, &tcp_frame(&seg(1001, isn + 1, ACK | PSH_FLAG), b"hello"), now);
    assert_eq!(e0.flow_count(), 0);
    assert!(take_tcp(&link0).is_empty(), "engine 0 answered another engine's flow");
    assert_eq!(e0.stats().frames_in, 0, "handed frames count where they are handled");
    e1.on_handed(now);
    e1.flush_acks(now);
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    assert_eq!(e1.stats().frames_in, 3);
    // ARP is engine 0's, whichever queue it came by; engine 0 answers it.
    let arp = {
        let mut f = vec![0u8; ethernet::HEADER_LEN + arp::LEN];
        EthernetHeader { dst: [0xff; 6], src: GUEST_MAC, ethertype: ethernet::ETHERTYPE_ARP }.emit(&mut f);
        ArpPacket {
            op: arp::OP_REQUEST,
            sender_mac: GUEST_MAC,
            sender_ip: *guest().ip(),
            target_mac: [0; 6],
            target_ip: Ipv4Addr::new(192, 168, 65, 1),
        }
        .emit(&mut f[ethernet::HEADER_LEN..]);
        f
    };
    e1.on_frame(0, &arp, now);
    assert!(link1.sent.borrow().is_empty(), "engine 1 answered ARP");
    e0.on_handed(now);
    assert_eq!(link0.sent.borrow().len(), 1, "engine 0 answers the ARP request");
    // The flow ends on engine 1: its claim goes with it.
    e1.shutdown();
    assert_eq!(e1.shard.as_ref().unwrap().set.owner(&key), None);
    // A stray segment for no flow at all stays where it came, and is refused there.
    e0.on_frame(0, &tcp_frame(&seg(1006, isn + 1, ACK), b""), now);
    assert!(take_tcp(&link0).iter().any(|(h, _)| h.has(RST)));
}

/// The SYN of a new connection from guest port `port`.
fn syn_from_port(port: u16) -> Vec<u8> {
    tcp_frame(&TcpHeader { src_port: port, ..seg(1000, 0, SYN) }, b"")
}

fn tcp_key(port: u16) -> flows::FlowKey {
    flows::FlowKey::Tcp { guest: SocketAddrV4::new(*guest().ip(), port).into(), remote: remote().into() }
}

/// A new connection whose SYN reaches an engine goes to the engine holding the fewest TCP
/// flows, if that holds fewer (shard.rs): four connections that the kernel's hash sends
/// all to one queue end up two and two. The claim is made as the SYN is handed, so a burst
/// is spread before the other engine has read any of it; the later segments of a handed
/// connection follow it there.
#[test]
fn new_connections_go_to_the_engine_with_fewer_tcp_flows() {
    let [(mut e0, link0, _), (mut e1, link1, dialer1)] = two_shards();
    let now = Instant::now();
    let owners = e0.shard.as_ref().unwrap().set.clone();
    // Engine 1 holds none, engine 0 none: the first stays where it came.
    e0.on_frame(0, &syn_from_port(41000), now);
    assert_eq!((e0.flow_count(), owners.owner(&tcp_key(41000))), (1, Some(0)));
    assert_eq!(take_tcp(&link0).len(), 1, "engine 0 answers its SYN");
    // A burst of three more, all by engine 0's queue, before engine 1 reads its inbox.
    for port in [41001, 41002, 41003] {
        e0.on_frame(0, &syn_from_port(port), now);
    }
    assert_eq!(owners.owner(&tcp_key(41001)), Some(1), "handed, and claimed for engine 1 at once");
    assert_eq!(owners.owner(&tcp_key(41002)), Some(0), "one each: engine 0 keeps the next");
    assert_eq!(owners.owner(&tcp_key(41003)), Some(1));
    assert_eq!(e0.flow_count(), 2);
    assert_eq!(take_tcp(&link0).len(), 1, "engine 0 answered only its own");
    assert_eq!(e0.stats().frames_in, 2, "handed SYNs count where they are handled");
    e1.on_handed(now);
    assert_eq!(e1.flow_count(), 2);
    let answers = take_tcp(&link1);
    assert_eq!(
        answers.iter().map(|(h, _)| (h.dst_port, h.has(SYN) && h.has(ACK))).collect::<Vec<_>>(),
        [(41001, true), (41003, true)]
    );
    // The handshake's ACK and data of a handed connection, by engine 0's queue: to engine 1.
    let isn = answers[0].0.seq;
    let mut peer = dialer1.tcp_peers.borrow_mut().remove(0);
    let data = TcpHeader { src_port: 41001, ..seg(1001, isn + 1, ACK | PSH_FLAG) };
    e0.on_frame(0, &tcp_frame(&TcpHeader { src_port: 41001, ..seg(1001, isn + 1, ACK) }, b""), now);
    e0.on_frame(0, &tcp_frame(&data, b"hello"), now);
    assert!(take_tcp(&link0).is_empty());
    e1.on_handed(now);
    e1.flush_acks(now);
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = [0u8; 5];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"hello");
    // Two each: a fifth stays where it came, on either engine.
    e1.on_frame(0, &syn_from_port(41004), now);
    assert_eq!(owners.owner(&tcp_key(41004)), Some(1));
    // A connection's SYN again (a retransmission) goes where its flow is, not by count.
    e0.on_frame(0, &syn_from_port(41004), now);
    assert_eq!(e0.flow_count(), 2);
    assert_eq!(owners.owner(&tcp_key(41004)), Some(1));
}

/// A connection handed to an engine that does not make it (its connect refused) loses the
/// claim made for it there: the counts stay true, and the guest's next try is a new
/// connection again.
#[test]
fn a_handed_connection_that_is_refused_loses_its_claim() {
    let mut engines = [engine(false), engine(true)];
    let (set, mut inboxes) = shard::ShardSet::new(2);
    let next = engines[1].0.control_handle().unwrap();
    engines[1].0.join_shards(set.clone(), 1, inboxes.pop().unwrap(), None).unwrap();
    engines[0].0.join_shards(set.clone(), 0, inboxes.pop().unwrap(), Some(next)).unwrap();
    let [(mut e0, _link0, _), (mut e1, link1, _)] = engines;
    let now = Instant::now();
    e0.on_frame(0, &syn_from_port(42000), now);
    e0.on_frame(0, &syn_from_port(42001), now);
    assert_eq!(set.owner(&tcp_key(42001)), Some(1));
    e1.on_handed(now);
    assert!(take_tcp(&link1).iter().any(|(h, _)| h.has(RST)), "engine 1 refuses it");
    assert_eq!(e1.flow_count(), 0);
    assert_eq!(set.owner(&tcp_key(42001)), None, "the claim went with the refusal");
    // Engine 1 holds none again: the next new connection by engine 0 goes there too.
    e0.on_frame(0, &syn_from_port(42002), now);
    assert_eq!(set.owner(&tcp_key(42002)), Some(1));
}

#[test]
fn shards_gather_stats_and_flows_of_both() {
    let [(mut e0, _, _), (mut e1, link1, _)] = two_shards();
    let now = Instant::now();
    e1.on_frame(0, &tcp_frame(&seg(1000, 0, SYN), b""), now);
    assert_eq!(take_tcp(&link1).len(), 1);
    let handle = e0.control_handle().unwrap();
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    assert!(handle.send(control::Command::Stats { reply: tx }));
    e0.on_commands();
    assert!(rx.try_recv().is_err(), "engine 0 answered alone");
    e1.on_commands();
    let stats = rx.try_recv().unwrap();
    assert_eq!((stats.tcp_flows, stats.frames_in), (1, 1));
    let (tx, mut rx) = tokio::sync::oneshot::channel();
    assert!(handle.send(control::Command::Metrics { reply: tx }));
    e0.on_commands();
    e1.on_commands();
    let m = rx.try_recv().unwrap();
    assert_eq!(m.links.len(), 1, "the queues of one device are one link");
    assert_eq!(m.links[0].counters.tx_frames, 1);
}

#[test]
fn belongs_sorts_flows_from_engine_0s_frames() {
    let (e, _, _) = engine(false);
    let classify = |f: &[u8]| {
        let (_, payload) = EthernetHeader::parse(f).unwrap();
        let ip = Ipv4Header::parse(payload);
        match e.belongs(ip.as_ref(), None) {
            shard::Belongs::Flow(k) | shard::Belongs::Syn(k) => Some(k),
            shard::Belongs::Engine0 => None,
        }
    };
    let tcp = tcp_frame(&seg(1000, 0, SYN), b"");
    assert!(matches!(classify(&tcp), Some(flows::FlowKey::Tcp { .. })));
    let udp_to = |dst: Ipv4Addr, port: u16| {
        let mut d = vec![0u8; 8];
        UdpHeader { src_port: 68, dst_port: port }.emit(&mut d, 0, IpAddr::V4(*guest().ip()), IpAddr::V4(dst));
        frame_ipv4(PROTO_UDP, *guest().ip(), dst, &d)
    };
    assert!(matches!(classify(&udp_to(*remote().ip(), 53)), Some(flows::FlowKey::Udp { .. })));
    assert_eq!(classify(&udp_to(Ipv4Addr::BROADCAST, 67)), None, "DHCP");
    assert_eq!(classify(&udp_to(Ipv4Addr::new(192, 168, 65, 255), 9)), None, "subnet broadcast");
    assert_eq!(classify(&udp_to(Ipv4Addr::new(224, 0, 0, 251), 5353)), None, "multicast");
    let ping = frame_ipv4(PROTO_ICMP, *guest().ip(), *remote().ip(), &[8, 0, 0, 0, 0, 1, 0, 1]);
    assert_eq!(classify(&ping), None, "ICMP");
    // Truncated: no ports.
    let short = frame_ipv4(PROTO_TCP, *guest().ip(), *remote().ip(), &[0, 80]);
    assert_eq!(classify(&short), None);
}

#[test]
fn engines_share_the_bounds_on_flows_and_held_data() {
    let l = crate::config::Limits { max_tcp_flows: 3, ..Default::default() };
    assert_eq!(l.per_engine(1), l);
    assert_eq!(l.per_engine(0), l);
    let half = l.per_engine(2);
    assert_eq!(half.max_buffered, l.max_buffered / 2);
    assert_eq!(half.max_tcp_flows_per_guest, l.max_tcp_flows_per_guest / 2);
    assert_eq!(half.max_udp_flows, l.max_udp_flows / 2);
    assert_eq!(half.max_tcp_flows, 1);
    assert_eq!(l.per_engine(8).max_tcp_flows, 1, "never below one");
    assert_eq!(half.fd_reserve, l.fd_reserve, "the process's, not an engine's");
    assert_eq!(half.max_dhcp_offers, l.max_dhcp_offers, "engine 0's");
}

/// A flow that engine 0 opens toward the guest (`/tunnel`, a published port): the guest's
/// SYN-ACK, which the kernel may steer to another engine's queue (it learns the flow's queue
/// only after the write that carried the SYN), is handed to engine 0 instead of refused.
/// (Engine 0 claims the flow before that write; the race itself needs the kernel: the
/// published-port test of run_publish.rs and the note's timings.)
#[test]
fn shards_hand_the_answer_to_a_flow_opened_toward_the_guest() {
    let [(mut e0, link0, _), (mut e1, link1, _)] = two_shards();
    let now = Instant::now();
    for e in [&mut e0, &mut e1] {
        e.set_guest_mac(GUEST_MAC, *guest().ip());
    }
    let (ours, mut host) = UnixStream::pair().unwrap();
    let to: std::net::SocketAddr = guest().into();
    e0.tunnel(OwnedFd::from(ours), to, now).unwrap();
    let sent = take_tcp(&link0);
    let (syn, _) = sent.iter().find(|(h, _)| h.has(SYN)).expect("a SYN to the guest");
    // The guest's SYN-ACK, on engine 1's queue.
    let mut synack = TcpHeader {
        src_port: syn.dst_port,
        dst_port: syn.src_port,
        seq: 5000,
        ack: syn.seq.wrapping_add(1),
        flags: SYN | ACK,
        window: 65535,
        ..Default::default()
    };
    synack.mss = Some(1460);
    let hl = synack.emit_len();
    let mut l4 = vec![0u8; hl];
    let host_ip = e0.cfg.host;
    synack.emit(&mut l4, 0, IpAddr::V4(*guest().ip()), IpAddr::V4(host_ip));
    e1.on_frame(0, &frame_ipv4(PROTO_TCP, *guest().ip(), host_ip, &l4), now);
    assert!(take_tcp(&link1).is_empty(), "engine 1 refused engine 0's connection");
    e0.on_handed(now);
    e0.flush_acks(now);
    let acks = take_tcp(&link0);
    assert!(acks.iter().any(|(h, _)| h.has(ACK) && !h.has(SYN) && h.ack == 5001), "{acks:?}");
    // Bytes from the host end now reach the guest.
    host.write_all(b"hi").unwrap();
    e0.deliver_readiness(true, false, now);
    assert!(take_tcp(&link0).iter().any(|(_, data)| data == b"hi"));
}

/// A guest queue that breaks once a frame is waiting: its reading panics (a bug on an
/// engine's thread), or fails as a device that went away does.
struct BrokenQueue {
    sock: std::os::unix::net::UnixDatagram,
    panics: bool,
}

impl crate::link::Link for BrokenQueue {
    fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.recv(buf)?;
        if self.panics {
            panic!("a bug met on a frame of {n} bytes");
        }
        Err(io::Error::new(io::ErrorKind::InvalidData, "the device is gone"))
    }
    fn send(&mut self, _frame: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn describe(&self) -> String {
        "a queue that breaks".into()
    }
}

/// Stops the loop it supervises when its eventfd is written.
struct EventFdSupervisor(OwnedFd);

/// An eventfd for [`EventFdSupervisor`], written after `patience` by a watchdog thread,
/// which then sets the flag returned: a loop that never ends on its own is stopped, and the
/// test can tell.
fn stop_after(patience: Duration) -> (OwnedFd, Arc<std::sync::atomic::AtomicBool>) {
    // SAFETY: plain eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: a descriptor eventfd just returned, owned by nothing else.
    let stop: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let watchdog = stop.try_clone().unwrap();
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog_fired = fired.clone();
    std::thread::spawn(move || {
        std::thread::sleep(patience);
        watchdog_fired.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = nix::unistd::write(&watchdog, &1u64.to_ne_bytes());
    });
    (stop, fired)
}

/// The guest's ping of the gateway: sequence number `seq`, `len` bytes of data.
fn gateway_ping(seq: u16, len: usize) -> Vec<u8> {
    let mut m = vec![seq as u8; 8 + len];
    IcmpHeader::echo(icmp::TYPE_ECHO_REQUEST, 7, seq).emit(&mut m, len);
    frame_ipv4(PROTO_ICMP, *guest().ip(), Ipv4Addr::new(192, 168, 65, 1), &m)
}

/// The sequence number of `frame` if it is an echo reply.
fn echo_reply_seq(frame: &[u8]) -> Option<u16> {
    let parsed =
        EthernetHeader::parse(frame).and_then(|(_, p)| Ipv4Header::parse(p)).and_then(|(_, p)| IcmpHeader::parse(p));
    parsed.filter(|(h, _)| h.kind == icmp::TYPE_ECHO_REPLY).map(|(h, _)| h.seq())
}

impl Supervisor for EventFdSupervisor {
    fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.0)
    }
    fn on_ready(&mut self) -> Option<i32> {
        Some(0)
    }
}

/// Engine 0 with engine 1 on a thread of its own, whose queue breaks (`panics` or not)
/// at the first frame, possibly `before_join` engine 0 joined the set: what engine 0's
/// loop returns (Ok if it ran on until the test's 20 s watchdog).
fn engine0_when_engine1_breaks(panics: bool) -> io::Result<i32> {
    let cfg = Arc::new(NetConfig::default());
    let services = crate::services::ServiceHub::start(cfg.clone()).unwrap();
    let mut e0 = Engine::new(cfg.clone(), Box::new(FakeLink::default()), services.handle(), None).unwrap();
    let (queue, guest_end) = std::os::unix::net::UnixDatagram::pair().unwrap();
    queue.set_nonblocking(true).unwrap();
    let guest = shard::Guest { mac: GUEST_MAC, ip: *super::tests::guest().ip(), ip6: None, busy_poll: Duration::ZERO };
    // The frame waits before engine 1 starts: it breaks at once, maybe before engine 0 has
    // joined the set and has a waker (shard::start makes engine 0 join last).
    guest_end.send(&[0u8; 60]).unwrap();
    shard::start(&mut e0, cfg, &services, vec![Box::new(BrokenQueue { sock: queue, panics })], guest).unwrap();
    // SAFETY: plain eventfd(2).
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
    // SAFETY: a descriptor eventfd just returned, owned by nothing else.
    let stop: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let watchdog = stop.try_clone().unwrap();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        let one = 1u64.to_ne_bytes();
        let _ = nix::unistd::write(&watchdog, &one);
    });
    let ended = e0.run(&mut EventFdSupervisor(stop));
    drop(guest_end);
    ended
}

/// An engine that panics on its own thread ends the set: engine 0's loop returns the panic
/// as its error (so `usernet run` exits and says why) instead of running on while that
/// engine's queue goes unread; also when the panic came before engine 0 joined the set.
#[test]
fn a_panic_on_another_engine_thread_ends_engine_0_with_the_error() {
    let e = engine0_when_engine1_breaks(true).expect_err("engine 0 ran on after engine 1 panicked");
    assert!(e.to_string().contains("network engine 1 panicked: a bug met on a frame of 60 bytes"), "{e}");
}

/// An engine whose queue of the guest's device fails ends the set the same way.
#[test]
fn an_engine_that_loses_its_queue_ends_engine_0_with_the_error() {
    let e = engine0_when_engine1_breaks(false).expect_err("engine 0 ran on after engine 1 lost its queue");
    assert!(e.to_string().contains("network engine 1 stopped: its queue of the guest's device is gone"), "{e}");
}

type SynOwner = (u16, Option<usize>);

/// A guest link that notes, for every SYN it carries, which engine the owner map says holds
/// that SYN's flow at the moment it goes: the guest may answer within the write.
struct OwnerAtSyn {
    set: Arc<shard::ShardSet>,
    /// Each SYN's source port, and the owner of its flow when it went.
    seen: Rc<RefCell<Vec<SynOwner>>>,
    sent: FakeLink,
}

impl crate::link::Link for OwnerAtSyn {
    fn fd(&self) -> std::os::fd::RawFd {
        -1
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        let parsed = EthernetHeader::parse(frame)
            .and_then(|(_, p)| Ipv4Header::parse(p))
            .and_then(|(ip, p)| TcpHeader::parse(p).map(|(h, _)| (ip, h)));
        if let Some((ip, h)) = parsed
            && h.has(SYN)
        {
            let key = flows::FlowKey::Tcp {
                guest: SocketAddrV4::new(ip.dst, h.dst_port).into(),
                remote: SocketAddrV4::new(ip.src, h.src_port).into(),
            };
            self.seen.borrow_mut().push((h.src_port, self.set.owner(&key)));
        }
        self.sent.send(frame)
    }
}

/// A flow engine 0 opens toward the guest that falls back to other addresses (an inbound
/// flow's IPv4 pair, `TcpFlow::fallback`) claims them before its new SYN goes, as it claimed
/// its first ones: the guest's SYN-ACK, answered within that write, may reach another engine,
/// which must hand it over. A fallback the flow does not take is not left claimed.
#[test]
fn a_flow_that_falls_back_claims_its_new_addresses_before_its_syn() {
    falls_back_to(false);
}

/// When another engine's flow holds the addresses a flow would fall back to, it does not
/// fall back (its SYN would reach that connection): the guest's refusal resets it.
#[test]
fn a_flow_does_not_fall_back_to_addresses_another_engine_holds() {
    falls_back_to(true);
}

/// An inbound flow of engine 0 with a fallback, refused by the guest; `busy`: engine 1
/// holds the fallback's addresses.
fn falls_back_to(busy: bool) {
    let (set, mut inboxes) = shard::ShardSet::new(2);
    let seen = Rc::new(RefCell::new(Vec::new()));
    let link0 = FakeLink::default();
    let cfg = Arc::new(NetConfig::default());
    let mut e0 = Engine::with_dialer(cfg, Box::new(FakeDialer::default()), None).unwrap();
    e0.add_link(Box::new(OwnerAtSyn { set: set.clone(), seen: seen.clone(), sent: link0.clone() }));
    let (mut e1, _, _) = engine(false);
    let next = e1.control_handle().unwrap();
    e1.join_shards(set.clone(), 1, inboxes.pop().unwrap(), None).unwrap();
    e0.join_shards(set.clone(), 0, inboxes.pop().unwrap(), Some(next)).unwrap();
    e0.set_guest_mac(GUEST_MAC, *guest().ip());
    let now = Instant::now();

    let (ours, _theirs) = UnixStream::pair().unwrap();
    let to: std::net::SocketAddr = guest().into();
    e0.tunnel(OwnedFd::from(ours), to, now).unwrap();
    let syn = take_tcp(&link0).into_iter().find(|(h, _)| h.has(SYN)).expect("a SYN to the guest").0;
    let host = e0.cfg.host;
    let first = flows::FlowKey::Tcp { guest: to, remote: SocketAddrV4::new(host, syn.src_port).into() };
    let id = e0.flows.lookup(&first).unwrap();
    let other_port = syn.src_port.wrapping_add(1);
    let fallback = flows::FlowKey::Tcp { guest: to, remote: SocketAddrV4::new(host, other_port).into() };
    let Some(flows::Flow::Tcp(f)) = e0.flows.get_mut(id) else { panic!("not a TCP flow") };
    f.fallback = Some(Box::new((to, SocketAddrV4::new(host, other_port).into())));
    assert_eq!(seen.borrow().as_slice(), &[(syn.src_port, Some(0))], "the first SYN went claimed");

    // The SYN is retransmitted on its timer, not yet given up on: the fallback stays unclaimed.
    e0.run_timers(now + Duration::from_millis(300));
    assert_eq!(seen.borrow().len(), 2, "retransmitted");
    assert_eq!(set.owner(&fallback), None, "a fallback not taken is not left claimed");
    if busy {
        e1.claim(&fallback);
    }

    // The guest refuses the SYN: the flow falls back, and its new SYN goes claimed.
    let rst = TcpHeader {
        src_port: guest().port(),
        dst_port: syn.src_port,
        seq: 0,
        ack: syn.seq.wrapping_add(1),
        flags: RST | ACK,
        window: 0,
        ..Default::default()
    };
    let mut l4 = vec![0u8; rst.emit_len()];
    rst.emit(&mut l4, 0, IpAddr::V4(*guest().ip()), IpAddr::V4(host));
    e0.on_frame(0, &frame_ipv4(PROTO_TCP, *guest().ip(), host, &l4), now);
    if busy {
        assert_eq!(seen.borrow().len(), 2, "a SYN went to addresses another engine's flow holds");
        assert_eq!(e0.flow_count(), 0, "refused, the flow ends");
        assert_eq!((set.owner(&first), set.owner(&fallback)), (None, Some(1)));
        return;
    }
    assert_eq!(
        seen.borrow().last(),
        Some(&(other_port, Some(0))),
        "the new SYN went before its addresses were claimed"
    );
    assert_eq!(e0.flows.lookup(&fallback), Some(id));
    assert_eq!((set.owner(&first), set.owner(&fallback)), (None, Some(0)));
}

/// A link that passes everything to a stream link and notes each frame it hands out: its
/// length, and whether the link was polling when it was read.
struct NotingLink {
    inner: crate::link::qemu::StreamLink,
    frames: Rc<RefCell<Vec<(usize, bool)>>>,
}

impl crate::link::Link for NotingLink {
    fn fd(&self) -> std::os::fd::RawFd {
        self.inner.fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let polling = self.inner.polling();
        let n = self.inner.recv(buf)?;
        self.frames.borrow_mut().push((n, polling));
        Ok(n)
    }
    fn readable_edge(&mut self, peer_closed: bool) {
        self.inner.readable_edge(peer_closed)
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.inner.send(frame)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
    fn polling(&self) -> bool {
        self.inner.polling()
    }
    fn read_events(&self) -> bool {
        self.inner.read_events()
    }
    fn write_events(&self) -> bool {
        self.inner.write_events()
    }
}

/// A QEMU stream link in a running engine, through a polled upload: the guest's bulk frames
/// (1,100-byte pings to the gateway) make the link poll (the engine stops watching its
/// socket for reading) and every one is answered; after a pause the socket is watched
/// again, so a lone small ping is read on its own event, not by a poll; and the guest
/// hanging up during a second upload ends the link (the engine, told to stop without
/// links, returns).
#[test]
fn a_stream_link_polled_during_an_upload_misses_no_frame_and_no_hang_up() {
    use crate::link::qemu::{Framing, StreamLink};
    let (ours, mut vm) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cfg = Arc::new(NetConfig::default());
    let services = crate::services::ServiceHub::start(cfg.clone()).unwrap();
    let frames = Rc::new(RefCell::new(Vec::new()));
    let link =
        NotingLink { inner: StreamLink::new(OwnedFd::from(ours), Framing::Be32, "vm".into()), frames: frames.clone() };
    let mut e = Engine::new(cfg, Box::new(link), services, None).unwrap();
    e.stop_without_links();

    let (stop, fired) = stop_after(Duration::from_secs(20));
    const LONE: usize = 10;
    let guest_thread = std::thread::spawn(move || {
        let ping = |seq: u16, len: usize| {
            let f = gateway_ping(seq, len);
            let mut framed = (f.len() as u32).to_be_bytes().to_vec();
            framed.extend(f);
            framed
        };
        // Replies (and anything else the engine sends: router advertisements) until
        // `want` echo replies came; their sequence numbers.
        let replies = |vm: &mut UnixStream, want: usize| {
            vm.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut seqs = Vec::new();
            while seqs.len() < want {
                let mut len = [0u8; 4];
                vm.read_exact(&mut len).expect("a reply");
                let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                vm.read_exact(&mut f).unwrap();
                seqs.extend(echo_reply_seq(&f));
            }
            seqs
        };
        let upload: Vec<u8> = (0..64).flat_map(|seq| ping(seq, 1100)).collect();
        vm.write_all(&upload).unwrap();
        let first = replies(&mut vm, 64);
        // Far longer than POLL_IDLE: polling has ended.
        std::thread::sleep(Duration::from_millis(100));
        vm.write_all(&ping(1000, LONE)).unwrap();
        let lone = replies(&mut vm, 1);
        vm.write_all(&upload).unwrap();
        drop(vm);
        (first, lone)
    });
    let ended = e.run(&mut EventFdSupervisor(stop));
    let (first, lone) = guest_thread.join().expect("the guest's side");
    assert!(!fired.load(std::sync::atomic::Ordering::SeqCst), "the engine did not see the guest hang up");
    assert_eq!(ended.unwrap(), 0);
    assert_eq!(first, (0..64).collect::<Vec<u16>>());
    assert_eq!(lone, vec![1000]);
    let frames = frames.borrow();
    let bulk = 14 + 20 + 8 + 1100;
    assert!(frames.iter().any(|&(n, polling)| n == bulk && polling), "the upload was never polled");
    let lone_frames: Vec<bool> = frames.iter().filter(|&&(n, _)| n == 14 + 20 + 8 + LONE).map(|&(_, p)| p).collect();
    assert_eq!(lone_frames, vec![false], "the lone ping was read on its own event");
}

/// A link over a SOCK_SEQPACKET socket, one frame per packet and one read(2) per `recv`,
/// that the engine may watch level-triggered, as a TAP device: it notes what each read gave
/// (the frame's length, or None for EAGAIN).
struct LevelLink {
    sock: UnixStream,
    reads: Rc<RefCell<Vec<Option<usize>>>>,
}

impl crate::link::Link for LevelLink {
    fn fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.sock)
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match (&self.sock).read(buf) {
            Ok(0) => Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                self.reads.borrow_mut().push(Some(n));
                Ok(n)
            }
            Err(e) => {
                if e.kind() == io::ErrorKind::WouldBlock {
                    self.reads.borrow_mut().push(None);
                }
                Err(e)
            }
        }
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        (&self.sock).write(frame).map(drop)
    }
    fn write_events(&self) -> bool {
        false
    }
    fn level_triggered(&self) -> bool {
        true
    }
}

/// A level-triggered link in a running engine that busy-polls: a frame that comes alone
/// while it spins is read without a second read that finds the descriptor empty (once the
/// window has grown to the guest's pace), yet one sent right behind it is not left waiting;
/// a burst is read whole; every ping is answered, in order; and the guest's hang-up ends the
/// link.
#[test]
fn a_level_triggered_link_reads_a_lone_frame_once_and_misses_none() {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    // Packets on a Unix stream's methods: read and write keep their boundaries.
    let (ours, vm) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).unwrap();
    let (ours, mut vm) = (UnixStream::from(ours), UnixStream::from(vm));
    ours.set_nonblocking(true).unwrap();
    let cfg = Arc::new(NetConfig::default());
    let services = crate::services::ServiceHub::start(cfg.clone()).unwrap();
    let reads = Rc::new(RefCell::new(Vec::new()));
    let mut e = Engine::new(cfg, Box::new(LevelLink { sock: ours, reads: reads.clone() }), services, None).unwrap();
    e.stop_without_links();
    // A window that grows to whatever the guest thread's pace is on a loaded machine.
    e.set_busy_poll(Duration::from_secs(2));
    let (stop, fired) = stop_after(Duration::from_secs(20));
    const LONE: usize = 10;
    const LONE_PINGS: u16 = 50;
    const PAIRED: usize = 20;
    const BURST: usize = 30;
    let guest_thread = std::thread::spawn(move || {
        vm.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // Echo replies' sequence numbers until `want` came (router advertisements and the
        // like are skipped).
        let replies = |vm: &mut UnixStream, want: usize| {
            let mut seqs = Vec::new();
            let mut f = vec![0u8; 65536];
            while seqs.len() < want {
                let n = vm.read(&mut f).expect("a reply");
                seqs.extend(echo_reply_seq(&f[..n]));
            }
            seqs
        };
        let mut seqs = Vec::new();
        // Each a while after the answer to the one before (many empty polls of the spin
        // later, well within the window once it has grown): each comes alone.
        for seq in 0..LONE_PINGS {
            std::thread::sleep(Duration::from_micros(200));
            vm.write_all(&gateway_ping(seq, LONE)).unwrap();
            seqs.extend(replies(&mut vm, 1));
        }
        // Two at once: the second waits in the socket when the first is read alone.
        std::thread::sleep(Duration::from_millis(20));
        vm.write_all(&gateway_ping(100, PAIRED)).unwrap();
        vm.write_all(&gateway_ping(101, PAIRED)).unwrap();
        seqs.extend(replies(&mut vm, 2));
        std::thread::sleep(Duration::from_millis(20));
        for seq in 200..264 {
            vm.write_all(&gateway_ping(seq, BURST)).unwrap();
        }
        seqs.extend(replies(&mut vm, 64));
        drop(vm);
        seqs
    });
    let ended = e.run(&mut EventFdSupervisor(stop));
    let seqs = guest_thread.join().expect("the guest's side");
    assert!(!fired.load(std::sync::atomic::Ordering::SeqCst), "the engine did not see the guest hang up");
    assert_eq!(ended.unwrap(), 0);
    let want: Vec<u16> = (0..LONE_PINGS).chain(100..102).chain(200..264).collect();
    assert_eq!(seqs, want);
    let reads = reads.borrow();
    let frame = |len: usize| Some(14 + 20 + 8 + len);
    // Read until empty, every lone frame would be followed by an empty read; here only
    // those that came before the window grew, or while the loop blocked after all.
    let after_lone: Vec<Option<usize>> = reads.windows(2).filter(|w| w[0] == frame(LONE)).map(|w| w[1]).collect();
    assert_eq!(after_lone.len(), LONE_PINGS as usize, "reads: {reads:?}");
    let empty = after_lone.iter().filter(|r| r.is_none()).count();
    assert!(empty <= LONE_PINGS as usize / 2, "{empty} lone frames were followed by an empty read: {reads:?}");
    assert_eq!(reads.iter().filter(|r| **r == frame(PAIRED)).count(), 2);
    assert_eq!(reads.iter().filter(|r| **r == frame(BURST)).count(), 64);
}

/// A link closed by its id (`Command::DropLink`: `serve --netns` when a namespace is gone)
/// is that link only: an id that outlived its link leaves alone the one in its slot now.
#[test]
fn a_link_dropped_by_id_is_that_link_and_not_the_next_in_its_slot() {
    let (mut e, link, _dialer) = engine(false);
    let first = e.add_link(Box::new(link.clone()));
    e.drop_link_by_id(first, "its namespace is gone");
    assert!(e.switch.links[first.index].is_none());
    let second = e.add_link(Box::new(link.clone()));
    assert_eq!(second.index, first.index, "the slot serves the next link");
    assert_ne!(second, first);
    e.drop_link_by_id(first, "told twice");
    assert!(e.switch.links[second.index].is_some(), "an old id closed the link after it");
    e.drop_link_by_id(second, "its namespace is gone");
    assert!(e.switch.links[second.index].is_none());
    // The engine's first link (engine()) was never named: still there.
    assert!(e.switch.links[0].is_some());
}

/// TCP data goes to each guest as its own link takes it: one offloaded frame of up to
/// 64 KiB to a guest whose link offloads, whole segments of the MSS to another guest on the
/// same switch whose link does not (a namespace's TAP and a VM on the stream transport on
/// one `serve`).
#[test]
fn tcp_data_is_offloaded_only_to_a_guest_whose_link_takes_it() {
    use super::switch::TCP_PAYLOAD_OFF;
    use usernet_wire::vnet_hdr;
    let (mut e, plain, _dialer) = engine(false);
    let fast = FakeLink::default();
    fast.takes_offloads.set(true);
    e.add_link(Box::new(fast.clone()));
    let (a, b) = (Ipv4Addr::new(192, 168, 65, 2), Ipv4Addr::new(192, 168, 65, 3));
    e.switch.learn(0, GUEST_MAC, Some(IpAddr::V4(a)));
    e.switch.learn(1, [0x02, 0, 0, 0, 0, 0x0b], Some(IpAddr::V4(b)));
    let from = std::net::SocketAddr::new(IpAddr::V4(*remote().ip()), 80);
    let hdr =
        TcpHeader { src_port: 80, dst_port: 40000, seq: 1, ack: 1, flags: ACK, window: 100, ..Default::default() };
    for to in [a, b] {
        e.switch.buf()[TCP_PAYLOAD_OFF..TCP_PAYLOAD_OFF + 3000].fill(7);
        e.switch.send_tcp_data(from, std::net::SocketAddr::new(IpAddr::V4(to), 40000), &hdr, 3000, 1000);
    }
    assert_eq!(plain.sent.borrow().len(), 3, "three whole segments");
    assert!(plain.sent_offloaded.borrow().is_empty());
    assert!(fast.sent.borrow().is_empty());
    let offloaded = fast.sent_offloaded.borrow();
    assert_eq!(offloaded.len(), 1, "one offloaded frame");
    assert_eq!((offloaded[0].1.gso_type, offloaded[0].1.gso_size), (vnet_hdr::GSO_TCPV4, 1000));
    assert_eq!(offloaded[0].0.len(), 14 + 20 + 20 + 3000);
}

/// A guest's frame with offloads (a partial checksum, a 64 KiB TCP segment: a vhost-user
/// guest with HOST_TSO, or a TAP's frame read before its offloads went off) reaches another
/// guest whole, in the segments its kernel would have cut, or as it is with its offloads
/// when that guest's link takes them; one that cannot be finished goes nowhere.
#[test]
fn a_guest_s_offloaded_frame_reaches_another_guest_whole() {
    use super::metrics::DropReason;
    use usernet_wire::vnet_hdr::{self, VnetHdr};
    let (mut e, sender, _dialer) = engine(false);
    let other = FakeLink::default();
    e.add_link(Box::new(other.clone()));
    let now = Instant::now();
    let (a, b) = (Ipv4Addr::new(192, 168, 65, 2), Ipv4Addr::new(192, 168, 65, 3));
    let mac_b = [0x02, 0, 0, 0, 0, 0x0b];
    // The other guest speaks first, so that the switch knows its link.
    let mut hello = frame_ipv4(usernet_wire::PROTO_UDP, b, Ipv4Addr::new(192, 168, 65, 1), &[0, 9, 0, 9, 0, 8, 0, 0]);
    hello[6..12].copy_from_slice(&mac_b);
    e.on_frame(1, &hello, now);
    other.sent.borrow_mut().clear();
    let payload: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    let tcp = TcpHeader {
        src_port: 40000,
        dst_port: 8080,
        seq: 1000,
        ack: 1,
        flags: ACK | usernet_wire::tcp::PSH,
        window: 500,
        ..Default::default()
    };
    let hl = tcp.emit_len();
    let mut seg = vec![0u8; hl + payload.len()];
    seg[hl..].copy_from_slice(&payload);
    tcp.emit_partial(&mut seg, payload.len(), IpAddr::V4(a), IpAddr::V4(b));
    let mut frame = frame_ipv4(usernet_wire::PROTO_TCP, a, b, &seg);
    frame[..6].copy_from_slice(&mac_b);
    let gso = VnetHdr {
        flags: vnet_hdr::F_NEEDS_CSUM,
        gso_type: vnet_hdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1000,
        csum_start: 34,
        csum_offset: 16,
    };
    sender.recv_offloads.set(gso);
    e.on_frame(0, &frame, now);
    let got = std::mem::take(&mut *other.sent.borrow_mut());
    assert_eq!(got.len(), 3, "3000 bytes in segments of 1000");
    let mut data = Vec::new();
    for (i, f) in got.iter().enumerate() {
        let (ip, l4) = Ipv4Header::parse(&f[ethernet::HEADER_LEN..]).expect("a whole IPv4 header");
        let sum = usernet_wire::checksum::finish(usernet_wire::checksum::add(
            usernet_wire::checksum::pseudo(IpAddr::V4(ip.src), IpAddr::V4(ip.dst), usernet_wire::PROTO_TCP, l4.len()),
            l4,
        ));
        assert_eq!(sum, 0, "segment {i}: a whole TCP checksum");
        let (h, d) = TcpHeader::parse(l4).unwrap();
        assert_eq!(h.seq, 1000 + 1000 * i as u32);
        assert_eq!(h.has(usernet_wire::tcp::PSH), i == 2);
        data.extend_from_slice(d);
    }
    assert_eq!(data, payload);
    // A link that takes offloads gets the frame as it is, with them.
    other.takes_offloads.set(true);
    e.on_frame(0, &frame, now);
    assert!(other.sent.borrow().is_empty());
    assert_eq!(*other.sent_offloaded.borrow(), vec![(frame.clone(), gso)]);
    // One that cannot be finished (a segment size of 0) goes nowhere.
    other.takes_offloads.set(false);
    sender.recv_offloads.set(VnetHdr { gso_size: 0, ..gso });
    let malformed = e.switch.counters.dropped_count(DropReason::Malformed);
    e.on_frame(0, &frame, now);
    assert!(other.sent.borrow().is_empty());
    assert_eq!(e.switch.counters.dropped_count(DropReason::Malformed), malformed + 1);
    // A whole frame goes as it is.
    sender.recv_offloads.set(VnetHdr::default());
    e.on_frame(0, &frame, now);
    assert_eq!(*other.sent.borrow(), vec![frame]);
}
