//! Adaptive busy polling of the event loop.
//!
//! Theory of operation. Every request/response crossing usernet wakes it twice (the guest's
//! frame, then the host's answer, or the reverse). A process blocked in epoll_wait sleeps on
//! an idle CPU, and waking an idle CPU is the slowest thing on the path: on virtual machines
//! whose idle vCPUs halt at once, one wakeup costs 100-300 µs, ten times the rest of a round
//! trip. So when the loop runs out of work it may poll without blocking for a short window,
//! and an answer that comes within the window is picked up without any wakeup.
//!
//! The window adapts, as the kernel's haltpoll governor does, to how long the loop actually
//! stayed idle, measured from when it ran out of work to the next event:
//!
//! - idle for at most the window: the spin paid off; the window stays;
//! - idle longer than the window but not longer than the maximum: a longer window would have
//!   caught it, so the window doubles (from [`GROW_START`]) up to the maximum;
//! - idle longer than the maximum: spinning was wasted, so the window halves, and falls to
//!   zero below [`GROW_START`].
//!
//! So a request/response workload (answers in tens of microseconds) keeps a window, while an
//! idle network or a trickle of packets milliseconds apart spins at most a few windows before
//! the window is gone. A bulk transfer runs out of work often too, between bursts, but there
//! the wakeup is not what limits it: the CPU is (the client's and the server's, or a VM's
//! vCPU that sends a segment every few hundred microseconds). So a round of bulk data is
//! followed by sleeping at once, not by spinning: a round that moved more than
//! [`BULK_ROUND_BYTES`] through the links, or whose frames averaged [`BULK_FRAME_BYTES`] or more
//! (data segments near the MTU, not requests, answers and acknowledgements), or whose flows
//! moved more than [`BULK_ROUND_BYTES`] on their host sockets outside the links' frames: a
//! published port's loopback client is spliced socket to socket and moves no frame at all
//! (judged by frames alone, a spliced transfer spun after every round, 130,000 sched_yield(2)
//! calls in 5 s of iperf3, for 6% more CPU per GB and no more throughput), and guest data held
//! while the host socket was full is written when it has room, in a round that sends the
//! guest one ACK. Spinning starts again only after [`LIGHT_ROUNDS_AFTER_BULK`] light rounds in
//! a row: the tail of a stream's write often comes in a round of its own, which alone looks
//! like a request (judged round by round, 2,000-3,000 spins in 5 s of a namespace-to-host
//! iperf3 stream; 60-100 with the two rounds). The
//! idle period still adapts the window, so a request/response exchange after a transfer finds
//! it ready. Each empty poll of the spin is followed by sched_yield(2), so a process sharing
//! usernet's CPU (often the very guest or server it waits for) runs first.
//!
//! It is on by default ([`DEFAULT_MAX`]). Measured on a 2-core VM against `--busy-poll 0`
//! (docs/bench-run1.txt and docs/bench-run2.txt, columns `usernet` and `usernet-no-busy-poll`): the
//! 1-byte round trip 49-52 µs against 86-119, connections per second 1.4-1.5x, and about the
//! same CPU per round trip (52-57 µs against 47-69: the wakeups it saves cost CPU too), with
//! throughput and CPU per GB within the runs' noise; an idle network and a trickle of 100 to about 1,800
//! requests a second cost the same CPU either way. The frame-size half of the bulk rule came
//! from a TCG VM's upload (a full segment every few hundred microseconds): judged by bytes
//! alone, its rounds looked light and spinning cost it 19% more CPU per GB. A maximum of zero
//! turns busy polling off.
//!
//! What spinning cannot buy: a spinning engine keeps its CPU busy, so the kernel wakes the
//! processes it answers (the guest's client, the host's server) on another CPU, idle and, on
//! a VM, halted. On the 2-core VM of docs/bench.txt, sockperf's UDP ping-pong through
//! `usernet run` took a 68 µs round trip free, and 20 µs with usernet, the client and the
//! server pinned to one CPU (`taskset -c 0`, busy polling on or off): every hand-off then
//! wakes a process on the CPU that was just left. Unpinned, tools that sleep (pasta, the
//! kernel's veth) get that by chance: in phases where the scheduler keeps all three on one
//! CPU pasta made 25-29 µs and veth 9-10 µs, in others 95-146 µs and 96-103 µs; usernet
//! stays at 51-72 µs in both. A scheduler trace of sockperf's UDP ping-pong (`perf record -e
//! sched:*` with the other CPU kept busy by perf itself) showed the same: with the client,
//! the server and usernet on one CPU, each wakeup preempted usernet at once and a round trip
//! took 13 µs, against the 36 µs of its usual runs across two CPUs. The kernel puts a wakee on
//! an idle CPU rather than on a busy one (`select_idle_sibling`) unless the busy one runs only
//! SCHED_IDLE tasks; running the whole of usernet at SCHED_IDLE (`chrt --idle 0`) gained
//! little (UDP 17.0-17.5 µs one way against 18.0-18.1; connections per second 7,973-8,129
//! against 6,914-7,438) and would starve it behind any busy process, so it is not done.
//!
//! What a wakeup costs there is the machine's: its guest kernel's haltpoll cpuidle driver has
//! `guest_halt_poll_ns` 0, so an idle vCPU halts at once. A process that keeps the other CPU
//! from halting without taking it from anyone (`chrt --idle 0 sh -c 'while :; do :; done'`)
//! raised one engine's connections per second (a C client in `usernet run` against a C server
//! on the host's 127.0.0.1, 3 s, alternated) from 9,289-9,750 to 11,460-12,137, as much as a
//! second engine does (`--engine-threads 2`: 11,437-11,493; usernet-bench: 1.21-1.25x one
//! engine, 0.69-0.72x veth): the second engine's spinning keeps the other vCPU awake the
//! same way. Veth gains more from it (15,705-16,121 to 20,393-24,980), so the ratio to veth
//! does not move: what separates usernet from veth on this path is not the wakeups' placement.
//!
//! Where the kernel groups processes for scheduling by session (`kernel.sched_autogroup_enabled`,
//! on in this machine's kernel), connections per second depend on whether the host's server
//! is in the group of usernet and the client it serves: in a session of its own it gives
//! them about a quarter more (the benchmark's agent as the server, 2 s runs, alternated:
//! 9,484-10,194 in the caller's session against 12,355-12,754 in its own; the same with C
//! programs, 9,310-11,016 against 12,350-13,094, and as much with the client in a session of
//! its own instead, 11,562-13,094). It takes busy polling: with it off the rate is the same either way
//! (5,686-5,917 against 5,932-6,136), and so is veth's (16,482-17,187 against
//! 16,310-16,536), and so is usernet's with autogroups off (9,762-10,164 against
//! 9,943-10,159), so the slower figure is the one without groups. A scheduler trace shows the
//! same placement either way (usernet spinning on one CPU, client and server taking turns on
//! the other), but the client's and the server's turns take 8.7-9.4 µs in one group against
//! 6.7-6.8 in two. Request/response over a connection that stays open does not care (sockperf
//! over UDP and TCP within 0.1 µs). A host's service is seldom started from the session of
//! the container that dials it, so the benchmark measures connections per second both ways
//! (`crates/bench`, `crr_own_session_per_sec`).

