//! Ethernet II frames.

use super::{Mac, be16, put16};

pub const HEADER_LEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EthernetHeader {
    pub dst: Mac,
    pub src: Mac,
    pub ethertype: u16,
}

impl EthernetHeader {
    /// The header and the payload after it.
    pub fn parse(frame: &[u8]) -> Option<(EthernetHeader, &[u8])> {
        if frame.len() < HEADER_LEN {
            return None;
        }
        let mut dst = [0; 6];
        let mut src = [0; 6];
        dst.copy_from_slice(&frame[0..6]);
        src.copy_from_slice(&frame[6..12]);
        Some((EthernetHeader { dst, src, ethertype: be16(frame, 12) }, &frame[HEADER_LEN..]))
    }

    /// Writes the header into `buf[..14]`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0..6].copy_from_slice(&self.dst);
        buf[6..12].copy_from_slice(&self.src);
        put16(buf, 12, self.ethertype);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_truncated() {
        let h = EthernetHeader { dst: [1, 2, 3, 4, 5, 6], src: [7, 8, 9, 10, 11, 12], ethertype: ETHERTYPE_ARP };
        let mut b = [0u8; 20];
        h.emit(&mut b);
        let (p, rest) = EthernetHeader::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(rest.len(), 6);
        assert!(EthernetHeader::parse(&b[..13]).is_none());
        let e = etherparse::Ethernet2Header::from_slice(&b).unwrap().0;
        assert_eq!(e.source, h.src);
        assert_eq!(e.ether_type.0, ETHERTYPE_ARP);
    }
}
