//! UDP headers (RFC 768).

use std::net::IpAddr;

use super::checksum;
use super::{PROTO_UDP, be16, put16};

pub const HEADER_LEN: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UdpHeader {
    pub src_port: u16,
    pub dst_port: u16,
}

impl UdpHeader {
    /// Parses a datagram (the IPv4 payload); returns the header and exactly its payload.
    /// Checksums are not verified: the link is a kernel or a local socket, not a wire.
    pub fn parse(b: &[u8]) -> Option<(UdpHeader, &[u8])> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let len = be16(b, 4) as usize;
        if len < HEADER_LEN || len > b.len() {
            return None;
        }
        Some((UdpHeader { src_port: be16(b, 0), dst_port: be16(b, 2) }, &b[HEADER_LEN..len]))
    }

    /// Writes the header in front of a payload already at `buf[8..8 + payload_len]`,
    /// with the checksum over the IPv4 pseudo-header.
    pub fn emit(&self, buf: &mut [u8], payload_len: usize, src: IpAddr, dst: IpAddr) {
        let len = HEADER_LEN + payload_len;
        put16(buf, 0, self.src_port);
        put16(buf, 2, self.dst_port);
        put16(buf, 4, len as u16);
        put16(buf, 6, 0);
        let acc = checksum::add(checksum::pseudo(src, dst, PROTO_UDP, len), &buf[..len]);
        let c = checksum::finish(acc);
        put16(buf, 6, if c == 0 { 0xffff } else { c });
    }

    /// Writes the header for a checksum the receiver completes (an offloaded frame, F_NEEDS_CSUM):
    /// the pseudo-header's folded sum in the checksum field, as Linux's UDP leaves it. For a
    /// segmented (USO) frame, `payload_len` is the whole payload: each datagram's length and
    /// checksum are adjusted from these when it is cut.
    pub fn emit_partial(&self, buf: &mut [u8], payload_len: usize, src: IpAddr, dst: IpAddr) {
        let len = HEADER_LEN + payload_len;
        put16(buf, 0, self.src_port);
        put16(buf, 2, self.dst_port);
        put16(buf, 4, len as u16);
        let mut acc = checksum::pseudo(src, dst, PROTO_UDP, len);
        while acc >> 16 != 0 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
        put16(buf, 6, acc as u16);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn roundtrip_against_etherparse() {
        let src = Ipv4Addr::new(192, 168, 65, 1);
        let dst = Ipv4Addr::new(192, 168, 65, 2);
        let mut b = vec![0u8; 8 + 3];
        b[8..].copy_from_slice(b"abc");
        UdpHeader { src_port: 53, dst_port: 4000 }.emit(&mut b, 3, src.into(), dst.into());
        let (h, p) = UdpHeader::parse(&b).unwrap();
        assert_eq!(h, UdpHeader { src_port: 53, dst_port: 4000 });
        assert_eq!(p, b"abc");
        let e = etherparse::UdpHeaderSlice::from_slice(&b).unwrap().to_header();
        assert_eq!(e.calc_checksum_ipv4_raw(src.octets(), dst.octets(), b"abc").unwrap(), e.checksum);
        for n in 0..b.len() {
            assert!(UdpHeader::parse(&b[..n]).is_none());
        }
    }

    #[test]
    fn ipv6_checksum_against_etherparse() {
        let src: Ipv6Addr = "fd5e:6e65:7400::1".parse().unwrap();
        let dst: Ipv6Addr = "fd5e:6e65:7400::2".parse().unwrap();
        let mut b = vec![0u8; 8 + 3];
        b[8..].copy_from_slice(b"abc");
        UdpHeader { src_port: 53, dst_port: 4000 }.emit(&mut b, 3, src.into(), dst.into());
        let e = etherparse::UdpHeaderSlice::from_slice(&b).unwrap().to_header();
        assert_eq!(e.calc_checksum_ipv6_raw(src.octets(), dst.octets(), b"abc").unwrap(), e.checksum);
    }
}