use std::time::{Duration, Instant};

/// The longest window unless configured otherwise (`--busy-poll`, `USERNET_BUSY_POLL`).
pub const DEFAULT_MAX: Duration = Duration::from_micros(100);

/// The smallest non-zero window.
pub const GROW_START: Duration = Duration::from_micros(10);

/// A round of the loop that moved more bytes than this through the links (frames in and out)
/// was bulk transfer, not a request or an answer: no spin after it.
pub const BULK_ROUND_BYTES: u64 = 16 * 1024;

/// A round whose frames averaged this many bytes or more was bulk transfer too: a slow sender's
/// full-sized segments with their acknowledgements (a 1514-byte frame and a 54-byte ACK average
/// 784), where a request, an answer or an ACK alone is a frame of tens or hundreds of bytes.
pub const BULK_FRAME_BYTES: u64 = 512;

/// Light rounds in a row after a bulk one before spinning again: a stream's writes rarely
/// end on a segment boundary, so the tail of each (128 KiB of iperf3: two 65,480-byte
/// segments and one of 112) often comes in a round of its own, which alone looks like a
/// request.
pub const LIGHT_ROUNDS_AFTER_BULK: u32 = 2;

pub struct BusyPoll {
    max: Duration,
    window: Duration,
    /// When the loop last ran out of work, while no event has come since.
    idle_since: Option<Instant>,
    /// Light rounds (that did work) since the last bulk one, up to
    /// [`LIGHT_ROUNDS_AFTER_BULK`] (reached: not after bulk; so at the start too).
    light_rounds: u32,
}

