//! The engine: one event loop that owns the guest link and the flow table.
//!
//! # Theory of operation
//!
//! A single thread waits (epoll, through mio, edge-triggered; a TAP device level-triggered,
//! so that a lone frame needs no read that finds it empty) on the guest link, on every
//! flow's host socket and on the supervisor's descriptor. Each round it:
//! 1. handles socket readiness: connects completing, host data to push to the guest,
//!    socket room to write held guest data into;
//! 2. reads a batch of frames from the link and dispatches each: ARP and ping for the
//!    gateway, DHCP, then TCP, UDP and ICMP echo to their flows (creating them on a SYN,
//!    a first datagram, a first echo request); IP fragments wait for the rest of their
//!    datagram first;
//! 3. fires due timers (retransmission, connect timeout, idle expiry);
//! 4. sends the ACKs that the batch made owed, one per flow (coalescing);
//! 5. asks the supervisor (the `run` command's signals) whether to stop; `run` then drains
//!    first (`drain`): what the guest still sends reaches the host before the loop ends.
//!
//! No thread, task or allocation per packet; a flow's work is O(1) per packet. The
//! gateway's stream services (DNS over TCP) are reached through socketpairs served on their
//! own thread, so they look like any host socket here.
//!
//! Where each part is:
//! - `event_loop`: the loop itself (`Engine::run`), link reads and writes, timers' clock;
//! - `dispatch`: a frame's way in, by protocol (switching, ARP, ping, DHCP, TCP, UDP, ICMP);
//! - `reassembly`: a guest's fragmented datagrams made whole (the switch fragments the
//!   other way);
//! - `icmpv6`: neighbour and router discovery for the IPv6 network, and IPv6 ping;
//! - `flow_policy`: the flow table's book-keeping and bounds (caps, eviction, timers, ACKs);
//! - `flows`: the flow table and one module per kind of flow (the TCP translator in
//!   `flows::tcp`, with its own theory of operation);
//! - `switch`: the guest links, MAC learning, and the frames sent to guests;
//! - `dial`: where a guest's destination really goes, and the host socket for it;
//! - `listeners`: published ports (accepting, receiving, splicing loopback clients);
//! - `control`: commands from other threads (the API) and their answers;
//! - `metrics`: the counters `/metrics` shows (per link, drops, failed connects, the loop);
//! - `sock`: the socket system calls of the data path; `busy_poll`, `udp_batch`: helpers;
//! - `budget`: the guest data all TCP flows may hold together (`--max-buffered`);
//! - `drain`: what the guest still sends when `run`'s command exits;
//! - `shard`: several engines, a thread and a TAP queue each, serving one guest
//!   (`--engine-threads`).

pub mod budget;
pub mod busy_poll;
pub mod control;
pub mod dial;
mod dispatch;
pub mod drain;
mod event_loop;
pub mod flow_policy;
pub mod flows;
pub mod guest_sockets;
mod icmpv6;
pub mod listeners;
pub mod metrics;
mod reassembly;
pub mod shard;
pub mod sock;
pub mod switch;
pub mod synthetic;
mod udp_batch;

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Poll, Token};

use crate::config::NetConfig;
use crate::link::Link;
use crate::pcap::PcapWriter;
use crate::services::dhcp::DhcpServer;
use crate::services::{ServiceHub, TcpHook};
use usernet_wire::ethernet;

use dial::{Dialer, HostDialer};
use flows::{FlowId, FlowTable};
use switch::Switch;

/// Something outside the network that the loop also watches (the `run` command's
/// signalfd, say): when its fd is readable the loop calls `on_ready`, and stops with
/// the returned exit code when it gives one.
pub trait Supervisor {
    fn fd(&self) -> RawFd;
    fn on_ready(&mut self) -> Option<i32>;
    /// While the engine drains (after `on_ready` gave an exit code; see `drain`), its fd
    /// became readable: whether that asks to stop at once (a signal, say), not something
    /// to pass over (a child's exit).
    fn interrupts_drain(&mut self) -> bool {
        true
    }
    /// The engine drains, and some connection is still sending from the guest: whatever
    /// else could keep the guest's sockets open is to end now (`run`: the processes COMMAND
    /// left behind). Called once, and not at all when nothing was sending.
    fn draining(&mut self) {}
}

