//! The datagram transport (`--listen-vfkit unixgram:PATH`): one Ethernet frame per
//! datagram on a Unix datagram socket, as vfkit and QEMU's `-netdev dgram` speak it.
//!
//! Theory of operation. usernet binds PATH; the VM binds a socket of its own and sends its
//! frames to PATH. There is no connection, so the link learns where to send from the
//! datagrams it receives: the sender of the first datagram becomes the peer, and a
//! datagram from another address (a VM that restarted with a new socket) replaces it. vfkit
//! announces itself with a 4-byte "VFKT" datagram, which only sets the peer. Frames to the
//! guest go to the peer with sendto(2); while no peer is known they are dropped. When the
//! peer's socket is gone (ECONNREFUSED, ENOENT) the peer is forgotten until the next
//! datagram: a VM that is restarted is served again without restarting usernet.
//!
//! The guest's socket holds few datagrams (Linux queues at most `net.unix.max_dgram_qlen`,
//! 10 by default, for a sender its socket is not connected to), so a burst of frames (one
//! 64 KiB read of a host socket is 45 frames at MTU 1500) finds it full whenever the VM is
//! slow to read, as on a loaded machine. Frames it does not take wait, in order, in a
//! bounded queue ([`MAX_QUEUE`] bytes, as the stream transport's) and go at the next
//! `flush`; the socket of an unconnected sender never says when the guest's has room again,
//! so while frames wait the link says it is [`Link::backlogged`] and the engine retries
//! every millisecond. (Dropping them instead, as this link once did, cost a TCP flow most
//! of every window: its retransmissions came in bursts that met the same full queue, and
//! with the timer's backoff a download could stall for minutes.) Only a frame that does
//! not fit the queue is dropped (counted in `dropped`).
//!
//! The socket stays open whatever one guest sends, so a bad datagram never takes the
//! transport down: a datagram larger than [`MAX_FRAME`] (seen with MSG_TRUNC) or an empty
//! one is dropped, logged, and its sender forgotten as the peer.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, SockaddrLike, UnixAddr, sendto};

use super::qemu::clear_stale_socket;
use super::{Link, MAX_FRAME};

/// Bytes of frames a datagram link may hold for a guest that does not take them yet.
pub const MAX_QUEUE: usize = 4 * 1024 * 1024;

/// The handshake vfkit sends before its first frame.
pub const VFKIT_MAGIC: &[u8] = b"VFKT";

/// What one received datagram means.
#[derive(Debug, PartialEq, Eq)]
pub enum Datagram {
    Frame(usize),
    /// vfkit's "VFKT": remember the sender, no frame.
    Handshake,
    /// Empty, or larger than any frame (its true size).
    Invalid(usize),
}

/// Classifies a datagram whose true length is `len` and whose first bytes are `head`.
pub fn classify(head: &[u8], len: usize) -> Datagram {
    if len == 0 || len > MAX_FRAME {
        Datagram::Invalid(len)
    } else if len == VFKIT_MAGIC.len() && head.get(..len) == Some(VFKIT_MAGIC) {
        Datagram::Handshake
    } else {
        Datagram::Frame(len)
    }
}

pub struct DgramLink {
    sock: UnixDatagram,
    path: PathBuf,
    peer: Option<UnixAddr>,
    /// Datagrams dropped as invalid.
    pub invalid: u64,
    /// Frames the guest's socket did not take yet, oldest first, and their bytes.
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    /// Buffers of frames sent, for the next frames to queue (no allocation per frame).
    spare: Vec<Vec<u8>>,
    /// Frames dropped because the queue was full.
    pub dropped: u64,
}

impl DgramLink {
    /// Binds PATH (replacing a stale socket file) and waits for a guest to send.
    pub fn bind(path: &Path) -> io::Result<DgramLink> {
        clear_stale_socket(path, |p| UnixDatagram::unbound().and_then(|s| s.connect(p)).is_ok())?;
        let sock = super::qemu::bind_owner_only(path, |p| UnixDatagram::bind(p))?;
        sock.set_nonblocking(true)?;
        // Room for bursts of frames both ways.
        let fd = sock.as_fd();
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        Ok(DgramLink {
            sock,
            path: path.to_path_buf(),
            peer: None,
            invalid: 0,
            queue: VecDeque::new(),
            queued: 0,
            spare: Vec::new(),
            dropped: 0,
        })
    }

