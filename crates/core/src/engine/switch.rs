//! The virtual network's switch: it owns every guest link, learns which MAC sits behind
//! which link and which IP address has which MAC (from the guests' own frames), and sends
//! each frame to the one link it is for, or floods it when the MAC is unknown or a
//! broadcast, as a learning switch does. It counts what the links carry.
//!
//! It also builds the frames the engine sends to the guests: one reusable buffer in which a
//! flow places its payload, then the headers are written in front of it and the frame goes
//! out (and to the pcap). The transport header always starts at [`L4_OFF`], after room for
//! the larger IP header (IPv6's 40 bytes): an IPv6 frame starts at the buffer's first byte,
//! an IPv4 frame 20 bytes later. So a flow places its payload at one offset whatever its
//! family.
//!
//! The MAC table holds at most [`MAX_MACS_PER_LINK`] MACs per link: a guest that floods
//! frames from made-up MACs cannot grow it further (frames for MACs it could not learn are
//! flooded, as a switch with a full table does), and the log says so once per link.
//!
//! A frame for a guest address whose MAC is not known yet (a client of a published port
//! before the guest has said anything) waits while the switch asks for it with ARP (IPv4)
//! or a neighbour solicitation (IPv6), as the
//! kernel's queue of unresolved neighbours does: at most [`PENDING_PER_IP`] frames per
//! address, for at most [`PENDING_TTL`], for at most [`MAX_PENDING_IPS`] addresses; the ARP
//! reply (or any frame of the guest's that teaches its MAC) sends them, in order.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use super::metrics::{Counters, DropReason, Limit, LinkCounters};
use super::sock::{self, TwoDatagrams};
use crate::link::Link;
use crate::pcap::PcapWriter;
use usernet_wire::icmp::IcmpHeader;
use usernet_wire::ipv4::{self, Ipv4Header};
use usernet_wire::ipv6::{self, Ipv6Header};
use usernet_wire::tcp::TcpHeader;
use usernet_wire::udp::{self, UdpHeader};
use usernet_wire::vnet_hdr::{self, VnetHdr};
use usernet_wire::{BROADCAST_MAC, Mac, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, arp, ethernet};

/// Where the transport header (TCP, UDP, ICMP, ICMPv6) starts in the frame buffer, for
/// either IP family (see the top of this file).
pub const L4_OFF: usize = ethernet::HEADER_LEN + ipv6::HEADER_LEN;
/// Where a data segment's payload starts in the frame buffer, when the segment carries no
/// TCP options; with timestamps, `TIMESTAMPS_LEN` further (see `TcpFlow::payload_off`).
pub const TCP_PAYLOAD_OFF: usize = L4_OFF + usernet_wire::tcp::HEADER_LEN;
/// Where a UDP payload starts in the frame buffer.
pub const UDP_PAYLOAD_OFF: usize = L4_OFF + udp::HEADER_LEN;
/// Where ICMP or ICMPv6 data (after the 8-byte header) starts in the frame buffer.
pub const ICMP_DATA_OFF: usize = L4_OFF + usernet_wire::icmp::HEADER_LEN;

/// Length of the IP header usernet emits for a family.
pub fn ip_header_len(v6: bool) -> usize {
    if v6 { ipv6::HEADER_LEN } else { ipv4::HEADER_LEN }
}

/// Largest transport message (header and data) one IP packet carries, over IPv6 or IPv4: the
/// IPv4 total length and the IPv6 payload length are 16 bits. Whatever is beyond the MTU goes
/// in fragments ([`Switch::fragment`]).
pub fn max_l4_len(v6: bool) -> usize {
    if v6 { 0xffff } else { 0xffff - ipv4::HEADER_LEN }
}

/// A random number, from the standard library's per-process random hash keys.
fn random_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new().build_hasher().finish() as u32
}

/// Where a frame of the family starts in the buffer.
fn frame_start(v6: bool) -> usize {
    ipv6::HEADER_LEN - ip_header_len(v6)
}

/// Why a guest's packet could not be delivered (an ICMP or ICMPv6 destination unreachable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unreachable {
    /// The host has no route to the network.
    Net,
    /// The host could not reach the address.
    Host,
    /// Nothing listens on the port.
    Port,
    /// The egress policy denied it.
    AdminProhibited,
    /// IPv6 only: a link-local source cannot reach a destination beyond the link.
    BeyondScope,
}

impl Unreachable {
    /// The ICMPv4 code (RFC 792, RFC 1812).
    fn code_v4(self) -> u8 {
        match self {
            Unreachable::Net => usernet_wire::icmp::CODE_NET_UNREACHABLE,
            Unreachable::Host | Unreachable::BeyondScope => usernet_wire::icmp::CODE_HOST_UNREACHABLE,
            Unreachable::Port => usernet_wire::icmp::CODE_PORT_UNREACHABLE,
            Unreachable::AdminProhibited => usernet_wire::icmp::CODE_ADMIN_PROHIBITED,
        }
    }

    /// The ICMPv6 code (RFC 4443 section 3.1).
    fn code_v6(self) -> u8 {
        match self {
            Unreachable::Net => usernet_wire::icmpv6::CODE_NO_ROUTE,
            Unreachable::Host => usernet_wire::icmpv6::CODE_ADDRESS_UNREACHABLE,
            Unreachable::Port => usernet_wire::icmpv6::CODE_PORT_UNREACHABLE,
            Unreachable::AdminProhibited => usernet_wire::icmpv6::CODE_ADMIN_PROHIBITED,
            Unreachable::BeyondScope => usernet_wire::icmpv6::CODE_BEYOND_SCOPE,
        }
    }

    /// From the errno of a failed connect or send.
    pub fn from_errno(err: i32) -> Unreachable {
        match err {
            libc::ECONNREFUSED => Unreachable::Port,
            libc::EACCES | libc::EPERM => Unreachable::AdminProhibited,
            libc::ENETUNREACH => Unreachable::Net,
            _ => Unreachable::Host,
        }
    }
}

/// MACs learned per guest link (a VM has one, a link to another switch a few hundred).
pub const MAX_MACS_PER_LINK: usize = 1024;

/// IPv6 addresses one link's guest holds at once with [`Switch::bind_sources`] (a
/// link-local one, a SLAAC one, privacy addresses as they rotate): a new one beyond them
/// frees the one it took first, so a guest whose privacy addresses rotate for weeks keeps
/// working, and no guest ever holds more.
pub const MAX_IPV6_PER_LINK: usize = 16;

/// Frames held per guest address while its MAC is asked for (the kernel's default too).
pub const PENDING_PER_IP: usize = 3;
/// How long held frames wait for the ARP reply before they are dropped.
pub const PENDING_TTL: Duration = Duration::from_secs(1);
/// Guest addresses with frames held at once.
pub const MAX_PENDING_IPS: usize = 16;

/// Frames for an address whose MAC is being asked for (destination MAC not filled in yet),
/// oldest first, each with the time it was held.
type Pending = VecDeque<(Instant, Vec<u8>)>;

