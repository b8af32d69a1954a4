//! Published ports in the engine: host listeners whose connections and datagrams become
//! guest flows.
//!
//! A TCP connection accepted on a published port becomes a TCP flow that starts with our
//! SYN to the guest (see the translator's theory of operation). A datagram on a published
//! UDP port becomes, per client address, an inbound UDP flow whose replies leave through
//! the listener. The guest sees the client's real address when it has an IPv4 one, or an
//! IPv6 one and the guest has IPv6 (then over IPv6, and over IPv4 if the guest resets
//! that); other clients appear as the host address, as if they came from
//! host.docker.internal. A TCP client on the host's loopback, when the guest is a namespace
//! of this host, is spliced socket to socket to the guest's own loopback of the client's
//! family instead (see `splice_to_guest`).
//! A client that a `--deny` rule without ports covers is refused (crate::policy: reset, or
//! its datagram dropped), before anything is spliced or made.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::unix::SourceFd;

use super::control::Published;
use super::flows::udp::{Inbound, UdpSocket};
use super::flows::{Flow, FlowId, FlowKey, ReadRound, SpliceFlow, TcpFlow, UdpFlow, Verdict};
use super::guest_sockets::Family;
use super::metrics::Limit;
use super::{Engine, sock};
use crate::policy::{DenyReason, Via};
use crate::ports::BoundListener;
use crate::ports::Proto;

/// The IPv4 (guest, remote) pair a connection tried over IPv6 goes to if refused there.
type Fallback = Option<(SocketAddr, SocketAddr)>;

/// Listener tokens have this bit set; the rest is the listener's index.
pub const LISTENER_BIT: usize = 1 << 62;
/// Connections a published port's listener accepts per round of the loop at most.
const ACCEPT_BATCH: u64 = 256;
/// How long after a failed accept (out of descriptors) the listeners are tried again.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

pub struct Listener {
    /// Shared with the inbound UDP flows that answer through it.
    pub fd: Rc<OwnedFd>,
    pub local: SocketAddr,
    pub proto: Proto,
    pub guest_ip: IpAddr,
    pub guest_port: u16,
    /// Unique over the engine's life, so inbound UDP flows know their listener.
    pub id: u32,
    /// TCP connections accepted on it (for `/metrics`).
    pub accepted: u64,
}

impl Listener {
    pub fn published(&self) -> Published {
        Published { host: self.local, proto: self.proto, guest_ip: self.guest_ip, guest_port: self.guest_port }
    }
}

/// The address a client appears from in the guest network.
pub fn guest_view_of_client(client: SocketAddr, host_addr: Ipv4Addr) -> SocketAddrV4 {
    let ip = match client.ip() {
        IpAddr::V4(v4) if !v4.is_loopback() && !v4.is_unspecified() => v4,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) if !v4.is_loopback() && !v4.is_unspecified() => v4,
            _ => host_addr,
        },
        _ => host_addr,
    };
    SocketAddrV4::new(ip, client.port())
}

