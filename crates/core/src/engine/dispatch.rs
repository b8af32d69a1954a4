//! Frame dispatch: every frame from a guest, by protocol. The switch comes first (frames
//! for other guests go to them), then IP fragments, held until their datagram is whole
//! (reassembly.rs), then ARP and ping for the gateway, DHCP and stateless
//! DHCPv6, neighbour and router discovery (engine/icmpv6.rs), and TCP, UDP and ICMP echo,
//! over IPv4 or IPv6, to their flows, creating a flow on a SYN, a first datagram or a first
//! echo request. Each new flow is first put to the egress policy (`dial::admit`). Nothing
//! here panics, whatever the bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::time::Instant;

use mio::Interest;

use usernet_wire::arp::{self, ArpPacket};
use usernet_wire::ethernet::{self, EthernetHeader};
use usernet_wire::icmp::{self, IcmpHeader};
use usernet_wire::ipv4::{self, Ipv4Header};
use usernet_wire::ipv6::{self, Ipv6Header};
use usernet_wire::tcp::{ACK, RST, SYN, TcpHeader};
use usernet_wire::udp::UdpHeader;
use usernet_wire::vnet_hdr::{self, VnetHdr};
use usernet_wire::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

use super::flows::{self, Flow, FlowKey, IcmpFlow, TcpFlow, UdpFlow, Verdict};
use super::metrics::{DropReason, Limit};
use super::switch::{ICMP_DATA_OFF, UDP_PAYLOAD_OFF, Unreachable, max_l4_len};
use super::{Engine, dial, reassembly};
use crate::policy::Via;
use crate::services::dhcp6;

impl Engine {
    /// One frame from the guest. Never panics, whatever the bytes.
    pub fn on_frame(&mut self, link: usize, frame: &[u8], now: Instant) {
        // (A frame another engine handed over was captured there, and is whole.)
        let handed = self.handling_handed();
        if let Some(p) = self.switch.pcap.as_mut()
            && !handed
        {
            p.write(frame);
        }
        let offloads = if handed { VnetHdr::default() } else { self.switch.recv_offloads(link) };
        if offloads.gso_type & !vnet_hdr::GSO_ECN != vnet_hdr::GSO_UDP_L4 {
            self.count_in(frame);
            self.handle_frame(link, frame, true, offloads, now);
            return;
        }
        // A guest's segmented UDP send (USO, tap.rs) is the datagrams it stands for: each is
        // counted and handled as the frame the guest's kernel would have sent without the
        // offload (and the flow's batch sends them segmented again, udp_batch.rs). So an
        // engine that hands one to another engine takes out what it counted of it.
        let mut scratch = std::mem::take(&mut self.uso_scratch);
        let cut = vnet_hdr::finish(frame, &offloads, &mut scratch, |datagram| {
            self.count_in(datagram);
            self.handle_frame(link, datagram, true, VnetHdr::default(), now);
        });
        self.uso_scratch = scratch;
        if let Err(why) = cut {
            tracing::debug!("a segmented UDP frame from the guest: {why}");
            self.count_in(frame);
            self.switch.drop_in(DropReason::Malformed);
        }
    }

    /// Counts a frame from the guest in the links' statistics.
    fn count_in(&mut self, frame: &[u8]) {
        self.switch.stats.frames_in += 1;
        self.switch.stats.bytes_in += frame.len() as u64;
    }

