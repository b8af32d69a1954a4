//! Stateless DHCPv6 (RFC 8415 section 6.1): the DNS server and the search list for a guest
//! that asks with an Information-Request. usernet's router advertisements set the O flag
//! ("other configuration"), which is what makes NetworkManager, systemd-networkd and
//! dhclient ask; the same answers are in the advertisements' RDNSS and DNSSL options for
//! guests that read those instead.
//!
//! Addresses come from SLAAC only: a Solicit (stateful DHCPv6) gets no answer, so the
//! client keeps the address it made from the prefix. A message with an IA option, or for
//! another server (its Server Identifier not usernet's), is discarded as section 16.12 says.
//!
//! The guest's message is read here, by hand: its type, transaction ID and top-level
//! options, one pass, every length checked. `dhcproto` only encodes the reply: its decoder
//! follows nested options by recursion with no bound, and a 64 KiB message of nested
//! options would overflow the stack (the review of issue 13 found it).

use std::net::Ipv6Addr;

use dhcproto::v6::{DhcpOption, Message, MessageType};
use dhcproto::{Encodable, Encoder};
use hickory_proto::rr::Name;

use crate::config::NetConfig;

/// The port servers listen on, and the one clients send from.
pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;
/// All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1): where clients send.
pub const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
/// How long a client keeps the answer before it asks again (RFC 8415 section 21.23): the
/// search list follows the host's, so not the default day.
pub const REFRESH_S: u32 = 3600;

/// usernet's DUID: DUID-LL (type 3) of the gateway's MAC (hardware type 1, Ethernet).
pub fn server_duid(mac: [u8; 6]) -> Vec<u8> {
    let mut d = vec![0, 3, 0, 1];
    d.extend_from_slice(&mac);
    d
}

/// Message type of an Information-Request (RFC 8415 section 7.3).
const INFORMATION_REQUEST: u8 = 11;
/// Option codes read from a request (section 21).
const OPT_CLIENT_ID: u16 = 1;
const OPT_SERVER_ID: u16 = 2;
const OPT_IA_NA: u16 = 3;
const OPT_IA_TA: u16 = 4;
const OPT_IA_PD: u16 = 25;

/// What usernet reads of a client's message.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    kind: u8,
    xid: [u8; 3],
    client_id: Option<&'a [u8]>,
    server_id: Option<&'a [u8]>,
    has_ia: bool,
}

/// Reads a message's header and top-level options; None when an option runs past the end.
fn parse(msg: &[u8]) -> Option<Request<'_>> {
    let (&kind, rest) = msg.split_first()?;
    let xid = *rest.first_chunk::<3>()?;
    let mut req = Request { kind, xid, client_id: None, server_id: None, has_ia: false };
    let mut opts = &rest[3..];
    while !opts.is_empty() {
        let head = opts.first_chunk::<4>()?;
        let code = u16::from_be_bytes([head[0], head[1]]);
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let data = opts.get(4..4 + len)?;
        match code {
            OPT_CLIENT_ID => req.client_id = req.client_id.or(Some(data)),
            OPT_SERVER_ID => req.server_id = req.server_id.or(Some(data)),
            OPT_IA_NA | OPT_IA_TA | OPT_IA_PD => req.has_ia = true,
            _ => {}
        }
        opts = &opts[4 + len..];
    }
    Some(req)
}

