//! Frames to the guest: one reusable buffer in which a flow places its payload, then the
//! headers are written in front of it and the frame goes out on the link (and to the pcap).

use std::net::{Ipv4Addr, SocketAddrV4};

use crate::link::Link;
use crate::pcap::PcapWriter;
use crate::wire::icmp::IcmpHeader;
use crate::wire::ipv4::{self, Ipv4Header};
use crate::wire::tcp::TcpHeader;
use crate::wire::udp::{self, UdpHeader};
use crate::wire::{BROADCAST_MAC, Mac, PROTO_ICMP, PROTO_TCP, PROTO_UDP, ethernet};

/// Where a data segment's payload starts in the frame buffer (no TCP options on data).
pub const TCP_PAYLOAD_OFF: usize =
    ethernet::HEADER_LEN + ipv4::HEADER_LEN + crate::wire::tcp::HEADER_LEN;
/// Where a UDP payload starts in the frame buffer.
pub const UDP_PAYLOAD_OFF: usize = ethernet::HEADER_LEN + ipv4::HEADER_LEN + udp::HEADER_LEN;
/// Where ICMP data (after the 8-byte ICMP header) starts in the frame buffer.
pub const ICMP_DATA_OFF: usize =
    ethernet::HEADER_LEN + ipv4::HEADER_LEN + crate::wire::icmp::HEADER_LEN;

/// Counters of the guest link.
#[derive(Default, Debug, Clone, Copy)]
pub struct LinkStats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_in: u64,
    pub send_errors: u64,
}

pub struct GuestTx {
    pub link: Box<dyn Link>,
    pub pcap: Option<PcapWriter>,
    buf: Vec<u8>,
    pub gateway_mac: Mac,
    /// The guest's MAC, learnt from its frames; broadcast until then.
    pub guest_mac: Mac,
    pub mtu: usize,
    pub stats: LinkStats,
}

impl GuestTx {
    pub fn new(
        link: Box<dyn Link>,
        pcap: Option<PcapWriter>,
        gateway_mac: Mac,
        mtu: usize,
    ) -> GuestTx {
        GuestTx {
            link,
            pcap,
            buf: vec![0u8; ethernet::HEADER_LEN + mtu.max(1500)],
            gateway_mac,
            guest_mac: BROADCAST_MAC,
            mtu,
            stats: LinkStats::default(),
        }
    }

    /// The whole frame buffer, for a flow to place a payload at one of the *_OFF offsets.
    pub fn buf(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Largest TCP payload that fits the MTU.
    pub fn max_tcp_payload(&self) -> usize {
        self.mtu - ipv4::HEADER_LEN - crate::wire::tcp::HEADER_LEN
    }

    /// Largest UDP payload that fits the MTU.
    pub fn max_udp_payload(&self) -> usize {
        self.mtu - ipv4::HEADER_LEN - udp::HEADER_LEN
    }

    /// Sends a TCP segment whose payload (if any) is already at the offset that
    /// `hdr.emit_len()` implies (TCP_PAYLOAD_OFF when the header has no options).
    pub fn send_tcp(
        &mut self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        hdr: &TcpHeader,
        payload_len: usize,
    ) {
        let l4 = ethernet::HEADER_LEN + ipv4::HEADER_LEN;
        let tcp_len = hdr.emit_len() + payload_len;
        hdr.emit(&mut self.buf[l4..], payload_len, *from.ip(), *to.ip());
        self.finish_ipv4(*from.ip(), *to.ip(), PROTO_TCP, tcp_len);
    }

    /// Sends a UDP datagram whose payload is already at UDP_PAYLOAD_OFF.
    pub fn send_udp(&mut self, from: SocketAddrV4, to: SocketAddrV4, payload_len: usize) {
        self.send_udp_to_mac(from, to, payload_len, None);
    }

    /// The same, to a given MAC (DHCP replies to a client without an address).
    pub fn send_udp_to_mac(
        &mut self,
        from: SocketAddrV4,
        to: SocketAddrV4,
        payload_len: usize,
        mac: Option<Mac>,
    ) {
        let l4 = ethernet::HEADER_LEN + ipv4::HEADER_LEN;
        UdpHeader {
            src_port: from.port(),
            dst_port: to.port(),
        }
        .emit(&mut self.buf[l4..], payload_len, *from.ip(), *to.ip());
        let saved = self.guest_mac;
        if let Some(m) = mac {
            self.guest_mac = m;
        }
        self.finish_ipv4(
            *from.ip(),
            *to.ip(),
            PROTO_UDP,
            udp::HEADER_LEN + payload_len,
        );
        self.guest_mac = saved;
    }

    /// Sends an ICMP message whose data is already at ICMP_DATA_OFF.
    pub fn send_icmp(&mut self, from: Ipv4Addr, to: Ipv4Addr, hdr: &IcmpHeader, data_len: usize) {
        let l4 = ethernet::HEADER_LEN + ipv4::HEADER_LEN;
        hdr.emit(&mut self.buf[l4..], data_len);
        self.finish_ipv4(
            from,
            to,
            PROTO_ICMP,
            crate::wire::icmp::HEADER_LEN + data_len,
        );
    }

    /// Sends an ICMP error about `original` (the guest's IP packet, header first), quoting
    /// its IP header and first 8 bytes of payload as RFC 792 asks.
    pub fn send_icmp_error(
        &mut self,
        from: Ipv4Addr,
        to: Ipv4Addr,
        kind: u8,
        code: u8,
        original: &[u8],
    ) {
        let quote = original.len().min(ipv4::HEADER_LEN + 8 + 40);
        self.buf[ICMP_DATA_OFF..ICMP_DATA_OFF + quote].copy_from_slice(&original[..quote]);
        let hdr = IcmpHeader {
            kind,
            code,
            rest: [0; 4],
        };
        self.send_icmp(from, to, &hdr, quote);
    }

    fn finish_ipv4(&mut self, src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) {
        Ipv4Header::new(src, dst, proto, l4_len).emit(&mut self.buf[ethernet::HEADER_LEN..]);
        let eth = ethernet::EthernetHeader {
            dst: self.guest_mac,
            src: self.gateway_mac,
            ethertype: ethernet::ETHERTYPE_IPV4,
        };
        eth.emit(&mut self.buf);
        let len = ethernet::HEADER_LEN + ipv4::HEADER_LEN + l4_len;
        self.send_raw_len(len);
    }

    /// Sends the first `len` bytes of the buffer as they are.
    pub fn send_raw_len(&mut self, len: usize) {
        let frame = &self.buf[..len];
        if let Some(p) = self.pcap.as_mut() {
            p.write(frame);
        }
        match self.link.send(frame) {
            Ok(()) => {
                self.stats.frames_out += 1;
                self.stats.bytes_out += len as u64;
            }
            Err(e) => {
                self.stats.send_errors += 1;
                tracing::debug!("link send: {e}");
            }
        }
    }

    /// Sends a frame built elsewhere (ARP replies).
    pub fn send_frame(&mut self, frame: &[u8]) {
        self.buf[..frame.len()].copy_from_slice(frame);
        self.send_raw_len(frame.len());
    }
}
