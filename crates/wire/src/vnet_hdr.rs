//! The virtio-net header (struct virtio_net_hdr, 10 bytes, little-endian here) that a TAP
//! device opened with IFF_VNET_HDR puts in front of every frame. It carries the offloads:
//! a checksum left for the receiver to complete or trust (NEEDS_CSUM with start and offset),
//! and segmentation (GSO) of one large TCP frame into MSS-sized segments, or of one large
//! UDP frame into datagrams of one size (USO, GSO_UDP_L4). A virtio-net device's rings
//! carry the same header. [`finish`] does what such a frame leaves to its
//! receiver, for one that cannot (a frame switched to another guest).

pub const LEN: usize = 10;

/// The checksum at csum_start + csum_offset holds only the pseudo-header sum.
pub const F_NEEDS_CSUM: u8 = 1;
/// The checksums are known to be good.
pub const F_DATA_VALID: u8 = 2;

pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_UDP: u8 = 3;
pub const GSO_TCPV6: u8 = 4;
/// UDP segmentation (USO): the payload is cut into datagrams of `gso_size` bytes (the last
/// may be shorter), each with its own UDP header; IPv4 or IPv6 as the frame says.
pub const GSO_UDP_L4: u8 = 5;
/// The most datagrams one USO frame may carry: Linux refuses a frame from a TAP device or
/// a virtio ring with more (UDP_MAX_SEGMENTS was 64 until 6.11), and its GRO makes no more.
pub const MAX_UDP_SEGMENTS: usize = 64;
pub const GSO_ECN: u8 = 0x80;

use super::{PROTO_TCP, PROTO_UDP, be16, be32, checksum, ethernet, put16, put32};
use std::net::{Ipv4Addr, Ipv6Addr};

/// TCP's CWR flag, which only the first segment of a GSO frame keeps.
const TCP_CWR: u8 = 0x80;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    /// Length of the headers (Ethernet, IP, TCP) of a GSO frame.
    pub hdr_len: u16,
    /// Payload size of each segment of a GSO frame.
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn parse(b: &[u8]) -> Option<VnetHdr> {
        if b.len() < LEN {
            return None;
        }
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
        })
    }

    pub fn emit(&self, b: &mut [u8; LEN]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// Does to `frame` what `hdr` leaves to its receiver, as a device without offloads needs
/// it done: a partial checksum (F_NEEDS_CSUM) completed, the ones' complement sum from
/// `csum_start` to the end stored at `csum_start + csum_offset`; a TCP GSO frame cut into
/// segments of `gso_size` bytes of payload, each with its own IP length (for IPv4 also
/// its identification, counted up from the frame's, and header checksum), sequence
/// number and full TCP checksum, CWR kept on the first segment only and FIN and PSH on
/// the last only (as Linux's `tcp_gso_segment`); a USO frame (GSO_UDP_L4) cut into
/// datagrams of `gso_size` bytes, each with its own IP length (and IPv4 identification and
/// header checksum), UDP length and full checksum (as Linux's `__udp_gso_segment`). Each
/// finished frame is built in `scratch` and handed to `out`; a frame with nothing to do goes
/// to `out` as it is.
///
/// `Err` says why the frame cannot be finished, and then `out` got nothing: a checksum
/// position outside the frame, a GSO type other than TCP and USO (usernet offers no UDP
/// fragmentation offload, GSO_UDP), a GSO frame whose headers are not Ethernet, IPv4 or
/// IPv6 (with at most Hop-by-Hop and Destination Options headers) and TCP or UDP as its
/// type says, or are cut short, or a `gso_size` of 0. Never panics, whatever the bytes.
pub fn finish(
    frame: &[u8],
    hdr: &VnetHdr,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<(), &'static str> {
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE if hdr.flags & F_NEEDS_CSUM == 0 => {
            out(frame);
            Ok(())
        }
        GSO_NONE => {
            let start = usize::from(hdr.csum_start);
            let at = start + usize::from(hdr.csum_offset);
            if at + 2 > frame.len() {
                return Err("a checksum to complete outside the frame");
            }
            scratch.clear();
            scratch.extend_from_slice(frame);
            // The field holds the pseudo-header's sum: the sum over it and the rest is the
            // checksum. A zero is sent as 0xffff (UDP's zero means "no checksum").
            let sum = match checksum::checksum(&scratch[start..]) {
                0 => 0xffff,
                sum => sum,
            };
            put16(scratch, at, sum);
            out(scratch);
            Ok(())
        }
        GSO_TCPV4 | GSO_TCPV6 => segment_tcp(frame, hdr, scratch, out),
        GSO_UDP_L4 => segment_udp(frame, hdr, scratch, out),
        _ => Err("a GSO type other than TCP and UDP"),
    }
}