    /// A frame from the guest, counted in the link's statistics and captured already when
    /// `counted` (a datagram reassembled from its fragments was neither: its fragments were).
    /// `offloads`: what the frame leaves to its receiver (`Link::recv_offloads`), for a guest
    /// it is forwarded to.
    fn handle_frame(&mut self, link: usize, frame: &[u8], counted: bool, offloads: VnetHdr, now: Instant) {
        let Some((eth, payload)) = EthernetHeader::parse(frame) else {
            self.switch.drop_in(DropReason::Malformed);
            return;
        };
        // The IP header, parsed once for the checks below and for the protocol's handler.
        let ip4 = (eth.ethertype == ethernet::ETHERTYPE_IPV4).then(|| Ipv4Header::parse(payload)).flatten();
        let ip6 = (eth.ethertype == ethernet::ETHERTYPE_IPV6).then(|| Ipv6Header::parse(payload)).flatten();
        // Learn where the sender is, and its address when it is one of the guest network's.
        let raw_src = match eth.ethertype {
            ethernet::ETHERTYPE_ARP => ArpPacket::parse(payload).map(|a| a.sender_ip),
            _ => ip4.map(|(h, _)| h.src),
        };
        let src6 = ip6.map(|(h, _)| h.src).filter(|ip| self.guest_addr6(*ip));
        let cfg = &self.cfg;
        let guest_addr = |ip: Ipv4Addr| cfg.subnet.contains(ip) && !cfg.is_own_address(ip);
        // `serve`: a guest may not speak for another, nor for usernet (see Switch::admit,
        // and admit_ipv6 for IPv6).
        if !self.switch.admit(link, eth.src, raw_src, guest_addr) {
            self.switch.drop_in(DropReason::Spoofed);
            return;
        }
        let src_ip = raw_src.filter(|ip| guest_addr(*ip)).map(IpAddr::V4).or(src6.map(IpAddr::V6));
        if let Some((ip, l4)) = ip6
            && self.switch.bind_sources
            && !self.admit_ipv6(link, eth.src, &ip, l4)
        {
            self.switch.drop_in(DropReason::Spoofed);
            return;
        }
        self.switch.learn(link, eth.src, src_ip);
        // The switch: frames for other guests go to them; broadcasts go to them too.
        if eth.dst != self.cfg.gateway_mac {
            self.switch.forward(link, frame, &offloads);
            if eth.dst[0] & 1 == 0 {
                return;
            }
        }
        // With several engines: a frame of another engine's flow goes to it (see shard.rs).
        if self.shard.is_some() && !self.keep_frame(self.belongs(ip4.as_ref(), ip6.as_ref()), frame, counted) {
            return;
        }
        match eth.ethertype {
            ethernet::ETHERTYPE_ARP | ethernet::ETHERTYPE_IPV4 if !self.cfg.ipv4 => {
                self.switch.drop_in(DropReason::Ethertype)
            }
            ethernet::ETHERTYPE_ARP => self.on_arp(payload),
            ethernet::ETHERTYPE_IPV4 => match ip4 {
                Some((ip, l4)) if ip.is_fragment() => self.on_fragment(link, eth.src, Fragmented::V4(&ip), l4, now),
                Some((ip, l4)) => self.on_ipv4(&ip, l4, eth.src, now),
                None => self.switch.drop_in(DropReason::Malformed),
            },
            ethernet::ETHERTYPE_IPV6 if self.cfg.v6.is_some() => match ip6 {
                Some((ip, l4)) if ip.is_fragment() => self.on_fragment(link, eth.src, Fragmented::V6(&ip), l4, now),
                Some((ip, l4)) => self.on_ipv6(&ip, l4, eth.src, now),
                None => self.switch.drop_in(DropReason::Malformed),
            },
            _ => self.switch.drop_in(DropReason::Ethertype),
        }
    }

    /// With guests bound to their links (`serve`): whether link `index`'s guest (`mac`) may
    /// send this IPv6 packet, to usernet or to another guest. Its source must be its own
    /// ([`Switch::admit6`]: not usernet's, not another guest's), and so must the target of a
    /// neighbour advertisement, with the guest's MAC in the link-layer options; router
    /// advertisements, redirects and DHCPv6 servers' replies are usernet's to send (RA guard,
    /// RFC 6105). Packets too broken to read go on, to be dropped as malformed.
    fn admit_ipv6(&mut self, index: usize, mac: [u8; 6], ip: &Ipv6Header, l4: &[u8]) -> bool {
        use usernet_wire::icmpv6::{TYPE_NEIGHBOR_ADVERT, TYPE_NEIGHBOR_SOLICIT, TYPE_REDIRECT, TYPE_ROUTER_ADVERT};
        use usernet_wire::ndp::{NeighborAdvert, NeighborSolicit};
        if !self.switch.admit6(index, mac, ip.src, self.guest_may_use6(ip.src)) {
            return false;
        }
        if ip.is_fragment() {
            // Checked again once whole (`on_fragment`).
            return true;
        }
        match (ip.protocol, l4.first().copied()) {
            (PROTO_ICMPV6, Some(TYPE_ROUTER_ADVERT | TYPE_REDIRECT)) => false,
            (PROTO_ICMPV6, Some(TYPE_NEIGHBOR_SOLICIT)) => {
                NeighborSolicit::parse(l4).is_none_or(|ns| ns.source_lladdr.is_none_or(|m| m == mac))
            }
            (PROTO_ICMPV6, Some(TYPE_NEIGHBOR_ADVERT)) => match NeighborAdvert::parse(l4) {
                Some(na) => {
                    na.target_lladdr.is_none_or(|m| m == mac)
                        && self.switch.admit6(index, mac, na.target, self.guest_may_use6(na.target))
                }
                None => true,
            },
            // A DHCPv6 server's port (RFC 8415 section 7.2): replies come from usernet only.
            (PROTO_UDP, _) => l4.get(0..2) != Some(&dhcp6::SERVER_PORT.to_be_bytes()[..]),
            _ => true,
        }
    }

