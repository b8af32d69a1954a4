//! The stdio transport (`--listen-stdio`): frames on usernet's stdin and stdout, each
//! preceded by its length, 2 bytes little-endian, as gvproxy's stdio transport speaks it
//! (a VM monitor started as usernet's parent, or an `ssh` tunnel, holds the other end).
//!
//! Theory of operation. The framing is the stream framing of [`super::qemu`] with a
//! [`Framing::Le16`] prefix; only the descriptors differ. Frames are read from a duplicate
//! of stdin and written to a duplicate of stdout, both made non-blocking. The event loop
//! watches stdin only, so queued output is also written whenever a frame is read or sent
//! (when stdin and stdout are one socket, the loop's writable events flush it as well).
//! Once stdin ends, the link is gone: stdio cannot be reconnected.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::fcntl::{FcntlArg, OFlag, fcntl};

use super::qemu::{Framing, StreamLink};

fn nonblocking_dup(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let dup = fd.try_clone_to_owned()?;
    let flags = OFlag::from_bits_retain(fcntl(&dup, FcntlArg::F_GETFL)?);
    fcntl(&dup, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(dup)
}

/// The link over usernet's own stdin and stdout.
pub fn stdio_link() -> io::Result<StreamLink> {
    let stdin = nonblocking_dup(io::stdin().as_fd())?;
    let stdout = nonblocking_dup(io::stdout().as_fd())?;
    Ok(StreamLink::with_fds(stdin, Some(stdout), Framing::Le16, "stdio".to_string()))
}

/// A link over any pair of descriptors with the stdio framing (tests use pipes).
pub fn link_over(rfd: OwnedFd, wfd: OwnedFd) -> io::Result<StreamLink> {
    let rfd = nonblocking_dup(rfd.as_fd())?;
    let wfd = nonblocking_dup(wfd.as_fd())?;
    Ok(StreamLink::with_fds(rfd, Some(wfd), Framing::Le16, "stdio".to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{Link, MAX_FRAME};
    use std::io::{Read, Write};

    #[test]
    fn frames_over_two_pipes() {
        let (in_r, in_w) = nix::unistd::pipe().unwrap();
        let (out_r, out_w) = nix::unistd::pipe().unwrap();
        let mut link = link_over(in_r, out_w).unwrap();
        let mut to_link = std::fs::File::from(in_w);
        let mut from_link = std::fs::File::from(out_r);

        // A frame split in two writes, then a garbled prefix.
        to_link.write_all(&[4, 0, 1, 2]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        to_link.write_all(&[3, 4]).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], &[1, 2, 3, 4]);
        // That read emptied the pipe: known without another read. The engine waits for the
        // next readiness edge, as the write below would raise.
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);

        link.send(&[9; 60]).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 62];
        from_link.read_exact(&mut got).unwrap();
        assert_eq!(&got[..2], &[60, 0]);

        to_link.write_all(&[0, 0]).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn end_of_stdin() {
        let (in_r, in_w) = nix::unistd::pipe().unwrap();
        let (_out_r, out_w) = nix::unistd::pipe().unwrap();
        let mut link = link_over(in_r, out_w).unwrap();
        drop(in_w);
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }
}
