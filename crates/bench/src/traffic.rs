//! The traffic of `usernet-bench`: small servers and the clients that load them.
//!
//! The same code runs on both sides of a setup: the driver starts servers on the host and
//! drives host-side clients, and the agent (see [`super::agent`]) starts a server or a client
//! inside a namespace. Each server has its own port and a protocol small enough to read at a
//! glance:
//! - stream: the client sends for the test's duration, then half-closes; the server counts what
//!   it read between its first byte and EOF and answers with 16 bytes (bytes read, nanoseconds
//!   taken, both u64 big-endian). Throughput is measured where the data lands, so nothing left
//!   sitting in socket buffers is counted. With N parallel streams, the total of the bytes is
//!   divided by the longest of the N times.
//! - rr: echoes whatever it reads until EOF; the client sends 1 byte and waits for it back, N
//!   times, on one connection with TCP_NODELAY on both ends.
//! - crr: for each accepted connection, reads 1 byte, writes 1 byte and closes; the client
//!   connects, exchanges the byte and closes, as many times as it can in a few seconds. The
//!   server closes first, so the TIME_WAIT states pile up on the host side, not in the
//!   client's namespace.
//! - hold: accepts connections and keeps them, idle, until the server is dropped (the memory
//!   test: the client opens thousands and holds them).
//! - UDP sink: counts datagrams and bytes; it has a large receive buffer (8 MiB, forced when
//!   we are root) so that the sink itself is not where datagrams are lost. The UDP sender
//!   paces itself: every ~50 us it sends the datagrams that are due at the offered rate.
//!
//! Servers poll their sockets every 100 ms for a stop flag, so stopping them needs no traffic;
//! every read and write has a timeout, and every client loop is bounded in count and time.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, poll};
use serde::{Deserialize, Serialize};

/// Longest a server or client waits on one read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest the stream server waits for data: a path that stalls this long has failed.
const STREAM_STALL: Duration = Duration::from_secs(3);
/// Size of each write of the stream test (iperf3's default for TCP).
const CHUNK: usize = 128 * 1024;
/// How long a client retries its first connection while the network comes up.
const FIRST_CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// Round trips before the latency test starts timing.
const RR_WARMUP: u32 = 100;
/// Upper bound on connections per connection-rate test (well under the ephemeral port range).
const CRR_MAX: u64 = 25_000;
/// Receive buffer of the UDP sink.
const UDP_RCVBUF: usize = 8 << 20;

/// What a server does with an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stream,
    Rr,
    Crr,
    Hold,
}

/// One TCP server on its own thread; dropping it stops it (and closes what it holds).
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds a `kind` server to `addr` (port 0: a free port).
    pub fn start(kind: Kind, addr: SocketAddr) -> anyhow::Result<Server> {
        let listener = TcpListener::bind(addr).with_context(|| format!("bind a server to {addr}"))?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || accept_loop(listener, kind, &flag));
        Ok(Server { addr, stop, thread: Some(thread) })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits up to 100 ms for `fd` to become readable; false on timeout or error.
fn readable(fd: &impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    matches!(poll(&mut fds, 100u16), Ok(n) if n > 0)
}

fn accept_loop(listener: TcpListener, kind: Kind, stop: &AtomicBool) {
    // The hold server's connections live here until the server stops.
    let mut held: Vec<TcpStream> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        if !readable(&listener) {
            continue;
        }
        let conn = match listener.accept() {
            Ok((conn, _)) => conn,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                // EMFILE and friends: back off rather than spin.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match kind {
            // One connection at a time: the client never opens more, and a thread per
            // connection would show up in the connection rate.
            Kind::Crr => log_error("crr", serve_crr(conn)),
            Kind::Stream => {
                std::thread::spawn(move || log_error("stream", serve_stream(conn)));
            }
            Kind::Rr => {
                std::thread::spawn(move || log_error("rr", serve_rr(conn)));
            }
            Kind::Hold => held.push(conn),
        }
    }
}