impl Engine {
    /// Serves already-bound listeners of published ports, forwarding to `guest_ip` (an
    /// IPv6 one only while the network has IPv6: else nothing is published).
    pub fn publish(&mut self, listeners: Vec<BoundListener>, guest_ip: IpAddr) -> Vec<Published> {
        let mut out = Vec::new();
        if guest_ip.is_ipv6() && self.cfg.v6.is_none() {
            tracing::warn!("cannot publish to {guest_ip}: the guest network has no IPv6");
            return out;
        }
        for l in listeners {
            let index = match self.listeners.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    self.listeners.push(None);
                    self.listeners.len() - 1
                }
            };
            self.next_listener_id += 1;
            let listener = Listener {
                fd: Rc::new(l.fd),
                local: l.local,
                proto: l.proto,
                guest_ip,
                guest_port: l.guest_port,
                id: self.next_listener_id,
                accepted: 0,
            };
            // A client's datagrams of one size that arrive together (a QUIC client's burst,
            // sent segmented) are read at once, as a flow's are (flows/udp.rs).
            if listener.proto == Proto::Udp
                && let Err(e) = sock::set_int(listener.fd.as_fd(), libc::SOL_UDP, sock::UDP_GRO, 1)
            {
                tracing::debug!("{}: no UDP_GRO: {e}", listener.local);
            }
            let raw = listener.fd.as_raw_fd();
            if let Err(e) =
                self.poll.registry().register(&mut SourceFd(&raw), mio::Token(LISTENER_BIT | index), Interest::READABLE)
            {
                tracing::warn!("cannot watch the listener of {}: {e}", listener.local);
                continue;
            }
            out.push(listener.published());
            self.listeners[index] = Some(listener);
            // Connections may already wait in the backlog: edge-triggered polling will
            // not announce them again.
            self.on_listener(index, Instant::now());
        }
        out
    }

    /// Stops serving the listener at `host`; inbound UDP flows through it end too.
    pub fn unpublish(&mut self, host: SocketAddr, proto: Proto) -> bool {
        let Some(index) =
            self.listeners.iter().position(|l| matches!(l, Some(l) if l.local == host && l.proto == proto))
        else {
            return false;
        };
        // Gathered answers name the port's socket by descriptor: send them before it closes.
        self.udp_batch.flush();
        let Some(l) = self.listeners[index].take() else { return false };
        let raw = l.fd.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
        let orphans: Vec<_> = self
            .flows
            .ids()
            .filter(|(_, f)| matches!(f, Flow::Udp(UdpFlow { socket: UdpSocket::Published(i), .. }) if i.listener_id == l.id))
            .map(|(id, _)| id)
            .collect();
        for id in orphans {
            self.flows.remove(id);
        }
        true
    }

    pub fn published(&self) -> Vec<Published> {
        self.listeners.iter().flatten().map(Listener::published).collect()
    }

    /// A listener is readable: accept every waiting connection, or take every datagram.
    pub(super) fn on_listener(&mut self, index: usize, now: Instant) {
        let Some(Some(l)) = self.listeners.get(index) else { return };
        let (fd, proto, guest, id) = (l.fd.clone(), l.proto, SocketAddr::new(l.guest_ip, l.guest_port), l.id);
        match proto {
            Proto::Tcp => {
                let n = self.accept_all(fd.as_fd(), guest, now);
                if let Some(Some(l)) = self.listeners.get_mut(index) {
                    l.accepted += n;
                }
                if n == ACCEPT_BATCH {
                    // More may wait: the rest of a burst is taken in the next rounds.
                    self.watch_again(fd.as_raw_fd(), mio::Token(LISTENER_BIT | index));
                }
            }
            Proto::Udp => {
                if self.receive_all(&fd, guest, id, now) == ReadRound::Capped {
                    self.watch_again(fd.as_raw_fd(), mio::Token(LISTENER_BIT | index));
                }
            }
        }
    }

    /// An accept (of a published port, or of a guest link's transport) failed: EMFILE and
    /// friends. The connections stay in the backlog and are tried again in a while
    /// (`retry_accepts`), not at once: that would spin while the shortage lasts. Logged once
    /// per episode, not at every retry.
    pub(super) fn accept_failed(&mut self, what: &str, e: &io::Error, now: Instant) {
        if is_out_of_files(e) {
            self.limit_reached(Limit::OpenFiles, now, || {
                format!(
                    "{what}: {e}: connections wait in the backlog, tried again every {ACCEPT_RETRY:?} \
                     (raise `ulimit -n`)"
                )
            });
        } else if let Some(times) = self.accept_errors.due(now) {
            tracing::warn!(times, "{what}: {e}; trying again every {ACCEPT_RETRY:?}");
        }
        if self.accept_retry.is_none() {
            self.accept_retry = Some(now + ACCEPT_RETRY);
        }
    }

    /// Whether a published port may accept one more connection now that descriptors are
    /// crowded: only if one below `published_fd_ceiling` is free. Else the connections wait
    /// in the backlog (tried again at [`ACCEPT_RETRY`]), so that the last descriptors stay
    /// the API's and the services', whatever host clients do.
    fn published_may_accept(&mut self, listener: BorrowedFd<'_>, now: Instant) -> bool {
        let free = sock::lowest_free_fd(listener);
        if let Ok(fd) = free
            && (fd as libc::rlim_t) < self.published_fd_ceiling
        {
            self.fds_crowded = false;
            return true;
        }
        let ceiling = self.published_fd_ceiling;
        self.limit_reached(Limit::OpenFiles, now, || {
            format!(
                "{ceiling} descriptors open, the rest kept for the API and the services: a published port's \
                 connections wait in its backlog, tried again every {ACCEPT_RETRY:?} (raise `ulimit -n`)"
            )
        });
        if self.accept_retry.is_none() {
            self.accept_retry = Some(now + ACCEPT_RETRY);
        }
        false
    }

    /// After an accept failed, at [`ACCEPT_RETRY`]: every TCP listener and every guest
    /// link's acceptor is watched again, so that one with connections waiting is reported
    /// at the next poll.
    pub(super) fn retry_accepts(&mut self, now: Instant) {
        if self.accept_retry.is_none_or(|at| at > now) {
            return;
        }
        self.accept_retry = None;
        for (index, l) in self.listeners.iter().enumerate() {
            if let Some(l) = l
                && l.proto == Proto::Tcp
            {
                self.watch_again(l.fd.as_raw_fd(), mio::Token(LISTENER_BIT | index));
            }
        }
        for (index, acceptor) in self.acceptors.iter().enumerate() {
            self.watch_again(acceptor.fd(), mio::Token(super::ACCEPTOR_BIT | index));
        }
    }

    /// Accepts the waiting connections, at most [`ACCEPT_BATCH`] (so that a burst does not
    /// hold the loop); returns how many it took.
    fn accept_all(&mut self, listener: BorrowedFd<'_>, guest: SocketAddr, now: Instant) -> u64 {
        let mut accepted = 0;
        for _ in 0..ACCEPT_BATCH {
            if self.fds_crowded && !self.published_may_accept(listener, now) {
                return accepted;
            }
            let (fd, client) = match sock::accept(listener) {
                Ok(Some(x)) => x,
                Ok(None) => return accepted,
                // A client that reset before its turn: on to the next.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR)) => continue,
                Err(e) => {
                    self.accept_failed("accept on a published port", &e, now);
                    return accepted;
                }
            };
            accepted += 1;
            self.fds_crowded = fd.as_raw_fd() as libc::rlim_t + 1 >= self.published_fd_ceiling;
            if self.cfg.policy.denies_peer(client.ip()) {
                self.cfg.policy.denied(Via::Publish, DenyReason::DenyRule, client, None);
                sock::set_linger_zero(fd.as_fd());
                continue;
            }
            let fd = if is_loopback(client) && self.guest_sockets.is_some() {
                match self.splice_to_guest(fd, client, guest, now) {
                    Some(fd) => fd,
                    None => continue,
                }
            } else {
                fd
            };
            let (guest, remote, fallback) = self.inbound_tcp_addrs(client, guest);
            let key = FlowKey::Tcp { guest, remote };
            if self.flows.lookup(&key).is_some() || self.held_elsewhere(&key) {
                tracing::debug!("{client} -> {guest}: that address pair is busy; reset");
                sock::set_linger_zero(fd.as_fd());
                continue;
            }
            let _ = sock::set_int(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
            let isn = self.isn(&key, now);
            self.claim(&key);
            let mut flow = TcpFlow::new_inbound(&mut self.switch, guest, remote, fd, true, isn, now);
            flow.fallback = fallback.map(Box::new);
            match self.add_flow(Flow::Tcp(flow), Interest::READABLE | Interest::WRITABLE) {
                Some(id) => self.after(id, Verdict::Keep),
                None => self.unclaim(&key),
            }
        }
        accepted
    }

    /// A connected host stream (any kind: gvproxy's `/tunnel` hands over its HTTP client's
    /// Unix or TCP connection) carried to TCP `guest`, from the host address and a port of
    /// its own, as a published port's connection is.
    pub(super) fn tunnel(&mut self, fd: OwnedFd, guest: SocketAddr, now: Instant) -> Result<(), String> {
        let host: IpAddr = match guest {
            SocketAddr::V4(_) => self.cfg.host.into(),
            SocketAddr::V6(_) => self.cfg.v6.map(|n| n.host.into()).ok_or("no IPv6 on this network")?,
        };
        let is_guest = match guest.ip() {
            IpAddr::V4(ip) => self.cfg.subnet.contains(ip) && !self.cfg.is_own_address(ip),
            IpAddr::V6(ip) => self.guest_addr6(ip),
        };
        if !is_guest {
            return Err(format!("{} is not a guest address of this network", guest.ip()));
        }
        if !self.may_open_tcp(guest.ip(), now) {
            return Err("too many TCP flows".into());
        }
        // A port of the host address that no flow to this guest port uses.
        let free = (0..1024u16).map(|i| 49152 + (self.next_tunnel_port.wrapping_add(i) % 16384)).find(|&p| {
            let key = FlowKey::Tcp { guest, remote: SocketAddr::new(host, p) };
            self.flows.lookup(&key).is_none() && !self.held_elsewhere(&key)
        });
        let Some(port) = free else { return Err("no port free for it".into()) };
        self.next_tunnel_port = (port - 49152).wrapping_add(1);
        let remote = SocketAddr::new(host, port);
        let key = FlowKey::Tcp { guest, remote };
        let is_tcp = sock::is_tcp(fd.as_fd());
        if is_tcp {
            let _ = sock::set_int(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
        }
        let isn = self.isn(&key, now);
        self.claim(&key);
        let flow = TcpFlow::new_inbound(&mut self.switch, guest, remote, fd, is_tcp, isn, now);
        let Some(id) = self.add_flow(Flow::Tcp(flow), Interest::READABLE | Interest::WRITABLE) else {
            self.unclaim(&key);
            return Err("cannot watch it".into());
        };
        self.after(id, Verdict::Keep);
        Ok(())
    }

    /// The addresses of a published TCP connection from `client` to `guest` in the guest
    /// network (guest, remote), and the IPv4 ones to try if the guest refuses those.
    ///
    /// - A client with an IPv6 address of its own to a guest with an IPv6 address: over
    ///   IPv6 from the client's address, with the IPv4 pair as fallback when the listener
    ///   forwards to the guest's IPv4 address (the guest may listen on IPv4 only).
    /// - Any other client of an IPv4 guest address: over IPv4, from the client's address
    ///   or the host address ([`guest_view_of_client`]).
    /// - Any other client of an IPv6 guest address: from the network's host address (::254).
    fn inbound_tcp_addrs(&self, client: SocketAddr, guest: SocketAddr) -> (SocketAddr, SocketAddr, Fallback) {
        match guest {
            SocketAddr::V6(g6) => {
                let guest = SocketAddr::new(self.resolve_first_guest6(*g6.ip()).into(), g6.port());
                (guest, self.ipv6_view_of_client(client), None)
            }
            SocketAddr::V4(g4) => {
                let v4 = (guest, SocketAddr::V4(guest_view_of_client(client, self.cfg.host)));
                match (own_ipv6(client), self.guest_ipv6(*g4.ip())) {
                    (Some(c), Some(g6)) => {
                        (SocketAddr::new(g6.into(), g4.port()), SocketAddr::new(c.into(), client.port()), Some(v4))
                    }
                    _ => (v4.0, v4.1, None),
                }
            }
        }
    }

    /// The address `client` appears from to an IPv6 guest address: its own IPv6 address, or
    /// else the network's host address (::254).
    fn ipv6_view_of_client(&self, client: SocketAddr) -> SocketAddr {
        let host6 = self.cfg.v6.as_ref().map_or(Ipv6Addr::UNSPECIFIED, |v6| v6.host);
        SocketAddr::new(own_ipv6(client).unwrap_or(host6).into(), client.port())
    }

    /// `ip`, or for the network's first guest address (::2) when no guest has it (`serve
    /// --ipv6-only`, whose VMs take their addresses by SLAAC) the first VM's address.
    fn resolve_first_guest6(&self, ip: Ipv6Addr) -> Ipv6Addr {
        match &self.cfg.v6 {
            Some(net) if ip == net.guest && self.switch.owner_of(ip.into()).is_none() => {
                self.switch.first_guest_ipv6(net).unwrap_or(ip)
            }
            _ => ip,
        }
    }

    /// The IPv6 address of the guest at IPv4 address `v4`, when the network has IPv6: the
    /// one usernet gave it (`run`), else one it was seen to use in the prefix (a VM's
    /// SLAAC address: see [`super::switch::Switch::ipv6_of`]).
    fn guest_ipv6(&self, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        let net = self.cfg.v6.as_ref()?;
        if let Some((_, v6)) = self.guests6.iter().find(|(g, _)| *g == v4) {
            return Some(*v6);
        }
        self.switch.ipv6_of(v4, net)
    }

    /// Carries a loopback client's connection socket to socket inside the guest's
    /// namespace: to its [::1] for a client over IPv6 when the guest has IPv6, and to its
    /// 127.0.0.1 when the guest refuses that (it listens on IPv4 only) or for any other
    /// client. When no socket can be had there, gives the connection back for the guest
    /// link (it then comes from the host address, as any client's would).
    fn splice_to_guest(
        &mut self,
        host: OwnedFd,
        client: SocketAddr,
        guest: SocketAddr,
        now: Instant,
    ) -> Option<OwnedFd> {
        if self.guest_sockets.is_none() {
            return Some(host);
        }
        // Past the ceiling of guest flows, descriptors are the reserve's: a splice would take
        // five more of them, the guest link none.
        if host.as_raw_fd() as libc::rlim_t >= self.fd_ceiling {
            let ceiling = self.fd_ceiling;
            self.limit_reached(Limit::Descriptors, now, || {
                format!(
                    "{ceiling} descriptors open, the rest kept in reserve (--fd-reserve): a published port's \
                     loopback clients go through the guest link, not spliced"
                )
            });
            return Some(host);
        }
        // The pipes first: short of descriptors, the connection goes through the guest link
        // (the accepted socket alone, where a splice needs five more), and the guest never
        // sees a socket of ours come and go.
        let pipes = match self.pipe_pool.take_two() {
            Ok(pipes) => pipes,
            Err(e) => {
                self.spliced_through_link(&e, now);
                return Some(host);
            }
        };
        let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, guest.port()));
        let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, guest.port()));
        let over_v6 = match guest.ip() {
            IpAddr::V6(_) => true,
            IpAddr::V4(g) => client.ip().to_canonical().is_ipv6() && self.guests6.iter().any(|(g4, _)| *g4 == g),
        };
        let Some(sockets) = &self.guest_sockets else { return Some(host) };
        let mut fallback = None;
        let mut dialed = Err(io::ErrorKind::Unsupported.into());
        if over_v6 {
            dialed = sockets.take(Family::V6).and_then(|s| dial_from_loopback(s, v6));
            if let Ok((s, false)) = &dialed
                && guest.is_ipv4()
            {
                // Refused at once (loopback answers within the connect), or failed otherwise:
                // IPv4 now. The error is read once: after it, the socket would look like a
                // connection that ended (a splice from it returns 0).
                match sock::take_error(s.as_fd()) {
                    0 => fallback = Some(v4),
                    libc::ECONNREFUSED => dialed = Err(refused()),
                    err => dialed = Err(io::Error::from_raw_os_error(err)),
                }
            }
        }
        if dialed.is_err() && guest.is_ipv4() {
            dialed = sockets.take(Family::V4).and_then(|s| dial_from_loopback(s, v4));
        }
        let (sock, connected) = match dialed {
            Ok(x) => x,
            Err(e) => {
                if is_out_of_files(&e) {
                    self.spliced_through_link(&e, now);
                } else {
                    tracing::debug!(
                        "published port {guest}: no socket inside the namespace ({e}); through the guest link"
                    );
                }
                return Some(host);
            }
        };
        self.next_splice_id += 1;
        let guest_fd = sock.as_raw_fd();
        let mut flow = SpliceFlow::new(host, sock, connected, self.next_splice_id, pipes, now);
        flow.fallback = fallback;
        let id = self.add_flow(Flow::Splice(flow), Interest::READABLE | Interest::WRITABLE)?;
        if let Err(e) = self.watch_splice_guest(id, guest_fd) {
            tracing::warn!("cannot watch a spliced socket: {e}");
            self.flows.remove(id);
            return None;
        }
        // Data may already wait on the accepted socket.
        self.on_socket(id, true, true, false, now);
        None
    }

    /// A loopback client's connection that could not be spliced for want of descriptors:
    /// counted and logged (once per episode) as the open-file limit reached.
    fn spliced_through_link(&mut self, e: &io::Error, now: Instant) {
        self.limit_reached(Limit::OpenFiles, now, || {
            format!("a published port's loopback client: {e}: carried through the guest link, not spliced (raise `ulimit -n`)")
        });
    }

    /// Registers the guest-side socket of splice flow `id` under the flow's token.
    fn watch_splice_guest(&mut self, id: FlowId, fd: RawFd) -> io::Result<()> {
        self.poll.registry().register(
            &mut SourceFd(&fd),
            id.token(super::FLOW_BASE),
            Interest::READABLE | Interest::WRITABLE,
        )
    }

    /// The guest refused splice flow `id`'s connect to its [::1]: connects to its
    /// 127.0.0.1 instead, or resets the client when that cannot start.
    pub(super) fn splice_fallback(&mut self, id: FlowId, now: Instant) {
        let Some(Flow::Splice(f)) = self.flows.get_mut(id) else { return };
        let Some(SocketAddr::V4(to)) = f.fallback else { return };
        let dialed = match &self.guest_sockets {
            Some(sockets) => sockets.take(Family::V4).and_then(|s| dial_from_loopback(s, to.into())),
            None => Err(io::ErrorKind::Unsupported.into()),
        };
        let Ok((sock, connected)) = dialed.inspect_err(|e| tracing::debug!("published port {to}: {e}")) else {
            sock::set_linger_zero(f.host.as_fd());
            self.flows.remove(id);
            return;
        };
        let fd = sock.as_raw_fd();
        // The refused socket closes here, which takes it out of the poll set.
        f.redial(sock, connected);
        if let Err(e) = self.watch_splice_guest(id, fd) {
            tracing::warn!("cannot watch a spliced socket: {e}");
            self.flows.remove(id);
            return;
        }
        self.on_socket(id, true, true, false, now);
    }

    /// Datagrams arrived on a published UDP port: each goes to the guest, from its client's
    /// flow. Read two at a time; fewer says the queue is empty ([`sock::recv_two`]).
    fn receive_all(
        &mut self,
        listener: &Rc<OwnedFd>,
        listener_guest: SocketAddr,
        listener_id: u32,
        now: Instant,
    ) -> ReadRound {
        let max = self.switch.max_udp_payload(false);
        // At most 1024 datagrams a wakeup (those of a coalesced read counted one by one), so
        // that one flood does not hold the loop.
        let mut left = 1024usize;
        while left > 0 {
            let got = match self.switch.recv_two_udp(listener.as_fd(), max) {
                Ok(got) => got,
                Err(e) => {
                    tracing::debug!("published UDP port: {e}");
                    left -= 1;
                    continue;
                }
            };
            for i in 0..got.count {
                if i == 1 {
                    self.switch.swap_spare();
                }
                left = left.saturating_sub(got.datagrams(i));
                if let Some(client) = got.from[i] {
                    let read = (got.len[i], got.segment[i]);
                    self.receive_one(listener, listener_guest, listener_id, client, read, now);
                }
            }
            if got.count < 2 {
                return ReadRound::Drained;
            }
        }
        ReadRound::Capped
    }

    /// One read from `client` in the switch's buffer at UDP_PAYLOAD_OFF: `read.0` bytes (the
    /// real length), one datagram, or datagrams of `read.1` bytes the kernel coalesced.
    fn receive_one(
        &mut self,
        listener: &Rc<OwnedFd>,
        listener_guest: SocketAddr,
        listener_id: u32,
        client: SocketAddr,
        read: (usize, usize),
        now: Instant,
    ) {
        let (n, segment) = read;
        let max = self.switch.max_udp_payload(false);
        if n > max {
            tracing::debug!("{client}: {n}-byte datagram is longer than an IPv4 packet to the guest carries; dropped");
            return;
        }
        let (guest, remote) = match listener_guest {
            // Not over IPv6 to an IPv4 guest address: a datagram has no reset to fall
            // back on.
            SocketAddr::V4(_) => (listener_guest, SocketAddr::V4(guest_view_of_client(client, self.cfg.host))),
            SocketAddr::V6(g6) => (
                SocketAddr::new(self.resolve_first_guest6(*g6.ip()).into(), g6.port()),
                self.ipv6_view_of_client(client),
            ),
        };
        let key = FlowKey::Udp { guest, remote };
        let id = match self.flows.lookup(&key) {
            Some(id) => id,
            // The guest's own flow to that client, on another engine (`shard`): the
            // datagram goes to the guest, whose answers go out through that flow.
            None if self.held_elsewhere(&key) => {
                self.switch.send_udp_segments(remote, guest, n, segment);
                return;
            }
            None => {
                if self.cfg.policy.denies_peer(client.ip()) {
                    self.cfg.policy.denied(Via::Publish, DenyReason::DenyRule, client, None);
                    return;
                }
                self.bound_udp(now);
                let inbound = Inbound { listener: listener.clone(), listener_id, client };
                let flow = Flow::Udp(UdpFlow::new_inbound(guest, remote, inbound, now));
                match self.add_flow(flow, Interest::READABLE) {
                    Some(id) => id,
                    None => return,
                }
            }
        };
        match self.flows.get_mut(id) {
            Some(Flow::Udp(f)) => {
                f.last_used = now;
                f.traffic.to_guest += n as u64;
                if let Some(i) = f.inbound_mut() {
                    // The same mapped address may stand for another client port pair
                    // only if the client moved; keep answering the latest.
                    i.client = client;
                }
            }
            _ => return,
        }
        self.switch.send_udp_segments(remote, guest, n, segment);
        self.after(id, Verdict::Keep);
    }
}