/// Counters of the guest links.
#[derive(Default, Debug, Clone, Copy)]
pub struct LinkStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_in: u64,
    pub send_errors: u64,
}

/// A guest link and whether it may have frames waiting (readiness is edge-triggered, or
/// level-triggered for a [`Link::level_triggered`] link).
pub struct LinkSlot {
    pub link: Box<dyn Link>,
    pub readable: bool,
    /// What the engine's epoll watches the link's descriptor for: reading, writing (see
    /// [`Link::read_events`] and [`Link::write_events`]).
    pub watched: (bool, bool),
    /// The descriptor is watched level-triggered ([`Link::level_triggered`]); mio
    /// registers it edge-triggered.
    pub watched_level: bool,
    /// The loop's round (its count of polls) in which the link last gave a frame.
    pub last_read_iteration: u64,
    /// What this link carried (for `/metrics`).
    pub counters: LinkCounters,
    /// MACs the table has behind this link.
    macs: usize,
    /// The log said that this link reached [`MAX_MACS_PER_LINK`].
    told_macs_full: bool,
    /// With [`Switch::bind_sources`]: the guest this link carries, its MAC and address (the
    /// first seen on the link).
    bound: Option<(Mac, Option<Ipv4Addr>)>,
    /// The log said that this link sent a frame from another guest's MAC or address.
    told_spoofed: bool,
    /// With [`Switch::bind_sources`]: the IPv6 addresses this link's guest has used, at
    /// most [`MAX_IPV6_PER_LINK`]; no other link may use them.
    owned6: Vec<Ipv6Addr>,
    /// Which link this is, for as long as the switch runs: a slot is used again once its
    /// link goes, so the index alone does not say.
    pub serial: u64,
}

/// Why a frame was refused ([`Switch::bind_sources`]), for the log.
#[derive(Clone, Copy)]
enum Refusal {
    /// Another link's guest has the MAC or the address.
    Taken,
    /// A multicast MAC, or the gateway's, as a source.
    NotAGuestMac,
    /// A source address outside the network, or usernet's own.
    NotUsable,
    /// Another MAC or address than the link's guest's, who has this MAC and address.
    NotThisLinksGuest(Mac, Option<Ipv4Addr>),
}

pub struct Switch {
    /// Guest links, indexed as their event-loop tokens; None where one went away.
    pub links: Vec<Option<LinkSlot>>,
    /// The serial of the next link added ([`LinkSlot::serial`]).
    next_link_serial: u64,
    /// Which link each guest MAC was last seen on.
    macs: HashMap<Mac, usize>,
    /// Which MAC each guest address has (from ARP, neighbour discovery and the guests' IP
    /// frames).
    neighbours: HashMap<IpAddr, Mac>,
    /// When an ARP request or neighbour solicitation last went out for an address whose
    /// MAC is unknown.
    arp_asked: HashMap<IpAddr, Instant>,
    /// Frames waiting for the MAC of their destination (see the top of this file).
    pending: HashMap<IpAddr, Pending>,
    /// IPv6 addresses kept for a guest's MAC (see [`Switch::reserve6`]).
    reserved6: HashMap<Ipv6Addr, Mac>,
    pub pcap: Option<PcapWriter>,
    buf: Vec<u8>,
    /// A second frame buffer, of the same size, for a datagram received together with the
    /// one in `buf` ([`Switch::recv_two_udp`]); empty until first used.
    spare: Vec<u8>,
    pub gateway_mac: Mac,
    gateway_ip: Ipv4Addr,
    /// The gateway's IPv6 link-local address: the source of its neighbour solicitations.
    pub gateway_ip6: Ipv6Addr,
    /// Ethernet destination of the frame in the buffer.
    dst_mac: Mac,
    /// Offload instructions for the frame in the buffer, when it has any.
    vnet: Option<VnetHdr>,
    pub mtu: usize,
    pub stats: LinkStats,
    /// Drops by reason and failed connects (for `/metrics`).
    pub counters: Counters,
    /// What TCP flows may hold of guest data, all together (`--max-buffered`); the flows
    /// take their share through it.
    pub budget: super::budget::Budget,
    /// Where a guest's frame with offloads is finished for a guest that takes none
    /// ([`Switch::forward`]).
    finish_buf: Vec<u8>,
    /// A datagram too long for the MTU, copied out while its fragments are built in `buf`
    /// ([`Switch::fragment`]); empty until first used.
    frag_scratch: Vec<u8>,
    /// The identification of the last datagram sent in fragments: counted on from a random
    /// start, so that two engines (each with a switch) do not send the same one.
    frag_ident: u32,
    /// Each link carries one guest (`serve`): frames from another MAC, or from another
    /// source address than the first it used, are dropped ([`Switch::admit`]).
    pub bind_sources: bool,
}

fn fmt_mac(m: Mac) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// Largest TCP payload of one offloaded frame (the IPv4 total length is 16 bits; IPv6's
/// payload length leaves 20 more bytes, unused).
pub const MAX_GSO_PAYLOAD: usize = 65535 - ipv4::HEADER_LEN - usernet_wire::tcp::HEADER_LEN;

impl Switch {
    /// The guests behind link `index`, as the switch learnt them: each MAC last seen on it
    /// and the addresses it has (for the dashboard; off the data path, it walks the tables).
    pub fn guests_on(&self, index: usize) -> Vec<(Mac, Vec<IpAddr>)> {
        let mut guests: Vec<(Mac, Vec<IpAddr>)> =
            self.macs.iter().filter(|(_, link)| **link == index).map(|(mac, _)| (*mac, Vec::new())).collect();
        for (ip, mac) in &self.neighbours {
            if let Some((_, ips)) = guests.iter_mut().find(|(m, _)| m == mac) {
                ips.push(*ip);
            }
        }
        for (_, ips) in &mut guests {
            ips.sort();
        }
        guests.sort();
        guests
    }

    pub fn new(pcap: Option<PcapWriter>, gateway_mac: Mac, gateway_ip: Ipv4Addr, mtu: usize) -> Switch {
        Switch {
            links: Vec::new(),
            next_link_serial: 0,
            macs: HashMap::new(),
            neighbours: HashMap::new(),
            arp_asked: HashMap::new(),
            pending: HashMap::new(),
            reserved6: HashMap::new(),
            pcap,
            buf: vec![0u8; L4_OFF + 65535],
            spare: Vec::new(),
            gateway_mac,
            gateway_ip,
            gateway_ip6: crate::config::GATEWAY_LINK_LOCAL,
            dst_mac: BROADCAST_MAC,
            vnet: None,
            mtu,
            stats: LinkStats::default(),
            counters: Counters::default(),
            budget: Default::default(),
            finish_buf: Vec::new(),
            frag_scratch: Vec::new(),
            frag_ident: random_u32(),
            bind_sources: false,
        }
    }