/// Server-side errors show up in the client's report anyway; the detail is for RUST_LOG=debug.
fn log_error(server: &str, result: std::io::Result<()>) {
    if let Err(e) = result {
        tracing::debug!("bench {server} server: {e}");
    }
}

fn serve_stream(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_read_timeout(Some(STREAM_STALL))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    let mut first: Option<Instant> = None;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                first.get_or_insert_with(Instant::now);
                total += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                let ms = first.map(|t| t.elapsed().as_millis()).unwrap_or(0);
                return Err(std::io::Error::new(e.kind(), format!("after {total} bytes in {ms} ms: {e}")));
            }
        }
    }
    let nanos = first.map(|t| t.elapsed().as_nanos() as u64).unwrap_or(0);
    tracing::debug!("bench stream server: {total} bytes in {} ms", nanos / 1_000_000);
    let mut reply = [0u8; 16];
    reply[..8].copy_from_slice(&total.to_be_bytes());
    reply[8..].copy_from_slice(&nanos.to_be_bytes());
    conn.write_all(&reply)
}

fn serve_rr(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 64];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => conn.write_all(&buf[..n])?,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

fn serve_crr(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    // Short: this server is serial, and a stuck client must not hold it for long.
    conn.set_read_timeout(Some(Duration::from_secs(2)))?;
    conn.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut b = [0u8; 1];
    conn.read_exact(&mut b)?;
    conn.write_all(&b)
}

/// A UDP sink on its own thread, counting what arrives; dropping it stops it.
pub struct UdpSink {
    pub addr: SocketAddr,
    datagrams: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpSink {
    pub fn start(ip: IpAddr) -> anyhow::Result<UdpSink> {
        use nix::sys::socket::{setsockopt, sockopt};
        let sock = UdpSocket::bind((ip, 0)).with_context(|| format!("bind a UDP sink to {ip}"))?;
        // SO_RCVBUFFORCE passes net.core.rmem_max (root only); SO_RCVBUF is capped by it.
        if setsockopt(&sock, sockopt::RcvBufForce, &UDP_RCVBUF).is_err() {
            setsockopt(&sock, sockopt::RcvBuf, &UDP_RCVBUF).context("SO_RCVBUF")?;
        }
        sock.set_read_timeout(Some(Duration::from_millis(100)))?;
        let addr = sock.local_addr()?;
        let datagrams = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, b, s) = (datagrams.clone(), bytes.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !s.load(Ordering::Relaxed) {
                match sock.recv(&mut buf) {
                    Ok(n) => {
                        d.fetch_add(1, Ordering::Relaxed);
                        b.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    // An ICMP error queued on the socket: not ours to judge, keep counting.
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        });
        Ok(UdpSink { addr, datagrams, bytes, stop, thread: Some(thread) })
    }

    /// Datagrams and bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (self.datagrams.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

impl Drop for UdpSink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a stream test moved.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct StreamResult {
    /// Bytes the server(s) read.
    pub bytes: u64,
    /// The longest server-side time, first byte to EOF.
    pub secs: f64,
}

impl StreamResult {
    pub fn gbps(&self) -> f64 {
        if self.secs > 0.0 { self.bytes as f64 * 8.0 / self.secs / 1e9 } else { 0.0 }
    }
}

/// Latency of 1-byte round trips on one connection, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RrStats {
    pub count: u64,
    pub mean_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
}

/// What the UDP sender sent.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct UdpSent {
    pub datagrams: u64,
    pub bytes: u64,
    pub secs: f64,
    /// Sends that failed (ENOBUFS, ECONNREFUSED, ...), not counted as sent.
    pub errors: u64,
}

/// Connects, retrying for a few seconds in case the network is still coming up.
fn connect_patiently(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    connect_patiently_with(addr, None)
}

/// Connects as [`connect_patiently`] does, from a socket on the congestion control
/// `congestion` when given: set before the connect, since a connection that started on BBR
/// stays paced after a switch (BBR turns the socket's pacing on, and no other algorithm
/// turns it off).
fn connect_patiently_with(addr: SocketAddr, congestion: Option<&str>) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + FIRST_CONNECT_PATIENCE;
    loop {
        let attempt = match congestion {
            None => TcpStream::connect_timeout(&addr, Duration::from_secs(2)),
            Some(name) => {
                let fd = congestion_socket(addr, name)?;
                connect_with_timeout(fd, addr, Duration::from_secs(2))
            }
        };
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connect to {addr}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// `streams` parallel connections to a stream server, sending for `duration`; each with the
/// congestion control `congestion` when given, else the namespace's default.
pub fn stream_client(
    addr: SocketAddr,
    duration: Duration,
    streams: u32,
    congestion: Option<&str>,
) -> anyhow::Result<StreamResult> {
    let conns =
        (0..streams.max(1)).map(|_| connect_patiently_with(addr, congestion)).collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = Instant::now() + duration;
    let results: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = conns.into_iter().map(|s| scope.spawn(move || one_stream(s, deadline))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("stream thread panicked"))))
            .collect()
    });
    let mut total = StreamResult { bytes: 0, secs: 0.0 };
    for (i, r) in results.into_iter().enumerate() {
        let (bytes, nanos) = r.with_context(|| format!("stream {}", i + 1))?;
        if nanos == 0 {
            anyhow::bail!("the server received {bytes} bytes in no time");
        }
        total.bytes += bytes;
        total.secs = total.secs.max(nanos as f64 / 1e9);
    }
    Ok(total)
}