    /// The address frames go to, when one is known.
    pub fn peer(&self) -> Option<&UnixAddr> {
        self.peer.as_ref()
    }

    fn learn(&mut self, from: Option<UnixAddr>) {
        let Some(from) = from else { return };
        // An unnamed sender cannot be answered.
        if from.path().is_none() && from.as_abstract().is_none() {
            return;
        }
        if self.peer.as_ref() != Some(&from) {
            tracing::info!(link = %self.describe(), guest = %from, "guest found");
            // Frames queued for the one before are not this guest's.
            self.forget_peer();
            self.peer = Some(from);
        }
    }

    /// Sends one datagram to the peer. Ok(false) when its socket is full (try again later).
    fn send_one(&mut self, frame: &[u8]) -> io::Result<bool> {
        let Some(peer) = self.peer else {
            return Ok(true);
        };
        loop {
            match sendto(self.sock.as_raw_fd(), frame, &peer, MsgFlags::MSG_DONTWAIT) {
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => return Ok(false),
                Err(e @ (Errno::ECONNREFUSED | Errno::ENOENT | Errno::ENOTCONN)) => {
                    tracing::info!(link = %self.describe(), error = e.desc(), "guest went away");
                    self.forget_peer();
                    return Ok(true);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// No peer any more: what was queued for it goes.
    fn forget_peer(&mut self) {
        self.peer = None;
        while let Some(f) = self.queue.pop_front() {
            self.spare.push(f);
        }
        self.queued = 0;
    }

    /// Frames waiting for the guest's socket.
    pub fn queued_frames(&self) -> usize {
        self.queue.len()
    }
}

impl Drop for DgramLink {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Link for DgramLink {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Bounded: each round consumes one datagram; stop after a burst of invalid ones.
        for _ in 0..64 {
            let fd = self.sock.as_fd();
            // MSG_TRUNC makes recvfrom report the datagram's real length.
            let got = loop {
                match recv_trunc(fd, buf) {
                    Err(Errno::EINTR) => continue,
                    other => break other,
                }
            };
            let (len, from) = match got {
                Ok(x) => x,
                Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(e) => return Err(e.into()),
            };
            let head_len = len.min(buf.len());
            match classify(&buf[..head_len], len) {
                Datagram::Frame(n) if n <= buf.len() => {
                    self.learn(from);
                    return Ok(n);
                }
                Datagram::Handshake => self.learn(from),
                Datagram::Frame(n) | Datagram::Invalid(n) => {
                    self.invalid += 1;
                    tracing::warn!(
                        "{}: dropped a {n}-byte datagram (frames are 1..={MAX_FRAME} bytes); guest link reset",
                        self.describe()
                    );
                    if from.is_some() && from == self.peer {
                        self.forget_peer();
                    }
                }
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.peer.is_none() {
            return Ok(());
        }
        if self.queue.is_empty() && self.send_one(frame)? {
            return Ok(());
        }
        // The guest's socket is full (or frames wait before this one): queue it, in order.
        if self.queued + frame.len() > MAX_QUEUE {
            self.flush()?;
            if self.queued + frame.len() > MAX_QUEUE {
                self.dropped += 1;
                tracing::trace!("{}: queue full, dropped a {}-byte frame", self.describe(), frame.len());
                return Ok(());
            }
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(frame);
        self.queued += buf.len();
        self.queue.push_back(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        while let Some(frame) = self.queue.pop_front() {
            match self.send_one(&frame) {
                Ok(true) => {
                    self.queued -= frame.len().min(self.queued);
                    if self.spare.len() < 64 {
                        self.spare.push(frame);
                    }
                }
                Ok(false) => {
                    self.queue.push_front(frame);
                    break;
                }
                Err(e) => {
                    self.queue.push_front(frame);
                    return Err(e);
                }
            }
        }
        if self.queue.is_empty() {
            self.queued = 0;
        }
        Ok(())
    }

    fn backlogged(&self) -> bool {
        !self.queue.is_empty()
    }

    fn describe(&self) -> String {
        format!("vfkit unixgram:{}", self.path.display())
    }
}

/// recvfrom(2) with MSG_TRUNC: (the datagram's true length, its sender).
fn recv_trunc(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Option<UnixAddr>), Errno> {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let mut addrlen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: buf and addr are valid for the lengths given, for the duration of the call.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            (&mut addr as *mut libc::sockaddr_un).cast(),
            &mut addrlen,
        )
    };
    let n = Errno::result(n)? as usize;
    // SAFETY: the kernel filled `addrlen` bytes of a sockaddr_un.
    let from = unsafe { UnixAddr::from_raw((&addr as *const libc::sockaddr_un).cast(), Some(addrlen)) };
    Ok((n, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("usernet-dgram-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn classify_datagrams() {
        assert_eq!(classify(&[], 0), Datagram::Invalid(0));
        assert_eq!(classify(b"VFKT", 4), Datagram::Handshake);
        assert_eq!(classify(b"VFKX", 4), Datagram::Frame(4));
        assert_eq!(classify(&[0; 60], 60), Datagram::Frame(60));
        assert_eq!(classify(&[0; 10], MAX_FRAME + 1), Datagram::Invalid(MAX_FRAME + 1));
        assert_eq!(classify(&[0; 10], MAX_FRAME), Datagram::Frame(MAX_FRAME));
    }

    #[test]
    fn learns_peer_and_answers_it() {
        let dir = tmp("peer");
        let mut link = DgramLink::bind(&dir.join("usernet.sock")).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        // No peer yet: frames to the guest are dropped quietly.
        link.send(&[1; 60]).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        vm.send_to(&[7; 60], dir.join("usernet.sock")).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        link.send(&[8; 70]).unwrap();
        let mut got = [0u8; 100];
        assert_eq!(vm.recv(&mut got).unwrap(), 70);

        // Oversized datagram: dropped, peer forgotten, socket still serving.
        vm.send_to(&vec![0u8; MAX_FRAME + 10], dir.join("usernet.sock")).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(link.peer().is_none());
        assert_eq!(link.invalid, 1);
        vm.send_to(&[], dir.join("usernet.sock")).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(link.invalid, 2);

        // The VM "reboots": a new socket at another path, vfkit's handshake first.
        drop(vm);
        link.send(&[8; 70]).unwrap();
        let vm2 = UnixDatagram::bind(dir.join("vm2.sock")).unwrap();
        vm2.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        vm2.send_to(VFKIT_MAGIC, dir.join("usernet.sock")).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        link.send(&[9; 80]).unwrap();
        assert_eq!(vm2.recv(&mut got).unwrap(), 80);

        // The peer's socket disappears: the link forgets it rather than failing.
        drop(vm2);
        std::fs::remove_file(dir.join("vm2.sock")).unwrap();
        link.send(&[9; 80]).unwrap();
        assert!(link.peer().is_none());
        drop(link);
        assert!(!dir.join("usernet.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A guest whose socket is full loses no frame: they wait, in order, until it reads.
    #[test]
    fn frames_wait_for_a_full_guest_socket() {
        let dir = tmp("full");
        let mut link = DgramLink::bind(&dir.join("usernet.sock")).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        vm.send_to(&[7; 60], dir.join("usernet.sock")).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        // Far more than the guest's socket queues (net.unix.max_dgram_qlen, 10 by default).
        let n = 300u32;
        for i in 0..n {
            let mut f = vec![0u8; 1500];
            f[..4].copy_from_slice(&i.to_be_bytes());
            link.send(&f).unwrap();
        }
        assert!(link.backlogged(), "a full socket leaves frames queued");
        let mut got = [0u8; 2000];
        for i in 0..n {
            // The guest reads; the engine flushes again (as after BACKLOG_RETRY).
            let len = vm.recv(&mut got).unwrap_or_else(|e| panic!("frame {i}: {e}"));
            assert_eq!(len, 1500);
            assert_eq!(u32::from_be_bytes(got[..4].try_into().unwrap()), i, "in order");
            link.flush().unwrap();
        }
        assert!(!link.backlogged());
        assert_eq!(link.dropped, 0);
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
