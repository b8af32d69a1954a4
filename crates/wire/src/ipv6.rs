//! IPv6 headers (RFC 8200), walking the extension headers in front of the upper layer.

use std::net::Ipv6Addr;

use super::{be16, put16};

pub const HEADER_LEN: usize = 40;
pub const DEFAULT_HOP_LIMIT: u8 = 64;

/// Extension header types walked by `parse` (RFC 8200 section 4).
pub const EXT_HOP_BY_HOP: u8 = 0;
pub const EXT_ROUTING: u8 = 43;
pub const EXT_FRAGMENT: u8 = 44;
pub const EXT_DEST_OPTIONS: u8 = 60;
/// No Next Header (RFC 8200 section 4.7): nothing follows.
pub const NO_NEXT_HEADER: u8 = 59;
/// The most extension headers `parse` walks before it gives up on a packet.
pub const MAX_EXT_HEADERS: usize = 8;
/// Length of a Fragment header (RFC 8200 section 4.5).
pub const FRAGMENT_HEADER_LEN: usize = 8;

/// What a Fragment header says of the fragment behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Where this fragment's data sits in its datagram's fragmentable part, in bytes (a
    /// multiple of 8).
    pub offset: usize,
    /// The M flag: more fragments follow.
    pub more: bool,
    pub ident: u32,
}

