//! TCP headers (RFC 9293) with the options usernet uses: MSS, window scale, SACK-permitted
//! and SACK blocks (RFC 2018), timestamps (RFC 7323).

use std::net::IpAddr;

use super::checksum;
use super::{PROTO_TCP, be16, be32, put16, put32};

pub const HEADER_LEN: usize = 20;
/// The largest header usernet emits: 20 bytes and 40 of options (an ACK with four SACK
/// blocks takes 36 of them: two NOPs, the option's kind and length, 32 bytes of edges; one
/// with timestamps and three blocks, 40; a SYN takes 24: MSS, window scale, SACK-permitted
/// and timestamps, each padded to a multiple of 4).
pub const MAX_EMIT_LEN: usize = HEADER_LEN + 40;
/// The most SACK blocks an option carries when no timestamps take room (RFC 2018 section 3).
pub const MAX_SACK_BLOCKS: usize = 4;
/// The most SACK blocks beside timestamps (RFC 2018 section 3).
pub const MAX_SACK_BLOCKS_WITH_TIMESTAMPS: usize = 3;
/// What the timestamps option takes of a header, with its two NOPs of padding (RFC 7323
/// appendix A's layout, which Linux's fast path expects).
pub const TIMESTAMPS_LEN: usize = 12;

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const PSH: u8 = 0x08;
pub const ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TcpHeader {
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    /// The raw window field (not yet scaled).
    pub window: u16,
    pub mss: Option<u16>,
    pub window_scale: Option<u8>,
    pub sack_permitted: bool,
    /// The SACK option's blocks (RFC 2018): data held beyond the ACK.
    pub sack: SackBlocks,
    /// The timestamps option (RFC 7323): the sender's clock (TSval) and the timestamp it
    /// echoes (TSecr).
    pub timestamps: Option<(u32, u32)>,
}

/// Up to [`MAX_SACK_BLOCKS`] SACK blocks, each the sequence numbers of its first byte and of
/// the byte after its last.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SackBlocks {
    len: u8,
    blocks: [(u32, u32); MAX_SACK_BLOCKS],
}

impl SackBlocks {
    /// Adds a block; false (and nothing added) when all four are taken.
    pub fn push(&mut self, left: u32, right: u32) -> bool {
        let Some(slot) = self.blocks.get_mut(self.len as usize) else { return false };
        *slot = (left, right);
        self.len += 1;
        true
    }

