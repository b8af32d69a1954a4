//! QEMU's stream transport (`-netdev stream`, `--listen-qemu unix:PATH`): every frame is
//! preceded by its length, 4 bytes big-endian. The byte-stream framing itself lives here too,
//! because `--listen-stdio` shares it with a 2-byte little-endian prefix.
//!
//! Theory of operation. A stream socket delivers bytes, not frames, so both directions keep
//! a buffer:
//!
//! - Receiving: [`StreamLink::recv`] first looks for a whole frame in its read buffer (a
//!   prefix, then that many bytes); when there is none it reads as much as the socket has
//!   into the buffer and looks again. A read that returned less than the room it was given
//!   emptied the socket: the next time the buffer holds no whole frame, `recv` says
//!   `WouldBlock` without the read(2) that would only hear EAGAIN (a VM that sends one
//!   frame at a time would cost two reads a frame). That is safe with the event loop's
//!   edge-triggered readiness: bytes that arrive after the short read raise a new edge,
//!   which the engine passes on ([`Link::readable_edge`]) and after which the link reads
//!   again, even if the frames of the short read are not all handed out yet (the engine
//!   takes at most a batch a round). Not so the end of the stream, which may have come with
//!   the bytes read: once epoll reports it (or an error), every `WouldBlock` and EOF comes
//!   from read(2).
//!   Otherwise `WouldBlock` comes from read(2) itself saying EAGAIN. A length of 0 or above
//!   [`MAX_FRAME`] is garbled framing: `InvalidData`, and the engine closes this guest's
//!   link (and no other). End of file, or a reset, is `UnexpectedEof`.
//! - Uploads: a VM that sends a stream of segments writes each frame on its own (QEMU writes
//!   one frame per write(2)), and a TCG guest's are hundreds of microseconds apart: the
//!   engine would wake for every frame. So the link polls during an upload, as the
//!   vhost-user link does ([`UploadPoll`] says when): [`Link::read_events`] turns false, the
//!   engine stops watching the socket for reading, reads it every round of its loop and at
//!   least every millisecond ([`Link::polling`]), and calls `readable_edge` before each of
//!   those reads, so `drained` does not stop them. A read that took [`FAST_POLL_BYTES`] or
//!   more ends polling at once ([`UploadPoll::too_fast`]): a guest that fast gets its frames
//!   read in batches anyway, and could fill the socket between two polls (QEMU does not
//!   size its socket's send buffer, so `net.core.wmem_default`, 208 KiB, holds 93 frames of
//!   1518 bytes, 141 KB). Only a link over one socket polls: the stdio transport's pipes
//!   hold 64 KiB. Measured on a TCG guest's 64 MiB upload (`usernet-bench --vm --vm-only
//!   --vm-transport stream`, two runs each): 9.3-10.9 s of usernet's CPU per GB at
//!   0.131-0.135 Gbit/s when every frame woke the engine; 3.4-3.5 at 0.150-0.153 polled;
//!   2.5-2.6 at 0.140-0.145 polled and with writes watched only when queued (below);
//!   passt, in the same runs, 6.9-7.4 at 0.079-0.085.
//! - Sending: [`StreamLink::send`] appends prefix and frame to a write queue, and
//!   [`StreamLink::flush`], which the engine calls at the end of every round of work (and
//!   when the socket turns writable), writes the queue with one write(2): a round's frames
//!   cost one system call, not one each. What the kernel does not take stays queued. The
//!   queue is bounded ([`MAX_QUEUE`]): a frame that does not fit is dropped whole, never
//!   cut, so the stream stays in sync (the guest's TCP retransmits). The engine watches the
//!   socket for writability only while the queue holds something ([`Link::write_events`]):
//!   otherwise QEMU's read of each round's frames would make it writable again and wake
//!   the engine for nothing, once per round.
//!
//! [`Framing`] holds the pure parsing and encoding, tested without sockets.
//! [`QemuAcceptor`] listens on the Unix socket; each QEMU that connects (a VM that reboots
//! connects again) becomes its own link.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Instant;

use nix::errno::Errno;

use super::upload_poll::UploadPoll;
use super::{Link, LinkAcceptor, MAX_FRAME};

/// Bytes a stream link may hold queued for a slow guest before it drops frames.
pub const MAX_QUEUE: usize = 4 * 1024 * 1024;
/// A polled link's read that took this much found a guest fast enough to fill its socket
/// between two polls: the link watches the socket again (see the module's comment).
pub const FAST_POLL_BYTES: usize = 96 * 1024;
/// Size of the read buffer: room for several frames per read(2).
const READ_BUF: usize = 256 * 1024;

/// The length prefix of a stream transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// 4 bytes, big-endian (QEMU `-netdev stream`, gvproxy's qemu transport).
    Be32,
    /// 2 bytes, little-endian (gvproxy's stdio transport).
    Le16,
}

/// What the read buffer holds at its start.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole frame yet.
    Incomplete,
    /// A frame: its payload starts at `start` and is `len` bytes long.
    Frame { start: usize, len: usize },
    /// A length no frame can have.
    Invalid(usize),
}