impl Fragment {
    /// Writes a Fragment header whose Next Header is `next` (the fragmentable part's first
    /// header, the same in every fragment).
    pub fn emit(&self, next: u8, buf: &mut [u8]) {
        buf[0] = next;
        buf[1] = 0;
        put16(buf, 2, (self.offset as u16 & !7) | u16::from(self.more));
        buf[4..8].copy_from_slice(&self.ident.to_be_bytes());
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv6Header {
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    /// The upper-layer protocol: the Next Header after any extension headers walked.
    pub protocol: u8,
    pub hop_limit: u8,
    /// The Fragment header, when one was in the chain.
    pub fragment: Option<Fragment>,
    /// Bytes of extension headers walked (0 without any).
    pub ext_len: usize,
    /// Length of the upper-layer payload (after the extension headers).
    pub payload_len: usize,
}

impl Ipv6Header {
    /// Parses and validates a header (version, payload length) and walks the extension
    /// headers: Hop-by-Hop Options (first only), Routing and Destination Options by their
    /// length byte, and a Fragment header, which ends the walk. At most `MAX_EXT_HEADERS`.
    /// Returns the header and exactly the upper-layer payload (padding after the payload
    /// length is cut off). Jumbograms (RFC 2675) are not supported.
    pub fn parse(b: &[u8]) -> Option<(Ipv6Header, &[u8])> {
        if b.len() < HEADER_LEN || b[0] >> 4 != 6 {
            return None;
        }
        let total = HEADER_LEN + be16(b, 4) as usize;
        if total > b.len() {
            return None;
        }
        let b = &b[..total];
        let mut next = b[6];
        let mut at = HEADER_LEN;
        let mut walked = 0;
        let mut fragment = None;
        loop {
            let len = match next {
                EXT_HOP_BY_HOP if walked > 0 => return None,
                EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTIONS => (*b.get(at + 1)? as usize + 1) * 8,
                EXT_FRAGMENT => 8,
                _ => break,
            };
            if walked == MAX_EXT_HEADERS || at + len > total {
                return None;
            }
            walked += 1;
            let is_fragment = next == EXT_FRAGMENT;
            next = b[at];
            if is_fragment {
                let field = be16(b, at + 2);
                let ident = u32::from_be_bytes([b[at + 4], b[at + 5], b[at + 6], b[at + 7]]);
                fragment = Some(Fragment { offset: usize::from(field & !7), more: field & 1 != 0, ident });
                at += len;
                break;
            }
            at += len;
        }
        let mut src = [0; 16];
        let mut dst = [0; 16];
        src.copy_from_slice(&b[8..24]);
        dst.copy_from_slice(&b[24..40]);
        let h = Ipv6Header {
            src: Ipv6Addr::from(src),
            dst: Ipv6Addr::from(dst),
            protocol: next,
            hop_limit: b[7],
            fragment,
            ext_len: at - HEADER_LEN,
            payload_len: total - at,
        };
        Some((h, &b[at..]))
    }

    /// A header without extension headers for `payload_len` bytes of `protocol`.
    pub fn new(src: Ipv6Addr, dst: Ipv6Addr, protocol: u8, payload_len: usize) -> Ipv6Header {
        Ipv6Header { src, dst, protocol, hop_limit: DEFAULT_HOP_LIMIT, fragment: None, ext_len: 0, payload_len }
    }

    /// A Fragment header was in the chain (an atomic fragment's too).
    pub fn is_fragment(&self) -> bool {
        self.fragment.is_some()
    }

    /// Writes the fixed 40-byte header: traffic class and flow label 0, the next header is
    /// `protocol`. Extension headers are not emitted here (`ext_len` and `fragment` are
    /// ignored; a fragment's sender writes its Fragment header with [`Fragment::emit`] and
    /// gives [`EXT_FRAGMENT`] as `protocol`), so the payload length field is `payload_len`.
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0] = 0x60;
        buf[1] = 0;
        buf[2] = 0;
        buf[3] = 0;
        put16(buf, 4, self.payload_len as u16);
        buf[6] = self.protocol;
        buf[7] = self.hop_limit;
        buf[8..24].copy_from_slice(&self.src.octets());
        buf[24..40].copy_from_slice(&self.dst.octets());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

    fn addrs() -> (Ipv6Addr, Ipv6Addr) {
        ("fd5e:6e65:7400::2".parse().unwrap(), "2001:db8::80".parse().unwrap())
    }

    /// A packet with the given extension headers (type, bytes) in front of `payload`.
    fn packet(exts: &[(u8, Vec<u8>)], last: u8, payload: &[u8]) -> Vec<u8> {
        let (src, dst) = addrs();
        let ext_len: usize = exts.iter().map(|(_, e)| e.len()).sum();
        let mut b = vec![0u8; HEADER_LEN];
        Ipv6Header::new(src, dst, exts.first().map_or(last, |e| e.0), ext_len + payload.len()).emit(&mut b);
        for (i, (_, e)) in exts.iter().enumerate() {
            let mut e = e.clone();
            e[0] = exts.get(i + 1).map_or(last, |n| n.0);
            b.extend_from_slice(&e);
        }
        b.extend_from_slice(payload);
        b
    }

    /// An options-style extension header of `units` 8-byte units beyond the first.
    fn opts(units: u8) -> Vec<u8> {
        let mut e = vec![0u8; (units as usize + 1) * 8];
        e[1] = units;
        e[2] = 1; // a PadN option covering the rest
        e[3] = e.len() as u8 - 4;
        e
    }

    fn fragment(more: bool) -> Vec<u8> {
        vec![0, 0, 0, if more { 1 } else { 0 }, 0, 0, 0x12, 0x34]
    }

    #[test]
    fn roundtrip_against_etherparse() {
        let (src, dst) = addrs();
        let mut h = Ipv6Header::new(src, dst, PROTO_TCP, 5);
        h.hop_limit = 255;
        let mut b = [0u8; HEADER_LEN + 5];
        h.emit(&mut b);
        b[HEADER_LEN..].copy_from_slice(b"hello");
        let (p, payload) = Ipv6Header::parse(&b).unwrap();
        assert_eq!(p, h);
        assert_eq!(payload, b"hello");
        let e = etherparse::Ipv6Header {
            traffic_class: 0,
            flow_label: Default::default(),
            payload_length: 5,
            next_header: etherparse::IpNumber(PROTO_TCP),
            hop_limit: 255,
            source: src.octets(),
            destination: dst.octets(),
        };
        assert_eq!(e.to_bytes(), b[..HEADER_LEN]);
        let s = etherparse::Ipv6Slice::from_slice(&b).unwrap();
        assert_eq!(s.header().source_addr(), src);
        assert_eq!(s.payload().payload, b"hello");
    }

    #[test]
    fn walks_extension_headers_like_etherparse() {
        let exts = [(EXT_HOP_BY_HOP, opts(0)), (EXT_DEST_OPTIONS, opts(2)), (EXT_ROUTING, opts(1))];
        let b = packet(&exts, PROTO_UDP, b"datagram");
        let (h, payload) = Ipv6Header::parse(&b).unwrap();
        assert_eq!((h.protocol, h.ext_len, h.payload_len, h.fragment), (PROTO_UDP, 8 + 24 + 16, 8, None));
        assert_eq!(payload, b"datagram");
        let s = etherparse::Ipv6Slice::from_slice(&b).unwrap();
        assert_eq!(s.payload().ip_number, etherparse::IpNumber(PROTO_UDP));
        assert_eq!(s.payload().payload, payload);
    }

    #[test]
    fn fragment_header_sets_is_fragment_and_ends_the_walk() {
        let exts = [(EXT_DEST_OPTIONS, opts(0)), (EXT_FRAGMENT, fragment(true))];
        let b = packet(&exts, PROTO_ICMPV6, b"part");
        let (h, payload) = Ipv6Header::parse(&b).unwrap();
        assert_eq!(h.fragment, Some(Fragment { offset: 0, more: true, ident: 0x1234 }));
        assert_eq!((h.protocol, h.ext_len, payload), (PROTO_ICMPV6, 16, &b"part"[..]));
        let s = etherparse::Ipv6Slice::from_slice(&b).unwrap();
        assert!(s.is_payload_fragmented());
        assert_eq!(s.payload().payload, payload);
        // An atomic fragment (offset 0, no more fragments) still carries the header.
        let b = packet(&[(EXT_FRAGMENT, fragment(false))], PROTO_TCP, b"whole");
        assert!(Ipv6Header::parse(&b).unwrap().0.is_fragment());
        // What follows a Fragment header is not walked: here a Routing header "payload".
        let b = packet(&[(EXT_FRAGMENT, fragment(true)), (EXT_ROUTING, opts(0))], PROTO_TCP, b"");
        let (h, payload) = Ipv6Header::parse(&b).unwrap();
        assert_eq!((h.protocol, payload.len()), (EXT_ROUTING, 8));
    }

    #[test]
    fn fragment_header_roundtrip_against_etherparse() {
        let (src, dst) = addrs();
        for frag in [
            Fragment { offset: 0, more: true, ident: 7 },
            Fragment { offset: 1448, more: true, ident: 0xdead_beef },
            Fragment { offset: 65528, more: false, ident: u32::MAX },
        ] {
            let mut b = vec![0u8; HEADER_LEN + FRAGMENT_HEADER_LEN + 16];
            Ipv6Header::new(src, dst, EXT_FRAGMENT, FRAGMENT_HEADER_LEN + 16).emit(&mut b);
            frag.emit(PROTO_UDP, &mut b[HEADER_LEN..]);
            let (h, payload) = Ipv6Header::parse(&b).unwrap();
            assert_eq!((h.fragment, h.protocol, payload.len()), (Some(frag), PROTO_UDP, 16));
            let e = etherparse::Ipv6FragmentHeaderSlice::from_slice(&b[HEADER_LEN..]).unwrap();
            assert_eq!(e.fragment_offset().byte_offset() as usize, frag.offset);
            assert_eq!((e.more_fragments(), e.identification(), e.next_header().0), (frag.more, frag.ident, PROTO_UDP));
        }
    }

    #[test]
    fn at_most_eight_extension_headers() {
        let eight: Vec<_> = (0..8).map(|_| (EXT_DEST_OPTIONS, opts(0))).collect();
        let (h, _) = Ipv6Header::parse(&packet(&eight, PROTO_TCP, b"x")).unwrap();
        assert_eq!((h.protocol, h.ext_len), (PROTO_TCP, 64));
        let nine: Vec<_> = (0..9).map(|_| (EXT_DEST_OPTIONS, opts(0))).collect();
        assert!(Ipv6Header::parse(&packet(&nine, PROTO_TCP, b"x")).is_none());
    }

    #[test]
    fn hop_by_hop_only_first() {
        let b = packet(&[(EXT_DEST_OPTIONS, opts(0)), (EXT_HOP_BY_HOP, opts(0))], PROTO_UDP, b"");
        assert!(Ipv6Header::parse(&b).is_none());
    }

    #[test]
    fn upper_layers_end_the_walk() {
        for proto in [PROTO_TCP, PROTO_UDP, PROTO_ICMPV6, NO_NEXT_HEADER, 50] {
            let b = packet(&[(EXT_HOP_BY_HOP, opts(0))], proto, b"abc");
            let (h, payload) = Ipv6Header::parse(&b).unwrap();
            assert_eq!((h.protocol, payload), (proto, &b"abc"[..]));
        }
    }

    #[test]
    fn padding_after_payload_is_cut_off() {
        let (src, dst) = addrs();
        let mut b = vec![0u8; HEADER_LEN + 3 + 10];
        Ipv6Header::new(src, dst, PROTO_UDP, 3).emit(&mut b);
        b[HEADER_LEN..HEADER_LEN + 3].copy_from_slice(b"abc");
        let (h, payload) = Ipv6Header::parse(&b).unwrap();
        assert_eq!((h.payload_len, payload), (3, &b"abc"[..]));
    }

    #[test]
    fn rejects_bad_input() {
        let exts = [(EXT_HOP_BY_HOP, opts(1)), (EXT_FRAGMENT, fragment(true))];
        let b = packet(&exts, PROTO_UDP, b"payload");
        assert!(Ipv6Header::parse(&b).is_some());
        for n in 0..b.len() {
            assert!(Ipv6Header::parse(&b[..n]).is_none(), "truncated to {n}");
        }
        let mut v4 = b.clone();
        v4[0] = 0x45;
        assert!(Ipv6Header::parse(&v4).is_none());
        // The payload length ends inside an extension header.
        for len in [0u16, 1, 8, 15, 16, 23] {
            let mut short = b.clone();
            put16(&mut short, 4, len);
            assert!(Ipv6Header::parse(&short).is_none(), "payload length {len}");
        }
        // A Hop-by-Hop header whose length byte runs past the packet.
        let mut long = b.clone();
        long[HEADER_LEN + 1] = 200;
        assert!(Ipv6Header::parse(&long).is_none());
    }
}
