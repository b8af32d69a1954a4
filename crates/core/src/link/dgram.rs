//! The datagram transport (`--listen-vfkit unixgram:PATH`): one Ethernet frame per
//! datagram on a Unix datagram socket, as vfkit and QEMU's `-netdev dgram` speak it.
//!
//! Theory of operation. usernet binds PATH; the VM binds a socket of its own and sends its
//! frames to PATH. There is no connection, so the link learns where to send from the
//! datagrams it receives: the sender of the first datagram becomes the peer, and a
//! datagram from another address (a VM that restarted with a new socket) replaces it. vfkit
//! announces itself with a 4-byte "VFKT" datagram, which only sets the peer. Frames to the
//! guest go to the peer (see below); while no peer is known they are dropped. When the
//! peer's socket is gone (ECONNREFUSED, ENOENT) the peer is forgotten until the next
//! datagram: a VM that is restarted is served again without restarting usernet.
//!
//! A peer that sent a frame first (QEMU's `-netdev dgram`, whose socket is not connected
//! to ours) is connected to, and usernet's socket then takes datagrams from that peer only.
//! Linux lets a sender queue at most `net.unix.max_dgram_qlen` (10) datagrams to a receiver
//! that is not connected to it, and lifts that cap when it is: the guest's frames (the ACKs
//! of a download, the segments of an upload) no longer find usernet's socket full, and
//! usernet's sends need no path lookup each. What that changes:
//! - The first sender is taken. Datagrams of others that were read ahead with its own, or
//!   queued before the connect, are dropped (counted in `stale`); after it, the kernel
//!   refuses them (EPERM). Until a guest is taken, any sender may be: the socket is the
//!   user's own (mode 0600), so only the user's programs can.
//! - A VM restarted with a new socket is refused until the link notices the old one is
//!   gone. At most once per [`PEER_CHECK`] (the engine wakes at least once a second) it
//!   looks at the peer's path: another socket file there (a restart at the same path:
//!   [`socket_file`]), none, or a connect(2) that fails (the socket closed, its file left
//!   behind), and the peer is forgotten, with the frames queued for it, and the next
//!   sender is taken. The restarted VM's first frames (DHCP) are lost, and it retries.
//! - A copy of the old socket may live on (its descriptor inherited by a child that has
//!   not exited): the checks find it alive. So a peer that neither sent a datagram nor
//!   took one for [`QUIET_CHECKS`] checks in a row (5 s) is let go of: our socket is
//!   disconnected, when nothing waits in it, and frames to the guest go to its address as
//!   to an unconnected peer. The next sender is taken: the same guest, connected to again
//!   at its next frame, or a restarted VM, which so waits about 5 s after the old one's
//!   last datagram instead of for as long as the copy lives. A datagram sent counts as
//!   taken: the guest's socket holds at most 10 unread (its owner does not connect it to
//!   ours), so a dead VM's copy stops taking any after 10, while a guest that only
//!   receives (a stream of UDP to it) keeps its connection. A guest that is merely quiet
//!   loses nothing: its frames are taken as ever, and while unconnected it may queue 10
//!   datagrams, more than a quiet guest sends.
//! - A bad datagram from the connected peer is dropped without forgetting it:
//!   disconnecting would drop what the peer has waiting in our socket.
//! - A peer that announces itself with vfkit's handshake is never connected to, even when
//!   it comes back with a frame after being forgotten: vfkit connects its own socket to
//!   usernet's, and a restarted vfkit whose connect(2) were refused would not retry.
//!
//! Measured (`usernet-bench --vm --vm-only --vm-transport dgram --only usernet`, TCG guest,
//! 64 MiB each way, usernet's CPU per GB, runs alternated with the unconnected link): download
//! 10.9-15.0 s unconnected, 5.1-7.3 connected; upload 12.6-16.7 s unconnected, 3.2-5.6
//! connected and polled (below). The download's rate was 0.27-0.36 Gbit/s against 0.31-0.39.
//!
//! Frames to the guest are queued as the engine makes them and sent at the end of its round
//! (`flush`), up to [`SEND_BATCH`] to one sendmmsg(2); the guest's are read up to
//! [`RECV_BATCH`] at a time with recvmmsg(2) and handed to the engine one by one. A burst
//! costs one system call per batch instead of one per frame. A recvmmsg(2) that returned
//! fewer than it asked for met EAGAIN: the socket was empty, so once those are handed out
//! `recv` says `WouldBlock` without a call that would only hear EAGAIN again, unless the
//! engine's edge-triggered readiness reported the socket readable since
//! ([`Link::readable_edge`]): datagrams that arrive later raise that edge.
//!
//! Uploads: a TCG guest's segments come hundreds of microseconds apart, each one datagram
//! that would wake the engine. A connected link polls during an upload as the stream link
//! does ([`UploadPoll`] says when; see `qemu.rs`): the engine stops watching the socket for
//! reading and reads it every round and at least every millisecond. A poll that finds
//! [`FAST_POLL_FRAMES`] or more ends polling: a guest that fast is read in batches anyway,
//! and could fill its socket's send buffer between two polls. An unconnected link is never
//! polled, since 10 datagrams would fill its socket between two polls.
//!
//! The guest's socket holds few datagrams (Linux queues at most `net.unix.max_dgram_qlen`,
//! 10 by default, for a sender its socket is not connected to, and QEMU's is connected to
//! none), so a burst of frames (one 64 KiB read of a host socket is 45 frames at MTU 1500)
//! finds it full whenever the VM is slow to read. Frames it does not take wait, in order,
//! in the same bounded queue ([`MAX_QUEUE`] bytes, as the stream transport's) for the next
//! `flush`. A connected socket that met a full peer is woken (EPOLLOUT) when the peer reads,
//! so the engine watches it for writing while frames wait ([`Link::write_events`]; never
//! otherwise, or every frame the guest reads would wake the engine). The socket of an
//! unconnected sender never says when the guest's has room again, and a send that failed
//! for want of memory (ENOBUFS) arms no wake either, so while frames wait the link also
//! says it is [`Link::backlogged`] and the engine retries every millisecond. (Dropping them
//! instead, as this link once did, cost a TCP flow most of every window: its
//! retransmissions came in bursts that met the same full queue, and with the timer's
//! backoff a download could stall for minutes.) Only a frame that does not fit the queue is
//! dropped (counted in `dropped`).
//!
//! Each datagram the guest's full socket gives up to QEMU's I/O thread wakes the engine
//! (through af_unix's peer-wake relay, which a send that met the full socket arms). On 2 cores
//! a busy vCPU thread (under TCG it always is) keeps one CPU to itself, so the engine and the
//! I/O thread share the other, and there the woken engine preempts QEMU at once, writes the one
//! frame there is room for, and sleeps; QEMU reads the next and wakes it again: a download cost
//! a switch of process per frame or two (usernet 11,000 sleeps a second, QEMU's I/O thread
//! 7,000 preemptions). So the engine, woken for writing while frames wait, first yields the CPU
//! ([`Link::yield_before_refill`]): QEMU reads what else it can, and the engine refills the
//! room it left in one sendmmsg(2). Measured on a 2-core VM (`usernet-bench --vm --vm-only
//! --vm-transport dgram`, 64 MiB each way, two runs of each build, alternated): usernet's CPU
//! per GB of the download 2.33-2.37 s without the yield, 1.80-1.84 with it, at 0.56-0.61 Gbit/s
//! either way; the upload's 2.79-3.00 and 2.46-2.48. Running the whole engine at SCHED_BATCH,
//! whose wakeups preempt no one, did as much for the download (1.67 s against 2.58-2.95 for
//! 256 MiB from a server on the host's loopback), but with two CPU hogs running it made
//! requests wait for the scheduler's tick (sockperf's UDP ping-pong at 1,000 a second through
//! `usernet run`: 90th percentile 4.0 ms against 1.5).
//!
//! The socket stays open whatever one guest sends, so a bad datagram never takes the
//! transport down: a datagram larger than [`MAX_FRAME`] (seen with MSG_TRUNC) or an empty
//! one is dropped, logged, and its sender forgotten as the peer.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{SockaddrLike, UnixAddr};

