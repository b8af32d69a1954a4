//! A small synchronous rtnetlink client: bring links up, set MAC and MTU, give a link its
//! root queueing discipline, add IPv4 and IPv6 addresses and default routes, in the
//! network namespace of the calling thread.
//!
//! Theory of operation. Each call builds one rtnetlink request with `netlink-packet-route`,
//! sends it with NLM_F_REQUEST | NLM_F_ACK on a NETLINK_ROUTE socket from `netlink-sys`, and
//! reads replies until the kernel's acknowledgement for that sequence number arrives: an
//! NLMSG_ERROR with code 0 is success, any other code is returned as the matching
//! `io::Error`. Reading is bounded; nothing here is asynchronous, because it runs in the
//! freshly forked sandbox process before COMMAND starts, where no runtime exists.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::tc::{TcAttribute, TcHandle, TcMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// An rtnetlink socket bound in the current network namespace.
pub struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    pub fn open() -> io::Result<Rtnl> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind_auto()?;
        sock.connect(&SocketAddr::new(0, 0))?;
        Ok(Rtnl { sock, seq: 0 })
    }

    /// Sets the link's MAC address and MTU when given, and brings it up or down.
    pub fn set_link(&mut self, index: u32, mac: Option<[u8; 6]>, mtu: Option<u32>, up: bool) -> io::Result<()> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.change_mask = LinkFlags::Up;
        if up {
            msg.header.flags = LinkFlags::Up;
        }
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        if let Some(mtu) = mtu {
            msg.attributes.push(LinkAttribute::Mtu(mtu));
        }
        self.request(RouteNetlinkMessage::SetLink(msg), 0)
    }

    /// Gives the link a root queueing discipline of kind `kind` (`tc qdisc add dev LINK
    /// root KIND`, with its default options).
    pub fn add_root_qdisc(&mut self, index: u32, kind: &str) -> io::Result<()> {
        let mut msg = TcMessage::default();
        msg.header.index = i32::try_from(index).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        msg.header.parent = TcHandle::ROOT;
        msg.attributes.push(TcAttribute::Kind(kind.to_string()));
        self.request(RouteNetlinkMessage::NewQueueDiscipline(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Adds `addr/prefix` to the link, with the subnet's broadcast address.
    pub fn add_ipv4_address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        if prefix > 32 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let host_bits = u32::MAX.checked_shr(prefix as u32).unwrap_or(0);
        let broadcast = Ipv4Addr::from(u32::from(addr) | host_bits);
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.attributes = vec![
            AddressAttribute::Local(addr.into()),
            AddressAttribute::Address(addr.into()),
            AddressAttribute::Broadcast(broadcast),
        ];
        self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Adds the IPv4 default route via `gateway` out of the link.
    pub fn add_ipv4_default_route(&mut self, index: u32, gateway: Ipv4Addr) -> io::Result<()> {
        self.add_default_route(index, AddressFamily::Inet, RouteAddress::Inet(gateway))
    }

    /// Adds an IPv6 address to the link, usable at once (no duplicate address detection:
    /// usernet chose it, and is the only other node that answers on the link).
    pub fn add_ipv6_address(&mut self, index: u32, addr: Ipv6Addr, prefix: u8) -> io::Result<()> {
        if prefix > 128 {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet6;
        msg.header.prefix_len = prefix;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.attributes = vec![AddressAttribute::Address(addr.into()), AddressAttribute::Flags(AddressFlags::Nodad)];
        self.request(RouteNetlinkMessage::NewAddress(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Adds the IPv6 default route via `gateway` (a link-local address) out of the link.
    pub fn add_ipv6_default_route(&mut self, index: u32, gateway: Ipv6Addr) -> io::Result<()> {
        self.add_default_route(index, AddressFamily::Inet6, RouteAddress::Inet6(gateway))
    }

    fn add_default_route(&mut self, index: u32, family: AddressFamily, gateway: RouteAddress) -> io::Result<()> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.destination_prefix_length = 0;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = vec![RouteAttribute::Gateway(gateway), RouteAttribute::Oif(index)];
        self.request(RouteNetlinkMessage::NewRoute(msg), NLM_F_CREATE | NLM_F_EXCL)
    }

    /// Sends one request and waits for its acknowledgement.
    fn request(&mut self, inner: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        let sent = self.sock.send(&buf, 0)?;
        if sent != buf.len() {
            return Err(io::Error::other("short netlink send"));
        }

        // Replies to earlier requests cannot be pending (each waited for its ack), so the
        // ack comes within a few datagrams; stay bounded anyway.
        for _ in 0..64 {
            let mut rx: Vec<u8> = Vec::with_capacity(64 * 1024);
            let n = self.sock.recv(&mut rx, 0)?;
            if n > rx.len() {
                return Err(io::Error::other("truncated netlink reply"));
            }
            if let Some(result) = find_ack(&rx, seq)? {
                return result;
            }
        }
        Err(io::Error::other("no netlink acknowledgement"))
    }
}

/// Looks for the acknowledgement of request `seq` among the messages of one datagram.
fn find_ack(mut data: &[u8], seq: u32) -> io::Result<Option<io::Result<()>>> {
    while !data.is_empty() {
        let buf =
            NetlinkBuffer::new_checked(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        let len = buf.length() as usize;
        if len == 0 || len > data.len() {
            break;
        }
        let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[..len])
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
        if msg.header.sequence_number == seq
            && let NetlinkPayload::Error(err) = msg.payload
        {
            return Ok(Some(match err.code {
                None => Ok(()),
                Some(_) => Err(err.to_io()),
            }));
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        data = data.get(next..).unwrap_or(&[]);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::ErrorMessage;
    use std::num::NonZeroI32;

    fn ack(seq: u32, code: i32) -> Vec<u8> {
        let mut header = NetlinkHeader::default();
        header.sequence_number = seq;
        let mut err = ErrorMessage::default();
        err.code = NonZeroI32::new(code);
        let mut msg = NetlinkMessage::<RouteNetlinkMessage>::new(header, NetlinkPayload::Error(err));
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        buf
    }

    #[test]
    fn ack_and_nack() {
        assert!(matches!(find_ack(&ack(7, 0), 7), Ok(Some(Ok(())))));
        let nack = find_ack(&ack(7, -libc::EEXIST), 7).unwrap().unwrap().unwrap_err();
        assert_eq!(nack.raw_os_error(), Some(libc::EEXIST));
        // Another request's ack is not ours.
        assert!(matches!(find_ack(&ack(6, 0), 7), Ok(None)));
        // Two messages in one datagram.
        let mut two = ack(6, 0);
        two.extend(ack(7, -libc::EPERM));
        let e = find_ack(&two, 7).unwrap().unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(find_ack(&[1, 2, 3], 1).is_err());
        assert!(matches!(find_ack(&[], 1), Ok(None)));
        let mut bad = ack(1, 0);
        bad[0] = 0xff; // length larger than the datagram
        assert!(find_ack(&bad, 1).is_err());
    }
}
