//! vhost-user (`--listen-vhost-user PATH`): QEMU's `-netdev vhost-user` with usernet as the
//! back-end. The guest's virtio-net rings live in guest memory that QEMU shares with usernet
//! (a memfd), so no frame crosses a socket: usernet reads the guest's TX buffers and writes
//! its RX buffers itself, as passt's `--vhost-user` does.
//!
//! Theory of operation. Two threads share one device:
//!
//! - The control thread (one per connection, `usernet-vhost-user`) speaks the vhost-user
//!   protocol with the front-end (QEMU) through the rust-vmm `vhost` crate's
//!   [`BackendReqHandler`]: features, the memory table (each region mmap'ed with
//!   `vm-memory`), the rings' sizes, addresses, bases and eventfds, enable and stop. It
//!   blocks on the socket and touches nothing else.
//! - The engine's thread moves the frames: [`VhostUserLink::recv`] pops the TX queue's
//!   descriptor chains (the rust-vmm `virtio-queue` crate walks and validates them) and
//!   copies each frame out of guest memory; [`VhostUserLink::send`] fills RX chains (several
//!   with VIRTIO_NET_F_MRG_RXBUF, so a 64 KiB frame fits in 4 KiB buffers). Used entries are
//!   published frame by frame, all of a frame's buffers under one move of the used index
//!   (`Ring::add_used`); the guest is interrupted (the `call` eventfd) once per round, in
//!   `flush`, and only when the driver asked for it (VIRTIO_RING_F_EVENT_IDX's
//!   `used_event`, or without it the available ring's NO_INTERRUPT flag, decided as vhost
//!   does: `Ring::notify`).
//!
//! Both sides hold the [`Device`] behind one mutex: the memory map, the two queues and the
//! eventfds. The engine takes it once per frame; the control thread once per message, so a
//! ring is never reconfigured under a frame in flight, and no frame is handed between threads.
//!
//! A link is one *session*: it starts when both rings are started (their kick eventfd
//! arrived, addresses valid in the memory map) and enabled, with features and memory set,
//! and ends when any of that goes (GET_VRING_BASE stops a ring when the guest resets its
//! device or reboots, a ring reconfigured, a reset, the front-end gone). The control thread
//! then bumps the session number and rings the link's bell; the link's next `recv` returns
//! `UnexpectedEof` and the engine drops it. A new session hands a fresh link to the engine
//! through a [`Handoff`], so a VM that reboots gets a fresh link, with the features its new
//! driver took (and so the offloads, which the engine reads once per link).
//!
//! The link's descriptor is an epoll instance of its own that groups the TX and RX kick
//! eventfds (dup'ed from the front-end's) and its bell: the engine's edge-triggered epoll
//! wakes on any of them. `recv` drains the kicks only when the TX queue is empty and goes
//! back to notifications, just before re-enabling them and looking once more, so no kick
//! is lost. (Every write to an eventfd wakes its watchers whatever its count, so draining is
//! not needed for the edges; but kicks left unread keep the inner epoll ready, and kernels
//! before 5.5 then wake the outer epoll at each of its waits: the loop would spin. During
//! an upload the ring is polled and the guest kicks rarely; those kicks are read as below.)
//! The front-end's kick and call descriptors are made non-blocking as they arrive, and the
//! kicks read only when poll(2) says they are readable: the engine's one thread serves
//! every guest, and an eventfd without EFD_NONBLOCK, or a pipe, must not stop it.
//!
//! Uploads: the TX ring is polled, not kicked. A guest's kick is costly where it is
//! emulated (under TCG, each is a trapped write that QEMU turns into an eventfd write, and
//! each wakes usernet): a VM uploading at MTU 1500 kicked once per segment. So during an
//! upload ([`UploadPoll`] says when one starts and ends: a run of frames of
//! [`POLL_FRAME_BYTES`](super::POLL_FRAME_BYTES) or more, until none came for
//! [`POLL_IDLE`](super::POLL_IDLE)) the ring's notifications
//! stay off when it runs empty, and the engine reads it again every round of its loop and
//! at least every millisecond ([`Link::polling`]); then notifications are turned on as
//! before. A request after an upload so waits a millisecond at most. With EVENT_IDX the
//! guest is still asked, at each empty look, to kick once it has queued half a ring more
//! (`kick_after`), so a guest faster than the millisecond (KVM: a 256-entry ring of
//! 1514-byte frames is 3 Gbit/s per millisecond) wakes the engine early rather than waiting
//! for the next poll, though it may still run out of free descriptors first if it chains
//! several per frame or reclaims used ones late. Each empty look of a polled ring reads the
//! kick eventfds (one poll(2) call, and a read(2) of each that has a count) before looking
//! once more, so no kick stays unread for long (see above: kernels before 5.5). Measured on a TCG guest's 64 MiB upload
//! (`usernet-bench --vm --vm-only --vm-transport vhost-user`, alternated runs): 0.59-0.64
//! Gbit/s and 0.66-1.2 s of usernet's CPU per GB, against 0.12-0.13 Gbit/s and 10.7-11.5
//! s/GB kicked (passt, kicked, in the same runs: 0.08-0.11 Gbit/s, 7.1-11.8 s/GB).
//!
//! RX back-pressure: when the guest has no RX buffers left, frames wait in a bounded
//! queue ([`MAX_QUEUE`] bytes, then dropped whole) and RX kicks are turned on; the guest's
//! next refill kicks, the engine calls `recv`, and the queue is written first. A frame
//! that a whole ring of the guest's buffers cannot hold is dropped, not left to stop the
//! queue.
//! `backlogged()` also has the engine retry every millisecond.
//!
//! Offloads. usernet→guest: when the driver takes GUEST_CSUM, GUEST_TSO4 and GUEST_TSO6,
//! `offloads()` is true and the engine may send 64 KiB TCP frames with a partial checksum
//! (`send_offloaded`), its [`VnetHdr`] written as the virtio-net header (same layout).
//! guest→usernet: when the driver takes CSUM and HOST_TSO4/6, the guest sends TCP frames of
//! up to 64 KiB with a partial checksum (see [`HOST_OFFLOADS`]).
//!
//! Garbled descriptors (a loop, an address outside guest memory, a write-only buffer in a TX
//! chain, a zero-length buffer, a frame over more than [`MAX_FRAME_DESCS`] buffers, a frame
//! longer than [`MAX_FRAME`](super::MAX_FRAME), an available index too far ahead) end the link
//! with `InvalidData` naming the fault, and the connection is shut, so QEMU sees its back-end
//! go; a front-end message the crate or this handler refuses (a memory region past the end
//! of its file among them: mapped, it would be a SIGBUS for the whole process) ends the
//! connection with one log line. A front-end that shrinks the file under a mapping it gave
//! (QEMU seals its memfd RAM against that) ends its own link the same way: the access that
//! raises SIGBUS reads zeros instead (`ram_guard`), and the link fails saying why. Other
//! VMs are untouched; nothing here panics on what a guest or front-end sends.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use vhost::VhostUserMemoryRegionBase;
use vhost::vhost_user::message::{
    FrontendReq, VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserHeaderFlag,
    VhostUserInflight, VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags,
    VhostUserVringState,
};
use vhost::vhost_user::{
    Backend, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut,
};
use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MRG_RXBUF,
};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC, VRING_AVAIL_F_NO_INTERRUPT,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

