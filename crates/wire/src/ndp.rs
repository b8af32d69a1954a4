//! Neighbor Discovery messages (RFC 4861) with their options, and the DNS options of
//! router advertisements (RFC 8106).
//!
//! Every `parse` takes the whole ICMPv6 message, type byte first, as `Icmpv6Header::parse`
//! got it (that is, the IPv6 payload, whose checksum it verified), and checks the type, code
//! 0, the length and the options (section 6.1 and 7.1). The hop limit of 255 is for the
//! caller to check on the IPv6 header. Every `emit` writes the whole message with code 0
//! and checksum 0 and returns its length (`emit_len`); the caller then fills the checksum
//! with `icmpv6::fill_checksum`.

use std::net::Ipv6Addr;

use super::icmpv6::{TYPE_NEIGHBOR_ADVERT, TYPE_NEIGHBOR_SOLICIT, TYPE_ROUTER_ADVERT, TYPE_ROUTER_SOLICIT};
use super::{Mac, be16, be32, put16, put32};

/// All-nodes and all-routers link-local multicast (RFC 4291 section 2.7.1).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);

/// Option types (RFC 4861 section 4.6, RFC 8106 section 5).
pub const OPT_SOURCE_LLADDR: u8 = 1;
pub const OPT_TARGET_LLADDR: u8 = 2;
pub const OPT_PREFIX_INFO: u8 = 3;
pub const OPT_MTU: u8 = 5;
pub const OPT_RDNSS: u8 = 25;
pub const OPT_DNSSL: u8 = 31;

/// Lengths of the messages before their options.
pub const RS_LEN: usize = 8;
pub const RA_LEN: usize = 16;
pub const NS_LEN: usize = 24;
pub const NA_LEN: usize = 24;

/// The solicited-node multicast address of `addr` (RFC 4291 section 2.7.1):
/// ff02::1:ff00:0/104 with the low 24 bits of `addr`.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// The Ethernet address of an IPv6 multicast address (RFC 2464 section 7): 33:33 and
/// its low 32 bits.
pub fn multicast_mac(addr: Ipv6Addr) -> Mac {
    let o = addr.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// Walks the options in `opts`, calling `f(type, option)` with each whole option (type and
/// length bytes included). `None` for an option of length 0 or one running past the end:
/// the message is invalid (RFC 4861 section 4.6).
fn walk_options(mut opts: &[u8], mut f: impl FnMut(u8, &[u8])) -> Option<()> {
    while !opts.is_empty() {
        let len = *opts.get(1)? as usize * 8;
        if len == 0 || len > opts.len() {
            return None;
        }
        f(opts[0], &opts[..len]);
        opts = &opts[len..];
    }
    Some(())
}

/// The link-layer address of a source/target link-layer address option (RFC 4861 4.6.1).
fn lladdr(opt: &[u8]) -> Mac {
    let mut mac = [0; 6];
    mac.copy_from_slice(&opt[2..8]);
    mac
}

/// Writes a link-layer address option at `buf[at..at + 8]`; returns the length.
fn emit_lladdr(buf: &mut [u8], at: usize, kind: u8, mac: Option<Mac>) -> usize {
    let Some(mac) = mac else { return 0 };
    buf[at] = kind;
    buf[at + 1] = 1;
    buf[at + 2..at + 8].copy_from_slice(&mac);
    8
}

/// Writes type, code 0, checksum 0 and four zero bytes (flags or reserved).
fn emit_head(buf: &mut [u8], kind: u8) {
    buf[0] = kind;
    buf[1..8].fill(0);
}

/// Checks the type, code and fixed length shared by all messages.
fn check(msg: &[u8], kind: u8, fixed_len: usize) -> bool {
    msg.len() >= fixed_len && msg[0] == kind && msg[1] == 0
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// Router Solicitation (RFC 4861 section 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouterSolicit {
    pub source_lladdr: Option<Mac>,
}

impl RouterSolicit {
    pub fn parse(msg: &[u8]) -> Option<RouterSolicit> {
        if !check(msg, TYPE_ROUTER_SOLICIT, RS_LEN) {
            return None;
        }
        let mut source_lladdr = None;
        walk_options(&msg[RS_LEN..], |kind, opt| {
            if kind == OPT_SOURCE_LLADDR {
                source_lladdr = source_lladdr.or(Some(lladdr(opt)));
            }
        })?;
        Some(RouterSolicit { source_lladdr })
    }

    pub fn emit_len(&self) -> usize {
        RS_LEN + if self.source_lladdr.is_some() { 8 } else { 0 }
    }

    pub fn emit(&self, buf: &mut [u8]) -> usize {
        emit_head(buf, TYPE_ROUTER_SOLICIT);
        RS_LEN + emit_lladdr(buf, RS_LEN, OPT_SOURCE_LLADDR, self.source_lladdr)
    }
}

/// Neighbor Solicitation (RFC 4861 section 4.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighborSolicit {
    pub target: Ipv6Addr,
    pub source_lladdr: Option<Mac>,
}

