//! ICMP echo flows: the guest's pings leave through a host ICMP socket.
//!
//! An unprivileged ping socket (SOCK_DGRAM/IPPROTO_ICMP) when the host allows them
//! (net.ipv4.ping_group_range), otherwise a raw ICMP socket when usernet runs as root.
//! One socket per (guest, destination, identifier); replies go back to the guest with its
//! own identifier. The kernel picks the identifier of a ping socket, and a raw socket sees
//! every ICMP packet from the destination, so replies are matched by type and identifier.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::engine::dial::IcmpKind;
use crate::engine::sock;
use crate::engine::switch::{ICMP_DATA_OFF, Switch};
use usernet_wire::icmp::{self, IcmpHeader};
use usernet_wire::ipv4::Ipv4Header;

use super::tcp::Verdict;

pub const IDLE: Duration = Duration::from_secs(10);

pub struct IcmpFlow {
    pub guest: Ipv4Addr,
    pub remote: Ipv4Addr,
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
    pub fn new(guest: Ipv4Addr, remote: Ipv4Addr, ident: u16, sock: OwnedFd, kind: IcmpKind, now: Instant) -> IcmpFlow {
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

    pub fn on_readable(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        let mut pkt = [0u8; 65536];
        for _ in 0..256 {
            let n = match sock::recv(self.sock.as_fd(), &mut pkt, false) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!("ping {} <- {}: {e}", self.guest, self.remote);
                    continue;
                }
            };
            let message = match self.kind {
                IcmpKind::Ping => &pkt[..n],
                IcmpKind::Raw => match Ipv4Header::parse(&pkt[..n]) {
                    Some((_, payload)) => payload,
                    None => continue,
                },
            };
            let Some((h, data)) = IcmpHeader::parse(message) else {
                continue;
            };
            if h.kind != icmp::TYPE_ECHO_REPLY || (self.kind == IcmpKind::Raw && h.ident() != self.ident) {
                continue;
            }
            let room = switch.buf().len() - ICMP_DATA_OFF;
            let len = data.len().min(room).min(switch.mtu - 28);
            switch.buf()[ICMP_DATA_OFF..ICMP_DATA_OFF + len].copy_from_slice(&data[..len]);
            let reply = IcmpHeader::echo(icmp::TYPE_ECHO_REPLY, self.ident, h.seq());
            switch.send_icmp(self.remote, self.guest, &reply, len);
            self.last_used = now;
            self.traffic.to_guest += (len + icmp::HEADER_LEN) as u64;
        }
        Verdict::Keep
    }

    pub fn on_timer(&mut self, now: Instant) -> Verdict {
        if now >= self.last_used + IDLE { Verdict::Close } else { Verdict::Keep }
    }
}
