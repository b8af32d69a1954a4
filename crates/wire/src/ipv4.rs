//! IPv4 headers (RFC 791).

use std::net::Ipv4Addr;

use super::checksum;
use super::{be16, put16};

pub const HEADER_LEN: usize = 20;
pub const DEFAULT_TTL: u8 = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: u8,
    pub ttl: u8,
    pub ident: u16,
    pub dont_frag: bool,
    /// The more-fragments flag: a fragment that is not its datagram's last.
    pub more_fragments: bool,
    /// Where this fragment's payload sits in its datagram's, in bytes (a multiple of 8).
    pub frag_offset: usize,
    /// Length of the header with options, in bytes.
    pub header_len: usize,
    /// Length of the payload, from the total-length field.
    pub payload_len: usize,
}

impl Ipv4Header {
    /// Parses and validates a header (version, lengths, header checksum). Returns the
    /// header and exactly its payload (padding after total length is cut off).
    pub fn parse(b: &[u8]) -> Option<(Ipv4Header, &[u8])> {
        if b.len() < HEADER_LEN || b[0] >> 4 != 4 {
            return None;
        }
        let header_len = ((b[0] & 0x0f) as usize) * 4;
        let total = be16(b, 2) as usize;
        if header_len < HEADER_LEN || total < header_len || total > b.len() {
            return None;
        }
        if checksum::checksum(&b[..header_len]) != 0 {
            return None;
        }
        let flags_frag = be16(b, 6);
        let h = Ipv4Header {
            src: Ipv4Addr::new(b[12], b[13], b[14], b[15]),
            dst: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
            protocol: b[9],
            ttl: b[8],
            ident: be16(b, 4),
            dont_frag: flags_frag & 0x4000 != 0,
            more_fragments: flags_frag & 0x2000 != 0,
            frag_offset: (flags_frag & 0x1fff) as usize * 8,
            header_len,
            payload_len: total - header_len,
        };
        Some((h, &b[header_len..total]))
    }

    /// A header without options for `payload_len` bytes of `protocol`.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize) -> Ipv4Header {
        Ipv4Header {
            src,
            dst,
            protocol,
            ttl: DEFAULT_TTL,
            ident: 0,
            dont_frag: true,
            more_fragments: false,
            frag_offset: 0,
            header_len: HEADER_LEN,
            payload_len,
        }
    }

    /// True for any fragment: more-fragments set or a non-zero offset.
    pub fn is_fragment(&self) -> bool {
        self.more_fragments || self.frag_offset != 0
    }

    /// Writes a 20-byte header (options are never emitted) with its checksum. The fragment
    /// offset is written in its 8-byte units (the bits below are dropped).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0] = 0x45;
        buf[1] = 0;
        put16(buf, 2, (HEADER_LEN + self.payload_len) as u16);
        put16(buf, 4, self.ident);
        let flags = if self.dont_frag { 0x4000 } else { 0 } | if self.more_fragments { 0x2000 } else { 0 };
        put16(buf, 6, flags | ((self.frag_offset / 8) as u16 & 0x1fff));
        buf[8] = self.ttl;
        buf[9] = self.protocol;
        put16(buf, 10, 0);
        buf[12..16].copy_from_slice(&self.src.octets());
        buf[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum::checksum(&buf[..HEADER_LEN]);
        put16(buf, 10, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_against_etherparse() {
        let mut h = Ipv4Header::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 6, 5);
        h.ident = 77;
        let mut b = [0u8; 25];
        h.emit(&mut b);
        let (p, payload) = Ipv4Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(payload.len(), 5);
        let e = etherparse::Ipv4HeaderSlice::from_slice(&b).unwrap();
        assert_eq!(e.to_header().calc_header_checksum(), e.header_checksum());
        assert_eq!(e.identification(), 77);
        assert!(e.dont_fragment());
    }

    #[test]
    fn fragment_fields_roundtrip_against_etherparse() {
        let mut h = Ipv4Header::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 17, 8);
        assert!(!h.is_fragment());
        for (offset, more) in [(0, true), (1480, true), (2960, false), (65528, false)] {
            h.ident = 0x1234;
            h.dont_frag = false;
            h.more_fragments = more;
            h.frag_offset = offset;
            let mut b = [0u8; 28];
            h.emit(&mut b);
            let (p, _) = Ipv4Header::parse(&b).unwrap();
            assert_eq!(p, h);
            assert!(p.is_fragment());
            let e = etherparse::Ipv4HeaderSlice::from_slice(&b).unwrap();
            assert_eq!(e.more_fragments(), more);
            assert_eq!(e.fragments_offset().byte_offset() as usize, offset);
            assert!(!e.dont_fragment());
        }
    }

    #[test]
    fn rejects_bad_input() {
        let h = Ipv4Header::new(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 6, 5);
        let mut b = [0u8; 25];
        h.emit(&mut b);
        for n in 0..25 {
            assert!(Ipv4Header::parse(&b[..n]).is_none(), "truncated to {n}");
        }
        let mut bad = b;
        bad[8] ^= 1; // checksum no longer matches
        assert!(Ipv4Header::parse(&bad).is_none());
        let mut ihl = b;
        ihl[0] = 0x44;
        assert!(Ipv4Header::parse(&ihl).is_none());
    }
}
