//! The traffic of `usernet bench`: three servers on the host and the client that runs inside
//! the namespace under test.
//!
//! Each server has its own port and a protocol small enough to read at a glance:
//! - stream: the client sends for the test's duration, then half-closes; the server counts what
//!   it read between its first byte and EOF and answers with 16 bytes (bytes read, nanoseconds
//!   taken, both u64 big-endian). Throughput is measured where the data lands, so nothing left
//!   sitting in socket buffers is counted.
//! - rr: echoes whatever it reads until EOF; the client sends 1 byte and waits for it back, N
//!   times, on one connection with TCP_NODELAY on both ends.
//! - crr: for each accepted connection, reads 1 byte, writes 1 byte and closes; the client
//!   connects, exchanges the byte and closes, as many times as it can in a few seconds. The
//!   server closes first, so the TIME_WAIT states pile up on the host side, not in the
//!   client's namespace.
//!
//! Servers poll their listeners every 100 ms for a stop flag, so stopping them needs no
//! traffic; every read and write has a timeout, and every client loop is bounded in count and
//! time.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, poll};
use serde::{Deserialize, Serialize};

/// Longest a server or client waits on one read or write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of each write of the stream test (iperf3's default for TCP).
const CHUNK: usize = 128 * 1024;
/// How long the client retries its first connection while the network comes up.
const FIRST_CONNECT_PATIENCE: Duration = Duration::from_secs(5);
/// Round trips before the latency test starts timing.
const RR_WARMUP: u32 = 100;
/// Upper bound on connections per connection-rate test (well under the ephemeral port range).
const CRR_MAX: u64 = 25_000;

/// The stdout line prefix that carries the client's report.
pub const REPORT_PREFIX: &str = "USERNET_BENCH_REPORT ";

/// The host-side servers of one run; dropping it stops them.
pub struct Servers {
    pub stream: SocketAddr,
    pub rr: SocketAddr,
    pub crr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What an accepted connection is handed to.
#[derive(Clone, Copy)]
enum Kind {
    Stream,
    Rr,
    Crr,
}

impl Servers {
    /// Binds the three servers to free ports on `ip`.
    pub fn start(ip: IpAddr) -> anyhow::Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut servers = Servers {
            stream: SocketAddr::new(ip, 0),
            rr: SocketAddr::new(ip, 0),
            crr: SocketAddr::new(ip, 0),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        for kind in [Kind::Stream, Kind::Rr, Kind::Crr] {
            let listener = TcpListener::bind((ip, 0)).with_context(|| format!("bind a server to {ip}"))?;
            let addr = listener.local_addr()?;
            match kind {
                Kind::Stream => servers.stream = addr,
                Kind::Rr => servers.rr = addr,
                Kind::Crr => servers.crr = addr,
            }
            let stop = stop.clone();
            servers.threads.push(std::thread::spawn(move || accept_loop(listener, kind, &stop)));
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: TcpListener, kind: Kind, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, 100u16) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
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
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
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

/// What the client is to measure.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    pub host: IpAddr,
    pub stream_port: u16,
    pub rr_port: u16,
    pub crr_port: u16,
    /// Length of the throughput test.
    pub duration: Duration,
    /// Round trips of the latency test (it also stops after `duration`).
    pub rr_count: u32,
    /// Length of the connection-rate test.
    pub crr_time: Duration,
}

/// The client's findings, one line of JSON on its stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientReport {
    pub throughput_gbps: Result<f64, String>,
    pub rr: Result<RrStats, String>,
    pub crr_per_sec: Result<f64, String>,
}

/// Latency of 1-byte round trips on one connection, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RrStats {
    pub count: u64,
    pub mean_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
}

/// Runs the three tests one after the other; a failing test does not stop the others.
pub fn run_client(plan: &ClientPlan) -> ClientReport {
    let err = |e: anyhow::Error| format!("{e:#}");
    ClientReport {
        throughput_gbps: stream_test(plan).map_err(err),
        rr: rr_test(plan).map_err(err),
        crr_per_sec: crr_test(plan).map_err(err),
    }
}

/// Connects, retrying for a few seconds in case the network is still coming up.
fn connect_patiently(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let deadline = Instant::now() + FIRST_CONNECT_PATIENCE;
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connect to {addr}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn stream_test(plan: &ClientPlan) -> anyhow::Result<f64> {
    let addr = SocketAddr::new(plan.host, plan.stream_port);
    let mut s = connect_patiently(addr)?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    let buf = vec![0x5au8; CHUNK];
    let start = Instant::now();
    while start.elapsed() < plan.duration {
        s.write_all(&buf).context("send")?;
    }
    s.shutdown(Shutdown::Write)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reply = [0u8; 16];
    s.read_exact(&mut reply).context("read the server's count")?;
    let (bytes, nanos) = reply.split_at(8);
    let bytes = u64::from_be_bytes(bytes.try_into()?);
    let nanos = u64::from_be_bytes(nanos.try_into()?);
    if nanos == 0 {
        anyhow::bail!("the server received {bytes} bytes in no time");
    }
    // bits per nanosecond is Gbit/s.
    Ok(bytes as f64 * 8.0 / nanos as f64)
}

fn rr_test(plan: &ClientPlan) -> anyhow::Result<RrStats> {
    let addr = SocketAddr::new(plan.host, plan.rr_port);
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
    let mut samples: Vec<u64> = Vec::with_capacity(plan.rr_count as usize);
    let start = Instant::now();
    while samples.len() < plan.rr_count as usize && start.elapsed() < plan.duration {
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

fn crr_test(plan: &ClientPlan) -> anyhow::Result<f64> {
    let addr = SocketAddr::new(plan.host, plan.crr_port);
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
    while count < CRR_MAX && start.elapsed() < plan.crr_time {
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
