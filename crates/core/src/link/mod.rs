//! Links: how a guest's Ethernet frames reach usernet. One file per transport: a TAP
//! device (`run`, `serve --netns`) and the sockets VMs use (`serve`); `handoff` is where
//! links made on other threads (after a handshake or an HTTP request) reach the engine.

pub mod dgram;
pub mod handoff;
pub mod qemu;
pub mod ram_guard;
pub mod seqpacket;
pub mod stdio;
pub mod tap;
pub mod upload_poll;
pub mod vhost_user;
pub mod vpnkit;

use std::io;
use std::os::fd::RawFd;

/// How soon the engine retries a backlogged link's `flush` (see [`Link::backlogged`]).
pub const BACKLOG_RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// A frame from the guest this large is bulk data: a link that can poll its guest (a
/// vhost-user TX ring, a stream socket) does so after a run of them ([`upload_poll`]),
/// since an upload's frames would otherwise wake the engine one by one. An MTU-1500 segment
/// is 1514 bytes; requests and ACKs are smaller.
pub const POLL_FRAME_BYTES: usize = 1024;
/// How long a link keeps polling without a bulk frame before it waits for notifications again.
pub const POLL_IDLE: std::time::Duration = std::time::Duration::from_millis(2);

/// Largest frame any link carries (64 KiB payload plus an Ethernet header).
pub const MAX_FRAME: usize = 65536 + 14;

/// Whether `fd`'s other end has hung up (poll(2) says POLLHUP), without waiting; false for
/// a negative descriptor.
pub fn fd_hung_up(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: 0, revents: 0 };
    // SAFETY: one pollfd, valid for the duration of the call; a timeout of 0 never blocks,
    // and poll(2) skips a negative descriptor.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    ready == 1 && pfd.revents & libc::POLLHUP != 0
}