/// The Reply to one client message (the UDP payload), or None when it gets none.
pub fn reply(cfg: &NetConfig, msg: &[u8]) -> Option<Vec<u8>> {
    let net = cfg.v6?;
    let req = parse(msg)?;
    if req.kind != INFORMATION_REQUEST || req.has_ia {
        return None;
    }
    let duid = server_duid(cfg.gateway_mac);
    if req.server_id.is_some_and(|id| id != duid.as_slice()) {
        return None;
    }
    let mut rep = Message::new_with_id(MessageType::Reply, req.xid);
    let out = rep.opts_mut();
    out.insert(DhcpOption::ServerId(duid));
    if let Some(id) = req.client_id {
        out.insert(DhcpOption::ClientId(id.to_vec()));
    }
    out.insert(DhcpOption::DomainNameServers(vec![net.dns]));
    let search: Vec<Name> =
        cfg.host_dns.upstreams().search.iter().filter_map(|d| Name::from_ascii(format!("{d}.")).ok()).collect();
    if !search.is_empty() {
        out.insert(DhcpOption::DomainSearchList(search));
    }
    out.insert(DhcpOption::InformationRefreshTime(REFRESH_S));
    let mut buf = Vec::with_capacity(128);
    rep.encode(&mut Encoder::new(&mut buf)).ok()?;
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upstreams;
    use dhcproto::v6::OptionCode;
    use dhcproto::{Decodable, Decoder};
    use proptest::prelude::*;

    fn cfg() -> NetConfig {
        let c = NetConfig::default();
        c.host_dns.set_upstreams(Upstreams { search: vec!["corp.example".into()], ..Upstreams::default() });
        c
    }

    fn request(kind: MessageType, extra: Vec<DhcpOption>) -> Vec<u8> {
        let mut m = Message::new_with_id(kind, [1, 2, 3]);
        m.opts_mut().insert(DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 9]));
        for o in extra {
            m.opts_mut().insert(o);
        }
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        buf
    }

    #[test]
    fn an_information_request_gets_the_dns_server_and_search_list() {
        let c = cfg();
        let rep = reply(&c, &request(MessageType::InformationRequest, vec![])).expect("a reply");
        let m = Message::decode(&mut Decoder::new(&rep)).unwrap();
        assert_eq!((m.msg_type(), m.xid()), (MessageType::Reply, [1, 2, 3]));
        let o = m.opts();
        assert_eq!(o.get(OptionCode::ServerId), Some(&DhcpOption::ServerId(server_duid(c.gateway_mac))));
        assert_eq!(o.get(OptionCode::ClientId), Some(&DhcpOption::ClientId(vec![0, 3, 0, 1, 2, 0, 0, 0, 0, 9])));
        assert_eq!(
            o.get(OptionCode::DomainNameServers),
            Some(&DhcpOption::DomainNameServers(vec![c.v6.unwrap().gateway]))
        );
        let Some(DhcpOption::DomainSearchList(names)) = o.get(OptionCode::DomainSearchList) else { panic!("{o:?}") };
        assert_eq!(names.iter().map(|n| n.to_ascii()).collect::<Vec<_>>(), vec!["corp.example."]);
        // Option 32 (dhcproto decodes it as unknown): its code, length 4, the seconds.
        let refresh = [&[0u8, 32, 0, 4][..], &REFRESH_S.to_be_bytes()].concat();
        assert!(rep.windows(8).any(|w| w == refresh.as_slice()), "{rep:?}");
    }

    #[test]
    fn other_messages_get_nothing() {
        let c = cfg();
        // Stateful DHCPv6: addresses come from SLAAC.
        assert!(reply(&c, &request(MessageType::Solicit, vec![])).is_none());
        // For another server.
        let other = DhcpOption::ServerId(vec![0, 3, 0, 1, 1, 1, 1, 1, 1, 1]);
        assert!(reply(&c, &request(MessageType::InformationRequest, vec![other])).is_none());
        // Ours by name: answered.
        let ours = DhcpOption::ServerId(server_duid(c.gateway_mac));
        assert!(reply(&c, &request(MessageType::InformationRequest, vec![ours])).is_some());
        // IPv4 only: no DHCPv6 either.
        let v4 = NetConfig { v6: None, ..NetConfig::default() };
        assert!(reply(&v4, &request(MessageType::InformationRequest, vec![])).is_none());
        // Truncated and empty.
        let full = request(MessageType::InformationRequest, vec![]);
        for n in 0..full.len() {
            let _ = reply(&c, &full[..n]);
        }
    }

    /// Nested options (vendor options in vendor options, 8 bytes a level, as deep as a 64 KiB
    /// datagram allows) are read flat: no recursion, no answer lost.
    #[test]
    fn deeply_nested_options_are_read_flat() {
        let mut nested: Vec<u8> = Vec::new();
        for _ in 0..8000 {
            let mut o = vec![0, 17, 0, 0, 0, 0, 0, 1];
            let len = (4 + nested.len()) as u16;
            o[2..4].copy_from_slice(&len.to_be_bytes());
            o.extend_from_slice(&nested);
            nested = o;
        }
        let mut msg = vec![INFORMATION_REQUEST, 1, 2, 3];
        msg.extend_from_slice(&nested);
        assert!(reply(&cfg(), &msg).is_some());
        let mut short = vec![INFORMATION_REQUEST, 1, 2, 3, 0, 13, 0, 0];
        short.extend_from_slice(&[0, 17, 0, 1]);
        assert!(reply(&cfg(), &short).is_none(), "an option past the end: no answer");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300), kind in 0u8..20) {
            let c = cfg();
            let mut data = data;
            if let Some(first) = data.first_mut() {
                *first = kind;
            }
            let _ = reply(&c, &data);
        }
    }
}