impl BusyPoll {
    pub fn new(max: Duration) -> BusyPoll {
        BusyPoll { max, window: Duration::ZERO, idle_since: None, light_rounds: LIGHT_ROUNDS_AFTER_BULK }
    }

    /// A round of the loop moved `frames` frames of `bytes` bytes in all through the links,
    /// and `socket_bytes` bytes on host sockets outside those frames (spliced socket to
    /// socket, or held guest data written late); neither: it found no work, and what the last
    /// working round was still stands.
    pub fn round(&mut self, frames: u64, bytes: u64, socket_bytes: u64) {
        if frames == 0 && socket_bytes == 0 {
            return;
        }
        let bulk = bytes > BULK_ROUND_BYTES
            || (frames > 0 && bytes >= BULK_FRAME_BYTES * frames)
            || socket_bytes > BULK_ROUND_BYTES;
        self.light_rounds = if bulk { 0 } else { (self.light_rounds + 1).min(LIGHT_ROUNDS_AFTER_BULK) };
    }

    /// Whether busy polling is on at all (a maximum above zero).
    pub fn enabled(&self) -> bool {
        !self.max.is_zero()
    }

    /// The loop has nothing to do at `now`: whether to poll without blocking (spin).
    pub fn spin(&mut self, now: Instant) -> bool {
        let since = *self.idle_since.get_or_insert(now);
        self.light_rounds >= LIGHT_ROUNDS_AFTER_BULK && now.saturating_duration_since(since) < self.window
    }

    /// A poll returned events at `now`: ends an idle period and adapts the window to it.
    pub fn woke(&mut self, now: Instant) {
        let Some(since) = self.idle_since.take() else { return };
        let idle = now.saturating_duration_since(since);
        if idle <= self.window {
            return;
        }
        if idle <= self.max {
            self.window = (self.window * 2).max(GROW_START).min(self.max);
        } else {
            self.window /= 2;
            if self.window < GROW_START {
                self.window = Duration::ZERO;
            }
        }
    }

    /// Gives the CPU to another runnable process, if any, after an empty non-blocking poll.
    pub fn yield_cpu() {
        // SAFETY: sched_yield takes no arguments and cannot fail in a way that matters here.
        unsafe { libc::sched_yield() };
    }