    /// An address a guest may claim on its link: [`Engine::guest_addr6`], or any link-local
    /// one on a network without IPv6 (gvproxy's and vpnkit's), where guests still speak it
    /// among themselves (a VM's neighbour discovery at boot is not a spoof).
    fn guest_may_use6(&self, ip: Ipv6Addr) -> bool {
        self.guest_addr6(ip) || (self.cfg.v6.is_none() && ip.is_unicast_link_local())
    }

    /// An address a guest may use as its own over IPv6: one of the network's prefix or a
    /// link-local one, never usernet's own, a multicast or the unspecified address.
    pub(super) fn guest_addr6(&self, ip: Ipv6Addr) -> bool {
        let Some(net) = self.cfg.v6 else { return false };
        (net.contains(ip) || ip.is_unicast_link_local()) && !self.cfg.is_own_address6(ip)
    }

    pub(super) fn on_arp(&mut self, payload: &[u8]) {
        let Some(p) = ArpPacket::parse(payload) else {
            return;
        };
        if p.op != arp::OP_REQUEST || !self.cfg.is_own_address(p.target_ip) {
            return;
        }
        let reply = ArpPacket {
            op: arp::OP_REPLY,
            sender_mac: self.cfg.gateway_mac,
            sender_ip: p.target_ip,
            target_mac: p.sender_mac,
            target_ip: p.sender_ip,
        };
        let mut frame = [0u8; ethernet::HEADER_LEN + arp::LEN];
        EthernetHeader { dst: p.sender_mac, src: self.cfg.gateway_mac, ethertype: ethernet::ETHERTYPE_ARP }
            .emit(&mut frame);
        reply.emit(&mut frame[ethernet::HEADER_LEN..]);
        self.switch.send_frame(&frame, p.sender_mac);
    }