/// A TCP socket for `addr`'s family on the congestion control `name`, not yet connected.
fn congestion_socket(addr: SocketAddr, name: &str) -> anyhow::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).context("socket")?;
    set_congestion(&fd, name)?;
    Ok(fd)
}

/// Connects `fd` to `addr`, giving up after `timeout` (SO_SNDTIMEO bounds a blocking
/// connect on Linux).
fn connect_with_timeout(fd: std::os::fd::OwnedFd, addr: SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{SockaddrStorage, connect, setsockopt, sockopt};
    use nix::sys::time::TimeVal;
    use std::os::fd::AsRawFd;
    setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(timeout.as_secs() as _, 0))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(TcpStream::from(fd))
}

/// Sets a socket's congestion control (TCP_CONGESTION) and reads it back: the kernel refuses
/// a name it has no module for, and an unprivileged process one outside
/// `net.ipv4.tcp_allowed_congestion_control`.
pub fn set_congestion(s: &impl AsFd, name: &str) -> anyhow::Result<()> {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::TcpCongestion};
    setsockopt(s, TcpCongestion, &name.into()).with_context(|| format!("congestion control {name}"))?;
    let got = getsockopt(s, TcpCongestion).context("read back the congestion control")?;
    anyhow::ensure!(got == name, "congestion control {name} asked, {} in use", got.to_string_lossy());
    Ok(())
}

/// Sends on one connection until `deadline`, half-closes, returns the server's (bytes, nanos).
fn one_stream(mut s: TcpStream, deadline: Instant) -> anyhow::Result<(u64, u64)> {
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let buf = vec![0x5au8; CHUNK];
    while Instant::now() < deadline {
        s.write_all(&buf).context("send")?;
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply)
        .context("no count from the server (it saw no data for 3 s, or the connection was reset)")?;
    let (bytes, nanos) = reply.split_at(8);
    Ok((u64::from_be_bytes(bytes.try_into()?), u64::from_be_bytes(nanos.try_into()?)))
}

