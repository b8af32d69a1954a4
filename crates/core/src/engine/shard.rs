//! Shards: one guest served by several engines, each on a thread of its own with its own
//! queue of a multi-queue TAP device (`usernet run --engine-threads N`).
//!
//! # Theory of operation
//!
//! The kernel picks the queue of each frame the guest sends: the queue that last wrote a
//! frame of the same flow, while that is recent (about 3 s), else one chosen by a hash of
//! the flow's addresses and ports (tun's automatic steering). So a flow's frames mostly
//! reach the engine that answers it.
//!
//! A new connection's SYN reaches an engine by that hash, which splits four connections
//! 4-0 one time in eight. So the engine that gets the SYN of a connection no engine holds
//! hands it to the engine holding the fewest TCP flows, when that one holds fewer than
//! itself: counted in the owner map (with the spliced connections of published ports,
//! which are engine 0's work and never cross the link), and claimed for it at once so that
//! a burst of SYNs is spread before the other engine has read any. Its SYN-ACK, written on its own queue,
//! then teaches the kernel's flow table the queue for the connection's next frames (and
//! until it does, the owner map sends them there). A connection made one at a time finds
//! no engine holding fewer and stays where it came; one that the other engine does not
//! make after all (refused, or over a bound) loses the claim again.
//!
//! Mostly is not always: after a pause the hash may pick the other queue (for a flow that
//! usernet opened toward the guest, a published port's), and the kernel's flow table is
//! bounded. So every engine registers the flows it holds in one owner map, and a frame for
//! a flow an engine does not have is handed, as bytes, to the engine that owns it (a
//! channel and a waker per engine). Lookups in the map happen only on such misses; a
//! flow's engine never changes while the flow lives.
//!
//! Engine 0 keeps everything that is not a guest's own TCP or UDP flow: ARP, neighbour and
//! router discovery, DHCP, ICMP, flows to the gateway's services, published ports (their
//! flows and splices), `/tunnel`, the control API. The other engines hand it such frames.
//! The bounds on flows and held data are divided among the engines (`Limits::per_engine`). Answers that count the whole
//! network (`Stats`, `Flows`, `Metrics`) are gathered along the engines: each adds its own
//! part and passes the command to the next, and the last one answers.
//!
//! The engines live and end together. Engine 0 stops the others when its loop ends; an
//! engine that fails on its own thread (an error of its loop, or a panic) tells the set,
//! and engine 0's loop then ends with that error, so `usernet run` exits and says why
//! rather than running on while that engine's queue, and every flow the kernel steers to
//! it, goes unread.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::Duration;

use usernet_wire::ipv4::Ipv4Header;
use usernet_wire::ipv6::Ipv6Header;
use usernet_wire::{PROTO_TCP, PROTO_UDP, tcp};

use super::control::ControlHandle;
use super::drain::Sending;
use super::flows::FlowKey;
use super::flows::owners::Owners;
use super::metrics::DropReason;
use super::{Engine, Supervisor};
use crate::config::NetConfig;
use crate::link::Link;
use crate::services::{ServiceHub, dhcp6};

/// Which engine holds each flow, and how to reach each engine.
pub struct ShardSet {
    owners: Arc<Owners>,
    /// Each engine's inbox, and the waker of its loop once it joined.
    inboxes: Vec<(mpsc::SyncSender<Vec<u8>>, Waker)>,
    /// Why an engine on a thread of its own stopped, when it failed (the first such).
    failure: Mutex<Option<String>>,
    /// Set with `failure`: read without the lock on every wake of engine 0's inbox.
    failed: AtomicBool,
    /// Set while engine 0 drains (`drain`): the other engines then report what they still
    /// send, each in its slot (flows, bytes; engine 0's slot is unused).
    draining: AtomicBool,
    drain_reports: Vec<(AtomicU64, AtomicU64)>,
    /// An engine reported since engine 0 last looked (engine 0 was woken for it).
    drain_reported: AtomicBool,
}

/// Frames an engine's inbox holds at most: beyond, handed frames are dropped, as the TAP
/// device's own queue drops what its reader does not take (a guest flooding engine 0's
/// services from many ports must not grow usernet's memory).
const INBOX_FRAMES: usize = 256;