    /// A fragment of a guest's IPv4 or IPv6 datagram for usernet (`payload` what follows
    /// its IP header, or its Fragment header): held until its datagram is whole
    /// (reassembly.rs), which is then handled as if it had come in one frame, from the same
    /// link and MAC. With several engines, fragments come to engine 0 (`belongs`), and the
    /// whole datagram goes to the engine of its flow.
    fn on_fragment(&mut self, link: usize, src_mac: [u8; 6], ip: Fragmented<'_>, payload: &[u8], now: Instant) {
        let (key, piece, max_len) = match ip {
            Fragmented::V4(h) => (
                reassembly::Key { src: h.src.into(), dst: h.dst.into(), protocol: h.protocol, ident: h.ident.into() },
                reassembly::Piece {
                    offset: h.frag_offset,
                    more: h.more_fragments,
                    protocol: h.protocol,
                    data: payload,
                },
                max_l4_len(false),
            ),
            Fragmented::V6(h) => {
                let Some(f) = h.fragment else { return };
                (
                    reassembly::Key { src: h.src.into(), dst: h.dst.into(), protocol: 0, ident: f.ident },
                    reassembly::Piece { offset: f.offset, more: f.more, protocol: h.protocol, data: payload },
                    max_l4_len(true),
                )
            }
        };
        let added = self.reassembly.add(key, piece, max_len, now);
        self.switch.stats.dropped_in += added.dropped;
        self.switch.counters.dropped_n(DropReason::Fragment, added.dropped);
        if added.evicted {
            self.limit_reached(Limit::Fragments, now, || {
                format!(
                    "{} datagrams or {} KiB being reassembled from IP fragments: the oldest is dropped",
                    reassembly::MAX_DATAGRAMS,
                    reassembly::MAX_BYTES >> 10
                )
            });
        }
        let Some(whole) = added.whole else { return };
        let mut packet = whole.packet;
        let head = self.reassembly.head();
        let len = packet.len() - head;
        let (start, ethertype) = match ip {
            Fragmented::V4(h) => {
                let start = head - ipv4::HEADER_LEN - ethernet::HEADER_LEN;
                let whole_header = Ipv4Header { ttl: h.ttl, ..Ipv4Header::new(h.src, h.dst, whole.protocol, len) };
                whole_header.emit(&mut packet[start + ethernet::HEADER_LEN..]);
                (start, ethernet::ETHERTYPE_IPV4)
            }
            Fragmented::V6(h) => {
                let start = head - ipv6::HEADER_LEN - ethernet::HEADER_LEN;
                let whole_header =
                    Ipv6Header { hop_limit: h.hop_limit, ..Ipv6Header::new(h.src, h.dst, whole.protocol, len) };
                whole_header.emit(&mut packet[start + ethernet::HEADER_LEN..]);
                // What the whole packet carries, past any extension headers in the
                // fragments. A Fragment header among them would be reassembled in turn, one
                // call deeper, as often as a guest nests them; neighbour discovery is never
                // fragmented (RFC 6980). Both are refused.
                match Ipv6Header::parse(&packet[start + ethernet::HEADER_LEN..]) {
                    Some((h, _)) if h.is_fragment() => {
                        self.switch.drop_in(DropReason::Fragment);
                        return;
                    }
                    Some((h, l4))
                        if h.protocol == PROTO_ICMPV6 && l4.first().is_some_and(|t| (133..=137).contains(t)) =>
                    {
                        self.switch.drop_in(DropReason::Icmpv6);
                        return;
                    }
                    _ => {}
                }
                (start, ethernet::ETHERTYPE_IPV6)
            }
        };
        EthernetHeader { dst: self.cfg.gateway_mac, src: src_mac, ethertype }.emit(&mut packet[start..]);
        // Steered by its own flow, even when its fragments were handed here.
        let handed = self.set_handling_handed(false);
        self.handle_frame(link, &packet[start..], false, VnetHdr::default(), now);
        self.set_handling_handed(handed);
    }

    /// An IPv4 packet for usernet, whole: `ip` its header, `payload` what follows it.
    fn on_ipv4(&mut self, ip: &Ipv4Header, payload: &[u8], src_mac: [u8; 6], now: Instant) {
        let addrs = Addrs { src: ip.src.into(), dst: ip.dst.into() };
        match ip.protocol {
            PROTO_TCP => self.on_tcp(addrs, payload, now),
            PROTO_UDP => self.on_udp(addrs, payload, src_mac, now),
            PROTO_ICMP => self.on_icmp(ip, payload, now),
            _ => self.switch.drop_in(DropReason::IpProtocol),
        }
    }

    /// An IPv6 packet for usernet, whole: `ip` its header, `payload` what follows its
    /// extension headers.
    fn on_ipv6(&mut self, ip: &Ipv6Header, payload: &[u8], src_mac: [u8; 6], now: Instant) {
        if ip.protocol == PROTO_ICMPV6 {
            self.on_icmpv6(ip, payload, src_mac, now);
            return;
        }
        if !self.guest_addr6(ip.src) {
            // TCP and UDP come from a guest's own address, never from a group or from none.
            self.switch.drop_in(DropReason::Spoofed);
            return;
        }
        let on_link = ip.dst.is_unicast_link_local() || ip.dst.is_multicast() || self.cfg.is_own_address6(ip.dst);
        if ip.src.is_unicast_link_local() && !on_link {
            // A link-local source reaches no further than the link (usernet's own addresses,
            // DHCPv6's group), as a router has it (RFC 4007 section 9): the guest hears so at
            // once. (A guest whose global address is still tentative speaks from its
            // link-local one until its duplicate address detection is done.)
            let why = Unreachable::BeyondScope;
            self.switch.send_unreachable(ip.src.into(), ip.dst.into(), why, ip.protocol, payload.len(), payload);
            self.switch.drop_in(DropReason::Spoofed);
            return;
        }
        let addrs = Addrs { src: ip.src.into(), dst: ip.dst.into() };
        match ip.protocol {
            PROTO_TCP => self.on_tcp(addrs, payload, now),
            PROTO_UDP => self.on_udp(addrs, payload, src_mac, now),
            _ => self.switch.drop_in(DropReason::IpProtocol),
        }
    }

