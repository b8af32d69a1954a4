//! The bench agent: this same executable, re-run as `usernet-bench agent` inside a
//! namespace, taking orders from the driver one at a time.
//!
//! Protocol: the driver writes one JSON [`Request`] per line on the agent's stdin; the agent
//! carries it out and prints one [`Reply`] line on its stdout, prefixed by [`REPLY_PREFIX`]
//! (so whatever else a wrapper prints is ignored). The agent exits at `quit` or when its stdin
//! closes, which is how the driver stops it in the end. Serial request/reply keeps the
//! driver in charge of the clock: it samples the CPU time and memory of the tool under test
//! right before a request and right after its reply.
//!
//! On the driver side, [`Agent`] spawns the agent under a setup's command prefix (`usernet
//! run --`, `nsenter`, `ip netns exec`) and calls it with a time limit. Dropping it closes the
//! agent's stdin, then waits a little, then signals it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::sockperf::{self, Proto};
use super::traffic::{self, Kind, RrStats, Server, StreamResult, UdpSent};

/// The stdout line prefix that carries the agent's replies.
pub const REPLY_PREFIX: &str = "USERNET_BENCH_REPLY ";

/// What the driver asks of an agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
pub enum Request {
    /// Start a stream server on 0.0.0.0:`port` (the far end of a published port).
    Serve {
        port: u16,
    },
    /// Replace the servers by a connection-rate server on `addr` (port 0: any free one); the
    /// reply says which port.
    ServeCrr {
        addr: SocketAddr,
    },
    Stream {
        addr: SocketAddr,
        secs: f64,
        streams: u32,
        /// The congestion control of the client's sockets (TCP_CONGESTION); None: the
        /// namespace's default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        congestion: Option<String>,
    },
    Rr {
        addr: SocketAddr,
        count: u32,
        secs: f64,
    },
    Crr {
        addr: SocketAddr,
        secs: f64,
    },
    Udp {
        addr: SocketAddr,
        secs: f64,
        rate_bps: f64,
        size: usize,
        /// Datagrams per send (UDP_SEGMENT); 1 sends them one by one.
        segments: usize,
    },
    /// `sockperf ping-pong` for `secs` seconds with the server at `addr`.
    Sockperf {
        addr: SocketAddr,
        proto: Proto,
        secs: u32,
    },
    /// Open `count` connections and hold them until `close`.
    Open {
        addr: SocketAddr,
        count: u32,
        secs: f64,
    },
    Close,
    Quit,
}

/// The agent's answer to one request.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// After `serve`: the namespace's interfaces other than lo, with their MTU.
    Ready {
        interfaces: Vec<(String, u32)>,
    },
    Stream(StreamResult),
    Rr(RrStats),
    Crr {
        per_sec: f64,
    },
    /// After `serve_crr`: the port the server listens on.
    Listening {
        port: u16,
    },
    Udp(UdpSent),
    Sockperf(sockperf::Stats),
    Opened {
        count: u32,
        secs: f64,
        error: Option<String>,
    },
    Done,
    Error(String),
}

/// The hidden `--role agent`: serve requests from stdin until it closes.
pub fn agent_main() -> anyhow::Result<i32> {
    raise_nofile_limit();
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut state = AgentState::default();
    for line in stdin.lock().lines() {
        let line = line.context("read a request")?;
        if line.trim().is_empty() {
            continue;
        }
        let request: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                reply(&mut stdout, &Reply::Error(format!("bad request: {e}")))?;
                continue;
            }
        };
        if matches!(request, Request::Quit) {
            reply(&mut stdout, &Reply::Done)?;
            break;
        }
        let answer = state.handle(request);
        reply(&mut stdout, &answer)?;
    }
    Ok(0)
}

fn reply(out: &mut impl Write, r: &Reply) -> anyhow::Result<()> {
    writeln!(out, "{REPLY_PREFIX}{}", serde_json::to_string(r)?)?;
    out.flush()?;
    Ok(())
}

/// What an agent keeps between requests.
#[derive(Default)]
struct AgentState {
    servers: Vec<Server>,
    held: Vec<TcpStream>,
}

