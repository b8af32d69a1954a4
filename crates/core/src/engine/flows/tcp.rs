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
//! Opening: the guest's SYN starts a non-blocking connect. Only when it succeeds does the
//! guest get a SYN-ACK; a refused connect gives it a RST, an unreachable network an ICMP
//! unreachable, and a connect that takes longer than `CONNECT_TIMEOUT` a RST. The guest's
//! retransmitted SYNs meanwhile are ignored.
//!
//! Published ports work the other way round: the host socket is an accepted connection,
//! and usernet sends the guest a SYN (from the client's address as the guest should see
//! it). The guest's SYN-ACK opens the flow; its RST (nothing listens) resets the client.
//!
//! Guest to host: an in-order segment's payload is written straight into the socket and
//! acknowledged once the kernel took it. Small segments (below `COALESCE_BELOW`, e.g. a
//! VM's 1448-byte ones) are gathered in `pending` instead and written with one send(2) per
//! flow at the end of the engine's round, just before the ACKs go out. What the socket does not take at once waits in a
//! bounded per-flow buffer (`pending`, at most `RECV_BUF` bytes) and is acknowledged when it
//! is written, as soon as the socket drains (EPOLLOUT) — the guest never waits for its own
//! retransmission timer. The window offered to the guest is the free room of that buffer.
//! Out-of-order segments are dropped with an immediate duplicate ACK, so the guest fast-
//! retransmits; old segments (retransmissions, keep-alive probes) are answered with an ACK.
//! ACKs for in-order data are coalesced: the engine sends one per flow per batch of frames,
//! and, as a receiving TCP does, delays one that acknowledges less than two full segments
//! by up to `ACK_DELAY`, so that it rides on the answer (a request/response exchange, a
//! connection's first request) or on the next segment's ACK (every other frame of a guest
//! that sends MSS-sized frames one at a time, as a VM with MTU 1500 does). Held guest data,
//! the guest's FIN, and ACKs that acknowledge nothing new (answers) are never delayed.
//!
//! Host to guest: data is read with MSG_PEEK at SO_PEEK_OFF into the frame buffer, right
//! behind the headers, and sent in MSS-sized segments while the guest's window allows.
//! It stays in the socket until the guest acknowledges it; then it is discarded (MSG_TRUNC,
//! no copy). Retransmission (three duplicate ACKs, or the retransmission timer with
//! exponential backoff) rewinds: snd_nxt = snd_una and the peek offset back to 0.
//! A zero window is probed with one byte when the timer fires.
//!
//! Closing: guest FIN becomes shutdown(SHUT_WR) once all its data reached the socket; host
//! EOF (a peek that returns 0) becomes a FIN after the last byte. Each direction closes on
//! its own (half-close). A guest RST closes the socket with SO_LINGER 0 (the peer sees a
//! reset); a socket error sends the guest a RST. The flow ends when both FINs are
//! acknowledged. An idle connection lives as long as both ends keep it.

use std::net::SocketAddrV4;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::engine::dial::TcpDial;
use crate::engine::sock;
use crate::engine::sock::take_error;
use crate::engine::switch::{Switch, TCP_PAYLOAD_OFF};
use usernet_wire::icmp;
use usernet_wire::ipv4::Ipv4Header;
use usernet_wire::tcp::{ACK, FIN, PSH, RST, SYN, TcpHeader, seq_le, seq_lt};
use usernet_wire::{PROTO_TCP, put16, put32};

/// How long a host-side connect may take before the guest gets a RST.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Guest bytes held while the host socket is full; also the largest window offered.
pub const RECV_BUF: usize = 4 << 20;
/// Our window-scale shift (RECV_BUF >> 7 fits in 16 bits).
const OUR_WSCALE: u8 = 7;
const RTO_MIN: Duration = Duration::from_millis(200);
/// Guest segments smaller than this are gathered and written once per round.
const COALESCE_BELOW: usize = 16 * 1024;
/// Longest wait of a delayed ACK (Linux waits 40 ms; the guest's own timers are far longer).
const ACK_DELAY: Duration = Duration::from_millis(1);
const RTO_MAX: Duration = Duration::from_secs(30);
/// Retransmissions of one segment before the connection is reset.
const MAX_RETRIES: u32 = 12;
/// MSS assumed when the guest's SYN carries none (RFC 9293).
const DEFAULT_MSS: u32 = 536;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// The host-side connect is in progress; the guest has no SYN-ACK yet.
    Connecting,
    /// Inbound (a published port): our SYN is out, the guest has not answered yet.
    SynSent,
    /// SYN-ACK sent (maybe not yet acknowledged) and data may flow.
    Open,
}

