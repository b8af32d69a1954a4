//! The TCP translator: one guest TCP connection bound to one host socket.
//!
//! # Theory of operation
//!
//! usernet terminates no TCP of its own. Each guest connection is paired with a kernel
//! socket on the host (a connected socket for outbound traffic, one end of a socketpair
//! for a gateway service), and this module translates between the guest's segments and
//! that socket. The kernel's socket buffers are the queues; usernet keeps no copy of
//! host data.
//!
//! The translator is a state machine without I/O of its own: the engine hands it events
//! (a guest segment, socket readiness, a timer, the end of a round) with the time, it
//! answers through the [`Switch`] (frames to the guest) and a [`HostSocket`] (the socket
//! calls), and says whether the flow goes on ([`Verdict`]). The socket is a type parameter,
//! [`KernelSocket`] by default, so tests drive the same code against an in-memory model
//! (`sim.rs` runs it against a model guest TCP through loss, reordering, duplication, zero
//! windows and resets). Its states are named per direction (`state.rs`): the opening
//! [`Phase`] (connecting, SYN sent to the guest, established), the guest-to-host half
//! [`ToHost`] (open, FIN held behind data, shut) and the host-to-guest half [`ToGuest`]
//! (SYN unacknowledged, open, FIN queued, FIN sent, FIN acknowledged). `state.rs` also
//! lists the invariants that debug builds check at the end of every entry point.
//!
//! Opening: the guest's SYN starts a non-blocking connect (`Phase::Connecting`). Only when
//! it succeeds (the socket writable without EPOLLERR; SO_ERROR is asked only on an error)
//! does the guest get a SYN-ACK; a refused connect gives it a RST, an
//! unreachable network an ICMP unreachable, and a connect that takes longer than
//! `CONNECT_TIMEOUT` a RST. The guest's retransmitted SYNs meanwhile are ignored.
//!
//! Published ports work the other way round: the host socket is an accepted connection,
//! and usernet sends the guest a SYN (`Phase::SynSent`, from the client's address as the
//! guest should see it). The guest's SYN-ACK opens the flow; its RST (nothing listens)
//! resets the client.
//!
//! Guest to host: an in-order segment's payload is written straight into the socket and
//! acknowledged once the kernel took it. Small segments (below `COALESCE_BELOW`, e.g. a
//! VM's 1448-byte ones) are gathered in `pending` instead and written with one send(2) per
//! flow at the end of the engine's round (`write_gathered`), just before the ACKs go out;
//! `need_ack` stays set while gathered data waits, so the engine comes by even when an ACK
//! already went out on host data. A full-sized segment without PSH says that more of the
//! same write follows: what was gathered (all of one write) then waits past the end of its
//! round for the segment with PSH, up to `HOLD_BYTES` (8 KiB) and for `HOLD_DELAY` (1 ms) at
//! most (`may_hold`; the deadline has its own timer), as the kernel's GRO merges segments.
//! A slow sender (a VM under TCG sends a segment every ~170 µs, one per round) so costs one
//! send(2), one wakeup of the host's reader and one ACK per write of its application, not
//! per segment. Held data is not acknowledged, and no ACK of nothing new goes meanwhile.
//! What the socket does not take at once waits in a bounded per-flow buffer (`pending`)
//! and is acknowledged when it is written, as soon as the socket drains (EPOLLOUT) — the
//! guest never waits for its own retransmission timer. The window offered to the guest
//! follows the socket, as passt's does: the room in its send buffer (SO_MEMINFO, measured
//! again once `MEASURE_EVERY` bytes were written, so not per segment) and `ROOM_MARGIN`
//! more, at most `RECV_BUF`. The margin fills the socket now and then, which is what makes
//! the kernel grow its send buffer. Once a send is cut short (the send buffer is full: the
//! kernel is the queue), the window stops growing: its right edge (`rcv_edge`) stays put,
//! so a host peer that does not read costs about `ROOM_MARGIN` of usernet's memory per
//! flow. The edge never moves left: what the guest sent
//! within the window it was offered is held, never dropped (a guest without SACK that
//! loses a window's worth of segments recovers one per round trip and then by its
//! retransmission timer, backing off: an upload could stall for minutes). All flows' held
//! bytes count against one budget (`--max-buffered`, see `engine::budget`); beyond it
//! nothing more is gathered, segments go straight to their socket, and what the socket
//! does not take then is not acknowledged and comes again. A flow whose socket takes
//! nothing for `--tcp-stall-timeout` is reset. A segment that comes after a gap gets an
//! immediate duplicate ACK, so the guest fast-retransmits, and is kept
//! (`keep_out_of_order`: within the window offered, up to `OUT_OF_ORDER_MAX` segments, its
//! bytes counted against the shared budget); the segment that fills the gap lets the kept
//! ones through, in order, and one ACK covers them all. Dropped, the segments after a gap
//! would have to come again: 50 MB uploads with 10% of the guest's frames reordered by
//! 2 ms, or beside a UDP flood that overflowed the TAP's ring, stalled for minutes (now 0.2
//! and 1.6 s). When the guest offers SACK (RFC 2018; Linux does), the SYN-ACK offers it
//! back (and a published port's SYN offers it), and every ACK without data lists the kept
//! segments in SACK blocks (`sack_blocks`): the guest resends only what is missing, and a
//! Linux guest's loss detection (RACK, tail-loss probes) works, where without SACK a lost
//! last segment waits for its retransmission timer. A kept segment is never dropped once
//! listed (that would be reneging, which costs the guest a timeout), and once the gap
//! before it is filled it is acknowledged at once, even while a full socket takes it only
//! in part (`ack_number`: Linux takes an ACK that stops inside listed data for reneging
//! too). Old segments (retransmissions, keep-alive probes) are answered with an ACK. ACKs for in-order data
//! are coalesced: the engine sends one per flow per batch of frames (`flush_ack`), and, as
//! a receiving TCP does, delays one that acknowledges less than two full segments by up to
//! `ACK_DELAY`, so that it rides on the answer (a request/response exchange, a
//! connection's first request) or on the next segment's ACK (every other frame of a guest
//! that sends MSS-sized frames one at a time, as a VM with MTU 1500 does). Held guest data,
//! the guest's FIN, and ACKs that acknowledge nothing new (answers) are never delayed.
//!
//! Host to guest: data is read with MSG_PEEK at SO_PEEK_OFF into the frame buffer, right
//! behind the headers, and sent in MSS-sized segments while the guest's window allows. A
//! peek that returns fewer bytes than asked drained the socket: the flow waits for the
//! next readiness edge instead of peeking again only to hear EAGAIN. When epoll reported
//! the peer's FIN first (RDHUP without an error), such a peek found everything in front of
//! it: the FIN rides on that last segment, with no peek that could only return 0. An error
//! must be found by a peek (`host_read_closed`, `host_error`). The
//! window is kept as its right edge (ACK plus window): a segment that acknowledges new
//! data sets it, one with the same ACK only moves it out, an older one is ignored — so
//! segments reordered on the way never put it where the guest no longer has it.
//! It stays in the socket until the guest acknowledges it; then it is discarded (MSG_TRUNC,
//! no copy). Sending again moves snd_nxt back and the peek offset with it (`seek`); the
//! bytes between snd_nxt and what was sent before are known to be in the socket, so they
//! are sent again whatever the socket's readiness says. With SACK, the guest's blocks
//! about our data are kept (`sacked`): frames reach a guest in the order they were sent,
//! so a range missing below a listed one was lost, and only the missing ranges go again
//! (`resend_lost`; `push` skips what was listed), then sending goes on from `snd_max`. A
//! lost last segment gets no duplicate ACK at all: two round trips (measured, RFC 6298's
//! smoothing) and 2 ms without an ACK send a tail-loss probe (RFC 8985), the last byte
//! again, whose answer lists it and so shows what is missing; a probe also sends again
//! what was resent and is still missing. A probe whose byte the guest then acknowledges was
//! not needed: that guest delays its ACKs, and its tails shorter than two of its segments
//! are no longer probed (`acks_late`). An ACK that stops at listed data says the guest
//! dropped it (reneging): the blocks are forgotten. Without SACK, three duplicate ACKs
//! rewind to `snd_una` and send everything from there (go-back-N), and so does a
//! duplicate ACK that answers a probe: the probe came behind all that was sent, so the
//! byte that answer asks for was lost (RFC 8985's probe relies on SACK to tell what its
//! answer means, as on a path that reorders a single duplicate ACK proves nothing; a
//! guest's queue does not reorder). A guest listener (a published port's) that has
//! acknowledged none of our data gets one segment at a time (`push`), and is probed with
//! that first segment again: one whose queue is full answers our SYN with a SYN cookie,
//! drops our ACK of it and what follows, and resets any segment but one at the first byte
//! after the handshake (`send_probe`). Our FIN goes on that segment when it came with it,
//! and again on every resend of it (a resend that reaches our FIN carries it): a FIN
//! alone behind it would be reset. While neither side has sent a byte, our ACK of its
//! SYN-ACK goes again (`handshake_ack_due`): a server that speaks first would otherwise
//! never hear of a client whose ACK it dropped. An ACK of new data after a probe may have
//! left the guest before the probe reached it: it is progress, not an answer. After a go-back-N,
//! duplicate ACKs do not count toward three until the guest acknowledges beyond what had
//! been sent then (`recover`, RFC 6582's recovery point; an ACK of exactly that much
//! keeps it): the guest answers every byte it gets twice with one, and three would send
//! everything since again. (One still answers a probe: a guest slower than the probe's
//! wait may send such a duplicate ACK after the probe went, and the go-back-N it brings
//! is needless; a real loss would otherwise wait for the timer.) The retransmission timer
//! (exponential backoff, from 200 ms) goes back N in any case, forgetting the guest's
//! blocks (a guest may drop what it listed). `usernet_tcp_resent_bytes_total` counts what went
//! again, by cause. A zero window is probed with one byte
//! when the timer fires, and again at every expiry (backing off) for as long as the window
//! stays shut; a guest that answers the probes is never given up on. The byte is not taken
//! for in flight (our ACKs keep within the shut window, which a guest holds them to), and
//! goes first when the window opens. Segments to a guest that does not scale its window
//! are at most half the largest window it can offer (`UNSCALED_SEGMENT_MAX`).
//!
//! Timestamps (RFC 7323): when the guest's SYN offers them (Linux's does), and on every
//! published port's SYN, each segment to the guest carries our clock (`ts_clock`:
//! milliseconds since the flow began, from the ISN) and echoes the TSval of the guest's
//! latest segment at or before what we last acknowledged (`ts_recent`). The flow uses
//! them for nothing itself (`timed` measures its round trip); the guest does: for its
//! round-trip samples after a retransmission, to undo a needless one, and to keep window
//! scaling and SACK in a SYN cookie, which Linux holds only in the timestamp it echoes.
//! Segments then carry 12 bytes less of data (`send_mss`), behind a longer header
//! (`payload_off`), and an ACK three SACK blocks at most.
//!
//! Closing: guest FIN becomes shutdown(SHUT_WR) once all its data reached the socket
//! (`ToHost::FinHeld`, then `ToHost::Shut`), or the close(2) that ends the flow when our own
//! FIN was acknowledged first (`pass_guest_fin`); host EOF (a peek that returns 0) becomes a FIN
//! after the last byte (`ToGuest::FinQueued`, `FinSent`, `FinAcked`). Each direction closes
//! on its own (half-close). A guest RST closes the socket with SO_LINGER 0 (the peer sees a
//! reset); a socket error sends the guest a RST, at the highest sequence number sent (not
//! the rewound snd_nxt, which a guest following RFC 5961 would drop). The flow ends when
//! both FINs are acknowledged. An idle connection lives as long as both ends keep it.

mod socket;
mod state;

#[cfg(test)]
mod model;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use crate::engine::dial::TcpDial;
use crate::engine::metrics::{Limit, Resend};
use crate::engine::switch::{Switch, TCP_PAYLOAD_OFF, Unreachable};
use usernet_wire::tcp::{
    ACK, FIN, MAX_SACK_BLOCKS_WITH_TIMESTAMPS, PSH, RST, SYN, SackBlocks, TIMESTAMPS_LEN, TcpHeader, seq_le, seq_lt,
};
use usernet_wire::{PROTO_TCP, put16, put32};

pub use socket::{HostSocket, KernelSocket};
use state::{Phase, ToGuest, ToHost};

