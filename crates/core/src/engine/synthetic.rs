//! The engine without a network: a link that records what goes to the guest, a dialer of
//! socketpairs instead of connections, and [`fuzz_guest_frames`], which drives an engine
//! from arbitrary bytes for coverage-guided fuzzing (the `fuzz/` crate) and for the unit
//! tests that replay its inputs.

use std::cell::RefCell;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Engine;
use super::dial::{Dialer, IcmpKind, TcpDial, UdpDial};
use super::flows::FlowId;
use super::sock::Segmenting;
use crate::config::NetConfig;
use crate::guest::GuestKey;
use crate::link::Link;
use usernet_wire::vnet_hdr::VnetHdr;

/// A frame sent with its offloads.
pub type Offloaded = (Vec<u8>, VnetHdr);

/// A guest link that never has a frame to read and records every frame sent to the guest.
#[derive(Clone, Default)]
pub struct RecordingLink {
    pub sent: Rc<RefCell<Vec<Vec<u8>>>>,
    /// Keep no frames, only count them (fuzzing: memory stays flat).
    pub count_only: bool,
    pub count: Rc<RefCell<usize>>,
    /// What `recv_offloads` says of the guest's frame (the test hands it to `on_frame`).
    pub recv_offloads: Rc<std::cell::Cell<VnetHdr>>,
    /// The link takes offloaded frames (`Link::offloads`); those it got, with their headers.
    pub takes_offloads: Rc<std::cell::Cell<bool>>,
    /// It also takes segmented UDP frames (`Link::offloads_udp`).
    pub takes_uso: Rc<std::cell::Cell<bool>>,
    pub sent_offloaded: Rc<RefCell<Vec<Offloaded>>>,
}

impl Link for RecordingLink {
    fn fd(&self) -> RawFd {
        -1
    }
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        *self.count.borrow_mut() += 1;
        if !self.count_only {
            self.sent.borrow_mut().push(frame.to_vec());
        }
        Ok(())
    }
    fn recv_offloads(&self) -> VnetHdr {
        self.recv_offloads.get()
    }
    fn offloads(&self) -> bool {
        self.takes_offloads.get()
    }
    fn offloads_udp(&self) -> bool {
        self.takes_offloads.get() && self.takes_uso.get()
    }
    fn send_offloaded(&mut self, frame: &[u8], hdr: &VnetHdr) -> io::Result<()> {
        self.sent_offloaded.borrow_mut().push((frame.to_vec(), *hdr));
        Ok(())
    }
}

/// Hands out socketpairs; keeps the far ends (blocking) to play the remote hosts.
#[derive(Clone, Default)]
pub struct PairDialer {
    pub tcp_peers: Rc<RefCell<Vec<UnixStream>>>,
    pub udp_peers: Rc<RefCell<Vec<UnixDatagram>>>,
    /// Every connect is refused.
    pub refuse: bool,
    /// TCP connects are reported in progress (the socketpair is connected all the same).
    pub in_progress: bool,
    /// The guest each dial was made for, in order (see [`GuestKey`]).
    pub guests: Rc<RefCell<Vec<GuestKey>>>,
}

impl Dialer for PairDialer {
    fn tcp(&mut self, _dst: SocketAddr, _guest: SocketAddr, who: GuestKey) -> io::Result<TcpDial> {
        self.guests.borrow_mut().push(who);
        if self.refuse {
            return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        }
        let (a, b) = UnixStream::pair()?;
        a.set_nonblocking(true)?;
        self.tcp_peers.borrow_mut().push(b);
        Ok(TcpDial { fd: OwnedFd::from(a), connected: !self.in_progress, is_tcp: false })
    }
    fn udp(&mut self, _dst: SocketAddr, _guest: SocketAddr, who: GuestKey) -> io::Result<UdpDial> {
        self.guests.borrow_mut().push(who);
        if self.refuse {
            return Err(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        }
        let (a, b) = UnixDatagram::pair()?;
        a.set_nonblocking(true)?;
        self.udp_peers.borrow_mut().push(b);
        Ok(UdpDial { fd: OwnedFd::from(a), segmenting: Segmenting::Never })
    }
    fn icmp(&mut self, _dst: IpAddr) -> io::Result<(OwnedFd, IcmpKind)> {
        Err(io::Error::from_raw_os_error(libc::EPERM))
    }
}

impl Engine {
    /// Delivers readiness for every flow's socket, then the round's ACKs, as the event
    /// loop would.
    pub fn deliver_readiness(&mut self, readable: bool, writable: bool, now: Instant) {
        let ids: Vec<FlowId> = self.flows.ids().map(|(id, _)| id).collect();
        for id in ids {
            self.on_socket(id, readable, writable, false, now);
        }
        self.flush_acks(now);
    }