/// What became of a frame given to another engine.
enum Handed {
    /// It is in that engine's inbox.
    Yes,
    /// The inbox is full: the frame is dropped.
    Full,
    /// That engine is gone (or not started yet): the frame stays with this one.
    No,
}

/// The waker of an engine's loop, set when the engine joins its set.
type Waker = OnceLock<Arc<mio::Waker>>;

/// The receiving end of an engine's inbox.
pub struct Inbox(mpsc::Receiver<Vec<u8>>);

impl ShardSet {
    /// A set of `n` engines, and their inboxes, engine 0's first.
    pub fn new(n: usize) -> (Arc<ShardSet>, Vec<Inbox>) {
        let (inboxes, receivers) = (0..n)
            .map(|_| {
                let (tx, rx) = mpsc::sync_channel(INBOX_FRAMES);
                ((tx, OnceLock::new()), Inbox(rx))
            })
            .unzip();
        let set = ShardSet {
            owners: Arc::default(),
            inboxes,
            failure: Mutex::default(),
            failed: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            drain_reports: (0..n).map(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0))).collect(),
            drain_reported: AtomicBool::new(false),
        };
        (Arc::new(set), receivers)
    }

    /// An engine failed (`why`): engine 0 is woken to end the set with that error. Its
    /// waker is looked for under the lock that [`ShardSet::failure`] takes: engine 0 sets
    /// the waker before it first asks, so either it finds the failure or it is woken.
    pub fn fail(&self, why: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        failure.get_or_insert(why);
        self.failed.store(true, Ordering::Release);
        if let Some((_, waker)) = self.inboxes.first()
            && let Some(waker) = waker.get()
        {
            let _ = waker.wake();
        }
    }

    /// Engine 0 drains: the others are told, and woken to report.
    pub(super) fn start_drain(&self) {
        for (flows, bytes) in &self.drain_reports {
            flows.store(u64::MAX, Ordering::Relaxed);
            bytes.store(0, Ordering::Relaxed);
        }
        self.draining.store(true, Ordering::Release);
        for (_, waker) in self.inboxes.iter().skip(1) {
            if let Some(waker) = waker.get() {
                let _ = waker.wake();
            }
        }
    }

    /// Whether engine 0 drains.
    pub(super) fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Engine `index` still sends `s` of the guest's data; engine 0 is woken to look when
    /// that changed.
    pub(super) fn report_drain(&self, index: usize, s: Sending) {
        if let Some((flows, bytes)) = self.drain_reports.get(index) {
            let was = bytes.swap(s.from_guest, Ordering::Relaxed);
            if flows.swap(s.flows, Ordering::AcqRel) != s.flows || was != s.from_guest {
                self.drain_reported.store(true, Ordering::Release);
                if let Some((_, waker)) = self.inboxes.first()
                    && let Some(waker) = waker.get()
                {
                    let _ = waker.wake();
                }
            }
        }
    }

    /// Whether an engine reported a change since the last call.
    pub(super) fn take_reported(&self) -> bool {
        self.drain_reported.swap(false, Ordering::AcqRel)
    }

    /// What every engine but `me` last reported ([`Sending::UNKNOWN`] before its first).
    pub(super) fn drain_reports(&self, me: usize) -> Vec<Sending> {
        let report = |(flows, bytes): &(AtomicU64, AtomicU64)| Sending {
            flows: flows.load(Ordering::Acquire),
            from_guest: bytes.load(Ordering::Relaxed),
        };
        self.drain_reports.iter().enumerate().filter(|(i, _)| *i != me).map(|(_, r)| report(r)).collect()
    }

    /// Why an engine failed, if one did.
    fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The engine that holds the flow `key`, if any does.
    pub fn owner(&self, key: &FlowKey) -> Option<usize> {
        self.owners.owner(key)
    }

    /// Gives engine `to` a frame to handle as if it had read it.
    fn hand(&self, to: usize, frame: &[u8]) -> Handed {
        let Some((tx, Some(waker))) = self.inboxes.get(to).map(|(tx, w)| (tx, w.get())) else {
            return Handed::No;
        };
        match tx.try_send(frame.to_vec()) {
            // Queued: that engine reads it at its next wake even if this one failed, so it
            // must not be handled here too.
            Ok(()) => {
                if let Err(e) = waker.wake() {
                    tracing::debug!("cannot wake engine {to}: {e}");
                }
                Handed::Yes
            }
            Err(mpsc::TrySendError::Disconnected(_)) => Handed::No,
            Err(mpsc::TrySendError::Full(_)) => Handed::Full,
        }
    }
}

