//! The translator's states, one enum per concern, and the invariants that tie them to the
//! sequence numbers, buffers and timers of [`TcpFlow`].
//!
//! # States
//!
//! - [`Phase`]: how far the opening got (host connect in progress, our SYN out to the guest
//!   for a published port, or established).
//! - [`ToHost`]: the guest-to-host direction (open, the guest's FIN held behind data that
//!   the socket has not taken yet, or passed on: by shutdown(SHUT_WR), or by the close that
//!   ends the flow).
//! - [`ToGuest`]: the host-to-guest direction (our SYN not acknowledged, open, host EOF
//!   seen with our FIN still to send, FIN sent, FIN acknowledged).
//!
//! Whatever follows from these and the sequence numbers is derived, not stored: our ISN is
//! `snd_una` while the SYN is unacknowledged; the sequence number of our FIN is stored only
//! while it is queued (`FinQueued`) and is `snd_max - 1` once sent; the connect deadline is
//! `born + CONNECT_TIMEOUT` while connecting; the guest's window is `wnd_edge - snd_una`;
//! bytes to send again after a rewind are those between `snd_nxt` and the data sent so far
//! (in the socket whatever its readiness says); the flow is over when `ToHost::Shut` and
//! `ToGuest::FinAcked` meet.
//!
//! # Invariants
//!
//! They hold at the end of every public entry point of a flow that stays (`Verdict::Keep`);
//! `check_invariants` asserts them in debug builds. Sequence comparisons are modulo 2^32.
//!
//! 1. `snd_una <= snd_nxt <= snd_max`, and no more than the largest window plus a FIN is in
//!    flight (`snd_max - snd_una <= 2^30 + 1`); the right edge of the guest's window is not
//!    behind `snd_una` (`snd_una <= wnd_edge`), nor further than the largest window.
//! 2. Not established (connecting, or our SYN out) implies `ToGuest::SynUnacked`,
//!    `ToHost::Open`, nothing held, no ACK owed.
//! 3. `ToGuest::SynUnacked` implies only the SYN is in flight: `snd_nxt == snd_max ==
//!    snd_una + 1`.
//! 4. Nothing is sent beyond our FIN: `FinQueued { fin }` implies `snd_max <= fin`;
//!    `FinSent` implies the FIN (at `snd_max - 1`) is unacknowledged, `snd_una < snd_max`;
//!    `FinAcked` implies `snd_una == snd_nxt == snd_max`.
//! 5. Held guest data fits its bound: `pending_head <= pending.len()` and
//!    `pending_len() <= RECV_BUF`.
//! 6. `ToHost::FinHeld` implies held data (else the FIN would have been passed on);
//!    `ToHost::Shut` implies none (nothing comes after the guest's FIN).
//! 7. An ACK deadline only while an ACK is owed (`ack_deadline` implies `need_ack`), and an
//!    ACK is owed only on an established flow; what the guest heard acknowledged is never
//!    ahead of what the flow holds (`acked_rcv <= rcv_nxt + pending`, and a FIN held behind
//!    it: beyond `rcv_nxt` only what was listed in a SACK block, see `ack_number`). Data held while the socket is
//!    writable waits for the end of the round, so the engine must be told to come by:
//!    `pending` not empty and `host_writable` implies `need_ack` (else `write_gathered`
//!    would never run, and the guest's retransmissions, answered at once, would not help).
//!    Data held for the rest of the guest's write is gathered data of an open flow:
//!    `hold_deadline` implies `pending` not empty and `ToHost::Open`.
//! 8. Whatever is in flight is timed: `snd_una != snd_max` implies a retransmission
//!    deadline (except while connecting, when the connect timeout runs instead and nothing
//!    is sent).
//! 9. A zero window with host data to send is probed: the window is 0, nothing is in
//!    flight, the socket may hold data, and the FIN is not yet queued implies a
//!    retransmission deadline.
//! 10. `retries <= MAX_RETRIES` and `RTO_MIN <= rto <= RTO_MAX`.
//! 11. (When the socket can be inspected without a system call, as a model can:) the peek
//!     offset is where `snd_nxt` is in the data (`snd_nxt - snd_una`, SYN and FIN not
//!     counted), and the receive queue holds at least every byte sent and not acknowledged.
//! 12. Guest segments kept after a gap (`out_of_order`) are all beyond what the flow took
//!     (`rcv_nxt` plus `pending`), within the window offered (`rcv_edge`), in sequence
//!     order, and `out_of_order_cost` is what they cost; none are kept once the guest's FIN
//!     was taken.
//! 13. What the guest's SACK blocks listed of our data (`sacked`) is known only with SACK
//!     agreed, in at most `SACKED_MAX` ranges, each not empty, beyond `snd_una` and within
//!     what was sent (`snd_max`), apart (not even touching) and in order.
//! 14. What was sent again is marked within what is in flight: `snd_una <= high_resent <=
//!     snd_max` (a mark left behind `snd_una` would seem to lie ahead 2 GiB later, and keep
//!     the first loss from being resent), and so is the recovery point of a go-back-N:
//!     `snd_una <= recover <= snd_max`.