use super::handoff::{Handoff, HandoffSender};
use super::qemu::listen_stream;
use super::ram_guard;
use super::upload_poll::UploadPoll;
use super::{Link, LinkAcceptor};
use usernet_wire::vnet_hdr::{self, VnetHdr};

/// The RX queue's index (the device writes), and the TX queue's (the device reads).
const RX: usize = 0;
const TX: usize = 1;
/// Largest ring the front-end may ask for (QEMU's rx/tx_queue_size go up to 1024).
const MAX_QUEUE_SIZE: u16 = 1024;
/// Most buffers (descriptors) one frame may take, over all its chains: a full ring of
/// one-buffer chains. `virtio-queue` lets one chain hold a ring's worth of descriptors and
/// an indirect table of 65,535 more, and the available ring may name the same head again
/// and again: without this bound a guest has the engine walk tens of millions of
/// descriptors for one frame. A frame over more is garbled.
const MAX_FRAME_DESCS: usize = MAX_QUEUE_SIZE as usize;

/// Bytes of frames a link may hold for a guest that has no RX buffers, before dropping.
pub const MAX_QUEUE: usize = 4 * 1024 * 1024;
/// The virtio-net header with VIRTIO_F_VERSION_1 or MRG_RXBUF: the 10 bytes of
/// `VnetHdr` and `num_buffers`.
const HDR_LEN: usize = vnet_hdr::LEN + 2;

const fn bit(b: u32) -> u64 {
    1 << b
}

/// Offloads of frames usernet sends to the guest (the engine's `send_offloaded`).
pub const GUEST_OFFLOADS: u64 =
    bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4) | bit(VIRTIO_NET_F_GUEST_TSO6);
/// Offloads of frames the guest sends: partial checksums (VIRTIO_NET_F_CSUM) and TCP
/// frames of up to 64 KiB (HOST_TSO4, HOST_TSO6), which the guest's kernel then need not
/// cut into MTU-sized segments. usernet's stack verifies no checksum and takes a large
/// segment as one write to its socket; the switch finishes such a frame
/// (`vnet_hdr::finish`, from [`Link::recv_offloads`]) for another guest that does not
/// take offloads. No UDP fragmentation offload (HOST_UFO) nor ECN (HOST_ECN).
pub const HOST_OFFLOADS: u64 = bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_HOST_TSO4) | bit(VIRTIO_NET_F_HOST_TSO6);

/// The virtio features usernet offers.
pub const FEATURES: u64 = bit(VIRTIO_F_VERSION_1)
    | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC)
    | GUEST_OFFLOADS
    | HOST_OFFLOADS;

/// One virtqueue and its eventfds.
struct Ring {
    queue: Queue,
    kick: Option<File>,
    call: Option<File>,
    /// SET_VRING_KICK came and no GET_VRING_BASE since.
    started: bool,
    enabled: bool,
    /// The used index at the last interrupt decision (none yet this session): with
    /// EVENT_IDX the guest is interrupted when its `used_event` lies between that and now.
    signalled_used: Option<u16>,
}

impl Ring {
    fn new() -> Ring {
        Ring {
            queue: Queue::new(MAX_QUEUE_SIZE).expect("a valid maximum queue size"),
            kick: None,
            call: None,
            started: false,
            // See `serve_connection`: QEMU's enable comes before the crate accepts it.
            enabled: true,
            signalled_used: None,
        }
    }

    /// Adds used entries (head, bytes written) and then moves the used index past all of
    /// them at once. A frame spread over merged RX buffers is so seen whole: a Linux guest
    /// reading the ring meanwhile would take a first buffer whose `num_buffers` names
    /// entries not there yet for an error, drop the frame and read the rest as frames of
    /// their own (virtio-queue's `add_used` moves the index at every entry).
    fn add_used(&mut self, mem: &GuestMemoryMmap, entries: &[(u16, u32)]) -> Result<(), String> {
        let size = self.queue.size();
        let used_ring = self.queue.used_ring();
        if let Some(&(head, _)) = entries.iter().find(|&&(head, _)| head >= size) {
            return Err(format!("used ring: descriptor {head} outside a table of {size}"));
        }
        let outside = || "used ring: outside the address space".to_string();
        let mut idx = self.queue.next_used();
        for &(head, len) in entries {
            // virtq_used: flags, idx, then elements of 8 bytes (id, len).
            let mut elem = [0u8; 8];
            elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            elem[4..].copy_from_slice(&len.to_le_bytes());
            let at = used_ring.checked_add(4 + 8 * u64::from(idx % size)).ok_or_else(outside)?;
            mem.write_slice(&elem, GuestAddress(at)).map_err(|e| format!("used ring: {e}"))?;
            idx = idx.wrapping_add(1);
        }
        let at = used_ring.checked_add(2).ok_or_else(outside)?;
        mem.store(idx.to_le(), GuestAddress(at), std::sync::atomic::Ordering::Release)
            .map_err(|e| format!("used ring: {e}"))?;
        self.queue.set_next_used(idx);
        Ok(())
    }

    /// Interrupts the guest after used entries, when it wants it, as vhost decides: with
    /// EVENT_IDX, when its `used_event` lies between the used index of the last decision
    /// and now (Linux's `vring_need_event`); without it, unless the available ring's flags
    /// say VRING_AVAIL_F_NO_INTERRUPT (a driver busy reaping the ring sets it). A session's
    /// first decision always interrupts.
    fn notify(&mut self, mem: &GuestMemoryMmap) -> Result<(), String> {
        let new = self.queue.next_used();
        // The used entries and index are written before the guest's event index is read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let wanted = match self.signalled_used.replace(new) {
            None => Ok(true),
            Some(old) if self.queue.event_idx_enabled() => {
                self.used_event(mem).map(|event| need_event(event, new, old))
            }
            Some(_) => self.avail_flags(mem).map(|flags| flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0),
        };
        match wanted {
            Ok(wanted) => {
                if wanted {
                    self.interrupt();
                }
                Ok(())
            }
            Err(why) => {
                // The link fails; the guest still hears of the entries (as vhost does).
                self.interrupt();
                Err(why)
            }
        }
    }

    /// The available ring's flags (virtq_avail's first word).
    fn avail_flags(&self, mem: &GuestMemoryMmap) -> Result<u16, String> {
        self.avail_word(mem, 0)
    }

    /// The guest's `used_event`: the last word of the available ring (virtq_avail: flags,
    /// idx, `size` elements of 2 bytes, then used_event).
    fn used_event(&self, mem: &GuestMemoryMmap) -> Result<u16, String> {
        self.avail_word(mem, 4 + 2 * u64::from(self.queue.size()))
    }

    /// The little-endian word `offset` bytes into the available ring.
    fn avail_word(&self, mem: &GuestMemoryMmap, offset: u64) -> Result<u16, String> {
        let at = self.queue.avail_ring().checked_add(offset).ok_or("avail ring: outside the address space")?;
        let word: u16 =
            mem.load(GuestAddress(at), std::sync::atomic::Ordering::Relaxed).map_err(|e| format!("avail ring: {e}"))?;
        Ok(u16::from_le(word))
    }

    /// Writes the call eventfd, made O_NONBLOCK as it came (`nonblocking`): one write(2) per
    /// interrupt, on the data path. (A front-end that clears the flag on its copy afterwards
    /// could block the engine at a full counter; such a process runs as usernet's user and
    /// could stop it anyway.)
    fn interrupt(&mut self) {
        if let Some(call) = self.call.as_mut() {
            let _ = call.write(&1u64.to_ne_bytes());
        }
    }
}