impl NeighborSolicit {
    /// Also rejects a multicast target (section 7.1.1).
    pub fn parse(msg: &[u8]) -> Option<NeighborSolicit> {
        if !check(msg, TYPE_NEIGHBOR_SOLICIT, NS_LEN) {
            return None;
        }
        let target = addr_at(msg, 8);
        if target.is_multicast() {
            return None;
        }
        let mut source_lladdr = None;
        walk_options(&msg[NS_LEN..], |kind, opt| {
            if kind == OPT_SOURCE_LLADDR {
                source_lladdr = source_lladdr.or(Some(lladdr(opt)));
            }
        })?;
        Some(NeighborSolicit { target, source_lladdr })
    }

    pub fn emit_len(&self) -> usize {
        NS_LEN + if self.source_lladdr.is_some() { 8 } else { 0 }
    }

    pub fn emit(&self, buf: &mut [u8]) -> usize {
        emit_head(buf, TYPE_NEIGHBOR_SOLICIT);
        buf[8..24].copy_from_slice(&self.target.octets());
        NS_LEN + emit_lladdr(buf, NS_LEN, OPT_SOURCE_LLADDR, self.source_lladdr)
    }
}

/// Neighbor Advertisement (RFC 4861 section 4.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeighborAdvert {
    pub router: bool,
    pub solicited: bool,
    pub override_: bool,
    pub target: Ipv6Addr,
    pub target_lladdr: Option<Mac>,
}

const NA_ROUTER: u8 = 0x80;
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;

impl NeighborAdvert {
    /// Also rejects a multicast target (section 7.1.2).
    pub fn parse(msg: &[u8]) -> Option<NeighborAdvert> {
        if !check(msg, TYPE_NEIGHBOR_ADVERT, NA_LEN) {
            return None;
        }
        let target = addr_at(msg, 8);
        if target.is_multicast() {
            return None;
        }
        let mut target_lladdr = None;
        walk_options(&msg[NA_LEN..], |kind, opt| {
            if kind == OPT_TARGET_LLADDR {
                target_lladdr = target_lladdr.or(Some(lladdr(opt)));
            }
        })?;
        Some(NeighborAdvert {
            router: msg[4] & NA_ROUTER != 0,
            solicited: msg[4] & NA_SOLICITED != 0,
            override_: msg[4] & NA_OVERRIDE != 0,
            target,
            target_lladdr,
        })
    }

    pub fn emit_len(&self) -> usize {
        NA_LEN + if self.target_lladdr.is_some() { 8 } else { 0 }
    }

    pub fn emit(&self, buf: &mut [u8]) -> usize {
        emit_head(buf, TYPE_NEIGHBOR_ADVERT);
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        buf[4] = flag(self.router, NA_ROUTER) | flag(self.solicited, NA_SOLICITED) | flag(self.override_, NA_OVERRIDE);
        buf[8..24].copy_from_slice(&self.target.octets());
        NA_LEN + emit_lladdr(buf, NA_LEN, OPT_TARGET_LLADDR, self.target_lladdr)
    }
}