/// What the engine should do with the flow after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// Remove the flow; its socket closes when it is dropped.
    Close,
}

pub struct TcpFlow {
    pub guest: SocketAddrV4,
    /// The destination as the guest sees it (replies come from here).
    pub remote: SocketAddrV4,
    pub sock: OwnedFd,
    is_tcp: bool,
    state: State,
    /// When the flow began (connecting flows are evicted oldest first).
    pub born: Instant,

    // Guest to host.
    guest_isn: u32,
    /// Next sequence number expected from the guest; everything before it is in the socket.
    rcv_nxt: u32,
    /// Guest bytes from rcv_nxt on that the socket has not taken yet (not acknowledged).
    pending: Vec<u8>,
    pending_head: usize,
    /// The guest's FIN arrived (and comes after everything in `pending`).
    guest_fin: bool,
    /// ... and was passed on as shutdown(SHUT_WR).
    guest_fin_done: bool,

    // Host to guest.
    isn: u32,
    syn_acked: bool,
    snd_una: u32,
    snd_nxt: u32,
    /// Highest sequence number sent so far (snd_nxt goes back on retransmission).
    snd_max: u32,
    /// Sequence number of our FIN, once the host socket reached EOF.
    fin_seq: Option<u32>,
    guest_wnd: u32,
    guest_wscale: u8,
    our_wscale: u8,
    mss: u32,
    dup_acks: u8,
    rto: Duration,
    rto_deadline: Option<Instant>,
    retries: u32,
    connect_deadline: Option<Instant>,

    /// Edge-triggered readiness of the host socket, as last seen.
    readable: bool,
    writable: bool,
    /// An ACK is owed to the guest (sent at the end of the batch, or delayed).
    pub need_ack: bool,
    /// `rcv_nxt` as the guest last heard it in an ACK.
    acked_rcv: u32,
    /// A gap was seen, and out-of-order data (dropped) reached this far: until `rcv_nxt`
    /// gets there, the guest is recovering and every ACK goes at once (RFC 5681 4.2).
    quick_ack_until: Option<u32>,
    /// When a delayed ACK must go at the latest.
    ack_deadline: Option<Instant>,
    /// The deadline the engine's timer heap holds for this flow.
    pub scheduled: Option<Instant>,
    /// The engine counts this flow among its connects in progress.
    pub counted_connecting: bool,
}

impl TcpFlow {
    /// A flow for the guest's SYN `syn`, with the host socket just dialled.
    pub fn new(
        switch: &mut Switch,
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        syn: &TcpHeader,
        dial: TcpDial,
        isn: u32,
        now: Instant,
    ) -> (TcpFlow, Verdict) {
        let (guest_wscale, our_wscale) = match syn.window_scale {
            Some(ws) => (ws, OUR_WSCALE),
            None => (0, 0),
        };
        let mss = (syn.mss.map(u32::from).unwrap_or(DEFAULT_MSS)).clamp(64, switch.max_tcp_payload() as u32);
        let mut f = TcpFlow::blank(guest, remote, dial.fd, dial.is_tcp, State::Connecting, isn, now);
        f.guest_isn = syn.seq;
        f.rcv_nxt = syn.seq.wrapping_add(1);
        f.guest_wnd = syn.window as u32;
        f.guest_wscale = guest_wscale;
        f.our_wscale = our_wscale;
        f.mss = mss;
        f.connect_deadline = Some(now + CONNECT_TIMEOUT);
        let _ = sock::set_peek_offset(f.sock.as_fd(), 0);
        let v = if dial.connected { f.connected(switch, now) } else { Verdict::Keep };
        (f, v)
    }