/// One guest link: a non-blocking source and sink of whole Ethernet frames.
pub trait Link {
    /// The file descriptor the event loop waits on: readable, and writable for `flush`,
    /// unless `read_events` or `write_events` says otherwise.
    fn fd(&self) -> RawFd;
    /// Reads one frame into `buf` (at least MAX_FRAME bytes). `Err(WouldBlock)` when no whole
    /// frame is waiting, which a link may also say without a system call when its last read
    /// found the descriptor empty: the caller then waits for the descriptor's next readiness
    /// edge (the engine's epoll is edge-triggered, unless `level_triggered`) and calls
    /// again. `Err(UnexpectedEof)` when the guest went away; `Err(InvalidData)` for garbled
    /// framing. On the last two the engine drops this link (and logs why).
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Epoll reported `fd` readable: new bytes came, or (`peer_closed`) the peer's end of
    /// stream (RDHUP, HUP) or an error. Also called (never `peer_closed`) before each round's
    /// read of a link that is `polling`, whose descriptor raises no edges then. A link that answers `recv` with `WouldBlock` without
    /// a system call when its last read found the descriptor empty must read again after
    /// this; and after a `peer_closed`, always until the descriptor itself says EOF or
    /// EAGAIN, since no further edge comes for what is left.
    fn readable_edge(&mut self, peer_closed: bool) {
        let _ = peer_closed;
    }
    /// Writes or queues one frame, never half of one. A frame the link cannot take now may
    /// be dropped (the guest's TCP retransmits).
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
    /// Writes what `send` queued; the engine calls it at the end of every round of work
    /// and when the descriptor is writable, so a link may hold a round's frames to write
    /// them at once.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// True while the link reads its guest's queue without being told of new frames (during
    /// an upload: a vhost-user TX ring with notifications off, a stream socket the engine
    /// does not watch for reading): the engine then calls `recv` every round, and comes
    /// back within `BACKLOG_RETRY` when nothing else happens.
    fn polling(&self) -> bool {
        false
    }
    /// False while the link polls and its descriptor's readability should not wake the
    /// engine (a stream socket during an upload: each of the guest's writes would); the
    /// engine then does not watch the descriptor for reading until this is true again.
    fn read_events(&self) -> bool {
        true
    }
    /// False while the link has nothing waiting to be written, and its descriptor's turning
    /// writable should not wake the engine (a stream socket: every frame the guest reads
    /// would); the engine watches for writability only while this is true.
    fn write_events(&self) -> bool {
        true
    }
    /// True when the guest's end of the link has hung up (its descriptor says POLLHUP),
    /// whatever is still to be read from it: a guest that reconnects at once may be heard
    /// on its new link before the engine reads the old one's end.
    fn hung_up(&self) -> bool {
        fd_hung_up(self.fd())
    }
    /// True when the engine, woken because the guest's side took frames (its descriptor
    /// turned writable), should give the CPU to whatever else is runnable on it before it
    /// writes more: a Unix datagram socket whose peer is full wakes the engine at each
    /// datagram the peer reads, so writing at once would take the CPU from a peer (QEMU's
    /// I/O thread, when the two share a CPU) that was about to read more: one frame per
    /// wakeup.
    fn yield_before_refill(&self) -> bool {
        false
    }
    /// True when the engine may watch the descriptor level-triggered, so that epoll itself
    /// says whether a frame is left: the engine then reads a frame that came alone (none
    /// read in the round before) without the read after it that would find the descriptor
    /// empty. Only for a link whose `recv` is one system call on the descriptor with no
    /// state of its own (a TAP device), and that never wants `write_events` (a writable
    /// descriptor would be reported at every poll).
    fn level_triggered(&self) -> bool {
        false
    }
    /// True when frames wait in the link for the guest's socket to take them and no
    /// readiness event will say when it does (a datagram socket sending to an unconnected
    /// peer): the engine then calls `flush` again soon (`BACKLOG_RETRY`) instead of waiting.
    fn backlogged(&self) -> bool {
        false
    }
    /// True when the link takes offloaded frames (`send_offloaded`): a TAP device with
    /// IFF_VNET_HDR, where the kernel completes checksums and segments large TCP frames; a
    /// vhost-user guest that took GUEST_CSUM and GUEST_TSO4/6.
    fn offloads(&self) -> bool {
        false
    }
    /// True when the link also takes segmented UDP frames (USO, GSO_UDP_L4) that the guest's
    /// kernel cuts into datagrams: a TAP device whose kernel knows them (Linux 6.2).
    fn offloads_udp(&self) -> bool {
        false
    }
    /// Writes one frame with its offload instructions (only called when `offloads()`).
    fn send_offloaded(&mut self, frame: &[u8], hdr: &usernet_wire::vnet_hdr::VnetHdr) -> io::Result<()> {
        let _ = hdr;
        self.send(frame)
    }
    /// What the frame `recv` returned last leaves to its receiver (a partial checksum, one
    /// large TCP segment for many), from a guest that may send such frames (a TAP device
    /// with IFF_VNET_HDR, a vhost-user guest that took CSUM and HOST_TSO); the default
    /// (nothing) for a whole frame. usernet's own stack needs none of it; the switch
    /// finishes such a frame (`vnet_hdr::finish`) before another guest gets it, unless that
    /// guest's link takes it as it is (`offloads`).
    fn recv_offloads(&self) -> usernet_wire::vnet_hdr::VnetHdr {
        usernet_wire::vnet_hdr::VnetHdr::default()
    }
    /// A short name for logs, e.g. "tap eth0" or "qemu unix:/run/vm.sock #2".
    fn describe(&self) -> String {
        "link".to_string()
    }
    /// The guest this link was made for, when its transport's handshake names it (vpnkit's
    /// protocol hands the guest its MAC, and may fix its address): a newer link for the same
    /// MAC replaces this one, and the address becomes a static DHCP lease.
    fn guest(&self) -> Option<([u8; 6], Option<std::net::Ipv4Addr>)> {
        None
    }
}

/// A listening transport that yields a new link for each guest that connects (QEMU's
/// stream sockets, SOCK_SEQPACKET); a VM that reboots simply connects again.
pub trait LinkAcceptor {
    fn fd(&self) -> RawFd;
    /// Accepts one waiting guest; Ok(None) when none waits.
    fn accept(&mut self) -> io::Result<Option<Box<dyn Link>>>;
    fn describe(&self) -> String;
}
