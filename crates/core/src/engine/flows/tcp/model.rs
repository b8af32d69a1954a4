//! An in-memory model of a connected host socket, for tests: two byte queues with bounded
//! buffers, SO_PEEK_OFF semantics, end of stream, errors, and the readiness edges that
//! epoll (edge-triggered) would report. The test plays the remote peer through the `peer_*`
//! methods; the flow sees only [`HostSocket`].
//!
//! The model is strict where the kernel would be lenient, so that it catches translator
//! bugs: it panics when the flow discards bytes the socket does not hold, sends after its
//! own shutdown(SHUT_WR), shuts down twice, or sets a peek offset past the queued data.

use std::io;

use super::HostSocket;

/// A byte queue: a vector read from `head` on (slice copies, not byte by byte).
#[derive(Default)]
struct Bytes {
    buf: Vec<u8>,
    head: usize,
}

impl Bytes {
    fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    fn as_slice(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    fn push(&mut self, data: &[u8]) {
        if self.head > 0 && self.head >= self.buf.len() / 2 {
            self.buf.drain(..self.head);
            self.head = 0;
        }
        self.buf.extend_from_slice(data);
    }

    fn pop(&mut self, n: usize) {
        assert!(n <= self.len());
        self.head += n;
    }
}

pub struct ModelSocket {
    /// Host-to-guest bytes: what the peer wrote and the flow has not discarded.
    rx: Bytes,
    /// How many bytes the peer may have queued at once (its view of our receive buffer).
    pub rx_cap: usize,
    peek_off: usize,
    /// The peer shut its write side: end of stream after `rx`.
    rx_eof: bool,
    /// Guest-to-host bytes: what the flow sent and the peer has not read.
    tx: Bytes,
    /// The send buffer: `send` takes at most `tx_cap - tx.len()` bytes.
    pub tx_cap: usize,
    /// The flow shut its write side (the guest's FIN).
    pub tx_shut: bool,
    /// A send was cut short: the peer's next read makes the socket writable (an edge).
    tx_blocked: bool,
    /// The connection failed (a reset): every call fails with this errno.
    broken: Option<i32>,
    /// The pending error SO_ERROR reports (and clears).
    so_error: Option<i32>,
    /// The flow asked for SO_LINGER 0: dropping the socket resets the connection.
    pub linger_zero: bool,
    // Readiness edges not yet delivered to the flow.
    edge_readable: bool,
    edge_writable: bool,
    edge_error: bool,
    /// End of stream or an error happened and the flow has not been told (EPOLLRDHUP).
    read_closed: bool,
    /// Calls the flow made, by kind (peeks, sends, discards, measures of the send room).
    pub calls: [u64; 4],
}

impl ModelSocket {
    pub fn new(rx_cap: usize, tx_cap: usize) -> ModelSocket {
        ModelSocket {
            rx: Bytes::default(),
            rx_cap,
            peek_off: 0,
            rx_eof: false,
            tx: Bytes::default(),
            tx_cap,
            tx_shut: false,
            tx_blocked: false,
            broken: None,
            so_error: None,
            linger_zero: false,
            edge_readable: false,
            edge_writable: false,
            edge_error: false,
            read_closed: false,
            calls: [0; 4],
        }
    }

    /// The peer writes: as much of `data` as the receive buffer takes; returns how much.
    pub fn peer_write(&mut self, data: &[u8]) -> usize {
        assert!(!self.rx_eof, "the peer writes after its shutdown");
        if self.broken.is_some() {
            return 0;
        }
        let n = data.len().min(self.rx_cap.saturating_sub(self.rx.len()));
        self.rx.push(&data[..n]);
        if n > 0 {
            self.edge_readable = true;
        }
        n
    }

    /// Room for the peer to write now.
    pub fn peer_room(&self) -> usize {
        self.rx_cap.saturating_sub(self.rx.len())
    }

    /// The peer shuts its write side: the flow reads end of stream after the data.
    pub fn peer_shutdown(&mut self) {
        self.rx_eof = true;
        self.edge_readable = true;
        self.read_closed = true;
    }