/// `count` 1-byte round trips (at most `duration`) after a warm-up.
pub fn rr_client(addr: SocketAddr, count: u32, duration: Duration) -> anyhow::Result<RrStats> {
    let mut s = connect_patiently(addr)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let round_trip = |s: &mut TcpStream| -> anyhow::Result<()> {
        let mut b = [b'x'];
        s.write_all(&b).context("send")?;
        s.read_exact(&mut b).context("receive")?;
        Ok(())
    };
    for _ in 0..RR_WARMUP {
        round_trip(&mut s)?;
    }
    let mut samples: Vec<u64> = Vec::with_capacity(count as usize);
    let start = Instant::now();
    while samples.len() < count as usize && start.elapsed() < duration {
        let t = Instant::now();
        round_trip(&mut s)?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    if samples.is_empty() {
        anyhow::bail!("no round trips completed");
    }
    samples.sort_unstable();
    let n = samples.len();
    let mean = samples.iter().sum::<u64>() as f64 / n as f64;
    let median = samples[n / 2] as f64;
    let p99 = samples[(n * 99 / 100).min(n - 1)] as f64;
    Ok(RrStats { count: n as u64, mean_us: mean / 1000.0, median_us: median / 1000.0, p99_us: p99 / 1000.0 })
}

/// New connections per second (connect, 1 byte each way, close) for `duration`.
pub fn crr_client(addr: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    // One exchange before the clock starts, so a slow start-up is not counted.
    let deadline = Instant::now() + FIRST_CONNECT_PATIENCE;
    while let Err(e) = one_connection(addr) {
        if Instant::now() >= deadline {
            return Err(e.context("first connection"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut count: u64 = 0;
    let start = Instant::now();
    while count < CRR_MAX && start.elapsed() < duration {
        one_connection(addr).with_context(|| format!("after {count} connections"))?;
        count += 1;
    }
    Ok(count as f64 / start.elapsed().as_secs_f64())
}

fn one_connection(addr: SocketAddr) -> anyhow::Result<()> {
    let mut s =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).with_context(|| format!("connect to {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut b = [b'c'];
    s.write_all(&b).context("send")?;
    s.read_exact(&mut b).context("receive")?;
    Ok(())
}

/// Sends `size`-byte datagrams to `addr` at `rate_bps` (bits of payload per second) for
/// `duration`: `segments` of them per send, cut by the kernel (UDP_SEGMENT, as QUIC stacks
/// send bursts), or one per send when `segments` is 1. Blocking sends: a sender the path
/// cannot keep up with simply falls behind, which the report shows as a sent rate below
/// the offered one.
pub fn udp_sender(
    addr: SocketAddr,
    duration: Duration,
    rate_bps: f64,
    size: usize,
    segments: usize,
) -> anyhow::Result<UdpSent> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).context("bind the UDP sender")?;
    sock.connect(addr).with_context(|| format!("connect UDP to {addr}"))?;
    sock.set_write_timeout(Some(Duration::from_secs(1)))?;
    let size = size.clamp(1, 65_000);
    // The kernel's bounds of one segmented send: 64 datagrams, 65,507 bytes.
    let segments = segments.clamp(1, 64).min(65_507 / size).max(1) as u64;
    let buf = vec![0x75u8; size * segments as usize];
    let segment = size as u16;
    let cmsg = [nix::sys::socket::ControlMessage::UdpGsoSegments(&segment)];
    let send = |sock: &UdpSocket| -> anyhow::Result<()> {
        if segments == 1 {
            sock.send(&buf)?;
        } else {
            let iov = [std::io::IoSlice::new(&buf)];
            let flags = nix::sys::socket::MsgFlags::empty();
            nix::sys::socket::sendmsg::<nix::sys::socket::SockaddrStorage>(sock.as_raw_fd(), &iov, &cmsg, flags, None)?;
        }
        Ok(())
    };
    let per_sec = rate_bps / (size * 8) as f64;
    let mut sent: u64 = 0;
    let mut errors: u64 = 0;
    let start = Instant::now();
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * per_sec) as u64;
        let behind = due.saturating_sub(sent + errors);
        if behind < segments {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        for _ in 0..(behind / segments).min((64 / segments).max(1)) {
            match send(&sock) {
                Ok(()) => sent += segments,
                Err(_) => errors += segments,
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(UdpSent { datagrams: sent, bytes: sent * size as u64, secs, errors })
}

/// Opens up to `count` connections to `addr` (each within 5 s, all within `limit`) and
/// returns them, with the error that stopped it early, if any.
pub fn open_many(addr: SocketAddr, count: u32, limit: Duration) -> (Vec<TcpStream>, Option<String>) {
    let start = Instant::now();
    let mut conns = Vec::with_capacity(count as usize);
    while conns.len() < count as usize {
        if start.elapsed() >= limit {
            let why = format!("opened {} of {count} in {} s", conns.len(), limit.as_secs());
            return (conns, Some(why));
        }
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => conns.push(s),
            Err(e) => {
                let why = format!("connection {} of {count}: {e}", conns.len() + 1);
                return (conns, Some(why));
            }
        }
    }
    (conns, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lo() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn stream_rr_crr_on_loopback() {
        let stream = Server::start(Kind::Stream, lo()).unwrap();
        let rr = Server::start(Kind::Rr, lo()).unwrap();
        let crr = Server::start(Kind::Crr, lo()).unwrap();
        let one = stream_client(stream.addr, Duration::from_millis(200), 1, None).unwrap();
        assert!(one.bytes > 0 && one.gbps() > 0.0);
        let four = stream_client(stream.addr, Duration::from_millis(200), 4, None).unwrap();
        assert!(four.bytes > 0);
        let cubic = stream_client(stream.addr, Duration::from_millis(200), 1, Some("cubic")).unwrap();
        assert!(cubic.bytes > 0);
        assert!(rr_client(rr.addr, 200, Duration::from_millis(200)).unwrap().count > 0);
        assert!(crr_client(crr.addr, Duration::from_millis(200)).unwrap() > 0.0);
    }

    /// The name asked for is the one in use; a name the kernel does not know is an error that
    /// says which, not a stream on the default.
    #[test]
    fn a_stream_uses_the_congestion_control_asked_for() {
        let l = TcpListener::bind(lo()).unwrap();
        let s = connect_patiently_with(l.local_addr().unwrap(), Some("cubic")).unwrap();
        let (_peer, from) = l.accept().unwrap();
        assert_eq!(from, s.local_addr().unwrap());
        set_congestion(&s, "reno").unwrap();
        let e = connect_patiently_with(l.local_addr().unwrap(), Some("no-such-algorithm")).unwrap_err();
        assert!(format!("{e:#}").contains("congestion control no-such-algorithm"), "{e:#}");
    }

    #[test]
    fn udp_sender_paces_and_sink_counts() {
        // One by one, then in segmented sends of 40, which the sink receives one by one.
        for segments in [1, 40] {
            let sink = UdpSink::start("127.0.0.1".parse().unwrap()).unwrap();
            // 10 Mbit/s of 1000-byte datagrams for 0.3 s: about 375 datagrams.
            let sent = udp_sender(sink.addr, Duration::from_millis(300), 10e6, 1000, segments).unwrap();
            assert!((250..=400).contains(&sent.datagrams), "sent {}", sent.datagrams);
            assert_eq!(sent.datagrams % segments as u64, 0);
            std::thread::sleep(Duration::from_millis(100));
            let (n, bytes) = sink.received();
            assert_eq!((n, bytes), (sent.datagrams, sent.bytes), "{segments} a send");
        }
    }

    #[test]
    fn hold_server_keeps_connections() {
        let hold = Server::start(Kind::Hold, lo()).unwrap();
        let (conns, err) = open_many(hold.addr, 50, Duration::from_secs(5));
        assert_eq!(conns.len(), 50, "{err:?}");
        assert!(err.is_none());
    }
}