/// Token bits of guest links and link acceptors (the rest is their index).
const LINK_BIT: usize = 1 << 61;
const ACCEPTOR_BIT: usize = 1 << 60;
const SUPERVISOR: Token = Token(1);
/// The engine's one `mio::Waker` (mio allows one per `Poll`; a debug build panics at a
/// second): commands from other threads (the control API), and frames other engines handed
/// to this one (see `shard`).
const WAKER: Token = Token(2);
const FLOW_BASE: usize = 16;

pub struct Engine {
    /// Engine 0's fellow engines (`shard::start`), each on its thread. First, because fields
    /// drop in order: they hold handles on the gateway services, whose hub (in `dialer`)
    /// waits for every handle to go when it drops.
    other_engines: Option<shard::ShardThreads>,
    cfg: Arc<NetConfig>,
    poll: Poll,
    switch: Switch,
    rx_buf: Vec<u8>,
    dialer: Box<dyn Dialer>,
    dhcp: DhcpServer,
    flows: FlowTable,
    timers: BinaryHeap<Reverse<(Instant, FlowId)>>,
    /// Flows that owe the guest an ACK at the end of this round.
    owed_acks: Vec<FlowId>,
    /// A new guest flow's socket numbered at or beyond this is refused (`--fd-reserve`,
    /// see `flow_policy::within_fd_reserve`).
    fd_ceiling: libc::rlim_t,
    /// From this descriptor number on, a published port's new connections wait in its
    /// backlog (`sock::published_fd_ceiling`): the last few are the API's and the services'.
    published_fd_ceiling: libc::rlim_t,
    /// The last connection a published port accepted took a descriptor next to that
    /// ceiling: look for a free one below it before accepting another.
    fds_crowded: bool,
    isn_hasher: std::collections::hash_map::RandomState,
    acceptors: Vec<Box<dyn crate::link::LinkAcceptor>>,
    /// Guest UDP datagrams of this round, sent together at its end.
    udp_batch: udp_batch::UdpBatch,
    /// The kernel segments UDP sends (UDP_SEGMENT), so a published port's answers may go
    /// segmented (`flows::udp::published_segmenting`).
    udp_segment: bool,
    /// The guests' fragmented datagrams being made whole (reassembly.rs).
    reassembly: reassembly::Reassembly,
    /// Where a guest's segmented UDP frame is cut into its datagrams (dispatch.rs).
    uso_scratch: Vec<u8>,
    /// Sockets of the guest's network namespace, for spliced loopback connections.
    guest_sockets: Option<guest_sockets::GuestSockets>,
    next_splice_id: u64,
    /// Empty pipes of ended splice flows, for the next ones.
    pipe_pool: flows::splice::PipePool,
    /// Services that take over some guest TCP connections (see `add_tcp_hook`).
    tcp_hooks: Vec<TcpHook>,
    busy_poll: busy_poll::BusyPoll,
    /// Published ports, indexed by their token.
    listeners: Vec<Option<listeners::Listener>>,
    next_listener_id: u32,
    /// When to watch the TCP listeners again after an accept failed (out of descriptors):
    /// the connections it left in a backlog get no new event of their own.
    accept_retry: Option<Instant>,
    /// Rate-limits the warnings of failed accepts other than for want of descriptors
    /// (those count as the limit `open_files`).
    accept_errors: crate::config::LogEvery,
    /// Where the search for a free host port of the next `/tunnel` starts.
    next_tunnel_port: u16,
    control_tx: std::sync::mpsc::Sender<control::Command>,
    control_rx: std::sync::mpsc::Receiver<control::Command>,
    waker: Option<Arc<mio::Waker>>,
    /// Stop (exit status 0) when the last guest link goes (see `stop_without_links`).
    stop_without_links: bool,
    /// Set when the loop must stop at the end of this round, with this exit status.
    stop: Option<i32>,
    /// Drain before stopping when the supervisor says so, with this idle bound (`drain`).
    drain_idle: Option<Duration>,
    /// The loop's rounds and busy time (for `/metrics`).
    loop_counters: metrics::LoopCounters,
    /// Bytes the flows moved on their host sockets in the loop's current round, outside the
    /// frames of the links (for [`busy_poll`]: a spliced bulk transfer moves no frame at all,
    /// and guest data held back and then written when the socket has room moves one ACK).
    round_socket_bytes: u64,
    /// The gateway services' counters, reported with the engine's own (for `/metrics`).
    service_metrics: Option<Arc<crate::services::metrics::ServiceMetrics>>,
    /// Guests' IPv6 addresses by their IPv4 ones, where usernet configured both (`run`).
    guests6: Vec<(std::net::Ipv4Addr, std::net::Ipv6Addr)>,
    /// When all nodes get the next router advertisement (None: at once; see icmpv6.rs),
    /// and when the last one went.
    next_router_advert: Option<Instant>,
    last_multicast_advert: Option<Instant>,
    /// This engine's part in a set of engines serving one guest (`shard`).
    shard: Option<shard::Shard>,
}

