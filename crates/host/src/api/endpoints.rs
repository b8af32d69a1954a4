//! More places to serve the API on than its Unix socket: gvproxy's `-listen` and
//! `-services` take `unix://PATH`, `tcp://HOST:PORT` and `vsock://[CID]:PORT` endpoints,
//! each served with the whole API (as gvproxy serves its own there).
//! [`ApiServer::serve_also`] binds one (so that a taken port or a bad path is the caller's
//! error at once) and accepts on the API's runtime; the socket file of a `unix://`
//! endpoint is removed when the server goes.
//!
//! gvproxy's `-listen` endpoints also take VMs: a client that sends `POST /connect` (any
//! method, as Go's mux matches the path alone) gets no HTTP answer; from the end of its
//! request head on, the connection carries the VM's Ethernet frames, each preceded by its
//! length (2 bytes little-endian, HyperKit's framing, or 4 bytes big-endian when gvproxy
//! was given `-listen-qemu`). This is how gvisor-tap-vsock's guest-side forwarder
//! (`gvforwarder`, `cmd/vm`) joins the network over vsock or TCP. Theory of operation: with
//! a [`Connect`] target, each accepted connection is peeked at (never read) until its
//! request line shows the path; any other request is served by hyper as it came, and a
//! `/connect` has its head read off and its socket handed to the engine as a link through
//! a [`HandoffSender`].
//!
//! Both kinds of endpoint also take gvproxy's `/tunnel?ip=IP&port=PORT`: the client gets
//! "OK" (no HTTP answer either), then its connection is carried to that guest's TCP port,
//! from the host address, as a published port's connections are (`Command::Tunnel`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tracing::{debug, info, warn};
use usernet_core::config::LogEvery;
use usernet_core::engine::control::Command;
use usernet_core::link::handoff::HandoffSender;
use usernet_core::link::qemu::{Framing, StreamLink};

use super::ApiServer;

/// Where to serve the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
    /// A VM socket: `cid` is the context ID to listen on (`VMADDR_CID_ANY` when the
    /// endpoint names none, as gvproxy's `vsock://:1024`).
    Vsock {
        cid: u32,
        port: u32,
    },
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp://{a}"),
            Endpoint::Vsock { cid, port } if *cid == tokio_vsock::VMADDR_CID_ANY => write!(f, "vsock://:{port}"),
            Endpoint::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// `unix://PATH` (also `unix:PATH`), `tcp://HOST:PORT` with an IP address for HOST, or
    /// `vsock://[CID]:PORT`.
    fn from_str(s: &str) -> Result<Endpoint, String> {
        if let Some(rest) = s.strip_prefix("tcp://") {
            let addr = rest.trim_end_matches('/');
            return addr
                .parse::<SocketAddr>()
                .map(Endpoint::Tcp)
                .map_err(|_| format!("invalid endpoint {s:?}: want tcp://IP:PORT"));
        }
        if let Some(rest) = s.strip_prefix("unix://").or_else(|| s.strip_prefix("unix:")) {
            if rest.is_empty() {
                return Err(format!("invalid endpoint {s:?}: empty path"));
            }
            return Ok(Endpoint::Unix(PathBuf::from(rest)));
        }
        if let Some(rest) = s.strip_prefix("vsock://") {
            let bad = || format!("invalid endpoint {s:?}: want vsock://[CID]:PORT");
            let (cid, port) = rest.trim_end_matches('/').rsplit_once(':').ok_or_else(bad)?;
            let port = port.parse::<u32>().map_err(|_| bad())?;
            let cid =
                if cid.is_empty() { tokio_vsock::VMADDR_CID_ANY } else { cid.parse::<u32>().map_err(|_| bad())? };
            return Ok(Endpoint::Vsock { cid, port });
        }
        match s.split_once("://") {
            Some((scheme, _)) => {
                Err(format!("unsupported endpoint scheme {scheme}:// in {s:?} (unix://, tcp:// or vsock://)"))
            }
            None => Err(format!("invalid endpoint {s:?}: want unix://PATH, tcp://IP:PORT or vsock://[CID]:PORT")),
        }
    }
}

