//! Every parser of bytes that come from a guest, or from a peer on a guest transport: the
//! frame formats (Ethernet, ARP, IPv4, IPv6 and its extension headers, ICMP, ICMPv6 and
//! neighbour discovery, UDP, TCP, the virtio-net header), QEMU's two
//! stream framings, vpnkit's handshake, and the TLS ClientHello the proxy reads the name from.
//! The first byte picks the parser, the rest is its input.
use usernet_core::link::{qemu, vpnkit};
use usernet_wire::{arp, ethernet, icmp, icmpv6, ipv4, ipv6, ndp, tcp, udp, vnet_hdr};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Some((&which, input)) = data.split_first() else { return };
        match which % 6 {
            0 => {
                let _ = ethernet::EthernetHeader::parse(input);
                let _ = arp::ArpPacket::parse(input);
                let _ = ipv4::Ipv4Header::parse(input);
                let _ = icmp::IcmpHeader::parse(input);
                let _ = udp::UdpHeader::parse(input);
                let _ = ipv6::Ipv6Header::parse(input);
                let _ = icmpv6::Icmpv6Header::parse(input, std::net::Ipv6Addr::UNSPECIFIED, std::net::Ipv6Addr::LOCALHOST);
                let _ = ndp::NeighborSolicit::parse(input);
                let _ = ndp::NeighborAdvert::parse(input);
                let _ = ndp::RouterSolicit::parse(input);
                let _ = ndp::RouterAdvert::parse(input);
            }
            1 => {
                // What parses must re-emit as it was read.
                if let Some((h, _)) = tcp::TcpHeader::parse(input) {
                    let mut out = vec![0u8; tcp::MAX_EMIT_LEN];
                    let mut e = h;
                    e.sack_permitted = false;
                    e.emit(&mut out, 0, std::net::Ipv4Addr::LOCALHOST.into(), std::net::Ipv4Addr::LOCALHOST.into());
                    let (again, _) = tcp::TcpHeader::parse(&out[..e.emit_len()]).expect("re-parse");
                    assert_eq!(again, e);
                }
            }
            2 => {
                let _ = vnet_hdr::VnetHdr::parse(input);
            }
            3 => {
                let _ = qemu::Framing::Be32.parse(input);
                let _ = qemu::Framing::Le16.parse(input);
            }
            4 => {
                if let Some(hello) = input.first_chunk::<{ vpnkit::HELLO_LEN }>() {
                    let _ = vpnkit::parse_hello(hello);
                }
                if let Some(cmd) = input.first_chunk::<{ vpnkit::COMMAND_LEN }>() {
                    let _ = vpnkit::parse_command(cmd);
                }
            }
            _ => {
                let _ = usernet_core::services::proxy::tls::parse_client_hello(input);
            }
        }
    });
}