use super::qemu::clear_stale_socket;
use super::upload_poll::UploadPoll;
use super::{Link, MAX_FRAME};

/// Bytes of frames a datagram link may hold for a guest that does not take them yet.
pub const MAX_QUEUE: usize = 4 * 1024 * 1024;

/// Frames handed to one sendmmsg(2).
pub const SEND_BATCH: usize = 64;
/// Datagrams read by one recvmmsg(2).
pub const RECV_BATCH: usize = 16;

/// How often a link connected to its peer checks that the peer's socket still lives.
pub const PEER_CHECK: Duration = Duration::from_secs(1);

/// Checks in a row that find the connected peer has neither sent a datagram nor taken one
/// since the check before, after which the link lets go of the connection (see the
/// module's theory of operation).
pub const QUIET_CHECKS: u32 = 5;

/// Datagrams read between two polls that show a guest too fast to poll (see
/// [`UploadPoll::too_fast`]): 64 frames of 1514 bytes come near what QEMU's socket may have
/// in flight (`net.core.wmem_default`, 208 KiB, with each datagram's overhead).
pub const FAST_POLL_FRAMES: usize = 64;

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
    /// Our socket is connected to `peer` (see the theory of operation), which socket file
    /// was at the peer's path then ([`socket_file`]), and when to check it is still there.
    connected: bool,
    peer_inode: Option<(u64, u64, i64, i64)>,
    next_peer_check: Instant,
    /// Datagrams taken from the connected peer or sent to it; their count at the last
    /// check; checks in a row that found it unchanged.
    traffic: u64,
    traffic_at_check: u64,
    quiet_checks: u32,
    /// The peer was let go of for being quiet: connected to again at its next datagram.
    released: bool,
    /// The last sender of vfkit's handshake: never connected to, even after it was
    /// forgotten and comes back with a frame.
    handshaken: Option<UnixAddr>,
    /// Datagrams read ahead from another sender than the peer, sent before our socket was
    /// connected to it: dropped.
    pub stale: u64,
    /// Datagrams dropped as invalid.
    pub invalid: u64,
    /// Frames the guest's socket did not take yet, oldest first, and their bytes.
    queue: VecDeque<Vec<u8>>,
    queued: usize,
    /// Buffers of frames sent, for the next frames to queue (no allocation per frame).
    spare: Vec<Vec<u8>>,
    /// Frames dropped because the queue was full.
    pub dropped: u64,
    rx: RecvBatch,
    /// Polling during an upload (only while connected), and the datagrams read since the
    /// last poll began.
    upload: UploadPoll,
    since_poll: usize,
}