/// Where the headers of a GSO frame end.
struct Layout {
    v6: bool,
    /// Offset of the IP header and its length.
    ip: usize,
    ip_len: usize,
    /// Offset of the transport header (TCP or UDP) and its length.
    l4: usize,
    l4_len: usize,
    /// End of the IP packet (bytes after it are padding).
    end: usize,
}

/// The headers of a GSO frame of transport `proto` (TCP or UDP), over IPv6 or IPv4 as `v6`
/// says (for UDP, which one type serves, as the frame's ethertype says).
fn gso_layout(frame: &[u8], v6: bool, proto: u8) -> Result<Layout, &'static str> {
    const SHORT: &str = "a GSO frame cut short in its headers";
    let ip = ethernet::HEADER_LEN;
    if frame.len() < ip {
        return Err(SHORT);
    }
    let ethertype = be16(frame, 12);
    let (ip_len, end) = if v6 {
        if ethertype != ethernet::ETHERTYPE_IPV6 || frame.len() < ip + 40 || frame[ip] >> 4 != 6 {
            return Err("an IPv6 GSO frame that is not IPv6");
        }
        let end = ip + 40 + usize::from(be16(frame, ip + 4));
        (40 + v6_options_len(frame, ip, end, proto)?, end)
    } else {
        if ethertype != ethernet::ETHERTYPE_IPV4 || frame.len() < ip + 20 || frame[ip] >> 4 != 4 {
            return Err("an IPv4 GSO frame that is not IPv4");
        }
        let ip_len = usize::from(frame[ip] & 0x0f) * 4;
        if frame[ip + 9] != proto {
            return Err("an IPv4 GSO frame of another transport than its type's");
        }
        if be16(frame, ip + 6) & 0x3fff != 0 {
            return Err("an IPv4 GSO frame that is a fragment");
        }
        (ip_len, ip + usize::from(be16(frame, ip + 2)))
    };
    let l4 = ip + ip_len;
    let min = if proto == PROTO_TCP { 20 } else { 8 };
    if ip_len < 20 || end > frame.len() || l4 + min > end {
        return Err(SHORT);
    }
    let l4_len = if proto == PROTO_TCP { usize::from(frame[l4 + 12] >> 4) * 4 } else { 8 };
    if l4_len < min || l4 + l4_len > end {
        return Err(SHORT);
    }
    Ok(Layout { v6, ip, ip_len, l4, l4_len, end })
}

