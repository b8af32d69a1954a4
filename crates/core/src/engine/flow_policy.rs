//! The flow table's policy: registering a flow's socket with the loop, the book-keeping
//! after every event of a flow (removal, connect accounting, timers, owed ACKs), the
//! timers, and the bounds a guest cannot push past (TCP flows in all and per guest, connects
//! in progress, UDP and ICMP flows, descriptors kept in reserve), with what gives way when
//! one is reached: a new TCP flow gets a RST, the oldest connect or the least recently used
//! UDP or ICMP flow goes (found in O(1): `flows::lru`). Each reach is counted
//! (`usernet_limit_reached_total`) and logged, once per episode (see `metrics::Counters`).

use std::cmp::Reverse;
use std::hash::BuildHasher;
use std::time::Instant;

use mio::Interest;
use mio::unix::SourceFd;

use super::flows::{Flow, FlowId, FlowKey, GuestKey, Kind, ReadRound, Verdict};
use super::metrics::Limit;
use super::{Engine, FLOW_BASE};

/// ICMP echo flows at once.
pub const MAX_ICMP: usize = 256;
/// UDP flows to the gateway's DNS at once (each holds a socketpair: two descriptors, one
/// here and one in the service); past this the least recently used is closed. A resolver
/// uses a fresh port per lookup, and a flow whose queries are answered goes after
/// `flows::udp::IDLE_DNS_ANSWERED`, so a well-behaved guest stays far below it.
pub const MAX_GATEWAY_DNS: usize = 64;

impl Engine {
    /// RFC 6528-style initial sequence numbers: a keyed hash of the flow plus a clock.
    pub(super) fn isn(&self, key: &FlowKey, now: Instant) -> u32 {
        let _ = now;
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros()
            as u64
            / 4;
        (self.isn_hasher.hash_one(key) as u32).wrapping_add(clock as u32)
    }

