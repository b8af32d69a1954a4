//! pasta's forwarding beyond fixed `-t`/`-u` ports: `-T`/`-U` (the namespace's loopback to
//! the host's, fixed ports or `auto`) and `-t auto`/`-u auto` (every port bound in the
//! namespace, published on the host as it appears), for TCP and UDP.
//!
//! Theory of operation. Sockets belong to the network namespace of the thread that makes
//! them, and a thread that entered the guest's namespace cannot always come back (rootless,
//! the host's namespace is not ours to enter), so there are two threads:
//! - the namespace thread enters the namespace once and only makes things there: sockets on
//!   its loopback (127.0.0.1 and ::1) for `-T`/`-U` ports, and the list of ports bound there
//!   (`/proc/thread-self/net/{tcp,udp}{,6}` are the thread's own namespace's);
//! - the host thread does the rest: once a second it reconciles what is forwarded with what
//!   is asked (`-T/-U auto`: the ports bound on the host, from the host's `/proc/net`;
//!   `-t/-u auto`: the namespace's, published through the engine's control handle as
//!   `-t PORT` would be, and unpublished when they go), and between rescans it serves the
//!   namespace-side sockets: each TCP connection accepted there is carried to the host's
//!   127.0.0.1 (or ::1) at the target port by two copying threads, one per direction; each
//!   UDP client there gets a socket of its own connected to the host's port, whose replies
//!   go back to it (forgotten after [`UDP_IDLE`] without traffic).
//!
//! `auto` skips the host's ephemeral port range (`ip_local_port_range`: clients' ports, not
//! services) and a port that the other direction forwards (the `-T` sockets are bound in the
//! namespace; the published ports are bound on the host). This is the slow path of pasta's
//! forwarding (a namespace's client to a host service); published ports run on the
//! engine's path.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use usernet_core::engine::control::{Command, ControlHandle};
use usernet_core::ports::Proto;
use usernet_host::publish::spec::PortSpec;

/// What is forwarded this way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// `-T`/`-U PORTS`: (protocol, namespace loopback port, host loopback port).
    pub to_host: Vec<(Proto, u16, u16)>,
    /// `-T auto`, `-U auto`: every port bound on the host.
    pub to_host_auto: Vec<Proto>,
    /// `-t auto`, `-u auto`: every port bound in the namespace, published on the host.
    pub to_ns_auto: Vec<Proto>,
    /// Where `-t auto`/`-u auto` bind on the host: both families' unspecified addresses,
    /// or one family's with `-4` or `-6`.
    pub to_ns_host_ip: Option<IpAddr>,
}

impl Forwarding {
    pub fn is_empty(&self) -> bool {
        self.to_host.is_empty() && self.to_host_auto.is_empty() && self.to_ns_auto.is_empty()
    }
}

/// How often `auto` looks again (pasta's own interval).
const RESCAN: Duration = Duration::from_secs(1);
/// A UDP client of a `-U` port is forgotten after this long without a datagram either way.
pub const UDP_IDLE: Duration = Duration::from_secs(60);
/// Largest datagram relayed.
const DATAGRAM: usize = 65536;

/// A socket on the namespace's loopback.
enum NsSocket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// Requests to the namespace thread.
enum NsRequest {
    /// Sockets on the namespace's loopback at this port (IPv4, and IPv6 where it has it).
    Bind(Proto, u16, mpsc::Sender<io::Result<Vec<NsSocket>>>),
    /// The ports bound in the namespace.
    Bound(Proto, mpsc::Sender<BTreeSet<u16>>),
}

