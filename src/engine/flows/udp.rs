//! UDP flows: one connected host socket per guest (address, port) → destination pair.
//!
//! Guest datagrams are sent on the flow's socket; whatever the socket receives goes back
//! to the guest from the destination the guest addressed. A flow expires after an idle
//! time; the engine also caps their number and evicts the least recently used. A host
//! socket that reports ECONNREFUSED (an ICMP port unreachable from the far end) gives the
//! guest an ICMP port unreachable too.

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::engine::tx::{GuestTx, UDP_PAYLOAD_OFF};
use crate::wire::icmp;
use crate::wire::ipv4::Ipv4Header;
use crate::wire::{PROTO_UDP, put16};

use super::tcp::Verdict;

/// Idle time after which a UDP flow is closed.
pub const IDLE: Duration = Duration::from_secs(60);
/// Idle time for queries to the gateway's DNS (one flow per query port).
pub const IDLE_DNS: Duration = Duration::from_secs(10);

pub struct UdpFlow {
    pub guest: SocketAddrV4,
    pub remote: SocketAddrV4,
    pub sock: OwnedFd,
    pub last_used: Instant,
    idle: Duration,
    pub scheduled: Option<Instant>,
}

impl UdpFlow {
    pub fn new(
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        sock: OwnedFd,
        idle: Duration,
        now: Instant,
    ) -> UdpFlow {
        UdpFlow {
            guest,
            remote,
            sock,
            last_used: now,
            idle,
            scheduled: None,
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        Some(self.last_used + self.idle)
    }

    /// A datagram from the guest. A socket that cannot take it now drops it, as a full
    /// network would.
    pub fn from_guest(&mut self, payload: &[u8], now: Instant) {
        self.last_used = now;
        if let Err(e) = crate::engine::sock::send(self.sock.as_raw_fd(), payload) {
            tracing::debug!("udp {} -> {}: {e}", self.guest, self.remote);
        }
    }

    /// Datagrams arrived on the host socket: pass them all to the guest.
    pub fn on_readable(&mut self, tx: &mut GuestTx, now: Instant) -> Verdict {
        let fd = self.sock.as_raw_fd();
        let max = tx.max_udp_payload();
        for _ in 0..1024 {
            let buf = &mut tx.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + max];
            // SAFETY: buf is valid for writes of its length; MSG_TRUNC reports the real size.
            let r = unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
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
                tracing::debug!(
                    "udp {} <- {}: {n}-byte datagram exceeds the MTU; dropped",
                    self.guest,
                    self.remote
                );
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
        if now >= self.last_used + self.idle {
            Verdict::Close
        } else {
            Verdict::Keep
        }
    }
}