    /// Says that `limit` was reached, counting it; the log line (`what`) goes out once per
    /// episode (see `metrics::Counters::limit_reached`).
    pub fn limit_reached(&mut self, limit: Limit, now: Instant, what: impl FnOnce() -> String) {
        if let Some(times) = self.counters.limit_reached(limit, now) {
            tracing::warn!(limit = limit.as_str(), times, "limit reached: {}", what());
        }
    }

    /// Counts guest-bound TCP data sent again.
    pub fn resent(&mut self, cause: super::metrics::Resend, bytes: usize) {
        self.counters.resent(cause, bytes);
    }

    /// The whole frame buffer, for a flow to place a payload at one of the *_OFF offsets.
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Receives up to two UDP payloads of at most `max` bytes from `fd` ([`sock::recv_two`]):
    /// the first at UDP_PAYLOAD_OFF of the frame buffer, the second at the same place in the
    /// spare one (made on first use). The first goes out as usual; then
    /// [`Switch::swap_spare`] puts the second in its place, with no copy.
    pub fn recv_two_udp(&mut self, fd: BorrowedFd<'_>, max: usize) -> io::Result<TwoDatagrams> {
        if self.spare.is_empty() {
            self.spare = vec![0u8; self.buf.len()];
        }
        let payload = UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + max;
        sock::recv_two(fd, &mut self.buf[payload.clone()], &mut self.spare[payload])
    }

    /// Makes the spare buffer the frame buffer (and the frame buffer the spare).
    pub fn swap_spare(&mut self) {
        std::mem::swap(&mut self.buf, &mut self.spare);
    }

    /// Largest TCP payload that fits the MTU, over IPv6 or IPv4.
    pub fn max_tcp_payload(&self, v6: bool) -> usize {
        self.mtu - ip_header_len(v6) - usernet_wire::tcp::HEADER_LEN
    }

    /// Largest TCP payload `send_tcp_data` takes at once: 64 KiB, one offloaded frame or
    /// several segmented here.
    pub fn max_tcp_data(&self) -> usize {
        MAX_GSO_PAYLOAD
    }

    /// Sends TCP data (payload right behind the header `hdr` makes, at TCP_PAYLOAD_OFF when
    /// it has no options, up to [`Self::max_tcp_data`] bytes less its options) as segments
    /// of at most `mss` bytes: one offloaded frame that the guest's kernel splits when the
    /// guest's link offloads, else one frame per segment, cut here. So a flow reads its
    /// socket once for 64 KiB, not once per segment.
    pub fn send_tcp_data(&mut self, from: SocketAddr, to: SocketAddr, hdr: &TcpHeader, payload_len: usize, mss: usize) {
        let v6 = to.is_ipv6();
        if !self.offloads_to(to.ip()) {
            let options = hdr.emit_len() - usernet_wire::tcp::HEADER_LEN;
            let mss = mss.clamp(1, self.max_tcp_payload(v6) - options);
            let start = TCP_PAYLOAD_OFF + options;
            let mut off = 0;
            loop {
                let n = (payload_len - off).min(mss);
                if off > 0 {
                    // Move this segment to the front of the payload area, over bytes sent.
                    self.buf.copy_within(start + off..start + off + n, start);
                }
                let last = off + n == payload_len;
                let h = TcpHeader {
                    seq: hdr.seq.wrapping_add(off as u32),
                    flags: if last {
                        hdr.flags
                    } else {
                        hdr.flags & !(usernet_wire::tcp::PSH | usernet_wire::tcp::FIN)
                    },
                    ..*hdr
                };
                self.send_tcp(from, to, &h, n);
                if last {
                    return;
                }
                off += n;
            }
        }
        let iph = ip_header_len(v6);
        let tcp_len = hdr.emit_len() + payload_len;
        hdr.emit_partial(&mut self.buf[L4_OFF..], payload_len, from.ip(), to.ip());
        let gso = payload_len > mss;
        self.vnet = Some(VnetHdr {
            flags: vnet_hdr::F_NEEDS_CSUM,
            gso_type: match (gso, v6) {
                (false, _) => vnet_hdr::GSO_NONE,
                (true, false) => vnet_hdr::GSO_TCPV4,
                (true, true) => vnet_hdr::GSO_TCPV6,
            },
            hdr_len: (ethernet::HEADER_LEN + iph + hdr.emit_len()) as u16,
            gso_size: if gso { mss as u16 } else { 0 },
            csum_start: (ethernet::HEADER_LEN + iph) as u16,
            csum_offset: 16,
        });
        self.finish_ip(from.ip(), to.ip(), PROTO_TCP, tcp_len, None);
        self.vnet = None;
    }

    /// Largest UDP payload a datagram carries, over IPv6 or IPv4 (one past the MTU goes to
    /// the guest in fragments: [`Switch::fragment`]).
    pub fn max_udp_payload(&self, v6: bool) -> usize {
        max_l4_len(v6) - udp::HEADER_LEN
    }

    /// Sends a TCP segment whose payload (if any) is already at the offset that
    /// `hdr.emit_len()` implies (TCP_PAYLOAD_OFF when the header has no options).
    pub fn send_tcp(&mut self, from: SocketAddr, to: SocketAddr, hdr: &TcpHeader, payload_len: usize) {
        let tcp_len = hdr.emit_len() + payload_len;
        hdr.emit(&mut self.buf[L4_OFF..], payload_len, from.ip(), to.ip());
        self.finish_ip(from.ip(), to.ip(), PROTO_TCP, tcp_len, None);
    }

    /// Sends a UDP datagram whose payload is already at UDP_PAYLOAD_OFF.
    pub fn send_udp(&mut self, from: SocketAddr, to: SocketAddr, payload_len: usize) {
        self.send_udp_to_mac(from, to, payload_len, None);
    }

    /// Sends `payload_len` bytes at UDP_PAYLOAD_OFF, datagrams of `segment` bytes that the
    /// host's kernel coalesced (UDP_GRO; the last may be shorter; 0: one datagram, as a read
    /// without the control message is), as the datagrams they were: where the guest's link takes segmented UDP (USO) and a datagram fits the MTU,
    /// as frames of up to [`vnet_hdr::MAX_UDP_SEGMENTS`] datagrams that the guest's kernel
    /// cuts; else one by one, each moved to the front of the payload area over bytes sent
    /// (and in fragments when it does not fit the MTU, as any datagram).
    pub fn send_udp_segments(&mut self, from: SocketAddr, to: SocketAddr, payload_len: usize, segment: usize) {
        if segment == 0 || payload_len <= segment {
            self.send_udp(from, to, payload_len);
            return;
        }
        let v6 = to.is_ipv6();
        let fits = ip_header_len(v6) + udp::HEADER_LEN + segment <= self.mtu;
        let run = if fits && self.uso_to(to.ip()) { segment * vnet_hdr::MAX_UDP_SEGMENTS } else { segment };
        let mut off = 0;
        while off < payload_len {
            let n = (payload_len - off).min(run);
            if off > 0 {
                self.buf.copy_within(UDP_PAYLOAD_OFF + off..UDP_PAYLOAD_OFF + off + n, UDP_PAYLOAD_OFF);
            }
            if n > segment {
                self.send_uso(from, to, n, segment);
            } else {
                self.send_udp(from, to, n);
            }
            off += n;
        }
    }

