//! Socket-to-socket flows: a connection from the host's loopback to a published port of a
//! namespace guest, carried without the guest link at all.
//!
//! When the guest is a network namespace on this host (`usernet run`), a client on the
//! host's loopback needs no address translation: usernet opens a socket inside the guest's
//! namespace (setns for the duration of one socket(2) call), connects it to the published
//! port on the namespace's own loopback, and moves bytes between the two kernel sockets with
//! splice(2) through a pipe per direction, never copying them into user space. The guest
//! sees the connection come from its own 127.0.0.1, as with pasta. Each direction closes on
//! its own (shutdown(SHUT_WR) after EOF); an error on either side resets the other.
//!
//! The pipes of a flow that ends empty go back to the engine's [`PipePool`] for the next
//! flow, so a short connection (a request and its answer) costs no pipe2(2) and close(2)
//! calls of its own. A pipe starts at the kernel's default size and grows to 1 MiB once its
//! direction has moved 1 MiB (`GROW_AFTER` says why not at once).

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::Instant;

use super::tcp::Verdict;
use crate::engine::sock;

/// Bytes moved per splice call.
const CHUNK: usize = 1 << 20;
/// Pipe capacity of a bulk transfer (the kernel's default is 64 KiB): more per call.
const PIPE_SIZE: libc::c_int = 1 << 20;
/// Bytes a direction moves before its pipe is grown to `PIPE_SIZE`. The pages of every pipe
/// count against its user's pipe pages (fs.pipe-user-pages-soft, 16384 pages: 64 pipes of
/// 1 MiB), which all of that user's programs share; once past it, an unprivileged user's
/// new pipes are cut to 8 KiB, the shell's too. So only a flow that moves bulk data gets a
/// large pipe: 1,000 idle or short connections through a published port hold 2,000 pipes of
/// the default 16 pages, where pipes of 1 MiB would pass the limit at 32 connections.
const GROW_AFTER: u64 = 1 << 20;
/// Empty pipes kept for later flows: a few, since kept pipes count against the user's pipe
/// pages too.
const POOL_MAX: usize = 8;

struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// Bytes in the pipe, spliced from the source and not yet into the destination.
    queued: usize,
    /// Asked to grow to `PIPE_SIZE` (once; the kernel may refuse).
    grown: bool,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are fresh and owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { read, write, queued: 0, grown: false })
    }

    /// Asks for a `PIPE_SIZE` pipe: a larger pipe moves more per call. The kernel refuses
    /// when the user is past its pipe pages (EPERM); the default size works too.
    fn grow(&mut self) {
        self.grown = true;
        // SAFETY: F_SETPIPE_SZ takes an int argument.
        unsafe { libc::fcntl(self.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
    }
}

/// Empty pipes of flows that ended, for the next flows (one per engine: its thread only).
#[derive(Clone, Default)]
pub struct PipePool(Rc<RefCell<Vec<Pipe>>>);

impl PipePool {
    fn take(&self) -> io::Result<Pipe> {
        self.0.borrow_mut().pop().map_or_else(Pipe::new, Ok)
    }

    /// The two pipes of one flow, kept ones first. Fails (out of descriptors, say) with
    /// nothing taken: a pipe made for the first is kept for later.
    pub fn take_two(&self) -> io::Result<Pipes> {
        let first = self.take()?;
        match self.take() {
            Ok(second) => Ok(Pipes { pair: Some([first, second]), pool: self.clone() }),
            Err(e) => {
                self.give(first);
                Err(e)
            }
        }
    }

    /// Keeps `pipe` if it is empty and the pool has room; else it closes.
    fn give(&self, pipe: Pipe) {
        let mut pool = self.0.borrow_mut();
        if pipe.queued == 0 && pool.len() < POOL_MAX {
            pool.push(pipe);
        }
    }

    /// Pipes kept.
    pub fn len(&self) -> usize {
        self.0.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A flow's two pipes, [host to guest, guest to host]; back to their pool when dropped.
/// Taken before the flow's socket inside the guest is dialled, so that a shortage of
/// descriptors shows before the guest sees a connection.
pub struct Pipes {
    /// None only while being dropped: held inline, so a connection allocates nothing for them.
    pair: Option<[Pipe; 2]>,
    pool: PipePool,
}

impl Drop for Pipes {
    fn drop(&mut self) {
        for pipe in self.pair.take().into_iter().flatten() {
            self.pool.give(pipe);
        }
    }
}

/// One direction's state.
#[derive(Default, Clone, Copy)]
struct Direction {
    /// The source reached EOF.
    eof: bool,
    /// EOF was passed on: the destination's write side is shut.
    shut: bool,
}

pub struct SpliceFlow {
    /// The accepted connection on the host.
    pub host: OwnedFd,
    /// The socket inside the guest's namespace.
    pub guest: OwnedFd,
    connecting: bool,
    /// Where to connect instead if the guest refuses this connect: the guest's IPv4
    /// loopback when a client over IPv6 was first carried to the guest's [::1] (the guest
    /// may listen on IPv4 only).
    pub fallback: Option<SocketAddr>,
    /// The connect was refused and `fallback` is to be tried (by the engine, which has the
    /// namespace's sockets).
    pub refused: bool,
    /// Back to their pool when the flow ends.
    pipes: Pipes,
    dirs: [Direction; 2],
    pub id: u64,
    pub born: Instant,
    pub scheduled: Option<Instant>,
    /// Bytes each way (host to guest is direction 0) and activity, for `/v1/flows`.
    pub traffic: super::Traffic,
}

fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    // SAFETY: splice(2) between two descriptors we own; null offsets (sockets and pipes).
    let n = unsafe {
        libc::splice(
            from.as_raw_fd(),
            std::ptr::null_mut(),
            to.as_raw_fd(),
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_NONBLOCK | libc::SPLICE_F_MOVE,
        )
    };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

impl SpliceFlow {
    /// `guest` is a socket whose connect (inside the namespace) is under way or done;
    /// `pipes` come from the engine's [`PipePool`] ([`PipePool::take_two`]).
    pub fn new(host: OwnedFd, guest: OwnedFd, connected: bool, id: u64, pipes: Pipes, now: Instant) -> SpliceFlow {
        SpliceFlow {
            host,
            guest,
            connecting: !connected,
            fallback: None,
            refused: false,
            pipes,
            dirs: [Direction::default(); 2],
            id,
            born: now,
            scheduled: None,
            traffic: super::Traffic::new(now),
        }
    }

    /// Carries on with `guest`, a socket connecting to [`SpliceFlow::fallback`] (the first
    /// was refused); the old one closes.
    pub fn redial(&mut self, guest: OwnedFd, connected: bool) {
        self.guest = guest;
        self.connecting = !connected;
        self.fallback = None;
        self.refused = false;
    }

    /// Either socket changed readiness: move what can be moved, both ways.
    pub fn on_event(&mut self) -> Verdict {
        if self.connecting {
            let err = sock::take_error(self.guest.as_fd());
            if err == libc::ECONNREFUSED && self.fallback.is_some() {
                self.refused = true;
                return Verdict::Keep;
            }
            if err != 0 {
                tracing::debug!("published port inside the namespace: {}", io::Error::from_raw_os_error(err));
                sock::set_linger_zero(self.host.as_fd());
                return Verdict::Close;
            }
            // Not yet connected: a zero-length peek tells (ENOTCONN while in progress).
            let mut none = [0u8; 0];
            match sock::recv(self.guest.as_fd(), &mut none, true) {
                Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => return Verdict::Keep,
                _ => self.connecting = false,
            }
        }
        let before = self.traffic.from_guest + self.traffic.to_guest;
        for dir in 0..2 {
            if let Err(e) = self.pump(dir) {
                tracing::debug!("spliced connection: {e}");
                sock::set_linger_zero(self.host.as_fd());
                sock::set_linger_zero(self.guest.as_fd());
                return Verdict::Close;
            }
        }
        if self.traffic.from_guest + self.traffic.to_guest != before {
            self.traffic.last = Instant::now();
        }
        if self.dirs[0].shut && self.dirs[1].shut { Verdict::Close } else { Verdict::Keep }
    }

    /// Moves bytes in one direction until a side would block.
    fn pump(&mut self, dir: usize) -> io::Result<()> {
        let (src, dst) = if dir == 0 { (&self.host, &self.guest) } else { (&self.guest, &self.host) };
        let Some(pipes) = self.pipes.pair.as_mut() else { return Ok(()) };
        let pipe = &mut pipes[dir];
        let state = &mut self.dirs[dir];
        let moved = if dir == 0 { &mut self.traffic.to_guest } else { &mut self.traffic.from_guest };
        loop {
            while pipe.queued > 0 {
                match splice(pipe.read.as_fd(), dst.as_fd(), pipe.queued) {
                    Ok(n) => {
                        pipe.queued -= n.min(pipe.queued);
                        *moved += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if state.eof {
                if !state.shut {
                    sock::shutdown_write(dst.as_fd());
                    state.shut = true;
                }
                return Ok(());
            }
            match splice(src.as_fd(), pipe.write.as_fd(), CHUNK) {
                Ok(0) => state.eof = true,
                Ok(n) => {
                    pipe.queued += n;
                    if !pipe.grown && *moved + pipe.queued as u64 >= GROW_AFTER {
                        pipe.grow();
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl SpliceFlow {
        fn pipes(&self) -> &[Pipe; 2] {
            self.pipes.pair.as_ref().expect("a live flow has its pipes")
        }
    }

    /// A host-side stand-in and a socket whose connect to a closed loopback port is under
    /// way (the refusal is already waiting in SO_ERROR).
    fn refused_pair() -> (OwnedFd, OwnedFd) {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = closed.local_addr().unwrap();
        drop(closed);
        let (host, _) = std::os::unix::net::UnixStream::pair().unwrap();
        let guest = sock::socket(libc::SOCK_STREAM, 0).unwrap();
        let _ = sock::connect(guest.as_fd(), to);
        (host.into(), guest)
    }

    /// With several engines, a spliced connection counts among its engine's TCP flows in
    /// the owner map (a new connection then goes to an engine holding fewer), from the
    /// moment the table holds it, whether it came before or after the map was shared.
    #[test]
    fn a_splice_counts_among_its_engines_tcp_flows() {
        use std::os::unix::net::UnixStream;
        let pool = PipePool::default();
        let splice = |id| {
            let (h, _) = UnixStream::pair().unwrap();
            let (g, _) = UnixStream::pair().unwrap();
            super::super::Flow::Splice(SpliceFlow::new(
                h.into(),
                g.into(),
                true,
                id,
                pool.take_two().unwrap(),
                Instant::now(),
            ))
        };
        let mut table = super::super::FlowTable::default();
        let before = table.insert(splice(1), None);
        let owners = std::sync::Arc::new(super::super::owners::Owners::default());
        table.share_owners(owners.clone(), 0);
        assert_eq!(owners.tcp_flows(0), 1);
        let after = table.insert(splice(2), None);
        assert_eq!(owners.tcp_flows(0), 2);
        assert_eq!(owners.fewer_tcp_flows_than(0, 2), Some(1));
        assert_eq!(table.len(), 2);
        assert!(table.remove(before).is_some() && table.remove(after).is_some());
        assert_eq!(owners.tcp_flows(0), 0);
        assert!(table.remove(after).is_none(), "removed once");
        assert_eq!(owners.tcp_flows(0), 0);
    }

    /// An ended flow's empty pipes serve the next flow, which moves bytes through them; a
    /// pipe with bytes left in it is closed, and the pool keeps at most POOL_MAX.
    #[test]
    fn ended_flows_leave_their_empty_pipes_to_the_next() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let pool = PipePool::default();
        let (h, _client) = UnixStream::pair().unwrap();
        let (g, _server) = UnixStream::pair().unwrap();
        let first = SpliceFlow::new(h.into(), g.into(), true, 1, pool.take_two().unwrap(), Instant::now());
        let mut used: Vec<RawFd> = first.pipes().iter().map(|p| p.read.as_raw_fd()).collect();
        drop(first);
        assert_eq!(pool.len(), 2);

        let (h, mut client) = UnixStream::pair().unwrap();
        let (g, mut server) = UnixStream::pair().unwrap();
        for s in [&h, &g] {
            s.set_nonblocking(true).unwrap();
        }
        let mut second = SpliceFlow::new(h.into(), g.into(), true, 2, pool.take_two().unwrap(), Instant::now());
        assert!(pool.is_empty());
        let mut again: Vec<RawFd> = second.pipes().iter().map(|p| p.read.as_raw_fd()).collect();
        used.sort_unstable();
        again.sort_unstable();
        assert_eq!(used, again, "the same two pipes");
        client.write_all(b"request").unwrap();
        server.write_all(b"answer").unwrap();
        assert_eq!(second.on_event(), Verdict::Keep);
        let mut buf = [0u8; 7];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"request");
        client.read_exact(&mut buf[..6]).unwrap();
        assert_eq!(&buf[..6], b"answer");
        drop(second);
        assert_eq!(pool.len(), 2);

        let mut full = Pipe::new().unwrap();
        full.queued = 1;
        pool.give(full);
        assert_eq!(pool.len(), 2, "a pipe with bytes in it is not kept");
        for _ in 0..POOL_MAX + 3 {
            pool.give(Pipe::new().unwrap());
        }
        assert_eq!(pool.len(), POOL_MAX);
    }

    /// A direction's pipe keeps the kernel's default size until it has moved GROW_AFTER
    /// bytes, then grows to PIPE_SIZE; the other direction's stays as it was.
    #[test]
    fn a_pipe_grows_only_for_bulk() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let pool = PipePool::default();
        let (h, mut client) = UnixStream::pair().unwrap();
        let (g, mut server) = UnixStream::pair().unwrap();
        for s in [&h, &g, &server] {
            s.set_nonblocking(true).unwrap();
        }
        let mut flow = SpliceFlow::new(h.into(), g.into(), true, 1, pool.take_two().unwrap(), Instant::now());
        // SAFETY: F_GETPIPE_SZ takes no argument.
        let size = |p: &Pipe| unsafe { libc::fcntl(p.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        let default = size(&flow.pipes()[0]);
        assert!(default > 0 && default < PIPE_SIZE);

        client.write_all(b"short").unwrap();
        assert_eq!(flow.on_event(), Verdict::Keep);
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(server.read(&mut buf).unwrap(), 5);
        assert_eq!(size(&flow.pipes()[0]), default, "a few bytes keep the default pipe");

        let total = 2 * GROW_AFTER as usize;
        let writer = std::thread::spawn(move || client.write_all(&vec![7u8; total]).map(|_| client));
        let mut got = 0;
        while got < total {
            assert_eq!(flow.on_event(), Verdict::Keep);
            match server.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        let _client = writer.join().unwrap().unwrap();
        assert_eq!(size(&flow.pipes()[0]), PIPE_SIZE, "bulk grows its pipe");
        assert_eq!(size(&flow.pipes()[1]), default, "the quiet direction's pipe is as it was");
    }

    #[test]
    fn a_refused_connect_with_a_fallback_asks_for_it() {
        let (host, guest) = refused_pair();
        let mut flow = SpliceFlow::new(host, guest, false, 1, PipePool::default().take_two().unwrap(), Instant::now());
        flow.fallback = Some("127.0.0.1:80".parse().unwrap());
        assert_eq!(flow.on_event(), Verdict::Keep);
        assert!(flow.refused);
        let (_, fresh) = refused_pair();
        flow.redial(fresh, false);
        assert!(!flow.refused && flow.fallback.is_none());
        // Refused again, with no fallback left: the flow ends.
        assert_eq!(flow.on_event(), Verdict::Close);
    }

    #[test]
    fn a_refused_connect_without_a_fallback_ends_the_flow() {
        let (host, guest) = refused_pair();
        let mut flow = SpliceFlow::new(host, guest, false, 1, PipePool::default().take_two().unwrap(), Instant::now());
        assert_eq!(flow.on_event(), Verdict::Close);
        assert!(!flow.refused);
    }
}