/// A Prefix Information option (RFC 4861 section 4.6.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixInfo {
    pub prefix: Ipv6Addr,
    pub prefix_len: u8,
    /// L: the prefix is on-link.
    pub on_link: bool,
    /// A: the prefix may be used for stateless address autoconfiguration (RFC 4862).
    pub autonomous: bool,
    /// Seconds; 0xffffffff is infinity.
    pub valid_lifetime: u32,
    pub preferred_lifetime: u32,
}

const PREFIX_ON_LINK: u8 = 0x80;
const PREFIX_AUTONOMOUS: u8 = 0x40;
const PREFIX_OPT_LEN: usize = 32;

/// Router Advertisement (RFC 4861 section 4.2) with the options a host configures itself
/// from: source link-layer address, MTU, prefixes, and DNS servers and search list (RFC 8106).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouterAdvert {
    pub cur_hop_limit: u8,
    /// M: addresses are available by DHCPv6.
    pub managed: bool,
    /// O: other configuration is available by DHCPv6.
    pub other: bool,
    /// Seconds; 0 means not a default router.
    pub router_lifetime: u16,
    pub reachable_ms: u32,
    pub retrans_ms: u32,
    pub source_lladdr: Option<Mac>,
    pub mtu: Option<u32>,
    pub prefixes: Vec<PrefixInfo>,
    /// Recursive DNS servers with their lifetime in seconds. Several options are merged:
    /// addresses appended, the shortest lifetime kept. `emit` writes up to 127 addresses
    /// and no option for an empty list.
    pub rdnss: Option<(u32, Vec<Ipv6Addr>)>,
    /// The DNS search list (names without the trailing dot) with its lifetime in seconds,
    /// merged like `rdnss`. An option with a malformed name is ignored. `emit` leaves out
    /// names that cannot be encoded (empty labels, labels over 63 bytes, over 253 bytes)
    /// or do not fit in one option, and writes no option for an empty list.
    pub dnssl: Option<(u32, Vec<String>)>,
}

const RA_MANAGED: u8 = 0x80;
const RA_OTHER: u8 = 0x40;
/// The most addresses one RDNSS option holds: 255 units of 8 bytes, less the first.
const RDNSS_MAX: usize = 127;
/// The most bytes of names one DNSSL option holds.
const DNSSL_MAX: usize = 255 * 8 - 8;

impl RouterAdvert {
    pub fn parse(msg: &[u8]) -> Option<RouterAdvert> {
        if !check(msg, TYPE_ROUTER_ADVERT, RA_LEN) {
            return None;
        }
        let mut ra = RouterAdvert {
            cur_hop_limit: msg[4],
            managed: msg[5] & RA_MANAGED != 0,
            other: msg[5] & RA_OTHER != 0,
            router_lifetime: be16(msg, 6),
            reachable_ms: be32(msg, 8),
            retrans_ms: be32(msg, 12),
            source_lladdr: None,
            mtu: None,
            prefixes: Vec::new(),
            rdnss: None,
            dnssl: None,
        };
        walk_options(&msg[RA_LEN..], |kind, opt| match kind {
            OPT_SOURCE_LLADDR => ra.source_lladdr = ra.source_lladdr.or(Some(lladdr(opt))),
            OPT_MTU => ra.mtu = ra.mtu.or(Some(be32(opt, 4))),
            OPT_PREFIX_INFO if opt.len() == PREFIX_OPT_LEN => ra.prefixes.push(PrefixInfo {
                prefix: addr_at(opt, 16),
                prefix_len: opt[2],
                on_link: opt[3] & PREFIX_ON_LINK != 0,
                autonomous: opt[3] & PREFIX_AUTONOMOUS != 0,
                valid_lifetime: be32(opt, 4),
                preferred_lifetime: be32(opt, 8),
            }),
            // RFC 8106 section 5.1: the length is 3 or more, and odd.
            OPT_RDNSS if opt.len() >= 24 && (opt.len() - 8) % 16 == 0 => {
                let addrs = opt[8..].chunks_exact(16).map(|c| addr_at(c, 0));
                merge(&mut ra.rdnss, be32(opt, 4), addrs);
            }
            OPT_DNSSL if opt.len() >= 16 => {
                if let Some(names) = parse_names(&opt[8..]).filter(|n| !n.is_empty()) {
                    merge(&mut ra.dnssl, be32(opt, 4), names);
                }
            }
            _ => {}
        })?;
        Some(ra)
    }

