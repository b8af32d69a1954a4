//! Links made outside the event loop, handed to it: a transport whose connections need
//! blocking or asynchronous work before they carry frames (vpnkit's handshake, gvproxy's
//! HTTP `POST /connect`) does that work on a thread of its own and then gives the link to
//! a [`Handoff`], which the engine watches as a [`LinkAcceptor`].
//!
//! Theory of operation: the senders push links onto a shared queue and ring an eventfd;
//! the eventfd is the acceptor's descriptor, so the event loop wakes, and `accept` hands
//! the queued links out one by one. The bell is reset before the queue is looked at, so a
//! link queued during the look rings it again and none waits unannounced.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use super::{Link, LinkAcceptor};

struct Queue {
    ready: Mutex<VecDeque<Box<dyn Link + Send>>>,
    /// Rung when a link is queued.
    bell: OwnedFd,
}

/// The engine's side: a [`LinkAcceptor`] whose links come from [`HandoffSender`]s.
pub struct Handoff {
    queue: Arc<Queue>,
    name: String,
}

/// The side of the threads that make links; cheap to clone.
#[derive(Clone)]
pub struct HandoffSender {
    queue: Arc<Queue>,
}

impl Handoff {
    /// A hand-off point named `name` in logs (e.g. "gvproxy /connect").
    pub fn new(name: impl Into<String>) -> io::Result<Handoff> {
        // SAFETY: eventfd returns a new descriptor (or -1) that we then own.
        let bell = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if bell < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `bell` is a fresh descriptor nobody else owns.
        let bell = unsafe { OwnedFd::from_raw_fd(bell) };
        let queue = Arc::new(Queue { ready: Mutex::new(VecDeque::new()), bell });
        Ok(Handoff { queue, name: name.into() })
    }

    pub fn sender(&self) -> HandoffSender {
        HandoffSender { queue: self.queue.clone() }
    }
}

impl HandoffSender {
    /// Queues `link` for the engine and wakes it.
    pub fn send(&self, link: Box<dyn Link + Send>) {
        self.queue.ready.lock().unwrap_or_else(|e| e.into_inner()).push_back(link);
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.queue.bell.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

impl LinkAcceptor for Handoff {
    fn fd(&self) -> RawFd {
        self.queue.bell.as_raw_fd()
    }

    fn accept(&mut self) -> io::Result<Option<Box<dyn Link>>> {
        let mut counter = [0u8; 8];
        // SAFETY: reads 8 bytes into a live buffer from our non-blocking eventfd.
        unsafe { libc::read(self.queue.bell.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len()) };
        let link = self.queue.ready.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
        Ok(link.map(|l| l as Box<dyn Link>))
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);

    impl Link for Named {
        fn fd(&self) -> RawFd {
            -1
        }
        fn recv(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn send(&mut self, _: &[u8]) -> io::Result<()> {
            Ok(())
        }
        fn describe(&self) -> String {
            self.0.to_string()
        }
    }

    fn bell_rung(h: &Handoff) -> bool {
        let mut p = libc::pollfd { fd: h.fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: polls one live pollfd without waiting.
        unsafe { libc::poll(&mut p, 1, 0) == 1 }
    }

    #[test]
    fn links_come_out_in_order_and_the_bell_follows_the_queue() {
        let mut h = Handoff::new("test").unwrap();
        assert!(h.accept().unwrap().is_none());
        assert!(!bell_rung(&h));
        let tx = h.sender();
        let other = tx.clone();
        std::thread::spawn(move || tx.send(Box::new(Named("a")))).join().unwrap();
        other.send(Box::new(Named("b")));
        assert!(bell_rung(&h));
        assert_eq!(h.accept().unwrap().unwrap().describe(), "a");
        // The bell was reset by the first accept; the second link is still there.
        assert_eq!(h.accept().unwrap().unwrap().describe(), "b");
        assert!(h.accept().unwrap().is_none());
        assert!(!bell_rung(&h));
        assert_eq!(h.describe(), "test");
    }
}