/// Bytes of the option headers between the IPv6 header at `ip` and the transport `proto`
/// (in a packet ending at `end`): Hop-by-Hop Options (first only) and Destination Options,
/// which every segment carries as they are, as Linux's IPv6 GSO does. A Routing header is
/// refused: the checksum of each segment would be over its final destination, not the one
/// in the IPv6 header. So is a Fragment header (a fragment is never a GSO frame).
fn v6_options_len(frame: &[u8], ip: usize, end: usize, proto: u8) -> Result<usize, &'static str> {
    use super::ipv6::{EXT_DEST_OPTIONS, EXT_HOP_BY_HOP, MAX_EXT_HEADERS};
    let mut next = frame[ip + 6];
    let mut at = ip + 40;
    for walked in 0..=MAX_EXT_HEADERS {
        match next {
            p if p == proto => return Ok(at - ip - 40),
            EXT_HOP_BY_HOP if walked > 0 => return Err("an IPv6 GSO frame with a misplaced Hop-by-Hop header"),
            EXT_HOP_BY_HOP | EXT_DEST_OPTIONS if walked < MAX_EXT_HEADERS => {
                let Some(&units) = frame.get(at + 1).filter(|_| at + 2 <= end) else {
                    return Err("a GSO frame cut short in its headers");
                };
                next = frame[at];
                at += (usize::from(units) + 1) * 8;
            }
            _ => break,
        }
    }
    Err("an IPv6 GSO frame of another transport than its type's, or with a Routing or Fragment header")
}

/// Writes a segment's IP lengths (and, over IPv4, identification `ident` and header
/// checksum) for `l4_bytes` of transport header and data, and returns its pseudo-header sum.
fn segment_ip(scratch: &mut [u8], frame: &[u8], l: &Layout, proto: u8, l4_bytes: usize, ident: u16) -> u64 {
    if l.v6 {
        put16(scratch, l.ip + 4, (l.ip_len - 40 + l4_bytes) as u16);
        let addr = |at: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&frame[at..at + 16]).unwrap_or([0; 16]));
        checksum::pseudo_v6(addr(l.ip + 8), addr(l.ip + 24), proto, l4_bytes)
    } else {
        put16(scratch, l.ip + 2, (l.ip_len + l4_bytes) as u16);
        put16(scratch, l.ip + 4, ident);
        put16(scratch, l.ip + 10, 0);
        let sum = checksum::checksum(&scratch[l.ip..l.ip + l.ip_len]);
        put16(scratch, l.ip + 10, sum);
        let addr = |at: usize| Ipv4Addr::new(frame[at], frame[at + 1], frame[at + 2], frame[at + 3]);
        checksum::pseudo_v4(addr(l.ip + 12), addr(l.ip + 16), proto, l4_bytes)
    }
}

fn segment_tcp(
    frame: &[u8],
    hdr: &VnetHdr,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<(), &'static str> {
    let l = gso_layout(frame, hdr.gso_type & !GSO_ECN == GSO_TCPV6, PROTO_TCP)?;
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err("a GSO frame with a segment size of 0");
    }
    let headers = l.l4 + l.l4_len;
    let payload = &frame[headers..l.end];
    let count = payload.len().div_ceil(mss).max(1);
    let seq = be32(frame, l.l4 + 4);
    let ident = be16(frame, l.ip + 4);
    for i in 0..count {
        let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
        scratch.clear();
        scratch.extend_from_slice(&frame[..headers]);
        scratch.extend_from_slice(chunk);
        let pseudo = segment_ip(scratch, frame, &l, PROTO_TCP, l.l4_len + chunk.len(), ident.wrapping_add(i as u16));
        put32(scratch, l.l4 + 4, seq.wrapping_add((i * mss) as u32));
        if i + 1 < count {
            scratch[l.l4 + 13] &= !(super::tcp::FIN | super::tcp::PSH);
        }
        if i > 0 {
            scratch[l.l4 + 13] &= !TCP_CWR;
        }
        put16(scratch, l.l4 + 16, 0);
        let sum = checksum::finish(checksum::add(pseudo, &scratch[l.l4..]));
        put16(scratch, l.l4 + 16, sum);
        out(scratch);
    }
    Ok(())
}