impl AgentState {
    fn handle(&mut self, request: Request) -> Reply {
        let err = |e: anyhow::Error| Reply::Error(format!("{e:#}"));
        let secs = |s: f64| Duration::from_secs_f64(s.clamp(0.0, 600.0));
        match request {
            Request::Serve { port } => {
                let addr = SocketAddr::from(([0, 0, 0, 0], port));
                match Server::start(Kind::Stream, addr) {
                    Ok(server) => {
                        self.servers.push(server);
                        Reply::Ready { interfaces: interfaces() }
                    }
                    Err(e) => err(e),
                }
            }
            Request::ServeCrr { addr } => {
                self.servers.clear();
                match Server::start(Kind::Crr, addr) {
                    Ok(server) => {
                        let port = server.port();
                        self.servers.push(server);
                        Reply::Listening { port }
                    }
                    Err(e) => err(e),
                }
            }
            Request::Stream { addr, secs: s, streams, congestion } => {
                traffic::stream_client(addr, secs(s), streams.clamp(1, 64), congestion.as_deref())
                    .map_or_else(err, Reply::Stream)
            }
            Request::Rr { addr, count, secs: s } => {
                traffic::rr_client(addr, count, secs(s)).map_or_else(err, Reply::Rr)
            }
            Request::Crr { addr, secs: s } => {
                traffic::crr_client(addr, secs(s)).map_or_else(err, |per_sec| Reply::Crr { per_sec })
            }
            Request::Udp { addr, secs: s, rate_bps, size, segments } => {
                traffic::udp_sender(addr, secs(s), rate_bps, size, segments).map_or_else(err, Reply::Udp)
            }
            Request::Sockperf { addr, proto, secs } => {
                sockperf::ping_pong(addr, proto, secs).map_or_else(err, Reply::Sockperf)
            }
            Request::Open { addr, count, secs: s } => {
                self.held.clear();
                let start = Instant::now();
                let (conns, error) = traffic::open_many(addr, count, secs(s));
                let secs = start.elapsed().as_secs_f64();
                let count = conns.len() as u32;
                self.held = conns;
                Reply::Opened { count, secs, error }
            }
            Request::Close => {
                self.held.clear();
                Reply::Done
            }
            Request::Quit => Reply::Done,
        }
    }
}

/// Raises the soft limit on open files to the hard limit (the memory test holds thousands).
pub fn raise_nofile_limit() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The interfaces of this network namespace other than lo, with their MTU.
fn interfaces() -> Vec<(String, u32)> {
    let Ok(dev) = std::fs::read_to_string("/proc/self/net/dev") else {
        return Vec::new();
    };
    let Ok(sock) = std::net::UdpSocket::bind("0.0.0.0:0") else {
        return Vec::new();
    };
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .filter(|name| !name.is_empty() && *name != "lo")
        .filter_map(|name| interface_mtu(&sock, name).map(|mtu| (name.to_string(), mtu)))
        .collect()
}

fn interface_mtu(sock: &std::net::UdpSocket, name: &str) -> Option<u32> {
    use std::os::fd::AsRawFd;
    if name.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads ifr_name and writes ifru_mtu of the ifreq we pass.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFMTU, &mut ifr) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFMTU the union holds the MTU.
    Some(unsafe { ifr.ifr_ifru.ifru_mtu } as u32)
}

/// The driver's handle on a running agent.
pub struct Agent {
    child: Child,
    stdin: Option<ChildStdin>,
    replies: Receiver<String>,
    stderr: Arc<Mutex<Vec<u8>>>,
}

