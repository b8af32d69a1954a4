//! The engine: one event loop that owns the guest link and the flow table.
//!
//! # Theory of operation
//!
//! A single thread waits (epoll, through mio, edge-triggered) on the guest link, on every
//! flow's host socket and on the supervisor's descriptor. Each round it:
//! 1. handles socket readiness: connects completing, host data to push to the guest,
//!    socket room to write held guest data into;
//! 2. reads a batch of frames from the link and dispatches each: ARP and ping for the
//!    gateway, DHCP, then TCP, UDP and ICMP echo to their flows (creating them on a SYN,
//!    a first datagram, a first echo request);
//! 3. fires due timers (retransmission, connect timeout, idle expiry);
//! 4. sends the ACKs that the batch made owed, one per flow (coalescing);
//! 5. asks the supervisor (the `run` command's signals) whether to stop.
//!
//! No thread, task or allocation per packet; a flow's work is O(1) per packet. The
//! gateway's stream services (DNS over TCP) are reached through socketpairs served on their
//! own thread, so they look like any host socket here.

pub mod busy_poll;
pub mod control;
pub mod dial;
pub mod flows;
pub mod listeners;
pub mod sock;
pub mod switch;
mod udp_batch;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hash::BuildHasher;
use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::config::NetConfig;
use crate::link::Link;
use crate::pcap::PcapWriter;
use crate::services::dhcp::DhcpServer;
use crate::services::{ServiceHub, TcpHook};
use usernet_wire::arp::{self, ArpPacket};
use usernet_wire::ethernet::{self, EthernetHeader};
use usernet_wire::icmp::{self, IcmpHeader};
use usernet_wire::ipv4::Ipv4Header;
use usernet_wire::tcp::{ACK, SYN, TcpHeader};
use usernet_wire::udp::UdpHeader;
use usernet_wire::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use dial::{Dialer, HostDialer};
use flows::{Flow, FlowId, FlowKey, FlowTable, IcmpFlow, TcpFlow, UdpFlow, Verdict};
use switch::{ICMP_DATA_OFF, Switch, UDP_PAYLOAD_OFF};

/// Something outside the network that the loop also watches (the `run` command's
/// signalfd, say): when its fd is readable the loop calls `on_ready`, and stops with
/// the returned exit code when it gives one.
pub trait Supervisor {
    fn fd(&self) -> RawFd;
    fn on_ready(&mut self) -> Option<i32>;
}

/// Token bits of guest links and link acceptors (the rest is their index).
const LINK_BIT: usize = 1 << 61;
const ACCEPTOR_BIT: usize = 1 << 60;
const SUPERVISOR: Token = Token(1);
const WAKER: Token = Token(2);
const FLOW_BASE: usize = 16;

/// Frames read from the link per round before the loop looks at everything else.
const LINK_BATCH: usize = 128;
/// TCP connects in progress at once; past this the oldest is abandoned (SYN floods).
pub const MAX_CONNECTING: usize = 1024;
/// UDP flows at once; past this the least recently used is closed.
pub const MAX_UDP: usize = 4096;
/// ICMP echo flows at once.
pub const MAX_ICMP: usize = 256;

pub struct Engine {
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
    /// Connecting TCP flows, oldest first (may hold ids of flows since connected or gone).
    connecting: VecDeque<FlowId>,
    connecting_count: usize,
    isn_hasher: std::collections::hash_map::RandomState,
    acceptors: Vec<Box<dyn crate::link::LinkAcceptor>>,
    /// Guest UDP datagrams of this round, sent together at its end.
    udp_batch: udp_batch::UdpBatch,
    /// The guest's network namespace and our own, for spliced loopback connections.
    netns: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    next_splice_id: u64,
    /// Services that take over some guest TCP connections (see `add_tcp_hook`).
    tcp_hooks: Vec<TcpHook>,
    busy_poll: busy_poll::BusyPoll,
    /// Published ports, indexed by their token.
    listeners: Vec<Option<listeners::Listener>>,
    next_listener_id: u32,
    control_tx: std::sync::mpsc::Sender<control::Command>,
    control_rx: std::sync::mpsc::Receiver<control::Command>,
    waker: Option<Arc<mio::Waker>>,
}

