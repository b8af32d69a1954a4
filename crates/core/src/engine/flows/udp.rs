//! UDP flows: one connected host socket per guest (address, port) → destination pair.
//!
//! Guest datagrams are sent on the flow's socket; whatever the socket receives goes back
//! to the guest from the destination the guest addressed. A flow expires after an idle
//! time; the engine also caps their number and evicts the least recently used. A host
//! socket that reports ECONNREFUSED (an ICMP port unreachable from the far end) gives the
//! guest an ICMP port unreachable too.
//!
//! A flow to the gateway's DNS (one per query port, as resolvers pick a fresh port per
//! lookup) is bound to a SOCK_SEQPACKET socketpair served on the services' runtime
//! (services/mod.rs): it ends when the service closes its end (0 bytes read), and, once
//! every query it carried has had its answer, after [`IDLE_DNS_ANSWERED`] instead of
//! [`IDLE_DNS`], so that a guest's lookups do not keep two descriptors each for long.
//!
//! An outbound flow's socket has UDP_GRO (dial.rs): datagrams of one size that arrive
//! together come in one read, and go to the guest as one segmented frame (USO) that the
//! guest's kernel cuts, where its link takes them, or else cut here one by one
//! (`Switch::send_udp_segments`).
//!
//! A published UDP port makes inbound flows: datagrams from one client address arrive on
//! the shared listening socket and go to the guest from the client's (mapped) address;
//! the guest's replies leave through that listening socket, to the client, gathered and
//! segmented as an outbound flow's are (udp_batch.rs) where [`published_segmenting`]
//! allows.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::engine::sock;
use crate::engine::switch::{Switch, Unreachable};
use usernet_wire::{PROTO_UDP, put16};

use super::ReadRound;
use super::tcp::Verdict;

/// Idle time after which a UDP flow is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// Idle time for queries to the gateway's DNS (one flow per query port).
pub const IDLE_DNS: Duration = Duration::from_secs(10);
/// Idle time of a gateway DNS flow whose every query has been answered.
pub const IDLE_DNS_ANSWERED: Duration = Duration::from_secs(1);

/// Where an inbound flow's replies go: the listener's socket and the real client.
pub struct Inbound {
    /// The published port's socket, shared with its listener (which ends this flow when
    /// it is unpublished).
    pub listener: Rc<OwnedFd>,
    pub listener_id: u32,
    pub client: SocketAddr,
}

/// How far a published port's answers to `client` may be segmented, on a kernel that
/// segments (`kernel_segments`). They leave on the port's unconnected socket, whose route
/// MTU cannot be read (IP_MTU wants a connected socket), so over IPv4 only to a client on
/// the loopback, where DF means nothing; over IPv6 as far as an outbound flow's (a
/// datagram above the route's MTU is refused, and they go one by one).
pub fn published_segmenting(kernel_segments: bool, client: SocketAddr) -> sock::Segmenting {
    match client.ip() {
        _ if !kernel_segments => sock::Segmenting::Never,
        IpAddr::V4(v4) if v4.is_loopback() => sock::Segmenting::Full,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if v4.is_loopback() => sock::Segmenting::Full,
            Some(_) => sock::Segmenting::Never,
            None => sock::Segmenting::Full,
        },
        IpAddr::V4(_) => sock::Segmenting::Never,
    }
}

/// The host side of a UDP flow.
pub enum UdpSocket {
    /// An outbound flow's own connected socket.
    Own(OwnedFd),
    /// A flow of a published port: the shared listening socket and the client.
    Published(Inbound),
}

pub struct UdpFlow {
    pub guest: SocketAddr,
    pub remote: SocketAddr,
    pub socket: UdpSocket,
    pub last_used: Instant,
    idle: Duration,
    pub scheduled: Option<Instant>,
    /// A flow to the gateway's DNS service (see the top of this file).
    pub gateway_dns: bool,
    /// Gateway DNS: queries sent that have had no answer yet.
    unanswered: u32,
    /// Bytes each way, for `/v1/flows` (activity is `last_used`).
    pub traffic: super::Traffic,
    /// Whether, and how far, its own socket's sends may be segmented (udp_batch.rs); a
    /// published port's flow segments by its client's address (`published_segmenting`).
    pub segmenting: crate::engine::sock::Segmenting,
}

impl UdpFlow {
    pub fn new(guest: SocketAddr, remote: SocketAddr, sock: OwnedFd, idle: Duration, now: Instant) -> UdpFlow {
        UdpFlow {
            guest,
            remote,
            socket: UdpSocket::Own(sock),
            last_used: now,
            idle,
            scheduled: None,
            gateway_dns: false,
            unanswered: 0,
            traffic: super::Traffic::new(now),
            segmenting: crate::engine::sock::Segmenting::Never,
        }
    }

    /// A flow to the gateway's DNS service, on the service's socketpair.
    pub fn new_gateway_dns(guest: SocketAddr, remote: SocketAddr, sock: OwnedFd, now: Instant) -> UdpFlow {
        UdpFlow { gateway_dns: true, ..UdpFlow::new(guest, remote, sock, IDLE_DNS, now) }
    }

