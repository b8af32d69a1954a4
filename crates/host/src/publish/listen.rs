//! Host listeners for published ports.
//!
//! Theory of operation. [`bind`] turns one [`PortSpec`] into the host sockets that serve
//! it, before anything else runs, so a taken port is reported at once, in Docker's words,
//! and nothing of that spec is left bound.
//!
//! - Addresses: the spec's host IP, or else both 0.0.0.0 and [::] (the IPv6 socket with
//!   IPV6_V6ONLY, so each family has its own socket, as Docker's proxy does). When the host
//!   has no IPv6, 0.0.0.0 alone.
//! - Ports: a fixed port binds every address to it. Port 0 (or none) lets the kernel pick
//!   for the first address, and the other addresses take the same port; if one of them has
//!   it taken, everything is closed and the kernel picks again (a few times). A range
//!   `A-B` tries each port in turn until one binds on every address.
//! - Sockets are non-blocking and close-on-exec; TCP ones have SO_REUSEADDR (a port in
//!   TIME_WAIT is free again, as for Docker's proxy) and listen with a backlog of 1024.
//!
//! The sockets go to the engine, which owns them from then on: they close when the
//! engine drops them, so the ports are free again as soon as usernet exits.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind as sys_bind, getsockname, listen, setsockopt,
    socket, sockopt,
};

use super::spec::PortSpec;
use usernet_core::ports::{BoundListener, Proto};

/// Listen backlog of published TCP ports.
const TCP_BACKLOG: i32 = 1024;
/// How often a kernel-picked port is re-picked when another address has it taken.
const PICK_ATTEMPTS: usize = 8;

/// Why a spec could not be bound; `Display` follows Docker.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The port (or every port of the range) is taken. `addr` is where it failed,
    /// `0.0.0.0:8000`, `[::]:8000` or `0.0.0.0:8000-8010`.
    #[error("Bind for {addr} failed: port is already allocated")]
    InUse { addr: String },
    /// Any other failure, in the words of Docker's userland proxy.
    #[error("Error starting userland proxy: listen {net} {addr}: {op}: {reason}")]
    Os {
        /// `tcp4`, `tcp6`, `udp4`, `udp6`.
        net: String,
        addr: SocketAddr,
        /// The syscall that failed: `socket`, `bind`, `listen`, ...
        op: &'static str,
        /// The error as Go spells it (`permission denied`); already part of the message,
        /// so not a `source` (that would print it twice).
        reason: String,
        errno: Errno,
    },
    /// A port below `net.ipv4.ip_unprivileged_port_start` that this user may not bind (no
    /// CAP_NET_BIND_SERVICE: usernet run rootless): what to change, as rootless Podman's and
    /// Docker's port forwarders say it.
    #[error(
        "Error starting userland proxy: cannot expose privileged port {port}, you can add \
         'net.ipv4.ip_unprivileged_port_start={port}' to /etc/sysctl.conf (currently {start}), or choose \
         a larger port number (>= {start}): listen {net} {addr}: bind: permission denied"
    )]
    Privileged {
        net: String,
        addr: SocketAddr,
        port: u16,
        /// The sysctl's value when the bind failed.
        start: u16,
    },
}

impl BindError {
    fn os(proto: Proto, addr: SocketAddr, op: &'static str, errno: Errno) -> BindError {
        let family = if addr.is_ipv4() { "4" } else { "6" };
        BindError::Os { net: format!("{proto}{family}"), addr, op, reason: go_strerror(errno), errno }
    }

    /// The error of a bind(2) that failed with `errno`: a privileged port's when that is
    /// why (EACCES below `start`, the unprivileged ports' first; None when unknown).
    fn bind_failed(proto: Proto, addr: SocketAddr, errno: Errno, start: Option<u16>) -> BindError {
        match start {
            Some(start) if errno == Errno::EACCES && addr.port() != 0 && addr.port() < start => {
                let family = if addr.is_ipv4() { "4" } else { "6" };
                BindError::Privileged { net: format!("{proto}{family}"), addr, port: addr.port(), start }
            }
            _ => BindError::os(proto, addr, "bind", errno),
        }
    }
}