    /// Runs the timers due at `now`.
    pub fn fire_timers(&mut self, now: Instant) {
        self.run_timers(now);
    }
}

/// Reads a little-endian u16 off the front of `data`.
fn take_u16(data: &mut &[u8]) -> Option<u16> {
    let (v, rest) = data.split_first_chunk::<2>()?;
    *data = rest;
    Some(u16::from_le_bytes(*v))
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (v, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    v
}

/// Drives an engine (default network, a recording link, socketpair peers) with `data`, a
/// program of operations, each a byte and its operands:
///
/// - `0`: a raw guest frame (u16 length, the bytes);
/// - `1`: an IP packet from the guest (a byte for the protocol: TCP, UDP or ICMP; a byte
///   for the destination: the gateway, a remote host or the host's address; u16 length and
///   the transport header and payload), with valid Ethernet and IP headers around it, so
///   that the fuzzer's bytes reach the translators. The destination byte's high bit makes
///   it IPv6 (ICMP is then ICMPv6, its checksum filled in, since the engine checks that
///   one; the protocol byte's high bit sends from the guest's link-local address instead
///   of its global one), hop limit 255 so that neighbour and router discovery are heard;
/// - `2`: every remote peer writes (u16 length, the bytes), or, for a zero length, closes;
/// - `3`: readiness of every flow's socket, and the ACKs of the round;
/// - `4`: time passes (a byte: seconds) and the timers run;
/// - `5`: a fragment from the guest (a byte: IPv6 if its high bit is set, the
///   more-fragments flag in bit 6, a UDP or ICMP datagram to the gateway, a remote host or
///   the host's address; a byte for the identification, of 256; u16 offset in 8-byte units;
///   u16 length and the fragment's bytes), so that reassembly and what it hands on are
///   reached.
///
/// Whatever the bytes, the engine must not panic.
pub fn fuzz_guest_frames(mut data: &[u8]) {
    let link = RecordingLink { count_only: true, ..Default::default() };
    let dialer = PairDialer { refuse: data.first().is_some_and(|b| b & 0x80 != 0), ..Default::default() };
    let cfg = Arc::new(NetConfig::default());
    let Ok(mut e) = Engine::with_dialer(cfg.clone(), Box::new(dialer.clone()), None) else { return };
    e.add_link(Box::new(link));
    let mut now = Instant::now();
    let mut frame = Vec::with_capacity(9216);
    while let Some((&op, rest)) = data.split_first() {
        data = rest;
        match op % 6 {
            0 => {
                let Some(len) = take_u16(&mut data) else { return };
                e.on_frame(0, take(&mut data, len as usize), now);
            }
            1 => {
                let (Some(&proto), Some(&dst)) = (data.first(), data.get(1)) else { return };
                data = &data[2..];
                let Some(len) = take_u16(&mut data) else { return };
                let l4 = take(&mut data, len as usize);
                match cfg.v6.as_ref().filter(|_| dst & 0x80 != 0) {
                    None => {
                        let proto = [usernet_wire::PROTO_TCP, usernet_wire::PROTO_UDP, usernet_wire::PROTO_ICMP]
                            [proto as usize % 3];
                        let dst = match dst % 3 {
                            0 => cfg.gateway,
                            1 => Ipv4Addr::new(203, 0, 113, 10),
                            _ => cfg.host,
                        };
                        guest_packet(&mut frame, cfg.guest.into(), dst.into(), proto, l4);
                    }
                    Some(net) => {
                        let src =
                            if proto & 0x80 != 0 { Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 2) } else { net.guest };
                        let dst = match (dst & 0x7f) % 3 {
                            0 => net.gateway,
                            1 => Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10),
                            _ => net.host,
                        };
                        let proto = [usernet_wire::PROTO_TCP, usernet_wire::PROTO_UDP, usernet_wire::PROTO_ICMPV6]
                            [(proto & 0x7f) as usize % 3];
                        guest_packet(&mut frame, src.into(), dst.into(), proto, l4);
                    }
                }
                e.on_frame(0, &frame, now);
            }
            2 => {
                let Some(len) = take_u16(&mut data) else { return };
                let bytes = take(&mut data, len as usize);
                for peer in dialer.tcp_peers.borrow_mut().iter_mut() {
                    let _ = peer.set_nonblocking(true);
                    if bytes.is_empty() {
                        let _ = peer.shutdown(std::net::Shutdown::Write);
                    } else {
                        let _ = peer.write(bytes);
                    }
                }
                for peer in dialer.udp_peers.borrow().iter() {
                    let _ = peer.set_nonblocking(true);
                    let _ = peer.send(bytes);
                }
            }
            3 => e.deliver_readiness(true, true, now),
            5 => {
                let (Some(&kind), Some(&ident)) = (data.first(), data.get(1)) else { return };
                data = &data[2..];
                let (Some(offset), Some(len)) = (take_u16(&mut data), take_u16(&mut data)) else { return };
                let bytes = take(&mut data, len as usize);
                let (more, offset) = (kind & 0x40 != 0, usize::from(offset & 0x1fff) * 8);
                let proto = [usernet_wire::PROTO_UDP, usernet_wire::PROTO_ICMP][usize::from(kind & 1)];
                match cfg.v6.as_ref().filter(|_| kind & 0x80 != 0) {
                    None => {
                        let dst =
                            [cfg.gateway, Ipv4Addr::new(203, 0, 113, 10), cfg.host][usize::from(kind >> 1 & 3) % 3];
                        guest_packet(&mut frame, cfg.guest.into(), dst.into(), proto, bytes);
                        let ip = &mut frame[usernet_wire::ethernet::HEADER_LEN..];
                        let mut h = usernet_wire::ipv4::Ipv4Header::parse(ip).map(|(h, _)| h).expect("just built");
                        (h.ident, h.dont_frag, h.more_fragments, h.frag_offset) = (ident.into(), false, more, offset);
                        h.emit(ip);
                    }
                    Some(net) => {
                        let dst = [net.gateway, Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10), net.host]
                            [usize::from(kind >> 1 & 3) % 3];
                        let proto = if proto == usernet_wire::PROTO_ICMP { usernet_wire::PROTO_ICMPV6 } else { proto };
                        let mut l4 = vec![0u8; usernet_wire::ipv6::FRAGMENT_HEADER_LEN];
                        usernet_wire::ipv6::Fragment { offset, more, ident: ident.into() }.emit(proto, &mut l4);
                        l4.extend_from_slice(bytes);
                        guest_packet(&mut frame, net.guest.into(), dst.into(), usernet_wire::ipv6::EXT_FRAGMENT, &l4);
                    }
                }
                e.on_frame(0, &frame, now);
            }
            _ => {
                let Some((&secs, rest)) = data.split_first() else { return };
                data = rest;
                now += Duration::from_millis(u64::from(secs) * 250);
                e.fire_timers(now);
            }
        }
    }
    e.deliver_readiness(true, true, now);
    e.fire_timers(now + Duration::from_secs(600));
}