/// Whether moving an index from `old` to `new` passed `event` (virtio's `vring_need_event`).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// A guest memory region as the front-end's address space sees it (ring addresses come
/// in that space).
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// What the control thread and the link share, behind one mutex.
struct Device {
    acked: u64,
    features_set: bool,
    /// `mem`'s mappings guarded against the front-end shrinking their files
    /// (`ram_guard`): declared first, so that they are unguarded before being unmapped.
    guards: Vec<ram_guard::Guarded>,
    mem: Option<GuestMemoryMmap>,
    mappings: Vec<Mapping>,
    rings: [Ring; 2],
    /// Bumped when a session ends; a link belongs to one session.
    session: u64,
    /// A link exists for `session`.
    running: bool,
    /// The live link's bell.
    bell: Option<Arc<OwnedFd>>,
    /// Why the last session ended, and whether that was a fault (not a reset or a goodbye).
    ended: (String, bool),
}

impl Device {
    fn new() -> Device {
        Device {
            acked: 0,
            features_set: false,
            guards: Vec::new(),
            mem: None,
            mappings: Vec::new(),
            rings: [Ring::new(), Ring::new()],
            session: 0,
            running: false,
            bell: None,
            ended: (String::new(), false),
        }
    }

    /// Why the guest's memory is gone, if the front-end shrank the file under a mapping
    /// (see `ram_guard`): it now reads zeros, and the link ends.
    fn memory_lost(&self) -> Option<String> {
        self.guards.iter().any(|g| g.lost()).then(|| {
            "the front-end shrank the file of the guest's memory under usernet's mapping \
             (SIGBUS): the guest's memory is gone"
                .to_string()
        })
    }

    fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.mappings.iter().find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size).map(|m| va - m.vmm_addr + m.gpa)
    }

    /// Ends the running session, if any: its link's next `recv` says why.
    fn end_session(&mut self, why: &str, fault: bool) {
        if !self.running {
            return;
        }
        self.running = false;
        self.session += 1;
        self.ended = (why.to_string(), fault);
        if let Some(bell) = self.bell.take() {
            ring_bell(&bell);
        }
    }

    /// Both rings can carry frames.
    fn can_run(&mut self) -> bool {
        let Some(mem) = self.mem.as_ref() else { return false };
        self.features_set
            && self.rings.iter_mut().all(|r| {
                r.started && r.enabled && r.kick.is_some() && {
                    r.queue.set_ready(true);
                    r.queue.is_valid(mem)
                }
            })
    }
}

