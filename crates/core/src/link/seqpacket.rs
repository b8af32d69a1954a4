//! The SOCK_SEQPACKET transport (`--listen-bess unixpacket:PATH`): a connected Unix socket
//! that keeps message boundaries, one Ethernet frame per message (User-Mode Linux's BESS
//! vector transport, and gvproxy's `unixpacket://`).
//!
//! Theory of operation. [`SeqpacketAcceptor`] listens on PATH; every guest that connects
//! becomes its own [`SeqpacketLink`], so a guest that disconnects and connects again is
//! simply a new link. Receiving is one recv(2) per frame with MSG_TRUNC, which reports a
//! message's true size: one larger than [`MAX_FRAME`], or an empty one, is garbled framing
//! (`InvalidData`) and closes that guest's link only. A message of 0 bytes with nothing
//! else is how the kernel reports the peer's close (`UnexpectedEof`). Sending is one
//! send(2) per frame; the kernel takes a message whole or not at all, so a frame it cannot
//! take now is queued whole (a bounded queue, [`MAX_QUEUED`] frames) and sent when the
//! socket is writable again.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::sys::socket::{
    AddressFamily, Backlog, MsgFlags, SockFlag, SockType, UnixAddr, accept4, bind, connect, listen, send, socket,
};

use super::qemu::clear_stale_socket;
use super::{Link, LinkAcceptor, MAX_FRAME};

/// Frames a link holds for a guest that cannot take them now.
pub const MAX_QUEUED: usize = 512;

pub struct SeqpacketLink {
    fd: OwnedFd,
    name: String,
    queue: VecDeque<Vec<u8>>,
    pub dropped: u64,
}

impl SeqpacketLink {
    /// Wraps a connected, non-blocking SOCK_SEQPACKET socket.
    pub fn new(fd: OwnedFd, name: String) -> SeqpacketLink {
        SeqpacketLink { fd, name, queue: VecDeque::new(), dropped: 0 }
    }

    /// Sends one message: Ok(false) when the socket is full.
    fn send_one(&self, frame: &[u8]) -> io::Result<bool> {
        loop {
            match send(self.fd.as_raw_fd(), frame, MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL) {
                Ok(_) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Link for SeqpacketLink {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for writes of buf.len() bytes during the call.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_TRUNC | libc::MSG_DONTWAIT,
                )
            };
            match Errno::result(n) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "guest closed the connection")),
                Ok(n) => {
                    let n = n as usize;
                    if n > MAX_FRAME || n > buf.len() {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("garbled framing: a {n}-byte message (frames are at most {MAX_FRAME} bytes)"),
                        ));
                    }
                    return Ok(n);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(io::ErrorKind::WouldBlock.into()),
                Err(Errno::ECONNRESET) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "guest reset the connection"));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if frame.is_empty() || frame.len() > MAX_FRAME {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("cannot send {} bytes", frame.len())));
        }
        if self.queue.is_empty() && self.send_one(frame)? {
            return Ok(());
        }
        if self.queue.len() >= MAX_QUEUED {
            self.flush()?;
        }
        if self.queue.len() >= MAX_QUEUED {
            self.dropped += 1;
            tracing::trace!("{}: queue full, dropped a {}-byte frame", self.name, frame.len());
            return Ok(());
        }
        self.queue.push_back(frame.to_vec());
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        while let Some(frame) = self.queue.front() {
            if !self.send_one(frame)? {
                break;
            }
            self.queue.pop_front();
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// The listening socket of `--listen-bess unixpacket:PATH`; removes its file on drop.
pub struct SeqpacketAcceptor {
    fd: OwnedFd,
    path: PathBuf,
    accepted: u64,
}

/// A new SOCK_SEQPACKET Unix socket (non-blocking, close-on-exec).
fn seqpacket_socket() -> io::Result<OwnedFd> {
    Ok(socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC, None)?)
}