/// Starts the two threads; `netns` is the guest's network namespace, `guest` its address
/// (where `-t/-u auto` ports go). Fixed `-T`/`-U` ports are bound before it returns.
pub fn start(spec: Forwarding, netns: OwnedFd, control: ControlHandle, guest: IpAddr) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<NsRequest>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("usernet-pasta-ns".into())
        .spawn(move || ns_thread(netns, rx, ready_tx))
        .context("namespace thread")?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err("the namespace thread ended".into()))
        .map_err(|e| anyhow::anyhow!("cannot enter the namespace to forward its ports: {e}"))?;
    let mut host = HostSide {
        spec,
        ns: tx,
        control,
        guest,
        ephemeral: ephemeral_range(),
        sockets: BTreeMap::new(),
        udp_peers: HashMap::new(),
        published: BTreeSet::new(),
        buf: vec![0u8; DATAGRAM],
    };
    for (proto, from, to) in host.spec.to_host.clone() {
        let flag = if proto == Proto::Tcp { "-T" } else { "-U" };
        let s =
            host.ns_bind(proto, from).with_context(|| format!("{flag} {from}:{to}: cannot bind in the namespace"))?;
        host.sockets.insert((proto, from), (to, s));
    }
    std::thread::Builder::new()
        .name("usernet-pasta-fwd".into())
        .spawn(move || host.run())
        .context("forwarding thread")?;
    Ok(())
}

fn ns_thread(netns: OwnedFd, rx: mpsc::Receiver<NsRequest>, ready: mpsc::Sender<Result<(), String>>) {
    if let Err(e) = nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET) {
        let _ = ready.send(Err(e.desc().to_string()));
        return;
    }
    drop(netns);
    let _ = ready.send(Ok(()));
    for req in rx {
        match req {
            NsRequest::Bind(proto, port, reply) => {
                let _ = reply.send(bind_loopback(proto, port));
            }
            NsRequest::Bound(proto, reply) => {
                let _ = reply.send(bound_ports("/proc/thread-self/net", proto));
            }
        }
    }
}

/// Sockets on 127.0.0.1:port and, where the namespace has IPv6, [::1]:port.
fn bind_loopback(proto: Proto, port: u16) -> io::Result<Vec<NsSocket>> {
    let bind = |ip: IpAddr| -> io::Result<NsSocket> {
        let s = match proto {
            Proto::Tcp => NsSocket::Tcp(TcpListener::bind((ip, port))?),
            Proto::Udp => NsSocket::Udp(UdpSocket::bind((ip, port))?),
        };
        match &s {
            NsSocket::Tcp(l) => l.set_nonblocking(true)?,
            NsSocket::Udp(u) => u.set_nonblocking(true)?,
        }
        Ok(s)
    };
    let mut out = vec![bind(Ipv4Addr::LOCALHOST.into())?];
    if let Ok(v6) = bind(Ipv6Addr::LOCALHOST.into()) {
        out.push(v6);
    }
    Ok(out)
}

/// The ports bound under `/proc/.../net` for `proto`: listening TCP sockets, unconnected UDP
/// ones.
pub fn bound_ports(net: &str, proto: Proto) -> BTreeSet<u16> {
    let name = match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    };
    let mut ports = BTreeSet::new();
    for table in [format!("{net}/{name}"), format!("{net}/{name}6")] {
        if let Ok(text) = std::fs::read_to_string(table) {
            ports.extend(parse_bound(&text, proto));
        }
    }
    ports
}

/// The bound ports of a `/proc/net/{tcp,udp}`-format table: TCP in state LISTEN (0A), UDP
/// with no remote address (a service's socket, not a client's connected one).
fn parse_bound(table: &str, proto: Proto) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, remote, state) = (f.get(1)?, f.get(2)?, f.get(3)?);
            let wanted = match proto {
                Proto::Tcp => *state == "0A",
                Proto::Udp => *state == "07" && remote.bytes().all(|b| b == b'0' || b == b':'),
            };
            if !wanted {
                return None;
            }
            let port = u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()?;
            (port != 0).then_some(port)
        })
        .collect()
}

/// The host's ephemeral port range (clients' ports, which `auto` leaves alone).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut w = t.split_whitespace().map(|n| n.parse::<u16>());
            Some((w.next()?.ok()?, w.next()?.ok()?))
        })
        .unwrap_or((32768, 60999))
}

/// One UDP client of a `-U` port: its own socket to the host's port.
struct UdpPeer {
    /// The namespace-side socket it wrote to (replies go back through it).
    via: RawFd,
    client: SocketAddr,
    host: UdpSocket,
    last: Instant,
}

