//! ICMP echo flows: the guest's pings (IPv4 and IPv6) leave through a host ICMP socket.
//!
//! An unprivileged ping socket (SOCK_DGRAM/IPPROTO_ICMP or IPPROTO_ICMPV6) when the host
//! allows them (net.ipv4.ping_group_range, which covers both families), otherwise a raw
//! ICMP socket when usernet runs as root (an ICMPv6 raw socket gets no IP header).
//! One socket per (guest, destination, identifier); replies go back to the guest with its
//! own identifier. The kernel picks the identifier of a ping socket, and a raw socket sees
//! every ICMP packet from the destination, so replies are matched by type and identifier.

use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::engine::dial::IcmpKind;
use crate::engine::sock;
use crate::engine::switch::{ICMP_DATA_OFF, Switch, max_l4_len};
use usernet_wire::icmp::{self, IcmpHeader};
use usernet_wire::icmpv6;
use usernet_wire::ipv4::Ipv4Header;

use super::ReadRound;
use super::tcp::Verdict;

pub const IDLE: Duration = Duration::from_secs(10);

pub struct IcmpFlow {
    pub guest: IpAddr,
    pub remote: IpAddr,
    /// The guest's echo identifier.
    pub ident: u16,
    pub sock: OwnedFd,
    kind: IcmpKind,
    pub last_used: Instant,
    pub scheduled: Option<Instant>,
    /// Bytes each way (whole ICMP messages), for `/v1/flows` (activity is `last_used`).
    pub traffic: super::Traffic,
}

impl IcmpFlow {
    pub fn new(guest: IpAddr, remote: IpAddr, ident: u16, sock: OwnedFd, kind: IcmpKind, now: Instant) -> IcmpFlow {
        IcmpFlow {
            guest,
            remote,
            ident,
            sock,
            kind,
            last_used: now,
            scheduled: None,
            traffic: super::Traffic::new(now),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        Some(self.last_used + IDLE)
    }

    /// The guest's echo request, the whole ICMP message (header and data, checksum valid).
    pub fn from_guest(&mut self, message: &[u8], now: Instant) {
        self.last_used = now;
        self.traffic.from_guest += message.len() as u64;
        if let Err(e) = sock::send(self.sock.as_fd(), message) {
            tracing::debug!("ping {} -> {}: {e}", self.guest, self.remote);
        }
    }

    /// Replies arrived: each goes to the guest. At most 256 a wakeup.
    pub fn on_readable(&mut self, switch: &mut Switch, now: Instant) -> (Verdict, ReadRound) {
        let mut pkt = [0u8; 65536];
        for _ in 0..256 {
            let n = match sock::recv(self.sock.as_fd(), &mut pkt, false) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return (Verdict::Keep, ReadRound::Drained),
                Err(e) => {
                    tracing::debug!("ping {} <- {}: {e}", self.guest, self.remote);
                    continue;
                }
            };
            let v6 = self.remote.is_ipv6();
            let message = match (self.kind, v6) {
                (IcmpKind::Raw, false) => match Ipv4Header::parse(&pkt[..n]) {
                    Some((_, payload)) => payload,
                    None => continue,
                },
                _ => &pkt[..n],
            };
            // The kernel checked an ICMPv6 reply's checksum (over a pseudo-header usernet
            // does not see); an ICMPv4 one carries its own.
            let (h, data) = match v6 {
                false => match IcmpHeader::parse(message) {
                    Some(x) => x,
                    None => continue,
                },
                true if message.len() >= icmp::HEADER_LEN => (
                    IcmpHeader {
                        kind: message[0],
                        code: message[1],
                        rest: [message[4], message[5], message[6], message[7]],
                    },
                    &message[icmp::HEADER_LEN..],
                ),
                true => continue,
            };
            let reply_type = if v6 { icmpv6::TYPE_ECHO_REPLY } else { icmp::TYPE_ECHO_REPLY };
            if h.kind != reply_type || (self.kind == IcmpKind::Raw && h.ident() != self.ident) {
                continue;
            }
            let room = switch.buf().len() - ICMP_DATA_OFF;
            // Beyond the guest's MTU the reply goes in fragments (`Switch::fragment`).
            let len = data.len().min(room).min(max_l4_len(v6) - icmp::HEADER_LEN);
            switch.buf()[ICMP_DATA_OFF..ICMP_DATA_OFF + len].copy_from_slice(&data[..len]);
            let reply = IcmpHeader::echo(reply_type, self.ident, h.seq());
            match (self.remote, self.guest) {
                (IpAddr::V4(r), IpAddr::V4(g)) => switch.send_icmp(r, g, &reply, len),
                (IpAddr::V6(r), IpAddr::V6(g)) => switch.send_icmpv6(r, g, &reply, len, None),
                _ => continue,
            }
            self.last_used = now;
            self.traffic.to_guest += (len + icmp::HEADER_LEN) as u64;
        }
        (Verdict::Keep, ReadRound::Capped)
    }

    pub fn on_timer(&mut self, now: Instant) -> Verdict {
        if now >= self.last_used + IDLE { Verdict::Close } else { Verdict::Keep }
    }
}