/// Cuts a USO frame into its datagrams (see [`finish`]).
fn segment_udp(
    frame: &[u8],
    hdr: &VnetHdr,
    scratch: &mut Vec<u8>,
    mut out: impl FnMut(&[u8]),
) -> Result<(), &'static str> {
    let v6 = frame.len() >= ethernet::HEADER_LEN && be16(frame, 12) == ethernet::ETHERTYPE_IPV6;
    let l = gso_layout(frame, v6, PROTO_UDP)?;
    let size = usize::from(hdr.gso_size);
    if size == 0 {
        return Err("a GSO frame with a segment size of 0");
    }
    let headers = l.l4 + l.l4_len;
    let payload = &frame[headers..l.end];
    let ident = be16(frame, l.ip + 4);
    let count = payload.len().div_ceil(size).max(1);
    for i in 0..count {
        let chunk = &payload[(i * size).min(payload.len())..((i + 1) * size).min(payload.len())];
        scratch.clear();
        scratch.extend_from_slice(&frame[..headers]);
        scratch.extend_from_slice(chunk);
        let udp_bytes = l.l4_len + chunk.len();
        let pseudo = segment_ip(scratch, frame, &l, PROTO_UDP, udp_bytes, ident.wrapping_add(i as u16));
        put16(scratch, l.l4 + 4, udp_bytes as u16);
        put16(scratch, l.l4 + 6, 0);
        // A zero is sent as 0xffff: UDP's zero means "no checksum".
        let sum = match checksum::finish(checksum::add(pseudo, &scratch[l.l4..])) {
            0 => 0xffff,
            sum => sum,
        };
        put16(scratch, l.l4 + 6, sum);
        out(scratch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ethernet::EthernetHeader;
    use crate::ipv4::Ipv4Header;
    use crate::ipv6::Ipv6Header;
    use crate::tcp::{self, TcpHeader};
    use std::net::IpAddr;

    /// A TCP frame with `payload` after its headers, its checksum partial (as a guest with
    /// offloads sends it).
    fn tcp_frame(src: IpAddr, dst: IpAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
        let tcp = TcpHeader {
            src_port: 40000,
            dst_port: 80,
            seq: 0xffff_fff0,
            ack: 7,
            flags,
            window: 512,
            ..Default::default()
        };
        let (mut f, at) = ip_frame(src, dst, PROTO_TCP, tcp.emit_len() + payload.len());
        f[at + tcp.emit_len()..].copy_from_slice(payload);
        tcp.emit_partial(&mut f[at..], payload.len(), src, dst);
        f
    }

    /// An Ethernet frame with an IP header (IPv4 with identification 0xfffe) for `l4_len`
    /// bytes of `proto`, zeros; and where those bytes start.
    fn ip_frame(src: IpAddr, dst: IpAddr, proto: u8, l4_len: usize) -> (Vec<u8>, usize) {
        let ip_len = if src.is_ipv4() { 20 } else { 40 };
        let mut f = vec![0u8; 14 + ip_len + l4_len];
        let ethertype = if src.is_ipv4() { ethernet::ETHERTYPE_IPV4 } else { ethernet::ETHERTYPE_IPV6 };
        EthernetHeader { dst: [2; 6], src: [4; 6], ethertype }.emit(&mut f);
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut h = Ipv4Header::new(s, d, proto, l4_len);
                h.ident = 0xfffe;
                h.emit(&mut f[14..]);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6Header::new(s, d, proto, l4_len).emit(&mut f[14..]),
            _ => unreachable!(),
        }
        (f, 14 + ip_len)
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn finished(frame: &[u8], hdr: &VnetHdr) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        finish(frame, hdr, &mut Vec::new(), |f| out.push(f.to_vec())).unwrap();
        out
    }

    /// A whole frame's IP source, destination, IPv4 identification (0 for IPv6, checked
    /// header checksum) and transport bytes.
    fn ip_parts(f: &[u8]) -> (IpAddr, IpAddr, u16, &[u8]) {
        let (eth, l3) = EthernetHeader::parse(f).unwrap();
        if eth.ethertype == ethernet::ETHERTYPE_IPV4 {
            let (ip, l4) = Ipv4Header::parse(l3).expect("a valid IPv4 header and checksum");
            (IpAddr::V4(ip.src), IpAddr::V4(ip.dst), ip.ident, l4)
        } else {
            let (ip, l4) = Ipv6Header::parse(l3).unwrap();
            (IpAddr::V6(ip.src), IpAddr::V6(ip.dst), 0, l4)
        }
    }

    /// Checks a whole TCP frame (IP header checksum, TCP checksum) and returns its IP
    /// header's identification (0 for IPv6), TCP header and payload.
    fn check_whole(f: &[u8]) -> (u16, TcpHeader, Vec<u8>) {
        let (src, dst, ident, l4) = ip_parts(f);
        let sum = checksum::finish(checksum::add(checksum::pseudo(src, dst, PROTO_TCP, l4.len()), l4));
        assert_eq!(sum, 0, "TCP checksum");
        let (h, data) = TcpHeader::parse(l4).unwrap();
        (ident, h, data.to_vec())
    }

    #[test]
    fn a_gso_frame_is_cut_into_whole_segments_that_carry_its_bytes() {
        let v4 = (IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let v6 = (IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 2]), IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 3]));
        for ((src, dst), gso_type) in [(v4, GSO_TCPV4), (v6, GSO_TCPV6), (v4, GSO_TCPV4 | GSO_ECN)] {
            let data = payload(10_000);
            let flags = tcp::ACK | tcp::PSH | tcp::FIN | TCP_CWR;
            let frame = tcp_frame(src, dst, flags, &data);
            let hdr =
                VnetHdr { flags: F_NEEDS_CSUM, gso_type, hdr_len: 0, gso_size: 1448, csum_start: 0, csum_offset: 0 };
            let segs = finished(&frame, &hdr);
            assert_eq!(segs.len(), 7, "10,000 bytes in segments of 1448");
            let mut got = Vec::new();
            for (i, seg) in segs.iter().enumerate() {
                let (ident, h, data) = check_whole(seg);
                assert_eq!(data.len(), if i < 6 { 1448 } else { 10_000 - 6 * 1448 });
                assert_eq!(h.seq, 0xffff_fff0u32.wrapping_add((i * 1448) as u32), "sequence numbers run on");
                assert_eq!(h.ack, 7);
                let last = i == 6;
                assert_eq!(h.has(tcp::FIN), last, "FIN on the last only");
                assert_eq!(h.has(tcp::PSH), last, "PSH on the last only");
                assert_eq!(h.flags & TCP_CWR != 0, i == 0, "CWR on the first only");
                assert!(h.has(tcp::ACK));
                if src.is_ipv4() {
                    assert_eq!(ident, 0xfffeu16.wrapping_add(i as u16), "IPv4 identification counted up");
                }
                got.extend_from_slice(&data);
            }
            assert_eq!(got, data);
        }
    }

    /// `frame` (IPv6, TCP) with extension headers `exts` (type, length in 8-byte units
    /// beyond the first) put between its IPv6 header and TCP.
    fn with_v6_exts(frame: &[u8], exts: &[(u8, u8)]) -> Vec<u8> {
        let ip = 14;
        let mut f = frame[..ip + 40].to_vec();
        let mut added = 0;
        for (i, &(_, units)) in exts.iter().enumerate() {
            let mut e = vec![0u8; (usize::from(units) + 1) * 8];
            e[0] = exts.get(i + 1).map_or(PROTO_TCP, |n| n.0);
            e[1] = units;
            added += e.len();
            f.extend_from_slice(&e);
        }
        f[ip + 6] = exts[0].0;
        put16(&mut f, ip + 4, be16(frame, ip + 4) + added as u16);
        f.extend_from_slice(&frame[ip + 40..]);
        f
    }

    #[test]
    fn a_tcpv6_gso_frame_keeps_its_option_headers_in_every_segment() {
        use crate::ipv6::{EXT_DEST_OPTIONS, EXT_HOP_BY_HOP};
        let (src, dst) = (IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 2]), IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 3]));
        let data = payload(5000);
        let plain = tcp_frame(src, dst, tcp::ACK | tcp::PSH, &data);
        let exts = [(EXT_HOP_BY_HOP, 0), (EXT_DEST_OPTIONS, 2)];
        let frame = with_v6_exts(&plain, &exts);
        let hdr = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV6, gso_size: 1400, ..Default::default() };
        let segs = finished(&frame, &hdr);
        assert_eq!(segs.len(), 4, "5,000 bytes in segments of 1400");
        let mut got = Vec::new();
        for (i, seg) in segs.iter().enumerate() {
            let (ip, _) = Ipv6Header::parse(&seg[14..]).expect("a valid IPv6 packet");
            assert_eq!((ip.ext_len, ip.protocol), (8 + 24, PROTO_TCP), "both option headers kept");
            assert_eq!(&seg[14 + 40..14 + 72], &frame[14 + 40..14 + 72], "option headers as they were");
            let (_, h, part) = check_whole(seg);
            assert_eq!(h.seq, 0xffff_fff0u32.wrapping_add((i * 1400) as u32));
            got.extend_from_slice(&part);
        }
        assert_eq!(got, data);
    }

    #[test]
    fn a_frame_within_one_segment_gets_its_checksum_and_nothing_else() {
        let (src, dst) = (IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let frame = tcp_frame(src, dst, tcp::ACK | tcp::PSH, &payload(1000));
        for gso_type in [GSO_TCPV4, GSO_NONE] {
            let hdr =
                VnetHdr { flags: F_NEEDS_CSUM, gso_type, hdr_len: 54, gso_size: 1448, csum_start: 34, csum_offset: 16 };
            let segs = finished(&frame, &hdr);
            assert_eq!(segs.len(), 1);
            let (_, h, data) = check_whole(&segs[0]);
            assert_eq!(data, payload(1000));
            assert!(h.has(tcp::PSH));
            let mut expect = frame.clone();
            expect[34 + 16..34 + 18].copy_from_slice(&segs[0][34 + 16..34 + 18]);
            assert_eq!(segs[0], expect, "only the checksum changed");
        }
        // Nothing to do: the frame goes as it is.
        assert_eq!(finished(&frame, &VnetHdr::default()), vec![frame.clone()]);
        // A bare ACK of a GSO type: one segment.
        let ack = tcp_frame(src, dst, tcp::ACK, &[]);
        let hdr = VnetHdr { gso_type: GSO_TCPV4, gso_size: 1448, ..Default::default() };
        assert_eq!(finished(&ack, &hdr).len(), 1);
        check_whole(&finished(&ack, &hdr)[0]);
    }

    #[test]
    fn a_partial_udp_checksum_is_completed_and_never_zero() {
        let (src, dst) = (IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        for len in [0usize, 1, 17, 1400] {
            let mut f = vec![0u8; 14 + 20 + 8 + len];
            EthernetHeader { dst: [2; 6], src: [4; 6], ethertype: ethernet::ETHERTYPE_IPV4 }.emit(&mut f);
            let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) else { unreachable!() };
            Ipv4Header::new(s, d, crate::PROTO_UDP, 8 + len).emit(&mut f[14..]);
            f[42..].copy_from_slice(&payload(len));
            crate::udp::UdpHeader { src_port: 5353, dst_port: 53 }.emit(&mut f[34..], len, src, dst);
            let whole = f.clone();
            // The partial form: the pseudo-header's folded sum in the field.
            let mut acc = checksum::pseudo(src, dst, crate::PROTO_UDP, 8 + len);
            while acc >> 16 != 0 {
                acc = (acc & 0xffff) + (acc >> 16);
            }
            put16(&mut f, 34 + 6, acc as u16);
            let hdr = VnetHdr { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 6, ..Default::default() };
            assert_eq!(finished(&f, &hdr), vec![whole]);
        }
    }

    /// A USO frame as a guest's kernel hands it over: `payload` after one UDP header whose
    /// length is the whole datagram's and whose checksum holds the pseudo-header's sum.
    fn uso_frame(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
        let (mut f, at) = ip_frame(src, dst, PROTO_UDP, 8 + payload.len());
        f[at + 8..].copy_from_slice(payload);
        crate::udp::UdpHeader { src_port: 40000, dst_port: 443 }.emit_partial(&mut f[at..], payload.len(), src, dst);
        f
    }

    /// Checks a whole UDP frame (IP header checksum, UDP length and checksum) and returns
    /// its IPv4 identification (0 for IPv6) and payload.
    fn check_datagram(f: &[u8]) -> (u16, Vec<u8>) {
        let (src, dst, ident, l4) = ip_parts(f);
        assert_eq!(usize::from(be16(l4, 4)), l4.len(), "UDP length");
        assert_ne!(be16(l4, 6), 0, "a checksum, not none");
        let sum = checksum::finish(checksum::add(checksum::pseudo(src, dst, PROTO_UDP, l4.len()), l4));
        assert_eq!(sum, 0, "UDP checksum");
        let (h, data) = crate::udp::UdpHeader::parse(l4).unwrap();
        assert_eq!((h.src_port, h.dst_port), (40000, 443));
        (ident, data.to_vec())
    }

    #[test]
    fn a_uso_frame_is_cut_into_whole_datagrams_of_its_size() {
        let v4 = (IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let v6 = (IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 2]), IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 3]));
        for (src, dst) in [v4, v6] {
            for (len, size, count) in [(14_000, 1400, 10), (14_001, 1400, 11), (65_000, 1200, 55), (3, 1, 3)] {
                let data = payload(len);
                let frame = uso_frame(src, dst, &data);
                let hdr = VnetHdr {
                    flags: F_NEEDS_CSUM,
                    gso_type: GSO_UDP_L4,
                    hdr_len: 0,
                    gso_size: size,
                    csum_start: 0,
                    csum_offset: 6,
                };
                let datagrams = finished(&frame, &hdr);
                assert_eq!(datagrams.len(), count, "{len} bytes in datagrams of {size}");
                let mut got = Vec::new();
                for (i, d) in datagrams.iter().enumerate() {
                    let (ident, part) = check_datagram(d);
                    assert_eq!(part.len(), usize::from(size).min(len - i * usize::from(size)));
                    if src.is_ipv4() {
                        assert_eq!(ident, 0xfffeu16.wrapping_add(i as u16), "IPv4 identification counted up");
                    }
                    got.extend_from_slice(&part);
                }
                assert_eq!(got, data);
            }
        }
        // IPv6 option headers stay in every datagram; a Routing header is refused.
        use crate::ipv6::{EXT_DEST_OPTIONS, EXT_ROUTING};
        let (src, dst) = v6;
        let mut plain = uso_frame(src, dst, &payload(3000));
        let hdr = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_UDP_L4, gso_size: 1000, ..Default::default() };
        let mut with_options = plain[..14 + 40].to_vec();
        with_options.extend_from_slice(&[PROTO_UDP, 0, 0, 0, 0, 0, 0, 0]);
        with_options.extend_from_slice(&plain[14 + 40..]);
        with_options[14 + 6] = EXT_DEST_OPTIONS;
        put16(&mut with_options, 14 + 4, be16(&plain, 14 + 4) + 8);
        let datagrams = finished(&with_options, &hdr);
        assert_eq!(datagrams.len(), 3);
        for d in &datagrams {
            let (ip, _) = Ipv6Header::parse(&d[14..]).expect("a valid IPv6 packet");
            assert_eq!((ip.ext_len, ip.protocol), (8, PROTO_UDP));
            check_datagram(d);
        }
        with_options[14 + 6] = EXT_ROUTING;
        assert!(finish(&with_options, &hdr, &mut Vec::new(), |_| panic!("nothing out")).is_err());
        // A TCP packet under a USO header, and a USO frame cut short, are refused.
        plain[14 + 6] = PROTO_TCP;
        assert!(finish(&plain, &hdr, &mut Vec::new(), |_| panic!("nothing out")).is_err());
        let short = uso_frame(v4.0, v4.1, &payload(3000));
        assert!(finish(&short[..short.len() - 1], &hdr, &mut Vec::new(), |_| panic!("nothing out")).is_err());
        assert!(finish(&short, &VnetHdr { gso_size: 0, ..hdr }, &mut Vec::new(), |_| panic!("nothing out")).is_err());
    }

    #[test]
    fn frames_that_cannot_be_finished_give_nothing() {
        let (src, dst) = (IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 0, 3]));
        let frame = tcp_frame(src, dst, tcp::ACK, &payload(3000));
        let gso = VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, gso_size: 1448, ..Default::default() };
        #[track_caller]
        fn refused(frame: &[u8], hdr: VnetHdr) {
            let mut n = 0;
            let r = finish(frame, &hdr, &mut Vec::new(), |_| n += 1);
            assert!(r.is_err(), "{hdr:?}");
            assert_eq!(n, 0);
        }
        refused(&frame, VnetHdr { gso_size: 0, ..gso });
        refused(&frame, VnetHdr { gso_type: GSO_TCPV6, ..gso });
        refused(&frame, VnetHdr { gso_type: GSO_UDP, ..gso });
        refused(&frame, VnetHdr { gso_type: 9, ..gso });
        refused(&frame[..frame.len() - 1], gso);
        refused(&frame[..40], gso);
        refused(&frame, VnetHdr { flags: F_NEEDS_CSUM, csum_start: 3000, csum_offset: 100, ..Default::default() });
        let mut udp = frame.clone();
        udp[14 + 9] = crate::PROTO_UDP;
        refused(&udp, gso);
        let mut fragment = frame.clone();
        fragment[14 + 6] = 0x20;
        refused(&fragment, gso);
        // IPv6: a Routing header (its checksum is over the final destination), a
        // Fragment header, a Hop-by-Hop header not first, option headers past the end.
        use crate::ipv6::{EXT_DEST_OPTIONS, EXT_FRAGMENT, EXT_HOP_BY_HOP, EXT_ROUTING};
        let (src6, dst6) = (IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 2]), IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 3]));
        let v6 = tcp_frame(src6, dst6, tcp::ACK, &payload(3000));
        let gso6 = VnetHdr { gso_type: GSO_TCPV6, ..gso };
        refused(&with_v6_exts(&v6, &[(EXT_ROUTING, 2)]), gso6);
        refused(&with_v6_exts(&v6, &[(EXT_DEST_OPTIONS, 0), (EXT_ROUTING, 2)]), gso6);
        refused(&with_v6_exts(&v6, &[(EXT_FRAGMENT, 0)]), gso6);
        refused(&with_v6_exts(&v6, &[(EXT_DEST_OPTIONS, 0), (EXT_HOP_BY_HOP, 0)]), gso6);
        refused(&with_v6_exts(&v6, &[(EXT_DEST_OPTIONS, 0); 9]), gso6);
        // 2,048 bytes of options in a packet of 1,036.
        let mut past_end = with_v6_exts(&tcp_frame(src6, dst6, tcp::ACK, &payload(1000)), &[(EXT_DEST_OPTIONS, 0)]);
        past_end[14 + 41] = 255;
        refused(&past_end, gso6);
        let short = with_v6_exts(&v6, &[(EXT_DEST_OPTIONS, 0)]);
        refused(&short[..14 + 41], gso6);
        let mut options_past_end = frame.clone();
        options_past_end[14] = 0x4f;
        put16(&mut options_past_end, 16, 60);
        refused(&options_past_end, gso);
    }

    #[test]
    fn roundtrip() {
        let h = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1460,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut b = [0u8; LEN];
        h.emit(&mut b);
        assert_eq!(b, [1, 1, 54, 0, 0xb4, 0x05, 34, 0, 16, 0]);
        assert_eq!(VnetHdr::parse(&b), Some(h));
        assert_eq!(VnetHdr::parse(&b[..9]), None);
    }
}
