//! ARP for IPv4 over Ethernet (RFC 826).

use std::net::Ipv4Addr;

use super::{Mac, be16, put16};

pub const LEN: usize = 28;
pub const OP_REQUEST: u16 = 1;
pub const OP_REPLY: u16 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArpPacket {
    pub op: u16,
    pub sender_mac: Mac,
    pub sender_ip: Ipv4Addr,
    pub target_mac: Mac,
    pub target_ip: Ipv4Addr,
}

impl ArpPacket {
    /// Parses an Ethernet/IPv4 ARP packet; anything else is `None`.
    pub fn parse(b: &[u8]) -> Option<ArpPacket> {
        if b.len() < LEN || be16(b, 0) != 1 || be16(b, 2) != 0x0800 || b[4] != 6 || b[5] != 4 {
            return None;
        }
        let mut sender_mac = [0; 6];
        let mut target_mac = [0; 6];
        sender_mac.copy_from_slice(&b[8..14]);
        target_mac.copy_from_slice(&b[18..24]);
        Some(ArpPacket {
            op: be16(b, 6),
            sender_mac,
            sender_ip: Ipv4Addr::new(b[14], b[15], b[16], b[17]),
            target_mac,
            target_ip: Ipv4Addr::new(b[24], b[25], b[26], b[27]),
        })
    }

    /// Writes the packet into `buf[..28]`.
    pub fn emit(&self, buf: &mut [u8]) {
        put16(buf, 0, 1);
        put16(buf, 2, 0x0800);
        buf[4] = 6;
        buf[5] = 4;
        put16(buf, 6, self.op);
        buf[8..14].copy_from_slice(&self.sender_mac);
        buf[14..18].copy_from_slice(&self.sender_ip.octets());
        buf[18..24].copy_from_slice(&self.target_mac);
        buf[24..28].copy_from_slice(&self.target_ip.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_against_etherparse() {
        let p = ArpPacket {
            op: OP_REQUEST,
            sender_mac: [1, 2, 3, 4, 5, 6],
            sender_ip: Ipv4Addr::new(192, 168, 65, 2),
            target_mac: [0; 6],
            target_ip: Ipv4Addr::new(192, 168, 65, 1),
        };
        let mut b = [0u8; LEN];
        p.emit(&mut b);
        assert_eq!(ArpPacket::parse(&b), Some(p));
        let e = etherparse::ArpPacketSlice::from_slice(&b).unwrap();
        assert_eq!(e.sender_protocol_addr(), &[192, 168, 65, 2]);
        assert_eq!(e.operation(), etherparse::ArpOperation::REQUEST);
        for n in 0..LEN {
            assert!(ArpPacket::parse(&b[..n]).is_none());
        }
    }
}