struct HostSide {
    spec: Forwarding,
    ns: mpsc::Sender<NsRequest>,
    control: ControlHandle,
    guest: IpAddr,
    ephemeral: (u16, u16),
    /// Namespace-side sockets: (protocol, its port) -> (host port, sockets).
    sockets: BTreeMap<(Proto, u16), (u16, Vec<NsSocket>)>,
    /// UDP clients by (namespace-side socket, client address).
    udp_peers: HashMap<(RawFd, SocketAddr), UdpPeer>,
    /// Ports `-t/-u auto` published on the host.
    published: BTreeSet<(Proto, u16)>,
    /// One datagram being relayed.
    buf: Vec<u8>,
}

impl HostSide {
    fn ns_bind(&self, proto: Proto, port: u16) -> io::Result<Vec<NsSocket>> {
        let (tx, rx) = mpsc::channel();
        self.ns.send(NsRequest::Bind(proto, port, tx)).map_err(|_| io::Error::other("namespace thread gone"))?;
        rx.recv().map_err(|_| io::Error::other("namespace thread gone"))?
    }

    fn ns_bound(&self, proto: Proto) -> BTreeSet<u16> {
        let (tx, rx) = mpsc::channel();
        if self.ns.send(NsRequest::Bound(proto, tx)).is_err() {
            return BTreeSet::new();
        }
        rx.recv().unwrap_or_default()
    }

    fn is_ephemeral(&self, port: u16) -> bool {
        (self.ephemeral.0..=self.ephemeral.1).contains(&port)
    }

    fn run(mut self) {
        let mut next_scan = Instant::now();
        loop {
            if Instant::now() >= next_scan {
                self.rescan();
                self.expire_udp();
                next_scan = Instant::now() + RESCAN;
            }
            self.serve_until(next_scan);
        }
    }

    /// `auto`: forward what appeared, stop forwarding what went.
    fn rescan(&mut self) {
        for proto in self.spec.to_host_auto.clone() {
            let fixed: BTreeSet<u16> =
                self.spec.to_host.iter().filter(|(p, ..)| *p == proto).map(|(_, from, _)| *from).collect();
            let wanted: BTreeSet<u16> = bound_ports("/proc/net", proto)
                .into_iter()
                .filter(|p| !self.is_ephemeral(*p) && !self.published.contains(&(proto, *p)))
                .collect();
            let gone: Vec<u16> = self
                .sockets
                .keys()
                .filter(|(p, port)| *p == proto && !wanted.contains(port) && !fixed.contains(port))
                .map(|(_, port)| *port)
                .collect();
            for port in gone {
                self.drop_ns_socket(proto, port);
                tracing::info!("{} auto: port {port} no longer forwarded", flag(proto, true));
            }
            let new: Vec<u16> = wanted.iter().filter(|p| !self.sockets.contains_key(&(proto, **p))).copied().collect();
            for port in new {
                match self.ns_bind(proto, port) {
                    Ok(s) => {
                        tracing::info!("{} auto: the namespace's port {port} goes to the host", flag(proto, true));
                        self.sockets.insert((proto, port), (port, s));
                    }
                    // Bound in the namespace already (its own service): not ours to forward.
                    Err(e) => tracing::debug!("{} auto: port {port}: {e}", flag(proto, true)),
                }
            }
        }
        for proto in self.spec.to_ns_auto.clone() {
            let wanted: BTreeSet<u16> = self
                .ns_bound(proto)
                .into_iter()
                .filter(|p| !self.is_ephemeral(*p) && !self.sockets.contains_key(&(proto, *p)))
                .collect();
            let gone: Vec<u16> =
                self.published.iter().filter(|(p, port)| *p == proto && !wanted.contains(port)).map(|x| x.1).collect();
            for port in gone {
                self.unpublish(proto, port);
            }
            for port in wanted {
                if !self.published.contains(&(proto, port)) {
                    self.publish(proto, port);
                }
            }
        }
    }