use usernet_wire::tcp::{seq_le, seq_lt};

use super::{HostSocket, MAX_RETRIES, RECV_BUF, RTO_MAX, RTO_MIN, SACKED_MAX, TcpFlow};

/// How far the opening got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Outbound: the host-side connect is in progress; the guest has no SYN-ACK yet and its
    /// retransmitted SYNs are ignored. Given up at `born + CONNECT_TIMEOUT`.
    Connecting,
    /// Inbound (a published port): our SYN is out to the guest, which has not answered.
    SynSent,
    /// The host socket is connected and the SYN-ACK went out (outbound: ours, to the guest;
    /// inbound: the guest's, which our ACK answered): data flows once `ToGuest` leaves
    /// `SynUnacked` (at once, inbound).
    Established,
}

/// The guest-to-host direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ToHost {
    /// Guest data goes into the socket (or waits in `pending` while the socket is full); no
    /// FIN from the guest yet.
    Open,
    /// The guest's FIN arrived, right behind the data still held in `pending`; it is passed
    /// on (and acknowledged) once that data is written. `rcv_nxt` does not count it yet.
    FinHeld,
    /// The guest's FIN was passed on and counted in `rcv_nxt`: the host reads end of stream,
    /// and nothing more comes from the guest. Passed on with shutdown(SHUT_WR), or, when our
    /// FIN was acknowledged already and the flow so ends with it, by the socket's close(2).
    Shut,
}

/// The host-to-guest direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ToGuest {
    /// Our SYN (inbound) or SYN-ACK (outbound) is not acknowledged yet: `snd_una` is our ISN
    /// and the SYN is all that is in flight. No host data is sent.
    SynUnacked,
    /// Host data goes to the guest; the socket has not shown end of stream.
    Open,
    /// The host socket reached end of stream: our FIN goes at `fin`, right after the last
    /// byte, and has not been sent yet.
    FinQueued { fin: u32 },
    /// Our FIN was sent (it is at `snd_max - 1`) and is not acknowledged yet.
    FinSent,
    /// Our FIN was acknowledged: this direction is over.
    FinAcked,
}