    pub fn emit_len(&self) -> usize {
        let mut len = RA_LEN + if self.source_lladdr.is_some() { 8 } else { 0 };
        len += if self.mtu.is_some() { 8 } else { 0 };
        len += self.prefixes.len() * PREFIX_OPT_LEN;
        if let Some((_, addrs)) = self.rdnss.as_ref().filter(|r| !r.1.is_empty()) {
            len += 8 + addrs.len().min(RDNSS_MAX) * 16;
        }
        if let Some((_, names)) = &self.dnssl {
            len += dnssl_len(&encode_names(names));
        }
        len
    }

    pub fn emit(&self, buf: &mut [u8]) -> usize {
        emit_head(buf, TYPE_ROUTER_ADVERT);
        buf[4] = self.cur_hop_limit;
        buf[5] = if self.managed { RA_MANAGED } else { 0 } | if self.other { RA_OTHER } else { 0 };
        put16(buf, 6, self.router_lifetime);
        put32(buf, 8, self.reachable_ms);
        put32(buf, 12, self.retrans_ms);
        let mut at = RA_LEN;
        at += emit_lladdr(buf, at, OPT_SOURCE_LLADDR, self.source_lladdr);
        if let Some(mtu) = self.mtu {
            buf[at] = OPT_MTU;
            buf[at + 1] = 1;
            put16(buf, at + 2, 0);
            put32(buf, at + 4, mtu);
            at += 8;
        }
        for p in &self.prefixes {
            buf[at] = OPT_PREFIX_INFO;
            buf[at + 1] = (PREFIX_OPT_LEN / 8) as u8;
            buf[at + 2] = p.prefix_len;
            buf[at + 3] = if p.on_link { PREFIX_ON_LINK } else { 0 } | if p.autonomous { PREFIX_AUTONOMOUS } else { 0 };
            put32(buf, at + 4, p.valid_lifetime);
            put32(buf, at + 8, p.preferred_lifetime);
            put32(buf, at + 12, 0);
            buf[at + 16..at + 32].copy_from_slice(&p.prefix.octets());
            at += PREFIX_OPT_LEN;
        }
        if let Some((lifetime, addrs)) = self.rdnss.as_ref().filter(|r| !r.1.is_empty()) {
            let addrs = &addrs[..addrs.len().min(RDNSS_MAX)];
            buf[at] = OPT_RDNSS;
            buf[at + 1] = (1 + 2 * addrs.len()) as u8;
            put16(buf, at + 2, 0);
            put32(buf, at + 4, *lifetime);
            at += 8;
            for a in addrs {
                buf[at..at + 16].copy_from_slice(&a.octets());
                at += 16;
            }
        }
        if let Some((lifetime, names)) = &self.dnssl {
            let encoded = encode_names(names);
            let len = dnssl_len(&encoded);
            if len > 0 {
                buf[at] = OPT_DNSSL;
                buf[at + 1] = (len / 8) as u8;
                put16(buf, at + 2, 0);
                put32(buf, at + 4, *lifetime);
                buf[at + 8..at + 8 + encoded.len()].copy_from_slice(&encoded);
                buf[at + 8 + encoded.len()..at + len].fill(0);
                at += len;
            }
        }
        at
    }
}

/// Adds the items of one option to the merged value of the options seen before.
fn merge<T>(merged: &mut Option<(u32, Vec<T>)>, lifetime: u32, items: impl IntoIterator<Item = T>) {
    let (l, all) = merged.get_or_insert_with(|| (lifetime, Vec::new()));
    *l = (*l).min(lifetime);
    all.extend(items);
}