fn is_loopback(a: SocketAddr) -> bool {
    match a.ip() {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// `client`'s IPv6 address when it has one of its own: not loopback, not IPv4-mapped.
fn own_ipv6(client: SocketAddr) -> Option<Ipv6Addr> {
    match client.ip() {
        IpAddr::V6(c) if !is_loopback(client) && c.to_ipv4_mapped().is_none() => Some(c),
        _ => None,
    }
}

fn refused() -> io::Error {
    io::Error::from_raw_os_error(libc::ECONNREFUSED)
}

/// Whether `e` says that this process (EMFILE) or the system (ENFILE) has no descriptor left.
fn is_out_of_files(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Starts connecting `fd`, a socket of the guest's namespace, to `guest` (that namespace's
/// loopback address of its family). No bind(2): the route of a loopback address gives the
/// same address as source (unless 127.0.0.1 was made a secondary address of the guest's
/// `lo`: then its primary one), and connect(2) picks the port, which may be one whose last
/// connection is in TIME_WAIT (net.ipv4.tcp_tw_reuse), where bind may not: when the client
/// closes first, our socket keeps its port in TIME_WAIT for a minute, and ports taken by
/// bind filled the guest's range (bind searched it, 6 ms per connection with 15,000 held,
/// the engine stalled meanwhile, and with all held the connection went through the guest
/// link instead). Two system calls a connection fewer than the bind to port 0 with
/// IP_BIND_ADDRESS_NO_PORT that did the same.
fn dial_from_loopback(fd: OwnedFd, guest: SocketAddr) -> io::Result<(OwnedFd, bool)> {
    let _ = sock::set_int(fd.as_fd(), libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    let connected = sock::connect(fd.as_fd(), guest)?;
    Ok((fd, connected))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_as_the_guest_sees_them() {
        let host = Ipv4Addr::new(192, 168, 65, 254);
        let v = |s: &str| guest_view_of_client(s.parse().unwrap(), host);
        assert_eq!(v("127.0.0.1:5000"), "192.168.65.254:5000".parse().unwrap());
        assert_eq!(v("[::1]:5000"), "192.168.65.254:5000".parse().unwrap());
        assert_eq!(v("198.51.100.7:5000"), "198.51.100.7:5000".parse().unwrap());
        assert_eq!(v("[::ffff:198.51.100.7]:5000"), "198.51.100.7:5000".parse().unwrap());
        assert_eq!(v("[::ffff:127.0.0.1]:5000"), "192.168.65.254:5000".parse().unwrap());
        assert_eq!(v("[2001:db8::1]:5000"), "192.168.65.254:5000".parse().unwrap());
    }
}