    /// The peer reads up to `max` bytes of what the flow sent, appending them to `out`.
    /// Returns how many.
    pub fn peer_read(&mut self, max: usize, out: &mut Vec<u8>) -> usize {
        let n = max.min(self.tx.len());
        out.extend_from_slice(&self.tx.as_slice()[..n]);
        self.tx.pop(n);
        if n > 0 && self.tx_blocked {
            self.tx_blocked = false;
            self.edge_writable = true;
        }
        n
    }

    /// Bytes the flow sent that the peer has not read.
    pub fn peer_unread(&self) -> usize {
        self.tx.len()
    }

    /// Bytes the peer wrote that the flow has not discarded: a close(2) with any left resets
    /// the peer rather than ending the stream (a shutdown(2) before changes nothing).
    pub fn unread_by_flow(&self) -> usize {
        self.rx.len()
    }

    /// The connection fails with `errno` (the peer reset it, say).
    pub fn fail(&mut self, errno: i32) {
        self.broken = Some(errno);
        self.so_error = Some(errno);
        self.edge_error = true;
    }

    /// A connect that is still in progress fails with `errno` (SO_ERROR only).
    pub fn fail_connect(&mut self, errno: i32) {
        self.so_error = Some(errno);
        self.edge_error = true;
    }

    /// Whether end of stream came since the last call (EPOLLRDHUP with the edge).
    pub fn take_read_closed(&mut self) -> bool {
        std::mem::take(&mut self.read_closed)
    }

    /// Readiness edges since the last call (readable, writable, error), as epoll would
    /// report them; None when there is none.
    pub fn take_edges(&mut self) -> Option<(bool, bool, bool)> {
        let e = (self.edge_readable, self.edge_writable, self.edge_error);
        self.edge_readable = false;
        self.edge_writable = false;
        self.edge_error = false;
        if e == (false, false, false) { None } else { Some(e) }
    }

    fn failed(&self) -> Option<io::Error> {
        self.broken.map(io::Error::from_raw_os_error)
    }
}

impl HostSocket for ModelSocket {
    fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.calls[0] += 1;
        assert!(!buf.is_empty(), "a peek of nothing");
        if let Some(e) = self.failed() {
            return Err(e);
        }
        if self.peek_off < self.rx.len() {
            let n = buf.len().min(self.rx.len() - self.peek_off);
            buf[..n].copy_from_slice(&self.rx.as_slice()[self.peek_off..self.peek_off + n]);
            self.peek_off += n;
            Ok(n)
        } else if self.rx_eof {
            Ok(0)
        } else {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    fn set_peek_offset(&mut self, offset: usize) -> io::Result<()> {
        assert!(offset <= self.rx.len(), "peek offset {offset} past the {} bytes queued", self.rx.len());
        self.peek_off = offset;
        Ok(())
    }

    fn discard(&mut self, n: usize) -> io::Result<usize> {
        self.calls[2] += 1;
        if let Some(e) = self.failed() {
            return Err(e);
        }
        assert!(n <= self.rx.len(), "discarding {n} bytes of the {} queued", self.rx.len());
        self.rx.pop(n);
        self.peek_off = self.peek_off.saturating_sub(n);
        Ok(n)
    }

    fn send(&mut self, data: &[u8]) -> io::Result<usize> {
        self.calls[1] += 1;
        if let Some(e) = self.failed() {
            return Err(e);
        }
        assert!(!self.tx_shut, "send after shutdown(SHUT_WR)");
        let n = data.len().min(self.tx_cap.saturating_sub(self.tx.len()));
        if n < data.len() {
            self.tx_blocked = true;
        }
        if n == 0 && !data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        self.tx.push(&data[..n]);
        Ok(n)
    }

    fn shutdown_write(&mut self) {
        assert!(!self.tx_shut, "shutdown(SHUT_WR) twice");
        self.tx_shut = true;
    }

    fn set_linger_zero(&mut self) {
        self.linger_zero = true;
    }

    fn take_error(&mut self) -> i32 {
        self.so_error.take().unwrap_or(0)
    }

    fn send_room(&mut self) -> Option<usize> {
        self.calls[3] += 1;
        Some(self.tx_cap.saturating_sub(self.tx.len()))
    }

    fn inspect(&self) -> Option<(usize, usize)> {
        Some((self.peek_off, self.rx.len()))
    }
}