    /// A datagram of the guest's goes out on the flow's own socket.
    pub fn sent(&mut self, now: Instant) {
        self.last_used = now;
        if self.gateway_dns {
            self.unanswered = self.unanswered.saturating_add(1);
            self.idle = IDLE_DNS;
        }
    }

    pub fn new_inbound(guest: SocketAddr, remote: SocketAddr, inbound: Inbound, now: Instant) -> UdpFlow {
        UdpFlow {
            guest,
            remote,
            socket: UdpSocket::Published(inbound),
            last_used: now,
            idle: IDLE,
            scheduled: None,
            gateway_dns: false,
            unanswered: 0,
            traffic: super::Traffic::new(now),
            segmenting: crate::engine::sock::Segmenting::Never,
        }
    }

    /// The flow's own connected socket (None for flows of a published port).
    pub fn own_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.socket {
            UdpSocket::Own(s) => Some(s.as_fd()),
            UdpSocket::Published(_) => None,
        }
    }

    /// The published port a flow of one belongs to.
    pub fn inbound_mut(&mut self) -> Option<&mut Inbound> {
        match &mut self.socket {
            UdpSocket::Own(_) => None,
            UdpSocket::Published(i) => Some(i),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        Some(self.last_used + self.idle)
    }

    /// Where a guest's datagram of this flow leaves: the socket, and the destination when
    /// that socket is not connected (a published port's listener answering its client).
    pub fn destination(&self) -> (RawFd, Option<SocketAddr>) {
        match &self.socket {
            UdpSocket::Own(s) => (s.as_raw_fd(), None),
            UdpSocket::Published(i) => (i.listener.as_raw_fd(), Some(i.client)),
        }
    }

    /// Datagrams arrived on the host socket: pass them all to the guest. They are read two at
    /// a time, and a read that brings fewer says the queue is empty (see
    /// `sock::recv_two`): a lone reply costs one recvmmsg, not a recv and then a second
    /// that only hears EAGAIN.
    pub fn on_readable(&mut self, switch: &mut Switch, now: Instant) -> (Verdict, ReadRound) {
        let max = switch.max_udp_payload(self.remote.is_ipv6());
        // At most 1024 datagrams a wakeup (those of a coalesced read counted one by one), so
        // that one flood does not hold the loop.
        let mut left = 1024usize;
        while left > 0 {
            let UdpSocket::Own(s) = &self.socket else { return (Verdict::Keep, ReadRound::Drained) };
            let got = match switch.recv_two_udp(s.as_fd(), max) {
                Ok(got) => got,
                Err(e) => {
                    match e.raw_os_error() {
                        Some(libc::ECONNREFUSED) => self.port_unreachable(switch),
                        _ => tracing::debug!("udp {} <- {}: {e}", self.guest, self.remote),
                    }
                    left -= 1;
                    continue;
                }
            };
            for i in 0..got.count {
                if i == 1 {
                    switch.swap_spare();
                }
                left = left.saturating_sub(got.datagrams(i));
                if self.deliver(switch, got.len[i], got.segment[i], max, now) == Verdict::Close {
                    return (Verdict::Close, ReadRound::Drained);
                }
            }
            if got.count < 2 {
                return (Verdict::Keep, ReadRound::Drained);
            }
        }
        (Verdict::Keep, ReadRound::Capped)
    }

    /// One datagram of `n` bytes (its real length) received into the switch's buffer at
    /// UDP_PAYLOAD_OFF, or (`segment` > 0: UDP_GRO) datagrams of `segment` bytes that the
    /// kernel coalesced, the last maybe shorter: sends them to the guest.
    fn deliver(&mut self, switch: &mut Switch, n: usize, segment: usize, max: usize, now: Instant) -> Verdict {
        if n == 0 && self.gateway_dns {
            // The service closed its end (its socketpair is SOCK_SEQPACKET).
            return Verdict::Close;
        }
        if n > max {
            tracing::debug!(
                "udp {} <- {}: {n}-byte datagram is longer than an IP packet to the guest carries; dropped",
                self.guest,
                self.remote
            );
            return Verdict::Keep;
        }
        self.last_used = now;
        if self.gateway_dns {
            self.unanswered = self.unanswered.saturating_sub(1);
            if self.unanswered == 0 {
                self.idle = IDLE_DNS_ANSWERED;
            }
        }
        self.traffic.to_guest += n as u64;
        switch.send_udp_segments(self.remote, self.guest, n, segment);
        Verdict::Keep
    }

    fn port_unreachable(&self, switch: &mut Switch) {
        // The datagram's UDP header (its length unknown here: an empty one's).
        let mut head = [0u8; 8];
        put16(&mut head, 0, self.guest.port());
        put16(&mut head, 2, self.remote.port());
        put16(&mut head, 4, 8);
        switch.send_unreachable(self.guest.ip(), self.remote.ip(), Unreachable::Port, PROTO_UDP, 8, &head);
    }

    pub fn on_timer(&mut self, now: Instant) -> Verdict {
        if now >= self.last_used + self.idle { Verdict::Close } else { Verdict::Keep }
    }
}