/// An engine's part in a set of shards.
pub(super) struct Shard {
    pub index: usize,
    pub set: Arc<ShardSet>,
    inbox: Inbox,
    /// The next engine, which gathered answers go to (None for the last).
    pub next: Option<ControlHandle>,
    /// True while the engine handles frames handed to it: they are never handed on.
    handling_handed: bool,
    /// The key of the SYN without ACK among them that is being handled, if one is.
    handed_syn: Option<FlowKey>,
    /// Engine 0 only: another engine failed, and why; the loop ends with this error.
    pub failed: Option<String>,
    /// The other engines, while engine 0 drains: when to report next (`drain`).
    pub next_drain_report: Option<std::time::Instant>,
}

/// The guest as `run` configured it (its MAC and addresses) and `--busy-poll`: what every
/// engine of a set is told alike.
#[derive(Clone, Copy, Debug)]
pub struct Guest {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    pub busy_poll: Duration,
}

impl Guest {
    /// Tells `engine` of the guest.
    pub fn configure(&self, engine: &mut Engine) {
        engine.set_busy_poll(self.busy_poll);
        engine.set_guest_mac(self.mac, self.ip);
        if let Some(ip6) = self.ip6 {
            engine.set_guest_ipv6(self.mac, self.ip, ip6);
        }
    }
}

/// The engines beyond engine 0, each on a thread of its own; stopped (their flows ended)
/// when this goes.
pub struct ShardThreads {
    threads: Vec<(OwnedFd, std::thread::JoinHandle<()>)>,
}

