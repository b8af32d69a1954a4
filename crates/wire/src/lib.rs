//! Wire formats: header views and builders, one module per protocol.
//!
//! Each protocol has a header struct (the "repr", as smoltcp calls it) with `parse`, which
//! validates a byte slice and never panics on any input, and `emit`, which writes the header
//! into a buffer. `parse(emit(x)) == x` is tested for each. Parsers return `None` for anything
//! malformed or truncated; the engine drops such frames.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod icmpv6;
pub mod ipv4;
pub mod ipv6;
pub mod ndp;
pub mod tcp;
pub mod udp;
pub mod vnet_hdr;

/// A MAC address.
pub type Mac = [u8; 6];

pub const BROADCAST_MAC: Mac = [0xff; 6];

/// IP protocol numbers.
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;

#[inline]
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

#[inline]
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

#[inline]
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod fuzz;
