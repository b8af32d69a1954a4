//! Property tests: no parser panics on arbitrary bytes, and whatever parses, re-emits the same.

use proptest::prelude::*;

use super::*;

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
    }

    #[test]
    fn tcp_reparse_is_stable(data in proptest::collection::vec(any::<u8>(), 20..80)) {
        if let Some((h, _)) = tcp::TcpHeader::parse(&data) {
            let mut out = vec![0u8; tcp::MAX_EMIT_LEN];
            let mut e = h;
            e.sack_permitted = false;
            e.emit(&mut out, 0, std::net::Ipv4Addr::LOCALHOST, std::net::Ipv4Addr::LOCALHOST);
            let (again, _) = tcp::TcpHeader::parse(&out[..e.emit_len()]).unwrap();
            prop_assert_eq!(again, e);
        }
    }
}
