//! The flow table's policy: registering a flow's socket with the loop, the book-keeping
//! after every event of a flow (removal, connect accounting, timers, owed ACKs), the
//! timers, and the bounds a guest cannot push past (connects in progress, UDP and ICMP
//! flows), with what gives way when one is reached.

use std::cmp::Reverse;
use std::hash::BuildHasher;
use std::time::Instant;

use mio::Interest;
use mio::unix::SourceFd;

use super::flows::{Flow, FlowId, FlowKey, Verdict};
use super::{Engine, FLOW_BASE};

/// TCP connects in progress at once; past this the oldest is abandoned (SYN floods).
pub const MAX_CONNECTING: usize = 1024;
/// UDP flows at once; past this the least recently used is closed.
pub const MAX_UDP: usize = 4096;
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
        let id = self.flows.insert(flow);
        let Some(fd) = fd else { return Some(id) };
        if let Err(e) = self.poll.registry().register(&mut SourceFd(&fd), id.token(FLOW_BASE), interest) {
            tracing::warn!("cannot watch a flow socket: {e}");
            self.flows.remove(id);
            return None;
        }
        Some(id)
    }

    /// Readiness of a flow's host socket.
    pub(super) fn on_socket(&mut self, id: FlowId, readable: bool, writable: bool, error: bool, now: Instant) {
        let verdict = match self.flows.get_mut(id) {
            Some(Flow::Tcp(f)) => f.on_socket(&mut self.switch, readable, writable, error, now),
            Some(Flow::Udp(f)) if readable || error => f.on_readable(&mut self.switch, now),
            Some(Flow::Icmp(f)) if readable || error => f.on_readable(&mut self.switch, now),
            Some(Flow::Splice(f)) => f.on_event(),
            _ => return,
        };
        self.after(id, verdict);
    }

    /// Book-keeping after any event of a flow: removal, connect accounting, timers, ACKs.
    pub(super) fn after(&mut self, id: FlowId, verdict: Verdict) {
        if verdict == Verdict::Close {
            if let Some(Flow::Tcp(f)) = self.flows.remove(id)
                && f.counted_connecting
            {
                self.connecting_count -= 1;
            }
            return;
        }
        let Some(flow) = self.flows.get_mut(id) else {
            return;
        };
        if let Flow::Tcp(f) = flow {
            if f.need_ack {
                self.owed_acks.push(id);
            }
            if !f.is_connecting() && f.counted_connecting {
                f.counted_connecting = false;
                self.connecting_count -= 1;
            }
        }
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
        while let Some(Reverse((d, id))) = self.timers.peek().copied() {
            if d > now {
                break;
            }
            self.timers.pop();
            let verdict = match self.flows.get_mut(id) {
                Some(flow) => {
                    if *flow.scheduled_mut() != Some(d) {
                        continue;
                    }
                    *flow.scheduled_mut() = None;
                    match flow {
                        Flow::Tcp(f) => f.on_timer(&mut self.switch, now),
                        Flow::Udp(f) => f.on_timer(now),
                        Flow::Icmp(f) => f.on_timer(now),
                        Flow::Splice(_) => Verdict::Keep,
                    }
                }
                None => continue,
            };
            self.after(id, verdict);
        }
    }

    /// Writes the guest data flows gathered this round, then sends the ACKs owed.
    pub(super) fn flush_acks(&mut self, now: Instant) {
        let mut owed = std::mem::take(&mut self.owed_acks);
        for &id in &owed {
            let Some(Flow::Tcp(f)) = self.flows.get_mut(id) else { continue };
            if f.write_gathered(&mut self.switch) == Verdict::Close {
                self.after(id, Verdict::Close);
                continue;
            }
            f.flush_ack(&mut self.switch, now);
        }
        owed.clear();
        self.owed_acks = owed;
    }

    /// A SYN flood must not starve real connections: the oldest pending connect goes.
    pub(super) fn abandon_oldest_connect(&mut self) {
        while let Some(id) = self.connecting.pop_front() {
            if let Some(Flow::Tcp(f)) = self.flows.get_mut(id)
                && f.is_connecting()
            {
                let v = f.connect_failed(&mut self.switch, libc::ETIMEDOUT);
                self.after(id, v);
                return;
            }
        }
    }

    /// Makes room for one more gateway DNS flow (at most [`MAX_GATEWAY_DNS`]), saying so
    /// once the first time the bound is reached.
    pub(super) fn bound_gateway_dns(&mut self) {
        if self.flows.gateway_dns_count < MAX_GATEWAY_DNS {
            return;
        }
        if !self.flows.told_gateway_dns_bound {
            self.flows.told_gateway_dns_bound = true;
            tracing::warn!(
                "the guest has {MAX_GATEWAY_DNS} DNS flows to the gateway open (one per source port): \
                 from now on the least recently used is closed for each new one (said once)"
            );
        }
        self.evict_oldest(Flow::is_gateway_dns);
    }

    /// Closes the least recently used flow of a kind (UDP and ICMP caps).
    pub(super) fn evict_oldest(&mut self, kind: impl Fn(&Flow) -> bool) {
        // Gathered datagrams name their sockets by descriptor: send them before any closes.
        self.udp_batch.flush();
        let oldest = self
            .flows
            .ids()
            .filter(|(_, f)| kind(f))
            .min_by_key(|(_, f)| match f {
                Flow::Udp(u) => u.last_used,
                Flow::Icmp(i) => i.last_used,
                Flow::Tcp(t) => t.born,
                Flow::Splice(s) => s.born,
            })
            .map(|(id, _)| id);
        if let Some(id) = oldest {
            self.flows.remove(id);
        }
    }
}