/// How long a host-side connect may take before the guest gets a RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest window offered.
pub const RECV_BUF: usize = 4 << 20;
/// What the window offers beyond the room known in the host socket's send buffer: what a
/// flow holds at most once the socket is full. Sending it makes the socket full now and
/// then, which is what makes the kernel grow a send buffer (autotuning grows it only after
/// a write found it full).
pub const ROOM_MARGIN: usize = 256 << 10;
/// The most guest segments a flow keeps after a gap (`TcpFlow::keep_out_of_order`); their
/// bytes are bounded by the window offered and the shared budget.
const OUT_OF_ORDER_MAX: usize = 256;
/// What a kept segment costs the shared budget beyond its bytes (its entry and its
/// allocation), so that a guest's one-byte segments cannot hold more memory than the
/// budget says.
const OUT_OF_ORDER_ENTRY_COST: usize = 64;
/// The most ranges of the guest's SACK scoreboard (`TcpFlow::sacked`); beyond it the
/// highest are forgotten, and only sent again for nothing.
const SACKED_MAX: usize = 64;

/// What `receive` needs of a guest segment's header.
#[derive(Clone, Copy, Debug)]
struct Segment {
    seq: u32,
    fin: bool,
    psh: bool,
}

/// A guest segment that came after a gap.
#[derive(Debug)]
struct OutOfOrder {
    segment: Segment,
    data: Vec<u8>,
}

impl OutOfOrder {
    /// What keeping it costs the shared budget.
    fn cost(&self) -> usize {
        self.data.len() + OUT_OF_ORDER_ENTRY_COST
    }

    /// The sequence number after it (its FIN counted).
    fn end(&self) -> u32 {
        self.segment.seq.wrapping_add(self.data.len() as u32 + u32::from(self.segment.fin))
    }
}
/// The room in the send buffer is measured again once this much was written since the
/// last measure (one getsockopt per so many bytes, none per segment).
const MEASURE_EVERY: usize = ROOM_MARGIN / 2;
/// Our window-scale shift (RECV_BUF >> 7 fits in 16 bits).
const OUR_WSCALE: u8 = 7;
const RTO_MIN: Duration = Duration::from_millis(200);
/// Guest segments smaller than this are gathered and written once per round.
const COALESCE_BELOW: usize = 16 * 1024;
/// Longest wait of a delayed ACK (Linux waits 40 ms; the guest's own timers are far longer).
const ACK_DELAY: Duration = Duration::from_millis(1);
/// Gathered full-sized guest segments without PSH are held across rounds, until a segment
/// with PSH comes, up to this many bytes (below a Linux guest's initial window of ten
/// segments, so that a guest which has sent all its window allows is not kept waiting for
/// the ACK) ...
const HOLD_BYTES: usize = 8 * 1024;
/// ... or for this long at most.
const HOLD_DELAY: Duration = Duration::from_millis(1);
/// `pending`'s buffer is kept when it empties, so that a bulk upload whose socket fills
/// again and again does not allocate it anew and grow it by doubling each time (2.7% of
/// usernet's CPU with four streams, and the page faults of fresh memory); above
/// `KEEP_IDLE` bytes it is released once it stayed empty this long.
const RELEASE_AFTER: Duration = Duration::from_millis(100);
/// The buffer an empty `pending` keeps without a deadline (a gathered round of small
/// segments fits).
const KEEP_IDLE: usize = 64 * 1024;
const RTO_MAX: Duration = Duration::from_secs(30);
/// A tail-loss probe (`TcpFlow::probe_deadline`) goes this long after two smoothed round
/// trips without an ACK (Linux adds 2 ms, `TCP_TIMEOUT_MIN_US`) ...
const PROBE_SLACK: Duration = Duration::from_millis(2);
/// ... or this long after the data was sent, before a round trip was measured.
const PROBE_FIRST: Duration = Duration::from_millis(10);
/// Probes without an ACK of new data before only the retransmission timer is left.
const PROBES_MAX: u8 = 3;
/// Retransmission timeouts in a row without progress (or, while the guest's window is
/// shut, without an answer to the probes) before the connection is reset.
const MAX_RETRIES: u32 = 12;
/// Our ACK of a guest listener's SYN-ACK goes again this many times at most, from
/// `RTO_MIN` after it and doubling (the last 51 s after the handshake), while nothing
/// was exchanged (`TcpFlow::handshake_ack_due`).
const HANDSHAKE_ACKS_MAX: u8 = 8;
/// Our SYN to the guest (a published port's connection) sent again this many times without
/// an answer: the guest is not there, and the host's client is reset.
const MAX_SYN_RETRIES: u32 = 6;
/// Unanswered SYNs over IPv6 (about 1.4 s) before an inbound flow with a fallback tries
/// IPv4.
const FALLBACK_AFTER_RETRIES: u32 = 3;
/// MSS assumed when the guest's SYN carries none (RFC 9293).
const DEFAULT_MSS: u32 = 536;
/// The largest segment to a guest that does not scale its window: half the largest window
/// it can offer, as Linux's senders keep to half the largest window seen
/// (`tcp_bound_to_half_wnd`). A Linux guest offers a window in multiples of the largest
/// segment it got when it does not scale: after one of 64 KiB (its MSS on a TAP of MTU
/// 65520), its window stayed shut although its reader had taken everything. A guest
/// listener that answers with a SYN cookie is one such guest unless it takes timestamps: a
/// cookie keeps window scaling and SACK only in the timestamp it echoes.
const UNSCALED_SEGMENT_MAX: u32 = u16::MAX as u32 / 2;

/// What the engine should do with the flow after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Remove the flow; its socket closes when it is dropped.
    Close,
}

/// One guest TCP connection and its host socket `S` (the kernel's, unless a test gives a
/// model). The states and the invariants that bind the fields are in `state.rs`.
pub struct TcpFlow<S: HostSocket = KernelSocket> {
    pub guest: SocketAddr,
    /// The destination as the guest sees it (replies come from here).
    pub remote: SocketAddr,
    /// An inbound flow over IPv6 to a guest that may listen on IPv4 only: the guest and
    /// remote addresses to send the SYN to instead if the guest resets this one. The
    /// engine then finds the flow under its new addresses (`FlowTable::rekey`).
    /// (Boxed: few flows have one, and two addresses would take 64 bytes of every flow.)
    pub fallback: Option<Box<(SocketAddr, SocketAddr)>>,
    pub sock: S,
    /// When the flow began (connecting flows are evicted oldest first; the connect times
    /// out `CONNECT_TIMEOUT` after it).
    pub born: Instant,
    phase: Phase,
    /// We sent the SYN (a published port's connection): the guest is the listener, which
    /// may hold the connection as a SYN cookie until a segment at our first byte comes
    /// (`send_probe`).
    we_opened: bool,
    to_host: ToHost,
    to_guest: ToGuest,

    // Guest to host.
    guest_isn: u32,
    /// Next sequence number expected from the guest; everything before it is in the socket.
    rcv_nxt: u32,
    /// Guest bytes from rcv_nxt on that the socket has not taken yet (not acknowledged).
    pending: Vec<u8>,
    pending_head: usize,
    /// The right edge of the window we offered: the furthest the guest may send. It never
    /// moves left (RFC 9293 3.8.6: a receiver does not shrink its window), so whatever the
    /// guest sent within it is held, never dropped.
    rcv_edge: u32,

    // Host to guest. While the SYN is unacknowledged, snd_una is our ISN.
    snd_una: u32,
    snd_nxt: u32,
    /// Highest sequence number sent so far (snd_nxt goes back on retransmission).
    snd_max: u32,
    /// The right edge of the guest's window: what it acknowledged plus the window it
    /// offered with that ACK. (The window itself, `guest_wnd()`, is `wnd_edge - snd_una`.)
    wnd_edge: u32,
    guest_wscale: u8,
    our_wscale: u8,
    /// Both ends offered SACK (RFC 2018): our ACKs tell the guest which segments after a
    /// gap are kept (`sack_blocks`), so that it resends only what is missing, and the
    /// guest's blocks tell us the same about our data (`sacked`).
    sack_ok: bool,
    /// Both ends offered timestamps (RFC 7323): the guest's TSval to echo in every segment
    /// we send (TS.Recent: taken from a segment at or before what we last acknowledged, so
    /// a delayed ACK echoes the first segment it covers, and a resend's answer the resend),
    /// or None without. Each segment then carries our clock, `ts_clock`.
    ts_recent: Option<u32>,
    /// Our timestamp clock at the last entry point: milliseconds since the flow began, from
    /// `ts_offset`.
    ts_clock: u32,
    /// Where our timestamp clock starts: our ISN, a keyed hash (RFC 7323 section 5.4: no
    /// clock shared between connections).
    ts_offset: u32,
    /// What the guest's SACK blocks said arrived of our data beyond `snd_una`: ranges of
    /// sequence numbers, apart and in order, within what was sent, at most `SACKED_MAX`.
    /// Forgotten at a retransmission timeout (a guest may drop what it listed). (Boxed:
    /// only flows that lost data need it; see `sacked()`.)
    #[allow(clippy::box_collection, reason = "8 bytes in every flow, not a Vec's 24")]
    sacked: Option<Box<Vec<(u32, u32)>>>,
    /// While missing ranges are sent again for SACK blocks (`resend_lost`): the right edge of
    /// the highest block then. A resend stops there and goes on from `snd_max` (what was
    /// sent beyond the highest block may still be on its way).
    resend_until: Option<u32>,
    /// The highest sequence number sent again, or `snd_una` (which moves it along: a mark
    /// left behind would seem to lie ahead 2 GiB later): missing ranges below it were
    /// resent already, and are not sent again before a timeout or a probe.
    high_resent: u32,
    /// Why the bytes being sent again go again (`usernet_tcp_resent_bytes_total`).
    resend_cause: Resend,
    /// After a go-back-N (`rewind`): what had been sent then (RFC 6582's recovery point),
    /// until the guest acknowledges beyond it. Meanwhile duplicate ACKs are not counted:
    /// the guest answers each byte it gets twice with one, and three would send again,
    /// needlessly, all that was sent since.
    recover: Option<u32>,
    /// The smoothed round trip to the guest (RFC 6298), from `timed`, in microseconds.
    srtt_us: Option<u32>,
    /// The sequence number whose ACK gives the next round-trip sample, and when the byte
    /// before it was sent (`since_born`); forgotten when anything is sent again (Karn's
    /// rule). (Times in u32 microseconds keep the flow small, as flows are many.)
    timed: Option<(u32, u32)>,
    /// When the tail-loss probe goes (RFC 8985 section 7): the guest acknowledged nothing
    /// for two round trips while data is in flight. Its last byte goes again: if what came
    /// before it was lost, the guest's answer says so (`send_probe`) and what is missing
    /// goes at once; a lost last segment otherwise waits for the retransmission timer (200
    /// ms at least), as it would after three duplicate ACKs that a short answer never gets.
    /// One byte costs little when nothing was lost (a guest that delays its ACK; it answers
    /// a duplicate at once).
    probe_deadline: Option<Instant>,
    /// Probes sent since the guest last acknowledged new data (`PROBES_MAX`).
    probes: u8,
    /// When our ACK of a guest listener's SYN-ACK goes again (microseconds since `born`),
    /// while neither side has sent a byte (`nothing_exchanged`): a listener whose queue
    /// of half-open connections was full answered our SYN with a SYN cookie, and while its
    /// accept queue is full it drops the ACK that would open the connection, keeping no
    /// trace of it. Data we send opens it later (`may_hold_a_cookie`); a server that speaks
    /// first (SSH, SMTP, a database) would otherwise wait for a client that waits for it,
    /// as a kernel's client does. Where the ACK did open the connection, another is a
    /// duplicate that the guest ignores.
    handshake_ack_due: Option<u32>,
    /// ACKs of the SYN-ACK sent again so far (`HANDSHAKE_ACKS_MAX`).
    handshake_acks: u8,
    /// The end of what the last probe sent again, until the next ACK of new data.
    probed: Option<u32>,
    /// A probe was answered by an ACK of what it sent again: the guest delays its ACKs, so
    /// a tail shorter than two of its segments is not probed (the guest may be waiting to
    /// acknowledge it along with its answer).
    acks_late: bool,
    mss: u32,
    dup_acks: u8,
    rto: Duration,
    rto_deadline: Option<Instant>,
    /// Retransmission timeouts in a row without progress (see `MAX_RETRIES`).
    retries: u32,