/// `net.ipv4.ip_unprivileged_port_start` of this network namespace (it covers IPv6 too),
/// or None when it cannot be read.
fn unprivileged_port_start() -> Option<u16> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").ok()?.trim().parse().ok()
}

/// strerror in lowercase, as Go's syscall.Errno prints it.
fn go_strerror(errno: Errno) -> String {
    let desc = errno.desc();
    let mut chars = desc.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("errno {}", errno as i32),
    }
}

/// `docker port` output for one bound address: `80/tcp -> 0.0.0.0:49153`
/// (`[::]:49153` for IPv6).
pub fn docker_port_line(container_port: u16, proto: Proto, local: SocketAddr) -> String {
    format!("{container_port}/{proto} -> {local}")
}

/// Binds every host socket `spec` asks for; on failure nothing of this spec stays bound.
pub fn bind(spec: &PortSpec) -> Result<Vec<BoundListener>, BindError> {
    let addrs: Vec<IpAddr> = match spec.host_ip {
        Some(ip) => vec![ip],
        None if ipv6_available() => vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED), IpAddr::V6(Ipv6Addr::UNSPECIFIED)],
        None => vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)],
    };
    bind_addrs(&addrs, spec.host_ports, spec.proto, spec.container_port)
}

/// Binds every spec in order; on failure, whatever was bound is closed.
pub fn bind_all(specs: &[PortSpec]) -> Result<Vec<BoundListener>, BindError> {
    let mut bound = Vec::new();
    for spec in specs {
        bound.extend(bind(spec)?);
    }
    Ok(bound)
}

/// True when the host can open IPv6 sockets at all.
fn ipv6_available() -> bool {
    match socket(AddressFamily::Inet6, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None) {
        Ok(_) => true,
        Err(e) => {
            tracing::debug!("no IPv6 on this host ({e}): publishing on 0.0.0.0 only");
            false
        }
    }
}

/// The binding strategy for the addresses `addrs` (all of them on one port).
fn bind_addrs(
    addrs: &[IpAddr],
    host_ports: Option<(u16, u16)>,
    proto: Proto,
    guest_port: u16,
) -> Result<Vec<BoundListener>, BindError> {
    match host_ports {
        None | Some((0, 0)) => bind_kernel_picked(addrs, proto, guest_port),
        Some((lo, hi)) if lo == hi => bind_port(addrs, lo, proto, guest_port),
        Some((lo, hi)) => {
            // Port 0 in a range would let the kernel pick outside of it.
            for port in lo.max(1)..=hi {
                match bind_port(addrs, port, proto, guest_port) {
                    Ok(bound) => return Ok(bound),
                    Err(BindError::InUse { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            let first = addrs.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED.into());
            Err(BindError::InUse { addr: format!("{}:{lo}-{hi}", first.ip_for_display()) })
        }
    }
}

/// Lets the kernel pick a port for the first address, then binds the others to it.
fn bind_kernel_picked(addrs: &[IpAddr], proto: Proto, guest_port: u16) -> Result<Vec<BoundListener>, BindError> {
    let Some((&first, rest)) = addrs.split_first() else {
        return Ok(Vec::new());
    };
    let mut last_err = None;
    for _ in 0..PICK_ATTEMPTS {
        let head = bind_one(SocketAddr::new(first, 0), proto, guest_port)?;
        let port = head.local.port();
        let mut bound = vec![head];
        let mut failed = None;
        for &ip in rest {
            match bind_one(SocketAddr::new(ip, port), proto, guest_port) {
                Ok(l) => bound.push(l),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        match failed {
            None => return Ok(bound),
            // Taken on another address: drop (close) all and let the kernel pick again.
            Some(e @ BindError::InUse { .. }) => last_err = Some(e),
            Some(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or(BindError::InUse { addr: format!("{}:0", first.ip_for_display()) }))
}

/// Binds every address to `port`; closes what was bound if one fails.
fn bind_port(addrs: &[IpAddr], port: u16, proto: Proto, guest_port: u16) -> Result<Vec<BoundListener>, BindError> {
    addrs.iter().map(|&ip| bind_one(SocketAddr::new(ip, port), proto, guest_port)).collect()
}

/// One socket: created, configured, bound and (TCP) listening.
fn bind_one(addr: SocketAddr, proto: Proto, guest_port: u16) -> Result<BoundListener, BindError> {
    let err = |op, e| BindError::os(proto, addr, op, e);
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let ty = match proto {
        Proto::Tcp => SockType::Stream,
        Proto::Udp => SockType::Datagram,
    };
    let fd =
        socket(family, ty, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None).map_err(|e| err("socket", e))?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true).map_err(|e| err("setsockopt", e))?;
    }
    if proto == Proto::Tcp {
        setsockopt(&fd, sockopt::ReuseAddr, &true).map_err(|e| err("setsockopt", e))?;
    }
    let sa = SockaddrStorage::from(addr);
    match sys_bind(fd.as_raw_fd(), &sa) {
        Ok(()) => {}
        Err(Errno::EADDRINUSE) => {
            return Err(BindError::InUse { addr: addr.to_string() });
        }
        Err(e) => return Err(BindError::bind_failed(proto, addr, e, unprivileged_port_start())),
    }
    if proto == Proto::Tcp {
        let backlog = Backlog::new(TCP_BACKLOG).unwrap_or(Backlog::MAXCONN);
        listen(&fd, backlog).map_err(|e| match e {
            // Another socket with SO_REUSEADDR took the port between bind and listen.
            Errno::EADDRINUSE => BindError::InUse { addr: addr.to_string() },
            e => err("listen", e),
        })?;
    }
    let local = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|s| storage_to_std(&s))
        .ok_or_else(|| err("getsockname", Errno::EINVAL))?;
    Ok(BoundListener { fd, local, proto, guest_port })
}

fn storage_to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::from(*v4));
    }
    s.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6))
}

