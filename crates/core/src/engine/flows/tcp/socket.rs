//! The host socket as the translator sees it: a byte stream it peeks at (from a peek
//! offset that advances with each peek), discards once the guest acknowledged, writes into,
//! half-closes, resets, and asks for its pending error. Nothing else.
//!
//! [`KernelSocket`] is the real one: each method is at most one call of `sock` (one system
//! call, more for a discard on a socketpair that needs several reads). The kernel's peek
//! offset (SO_PEEK_OFF) is set only once a peek must start past the front of the receive
//! queue; until then the offset is kept here, and a peek at offset 0 is a plain MSG_PEEK.
//! A connection whose every answer is acknowledged (and so discarded) before the next one
//! is peeked never needs it, which saves a request/response connection its setsockopt(2).
//!
//! Discards are not deferred to batch them: acknowledged bytes left at the front of the
//! queue keep the whole socket buffer they arrived in charged to the receive buffer, and
//! with loopback's 64 KiB segments a few bytes of one can shut the window to the host's
//! peer while nothing else is queued to be peeked, so no edge would ever come (tried:
//! parallel downloads stalled).
//!
//! The flow is generic over the trait, so this costs nothing: the calls are resolved at
//! compile time and inlined. Tests use an in-memory model instead (`model::ModelSocket`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::engine::sock;

/// What the TCP translator needs of its host socket. Every call is non-blocking: where the
/// kernel would block, the call fails with `ErrorKind::WouldBlock`.
pub trait HostSocket {
    /// Copies bytes from the receive queue, starting at the peek offset, into `buf` without
    /// consuming them, and moves the peek offset past them (MSG_PEEK with SO_PEEK_OFF).
    /// `Ok(0)`: end of stream at the peek offset (the peer shut its side and there is
    /// nothing past the offset).
    fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sets the peek offset, counted from the front of the receive queue.
    fn set_peek_offset(&mut self, offset: usize) -> io::Result<()>;
    /// Drops `n` bytes from the front of the receive queue; the peek offset moves back by as
    /// many. Returns how many were dropped.
    fn discard(&mut self, n: usize) -> io::Result<usize>;
    /// Writes what the send buffer takes now; returns how much that was.
    fn send(&mut self, data: &[u8]) -> io::Result<usize>;
    /// Half-closes: the peer reads end of stream after what was sent.
    fn shutdown_write(&mut self);
    /// Makes dropping the socket reset the connection instead of closing it gracefully.
    fn set_linger_zero(&mut self);
    /// Takes the socket's pending error (SO_ERROR); 0 when there is none.
    fn take_error(&mut self) -> i32;
    /// How many bytes the send buffer takes now, about (see `sock::send_room`); None when
    /// the socket cannot say (a socketpair: a gateway service, which reads all it is sent).
    fn send_room(&mut self) -> Option<usize>;
    /// For invariant checks only: the peek offset and the length of the receive queue, when
    /// they can be known without a system call (a model can; the kernel socket says None).
    fn inspect(&self) -> Option<(usize, usize)> {
        None
    }
}

/// A kernel socket: a connected TCP socket, or one end of a socketpair (gateway services,
/// tests), which has no copy-free discard.
pub struct KernelSocket {
    fd: OwnedFd,
    is_tcp: bool,
    /// SO_PEEK_OFF is set: the kernel keeps the offset from now on.
    kernel_offset: bool,
    /// The peek offset while the kernel keeps none.
    offset: usize,
}

impl KernelSocket {
    pub fn new(fd: OwnedFd, is_tcp: bool) -> KernelSocket {
        KernelSocket { fd, is_tcp, kernel_offset: false, offset: 0 }
    }
}