    pub(super) fn on_icmp(&mut self, ip: &Ipv4Header, message: &[u8], now: Instant) {
        let Some((h, data)) = IcmpHeader::parse(message) else {
            return;
        };
        if h.kind != icmp::TYPE_ECHO_REQUEST {
            return;
        }
        if ip.dst == self.cfg.gateway || self.cfg.dns == Some(ip.dst) {
            // A request that came in fragments is answered whole, in fragments too.
            let len = data.len().min(max_l4_len(false) - icmp::HEADER_LEN);
            self.switch.buf()[ICMP_DATA_OFF..ICMP_DATA_OFF + len].copy_from_slice(&data[..len]);
            let reply = IcmpHeader::echo(icmp::TYPE_ECHO_REPLY, h.ident(), h.seq());
            self.switch.send_icmp(ip.dst, ip.src, &reply, len);
            return;
        }
        self.echo_through_host(Addrs { src: ip.src.into(), dst: ip.dst.into() }, h.ident(), message, now);
    }

    /// A guest's echo request (`message`, the whole ICMP or ICMPv6 message) to an address
    /// beyond the gateway: through its flow's host socket, made on the first request.
    pub(super) fn echo_through_host(&mut self, ip: Addrs, ident: u16, message: &[u8], now: Instant) {
        let key = FlowKey::Icmp { guest: ip.src, remote: ip.dst, ident };
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => {
                self.bound_icmp(now);
                let admitted = dial::admit(&self.cfg, Via::Icmp, SocketAddr::new(ip.dst, 0), None);
                let (fd, kind) = match admitted.and_then(|()| self.dialer.icmp(ip.dst)) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("ping {} -> {}: {e}", ip.src, ip.dst);
                        if e.raw_os_error() == Some(libc::EACCES) {
                            // The egress policy: the guest's ping fails at once.
                            let proto = if ip.dst.is_ipv6() { PROTO_ICMPV6 } else { PROTO_ICMP };
                            let why = Unreachable::AdminProhibited;
                            self.switch.send_unreachable(ip.src, ip.dst, why, proto, message.len(), message);
                        }
                        return;
                    }
                };
                if !self.within_fd_reserve(fd.as_raw_fd(), now) {
                    return;
                }
                let flow = Flow::Icmp(IcmpFlow::new(ip.src, ip.dst, ident, fd, kind, now));
                match self.add_flow(flow, Interest::READABLE) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        self.flows.touch(id);
        if let Some(Flow::Icmp(f)) = self.flows.get_mut(id) {
            f.from_guest(message, now);
        }
        self.after(id, Verdict::Keep);
    }

    pub(super) fn on_udp(&mut self, ip: Addrs, datagram: &[u8], src_mac: [u8; 6], now: Instant) {
        let Some((h, payload)) = UdpHeader::parse(datagram) else {
            return;
        };
        match ip.dst {
            IpAddr::V4(dst) => {
                if h.dst_port == 67 && (dst == self.cfg.gateway || dst.is_broadcast()) {
                    if self.cfg.dhcp {
                        self.on_dhcp(payload, src_mac, now);
                    }
                    return;
                }
                if dst.is_broadcast() || dst.is_multicast() || dst == self.cfg.subnet.broadcast() {
                    return;
                }
            }
            IpAddr::V6(dst) => {
                let to_gateway =
                    dst == crate::config::GATEWAY_LINK_LOCAL || self.cfg.v6.is_some_and(|n| dst == n.gateway);
                if h.dst_port == dhcp6::SERVER_PORT && (dst == dhcp6::ALL_SERVERS || to_gateway) {
                    if self.cfg.ipv6_services.dhcpv6 {
                        self.on_dhcp6(ip.src, h.src_port, payload, src_mac);
                    }
                    return;
                }
                if dst.is_multicast() {
                    return;
                }
            }
        }
        let guest = SocketAddr::new(ip.src, h.src_port);
        let remote = SocketAddr::new(ip.dst, h.dst_port);
        let key = FlowKey::Udp { guest, remote };
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => {
                self.bound_udp(now);
                let admitted = dial::admit(&self.cfg, Via::Udp, remote, Some(guest));
                let (fd, segmenting) =
                    match admitted.and_then(|()| self.dialer.udp(remote, guest, self.guest_key(ip.src))) {
                        Ok(dial) => (dial.fd, dial.segmenting),
                        Err(e) => {
                            tracing::debug!("udp {guest} -> {remote}: {e}");
                            let why = Unreachable::from_errno(e.raw_os_error().unwrap_or(libc::EHOSTUNREACH));
                            self.switch.send_unreachable(ip.src, ip.dst, why, PROTO_UDP, datagram.len(), datagram);
                            return;
                        }
                    };
                if !self.within_fd_reserve(fd.as_raw_fd(), now) {
                    return;
                }
                let to_gateway_dns = match ip.dst {
                    IpAddr::V4(dst) => self.cfg.dns == Some(dst),
                    IpAddr::V6(dst) => {
                        dst == crate::config::GATEWAY_LINK_LOCAL || self.cfg.v6.is_some_and(|n| dst == n.dns)
                    }
                };
                let mut flow = if to_gateway_dns && h.dst_port == 53 {
                    self.bound_gateway_dns(now);
                    UdpFlow::new_gateway_dns(guest, remote, fd, now)
                } else {
                    UdpFlow::new(guest, remote, fd, flows::udp::IDLE, now)
                };
                flow.segmenting = segmenting;
                let flow = Flow::Udp(flow);
                match self.add_flow(flow, Interest::READABLE) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        self.flows.touch(id);
        if let Some(Flow::Udp(f)) = self.flows.get_mut(id) {
            // Gathered and sent with the rest of the batch, on the flow's own socket or
            // its published port's (segmented as far as its client's address allows).
            let (fd, to) = f.destination();
            let segmenting = match to {
                Some(client) => flows::udp::published_segmenting(self.udp_segment, client),
                None => f.segmenting,
            };
            f.sent(now);
            f.traffic.from_guest += payload.len() as u64;
            if self.udp_batch.full(payload.len()) {
                self.udp_batch.flush();
            }
            self.udp_batch.push(id, fd, payload, segmenting, to);
        }
        self.after(id, Verdict::Keep);
    }

    pub(super) fn on_dhcp(&mut self, payload: &[u8], src_mac: [u8; 6], now: Instant) {
        let evicted = self.dhcp.offers_evicted;
        let reply = self.dhcp.handle_at(src_mac, payload, now);
        if self.dhcp.offers_evicted != evicted {
            let max = self.cfg.limits.max_dhcp_offers;
            self.limit_reached(super::metrics::Limit::DhcpOffers, now, || {
                format!(
                    "{max} DHCP offers wait for a REQUEST (--max-dhcp-offers): the oldest is forgotten for each new one"
                )
            });
        }
        let Some(reply) = reply else {
            return;
        };
        let n = reply.payload.len();
        if UDP_PAYLOAD_OFF + n > self.switch.buf().len() {
            return;
        }
        self.switch.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + n].copy_from_slice(&reply.payload);
        self.switch.send_udp_to_mac(
            SocketAddrV4::new(self.cfg.gateway, 67).into(),
            SocketAddrV4::new(reply.dst_ip, 68).into(),
            n,
            Some(reply.dst_mac),
        );
    }

    /// A DHCPv6 message from the guest at `src` (see services/dhcp6.rs): the Reply goes
    /// back to the port it came from, from the gateway's address of the same scope.
    pub(super) fn on_dhcp6(&mut self, src: IpAddr, port: u16, payload: &[u8], src_mac: [u8; 6]) {
        let (IpAddr::V6(src), Some(net)) = (src, self.cfg.v6) else { return };
        let Some(reply) = dhcp6::reply(&self.cfg, payload) else { return };
        let n = reply.len();
        if UDP_PAYLOAD_OFF + n > self.switch.buf().len() {
            return;
        }
        self.switch.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + n].copy_from_slice(&reply);
        let from = if src.is_unicast_link_local() { crate::config::GATEWAY_LINK_LOCAL } else { net.gateway };
        self.switch.send_udp_to_mac(
            SocketAddr::new(from.into(), dhcp6::SERVER_PORT),
            SocketAddr::new(src.into(), port),
            n,
            Some(src_mac),
        );
    }

    pub(super) fn on_tcp(&mut self, ip: Addrs, segment: &[u8], now: Instant) {
        let Some((h, payload)) = TcpHeader::parse(segment) else {
            return;
        };
        let guest = SocketAddr::new(ip.src, h.src_port);
        let remote = SocketAddr::new(ip.dst, h.dst_port);
        let key = FlowKey::Tcp { guest, remote };
        if let Some(id) = self.flows.lookup(&key) {
            // A RST may make an inbound flow fall back to IPv4 (TcpFlow::fallback).
            let claimed = if h.has(RST) { self.claim_fallback(id) } else { None };
            let verdict = match self.flows.get_mut(id) {
                Some(Flow::Tcp(f)) => {
                    if h.has(SYN) && !h.has(ACK) && f.is_stale_for_syn(&h) {
                        // The guest reuses the port for a new connection: the old one is over.
                        Verdict::Close
                    } else {
                        f.on_segment(&mut self.switch, &h, payload, now)
                    }
                }
                _ => Verdict::Keep,
            };
            let new_syn = verdict == Verdict::Close && h.has(SYN) && !h.has(ACK);
            if verdict == Verdict::Keep && h.has(RST) {
                // An inbound flow may have fallen back to IPv4 (TcpFlow::fallback).
                self.flows.rekey(id, &key);
            }
            self.after(id, verdict);
            self.unclaim_unused(claimed, id);
            if !new_syn {
                return;
            }
        }
        if !h.has(SYN) || h.has(ACK) {
            flows::tcp::reset_stray(&mut self.switch, guest, remote, &h, payload.len());
            return;
        }
        let broadcast = match ip.dst {
            IpAddr::V4(dst) => dst.is_broadcast() || dst.is_multicast(),
            IpAddr::V6(dst) => dst.is_multicast(),
        };
        if broadcast {
            return;
        }
        // The egress policy first: a denied destination is not for a hook either (the
        // transparent proxy).
        if dial::admit(&self.cfg, Via::Tcp, remote, Some(guest)).is_err() {
            flows::tcp::refuse(&mut self.switch, guest, remote, h.seq, libc::EACCES);
            return;
        }
        if !self.may_open_tcp(ip.src, now) {
            flows::tcp::reset_syn(&mut self.switch, guest, remote, h.seq);
            return;
        }
        let hooked = self.tcp_hooks.iter_mut().find_map(|hook| hook(remote, guest));
        let dialled = match hooked {
            Some(r) => r.map(|fd| dial::TcpDial { fd, connected: true, is_tcp: false }),
            None => self.dialer.tcp(remote, guest, self.guest_key(ip.src)),
        };
        let dial = match dialled {
            Ok(d) => d,
            Err(e) => {
                flows::tcp::refuse(
                    &mut self.switch,
                    guest,
                    remote,
                    h.seq,
                    e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
                );
                return;
            }
        };
        if !self.within_fd_reserve(dial.fd.as_raw_fd(), now) {
            flows::tcp::reset_syn(&mut self.switch, guest, remote, h.seq);
            return;
        }
        if !dial.connected {
            self.bound_connecting(now);
        }
        let isn = self.isn(&key, now);
        let (flow, verdict) = TcpFlow::new(&mut self.switch, guest, remote, &h, dial, isn, now);
        let Some(id) = self.add_flow(Flow::Tcp(flow), Interest::READABLE | Interest::WRITABLE) else {
            return;
        };
        self.after(id, verdict);
    }
}

/// The header of a fragment, of either family.
#[derive(Clone, Copy)]
enum Fragmented<'a> {
    V4(&'a Ipv4Header),
    V6(&'a Ipv6Header),
}

/// The addresses of a guest's IP packet, of either family: what TCP and UDP need of it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Addrs {
    pub src: IpAddr,
    pub dst: IpAddr,
}
