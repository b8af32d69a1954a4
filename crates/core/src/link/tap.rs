//! A TAP device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI): one read or write per frame.
//!
//! Theory of operation. [`Tap::create`] opens /dev/net/tun and attaches it to a new TAP
//! interface in the caller's network namespace (the `run` command does this inside the
//! sandbox, then hands the descriptor to usernet over a Unix socket). The device lives as long
//! as the descriptor: closing it removes the interface. With IFF_NO_PI every read(2) returns
//! exactly one Ethernet frame and every write(2) injects one, so [`Link`] maps directly onto
//! the system calls. The descriptor is non-blocking: `recv` reports `WouldBlock` when no frame
//! waits, and `send` drops a frame the kernel cannot take right now (the guest's TCP
//! retransmits), as the `Link` contract allows. Since a full device drops and never queues,
//! the engine need not hear when it is writable, and may watch it level-triggered
//! (`Link::level_triggered`): a request's or an answer's frame that comes alone is then read
//! with one readv(2), where edge-triggered readiness needed a second that found the device
//! empty (sockperf's ping-pong through `usernet run`: 2.00 readv per round trip before, 1.00
//! after, over UDP and TCP, with busy polling on and off).
//!
//! Offloads. `run` creates its TAP with IFF_VNET_HDR and turns on TUNSETOFFLOAD (checksum,
//! TSO4, TSO6): every frame then carries a virtio-net header (`wire::vnet_hdr`), the guest
//! kernel sends TCP in frames of up to 64 KiB whatever the MTU, without computing
//! checksums, and usernet may send it 64 KiB TCP frames with only the pseudo-header sum
//! filled in, which the guest's kernel takes as one large segment. Headers are read and
//! written with readv/writev beside the frame, so frames are never moved. A frame the
//! switch forwards to another guest keeps its header for a link that takes offloads, and is
//! finished (checksum, segments) for one that does not (`Link::recv_offloads`). Where the
//! kernel knows UDP segmentation (USO4, USO6: Linux 6.2), the guest's segmented UDP sends
//! come as one frame too, which the engine cuts into its datagrams (`dispatch.rs`), and
//! usernet sends the guest datagrams that came to a flow's socket together as one frame
//! (`flows/udp.rs`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::sys::stat::Mode;

use super::Link;
use usernet_wire::vnet_hdr::{self, VnetHdr};

/// A TAP device's file descriptor.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    /// Frames carry a virtio-net header (IFF_VNET_HDR).
    vnet: bool,
    /// The virtio-net header of the frame read last ([`Link::recv_offloads`]).
    last_offloads: VnetHdr,
    /// The device takes and gives segmented UDP (USO4, USO6: Linux 6.2).
    uso: bool,
    name: String,
}

const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

impl Tap {
    /// Creates TAP interface `name` in the current network namespace (it starts down).
    pub fn create(name: &str) -> io::Result<Tap> {
        Tap::create_with(name, false, false)
    }

    /// The same with a virtio-net header on every frame, ready for offloads.
    pub fn create_with_vnet_hdr(name: &str) -> io::Result<Tap> {
        Tap::create_with(name, true, false)
    }

    /// The same with `queues` queues (IFF_MULTI_QUEUE): one descriptor per queue, each a
    /// [`Link`] of its own, for one engine thread each (see `engine::shard`). The kernel
    /// picks the queue of each frame the guest sends by a hash of its flow, or by the queue
    /// that last wrote that flow's frames.
    pub fn create_multi_queue(name: &str, queues: usize) -> io::Result<Vec<Tap>> {
        (0..queues.max(1)).map(|_| Tap::create_with(name, true, true)).collect()
    }

