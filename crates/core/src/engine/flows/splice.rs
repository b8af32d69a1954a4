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
//! calls of its own; a direction's pipe goes back as soon as that direction has ended,
//! which for a request and its answer is while the client still reads the answer (and the
//! loop accepts the next clients meanwhile: a burst of them found the pool empty). A pipe
//! starts at the kernel's default size and grows to 1 MiB once its direction has moved
//! 1 MiB (`GROW_AFTER` says why not at once).

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
            Ok(second) => Ok(Pipes { pair: [Some(first), Some(second)], pool: self.clone() }),
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
    /// Held inline, so a connection allocates nothing for them; None once its direction has
    /// ended (given back early, [`Pipes::give_back`]).
    pair: [Option<Pipe>; 2],
    pool: PipePool,
}

impl Pipes {
    /// Direction `dir` has ended: its pipe (empty) goes back to the pool now.
    fn give_back(&mut self, dir: usize) {
        if let Some(pipe) = self.pair[dir].take() {
            self.pool.give(pipe);
        }
    }
}

impl Drop for Pipes {
    fn drop(&mut self) {
        for dir in 0..2 {
            self.give_back(dir);
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
    /// No byte has moved to or from the guest's socket yet: its connect may still be under
    /// way (or done, with nothing said yet). A refusal is told by the first splice that
    /// meets it; only an end of stream to pass on asks the kernel ([`SpliceFlow::connect_done`]).
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

    /// Connected, and the guest's end of stream not passed on to the host yet (see
    /// `Flow::guest_still_sending`).
    pub fn guest_still_sending(&self) -> bool {
        !self.connecting && !self.dirs[1].shut
    }

    /// Makes the host socket's close a reset.
    pub fn reset_on_close(&mut self) {
        sock::set_linger_zero(self.host.as_fd());
    }

    /// Either socket changed readiness: move what can be moved, both ways.
    ///
    /// A connect under way is not asked about (getsockopt(2) and a peek, two calls each
    /// connection): the moves tell. Until the guest's socket connects, a splice to it or from
    /// it says EAGAIN, and once refused it says so (ECONNREFUSED, from SO_ERROR); the first
    /// byte that goes either way shows it connected. Only the end of the client's stream
    /// needs an answer first, since a shutdown(2) would end a connect under way.
    pub fn on_event(&mut self) -> Verdict {
        let before = self.traffic.from_guest + self.traffic.to_guest;
        for dir in 0..2 {
            if let Err(e) = self.pump(dir) {
                if self.connecting {
                    if e.raw_os_error() == Some(libc::ECONNREFUSED) && self.fallback.is_some() {
                        self.refused = true;
                        return Verdict::Keep;
                    }
                    tracing::debug!("published port inside the namespace, before any byte: {e}");
                } else {
                    tracing::debug!("spliced connection: {e}");
                }
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

    /// Whether the guest's socket has connected, asked of the kernel: its error if it failed,
    /// and whether it has a peer (getpeername(2) fails while the SYN is out). A zero-length
    /// peek, which this asked before, says EAGAIN then, as it does once connected.
    fn connect_done(&mut self) -> io::Result<bool> {
        let err = sock::take_error(self.guest.as_fd());
        if err != 0 {
            return Err(io::Error::from_raw_os_error(err));
        }
        self.connecting = !sock::connect_completed(self.guest.as_fd());
        Ok(!self.connecting)
    }

    /// Moves bytes in one direction until a side would block.
    fn pump(&mut self, dir: usize) -> io::Result<()> {
        // The guest's end of this direction: its destination for 0, its source for 1.
        let to_guest = dir == 0;
        loop {
            let (src, dst) = if to_guest { (&self.host, &self.guest) } else { (&self.guest, &self.host) };
            // No pipe: this direction has ended, and gave it back.
            let Some(pipe) = self.pipes.pair[dir].as_mut() else { return Ok(()) };
            let moved = if to_guest { &mut self.traffic.to_guest } else { &mut self.traffic.from_guest };
            while pipe.queued > 0 {
                match splice(pipe.read.as_fd(), dst.as_fd(), pipe.queued) {
                    Ok(n) => {
                        pipe.queued -= n.min(pipe.queued);
                        *moved += n as u64;
                        self.connecting &= !to_guest;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if self.dirs[dir].eof {
                if !self.dirs[dir].shut {
                    if self.dirs[1 - dir].shut {
                        // The other way is done too: the flow closes now, and close(2)
                        // sends the FIN that shutdown(2) would (nothing is left unread).
                    } else if to_guest && self.connecting && !self.connect_done()? {
                        return Ok(()); // shut once connected: the connect's event comes back here
                    } else {
                        let dst = if to_guest { &self.guest } else { &self.host };
                        sock::shutdown_write(dst.as_fd());
                    }
                    self.dirs[dir].shut = true;
                    self.pipes.give_back(dir);
                }
                return Ok(());
            }
            match splice(src.as_fd(), pipe.write.as_fd(), CHUNK) {
                Ok(0) => self.dirs[dir].eof = true,
                Ok(n) => {
                    pipe.queued += n;
                    self.connecting &= to_guest;
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
        fn pipes(&self) -> [&Pipe; 2] {
            self.pipes.pair.each_ref().map(|p| p.as_ref().expect("both directions live"))
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
        let default = size(flow.pipes()[0]);
        assert!(default > 0 && default < PIPE_SIZE);

        client.write_all(b"short").unwrap();
        assert_eq!(flow.on_event(), Verdict::Keep);
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(server.read(&mut buf).unwrap(), 5);
        assert_eq!(size(flow.pipes()[0]), default, "a few bytes keep the default pipe");

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
        assert_eq!(size(flow.pipes()[0]), PIPE_SIZE, "bulk grows its pipe");
        assert_eq!(size(flow.pipes()[1]), default, "the quiet direction's pipe is as it was");
    }

    /// A connect still under way (the guest's listener has no room: its SYN is dropped and
    /// sent again a second later) holds the client's bytes and the end of its stream, and
    /// passes both on once it completes: the end is not a shutdown(2) that would abort it.
    /// With bytes, the end waits behind them in the pipe; without, it waits on its own.
    #[test]
    fn a_connect_under_way_keeps_the_clients_bytes_and_end() {
        connect_under_way(b"hello");
        connect_under_way(b"");
    }

    fn connect_under_way(payload: &[u8]) {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let listener = sock::socket(libc::SOCK_STREAM, 0).unwrap();
        sock::bind(listener.as_fd(), "127.0.0.1:0".parse().unwrap()).unwrap();
        // SAFETY: listen(2) on a socket we own; a backlog of 0 queues one connection.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let listener = std::net::TcpListener::from(listener);
        let to = listener.local_addr().unwrap();
        let _queued = std::net::TcpStream::connect(to).unwrap();
        let guest = sock::socket(libc::SOCK_STREAM, 0).unwrap();
        assert!(!sock::connect(guest.as_fd(), to).unwrap());
        let (h, mut client) = UnixStream::pair().unwrap();
        h.set_nonblocking(true).unwrap();
        let mut flow =
            SpliceFlow::new(h.into(), guest, false, 1, PipePool::default().take_two().unwrap(), Instant::now());
        client.write_all(payload).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(flow.on_event(), Verdict::Keep);
        assert!(flow.connecting, "the SYN found no room");
        assert_eq!(flow.pipes()[0].queued, payload.len(), "the bytes wait in the pipe");
        assert!(!flow.dirs[0].shut, "the end waits for the connect");
        assert_eq!(flow.dirs[0].eof, payload.is_empty());
        // Room for it: the first queued connection is taken; the SYN comes again.
        let (_first, _) = listener.accept().unwrap();
        listener.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut server = loop {
            assert_eq!(flow.on_event(), Verdict::Keep);
            if let Ok((s, _)) = listener.accept() {
                break s;
            }
            assert!(Instant::now() < deadline, "the connect never completed");
            std::thread::sleep(std::time::Duration::from_millis(10));
        };
        assert_eq!(flow.on_event(), Verdict::Keep);
        assert!(!flow.connecting && flow.dirs[0].shut);
        server.set_nonblocking(false).unwrap();
        server.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).unwrap();
        assert_eq!(got, payload, "the bytes, then the end of the stream");
    }

    /// When the second direction ends, the flow closes without a shutdown(2) of its own: the
    /// close(2) sends the FIN, and the guest sees the end of the stream, not a reset.
    #[test]
    fn the_last_end_is_passed_on_by_the_close() {
        use std::io::{Read, Write};
        use std::os::unix::net::UnixStream;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let guest = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        guest.set_nonblocking(true).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        server.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let (h, mut client) = UnixStream::pair().unwrap();
        h.set_nonblocking(true).unwrap();
        client.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let pool = PipePool::default();
        let mut flow = SpliceFlow::new(h.into(), guest.into(), true, 1, pool.take_two().unwrap(), Instant::now());
        let mut buf = [0u8; 4];

        client.write_all(b"ping").unwrap();
        assert_eq!(flow.on_event(), Verdict::Keep);
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        // The guest answers and ends its side first: passed on with a shutdown(2).
        server.write_all(b"pong").unwrap();
        server.shutdown(std::net::Shutdown::Write).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while !flow.dirs[1].shut {
            assert_eq!(flow.on_event(), Verdict::Keep);
            assert!(Instant::now() < deadline, "the guest's end never came through");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(pool.len(), 1, "the ended direction's pipe is back already");
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"pong");
        // Then the client ends its side: the flow closes, and dropping it is the FIN.
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(flow.on_event(), Verdict::Close);
        assert!(flow.dirs[0].shut);
        drop(flow);
        assert_eq!(server.read(&mut buf).unwrap(), 0, "the end of the stream, not a reset");
        assert_eq!(pool.len(), 2, "both pipes back, empty");
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
