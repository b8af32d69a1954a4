//! Round trips measured by sockperf, an independent ping-pong tool, over TCP and UDP.
//!
//! The rr test's client and server are this benchmark's own code; sockperf is someone else's,
//! so a tool cannot be tuned to the benchmark's client alone. As in the rr test, the server
//! runs on the host (`sockperf server`, started by the driver) and the client inside the
//! namespace (`sockperf ping-pong --full-rtt`, run by the agent), so every round trip crosses
//! the tool under test twice. sockperf sends 14-byte messages, warms up for 400 ms and
//! then times each message's round trip; the rows are its median.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The program, looked up in PATH.
const PROGRAM: &str = "sockperf";
/// How long a server may take to bind its port.
const START_PATIENCE: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Tcp, Proto::Udp];

    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        }
    }

    fn args(self) -> &'static [&'static str] {
        match self {
            Proto::Tcp => &["--tcp"],
            Proto::Udp => &[],
        }
    }
}

/// What one `sockperf ping-pong --full-rtt` run reported, in microseconds of round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub observations: u64,
    pub mean_us: f64,
    pub median_us: f64,
    pub p99_us: f64,
    pub dropped: u64,
}

/// Whether sockperf can be run here.
pub fn available() -> bool {
    Command::new(PROGRAM)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `sockperf server` on the host, stopped when dropped.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
}

