//! UDP flows: one connected host socket per guest (address, port) → destination pair.
//!
//! Guest datagrams are sent on the flow's socket; whatever the socket receives goes back
//! to the guest from the destination the guest addressed. A flow expires after an idle
//! time; the engine also caps their number and evicts the least recently used. A host
//! socket that reports ECONNREFUSED (an ICMP port unreachable from the far end) gives the
//! guest an ICMP port unreachable too.
//!
//! A published UDP port makes inbound flows: datagrams from one client address arrive on
//! the shared listening socket and go to the guest from the client's (mapped) address;
//! the guest's replies leave through that listening socket, to the client, with sendto.

use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::engine::tx::{GuestTx, UDP_PAYLOAD_OFF};
use usernet_wire::icmp;
use usernet_wire::ipv4::Ipv4Header;
use usernet_wire::{PROTO_UDP, put16};

use super::tcp::Verdict;

/// Idle time after which a UDP flow is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// Idle time for queries to the gateway's DNS (one flow per query port).
pub const IDLE_DNS: Duration = Duration::from_secs(10);

/// Where an inbound flow's replies go: the listener's socket and the real client.
pub struct Inbound {
    pub listener_fd: RawFd,
    pub listener_id: u32,
    pub client: SocketAddr,
}

pub struct UdpFlow {
    pub guest: SocketAddrV4,
    pub remote: SocketAddrV4,
    /// The flow's own connected socket (outbound flows).
    pub sock: Option<OwnedFd>,
    /// For flows of a published port: the shared listener and the client.
    pub inbound: Option<Inbound>,
    pub last_used: Instant,
    idle: Duration,
    pub scheduled: Option<Instant>,
}

impl UdpFlow {
    pub fn new(guest: SocketAddrV4, remote: SocketAddrV4, sock: OwnedFd, idle: Duration, now: Instant) -> UdpFlow {
        UdpFlow { guest, remote, sock: Some(sock), inbound: None, last_used: now, idle, scheduled: None }
    }

    pub fn new_inbound(guest: SocketAddrV4, remote: SocketAddrV4, inbound: Inbound, now: Instant) -> UdpFlow {
        UdpFlow { guest, remote, sock: None, inbound: Some(inbound), last_used: now, idle: IDLE, scheduled: None }
    }

    /// The flow's own connected socket (None for flows of a published port).
    pub fn own_fd(&self) -> Option<RawFd> {
        self.sock.as_ref().map(|s| s.as_raw_fd())
    }

    pub fn deadline(&self) -> Option<Instant> {
        Some(self.last_used + self.idle)
    }

    /// A datagram from the guest. A socket that cannot take it now drops it, as a full
    /// network would.
    pub fn from_guest(&mut self, payload: &[u8], now: Instant) {
        self.last_used = now;
        let res = match (&self.sock, &self.inbound) {
            (Some(s), _) => crate::engine::sock::send(s.as_raw_fd(), payload),
            (None, Some(i)) => crate::engine::sock::send_to(i.listener_fd, payload, i.client),
            (None, None) => Ok(0),
        };
        if let Err(e) = res {
            tracing::debug!("udp {} -> {}: {e}", self.guest, self.remote);
        }
    }

    /// Datagrams arrived on the host socket: pass them all to the guest.
    pub fn on_readable(&mut self, tx: &mut GuestTx, now: Instant) -> Verdict {
        let Some(fd) = self.sock.as_ref().map(|s| s.as_raw_fd()) else { return Verdict::Keep };
        let max = tx.max_udp_payload();
        for _ in 0..1024 {
            let buf = &mut tx.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + max];
            // SAFETY: buf is valid for writes of its length; MSG_TRUNC reports the real size.
            let r = unsafe {
                libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::ECONNREFUSED) => self.port_unreachable(tx),
                    _ => tracing::debug!("udp {} <- {}: {e}", self.guest, self.remote),
                }
                continue;
            }
            let n = r as usize;
            if n > max {
                tracing::debug!("udp {} <- {}: {n}-byte datagram exceeds the MTU; dropped", self.guest, self.remote);
                continue;
            }
            self.last_used = now;
            tx.send_udp(self.remote, self.guest, n);
        }
        Verdict::Keep
    }

    fn port_unreachable(&self, tx: &mut GuestTx) {
        let mut quote = [0u8; 28];
        Ipv4Header::new(*self.guest.ip(), *self.remote.ip(), PROTO_UDP, 8).emit(&mut quote);
        put16(&mut quote, 20, self.guest.port());
        put16(&mut quote, 22, self.remote.port());
        put16(&mut quote, 24, 8);
        tx.send_icmp_error(
            *self.remote.ip(),
            *self.guest.ip(),
            icmp::TYPE_DEST_UNREACHABLE,
            icmp::CODE_PORT_UNREACHABLE,
            &quote,
        );
    }

    pub fn on_timer(&mut self, now: Instant) -> Verdict {
        if now >= self.last_used + self.idle { Verdict::Close } else { Verdict::Keep }
    }
}