/// Where `POST /connect` puts the VMs that ask for it: the engine's hand-off point, and
/// the framing of their frames.
#[derive(Clone)]
pub struct Connect {
    pub links: HandoffSender,
    pub framing: Framing,
}

/// A bound extra endpoint, kept to remove its socket file.
pub(super) struct Bound {
    unix: Option<(PathBuf, (u64, u64))>,
}

impl Bound {
    pub(super) fn remove(self) {
        if let Some((path, ident)) = self.unix {
            super::remove_if_ours(&path, ident);
        }
    }
}

/// A listening socket of the API's: each accepted connection comes out as a descriptor
/// (non-blocking), to be served by hyper as `Stream` or handed to the engine.
trait Listener: Send + Sync + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next(&self) -> impl std::future::Future<Output = io::Result<OwnedFd>> + Send;
    fn stream(fd: OwnedFd) -> io::Result<Self::Stream>;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> io::Result<OwnedFd> {
        Ok(self.accept().await?.0.into_std()?.into())
    }
    fn stream(fd: OwnedFd) -> io::Result<Self::Stream> {
        tokio::net::UnixStream::from_std(fd.into())
    }
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> io::Result<OwnedFd> {
        Ok(self.accept().await?.0.into_std()?.into())
    }
    fn stream(fd: OwnedFd) -> io::Result<Self::Stream> {
        tokio::net::TcpStream::from_std(fd.into())
    }
}

impl Listener for tokio_vsock::VsockListener {
    type Stream = tokio_vsock::VsockStream;
    async fn next(&self) -> io::Result<OwnedFd> {
        Ok(self.accept().await?.0.into())
    }
    fn stream(fd: OwnedFd) -> io::Result<Self::Stream> {
        tokio_vsock::VsockStream::new(vsock::VsockStream::from(fd))
    }
}

/// An endpoint of gvproxy's (`-listen`, `-services`): where `POST /connect` puts VMs
/// (`-listen` only; None: `/connect` is hyper's 404), and how its links are named.
struct ConnectPoint {
    target: Option<Connect>,
    endpoint: String,
    made: AtomicU64,
}