    /// A flow in `state` with nothing exchanged yet; the constructors fill in the rest.
    fn blank(
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        sock: OwnedFd,
        is_tcp: bool,
        state: State,
        isn: u32,
        now: Instant,
    ) -> TcpFlow {
        TcpFlow {
            guest,
            remote,
            sock,
            is_tcp,
            state,
            born: now,
            guest_isn: 0,
            rcv_nxt: 0,
            pending: Vec::new(),
            pending_head: 0,
            guest_fin: false,
            guest_fin_done: false,
            isn,
            syn_acked: false,
            snd_una: isn,
            snd_nxt: isn.wrapping_add(1),
            snd_max: isn.wrapping_add(1),
            fin_seq: None,
            guest_wnd: 0,
            guest_wscale: 0,
            our_wscale: OUR_WSCALE,
            mss: DEFAULT_MSS,
            dup_acks: 0,
            rto: RTO_MIN,
            rto_deadline: None,
            retries: 0,
            connect_deadline: None,
            readable: false,
            writable: false,
            need_ack: false,
            acked_rcv: 0,
            quick_ack_until: None,
            ack_deadline: None,
            scheduled: None,
            counted_connecting: false,
        }
    }

    /// A SYN that starts a new connection on this flow's ports (a different ISN).
    pub fn is_stale_for_syn(&self, syn: &TcpHeader) -> bool {
        syn.seq != self.guest_isn
    }

    /// A flow for a connection accepted on a published port: sends the guest a SYN.
    pub fn new_inbound(
        switch: &mut Switch,
        guest: SocketAddrV4,
        remote: SocketAddrV4,
        sock: OwnedFd,
        is_tcp: bool,
        isn: u32,
        now: Instant,
    ) -> TcpFlow {
        let mut f = TcpFlow::blank(guest, remote, sock, is_tcp, State::SynSent, isn, now);
        f.readable = true;
        f.writable = true;
        let _ = sock::set_peek_offset(f.sock.as_fd(), 0);
        f.send_syn(switch);
        f.arm_rto(now);
        f
    }

    /// Our SYN to the guest (published ports).
    fn send_syn(&mut self, switch: &mut Switch) {
        let mut h = self.segment(self.isn, SYN);
        h.ack = 0;
        h.mss = Some(switch.max_tcp_payload().min(u16::MAX as usize) as u16);
        h.window_scale = Some(OUR_WSCALE);
        h.window = RECV_BUF.min(u16::MAX as usize) as u16;
        switch.send_tcp(self.remote, self.guest, &h, 0);
    }

    /// The guest answered our SYN.
    fn on_syn_ack(&mut self, switch: &mut Switch, h: &TcpHeader, now: Instant) -> Verdict {
        if h.has(RST) {
            // Nothing listens on that guest port: the client sees a reset.
            return self.reset_host();
        }
        if !(h.has(SYN) && h.has(ACK)) || h.ack != self.isn.wrapping_add(1) {
            return Verdict::Keep;
        }
        self.guest_isn = h.seq;
        self.rcv_nxt = h.seq.wrapping_add(1);
        match h.window_scale {
            Some(ws) => self.guest_wscale = ws,
            None => {
                self.guest_wscale = 0;
                self.our_wscale = 0;
            }
        }
        self.mss = (h.mss.map(u32::from).unwrap_or(DEFAULT_MSS)).clamp(64, switch.max_tcp_payload() as u32);
        self.guest_wnd = h.window as u32;
        self.syn_acked = true;
        self.snd_una = self.isn.wrapping_add(1);
        self.state = State::Open;
        self.rto_deadline = None;
        self.retries = 0;
        self.rto = RTO_MIN;
        self.send_flags(switch, self.snd_nxt, ACK);
        if self.writable && self.flush_pending(switch) == Verdict::Close {
            return Verdict::Close;
        }
        self.push(switch, now)
    }

    pub fn is_connecting(&self) -> bool {
        self.state == State::Connecting
    }

    /// The earliest time `on_timer` has work to do.
    pub fn deadline(&self) -> Option<Instant> {
        [self.connect_deadline, self.rto_deadline, self.ack_deadline].into_iter().flatten().min()
    }