impl Agent {
    /// Starts `cmd` (a prefix, then this executable with `bench --role agent`).
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Agent> {
        let shown = super::setups::show(cmd);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {shown}"))?;
        let stdin = child.stdin.take();
        let (tx, replies) = std::sync::mpsc::channel();
        if let Some(out) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Some(r) = line.strip_prefix(REPLY_PREFIX)
                        && tx.send(r.to_string()).is_err()
                    {
                        return;
                    }
                }
            });
        }
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut v) = sink.lock() {
                        // Keep the tail only.
                        v.extend_from_slice(&buf[..n]);
                        let excess = v.len().saturating_sub(16 * 1024);
                        v.drain(..excess);
                    }
                }
            });
        }
        Ok(Agent { child, stdin, replies, stderr })
    }

    /// The process id of the spawned command (for `usernet run`, usernet itself).
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends one request and waits at most `limit` for the reply.
    pub fn call(&mut self, request: &Request, limit: Duration) -> Result<Reply, String> {
        let line = serde_json::to_string(request).map_err(|e| e.to_string())?;
        let stdin = self.stdin.as_mut().ok_or("agent stdin closed")?;
        if let Err(e) = writeln!(stdin, "{line}").and_then(|_| stdin.flush()) {
            return Err(format!("agent gone ({e}): {}", self.last_stderr()));
        }
        let deadline = Instant::now() + limit;
        loop {
            if super::interrupted() {
                return Err("interrupted".into());
            }
            match self.replies.recv_timeout(Duration::from_millis(100)) {
                Ok(text) => {
                    return match serde_json::from_str::<Reply>(&text) {
                        Ok(Reply::Error(e)) => Err(e),
                        Ok(r) => Ok(r),
                        Err(e) => Err(format!("unreadable agent reply: {e}")),
                    };
                }
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => return Err(format!("no reply within {} s", limit.as_secs())),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten().map(|s| format!(" ({s})")).unwrap_or_default();
                    return Err(format!("agent exited{status}: {}", self.last_stderr()));
                }
            }
        }
    }

    /// The last non-empty line the agent (or its wrapper) wrote on stderr.
    fn last_stderr(&self) -> String {
        // Give the stderr reader a moment to catch up with a dying process.
        std::thread::sleep(Duration::from_millis(100));
        let text = self.stderr.lock().map(|v| String::from_utf8_lossy(&v).into_owned()).unwrap_or_default();
        text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output").trim().to_string()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        // EOF on stdin stops the agent; `usernet run` then exits with it.
        if let Some(mut stdin) = self.stdin.take() {
            let _ = writeln!(stdin, "{}", serde_json::json!({"do": "quit"}));
        }
        let wait = |child: &mut Child, limit: Duration| {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        };
        if wait(&mut self.child, Duration::from_secs(5)) {
            return;
        }
        // SIGTERM first: `usernet run` forwards it to COMMAND and cleans up its namespace.
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        if !wait(&mut self.child, Duration::from_secs(2)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip_as_json() {
        let r = Request::Stream { addr: "192.0.2.1:5".parse().unwrap(), secs: 1.5, streams: 4, congestion: None };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"do\":\"stream\""), "{text}");
        assert!(matches!(serde_json::from_str::<Request>(&text).unwrap(), Request::Stream { streams: 4, .. }));
        let quit: Request = serde_json::from_str(r#"{"do":"quit"}"#).unwrap();
        assert!(matches!(quit, Request::Quit));
        let reply = Reply::Opened { count: 3, secs: 0.5, error: None };
        let back: Reply = serde_json::from_str(&serde_json::to_string(&reply).unwrap()).unwrap();
        assert!(matches!(back, Reply::Opened { count: 3, .. }));
    }

    #[test]
    fn agent_state_serves_and_holds() {
        let mut state = AgentState::default();
        let hold = Server::start(Kind::Hold, "127.0.0.1:0".parse().unwrap()).unwrap();
        match state.handle(Request::Open { addr: hold.addr, count: 20, secs: 5.0 }) {
            Reply::Opened { count, error, .. } => assert_eq!((count, error), (20, None)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(state.handle(Request::Close), Reply::Done));
        assert!(state.held.is_empty());
    }

    /// `serve_crr` on port 0 says which port it took, and that port serves connections.
    #[test]
    fn serve_crr_tells_its_port() {
        let mut state = AgentState::default();
        let Reply::Listening { port } = state.handle(Request::ServeCrr { addr: "127.0.0.1:0".parse().unwrap() }) else {
            panic!("no port");
        };
        assert_ne!(port, 0);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        match state.handle(Request::Crr { addr, secs: 0.2 }) {
            Reply::Crr { per_sec } => assert!(per_sec > 0.0),
            other => panic!("{other:?}"),
        }
    }
}