    fn drop_ns_socket(&mut self, proto: Proto, port: u16) {
        if let Some((_, socks)) = self.sockets.remove(&(proto, port)) {
            let fds: Vec<RawFd> = socks.iter().map(raw).collect();
            self.udp_peers.retain(|(via, _), _| !fds.contains(via));
        }
    }

    fn publish(&mut self, proto: Proto, port: u16) {
        let spec =
            PortSpec { host_ip: self.spec.to_ns_host_ip, host_ports: Some((port, port)), container_port: port, proto };
        match usernet_host::publish::listen::bind(&spec) {
            Ok(listeners) => {
                let guest_ip = self.guest;
                let done = self.control.ask_blocking(|reply| Command::Publish { listeners, guest_ip, reply });
                if done.is_some_and(|p| !p.is_empty()) {
                    tracing::info!("{} auto: the host's port {port} goes to the namespace", flag(proto, false));
                    self.published.insert((proto, port));
                }
            }
            // Bound on the host already: pasta skips such ports too.
            Err(e) => tracing::debug!("{} auto: port {port}: {e}", flag(proto, false)),
        }
    }

    fn unpublish(&mut self, proto: Proto, port: u16) {
        for ip in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
            let host = SocketAddr::new(ip, port);
            let _ = self.control.ask_blocking(|reply| Command::Unpublish { host, proto, reply });
        }
        self.published.remove(&(proto, port));
        tracing::info!("{} auto: port {port} no longer forwarded", flag(proto, false));
    }

    fn expire_udp(&mut self) {
        self.udp_peers.retain(|_, p| p.last.elapsed() < UDP_IDLE);
    }

    /// Serves the namespace-side sockets and the UDP clients' host sockets until `deadline`.
    fn serve_until(&mut self, deadline: Instant) {
        enum Ready {
            Accept(u16, RawFd),
            FromNs(u16, RawFd),
            FromHost((RawFd, SocketAddr)),
        }
        let mut what: Vec<Ready> = Vec::new();
        let mut pfds: Vec<libc::pollfd> = Vec::new();
        for ((_, _), (to, socks)) in &self.sockets {
            for s in socks {
                what.push(match s {
                    NsSocket::Tcp(_) => Ready::Accept(*to, raw(s)),
                    NsSocket::Udp(_) => Ready::FromNs(*to, raw(s)),
                });
                pfds.push(libc::pollfd { fd: raw(s), events: libc::POLLIN, revents: 0 });
            }
        }
        for (key, peer) in &self.udp_peers {
            what.push(Ready::FromHost(*key));
            pfds.push(libc::pollfd { fd: peer.host.as_raw_fd(), events: libc::POLLIN, revents: 0 });
        }
        let wait = deadline.saturating_duration_since(Instant::now()).as_millis().max(1) as i32;
        if pfds.is_empty() {
            std::thread::sleep(Duration::from_millis(wait as u64));
            return;
        }
        // SAFETY: pfds is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, wait) };
        if n <= 0 {
            return;
        }
        for (pfd, ready) in pfds.iter().zip(what) {
            if pfd.revents == 0 {
                continue;
            }
            match ready {
                Ready::Accept(to, fd) => {
                    if let Some(NsSocket::Tcp(l)) = find(&self.sockets, fd) {
                        while let Ok((client, peer)) = l.accept() {
                            carry(client, SocketAddr::new(loopback_like(peer.ip()), to));
                        }
                    }
                }
                Ready::FromNs(to, fd) => self.udp_from_ns(fd, to),
                Ready::FromHost(key) => self.udp_from_host(key),
            }
        }
    }

    /// Datagrams from namespace clients to a `-U` port: on to the host's port, each client
    /// through a socket of its own.
    fn udp_from_ns(&mut self, fd: RawFd, to: u16) {
        loop {
            let Some(NsSocket::Udp(sock)) = find(&self.sockets, fd) else { return };
            let Ok((n, client)) = sock.recv_from(&mut self.buf) else { return };
            let peer = match self.udp_peers.entry((fd, client)) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let target = SocketAddr::new(loopback_like(client.ip()), to);
                    let unspecified: IpAddr =
                        if target.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
                    let host = match UdpSocket::bind((unspecified, 0)).and_then(|h| h.connect(target).map(|()| h)) {
                        Ok(h) => h,
                        Err(err) => {
                            tracing::debug!("-U: {target}: {err}");
                            continue;
                        }
                    };
                    let _ = host.set_nonblocking(true);
                    e.insert(UdpPeer { via: fd, client, host, last: Instant::now() })
                }
            };
            peer.last = Instant::now();
            let _ = peer.host.send(&self.buf[..n]);
        }
    }

    /// Replies from the host's port: back to the namespace client they belong to.
    fn udp_from_host(&mut self, key: (RawFd, SocketAddr)) {
        let Some(peer) = self.udp_peers.get_mut(&key) else { return };
        let Some(NsSocket::Udp(sock)) = find(&self.sockets, peer.via) else { return };
        while let Ok(n) = peer.host.recv(&mut self.buf) {
            peer.last = Instant::now();
            let _ = sock.send_to(&self.buf[..n], peer.client);
        }
    }
}