/// An IP as it appears before `:port` (IPv6 in brackets).
trait IpForDisplay {
    fn ip_for_display(&self) -> String;
}

impl IpForDisplay for IpAddr {
    fn ip_for_display(&self) -> String {
        match self {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream, UdpSocket};
    use std::time::Duration;

    const LO4: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    const LO6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

    fn spec(ip: IpAddr, ports: Option<(u16, u16)>, proto: Proto) -> PortSpec {
        PortSpec { host_ip: Some(ip), host_ports: ports, container_port: 80, proto }
    }

    /// True when 127.0.0.1:`port` can be bound for TCP within 5 s. A single try can fail
    /// though `bind` released the port: another test thread forking copies a socket bound a
    /// moment ago into its child, where it stays until that child calls exec.
    fn v4_port_released(port: u16) -> bool {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return true;
            }
            if std::time::Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// True when `port` is free on 127.0.0.1 and ::1 for TCP and UDP right now.
    fn port_free(port: u16) -> bool {
        TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("::1", port)).is_ok()
            && UdpSocket::bind(("127.0.0.1", port)).is_ok()
    }

    /// The first of `n` consecutive ports free now, different for every call in this process and
    /// below Linux's default ephemeral range (32768-60999): a port that bind(0) handed out is an
    /// ephemeral one, which another test's outgoing connection may take before the test binds it.
    fn free_run(n: u16) -> u16 {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let spread = std::process::id().wrapping_mul(97);
        for _ in 0..500 {
            let k = NEXT.fetch_add(u32::from(n) + 1, std::sync::atomic::Ordering::Relaxed);
            let base = (20000 + spread.wrapping_add(k) % (12000 - u32::from(n))) as u16;
            if (base..base + n).all(port_free) {
                return base;
            }
        }
        panic!("no run of {n} free ports in 20000-32000");
    }

    /// A port free now ([`free_run`]).
    fn free_port() -> u16 {
        free_run(1)
    }

    #[test]
    fn docker_port_lines() {
        assert_eq!(docker_port_line(80, Proto::Tcp, "0.0.0.0:49153".parse().expect("addr")), "80/tcp -> 0.0.0.0:49153");
        assert_eq!(docker_port_line(53, Proto::Udp, "[::]:49153".parse().expect("addr")), "53/udp -> [::]:49153");
    }