    /// Sends the `payload_len` bytes at UDP_PAYLOAD_OFF as one segmented frame (GSO_UDP_L4)
    /// of datagrams of `segment` bytes, more than one: one UDP header for the whole, its
    /// checksum left to the guest's kernel, which cuts the frame.
    fn send_uso(&mut self, from: SocketAddr, to: SocketAddr, payload_len: usize, segment: usize) {
        let v6 = to.is_ipv6();
        let iph = ip_header_len(v6);
        UdpHeader { src_port: from.port(), dst_port: to.port() }.emit_partial(
            &mut self.buf[L4_OFF..],
            payload_len,
            from.ip(),
            to.ip(),
        );
        self.vnet = Some(VnetHdr {
            flags: vnet_hdr::F_NEEDS_CSUM,
            gso_type: vnet_hdr::GSO_UDP_L4,
            hdr_len: (ethernet::HEADER_LEN + iph + udp::HEADER_LEN) as u16,
            gso_size: segment as u16,
            csum_start: (ethernet::HEADER_LEN + iph) as u16,
            csum_offset: 6,
        });
        self.finish_ip(from.ip(), to.ip(), PROTO_UDP, udp::HEADER_LEN + payload_len, None);
        self.vnet = None;
    }

    /// The same, to a given MAC (DHCP replies to a client without an address).
    pub fn send_udp_to_mac(&mut self, from: SocketAddr, to: SocketAddr, payload_len: usize, mac: Option<Mac>) {
        UdpHeader { src_port: from.port(), dst_port: to.port() }.emit(
            &mut self.buf[L4_OFF..],
            payload_len,
            from.ip(),
            to.ip(),
        );
        self.finish_ip(from.ip(), to.ip(), PROTO_UDP, udp::HEADER_LEN + payload_len, mac);
    }

    /// Sends an ICMP message whose data is already at ICMP_DATA_OFF.
    pub fn send_icmp(&mut self, from: Ipv4Addr, to: Ipv4Addr, hdr: &IcmpHeader, data_len: usize) {
        hdr.emit(&mut self.buf[L4_OFF..], data_len);
        self.finish_ip(from.into(), to.into(), PROTO_ICMP, usernet_wire::icmp::HEADER_LEN + data_len, None);
    }

    /// Sends an ICMPv6 message (type, code, the 4 bytes after the checksum) whose data is
    /// already at ICMP_DATA_OFF; to `mac` when given (an answer to an address without a
    /// neighbour entry yet, as duplicate address detection uses).
    pub fn send_icmpv6(&mut self, from: Ipv6Addr, to: Ipv6Addr, hdr: &IcmpHeader, data_len: usize, mac: Option<Mac>) {
        let m = &mut self.buf[L4_OFF..ICMP_DATA_OFF];
        m[0] = hdr.kind;
        m[1] = hdr.code;
        m[4..8].copy_from_slice(&hdr.rest);
        self.send_icmpv6_message(from, to, usernet_wire::icmp::HEADER_LEN + data_len, mac);
    }

    /// Where a whole ICMPv6 message is written for [`Self::send_icmpv6_message`].
    pub fn l4_buf(&mut self) -> &mut [u8] {
        &mut self.buf[L4_OFF..]
    }

    /// Sends the `len`-byte ICMPv6 message at [`L4_OFF`] (its checksum filled in here).
    pub fn send_icmpv6_message(&mut self, from: Ipv6Addr, to: Ipv6Addr, len: usize, mac: Option<Mac>) {
        usernet_wire::icmpv6::fill_checksum(&mut self.buf[L4_OFF..L4_OFF + len], from, to);
        self.finish_ip(from.into(), to.into(), PROTO_ICMPV6, len, mac);
    }

    /// Tells the guest at `guest` that its packet to `remote` could not be delivered: an
    /// ICMP or ICMPv6 destination unreachable quoting the packet's IP header (rebuilt: the
    /// guest's packet had `l4_len` bytes of protocol `proto`) and `l4_head`, its first
    /// bytes (8 are enough: RFC 792; ICMPv6 quotes as much as fits, this is what usernet
    /// keeps).
    pub fn send_unreachable(
        &mut self,
        guest: IpAddr,
        remote: IpAddr,
        why: Unreachable,
        proto: u8,
        l4_len: usize,
        l4_head: &[u8],
    ) {
        let head = &l4_head[..l4_head.len().min(8)];
        match (guest, remote) {
            (IpAddr::V6(g), IpAddr::V6(r)) => {
                Ipv6Header::new(g, r, proto, l4_len).emit(&mut self.buf[ICMP_DATA_OFF..]);
                let at = ICMP_DATA_OFF + ipv6::HEADER_LEN;
                self.buf[at..at + head.len()].copy_from_slice(head);
                let hdr =
                    IcmpHeader { kind: usernet_wire::icmpv6::TYPE_DEST_UNREACHABLE, code: why.code_v6(), rest: [0; 4] };
                self.send_icmpv6(r, g, &hdr, ipv6::HEADER_LEN + head.len(), None);
            }
            (IpAddr::V4(g), IpAddr::V4(r)) => {
                Ipv4Header::new(g, r, proto, l4_len).emit(&mut self.buf[ICMP_DATA_OFF..]);
                let at = ICMP_DATA_OFF + ipv4::HEADER_LEN;
                self.buf[at..at + head.len()].copy_from_slice(head);
                let hdr =
                    IcmpHeader { kind: usernet_wire::icmp::TYPE_DEST_UNREACHABLE, code: why.code_v4(), rest: [0; 4] };
                self.send_icmp(r, g, &hdr, ipv4::HEADER_LEN + head.len());
            }
            _ => {}
        }
    }

    /// Writes the IP and Ethernet headers in front of the `l4_len` bytes at [`L4_OFF`] and
    /// sends the frame, or holds it while the destination's MAC is asked for; in fragments
    /// when it does not fit the MTU.
    fn finish_ip(&mut self, src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize, mac: Option<Mac>) {
        if self.vnet.is_none() && ip_header_len(dst.is_ipv6()) + l4_len > self.mtu {
            self.fragment(src, dst, proto, l4_len, mac);
            return;
        }
        self.finish_packet(src, dst, proto, l4_len, mac, None);
    }