impl AsFd for KernelSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for KernelSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl HostSocket for KernelSocket {
    #[inline]
    fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.kernel_offset && self.offset > 0 {
            // The first peek that starts past the front: from now on the kernel keeps it.
            sock::set_peek_offset(self.fd.as_fd(), i32::try_from(self.offset).unwrap_or(i32::MAX))?;
            self.kernel_offset = true;
        }
        let n = sock::recv(self.fd.as_fd(), buf, true)?;
        if !self.kernel_offset {
            self.offset = n;
        }
        Ok(n)
    }

    #[inline]
    fn set_peek_offset(&mut self, offset: usize) -> io::Result<()> {
        if self.kernel_offset {
            sock::set_peek_offset(self.fd.as_fd(), i32::try_from(offset).unwrap_or(i32::MAX))
        } else {
            self.offset = offset;
            Ok(())
        }
    }

    #[inline]
    fn discard(&mut self, n: usize) -> io::Result<usize> {
        let done = sock::discard(self.fd.as_fd(), n, self.is_tcp)?;
        // The kernel moves its own offset back as far (to the front at most).
        self.offset = self.offset.saturating_sub(done);
        Ok(done)
    }

    #[inline]
    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        sock::send(self.fd.as_fd(), data)
    }

    #[inline]
    fn shutdown_write(&mut self) {
        sock::shutdown_write(self.fd.as_fd());
    }

    #[inline]
    fn set_linger_zero(&mut self) {
        sock::set_linger_zero(self.fd.as_fd());
    }

    #[inline]
    fn take_error(&mut self) -> i32 {
        sock::take_error(self.fd.as_fd())
    }

    #[inline]
    fn send_room(&mut self) -> Option<usize> {
        if self.is_tcp { sock::send_room(self.fd.as_fd()).ok() } else { None }
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::ModelSocket;
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    /// A connected TCP pair on loopback: (ours, as a KernelSocket; the peer).
    fn tcp_pair() -> (KernelSocket, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        // Small writes go at once, not after the ACK of the one before (Nagle).
        peer.set_nodelay(true).unwrap();
        let (ours, _) = l.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (KernelSocket::new(OwnedFd::from(ours), true), peer)
    }

    fn kernel_peek_offset(s: &KernelSocket) -> i32 {
        sock::get_int(s.as_fd(), libc::SOL_SOCKET, libc::SO_PEEK_OFF).unwrap()
    }

    fn queued(s: &KernelSocket) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one int.
        assert_eq!(unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) }, 0);
        n as usize
    }

    /// Request/response exchanges: every answer is acknowledged (discarded) before the next
    /// is peeked, so every peek starts at the front and the kernel's peek offset is never
    /// set; the peeks see each answer once, in order. A second peek before the discard
    /// starts past the front: that sets it, once, and the kernel keeps it from then on.
    #[test]
    fn answers_acknowledged_one_by_one_never_set_the_peek_offset() {
        let (mut ours, mut peer) = tcp_pair();
        let mut buf = [0u8; 64];
        let peek_some = |s: &mut KernelSocket, buf: &mut [u8]| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match s.peek(buf) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        assert!(std::time::Instant::now() < deadline, "nothing to peek for 5 s");
                        std::thread::yield_now()
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        for i in 0..20u8 {
            peer.write_all(&[i; 3]).unwrap();
            let n = peek_some(&mut ours, &mut buf);
            assert_eq!(&buf[..n], &[i; 3], "answer {i}, once");
            assert_eq!(ours.discard(n).unwrap(), n);
        }
        assert_eq!(kernel_peek_offset(&ours), -1, "SO_PEEK_OFF was never set");
        assert_eq!(queued(&ours), 0);

        peer.write_all(b"ab").unwrap();
        assert_eq!(peek_some(&mut ours, &mut buf[..1]), 1);
        assert_eq!(peek_some(&mut ours, &mut buf[1..2]), 1);
        assert_eq!(&buf[..2], b"ab");
        assert_eq!(kernel_peek_offset(&ours), 2, "the second peek set it");
        assert_eq!(ours.discard(1).unwrap(), 1);
        assert_eq!(kernel_peek_offset(&ours), 1, "and the kernel moves it back");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Peek(usize),
        /// Back to the acknowledged front (the flow's rewind).
        Rewind,
        /// Acknowledge this share (in 1/8) of what was peeked and not yet acknowledged.
        Ack(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..9000).prop_map(Op::Peek),
            1 => Just(Op::Rewind),
            3 => (0u8..=8).prop_map(Op::Ack),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any sequence of peeks, rewinds and acknowledgements of peeked bytes (what the flow
        /// does) reads the same bytes from a kernel socket, TCP or socketpair, as from the
        /// model, whose discards and offsets are the plain ones.
        #[test]
        fn the_kernel_socket_reads_as_the_model(ops in proptest::collection::vec(op(), 1..60), tcp: bool) {
            let data: Vec<u8> = (0..60_000u32).map(|i| (i % 251) as u8).collect();
            let (mut kernel, _keep): (KernelSocket, Box<dyn std::any::Any>) = if tcp {
                let (k, mut peer) = tcp_pair();
                peer.write_all(&data).unwrap();
                (k, Box::new(peer))
            } else {
                let (ours, mut peer) = std::os::unix::net::UnixStream::pair().unwrap();
                ours.set_nonblocking(true).unwrap();
                peer.write_all(&data).unwrap();
                (KernelSocket::new(OwnedFd::from(ours), false), Box::new(peer))
            };
            let mut model = ModelSocket::new(1 << 20, 1 << 20);
            model.peer_write(&data);
            // Wait until all of it is in our receive queue.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while queued(&kernel) < data.len() {
                assert!(std::time::Instant::now() < deadline, "data did not arrive");
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            // Flow-side bookkeeping: bytes acknowledged, and peeked (sent) beyond them.
            let (mut acked, mut sent, mut next) = (0usize, 0usize, 0usize);
            for op in ops {
                match op {
                    Op::Peek(len) => {
                        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
                        let (ka, mb) = (kernel.peek(&mut a), model.peek(&mut b));
                        match (ka, mb) {
                            (Ok(x), Ok(y)) => {
                                prop_assert_eq!(x, y);
                                prop_assert_eq!(&a[..x], &b[..y]);
                                prop_assert_eq!(&a[..x], &data[acked + next..acked + next + x]);
                                next += x;
                                sent = sent.max(next);
                            }
                            (Err(x), Err(y)) => prop_assert_eq!(x.kind(), y.kind()),
                            (x, y) => prop_assert!(false, "kernel {:?}, model {:?}", x, y),
                        }
                    }
                    Op::Rewind => {
                        kernel.set_peek_offset(0).unwrap();
                        model.set_peek_offset(0).unwrap();
                        next = 0;
                    }
                    Op::Ack(eighths) => {
                        let n = sent * eighths as usize / 8;
                        if n > 0 {
                            prop_assert_eq!(kernel.discard(n).unwrap(), model.discard(n).unwrap());
                            acked += n;
                            sent -= n;
                            // Acknowledged past a rewind: the offset is back at the new front.
                            next = next.saturating_sub(n);
                        }
                    }
                }
            }
        }
    }
}