impl<S: HostSocket> TcpFlow<S> {
    /// Asserts the invariants listed in this module's documentation (debug builds call it
    /// at the end of every entry point). Panics with the flow's state when one is broken.
    pub(super) fn check_invariants(&self) {
        let fail = |what: &str| -> ! { panic!("TCP flow invariant broken: {what}\n{self:?}") };
        let in_flight = self.snd_max.wrapping_sub(self.snd_una);
        let established = self.phase == Phase::Established;

        // 1.
        if !(seq_le(self.snd_una, self.snd_nxt) && seq_le(self.snd_nxt, self.snd_max)) {
            fail("snd_una <= snd_nxt <= snd_max");
        }
        if in_flight > (1 << 30) + 1 {
            fail("more in flight than any window");
        }
        if !seq_le(self.snd_una, self.wnd_edge) || self.guest_wnd() > (1 << 30) + 1 {
            fail("the window's right edge is not behind snd_una, nor further than any window");
        }
        // 2.
        if !established
            && (self.to_guest != ToGuest::SynUnacked
                || self.to_host != ToHost::Open
                || self.pending_len() != 0
                || self.need_ack
                || self.ack_deadline.is_some())
        {
            fail("a flow that is not established has no data, FIN or ACK state");
        }
        // 3.
        if self.to_guest == ToGuest::SynUnacked
            && !(self.snd_nxt == self.snd_max && self.snd_max == self.snd_una.wrapping_add(1))
        {
            fail("only the SYN is in flight until it is acknowledged");
        }
        // 4.
        match self.to_guest {
            ToGuest::FinQueued { fin } if !seq_le(self.snd_max, fin) => fail("nothing sent beyond the queued FIN"),
            ToGuest::FinSent if self.snd_una == self.snd_max => fail("FinSent with the FIN acknowledged"),
            ToGuest::FinAcked if !(self.snd_una == self.snd_nxt && self.snd_nxt == self.snd_max) => {
                fail("FinAcked with something in flight")
            }
            _ => {}
        }
        // 5.
        if self.pending_head > self.pending.len() || self.pending_len() > RECV_BUF {
            fail("held guest data within its bound");
        }
        // 6.
        match self.to_host {
            ToHost::FinHeld if self.pending_len() == 0 => fail("a held FIN with no data before it"),
            ToHost::Shut if self.pending_len() != 0 => fail("data held after the guest's FIN was passed on"),
            _ => {}
        }
        // 7.
        if self.ack_deadline.is_some() && !self.need_ack {
            fail("an ACK deadline without an ACK owed");
        }
        if self.need_ack && !established {
            fail("an ACK owed on a flow that is not established");
        }
        let fin_held = u32::from(self.to_host == ToHost::FinHeld);
        if established && !seq_le(self.acked_rcv, self.rcv_nxt.wrapping_add(self.pending_len() as u32 + fin_held)) {
            fail("acked_rcv <= rcv_nxt + pending (+ a held FIN)");
        }
        if self.pending_len() > 0 && self.host_writable && !self.need_ack {
            fail("gathered data with no end-of-round call owed (need_ack)");
        }
        if self.hold_deadline.is_some() && (self.pending_len() == 0 || self.to_host != ToHost::Open) {
            fail("a hold deadline with no gathered data of an open flow");
        }
        // 8.
        if self.phase != Phase::Connecting && in_flight != 0 && self.rto_deadline.is_none() {
            fail("something in flight without a retransmission deadline");
        }
        if self.phase == Phase::Connecting && self.rto_deadline.is_some() {
            fail("a retransmission deadline while connecting");
        }
        // 9.
        if established
            && self.to_guest == ToGuest::Open
            && self.guest_wnd() == 0
            && in_flight == 0
            && self.host_readable
            && self.rto_deadline.is_none()
        {
            fail("a zero window with data to send and no probe armed");
        }
        // 10.
        if self.retries > MAX_RETRIES || self.rto < RTO_MIN || self.rto > RTO_MAX {
            fail("retries and rto within their bounds");
        }
        // 12.
        let expected = self.rcv_nxt.wrapping_add(self.pending_len() as u32);
        let mut after = expected;
        for o in &self.out_of_order {
            let end = o.segment.seq.wrapping_add(o.data.len() as u32);
            if !seq_lt(expected, o.segment.seq) || !seq_le(end, self.rcv_edge) || seq_lt(o.segment.seq, after) {
                fail("a segment kept after a gap lies beyond what was taken, within the window, in order");
            }
            after = o.segment.seq;
        }
        if self.out_of_order_cost != self.out_of_order.iter().map(|o| o.cost()).sum::<usize>() {
            fail("out_of_order_cost is what the segments kept after a gap cost");
        }
        if self.to_host != ToHost::Open && !self.out_of_order.is_empty() {
            fail("segments kept after a gap once the guest's FIN was taken");
        }
        // 13.
        if (!self.sack_ok && !self.sacked().is_empty()) || self.sacked().len() > SACKED_MAX {
            fail("the guest's SACK blocks known only with SACK, within their bound");
        }
        let mut after = self.snd_una;
        for &(left, right) in self.sacked() {
            if !seq_lt(after, left) || !seq_lt(left, right) || !seq_le(right, self.snd_max) {
                fail("the guest's SACK blocks: apart, in order, beyond snd_una, within what was sent");
            }
            after = right;
        }
        // 14.
        if !seq_le(self.snd_una, self.high_resent) || !seq_le(self.high_resent, self.snd_max) {
            fail("high_resent lies within what is in flight, from snd_una to snd_max");
        }
        if self.recover.is_some_and(|r| !seq_le(self.snd_una, r) || !seq_le(r, self.snd_max)) {
            fail("recover lies within what is in flight, from snd_una to snd_max");
        }
        // 11.
        if let Some((peek_offset, queued)) = self.sock.inspect() {
            let (offset, unacked) = match self.to_guest {
                ToGuest::SynUnacked => (0, 0),
                _ => {
                    // Data only: the FIN, once acknowledged, takes snd_una past the data's end.
                    let end = self.sent_data_end();
                    let min = |s: u32| if seq_lt(end, s) { end } else { s };
                    let una = min(self.snd_una);
                    (min(self.snd_nxt).wrapping_sub(una), end.wrapping_sub(una))
                }
            };
            if peek_offset != offset as usize {
                fail(&format!("peek offset {peek_offset} is not where snd_nxt is ({offset})"));
            }
            if queued < unacked as usize {
                fail(&format!("the socket holds {queued} bytes, fewer than the {unacked} unacknowledged"));
            }
        }
    }
}
