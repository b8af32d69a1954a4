//! Who a guest is, for the bounds kept per guest (`--max-tcp-flows-per-guest`,
//! `--max-dns-queries-per-guest`): the engine names the guest of each new flow, and the
//! gateway services count that guest's queries under the same name.

use std::fmt;
use std::net::IpAddr;

/// One guest: its MAC where the switch knows it, so that all of one guest's addresses
/// (the IPv6 ones it may rotate through among them) are one guest; its address otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GuestKey {
    Mac([u8; 6]),
    Addr(IpAddr),
}

impl fmt::Display for GuestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestKey::Mac(m) => {
                write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
            }
            GuestKey::Addr(ip) => write!(f, "{ip}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_is_shown_by_its_mac_or_its_address() {
        assert_eq!(GuestKey::Mac([0x52, 0x54, 0, 0x12, 0xab, 1]).to_string(), "52:54:00:12:ab:01");
        assert_eq!(GuestKey::Addr("fd00::2".parse().unwrap()).to_string(), "fd00::2");
    }
}
