//! The drain: `usernet run` passes on what the guest sent before its command exited.
//!
//! # Theory of operation
//!
//! A program that writes to a socket and exits leaves its last bytes in its kernel's send
//! buffer: the kernel sends them, then the FIN, after the program is gone. Inside `usernet
//! run` that kernel is the guest's, and the bytes reach the host only through the engine.
//! So when the supervisor says the command exited, the engine does not stop at once (as it
//! did, which cut such transfers short: a 50 MB upload to a slow reader lost the last 2 to
//! 25 MB, and the reader saw a clean end of stream). It drains: the loop runs on while any
//! connection is still sending from the guest ([`Flow::guest_still_sending`]: open, and
//! the guest's end of stream not passed on to the host yet), and ends when none is, when
//! none moved a byte toward the host for the idle bound given to
//! [`Engine::drain_after_exit`] (a reader that stopped reading; a guest whose socket was
//! lost), or when a signal comes (`Supervisor::interrupts_drain`). The command's leftover
//! processes are killed before it starts (`run`'s supervisor does it when it sees the
//! command exit), so every guest socket has been closed and ends with a FIN (or a reset)
//! after its data.
//!
//! Whatever is still sending when the engine shuts down is reset (`shutdown`): its host
//! socket closes with SO_LINGER 0, so the host's peer reads an error, not an end of stream
//! that would pass a cut transfer for a whole one.
//!
//! Only flows that carry the guest's data count: a download the guest was receiving when
//! it exited ends at once (the guest's kernel resets a closed socket that gets data), and a
//! connection whose guest side has finished (its FIN passed on) does not hold the exit
//! while the host's side stays open. The check runs at most every [`CHECK_EVERY`], which
//! also bounds the loop's sleep meanwhile. With `--engine-threads`, every engine reports
//! its own flows to engine 0 through the set (`ShardSet::report_drain`), which sums them.

use std::time::{Duration, Instant};

use super::Engine;
use super::flows::Flow;

/// How often a draining engine looks at its flows, at most, and the longest it sleeps.
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(10);

/// The guest's data still on its way: connections, and bytes they moved so far from the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sending {
    pub flows: u64,
    pub from_guest: u64,
}

impl Sending {
    /// Not reported yet (another engine's part, before its first look).
    pub const UNKNOWN: Sending = Sending { flows: u64::MAX, from_guest: 0 };

    pub fn plus(self, o: Sending) -> Sending {
        Sending { flows: self.flows.saturating_add(o.flows), from_guest: self.from_guest.wrapping_add(o.from_guest) }
    }
}

/// A drain under way (engine 0's).
pub(super) struct Drain {
    /// The supervisor's exit code, returned when the drain ends.
    pub code: i32,
    idle: Duration,
    /// The bytes the draining flows had moved when last looked at (None before the first
    /// look), and since when.
    moved: Option<u64>,
    still_since: Instant,
    next_check: Instant,
    started: Instant,
    /// The supervisor was told that the drain waits for some connection.
    told: bool,
}

impl Drain {
    pub fn new(code: i32, idle: Duration, now: Instant) -> Drain {
        Drain { code, idle, moved: None, still_since: now, next_check: now, started: now, told: false }
    }

    /// Whether it is time to look at what is still sending (every [`CHECK_EVERY`]).
    pub fn due(&mut self, now: Instant) -> bool {
        if now < self.next_check {
            return false;
        }
        self.next_check = now + CHECK_EVERY;
        true
    }

    /// True the first time something is still sending (`s`): the supervisor is to be told
    /// (`Supervisor::draining`).
    pub fn tell(&mut self, s: Sending) -> bool {
        let tell = s.flows > 0 && s.flows != Sending::UNKNOWN.flows && !self.told;
        self.told |= tell;
        tell
    }

