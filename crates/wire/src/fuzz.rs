//! Property tests: no parser panics on arbitrary bytes, and whatever parses, re-emits the same.

use std::net::Ipv6Addr;

use proptest::prelude::*;

use super::*;

/// Next Header values: the extension headers `ipv6` walks, upper layers, and any.
fn ext_kind() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![0u8, 43, 44, 60]),
        1 => prop::sample::select(vec![6u8, 17, 58, 59]),
        1 => any::<u8>(),
    ]
}

/// Neighbor Discovery option types: the ones `ndp` reads, and any.
fn opt_kind() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => prop::sample::select(vec![1u8, 2, 3, 5, 25, 31]),
        1 => any::<u8>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = ethernet::EthernetHeader::parse(&data);
        let _ = arp::ArpPacket::parse(&data);
        let _ = ipv4::Ipv4Header::parse(&data);
        let _ = icmp::IcmpHeader::parse(&data);
        let _ = udp::UdpHeader::parse(&data);
        let _ = tcp::TcpHeader::parse(&data);
        let _ = ipv6::Ipv6Header::parse(&data);
        let _ = icmpv6::Icmpv6Header::parse(&data, Ipv6Addr::LOCALHOST, ndp::ALL_NODES);
        let _ = ndp::RouterSolicit::parse(&data);
        let _ = ndp::RouterAdvert::parse(&data);
        let _ = ndp::NeighborSolicit::parse(&data);
        let _ = ndp::NeighborAdvert::parse(&data);
    }

    /// A guest's offload instructions (`vnet_hdr::finish`) on frames that start like TCP or
    /// UDP over IPv4 or IPv6 and then go wrong anywhere: never a panic, and what comes out
    /// fits in a frame and carries no more payload than went in.
    #[test]
    fn offloads_finished_never_panic(
        v6 in any::<bool>(),
        head in proptest::collection::vec(any::<u8>(), 0..120),
        len in 0usize..9000,
        cut in any::<prop::sample::Index>(),
        hdr in (any::<u8>(), prop::sample::select(vec![0u8, 1, 3, 4, 5, 0x81, 0x84, 0x85, 0x42]), any::<u16>(),
                prop_oneof![Just(0u16), 1u16..2000, any::<u16>()], any::<u16>(), any::<u16>()),
    ) {
        let mut b = vec![0u8; 14 + len];
        b[12..14].copy_from_slice(&(if v6 { 0x86ddu16 } else { 0x0800u16 }).to_be_bytes());
        if len > 0 {
            b[14] = if v6 { 0x60 } else { 0x45 };
        }
        let n = head.len().min(b.len() - 14);
        b[14..14 + n].copy_from_slice(&head[..n]);
        // Often a consistent protocol and length, so that segmentation runs.
        let proto = if hdr.0 & 4 == 0 { 6 } else { 17 };
        if !v6 && b.len() >= 34 && hdr.0 & 1 == 0 {
            b[14] = 0x45;
            b[23] = proto;
            put16(&mut b, 16, len as u16);
            put16(&mut b, 20, 0);
        }
        if v6 && b.len() >= 54 && hdr.0 & 1 == 0 {
            b[14] = 0x60;
            b[20] = proto;
            put16(&mut b, 18, (len - 40) as u16);
            // Often a Hop-by-Hop or Destination Options header in front of TCP or UDP.
            if b.len() >= 62 && hdr.0 & 2 != 0 {
                b[20] = if hdr.2 & 1 == 0 { 0 } else { 60 };
                b[54] = if hdr.2 & 2 == 0 { proto } else { 60 };
                b[55] = (hdr.4 % 4) as u8;
            }
        }
        let frame = &b[..cut.index(b.len() + 1)];
        let h = vnet_hdr::VnetHdr {
            flags: hdr.0, gso_type: hdr.1, hdr_len: hdr.2, gso_size: hdr.3, csum_start: hdr.4, csum_offset: hdr.5,
        };
        let (mut frames, mut bytes) = (0usize, 0usize);
        let r = vnet_hdr::finish(frame, &h, &mut Vec::new(), |f| {
            frames += 1;
            bytes += f.len();
            assert!(f.len() <= frame.len().max(14 + 60 + 60 + usize::from(h.gso_size)));
        });
        if r.is_err() {
            prop_assert_eq!(frames, 0);
        } else {
            prop_assert!(frames >= 1);
            prop_assert!(frames <= frame.len().max(1));
        }
    }

    /// A valid fixed header in front of a chain of extension-header-like blocks.
    #[test]
    fn ipv6_extension_chains(
        chain in proptest::collection::vec((ext_kind(), 0u8..4, any::<u8>()), 0..11),
        last in ext_kind(),
        pad in 0usize..16,
    ) {
        let mut b = vec![0u8; ipv6::HEADER_LEN];
        b[0] = 0x60;
        b[6] = chain.first().map_or(last, |c| c.0);
        for (i, &(_, units, fill)) in chain.iter().enumerate() {
            let mut e = vec![fill; (units as usize + 1) * 8];
            e[0] = chain.get(i + 1).map_or(last, |c| c.0);
            e[1] = units;
            b.extend_from_slice(&e);
        }
        let len = b.len() - ipv6::HEADER_LEN;
        put16(&mut b, 4, len as u16);
        b.extend(std::iter::repeat_n(0xee, pad));
        for n in 0..=b.len() {
            if let Some((h, payload)) = ipv6::Ipv6Header::parse(&b[..n]) {
                prop_assert_eq!(payload.len(), h.payload_len);
                prop_assert_eq!(h.ext_len + h.payload_len, len);
                prop_assert!(h.ext_len <= ipv6::MAX_EXT_HEADERS * 32);
            }
        }
    }

    /// Neighbor Discovery messages with well-framed options of random content: parsing never
    /// panics, and whatever parses, re-emits to a message that parses the same.
    #[test]
    fn ndp_reparse_is_stable(
        kind in prop::sample::select(vec![133u8, 134, 135, 136]),
        fixed in proptest::collection::vec(any::<u8>(), 24),
        options in proptest::collection::vec((opt_kind(), 0u8..6, proptest::collection::vec(any::<u8>(), 46)), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let fixed_len = match kind {
            133 => ndp::RS_LEN,
            134 => ndp::RA_LEN,
            _ => ndp::NS_LEN,
        };
        let mut b = fixed[..fixed_len].to_vec();
        b[0] = kind;
        b[1] = 0;
        for (k, units, body) in options {
            b.push(k);
            b.push(units);
            b.extend_from_slice(&body[..(units as usize * 8).saturating_sub(2)]);
        }
        let mut out = vec![0u8; 4096];
        for m in [&b[..], &b[..cut.index(b.len() + 1)]] {
            if let Some(rs) = ndp::RouterSolicit::parse(m) {
                let n = rs.emit(&mut out);
                prop_assert_eq!(ndp::RouterSolicit::parse(&out[..n]), Some(rs));
            }
            if let Some(ra) = ndp::RouterAdvert::parse(m) {
                let n = ra.emit(&mut out);
                prop_assert_eq!(n, ra.emit_len());
                prop_assert_eq!(ndp::RouterAdvert::parse(&out[..n]), Some(ra));
            }
            if let Some(ns) = ndp::NeighborSolicit::parse(m) {
                let n = ns.emit(&mut out);
                prop_assert_eq!(ndp::NeighborSolicit::parse(&out[..n]), Some(ns));
            }
            if let Some(na) = ndp::NeighborAdvert::parse(m) {
                let n = na.emit(&mut out);
                prop_assert_eq!(ndp::NeighborAdvert::parse(&out[..n]), Some(na));
            }
        }
    }

    #[test]
    fn router_advert_roundtrip(
        fixed in (any::<u8>(), any::<bool>(), any::<bool>(), any::<u16>(), any::<u32>(), any::<u32>()),
        source_lladdr in proptest::option::of(any::<[u8; 6]>()),
        mtu in proptest::option::of(any::<u32>()),
        prefixes in proptest::collection::vec(
            (any::<u128>(), any::<u8>(), any::<bool>(), any::<bool>(), any::<u32>(), any::<u32>()), 0..4),
        rdnss in proptest::option::of((any::<u32>(), proptest::collection::vec(any::<u128>(), 1..6))),
        dnssl in proptest::option::of((any::<u32>(), proptest::collection::vec("[a-z0-9-]{1,20}(\\.[a-z0-9-]{1,20}){0,3}", 1..5))),
    ) {
        let ra = ndp::RouterAdvert {
            cur_hop_limit: fixed.0,
            managed: fixed.1,
            other: fixed.2,
            router_lifetime: fixed.3,
            reachable_ms: fixed.4,
            retrans_ms: fixed.5,
            source_lladdr,
            mtu,
            prefixes: prefixes
                .into_iter()
                .map(|p| ndp::PrefixInfo {
                    prefix: Ipv6Addr::from(p.0),
                    prefix_len: p.1,
                    on_link: p.2,
                    autonomous: p.3,
                    valid_lifetime: p.4,
                    preferred_lifetime: p.5,
                })
                .collect(),
            rdnss: rdnss.map(|(l, a)| (l, a.into_iter().map(Ipv6Addr::from).collect())),
            dnssl,
        };
        let mut out = vec![0u8; ra.emit_len()];
        let n = ra.emit(&mut out);
        prop_assert_eq!(n, out.len());
        icmpv6::fill_checksum(&mut out, Ipv6Addr::LOCALHOST, ndp::ALL_NODES);
        prop_assert!(icmpv6::Icmpv6Header::parse(&out, Ipv6Addr::LOCALHOST, ndp::ALL_NODES).is_some());
        prop_assert_eq!(ndp::RouterAdvert::parse(&out), Some(ra));
    }

    #[test]
    fn tcp_reparse_is_stable(data in proptest::collection::vec(any::<u8>(), 20..80)) {
        // (A guest's header may hold more options than usernet ever emits together, e.g.
        // timestamps and SACK-permitted beside three SACK blocks: usernet never emits a
        // guest's header, so only those it could emit are re-emitted.)
        if let Some((h, _)) = tcp::TcpHeader::parse(&data).filter(|(h, _)| h.emit_len() <= tcp::MAX_EMIT_LEN) {
            let mut out = vec![0u8; tcp::MAX_EMIT_LEN];
            let e = h;
            e.emit(&mut out, 0, std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv4Addr::LOCALHOST.into());
            let (again, _) = tcp::TcpHeader::parse(&out[..e.emit_len()]).unwrap();
            prop_assert_eq!(again, e);
        }
    }
}