fn ring_bell(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live buffer to an eventfd we own.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

/// Reads the counters of the eventfds `fds` that have one (nothing from the others). The
/// front-end's eventfds are O_NONBLOCK (`nonblocking`), and read only when poll(2) says
/// they are readable: a front-end that clears the flag on its copy afterwards (the open
/// file is shared) still does not stop the engine's thread on an empty one.
fn drain(fds: &[RawFd]) {
    let mut pfds = [libc::pollfd { fd: -1, events: libc::POLLIN, revents: 0 }; 3];
    let n = fds.len().min(pfds.len());
    for (pfd, &fd) in pfds.iter_mut().zip(fds) {
        pfd.fd = fd;
    }
    // SAFETY: `n` live pollfds; a timeout of 0 never blocks.
    if unsafe { libc::poll(pfds.as_mut_ptr(), n as libc::nfds_t, 0) } <= 0 {
        return;
    }
    for pfd in &pfds[..n] {
        if pfd.revents & libc::POLLIN != 0 {
            let mut counter = [0u8; 8];
            // SAFETY: reads 8 bytes into a live buffer.
            unsafe { libc::read(pfd.fd, counter.as_mut_ptr().cast(), counter.len()) };
        }
    }
}

/// Sets O_NONBLOCK on a kick or call descriptor the front-end passed. The engine's one
/// thread reads and writes them for every guest: a blocking one (an eventfd without
/// EFD_NONBLOCK, a pipe) would stop it at an empty kick or a full call. The flag belongs to
/// the open file, which the front-end shares (QEMU's eventfds have it already).
fn nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor we hold.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: the same, setting a flag.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Asks the guest to kick when it has made `frames` more chains available (EVENT_IDX's
/// `avail_event`, the last word of the used ring): a polled ring still wakes the engine
/// before the guest runs out of TX buffers, were it to fill half a ring between two polls.
/// Without EVENT_IDX the guest has no such threshold and the ring is only polled.
fn kick_after(queue: &Queue, mem: &GuestMemoryMmap, frames: u16) -> Result<(), vm_memory::GuestMemoryError> {
    if !queue.event_idx_enabled() || frames == 0 {
        return Ok(());
    }
    // virtq_used: flags, idx, `size` elements of 8 bytes, then avail_event.
    let at = queue.used_ring() + 4 + 8 * u64::from(queue.size());
    // The guest kicks when its available index passes `avail_event`.
    let event = queue.next_avail().wrapping_add(frames - 1);
    mem.store(event.to_le(), GuestAddress(at), std::sync::atomic::Ordering::Release)
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd returns a new descriptor (or -1) that we then own.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// An epoll instance watching `fds` for input (level-triggered).
fn epoll_of(fds: &[RawFd]) -> io::Result<OwnedFd> {
    // SAFETY: epoll_create1 returns a new descriptor (or -1) that we then own.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    for &fd in fds {
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
        // SAFETY: registers a live descriptor with our epoll instance; `ev` lives across the call.
        if unsafe { libc::epoll_ctl(ep.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(ep)
}

/// The features of one session, as the link uses them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Bytes of virtio-net header in front of every frame (12, or 10 for a legacy driver
    /// without MRG_RXBUF).
    pub hdr_len: usize,
    /// Several RX chains may carry one frame.
    pub mrg_rxbuf: bool,
    /// The guest takes partial checksums and 64 KiB TCP frames.
    pub guest_offloads: bool,
}

impl Negotiated {
    pub fn from_features(acked: u64) -> Negotiated {
        let mrg_rxbuf = acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0;
        let modern = acked & bit(VIRTIO_F_VERSION_1) != 0;
        Negotiated {
            hdr_len: if modern || mrg_rxbuf { HDR_LEN } else { vnet_hdr::LEN },
            mrg_rxbuf,
            guest_offloads: acked & GUEST_OFFLOADS == GUEST_OFFLOADS,
        }
    }
}

/// Checks the features a front-end acks against those offered.
pub fn check_ack(acked: u64) -> Result<Negotiated, String> {
    let unknown = acked & !FEATURES;
    if unknown != 0 {
        return Err(format!("features {unknown:#x} were never offered"));
    }
    Ok(Negotiated::from_features(acked))
}

/// One frame read from a TX chain: its header and its length in the caller's buffer.
/// A chain is garbled when it has a write-only or a zero-length buffer, more than
/// [`MAX_FRAME_DESCS`] buffers, ends on a NEXT flag (a loop or an index outside the table
/// stops the walk there), holds less than a header or more than `buf`, or points outside
/// guest memory.
fn read_chain<I>(mem: &GuestMemoryMmap, descs: I, hdr_len: usize, buf: &mut [u8]) -> Result<(VnetHdr, usize), String>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut hdr = [0u8; HDR_LEN];
    let mut got = 0usize;
    let mut next = false;
    for (i, d) in descs.enumerate() {
        if i == MAX_FRAME_DESCS {
            return Err(format!("a TX chain of more than {MAX_FRAME_DESCS} buffers"));
        }
        if d.is_write_only() {
            return Err("a write-only buffer in a TX chain".into());
        }
        // QEMU's own virtio devices refuse them too ("zero sized buffers are not allowed"),
        // so no driver that works there sends one.
        if d.len() == 0 {
            return Err("a zero-length buffer in a TX chain".into());
        }
        let mut addr = d.addr().0;
        let mut len = d.len() as usize;
        if got < hdr_len {
            let n = len.min(hdr_len - got);
            mem.read_slice(&mut hdr[got..got + n], GuestAddress(addr))
                .map_err(|e| format!("TX buffer at {addr:#x}: {e}"))?;
            got += n;
            addr += n as u64;
            len -= n;
        }
        if len > 0 {
            let off = got - hdr_len;
            let Some(dst) = buf.get_mut(off..off + len) else {
                return Err(format!("a TX frame longer than {} bytes", buf.len()));
            };
            mem.read_slice(dst, GuestAddress(addr)).map_err(|e| format!("TX buffer at {addr:#x}: {e}"))?;
            got += len;
        }
        next = d.has_next();
    }
    if next {
        return Err("a TX chain that loops or leaves its table".into());
    }
    if got <= hdr_len {
        return Err(format!("a TX chain of {got} bytes, no frame after the header"));
    }
    let hdr = VnetHdr::parse(&hdr).unwrap_or_default();
    Ok((hdr, got - hdr_len))
}

/// Writes `parts` (the header, then the frame) into the writable buffers `segs` of the
/// chains `chains` (head index, range of `segs`); returns each chain's head and the bytes it
/// got. `segs` hold enough room (the caller counted).
fn write_chains(
    mem: &GuestMemoryMmap,
    parts: [&[u8]; 2],
    segs: &[(u64, u32)],
    chains: &[(u16, usize, usize)],
    used: &mut Vec<(u16, u32)>,
) -> Result<(), String> {
    let (mut part, mut pos) = (0usize, 0usize);
    used.clear();
    for &(head, from, to) in chains {
        let mut written = 0u32;
        for &(addr, len) in &segs[from..to] {
            let mut at = 0u32;
            while at < len && part < 2 {
                let src = &parts[part][pos..];
                let n = src.len().min((len - at) as usize);
                mem.write_slice(&src[..n], GuestAddress(addr + at as u64))
                    .map_err(|e| format!("RX buffer at {addr:#x}: {e}"))?;
                at += n as u32;
                pos += n;
                if pos == parts[part].len() {
                    part += 1;
                    pos = 0;
                }
            }
            written += at;
            if part == 2 {
                break;
            }
        }
        used.push((head, written));
    }
    Ok(())
}

/// A frame waiting for RX buffers.
struct Pending {
    hdr: [u8; HDR_LEN],
    frame: Vec<u8>,
}

/// The engine's side of one session (see the module's documentation).
pub struct VhostUserLink {
    dev: Arc<Mutex<Device>>,
    session: u64,
    features: Negotiated,
    /// Groups the bell and both kicks: the descriptor the engine waits on.
    epfd: OwnedFd,
    bell: Arc<OwnedFd>,
    /// The kick eventfds (the RX ring's, the TX ring's), drained when the TX ring goes
    /// back to notifications.
    kicks: [File; 2],
    /// The vhost-user connection, shut when the engine drops a live link.
    conn: Arc<UnixStream>,
    name: String,
    /// Frames for the guest waiting for RX buffers, and their bytes.
    backlog: VecDeque<Pending>,
    backlog_bytes: usize,
    /// Used entries added since the last interrupt, per ring.
    used: [bool; 2],
    /// The TX queue's notifications are off (chains are being consumed, or the ring is
    /// polled).
    tx_quiet: bool,
    /// Whether the TX ring is polled (an upload).
    upload: UploadPoll,
    /// Why the link must close (garbled RX chains, seen in `send`).
    broken: Option<String>,
    /// Scratch for `write_rx`: writable buffers, chains, used lengths.
    segs: Vec<(u64, u32)>,
    chains: Vec<(u16, usize, usize)>,
    used_lens: Vec<(u16, u32)>,
    /// The virtio-net header of the frame read last ([`Link::recv_offloads`]).
    last_offloads: VnetHdr,
    /// Frames dropped: no RX buffer and the backlog full, or too big for the guest's.
    pub dropped: u64,
    /// A frame too big for the guest's RX buffers was logged (once a link: a guest whose
    /// driver takes smaller frames than usernet's `--mtu` gets none of its larger ones, and
    /// its TCP downloads stall with nothing else said).
    said_too_big: bool,
}

impl VhostUserLink {
    fn lock(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one frame into the RX queue. Ok(false): not enough RX buffers now. Ok(true):
    /// written, or dropped for good (too big for the guest's buffers: one chain without
    /// MRG_RXBUF, a whole ring's worth with it). The work is bounded whatever the guest
    /// wrote: at most a ring's worth of chains (the available index is read once, by the
    /// one iterator) and [`MAX_FRAME_DESCS`] buffers, none of zero length (QEMU's own virtio
    /// devices refuse those too), or the ring is garbled; so `segs` never holds more.
    fn write_rx(&mut self, dev: &mut Device, hdr: &[u8; HDR_LEN], frame: &[u8]) -> Result<bool, String> {
        let Device { mem: Some(mem), rings, .. } = dev else { return Ok(false) };
        let ring = &mut rings[RX];
        if !ring.enabled {
            return Ok(false);
        }
        let hdr_len = self.features.hdr_len;
        let total = hdr_len + frame.len();
        let ring_size = usize::from(ring.queue.size());
        self.segs.clear();
        self.chains.clear();
        let mut room = 0usize;
        // The chains available now (no more than the ring holds: the crate checks the index).
        let mut avail = ring.queue.iter(&*mem).map_err(|e| format!("RX ring: {e}"))?;
        while room < total && (self.features.mrg_rxbuf || self.chains.is_empty()) {
            let Some(chain) = avail.next() else { break };
            let head = chain.head_index();
            let from = self.segs.len();
            let mut next = true;
            for d in chain {
                if !d.is_write_only() {
                    return Err("a read-only buffer in an RX chain".into());
                }
                if d.len() == 0 {
                    return Err("a zero-length buffer in an RX chain".into());
                }
                if self.segs.len() == MAX_FRAME_DESCS {
                    return Err(format!("more than {MAX_FRAME_DESCS} buffers for one RX frame"));
                }
                self.segs.push((d.addr().0, d.len()));
                room += d.len() as usize;
                next = d.has_next();
            }
            if next {
                return Err("an RX chain that loops or leaves its table".into());
            }
            self.chains.push((head, from, self.segs.len()));
        }
        if room < total {
            for _ in 0..self.chains.len() {
                avail.go_to_previous_position();
            }
            if !self.chains.is_empty() && (!self.features.mrg_rxbuf || self.chains.len() == ring_size) {
                // Without MRG_RXBUF a frame has one chain, and this one is too small; with
                // it, the guest gave every chain its ring holds, and they are too small. The
                // frame never fits (waiting, it would stop every frame behind it), so it is
                // dropped; the guest's buffers stay for others.
                self.dropped += 1;
                if !self.said_too_big {
                    self.said_too_big = true;
                    let buffers =
                        if self.features.mrg_rxbuf { "its whole RX ring" } else { "one buffer a frame, no MRG_RXBUF" };
                    tracing::warn!(
                        link = %self.name,
                        "a {}-byte frame does not fit in the guest's RX buffers ({buffers}: {room} bytes): dropped, \
                         as are the next such frames (is --mtu larger than the guest's driver takes?); said once",
                        frame.len()
                    );
                } else {
                    tracing::trace!("{}: a {}-byte frame exceeds RX buffers of {room} bytes", self.name, frame.len());
                }
                return Ok(true);
            }
            return Ok(false);
        }
        let mut h = *hdr;
        h[vnet_hdr::LEN..].copy_from_slice(&(self.chains.len() as u16).to_le_bytes());
        write_chains(mem, [&h[..hdr_len], frame], &self.segs, &self.chains, &mut self.used_lens)?;
        ring.add_used(mem, &self.used_lens).map_err(|e| format!("RX {e}"))?;
        self.used[RX] = true;
        Ok(true)
    }

    /// Writes waiting frames while the guest has buffers for them.
    fn write_backlog(&mut self, dev: &mut Device) -> Result<(), String> {
        let mut looked_again = false;
        while let Some(p) = self.backlog.pop_front() {
            if !self.write_rx(dev, &p.hdr, &p.frame)? {
                self.backlog.push_front(p);
                // Ask the guest to kick when it adds buffers; look once more in case it
                // just did (bounded: the buffers there may still be too few).
                if let Device { mem: Some(mem), rings, .. } = dev
                    && rings[RX].queue.enable_notification(&*mem).unwrap_or(false)
                    && !looked_again
                {
                    looked_again = true;
                    continue;
                }
                return Ok(());
            }
            self.backlog_bytes -= p.frame.len();
        }
        if let Device { mem: Some(mem), rings, .. } = dev {
            let _ = rings[RX].queue.disable_notification(&*mem);
        }
        Ok(())
    }

    fn send_with(&mut self, frame: &[u8], hdr: &VnetHdr) -> io::Result<()> {
        if self.broken.is_some() {
            return Ok(());
        }
        let mut h = [0u8; HDR_LEN];
        let mut v = [0u8; vnet_hdr::LEN];
        hdr.emit(&mut v);
        h[..vnet_hdr::LEN].copy_from_slice(&v);
        let dev = self.dev.clone();
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        if dev.session != self.session {
            return Ok(());
        }
        let result = if self.backlog.is_empty() { self.write_rx(&mut dev, &h, frame) } else { Ok(false) };
        match result {
            Ok(true) => {}
            Ok(false) => {
                if self.backlog_bytes + frame.len() > MAX_QUEUE {
                    self.dropped += 1;
                    tracing::trace!("{}: no RX buffer, dropped a {}-byte frame", self.name, frame.len());
                } else {
                    self.backlog_bytes += frame.len();
                    self.backlog.push_back(Pending { hdr: h, frame: frame.to_vec() });
                    if self.backlog.len() == 1 {
                        let _ = self.write_backlog(&mut dev);
                    }
                }
            }
            Err(why) => self.fail(garbled(why)),
        }
        if let Some(why) = dev.memory_lost() {
            self.fail(why);
        }
        Ok(())
    }

    /// Marks the link broken, `why` its error; the engine hears of it at its next `recv`.
    fn fail(&mut self, why: String) {
        if self.broken.is_none() {
            self.broken = Some(why);
            ring_bell(&self.bell);
        }
    }
}

impl Link for VhostUserLink {
    fn fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    fn hung_up(&self) -> bool {
        // The descriptor the engine watches is an epoll set of the rings' kicks, which never
        // hangs up: the front-end's connection does.
        super::fd_hung_up(self.conn.as_raw_fd())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(why) = self.broken.clone() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        let dev = self.dev.clone();
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        if dev.session != self.session {
            drain(&[self.bell.as_raw_fd()]);
            let (why, fault) = dev.ended.clone();
            let kind = if fault { io::ErrorKind::InvalidData } else { io::ErrorKind::UnexpectedEof };
            return Err(io::Error::new(kind, why));
        }
        let got = self.recv_frame(&mut dev, buf);
        // Whatever the rings read after a lost mapping was zeros: that, not them, is why.
        if let Some(why) = dev.memory_lost() {
            self.fail(why.clone());
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        got
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.send_with(frame, &VnetHdr::default())
    }

    fn offloads(&self) -> bool {
        self.features.guest_offloads
    }

    fn send_offloaded(&mut self, frame: &[u8], hdr: &VnetHdr) -> io::Result<()> {
        self.send_with(frame, hdr)
    }

    fn recv_offloads(&self) -> VnetHdr {
        self.last_offloads
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_rings();
        Ok(())
    }

    fn backlogged(&self) -> bool {
        !self.backlog.is_empty()
    }

    fn polling(&self) -> bool {
        self.upload.polling()
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

impl VhostUserLink {
    /// [`Link::recv`] past the checks: the backlog, then a frame of the TX ring.
    fn recv_frame(&mut self, dev: &mut Device, buf: &mut [u8]) -> io::Result<usize> {
        if !self.backlog.is_empty()
            && let Err(why) = self.write_backlog(dev)
        {
            let why = garbled(why);
            self.fail(why.clone());
            return Err(io::Error::new(io::ErrorKind::InvalidData, why));
        }
        let hdr_len = self.features.hdr_len;
        let Device { mem: Some(mem), rings, .. } = dev else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let ring = &mut rings[TX];
        if !ring.enabled {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let garbled = |why: String| io::Error::new(io::ErrorKind::InvalidData, garbled(why));
        // Bounded: each pass pops a chain or returns, and the second look after turning
        // notifications on returns unless the guest added chains meanwhile.
        for _ in 0..4 {
            let chain = match ring.queue.iter(&*mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(garbled(format!("TX ring: {e}"))),
            };
            if let Some(chain) = chain {
                if !self.tx_quiet {
                    let _ = ring.queue.disable_notification(&*mem);
                    self.tx_quiet = true;
                }
                let head = chain.head_index();
                let (hdr, n) = read_chain(mem, chain, hdr_len, buf).map_err(garbled)?;
                self.last_offloads = hdr;
                self.upload.frame(n, std::time::Instant::now);
                ring.add_used(mem, &[(head, 0)]).map_err(|e| garbled(format!("TX {e}")))?;
                self.used[TX] = true;
                return Ok(n);
            }
            // Empty. Polled: stay quiet until POLL_IDLE passed without a bulk frame, but
            // have the guest kick once it has queued half a ring meanwhile. The kicks that
            // came are read first (see the module's comment), then the ring is looked at
            // once more, for chains made available just before that read.
            if self.upload.empty(std::time::Instant::now) {
                drain(&[self.bell.as_raw_fd(), self.kicks[TX].as_raw_fd(), self.kicks[RX].as_raw_fd()]);
                let avail = ring.queue.avail_idx(&*mem, std::sync::atomic::Ordering::Acquire);
                match avail {
                    Ok(idx) if idx.0 != ring.queue.next_avail() => continue,
                    Ok(_) => {}
                    Err(e) => return Err(garbled(format!("TX ring: {e}"))),
                }
                kick_after(&ring.queue, mem, ring.queue.size() / 2).map_err(|e| garbled(format!("TX ring: {e}")))?;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            // Drain the kicks, turn notifications on and look once more. (Kicks left unread
            // would keep the inner epoll ready: kernels before 5.5 then wake the engine's
            // epoll at every wait, and the loop spins.)
            drain(&[self.bell.as_raw_fd(), self.kicks[TX].as_raw_fd(), self.kicks[RX].as_raw_fd()]);
            self.tx_quiet = false;
            match ring.queue.enable_notification(&*mem) {
                Ok(true) => continue,
                Ok(false) => break,
                Err(e) => return Err(garbled(format!("TX ring: {e}"))),
            }
        }
        Err(io::ErrorKind::WouldBlock.into())
    }

    /// [`Link::flush`]: the backlog, then the used rings' interrupts.
    fn flush_rings(&mut self) {
        if !self.used[RX] && !self.used[TX] && self.backlog.is_empty() {
            return;
        }
        let dev = self.dev.clone();
        let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
        if dev.session != self.session {
            return;
        }
        if !self.backlog.is_empty()
            && let Err(why) = self.write_backlog(&mut dev)
        {
            self.fail(garbled(why));
        }
        if let Device { mem: Some(mem), rings, .. } = &mut *dev {
            for (i, ring) in rings.iter_mut().enumerate() {
                if std::mem::take(&mut self.used[i])
                    && let Err(why) = ring.notify(mem)
                {
                    self.fail(garbled(why));
                }
            }
        }
        if let Some(why) = dev.memory_lost() {
            self.fail(why);
        }
    }
}

/// The error of a link whose guest garbled its descriptors.
fn garbled(why: String) -> String {
    format!("garbled descriptors: {why}")
}

impl Drop for VhostUserLink {
    fn drop(&mut self) {
        // The engine let go of a live link (garbled descriptors, or usernet stops): the
        // front-end is told by the end of the connection.
        let mut dev = self.lock();
        if dev.session == self.session {
            let why = self.broken.clone().unwrap_or_else(|| "usernet closed the link".into());
            dev.end_session(&why, true);
            drop(dev);
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The control thread's handler of front-end messages (`vhost`'s request handler calls it).
struct Control {
    dev: Arc<Mutex<Device>>,
    conn: Arc<UnixStream>,
    handoff: HandoffSender,
    name: String,
    sessions: u64,
    /// What the crate decides REPLY_ACK on: GET_FEATURES answered (its features offer
    /// PROTOCOL_FEATURES), and the protocol features the front-end acked.
    features_asked: bool,
    protocol_acked: u64,
}

impl Control {
    fn lock(&self) -> MutexGuard<'_, Device> {
        self.dev.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the crate acknowledges a message that asks it (NEED_REPLY), as its
    /// `BackendReqHandler` decides: PROTOCOL_FEATURES offered, REPLY_ACK acked.
    fn reply_ack(&self) -> bool {
        self.features_asked && self.protocol_acked & VhostUserProtocolFeatures::REPLY_ACK.bits() != 0
    }

    fn ring(dev: &mut Device, index: u32) -> VuResult<&mut Ring> {
        dev.rings.get_mut(index as usize).ok_or(VuError::InvalidParam)
    }

    /// After each message: hand a fresh link to the engine when the device can run and
    /// none does.
    fn after_message(&mut self) {
        let shared = self.dev.clone();
        let mut dev = shared.lock().unwrap_or_else(|e| e.into_inner());
        if dev.running || !dev.can_run() {
            return;
        }
        match self.start_session(&mut dev) {
            Ok(link) => {
                drop(dev);
                self.handoff.send(Box::new(link));
            }
            Err(e) => tracing::warn!(link = %self.name, error = %e, "cannot start the vhost-user link"),
        }
    }

    fn start_session(&mut self, dev: &mut Device) -> io::Result<VhostUserLink> {
        let features = Negotiated::from_features(dev.acked);
        let event_idx = dev.acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let Device { mem: Some(mem), rings, .. } = dev else { return Err(io::ErrorKind::NotConnected.into()) };
        let mut kicks = Vec::with_capacity(2);
        for ring in rings.iter_mut() {
            ring.queue.set_event_idx(event_idx);
            // The used index the guest's ring holds (0 for a fresh driver).
            let used = ring.queue.used_idx(&*mem, std::sync::atomic::Ordering::Acquire).map_err(io::Error::other)?;
            ring.queue.set_next_used(used.0);
            ring.signalled_used = None;
            kicks.push(ring.kick.as_ref().ok_or(io::ErrorKind::NotConnected)?.try_clone()?);
        }
        let tx_kick = kicks.pop().ok_or(io::ErrorKind::NotConnected)?;
        let rx_kick = kicks.pop().ok_or(io::ErrorKind::NotConnected)?;
        // The guest's rings may hold an earlier session's notification state (a polled TX
        // ring's `avail_event` half a ring ahead, or NO_NOTIFY): the guest would not kick
        // for its next frames. So TX notifications are turned on here, and the bell rung so
        // that the engine looks at the rings at once, for chains made available before.
        rings[TX].queue.enable_notification(&*mem).map_err(io::Error::other)?;
        let bell = Arc::new(eventfd()?);
        ring_bell(&bell);
        let epfd = epoll_of(&[bell.as_raw_fd(), rx_kick.as_raw_fd(), tx_kick.as_raw_fd()])?;
        self.sessions += 1;
        dev.running = true;
        dev.bell = Some(bell.clone());
        let name =
            if self.sessions == 1 { self.name.clone() } else { format!("{} (session {})", self.name, self.sessions) };
        tracing::debug!(link = %name, ?features, "vhost-user rings started");
        Ok(VhostUserLink {
            dev: self.dev.clone(),
            session: dev.session,
            features,
            epfd,
            bell,
            kicks: [rx_kick, tx_kick],
            conn: self.conn.clone(),
            name,
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            // The first flush interrupts the guest on both rings: entries an earlier session
            // added just before it ended were never signalled (a guest with a full TX ring
            // would wait for that interrupt). One spurious interrupt otherwise.
            used: [true; 2],
            tx_quiet: false,
            upload: UploadPoll::default(),
            broken: None,
            segs: Vec::new(),
            chains: Vec::new(),
            used_lens: Vec::new(),
            dropped: 0,
            said_too_big: false,
            last_offloads: VnetHdr::default(),
        })
    }

    /// A ring changes while frames may move: the running link ends first.
    fn reconfigure(&self, what: &str) -> MutexGuard<'_, Device> {
        let mut dev = self.lock();
        dev.end_session(&format!("the guest's device was reset ({what})"), false);
        dev
    }
}

fn refused(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

impl VhostUserBackendReqHandlerMut for Control {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        let mut dev = self.reconfigure("RESET_OWNER");
        dev.features_set = false;
        dev.acked = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        let mut dev = self.reconfigure("RESET_DEVICE");
        dev.features_set = false;
        dev.acked = 0;
        for r in dev.rings.iter_mut() {
            *r = Ring::new();
        }
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        self.features_asked = true;
        Ok(FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        check_ack(features).map_err(|_| VuError::InvalidParam)?;
        let mut dev = self.lock();
        if dev.acked != features || !dev.features_set {
            dev.end_session("the guest's driver changed its features", false);
        }
        dev.acked = features;
        dev.features_set = true;
        // Without VHOST_USER_F_PROTOCOL_FEATURES rings are enabled as they start.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for r in dev.rings.iter_mut() {
                r.enabled = true;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(refused("postcopy"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            // A region past the end of its file would map (vm-memory does not check) and
            // kill the whole process with SIGBUS at the first access there. Only a regular
            // file (a memfd, /dev/shm, hugetlbfs) has a length to check: a device's (DAX)
            // is 0.
            let end = region.mmap_offset.checked_add(region.memory_size).ok_or(VuError::InvalidParam)?;
            if let Ok(meta) = file.metadata()
                && meta.file_type().is_file()
                && end > meta.len()
            {
                return Err(VuError::InvalidParam);
            }
            let mapped = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
                .ok_or(VuError::InvalidParam)?;
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: region.guest_phys_addr,
            });
            regions.push(mapped);
        }
        // vm-memory wants them in order of guest address; QEMU sends them so, the protocol
        // does not say.
        regions.sort_by_key(|r| r.start_addr().0);
        let mem = GuestMemoryMmap::from_regions(regions).map_err(|e| VuError::ReqHandlerError(io::Error::other(e)))?;
        // Guarded once in the map, untouched till then: from_regions unmaps the regions it
        // refuses, which must not be guarded then (see `ram_guard`). A table with a region
        // that cannot be guarded is refused: the guards taken go (in `collect`) before the
        // regions are unmapped (with `mem`).
        let guards = mem.iter().map(|r| ram_guard::guard(r.as_ptr(), r.size())).collect::<Result<Vec<_>, _>>();
        let guards = guards.map_err(VuError::InvalidOperation)?;
        // The rings keep their guest addresses: a running link goes on with the new map.
        let mut dev = self.lock();
        // The old guards go before the old mappings.
        dev.guards = guards;
        dev.mem = Some(mem);
        dev.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        if num == 0 || num > MAX_QUEUE_SIZE as u32 || !num.is_power_of_two() {
            return Err(VuError::InvalidParam);
        }
        let mut dev = self.reconfigure("SET_VRING_NUM");
        Self::ring(&mut dev, index)?.queue.set_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let mut dev = self.reconfigure("SET_VRING_ADDR");
        let gpa = |va| dev.va_to_gpa(va).ok_or(VuError::InvalidParam);
        let (d, a, u) = (gpa(descriptor)?, gpa(available)?, gpa(used)?);
        let q = &mut Self::ring(&mut dev, index)?.queue;
        q.try_set_desc_table_address(GuestAddress(d)).map_err(|_| VuError::InvalidParam)?;
        q.try_set_avail_ring_address(GuestAddress(a)).map_err(|_| VuError::InvalidParam)?;
        q.try_set_used_ring_address(GuestAddress(u)).map_err(|_| VuError::InvalidParam)?;
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let mut dev = self.reconfigure("SET_VRING_BASE");
        Self::ring(&mut dev, index)?.queue.set_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let mut dev = self.reconfigure("GET_VRING_BASE");
        let ring = Self::ring(&mut dev, index)?;
        ring.started = false;
        ring.queue.set_ready(false);
        ring.kick = None;
        ring.call = None;
        Ok(VhostUserVringState::new(index, u32::from(ring.queue.next_avail())))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        if let Some(fd) = &fd {
            nonblocking(fd).map_err(VuError::ReqHandlerError)?;
        }
        let mut dev = self.reconfigure("SET_VRING_KICK");
        let ring = Self::ring(&mut dev, index as u32)?;
        ring.started = fd.is_some();
        ring.kick = fd;
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        if let Some(fd) = &fd {
            nonblocking(fd).map_err(VuError::ReqHandlerError)?;
        }
        // QEMU swaps the call eventfd while the guest masks its interrupts: no reset. An
        // interrupt sent to the old one meanwhile may be lost to the guest: the new one is
        // signalled once (a spurious interrupt otherwise), as a session's first flush does.
        let mut dev = self.lock();
        let running = dev.running;
        let ring = Self::ring(&mut dev, index as u32)?;
        ring.call = fd;
        if running {
            ring.interrupt();
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        let mut dev = self.lock();
        Self::ring(&mut dev, index as u32)?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::empty())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        // Taken whatever the answer, as the crate does.
        self.protocol_acked = features;
        // The crate adds REPLY_ACK and handles it; nothing else was offered.
        if features & !VhostUserProtocolFeatures::REPLY_ACK.bits() != 0 {
            return Err(VuError::InvalidParam);
        }
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(2)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let mut dev = self.lock();
        if !enable {
            dev.end_session("the guest's device was stopped (ring disabled)", false);
        }
        Self::ring(&mut dev, index)?.enabled = enable;
        Ok(())
    }

    fn get_config(&mut self, _offset: u32, _size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        Err(refused("GET_CONFIG"))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        Err(refused("SET_CONFIG"))
    }

    fn set_backend_req_fd(&mut self, _backend: Backend) {}

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(refused("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(refused("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(&mut self, _inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        Err(refused("GET_INFLIGHT_FD"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(refused("SET_INFLIGHT_FD"))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(refused("GET_MAX_MEM_SLOTS"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(refused("ADD_MEM_REG"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(refused("REM_MEM_REG"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(refused("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(refused("CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(refused("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(refused("SET_LOG_BASE"))
    }
}

/// Serves one front-end until it goes or sends what cannot be served.
fn serve_connection(stream: UnixStream, conn: Arc<UnixStream>, handoff: HandoffSender, name: String) {
    let dev = Arc::new(Mutex::new(Device::new()));
    let peek = conn.clone();
    let control = Arc::new(Mutex::new(Control {
        dev: dev.clone(),
        conn,
        handoff,
        name: name.clone(),
        sessions: 0,
        features_asked: false,
        protocol_acked: 0,
    }));
    let mut handler = BackendReqHandler::from_stream(stream, control.clone());
    let (why, fault) = loop {
        let next = peek_header(&peek);
        match handler.handle_request() {
            Ok(()) => control.lock().unwrap_or_else(|e| e.into_inner()).after_message(),
            // QEMU's virtio-net sends SET_VRING_ENABLE(1) for its queue pair as soon as the
            // guest acks its features (it checks the features the back-end offered), before
            // SET_FEATURES reaches the back-end, and not again (QEMU 7.2); the crate checks
            // the acked features and refuses it. So rings start enabled (as without
            // PROTOCOL_FEATURES), and a SET_VRING_ENABLE(0) that passes disables one.
            // The crate refuses it before its REPLY_ACK: a front-end that asked for a reply
            // (QEMU from 8.2 waits for one, with REPLY_ACK) gets it here, or would wait for
            // ever (QEMU 10.0's guest never came up without it: CI boots tests/serve_vm.rs's
            // VMs with that QEMU too, .ci/run).
            Err(VuError::InactiveFeature(f)) if f == VhostUserVirtioFeatures::PROTOCOL_FEATURES => {
                tracing::trace!(link = %name, "SET_VRING_ENABLE before SET_FEATURES, ignored");
                let reply_ack = control.lock().unwrap_or_else(|e| e.into_inner()).reply_ack();
                if reply_ack
                    && let Some((code, flags)) = next
                    && code == u32::from(FrontendReq::SET_VRING_ENABLE)
                    && flags & VhostUserHeaderFlag::NEED_REPLY.bits() != 0
                    && ack(&peek, code).is_err()
                {
                    break ("the front-end went away".to_string(), false);
                }
            }
            Err(VuError::Disconnected | VuError::PartialMessage) => {
                break ("the front-end went away".to_string(), false);
            }
            Err(VuError::SocketBroken(e)) if e.kind() != io::ErrorKind::InvalidData => {
                break ("the front-end went away".to_string(), false);
            }
            Err(e) => break (format!("vhost-user: {e}"), true),
        }
    };
    let mut dev = dev.lock().unwrap_or_else(|e| e.into_inner());
    if dev.running {
        // The link's `recv` reports it, and the engine logs it once.
        dev.end_session(&why, fault);
    } else if fault {
        tracing::warn!(link = %name, error = %why, "vhost-user connection closed");
    } else {
        tracing::debug!(link = %name, "vhost-user front-end went away");
    }
    // Unguarded before unmapped (see `ram_guard`).
    dev.guards.clear();
    dev.mem = None;
}

/// The request code and flags of the next front-end message, peeked at (MSG_PEEK: the crate
/// still reads it); None when the connection ends, or has less than a header there (a
/// front-end sends a message with one sendmsg(2): QEMU and the crate do).
fn peek_header(conn: &UnixStream) -> Option<(u32, u32)> {
    // vhost-user's header: request, flags, size (u32 each, little-endian).
    let mut hdr = [0u8; 12];
    loop {
        // SAFETY: receives at most 12 bytes into a live buffer of 12.
        let n = unsafe { libc::recv(conn.as_raw_fd(), hdr.as_mut_ptr().cast(), hdr.len(), libc::MSG_PEEK) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        let word = |i: usize| u32::from_le_bytes([hdr[i], hdr[i + 1], hdr[i + 2], hdr[i + 3]]);
        return (n == hdr.len() as isize).then(|| (word(0), word(4)));
    }
}

/// Acknowledges request `code` as done (REPLY_ACK: a reply of the request's code whose u64
/// payload is 0).
fn ack(conn: &UnixStream, code: u32) -> io::Result<()> {
    let mut reply = [0u8; 20];
    reply[..4].copy_from_slice(&code.to_le_bytes());
    // Version 1, a reply.
    reply[4..8].copy_from_slice(&(0x1 | VhostUserHeaderFlag::REPLY.bits()).to_le_bytes());
    reply[8..12].copy_from_slice(&8u32.to_le_bytes());
    (&*conn).write_all(&reply)
}

/// The listening socket of `--listen-vhost-user PATH`: each front-end that connects gets a
/// control thread, whose sessions reach the engine as links. Its descriptor groups the
/// listening socket and the hand-off's bell. Removes its socket file on drop.
pub struct VhostUserAcceptor {
    listener: UnixListener,
    path: PathBuf,
    handoff: Handoff,
    epfd: OwnedFd,
    accepted: u64,
}

impl VhostUserAcceptor {
    pub fn bind(path: &Path) -> io::Result<VhostUserAcceptor> {
        let listener = listen_stream(path)?;
        listener.set_nonblocking(true)?;
        let handoff = Handoff::new(format!("vhost-user {}", path.display()))?;
        let epfd = epoll_of(&[listener.as_raw_fd(), handoff.fd()])?;
        Ok(VhostUserAcceptor { listener, path: path.to_path_buf(), handoff, epfd, accepted: 0 })
    }

    fn start(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        self.accepted += 1;
        let name = format!("vhost-user {} #{}", self.path.display(), self.accepted);
        let conn = Arc::new(stream.try_clone()?);
        let handoff = self.handoff.sender();
        let thread_name = name.clone();
        std::thread::Builder::new()
            .name("usernet-vhost-user".into())
            .spawn(move || serve_connection(stream, conn, handoff, thread_name))?;
        tracing::debug!(link = %name, "vhost-user front-end connected");
        Ok(())
    }
}

impl Drop for VhostUserAcceptor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LinkAcceptor for VhostUserAcceptor {
    fn fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }

    fn accept(&mut self) -> io::Result<Option<Box<dyn Link>>> {
        // Bounded: the backlog of the listening socket.
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = self.start(stream) {
                        tracing::warn!(listener = %self.describe(), error = %e, "cannot serve a vhost-user front-end");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        self.handoff.accept()
    }

    fn describe(&self) -> String {
        format!("vhost-user {}", self.path.display())
    }
}

#[cfg(test)]
#[path = "vhost_user_tests.rs"]
mod tests;