    fn create_with(name: &str, vnet: bool, multi_queue: bool) -> io::Result<Tap> {
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bytes = cname.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("interface name too long: {name}")));
        }
        let fd = open("/dev/net/tun", OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK, Mode::empty())?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        let vnet_flag = if vnet { libc::IFF_VNET_HDR } else { 0 };
        let mq_flag = if multi_queue { libc::IFF_MULTI_QUEUE } else { 0 };
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | vnet_flag | mq_flag) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        Errno::result(rc)?;
        Ok(Tap { fd, vnet: false, last_offloads: VnetHdr::default(), uso: false, name: name.to_string() })
    }

    /// Wraps the descriptor of an existing TAP device (received from the sandbox) and makes
    /// it non-blocking.
    /// When the device was created with IFF_VNET_HDR, the offloads are turned on.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tap> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        // SAFETY: TUNGETIFF writes one ifreq, which lives across the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut ifr) };
        let (has_vnet, name) = if rc == 0 {
            // SAFETY: TUNGETIFF filled in the flags member of the union.
            let flags = unsafe { ifr.ifr_ifru.ifru_flags } as libc::c_int;
            let name: String = ifr.ifr_name.iter().take_while(|c| **c != 0).map(|c| *c as u8 as char).collect();
            (flags & libc::IFF_VNET_HDR != 0, name)
        } else {
            (false, String::from("tap"))
        };
        let mut tap = Tap { fd, vnet: false, last_offloads: VnetHdr::default(), uso: false, name };
        if has_vnet {
            tap.allow_guest_offloads()?;
            tap.vnet = true;
        }
        Ok(tap)
    }

    /// Lets the guest's kernel hand over frames with partial checksums, large TCP segments
    /// and, where the kernel knows them (Linux 6.2; before, TUNSETOFFLOAD refuses them with
    /// EINVAL), segmented UDP frames (TUNSETOFFLOAD), for the whole device (every queue).
    /// A kernel that knows USO also takes such frames from usernet ([`Link::offloads_udp`]).
    fn allow_guest_offloads(&mut self) -> io::Result<()> {
        let offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        let set = |flags: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            Errno::result(unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags as libc::c_ulong) })
        };
        match set(offloads | TUN_F_USO4 | TUN_F_USO6) {
            Ok(_) => self.uso = true,
            Err(Errno::EINVAL) => {
                tracing::debug!("tap {}: this kernel has no UDP segmentation offload (USO)", self.name);
                set(offloads)?;
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Makes the device outlive its descriptor (TUNSETPERSIST): closing the descriptor then
    /// only detaches it, and the device goes with its network namespace, which the kernel
    /// tears down in the background. For a namespace that is usernet's alone (`run`):
    /// otherwise closing the descriptor unregisters the device there and then, and
    /// unregistering waits for RCU callbacks (`rcu_barrier`), about 20 ms that every
    /// `usernet run` spent on its way out.
    pub fn persist(&self) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
        Errno::result(rc)?;
        Ok(())
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Tap {
    fn write_with_header(&mut self, frame: &[u8], hdr: &VnetHdr) -> io::Result<()> {
        let mut h = [0u8; vnet_hdr::LEN];
        hdr.emit(&mut h);
        let iov = [
            libc::iovec { iov_base: h.as_ptr() as *mut libc::c_void, iov_len: h.len() },
            libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() },
        ];
        loop {
            // SAFETY: both iovecs point into live buffers of the lengths given; writev only reads.
            let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
            if n >= 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) | Some(libc::ENOBUFS) => {
                    tracing::trace!("tap: dropped a {}-byte frame", frame.len());
                    return Ok(());
                }
                _ => return Err(e),
            }
        }
    }
}

impl Link for Tap {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.vnet {
            // usernet verifies no TCP or UDP checksum, and a guest's GSO frame is one large
            // segment to the translator: the header is kept only for the switch
            // (`recv_offloads`: a frame forwarded to another guest).
            let mut hdr = [0u8; vnet_hdr::LEN];
            let iov = [
                libc::iovec { iov_base: hdr.as_mut_ptr() as *mut libc::c_void, iov_len: hdr.len() },
                libc::iovec { iov_base: buf.as_mut_ptr() as *mut libc::c_void, iov_len: buf.len() },
            ];
            loop {
                // SAFETY: both iovecs point into live buffers of the lengths given.
                let n = unsafe { libc::readv(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(e);
                }
                self.last_offloads = VnetHdr::parse(&hdr).unwrap_or_default();
                return Ok((n as usize).saturating_sub(vnet_hdr::LEN));
            }
        }
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn offloads(&self) -> bool {
        self.vnet
    }

    fn offloads_udp(&self) -> bool {
        self.vnet && self.uso
    }

    fn recv_offloads(&self) -> VnetHdr {
        self.last_offloads
    }

    fn send_offloaded(&mut self, frame: &[u8], hdr: &VnetHdr) -> io::Result<()> {
        self.write_with_header(frame, hdr)
    }

    // A full device drops the frame (see above): nothing waits to be flushed.
    fn write_events(&self) -> bool {
        false
    }

    fn level_triggered(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("tap {}", self.name)
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.vnet {
            return self.write_with_header(frame, &VnetHdr::default());
        }
        loop {
            match nix::unistd::write(&self.fd, frame) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                // The kernel cannot take it now: drop the frame, never half-write it.
                Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => {
                    tracing::trace!("tap: dropped a {}-byte frame", frame.len());
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_too_long() {
        let e = Tap::create("a-very-long-interface-name").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