impl DgramLink {
    /// Binds PATH (replacing a stale socket file) and waits for a guest to send.
    pub fn bind(path: &Path) -> io::Result<DgramLink> {
        clear_stale_socket(path, |p| UnixDatagram::unbound().and_then(|s| s.connect(p)))?;
        let sock = super::qemu::bind_dgram_owner_only(path)?;
        sock.set_nonblocking(true)?;
        // Room for bursts of frames both ways.
        let fd = sock.as_fd();
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::SndBuf, &(4 << 20));
        let _ = nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::RcvBuf, &(4 << 20));
        Ok(DgramLink {
            sock,
            path: path.to_path_buf(),
            peer: None,
            connected: false,
            peer_inode: None,
            next_peer_check: Instant::now(),
            traffic: 0,
            traffic_at_check: 0,
            quiet_checks: 0,
            released: false,
            handshaken: None,
            stale: 0,
            invalid: 0,
            queue: VecDeque::new(),
            queued: 0,
            spare: Vec::new(),
            dropped: 0,
            rx: RecvBatch::new(),
            upload: UploadPoll::default(),
            since_poll: 0,
        })
    }

    /// The address frames go to, when one is known.
    pub fn peer(&self) -> Option<&UnixAddr> {
        self.peer.as_ref()
    }

    /// True while our socket is connected to the peer (takes datagrams from it only).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// The sender of a datagram; `handshake` when it was vfkit's. False when the datagram
    /// is to be dropped: connected, only the peer's are taken, and another's was sent
    /// before the connect (read ahead, or queued already).
    fn learn(&mut self, from: Option<UnixAddr>, handshake: bool) -> bool {
        let Some(from) = from else { return true };
        // An unnamed sender cannot be answered.
        if from.path().is_none() && from.as_abstract().is_none() {
            return true;
        }
        if self.peer.as_ref() == Some(&from) {
            if std::mem::take(&mut self.released) {
                // Quiet for a while, let go of, and back (`release_peer`); vfkit's handshake
                // says it is one never to connect to.
                if handshake {
                    self.handshaken = Some(from);
                } else {
                    self.connect_peer(from);
                }
            }
            return true;
        }
        if self.connected {
            self.stale += 1;
            tracing::trace!(link = %self.describe(), from = %from, "dropped a datagram sent before the link took its guest");
            return false;
        }
        if handshake {
            self.handshaken = Some(from);
        }
        tracing::info!(link = %self.describe(), guest = %from, "guest found");
        // Frames queued for the one before are not this guest's.
        self.forget_peer();
        self.peer = Some(from);
        if self.handshaken != Some(from) {
            self.connect_peer(from);
        }
        true
    }

    /// Connects our socket to the peer; if that fails (its socket is connected to another,
    /// or just went away), frames go to its address as before.
    fn connect_peer(&mut self, peer: UnixAddr) {
        match nix::sys::socket::connect(self.sock.as_raw_fd(), &peer) {
            Ok(()) => {
                self.connected = true;
                self.peer_inode = socket_file(&peer);
                self.next_peer_check = Instant::now() + PEER_CHECK;
                self.traffic_at_check = self.traffic;
                self.quiet_checks = 0;
            }
            Err(e) => {
                tracing::debug!(link = %self.describe(), guest = %peer, error = e.desc(), "not connected to the guest")
            }
        }
    }

    /// Makes sure the connected peer's socket is still the one connected to: another
    /// socket file at its path (a VM restarted at the same path), or none, or a connect(2)
    /// that fails (the socket closed, its file left behind), and the peer is forgotten,
    /// so that the next sender's first datagram is taken. A peer quiet for [`QUIET_CHECKS`]
    /// checks is let go of ([`DgramLink::release_peer`]).
    pub fn check_peer(&mut self) {
        let (true, Some(peer)) = (self.connected, self.peer) else { return };
        self.next_peer_check = Instant::now() + PEER_CHECK;
        if peer.path().is_some() && socket_file(&peer) != self.peer_inode {
            tracing::info!(link = %self.describe(), "guest went away: its socket was replaced");
            self.forget_peer();
        } else if let Err(e) = nix::sys::socket::connect(self.sock.as_raw_fd(), &peer) {
            tracing::info!(link = %self.describe(), error = e.desc(), "guest went away");
            self.forget_peer();
        } else if self.traffic != self.traffic_at_check {
            self.traffic_at_check = self.traffic;
            self.quiet_checks = 0;
        } else {
            self.quiet_checks += 1;
            if self.quiet_checks >= QUIET_CHECKS {
                self.release_peer();
            }
        }
    }

    /// Lets go of the connection to a quiet peer, which stays where frames go: our socket
    /// takes datagrams from anyone again, so a restarted VM is heard even while a copy of
    /// the old one's socket lives on; the peer's own next datagram connects again. Only
    /// when nothing waits in our socket, since disconnecting drops what does.
    fn release_peer(&mut self) {
        self.quiet_checks = 0;
        use nix::sys::socket::MsgFlags;
        let mut byte = [0u8; 1];
        let waiting =
            nix::sys::socket::recv(self.sock.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT);
        if waiting != Err(Errno::EAGAIN) {
            // A datagram came since the last read (or the socket has an error to tell).
            return;
        }
        if self.disconnect() {
            self.connected = false;
            self.released = true;
            self.upload = UploadPoll::default();
            tracing::debug!(link = %self.describe(), "guest quiet: our socket takes any sender again");
        }
    }

    /// Disconnects our socket (takes datagrams from anyone again); Linux drops what waits in
    /// it, which only the peer could have sent. False, logged, if that fails.
    fn disconnect(&self) -> bool {
        let unspec = libc::sockaddr { sa_family: libc::AF_UNSPEC as libc::sa_family_t, sa_data: [0; 14] };
        // SAFETY: a sockaddr of the size given, valid for the duration of the call.
        let r = unsafe {
            libc::connect(self.sock.as_raw_fd(), &unspec, std::mem::size_of::<libc::sockaddr>() as libc::socklen_t)
        };
        if r != 0 {
            tracing::warn!(link = %self.describe(), error = %io::Error::last_os_error(), "cannot disconnect from the guest");
        }
        r == 0
    }

    /// Sends the queued frames to the peer, up to [`SEND_BATCH`] per sendmmsg(2), oldest
    /// first, until the queue is empty or the peer's socket is full (the rest wait).
    fn send_queued(&mut self) -> io::Result<()> {
        while !self.queue.is_empty() {
            let Some(peer) = self.peer else {
                return Ok(());
            };
            let n = self.queue.len().min(SEND_BATCH);
            let mut iovs: [libc::iovec; SEND_BATCH] =
                [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; SEND_BATCH];
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut msgs: [libc::mmsghdr; SEND_BATCH] = unsafe { std::mem::zeroed() };
            for (i, frame) in self.queue.iter().take(n).enumerate() {
                iovs[i] = libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() };
                // A connected socket sends to its peer without an address.
                if !self.connected {
                    msgs[i].msg_hdr.msg_name = peer.as_ptr() as *mut libc::c_void;
                    msgs[i].msg_hdr.msg_namelen = peer.len();
                }
                msgs[i].msg_hdr.msg_iov = &mut iovs[i];
                msgs[i].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `n` headers, each naming one live frame of the queue and, unless the
            // socket is connected, the peer's address, all valid for the duration of the call.
            let sent = unsafe {
                libc::sendmmsg(self.sock.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT)
            };
            match Errno::result(sent) {
                Ok(sent) => {
                    if self.connected {
                        self.traffic += sent as u64;
                    }
                    for _ in 0..sent {
                        let Some(frame) = self.queue.pop_front() else { break };
                        self.queued -= frame.len().min(self.queued);
                        if self.spare.len() < 64 {
                            self.spare.push(frame);
                        }
                    }
                    // Fewer than asked: the guest's socket is full.
                    if (sent as usize) < n {
                        break;
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => break,
                Err(e @ (Errno::ECONNREFUSED | Errno::ENOENT | Errno::ENOTCONN)) => {
                    tracing::info!(link = %self.describe(), error = e.desc(), "guest went away");
                    self.forget_peer();
                }
                Err(e) => return Err(e.into()),
            }
        }
        if self.queue.is_empty() {
            self.queued = 0;
        }
        Ok(())
    }

    /// The socket has no datagram: `WouldBlock`, and a polled link that had no bulk frame
    /// for `POLL_IDLE` waits for readiness again.
    fn would_block(&mut self) -> io::Error {
        self.upload.empty(Instant::now);
        io::ErrorKind::WouldBlock.into()
    }

    /// No peer any more: what was queued for it goes.
    fn forget_peer(&mut self) {
        self.peer = None;
        self.peer_inode = None;
        self.released = false;
        self.upload = UploadPoll::default();
        if std::mem::take(&mut self.connected) {
            // The old peer's frames waiting in our socket go with it.
            self.disconnect();
        }
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
            if self.rx.next == self.rx.count {
                if std::mem::take(&mut self.rx.drained) {
                    return Err(self.would_block());
                }
                match self.rx.fill(self.sock.as_fd()) {
                    Ok(()) => {
                        self.since_poll += self.rx.count;
                        if self.since_poll >= FAST_POLL_FRAMES && self.upload.polling() {
                            self.upload.too_fast(Instant::now());
                        }
                    }
                    Err(Errno::EAGAIN) => return Err(self.would_block()),
                    Err(e) => return Err(e.into()),
                }
            }
            let i = self.rx.next;
            self.rx.next += 1;
            let (len, from) = (self.rx.lens[i], self.rx.from[i]);
            let data = &self.rx.bufs[i][..len.min(MAX_FRAME)];
            match classify(data, len) {
                Datagram::Frame(n) if n <= buf.len() => {
                    if !self.learn(from, false) {
                        continue;
                    }
                    self.traffic += 1;
                    buf[..n].copy_from_slice(&self.rx.bufs[i][..n]);
                    // Counted from the poll's start: the burst that started it does not
                    // make it too fast.
                    if self.connected && self.upload.frame(n, Instant::now) {
                        self.since_poll = 0;
                    }
                    return Ok(n);
                }
                Datagram::Handshake => {
                    self.learn(from, true);
                }
                Datagram::Frame(n) | Datagram::Invalid(n) => {
                    self.invalid += 1;
                    // The peer is forgotten, unless connected: disconnecting would drop
                    // the frames it has waiting in our socket.
                    let reset = from.is_some() && from == self.peer && !self.connected;
                    tracing::warn!(
                        "{}: dropped a {n}-byte datagram (frames are 1..={MAX_FRAME} bytes){}",
                        self.describe(),
                        if reset { "; guest link reset" } else { "" }
                    );
                    if reset {
                        self.forget_peer();
                    }
                }
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn readable_edge(&mut self, _peer_closed: bool) {
        // Datagrams came (or an error is pending) since the last recvmmsg(2), or (polling)
        // may have: read again.
        self.rx.drained = false;
        self.since_poll = 0;
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.peer.is_none() {
            return Ok(());
        }
        // Queued, in order, and sent by `flush` at the end of the engine's round: one
        // sendmmsg(2) for up to SEND_BATCH frames instead of a sendto(2) each.
        if self.queued + frame.len() > MAX_QUEUE {
            self.send_queued()?;
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
        if self.connected && Instant::now() >= self.next_peer_check {
            self.check_peer();
        }
        self.send_queued()
    }

    fn polling(&self) -> bool {
        self.upload.polling()
    }

    fn read_events(&self) -> bool {
        !self.upload.polling()
    }

    fn write_events(&self) -> bool {
        // Only while frames wait: each frame the guest reads frees room in our socket's
        // send buffer, and would wake the engine.
        !self.queue.is_empty()
    }

    fn yield_before_refill(&self) -> bool {
        // Woken because the guest's full socket gave up a datagram to QEMU's I/O thread,
        // which this wakeup preempted if the two share a CPU: let it read the rest first.
        !self.queue.is_empty()
    }

    fn backlogged(&self) -> bool {
        // Even connected, whose socket is woken (EPOLLOUT) when the peer reads from a full
        // queue: a send that failed otherwise (ENOBUFS) arms no such wake.
        !self.queue.is_empty()
    }

    fn describe(&self) -> String {
        format!("vfkit unixgram:{}", self.path.display())
    }
}

/// What tells a path-named peer's socket file from another made at the same path: its
/// device, inode and change time (a file system may give a new file the inode number of
/// one just removed).
fn socket_file(peer: &UnixAddr) -> Option<(u64, u64, i64, i64)> {
    let meta = std::fs::metadata(peer.path()?).ok()?;
    Some((meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec()))
}

/// Datagrams read ahead from the socket by one recvmmsg(2), handed out one by one.
struct RecvBatch {
    /// RECV_BATCH buffers of MAX_FRAME bytes, allocated at the first read.
    bufs: Vec<Vec<u8>>,
    /// Each datagram's true length (MSG_TRUNC), which may exceed its buffer.
    lens: [usize; RECV_BATCH],
    from: [Option<UnixAddr>; RECV_BATCH],
    /// Datagrams read, and the next to hand out.
    count: usize,
    next: usize,
    /// The last recvmmsg(2) read fewer than RECV_BATCH: the socket was empty then.
    drained: bool,
}

impl RecvBatch {
    fn new() -> RecvBatch {
        RecvBatch {
            bufs: Vec::new(),
            lens: [0; RECV_BATCH],
            from: [None; RECV_BATCH],
            count: 0,
            next: 0,
            drained: false,
        }
    }

    /// Reads what is waiting, up to RECV_BATCH datagrams; Err(EAGAIN) when nothing is.
    fn fill(&mut self, fd: BorrowedFd<'_>) -> Result<(), Errno> {
        if self.bufs.is_empty() {
            self.bufs = (0..RECV_BATCH).map(|_| vec![0u8; MAX_FRAME]).collect();
        }
        self.count = 0;
        self.next = 0;
        // SAFETY: sockaddr_un and mmsghdr are plain old data; all-zero is valid.
        let mut addrs: [libc::sockaddr_un; RECV_BATCH] = unsafe { std::mem::zeroed() };
        let mut msgs: [libc::mmsghdr; RECV_BATCH] = unsafe { std::mem::zeroed() };
        let mut iovs: [libc::iovec; RECV_BATCH] =
            [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; RECV_BATCH];
        for i in 0..RECV_BATCH {
            iovs[i] = libc::iovec { iov_base: self.bufs[i].as_mut_ptr().cast(), iov_len: self.bufs[i].len() };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_un).cast();
            msgs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iovs[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        let n = loop {
            // SAFETY: RECV_BATCH headers, each with one live buffer and address of the
            // stated lengths, valid for the duration of the call. MSG_TRUNC makes each
            // msg_len the datagram's true length.
            let n = unsafe {
                libc::recvmmsg(
                    fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    RECV_BATCH as libc::c_uint,
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            match Errno::result(n) {
                Err(Errno::EINTR) => continue,
                other => break other? as usize,
            }
        };
        for i in 0..n {
            self.lens[i] = msgs[i].msg_len as usize;
            // SAFETY: the kernel filled `msg_namelen` bytes of a sockaddr_un.
            self.from[i] = unsafe {
                UnixAddr::from_raw((&addrs[i] as *const libc::sockaddr_un).cast(), Some(msgs[i].msg_hdr.msg_namelen))
            };
        }
        self.count = n;
        self.drained = n < RECV_BATCH;
        Ok(())
    }
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
        // One datagram of a batch of RECV_BATCH: the socket is empty, known without a call.
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        link.send(&[8; 70]).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 100];
        assert_eq!(vm.recv(&mut got).unwrap(), 70);

        // Oversized and empty datagrams from the connected peer: dropped and counted, the
        // peer kept (disconnecting would drop what it has waiting), still served.
        assert!(link.connected());
        vm.send_to(&vec![0u8; MAX_FRAME + 10], dir.join("usernet.sock")).unwrap();
        vm.send_to(&[], dir.join("usernet.sock")).unwrap();
        vm.send_to(&[6; 60], dir.join("usernet.sock")).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(link.invalid, 2);
        assert!(link.connected() && link.peer().is_some());

        // The VM "reboots": a new socket at another path, vfkit's handshake first, heard
        // once the link has found the old socket gone.
        drop(vm);
        link.send(&[8; 70]).unwrap();
        let vm2 = UnixDatagram::bind(dir.join("vm2.sock")).unwrap();
        vm2.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        link.check_peer();
        assert!(link.peer().is_none() && link.queued_frames() == 0);
        vm2.send_to(VFKIT_MAGIC, dir.join("usernet.sock")).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        link.send(&[9; 80]).unwrap();
        link.flush().unwrap();
        assert_eq!(vm2.recv(&mut got).unwrap(), 80);
        assert!(!link.connected());

        // An unconnected peer's oversized datagram resets the link; the vfkit comes back
        // with a frame and no handshake, and is still not connected to.
        vm2.send_to(&vec![0u8; MAX_FRAME + 10], dir.join("usernet.sock")).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(link.peer().is_none());
        assert_eq!(link.invalid, 3);
        vm2.send_to(&[5; 60], dir.join("usernet.sock")).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert!(link.peer().is_some() && !link.connected());

        // The peer's socket disappears: the link forgets it rather than failing.
        drop(vm2);
        std::fs::remove_file(dir.join("vm2.sock")).unwrap();
        link.send(&[9; 80]).unwrap();
        link.flush().unwrap();
        assert!(link.peer().is_none());
        drop(link);
        assert!(!dir.join("usernet.sock").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A guest that sends a frame first (QEMU's way) is connected to: it may then queue far
    /// more than the 10 datagrams Linux allows an unconnected receiver, others are refused
    /// while its socket lives, and a VM restarted with a new socket (at another path, or at
    /// the same one) is served once the link checks its peer.
    #[test]
    fn a_connected_guest_fills_the_queue_and_a_restarted_one_is_served() {
        let dir = tmp("connected");
        let to = dir.join("usernet.sock");
        let mut link = DgramLink::bind(&to).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.set_nonblocking(true).unwrap();
        vm.send_to(&[7; 60], &to).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert!(link.connected());
        // Far more than net.unix.max_dgram_qlen, none read in between: all queued.
        for i in 0..100u8 {
            vm.send_to(&[i; 100], &to).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
        }
        link.readable_edge(false);
        for i in 0..100u8 {
            assert_eq!(link.recv(&mut buf).unwrap(), 100);
            assert_eq!(buf[0], i, "in order");
        }
        link.send(&[8; 70]).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 100];
        assert_eq!(vm.recv(&mut got).unwrap(), 70);

        // A second sender is refused while the peer's socket lives; the check keeps the peer.
        let other = UnixDatagram::bind(dir.join("other.sock")).unwrap();
        assert_eq!(other.send_to(&[1; 60], &to).unwrap_err().raw_os_error(), Some(libc::EPERM));
        link.check_peer();
        assert!(link.connected());

        // The VM restarts with a socket at another path; the old file stays behind.
        drop(vm);
        let vm2 = UnixDatagram::bind(dir.join("vm2.sock")).unwrap();
        vm2.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        assert!(vm2.send_to(&[2; 60], &to).is_err(), "refused until the link checks its peer");
        link.check_peer();
        assert!(link.peer().is_none());
        vm2.send_to(&[3; 60], &to).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 3);
        assert!(link.connected());
        link.send(&[9; 80]).unwrap();
        link.flush().unwrap();
        assert_eq!(vm2.recv(&mut got).unwrap(), 80);

        // Restarted again at the same path: the check finds another socket file there,
        // forgets the old one, and the new one is taken when it speaks.
        drop(vm2);
        std::fs::remove_file(dir.join("vm2.sock")).unwrap();
        let vm3 = UnixDatagram::bind(dir.join("vm2.sock")).unwrap();
        vm3.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        assert!(vm3.send_to(&[4; 60], &to).is_err());
        link.check_peer();
        assert!(link.peer().is_none());
        vm3.send_to(&[5; 60], &to).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 5);
        assert!(link.connected());
        link.send(&[6; 90]).unwrap();
        link.flush().unwrap();
        assert_eq!(vm3.recv(&mut got).unwrap(), 90);

        // Its socket goes away while usernet sends: forgotten, anyone may send again.
        drop(vm3);
        link.send(&[6; 90]).unwrap();
        link.flush().unwrap();
        assert!(link.peer().is_none());
        assert!(!link.connected());
        other.send_to(&[1; 60], &to).unwrap();
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A peer quiet for `QUIET_CHECKS` checks is let go of (still where frames go) and
    /// connected to again when it speaks; one that speaks between checks, or has a datagram
    /// waiting, is kept. So a VM restarted while a copy of its old socket lives on (the
    /// descriptor inherited by a child), which every check finds alive, is heard once the
    /// old one has been quiet that long, where it used to be refused for as long as the
    /// copy lived.
    #[test]
    fn a_quiet_peer_is_let_go_of_and_a_living_copy_of_its_socket_keeps_no_one_out() {
        let dir = tmp("quiet");
        let to = dir.join("usernet.sock");
        let mut link = DgramLink::bind(&to).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let mut got = [0u8; 100];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        vm.send_to(&[1; 60], &to).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert!(link.connected());

        // Quiet, let go of, and back: connected to again; nothing lost either way. (The
        // first check finds the datagram that connected, sent since the check before.)
        for _ in 0..=QUIET_CHECKS {
            assert!(link.connected());
            link.check_peer();
        }
        assert!(!link.connected(), "let go of after {QUIET_CHECKS} quiet checks");
        assert!(link.peer().is_some(), "still where frames go");
        link.send(&[2; 70]).unwrap();
        link.flush().unwrap();
        assert_eq!(vm.recv(&mut got).unwrap(), 70);
        vm.send_to(&[3; 60], &to).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 3);
        assert!(link.connected(), "connected to again at its next frame");

        // A peer that speaks between checks is kept.
        for _ in 0..2 * QUIET_CHECKS {
            vm.send_to(&[4; 60], &to).unwrap();
            link.readable_edge(false);
            assert_eq!(link.recv(&mut buf).unwrap(), 60);
            link.check_peer();
            assert!(link.connected());
        }
        // So is one that only takes what is sent to it (a stream of UDP to the guest).
        for _ in 0..2 * QUIET_CHECKS {
            link.send(&[4; 70]).unwrap();
            link.flush().unwrap();
            assert_eq!(vm.recv(&mut got).unwrap(), 70);
            link.check_peer();
            assert!(link.connected());
        }
        // So is one with a datagram waiting, not read yet: disconnecting would drop it.
        vm.send_to(&[5; 60], &to).unwrap();
        for _ in 0..QUIET_CHECKS {
            link.check_peer();
        }
        assert!(link.connected(), "kept: a datagram waits");
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 5);

        // The VM restarts with a socket at another path while a copy of the old one lives,
        // and usernet still has frames for the old one: the copy takes a few (10 unread at
        // most), then none, and takes no more for the checks either.
        let copy = vm.try_clone().unwrap();
        drop(vm);
        for _ in 0..30 {
            link.send(&[5; 70]).unwrap();
        }
        link.flush().unwrap();
        assert!(link.queued_frames() > 0, "the copy's socket filled");
        let vm2 = UnixDatagram::bind(dir.join("vm2.sock")).unwrap();
        vm2.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        assert_eq!(vm2.send_to(&[6; 60], &to).unwrap_err().raw_os_error(), Some(libc::EPERM));
        for _ in 0..QUIET_CHECKS {
            link.check_peer();
            link.flush().unwrap();
            assert!(link.connected(), "the copy lives: each check finds the old socket alive");
        }
        link.check_peer();
        assert!(!link.connected());
        vm2.send_to(&[7; 60], &to).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 7);
        assert!(link.connected(), "the restarted VM is taken");
        assert_eq!(link.peer().and_then(|p| p.path()), Some(dir.join("vm2.sock").as_path()));
        link.send(&[8; 80]).unwrap();
        link.flush().unwrap();
        assert_eq!(vm2.recv(&mut got).unwrap(), 80);
        assert_eq!(copy.send_to(&[9; 60], &to).unwrap_err().raw_os_error(), Some(libc::EPERM));

        // A peer let go of that then says vfkit's "VFKT" is one never to connect to.
        for _ in 0..=QUIET_CHECKS {
            link.check_peer();
        }
        assert!(!link.connected());
        vm2.send_to(VFKIT_MAGIC, &to).unwrap();
        vm2.send_to(&[10; 60], &to).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 10);
        assert!(!link.connected(), "vfkit's handshake: not connected to");
        link.send(&[11; 80]).unwrap();
        link.flush().unwrap();
        assert_eq!(vm2.recv(&mut got).unwrap(), 80);
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A connected guest that uploads is polled (as the stream link's are), and one that
    /// sends more between two polls than its socket may hold in flight is not; a vfkit
    /// guest, whose datagrams Linux caps at 10 queued, is never polled.
    #[test]
    fn an_upload_is_polled_unless_too_fast() {
        use crate::link::upload_poll::POLL_AFTER_FRAMES;
        let dir = tmp("poll");
        let to = dir.join("usernet.sock");
        let mut link = DgramLink::bind(&to).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        let frames = |n: usize| {
            for _ in 0..n {
                vm.send_to(&[1; 1514], &to).unwrap();
            }
        };
        frames(POLL_AFTER_FRAMES as usize);
        for _ in 0..POLL_AFTER_FRAMES {
            assert!(!link.polling());
            assert_eq!(link.recv(&mut buf).unwrap(), 1514);
        }
        assert!(link.connected());
        assert!(link.polling() && !link.read_events(), "polled after a run of bulk frames");
        // A poll (the engine calls readable_edge first) that finds a few frames goes on.
        frames(10);
        link.readable_edge(false);
        while link.recv(&mut buf).is_ok() {}
        assert!(link.polling());
        // One that finds more than FAST_POLL_FRAMES ends polling.
        frames(FAST_POLL_FRAMES + 1);
        link.readable_edge(false);
        while link.recv(&mut buf).is_ok() {}
        assert!(!link.polling() && link.read_events(), "a guest this fast is not polled");
        drop(link);

        let _ = std::fs::remove_file(&to);
        let mut link = DgramLink::bind(&to).unwrap();
        let vfkit = UnixDatagram::bind(dir.join("vfkit.sock")).unwrap();
        vfkit.connect(&to).unwrap();
        vfkit.send(VFKIT_MAGIC).unwrap();
        for _ in 0..POLL_AFTER_FRAMES * 2 {
            vfkit.send(&[1; 1514]).unwrap();
            link.readable_edge(false);
            assert_eq!(link.recv(&mut buf).unwrap(), 1514);
        }
        assert!(!link.connected() && !link.polling());
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Two senders before the link reads: the first becomes the peer, the other's datagram
    /// read in the same batch is dropped, and none of the peer's later frames is lost.
    #[test]
    fn the_first_sender_is_taken_and_keeps_its_frames() {
        let dir = tmp("first");
        let to = dir.join("usernet.sock");
        let mut link = DgramLink::bind(&to).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let a = UnixDatagram::bind(dir.join("a.sock")).unwrap();
        let b = UnixDatagram::bind(dir.join("b.sock")).unwrap();
        a.send_to(&[1; 60], &to).unwrap();
        b.send_to(&[2; 60], &to).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(buf[0], 1);
        assert!(link.connected());
        for i in 0..5u8 {
            a.send_to(&[10 + i; 60], &to).unwrap();
        }
        assert!(b.send_to(&[3; 60], &to).is_err(), "refused once connected");
        link.readable_edge(false);
        let mut got = Vec::new();
        while let Ok(n) = link.recv(&mut buf) {
            assert_eq!(n, 60);
            got.push(buf[0]);
        }
        assert_eq!(got, [10, 11, 12, 13, 14]);
        assert_eq!(link.stale, 1);
        assert_eq!(link.peer().and_then(|p| p.path()), Some(dir.join("a.sock").as_path()));
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A VM restarted at the same path while frames wait for its old socket: the new one
    /// gets none of them, only what is sent after it spoke.
    #[test]
    fn a_vm_restarted_at_the_same_path_gets_none_of_the_old_ones_frames() {
        let dir = tmp("samepath");
        let to = dir.join("usernet.sock");
        let mut link = DgramLink::bind(&to).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.send_to(&[1; 60], &to).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        // More than its socket takes: the rest wait.
        for _ in 0..30 {
            link.send(&[0xee; 100]).unwrap();
        }
        link.flush().unwrap();
        assert!(link.queued_frames() > 0);
        drop(vm);
        std::fs::remove_file(dir.join("vm.sock")).unwrap();
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.set_nonblocking(true).unwrap();
        link.check_peer();
        assert!(link.peer().is_none() && link.queued_frames() == 0, "the old one's frames went with it");
        vm.send_to(&[2; 60], &to).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert!(link.connected());
        link.send(&[0x77; 100]).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 200];
        assert_eq!(vm.recv(&mut got).unwrap(), 100);
        assert_eq!(got[0], 0x77);
        assert!(vm.recv(&mut got).is_err(), "nothing else");
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// vfkit connects its socket to usernet's and says "VFKT": usernet's is not connected
    /// back, so a restarted vfkit can connect at once.
    #[test]
    fn a_vfkit_guest_is_not_connected_to() {
        let dir = tmp("vfkit");
        let to = dir.join("usernet.sock");
        let mut link = DgramLink::bind(&to).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.connect(&to).unwrap();
        vm.send(VFKIT_MAGIC).unwrap();
        vm.send(&[7; 60]).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert!(!link.connected());
        link.send(&[8; 70]).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 100];
        vm.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        assert_eq!(vm.recv(&mut got).unwrap(), 70);
        drop(vm);
        let vm2 = UnixDatagram::bind(dir.join("vm2.sock")).unwrap();
        vm2.connect(&to).unwrap();
        vm2.send(VFKIT_MAGIC).unwrap();
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(link.peer().and_then(|p| p.path()), Some(dir.join("vm2.sock").as_path()));
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Whether our socket is writable now (poll(2), no wait).
    fn writable(link: &DgramLink) -> bool {
        let mut pfd = libc::pollfd { fd: link.fd(), events: libc::POLLOUT, revents: 0 };
        // SAFETY: one pollfd, valid for the duration of the call.
        assert!(unsafe { libc::poll(&mut pfd, 1, 0) } >= 0);
        pfd.revents & libc::POLLOUT != 0
    }

    /// A guest whose socket is full loses no frame: they wait, in order, until it reads.
    /// A connected guest's reads make usernet's socket writable, which the engine watches
    /// while frames wait; an unconnected one's do not, so the link asks to be flushed again
    /// soon (`backlogged`). While frames wait, the engine woken by a read yields before it
    /// refills the guest's socket (`yield_before_refill`); not once they are all taken.
    #[test]
    fn frames_wait_for_a_full_guest_socket() {
        for vfkit in [false, true] {
            let dir = tmp(if vfkit { "full-vfkit" } else { "full" });
            let to = dir.join("usernet.sock");
            let mut link = DgramLink::bind(&to).unwrap();
            let mut buf = vec![0u8; MAX_FRAME];
            let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
            vm.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
            vm.send_to(if vfkit { VFKIT_MAGIC } else { &[7; 60] }, &to).unwrap();
            let _ = link.recv(&mut buf);
            assert_eq!(link.connected(), !vfkit);
            assert!(!link.yield_before_refill(), "nothing waits");
            // Far more than the guest's socket queues (net.unix.max_dgram_qlen, 10 by default).
            let n = 300u32;
            for i in 0..n {
                let mut f = vec![0u8; 1500];
                f[..4].copy_from_slice(&i.to_be_bytes());
                link.send(&f).unwrap();
            }
            link.flush().unwrap();
            assert!(link.queued_frames() > 0, "a full socket leaves frames queued");
            assert!(link.write_events() && link.backlogged() && link.yield_before_refill());
            if !vfkit {
                assert!(!writable(&link), "not writable while the guest's socket is full");
            }
            let mut got = [0u8; 2000];
            for i in 0..n {
                let len = vm.recv(&mut got).unwrap_or_else(|e| panic!("frame {i}: {e}"));
                assert_eq!(len, 1500);
                assert_eq!(u32::from_be_bytes(got[..4].try_into().unwrap()), i, "in order");
                // The guest read: the engine hears of it (connected) or retries after
                // BACKLOG_RETRY, and flushes again.
                if !vfkit {
                    assert!(writable(&link), "frame {i}: a read from a full socket wakes usernet's");
                }
                link.flush().unwrap();
            }
            assert_eq!(link.queued_frames(), 0);
            assert!(!link.backlogged() && !link.write_events() && !link.yield_before_refill());
            assert_eq!(link.dropped, 0);
            drop(link);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A round's frames go out together: one sendmmsg(2) per batch, in order, nothing sent
    /// before the flush.
    #[test]
    fn a_rounds_frames_go_in_one_batch() {
        let dir = tmp("batch");
        let mut link = DgramLink::bind(&dir.join("usernet.sock")).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        vm.send_to(&[7; 60], dir.join("usernet.sock")).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        // Fewer than the guest's socket queues at once (net.unix.max_dgram_qlen, 10).
        for i in 0..8u8 {
            link.send(&[i; 100]).unwrap();
        }
        vm.set_nonblocking(true).unwrap();
        let mut got = [0u8; 200];
        assert!(vm.recv(&mut got).is_err(), "sent before the flush");
        link.flush().unwrap();
        assert!(!link.backlogged());
        for i in 0..8u8 {
            assert_eq!(vm.recv(&mut got).unwrap(), 100);
            assert_eq!(got[0], i, "in order");
        }
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Datagrams read ahead in batches come out one by one, in order, across batches, with
    /// a bad one in the middle dropped and counted.
    #[test]
    fn datagrams_read_in_batches_come_out_in_order() {
        let dir = tmp("rxbatch");
        let mut link = DgramLink::bind(&dir.join("usernet.sock")).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        let vm = UnixDatagram::bind(dir.join("vm.sock")).unwrap();
        let to = dir.join("usernet.sock");
        vm.set_nonblocking(true).unwrap();
        vm.send_to(VFKIT_MAGIC, &to).unwrap();
        // More than one batch, and more than the socket would queue from an unconnected
        // sender (net.unix.max_dgram_qlen): sent as the link reads.
        let n = 3 * RECV_BATCH as u32 + 5;
        let mut got = Vec::new();
        for i in 0..n {
            if i == RECV_BATCH as u32 + 1 {
                while vm.send_to(&[], &to).is_err() {
                    while let Ok(len) = link.recv(&mut buf) {
                        got.push((u32::from_be_bytes(buf[..4].try_into().unwrap()), len));
                    }
                }
            }
            let mut f = vec![0u8; 64 + i as usize];
            f[..4].copy_from_slice(&i.to_be_bytes());
            while vm.send_to(&f, &to).is_err() {
                while let Ok(len) = link.recv(&mut buf) {
                    got.push((u32::from_be_bytes(buf[..4].try_into().unwrap()), len));
                }
            }
        }
        while let Ok(len) = link.recv(&mut buf) {
            got.push((u32::from_be_bytes(buf[..4].try_into().unwrap()), len));
        }
        let want: Vec<(u32, usize)> = (0..n).map(|i| (i, 64 + i as usize)).collect();
        assert_eq!(got, want);
        assert_eq!(link.invalid, 1);
        drop(link);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