    pub fn as_slice(&self) -> &[(u32, u32)] {
        &self.blocks[..self.len as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The option's length with its two NOPs of padding; 0 without blocks.
    fn emit_len(&self) -> usize {
        if self.is_empty() { 0 } else { 4 + 8 * self.len as usize }
    }
}

impl TcpHeader {
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Parses a segment (the IPv4 payload); returns the header and the payload.
    /// Checksums are not verified: the link is a kernel or a local socket, not a wire.
    /// Malformed options are ignored, as a TCP stack does.
    pub fn parse(b: &[u8]) -> Option<(TcpHeader, &[u8])> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let data_off = ((b[12] >> 4) as usize) * 4;
        if data_off < HEADER_LEN || data_off > b.len() {
            return None;
        }
        let mut h = TcpHeader {
            src_port: be16(b, 0),
            dst_port: be16(b, 2),
            seq: be32(b, 4),
            ack: be32(b, 8),
            flags: b[13],
            window: be16(b, 14),
            ..Default::default()
        };
        let mut opts = &b[HEADER_LEN..data_off];
        while let Some(&kind) = opts.first() {
            match kind {
                0 => break,
                1 => opts = &opts[1..],
                _ => {
                    let Some(&len) = opts.get(1) else { break };
                    let len = len as usize;
                    if len < 2 || len > opts.len() {
                        break;
                    }
                    match (kind, len) {
                        (2, 4) => h.mss = Some(be16(opts, 2)),
                        (3, 3) => h.window_scale = Some(opts[2].min(14)),
                        (4, 2) => h.sack_permitted = true,
                        (8, 10) => h.timestamps = Some((be32(opts, 2), be32(opts, 6))),
                        (5, _) if (len - 2).is_multiple_of(8) => {
                            h.sack = SackBlocks::default();
                            for block in opts[2..len].chunks_exact(8) {
                                h.sack.push(be32(block, 0), be32(block, 4));
                            }
                        }
                        _ => {}
                    }
                    opts = &opts[len..];
                }
            }
        }
        Some((h, &b[data_off..]))
    }

    /// Length of the header `emit` writes.
    pub fn emit_len(&self) -> usize {
        HEADER_LEN
            + if self.mss.is_some() { 4 } else { 0 }
            + if self.window_scale.is_some() { 4 } else { 0 }
            + if self.sack_permitted { 4 } else { 0 }
            + if self.timestamps.is_some() { TIMESTAMPS_LEN } else { 0 }
            + self.sack.emit_len()
    }

    /// Writes the header in front of a payload already at `buf[emit_len()..][..payload_len]`
    /// and computes the checksum over the pseudo-header, header and payload.
    pub fn emit(&self, buf: &mut [u8], payload_len: usize, src: IpAddr, dst: IpAddr) {
        let hl = self.emit_len();
        put16(buf, 0, self.src_port);
        put16(buf, 2, self.dst_port);
        put32(buf, 4, self.seq);
        put32(buf, 8, self.ack);
        buf[12] = ((hl / 4) as u8) << 4;
        buf[13] = self.flags;
        put16(buf, 14, self.window);
        put16(buf, 16, 0);
        put16(buf, 18, 0);
        let mut at = HEADER_LEN;
        if let Some(mss) = self.mss {
            buf[at] = 2;
            buf[at + 1] = 4;
            put16(buf, at + 2, mss);
            at += 4;
        }
        if let Some(ws) = self.window_scale {
            buf[at] = 1;
            buf[at + 1] = 3;
            buf[at + 2] = 3;
            buf[at + 3] = ws;
            at += 4;
        }
        if self.sack_permitted {
            buf[at..at + 4].copy_from_slice(&[1, 1, 4, 2]);
            at += 4;
        }
        if let Some((val, ecr)) = self.timestamps {
            buf[at..at + 4].copy_from_slice(&[1, 1, 8, 10]);
            put32(buf, at + 4, val);
            put32(buf, at + 8, ecr);
            at += TIMESTAMPS_LEN;
        }
        if !self.sack.is_empty() {
            let blocks = self.sack.as_slice();
            buf[at..at + 4].copy_from_slice(&[1, 1, 5, 2 + 8 * blocks.len() as u8]);
            at += 4;
            for &(left, right) in blocks {
                put32(buf, at, left);
                put32(buf, at + 4, right);
                at += 8;
            }
        }
        debug_assert_eq!(at, hl);
        let len = hl + payload_len;
        let acc = checksum::add(checksum::pseudo(src, dst, PROTO_TCP, len), &buf[..len]);
        put16(buf, 16, checksum::finish(acc));
    }
}

impl TcpHeader {
    /// Like `emit`, but leaves the checksum for the receiving kernel to complete or trust
    /// (virtio-net NEEDS_CSUM): the field holds only the folded pseudo-header sum.
    pub fn emit_partial(&self, buf: &mut [u8], payload_len: usize, src: IpAddr, dst: IpAddr) {
        let hl = self.emit_len();
        self.emit(&mut buf[..hl], 0, src, dst);
        let mut acc = checksum::pseudo(src, dst, PROTO_TCP, hl + payload_len);
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        put16(buf, 16, acc as u16);
    }
}

/// `a < b` in sequence space (RFC 1982 serial arithmetic).
#[inline]
pub fn seq_lt(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

#[inline]
pub fn seq_le(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) <= 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn roundtrip_against_etherparse() {
        let src = Ipv4Addr::new(192, 168, 65, 2);
        let dst = Ipv4Addr::new(127, 0, 0, 1);
        let h = TcpHeader {
            src_port: 40000,
            dst_port: 80,
            seq: 0xfffffff0,
            ack: 12,
            flags: SYN | ACK,
            window: 65535,
            mss: Some(1460),
            window_scale: Some(7),
            sack_permitted: true,
            sack: SackBlocks::default(),
            timestamps: Some((0x8000_0001, 7)),
        };
        let hl = h.emit_len();
        let mut b = vec![0u8; hl + 5];
        b[hl..].copy_from_slice(b"hello");
        h.emit(&mut b, 5, src.into(), dst.into());
        let (p, payload) = TcpHeader::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(payload, b"hello");
        let e = etherparse::TcpHeaderSlice::from_slice(&b).unwrap().to_header();
        assert_eq!(e.calc_checksum_ipv4_raw(src.octets(), dst.octets(), b"hello").unwrap(), e.checksum);
        assert!(e.syn && e.ack);
        for n in 0..HEADER_LEN {
            assert!(TcpHeader::parse(&b[..n]).is_none());
        }
    }

    #[test]
    fn ipv6_checksum_against_etherparse() {
        let src: Ipv6Addr = "fd5e:6e65:7400::2".parse().unwrap();
        let dst: Ipv6Addr = "2001:db8::80".parse().unwrap();
        let h =
            TcpHeader { src_port: 40000, dst_port: 443, seq: 7, ack: 9, flags: ACK, window: 512, ..Default::default() };
        let mut b = vec![0u8; HEADER_LEN + 4];
        b[HEADER_LEN..].copy_from_slice(b"data");
        h.emit(&mut b, 4, src.into(), dst.into());
        let e = etherparse::TcpHeaderSlice::from_slice(&b).unwrap().to_header();
        assert_eq!(e.calc_checksum_ipv6_raw(src.octets(), dst.octets(), b"data").unwrap(), e.checksum);
    }

    #[test]
    fn options_from_linux_syn() {
        // MSS 65480, SACK-permitted, timestamps, NOP, window scale 7: a Linux SYN's options.
        let mut b = vec![0u8; 40];
        b[12] = 10 << 4;
        b[13] = SYN;
        b[20..40].copy_from_slice(&[2, 4, 0xff, 0xc8, 4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7]);
        let (h, payload) = TcpHeader::parse(&b).unwrap();
        assert_eq!(h.mss, Some(65480));
        assert_eq!(h.window_scale, Some(7));
        assert!(h.sack_permitted);
        assert_eq!(h.timestamps, Some((1, 0)));
        assert!(payload.is_empty());
        // A timestamps option of the wrong length is ignored, and what follows it still read.
        b[20..40].copy_from_slice(&[2, 4, 0xff, 0xc8, 4, 2, 8, 9, 0, 0, 0, 1, 0, 0, 0, 1, 1, 3, 3, 7]);
        let (h, _) = TcpHeader::parse(&b).unwrap();
        assert_eq!(h.timestamps, None);
        assert_eq!((h.mss, h.window_scale), (Some(65480), Some(7)));
        // A bad option length stops option parsing without failing the segment.
        b[21] = 0;
        assert!(TcpHeader::parse(&b).is_some());
    }

    #[test]
    fn sack_blocks_round_trip() {
        let src = Ipv4Addr::new(192, 168, 65, 254);
        let dst = Ipv4Addr::new(192, 168, 65, 2);
        for n in 1..=MAX_SACK_BLOCKS {
            let mut h = TcpHeader { src_port: 80, dst_port: 40000, seq: 1, ack: 2, flags: ACK, ..Default::default() };
            for i in 0..n as u32 {
                assert!(h.sack.push(0xffff_0000 + 1000 * i, 0xffff_0000 + 1000 * i + 500));
            }
            assert!(n < MAX_SACK_BLOCKS || !h.sack.push(1, 2), "a fifth block is refused");
            assert_eq!(h.emit_len(), HEADER_LEN + 4 + 8 * n);
            assert!(h.emit_len() <= MAX_EMIT_LEN);
            let mut b = vec![0u8; h.emit_len()];
            h.emit(&mut b, 0, src.into(), dst.into());
            let (p, payload) = TcpHeader::parse(&b).unwrap();
            assert_eq!(p, h);
            assert!(payload.is_empty());
            let e = etherparse::TcpHeaderSlice::from_slice(&b).unwrap().to_header();
            assert_eq!(e.calc_checksum_ipv4_raw(src.octets(), dst.octets(), &[]).unwrap(), e.checksum);
        }
    }

    #[test]
    fn timestamps_beside_three_sack_blocks_fill_the_largest_header() {
        let src = Ipv4Addr::new(192, 168, 65, 254);
        let dst = Ipv4Addr::new(192, 168, 65, 2);
        let mut h = TcpHeader { src_port: 80, dst_port: 40000, seq: 1, ack: 2, flags: ACK, ..Default::default() };
        h.timestamps = Some((u32::MAX, 0x0102_0304));
        for i in 0..MAX_SACK_BLOCKS_WITH_TIMESTAMPS as u32 {
            h.sack.push(100 * i + 10, 100 * i + 50);
        }
        assert_eq!(h.emit_len(), MAX_EMIT_LEN);
        let mut b = vec![0u8; h.emit_len() + 3];
        b[h.emit_len()..].copy_from_slice(b"abc");
        h.emit(&mut b, 3, src.into(), dst.into());
        let (p, payload) = TcpHeader::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(payload, b"abc");
        let e = etherparse::TcpHeaderSlice::from_slice(&b).unwrap().to_header();
        assert_eq!(e.calc_checksum_ipv4_raw(src.octets(), dst.octets(), b"abc").unwrap(), e.checksum);
        assert!(
            e.options_iterator()
                .any(|o| matches!(o, Ok(etherparse::TcpOptionElement::Timestamp(u32::MAX, 0x0102_0304))))
        );
        // Cut anywhere inside its header, the segment is refused.
        for n in 0..h.emit_len() {
            assert!(TcpHeader::parse(&b[..n]).is_none());
        }
    }

    #[test]
    fn malformed_sack_options_are_ignored() {
        // A SACK option whose length is not 2 plus a multiple of 8, one that runs past the
        // header, and one with no block: none gives a block, and the segment still parses.
        for opts in [
            &[5u8, 7, 0, 0, 0, 1, 0, 1, 1, 1, 1, 1][..],
            &[1, 1, 5, 18, 0, 0, 0, 1, 0, 0, 0, 2][..],
            &[5, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1][..],
        ] {
            let mut b = vec![0u8; HEADER_LEN + opts.len()];
            b[12] = (((HEADER_LEN + opts.len()) / 4) as u8) << 4;
            b[13] = ACK;
            b[HEADER_LEN..].copy_from_slice(opts);
            let (h, _) = TcpHeader::parse(&b).unwrap();
            assert!(h.sack.is_empty(), "{opts:?}");
        }
    }

    #[test]
    fn sequence_compare_wraps() {
        assert!(seq_lt(0xffff_fff0, 5));
        assert!(!seq_lt(5, 0xffff_fff0));
        assert!(seq_le(5, 5));
    }
}