    /// Sends the `l4_len` bytes at [`L4_OFF`], too long for the MTU, as IP fragments (RFC
    /// 791; over IPv6 with a Fragment header, RFC 8200 section 4.5) that the guest's kernel
    /// reassembles: a UDP datagram or an echo reply larger than the guest's link takes, as a
    /// router or the sending host would cut it. Each fragment but the last carries a
    /// multiple of 8 bytes, as many as fit; all share one identification. (TCP never comes
    /// here: its segments are cut to the MSS, or offloaded.)
    fn fragment(&mut self, src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize, mac: Option<Mac>) {
        let v6 = dst.is_ipv6();
        let frag_header = if v6 { ipv6::FRAGMENT_HEADER_LEN } else { 0 };
        let room = self.mtu.saturating_sub(ip_header_len(v6) + frag_header) & !7;
        if room == 0 || l4_len > max_l4_len(v6) {
            self.counters.dropped(DropReason::SendError);
            return;
        }
        if self.dst_mac(dst, mac).is_none() {
            // The guest has not spoken yet: fragments are not held for it, as the few
            // frames of [`PENDING_PER_IP`] would keep only part of the datagram and push
            // out what waits already. The datagram goes, as a datagram may; the guest is
            // asked for its MAC for the next.
            self.counters.dropped(DropReason::NoNeighbour);
            self.ask_mac(dst);
            return;
        }
        let mut whole = std::mem::take(&mut self.frag_scratch);
        whole.clear();
        whole.extend_from_slice(&self.buf[L4_OFF..L4_OFF + l4_len]);
        self.frag_ident = self.frag_ident.wrapping_add(1);
        let mut offset = 0;
        while offset < l4_len {
            let n = room.min(l4_len - offset);
            let fragment = ipv6::Fragment { offset, more: offset + n < l4_len, ident: self.frag_ident };
            let at = L4_OFF + frag_header;
            self.buf[at..at + n].copy_from_slice(&whole[offset..offset + n]);
            if v6 {
                fragment.emit(proto, &mut self.buf[L4_OFF..]);
                self.finish_packet(src, dst, ipv6::EXT_FRAGMENT, frag_header + n, mac, Some(fragment));
            } else {
                self.finish_packet(src, dst, proto, n, mac, Some(fragment));
            }
            offset += n;
        }
        self.frag_scratch = whole;
    }

    /// The Ethernet destination of a packet to `dst`: `mac` when given, a broadcast's or a
    /// multicast group's, else the guest's whose address it is, if known.
    fn dst_mac(&self, dst: IpAddr, mac: Option<Mac>) -> Option<Mac> {
        match (mac, dst) {
            (Some(m), _) => Some(m),
            (None, IpAddr::V4(d)) if d.is_broadcast() => Some(BROADCAST_MAC),
            (None, IpAddr::V6(d)) if d.is_multicast() => {
                let o = d.octets();
                Some([0x33, 0x33, o[12], o[13], o[14], o[15]])
            }
            (None, _) => self.neighbours.get(&dst).copied(),
        }
    }