/// The namespace-side socket whose descriptor is `fd`.
fn find(sockets: &BTreeMap<(Proto, u16), (u16, Vec<NsSocket>)>, fd: RawFd) -> Option<&NsSocket> {
    sockets.values().flat_map(|(_, s)| s.iter()).find(|s| raw(s) == fd)
}

fn raw(s: &NsSocket) -> RawFd {
    match s {
        NsSocket::Tcp(l) => l.as_raw_fd(),
        NsSocket::Udp(u) => u.as_raw_fd(),
    }
}

/// The host's loopback of the client's family.
fn loopback_like(ip: IpAddr) -> IpAddr {
    if ip.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() }
}

/// pasta's flag for a direction and protocol, for the logs.
fn flag(proto: Proto, to_host: bool) -> &'static str {
    match (proto, to_host) {
        (Proto::Tcp, true) => "-T",
        (Proto::Udp, true) => "-U",
        (Proto::Tcp, false) => "-t",
        (Proto::Udp, false) => "-u",
    }
}

/// Connects to `to` on the host and copies both ways until each side closes its direction.
fn carry(client: TcpStream, to: SocketAddr) {
    let _ = std::thread::Builder::new().name("usernet-pasta-conn".into()).spawn(move || {
        let _ = client.set_nonblocking(false);
        let server = match TcpStream::connect_timeout(&to, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("-T: {to}: {e}");
                // A reset, as the namespace's client would get from a closed port.
                let linger = libc::linger { l_onoff: 1, l_linger: 0 };
                // SAFETY: setsockopt with a valid linger struct of the size given.
                unsafe {
                    libc::setsockopt(
                        client.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        &linger as *const libc::linger as *const libc::c_void,
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                return;
            }
        };
        let _ = server.set_nodelay(true);
        let _ = client.set_nodelay(true);
        let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { return };
        let up = std::thread::spawn(move || copy_half(c2, s2));
        copy_half(server, client);
        let _ = up.join();
    });
}

/// Copies `from` to `to` until `from` ends, then ends `to`'s write side.
fn copy_half(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(std::net::Shutdown::Write);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_sockets_of_proc_tables() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   3: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0\n\
   bogus\n";
        assert_eq!(parse_bound(tcp, Proto::Tcp), BTreeSet::from([0x1f90, 0x16, 0x50]));
        let udp = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
   1: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 1 2 0 0\n\
   2: 0100007F:D431 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 2 2 0 0\n\
   3: 00000000000000000000000000000000:14E9 00000000000000000000000000000000:0000 07 0 0 0 0 0\n";
        assert_eq!(parse_bound(udp, Proto::Udp), BTreeSet::from([53, 5353]), "connected sockets are clients");
        assert!(parse_bound("", Proto::Tcp).is_empty());
    }

    #[test]
    fn forwarding_is_empty_only_without_anything() {
        assert!(Forwarding::default().is_empty());
        assert!(!Forwarding { to_ns_auto: vec![Proto::Udp], ..Forwarding::default() }.is_empty());
    }
}