    pub(super) fn add_flow(&mut self, flow: Flow, interest: Interest) -> Option<FlowId> {
        let fd = flow.fd();
        let guest = match &flow {
            Flow::Tcp(f) => Some(self.guest_key(f.guest.ip())),
            _ => None,
        };
        let id = self.flows.insert(flow, guest);
        let Some(fd) = fd else { return Some(id) };
        if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), id.token(FLOW_BASE), interest) {
            tracing::warn!("cannot watch a flow socket: {e}");
            self.flows.remove(id);
            return None;
        }
        Some(id)
    }

    /// A flow's host socket reported end of stream (EPOLLRDHUP), before [`Self::on_socket`]
    /// hears of its readiness.
    pub(super) fn host_read_closed(&mut self, id: FlowId) {
        if let Some(Flow::Tcp(f)) = self.flows.get_mut(id) {
            f.host_read_closed();
        }
    }

    /// Readiness of a flow's host socket.
    pub(super) fn on_socket(&mut self, id: FlowId, readable: bool, writable: bool, error: bool, now: Instant) {
        if readable {
            // A UDP or ICMP flow's answer: it is in use (no-op for the others).
            self.flows.touch(id);
        }
        let verdict = match self.flows.get_mut(id) {
            Some(Flow::Tcp(f)) => {
                // Held guest data written now that the socket has room moves no frame but
                // an ACK (busy polling judges the round by this too).
                let before = f.traffic.from_guest;
                let verdict = f.on_socket(&mut self.switch, readable, writable, error, now);
                self.round_socket_bytes += f.traffic.from_guest - before;
                verdict
            }
            Some(Flow::Udp(f)) if readable || error => {
                let (verdict, round) = f.on_readable(&mut self.switch, now);
                self.watch_again_if_capped(id, round);
                verdict
            }
            Some(Flow::Icmp(f)) if readable || error => {
                let (verdict, round) = f.on_readable(&mut self.switch, now);
                self.watch_again_if_capped(id, round);
                verdict
            }
            Some(Flow::Splice(f)) => {
                let before = f.traffic.from_guest + f.traffic.to_guest;
                let verdict = f.on_event();
                self.round_socket_bytes += f.traffic.from_guest + f.traffic.to_guest - before;
                if f.refused {
                    self.splice_fallback(id, now);
                    return;
                }
                verdict
            }
            _ => return,
        };
        self.after(id, verdict);
    }

    /// A UDP or ICMP flow's round of reads stopped at its cap: its socket (watched for
    /// reading only) is watched again, so the rest is read in the next rounds.
    fn watch_again_if_capped(&mut self, id: FlowId, round: ReadRound) {
        if round == ReadRound::Capped
            && let Some(fd) = self.flows.get_mut(id).and_then(|f| f.fd())
        {
            self.watch_again(fd, id.token(FLOW_BASE));
        }
    }

    /// Book-keeping after any event of a flow: removal, connect accounting, timers, ACKs.
    pub(super) fn after(&mut self, id: FlowId, verdict: Verdict) {
        if verdict == Verdict::Close {
            // Gathered datagrams name their sockets by descriptor: a UDP flow's leave
            // before its socket closes (and its number is taken by another).
            if !self.udp_batch.is_empty() && matches!(self.flows.get_mut(id), Some(Flow::Udp(_))) {
                self.udp_batch.flush();
            }
            self.flows.remove(id);
            return;
        }
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        if let Flow::Tcp(f) = flow {
            let connected = !f.is_connecting();
            if f.need_ack {
                self.owed_acks.push(id);
            }
            if connected && self.flows.is_counted_connecting(id) {
                self.flows.connected(id);
            }
        }
        self.schedule(id);
    }

    /// Puts the flow's next deadline on the timer heap unless an earlier one is there.
    fn schedule(&mut self, id: FlowId) {
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        let deadline = flow.deadline();
        let scheduled = flow.scheduled_mut();
        if let Some(d) = deadline
            && scheduled.is_none_or(|s| d < s)
        {
            *scheduled = Some(d);
            self.timers.push(Reverse((d, id)));
        }
    }

    pub(super) fn run_timers(&mut self, now: Instant) {
        self.retry_accepts(now);
        if !self.reassembly.is_empty() {
            let dropped = self.reassembly.expire(now);
            self.switch.stats.dropped_in += dropped;
            self.switch.counters.dropped_n(super::metrics::DropReason::Fragment, dropped);
        }
        while let Some(Reverse((d, id))) = self.timers.peek().copied() {
            if d > now {
                break;
            }
            self.timers.pop();
            if self.flows.get_mut(id).map(|flow| *flow.scheduled_mut()) != Some(Some(d)) {
                // The flow is gone, or its deadline moved (a later entry stands for it).
                continue;
            }
            let claimed = self.claim_fallback(id);
            let mut rekey = None;
            let Some(flow) = self.flows.get_mut(id) else { continue };
            *flow.scheduled_mut() = None;
            let verdict = match flow {
                Flow::Tcp(f) => {
                    if f.fallback.is_some() {
                        // It may fall back to IPv4 (TcpFlow::fallback): new addresses.
                        rekey = Some(FlowKey::Tcp { guest: f.guest, remote: f.remote });
                    }
                    f.on_timer(&mut self.switch, now)
                }
                Flow::Udp(f) => f.on_timer(now),
                Flow::Icmp(f) => f.on_timer(now),
                Flow::Splice(_) => Verdict::Keep,
            };
            if let (Some(key), Verdict::Keep) = (rekey, verdict) {
                self.flows.rekey(id, &key);
            }
            self.after(id, verdict);
            self.unclaim_unused(claimed, id);
        }
    }

    /// Writes the guest data flows gathered this round, then sends the ACKs owed.
    pub(super) fn flush_acks(&mut self, now: Instant) {
        let mut owed = std::mem::take(&mut self.owed_acks);
        for &id in &owed {
            let Some(Flow::Tcp(f)) = self.flows.get_mut(id) else { continue };
            if f.write_gathered(&mut self.switch, now) == Verdict::Close {
                self.after(id, Verdict::Close);
                continue;
            }
            f.flush_ack(&mut self.switch, now);
            // Data held for the rest of the guest's write has a deadline of its own.
            self.schedule(id);
        }
        owed.clear();
        self.owed_acks = owed;
    }

    /// Says that `limit` was reached, counting it; the log line (`what`) goes out once per
    /// episode (see `metrics::Counters::limit_reached`).
    pub(super) fn limit_reached(&mut self, limit: Limit, now: Instant, what: impl FnOnce() -> String) {
        self.switch.limit_reached(limit, now, what);
    }

    /// Whom a flow of the guest at `ip` counts against (see [`GuestKey`]).
    pub(super) fn guest_key(&self, ip: std::net::IpAddr) -> GuestKey {
        self.switch.mac_of(ip).map_or(GuestKey::Addr(ip), GuestKey::Mac)
    }

    /// Whether a guest at `guest` may open one more TCP flow: not beyond `--max-tcp-flows`
    /// in all nor `--max-tcp-flows-per-guest` for it (else the limit is counted and logged).
    pub(super) fn may_open_tcp(&mut self, guest: std::net::IpAddr, now: Instant) -> bool {
        let limits = self.cfg.limits;
        if self.flows.tcp_count >= limits.max_tcp_flows {
            self.limit_reached(Limit::TcpFlows, now, || {
                format!("{} TCP flows open (--max-tcp-flows): new connections get a RST", limits.max_tcp_flows)
            });
            return false;
        }
        if self.flows.tcp_of_guest(self.guest_key(guest)) >= limits.max_tcp_flows_per_guest {
            self.limit_reached(Limit::TcpFlowsPerGuest, now, || {
                format!(
                    "guest {guest} has {} TCP flows open (--max-tcp-flows-per-guest): its new connections get a RST",
                    limits.max_tcp_flows_per_guest
                )
            });
            return false;
        }
        true
    }

    /// Whether a new guest flow may keep the socket `fd`: descriptors are allocated lowest
    /// first, so one numbered at or past the limit less `--fd-reserve` means that at least
    /// that many are open, and the reserve is kept for listeners, services and the API.
    pub(super) fn within_fd_reserve(&mut self, fd: std::os::fd::RawFd, now: Instant) -> bool {
        if (fd as libc::rlim_t) < self.fd_ceiling {
            return true;
        }
        let ceiling = self.fd_ceiling;
        self.limit_reached(Limit::Descriptors, now, || {
            format!("{ceiling} descriptors open, the rest kept in reserve (--fd-reserve): new guest flows are refused")
        });
        false
    }

    /// A SYN flood must not starve real connections: past `--max-pending-connects`, the
    /// oldest pending connect goes.
    pub(super) fn bound_connecting(&mut self, now: Instant) {
        let max = self.cfg.limits.max_pending_connects;
        if self.flows.count(Kind::Connecting) < max {
            return;
        }
        self.limit_reached(Limit::PendingConnects, now, || {
            format!("{max} connects in progress (--max-pending-connects): the oldest is abandoned for each new one")
        });
        if let Some(id) = self.flows.oldest(Kind::Connecting) {
            let v = match self.flows.get_mut(id) {
                Some(Flow::Tcp(f)) => f.connect_failed(&mut self.switch, libc::ETIMEDOUT),
                _ => Verdict::Close,
            };
            self.after(id, v);
        }
    }

    /// Makes room for one more gateway DNS flow (at most [`MAX_GATEWAY_DNS`]).
    pub(super) fn bound_gateway_dns(&mut self, now: Instant) {
        if self.flows.count(Kind::GatewayDns) < MAX_GATEWAY_DNS {
            return;
        }
        self.limit_reached(Limit::GatewayDns, now, || {
            format!(
                "the guests have {MAX_GATEWAY_DNS} DNS flows to the gateway open (one per source port): \
                 the least recently used is closed for each new one"
            )
        });
        self.evict_oldest(Kind::GatewayDns);
    }

    /// Makes room for one more UDP flow (at most `--max-udp-flows`, gateway DNS included).
    pub(super) fn bound_udp(&mut self, now: Instant) {
        let max = self.cfg.limits.max_udp_flows;
        if self.flows.udp_count < max {
            return;
        }
        self.limit_reached(Limit::UdpFlows, now, || {
            format!("{max} UDP flows open (--max-udp-flows): the least recently used is closed for each new one")
        });
        if self.flows.count(Kind::Udp) > 0 {
            self.evict_oldest(Kind::Udp);
        } else {
            self.evict_oldest(Kind::GatewayDns);
        }
    }

    /// Makes room for one more ICMP echo flow (at most [`MAX_ICMP`]).
    pub(super) fn bound_icmp(&mut self, now: Instant) {
        if self.flows.icmp_count < MAX_ICMP {
            return;
        }
        self.limit_reached(Limit::IcmpFlows, now, || {
            format!("{MAX_ICMP} ICMP echo flows open: the least recently used is closed for each new one")
        });
        self.evict_oldest(Kind::Icmp);
    }

    /// Closes the least recently used flow of a kind (UDP and ICMP caps).
    fn evict_oldest(&mut self, kind: Kind) {
        // Gathered datagrams name their sockets by descriptor: send them before any closes.
        self.udp_batch.flush();
        if let Some(id) = self.flows.oldest(kind) {
            self.flows.remove(id);
        }
    }
}