/// One guest link of an engine, for as long as it lives: its slot and its serial (a slot
/// serves another link once this one goes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkId {
    index: usize,
    serial: u64,
}

impl Engine {
    pub fn new(
        cfg: Arc<NetConfig>,
        link: Box<dyn Link>,
        services: ServiceHub,
        pcap: Option<PcapWriter>,
    ) -> io::Result<Engine> {
        let service_metrics = services.metrics();
        let dialer = Box::new(HostDialer::new(cfg.clone(), services));
        let mut e = Engine::with_dialer(cfg, dialer, pcap)?;
        e.service_metrics = Some(service_metrics);
        e.add_link(link);
        Ok(e)
    }

    /// An engine with no guest link yet (`serve`: links come with `add_link` and acceptors).
    pub fn without_link(cfg: Arc<NetConfig>, services: ServiceHub, pcap: Option<PcapWriter>) -> io::Result<Engine> {
        let service_metrics = services.metrics();
        let dialer = Box::new(HostDialer::new(cfg.clone(), services));
        let mut e = Engine::with_dialer(cfg, dialer, pcap)?;
        e.service_metrics = Some(service_metrics);
        Ok(e)
    }

    /// Lets a service take over guest TCP connections it chooses (hooks are asked in order).
    pub fn add_tcp_hook(&mut self, hook: TcpHook) {
        self.tcp_hooks.push(hook);
    }

    /// Records a guest whose address is configured statically (`run`), so that it shows
    /// among the DHCP leases and a later DHCP request keeps that address.
    pub fn add_static_lease(&mut self, mac: [u8; 6], ip: std::net::Ipv4Addr) {
        self.dhcp.add_static(mac, ip);
    }

    /// Each link carries one guest (`serve`): a link's frames from another MAC than its
    /// first, or from another source address than its first (0.0.0.0 aside), are dropped,
    /// so that no guest can poison the switch for another's address or speak as it.
    pub fn bind_guests_to_links(&mut self) {
        self.switch.bind_sources = true;
    }

    /// The guest at `ip` has `mac` for sure: usernet itself set it on the guest's interface
    /// (`run`), so the first frame to it (a client of a published port) needs no ARP round
    /// trip. Not for interfaces configured by others (slirp4netns mode without
    /// `--configure`): a wrong MAC would hide the guest until it speaks.
    pub fn set_guest_mac(&mut self, mac: [u8; 6], ip: std::net::Ipv4Addr) {
        self.switch.add_neighbour(ip.into(), mac);
    }