impl Framing {
    pub fn prefix_len(self) -> usize {
        match self {
            Framing::Be32 => 4,
            Framing::Le16 => 2,
        }
    }

    /// The largest frame this framing can carry.
    pub fn max_frame(self) -> usize {
        match self {
            Framing::Be32 => MAX_FRAME,
            Framing::Le16 => MAX_FRAME.min(u16::MAX as usize),
        }
    }

    /// Looks for one frame at the start of `data`.
    pub fn parse(self, data: &[u8]) -> Parsed {
        let p = self.prefix_len();
        let Some(prefix) = data.get(..p) else {
            return Parsed::Incomplete;
        };
        let len = match self {
            Framing::Be32 => u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize,
            Framing::Le16 => u16::from_le_bytes([prefix[0], prefix[1]]) as usize,
        };
        if len == 0 || len > self.max_frame() {
            return Parsed::Invalid(len);
        }
        if data.len() < p + len {
            return Parsed::Incomplete;
        }
        Parsed::Frame { start: p, len }
    }

    /// The prefix for a frame of `len` bytes (the first `prefix_len()` bytes count).
    pub fn encode(self, len: usize) -> [u8; 4] {
        match self {
            Framing::Be32 => (len as u32).to_be_bytes(),
            Framing::Le16 => {
                let b = (len as u16).to_le_bytes();
                [b[0], b[1], 0, 0]
            }
        }
    }
}

/// A link over a byte stream: a socket (read and written), or a pair of descriptors
/// (stdin and stdout).
pub struct StreamLink {
    rfd: OwnedFd,
    /// A second descriptor to write to; None writes to `rfd`.
    wfd: Option<OwnedFd>,
    framing: Framing,
    name: String,
    rbuf: Vec<u8>,
    /// Bytes of `rbuf` already handed out.
    rpos: usize,
    /// Bytes of `rbuf` filled.
    rend: usize,
    /// The last read returned less than it had room for, and no readable edge came since:
    /// the descriptor is empty (as far as a read could tell).
    drained: bool,
    /// Epoll reported the peer's end of stream or an error (`readable_edge`): read until
    /// read(2) says EOF or EAGAIN, whatever `drained` says.
    hung_up: bool,
    /// Bytes to write, whole frames with their prefixes; `wq[..wpos]` is already written.
    wq: Vec<u8>,
    wpos: usize,
    /// Frames dropped because the queue was full.
    pub dropped: u64,
    /// Whether it polls now (only a link over one socket does: see `polls_uploads`).
    upload: UploadPoll,
}

impl StreamLink {
    /// A link over a non-blocking stream socket.
    pub fn new(fd: OwnedFd, framing: Framing, name: String) -> StreamLink {
        StreamLink::with_fds(fd, None, framing, name)
    }

    /// A link reading from `rfd` and writing to `wfd` (or `rfd` when None).
    pub fn with_fds(rfd: OwnedFd, wfd: Option<OwnedFd>, framing: Framing, name: String) -> StreamLink {
        StreamLink {
            rfd,
            wfd,
            framing,
            name,
            rbuf: vec![0u8; READ_BUF.max(MAX_FRAME + 4)],
            rpos: 0,
            rend: 0,
            drained: false,
            hung_up: false,
            wq: Vec::new(),
            wpos: 0,
            dropped: 0,
            upload: UploadPoll::default(),
        }
    }

    /// The link may poll during uploads: over one socket, not the stdio transport's pipes.
    fn polls_uploads(&self) -> bool {
        self.wfd.is_none()
    }

    fn wfd(&self) -> &OwnedFd {
        self.wfd.as_ref().unwrap_or(&self.rfd)
    }

    /// Bytes waiting in the send queue.
    pub fn queued(&self) -> usize {
        self.wq.len() - self.wpos
    }