    #[test]
    fn kernel_picks_tcp_and_it_listens() {
        let ls = bind(&spec(LO4, None, Proto::Tcp)).expect("bind");
        assert_eq!(ls.len(), 1);
        let l = &ls[0];
        assert_eq!(l.local.ip(), LO4);
        assert_ne!(l.local.port(), 0);
        assert_eq!((l.proto, l.guest_port), (Proto::Tcp, 80));
        let c = TcpStream::connect_timeout(&l.local, Duration::from_secs(2));
        assert!(c.is_ok(), "connect to {}: {c:?}", l.local);
        // Port 0 given explicitly is the same.
        let ls = bind(&spec(LO4, Some((0, 0)), Proto::Tcp)).expect("bind");
        assert_ne!(ls[0].local.port(), 0);
    }

    #[test]
    fn socket_flags() {
        let ls = bind(&spec(LO4, None, Proto::Tcp)).expect("bind");
        let fd = ls[0].fd.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own; no memory involved.
        let (fl, fdfl) = unsafe { (libc::fcntl(fd, libc::F_GETFL), libc::fcntl(fd, libc::F_GETFD)) };
        assert!(fl & libc::O_NONBLOCK != 0, "not non-blocking");
        assert!(fdfl & libc::FD_CLOEXEC != 0, "not close-on-exec");
        assert!(nix::sys::socket::getsockopt(&ls[0].fd, sockopt::ReuseAddr).expect("getsockopt"));
        assert!(nix::sys::socket::getsockopt(&ls[0].fd, sockopt::AcceptConn).expect("getsockopt"));
        let ls = bind(&spec(LO6, None, Proto::Udp)).expect("bind");
        assert!(nix::sys::socket::getsockopt(&ls[0].fd, sockopt::Ipv6V6Only).expect("getsockopt"));
    }