    /// [`Self::finish_ip`] for one packet that fits the MTU: a fragment's when `fragment`
    /// says where it sits (over IPv6 its Fragment header is at [`L4_OFF`] already).
    fn finish_packet(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        l4_len: usize,
        mac: Option<Mac>,
        fragment: Option<ipv6::Fragment>,
    ) {
        let v6 = dst.is_ipv6();
        let start = frame_start(v6);
        let len = ethernet::HEADER_LEN + ip_header_len(v6) + l4_len;
        let dst_mac = self.dst_mac(dst, mac);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(s, d, proto, l4_len);
                if let Some(f) = fragment {
                    h.ident = f.ident as u16;
                    h.dont_frag = false;
                    h.more_fragments = f.more;
                    h.frag_offset = f.offset;
                }
                h.emit(&mut self.buf[start + ethernet::HEADER_LEN..]);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut h = Ipv6Header::new(s, d, proto, l4_len);
                // Neighbour discovery's messages are taken only with the hop limit at 255
                // (RFC 4861 section 6.1): proof that they come from the link itself.
                if proto == PROTO_ICMPV6 && (133..=137).contains(&self.buf[L4_OFF]) {
                    h.hop_limit = 255;
                }
                h.emit(&mut self.buf[start + ethernet::HEADER_LEN..]);
            }
            _ => return,
        }
        let ethertype = if v6 { ethernet::ETHERTYPE_IPV6 } else { ethernet::ETHERTYPE_IPV4 };
        let Some(dst_mac) = dst_mac else {
            // The guest has not spoken yet (a connection to a published port came first):
            // the frame waits for the answer to an ARP request or a neighbour solicitation.
            // (An offloaded frame is dropped instead: it is TCP data, retransmitted.)
            if self.vnet.take().is_none() {
                ethernet::EthernetHeader { dst: [0; 6], src: self.gateway_mac, ethertype }.emit(&mut self.buf[start..]);
                self.hold(dst, start, len);
            } else {
                self.counters.dropped(DropReason::NoNeighbour);
            }
            self.ask_mac(dst);
            return;
        };
        ethernet::EthernetHeader { dst: dst_mac, src: self.gateway_mac, ethertype }.emit(&mut self.buf[start..]);
        self.dst_mac = dst_mac;
        self.send_buffer(start, len);
    }

    /// Sends the `len` bytes of the buffer from `start`, whose Ethernet destination is
    /// `dst_mac`.
    fn send_buffer(&mut self, start: usize, len: usize) {
        let frame = &self.buf[start..start + len];
        if let Some(p) = self.pcap.as_mut() {
            p.write(frame);
        }
        let target = if self.dst_mac[0] & 1 == 0 { self.macs.get(&self.dst_mac).copied() } else { None };
        // An offloaded frame goes only to the known guest whose link takes it (`offloads_to`).
        if self.vnet.is_some() && target.is_none() {
            self.counters.dropped(DropReason::NoNeighbour);
            return;
        }
        let (frames, errors) = send_on(&mut self.links, target, None, frame, self.vnet.as_ref());
        self.stats.frames_out += frames;
        self.stats.bytes_out += frames * len as u64;
        self.stats.send_errors += errors;
        self.counters.dropped_n(DropReason::SendError, errors);
    }

    /// Sends a frame built elsewhere (ARP replies) to `dst_mac`.
    pub fn send_frame(&mut self, frame: &[u8], dst_mac: Mac) {
        self.buf[..frame.len()].copy_from_slice(frame);
        self.dst_mac = dst_mac;
        self.send_buffer(0, frame.len());
    }

    /// Whether a frame from `mac` with IPv4 source `src` (ARP's sender address for ARP; None
    /// for other frames) may come in on link `index`. Always, unless [`Switch::bind_sources`]:
    /// then the link's first unicast MAC is its guest's and the only one it may use, and the
    /// guest's first source address (one for which `guest_addr` holds: of the subnet, not
    /// usernet's own) the only address; 0.0.0.0 stays allowed, for DHCP and address probes.
    /// The first refused frame of a link is logged.
    pub fn admit(
        &mut self,
        index: usize,
        mac: Mac,
        src: Option<Ipv4Addr>,
        guest_addr: impl Fn(Ipv4Addr) -> bool,
    ) -> bool {
        if !self.bind_sources {
            return true;
        }
        // Every frame comes here: the link's own guest, as bound, passes at once.
        let claimed = src.filter(|ip| !ip.is_unspecified());
        if let Some(Some(slot)) = self.links.get(index)
            && let Some((bound_mac, bound_ip)) = slot.bound
            && bound_mac == mac
            && (claimed.is_none() || claimed == bound_ip)
        {
            return true;
        }
        // A first frame, or a new claim: a MAC or an address another link's guest has is
        // never this link's to take.
        let taken_elsewhere = |links: &[Option<LinkSlot>], m: Mac, ip: Option<Ipv4Addr>| {
            links.iter().enumerate().any(|(i, l)| {
                i != index
                    && l.as_ref().and_then(|l| l.bound).is_some_and(|(bm, bip)| bm == m || (ip.is_some() && bip == ip))
            })
        };
        if taken_elsewhere(&self.links, mac, claimed) {
            // The guest may be back on a new connection before the engine read the old
            // one's end (QEMU's `reconnect`): a link whose guest hung up holds no claim.
            let fresh = self.links.get(index).and_then(Option::as_ref).is_some_and(|s| s.bound.is_none());
            if !fresh || !self.release_hung_up(index) || taken_elsewhere(&self.links, mac, claimed) {
                return self.refuse(index, mac, src.map(IpAddr::V4), Refusal::Taken);
            }
        }
        let Some(Some(slot)) = self.links.get_mut(index) else { return false };
        let usable = |ip: Ipv4Addr| ip.is_unspecified() || guest_addr(ip);
        let refusal = if mac[0] & 1 != 0 || mac == self.gateway_mac {
            Some(Refusal::NotAGuestMac)
        } else {
            match (slot.bound.as_mut(), src) {
                (None, src) => {
                    let ok = src.is_none_or(usable);
                    if ok {
                        slot.bound = Some((mac, src.filter(|ip| !ip.is_unspecified())));
                    }
                    (!ok).then_some(Refusal::NotUsable)
                }
                (Some((bound_mac, bound_ip)), _) if *bound_mac != mac => {
                    Some(Refusal::NotThisLinksGuest(*bound_mac, *bound_ip))
                }
                (Some(_), None) => None,
                (Some(_), Some(ip)) if ip.is_unspecified() => None,
                (Some((_, bound_ip @ None)), Some(ip)) => {
                    let ok = usable(ip);
                    if ok {
                        *bound_ip = Some(ip);
                    }
                    (!ok).then_some(Refusal::NotUsable)
                }
                (Some((bound_mac, Some(bound_ip))), Some(ip)) => {
                    (*bound_ip != ip).then_some(Refusal::NotThisLinksGuest(*bound_mac, Some(*bound_ip)))
                }
            }
        };
        match refusal {
            None => true,
            Some(why) => self.refuse(index, mac, src.map(IpAddr::V4), why),
        }
    }

    /// Whether link `index`'s guest (`mac`) may use IPv6 address `ip` (`usable`: of the
    /// network's prefix or link-local, and not usernet's own). Always, unless
    /// [`Switch::bind_sources`]: then an address another link's guest holds, or one
    /// reserved for another guest ([`Switch::reserve6`]), is not this one's, and a link
    /// holds at most [`MAX_IPV6_PER_LINK`]. The unspecified address (duplicate address
    /// detection) is always allowed.
    pub fn admit6(&mut self, index: usize, mac: Mac, ip: Ipv6Addr, usable: bool) -> bool {
        if !self.bind_sources || ip.is_unspecified() {
            return true;
        }
        if let Some(Some(slot)) = self.links.get(index)
            && slot.owned6.contains(&ip)
        {
            return true;
        }
        let taken = self.reserved6.get(&ip).is_some_and(|m| *m != mac)
            || self
                .links
                .iter()
                .enumerate()
                .any(|(i, l)| i != index && l.as_ref().is_some_and(|l| l.owned6.contains(&ip)));
        let Some(Some(slot)) = self.links.get_mut(index) else { return false };
        if usable && !taken {
            if slot.owned6.len() >= MAX_IPV6_PER_LINK {
                slot.owned6.remove(0);
            }
            slot.owned6.push(ip);
            return true;
        }
        self.refuse(index, mac, Some(IpAddr::V6(ip)), if taken { Refusal::Taken } else { Refusal::NotUsable })
    }

    /// An IPv6 address in `net`'s prefix of the guest that has IPv4 address `v4`, as seen
    /// on its link: its SLAAC address of the modified EUI-64 kind when it uses one, else the
    /// lowest it was seen to use (stable-privacy and temporary addresses cannot be told
    /// apart). None when the guest was never seen to use one.
    pub fn ipv6_of(&self, v4: Ipv4Addr, net: &crate::config::Ipv6Net) -> Option<Ipv6Addr> {
        self.ipv6_of_mac(*self.neighbours.get(&IpAddr::V4(v4))?, net)
    }

    /// The same for the first guest seen over IPv6 on the lowest-numbered link that has one
    /// (`serve --ipv6-only`: the VM that `-p` publishes to, as DHCP's first lease is with
    /// IPv4).
    pub fn first_guest_ipv6(&self, net: &crate::config::Ipv6Net) -> Option<Ipv6Addr> {
        let mut macs: Vec<(usize, Mac)> = self.macs.iter().map(|(mac, link)| (*link, *mac)).collect();
        macs.sort();
        macs.into_iter().find_map(|(_, mac)| self.ipv6_of_mac(mac, net))
    }

    fn ipv6_of_mac(&self, mac: Mac, net: &crate::config::Ipv6Net) -> Option<Ipv6Addr> {
        let eui = eui64_address(net.prefix, mac);
        if self.neighbours.get(&IpAddr::V6(eui)) == Some(&mac) {
            return Some(eui);
        }
        self.neighbours
            .iter()
            .filter_map(|(ip, m)| match ip {
                IpAddr::V6(a) if *m == mac && net.contains(*a) => Some(*a),
                _ => None,
            })
            .min()
    }

    /// Keeps `ip` for the guest with `mac` (an address usernet configured itself, as
    /// `serve --netns` does), whichever link speaks first.
    pub fn reserve6(&mut self, ip: Ipv6Addr, mac: Mac) {
        self.reserved6.insert(ip, mac);
    }

    /// Drops the claims (MAC, addresses) of each link but `index` whose guest hung up
    /// ([`Link::hung_up`]) while the engine has not read its end yet; the link itself goes
    /// when it does. True if any went. Only for a link with no guest of its own yet, so a
    /// guest refused frame after frame costs no system calls.
    fn release_hung_up(&mut self, index: usize) -> bool {
        let mut released = false;
        for (i, slot) in self.links.iter_mut().enumerate() {
            if let Some(slot) = slot
                && i != index
                && (slot.bound.is_some() || !slot.owned6.is_empty())
                && slot.link.hung_up()
            {
                tracing::debug!(link = %slot.link.describe(), "guest hung up: its MAC and addresses are free for its next link");
                slot.bound = None;
                slot.owned6.clear();
                released = true;
            }
        }
        released
    }

    /// Logs the first refused frame of link `index`, and why; false.
    fn refuse(&mut self, index: usize, mac: Mac, src: Option<IpAddr>, refusal: Refusal) -> bool {
        let Some(Some(slot)) = self.links.get_mut(index) else { return false };
        if !slot.told_spoofed {
            slot.told_spoofed = true;
            let why = match refusal {
                Refusal::Taken => "another link's guest has that MAC or address".into(),
                Refusal::NotAGuestMac => "a multicast MAC or the gateway's".into(),
                Refusal::NotUsable => "not an address a guest may have".into(),
                Refusal::NotThisLinksGuest(bound_mac, bound_ip) => format!(
                    "this link's guest is {} ({})",
                    fmt_mac(bound_mac),
                    bound_ip.map_or("-".into(), |ip| ip.to_string())
                ),
            };
            tracing::warn!(
                link = %slot.link.describe(),
                "a frame from {} ({}) refused: {why}; said once",
                fmt_mac(mac),
                src.map_or("-".into(), |ip| ip.to_string()),
            );
        }
        false
    }

    /// Records that `mac` is behind link `index` and, when given, has address `ip`.
    pub fn learn(&mut self, index: usize, mac: Mac, ip: Option<IpAddr>) {
        if mac[0] & 1 != 0 || mac == self.gateway_mac {
            return;
        }
        let was = self.macs.get(&mac).copied();
        if was != Some(index)
            && let Some(Some(slot)) = self.links.get_mut(index)
        {
            if slot.macs < MAX_MACS_PER_LINK {
                slot.macs += 1;
                if let Some(Some(old)) = was.and_then(|i| self.links.get_mut(i)) {
                    old.macs -= 1;
                }
                self.macs.insert(mac, index);
            } else if !slot.told_macs_full {
                slot.told_macs_full = true;
                tracing::warn!(
                    "{}: {MAX_MACS_PER_LINK} MACs behind this link: no more are learned \
                     (frames for them are flooded); said once",
                    slot.link.describe()
                );
            }
        }
        if let Some(ip) = ip
            && !ip.is_unspecified()
            && self.neighbours.get(&ip) != Some(&mac)
        {
            if self.neighbours.len() > 65536 {
                self.neighbours.clear();
            }
            self.neighbours.insert(ip, mac);
            self.arp_asked.remove(&ip);
            self.release(ip, mac);
        }
    }

    /// The MAC of the guest at `ip`, when known.
    pub fn mac_of(&self, ip: IpAddr) -> Option<Mac> {
        self.neighbours.get(&ip).copied()
    }

    /// Records that `ip` has `mac` without having seen it (the guest's MAC is known from
    /// the start when usernet made its interface, as `run` does).
    pub fn add_neighbour(&mut self, ip: IpAddr, mac: Mac) {
        if mac[0] & 1 == 0 && !ip.is_unspecified() {
            self.neighbours.insert(ip, mac);
        }
    }

    /// Holds the `len` bytes of the buffer from `start` (a frame for `ip`, whose MAC is
    /// unknown).
    fn hold(&mut self, ip: IpAddr, start: usize, len: usize) {
        let now = Instant::now();
        let fresh = |p: &Pending| p.back().is_some_and(|(t, _)| now.duration_since(*t) < PENDING_TTL);
        if !self.pending.contains_key(&ip) && self.pending.len() >= MAX_PENDING_IPS {
            let held: usize = self.pending.values().map(VecDeque::len).sum();
            self.pending.retain(|_, p| fresh(p));
            let kept: usize = self.pending.values().map(VecDeque::len).sum();
            self.counters.dropped_n(DropReason::NoNeighbour, (held - kept) as u64);
            if self.pending.len() >= MAX_PENDING_IPS {
                tracing::debug!(
                    "frame for {ip}, whose MAC is unknown, dropped: {MAX_PENDING_IPS} addresses wait already"
                );
                self.counters.dropped(DropReason::NoNeighbour);
                return;
            }
        }
        let p = self.pending.entry(ip).or_default();
        // What waited too long had no answer, and the oldest gives way to a new frame when
        // the queue is full, as in the kernel.
        let mut dropped = 0;
        while p.front().is_some_and(|(t, _)| now.duration_since(*t) >= PENDING_TTL) || p.len() >= PENDING_PER_IP {
            p.pop_front();
            dropped += 1;
        }
        p.push_back((now, self.buf[start..start + len].to_vec()));
        self.counters.dropped_n(DropReason::NoNeighbour, dropped);
    }

    /// Sends the frames held for `ip`, now that its MAC is known (unless they waited too long).
    fn release(&mut self, ip: IpAddr, mac: Mac) {
        let Some(p) = self.pending.remove(&ip) else { return };
        let (fresh, stale): (Vec<_>, Vec<_>) = p.into_iter().partition(|(t, _)| t.elapsed() < PENDING_TTL);
        self.counters.dropped_n(DropReason::NoNeighbour, stale.len() as u64);
        for (_, mut frame) in fresh {
            frame[..6].copy_from_slice(&mac);
            self.send_frame(&frame, mac);
        }
    }

    /// The MAC that has `ip`, as the switch learnt it.
    pub fn owner_of(&self, ip: IpAddr) -> Option<Mac> {
        self.neighbours.get(&ip).copied()
    }

    /// MACs in the table, every link together.
    pub fn mac_count(&self) -> usize {
        self.macs.len()
    }

    /// The link a MAC was last seen on.
    pub fn link_of(&self, mac: &Mac) -> Option<usize> {
        self.macs.get(mac).copied()
    }

    /// Switches a guest's frame that is not (only) for the gateway: to the link of its
    /// destination MAC, or to every other link for broadcasts and unknown MACs. `offloads`:
    /// what the sender's link left undone (`Link::recv_offloads`).
    pub fn forward(&mut self, from: usize, frame: &[u8], offloads: &VnetHdr) {
        let Some((eth, _)) = ethernet::EthernetHeader::parse(frame) else { return };
        let target = if eth.dst[0] & 1 == 0 { self.macs.get(&eth.dst).copied() } else { None };
        if target == Some(from) {
            return;
        }
        if self.links.iter().flatten().count() < 2 {
            return;
        }
        // What the sender's offloads left undone: a guest whose link takes offloads gets
        // the frame as it is, with them; any other, the frames its kernel would have made
        // (a checksum completed, a large TCP segment cut to the sender's segment size).
        let offloads = *offloads;
        let whole = offloads.flags & vnet_hdr::F_NEEDS_CSUM == 0 && offloads.gso_type == vnet_hdr::GSO_NONE;
        let takes_offloads = |i: usize| self.links.get(i).and_then(Option::as_ref).is_some_and(|s| s.link.offloads());
        let (frames, bytes, errors) = if whole {
            self.send_switched(target, from, frame, None)
        } else if let Some(i) = target.filter(|&i| takes_offloads(i)) {
            self.send_switched(Some(i), from, frame, Some(&offloads))
        } else {
            let Switch { links, pcap, finish_buf, .. } = self;
            let (mut frames, mut bytes, mut errors) = (0, 0, 0);
            let done = vnet_hdr::finish(frame, &offloads, finish_buf, |f| {
                if let Some(p) = pcap.as_mut() {
                    p.write(f);
                }
                let (n, e) = send_on(links, target, Some(from), f, None);
                frames += n;
                bytes += n * f.len() as u64;
                errors += e;
            });
            if let Err(why) = done {
                tracing::debug!("{}: a frame for another guest: {why}", fmt_mac(eth.src));
                self.drop_in(DropReason::Malformed);
            }
            (frames, bytes, errors)
        };
        self.stats.frames_out += frames;
        self.stats.bytes_out += bytes;
        self.stats.send_errors += errors;
        self.counters.dropped_n(DropReason::SendError, errors);
    }

    /// Captures and sends one switched frame (with its offloads, to a link that takes them);
    /// returns the frames and bytes sent and the errors.
    fn send_switched(
        &mut self,
        target: Option<usize>,
        from: usize,
        frame: &[u8],
        hdr: Option<&VnetHdr>,
    ) -> (u64, u64, u64) {
        if let Some(p) = self.pcap.as_mut() {
            p.write(frame);
        }
        let (frames, errors) = send_on(&mut self.links, target, Some(from), frame, hdr);
        (frames, frames * frame.len() as u64, errors)
    }

    pub fn add_link(&mut self, link: Box<dyn Link>) -> usize {
        let slot = LinkSlot {
            link,
            readable: true,
            watched: (true, true),
            watched_level: false,
            last_read_iteration: 0,
            counters: LinkCounters::default(),
            macs: 0,
            told_macs_full: false,
            bound: None,
            told_spoofed: false,
            owned6: Vec::new(),
            serial: self.next_link_serial,
        };
        self.next_link_serial += 1;
        match self.links.iter().position(Option::is_none) {
            Some(i) => {
                self.links[i] = Some(slot);
                i
            }
            None => {
                self.links.push(Some(slot));
                self.links.len() - 1
            }
        }
    }

    /// Counts a frame from a guest that goes no further.
    #[inline]
    pub fn drop_in(&mut self, why: DropReason) {
        self.stats.dropped_in += 1;
        self.counters.dropped(why);
    }

    /// Forgets a link that went away and the MACs behind it.
    pub fn remove_link(&mut self, index: usize) -> Option<LinkSlot> {
        self.macs.retain(|_, i| *i != index);
        self.links.get_mut(index).and_then(Option::take)
    }

    /// Whether the guest at `ip` is known, on a link that takes offloaded frames: TCP data
    /// then goes to it in frames of up to 64 KiB with the checksum left to its kernel.
    fn offloads_to(&self, ip: IpAddr) -> bool {
        self.link_of_guest(ip).is_some_and(|link| link.offloads())
    }

    /// Whether the guest at `ip` is known and its link takes segmented UDP frames (USO).
    fn uso_to(&self, ip: IpAddr) -> bool {
        self.link_of_guest(ip).is_some_and(|link| link.offloads_udp())
    }

    /// The link of the guest at `ip`, when its MAC and where it sits are known.
    fn link_of_guest(&self, ip: IpAddr) -> Option<&dyn Link> {
        let slot =
            self.neighbours.get(&ip).and_then(|mac| self.macs.get(mac)).and_then(|&i| self.links.get(i)?.as_ref())?;
        Some(slot.link.as_ref())
    }

    /// What link `index`'s last frame leaves to its receiver (`Link::recv_offloads`).
    pub fn recv_offloads(&self, index: usize) -> VnetHdr {
        self.links.get(index).and_then(Option::as_ref).map(|s| s.link.recv_offloads()).unwrap_or_default()
    }

    /// Asks for the MAC of `ip`, at most once a second per address: a broadcast ARP
    /// request, or a neighbour solicitation to the address's solicited-node group.
    fn ask_mac(&mut self, ip: IpAddr) {
        let now = Instant::now();
        if let Some(t) = self.arp_asked.get(&ip)
            && now.duration_since(*t).as_millis() < 1000
        {
            return;
        }
        if self.arp_asked.len() > 4096 {
            self.arp_asked.clear();
        }
        self.arp_asked.insert(ip, now);
        let ip = match ip {
            IpAddr::V4(ip) => ip,
            IpAddr::V6(ip) => {
                let ns = usernet_wire::ndp::NeighborSolicit { target: ip, source_lladdr: Some(self.gateway_mac) };
                let n = ns.emit(&mut self.buf[L4_OFF..]);
                let group = usernet_wire::ndp::solicited_node(ip);
                self.send_icmpv6_message(self.gateway_ip6, group, n, None);
                return;
            }
        };
        let mut f = [0u8; ethernet::HEADER_LEN + arp::LEN];
        ethernet::EthernetHeader { dst: BROADCAST_MAC, src: self.gateway_mac, ethertype: ethernet::ETHERTYPE_ARP }
            .emit(&mut f);
        arp::ArpPacket {
            op: arp::OP_REQUEST,
            sender_mac: self.gateway_mac,
            sender_ip: self.gateway_ip,
            target_mac: [0; 6],
            target_ip: ip,
        }
        .emit(&mut f[ethernet::HEADER_LEN..]);
        self.send_frame(&f, BROADCAST_MAC);
    }
}