/// An Ethernet frame from the guest with an IP packet from `src` to `dst` carrying `l4`:
/// IPv4, or IPv6 with hop limit 255 and an ICMPv6 message's checksum filled in.
fn guest_packet(frame: &mut Vec<u8>, src: IpAddr, dst: IpAddr, proto: u8, l4: &[u8]) {
    use usernet_wire::{ethernet, icmpv6, ipv4, ipv6};
    let (ethertype, ip_len) = match src {
        IpAddr::V4(_) => (ethernet::ETHERTYPE_IPV4, ipv4::HEADER_LEN),
        IpAddr::V6(_) => (ethernet::ETHERTYPE_IPV6, ipv6::HEADER_LEN),
    };
    frame.clear();
    frame.resize(ethernet::HEADER_LEN + ip_len + l4.len(), 0);
    ethernet::EthernetHeader { dst: crate::config::GATEWAY_MAC, src: [0x02, 0, 0, 0, 0, 2], ethertype }.emit(frame);
    let (ip, payload) = frame[ethernet::HEADER_LEN..].split_at_mut(ip_len);
    payload.copy_from_slice(l4);
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => ipv4::Ipv4Header::new(src, dst, proto, l4.len()).emit(ip),
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            let mut h = ipv6::Ipv6Header::new(src, dst, proto, l4.len());
            h.hop_limit = 255;
            h.emit(ip);
            if proto == usernet_wire::PROTO_ICMPV6 && payload.len() >= 4 {
                icmpv6::fill_checksum(payload, src, dst);
            }
        }
        _ => unreachable!("both addresses of one family"),
    }
}

#[cfg(test)]
mod tests {
    /// The fuzzer's seeds, and any input a campaign found that once failed (kept in
    /// `fuzz/regressions/engine`), replayed through the same entry point: the harness stays
    /// in step with the engine, and a fixed crash stays fixed.
    #[test]
    fn fuzz_inputs_replay() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        let mut replayed = 0;
        for dir in ["seeds/engine", "regressions/engine"] {
            let Ok(entries) = std::fs::read_dir(root.join(dir)) else { continue };
            for e in entries.flatten() {
                super::fuzz_guest_frames(&std::fs::read(e.path()).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed >= 4, "the seeds are in fuzz/seeds/engine ({replayed} found)");
        // And some bytes of every kind of operation, truncated anywhere.
        let program: Vec<u8> = (0..=255u8).cycle().take(3000).collect();
        for end in (0..program.len()).step_by(97) {
            super::fuzz_guest_frames(&program[..end]);
        }
    }
}