/// Connects a blocking SOCK_SEQPACKET client to `path` (tests, and the stale-socket probe).
pub fn connect_seqpacket(path: &Path) -> io::Result<OwnedFd> {
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)?;
    connect(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    Ok(fd)
}

impl SeqpacketAcceptor {
    pub fn bind(path: &Path) -> io::Result<SeqpacketAcceptor> {
        clear_stale_socket(path, |p| connect_seqpacket(p).map(drop))?;
        let fd = seqpacket_socket()?;
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
        listen(&fd, Backlog::new(16).unwrap_or(Backlog::MAXCONN))?;
        Ok(SeqpacketAcceptor { fd, path: path.to_path_buf(), accepted: 0 })
    }
}

impl Drop for SeqpacketAcceptor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LinkAcceptor for SeqpacketAcceptor {
    fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn accept(&mut self) -> io::Result<Option<Box<dyn Link>>> {
        match accept4(&self.fd, SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => {
                self.accepted += 1;
                let name = format!("bess unixpacket:{} #{}", self.path.display(), self.accepted);
                Ok(Some(Box::new(SeqpacketLink::new(fd, name))))
            }
            Err(Errno::EAGAIN) | Err(Errno::EINTR) | Err(Errno::ECONNABORTED) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn describe(&self) -> String {
        format!("bess unixpacket:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::recv;

    fn pair() -> (SeqpacketLink, OwnedFd) {
        let (a, b) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        (SeqpacketLink::new(a, "test".into()), b)
    }

    #[test]
    fn frames_both_ways() {
        let (mut link, peer) = pair();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        send(peer.as_raw_fd(), &[5; 60], MsgFlags::empty()).unwrap();
        send(peer.as_raw_fd(), &[6; 1514], MsgFlags::empty()).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        assert_eq!(link.recv(&mut buf).unwrap(), 1514);
        assert_eq!(buf[0], 6);
        link.send(&[7; 100]).unwrap();
        let mut got = [0u8; 200];
        assert_eq!(recv(peer.as_raw_fd(), &mut got, MsgFlags::empty()).unwrap(), 100);
    }

    #[test]
    fn oversized_message_is_invalid_data() {
        let (mut link, peer) = pair();
        let big = vec![0u8; MAX_FRAME + 1];
        nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::SndBuf, &(1 << 20)).unwrap();
        send(peer.as_raw_fd(), &big, MsgFlags::empty()).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn close_is_eof() {
        let (mut link, peer) = pair();
        drop(peer);
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn full_socket_queues_then_drops_whole_frames() {
        let (mut link, peer) = pair();
        for _ in 0..(MAX_QUEUED + 2000) {
            link.send(&[1; 1500]).unwrap();
        }
        assert!(link.dropped > 0);
        assert_eq!(link.queue.len(), MAX_QUEUED);
        // Read everything while flushing: every message arrives whole.
        let mut got = vec![0u8; 2000];
        let mut count = 0;
        for _ in 0..100_000 {
            link.flush().unwrap();
            match recv(peer.as_raw_fd(), &mut got, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => {
                    assert_eq!(n, 1500);
                    count += 1;
                }
                Err(_) if link.queue.is_empty() => break,
                Err(_) => {}
            }
        }
        assert!(link.queue.is_empty());
        assert_eq!(count as u64 + link.dropped, (MAX_QUEUED + 2000) as u64);
    }

    #[test]
    fn acceptor_serves_reconnecting_guests() {
        let dir = std::env::temp_dir().join(format!("usernet-seqpacket-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bess.sock");
        let mut acc = SeqpacketAcceptor::bind(&path).unwrap();
        assert!(acc.accept().unwrap().is_none());
        for round in 0..2u8 {
            let client = connect_seqpacket(&path).unwrap();
            let mut link = acc.accept().unwrap().expect("a guest");
            send(client.as_raw_fd(), &[round; 64], MsgFlags::empty()).unwrap();
            let mut buf = vec![0u8; MAX_FRAME];
            assert_eq!(link.recv(&mut buf).unwrap(), 64);
            drop(client);
            assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        }
        drop(acc);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
