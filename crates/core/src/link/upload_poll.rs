//! When a link polls its guest instead of being told of each frame: the state both links that
//! can (a vhost-user TX ring, a stream socket) keep of an upload.
//!
//! Theory of operation. A guest that uploads sends full-sized frames one after another, and
//! a slow one (a TCG guest: a segment every hundred microseconds or more) has each of them
//! wake the engine, and under TCG each vhost-user kick is a trapped write too. So once
//! [`POLL_AFTER_FRAMES`] bulk frames (of [`POLL_FRAME_BYTES`] or more: data, not requests or
//! ACKs) came within [`POLL_IDLE`] of the first, the link stops asking to be told of new
//! frames and the engine reads it every round of its loop and at least every millisecond
//! ([`Link::polling`](super::Link::polling)). A frame or two of 1 KiB (a TLS ClientHello, a
//! short request body) does not start it, since while polled a request waits for the next
//! poll. Polling ends once the guest's queue stayed without a bulk frame for [`POLL_IDLE`]
//! (small frames, such as a guest's ACKs during a download, do not keep it going), or when
//! the link finds its guest too fast to poll ([`UploadPoll::too_fast`]), and it does not
//! start again for [`FAST_HOLDOFF`] after that.
//!
//! Times are passed in, so the state machine is tested without sleeping.

use std::time::{Duration, Instant};

use super::{POLL_FRAME_BYTES, POLL_IDLE};

/// Bulk frames within [`POLL_IDLE`] of the first of them that start polling.
pub const POLL_AFTER_FRAMES: u32 = 4;
/// How long a link that found its guest too fast to poll waits before it polls again.
pub const FAST_HOLDOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Default)]
pub struct UploadPoll {
    /// Polling: since when the guest's queue has had no bulk frame (the first empty look
    /// after the last bulk frame), if it has been empty since.
    polled: Option<Option<Instant>>,
    /// Not polling: the bulk frames counted towards starting, and when the first came.
    bulk: u32,
    bulk_since: Option<Instant>,
    /// Not polled again before this.
    hold_off_until: Option<Instant>,
}

impl UploadPoll {
    pub fn polling(&self) -> bool {
        self.polled.is_some()
    }

    /// The guest sent a frame of `len` bytes; `now` is asked only for a bulk frame that
    /// could start polling. True when polling starts with this frame.
    pub fn frame(&mut self, len: usize, now: impl FnOnce() -> Instant) -> bool {
        if len < POLL_FRAME_BYTES {
            return false;
        }
        if let Some(since) = &mut self.polled {
            *since = None;
            return false;
        }
        let now = now();
        if self.hold_off_until.is_some_and(|until| now < until) {
            return false;
        }
        match self.bulk_since {
            Some(first) if now.saturating_duration_since(first) <= POLL_IDLE => self.bulk += 1,
            _ => {
                self.bulk_since = Some(now);
                self.bulk = 1;
            }
        }
        if self.bulk < POLL_AFTER_FRAMES {
            return false;
        }
        self.polled = Some(None);
        self.bulk = 0;
        self.bulk_since = None;
        self.hold_off_until = None;
        true
    }

    /// The guest's queue is empty at `now` (asked only while polling): true while polling
    /// goes on, false once it has had no bulk frame for [`POLL_IDLE`] (polling ends here)
    /// or when it was off.
    pub fn empty(&mut self, now: impl FnOnce() -> Instant) -> bool {
        let Some(since) = &mut self.polled else { return false };
        let now = now();
        if now.saturating_duration_since(*since.get_or_insert(now)) < POLL_IDLE {
            return true;
        }
        self.polled = None;
        false
    }

    /// The guest sends faster than polls can take (its queue could fill between two):
    /// polling ends, and does not start again for [`FAST_HOLDOFF`].
    pub fn too_fast(&mut self, now: Instant) {
        self.polled = None;
        self.hold_off_until = Some(now + FAST_HOLDOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `n` bulk frames at `t`, `t + step`, ...; returns whether the last one started polling.
    fn bulk(p: &mut UploadPoll, t: Instant, step: Duration, n: u32) -> bool {
        (0..n).map(|i| p.frame(POLL_FRAME_BYTES, || t + step * i)).last().unwrap()
    }

    #[test]
    fn a_run_of_bulk_frames_starts_it_and_a_pause_ends_it() {
        let mut p = UploadPoll::default();
        let t = Instant::now();
        // Small frames never count.
        for _ in 0..10 {
            assert!(!p.frame(POLL_FRAME_BYTES - 1, || panic!("no clock for a small frame")));
        }
        assert!(!bulk(&mut p, t, ms(0), POLL_AFTER_FRAMES - 1));
        assert!(!p.polling());
        assert!(p.frame(1514, || t), "the fourth bulk frame within POLL_IDLE");
        assert!(p.polling());
        // Empty looks keep it on until POLL_IDLE passed since the first of them.
        assert!(p.empty(|| t + ms(1)));
        assert!(p.empty(|| t + ms(2)));
        // A bulk frame starts the count again; small frames do not.
        assert!(!p.frame(1514, || panic!("no clock while polled")));
        assert!(p.empty(|| t + ms(3)));
        p.frame(60, || t);
        assert!(p.empty(|| t + ms(4)));
        assert!(!p.empty(|| t + ms(5)), "POLL_IDLE without a bulk frame");
        assert!(!p.polling());
        assert!(!p.empty(|| t + ms(6)), "off stays off");
        assert!(!p.empty(|| panic!("no clock while not polling")));
    }

    #[test]
    fn bulk_frames_far_apart_do_not_start_it() {
        let mut p = UploadPoll::default();
        let t = Instant::now();
        // A 1 KiB frame every 3 ms (a chatty protocol, TLS records): never polled.
        assert!(!bulk(&mut p, t, POLL_IDLE + ms(1), 20));
        assert!(!p.polling());
        // Four within POLL_IDLE of the first: polled.
        let later = t + ms(100);
        assert!(bulk(&mut p, later, POLL_IDLE / POLL_AFTER_FRAMES, POLL_AFTER_FRAMES));
    }

    #[test]
    fn a_guest_too_fast_is_not_polled_again_for_the_hold_off() {
        let mut p = UploadPoll::default();
        let t = Instant::now();
        assert!(bulk(&mut p, t, ms(0), POLL_AFTER_FRAMES));
        p.too_fast(t);
        assert!(!p.polling());
        assert!(!bulk(&mut p, t, ms(1), 50), "50 bulk frames within the hold-off");
        assert!(!p.polling());
        let after = t + FAST_HOLDOFF;
        assert!(bulk(&mut p, after, ms(0), POLL_AFTER_FRAMES));
    }
}
