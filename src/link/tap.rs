//! A TAP device (`/dev/net/tun`, IFF_TAP | IFF_NO_PI): one read or write per frame.
//!
//! Theory of operation. [`Tap::create`] opens /dev/net/tun and attaches it to a new TAP
//! interface in the caller's network namespace (the `run` command does this inside the
//! sandbox, then hands the descriptor to usernet over a Unix socket). The device lives as long
//! as the descriptor: closing it removes the interface. With IFF_NO_PI every read(2) returns
//! exactly one Ethernet frame and every write(2) injects one, so [`Link`] maps directly onto
//! the system calls. The descriptor is non-blocking: `recv` reports `WouldBlock` when no frame
//! waits, and `send` drops a frame the kernel cannot take right now (the guest's TCP
//! retransmits), as the `Link` contract allows.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl, open};
use nix::sys::stat::Mode;

use super::Link;

/// A TAP device's file descriptor.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
}

impl Tap {
    /// Creates TAP interface `name` in the current network namespace (it starts down).
    pub fn create(name: &str) -> io::Result<Tap> {
        let cname = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let bytes = cname.as_bytes_with_nul();
        if bytes.len() > libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name too long: {name}"),
            ));
        }
        let fd = open(
            "/dev/net/tun",
            OFlag::O_RDWR | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
            Mode::empty(),
        )?;
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
            *dst = *src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
        Errno::result(rc)?;
        Ok(Tap { fd })
    }

    /// Wraps the descriptor of an existing TAP device (received from the sandbox) and makes
    /// it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Tap> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        Ok(Tap { fd })
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

impl Link for Tap {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match nix::unistd::read(&self.fd, buf) {
                Ok(n) => return Ok(n),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
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