impl Server {
    /// Starts a server on `ip` and a port free for both protocols, and waits until it has
    /// bound it.
    pub fn start(ip: IpAddr, proto: Proto) -> anyhow::Result<Server> {
        let port = free_port(ip)?;
        let addr = SocketAddr::new(ip, port);
        let child = Command::new(PROGRAM)
            .arg("server")
            .args(proto.args())
            .args(["-i", &ip.to_string(), "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("start {PROGRAM} server"))?;
        let mut server = Server { child, addr };
        let deadline = Instant::now() + START_PATIENCE;
        // Bound once our own bind of the same port is refused as taken.
        let taken = |e: std::io::Error| e.kind() == std::io::ErrorKind::AddrInUse;
        loop {
            let bound = match proto {
                Proto::Tcp => TcpListener::bind(addr).map(drop).err().is_some_and(taken),
                Proto::Udp => UdpSocket::bind(addr).map(drop).err().is_some_and(taken),
            };
            if bound {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = server.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                anyhow::bail!("{PROGRAM} server exited ({status}): {}", err.trim());
            }
            if Instant::now() > deadline {
                anyhow::bail!("{PROGRAM} server did not bind {addr} within {} s", START_PATIENCE.as_secs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port of `ip` that neither protocol has bound (the kernel's pick for TCP, checked for UDP).
fn free_port(ip: IpAddr) -> anyhow::Result<u16> {
    for _ in 0..20 {
        let port = TcpListener::bind((ip, 0)).context("bind a TCP port")?.local_addr()?.port();
        if UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no port of {ip} free for both TCP and UDP")
}

/// The client half, run by the agent: `secs` seconds of ping-pong with the server at `addr`.
pub fn ping_pong(addr: SocketAddr, proto: Proto, secs: u32) -> anyhow::Result<Stats> {
    let out = Command::new(PROGRAM)
        .arg("ping-pong")
        .args(proto.args())
        .args(["--full-rtt", "-i", &addr.ip().to_string(), "-p", &addr.port().to_string()])
        .args(["-t", &secs.clamp(1, 600).to_string()])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {PROGRAM} ping-pong"))?;
    // sockperf writes its report to stdout, and some versions part of it to stderr.
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    parse(&text).ok_or_else(|| {
        let last = text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
        anyhow::anyhow!("{PROGRAM} ping-pong to {addr} ({}): {}", out.status, last.trim())
    })
}

/// Reads the report of `sockperf ping-pong --full-rtt`; None unless it has every figure.
pub fn parse(text: &str) -> Option<Stats> {
    let mut observations = None;
    let mut mean_us = None;
    let mut median_us = None;
    let mut p99_us = None;
    let mut dropped = None;
    for line in text.lines() {
        let line = strip_escapes(line);
        if let Some(rest) = after(&line, "avg-rtt=") {
            mean_us = number(rest);
        } else if let Some(rest) = after(&line, "percentile 50.000 =") {
            median_us = number(rest);
        } else if let Some(rest) = after(&line, "percentile 99.000 =") {
            p99_us = number(rest);
        } else if let Some(rest) = after(&line, "Total ") {
            if rest.split_whitespace().nth(1) == Some("observations;") {
                observations = number(rest);
            }
        } else if let Some(rest) = after(&line, "# dropped messages =") {
            dropped = number(rest);
        }
    }
    let count = observations? as u64;
    (count > 0).then_some(Stats {
        observations: count,
        mean_us: mean_us?,
        median_us: median_us?,
        p99_us: p99_us?,
        dropped: dropped? as u64,
    })
}

/// The text after the first `key` in `line`.
fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.find(key).map(|i| &line[i + key.len()..])
}

/// The number at the start of `text` (after blanks), ended by anything not part of it.
fn number(text: &str) -> Option<f64> {
    let text = text.trim_start();
    let end = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    text[..end].parse().ok().filter(|v: &f64| v.is_finite())
}

/// `line` without ANSI colour sequences (ESC [ ... m), which sockperf puts around some figures.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report as sockperf 3.7 prints it (colour sequences included).
    const REPORT: &str = "sockperf: == version #3.7-no.git ==
sockperf[CLIENT] send on:sockperf: using recvfrom() to block on socket(s)

[ 0] IP = 127.0.0.1       PORT = 11111 # TCP
sockperf: Warmup stage (sending a few dummy messages)...
sockperf: Starting test...
sockperf: Test end (interrupted by timer)
sockperf: Test ended
sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; SentMessages=8628; ReceivedMessages=8627
sockperf: ========= Printing statistics for Server No: 0
sockperf: [Valid Duration] RunTime=0.554 sec; SentMessages=2436; ReceivedMessages=2436
sockperf: \u{1b}[2;35m====> avg-rtt=227.218 (std-dev=509.740)\u{1b}[0m
sockperf: # dropped messages = 3; # duplicated messages = 0; # out-of-order messages = 0
sockperf: Summary: Round trip is 227.218 usec
sockperf: \u{1b}[2;35mTotal 2436 observations\u{1b}[0m; each percentile contains 24.36 observations
sockperf: ---> <MAX> observation = 10310.668
sockperf: ---> percentile 99.999 = 10310.668
sockperf: ---> percentile 99.990 = 10310.668
sockperf: ---> percentile 99.900 = 5667.528
sockperf: ---> percentile 99.000 = 1615.465
sockperf: ---> percentile 90.000 =  737.606
sockperf: ---> percentile 75.000 =  186.728
sockperf: ---> percentile 50.000 =    9.572
sockperf: ---> percentile 25.000 =    8.960
sockperf: ---> <MIN> observation =    6.027
";

    #[test]
    fn reads_the_report() {
        let s = parse(REPORT).unwrap();
        assert_eq!(s, Stats { observations: 2436, mean_us: 227.218, median_us: 9.572, p99_us: 1615.465, dropped: 3 });
    }

    #[test]
    fn a_report_without_answers_or_cut_short_is_none() {
        let none = "sockperf: Test ended\nsockperf: No messages were received from the server. Is the server down?\n";
        assert_eq!(parse(none), None);
        assert_eq!(parse(""), None);
        // Cut anywhere before the median: no figure is made up.
        let at = REPORT.find("percentile 50.000").unwrap();
        for cut in [at, at + 20, REPORT.find("avg-rtt").unwrap()] {
            assert_eq!(parse(&REPORT[..cut]), None, "cut at {cut}");
        }
        assert_eq!(parse(&REPORT.replace("2436 observations", "0 observations")), None);
        assert_eq!(parse(&REPORT.replace("=    9.572", "= nan")), None);
    }

    #[test]
    fn numbers_and_escapes() {
        assert_eq!(number("  12.5 (x)"), Some(12.5));
        assert_eq!(number("7\u{1b}[0m"), Some(7.0));
        assert_eq!(number("x"), None);
        assert_eq!(number(""), None);
        assert_eq!(strip_escapes("a\u{1b}[2;35mb\u{1b}[0mc"), "abc");
        assert_eq!(strip_escapes("cut\u{1b}[2;3"), "cut");
    }

    /// Both protocols against a real server on loopback.
    #[test]
    #[ignore = "needs sockperf (.ci/run installs it)"]
    fn ping_pong_on_loopback() {
        assert!(available(), "{PROGRAM} is not installed (Debian: apt-get install sockperf)");
        for proto in Proto::ALL {
            let server = Server::start(IpAddr::from([127, 0, 0, 1]), proto).unwrap();
            let s = ping_pong(server.addr, proto, 1).unwrap();
            assert!(s.observations > 0 && s.median_us > 0.0, "{proto:?}: {s:?}");
        }
        let closed = free_port(IpAddr::from([127, 0, 0, 1])).unwrap();
        let err = ping_pong(SocketAddr::from(([127, 0, 0, 1], closed)), Proto::Tcp, 1).unwrap_err();
        assert!(err.to_string().contains(PROGRAM), "{err:#}");
    }
}