/// Sends `frame` on link `target`, or on every link but `except` when there is no target,
/// with `offloads` (only to links that take them). Returns (frames sent, errors).
fn send_on(
    links: &mut [Option<LinkSlot>],
    target: Option<usize>,
    except: Option<usize>,
    frame: &[u8],
    offloads: Option<&VnetHdr>,
) -> (u64, u64) {
    let (mut sent, mut errors) = (0, 0);
    let mut one = |slot: &mut LinkSlot| match match offloads {
        Some(h) => slot.link.send_offloaded(frame, h),
        None => slot.link.send(frame),
    } {
        Ok(()) => {
            sent += 1;
            slot.counters.tx_frames += 1;
            slot.counters.tx_bytes += frame.len() as u64;
        }
        Err(e) => {
            errors += 1;
            tracing::debug!("{}: send: {e}", slot.link.describe());
        }
    };
    match target {
        Some(i) => {
            if let Some(Some(slot)) = links.get_mut(i) {
                one(slot);
            }
        }
        None => {
            for (i, slot) in links.iter_mut().enumerate() {
                if Some(i) != except
                    && let Some(slot) = slot
                {
                    one(slot);
                }
            }
        }
    }
    (sent, errors)
}

/// The SLAAC address of `mac` in the /64 `prefix`: the modified EUI-64 interface identifier
/// (RFC 4291 appendix A: ff:fe in the middle, the universal/local bit flipped).
pub fn eui64_address(prefix: Ipv6Addr, mac: Mac) -> Ipv6Addr {
    let mut o = prefix.octets();
    o[8..16].copy_from_slice(&[mac[0] ^ 0x02, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]]);
    Ipv6Addr::from(o)
}