    /// Edge-triggered readiness of the host socket, as last seen: it may hold data (or end
    /// of stream, or an error) past the peek offset; a peek that finds nothing clears it.
    host_readable: bool,
    /// The host socket reported end of stream or an error (EPOLLRDHUP, EPOLLERR): peeks go
    /// on until they find it. Until then a short peek (fewer bytes than asked) means the
    /// socket is drained, and the next bytes will come with an edge of their own, so no
    /// peek is made only to hear EAGAIN.
    host_read_closed: bool,
    /// The host socket reported an error (EPOLLERR): only a peek can tell what comes before
    /// it, so a short peek is never taken for the end of stream.
    host_error: bool,
    /// It may take more data; a send that is cut short clears it.
    host_writable: bool,
    /// What the socket's send buffer takes, as far as the flow knows: the last measure
    /// (`HostSocket::send_room`) less what was written since, so never more than it takes
    /// (the peer's reading only adds room). None when the socket cannot say: the window is
    /// then the largest.
    room: Option<usize>,
    /// Bytes written since `room` was measured; past `MEASURE_EVERY` the next segment to
    /// the guest measures it again.
    unmeasured: usize,
    /// An ACK is owed to the guest (sent at the end of the batch, or delayed), or guest
    /// data gathered in `pending` waits for the end of the round: either way the engine
    /// calls `write_gathered` and `flush_ack` then.
    pub need_ack: bool,
    /// `rcv_nxt` as the guest last heard it in an ACK.
    acked_rcv: u32,
    /// A gap was seen, and out-of-order data (dropped) reached this far: until `rcv_nxt`
    /// gets there, the guest is recovering and every ACK goes at once (RFC 5681 4.2).
    quick_ack_until: Option<u32>,
    /// When a delayed ACK must go at the latest.
    ack_deadline: Option<Instant>,
    /// The last guest segment gathered was full-sized, without PSH or FIN: more of the same
    /// write follows, so what was gathered may wait for it (`may_hold`).
    more_follows: bool,
    /// Gathered data is held past the end of its round, until this time at the latest.
    hold_deadline: Option<Instant>,
    /// `pending` emptied with more than `KEEP_IDLE` of capacity: released at this time
    /// if it is still empty then (`RELEASE_AFTER`).
    release_deadline: Option<Instant>,
    /// The deadline the engine's timer heap holds for this flow.
    pub scheduled: Option<Instant>,
    /// Bytes each way and activity, for `/v1/flows`.
    pub traffic: super::Traffic,
    /// Guest segments that came after a gap, within the window offered, in sequence order
    /// from `rcv_nxt`: passed on once the gap is filled (`receive`).
    out_of_order: Vec<OutOfOrder>,
    /// What they cost: their payload bytes and [`OUT_OF_ORDER_ENTRY_COST`] each, counted
    /// against the shared budget.
    out_of_order_cost: usize,
    /// The sequence number of the last segment that came after a gap: the SACK block that
    /// holds it goes first (RFC 2018 section 4).
    last_out_of_order: u32,
    /// The right edge of the highest SACK block sent, while it is beyond `rcv_nxt`: what
    /// the guest was told arrived is acknowledged once contiguous (`ack_number`).
    sacked_to: Option<u32>,
    /// What `pending` and `out_of_order` hold of the budget shared by all flows
    /// (`--max-buffered`).
    held: crate::engine::budget::Held,
    /// Since when the host socket has taken none of the guest data waiting for it (a send
    /// was cut short, and none made progress since): `--tcp-stall-timeout` counts from here.
    stalled_since: Option<Instant>,
}

impl TcpFlow<KernelSocket> {
    /// A flow for the guest's SYN `syn`, with the host socket just dialled.
    pub fn new(
        switch: &mut Switch,
        guest: SocketAddr,
        remote: SocketAddr,
        syn: &TcpHeader,
        dial: TcpDial,
        isn: u32,
        now: Instant,
    ) -> (TcpFlow, Verdict) {
        let sock = KernelSocket::new(dial.fd, dial.is_tcp);
        TcpFlow::outbound(switch, guest, remote, syn, sock, dial.connected, isn, now)
    }

    /// A flow for a connection accepted on a published port: sends the guest a SYN.
    pub fn new_inbound(
        switch: &mut Switch,
        guest: SocketAddr,
        remote: SocketAddr,
        sock: OwnedFd,
        is_tcp: bool,
        isn: u32,
        now: Instant,
    ) -> TcpFlow {
        TcpFlow::inbound(switch, guest, remote, KernelSocket::new(sock, is_tcp), isn, now)
    }
}

impl<S: HostSocket> TcpFlow<S> {
    /// A flow for the guest's SYN `syn` on socket `sock`, whose connect is in progress
    /// unless `connected`.
    #[allow(clippy::too_many_arguments)]
    pub fn outbound(
        switch: &mut Switch,
        guest: SocketAddr,
        remote: SocketAddr,
        syn: &TcpHeader,
        sock: S,
        connected: bool,
        isn: u32,
        now: Instant,
    ) -> (TcpFlow<S>, Verdict) {
        let (guest_wscale, our_wscale) = match syn.window_scale {
            Some(ws) => (ws, OUR_WSCALE),
            None => (0, 0),
        };
        let mss = send_mss(switch, remote, syn);
        let mut f = TcpFlow::blank(guest, remote, sock, Phase::Connecting, isn, now, switch.budget.hold());
        f.guest_isn = syn.seq;
        f.rcv_nxt = syn.seq.wrapping_add(1);
        f.rcv_edge = f.rcv_nxt;
        f.acked_rcv = f.rcv_nxt;
        // (The window of a SYN is never scaled; it counts from the ACK of our SYN.)
        f.wnd_edge = isn.wrapping_add(1).wrapping_add(syn.window as u32);
        f.guest_wscale = guest_wscale;
        f.our_wscale = our_wscale;
        f.sack_ok = syn.sack_permitted;
        f.ts_recent = syn.timestamps.map(|(val, _)| val);
        f.mss = mss;
        let _ = f.sock.set_peek_offset(0);
        let v = if connected { f.connected(switch, now) } else { Verdict::Keep };
        let v = f.checked(v);
        (f, v)
    }

    /// A flow for a connection accepted on a published port (socket `sock`): sends the
    /// guest a SYN.
    pub fn inbound(
        switch: &mut Switch,
        guest: SocketAddr,
        remote: SocketAddr,
        sock: S,
        isn: u32,
        now: Instant,
    ) -> TcpFlow<S> {
        let mut f = TcpFlow::blank(guest, remote, sock, Phase::SynSent, isn, now, switch.budget.hold());
        f.host_readable = true;
        f.host_writable = true;
        let _ = f.sock.set_peek_offset(0);
        f.send_syn(switch);
        f.arm_rto(now);
        f.checked(Verdict::Keep);
        f
    }

    /// A flow in `phase` with nothing exchanged yet; the constructors fill in the rest.
    fn blank(
        guest: SocketAddr,
        remote: SocketAddr,
        sock: S,
        phase: Phase,
        isn: u32,
        now: Instant,
        held: crate::engine::budget::Held,
    ) -> TcpFlow<S> {
        TcpFlow {
            guest,
            remote,
            sock,
            born: now,
            phase,
            we_opened: phase == Phase::SynSent,
            to_host: ToHost::Open,
            to_guest: ToGuest::SynUnacked,
            guest_isn: 0,
            rcv_nxt: 0,
            pending: Vec::new(),
            pending_head: 0,
            rcv_edge: 0,
            snd_una: isn,
            snd_nxt: isn.wrapping_add(1),
            snd_max: isn.wrapping_add(1),
            wnd_edge: isn.wrapping_add(1),
            guest_wscale: 0,
            our_wscale: OUR_WSCALE,
            sack_ok: false,
            ts_recent: None,
            ts_clock: isn,
            ts_offset: isn,
            mss: DEFAULT_MSS,
            dup_acks: 0,
            sacked: None,
            resend_until: None,
            high_resent: isn,
            recover: None,
            resend_cause: Resend::Timeout,
            srtt_us: None,
            timed: None,
            probe_deadline: None,
            handshake_ack_due: None,
            handshake_acks: 0,
            probes: 0,
            probed: None,
            acks_late: false,
            rto: RTO_MIN,
            rto_deadline: None,
            retries: 0,
            host_readable: false,
            host_read_closed: false,
            host_error: false,
            host_writable: false,
            room: Some(0),
            unmeasured: 0,
            need_ack: false,
            acked_rcv: 0,
            quick_ack_until: None,
            ack_deadline: None,
            more_follows: false,
            hold_deadline: None,
            release_deadline: None,
            scheduled: None,
            traffic: super::Traffic::new(now),
            out_of_order: Vec::new(),
            out_of_order_cost: 0,
            last_out_of_order: 0,
            sacked_to: None,
            held,
            stalled_since: None,
            fallback: None,
        }
    }

    /// Checks the invariants (debug builds) of a flow that stays, and counts what it holds
    /// against the shared budget; passes `v` through.
    #[inline]
    fn checked(&mut self, v: Verdict) -> Verdict {
        self.held.set(self.pending.capacity() + self.out_of_order_cost);
        if cfg!(debug_assertions) && v == Verdict::Keep {
            self.check_invariants();
        }
        v
    }

    /// A SYN that starts a new connection on this flow's ports (a different ISN).
    pub fn is_stale_for_syn(&self, syn: &TcpHeader) -> bool {
        syn.seq != self.guest_isn
    }

    pub fn is_connecting(&self) -> bool {
        self.phase == Phase::Connecting
    }