    #[test]
    fn kernel_picks_udp() {
        let ls = bind(&spec(LO4, None, Proto::Udp)).expect("bind");
        let l = &ls[0];
        let c = UdpSocket::bind("127.0.0.1:0").expect("client");
        c.send_to(b"hi", l.local).expect("send");
        let mut buf = [0u8; 8];
        let mut ok = false;
        for _ in 0..100 {
            // SAFETY: recv into a buffer we own, on a descriptor we own.
            let n = unsafe { libc::recv(l.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n == 2 {
                ok = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(ok && &buf[..2] == b"hi");
    }

    #[test]
    fn fixed_port_on_ipv6() {
        let p = free_port();
        let ls = bind(&spec(LO6, Some((p, p)), Proto::Tcp)).expect("bind");
        assert_eq!(ls[0].local, SocketAddr::new(LO6, p));
        assert!(TcpStream::connect_timeout(&ls[0].local, Duration::from_secs(2)).is_ok());
    }

    #[test]
    fn dual_stack_gets_one_port() {
        for proto in [Proto::Tcp, Proto::Udp] {
            let ls = bind_addrs(&[LO4, LO6], None, proto, 80).expect("bind");
            assert_eq!(ls.len(), 2);
            assert_eq!(ls[0].local.ip(), LO4);
            assert_eq!(ls[1].local.ip(), LO6);
            assert_eq!(ls[0].local.port(), ls[1].local.port());
        }
    }

    #[test]
    fn taken_port_docker_message_and_nothing_left() {
        let p = free_port();
        let holder = TcpListener::bind(("127.0.0.1", p)).expect("hold");
        let e = bind(&spec(LO4, Some((p, p)), Proto::Tcp)).expect_err("taken");
        assert_eq!(e.to_string(), format!("Bind for 127.0.0.1:{p} failed: port is already allocated"));
        drop(holder);

        // Taken on the second address: the first one is released again.
        let holder6 = TcpListener::bind(("::1", p)).expect("hold v6");
        let e = bind_addrs(&[LO4, LO6], Some((p, p)), Proto::Tcp, 80).expect_err("taken");
        assert_eq!(e.to_string(), format!("Bind for [::1]:{p} failed: port is already allocated"));
        assert!(v4_port_released(p), "v4 side left bound");
        drop(holder6);

        let holder = UdpSocket::bind(("127.0.0.1", p)).expect("hold udp");
        let e = bind(&spec(LO4, Some((p, p)), Proto::Udp)).expect_err("taken");
        assert!(matches!(e, BindError::InUse { .. }), "{e}");
        drop(holder);
    }

    #[test]
    fn range_takes_first_free() {
        let base = free_run(3);
        let h0 = TcpListener::bind(("127.0.0.1", base)).expect("hold");
        let ls = bind(&spec(LO4, Some((base, base + 2)), Proto::Tcp)).expect("bind");
        assert_eq!(ls.len(), 1);
        assert_eq!(ls[0].local.port(), base + 1);
        // With base+1 now ours too, the next free one is base+2.
        let ls2 = bind(&spec(LO4, Some((base, base + 2)), Proto::Tcp)).expect("bind");
        assert_eq!(ls2[0].local.port(), base + 2);
        let e = bind(&spec(LO4, Some((base, base + 2)), Proto::Tcp)).expect_err("full");
        assert_eq!(e.to_string(), format!("Bind for 127.0.0.1:{base}-{} failed: port is already allocated", base + 2));
        drop((h0, ls, ls2));
    }

    #[test]
    fn range_on_two_addresses_skips_half_taken_ports() {
        let base = free_run(2);
        let h6 = TcpListener::bind(("::1", base)).expect("hold v6");
        let ls = bind_addrs(&[LO4, LO6], Some((base, base + 1)), Proto::Tcp, 80).expect("bind");
        assert_eq!(ls.len(), 2);
        assert!(ls.iter().all(|l| l.local.port() == base + 1));
        drop(h6);
    }

    #[test]
    fn other_errors_in_proxy_words() {
        // 192.0.2.1 (TEST-NET-1) is not an address of this host: bind fails, no traffic.
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let e = bind(&spec(ip, Some((8000, 8000)), Proto::Tcp)).expect_err("not local");
        assert_eq!(
            e.to_string(),
            "Error starting userland proxy: listen tcp4 192.0.2.1:8000: bind: cannot assign requested address"
        );
        // One line: anyhow's `{:#}` must not repeat the errno.
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn privileged_port_says_what_to_change() {
        let addr: SocketAddr = "0.0.0.0:80".parse().expect("addr");
        let e = BindError::bind_failed(Proto::Tcp, addr, Errno::EACCES, Some(1024));
        assert_eq!(
            e.to_string(),
            "Error starting userland proxy: cannot expose privileged port 80, you can add \
             'net.ipv4.ip_unprivileged_port_start=80' to /etc/sysctl.conf (currently 1024), or choose a larger \
             port number (>= 1024): listen tcp4 0.0.0.0:80: bind: permission denied"
        );
        let v6: SocketAddr = "[::]:443".parse().expect("addr");
        let e = BindError::bind_failed(Proto::Udp, v6, Errno::EACCES, Some(500));
        assert!(e.to_string().contains("privileged port 443") && e.to_string().contains("listen udp6 [::]:443"), "{e}");
        // Not the port's fault: at or above the sysctl, another errno, or the sysctl unknown.
        for (port, errno, start) in
            [(1024, Errno::EACCES, Some(1024)), (80, Errno::EADDRNOTAVAIL, Some(1024)), (80, Errno::EACCES, None)]
        {
            let e = BindError::bind_failed(Proto::Tcp, SocketAddr::new(LO4, port), errno, start);
            assert!(matches!(e, BindError::Os { op: "bind", .. }), "{port} {errno}: {e}");
        }
        assert!(unprivileged_port_start().is_some(), "the sysctl is readable here");
    }

    #[test]
    fn bind_all_releases_on_failure() {
        let p = free_port();
        let q = free_port();
        let holder = TcpListener::bind(("127.0.0.1", q)).expect("hold");
        let specs = [spec(LO4, Some((p, p)), Proto::Tcp), spec(LO4, Some((q, q)), Proto::Tcp)];
        assert!(bind_all(&specs).is_err());
        assert!(v4_port_released(p), "first spec left bound");
        drop(holder);
        let ls = bind_all(&specs).expect("bind");
        assert_eq!(ls.len(), 2);
    }
}