impl ShardThreads {
    /// Stops every engine and waits for its thread to end.
    pub fn stop(&mut self) {
        for (bell, _) in &self.threads {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live buffer to our eventfd.
            unsafe { libc::write(bell.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
        for (_, thread) in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for ShardThreads {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The message of a panic's payload (a `&str` or a `String`, as `panic!` makes).
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Stops an engine's loop when its bell (an eventfd) rings.
struct Bell {
    fd: RawFd,
    /// It rang: the loop ended because engine 0 stopped the set.
    rung: bool,
}

impl Supervisor for Bell {
    fn fd(&self) -> RawFd {
        self.fd
    }

    fn on_ready(&mut self) -> Option<i32> {
        self.rung = true;
        Some(0)
    }
}

/// Starts an engine for each of `queues` (the guest's TAP device's other queues), on a
/// thread each, and makes them and `engine0` one set of shards. `cfg` and `services` are
/// engine 0's; every engine's share of the limits is the caller's to set in `cfg`. Engine 0
/// stops the others when its loop ends or it is dropped.
pub fn start(
    engine0: &mut Engine,
    cfg: Arc<NetConfig>,
    services: &ServiceHub,
    queues: Vec<Box<dyn Link + Send>>,
    guest: Guest,
) -> io::Result<()> {
    let (set, mut inboxes) = ShardSet::new(queues.len() + 1);
    let mut threads = ShardThreads { threads: Vec::new() };
    let mut next = None;
    // From the last engine back to engine 1: each passes gathered answers to the next.
    for (i, link) in queues.into_iter().enumerate().rev() {
        let index = i + 1;
        let inbox = inboxes.pop().ok_or_else(|| io::Error::other("no inbox"))?;
        // SAFETY: eventfd returns a new descriptor (or -1) that we then own.
        let bell = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if bell < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor eventfd just returned, owned by nothing else.
        let bell = unsafe { OwnedFd::from_raw_fd(bell) };
        let bell_fd = bell.as_raw_fd();
        let (cfg, hub, set, next_handle) = (cfg.clone(), services.handle(), set.clone(), next.take());
        let (made_tx, made_rx) = mpsc::channel();
        let thread = std::thread::Builder::new().name(format!("usernet-engine{index}")).spawn(move || {
            let made = (|| {
                let hook = hub.proxy_hook();
                let mut e = Engine::new(cfg.clone(), link, hub, None)?;
                e.add_tcp_hook(hook);
                // Its queue is its only link: without it the engine has nothing to serve.
                e.stop_without_links();
                guest.configure(&mut e);
                e.join_shards(set.clone(), index, inbox, next_handle)?;
                let handle = e.control_handle()?;
                Ok::<_, io::Error>((e, handle))
            })();
            match made {
                Ok((mut engine, handle)) => {
                    let _ = made_tx.send(Ok(handle));
                    // Its bell ends the loop; anything else is a failure of the set.
                    let mut bell = Bell { fd: bell_fd, rung: false };
                    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run(&mut bell)));
                    let why = match ran {
                        Ok(Ok(_)) if bell.rung => return,
                        Ok(Ok(_)) => format!("network engine {index} stopped: its queue of the guest's device is gone"),
                        Ok(Err(e)) => format!("network engine {index} failed: {e}"),
                        Err(panic) => format!("network engine {index} panicked: {}", panic_message(&*panic)),
                    };
                    tracing::error!("{why}");
                    set.fail(why);
                }
                Err(e) => {
                    let _ = made_tx.send(Err(e));
                }
            }
        })?;
        threads.threads.push((bell, thread));
        let handle = made_rx.recv().map_err(|_| io::Error::other(format!("engine {index} did not start")))??;
        next = Some(handle);
    }
    let inbox = inboxes.pop().ok_or_else(|| io::Error::other("no inbox"))?;
    engine0.join_shards(set, 0, inbox, next)?;
    engine0.other_engines = Some(threads);
    Ok(())
}

impl Engine {
    /// Makes this engine engine `index` of `set`.
    pub(super) fn join_shards(
        &mut self,
        set: Arc<ShardSet>,
        index: usize,
        inbox: Inbox,
        next: Option<ControlHandle>,
    ) -> io::Result<()> {
        let waker = self.waker()?;
        if let Some((_, slot)) = set.inboxes.get(index) {
            let _ = slot.set(waker);
        }
        self.flows.share_owners(set.owners.clone(), index);
        // An engine that failed before engine 0 had a waker found none to ring (see `fail`).
        let failed = if index == 0 { set.failure.lock().unwrap_or_else(|e| e.into_inner()).clone() } else { None };
        self.shard = Some(Shard {
            index,
            set,
            inbox,
            next,
            handling_handed: false,
            handed_syn: None,
            failed,
            next_drain_report: None,
        });
        Ok(())
    }
}

/// What a frame from the guest is, for sharding: a frame of a guest's flow (its key), a
/// TCP SYN without ACK (a new connection, unless an engine holds its key already), or
/// anything else (engine 0's).
#[derive(Clone, Copy)]
pub(super) enum Belongs {
    Flow(FlowKey),
    Syn(FlowKey),
    Engine0,
}

impl Engine {
    /// What the guest's IP packet (`ip4` or `ip6` with what follows its header) is, for
    /// sharding: TCP and UDP between the guest and anywhere are flows; DHCP, broadcasts and
    /// multicasts, ICMP, fragments and anything unreadable are engine 0's.
    pub(super) fn belongs(&self, ip4: Option<&(Ipv4Header, &[u8])>, ip6: Option<&(Ipv6Header, &[u8])>) -> Belongs {
        let (src, dst, protocol, l4) = match (ip4, ip6) {
            (Some((h, l4)), _) if !h.is_fragment() => (IpAddr::V4(h.src), IpAddr::V4(h.dst), h.protocol, *l4),
            (_, Some((h, l4))) if !h.is_fragment() => (IpAddr::V6(h.src), IpAddr::V6(h.dst), h.protocol, *l4),
            _ => return Belongs::Engine0,
        };
        let (Some(src_port), Some(dst_port)) = (l4.get(0..2), l4.get(2..4)) else { return Belongs::Engine0 };
        let guest = SocketAddr::new(src, u16::from_be_bytes([src_port[0], src_port[1]]));
        let remote = SocketAddr::new(dst, u16::from_be_bytes([dst_port[0], dst_port[1]]));
        let group = match dst {
            IpAddr::V4(ip) => ip.is_broadcast() || ip.is_multicast() || ip == self.cfg.subnet.broadcast(),
            IpAddr::V6(ip) => ip.is_multicast(),
        };
        match protocol {
            PROTO_TCP => {
                let flags = l4.get(13).copied().unwrap_or(0);
                let key = FlowKey::Tcp { guest, remote };
                if flags & (tcp::SYN | tcp::ACK) == tcp::SYN { Belongs::Syn(key) } else { Belongs::Flow(key) }
            }
            PROTO_UDP if !group && remote.port() != 67 && remote.port() != dhcp6::SERVER_PORT => {
                Belongs::Flow(FlowKey::Udp { guest, remote })
            }
            _ => Belongs::Engine0,
        }
    }

    pub(super) fn handling_handed(&self) -> bool {
        self.shard.as_ref().is_some_and(|s| s.handling_handed)
    }

    /// Says whether the frame in hand was handed by another engine; returns what was said
    /// before. (A datagram reassembled here from handed fragments was not: it goes to the
    /// engine of its flow.)
    pub(super) fn set_handling_handed(&mut self, handed: bool) -> bool {
        self.shard.as_mut().is_some_and(|s| std::mem::replace(&mut s.handling_handed, handed))
    }

    /// Whether this engine handles the frame (else it was handed to the engine that does).
    /// `counted`: the frame is in this engine's link statistics (a datagram reassembled from
    /// its fragments is not: they are), which a handed frame leaves.
    pub(super) fn keep_frame(&mut self, belongs: Belongs, frame: &[u8], counted: bool) -> bool {
        let Some(shard) = self.shard.as_mut() else { return true };
        if shard.handling_handed {
            if let Belongs::Syn(key) = belongs {
                shard.handed_syn = Some(key);
            }
            return true;
        }
        let Some(shard) = self.shard.as_ref() else { return true };
        let (to, balanced) = match belongs {
            Belongs::Engine0 => (0, None),
            Belongs::Flow(key) | Belongs::Syn(key) => {
                if self.flows.lookup(&key).is_some() {
                    return true;
                }
                match shard.set.owner(&key) {
                    Some(owner) => (owner, None),
                    // A new flow: this engine's, unless it is the gateway's, or a new
                    // connection that an engine holding fewer TCP flows takes.
                    None if self.to_gateway_services(&key) => (0, None),
                    None if matches!(belongs, Belongs::Syn(_)) => {
                        match shard.set.owners.fewer_tcp_flows_than(shard.index, shard.set.inboxes.len()) {
                            // Claimed only if still free: the same SYN by another queue
                            // may have been claimed meanwhile (then it goes to that claim).
                            Some(other) if shard.set.owners.claim_vacant(key, other) => (other, Some(key)),
                            Some(_) => match shard.set.owner(&key) {
                                Some(owner) => (owner, None),
                                None => return true,
                            },
                            None => return true,
                        }
                    }
                    None => return true,
                }
            }
        };
        if to == shard.index {
            return true;
        }
        match shard.set.hand(to, frame) {
            // Not handed after all: the new connection stays here.
            Handed::No | Handed::Full if balanced.is_some() => {
                if let Some(key) = balanced {
                    shard.set.owners.release(&key, to);
                }
                true
            }
            Handed::No => true,
            Handed::Full => {
                self.switch.drop_in(DropReason::Handover);
                false
            }
            Handed::Yes => {
                // Counted by the engine that handles it.
                if counted {
                    self.switch.stats.frames_in -= 1;
                    self.switch.stats.bytes_in -= frame.len() as u64;
                }
                false
            }
        }
    }

    /// Whether the flow `key` goes to the gateway's own services (DNS, the proxy): engine 0's.
    fn to_gateway_services(&self, key: &FlowKey) -> bool {
        let remote = match key {
            FlowKey::Tcp { remote, .. } | FlowKey::Udp { remote, .. } => remote.ip(),
            FlowKey::Icmp { .. } | FlowKey::Splice { .. } => return false,
        };
        match remote {
            IpAddr::V4(ip) => ip == self.cfg.gateway || self.cfg.dns == Some(ip),
            IpAddr::V6(ip) => {
                ip == crate::config::GATEWAY_LINK_LOCAL || self.cfg.v6.is_some_and(|n| ip == n.gateway || ip == n.dns)
            }
        }
    }

    /// Frames other engines handed over: handled as if read from this engine's link. For
    /// engine 0, also the news that another engine failed.
    pub(super) fn on_handed(&mut self, now: std::time::Instant) {
        let Some(shard) = self.shard.as_mut() else { return };
        if shard.index == 0 && shard.failed.is_none() {
            shard.failed = shard.set.failure();
        }
        let frames: Vec<Vec<u8>> = shard.inbox.0.try_iter().collect();
        shard.handling_handed = true;
        for frame in frames {
            self.on_frame(0, &frame, now);
            // A new connection handed here, and claimed for this engine by the one that
            // handed it: the claim goes if no flow was made (refused, or over a bound).
            let handed_syn = self.shard.as_mut().and_then(|s| s.handed_syn.take());
            if let Some(key) = handed_syn
                && self.flows.lookup(&key).is_none()
            {
                self.unclaim(&key);
            }
        }
        if let Some(shard) = self.shard.as_mut() {
            shard.handling_handed = false;
        }
    }

    /// Whether another engine holds a flow with the addresses of `key` (published ports and
    /// `/tunnel` open flows toward the guest: never with an address pair in use).
    pub(super) fn held_elsewhere(&self, key: &FlowKey) -> bool {
        self.shard.as_ref().is_some_and(|s| s.set.owner(key).is_some_and(|o| o != s.index))
    }

    /// Claims `key` for this engine before its flow exists: a flow opened toward the guest
    /// sends its SYN before it is in the table, and the guest's SYN-ACK, answered within
    /// that write, reaches the queue the kernel hashes it to (its flow table learns the
    /// queue only after the write). [`Engine::unclaim`] if the flow is not made after all.
    pub(super) fn claim(&self, key: &FlowKey) {
        if let Some(s) = &self.shard {
            s.set.owners.claim(*key, s.index);
        }
    }

    /// Claims the IPv4 addresses that the inbound flow `id` may fall back to
    /// ([`TcpFlow::fallback`]), before it can send its SYN there: as for [`Engine::claim`],
    /// the guest's SYN-ACK may reach another engine within that write, before the flow is
    /// indexed under them. Returns the key claimed, to give to [`Engine::unclaim_unused`]
    /// once the flow had its turn; None without shards or without a fallback. When a flow,
    /// here or on another engine, holds those addresses already, the flow loses its
    /// fallback: its SYN must not reach another connection.
    ///
    /// [`TcpFlow::fallback`]: super::flows::tcp::TcpFlow::fallback
    pub(super) fn claim_fallback(&mut self, id: super::flows::FlowId) -> Option<FlowKey> {
        let shard = self.shard.as_ref()?;
        let Some(super::flows::Flow::Tcp(f)) = self.flows.get_mut(id) else { return None };
        let &(guest, remote) = f.fallback.as_deref()?;
        let key = FlowKey::Tcp { guest, remote };
        if self.flows.lookup(&key).is_none() && shard.set.owners.claim_vacant(key, shard.index) {
            return Some(key);
        }
        if let Some(super::flows::Flow::Tcp(f)) = self.flows.get_mut(id) {
            tracing::debug!("{} -> {}: its IPv4 fallback {remote} -> {guest} is busy", f.remote, f.guest);
            f.fallback = None;
        }
        None
    }

    /// Releases `claimed` ([`Engine::claim_fallback`]) unless the flow `id` now goes by it.
    pub(super) fn unclaim_unused(&self, claimed: Option<FlowKey>, id: super::flows::FlowId) {
        if let Some(key) = claimed
            && self.flows.lookup(&key) != Some(id)
        {
            self.unclaim(&key);
        }
    }

    /// Undoes [`Engine::claim`].
    pub(super) fn unclaim(&self, key: &FlowKey) {
        if let Some(s) = &self.shard {
            s.set.owners.release(key, s.index);
        }
    }

    /// This engine's index among its shards (0 when it has none).
    pub fn shard_index(&self) -> usize {
        self.shard.as_ref().map_or(0, |s| s.index)
    }
}