    /// The guest with `mac` has IPv6 address `ip`, configured by usernet (`serve --netns`):
    /// with guests bound to their links, no other guest may take it, whoever speaks first.
    pub fn reserve_guest6(&mut self, mac: [u8; 6], ip: std::net::Ipv6Addr) {
        self.switch.reserve6(ip, mac);
        self.switch.add_neighbour(ip.into(), mac);
    }

    /// The same for the guest's IPv6 address `ip6`, which the guest at IPv4 address `ip4`
    /// has: published ports then reach it over IPv6 from IPv6 clients (see listeners.rs).
    pub fn set_guest_ipv6(&mut self, mac: [u8; 6], ip4: std::net::Ipv4Addr, ip6: std::net::Ipv6Addr) {
        self.switch.add_neighbour(ip6.into(), mac);
        self.guests6.retain(|(v4, _)| *v4 != ip4);
        self.guests6.push((ip4, ip6));
    }

    /// The guest is a network namespace on this host (`run`): connections from the host's
    /// loopback to its published TCP ports are spliced socket to socket inside it (see
    /// [`guest_sockets`]). An error means this process may not enter it; loopback clients
    /// then take the guest link like any other.
    pub fn set_guest_netns(&mut self, netns: std::os::fd::OwnedFd) -> io::Result<()> {
        self.start_guest_netns(netns)?;
        self.guest_netns_entered()
    }

    /// [`Engine::set_guest_netns`] without waiting for its thread to enter the namespace:
    /// [`Engine::guest_netns_entered`] says, before the engine runs, whether it did.
    pub fn start_guest_netns(&mut self, netns: std::os::fd::OwnedFd) -> io::Result<()> {
        self.guest_sockets = Some(guest_sockets::GuestSockets::spawn(netns)?);
        Ok(())
    }

    /// Waits until the thread started by [`Engine::start_guest_netns`] entered the guest's
    /// namespace; if it could not, loopback clients go through the guest link instead.
    pub fn guest_netns_entered(&mut self) -> io::Result<()> {
        let Some(sockets) = self.guest_sockets.as_mut() else {
            return Ok(());
        };
        let entered = sockets.entered();
        if entered.is_err() {
            self.guest_sockets = None;
        }
        entered
    }

    /// Makes the loop stop, with exit status 0, when its last guest link goes (the guest's
    /// namespace was removed): the drop-in modes end with the namespace they serve.
    pub fn stop_without_links(&mut self) {
        self.stop_without_links = true;
    }

    /// The longest busy-poll window (zero: never spin); see [`busy_poll`].
    pub fn set_busy_poll(&mut self, max: Duration) {
        self.busy_poll = busy_poll::BusyPoll::new(max);
    }