impl Engine {
    pub fn new(
        cfg: Arc<NetConfig>,
        link: Box<dyn Link>,
        services: ServiceHub,
        pcap: Option<PcapWriter>,
    ) -> io::Result<Engine> {
        let dialer = Box::new(HostDialer::new(cfg.clone(), services));
        let mut e = Engine::with_dialer(cfg, dialer, pcap)?;
        e.add_link(link);
        Ok(e)
    }

    /// An engine with no guest link yet (`serve`: links come with `add_link` and acceptors).
    pub fn without_link(cfg: Arc<NetConfig>, services: ServiceHub, pcap: Option<PcapWriter>) -> io::Result<Engine> {
        let dialer = Box::new(HostDialer::new(cfg.clone(), services));
        Engine::with_dialer(cfg, dialer, pcap)
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

    /// The guest is a network namespace on this host (`run`): connections from the host's
    /// loopback to its published TCP ports are spliced socket to socket inside it.
    pub fn set_guest_netns(&mut self, netns: std::os::fd::OwnedFd) -> io::Result<()> {
        let own = std::fs::File::open("/proc/thread-self/ns/net")?;
        self.netns = Some((netns, std::os::fd::OwnedFd::from(own)));
        Ok(())
    }

    /// The longest busy-poll window (zero: never spin); see [`busy_poll`].
    pub fn set_busy_poll(&mut self, max: Duration) {
        self.busy_poll = busy_poll::BusyPoll::new(max);
    }

    /// Adds a guest link to the virtual network.
    pub fn add_link(&mut self, link: Box<dyn Link>) {
        let fd = link.fd();
        let name = link.describe();
        let index = self.switch.add_link(link);
        let token = Token(LINK_BIT | index);
        if let Err(e) =
            self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE | Interest::WRITABLE)
        {
            tracing::warn!("{name}: cannot watch it: {e}");
        }
        tracing::info!("{name}: guest link up");
    }

    /// Adds a listening transport; each guest that connects becomes a link.
    pub fn add_acceptor(&mut self, acceptor: Box<dyn crate::link::LinkAcceptor>) -> io::Result<()> {
        let fd = acceptor.fd();
        self.acceptors.push(acceptor);
        let token = Token(ACCEPTOR_BIT | (self.acceptors.len() - 1));
        self.poll.registry().register(&mut SourceFd(&fd), token, Interest::READABLE)
    }

