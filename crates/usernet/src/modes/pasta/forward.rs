//! pasta's TCP forwarding beyond fixed `-t` ports: `-T` (the namespace's loopback to the
//! host's, fixed ports or `auto`) and `-t auto` (every port bound in the namespace, published
//! on the host as it appears).
//!
//! Theory of operation. Sockets belong to the network namespace of the thread that makes
//! them, and a thread that entered the guest's namespace cannot always come back (rootless,
//! the host's namespace is not ours to enter), so there are two threads:
//! - the namespace thread enters the namespace once and only makes things there: listeners on
//!   its loopback (127.0.0.1 and ::1) for `-T` ports, and, for `-t auto`, the list of TCP
//!   ports listening there (`/proc/thread-self/net/tcp` and `tcp6` are the thread's own
//!   namespace's);
//! - the host thread does the rest: once a second it reconciles what is forwarded with what
//!   is asked (`auto`: the host's listening ports for `-T`, read from the host's
//!   `/proc/net/tcp`; the namespace's for `-t`, published through the engine's control
//!   handle as `-t PORT` would be, and unpublished when they go), and between rescans it
//!   accepts on the `-T` listeners. Each accepted connection is carried to the host's
//!   127.0.0.1 (or ::1) at the same port by two copying threads, one per direction, each
//!   closing its direction when its side does.
//!
//! A port that one side forwards is not forwarded back by the other side's `auto` (the `-T`
//! listeners are listening sockets in the namespace; the published `-t` ports are listening
//! sockets on the host). This is the slow path of pasta's forwarding (a namespace's client to
//! a host service, and the first connection to a port that just appeared); the published
//! ports themselves run on the engine's path.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;
use usernet_core::engine::control::{Command, ControlHandle};
use usernet_core::ports::Proto;
use usernet_host::publish::spec::PortSpec;

/// What is forwarded this way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    /// `-T PORTS`: namespace loopback port -> host loopback port.
    pub to_host: Vec<(u16, u16)>,
    /// `-T auto`: every port listening on the host.
    pub to_host_auto: bool,
    /// `-t auto`: every port listening in the namespace, published on the host.
    pub to_ns_auto: bool,
}

impl Forwarding {
    pub fn is_empty(&self) -> bool {
        self.to_host.is_empty() && !self.to_host_auto && !self.to_ns_auto
    }
}

/// How often `auto` looks again (pasta's own interval).
const RESCAN: Duration = Duration::from_secs(1);

/// Requests to the namespace thread.
enum NsRequest {
    /// Listeners on the namespace's loopback at this port (IPv4, and IPv6 where it has it).
    Listen(u16, mpsc::Sender<io::Result<Vec<TcpListener>>>),
    /// The TCP ports listening in the namespace.
    Listening(mpsc::Sender<BTreeSet<u16>>),
}

/// Starts the two threads; `netns` is the guest's network namespace, `guest` its address
/// (where `-t auto` ports go).
pub fn start(spec: Forwarding, netns: OwnedFd, control: ControlHandle, guest: Ipv4Addr) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<NsRequest>();
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    std::thread::Builder::new()
        .name("usernet-pasta-ns".into())
        .spawn(move || ns_thread(netns, rx, ready_tx))
        .context("namespace thread")?;
    ready_rx
        .recv()
        .unwrap_or_else(|_| Err("the namespace thread ended".into()))
        .map_err(|e| anyhow::anyhow!("cannot enter the namespace for -T/-t auto: {e}"))?;
    let mut host = HostSide { spec, ns: tx, control, guest, listeners: BTreeMap::new(), published: BTreeSet::new() };
    // Fixed -T ports are bound now: a taken one is an error at start, as pasta has it.
    for (from, to) in host.spec.to_host.clone() {
        let l = host.ns_listen(from).with_context(|| format!("-T {from}:{to}: cannot listen in the namespace"))?;
        host.listeners.insert(from, (to, l));
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
            NsRequest::Listen(port, reply) => {
                let _ = reply.send(listen_loopback(port));
            }
            NsRequest::Listening(reply) => {
                let mut ports = listening_ports("/proc/thread-self/net/tcp");
                ports.extend(listening_ports("/proc/thread-self/net/tcp6"));
                let _ = reply.send(ports);
            }
        }
    }
}

/// Listeners on 127.0.0.1:port and, where the namespace has IPv6, [::1]:port.
fn listen_loopback(port: u16) -> io::Result<Vec<TcpListener>> {
    let v4 = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    let mut out = vec![v4];
    if let Ok(v6) = TcpListener::bind((Ipv6Addr::LOCALHOST, port)) {
        out.push(v6);
    }
    for l in &out {
        l.set_nonblocking(true)?;
    }
    Ok(out)
}

/// The ports of the listening sockets (state 0A) in a `/proc/net/tcp`-format table.
pub fn listening_ports(path: &str) -> BTreeSet<u16> {
    std::fs::read_to_string(path).map(|t| parse_listening(&t)).unwrap_or_default()
}

fn parse_listening(table: &str) -> BTreeSet<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (local, state) = (f.get(1)?, f.get(3)?);
            if *state != "0A" {
                return None;
            }
            let port = local.rsplit_once(':')?.1;
            u16::from_str_radix(port, 16).ok()
        })
        .collect()
}

