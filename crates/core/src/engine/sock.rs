//! Thin wrappers over the socket calls of the data path (non-blocking, no SIGPIPE). They
//! take the socket as a `BorrowedFd`, so a caller cannot pass a descriptor it does not hold.

use std::io;
use std::mem::size_of;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

fn check(r: isize) -> io::Result<usize> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
}

/// Reads (or with `peek`, looks at) up to `buf.len()` bytes.
pub fn recv(fd: BorrowedFd<'_>, buf: &mut [u8], peek: bool) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    // SAFETY: buf is valid for writes of its length.
    check(unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), flags) })
}

/// Sends what the socket takes now; returns how much that was.
pub fn send(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    check(unsafe {
        libc::send(
            fd.as_raw_fd(),
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// A socket address in the kernel's form.
pub fn sockaddr(addr: std::net::SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        std::net::SocketAddr::V4(a) => {
            let sin = sockaddr_in(a);
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        std::net::SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Converts a kernel socket address (IPv4 or IPv6) back.
pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<std::net::SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this is a sockaddr_in.
            let sin = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(std::net::SocketAddr::new(ip.into(), u16::from_be(sin.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let sin6 = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// What [`recv_two`] received: how many datagrams (0: none was waiting) and, for each, its
/// real length (MSG_TRUNC: longer than its buffer when it did not fit), its sender, and
/// (a socket with UDP_GRO) the size of the datagrams the kernel coalesced into it, 0 when
/// it is one datagram.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TwoDatagrams {
    pub count: usize,
    pub len: [usize; 2],
    pub from: [Option<std::net::SocketAddr>; 2],
    pub segment: [usize; 2],
}

impl TwoDatagrams {
    /// How many datagrams the `i`th read holds: more than one when the kernel coalesced them.
    pub fn datagrams(&self, i: usize) -> usize {
        match self.segment[i] {
            0 => 1,
            size => self.len[i].div_ceil(size).max(1),
        }
    }
}

/// linux/udp.h: the kernel may coalesce a socket's datagrams of one size that arrive
/// together into one read, and says their size in a control message (Linux 5.0).
pub const UDP_GRO: libc::c_int = 104;

/// The size that a UDP_GRO control message in `msg` gives, 0 when there is none.
fn gro_segment(msg: &libc::msghdr) -> usize {
    // SAFETY: msg's control buffer is the one the kernel filled in, of msg_controllen bytes;
    // CMSG_FIRSTHDR and CMSG_NXTHDR stay within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == UDP_GRO {
                let at = libc::CMSG_DATA(c) as *const libc::c_int;
                return usize::try_from(std::ptr::read_unaligned(at)).unwrap_or(0);
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    0
}

/// Receives up to two datagrams in one recvmmsg, the first into `first`, the second into
/// `second`. Fewer than two means that the socket's queue was empty when the call looked, so
/// with edge-triggered readiness the caller is done until the next edge: no further read
/// that would only hear EAGAIN. An error after the first datagram stays on the socket for
/// the next call (the kernel's recvmmsg keeps it), so none is lost.
pub fn recv_two(fd: BorrowedFd<'_>, first: &mut [u8], second: &mut [u8]) -> io::Result<TwoDatagrams> {
    // SAFETY: all-zero sockaddr_storage and mmsghdr values are valid.
    let mut names: [libc::sockaddr_storage; 2] = unsafe { std::mem::zeroed() };
    // Room for one control message of an int each (UDP_GRO's), aligned as cmsghdr.
    let mut control = [[0u64; 4]; 2];
    let mut iov = [
        libc::iovec { iov_base: first.as_mut_ptr() as *mut libc::c_void, iov_len: first.len() },
        libc::iovec { iov_base: second.as_mut_ptr() as *mut libc::c_void, iov_len: second.len() },
    ];
    let mut msgs: [libc::mmsghdr; 2] = unsafe { std::mem::zeroed() };
    for (i, m) in msgs.iter_mut().enumerate() {
        m.msg_hdr.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
        m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        m.msg_hdr.msg_iov = &mut iov[i];
        m.msg_hdr.msg_iovlen = 1;
        m.msg_hdr.msg_control = control[i].as_mut_ptr() as *mut libc::c_void;
        m.msg_hdr.msg_controllen = size_of_val(&control[i]);
    }
    // SAFETY: msgs points at two headers whose names, buffers and control buffers outlive
    // the call.
    let r = unsafe {
        libc::recvmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), 2, libc::MSG_DONTWAIT | libc::MSG_TRUNC, std::ptr::null_mut())
    };
    match check(r as isize) {
        Ok(count) => {
            let mut got = TwoDatagrams { count, ..Default::default() };
            for i in 0..count.min(2) {
                got.len[i] = msgs[i].msg_len as usize;
                // A connected or unnamed socket (a socketpair) leaves the name empty.
                if msgs[i].msg_hdr.msg_namelen > 0 {
                    got.from[i] = from_sockaddr(&names[i]);
                }
                got.segment[i] = gro_segment(&msgs[i].msg_hdr);
            }
            Ok(got)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(TwoDatagrams::default()),
        Err(e) => Err(e),
    }
}

/// Accepts one connection (non-blocking, close-on-exec); Ok(None) when none is waiting.
pub fn accept(fd: BorrowedFd<'_>) -> io::Result<Option<(std::os::fd::OwnedFd, std::net::SocketAddr)>> {
    use std::os::fd::FromRawFd;
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss is valid for writes of len bytes.
    let r = unsafe {
        libc::accept4(
            fd.as_raw_fd(),
            &mut ss as *mut _ as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
    }
    // SAFETY: r is a fresh descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(r) };
    match from_sockaddr(&ss) {
        Some(a) => Ok(Some((fd, a))),
        None => Err(io::Error::other("accepted a connection of an unknown address family")),
    }
}

/// Drops `n` bytes from the front of a receive queue: without copying on a TCP socket
/// (MSG_TRUNC), through a scratch buffer on a socketpair. Returns how many were dropped.
pub fn discard(fd: BorrowedFd<'_>, mut n: usize, is_tcp: bool) -> io::Result<usize> {
    let mut done = 0;
    if is_tcp {
        while n > 0 {
            // SAFETY: with MSG_TRUNC a TCP socket copies nothing into the (null) buffer.
            let r =
                unsafe { libc::recv(fd.as_raw_fd(), std::ptr::null_mut(), n, libc::MSG_DONTWAIT | libc::MSG_TRUNC) };
            match check(r) {
                Ok(0) => break,
                Ok(k) => {
                    done += k;
                    n -= k.min(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    } else {
        let mut scratch = [0u8; 16384];
        while n > 0 {
            let want = n.min(scratch.len());
            match recv(fd, &mut scratch[..want], false) {
                Ok(0) => break,
                Ok(k) => {
                    done += k;
                    n -= k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(done)
}

/// Sets where the next MSG_PEEK starts, relative to the front of the receive queue.
pub fn set_peek_offset(fd: BorrowedFd<'_>, off: i32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, off)
}

pub fn shutdown_write(fd: BorrowedFd<'_>) {
    // SAFETY: shutdown(2) on a descriptor we own.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
}

/// Makes close(2) reset the connection instead of a graceful FIN.
pub fn set_linger_zero(fd: BorrowedFd<'_>) {
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: l is a valid linger struct of the length given.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

/// A non-blocking, close-on-exec IPv4 socket.
pub fn socket(kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    socket_in(libc::AF_INET, kind, proto)
}

/// The same for the family of `ip`: IPv4 or IPv6.
pub fn socket_for(ip: std::net::IpAddr, kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    socket_in(if ip.is_ipv6() { libc::AF_INET6 } else { libc::AF_INET }, kind, proto)
}

fn socket_in(family: libc::c_int, kind: libc::c_int, proto: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the returned descriptor is owned by the OwnedFd.
    let fd = unsafe { libc::socket(family, kind | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An IPv4 socket address in the kernel's form.
pub fn sockaddr_in(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    }
}

/// Binds `fd` to `addr`.
pub fn bind(fd: BorrowedFd<'_>, addr: std::net::SocketAddr) -> io::Result<()> {
    let (sa, len) = sockaddr(addr);
    // SAFETY: sa is a valid socket address of the length given.
    let r = unsafe { libc::bind(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Starts a connect; Ok(true) when it completed at once, Ok(false) when in progress.
pub fn connect(fd: BorrowedFd<'_>, addr: impl Into<std::net::SocketAddr>) -> io::Result<bool> {
    let (sa, len) = sockaddr(addr.into());
    // SAFETY: sa is a valid socket address of the length given.
    let r = unsafe { libc::connect(fd.as_raw_fd(), &sa as *const _ as *const libc::sockaddr, len) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINPROGRESS) { Ok(false) } else { Err(e) }
}

/// Whether the connect started on `fd` has completed: the socket has a peer (getpeername(2)
/// fails with ENOTCONN while the SYN is out, and after a refusal).
///
/// A connect to an address of this host (its loopback, say) is answered within the
/// connect(2) call itself, which still reports EINPROGRESS: the SYN, SYN-ACK and ACK all
/// pass through the loopback device before it returns. Asking at once spares the flow a
/// round of the event loop (a poll that returns nothing, epoll_wait, the dispatch of
/// EPOLLOUT) before its SYN-ACK goes to the guest.
pub fn connect_completed(fd: BorrowedFd<'_>) -> bool {
    // SAFETY: sockaddr_storage is plain data, large enough for any address.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: sa and len describe a writable buffer of that length.
    unsafe { libc::getpeername(fd.as_raw_fd(), &mut sa as *mut _ as *mut libc::sockaddr, &mut len) == 0 }
}

/// Whether `fd` is a TCP socket (not a Unix stream, say).
pub fn is_tcp(fd: BorrowedFd<'_>) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a live c_int of the stated length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && v == libc::IPPROTO_TCP
}

pub fn set_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int, val: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is a c_int of the length given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &val as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as u32,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

pub fn get_int(fd: BorrowedFd<'_>, level: libc::c_int, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: val and len are valid for writes of the sizes given.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, opt, &mut val as *mut _ as *mut libc::c_void, &mut len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(val) }
}

/// SO_MEMINFO (asm-generic/socket.h; the libc crate names only its indices).
/// linux/udp.h: a send's payload is cut into datagrams of this many bytes (a u16; Linux 4.18).
pub const UDP_SEGMENT: libc::c_int = 103;
/// Payload of one segmented UDP send: what one IPv4 datagram can carry (the kernel's bound).
pub const UDP_MAX_SEGMENTED_BYTES: usize = 65_507;

/// Whether, and how far, a UDP socket's sends may be segmented (engine/udp_batch.rs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Segmenting {
    /// Never: a service's socketpair (it would take a segmented send as one message), or a
    /// kernel without UDP_SEGMENT (it would ignore the control message and do the same).
    #[default]
    Never,
    /// An IPv4 socket: what fits its route's MTU, read before each group.
    RouteMtu,
    /// An IPv6 socket: up to [`UDP_MAX_SEGMENTED_BYTES`].
    Full,
}

const SO_MEMINFO: libc::c_int = 55;

/// What a TCP socket's send buffer takes now, as the kernel counts it: its size less what
/// is queued (SO_MEMINFO, one call: `SK_MEMINFO_SNDBUF - SK_MEMINFO_WMEM_QUEUED`). The
/// kernel counts each queued buffer whole (its truesize), so a write of this many bytes
/// may be cut a little short; it is what the socket takes without blocking, give or take.
pub fn send_room(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut info = [0u32; 9];
    let mut len = size_of_val(&info) as libc::socklen_t;
    // SAFETY: info and len are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_MEMINFO, info.as_mut_ptr() as *mut libc::c_void, &mut len)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let sndbuf = info[libc::SK_MEMINFO_SNDBUF as usize] as usize;
    let queued = info[libc::SK_MEMINFO_WMEM_QUEUED as usize] as usize;
    Ok(sndbuf.saturating_sub(queued))
}

/// The pending error of a socket (SO_ERROR), 0 when none.
pub fn take_error(fd: BorrowedFd<'_>) -> i32 {
    get_int(fd, libc::SOL_SOCKET, libc::SO_ERROR).unwrap_or(libc::EIO)
}

/// The descriptor number from which a new guest flow's socket is refused: the open-file
/// limit less `reserve` (at most half of it, so that a low limit still leaves guests some).
pub fn fd_ceiling(reserve: usize) -> libc::rlim_t {
    limit_less(reserve, 2)
}

/// Descriptors that a published port's connections leave to the API and the services when
/// host clients would take all the others (at most an eighth of the limit).
pub const PUBLISHED_KEEP: usize = 32;

/// The descriptor number from which a published port's new connections wait in its
/// backlog: the open-file limit less [`PUBLISHED_KEEP`].
pub fn published_fd_ceiling() -> libc::rlim_t {
    limit_less(PUBLISHED_KEEP, 8)
}

/// The open-file limit less `keep`, or less a `1/of` of it if that is fewer.
fn limit_less(keep: usize, of: libc::rlim_t) -> libc::rlim_t {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur == libc::RLIM_INFINITY {
        return libc::RLIM_INFINITY;
    }
    let cur = lim.rlim_cur;
    cur - (keep as libc::rlim_t).min(cur / of)
}

/// The number the next descriptor this process opens would get (the lowest free one), found
/// by duplicating `fd` there and closing the copy.
pub fn lowest_free_fd(fd: BorrowedFd<'_>) -> io::Result<RawFd> {
    // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor that we own and close at once.
    let copy = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if copy < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `copy` was just made, and nothing else knows it.
    drop(unsafe { OwnedFd::from_raw_fd(copy) });
    Ok(copy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    /// The translator relies on SO_PEEK_OFF semantics of TCP sockets: peeks advance the
    /// offset, a discard moves it back by the discarded amount, and 0 rewinds.
    #[test]
    fn peek_offset_semantics_on_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        c.write_all(&data).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let fd = s.as_fd();
        set_peek_offset(fd, 0).unwrap();
        let mut b = [0u8; 10];
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 0);
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 10);
        assert_eq!(discard(fd, 5, true).unwrap(), 5);
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 20, "offset moved back by the discarded amount");
        set_peek_offset(fd, 0).unwrap();
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 5, "rewound to the front");
    }

    /// `connect_completed` says whether a connect has its peer: yes once a connect to a
    /// listening port is done (on the loopback, usually within connect(2) itself, which
    /// still says EINPROGRESS), no for a refused one (whose error is left for SO_ERROR, as
    /// for any connect). Over IPv4 and, where the host has it, IPv6.
    #[test]
    fn connect_completed_tells_a_connected_socket_from_a_refused_one() {
        let wait = |fd: BorrowedFd<'_>| {
            let mut p = [nix::poll::PollFd::new(fd, nix::poll::PollFlags::POLLOUT)];
            assert_eq!(nix::poll::poll(&mut p, 2000u16).unwrap(), 1, "the connect ended");
        };
        for lo in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(l) = TcpListener::bind(lo) else { continue };
            let to = l.local_addr().unwrap();
            let fd = socket_for(to.ip(), libc::SOCK_STREAM, 0).unwrap();
            if !connect(fd.as_fd(), to).unwrap() {
                wait(fd.as_fd());
            }
            assert!(connect_completed(fd.as_fd()), "{to}: connected");
            l.accept().unwrap();

            let gone = TcpListener::bind(lo).unwrap().local_addr().unwrap();
            let fd = socket_for(gone.ip(), libc::SOCK_STREAM, 0).unwrap();
            match connect(fd.as_fd(), gone) {
                Ok(false) => {
                    wait(fd.as_fd());
                    assert!(!connect_completed(fd.as_fd()), "{gone}: a refused connect has no peer");
                    assert_eq!(take_error(fd.as_fd()), libc::ECONNREFUSED);
                }
                Ok(true) => panic!("{gone}: connected to a closed port"),
                Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED)),
            }
        }
    }

    /// `send_room` (what the TCP window is sized from) says how much a socket takes: about
    /// its send buffer when nothing is queued, and at most a buffer's worth once a peer that
    /// never reads has filled it; writing that much (less a little: the kernel counts whole
    /// buffers) goes through without blocking.
    #[test]
    fn send_room_of_a_tcp_socket() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_peer, _) = l.accept().unwrap();
        c.set_nonblocking(true).unwrap();
        let fd = c.as_fd();
        let sndbuf = get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap() as usize;
        let empty = send_room(fd).unwrap();
        assert!(empty > 0 && empty <= sndbuf, "room {empty}, send buffer {sndbuf}");
        let chunk = vec![1u8; empty / 2];
        assert_eq!(send(fd, &chunk).unwrap(), chunk.len(), "half the room goes at once");
        // The peer never reads: fill its receive buffer and ours.
        let mut total = chunk.len();
        loop {
            match send(fd, &chunk) {
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
            assert!(total < 1 << 30);
        }
        let full = send_room(fd).unwrap();
        let sndbuf = get_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap() as usize;
        assert!(full < sndbuf / 2, "room {full} once full, send buffer {sndbuf}");
    }

    #[test]
    fn peek_offset_semantics_on_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (&a).write_all(&[1, 2, 3, 4, 5, 6]).unwrap();
        let fd = b.as_fd();
        set_peek_offset(fd, 0).unwrap();
        let mut x = [0u8; 2];
        recv(fd, &mut x, true).unwrap();
        recv(fd, &mut x, true).unwrap();
        assert_eq!(x, [3, 4]);
        assert_eq!(discard(fd, 2, false).unwrap(), 2);
        recv(fd, &mut x, true).unwrap();
        assert_eq!(x, [5, 6]);
    }

    /// recv_two: nothing waiting is 0 datagrams; a lone datagram comes back as one (the
    /// queue was empty after it); three come as two and then one, each in its own buffer,
    /// with its sender and its real length when it did not fit; a pending ICMP error is
    /// the call's error.
    #[test]
    fn recv_two_reads_up_to_two_and_says_when_the_queue_ran_dry() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        let from = tx.local_addr().unwrap();
        let (mut a, mut b) = ([0u8; 8], [0u8; 8]);
        assert_eq!(recv_two(rx.as_fd(), &mut a, &mut b).unwrap().count, 0);

        tx.send_to(b"one", to).unwrap();
        let got = recv_two(rx.as_fd(), &mut a, &mut b).unwrap();
        assert_eq!((got.count, got.len[0], got.from[0]), (1, 3, Some(from)));
        assert_eq!(&a[..3], b"one");

        tx.send_to(b"first", to).unwrap();
        tx.send_to(b"a second, too long", to).unwrap();
        tx.send_to(b"third", to).unwrap();
        let got = recv_two(rx.as_fd(), &mut a, &mut b).unwrap();
        assert_eq!(got.count, 2);
        assert_eq!((got.len, got.from), ([5, 18], [Some(from), Some(from)]));
        assert_eq!((&a[..5], &b[..]), (&b"first"[..], &b"a second"[..]));
        let got = recv_two(rx.as_fd(), &mut a, &mut b).unwrap();
        assert_eq!((got.count, got.len[0]), (1, 5));
        assert_eq!(&a[..5], b"third");

        // A connected socket whose datagram met a closed port: ECONNREFUSED first.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let gone = closed.local_addr().unwrap();
        drop(closed);
        let c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        c.connect(gone).unwrap();
        c.send(b"x").unwrap();
        // The ICMP comes back through loopback at once; wait for it all the same.
        let mut refused = None;
        for _ in 0..100 {
            match recv_two(c.as_fd(), &mut a, &mut b) {
                Err(e) => {
                    refused = e.raw_os_error();
                    break;
                }
                Ok(got) => assert_eq!(got.count, 0),
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(refused, Some(libc::ECONNREFUSED));
        assert_eq!(recv_two(c.as_fd(), &mut a, &mut b).unwrap().count, 0);
    }
}