    fn pending_len(&self) -> usize {
        self.pending.len() - self.pending_head
    }

    /// The window field we advertise: the free room of the pending buffer, scaled.
    fn window_field(&self) -> u16 {
        let free = (RECV_BUF - self.pending_len()) >> self.our_wscale;
        free.min(u16::MAX as usize) as u16
    }

    fn segment(&self, seq: u32, flags: u8) -> TcpHeader {
        TcpHeader {
            src_port: self.remote.port(),
            dst_port: self.guest.port(),
            seq,
            ack: self.rcv_nxt,
            flags,
            window: self.window_field(),
            ..Default::default()
        }
    }

    fn send_flags(&mut self, switch: &mut Switch, seq: u32, flags: u8) {
        let h = self.segment(seq, flags);
        switch.send_tcp(self.remote, self.guest, &h, 0);
        if flags & ACK != 0 {
            self.told_ack();
        }
    }

    /// A segment carrying our current ACK went to the guest: nothing is owed any more.
    fn told_ack(&mut self) {
        self.need_ack = false;
        self.ack_deadline = None;
        self.acked_rcv = self.rcv_nxt;
    }

    fn send_syn_ack(&mut self, switch: &mut Switch) {
        let mut h = self.segment(self.isn, SYN | ACK);
        h.mss = Some(switch.max_tcp_payload().min(u16::MAX as usize) as u16);
        if self.our_wscale > 0 {
            h.window_scale = Some(self.our_wscale);
        }
        // The window in a SYN is never scaled.
        h.window = (RECV_BUF - self.pending_len()).min(u16::MAX as usize) as u16;
        switch.send_tcp(self.remote, self.guest, &h, 0);
        self.told_ack();
    }

    /// Sends the ACK owed to the guest, unless it may wait for data to ride on (then
    /// `ack_deadline`, set when the data came, bounds the wait).
    pub fn flush_ack(&mut self, switch: &mut Switch, now: Instant) {
        if !self.need_ack || self.state != State::Open {
            return;
        }
        let unacked = self.rcv_nxt.wrapping_sub(self.acked_rcv) as usize;
        let full_segment = (self.mss as usize).min(switch.max_tcp_payload());
        let may_wait = unacked > 0
            && unacked < 2 * full_segment
            && self.quick_ack_until.is_none()
            && self.pending_len() == 0
            && !self.guest_fin
            && self.ack_deadline.is_some_and(|d| d > now);
        if self.quick_ack_until.is_some_and(|u| !seq_lt(self.rcv_nxt, u)) {
            self.quick_ack_until = None;
        }
        if !may_wait {
            self.send_flags(switch, self.snd_nxt, ACK);
        }
    }

    /// Resets the guest's side and ends the flow.
    fn reset_guest(&mut self, switch: &mut Switch) -> Verdict {
        self.send_flags(switch, self.snd_nxt, RST | ACK);
        Verdict::Close
    }

    /// Resets the host side (the peer sees RST) and ends the flow.
    fn reset_host(&mut self) -> Verdict {
        sock::set_linger_zero(self.sock.as_fd());
        Verdict::Close
    }

    fn connected(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        self.state = State::Open;
        self.connect_deadline = None;
        self.writable = true;
        self.send_syn_ack(switch);
        self.rto_deadline = Some(now + self.rto);
        Verdict::Keep
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
        if self.state == State::Connecting {
            if !(writable || error || readable) {
                return Verdict::Keep;
            }
            let err = take_error(self.sock.as_fd());
            if err != 0 {
                return self.connect_failed(switch, err);
            }
            if !writable {
                return Verdict::Keep;
            }
            if self.connected(switch, now) == Verdict::Close {
                return Verdict::Close;
            }
        }
        if readable || error {
            self.readable = true;
        }
        if self.state == State::SynSent {
            if writable {
                self.writable = true;
            }
            return Verdict::Keep;
        }
        if writable || error {
            self.writable = true;
            if self.flush_pending(switch) == Verdict::Close {
                return Verdict::Close;
            }
        }
        self.push(switch, now)
    }