    /// Whether the drain is over, given what is still sending now (`s`).
    pub fn over(&mut self, s: Sending, now: Instant) -> bool {
        if s.flows == 0 {
            tracing::debug!("drained in {:?}", now.saturating_duration_since(self.started));
            return true;
        }
        if self.moved != Some(s.from_guest) {
            self.moved = Some(s.from_guest);
            self.still_since = now;
            return false;
        }
        if now.saturating_duration_since(self.still_since) < self.idle {
            return false;
        }
        if s.flows != Sending::UNKNOWN.flows {
            tracing::warn!(
                "after the command exited, the guest's data on {} connection(s) did not move for {:?}: \
                 they are reset",
                s.flows,
                self.idle
            );
        }
        true
    }
}

impl Engine {
    /// When the supervisor says stop (`run`: the command exited), pass on what the guest
    /// is still sending first, for as long as it moves: see the module's documentation.
    /// `idle`: how long the guest's data may not move before the rest is reset.
    pub fn drain_after_exit(&mut self, idle: Duration) {
        self.drain_idle = Some(idle);
    }

    /// This engine's flows that still carry the guest's data, and the bytes they moved.
    pub(super) fn sending(&self) -> Sending {
        let mut s = Sending::default();
        for (_, f) in self.flows.ids() {
            if f.guest_still_sending() {
                s.flows += 1;
                s.from_guest = s.from_guest.wrapping_add(f.traffic().from_guest);
            }
        }
        s
    }

    /// Engine 0's part and every other engine's, as they last reported it.
    pub(super) fn sending_everywhere(&self) -> Sending {
        let own = self.sending();
        match &self.shard {
            Some(shard) => shard.set.drain_reports(shard.index).into_iter().fold(own, Sending::plus),
            None => own,
        }
    }
}

/// The flows the shutdown resets: those the guest was still sending on.
pub(super) fn reset_if_cut(flow: &mut Flow) -> bool {
    let cut = flow.guest_still_sending();
    if cut {
        flow.reset_on_close();
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sending(flows: u64, from_guest: u64) -> Sending {
        Sending { flows, from_guest }
    }

    #[test]
    fn over_when_nothing_sends() {
        let t0 = Instant::now();
        let mut d = Drain::new(3, Duration::from_secs(5), t0);
        assert!(d.over(sending(0, 0), t0));
        assert_eq!(d.code, 3);
    }

    /// The idle bound counts from the last byte moved, not from the start.
    #[test]
    fn over_once_nothing_moved_for_the_idle_bound() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut d = Drain::new(0, 5 * s, t0);
        assert!(!d.over(sending(2, 100), t0));
        assert!(!d.over(sending(2, 100), t0 + 4 * s));
        assert!(!d.over(sending(2, 200), t0 + 4 * s), "moved: the wait starts again");
        assert!(!d.over(sending(2, 200), t0 + 8 * s));
        // A connection that finished changes the sum: progress too.
        assert!(!d.over(sending(1, 150), t0 + 8 * s));
        assert!(!d.over(sending(1, 150), t0 + 12 * s));
        assert!(d.over(sending(1, 150), t0 + 13 * s));
    }

    /// Another engine that has not reported yet holds the drain (up to the idle bound),
    /// and is not taken for a connection still sending.
    #[test]
    fn an_unreported_engine_holds_the_drain_but_is_not_told() {
        let t0 = Instant::now();
        let mut d = Drain::new(0, Duration::from_secs(5), t0);
        let s = sending(0, 0).plus(Sending::UNKNOWN);
        assert!(!d.tell(s));
        assert!(!d.over(s, t0));
        assert!(d.tell(sending(1, 0)));
        assert!(!d.tell(sending(1, 0)), "told once");
        assert!(d.over(s, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn looks_at_most_every_check_period() {
        let t0 = Instant::now();
        let mut d = Drain::new(0, Duration::from_secs(5), t0);
        assert!(d.due(t0));
        assert!(!d.due(t0 + CHECK_EVERY / 2));
        assert!(d.due(t0 + CHECK_EVERY));
    }
}