    /// The flow's state as `/metrics` names it: `connecting` (outbound, the host's connect
    /// in progress), `syn_sent` (inbound, our SYN unanswered), `established`, or `closing`
    /// once either side has sent its FIN.
    pub fn state_name(&self) -> &'static str {
        match self.phase {
            Phase::Connecting => "connecting",
            Phase::SynSent => "syn_sent",
            Phase::Established
                if self.to_host == ToHost::Open && matches!(self.to_guest, ToGuest::SynUnacked | ToGuest::Open) =>
            {
                "established"
            }
            Phase::Established => "closing",
        }
    }

    /// Established, and the guest's FIN not passed on yet (see `Flow::guest_still_sending`).
    pub fn guest_still_sending(&self) -> bool {
        self.phase == Phase::Established && self.to_host != ToHost::Shut
    }

    /// Makes the host socket's close a reset.
    pub fn reset_on_close(&mut self) {
        self.sock.set_linger_zero();
    }

    /// The earliest time `on_timer` has work to do.
    pub fn deadline(&self) -> Option<Instant> {
        let connect = (self.phase == Phase::Connecting).then(|| self.born + CONNECT_TIMEOUT);
        // A timeout too long to add to a time (no flag allows one) is no deadline.
        let stall = self.stalled_since.zip(self.held.budget().stall_timeout()).and_then(|(t, d)| t.checked_add(d));
        [
            connect,
            self.rto_deadline,
            self.probe_deadline,
            self.handshake_ack_due.map(|us| self.born + Duration::from_micros(u64::from(us))),
            self.ack_deadline,
            self.hold_deadline,
            self.release_deadline,
            stall,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The payload of a full-sized guest segment: its MSS, within the link's MTU.
    fn full_segment(&self, switch: &Switch) -> usize {
        (self.mss as usize).min(switch.max_tcp_payload(self.remote.is_ipv6()))
    }

    fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_head
    }

    /// Where our FIN is (or goes), once the host socket reached end of stream.
    fn fin_seq(&self) -> Option<u32> {
        match self.to_guest {
            ToGuest::SynUnacked | ToGuest::Open => None,
            ToGuest::FinQueued { fin } => Some(fin),
            ToGuest::FinSent | ToGuest::FinAcked => Some(self.snd_max.wrapping_sub(1)),
        }
    }

    /// The end of the host data sent so far (our FIN not counted).
    fn sent_data_end(&self) -> u32 {
        match self.to_guest {
            ToGuest::FinSent | ToGuest::FinAcked => self.snd_max.wrapping_sub(1),
            _ => self.snd_max,
        }
    }

    /// After a rewind, bytes before what was sent already are to be sent again: they are in
    /// the socket, whatever its readiness says.
    fn resending(&self) -> bool {
        seq_lt(self.snd_nxt, self.sent_data_end())
    }

    /// The guest's window, from snd_una on.
    fn guest_wnd(&self) -> u32 {
        self.wnd_edge.wrapping_sub(self.snd_una)
    }

    /// What is left of the window offered, from rcv_nxt to its right edge.
    fn offered(&self) -> usize {
        if seq_lt(self.rcv_nxt, self.rcv_edge) { self.rcv_edge.wrapping_sub(self.rcv_nxt) as usize } else { 0 }
    }

    /// How much guest data the flow may hold (from rcv_nxt on): the window it would offer
    /// while the socket takes what comes (data is held only until the end of the round);
    /// once it is full, what the guest may still send within the window it was offered,
    /// and no more.
    fn hold_cap(&self) -> usize {
        if self.host_writable { self.window_room().max(self.offered()) } else { self.offered() }
    }

    /// The window while the socket takes data: the room known in its send buffer and
    /// `ROOM_MARGIN` more, at most `RECV_BUF` (as passt sizes its window from the socket).
    fn window_room(&self) -> usize {
        match self.room {
            Some(room) => room.saturating_add(ROOM_MARGIN).min(RECV_BUF),
            None => RECV_BUF,
        }
    }

    /// Measures the room in the socket's send buffer again when enough was written since
    /// the last measure that the window might otherwise shrink below what the socket
    /// takes. One call per `MEASURE_EVERY` bytes at most, none once the window is the
    /// largest anyway.
    fn measure_room(&mut self) {
        if let Some(room) = self.room
            && self.host_writable
            && self.unmeasured >= MEASURE_EVERY
            && room + ROOM_MARGIN < RECV_BUF
        {
            self.room = self.sock.send_room();
            self.unmeasured = 0;
        }
    }

    /// A send was cut short: the socket takes nothing more until it says it is writable
    /// again (then the room is measured anew: `socket_writable`).
    fn socket_full(&mut self, now: Instant) {
        self.host_writable = false;
        self.room = self.room.map(|_| 0);
        self.stalled_since.get_or_insert(now);
    }

    /// The socket said it takes data again (a readiness report with EPOLLOUT after a send
    /// was cut short; reports for reading carry EPOLLOUT too, and measure nothing): the
    /// next segment to the guest measures how much, so that the window it offers follows.
    fn socket_writable(&mut self) {
        self.host_writable = true;
        self.unmeasured = MEASURE_EVERY;
    }

    /// `n` bytes went into the socket.
    fn wrote(&mut self, n: usize) {
        self.room = self.room.map(|r| r.saturating_sub(n));
        self.unmeasured = self.unmeasured.saturating_add(n);
    }

    /// The window field we advertise, scaled. While the host socket takes data, the room
    /// in its send buffer and a margin, less what is held (the kernel's send buffer is the
    /// queue); once it is full, the window no longer grows: its right edge stays where it
    /// was, so the guest sends what was in flight and then waits, holding at most about a
    /// margin per flow in usernet's memory, and hears of the window again as soon as the
    /// socket drains (`flush_pending`).
    fn window_field(&self) -> u16 {
        // Counted from `rcv_nxt`, and sent from the ACK number, which may be ahead of it.
        let ahead = self.ack_number().wrapping_sub(self.rcv_nxt) as usize;
        let open = if self.host_writable { self.window_room().saturating_sub(self.pending_len()) } else { 0 };
        let scale = self.our_wscale;
        // Rounded up, so that the edge does not move left by the scaling's remainder; but
        // never past `RECV_BUF` from `rcv_nxt`: rounded up at every ACK that moves, the edge
        // would creep a little each time (CI's debug build once saw a flow hold 248 bytes
        // over `RECV_BUF`). Rounded down there, the window shrinks by less than one unit of
        // its scale, and `rcv_edge` still takes what the guest sends up to the old edge.
        let keep = self.offered().saturating_sub(ahead);
        let up = (keep + (1 << scale) - 1) >> scale;
        let kept = if (up << scale) <= RECV_BUF.saturating_sub(ahead) { up } else { keep >> scale };
        (open.saturating_sub(ahead) >> scale).max(kept).min(u16::MAX as usize) as u16
    }

    /// The ACK number for the guest: what the socket took (`rcv_nxt`), and beyond it what
    /// `pending` holds up to the right edge of the SACK blocks sent. A Linux guest takes an
    /// ACK that stops inside data it was told arrived for reneging (after 10 ms it sends
    /// everything from there again, its congestion window back to one segment), and when
    /// a gap is filled the segments kept behind it go to `pending`, of which a full socket
    /// takes only part. So listed data is acknowledged once it is contiguous, as a kernel
    /// acknowledges what waits in its receive queue: `pending` is held until the socket
    /// takes it, and dropped only with a reset; so is a FIN held behind it.
    fn ack_number(&self) -> u32 {
        match self.sacked_to {
            Some(listed) if seq_lt(self.rcv_nxt, listed) => {
                let fin_held = u32::from(self.to_host == ToHost::FinHeld);
                let held = self.rcv_nxt.wrapping_add(self.pending_len() as u32).wrapping_add(fin_held);
                if seq_lt(held, listed) { held } else { listed }
            }
            _ => self.rcv_nxt,
        }
    }

    fn segment(&self, seq: u32, flags: u8) -> TcpHeader {
        TcpHeader {
            src_port: self.remote.port(),
            dst_port: self.guest.port(),
            seq,
            ack: self.ack_number(),
            flags,
            window: self.window_field(),
            timestamps: self.ts_recent.map(|recent| (self.ts_clock, recent)),
            ..Default::default()
        }
    }

    /// Where the payload of a data segment goes in the frame buffer: behind its header,
    /// which carries timestamps if the flow has them (and never SACK blocks).
    fn payload_off(&self) -> usize {
        TCP_PAYLOAD_OFF + self.options_len()
    }

    /// What the options of a data segment take: the timestamps, when the flow has them.
    fn options_len(&self) -> usize {
        if self.ts_recent.is_some() { TIMESTAMPS_LEN } else { 0 }
    }

    /// Moves our timestamp clock to `now` (at every entry point that has the time; one that
    /// was missed only leaves an older value, never a smaller one than before).
    fn tick(&mut self, now: Instant) {
        self.ts_clock = self.ts_offset.wrapping_add(now.saturating_duration_since(self.born).as_millis() as u32);
    }

    /// Sends a segment without data. Unless it is a SYN or a FIN, its sequence number is
    /// never past the guest's window edge: after a zero-window probe `snd_nxt` lies one past
    /// a shut window, and the guest drops a segment outside its window (RFC 9293 3.10.7.4),
    /// the ACK in it too, so that its own data would go on its timers only (Linux then sends
    /// a segment per 50 ms or so). Linux's `tcp_acceptable_seq` keeps to the same edge.
    fn send_flags(&mut self, switch: &mut Switch, seq: u32, flags: u8) {
        self.measure_room();
        let seq = if flags & (SYN | FIN) == 0 && seq_lt(self.wnd_edge, seq) { self.wnd_edge } else { seq };
        let mut h = self.segment(seq, flags);
        if flags & (SYN | RST) == 0 {
            h.sack = self.sack_blocks();
        }
        switch.send_tcp(self.remote, self.guest, &h, 0);
        for &(_, right) in h.sack.as_slice() {
            if self.sacked_to.is_none_or(|s| seq_lt(s, right)) {
                self.sacked_to = Some(right);
            }
        }
        if flags & ACK != 0 {
            self.told_ack(&h);
        }
    }

    /// Segment `h`, carrying our current ACK, went to the guest: nothing is owed any more,
    /// unless gathered guest data waits to be written at the end of the round (then the
    /// engine must still come by: `write_gathered`, then the ACK of what it wrote).
    fn told_ack(&mut self, h: &TcpHeader) {
        self.need_ack = self.pending_len() > 0 && self.host_writable;
        self.ack_deadline = None;
        self.acked_rcv = h.ack;
        // (A SYN-ACK's window field is never scaled; the edge counts from the window that
        // follows it, as the guest's first segments may go that far once it has the ACK.)
        let window = if h.has(SYN) { self.window_field() } else { h.window };
        let edge = h.ack.wrapping_add((window as u32) << self.our_wscale);
        if seq_lt(self.rcv_edge, edge) {
            self.rcv_edge = edge;
        }
        if self.sacked_to.is_some_and(|s| !seq_lt(self.rcv_nxt, s)) {
            self.sacked_to = None;
        }
    }

    /// Our SYN to the guest (published ports).
    fn send_syn(&mut self, switch: &mut Switch) {
        let mut h = self.segment(self.snd_una, SYN);
        h.ack = 0;
        h.mss = Some(switch.max_tcp_payload(self.remote.is_ipv6()).min(u16::MAX as usize) as u16);
        h.window_scale = Some(OUR_WSCALE);
        h.sack_permitted = true;
        h.timestamps = Some((self.ts_clock, 0));
        h.window = RECV_BUF.min(u16::MAX as usize) as u16;
        switch.send_tcp(self.remote, self.guest, &h, 0);
    }

    fn send_syn_ack(&mut self, switch: &mut Switch) {
        let mut h = self.segment(self.snd_una, SYN | ACK);
        h.mss = Some(switch.max_tcp_payload(self.remote.is_ipv6()).min(u16::MAX as usize) as u16);
        if self.our_wscale > 0 {
            h.window_scale = Some(self.our_wscale);
        }
        h.sack_permitted = self.sack_ok;
        // The window in a SYN is never scaled.
        h.window = (RECV_BUF - self.pending_len()).min(u16::MAX as usize) as u16;
        switch.send_tcp(self.remote, self.guest, &h, 0);
        self.told_ack(&h);
    }

    /// Sends our SYN again over IPv4, to [`TcpFlow::fallback`]'s addresses (the guest
    /// refused it over IPv6, or never answered). The caller re-indexes the flow.
    fn fall_back(&mut self, switch: &mut Switch, now: Instant) {
        let Some(&(guest, remote)) = self.fallback.take().as_deref() else { return };
        tracing::debug!("{} -> {}: not over IPv6; over IPv4 to {guest}", self.remote, self.guest);
        self.guest = guest;
        self.remote = remote;
        self.send_syn(switch);
        self.retries = 0;
        self.rto = RTO_MIN;
        self.arm_rto(now);
    }

    /// The guest answered our SYN.
    fn on_syn_ack(&mut self, switch: &mut Switch, h: &TcpHeader, now: Instant) -> Verdict {
        if h.has(RST) {
            // Only a RST that acknowledges our SYN counts (RFC 9293 section 3.10.7.3).
            if !(h.has(ACK) && h.ack == self.snd_una.wrapping_add(1)) {
                return Verdict::Keep;
            }
            if self.fallback.is_some() {
                // Nothing listens there over IPv6.
                self.fall_back(switch, now);
                return Verdict::Keep;
            }
            // Nothing listens on that guest port: the client sees a reset.
            return self.reset_host();
        }
        if !(h.has(SYN) && h.has(ACK)) || h.ack != self.snd_una.wrapping_add(1) {
            return Verdict::Keep;
        }
        self.guest_isn = h.seq;
        self.rcv_nxt = h.seq.wrapping_add(1);
        self.rcv_edge = self.rcv_nxt;
        match h.window_scale {
            Some(ws) => self.guest_wscale = ws,
            None => {
                self.guest_wscale = 0;
                self.our_wscale = 0;
            }
        }
        self.sack_ok = h.sack_permitted;
        self.ts_recent = h.timestamps.map(|(val, _)| val);
        self.mss = send_mss(switch, self.remote, h);
        self.wnd_edge = h.ack.wrapping_add(h.window as u32);
        self.snd_una = h.ack;
        self.high_resent = h.ack;
        self.phase = Phase::Established;
        self.to_guest = ToGuest::Open;
        // Opened where it is: no falling back any more.
        self.fallback = None;
        self.rto_deadline = None;
        self.retries = 0;
        self.rto = RTO_MIN;
        self.send_flags(switch, self.snd_nxt, ACK);
        if self.host_writable && self.flush_pending(switch, now) == Verdict::Close {
            return Verdict::Close;
        }
        let v = self.push(switch, now);
        if v == Verdict::Keep && self.nothing_exchanged() {
            self.handshake_ack_due = Some(self.since_born(now).wrapping_add(RTO_MIN.as_micros() as u32));
        }
        v
    }

    /// A connection we opened to a guest listener on which neither side has sent a byte
    /// (nor a FIN) since the handshake: the guest may not know of it (`handshake_ack_due`).
    fn nothing_exchanged(&self) -> bool {
        self.may_hold_a_cookie()
            && self.phase == Phase::Established
            && self.to_guest == ToGuest::Open
            && self.snd_max == self.snd_una
            && self.ack_number() == self.guest_isn.wrapping_add(1)
            && self.pending_len() == 0
            && self.out_of_order.is_empty()
    }

    /// Sends the ACK owed to the guest, unless it may wait for data to ride on (then
    /// `ack_deadline`, set when the data came, bounds the wait).
    pub fn flush_ack(&mut self, switch: &mut Switch, now: Instant) {
        self.tick(now);
        self.flush_ack_inner(switch, now);
        self.checked(Verdict::Keep);
    }

    fn flush_ack_inner(&mut self, switch: &mut Switch, now: Instant) {
        if !self.need_ack || self.phase != Phase::Established {
            return;
        }
        let unacked = self.ack_number().wrapping_sub(self.acked_rcv) as usize;
        let full_segment = self.full_segment(switch);
        let may_wait = unacked > 0
            && unacked < 2 * full_segment
            && self.quick_ack_until.is_none()
            && (self.pending_len() == 0 || self.hold_deadline.is_some())
            && self.to_host == ToHost::Open
            && self.ack_deadline.is_some_and(|d| d > now);
        if self.quick_ack_until.is_some_and(|u| !seq_lt(self.ack_number(), u)) {
            self.quick_ack_until = None;
        }
        // Held data is not acknowledged yet: an ACK of nothing new would be a duplicate ACK,
        // and three of them make the guest retransmit.
        let holding_only = unacked == 0 && self.hold_deadline.is_some();
        if !may_wait && !holding_only {
            self.send_flags(switch, self.snd_nxt, ACK);
        }
    }

    /// Resets the guest's side and ends the flow.
    fn reset_guest(&mut self, switch: &mut Switch) -> Verdict {
        // At the highest sequence number sent (snd_nxt may be back at snd_una after a
        // rewind), which the guest has not gone past: a guest that follows RFC 5961 (Linux)
        // drops a RST below its rcv_nxt, and one in its window but not at rcv_nxt it answers
        // with an ACK, which finds no flow and gets a RST at exactly the right place. Not
        // beyond the window's right edge (a zero-window probe), as Linux does (`send_flags`).
        self.send_flags(switch, self.snd_max, RST | ACK);
        Verdict::Close
    }

    /// Resets the host side (the peer sees RST) and ends the flow.
    fn reset_host(&mut self) -> Verdict {
        self.sock.set_linger_zero();
        Verdict::Close
    }

    /// The host side is connected: the guest gets its SYN-ACK.
    fn connected(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        self.phase = Phase::Established;
        self.host_writable = true;
        self.send_syn_ack(switch);
        self.rto_deadline = Some(now + self.rto);
        Verdict::Keep
    }

    /// The host socket's readiness said end of stream (EPOLLRDHUP): before [`on_socket`].
    ///
    /// [`on_socket`]: TcpFlow::on_socket
    pub fn host_read_closed(&mut self) {
        self.host_read_closed = true;
    }

    /// Readiness of the host socket changed.
    pub fn on_socket(
        &mut self,
        switch: &mut Switch,
        readable: bool,
        writable: bool,
        error: bool,
        now: Instant,
    ) -> Verdict {
        self.traffic.last = now;
        self.tick(now);
        let v = self.socket_ready(switch, readable, writable, error, now);
        self.checked(v)
    }

    fn socket_ready(
        &mut self,
        switch: &mut Switch,
        readable: bool,
        writable: bool,
        error: bool,
        now: Instant,
    ) -> Verdict {
        if self.phase == Phase::Connecting {
            if !(writable || error || readable) {
                return Verdict::Keep;
            }
            // A connect that failed reports EPOLLERR: the kernel sets the socket's error
            // before it wakes epoll. Writable alone means it succeeded, and SO_ERROR need
            // not be asked (one system call less per connection).
            if error || !writable {
                let err = self.sock.take_error();
                if err != 0 {
                    return self.refuse_guest(switch, err);
                }
                if !writable {
                    return Verdict::Keep;
                }
            }
            if self.connected(switch, now) == Verdict::Close {
                return Verdict::Close;
            }
        }
        if readable || error {
            self.host_readable = true;
        }
        if error {
            self.host_read_closed = true;
            self.host_error = true;
        }
        if self.phase == Phase::SynSent {
            if writable {
                self.host_writable = true;
            }
            return Verdict::Keep;
        }
        if writable || error {
            let was_full = !self.host_writable;
            if was_full {
                self.socket_writable();
            }
            // Data held for its PSH waits on (a report for reading carries EPOLLOUT too).
            if (was_full || error || self.hold_deadline.is_none()) && self.flush_pending(switch, now) == Verdict::Close
            {
                return Verdict::Close;
            }
        }
        self.push(switch, now)
    }

    /// The connect failed with errno `err`: tell the guest as a host would.
    pub fn connect_failed(&mut self, switch: &mut Switch, err: i32) -> Verdict {
        // Nothing of the flow changes: it ends.
        if cfg!(debug_assertions) {
            self.check_invariants();
        }
        self.refuse_guest(switch, err)
    }

    fn refuse_guest(&mut self, switch: &mut Switch, err: i32) -> Verdict {
        refuse(switch, self.guest, self.remote, self.guest_isn, err);
        Verdict::Close
    }

    /// A segment from the guest for this flow.
    pub fn on_segment(&mut self, switch: &mut Switch, h: &TcpHeader, payload: &[u8], now: Instant) -> Verdict {
        self.traffic.last = now;
        self.tick(now);
        let v = self.segment_in(switch, h, payload, now);
        self.checked(v)
    }

    fn segment_in(&mut self, switch: &mut Switch, h: &TcpHeader, payload: &[u8], now: Instant) -> Verdict {
        if self.phase == Phase::SynSent {
            return self.on_syn_ack(switch, h, now);
        }
        if h.has(RST) {
            // RFC 5961 3.2: a RST resets only at exactly the next byte expected; one ahead of
            // it, within the window we offer, gets a challenge ACK (a real guest answers it
            // with a RST at that number); anything else is ignored. A blind RST must guess
            // the sequence number exactly.
            // (Or at the ACK number the guest was told, which is past a held FIN that was
            // listed in a SACK block: `ack_number`.)
            let expected = self.rcv_nxt.wrapping_add(self.pending_len() as u32);
            if h.seq == expected || h.seq == self.ack_number() {
                return self.reset_host();
            }
            let window = ((self.window_field() as u32) << self.our_wscale).max(1);
            if seq_lt(expected, h.seq)
                && seq_lt(h.seq, expected.wrapping_add(window))
                && self.phase != Phase::Connecting
            {
                self.send_flags(switch, self.snd_nxt, ACK);
            }
            return Verdict::Keep;
        }
        if h.has(SYN) {
            if self.phase == Phase::Established {
                if self.to_guest == ToGuest::SynUnacked && h.seq == self.guest_isn {
                    // Our SYN-ACK was lost: the guest asks again.
                    self.send_syn_ack(switch);
                } else {
                    self.need_ack = true;
                }
            }
            return Verdict::Keep;
        }
        if let (Some(recent), Some((val, _))) = (self.ts_recent, h.timestamps)
            && seq_le(h.seq, self.acked_rcv)
            && seq_le(recent, val)
        {
            // RFC 7323 section 4.3: what the next segment echoes.
            self.ts_recent = Some(val);
        }
        if self.phase == Phase::Connecting || !h.has(ACK) {
            return Verdict::Keep;
        }
        if self.to_guest == ToGuest::SynUnacked {
            if h.ack != self.snd_una.wrapping_add(1) {
                return Verdict::Keep;
            }
            self.to_guest = ToGuest::Open;
            self.snd_una = h.ack;
            self.high_resent = h.ack;
            self.rto_deadline = None;
            self.retries = 0;
            self.rto = RTO_MIN;
        }
        let old_edge = self.wnd_edge;
        let seg_wnd = (h.window as u32) << self.guest_wscale;
        let seg_edge = h.ack.wrapping_add(seg_wnd);
        let acks_new = seq_lt(self.snd_una, h.ack) && seq_le(h.ack, self.snd_max);
        // The window's right edge: as a segment that acknowledges new data says (even a
        // retransmission, with an old sequence number); for the same ACK, only further out
        // (segments reordered: a stale one would pull the edge back where it no longer
        // is, and a guest does not shrink its window); an older ACK says nothing.
        if acks_new || (h.ack == self.snd_una && seq_lt(self.wnd_edge, seg_edge)) {
            self.wnd_edge = seg_edge;
        }
        if seg_wnd == 0 && (acks_new || h.ack == self.snd_una) {
            // The guest answers (our probes, say) with its window shut: it is alive, and a
            // window kept shut for long is no reason to give up on it.
            self.retries = 0;
        }
        // A duplicate ACK: the guest got a segment beyond a byte it misses, or one it had.
        let dup_ack = !acks_new
            && h.ack == self.snd_una
            && payload.is_empty()
            && !h.has(FIN)
            && self.snd_max != self.snd_una
            && seg_edge == old_edge;
        if acks_new && self.on_ack(switch, h.ack, now) == Verdict::Close {
            return Verdict::Close;
        }
        if dup_ack && !self.sack_ok && self.probed.is_some() {
            // A guest without SACK answers a tail-loss probe with a duplicate ACK when it
            // misses a byte before the probe, which came behind all that was sent before it
            // (one queue): that byte, and perhaps what follows, was lost (see `send_probe`).
            // (An ACK of new data may have left the guest before the probe reached it: it
            // is progress, not an answer, and the probe goes again if nothing more comes.)
            self.rewind(Resend::Probe);
        } else if dup_ack && self.recover.is_none() {
            self.dup_acks = self.dup_acks.saturating_add(1);
            if self.dup_acks == 3 && self.sacked().is_empty() {
                // (With SACK blocks, `resend_lost` sends only what is missing.)
                self.rewind(Resend::DupAcks);
            }
        }
        if self.sack_ok && !h.sack.is_empty() {
            self.note_sacked(h.sack.as_slice());
            self.resend_lost(now);
        }
        if !payload.is_empty() || h.has(FIN) {
            if self.receive(switch, h, payload, now) == Verdict::Close {
                return Verdict::Close;
            }
        } else if seq_lt(h.seq, self.ack_number()) {
            // A keep-alive probe (sequence number one below the next expected): answer it.
            self.send_flags(switch, self.snd_nxt, ACK);
        }
        if self.push(switch, now) == Verdict::Close {
            return Verdict::Close;
        }
        self.check_done(switch)
    }

    /// The guest acknowledged up to `ack` (snd_una < ack <= snd_max).
    fn on_ack(&mut self, switch: &mut Switch, ack: u32, now: Instant) -> Verdict {
        let data_end = self.fin_seq().unwrap_or(self.snd_max);
        let data_ack = if seq_lt(data_end, ack) { data_end } else { ack };
        let n = data_ack.wrapping_sub(self.snd_una) as usize;
        self.traffic.to_guest += n as u64;
        if n > 0 {
            match self.sock.discard(n) {
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("discard on {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        self.snd_una = ack;
        if let Some(sacked) = &mut self.sacked {
            // An ACK that stops at or inside a listed range: the guest dropped what it had
            // listed (reneging; Linux may, under memory pressure). Forget the blocks, so
            // that duplicate ACKs and probes send from `snd_una` again.
            let reneged = sacked.iter().any(|&(left, right)| seq_le(left, ack) && seq_lt(ack, right));
            sacked.retain(|&(_, right)| seq_lt(ack, right));
            if reneged || sacked.is_empty() {
                self.sacked = None;
            }
        }
        if seq_lt(self.high_resent, ack) {
            // (Else, 2 GiB later, the old mark would seem to lie ahead.)
            self.high_resent = ack;
        }
        if self.recover.is_some_and(|recover| seq_lt(recover, ack)) {
            self.recover = None;
        }
        if let Some(end) = self.probed.take()
            && seq_le(end, ack)
        {
            // The guest acknowledged what the probe sent again: nothing was lost, the
            // guest only delays its ACKs (a Linux guest waits 40 ms or more to let the
            // ACK ride on its answer). Its short tails are left to the retransmission
            // timer from now on, so that such a guest is not probed at every exchange.
            self.acks_late = true;
        }
        if seq_lt(self.snd_nxt, ack) {
            // Acknowledged beyond what a rewind has re-sent so far: go on from there.
            self.seek(ack);
        }
        if self.to_guest == ToGuest::FinSent && ack == self.snd_max {
            self.to_guest = ToGuest::FinAcked;
        }
        if let Some((seq, sent)) = self.timed
            && seq_le(seq, ack)
        {
            self.timed = None;
            let sample = u64::from(self.since_born(now).wrapping_sub(sent));
            let srtt = self.srtt_us.map_or(sample, |srtt| (u64::from(srtt) * 7 + sample) / 8);
            self.srtt_us = Some(srtt.min(u64::from(u32::MAX)) as u32);
        }
        self.dup_acks = 0;
        self.retries = 0;
        self.rto = RTO_MIN;
        self.rto_deadline = if self.snd_una != self.snd_max { Some(now + self.rto) } else { None };
        self.probes = 0;
        self.arm_probe(now);
        Verdict::Keep
    }

    /// Go back to the first unacknowledged byte and send again from there (go-back-N), for
    /// `cause`. What the guest's SACK blocks said arrived is forgotten: a guest may drop
    /// data it listed (Linux does under memory pressure), and a timeout may mean it did.
    fn rewind(&mut self, cause: Resend) {
        self.recover = Some(self.snd_max);
        self.sacked = None;
        self.resend_until = None;
        self.resend_cause = cause;
        self.timed = None;
        self.probed = None;
        self.high_resent = self.snd_una;
        self.seek(self.snd_una);
    }

    /// The next byte to send is `to` (at or before `snd_max`): the peek offset goes with it.
    fn seek(&mut self, to: u32) {
        self.snd_nxt = to;
        // Data only: a sequence number past the data's end (the FIN) peeks at the end.
        let end = self.sent_data_end();
        let at = |s: u32| if seq_lt(end, s) { end } else { s };
        let _ = self.sock.set_peek_offset(at(to).wrapping_sub(at(self.snd_una)) as usize);
    }

    /// Takes the guest's SACK blocks into `sacked`. A block below the ACK (a D-SACK, RFC
    /// 2883: a duplicate arrived), from the ACK on, beyond what was sent, or empty says
    /// nothing of use.
    fn note_sacked(&mut self, blocks: &[(u32, u32)]) {
        let (una, max) = (self.snd_una, self.snd_max);
        let key = |s: u32| s.wrapping_sub(una);
        // (A block from `snd_una` on or across it would list what the ACK does not cover:
        // not a block a guest sends.)
        let useful = |&&(left, right): &&(u32, u32)| seq_lt(una, left) && seq_lt(left, right) && seq_le(right, max);
        if !blocks.iter().any(|b| useful(&b)) {
            return;
        }
        let sacked = self.sacked.get_or_insert_default();
        for &(left, right) in blocks.iter().filter(useful) {
            let at = sacked.partition_point(|&(l, _)| key(l) < key(left));
            sacked.insert(at, (left, right));
        }
        // Join what overlaps or touches.
        let mut kept = 0;
        for i in 0..sacked.len() {
            let (left, right) = sacked[i];
            if kept > 0 && key(left) <= key(sacked[kept - 1].1) {
                if key(sacked[kept - 1].1) < key(right) {
                    sacked[kept - 1].1 = right;
                }
            } else {
                sacked[kept] = (left, right);
                kept += 1;
            }
        }
        sacked.truncate(kept.min(SACKED_MAX));
    }

    /// What the guest's SACK blocks listed of our data (`sacked`).
    fn sacked(&self) -> &[(u32, u32)] {
        self.sacked.as_deref().map_or(&[], Vec::as_slice)
    }

    /// The guest's SACK blocks list data beyond a range it does not have. Frames reach a
    /// guest in the order they were sent (one queue), so that range was lost: what is
    /// missing is sent again, from `high_resent` on (below it, it went again already), up
    /// to the highest block; `push` skips what was listed, and then goes on from
    /// `snd_max`. A resend that is itself lost is left to the retransmission timer.
    fn resend_lost(&mut self, now: Instant) {
        let Some(&(_, top)) = self.sacked().last() else {
            return;
        };
        let mut hole = self.high_resent;
        for &(left, right) in self.sacked() {
            if seq_le(left, hole) && seq_lt(hole, right) {
                hole = right;
            }
        }
        if !seq_lt(hole, top) {
            return;
        }
        let go_back_n = self.resending() && self.resend_until.is_none();
        if !go_back_n {
            if self.resend_until.is_none_or(|until| seq_lt(until, top)) {
                self.resend_until = Some(top);
            }
            self.resend_cause = Resend::Sack;
        }
        if seq_lt(hole, self.snd_nxt) {
            self.timed = None;
            self.seek(hole);
            // If this is lost too, the probe finds out.
            self.arm_probe(now);
        }
    }

    /// Before a segment is sent again: past what the guest listed in SACK blocks, and, at
    /// the end of a resend for them, on from `snd_max`.
    fn skip_sacked(&mut self) {
        loop {
            if let Some(until) = self.resend_until
                && !seq_lt(self.snd_nxt, until)
            {
                self.resend_until = None;
                self.seek(self.snd_max);
                return;
            }
            if !self.resending() {
                return;
            }
            let nxt = self.snd_nxt;
            match self.sacked().iter().find(|&&(left, right)| seq_le(left, nxt) && seq_lt(nxt, right)) {
                Some(&(_, right)) => self.seek(right),
                None => return,
            }
        }
    }

    /// Guest data (and maybe FIN) of segment `h`; then what waited behind a gap it filled.
    fn receive(&mut self, switch: &mut Switch, h: &TcpHeader, payload: &[u8], now: Instant) -> Verdict {
        let segment = Segment { seq: h.seq, fin: h.has(FIN), psh: h.has(PSH) };
        if self.receive_segment(switch, segment, payload, now) == Verdict::Close {
            return Verdict::Close;
        }
        while let Some(next) = self.out_of_order.first() {
            let expected = self.rcv_nxt.wrapping_add(self.pending_len() as u32);
            if self.to_host != ToHost::Open {
                self.drop_out_of_order();
                break;
            }
            if seq_lt(expected, next.segment.seq) {
                break; // Still a gap.
            }
            let next = self.out_of_order.remove(0);
            self.out_of_order_cost -= next.cost();
            // Its cost leaves the shared budget before it is taken, so that the budget's
            // room has it: a kept segment may have been listed in a SACK block, and is
            // then never dropped (the guest would not send it again).
            self.held.set(self.pending.capacity() + self.out_of_order_cost);
            let end = next.segment.seq.wrapping_add(next.data.len() as u32);
            if seq_le(end, expected) && !next.segment.fin {
                continue; // Came again in order meanwhile.
            }
            if self.receive_segment(switch, next.segment, &next.data, now) == Verdict::Close {
                return Verdict::Close;
            }
        }
        Verdict::Keep
    }

    /// Keeps a segment that came after a gap, when it lies within the window offered, the
    /// shared budget has room for it and it is not held already: once the gap is filled,
    /// the guest then need not send it again (without SACK, it would resend everything
    /// after the gap, one segment per round trip or by its retransmission timer).
    fn keep_out_of_order(&mut self, segment: Segment, payload: &[u8]) {
        let end = segment.seq.wrapping_add(payload.len() as u32);
        let fits = seq_le(end, self.rcv_edge)
            && self.out_of_order.len() < OUT_OF_ORDER_MAX
            && payload.len() + OUT_OF_ORDER_ENTRY_COST <= self.held.budget().room();
        if !fits || payload.is_empty() && !segment.fin {
            return;
        }
        let from = |seq: u32| seq.wrapping_sub(self.rcv_nxt);
        let at = self.out_of_order.partition_point(|o| from(o.segment.seq) < from(segment.seq));
        if self.out_of_order.get(at).is_some_and(|o| {
            o.segment.seq == segment.seq && o.data.len() >= payload.len() && (o.segment.fin || !segment.fin)
        }) {
            return; // A duplicate.
        }
        let kept = OutOfOrder { segment, data: payload.to_vec() };
        self.out_of_order_cost += kept.cost();
        self.out_of_order.insert(at, kept);
    }

    /// The kept segments as ranges of sequence numbers (first byte, byte after the last),
    /// joined where they touch or overlap, in order.
    fn kept_ranges(&self) -> impl Iterator<Item = (u32, u32)> + '_ {
        let mut kept = self.out_of_order.iter().peekable();
        std::iter::from_fn(move || {
            let first = kept.next()?;
            let (left, mut right) = (first.segment.seq, first.end());
            while let Some(next) = kept.next_if(|next| seq_le(next.segment.seq, right)) {
                if seq_lt(right, next.end()) {
                    right = next.end();
                }
            }
            Some((left, right))
        })
    }

    /// The SACK blocks of an ACK to the guest: none unless both ends offered SACK and
    /// segments after a gap are kept. The block that holds the segment which came last goes
    /// first (RFC 2018 section 4), then the lowest others, up to four (three beside
    /// timestamps). Only what is kept
    /// is reported, and it stays kept until passed on (dropped only with the guest's FIN
    /// taken, when it lies beyond it), so a guest never waits on data it was told arrived.
    fn sack_blocks(&self) -> SackBlocks {
        let mut sack = SackBlocks::default();
        if !self.sack_ok || self.out_of_order.is_empty() {
            return sack;
        }
        let holds_last =
            |&(left, right): &(u32, u32)| seq_le(left, self.last_out_of_order) && seq_lt(self.last_out_of_order, right);
        if let Some(last) = self.kept_ranges().find(holds_last) {
            sack.push(last.0, last.1);
        }
        let most = if self.ts_recent.is_some() { MAX_SACK_BLOCKS_WITH_TIMESTAMPS } else { usize::MAX };
        for range in self.kept_ranges().filter(|r| !holds_last(r)) {
            if sack.as_slice().len() >= most || !sack.push(range.0, range.1) {
                break;
            }
        }
        sack
    }

    /// Forgets the segments kept after a gap (the guest's data ended, or the flow goes).
    fn drop_out_of_order(&mut self) {
        self.out_of_order = Vec::new();
        self.out_of_order_cost = 0;
    }

    /// Guest data (and maybe FIN) of one segment, in order or not.
    fn receive_segment(&mut self, switch: &mut Switch, segment: Segment, payload: &[u8], now: Instant) -> Verdict {
        let Segment { seq, fin, psh } = segment;
        if self.to_host != ToHost::Open {
            self.need_ack = true;
            return Verdict::Keep;
        }
        let expected = self.rcv_nxt.wrapping_add(self.pending_len() as u32);
        if seq_lt(expected, seq) {
            // A gap: something before this was lost. Keep this, and ask again at once
            // (duplicate ACK, with SACK blocks when the guest takes them).
            self.keep_out_of_order(segment, payload);
            self.last_out_of_order = seq;
            self.send_flags(switch, self.snd_nxt, ACK);
            let end = seq.wrapping_add(payload.len() as u32);
            if self.quick_ack_until.is_none_or(|u| seq_lt(u, end)) {
                self.quick_ack_until = Some(end);
            }
            return Verdict::Keep;
        }
        let skip = expected.wrapping_sub(seq) as usize;
        if skip > payload.len() || (skip == payload.len() && !fin) {
            // Entirely old: a retransmission or a keep-alive probe. Answer it.
            self.send_flags(switch, self.snd_nxt, ACK);
            return Verdict::Keep;
        }
        let mut new = &payload[skip..];
        // What the shared budget lets this flow hold: the room left and the buffer it holds
        // already (counted in full, kept while empty: `RELEASE_AFTER`).
        let budget_room = self.held.budget().room() + self.pending.capacity();
        let over_budget = budget_room < self.pending_len() + new.len();
        if self.pending_len() == 0 && self.host_writable && (new.len() >= COALESCE_BELOW || over_budget) {
            match self.sock.send(new) {
                Ok(n) => {
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                    self.traffic.from_guest += n as u64;
                    self.wrote(n);
                    new = &new[n..];
                    if n > 0 {
                        self.stalled_since = None;
                    }
                    if !new.is_empty() {
                        self.socket_full(now);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.socket_full(now),
                Err(e) => {
                    tracing::debug!("send to {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        let cap = self.hold_cap().min(budget_room);
        let room = cap.saturating_sub(self.pending_len());
        let take = new.len().min(room);
        if take < new.len() && budget_room < self.hold_cap() {
            let max = self.held.budget().max();
            switch.limit_reached(Limit::Buffered, now, || {
                format!(
                    "{} MiB of guest data held for host sockets that do not take it (--max-buffered): \
                     guests wait until they drain",
                    max >> 20
                )
            });
        }
        if take > 0 {
            if self.pending.len() + take > self.pending.capacity() {
                self.make_room(take, budget_room);
            }
            self.pending.extend_from_slice(&new[..take]);
        }
        if fin && take == new.len() {
            self.to_host = ToHost::FinHeld;
            self.pass_guest_fin();
        }
        // Everything gathered since the last write must be of one write: data before a PSH
        // (a request, say, followed by the start of the next) is never held.
        let full_segment = self.full_segment(switch);
        self.more_follows = !psh
            && !fin
            && skip == 0
            && take == new.len()
            && take > 0
            && payload.len() >= full_segment
            && (self.more_follows || self.pending_len() == take);
        if !self.more_follows {
            // The end of the write (or a FIN): what was held goes at the end of this round.
            self.hold_deadline = None;
        }
        self.need_ack = true;
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + ACK_DELAY);
        }
        Verdict::Keep
    }

    /// Makes room in `pending`'s buffer for `take` more bytes: first over the front already
    /// written, then by growing it (doubling, as `Vec` does) but never past `budget_room`,
    /// so the buffer charged to the shared budget stays within it (`take` fits: the caller
    /// took no more than `budget_room` allows).
    fn make_room(&mut self, take: usize, budget_room: usize) {
        if self.pending_head > 0 {
            self.pending.drain(..self.pending_head);
            self.pending_head = 0;
        }
        let need = self.pending.len() + take;
        if need > self.pending.capacity() {
            let grown = (2 * self.pending.capacity()).clamp(need, budget_room.max(need));
            self.pending.reserve_exact(grown - self.pending.len());
        }
    }

    /// Passes the guest's FIN on once everything before it reached the socket. When our own
    /// FIN is acknowledged already, the flow is over with this (`check_done`, which every
    /// caller that can get here with the FIN held reaches next; the timer's write of held
    /// data cannot, since data is held only while no FIN has come, invariant 7) and the
    /// close(2) of its socket passes the FIN on: the receive queue holds no byte then (the
    /// guest acknowledged them all, and they were discarded), so the kernel sends a FIN, not
    /// a reset, after what was written. A connection whose host peer closes first (a server
    /// that answers and closes) so makes no shutdown(2).
    fn pass_guest_fin(&mut self) {
        if self.to_host == ToHost::FinHeld && self.pending_len() == 0 {
            if self.to_guest != ToGuest::FinAcked {
                self.sock.shutdown_write();
            }
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.to_host = ToHost::Shut;
            self.release_pending();
        }
    }

    /// Gives `pending`'s empty buffer back (to the allocator and the shared budget).
    fn release_pending(&mut self) {
        debug_assert_eq!(self.pending_len(), 0);
        self.pending = Vec::new();
        self.pending_head = 0;
        self.release_deadline = None;
    }

    /// Writes the guest data gathered during the engine's round (the ACK follows with the
    /// other owed ACKs).
    pub fn write_gathered(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        self.tick(now);
        let v = if !self.host_writable {
            Verdict::Keep
        } else if self.may_hold(now) {
            self.hold_deadline.get_or_insert(now + HOLD_DELAY);
            if self.ack_number() == self.acked_rcv {
                // Nothing written to acknowledge: the delayed ACK would be a duplicate one.
                self.ack_deadline = None;
            }
            Verdict::Keep
        } else if self.write_pending(switch, now) == Verdict::Close {
            Verdict::Close
        } else {
            // The guest's FIN may have been waiting for this data.
            self.check_done(switch)
        };
        self.checked(v)
    }

    /// Whether the data gathered may wait past the end of the round for the rest of the
    /// guest's write: a slow sender (a VM under TCG sends a full segment every ~170 µs) would
    /// otherwise cost one send(2), one wakeup of the host's reader and one ACK per segment.
    /// The kernel's GRO merges segments the same way, until one with PSH (the end of a
    /// write on the guest's side). Only while the last segment was full-sized and carried no
    /// PSH or FIN, less than `HOLD_BYTES` wait, the guest is not recovering a loss, and for
    /// `HOLD_DELAY` at most; data a fast sender gathers in one round passes `HOLD_BYTES`,
    /// and a request, which ends in PSH, is never held.
    fn may_hold(&self, now: Instant) -> bool {
        self.more_follows
            && self.to_host == ToHost::Open
            && self.pending_len() > 0
            && self.pending_len() < HOLD_BYTES
            && self.quick_ack_until.is_none()
            && self.hold_deadline.is_none_or(|d| d > now)
    }

    /// Writes held guest data now that the socket has room; acknowledges what it took.
    fn flush_pending(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        if self.pending_len() == 0 {
            return Verdict::Keep;
        }
        if self.write_pending(switch, now) == Verdict::Close {
            return Verdict::Close;
        }
        // The window opened: tell the guest at once, not at its next retransmission.
        if self.need_ack {
            self.send_flags(switch, self.snd_nxt, ACK);
        }
        Verdict::Keep
    }

    /// Writes `pending` into the socket until it is empty or the socket is full.
    fn write_pending(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        self.hold_deadline = None;
        if self.pending_len() == 0 {
            return Verdict::Keep;
        }
        while self.pending_len() > 0 {
            match self.sock.send(&self.pending[self.pending_head..]) {
                Ok(n) => {
                    self.pending_head += n;
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                    self.traffic.from_guest += n as u64;
                    self.wrote(n);
                    self.need_ack = true;
                    if n > 0 {
                        self.stalled_since = None;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.socket_full(now);
                    break;
                }
                Err(e) => {
                    tracing::debug!("send to {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        if self.pending_len() == 0 {
            self.pending.clear();
            self.pending_head = 0;
            // Kept for the next time the socket fills; an idle flow keeps no large buffer
            // (a gathered round can be ~190 KiB, a full socket's margin more).
            if self.pending.capacity() > KEEP_IDLE {
                self.release_deadline = Some(now + RELEASE_AFTER);
            }
            self.pass_guest_fin();
        } else if self.pending_head > self.pending.len() / 2 {
            self.pending.drain(..self.pending_head);
            self.pending_head = 0;
        }
        Verdict::Keep
    }

    /// Sends host data (and FIN at EOF) to the guest while its window allows.
    fn push(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        if self.phase != Phase::Established || self.to_guest == ToGuest::SynUnacked {
            return Verdict::Keep;
        }
        loop {
            self.skip_sacked();
            if let Some(f) = self.fin_seq() {
                if self.snd_nxt == f {
                    self.send_flags(switch, f, FIN | ACK);
                    self.snd_nxt = f.wrapping_add(1);
                    self.snd_max = self.snd_nxt;
                    self.to_guest = ToGuest::FinSent;
                    self.arm_rto(now);
                }
                if self.snd_nxt == f.wrapping_add(1) {
                    break;
                }
            }
            let resending = self.resending();
            if !(self.host_readable || resending) {
                break;
            }
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
            let wnd = self.guest_wnd();
            if in_flight >= wnd {
                if in_flight == 0 {
                    // Zero window: the timer will probe it.
                    self.arm_rto(now);
                }
                break;
            }
            // One segment at a time to a guest that may hold us as a SYN cookie.
            let opening = self.may_hold_a_cookie();
            if opening && in_flight != 0 && !resending {
                break;
            }
            let mut room = ((wnd - in_flight) as usize).min(switch.max_tcp_data() - self.options_len());
            if opening {
                room = room.min(self.mss as usize);
            }
            if resending {
                // Not into what the guest listed (`skip_sacked` took us past what holds
                // snd_nxt, so the next block is ahead), nor past where this resend stops.
                let nxt = self.snd_nxt;
                if let Some(&(left, _)) = self.sacked().iter().find(|&&(left, _)| seq_lt(nxt, left)) {
                    room = room.min(left.wrapping_sub(nxt) as usize);
                }
                if let Some(until) = self.resend_until.filter(|&until| seq_lt(nxt, until)) {
                    room = room.min(until.wrapping_sub(nxt) as usize);
                }
            }
            let at = self.payload_off();
            let buf = &mut switch.buf()[at..at + room];
            match self.sock.peek(buf) {
                Ok(0) => {
                    if self.to_guest == ToGuest::Open {
                        self.to_guest = ToGuest::FinQueued { fin: self.snd_nxt };
                    }
                    self.host_readable = false;
                    if resending {
                        // The socket lost bytes it held (it cannot): do not spin on it.
                        debug_assert!(false, "end of stream before bytes already sent");
                        break;
                    }
                }
                Ok(n) => {
                    self.measure_room();
                    // The peer's FIN came (RDHUP, no error) before this short peek, which so
                    // found everything in front of it: the next peek could only return 0.
                    // The FIN rides on this segment instead (a server that answers and
                    // closes costs one peek and one frame fewer). A resend that reaches our
                    // FIN carries it too, as the segment it resends did or would have.
                    let end = self.snd_nxt.wrapping_add(n as u32);
                    let fin = n < room && self.host_read_closed && !self.host_error && self.to_guest == ToGuest::Open
                        || self.fin_seq() == Some(end);
                    let h = self.segment(self.snd_nxt, if fin { ACK | PSH | FIN } else { ACK | PSH });
                    switch.send_tcp_data(self.remote, self.guest, &h, n, self.mss as usize);
                    self.told_ack(&h);
                    if resending {
                        let data_end = self.sent_data_end();
                        let again = n.min(data_end.wrapping_sub(self.snd_nxt) as usize);
                        switch.resent(self.resend_cause, again);
                    }
                    if !resending && self.timed.is_none() {
                        self.timed = Some((self.snd_nxt.wrapping_add(n as u32), self.since_born(now)));
                    }
                    self.snd_nxt = self.snd_nxt.wrapping_add(n as u32);
                    // (A probe is not a resend of what is missing: it finds what is.)
                    // (`high_resent` is never behind `snd_una`: `on_ack` moves it along.)
                    if resending && self.resend_cause != Resend::Probe && seq_lt(self.high_resent, self.snd_nxt) {
                        self.high_resent = self.snd_nxt;
                    }
                    if fin {
                        self.snd_nxt = self.snd_nxt.wrapping_add(1);
                        self.to_guest = ToGuest::FinSent;
                        self.host_readable = false;
                    }
                    if seq_lt(self.snd_max, self.snd_nxt) {
                        self.snd_max = self.snd_nxt;
                        if self.probe_deadline.is_none() {
                            self.arm_probe(now);
                        }
                    }
                    self.arm_rto(now);
                    if n < room && !self.host_read_closed {
                        // Drained (see `host_read_closed`): wait for the next edge.
                        self.host_readable = false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    if resending {
                        debug_assert!(false, "nothing to peek at before bytes already sent");
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("recv from {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        self.check_done(switch)
    }

    /// The guest listens (we sent the SYN) and has acknowledged none of our data: it may
    /// hold us as a SYN cookie, having dropped our ACK of its SYN-ACK and all since while
    /// its accept queue was full. Only a segment at our first byte then opens the
    /// connection; any other it answers with a reset. So it gets one segment at a time
    /// (`push`), and its probe is that segment again (`send_probe`).
    fn may_hold_a_cookie(&self) -> bool {
        self.we_opened && self.traffic.to_guest == 0
    }

    /// Arms the tail-loss probe while data is in flight (and fewer than `PROBES_MAX` probes
    /// went unanswered).
    fn arm_probe(&mut self, now: Instant) {
        let in_flight = self.snd_max.wrapping_sub(self.snd_una);
        self.probe_deadline = (in_flight != 0
            && self.to_guest != ToGuest::SynUnacked
            && self.probes < PROBES_MAX
            // (Not a shut window's probe byte: the retransmission timer probes it.)
            && self.guest_wnd() > 1
            && !(self.acks_late && in_flight < 2 * self.mss))
            .then(|| {
                now + self.srtt_us.map_or(PROBE_FIRST, |srtt| Duration::from_micros(u64::from(srtt)) * 2 + PROBE_SLACK)
            });
    }

    /// Microseconds since the flow began, wrapping (after 71 minutes): differences of two
    /// are right for anything shorter.
    fn since_born(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.born).as_micros() as u32
    }

    /// The tail-loss probe is due: the last byte sent (or our FIN) goes again. It reaches
    /// the guest behind everything sent before it (one queue), so the guest's answer says
    /// what is missing: with SACK, its blocks list the probe beyond what was lost
    /// (`resend_lost`); without, a duplicate ACK stops at the first byte lost, and
    /// everything from there goes again (`segment_in`), as after three duplicate ACKs,
    /// which a lost tail never brings. An answer that acknowledges the probe found nothing
    /// lost.
    fn send_probe(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        let in_flight = self.snd_max.wrapping_sub(self.snd_una);
        if in_flight == 0 || self.resending() || self.guest_wnd() < in_flight {
            // (A window shrunk below what is in flight: the retransmission timer sees to it.)
            return Verdict::Keep;
        }
        self.timed = None;
        self.probes += 1;
        // Two round trips without progress: what was sent again may be lost again.
        self.high_resent = self.snd_una;
        if !self.sacked().is_empty() {
            // The guest listed data beyond what is missing, and still misses it: the resend
            // was lost too. It goes again (the answers to the probe would list only what
            // was listed already).
            self.resend_lost(now);
        } else if self.may_hold_a_cookie() && self.sent_data_end() != self.snd_una {
            // The first segment goes again, alone (what follows it would be reset while the
            // queue is still full); once the guest acknowledges it, the rest is probed as
            // any tail.
            self.resend_cause = Resend::Probe;
            let segment = self.mss.min(self.sent_data_end().wrapping_sub(self.snd_una));
            self.resend_until = Some(self.snd_una.wrapping_add(segment));
            self.seek(self.snd_una);
            self.probed = None;
        } else {
            self.resend_until = None;
            self.resend_cause = Resend::Probe;
            let last = match self.to_guest {
                // Our FIN (behind the last byte; a FIN alone when all data was acknowledged).
                ToGuest::FinSent if in_flight == 1 => self.snd_una,
                ToGuest::FinSent => self.snd_max.wrapping_sub(2),
                _ => self.snd_max.wrapping_sub(1),
            };
            self.seek(last);
            self.probed = Some(self.snd_max);
        }
        let v = self.push(switch, now);
        self.arm_probe(now);
        v
    }

    fn arm_rto(&mut self, now: Instant) {
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rto);
        }
    }

    /// The flow is over when both directions are closed and our FIN is acknowledged; the
    /// ACK still owed for the guest's last data or FIN goes out before it ends.
    fn check_done(&mut self, switch: &mut Switch) -> Verdict {
        if !(self.to_host == ToHost::Shut && self.to_guest == ToGuest::FinAcked) {
            return Verdict::Keep;
        }
        if self.need_ack {
            self.send_flags(switch, self.snd_nxt, ACK);
        }
        Verdict::Close
    }

    /// The connect timeout, a delayed ACK, or the retransmission timer.
    pub fn on_timer(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        self.tick(now);
        let v = self.timer(switch, now);
        self.checked(v)
    }

    fn timer(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        if let (Some(since), Some(limit)) = (self.stalled_since, self.held.budget().stall_timeout())
            && since.checked_add(limit).is_some_and(|due| due <= now)
        {
            let (guest, remote) = (self.guest, self.remote);
            switch.limit_reached(Limit::TcpStalled, now, || {
                format!(
                    "{guest} -> {remote}: the host peer took none of the guest's data for {} s \
                     (--tcp-stall-timeout): connection reset",
                    limit.as_secs()
                )
            });
            self.sock.set_linger_zero();
            return self.reset_guest(switch);
        }
        if self.phase == Phase::Connecting && self.born + CONNECT_TIMEOUT <= now {
            tracing::debug!("connect {} -> {}: timed out", self.guest, self.remote);
            return self.refuse_guest(switch, libc::ETIMEDOUT);
        }
        if let Some(d) = self.hold_deadline
            && d <= now
        {
            // The rest of the guest's write did not come in time: what was held goes now.
            if self.write_pending(switch, now) == Verdict::Close {
                return Verdict::Close;
            }
            if self.ack_number() != self.acked_rcv {
                self.send_flags(switch, self.snd_nxt, ACK);
            }
        }
        if let Some(d) = self.release_deadline
            && d <= now
        {
            self.release_deadline = None;
            if self.pending_len() == 0 {
                self.release_pending();
            }
        }
        if let Some(d) = self.ack_deadline
            && d <= now
        {
            // The delayed ACK found nothing to ride on.
            self.ack_deadline = None;
            if self.need_ack && self.phase == Phase::Established {
                self.send_flags(switch, self.snd_nxt, ACK);
            }
        }
        if let Some(due) = self.handshake_ack_due
            && self.born + Duration::from_micros(u64::from(due)) <= now
        {
            self.handshake_ack_due = None;
            if self.nothing_exchanged() {
                self.send_flags(switch, self.snd_nxt, ACK);
                self.handshake_acks += 1;
                if self.handshake_acks < HANDSHAKE_ACKS_MAX {
                    let wait = (RTO_MIN.as_micros() as u32) << self.handshake_acks;
                    self.handshake_ack_due = Some(due.wrapping_add(wait));
                }
            }
        }
        if let Some(d) = self.probe_deadline
            && d <= now
        {
            self.probe_deadline = None;
            // (Not when the retransmission timer is due as well: that sends everything.)
            if self.rto_deadline.is_none_or(|rto| now < rto) && self.send_probe(switch, now) == Verdict::Close {
                return Verdict::Close;
            }
        }
        let Some(d) = self.rto_deadline else {
            return Verdict::Keep;
        };
        if d > now {
            return Verdict::Keep;
        }
        self.rto_deadline = None;
        self.retries += 1;
        if self.retries > MAX_RETRIES {
            tracing::debug!("{} -> {}: guest stopped answering; reset", self.guest, self.remote);
            self.sock.set_linger_zero();
            return self.reset_guest(switch);
        }
        self.rto = (self.rto * 2).min(RTO_MAX);
        if self.phase == Phase::SynSent {
            if self.fallback.is_some() && self.retries >= FALLBACK_AFTER_RETRIES {
                // No answer over IPv6 (an address the guest no longer has): over IPv4.
                self.fall_back(switch, now);
                return Verdict::Keep;
            }
            if self.retries > MAX_SYN_RETRIES {
                tracing::debug!("{} -> {}: the guest never answered our SYN", self.remote, self.guest);
                return self.reset_host();
            }
            self.send_syn(switch);
            self.arm_rto(now);
            return Verdict::Keep;
        }
        if self.to_guest == ToGuest::SynUnacked {
            self.send_syn_ack(switch);
            self.arm_rto(now);
            return Verdict::Keep;
        }
        if self.snd_max != self.snd_una {
            self.rewind(Resend::Timeout);
        }
        if self.guest_wnd() == 0 {
            // Zero-window probe: one byte beyond the window makes the guest say its window.
            // Also after a rewind: what was in flight may be lost, and so may the window
            // update that would have let it go again; without a probe the flow would wait
            // for nothing until it gives up.
            let edge = self.wnd_edge;
            self.wnd_edge = self.snd_una.wrapping_add(1);
            self.host_readable = true;
            if self.push(switch, now) == Verdict::Close {
                return Verdict::Close;
            }
            // The window is shut all the same, and the byte beyond it is not in flight
            // until the guest acknowledges it: back behind it, our ACKs keep within the
            // window (`send_flags`), and it goes first when the window opens.
            self.wnd_edge = edge;
            self.rewind(Resend::Timeout);
            return Verdict::Keep;
        }
        self.push(switch, now)
    }
}

impl<S: HostSocket> std::fmt::Debug for TcpFlow<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpFlow")
            .field("guest", &self.guest)
            .field("remote", &self.remote)
            .field("phase", &self.phase)
            .field("to_host", &self.to_host)
            .field("to_guest", &self.to_guest)
            .field("rcv_nxt", &self.rcv_nxt)
            .field("pending", &self.pending_len())
            .field("snd_una", &self.snd_una)
            .field("snd_nxt", &self.snd_nxt)
            .field("snd_max", &self.snd_max)
            .field("guest_wnd", &self.guest_wnd())
            .field("mss", &self.mss)
            .field("rto", &self.rto)
            .field("rto_deadline", &self.rto_deadline)
            .field("retries", &self.retries)
            .field("host_readable", &self.host_readable)
            .field("host_writable", &self.host_writable)
            .field("need_ack", &self.need_ack)
            .field("hold_deadline", &self.hold_deadline)
            .field("release_deadline", &self.release_deadline)
            .field("acked_rcv", &self.acked_rcv)
            .field("sacked_to", &self.sacked_to)
            .field("quick_ack_until", &self.quick_ack_until)
            .field("ack_deadline", &self.ack_deadline)
            .field("sacked", &self.sacked())
            .field("resend_until", &self.resend_until)
            .field("high_resent", &self.high_resent)
            .field("recover", &self.recover)
            .field("srtt_us", &self.srtt_us)
            .field("probe_deadline", &self.probe_deadline)
            .field("handshake_ack_due", &self.handshake_ack_due)
            .field("probes", &self.probes)
            .field("probed", &self.probed)
            .field("acks_late", &self.acks_late)
            .field("peek_view", &self.sock.inspect())
            .finish()
    }
}

/// The largest segment to send a guest, from its SYN (or SYN-ACK) `syn`: the MSS it
/// offers, within the link's MTU, less the timestamps every segment then carries (as
/// Linux's `tcp_current_mss` does: the MSS counts the header without options), and
/// `UNSCALED_SEGMENT_MAX` unless it scales its window.
fn send_mss(switch: &Switch, remote: SocketAddr, syn: &TcpHeader) -> u32 {
    let mss = syn.mss.map_or(DEFAULT_MSS, u32::from).clamp(64, switch.max_tcp_payload(remote.is_ipv6()) as u32);
    let mss = if syn.timestamps.is_some() { mss - TIMESTAMPS_LEN as u32 } else { mss };
    if syn.window_scale.is_some() { mss } else { mss.min(UNSCALED_SEGMENT_MAX) }
}

/// Answers a guest SYN whose connect failed with errno `err`: ICMP unreachable when the
/// host has no route, otherwise RST|ACK, as a host with a closed port answers.
pub fn refuse(switch: &mut Switch, guest: SocketAddr, remote: SocketAddr, guest_isn: u32, err: i32) {
    switch.counters.connect_failed(err);
    match err {
        libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL => {
            // The SYN's first 8 bytes: the ports and the sequence number.
            let mut head = [0u8; 8];
            put16(&mut head, 0, guest.port());
            put16(&mut head, 2, remote.port());
            put32(&mut head, 4, guest_isn);
            let why = Unreachable::from_errno(err);
            switch.send_unreachable(guest.ip(), remote.ip(), why, PROTO_TCP, 20, &head);
        }
        _ => {
            tracing::debug!("connect {guest} -> {remote}: {}", std::io::Error::from_raw_os_error(err));
            reset_syn(switch, guest, remote, guest_isn);
        }
    }
}

/// Answers a guest SYN (initial sequence number `guest_isn`) with RST|ACK, as a host with
/// a closed port does.
pub fn reset_syn(switch: &mut Switch, guest: SocketAddr, remote: SocketAddr, guest_isn: u32) {
    let h = TcpHeader {
        src_port: remote.port(),
        dst_port: guest.port(),
        seq: 0,
        ack: guest_isn.wrapping_add(1),
        flags: RST | ACK,
        ..Default::default()
    };
    switch.send_tcp(remote, guest, &h, 0);
}

/// Answers a segment that belongs to no flow with a RST (RFC 9293 3.10.7.1).
pub fn reset_stray(switch: &mut Switch, guest: SocketAddr, remote: SocketAddr, h: &TcpHeader, payload_len: usize) {
    if h.has(RST) {
        return;
    }
    let mut r = TcpHeader { src_port: remote.port(), dst_port: guest.port(), ..Default::default() };
    if h.has(ACK) {
        r.seq = h.ack;
        r.flags = RST;
    } else {
        let len = payload_len as u32 + u32::from(h.has(SYN)) + u32::from(h.has(FIN));
        r.ack = h.seq.wrapping_add(len);
        r.flags = RST | ACK;
    }
    switch.send_tcp(remote, guest, &r, 0);
}