    /// The connect failed with errno `err`: tell the guest as a host would.
    pub fn connect_failed(&mut self, switch: &mut Switch, err: i32) -> Verdict {
        refuse(switch, self.guest, self.remote, self.guest_isn, err);
        Verdict::Close
    }

    /// A segment from the guest for this flow.
    pub fn on_segment(&mut self, switch: &mut Switch, h: &TcpHeader, payload: &[u8], now: Instant) -> Verdict {
        if self.state == State::SynSent {
            return self.on_syn_ack(switch, h, now);
        }
        if h.has(RST) {
            return self.reset_host();
        }
        if h.has(SYN) {
            if self.state == State::Open && !self.syn_acked && h.seq == self.guest_isn {
                // Our SYN-ACK was lost: the guest asks again.
                self.send_syn_ack(switch);
            } else if self.state == State::Open {
                self.need_ack = true;
            }
            return Verdict::Keep;
        }
        if self.state == State::Connecting || !h.has(ACK) {
            return Verdict::Keep;
        }
        if !self.syn_acked {
            if h.ack != self.isn.wrapping_add(1) {
                return Verdict::Keep;
            }
            self.syn_acked = true;
            self.snd_una = h.ack;
            self.rto_deadline = None;
            self.retries = 0;
            self.rto = RTO_MIN;
        }
        let old_wnd = self.guest_wnd;
        self.guest_wnd = (h.window as u32) << self.guest_wscale;
        if seq_lt(self.snd_una, h.ack) && seq_le(h.ack, self.snd_max) {
            if self.on_ack(switch, h.ack, now) == Verdict::Close {
                return Verdict::Close;
            }
        } else if h.ack == self.snd_una
            && payload.is_empty()
            && !h.has(FIN)
            && self.snd_max != self.snd_una
            && self.guest_wnd == old_wnd
        {
            self.dup_acks = self.dup_acks.saturating_add(1);
            if self.dup_acks == 3 {
                self.rewind();
            }
        }
        if !payload.is_empty() || h.has(FIN) {
            if self.receive(switch, h.seq, payload, h.has(FIN), now) == Verdict::Close {
                return Verdict::Close;
            }
        } else if seq_lt(h.seq, self.rcv_nxt) {
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
        let data_end = self.fin_seq.unwrap_or(self.snd_max);
        let data_ack = if seq_lt(data_end, ack) { data_end } else { ack };
        let n = data_ack.wrapping_sub(self.snd_una) as usize;
        if n > 0 {
            match sock::discard(self.sock.as_fd(), n, self.is_tcp) {
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!("discard on {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        self.snd_una = ack;
        if seq_lt(self.snd_nxt, ack) {
            // Acknowledged beyond what a rewind has re-sent so far: go on from there.
            self.snd_nxt = ack;
            let _ = sock::set_peek_offset(self.sock.as_fd(), 0);
        }
        self.dup_acks = 0;
        self.retries = 0;
        self.rto = RTO_MIN;
        self.rto_deadline = if self.snd_una != self.snd_max { Some(now + self.rto) } else { None };
        Verdict::Keep
    }

    /// Go back to the first unacknowledged byte and send again from there.
    fn rewind(&mut self) {
        self.snd_nxt = self.snd_una;
        let _ = sock::set_peek_offset(self.sock.as_fd(), 0);
        self.readable = true;
    }

    /// Guest data (and maybe FIN) at sequence number `seq`.
    fn receive(&mut self, switch: &mut Switch, seq: u32, payload: &[u8], fin: bool, now: Instant) -> Verdict {
        if self.guest_fin {
            self.need_ack = true;
            return Verdict::Keep;
        }
        let expected = self.rcv_nxt.wrapping_add(self.pending_len() as u32);
        if seq_lt(expected, seq) {
            // A gap: something before this was lost. Ask again at once (duplicate ACK).
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
        if self.pending_len() == 0 && self.writable && new.len() >= COALESCE_BELOW {
            match sock::send(self.sock.as_fd(), new) {
                Ok(n) => {
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                    new = &new[n..];
                    if !new.is_empty() {
                        self.writable = false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.writable = false,
                Err(e) => {
                    tracing::debug!("send to {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        let room = RECV_BUF - self.pending_len();
        let take = new.len().min(room);
        if take > 0 {
            if self.pending_head > 0 && self.pending_head == self.pending.len() {
                self.pending.clear();
                self.pending_head = 0;
            }
            self.pending.extend_from_slice(&new[..take]);
        }
        if fin && take == new.len() {
            self.guest_fin = true;
            self.finish_guest_fin();
        }
        self.need_ack = true;
        if self.ack_deadline.is_none() {
            self.ack_deadline = Some(now + ACK_DELAY);
        }
        Verdict::Keep
    }

    /// Passes the guest's FIN on once everything before it reached the socket.
    fn finish_guest_fin(&mut self) {
        if self.guest_fin && !self.guest_fin_done && self.pending_len() == 0 {
            sock::shutdown_write(self.sock.as_fd());
            self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
            self.guest_fin_done = true;
            self.pending = Vec::new();
            self.pending_head = 0;
        }
    }

    /// Writes the guest data gathered during the engine's round (the ACK follows with the
    /// other owed ACKs).
    pub fn write_gathered(&mut self, switch: &mut Switch) -> Verdict {
        if !self.writable || self.write_pending(switch) == Verdict::Close {
            return if self.writable { Verdict::Close } else { Verdict::Keep };
        }
        // The guest's FIN may have been waiting for this data.
        self.check_done(switch)
    }

    /// Writes held guest data now that the socket has room; acknowledges what it took.
    fn flush_pending(&mut self, switch: &mut Switch) -> Verdict {
        if self.pending_len() == 0 {
            return Verdict::Keep;
        }
        if self.write_pending(switch) == Verdict::Close {
            return Verdict::Close;
        }
        // The window opened: tell the guest at once, not at its next retransmission.
        if self.need_ack {
            self.send_flags(switch, self.snd_nxt, ACK);
        }
        Verdict::Keep
    }

    /// Writes `pending` into the socket until it is empty or the socket is full.
    fn write_pending(&mut self, switch: &mut Switch) -> Verdict {
        if self.pending_len() == 0 {
            return Verdict::Keep;
        }
        while self.pending_len() > 0 {
            match sock::send(self.sock.as_fd(), &self.pending[self.pending_head..]) {
                Ok(n) => {
                    self.pending_head += n;
                    self.rcv_nxt = self.rcv_nxt.wrapping_add(n as u32);
                    self.need_ack = true;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.writable = false;
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
            // An idle flow keeps no large buffer (a gathered round can be ~190 KiB).
            if self.pending.capacity() > 64 * 1024 {
                self.pending.shrink_to(0);
            }
            self.finish_guest_fin();
        } else if self.pending_head > self.pending.len() / 2 {
            self.pending.drain(..self.pending_head);
            self.pending_head = 0;
        }
        Verdict::Keep
    }

    /// Sends host data (and FIN at EOF) to the guest while its window allows.
    fn push(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        if self.state != State::Open || !self.syn_acked {
            return Verdict::Keep;
        }
        loop {
            if let Some(f) = self.fin_seq {
                if self.snd_nxt == f {
                    self.send_flags(switch, f, FIN | ACK);
                    self.snd_nxt = f.wrapping_add(1);
                    self.snd_max = self.snd_nxt;
                    self.arm_rto(now);
                }
                if self.snd_nxt == f.wrapping_add(1) {
                    break;
                }
            }
            if !self.readable {
                break;
            }
            let in_flight = self.snd_nxt.wrapping_sub(self.snd_una);
            if in_flight >= self.guest_wnd {
                if in_flight == 0 {
                    // Zero window: the timer will probe it.
                    self.arm_rto(now);
                }
                break;
            }
            let room = ((self.guest_wnd - in_flight) as usize).min(switch.max_tcp_data());
            let buf = &mut switch.buf()[TCP_PAYLOAD_OFF..TCP_PAYLOAD_OFF + room];
            match sock::recv(self.sock.as_fd(), buf, true) {
                Ok(0) => {
                    if self.fin_seq.is_none() {
                        self.fin_seq = Some(self.snd_nxt);
                    }
                    self.readable = false;
                }
                Ok(n) => {
                    let h = self.segment(self.snd_nxt, ACK | PSH);
                    switch.send_tcp_data(self.remote, self.guest, &h, n, self.mss as usize);
                    self.told_ack();
                    self.snd_nxt = self.snd_nxt.wrapping_add(n as u32);
                    if seq_lt(self.snd_max, self.snd_nxt) {
                        self.snd_max = self.snd_nxt;
                    }
                    self.arm_rto(now);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    self.readable = false;
                }
                Err(e) => {
                    tracing::debug!("recv from {}: {e}", self.remote);
                    return self.reset_guest(switch);
                }
            }
        }
        self.check_done(switch)
    }

    fn arm_rto(&mut self, now: Instant) {
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rto);
        }
    }

    /// The flow is over when both directions are closed and our FIN is acknowledged; the
    /// ACK still owed for the guest's last data or FIN goes out before it ends.
    fn check_done(&mut self, switch: &mut Switch) -> Verdict {
        let fin_acked = matches!(self.fin_seq, Some(f) if self.snd_una == f.wrapping_add(1));
        if !(self.guest_fin_done && fin_acked) {
            return Verdict::Keep;
        }
        if self.need_ack {
            self.send_flags(switch, self.snd_nxt, ACK);
        }
        Verdict::Close
    }

    /// The connect timeout or the retransmission timer.
    pub fn on_timer(&mut self, switch: &mut Switch, now: Instant) -> Verdict {
        if let Some(d) = self.connect_deadline
            && d <= now
        {
            tracing::debug!("connect {} -> {}: timed out", self.guest, self.remote);
            return self.connect_failed(switch, libc::ETIMEDOUT);
        }
        if let Some(d) = self.ack_deadline
            && d <= now
        {
            // The delayed ACK found nothing to ride on.
            self.ack_deadline = None;
            if self.need_ack && self.state == State::Open {
                self.send_flags(switch, self.snd_nxt, ACK);
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
            sock::set_linger_zero(self.sock.as_fd());
            return self.reset_guest(switch);
        }
        self.rto = (self.rto * 2).min(RTO_MAX);
        if self.state == State::SynSent {
            if self.retries > 6 {
                tracing::debug!("{} -> {}: the guest never answered our SYN", self.remote, self.guest);
                return self.reset_host();
            }
            self.send_syn(switch);
            self.arm_rto(now);
            return Verdict::Keep;
        }
        if !self.syn_acked {
            self.send_syn_ack(switch);
            self.arm_rto(now);
            return Verdict::Keep;
        }
        if self.snd_max != self.snd_una {
            self.rewind();
        } else if self.guest_wnd == 0 {
            // Zero-window probe: one byte beyond the window makes the guest say its window.
            self.guest_wnd = 1;
            self.readable = true;
        }
        self.push(switch, now)
    }
}

/// Answers a guest SYN whose connect failed with errno `err`: ICMP unreachable when the
/// host has no route, otherwise RST|ACK, as a host with a closed port answers.
pub fn refuse(switch: &mut Switch, guest: SocketAddrV4, remote: SocketAddrV4, guest_isn: u32, err: i32) {
    match err {
        libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL => {
            let code = if err == libc::ENETUNREACH { icmp::CODE_NET_UNREACHABLE } else { icmp::CODE_HOST_UNREACHABLE };
            let mut quote = [0u8; 28];
            Ipv4Header::new(*guest.ip(), *remote.ip(), PROTO_TCP, 20).emit(&mut quote);
            put16(&mut quote, 20, guest.port());
            put16(&mut quote, 22, remote.port());
            put32(&mut quote, 24, guest_isn);
            switch.send_icmp_error(*remote.ip(), *guest.ip(), icmp::TYPE_DEST_UNREACHABLE, code, &quote);
        }
        _ => {
            tracing::debug!("connect {guest} -> {remote}: {}", std::io::Error::from_raw_os_error(err));
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
    }
}

/// Answers a segment that belongs to no flow with a RST (RFC 9293 3.10.7.1).
pub fn reset_stray(switch: &mut Switch, guest: SocketAddrV4, remote: SocketAddrV4, h: &TcpHeader, payload_len: usize) {
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