/// Serves every connection of `listener` as an API connection from the host (no caller),
/// or hands it on when it asks for `/connect` or `/tunnel` (see [`take_before_hyper`]).
async fn accept_loop<L: Listener>(state: std::sync::Arc<super::state::State>, listener: L, point: Arc<ConnectPoint>) {
    let mut accept_errors = LogEvery::default();
    loop {
        match listener.next().await {
            Ok(fd) => {
                tokio::spawn(serve_accepted::<L>(state.clone(), fd, point.clone()));
            }
            Err(e) => {
                if let Some(times) = accept_errors.due(std::time::Instant::now()) {
                    warn!(times, "api: accept: {e}");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_accepted<L: Listener>(
    state: std::sync::Arc<super::state::State>,
    fd: OwnedFd,
    point: Arc<ConnectPoint>,
) {
    let Some(fd) = take_before_hyper(fd, &point, &state).await else { return };
    match L::stream(fd) {
        Ok(stream) => super::serve_connection(state, stream, None, None).await,
        Err(e) => warn!("api: cannot serve a connection: {e}"),
    }
}

/// The longest request head looked at for `/connect`.
const MAX_HEAD: usize = 8192;
/// How long a client may take to show its request line (hyper's own header timeout takes
/// over after that).
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request head says, as far as `/connect` goes.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// `/connect`: the head (request line and headers) is this many bytes long.
    Connect(usize),
    /// `/tunnel?ip=IP&port=PORT` with a valid IPv4 address and port: the head's length and
    /// the guest's address.
    Tunnel(usize, SocketAddr),
    /// Anything else, for hyper.
    Other,
}

/// Looks at the first bytes of a connection: None while they are not enough to tell.
fn classify(bytes: &[u8]) -> Option<Head> {
    let Some(eol) = bytes.iter().position(|&b| b == b'\n') else {
        return (bytes.len() >= MAX_HEAD).then_some(Head::Other);
    };
    let line = std::str::from_utf8(&bytes[..eol]).unwrap_or("").trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(_method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Some(Head::Other);
    };
    if !version.starts_with("HTTP/1.") {
        return Some(Head::Other);
    }
    let tunnel = match request_path(target) {
        "/connect" => None,
        // Only a query gvproxy would take; hyper answers the rest with gvproxy's errors.
        "/tunnel" => match tunnel_target(target) {
            Some(guest) => Some(guest),
            None => return Some(Head::Other),
        },
        _ => return Some(Head::Other),
    };
    let end = bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    let end = end.or_else(|| bytes.windows(2).position(|w| w == b"\n\n").map(|i| i + 2));
    match (end, tunnel) {
        (Some(len), None) => Some(Head::Connect(len)),
        (Some(len), Some(guest)) => Some(Head::Tunnel(len, guest)),
        (None, _) => (bytes.len() >= MAX_HEAD).then_some(Head::Other),
    }
}

/// The guest address of `/tunnel?ip=IP&port=PORT`, as gvproxy reads it (an IPv4 address).
pub(super) fn tunnel_target(target: &str) -> Option<SocketAddr> {
    let query = target.split_once('?')?.1.split('#').next().unwrap_or("");
    let value = |key: &str| query.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='));
    let ip = value("ip")?.parse::<std::net::Ipv4Addr>().ok()?;
    let port = value("port")?.parse::<u16>().ok()?;
    Some(SocketAddr::new(ip.into(), port))
}

/// The path of a request target (origin form, or absolute form as a proxy gets it).
fn request_path(target: &str) -> &str {
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    path.split(['?', '#']).next().unwrap_or(path)
}

/// Peeks at the connection until its head is told: Some(the descriptor) for hyper, or None
/// when it became a VM's link (`/connect`) or a tunnel to a guest (`/tunnel`), or broke.
async fn take_before_hyper(fd: OwnedFd, point: &ConnectPoint, state: &super::state::State) -> Option<OwnedFd> {
    // SAFETY: `fd` is owned here and neither closed nor replaced while registered; it is
    // taken back out with `into_inner` below.
    let afd = match unsafe { AsyncFd::register(fd) } {
        Ok(a) => a,
        Err(e) => {
            warn!("api: cannot watch a connection: {e}");
            return None;
        }
    };
    let verdict = tokio::time::timeout(SNIFF_TIMEOUT, sniff(&afd)).await;
    let fd = afd.into_inner();
    match verdict {
        Ok(Ok(Head::Connect(len))) => {
            let Some(target) = &point.target else { return Some(fd) };
            if let Err(e) = discard(&fd, len) {
                warn!("gvproxy /connect on {}: {e}", point.endpoint);
                return None;
            }
            let n = point.made.fetch_add(1, Ordering::Relaxed) + 1;
            let name = format!("gvproxy /connect {} #{n}", point.endpoint);
            info!(link = %name, "a VM connected");
            target.links.send(Box::new(StreamLink::new(fd, target.framing, name)));
            None
        }
        Ok(Ok(Head::Tunnel(len, guest))) => {
            // As gvproxy: "OK", then the bytes both ways (or the connection closed when the
            // guest cannot be reached).
            if let Err(e) = discard(&fd, len).and_then(|()| write_all(&fd, b"OK")) {
                debug!("gvproxy /tunnel on {}: {e}", point.endpoint);
                return None;
            }
            match state.control.ask(|reply| Command::Tunnel { fd, guest, reply }).await {
                Some(Ok(())) => debug!("gvproxy /tunnel on {} to {guest}", point.endpoint),
                Some(Err(e)) => warn!("gvproxy /tunnel on {} to {guest}: {e}", point.endpoint),
                None => warn!("gvproxy /tunnel: the network engine is not running"),
            }
            None
        }
        Ok(Ok(Head::Other)) | Err(_) => Some(fd),
        Ok(Err(e)) => {
            debug!("api: connection lost before its request: {e}");
            None
        }
    }
}

async fn sniff(afd: &AsyncFd<OwnedFd>) -> io::Result<Head> {
    let mut buf = vec![0u8; MAX_HEAD];
    loop {
        let mut guard = afd.readable().await?;
        match guard.try_io(|fd| peek(fd.get_ref(), &mut buf)) {
            // End of stream before a whole head: hyper says what it has to.
            Ok(Ok(0)) => return Ok(Head::Other),
            Ok(Ok(n)) => match classify(&buf[..n]) {
                Some(head) => return Ok(head),
                // The client closed its side after these bytes: no more will come (and
                // tokio never clears that readiness, so waiting again would spin).
                None if guard.ready().is_read_closed() => return Ok(Head::Other),
                // Peeking leaves the bytes (and tokio's readiness) as they were: wait for
                // the next arrival.
                None => guard.clear_ready(),
            },
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

fn peek(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receives into a live buffer of its stated length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_PEEK) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Writes a few bytes to a socket whose send buffer has room (a new connection's).
fn write_all(fd: &OwnedFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Reads off the first `len` bytes, which a peek has already seen in the socket.
fn discard(fd: &OwnedFd, mut len: usize) -> io::Result<()> {
    let mut buf = [0u8; 1024];
    while len > 0 {
        let want = len.min(buf.len());
        match nix::unistd::read(fd, &mut buf[..want]) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed within its request")),
            Ok(n) => len -= n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

impl ApiServer {
    /// Serves the API on `endpoint` too; returns where it listens (a TCP port 0 resolved).
    /// With `connect`, a `POST /connect` there makes the connection a VM's link.
    pub fn serve_also(&self, endpoint: &Endpoint, connect: Option<Connect>) -> io::Result<Endpoint> {
        use std::os::unix::fs::MetadataExt;
        let state = self.guest.state.clone();
        let _entered = self.guest.runtime.enter();
        let point = |at: &Endpoint| {
            Arc::new(ConnectPoint { target: connect.clone(), endpoint: at.to_string(), made: AtomicU64::new(0) })
        };
        match endpoint {
            Endpoint::Unix(path) => {
                let listener = super::bind_socket(path)?;
                let meta = std::fs::symlink_metadata(path)?;
                listener.set_nonblocking(true)?;
                let listener = tokio::net::UnixListener::from_std(listener)?;
                self.guest.runtime.spawn(accept_loop(state, listener, point(endpoint)));
                let bound = Bound { unix: Some((path.clone(), (meta.dev(), meta.ino()))) };
                self.extra.lock().unwrap_or_else(|e| e.into_inner()).push(bound);
                Ok(endpoint.clone())
            }
            Endpoint::Tcp(addr) => {
                let listener = std::net::TcpListener::bind(addr)?;
                let local = Endpoint::Tcp(listener.local_addr()?);
                listener.set_nonblocking(true)?;
                let listener = tokio::net::TcpListener::from_std(listener)?;
                self.guest.runtime.spawn(accept_loop(state, listener, point(&local)));
                Ok(local)
            }
            Endpoint::Vsock { cid, port } => {
                let listener = tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))?;
                let local = listener.local_addr()?;
                let local = Endpoint::Vsock { cid: *cid, port: local.port() };
                self.guest.runtime.spawn(accept_loop(state, listener, point(&local)));
                Ok(local)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!("unix:///run/a.sock".parse(), Ok(Endpoint::Unix("/run/a.sock".into())));
        assert_eq!("unix:rel.sock".parse(), Ok(Endpoint::Unix("rel.sock".into())));
        assert_eq!("tcp://127.0.0.1:7777".parse(), Ok(Endpoint::Tcp("127.0.0.1:7777".parse().unwrap())));
        assert!("tcp://localhost:1".parse::<Endpoint>().is_err());
        let any = tokio_vsock::VMADDR_CID_ANY;
        assert_eq!("vsock://:1024".parse(), Ok(Endpoint::Vsock { cid: any, port: 1024 }));
        assert_eq!("vsock://2:1024/".parse(), Ok(Endpoint::Vsock { cid: 2, port: 1024 }));
        assert_eq!("vsock://:1024".parse::<Endpoint>().unwrap().to_string(), "vsock://:1024");
        assert_eq!("vsock://3:7".parse::<Endpoint>().unwrap().to_string(), "vsock://3:7");
        for bad in ["vsock://", "vsock://1024", "vsock://x:1", "vsock://:y", "vsock://:99999999999"] {
            assert!(bad.parse::<Endpoint>().unwrap_err().contains("want vsock://[CID]:PORT"), "{bad}");
        }
        assert!("hvsock://x".parse::<Endpoint>().unwrap_err().contains("unsupported endpoint scheme hvsock://"));
        assert!("unix://".parse::<Endpoint>().is_err());
        assert!("/plain/path".parse::<Endpoint>().is_err());
    }
}

#[cfg(test)]
mod head_tests {
    use super::*;

    #[test]
    fn connect_is_told_from_other_requests() {
        let go = b"POST /connect HTTP/1.1\r\nHost: unix\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 0\r\n\r\n";
        let mut with_frame = go.to_vec();
        with_frame.extend_from_slice(&[42, 0, 0xff, 0xff]);
        assert_eq!(classify(go), Some(Head::Connect(go.len())));
        assert_eq!(classify(&with_frame), Some(Head::Connect(go.len())));
        assert_eq!(classify(b"GET /connect?x=1 HTTP/1.0\n\n"), Some(Head::Connect(27)));
        assert_eq!(classify(b"POST http://h/connect HTTP/1.1\r\n\r\n"), Some(Head::Connect(34)));
        // Not yet told: more bytes are waited for.
        for n in 0..go.len() {
            assert_eq!(classify(&go[..n]), None, "{n} bytes");
        }
        // Anything else is hyper's, as soon as the request line shows it.
        assert_eq!(classify(b"GET /services/forwarder/all HTTP/1.1\r\n"), Some(Head::Other));
        assert_eq!(classify(b"POST /connectx HTTP/1.1\r\n"), Some(Head::Other));
        assert_eq!(classify(b"POST /connect/ HTTP/1.1\r\n"), Some(Head::Other));
        assert_eq!(classify(b"garbage\r\n"), Some(Head::Other));
        assert_eq!(classify(b"POST /connect SSH-2.0\r\n\r\n"), Some(Head::Other));
        assert_eq!(classify(&[0xff; 20]), None);
        assert_eq!(classify(&[0xff; MAX_HEAD]), Some(Head::Other));
        let mut long = b"POST /connect HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD, b'a');
        assert_eq!(classify(&long), Some(Head::Other));
    }

    #[test]
    fn tunnel_is_told_with_its_guest() {
        let head = b"GET /tunnel?ip=192.168.127.2&port=22 HTTP/1.1\r\nHost: x\r\n\r\nSSH-2.0";
        let guest: SocketAddr = "192.168.127.2:22".parse().unwrap();
        assert_eq!(classify(head), Some(Head::Tunnel(head.len() - 7, guest)));
        assert_eq!(classify(b"GET /tunnel?port=22&ip=192.168.127.2 HTTP/1.1\r\n\r\n"), Some(Head::Tunnel(49, guest)));
        // What gvproxy would refuse is hyper's (a 500 with gvproxy's words).
        for bad in [
            "/tunnel",
            "/tunnel?ip=192.168.127.2",
            "/tunnel?ip=x&port=22",
            "/tunnel?ip=::1&port=22",
            "/tunnel?ip=1.2.3.4&port=70000",
        ] {
            let line = format!("GET {bad} HTTP/1.1\r\n\r\n");
            assert_eq!(classify(line.as_bytes()), Some(Head::Other), "{bad}");
        }
    }

    #[test]
    fn request_paths() {
        assert_eq!(request_path("/connect"), "/connect");
        assert_eq!(request_path("/connect?a#b"), "/connect");
        assert_eq!(request_path("http://x:1/connect"), "/connect");
        assert_eq!(request_path("http://x:1"), "/");
        assert_eq!(request_path("*"), "*");
    }
}
