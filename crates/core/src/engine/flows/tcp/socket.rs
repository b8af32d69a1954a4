//! The host socket as the translator sees it: a byte stream it peeks at (from a peek
//! offset that advances with each peek), discards once the guest acknowledged, writes into,
//! half-closes, resets, and asks for its pending error. Nothing else.
//!
//! [`KernelSocket`] is the real one: each method is one call of `sock` (one system call,
//! two for a discard on a socketpair that needs several reads). The flow is generic over
//! the trait, so this costs nothing: the calls are resolved at compile time and inlined.
//! Tests use an in-memory model instead (`model::ModelSocket`).

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
}

impl KernelSocket {
    pub fn new(fd: OwnedFd, is_tcp: bool) -> KernelSocket {
        KernelSocket { fd, is_tcp }
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
        sock::recv(self.fd.as_fd(), buf, true)
    }

    #[inline]
    fn set_peek_offset(&mut self, offset: usize) -> io::Result<()> {
        sock::set_peek_offset(self.fd.as_fd(), i32::try_from(offset).unwrap_or(i32::MAX))
    }

    #[inline]
    fn discard(&mut self, n: usize) -> io::Result<usize> {
        sock::discard(self.fd.as_fd(), n, self.is_tcp)
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