/// The domain names of a DNSSL option (RFC 8106 section 5.2): each a sequence of DNS
/// labels ending with a zero-length one (RFC 1035 section 3.1, no compression), then zero
/// padding. `None` if any name is malformed: truncated, a label over 63 bytes or not UTF-8
/// or holding a dot, or a name over 255 bytes.
fn parse_names(mut d: &[u8]) -> Option<Vec<String>> {
    let mut names = Vec::new();
    while d.first().is_some_and(|&l| l != 0) {
        let mut name = String::new();
        loop {
            let (&l, rest) = d.split_first()?;
            let l = l as usize;
            if l == 0 {
                d = rest;
                break;
            }
            if l > 63 || l > rest.len() {
                return None;
            }
            let label = std::str::from_utf8(&rest[..l]).ok()?;
            if label.contains('.') {
                return None;
            }
            if !name.is_empty() {
                name.push('.');
            }
            name.push_str(label);
            if name.len() > 253 {
                return None;
            }
            d = &rest[l..];
        }
        names.push(name);
    }
    Some(names)
}

/// The DNS label encoding of the names that can be encoded and fit in one DNSSL option.
fn encode_names(names: &[String]) -> Vec<u8> {
    let mut out = Vec::new();
    for name in names {
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() || name.len() > 253 || name.split('.').any(|l| l.is_empty() || l.len() > 63) {
            continue;
        }
        if out.len() + name.len() + 2 > DNSSL_MAX {
            continue;
        }
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
    }
    out
}