    /// Reads what the descriptor has into the buffer; Ok(false) on end of file.
    fn fill(&mut self) -> io::Result<bool> {
        if self.rpos == self.rend {
            self.rpos = 0;
            self.rend = 0;
        } else if self.rend == self.rbuf.len() {
            // Make room: move the partial frame to the front.
            self.rbuf.copy_within(self.rpos..self.rend, 0);
            self.rend -= self.rpos;
            self.rpos = 0;
        }
        loop {
            match nix::unistd::read(&self.rfd, &mut self.rbuf[self.rend..]) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.drained = n < self.rbuf.len() - self.rend;
                    self.rend += n;
                    if n >= FAST_POLL_BYTES && self.upload.polling() {
                        self.upload.too_fast(Instant::now());
                    }
                    return Ok(true);
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::ECONNRESET) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Writes the queue until it is empty or the descriptor is full.
    fn write_queue(&mut self) -> io::Result<()> {
        while self.wpos < self.wq.len() {
            match nix::unistd::write(self.wfd(), &self.wq[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(e.into()),
            }
        }
        if self.wpos == self.wq.len() {
            self.wq.clear();
            self.wpos = 0;
        } else if self.wpos >= self.wq.len() / 2 {
            // Keep the queue from creeping forward: move the unwritten part to the front.
            self.wq.drain(..self.wpos);
            self.wpos = 0;
        }
        Ok(())
    }

    /// The socket has no whole frame: `WouldBlock`, and a polled link that had no bulk frame
    /// for `POLL_IDLE` watches its socket again.
    fn would_block(&mut self) -> io::Error {
        self.upload.empty(Instant::now);
        io::ErrorKind::WouldBlock.into()
    }
}

impl Link for StreamLink {
    fn fd(&self) -> RawFd {
        self.rfd.as_raw_fd()
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // With a separate write descriptor no writable event comes: flush here too.
        if self.wfd.is_some() && self.queued() > 0 {
            let _ = self.write_queue();
        }
        // Bounded: each round either returns or reads new bytes; a full buffer always
        // holds a whole frame (it is larger than the largest one) or an invalid prefix.
        loop {
            match self.framing.parse(&self.rbuf[self.rpos..self.rend]) {
                Parsed::Frame { start, len } => {
                    let from = self.rpos + start;
                    let Some(dst) = buf.get_mut(..len) else {
                        return Err(io::Error::new(io::ErrorKind::InvalidInput, "receive buffer too small"));
                    };
                    dst.copy_from_slice(&self.rbuf[from..from + len]);
                    self.rpos = from + len;
                    if self.polls_uploads() {
                        self.upload.frame(len, Instant::now);
                    }
                    return Ok(len);
                }
                Parsed::Invalid(len) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("garbled framing: frame length {len} (allowed 1..={})", self.framing.max_frame()),
                    ));
                }
                Parsed::Incomplete => {
                    if std::mem::take(&mut self.drained) && !self.hung_up {
                        return Err(self.would_block());
                    }
                    match self.fill() {
                        Ok(true) => {}
                        Ok(false) => {
                            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "guest closed the connection"));
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(self.would_block()),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    fn readable_edge(&mut self, peer_closed: bool) {
        self.drained = false;
        self.hung_up |= peer_closed;
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        if frame.is_empty() || frame.len() > self.framing.max_frame() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("cannot frame {} bytes", frame.len())));
        }
        let prefix = self.framing.encode(frame.len());
        let prefix = &prefix[..self.framing.prefix_len()];
        if self.queued() + prefix.len() + frame.len() > MAX_QUEUE {
            // Try to make room first; drop the frame whole if there is none.
            self.write_queue()?;
            if self.queued() + prefix.len() + frame.len() > MAX_QUEUE {
                self.dropped += 1;
                tracing::trace!("{}: queue full, dropped a {}-byte frame", self.name, frame.len());
                return Ok(());
            }
        }
        // Written by `flush`, at the end of the engine's round: one write(2) for all the
        // frames of a round instead of one per frame.
        self.wq.extend_from_slice(prefix);
        self.wq.extend_from_slice(frame);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.write_queue()
    }

    fn polling(&self) -> bool {
        self.upload.polling()
    }

    fn read_events(&self) -> bool {
        !self.upload.polling()
    }

    fn write_events(&self) -> bool {
        // Only while frames wait for room: QEMU's every read of a frame makes the socket
        // writable again, which would wake the engine once per round. (The stdio transport
        // writes to another descriptor than the one the engine watches, but its stdin and
        // stdout may be one socket.)
        self.queued() > 0
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

/// A path given as `unix:PATH` or `unix://PATH` (gvproxy writes `unix:///run/x.sock`).
pub fn parse_socket_url(url: &str, scheme: &str) -> Result<PathBuf, String> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|r| r.strip_prefix(':'))
        .ok_or_else(|| format!("invalid address {url:?}: want {scheme}:PATH"))?;
    let path = rest.strip_prefix("//").unwrap_or(rest);
    if path.is_empty() {
        return Err(format!("invalid address {url:?}: empty path"));
    }
    Ok(PathBuf::from(path))
}

/// Binds a Unix socket of type `ty` at `path` that only its owner may use (mode 0600,
/// whatever the umask), listening when it is a stream socket. The mode is set on the socket
/// before `bind` (fchmod(2)), and the kernel gives it to the file that `bind` makes, so the
/// file never exists with looser permissions: a guest's transport socket, or the control
/// API's, is a way into the guest's network. (Making it in a private directory and renaming
/// it into place, as usernet did before, costs a directory made and removed at each start:
/// 0.3-0.5 ms where that is a disk with discard.)
fn bind_owner_only(path: &Path, ty: nix::sys::socket::SockType) -> io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket};
    let addr = UnixAddr::new(path)?;
    let fd = socket(AddressFamily::Unix, ty, SockFlag::SOCK_CLOEXEC, None)?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    bind(fd.as_raw_fd(), &addr)?;
    crate::own_files::note(path);
    if ty == SockType::Stream {
        listen(&fd, Backlog::MAXCONN)?;
    }
    Ok(fd)
}

/// A stream socket listening at `path`, owner-only (mode 0600, whatever the umask).
pub fn listen_owner_only(path: &Path) -> io::Result<UnixListener> {
    bind_owner_only(path, nix::sys::socket::SockType::Stream).map(UnixListener::from)
}