    #[cfg(test)]
    fn window(&self) -> Duration {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// One idle period of `idle`: returns whether the loop spun at its start.
    fn idle_for(b: &mut BusyPoll, t: &mut Instant, idle: Duration) -> bool {
        let spun = b.spin(*t);
        *t += idle;
        b.woke(*t);
        spun
    }

    #[test]
    fn starts_off_and_grows_on_short_idle_periods() {
        let mut b = BusyPoll::new(us(200));
        let mut t = Instant::now();
        assert!(!idle_for(&mut b, &mut t, us(50)));
        assert_eq!(b.window(), GROW_START);
        for _ in 0..10 {
            idle_for(&mut b, &mut t, us(50));
        }
        assert_eq!(b.window(), us(80), "doubles until the idle periods fit");
        assert!(idle_for(&mut b, &mut t, us(50)));
        assert_eq!(b.window(), us(80), "a caught event leaves the window alone");
    }

    #[test]
    fn never_exceeds_the_maximum() {
        let mut b = BusyPoll::new(us(200));
        let mut t = Instant::now();
        for _ in 0..20 {
            idle_for(&mut b, &mut t, us(190));
        }
        assert_eq!(b.window(), us(200));
    }

    #[test]
    fn long_idle_periods_shrink_it_to_zero() {
        let mut b = BusyPoll::new(us(200));
        let mut t = Instant::now();
        for _ in 0..20 {
            idle_for(&mut b, &mut t, us(150));
        }
        assert_eq!(b.window(), us(160));
        for _ in 0..5 {
            idle_for(&mut b, &mut t, Duration::from_millis(5));
        }
        assert_eq!(b.window(), Duration::ZERO);
        assert!(!b.spin(t));
    }

    #[test]
    fn spins_only_within_the_window() {
        let mut b = BusyPoll::new(us(200));
        let mut t = Instant::now();
        for _ in 0..20 {
            idle_for(&mut b, &mut t, us(190));
        }
        let start = t;
        assert!(b.spin(start));
        assert!(b.spin(start + us(199)));
        assert!(!b.spin(start + us(200)));
        // Still the same idle period: the clock runs from when work ran out.
        assert!(!b.spin(start + us(300)));
    }

    /// A poller whose window request/response idle periods of 50 µs have opened (it spins).
    fn spinning() -> (BusyPoll, Instant) {
        let mut b = BusyPoll::new(us(200));
        let mut t = Instant::now();
        for _ in 0..5 {
            idle_for(&mut b, &mut t, us(50));
        }
        assert!(idle_for(&mut b, &mut t, us(50)), "request/response: spins");
        (b, t)
    }

    #[test]
    fn no_spin_after_a_bulk_round_until_light_ones() {
        let (mut b, mut t) = spinning();
        b.round(200, BULK_ROUND_BYTES + 1, 0);
        assert!(!idle_for(&mut b, &mut t, us(50)), "after a bulk round: sleeps at once");
        b.round(0, 0, 0);
        assert!(!idle_for(&mut b, &mut t, us(50)), "an empty round changes nothing");
        assert_eq!(b.window(), us(80), "the idle periods after bulk still kept the window");
        b.round(1, 166, 0);
        assert!(!idle_for(&mut b, &mut t, us(50)), "one light round after bulk (a write's tail): sleeps");
        b.round(2, 60 + 66, 0);
        assert!(idle_for(&mut b, &mut t, us(50)), "a second one in a row, a request and its ACK: spins");
        b.round(2, 1514 + 54, 0);
        assert!(!idle_for(&mut b, &mut t, us(50)), "a full segment and an ACK: a slow transfer");
        b.round(3, 400 + 66 + 54, 0);
        assert!(!idle_for(&mut b, &mut t, us(50)), "an answer of a few hundred bytes, once");
        b.round(3, 400 + 66 + 54, 0);
        assert!(idle_for(&mut b, &mut t, us(50)), "and twice: spins");
        b.round(0, 0, BULK_ROUND_BYTES + 1);
        assert!(!idle_for(&mut b, &mut t, us(50)), "a spliced bulk round, no frame at all: sleeps");
        b.round(0, 0, 0);
        assert!(!idle_for(&mut b, &mut t, us(50)), "still after bulk");
        b.round(0, 0, 300);
        b.round(0, 0, 300);
        assert!(idle_for(&mut b, &mut t, us(50)), "spliced requests: spin");
        b.round(1, 66, BULK_ROUND_BYTES + 1);
        assert!(!idle_for(&mut b, &mut t, us(50)), "a spliced bulk round with an ACK on a link");
        b.round(1, 54, 40 * 1024);
        b.round(1, 54, 40 * 1024);
        assert!(!idle_for(&mut b, &mut t, us(50)), "held guest data written late, with its ACK: sleeps");
    }

    #[test]
    fn a_streams_write_tails_between_bulk_rounds_never_spin() {
        let (mut b, mut t) = spinning();
        // iperf3's 128 KiB writes at MTU 65520: two full segments, then a tail of 112 bytes
        // (a 166-byte frame) in a round of its own.
        for _ in 0..10 {
            b.round(2, 2 * 65_534, 0);
            assert!(!idle_for(&mut b, &mut t, us(50)), "after the full segments");
            b.round(1, 166, 0);
            assert!(!idle_for(&mut b, &mut t, us(50)), "after the tail alone");
        }
    }

    #[test]
    fn zero_maximum_never_spins() {
        let mut b = BusyPoll::new(Duration::ZERO);
        let mut t = Instant::now();
        for _ in 0..10 {
            assert!(!idle_for(&mut b, &mut t, us(5)));
        }
        assert_eq!(b.window(), Duration::ZERO);
    }
}