/// Length of the DNSSL option holding `encoded` names, padded to 8 bytes; 0 without names.
fn dnssl_len(encoded: &[u8]) -> usize {
    if encoded.is_empty() { 0 } else { (8 + encoded.len()).div_ceil(8) * 8 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::icmpv6::{self, Icmpv6Header};
    use etherparse::icmpv6::NdpOptionSlice;

    const MAC: Mac = [0x02, 0x50, 0x00, 0x00, 0x00, 0x01];

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn sample_ra() -> RouterAdvert {
        RouterAdvert {
            cur_hop_limit: 64,
            managed: false,
            other: true,
            router_lifetime: 1800,
            reachable_ms: 30000,
            retrans_ms: 1000,
            source_lladdr: Some(MAC),
            mtu: Some(1500),
            prefixes: vec![
                PrefixInfo {
                    prefix: addr("fd5e:6e65:7400::"),
                    prefix_len: 64,
                    on_link: true,
                    autonomous: true,
                    valid_lifetime: 86400,
                    preferred_lifetime: 14400,
                },
                PrefixInfo {
                    prefix: addr("2001:db8:1::"),
                    prefix_len: 48,
                    on_link: false,
                    autonomous: false,
                    valid_lifetime: u32::MAX,
                    preferred_lifetime: 0,
                },
            ],
            rdnss: Some((600, vec![addr("fd5e:6e65:7400::1"), addr("2001:4860:4860::8888")])),
            dnssl: Some((600, vec!["usernet.internal".to_string(), "example.com".to_string()])),
        }
    }

    /// Emits `emit` into a big buffer and returns exactly the message.
    fn emitted(emit: impl Fn(&mut [u8]) -> usize, emit_len: usize) -> Vec<u8> {
        let mut b = vec![0xaau8; 4096];
        let n = emit(&mut b);
        assert_eq!(n, emit_len);
        b.truncate(n);
        b
    }

    /// Truncating a message never panics, and is `None` unless it ends between two options.
    fn check_truncations<T>(b: &[u8], fixed_len: usize, parse: impl Fn(&[u8]) -> Option<T>) {
        assert!(parse(b).is_some());
        let mut boundaries = vec![fixed_len];
        walk_options(&b[fixed_len..], |_, opt| boundaries.push(boundaries.last().unwrap() + opt.len())).unwrap();
        for n in 0..b.len() {
            assert_eq!(parse(&b[..n]).is_some(), boundaries.contains(&n), "truncated to {n}");
        }
    }

    #[test]
    fn router_advert_roundtrip_against_etherparse() {
        let ra = sample_ra();
        let (src, dst) = (addr("fe80::1"), ALL_NODES);
        let mut b = emitted(|b| ra.emit(b), ra.emit_len());
        icmpv6::fill_checksum(&mut b, src, dst);
        let (h, _) = Icmpv6Header::parse(&b, src, dst).unwrap();
        assert_eq!((h.kind, h.code), (icmpv6::TYPE_ROUTER_ADVERT, 0));
        assert_eq!(RouterAdvert::parse(&b), Some(ra.clone()));

        let e = etherparse::Icmpv6Slice::from_slice(&b).unwrap();
        assert!(e.is_checksum_valid(src.octets(), dst.octets()));
        let etherparse::Icmpv6Type::RouterAdvertisement(eh) = e.icmp_type() else { panic!() };
        assert_eq!((eh.cur_hop_limit, eh.managed_address_config, eh.other_config), (64, false, true));
        assert_eq!(eh.router_lifetime, 1800);
        let Ok(etherparse::icmpv6::Icmpv6PayloadSlice::RouterAdvertisement(p)) = e.payload_slice() else { panic!() };
        assert_eq!((p.reachable_time(), p.retrans_timer()), (30000, 1000));
        let opts: Vec<_> = p.options_iterator().map(|o| o.unwrap()).collect();
        assert_eq!(opts.len(), 6);
        let NdpOptionSlice::SourceLinkLayerAddress(l) = &opts[0] else { panic!() };
        assert_eq!(l.link_layer_address(), MAC);
        let NdpOptionSlice::Mtu(m) = &opts[1] else { panic!() };
        assert_eq!(m.mtu(), 1500);
        let NdpOptionSlice::PrefixInformation(pi) = &opts[2] else { panic!() };
        assert_eq!((pi.prefix(), pi.prefix_length()), (addr("fd5e:6e65:7400::").octets(), 64));
        assert!(pi.on_link() && pi.autonomous_address_configuration());
        assert_eq!((pi.valid_lifetime(), pi.preferred_lifetime()), (86400, 14400));
        let NdpOptionSlice::PrefixInformation(pi) = &opts[3] else { panic!() };
        assert!(!pi.on_link() && !pi.autonomous_address_configuration());
        let NdpOptionSlice::Unknown(rdnss) = &opts[4] else { panic!() };
        assert_eq!(rdnss.as_bytes().len(), 8 + 32);
        let NdpOptionSlice::Unknown(dnssl) = &opts[5] else { panic!() };
        // "usernet.internal" is 18 bytes encoded, "example.com" 13: 31, padded to 32.
        assert_eq!(dnssl.as_bytes().len(), 8 + 32);
    }

    #[test]
    fn dnssl_encoding() {
        let ra = RouterAdvert { dnssl: Some((7, vec!["a.bc".to_string(), "d.".to_string()])), ..minimal_ra() };
        let b = emitted(|b| ra.emit(b), ra.emit_len());
        let option = [31, 3, 0, 0, 0, 0, 0, 7, 1, b'a', 2, b'b', b'c', 0, 1, b'd', 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(&b[RA_LEN..], &option);
        // The trailing dot is not kept.
        let parsed = RouterAdvert::parse(&b).unwrap();
        assert_eq!(parsed.dnssl, Some((7, vec!["a.bc".to_string(), "d".to_string()])));
        // Names that cannot be encoded are left out; none left, no option.
        let long = "x".repeat(64);
        let ra = RouterAdvert { dnssl: Some((7, vec![String::new(), "a..b".to_string(), long])), ..minimal_ra() };
        assert_eq!(ra.emit_len(), RA_LEN);
        assert_eq!(RouterAdvert::parse(&emitted(|b| ra.emit(b), RA_LEN)).unwrap().dnssl, None);
    }

    fn minimal_ra() -> RouterAdvert {
        RouterAdvert {
            cur_hop_limit: 0,
            managed: false,
            other: false,
            router_lifetime: 0,
            reachable_ms: 0,
            retrans_ms: 0,
            source_lladdr: None,
            mtu: None,
            prefixes: Vec::new(),
            rdnss: None,
            dnssl: None,
        }
    }

    #[test]
    fn router_advert_malformed_dns_options_are_ignored() {
        let ra = sample_ra();
        let mut b = emitted(|b| ra.emit(b), ra.emit_len());
        let dnssl = b.len() - 40;
        assert_eq!(b[dnssl], OPT_DNSSL);
        // A label running past the option: that option is dropped, the rest stays.
        let mut bad = b.clone();
        bad[dnssl + 8] = 60;
        let parsed = RouterAdvert::parse(&bad).unwrap();
        assert_eq!(parsed.dnssl, None);
        assert_eq!(parsed.rdnss, ra.rdnss);
        // A compression pointer (0xc0) is not allowed.
        bad[dnssl + 8] = 0xc0;
        assert_eq!(RouterAdvert::parse(&bad).unwrap().dnssl, None);
        // An RDNSS option of even length is invalid.
        let rdnss = dnssl - 40;
        assert_eq!(b[rdnss], OPT_RDNSS);
        b[rdnss + 1] = 4;
        b[rdnss + 32] = OPT_MTU; // what is now the next option, 8 bytes of the second address
        b[rdnss + 33] = 1;
        let parsed = RouterAdvert::parse(&b).unwrap();
        assert_eq!(parsed.rdnss, None);
        assert_eq!(parsed.dnssl, ra.dnssl);
    }

    #[test]
    fn router_advert_merges_dns_options() {
        let one = RouterAdvert { rdnss: Some((300, vec![addr("fd00::1")])), ..minimal_ra() };
        let two = RouterAdvert { rdnss: Some((100, vec![addr("fd00::2")])), ..minimal_ra() };
        let mut b = emitted(|b| one.emit(b), one.emit_len());
        b.extend_from_slice(&emitted(|b| two.emit(b), two.emit_len())[RA_LEN..]);
        assert_eq!(RouterAdvert::parse(&b).unwrap().rdnss, Some((100, vec![addr("fd00::1"), addr("fd00::2")])));
    }

    #[test]
    fn router_advert_truncated_or_bad() {
        let ra = sample_ra();
        let b = emitted(|b| ra.emit(b), ra.emit_len());
        check_truncations(&b, RA_LEN, RouterAdvert::parse);
        // Cut inside an option: invalid; on an option boundary: fewer options.
        assert!(RouterAdvert::parse(&b[..RA_LEN + 4]).is_none());
        assert_eq!(RouterAdvert::parse(&b[..RA_LEN + 16]).unwrap().mtu, Some(1500));
        assert_eq!(RouterAdvert::parse(&b[..RA_LEN + 16]).unwrap().prefixes, vec![]);
        let mut zero = b.clone();
        zero[RA_LEN + 8 + 1] = 0; // the MTU option
        assert!(RouterAdvert::parse(&zero).is_none());
        let mut code = b.clone();
        code[1] = 1;
        assert!(RouterAdvert::parse(&code).is_none());
        let mut kind = b.clone();
        kind[0] = icmpv6::TYPE_ROUTER_SOLICIT;
        assert!(RouterAdvert::parse(&kind).is_none());
    }

    #[test]
    fn unknown_options_are_skipped() {
        let ns = NeighborSolicit { target: addr("fe80::1"), source_lladdr: Some(MAC) };
        let mut b = emitted(|b| ns.emit(b), ns.emit_len());
        let mut with_unknown = b[..NS_LEN].to_vec();
        with_unknown.extend_from_slice(&[200, 2, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]);
        with_unknown.extend_from_slice(&b[NS_LEN..]);
        assert_eq!(NeighborSolicit::parse(&with_unknown), Some(ns));
        // A target link-layer address option means nothing in a solicitation.
        b[NS_LEN] = OPT_TARGET_LLADDR;
        assert_eq!(NeighborSolicit::parse(&b).unwrap().source_lladdr, None);
    }

    #[test]
    fn neighbor_solicit_roundtrip_against_etherparse() {
        let (src, dst) = (addr("fe80::2"), solicited_node(addr("fe80::1")));
        for ns in [
            NeighborSolicit { target: addr("fe80::1"), source_lladdr: Some(MAC) },
            NeighborSolicit { target: addr("fd5e:6e65:7400::1"), source_lladdr: None },
        ] {
            let mut b = emitted(|b| ns.emit(b), ns.emit_len());
            icmpv6::fill_checksum(&mut b, src, dst);
            assert!(Icmpv6Header::parse(&b, src, dst).is_some());
            assert_eq!(NeighborSolicit::parse(&b), Some(ns));
            let e = etherparse::Icmpv6Slice::from_slice(&b).unwrap();
            assert!(e.is_checksum_valid(src.octets(), dst.octets()));
            assert_eq!(e.icmp_type(), etherparse::Icmpv6Type::NeighborSolicitation);
            let Ok(etherparse::icmpv6::Icmpv6PayloadSlice::NeighborSolicitation(p)) = e.payload_slice() else {
                panic!()
            };
            assert_eq!(p.target_address(), ns.target);
            let opts: Vec<_> = p.options_iterator().map(|o| o.unwrap()).collect();
            assert_eq!(opts.len(), usize::from(ns.source_lladdr.is_some()));
            check_truncations(&b, NS_LEN, NeighborSolicit::parse);
        }
        // A multicast target is invalid.
        let ns = NeighborSolicit { target: ALL_NODES, source_lladdr: None };
        assert!(NeighborSolicit::parse(&emitted(|b| ns.emit(b), NS_LEN)).is_none());
    }

    #[test]
    fn neighbor_advert_roundtrip_against_etherparse() {
        let (src, dst) = (addr("fe80::1"), addr("fe80::2"));
        for (router, solicited, override_) in [(true, true, true), (false, true, false), (true, false, false)] {
            let na = NeighborAdvert { router, solicited, override_, target: src, target_lladdr: Some(MAC) };
            let mut b = emitted(|b| na.emit(b), na.emit_len());
            icmpv6::fill_checksum(&mut b, src, dst);
            assert!(Icmpv6Header::parse(&b, src, dst).is_some());
            assert_eq!(NeighborAdvert::parse(&b), Some(na));
            let e = etherparse::Icmpv6Slice::from_slice(&b).unwrap();
            assert!(e.is_checksum_valid(src.octets(), dst.octets()));
            let etherparse::Icmpv6Type::NeighborAdvertisement(h) = e.icmp_type() else { panic!() };
            assert_eq!((h.router, h.solicited, h.r#override), (router, solicited, override_));
            let Ok(etherparse::icmpv6::Icmpv6PayloadSlice::NeighborAdvertisement(p)) = e.payload_slice() else {
                panic!()
            };
            assert_eq!(p.target_address(), src);
            let opts: Vec<_> = p.options_iterator().map(|o| o.unwrap()).collect();
            let [NdpOptionSlice::TargetLinkLayerAddress(l)] = &opts[..] else { panic!() };
            assert_eq!(l.link_layer_address(), MAC);
            check_truncations(&b, NA_LEN, NeighborAdvert::parse);
            let mut zero = b.clone();
            zero[NA_LEN + 1] = 0;
            assert!(NeighborAdvert::parse(&zero).is_none());
        }
        let na = NeighborAdvert { router: false, solicited: false, override_: false, target: src, target_lladdr: None };
        assert_eq!(NeighborAdvert::parse(&emitted(|b| na.emit(b), NA_LEN)), Some(na));
    }

    #[test]
    fn router_solicit_roundtrip() {
        for rs in [RouterSolicit { source_lladdr: Some(MAC) }, RouterSolicit { source_lladdr: None }] {
            let b = emitted(|b| rs.emit(b), rs.emit_len());
            assert_eq!(RouterSolicit::parse(&b), Some(rs));
            check_truncations(&b, RS_LEN, RouterSolicit::parse);
            let e = etherparse::Icmpv6Slice::from_slice(&b).unwrap();
            assert_eq!(e.icmp_type(), etherparse::Icmpv6Type::RouterSolicitation);
        }
        // An option of length 0, and one cut short.
        assert!(RouterSolicit::parse(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(RouterSolicit::parse(&[133, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0]).is_none());
        assert!(RouterSolicit::parse(&[133, 0, 0, 0, 0, 0, 0, 0, 1]).is_none());
    }

    #[test]
    fn multicast_addresses() {
        // RFC 4291 section 2.7.1 and RFC 2464 section 7.
        let a = addr("fe80::2aa:ff:fe28:9c5a");
        assert_eq!(solicited_node(a), addr("ff02::1:ff28:9c5a"));
        assert_eq!(multicast_mac(solicited_node(a)), [0x33, 0x33, 0xff, 0x28, 0x9c, 0x5a]);
        assert_eq!(multicast_mac(ALL_NODES), [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(ALL_ROUTERS, addr("ff02::2"));
    }
}
