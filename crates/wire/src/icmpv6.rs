//! ICMPv6 (RFC 4443): echo, errors, and the header of Neighbor Discovery (see `ndp`).

use std::net::Ipv6Addr;

use super::checksum;
use super::{PROTO_ICMPV6, be16, put16};

pub const HEADER_LEN: usize = 8;

pub const TYPE_DEST_UNREACHABLE: u8 = 1;
pub const TYPE_PACKET_TOO_BIG: u8 = 2;
pub const TYPE_TIME_EXCEEDED: u8 = 3;
pub const TYPE_PARAM_PROBLEM: u8 = 4;
pub const TYPE_ECHO_REQUEST: u8 = 128;
pub const TYPE_ECHO_REPLY: u8 = 129;
/// Neighbor Discovery messages (RFC 4861 section 4).
pub const TYPE_ROUTER_SOLICIT: u8 = 133;
pub const TYPE_ROUTER_ADVERT: u8 = 134;
pub const TYPE_NEIGHBOR_SOLICIT: u8 = 135;
pub const TYPE_NEIGHBOR_ADVERT: u8 = 136;
pub const TYPE_REDIRECT: u8 = 137;

/// Destination unreachable codes (RFC 4443 section 3.1).
pub const CODE_NO_ROUTE: u8 = 0;
/// Communication with destination administratively prohibited: the egress policy.
pub const CODE_ADMIN_PROHIBITED: u8 = 1;
/// Beyond scope of source address: a link-local source, a destination beyond the link.
pub const CODE_BEYOND_SCOPE: u8 = 2;
pub const CODE_ADDRESS_UNREACHABLE: u8 = 3;
pub const CODE_PORT_UNREACHABLE: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Icmpv6Header {
    pub kind: u8,
    pub code: u8,
    /// The four bytes after the checksum: identifier and sequence number for echo, the MTU
    /// for packet too big, the pointer for parameter problem, flags for Neighbor Discovery.
    pub rest: [u8; 4],
}

impl Icmpv6Header {
    /// Parses a message (the whole IPv6 upper-layer payload) and checks its checksum over
    /// the IPv6 pseudo-header (RFC 4443 section 2.3); returns the header and the data after it.
    pub fn parse(b: &[u8], src: Ipv6Addr, dst: Ipv6Addr) -> Option<(Icmpv6Header, &[u8])> {
        if b.len() < HEADER_LEN {
            return None;
        }
        let acc = checksum::add(checksum::pseudo_v6(src, dst, PROTO_ICMPV6, b.len()), b);
        if checksum::finish(acc) != 0 {
            return None;
        }
        Some((Icmpv6Header { kind: b[0], code: b[1], rest: [b[4], b[5], b[6], b[7]] }, &b[HEADER_LEN..]))
    }

    pub fn echo(kind: u8, ident: u16, seq: u16) -> Icmpv6Header {
        let i = ident.to_be_bytes();
        let s = seq.to_be_bytes();
        Icmpv6Header { kind, code: 0, rest: [i[0], i[1], s[0], s[1]] }
    }

    pub fn ident(&self) -> u16 {
        be16(&self.rest, 0)
    }

    pub fn seq(&self) -> u16 {
        be16(&self.rest, 2)
    }

    /// Writes the header in front of data already at `buf[8..8 + data_len]`, with the
    /// checksum over the pseudo-header of `src` and `dst`.
    pub fn emit(&self, buf: &mut [u8], data_len: usize, src: Ipv6Addr, dst: Ipv6Addr) {
        buf[0] = self.kind;
        buf[1] = self.code;
        buf[4..8].copy_from_slice(&self.rest);
        fill_checksum(&mut buf[..HEADER_LEN + data_len], src, dst);
    }
}

/// Computes the checksum of the whole message `msg` (type byte first) over the IPv6
/// pseudo-header and writes it into `msg[2..4]`: for messages built by `ndp`.
pub fn fill_checksum(msg: &mut [u8], src: Ipv6Addr, dst: Ipv6Addr) {
    put16(msg, 2, 0);
    let acc = checksum::add(checksum::pseudo_v6(src, dst, PROTO_ICMPV6, msg.len()), msg);
    put16(msg, 2, checksum::finish(acc));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> (Ipv6Addr, Ipv6Addr) {
        ("fe80::2".parse().unwrap(), "fd5e:6e65:7400::1".parse().unwrap())
    }

    #[test]
    fn echo_roundtrip_against_etherparse() {
        let (src, dst) = addrs();
        let mut b = vec![0u8; 8 + 5];
        b[8..].copy_from_slice(b"ping!");
        let h = Icmpv6Header::echo(TYPE_ECHO_REQUEST, 0x1234, 7);
        h.emit(&mut b, 5, src, dst);
        let (p, data) = Icmpv6Header::parse(&b, src, dst).unwrap();
        assert_eq!(p, h);
        assert_eq!((p.kind, p.ident(), p.seq()), (TYPE_ECHO_REQUEST, 0x1234, 7));
        assert_eq!(data, b"ping!");
        let e = etherparse::Icmpv6Slice::from_slice(&b).unwrap();
        assert!(e.is_checksum_valid(src.octets(), dst.octets()));
        let expected = e.icmp_type().calc_checksum(src.octets(), dst.octets(), e.payload()).unwrap();
        assert_eq!(expected, e.checksum());
        assert_eq!(
            e.icmp_type(),
            etherparse::Icmpv6Type::EchoRequest(etherparse::IcmpEchoHeader { id: 0x1234, seq: 7 })
        );
    }

    #[test]
    fn error_checksum_against_etherparse() {
        let (src, dst) = addrs();
        let mut b = vec![0u8; 8 + 48];
        for (i, x) in b[8..].iter_mut().enumerate() {
            *x = (i * 13) as u8;
        }
        let h = Icmpv6Header { kind: TYPE_DEST_UNREACHABLE, code: CODE_PORT_UNREACHABLE, rest: [0; 4] };
        h.emit(&mut b, 48, src, dst);
        let e = etherparse::Icmpv6Slice::from_slice(&b).unwrap();
        assert!(e.is_checksum_valid(src.octets(), dst.octets()));
        assert_eq!(Icmpv6Header::parse(&b, src, dst).unwrap().0, h);
    }

    #[test]
    fn rejects_bad_input() {
        let (src, dst) = addrs();
        let mut b = vec![0u8; 8 + 3];
        b[8..].copy_from_slice(b"abc");
        Icmpv6Header::echo(TYPE_ECHO_REPLY, 1, 2).emit(&mut b, 3, src, dst);
        for n in 0..HEADER_LEN {
            assert!(Icmpv6Header::parse(&b[..n], src, dst).is_none(), "truncated to {n}");
        }
        // The checksum covers the length in the pseudo-header and the data.
        assert!(Icmpv6Header::parse(&b[..10], src, dst).is_none());
        let mut bad = b.clone();
        bad[9] ^= 0xff;
        assert!(Icmpv6Header::parse(&bad, src, dst).is_none());
        // And the addresses.
        assert!(Icmpv6Header::parse(&b, dst, src).is_some());
        assert!(Icmpv6Header::parse(&b, src, "fe80::3".parse().unwrap()).is_none());
    }
}