    fn on_acceptor(&mut self, index: usize) {
        loop {
            let Some(acceptor) = self.acceptors.get_mut(index) else { return };
            match acceptor.accept() {
                Ok(Some(link)) => self.add_link(link),
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!("{}: accept: {e}", acceptor.describe());
                    return;
                }
            }
        }
    }

    /// Writes what the links queued during this round (a stream link writes a round's
    /// frames with one system call).
    fn flush_links(&mut self) {
        for index in 0..self.switch.links.len() {
            if let Some(Some(slot)) = self.switch.links.get_mut(index)
                && let Err(e) = slot.link.flush()
            {
                self.drop_link(index, &e);
            }
        }
    }

    fn drop_link(&mut self, index: usize, why: &io::Error) {
        if let Some(slot) = self.switch.remove_link(index) {
            let fd = slot.link.fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
            match why.kind() {
                io::ErrorKind::UnexpectedEof => tracing::info!("{}: guest went away", slot.link.describe()),
                _ => tracing::warn!("{}: {why}; link closed", slot.link.describe()),
            }
        }
    }

    /// An engine whose host sockets come from `dialer` (tests use fakes).
    pub fn with_dialer(cfg: Arc<NetConfig>, dialer: Box<dyn Dialer>, pcap: Option<PcapWriter>) -> io::Result<Engine> {
        dial::raise_fd_limit();
        let mtu = cfg.mtu as usize;
        let (control_tx, control_rx) = std::sync::mpsc::channel();
        Ok(Engine {
            listeners: Vec::new(),
            next_listener_id: 0,
            control_tx,
            control_rx,
            waker: None,
            poll: Poll::new()?,
            switch: Switch::new(pcap, cfg.gateway_mac, cfg.gateway, mtu),
            acceptors: Vec::new(),
            udp_batch: Default::default(),
            netns: None,
            next_splice_id: 0,
            tcp_hooks: Vec::new(),
            busy_poll: busy_poll::BusyPoll::new(Duration::ZERO),
            rx_buf: vec![0u8; 65536 + ethernet::HEADER_LEN],
            dialer,
            dhcp: DhcpServer::new(cfg.clone()),
            flows: FlowTable::default(),
            timers: BinaryHeap::new(),
            owed_acks: Vec::new(),
            connecting: VecDeque::new(),
            connecting_count: 0,
            isn_hasher: Default::default(),
            cfg,
        })
    }

    pub fn stats(&self) -> switch::LinkStats {
        self.switch.stats
    }

    /// A handle through which other threads (the control API) send commands to this engine.
    pub fn control_handle(&mut self) -> io::Result<control::ControlHandle> {
        if self.waker.is_none() {
            self.waker = Some(Arc::new(mio::Waker::new(self.poll.registry(), WAKER)?));
        }
        let waker = self.waker.clone().ok_or_else(|| io::Error::other("no waker"))?;
        Ok(control::ControlHandle::new(self.control_tx.clone(), waker))
    }

    /// Carries out the commands other threads sent.
    fn on_commands(&mut self) {
        use control::Command;
        while let Ok(cmd) = self.control_rx.try_recv() {
            match cmd {
                Command::Publish { listeners, guest_ip, reply } => {
                    let _ = reply.send(self.publish(listeners, guest_ip));
                }
                Command::Unpublish { host, proto, reply } => {
                    let _ = reply.send(self.unpublish(host, proto));
                }
                Command::ListPorts { reply } => {
                    let _ = reply.send(self.published());
                }
                Command::Leases { reply } => {
                    let _ = reply.send(self.dhcp.leases());
                }
                Command::Stats { reply } => {
                    let s = self.switch.stats;
                    let _ = reply.send(control::Stats {
                        frames_in: s.frames_in,
                        frames_out: s.frames_out,
                        bytes_in: s.bytes_in,
                        bytes_out: s.bytes_out,
                        dropped_in: s.dropped_in,
                        tcp_flows: self.flows.tcp_count,
                        udp_flows: self.flows.udp_count,
                        icmp_flows: self.flows.icmp_count,
                    });
                }
                Command::Flows { reply } => {
                    let list = self
                        .flows
                        .ids()
                        .map(|(_, f)| match f {
                            Flow::Tcp(t) => control::FlowInfo {
                                proto: "tcp",
                                guest: t.guest.to_string(),
                                remote: t.remote.to_string(),
                            },
                            Flow::Udp(u) => control::FlowInfo {
                                proto: "udp",
                                guest: u.guest.to_string(),
                                remote: u.remote.to_string(),
                            },
                            Flow::Icmp(i) => control::FlowInfo {
                                proto: "icmp",
                                guest: i.guest.to_string(),
                                remote: i.remote.to_string(),
                            },
                            Flow::Splice(_) => control::FlowInfo {
                                proto: "tcp-spliced",
                                guest: "guest loopback".to_string(),
                                remote: "host loopback".to_string(),
                            },
                        })
                        .collect();
                    let _ = reply.send(list);
                }
            }
        }
    }

    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    /// Runs until the supervisor says stop; returns its exit code.
    pub fn run(&mut self, sup: &mut dyn Supervisor) -> io::Result<i32> {
        let sup_fd = sup.fd();
        self.poll.registry().register(&mut SourceFd(&sup_fd), SUPERVISOR, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut link_ready = true;
        loop {
            let spinning = !link_ready && self.busy_poll.enabled() && self.busy_poll.spin(Instant::now());
            let timeout = if link_ready || spinning { Some(Duration::ZERO) } else { self.next_timeout() };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let now = Instant::now();
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
                            && let Err(e) = slot.link.flush()
                        {
                            self.drop_link(index, &e);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            if let Some(Some(slot)) = self.switch.links.get_mut(index) {
                                slot.readable = true;
                            }
                            link_ready = true;
                        }
                    }
                    t if t.0 & ACCEPTOR_BIT != 0 => self.on_acceptor(t.0 & !ACCEPTOR_BIT),
                    SUPERVISOR => sup_ready = true,
                    WAKER => self.on_commands(),
                    t if t.0 & listeners::LISTENER_BIT != 0 => self.on_listener(t.0 & !listeners::LISTENER_BIT, now),
                    t => {
                        let readable = ev.is_readable() || ev.is_read_closed();
                        let writable = ev.is_writable() || ev.is_write_closed();
                        self.on_socket(FlowId::from_token(t, FLOW_BASE), readable, writable, ev.is_error(), now);
                    }
                }
            }
            if link_ready {
                link_ready = self.read_links(now);
            }
            if !self.udp_batch.is_empty() {
                self.udp_batch.flush();
            }
            self.run_timers(Instant::now());
            self.flush_acks(Instant::now());
            self.flush_links();
            if sup_ready && let Some(code) = sup.on_ready() {
                self.shutdown();
                return Ok(code);
            }
            if !link_ready && let Some(p) = self.switch.pcap.as_mut() {
                p.flush();
            }
        }
    }

    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let t = match self.timers.peek() {
            Some(Reverse((d, _))) => d.saturating_duration_since(now),
            None => Duration::from_secs(1),
        };
        Some(t.min(Duration::from_secs(1)))
    }

    /// Reads up to a batch of frames from each readable link; true when more may be waiting.
    fn read_links(&mut self, now: Instant) -> bool {
        let mut buf = std::mem::take(&mut self.rx_buf);
        let mut more = false;
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
                match slot.link.recv(&mut buf) {
                    Ok(n) => {
                        got += 1;
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
        }
        self.rx_buf = buf;
        more
    }

    /// One frame from the guest. Never panics, whatever the bytes.
    pub fn on_frame(&mut self, link: usize, frame: &[u8], now: Instant) {
        self.switch.stats.frames_in += 1;
        self.switch.stats.bytes_in += frame.len() as u64;
        if let Some(p) = self.switch.pcap.as_mut() {
            p.write(frame);
        }
        let Some((eth, payload)) = EthernetHeader::parse(frame) else {
            self.switch.stats.dropped_in += 1;
            return;
        };
        // Learn where the sender is, and its address when it is one of the guest network's.
        let src_ip = match eth.ethertype {
            ethernet::ETHERTYPE_ARP => ArpPacket::parse(payload).map(|a| a.sender_ip),
            ethernet::ETHERTYPE_IPV4 => Ipv4Header::parse(payload).map(|(h, _)| h.src),
            _ => None,
        }
        .filter(|ip| self.cfg.subnet.contains(*ip) && *ip != self.cfg.gateway && *ip != self.cfg.host);
        self.switch.learn(link, eth.src, src_ip);
        // The switch: frames for other guests go to them; broadcasts go to them too.
        if eth.dst != self.cfg.gateway_mac {
            self.switch.forward(link, frame);
            if eth.dst[0] & 1 == 0 {
                return;
            }
        }
        match eth.ethertype {
            ethernet::ETHERTYPE_ARP => self.on_arp(payload),
            ethernet::ETHERTYPE_IPV4 => self.on_ipv4(payload, eth.src, now),
            _ => self.switch.stats.dropped_in += 1,
        }
    }

    fn on_arp(&mut self, payload: &[u8]) {
        let Some(p) = ArpPacket::parse(payload) else {
            return;
        };
        if p.op != arp::OP_REQUEST || (p.target_ip != self.cfg.gateway && p.target_ip != self.cfg.host) {
            return;
        }
        let reply = ArpPacket {
            op: arp::OP_REPLY,
            sender_mac: self.cfg.gateway_mac,
            sender_ip: p.target_ip,
            target_mac: p.sender_mac,
            target_ip: p.sender_ip,
        };
        let mut frame = [0u8; ethernet::HEADER_LEN + arp::LEN];
        EthernetHeader { dst: p.sender_mac, src: self.cfg.gateway_mac, ethertype: ethernet::ETHERTYPE_ARP }
            .emit(&mut frame);
        reply.emit(&mut frame[ethernet::HEADER_LEN..]);
        self.switch.send_frame(&frame, p.sender_mac);
    }

    fn on_ipv4(&mut self, packet: &[u8], src_mac: [u8; 6], now: Instant) {
        let Some((ip, payload)) = Ipv4Header::parse(packet) else {
            self.switch.stats.dropped_in += 1;
            return;
        };
        if ip.is_fragment {
            // The guest's MTU matches the link; fragments are not reassembled.
            self.switch.stats.dropped_in += 1;
            return;
        }
        match ip.protocol {
            PROTO_TCP => self.on_tcp(&ip, payload, now),
            PROTO_UDP => self.on_udp(&ip, payload, src_mac, now),
            PROTO_ICMP => self.on_icmp(&ip, payload, now),
            _ => self.switch.stats.dropped_in += 1,
        }
    }

    fn on_icmp(&mut self, ip: &Ipv4Header, message: &[u8], now: Instant) {
        let Some((h, data)) = IcmpHeader::parse(message) else {
            return;
        };
        if h.kind != icmp::TYPE_ECHO_REQUEST {
            return;
        }
        if ip.dst == self.cfg.gateway {
            let len = data.len().min(self.switch.mtu - 28);
            self.switch.buf()[ICMP_DATA_OFF..ICMP_DATA_OFF + len].copy_from_slice(&data[..len]);
            let reply = IcmpHeader::echo(icmp::TYPE_ECHO_REPLY, h.ident(), h.seq());
            self.switch.send_icmp(ip.dst, ip.src, &reply, len);
            return;
        }
        let key = FlowKey::Icmp { guest: ip.src, remote: ip.dst, ident: h.ident() };
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => {
                if self.flows.icmp_count >= MAX_ICMP {
                    self.evict_oldest(|f| matches!(f, Flow::Icmp(_)));
                }
                let (fd, kind) = match self.dialer.icmp(ip.dst) {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::debug!("ping {} -> {}: {e}", ip.src, ip.dst);
                        return;
                    }
                };
                let flow = Flow::Icmp(IcmpFlow::new(ip.src, ip.dst, h.ident(), fd, kind, now));
                match self.add_flow(flow, Interest::READABLE) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        if let Some(Flow::Icmp(f)) = self.flows.get_mut(id) {
            f.from_guest(message, now);
        }
        self.after(id, Verdict::Keep);
    }

    fn on_udp(&mut self, ip: &Ipv4Header, datagram: &[u8], src_mac: [u8; 6], now: Instant) {
        let Some((h, payload)) = UdpHeader::parse(datagram) else {
            return;
        };
        if h.dst_port == 67 && (ip.dst == self.cfg.gateway || ip.dst.is_broadcast()) {
            self.on_dhcp(payload, src_mac);
            return;
        }
        if ip.dst.is_broadcast() || ip.dst.is_multicast() || ip.dst == self.cfg.subnet.broadcast() {
            return;
        }
        let guest = SocketAddrV4::new(ip.src, h.src_port);
        let remote = SocketAddrV4::new(ip.dst, h.dst_port);
        let key = FlowKey::Udp { guest, remote };
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            None => {
                if self.flows.udp_count >= MAX_UDP {
                    self.evict_oldest(|f| matches!(f, Flow::Udp(_)));
                }
                let fd = match self.dialer.udp(remote, guest) {
                    Ok(fd) => fd,
                    Err(e) => {
                        let code = match e.raw_os_error() {
                            Some(libc::ECONNREFUSED) => icmp::CODE_PORT_UNREACHABLE,
                            Some(libc::ENETUNREACH) => icmp::CODE_NET_UNREACHABLE,
                            _ => icmp::CODE_HOST_UNREACHABLE,
                        };
                        tracing::debug!("udp {guest} -> {remote}: {e}");
                        let quote = &datagram[..datagram.len().min(8)];
                        let mut q = [0u8; 28];
                        Ipv4Header::new(ip.src, ip.dst, PROTO_UDP, datagram.len()).emit(&mut q);
                        q[20..20 + quote.len()].copy_from_slice(quote);
                        self.switch.send_icmp_error(
                            ip.dst,
                            ip.src,
                            icmp::TYPE_DEST_UNREACHABLE,
                            code,
                            &q[..20 + quote.len()],
                        );
                        return;
                    }
                };
                let idle = if ip.dst == self.cfg.gateway && h.dst_port == 53 {
                    flows::udp::IDLE_DNS
                } else {
                    flows::udp::IDLE
                };
                let flow = Flow::Udp(UdpFlow::new(guest, remote, fd, idle, now));
                match self.add_flow(flow, Interest::READABLE) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        if let Some(Flow::Udp(f)) = self.flows.get_mut(id) {
            match f.own_fd() {
                // Outbound flows: gathered and sent with the rest of the batch.
                Some(fd) => {
                    let fd = fd.as_raw_fd();
                    f.last_used = now;
                    if self.udp_batch.full(payload.len()) {
                        self.udp_batch.flush();
                    }
                    self.udp_batch.push(id, fd, payload);
                }
                None => f.from_guest(payload, now),
            }
        }
        self.after(id, Verdict::Keep);
    }

    fn on_dhcp(&mut self, payload: &[u8], src_mac: [u8; 6]) {
        let Some(reply) = self.dhcp.handle(src_mac, payload) else {
            return;
        };
        let n = reply.payload.len();
        if UDP_PAYLOAD_OFF + n > self.switch.buf().len() {
            return;
        }
        self.switch.buf()[UDP_PAYLOAD_OFF..UDP_PAYLOAD_OFF + n].copy_from_slice(&reply.payload);
        self.switch.send_udp_to_mac(
            SocketAddrV4::new(self.cfg.gateway, 67),
            SocketAddrV4::new(reply.dst_ip, 68),
            n,
            Some(reply.dst_mac),
        );
    }

    fn on_tcp(&mut self, ip: &Ipv4Header, segment: &[u8], now: Instant) {
        let Some((h, payload)) = TcpHeader::parse(segment) else {
            return;
        };
        let guest = SocketAddrV4::new(ip.src, h.src_port);
        let remote = SocketAddrV4::new(ip.dst, h.dst_port);
        let key = FlowKey::Tcp { guest, remote };
        if let Some(id) = self.flows.lookup(&key) {
            let verdict = match self.flows.get_mut(id) {
                Some(Flow::Tcp(f)) => {
                    if h.has(SYN) && !h.has(ACK) && f.is_stale_for_syn(&h) {
                        // The guest reuses the port for a new connection: the old one is over.
                        Verdict::Close
                    } else {
                        f.on_segment(&mut self.switch, &h, payload, now)
                    }
                }
                _ => Verdict::Keep,
            };
            let new_syn = verdict == Verdict::Close && h.has(SYN) && !h.has(ACK);
            self.after(id, verdict);
            if !new_syn {
                return;
            }
        }
        if !h.has(SYN) || h.has(ACK) {
            flows::tcp::reset_stray(&mut self.switch, guest, remote, &h, payload.len());
            return;
        }
        if ip.dst.is_broadcast() || ip.dst.is_multicast() {
            return;
        }
        let hooked = self.tcp_hooks.iter_mut().find_map(|hook| hook(remote, guest));
        let dialled = match hooked {
            Some(r) => r.map(|fd| dial::TcpDial { fd, connected: true, is_tcp: false }),
            None => self.dialer.tcp(remote, guest),
        };
        let dial = match dialled {
            Ok(d) => d,
            Err(e) => {
                flows::tcp::refuse(
                    &mut self.switch,
                    guest,
                    remote,
                    h.seq,
                    e.raw_os_error().unwrap_or(libc::ECONNREFUSED),
                );
                return;
            }
        };
        if self.connecting_count >= MAX_CONNECTING {
            self.abandon_oldest_connect();
        }
        let isn = self.isn(&key, now);
        let (flow, verdict) = TcpFlow::new(&mut self.switch, guest, remote, &h, dial, isn, now);
        let mut flow = flow;
        let connecting = flow.is_connecting();
        flow.counted_connecting = connecting;
        let Some(id) = self.add_flow(Flow::Tcp(flow), Interest::READABLE | Interest::WRITABLE) else {
            return;
        };
        if connecting {
            self.connecting.push_back(id);
            self.connecting_count += 1;
        }
        self.after(id, verdict);
    }

    /// RFC 6528-style initial sequence numbers: a keyed hash of the flow plus a clock.
    fn isn(&self, key: &FlowKey, now: Instant) -> u32 {
        let _ = now;
        let clock = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_micros()
            as u64
            / 4;
        (self.isn_hasher.hash_one(key) as u32).wrapping_add(clock as u32)
    }

    fn add_flow(&mut self, flow: Flow, interest: Interest) -> Option<FlowId> {
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
    fn on_socket(&mut self, id: FlowId, readable: bool, writable: bool, error: bool, now: Instant) {
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
    fn after(&mut self, id: FlowId, verdict: Verdict) {
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

    fn run_timers(&mut self, now: Instant) {
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
    fn flush_acks(&mut self, now: Instant) {
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
    fn abandon_oldest_connect(&mut self) {
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

    /// Closes the least recently used flow of a kind (UDP and ICMP caps).
    fn evict_oldest(&mut self, kind: impl Fn(&Flow) -> bool) {
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

    /// Ends every flow (the command exited): guests' connections are reset, sockets closed.
    fn shutdown(&mut self) {
        self.flush_links();
        let ids: Vec<FlowId> = self.flows.ids().map(|(id, _)| id).collect();
        for id in ids {
            self.flows.remove(id);
        }
        if let Some(p) = self.switch.pcap.as_mut() {
            p.flush();
        }
    }
}

#[cfg(test)]
mod tests;
