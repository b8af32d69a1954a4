//! The Internet checksum (RFC 1071): ones' complement sum of 16-bit words.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Adds `data` to a running 32-bit accumulator (not yet folded).
#[inline]
pub fn add(mut acc: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        // Sum the four 16-bit words of v without overflow: split into two 32-bit halves.
        acc += (v >> 32) + (v & 0xffff_ffff);
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        acc += u16::from_be_bytes([rest[i], rest[i + 1]]) as u64;
        i += 2;
    }
    if i < rest.len() {
        acc += (rest[i] as u64) << 8;
    }
    acc
}

/// Folds the accumulator to 16 bits and complements it: the value to put in a header.
#[inline]
pub fn finish(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The IPv4 pseudo-header of TCP and UDP checksums.
#[inline]
pub fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> u64 {
    let s = u32::from(src) as u64;
    let d = u32::from(dst) as u64;
    (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + proto as u64 + len as u64
}

/// The IPv6 pseudo-header of TCP, UDP and ICMPv6 checksums (RFC 8200 section 8.1).
#[inline]
pub fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> u64 {
    let words = |a: Ipv6Addr| {
        let v = u128::from(a);
        (v >> 96) as u64 + ((v >> 64) as u32) as u64 + ((v >> 32) as u32) as u64 + (v as u32) as u64
    };
    let fold32 = |x: u64| (x >> 32) + (x & 0xffff_ffff);
    // Sum the 32-bit words, then fold to 16-bit words: the same ones' complement sum.
    let mut acc = fold32(words(src)) + fold32(words(dst));
    acc = (acc >> 16) + (acc & 0xffff) + ((len as u64) >> 16) + (len as u64 & 0xffff) + proto as u64;
    acc
}

/// The pseudo-header of the family of `src` and `dst` (mixed families never happen: the
/// engine answers a guest packet with its own family; an IPv4 pair is used if they do).
#[inline]
pub fn pseudo(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u64 {
    match (src, dst) {
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo_v6(s, d, proto, len),
        (s, d) => pseudo_v4(v4_of(s), v4_of(d), proto, len),
    }
}

fn v4_of(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

/// Checksum of `data` alone.
pub fn checksum(data: &[u8]) -> u16 {
    finish(add(0, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> u16 {
        let mut sum: u32 = 0;
        for c in data.chunks(2) {
            let w = if c.len() == 2 { u16::from_be_bytes([c[0], c[1]]) } else { (c[0] as u16) << 8 };
            sum += w as u32;
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn matches_reference_on_all_lengths() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in 0..data.len() {
            assert_eq!(checksum(&data[..len]), reference(&data[..len]), "len {len}");
        }
        let ff = vec![0xffu8; 70000];
        assert_eq!(checksum(&ff), reference(&ff));
    }

    #[test]
    fn pseudo_v6_matches_the_words_summed_one_by_one() {
        let src: Ipv6Addr = "fd00:ffff:1234:5678:9abc:def0:ffff:fffe".parse().unwrap();
        let dst: Ipv6Addr = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap();
        for len in [0usize, 8, 1500, 65535, 70000] {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&src.octets());
            bytes.extend_from_slice(&dst.octets());
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend_from_slice(&[0, 0, 0, 58]);
            assert_eq!(finish(pseudo_v6(src, dst, 58, len)), reference(&bytes), "len {len}");
        }
    }

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&d), !0xddf2);
    }
}
