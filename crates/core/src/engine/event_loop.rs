//! The event loop: one thread waits (epoll through mio) on the guest links, the link
//! acceptors, every flow's host socket, the published ports' listeners, the control waker
//! and the supervisor, and runs the rounds that the theory of operation in `mod.rs`
//! describes. It also reads frames from the links in batches and writes what they queued.

use std::cmp::Reverse;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};

use super::drain::{self, Drain};
use super::flows::FlowId;
use super::{ACCEPTOR_BIT, Engine, FLOW_BASE, LINK_BIT, SUPERVISOR, Supervisor, WAKER, busy_poll, listeners};

/// Frames read from a link per round before the loop looks at everything else.
const LINK_BATCH: usize = 128;

impl Engine {
    /// Runs until the supervisor says stop (and, with `drain_after_exit`, the drain that
    /// follows is over); returns its exit code.
    pub fn run(&mut self, sup: &mut dyn Supervisor) -> io::Result<i32> {
        let sup_fd = sup.fd();
        self.poll.registry().register(&mut SourceFd(&sup_fd), SUPERVISOR, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut link_ready = true;
        let mut draining: Option<Drain> = None;
        loop {
            let spinning = !link_ready && self.busy_poll.enabled() && self.busy_poll.spin(Instant::now());
            let mut timeout = if link_ready || spinning { Some(Duration::ZERO) } else { self.next_timeout() };
            if draining.is_some() || self.shard.as_ref().is_some_and(|s| s.index != 0 && s.set.draining()) {
                timeout = Some(timeout.map_or(drain::CHECK_EVERY, |t| t.min(drain::CHECK_EVERY)));
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
            let link_before = self.switch.stats;
            self.loop_counters.iterations += 1;
            if !events.is_empty() {
                self.busy_poll.woke(now);
            } else if spinning {
                busy_poll::BusyPoll::yield_cpu();
            }
            let mut sup_ready = false;
            for ev in events.iter() {
                match ev.token() {
                    t if t.0 & LINK_BIT != 0 => {
                        let index = t.0 & !LINK_BIT;
                        if ev.is_writable()
                            && let Some(Some(slot)) = self.switch.links.get_mut(index)
                        {
                            if slot.link.yield_before_refill() {
                                busy_poll::BusyPoll::yield_cpu();
                            }
                            if let Err(e) = slot.link.flush() {
                                self.drop_link(index, &e);
                            }
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            if let Some(Some(slot)) = self.switch.links.get_mut(index) {
                                slot.readable = true;
                                slot.link.readable_edge(ev.is_read_closed() || ev.is_error());
                            }
                            link_ready = true;
                        }
                    }
                    t if t.0 & ACCEPTOR_BIT != 0 => self.on_acceptor(t.0 & !ACCEPTOR_BIT),
                    SUPERVISOR => sup_ready = true,
                    WAKER => {
                        // Woken for commands, handed frames or both: each look is cheap.
                        self.on_commands();
                        self.on_handed(now);
                    }
                    t if t.0 & listeners::LISTENER_BIT != 0 => self.on_listener(t.0 & !listeners::LISTENER_BIT, now),
                    t => {
                        let id = FlowId::from_token(t, FLOW_BASE);
                        if ev.is_read_closed() {
                            self.host_read_closed(id);
                        }
                        let readable = ev.is_readable() || ev.is_read_closed();
                        let writable = ev.is_writable() || ev.is_write_closed();
                        self.on_socket(id, readable, writable, ev.is_error(), now);
                    }
                }
            }
            for slot in self.switch.links.iter_mut().flatten() {
                if slot.link.polling() {
                    slot.readable = true;
                    slot.link.readable_edge(false);
                    link_ready = true;
                }
            }
            if link_ready {
                link_ready = self.read_links(now);
                // Frames found without an event (a polling link's, or the rest of a batch)
                // end an idle period as an event does.
                if events.is_empty() && self.switch.stats.frames_in != link_before.frames_in {
                    self.busy_poll.woke(now);
                }
            }
            if !self.udp_batch.is_empty() {
                self.udp_batch.flush();
            }
            self.run_timers(Instant::now());
            self.advertise_router_when_due(now);
            self.flush_acks(Instant::now());
            self.flush_links();
            self.watch_links();
            self.loop_counters.busy_nanos += Instant::now().saturating_duration_since(now).as_nanos() as u64;
            let link_after = self.switch.stats;
            self.busy_poll.round(
                (link_after.frames_in + link_after.frames_out) - (link_before.frames_in + link_before.frames_out),
                (link_after.bytes_in + link_after.bytes_out) - (link_before.bytes_in + link_before.bytes_out),
                std::mem::take(&mut self.round_socket_bytes),
            );
            if let Some(why) = self.shard.as_mut().and_then(|s| s.failed.take()) {
                self.shutdown();
                return Err(io::Error::other(why));
            }
            if let Some(code) = self.stop.take() {
                self.shutdown();
                return Ok(code);
            }
            if draining.is_none()
                && sup_ready
                && let Some(code) = sup.on_ready()
            {
                let Some(idle) = self.drain_idle else {
                    self.shutdown();
                    return Ok(code);
                };
                if let Some(shard) = &self.shard {
                    shard.set.start_drain();
                }
                draining = Some(Drain::new(code, idle, Instant::now()));
                sup_ready = false;
            }
            if let Some(d) = draining.as_mut() {
                let now = Instant::now();
                let reported = self.shard.as_ref().is_some_and(|s| s.set.take_reported());
                let mut over = sup_ready && sup.interrupts_drain();
                if !over && (d.due(now) || reported) {
                    let s = self.sending_everywhere();
                    if d.tell(s) {
                        sup.draining();
                    }
                    over = d.over(s, now);
                }
                if over {
                    let code = d.code;
                    self.shutdown();
                    return Ok(code);
                }
            }
            if let Some(shard) = self.shard.as_mut()
                && shard.index != 0
                && shard.set.draining()
                && let now = Instant::now()
                && shard.next_drain_report.is_none_or(|t| t <= now)
            {
                shard.next_drain_report = Some(now + drain::CHECK_EVERY);
                let (index, set) = (shard.index, shard.set.clone());
                set.report_drain(index, self.sending());
            }
            if !link_ready && let Some(p) = self.switch.pcap.as_mut() {
                p.flush();
            }
        }
    }

    pub(super) fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let t = match self.timers.peek() {
            Some(Reverse((d, _))) => d.saturating_duration_since(now),
            None => Duration::from_secs(1),
        };
        // A link whose guest has not taken its frames yet, with no event to say when it
        // does, or one that polls its guest's queue: come back soon.
        let backlog = self.switch.links.iter().flatten().any(|slot| slot.link.backlogged() || slot.link.polling());
        let t = if backlog { t.min(crate::link::BACKLOG_RETRY) } else { t };
        let t = match self.accept_retry {
            Some(at) => t.min(at.saturating_duration_since(now)),
            None => t,
        };
        Some(t.min(Duration::from_secs(1)))
    }

    /// Reads up to a batch of frames from each readable link; true when more may be waiting.
    pub(super) fn read_links(&mut self, now: Instant) -> bool {
        let mut buf = std::mem::take(&mut self.rx_buf);
        let mut more = false;
        let iteration = self.loop_counters.iterations;
        for index in 0..self.switch.links.len() {
            let mut got = 0;
            while let Some(Some(slot)) = self.switch.links.get_mut(index) {
                if !slot.readable {
                    break;
                }
                if got == LINK_BATCH {
                    more = true;
                    break;
                }
                // A frame that came when none had in the round before (a request, an
                // answer, an ACK) is most likely the only one: a level-triggered link leaves
                // it to the next poll, which the loop makes anyway, to say whether another
                // waits, instead of a read that would find the descriptor empty. Frames in
                // consecutive rounds are a burst or a stream: the link is read until it is
                // empty, as an edge-triggered one always is.
                if got == 1 && slot.watched_level && slot.last_read_iteration + 1 < iteration {
                    slot.readable = false;
                    break;
                }
                match slot.link.recv(&mut buf) {
                    Ok(n) => {
                        got += 1;
                        slot.counters.rx_frames += 1;
                        slot.counters.rx_bytes += n as u64;
                        self.on_frame(index, &buf[..n], now);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => slot.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.drop_link(index, &e);
                        break;
                    }
                }
            }
            if got > 0
                && let Some(Some(slot)) = self.switch.links.get_mut(index)
            {
                slot.last_read_iteration = iteration;
            }
        }
        self.rx_buf = buf;
        more
    }

    /// Has the engine's epoll watch each link's descriptor for what the link now wants to
    /// hear of ([`Link::read_events`], [`Link::write_events`]): a stream link polled during
    /// an upload does not want reads, and one with nothing queued not writes. For neither,
    /// the descriptor stays registered with an empty event mask: a socket's data or room
    /// then wakes nobody (EPOLLPRI would not do: a socket's data wakes its EPOLLPRI watchers
    /// too), while a hang-up or an error is still reported. So every change is a
    /// modification, which cannot fail for want of memory or watches as adding one back
    /// could. A link whose change fails anyway is dropped: it could no longer be read. A
    /// [`Link::level_triggered`] link (a TAP device) is watched level-triggered from its
    /// first round on.
    fn watch_links(&mut self) {
        for index in 0..self.switch.links.len() {
            let Some(Some(slot)) = self.switch.links.get_mut(index) else { continue };
            let want = (slot.link.read_events(), slot.link.write_events());
            let level = slot.link.level_triggered();
            if want == slot.watched && level == slot.watched_level {
                continue;
            }
            let fd = slot.link.fd();
            let token = Token(LINK_BIT | index);
            let registry = self.poll.registry();
            let done = match want {
                _ if level => rewatch(self.poll.as_raw_fd(), fd, token, level_events(want)),
                (true, true) => registry.reregister(&mut SourceFd(&fd), token, Interest::READABLE | Interest::WRITABLE),
                (true, false) => registry.reregister(&mut SourceFd(&fd), token, Interest::READABLE),
                (false, true) => registry.reregister(&mut SourceFd(&fd), token, Interest::WRITABLE),
                (false, false) => rewatch(self.poll.as_raw_fd(), fd, token, libc::EPOLLET as u32),
            };
            match done {
                Ok(()) => (slot.watched, slot.watched_level) = (want, level),
                Err(e) => {
                    let why = io::Error::new(e.kind(), format!("cannot change what the engine watches: {e}"));
                    self.drop_link(index, &why);
                }
            }
        }
    }

    /// Watches a socket again for reading (EPOLL_CTL_MOD), after a round that stopped at
    /// its cap with more perhaps waiting. Sockets are watched edge-triggered, so no new event
    /// would come for what waits until something else arrives; watched again, the socket is
    /// reported at the next poll if it is still readable. One system call per capped round.
    pub(super) fn watch_again(&self, fd: RawFd, token: Token) {
        if let Err(e) = self.poll.registry().reregister(&mut SourceFd(&fd), token, Interest::READABLE) {
            tracing::warn!("cannot watch a socket again: {e}");
        }
    }

    pub(super) fn on_acceptor(&mut self, index: usize) {
        loop {
            let Some(acceptor) = self.acceptors.get_mut(index) else { return };
            match acceptor.accept() {
                Ok(Some(link)) => {
                    self.add_link(link);
                }
                Ok(None) => return,
                Err(e) => {
                    // Out of descriptors, say: the guests that wait stay in the backlog,
                    // and the acceptor is watched again at ACCEPT_RETRY (`retry_accepts`),
                    // since no new edge may come for them.
                    let what = format!("a guest link's accept ({})", acceptor.describe());
                    self.accept_failed(&what, &e, Instant::now());
                    return;
                }
            }
        }
    }

    /// Writes what the links queued during this round (a stream link writes a round's
    /// frames with one system call).
    pub(super) fn flush_links(&mut self) {
        for index in 0..self.switch.links.len() {
            if let Some(Some(slot)) = self.switch.links.get_mut(index)
                && let Err(e) = slot.link.flush()
            {
                self.drop_link(index, &e);
            }
        }
    }

    /// Closes link `id` if it is still there (its guest went away: see [`Command::DropLink`]).
    ///
    /// [`Command::DropLink`]: super::control::Command::DropLink
    pub(super) fn drop_link_by_id(&mut self, id: super::LinkId, why: &str) {
        if let Some(Some(slot)) = self.switch.links.get(id.index)
            && slot.serial == id.serial
        {
            tracing::info!(link = %slot.link.describe(), "{why}");
            self.drop_link(id.index, &io::Error::from(io::ErrorKind::UnexpectedEof));
        }
    }

    pub(super) fn drop_link(&mut self, index: usize, why: &io::Error) {
        if let Some(slot) = self.switch.remove_link(index) {
            let fd = slot.link.fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            match why.kind() {
                io::ErrorKind::UnexpectedEof => tracing::info!(link = %slot.link.describe(), "guest went away"),
                _ => tracing::warn!(link = %slot.link.describe(), error = %why, "link closed"),
            }
            if self.stop_without_links && self.switch.links.iter().all(Option::is_none) {
                tracing::info!("no guest link left: stopping");
                self.stop = Some(0);
            }
        }
    }

    /// Ends every flow (the command exited): guests' connections are reset, sockets closed,
    /// by the other engines too (`shard`).
    pub(super) fn shutdown(&mut self) {
        if let Some(mut others) = self.other_engines.take() {
            others.stop();
        }
        self.flush_links();
        let ids: Vec<FlowId> = self.flows.ids().map(|(id, _)| id).collect();
        let mut cut = 0;
        for id in ids {
            if let Some(mut flow) = self.flows.remove(id) {
                cut += usize::from(drain::reset_if_cut(&mut flow));
            }
        }
        if cut > 0 {
            tracing::debug!("{cut} connection(s) the guest was still sending on: reset");
        }
        if let Some(p) = self.switch.pcap.as_mut() {
            p.flush();
        }
    }
}

/// What epoll should watch a link's descriptor for, `(read, write)` as mio's READABLE and
/// WRITABLE ask, level-triggered (mio always registers edge-triggered).
fn level_events((read, write): (bool, bool)) -> u32 {
    let mut events = 0;
    if read {
        events |= libc::EPOLLIN | libc::EPOLLRDHUP;
    }
    if write {
        events |= libc::EPOLLOUT;
    }
    events as u32
}

/// Has the epoll instance `epfd` watch `fd`, which mio registered with `token`, for
/// `events` instead. (mio keeps no state of its own per descriptor, so its later
/// `reregister` works as on any other.) With only EPOLLET, `fd` is watched for no event:
/// only a hang-up or an error, which epoll always reports, still wake it.
fn rewatch(epfd: std::os::fd::RawFd, fd: std::os::fd::RawFd, token: Token, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token.0 as u64 };
    // SAFETY: modifies the registration of a descriptor the engine registered; `ev` lives
    // across the call.
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_MOD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