    /// Adds a guest link to the virtual network; what names it to [`Command::DropLink`].
    ///
    /// [`Command::DropLink`]: control::Command::DropLink
    pub fn add_link(&mut self, link: Box<dyn Link>) -> LinkId {
        let fd = link.fd();
        let name = link.describe();
        if let Some((mac, ip)) = link.guest() {
            self.replace_guest(mac, ip, &name);
        }
        let index = self.switch.add_link(link);
        // A new guest hears of the IPv6 router at once (it may not solicit).
        self.next_router_advert = None;
        let token = Token(LINK_BIT | index);
        if let Err(e) =
            self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!(link = %name, error = %e, "cannot watch the guest link");
        }
        tracing::info!(link = %name, "guest link up");
        let serial = self.switch.links[index].as_ref().map_or(0, |slot| slot.serial);
        LinkId { index, serial }
    }

    /// A link for the guest with `mac` arrives (named by its transport's handshake): the
    /// older link of that guest, if any, is closed (the client reconnected), and the
    /// address it was given becomes its static lease.
    fn replace_guest(&mut self, mac: [u8; 6], ip: Option<std::net::Ipv4Addr>, name: &str) {
        let older: Vec<usize> = (0..self.switch.links.len())
            .filter(|&i| {
                matches!(self.switch.links.get(i), Some(Some(slot)) if slot.link.guest().is_some_and(|(m, _)| m == mac))
            })
            .collect();
        for index in older {
            if let Some(slot) = self.switch.remove_link(index) {
                let fd = slot.link.fd();
                let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
                tracing::info!(link = %slot.link.describe(), "guest link replaced: its interface connected again");
            }
        }
        if let Some(ip) = ip
            && !self.dhcp.add_static(mac, ip)
        {
            tracing::warn!(link = %name, "{ip} cannot be this guest's static lease: another guest has it");
        }
    }

    /// Adds a listening transport; each guest that connects becomes a link.
    pub fn add_acceptor(&mut self, acceptor: Box<dyn crate::link::LinkAcceptor>) -> io::Result<()> {
        let fd = acceptor.fd();
        self.acceptors.push(acceptor);
        let token = Token(ACCEPTOR_BIT | (self.acceptors.len() - 1));
        self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE)
    }

    /// An engine whose host sockets come from `dialer` (tests use fakes).
    pub fn with_dialer(cfg: Arc<NetConfig>, dialer: Box<dyn Dialer>, pcap: Option<PcapWriter>) -> io::Result<Engine> {
        crate::fd_limit::raise();
        let mtu = cfg.mtu as usize;
        let switch = Switch::new(pcap, cfg.gateway_mac, cfg.gateway, mtu);
        switch.budget.set(cfg.limits.max_buffered, cfg.limits.tcp_stall_timeout);
        let (control_tx, control_rx) = std::sync::mpsc::channel();
        Ok(Engine {
            listeners: Vec::new(),
            next_listener_id: 0,
            next_tunnel_port: 0,
            accept_retry: None,
            accept_errors: Default::default(),
            control_tx,
            control_rx,
            waker: None,
            poll: Poll::new()?,
            switch,
            acceptors: Vec::new(),
            udp_batch: Default::default(),
            udp_segment: dial::probe_udp_segment(),
            reassembly: reassembly::Reassembly::new(switch::L4_OFF),
            uso_scratch: Vec::new(),
            guest_sockets: None,
            stop_without_links: false,
            stop: None,
            drain_idle: None,
            loop_counters: metrics::LoopCounters::default(),
            round_socket_bytes: 0,
            service_metrics: None,
            next_router_advert: None,
            last_multicast_advert: None,
            shard: None,
            other_engines: None,
            guests6: Vec::new(),
            next_splice_id: 0,
            pipe_pool: Default::default(),
            tcp_hooks: Vec::new(),
            busy_poll: busy_poll::BusyPoll::new(busy_poll::DEFAULT_MAX),
            rx_buf: vec![0u8; 65536 + ethernet::HEADER_LEN],
            dialer,
            dhcp: DhcpServer::new(cfg.clone()),
            flows: FlowTable::default(),
            timers: BinaryHeap::new(),
            owed_acks: Vec::new(),
            fd_ceiling: sock::fd_ceiling(cfg.limits.fd_reserve),
            published_fd_ceiling: sock::published_fd_ceiling(),
            fds_crowded: false,
            isn_hasher: Default::default(),
            cfg,
        })
    }

    pub fn stats(&self) -> switch::LinkStats {
        self.switch.stats
    }

    /// A handle through which other threads (the control API) send commands to this engine.
    pub fn control_handle(&mut self) -> io::Result<control::ControlHandle> {
        Ok(control::ControlHandle::new(self.control_tx.clone(), self.waker()?))
    }

    /// The engine's waker (`WAKER`), made at the first call.
    fn waker(&mut self) -> io::Result<Arc<mio::Waker>> {
        match &self.waker {
            Some(waker) => Ok(waker.clone()),
            None => {
                let waker = Arc::new(mio::Waker::new(self.poll.registry(), WAKER)?);
                self.waker = Some(waker.clone());
                Ok(waker)
            }
        }
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod ipv6_tests;
#[cfg(test)]
mod tests;
