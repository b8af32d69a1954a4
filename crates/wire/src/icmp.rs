//! ICMPv4 (RFC 792): echo, and the errors usernet sends (destination unreachable).

use super::checksum;
use super::{be16, put16};

pub const HEADER_LEN: usize = 8;
pub const TYPE_ECHO_REPLY: u8 = 0;
pub const TYPE_DEST_UNREACHABLE: u8 = 3;
pub const TYPE_ECHO_REQUEST: u8 = 8;
pub const CODE_NET_UNREACHABLE: u8 = 0;
pub const CODE_HOST_UNREACHABLE: u8 = 1;
pub const CODE_PORT_UNREACHABLE: u8 = 3;
/// Communication administratively prohibited (RFC 1812 5.2.7.1): the egress policy.
pub const CODE_ADMIN_PROHIBITED: u8 = 13;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpHeader {
    pub kind: u8,
    pub code: u8,
    /// The four bytes after the checksum: identifier and sequence number for echo.
    pub rest: [u8; 4],
}

impl IcmpHeader {
    /// Parses a message and checks its checksum; returns the header and the data after it.
    pub fn parse(b: &[u8]) -> Option<(IcmpHeader, &[u8])> {
        if b.len() < HEADER_LEN || checksum::checksum(b) != 0 {
            return None;
        }
        Some((IcmpHeader { kind: b[0], code: b[1], rest: [b[4], b[5], b[6], b[7]] }, &b[HEADER_LEN..]))
    }

    pub fn echo(kind: u8, ident: u16, seq: u16) -> IcmpHeader {
        let i = ident.to_be_bytes();
        let s = seq.to_be_bytes();
        IcmpHeader { kind, code: 0, rest: [i[0], i[1], s[0], s[1]] }
    }

    pub fn ident(&self) -> u16 {
        be16(&self.rest, 0)
    }

    pub fn seq(&self) -> u16 {
        be16(&self.rest, 2)
    }

    /// Writes the header in front of data already at `buf[8..8 + data_len]`, with checksum.
    pub fn emit(&self, buf: &mut [u8], data_len: usize) {
        buf[0] = self.kind;
        buf[1] = self.code;
        put16(buf, 2, 0);
        buf[4..8].copy_from_slice(&self.rest);
        let c = checksum::checksum(&buf[..HEADER_LEN + data_len]);
        put16(buf, 2, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_roundtrip_against_etherparse() {
        let mut b = vec![0u8; 8 + 4];
        b[8..].copy_from_slice(b"ping");
        IcmpHeader::echo(TYPE_ECHO_REQUEST, 0x1234, 7).emit(&mut b, 4);
        let (h, data) = IcmpHeader::parse(&b).unwrap();
        assert_eq!((h.kind, h.ident(), h.seq()), (TYPE_ECHO_REQUEST, 0x1234, 7));
        assert_eq!(data, b"ping");
        let e = etherparse::Icmpv4Slice::from_slice(&b).unwrap();
        assert_eq!(e.icmp_type().calc_checksum(e.payload()), e.checksum());
        let mut bad = b.clone();
        bad[9] ^= 0xff;
        assert!(IcmpHeader::parse(&bad).is_none());
    }
}