/// A datagram socket bound at `path`, owner-only (mode 0600, whatever the umask).
pub fn bind_dgram_owner_only(path: &Path) -> io::Result<std::os::unix::net::UnixDatagram> {
    bind_owner_only(path, nix::sys::socket::SockType::Datagram).map(std::os::unix::net::UnixDatagram::from)
}

/// A stream socket listening at `path`, owner-only ([`listen_owner_only`]), after removing
/// a stale socket file left there ([`clear_stale_socket`]): how the stream transports
/// (QEMU's, vpnkit's, vhost-user's) listen.
pub fn listen_stream(path: &Path) -> io::Result<UnixListener> {
    clear_stale_socket(path, |p| UnixStream::connect(p).map(drop))?;
    listen_owner_only(path)
}

/// Removes a stale socket file at `path`; refuses a live one or any other kind of file.
/// `probe` connects to it: only a refusal (ECONNREFUSED: nobody is bound there) makes it
/// stale. Any other failure (EACCES: another user's socket) leaves the file alone and is
/// an error, as it cannot tell whether a server is there.
pub fn clear_stale_socket(path: &Path, probe: impl Fn(&Path) -> io::Result<()>) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match probe(path) {
            Ok(()) => Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{}: another server is listening there", path.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => match std::fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            // Gone since it was looked at.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot tell whether another server is listening on {}: {e}", path.display()),
            )),
        },
        Ok(_) => {
            Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{}: exists and is not a socket", path.display())))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The listening socket of `--listen-qemu unix:PATH`. Removes its socket file on drop.
pub struct QemuAcceptor {
    listener: UnixListener,
    path: PathBuf,
    accepted: u64,
}

impl QemuAcceptor {
    pub fn bind(path: &Path) -> io::Result<QemuAcceptor> {
        let listener = listen_stream(path)?;
        listener.set_nonblocking(true)?;
        Ok(QemuAcceptor { listener, path: path.to_path_buf(), accepted: 0 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for QemuAcceptor {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl LinkAcceptor for QemuAcceptor {
    fn fd(&self) -> RawFd {
        self.listener.as_fd().as_raw_fd()
    }

    fn accept(&mut self) -> io::Result<Option<Box<dyn Link>>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                self.accepted += 1;
                let name = format!("qemu unix:{} #{}", self.path.display(), self.accepted);
                Ok(Some(Box::new(StreamLink::new(OwnedFd::from(stream), Framing::Be32, name))))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(None),
            // The client gave up before we accepted: try the next one.
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn describe(&self) -> String {
        format!("qemu unix:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::POLL_IDLE;
    use std::io::{Read, Write};

    fn pair(framing: Framing) -> (StreamLink, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        (StreamLink::new(OwnedFd::from(a), framing, "test".into()), b)
    }

    /// Transport sockets are the owner's alone, whatever the umask; nothing is left beside
    /// them; a live one is refused, a stale one replaced.
    #[test]
    fn transport_sockets_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("usernet-sockmode-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        // SAFETY: umask only changes this process's file creation mask (restored below).
        let old = unsafe { libc::umask(0) };
        let stream = QemuAcceptor::bind(&dir.join("qemu.sock"));
        let dgram = crate::link::dgram::DgramLink::bind(&dir.join("vfkit.sock"));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let (stream, dgram) = (stream.unwrap(), dgram.unwrap());
        for name in ["qemu.sock", "vfkit.sock"] {
            let mode = std::fs::metadata(dir.join(name)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{name}");
        }
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert!(UnixStream::connect(dir.join("qemu.sock")).is_ok(), "reachable under its path");
        assert_eq!(QemuAcceptor::bind(&dir.join("qemu.sock")).err().map(|e| e.kind()), Some(io::ErrorKind::AddrInUse));
        drop((stream, dgram));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Only a refused connection makes a socket file stale: one that cannot be probed
    /// (another user's, EACCES) is left alone and start-up fails, naming it and why.
    #[test]
    fn only_a_refused_socket_is_stale() {
        let dir = std::env::temp_dir().join(format!("usernet-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("vm.sock");
        drop(UnixListener::bind(&path).unwrap());
        let denied = |_: &Path| Err(io::Error::from_raw_os_error(libc::EACCES));
        let e = clear_stale_socket(&path, denied).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        let said = e.to_string();
        assert!(said.starts_with(&format!("cannot tell whether another server is listening on {}: ", path.display())));
        assert!(said.contains("Permission denied"), "{said}");
        assert!(path.exists(), "kept");
        // Nobody bound there (the real probe is refused): replaced.
        let listener = listen_stream(&path).unwrap();
        assert!(UnixStream::connect(&path).is_ok());
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn frame(n: usize, fill: u8) -> Vec<u8> {
        vec![fill; n]
    }

    #[test]
    fn parse_prefixes() {
        assert_eq!(Framing::Be32.parse(&[]), Parsed::Incomplete);
        assert_eq!(Framing::Be32.parse(&[0, 0, 0]), Parsed::Incomplete);
        assert_eq!(Framing::Be32.parse(&[0, 0, 0, 2, 9]), Parsed::Incomplete);
        assert_eq!(Framing::Be32.parse(&[0, 0, 0, 2, 9, 9, 7]), Parsed::Frame { start: 4, len: 2 });
        assert_eq!(Framing::Be32.parse(&[0, 0, 0, 0]), Parsed::Invalid(0));
        assert_eq!(Framing::Be32.parse(&[0xff, 0xff, 0xff, 0xff]), Parsed::Invalid(u32::MAX as usize));
        let over = ((MAX_FRAME + 1) as u32).to_be_bytes();
        assert_eq!(Framing::Be32.parse(&over), Parsed::Invalid(MAX_FRAME + 1));
        let max = (MAX_FRAME as u32).to_be_bytes();
        assert_eq!(Framing::Be32.parse(&max), Parsed::Incomplete);
        assert_eq!(Framing::Le16.parse(&[3]), Parsed::Incomplete);
        assert_eq!(Framing::Le16.parse(&[3, 0, 1, 2, 3]), Parsed::Frame { start: 2, len: 3 });
        assert_eq!(Framing::Le16.parse(&[0, 0]), Parsed::Invalid(0));
        assert_eq!(Framing::Le16.parse(&[0xff, 0xff]), Parsed::Incomplete);
        assert_eq!(&Framing::Le16.encode(0x1234)[..2], &[0x34, 0x12]);
        assert_eq!(Framing::Be32.encode(0x1234), [0, 0, 0x12, 0x34]);
    }

    #[test]
    fn parse_never_panics() {
        // Every short input and a sweep of random-ish ones.
        let mut seed = 0x1234_5678u32;
        for n in 0..2000 {
            let len = n % 40;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    (seed >> 16) as u8
                })
                .collect();
            for f in [Framing::Be32, Framing::Le16] {
                if let Parsed::Frame { start, len } = f.parse(&data) {
                    assert!(start + len <= data.len());
                }
            }
        }
    }

    #[test]
    fn frames_split_across_reads() {
        let (mut link, mut peer) = pair(Framing::Be32);
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let mut wire = Vec::new();
        for (n, fill) in [(60usize, 1u8), (1514, 2), (42, 3)] {
            wire.extend((n as u32).to_be_bytes());
            wire.extend(frame(n, fill));
        }
        // One byte at a time: the link must assemble every frame.
        let mut got = Vec::new();
        for b in &wire {
            peer.write_all(&[*b]).unwrap();
            loop {
                match link.recv(&mut buf) {
                    Ok(n) => got.push(buf[..n].to_vec()),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert_eq!(got, vec![frame(60, 1), frame(1514, 2), frame(42, 3)]);
    }

    #[test]
    fn many_frames_in_one_read_and_largest_frame() {
        let (mut link, mut peer) = pair(Framing::Be32);
        let mut wire = Vec::new();
        for i in 0..100u8 {
            wire.extend(64u32.to_be_bytes());
            wire.extend(frame(64, i));
        }
        wire.extend((MAX_FRAME as u32).to_be_bytes());
        wire.extend(frame(MAX_FRAME, 0xaa));
        let writer = std::thread::spawn(move || peer.write_all(&wire).map(|_| peer));
        let mut buf = vec![0u8; MAX_FRAME];
        let mut count = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count < 101 && std::time::Instant::now() < deadline {
            match link.recv(&mut buf) {
                Ok(n) => {
                    if count < 100 {
                        assert_eq!(&buf[..n], &frame(64, count as u8)[..]);
                    } else {
                        assert_eq!(n, MAX_FRAME);
                    }
                    count += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(count, 101);
        drop(writer.join().unwrap().unwrap());
    }

    #[test]
    fn oversized_and_zero_lengths_are_invalid_data() {
        for prefix in [((MAX_FRAME + 1) as u32).to_be_bytes(), [0, 0, 0, 0], [0x80, 0, 0, 0]] {
            let (mut link, mut peer) = pair(Framing::Be32);
            peer.write_all(&prefix).unwrap();
            let mut buf = vec![0u8; MAX_FRAME];
            assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
        }
        let (mut link, mut peer) = pair(Framing::Le16);
        peer.write_all(&[0, 0]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::InvalidData);
    }

    /// A read that returned less than its room emptied the socket: the `WouldBlock` after the
    /// frames it brought costs no read(2). Bytes that come later raise a new readiness edge
    /// in the engine, after which the link reads them.
    #[test]
    fn a_short_read_spares_the_read_that_would_hear_eagain() {
        let (mut link, mut peer) = pair(Framing::Be32);
        peer.write_all(&[0, 0, 0, 2, 7, 7, 0, 0, 0, 1, 8]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap(), 2);
        assert!(link.drained);
        assert_eq!(link.recv(&mut buf).unwrap(), 1);
        peer.write_all(&[0, 0, 0, 1, 9]).unwrap();
        // Not read: the last read said the socket was empty, and this is the first
        // `WouldBlock` since (the engine now waits for the edge the write raised).
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(!link.drained);
        assert_eq!(link.recv(&mut buf).unwrap(), 1);
        assert_eq!(buf[0], 9);
        // Once the peer's end was reported, every answer comes from read(2).
        link.readable_edge(true);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        peer.write_all(&[0, 0, 0, 1, 10]).unwrap();
        assert_eq!(link.recv(&mut buf).unwrap(), 1);
        drop(peer);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    /// The engine takes at most a batch of frames a round, so frames of a short read may
    /// still wait in the buffer when the next readable edge comes. That edge is about bytes
    /// the short read did not see: once the buffered frames are handed out, the link reads.
    #[test]
    fn an_edge_while_frames_wait_in_the_buffer_is_not_lost() {
        let (mut link, mut peer) = pair(Framing::Be32);
        peer.write_all(&[0, 0, 0, 1, 1, 0, 0, 0, 1, 2]).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert_eq!(link.recv(&mut buf).unwrap(), 1);
        assert_eq!(buf[0], 1);
        // The round ends here (its batch is full); a frame comes, and its edge.
        peer.write_all(&[0, 0, 0, 1, 3]).unwrap();
        link.readable_edge(false);
        for want in [2, 3] {
            assert_eq!(link.recv(&mut buf).unwrap(), 1);
            assert_eq!(buf[0], want);
        }
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn eof_mid_frame_and_clean_eof() {
        let (mut link, mut peer) = pair(Framing::Be32);
        peer.write_all(&[0, 0, 0, 10, 1, 2]).unwrap();
        drop(peer);
        let mut buf = vec![0u8; MAX_FRAME];
        // The short read says the socket is empty; the end of the stream came with those
        // bytes, so the engine's epoll reports it (RDHUP), and then the link reads on.
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        link.readable_edge(true);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
        let (mut link, peer) = pair(Framing::Le16);
        drop(peer);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn send_frames_and_queue_on_full_socket() {
        let (mut link, mut peer) = pair(Framing::Be32);
        // Fill the socket until frames queue up, then past the queue's bound.
        // `send` only queues; a full queue is written out to make room, and once the socket
        // is full too a frame is dropped whole.
        let f = frame(1500, 7);
        let mut sent = 0usize;
        for _ in 0..100_000 {
            link.send(&f).unwrap();
            if link.dropped > 0 {
                break;
            }
            sent += 1;
        }
        assert_eq!(link.dropped, 1);
        assert!(link.queued() + 1504 > MAX_QUEUE);
        // Drain on the other side while flushing: every queued frame arrives whole.
        peer.set_read_timeout(Some(std::time::Duration::from_millis(200))).unwrap();
        let mut received = Vec::new();
        let mut chunk = vec![0u8; 65536];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while received.len() < sent * 1504 && std::time::Instant::now() < deadline {
            link.flush().unwrap();
            if let Ok(n) = peer.read(&mut chunk) {
                received.extend_from_slice(&chunk[..n]);
            }
        }
        assert_eq!(received.len(), sent * 1504);
        for rec in received.chunks(1504) {
            assert_eq!(&rec[..4], &1500u32.to_be_bytes());
            assert!(rec[4..].iter().all(|b| *b == 7));
        }
        assert_eq!(link.queued(), 0);
    }

    /// Writes `frames` frames of `len` bytes, prefixed as QEMU does.
    fn write_frames(peer: &mut UnixStream, frames: usize, len: usize) {
        let mut bytes = Vec::new();
        for i in 0..frames {
            bytes.extend_from_slice(&(len as u32).to_be_bytes());
            bytes.extend(frame(len, i as u8));
        }
        peer.write_all(&bytes).unwrap();
    }

    /// Writes and reads runs of bulk frames until the link polls (a run whose frames took
    /// longer than POLL_IDLE to read, on a loaded machine, does not start it), ten at most;
    /// whether it does.
    fn start_polling(link: &mut StreamLink, peer: &mut UnixStream, buf: &mut [u8]) -> bool {
        use crate::link::upload_poll::POLL_AFTER_FRAMES;
        for _ in 0..10 {
            write_frames(peer, POLL_AFTER_FRAMES as usize, 1514);
            link.readable_edge(false);
            for _ in 0..POLL_AFTER_FRAMES {
                assert_eq!(link.recv(buf).unwrap(), 1514);
            }
            if link.polling() {
                return true;
            }
        }
        false
    }

    #[test]
    fn an_upload_is_polled_until_it_pauses() {
        let (mut link, mut peer) = pair(Framing::Be32);
        let mut buf = vec![0u8; MAX_FRAME];
        // Requests, and a bulk frame alone, leave the socket watched.
        write_frames(&mut peer, 1, 100);
        write_frames(&mut peer, 1, 1514);
        assert_eq!(link.recv(&mut buf).unwrap(), 100);
        assert_eq!(link.recv(&mut buf).unwrap(), 1514);
        assert!(!link.polling() && link.read_events());
        // A run of bulk frames: polled, the socket no longer watched for reading.
        assert!(start_polling(&mut link, &mut peer, &mut buf));
        assert!(!link.read_events());
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // No edge comes now: the engine calls `readable_edge` before each poll, and the
        // frames written meanwhile are read in one go.
        write_frames(&mut peer, 3, 1514);
        link.readable_edge(false);
        for i in 0..3u8 {
            assert_eq!(link.recv(&mut buf).unwrap(), 1514);
            assert_eq!(buf[0], i);
        }
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        // POLL_IDLE with small frames only (a guest's ACKs): watched again.
        write_frames(&mut peer, 1, 60);
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
        std::thread::sleep(POLL_IDLE + std::time::Duration::from_millis(1));
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert!(!link.polling() && link.read_events());
    }

    #[test]
    fn a_guest_too_fast_for_polls_is_watched_again() {
        let (mut link, mut peer) = pair(Framing::Be32);
        // Room for the frames below whatever net.core.wmem_default says.
        nix::sys::socket::setsockopt(&peer, nix::sys::socket::sockopt::SndBuf, &(1 << 20)).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        assert!(start_polling(&mut link, &mut peer, &mut buf));
        // More than FAST_POLL_BYTES between two polls: the socket could fill before the next.
        let frames = FAST_POLL_BYTES / 1514 + 2;
        let too_fast_at = Instant::now();
        write_frames(&mut peer, frames, 1514);
        link.readable_edge(false);
        assert_eq!(link.recv(&mut buf).unwrap(), 1514);
        assert!(!link.polling() && link.read_events());
        // Not polled again for the hold-off (UploadPoll's tests cover its end).
        for _ in 1..frames {
            assert_eq!(link.recv(&mut buf).unwrap(), 1514);
        }
        let polled_again = start_polling(&mut link, &mut peer, &mut buf);
        // (A machine that stalled this test past the hold-off proves nothing here.)
        if too_fast_at.elapsed() < crate::link::upload_poll::FAST_HOLDOFF {
            assert!(!polled_again);
        }
    }

    #[test]
    fn pipes_are_never_polled_and_writes_are_watched_only_while_queued() {
        let (rfd, mut w) = {
            let (r, w) = nix::unistd::pipe().unwrap();
            nix::fcntl::fcntl(&r, nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK)).unwrap();
            (r, std::fs::File::from(w))
        };
        let (_out_r, out_w) = nix::unistd::pipe().unwrap();
        let mut link = StreamLink::with_fds(rfd, Some(out_w), Framing::Le16, "pipes".into());
        let mut bulk = Vec::new();
        for _ in 0..10 {
            bulk.extend(1500u16.to_le_bytes());
            bulk.extend(frame(1500, 1));
        }
        w.write_all(&bulk).unwrap();
        let mut buf = vec![0u8; MAX_FRAME];
        for _ in 0..10 {
            assert_eq!(link.recv(&mut buf).unwrap(), 1500);
        }
        assert!(!link.polling() && link.read_events());

        let (mut link, mut peer) = pair(Framing::Be32);
        assert!(!link.write_events());
        link.send(&frame(100, 1)).unwrap();
        assert!(link.write_events(), "a queued frame waits for room");
        link.flush().unwrap();
        assert!(!link.write_events());
        let mut got = [0u8; 104];
        peer.read_exact(&mut got).unwrap();
    }

    #[test]
    fn stdio_framing_round_trip() {
        let (mut link, mut peer) = pair(Framing::Le16);
        link.send(&frame(300, 9)).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 302];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..2], &300u16.to_le_bytes());
        assert!(link.send(&frame(70000, 1)).is_err());
        assert!(link.send(&[]).is_err());
    }

    #[test]
    fn socket_urls() {
        assert_eq!(parse_socket_url("unix:/run/a.sock", "unix").unwrap(), PathBuf::from("/run/a.sock"));
        assert_eq!(parse_socket_url("unix:///run/a.sock", "unix").unwrap(), PathBuf::from("/run/a.sock"));
        assert_eq!(parse_socket_url("unix:rel.sock", "unix").unwrap(), PathBuf::from("rel.sock"));
        assert!(parse_socket_url("unixgram:/a", "unix").is_err());
        assert!(parse_socket_url("unix:", "unix").is_err());
        assert!(parse_socket_url("/a", "unix").is_err());
    }

    /// The engine's side of a link, as `event_loop` drives it: epoll's edge-triggered
    /// events, the readable flag, the batch per round, the re-registration.
    struct EngineModel {
        /// The engine watches the link for reads (`read_events` at the last round's end).
        watched: bool,
        /// An event waits in epoll (and whether it reports the peer's end).
        edge: bool,
        hung_up: bool,
        readable: bool,
        batch: usize,
        /// The link reported the end of the stream.
        eof: bool,
    }

    impl EngineModel {
        /// Bytes came from the guest: an edge, if anyone watches.
        fn wrote(&mut self) {
            self.edge |= self.watched;
        }

        /// The guest closed its end: epoll reports a hang-up even to an empty event mask.
        fn closed(&mut self) {
            self.edge = true;
            self.hung_up = true;
        }

        /// One round of the event loop: its events, the polling links, a batch of reads,
        /// then `watch_links`.
        fn round(&mut self, link: &mut StreamLink, got: &mut Vec<Vec<u8>>, buf: &mut [u8]) {
            self.reads(link, got, buf);
            self.watch(link);
        }

        fn reads(&mut self, link: &mut StreamLink, got: &mut Vec<Vec<u8>>, buf: &mut [u8]) {
            if std::mem::take(&mut self.edge) {
                self.readable = true;
                link.readable_edge(self.hung_up);
            }
            if link.polling() {
                self.readable = true;
                link.readable_edge(false);
            }
            let mut n = 0;
            while self.readable && n < self.batch {
                match link.recv(buf) {
                    Ok(len) => {
                        got.push(buf[..len].to_vec());
                        n += 1;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.readable = false,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && self.hung_up => {
                        self.eof = true;
                        self.readable = false;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }

        /// `watch_links`: a modification that watches for reads again reports bytes
        /// already waiting, as epoll_ctl does.
        fn watch(&mut self, link: &StreamLink) {
            let want = link.read_events();
            if want && !self.watched {
                let mut waiting: libc::c_int = 0;
                // SAFETY: FIONREAD writes one int through the pointer.
                assert_eq!(unsafe { libc::ioctl(link.fd(), libc::FIONREAD, &mut waiting) }, 0);
                self.edge |= waiting > 0;
            }
            self.watched = want;
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Whatever pieces the guest's frames come in, and however the engine's rounds
        /// fall between them (small batches, polled uploads, pauses that end a poll, bytes
        /// that come while a round runs), every frame arrives whole and in order, read only
        /// when epoll or polling says so.
        #[test]
        fn every_frame_arrives_whatever_the_pieces_and_rounds(
            // Requests and bulk frames mixed, or an upload long enough for one read to take
            // more than a poll may (FAST_POLL_BYTES).
            lens in proptest::prop_oneof![
                proptest::collection::vec(proptest::prop_oneof![1usize..200, 1000usize..1600], 1..60),
                proptest::collection::vec(1400usize..1600, 70..130),
            ],
            pieces in proptest::collection::vec(
                (proptest::prop_oneof![12 => 1usize..3000, 1 => 20_000usize..120_000], 0usize..4, 0u8..20, proptest::prelude::any::<bool>()),
                1..300,
            ),
            batch in 1usize..6,
            le16 in proptest::prelude::any::<bool>(),
        ) {
            let framing = if le16 { Framing::Le16 } else { Framing::Be32 };
            let (mut link, mut peer) = pair(framing);
            // The guest's end does not block: a guest whose socket is full waits for the
            // engine to read, so a write that would block is retried after a round.
            peer.set_nonblocking(true).unwrap();
            let frames: Vec<Vec<u8>> =
                lens.iter().enumerate().map(|(i, &n)| (0..n).map(|j| (i * 31 + j) as u8).collect()).collect();
            let mut wire = Vec::new();
            for f in &frames {
                wire.extend_from_slice(&framing.encode(f.len())[..framing.prefix_len()]);
                wire.extend_from_slice(f);
            }
            let mut engine =
                EngineModel { watched: true, edge: false, hung_up: false, readable: false, batch, eof: false };
            let mut got = Vec::new();
            let mut buf = vec![0u8; MAX_FRAME];
            let mut at = 0;
            let mut write = |engine: &mut EngineModel, link: &mut StreamLink, got: &mut Vec<Vec<u8>>, bytes: &[u8]| {
                let mut done = 0;
                while done < bytes.len() {
                    match peer.write(&bytes[done..]) {
                        Ok(n) => {
                            done += n;
                            engine.wrote();
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => engine.round(link, got, &mut vec![0u8; MAX_FRAME]),
                        Err(e) => panic!("{e}"),
                    }
                }
            };
            let (mut long_pauses, mut short_pauses) = (0, 0);
            for &(size, rounds, pause, mid_round) in pieces.iter().cycle() {
                if at == wire.len() {
                    break;
                }
                let end = (at + size).min(wire.len());
                if mid_round {
                    // The guest writes while the engine is between its reads and its
                    // re-registration: a link that just stopped polling hears no edge.
                    engine.reads(&mut link, &mut got, &mut buf);
                    write(&mut engine, &mut link, &mut got, &wire[at..end]);
                    engine.watch(&link);
                } else {
                    write(&mut engine, &mut link, &mut got, &wire[at..end]);
                }
                at = end;
                for _ in 0..rounds {
                    engine.round(&mut link, &mut got, &mut buf);
                }
                // Now and then longer than POLL_IDLE, so that a polled upload ends (a few
                // times a case at most, however small its pieces).
                if pause == 0 && long_pauses < 8 {
                    long_pauses += 1;
                    std::thread::sleep(POLL_IDLE + std::time::Duration::from_micros(200));
                } else if pause <= 3 && short_pauses < 40 {
                    short_pauses += 1;
                    std::thread::sleep(std::time::Duration::from_micros(300));
                }
            }
            // The guest goes: every frame is read before the end of the stream.
            drop(peer);
            engine.closed();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !engine.eof && std::time::Instant::now() < deadline {
                engine.round(&mut link, &mut got, &mut buf);
                if !engine.readable && !engine.edge {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
            proptest::prop_assert!(engine.eof, "the end of the stream was never reported");
            proptest::prop_assert_eq!(got.len(), frames.len(), "frames lost");
            proptest::prop_assert!(got == frames, "frames garbled or out of order");
        }
    }
}