struct HostSide {
    spec: Forwarding,
    ns: mpsc::Sender<NsRequest>,
    control: ControlHandle,
    guest: Ipv4Addr,
    /// `-T` listeners in the namespace: its port -> (host port, listeners).
    listeners: BTreeMap<u16, (u16, Vec<TcpListener>)>,
    /// Ports `-t auto` published on the host.
    published: BTreeSet<u16>,
}

impl HostSide {
    fn ns_listen(&self, port: u16) -> io::Result<Vec<TcpListener>> {
        let (tx, rx) = mpsc::channel();
        self.ns.send(NsRequest::Listen(port, tx)).map_err(|_| io::Error::other("namespace thread gone"))?;
        rx.recv().map_err(|_| io::Error::other("namespace thread gone"))?
    }

    fn ns_listening(&self) -> BTreeSet<u16> {
        let (tx, rx) = mpsc::channel();
        if self.ns.send(NsRequest::Listening(tx)).is_err() {
            return BTreeSet::new();
        }
        rx.recv().unwrap_or_default()
    }

    fn run(mut self) {
        loop {
            self.rescan();
            self.accept_for(RESCAN);
        }
    }

    /// `auto`: forward what appeared, stop forwarding what went.
    fn rescan(&mut self) {
        if self.spec.to_host_auto {
            let mut host = listening_ports("/proc/net/tcp");
            host.extend(listening_ports("/proc/net/tcp6"));
            // Not the ports we publish ourselves, nor the fixed -T ones.
            let fixed: BTreeSet<u16> = self.spec.to_host.iter().map(|(from, _)| *from).collect();
            let wanted: BTreeSet<u16> = host.difference(&self.published).copied().collect();
            let gone: Vec<u16> =
                self.listeners.keys().filter(|p| !wanted.contains(p) && !fixed.contains(p)).copied().collect();
            for port in gone {
                self.listeners.remove(&port);
                tracing::info!("-T auto: port {port} no longer forwarded");
            }
            let new: Vec<u16> = wanted.iter().filter(|p| !self.listeners.contains_key(p)).copied().collect();
            for port in new {
                match self.ns_listen(port) {
                    Ok(l) => {
                        tracing::info!("-T auto: forwarding the namespace's port {port} to the host");
                        self.listeners.insert(port, (port, l));
                    }
                    // Taken in the namespace (its own service): not ours to forward.
                    Err(e) => tracing::debug!("-T auto: port {port}: {e}"),
                }
            }
        }
        if self.spec.to_ns_auto {
            let ours: BTreeSet<u16> = self.listeners.keys().copied().collect();
            let wanted: BTreeSet<u16> = self.ns_listening().difference(&ours).copied().collect();
            for port in self.published.difference(&wanted).copied().collect::<Vec<_>>() {
                self.unpublish(port);
            }
            for port in wanted.difference(&self.published.clone()).copied().collect::<Vec<_>>() {
                self.publish(port);
            }
        }
    }

    fn publish(&mut self, port: u16) {
        let spec = PortSpec { host_ip: None, host_ports: Some((port, port)), container_port: port, proto: Proto::Tcp };
        match usernet_host::publish::listen::bind(&spec) {
            Ok(listeners) => {
                let guest_ip = self.guest;
                let done = self.control.ask_blocking(|reply| Command::Publish { listeners, guest_ip, reply });
                if done.is_some_and(|p| !p.is_empty()) {
                    tracing::info!("-t auto: forwarding the host's port {port} to the namespace");
                    self.published.insert(port);
                }
            }
            // Taken on the host: pasta skips such ports too.
            Err(e) => tracing::debug!("-t auto: port {port}: {e}"),
        }
    }

    fn unpublish(&mut self, port: u16) {
        for ip in [IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)] {
            let host = SocketAddr::new(ip, port);
            let _ = self.control.ask_blocking(|reply| Command::Unpublish { host, proto: Proto::Tcp, reply });
        }
        self.published.remove(&port);
        tracing::info!("-t auto: port {port} no longer forwarded");
    }

    /// Accepts on the `-T` listeners for up to `limit`, carrying each connection.
    fn accept_for(&mut self, limit: Duration) {
        let all: Vec<(u16, &TcpListener)> =
            self.listeners.values().flat_map(|(to, ls)| ls.iter().map(move |l| (*to, l))).collect();
        if all.is_empty() {
            std::thread::sleep(limit);
            return;
        }
        let mut pfds: Vec<libc::pollfd> =
            all.iter().map(|(_, l)| libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: pfds is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, limit.as_millis() as i32) };
        if n <= 0 {
            return;
        }
        for (pfd, (to, listener)) in pfds.iter().zip(&all) {
            if pfd.revents == 0 {
                continue;
            }
            while let Ok((client, peer)) = listener.accept() {
                let host: IpAddr = if peer.is_ipv4() { Ipv4Addr::LOCALHOST.into() } else { Ipv6Addr::LOCALHOST.into() };
                carry(client, SocketAddr::new(host, *to));
            }
        }
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
    fn listening_sockets_of_a_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n\
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1\n\
   3: 00000000000000000000000001000000:0050 00000000000000000000000000000000:0000 0A 0 0 0 0 0\n\
   bogus\n";
        assert_eq!(parse_listening(table), BTreeSet::from([0x1f90, 0x16, 0x50]));
        assert!(parse_listening("").is_empty());
    }
}
