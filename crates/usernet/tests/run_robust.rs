//! `usernet run` under bad or hostile conditions, with real programs on both sides.
//!
//! - A SYN flood from the guest to an address that never answers (a remote host whose
//!   namespace drops SYNs with nftables) does not starve a real connection, the gateway
//!   still answers, no flooded connect is ever "completed" falsely, and usernet exits cleanly.
//! - 10,000 idle guest connections to the host all get established; usernet's resident
//!   memory grows by at most [`IDLE_RSS_BOUND`]; closing them all drains the host side,
//!   and data flows on a new connection afterwards.
//! - A peer that vanishes (SIGKILL) mid-transfer, on the host or in the guest behind `-p`,
//!   gives the other end an EOF or a reset, never a hang.
//! - TCP keep-alive probes are answered; an idle connection without keep-alive survives
//!   35 s (no idle expiry).
//! - Half-close both ways through a published port.
//! - A published port at usernet's open-file limit: clients wait in the backlog and are
//!   served once descriptors free up; none is lost.
//! - UDP to a port nobody listens on gives the guest ICMP port unreachable.
//! - A DNS upstream that never answers gives SERVFAIL in bounded time while built-in
//!   names still answer.
//! - Data the command sent just before it exited reaches the host whole (an upload to a slow
//!   reader, a download through a published port by a slow client); a transfer the host's
//!   side stops reading is reset once the drain gives up, not ended as if it were whole.
//!
//! - A guest whose TCP frames are reordered on the way (htb and nftables on its eth0) uploads
//!   50 MB whole (sha256) without stalling: segments after a gap are kept.
//!
//! Clients and servers are tests/helpers/robust.py (no name lookups, every loop bounded),
//! curl, socat, dig and ping. Traffic goes only to loopback and to the test's own
//! namespace. The two heaviest tests (flood, 10,000 connections) take [`heavy`] so that
//! they never run at the same time.

mod common;

use common::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How much usernet's VmRSS may grow while it holds 10,000 idle connections.
const IDLE_RSS_BOUND: u64 = 64 << 20;
/// Idle connections opened by the guest in [`ten_thousand_idle_connections`].
const IDLE_CONNS: usize = 10_000;
/// Connects of the SYN flood.
const FLOOD_CONNECTS: usize = 3000;

// ---------------------------------------------------------------------------
// Helpers of this file.

/// tests/helpers/robust.py.
fn robust_py() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/robust.py")
}

/// `python3 robust.py ARGS` as one shell command line (every part is a plain path or word).
fn robust_sh(args: &str) -> String {
    format!("{} {} {args}", python().display(), robust_py().display())
}

/// Serialises the heaviest tests of this file.
fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A robust.py helper on the host, in the background.
fn helper(args: &[&str]) -> Background {
    let mut c = Command::new(python());
    c.arg(robust_py()).args(args).env("PATH", search_path());
    Background::start(c, Stdio::piped())
}

/// `usernet run ARGS -- sh -c SCRIPT` in the background.
fn usernet_bg(dns_args: Usernet, script: &str) -> Background {
    Background::start(dns_args.command(&["sh", "-c", script]), Stdio::piped())
}

/// VmRSS of a process, in bytes.
fn vm_rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Makes sure that this process's hard RLIMIT_NOFILE (inherited by usernet, the guest and
/// the helper servers, which raise their soft limit to it) is at least `want`, raising it
/// if need be (root may). Panics, saying why, if it cannot: the test cannot run.
fn require_descriptors(want: u64) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is valid for writes.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    assert!(got == 0, "this test cannot run: getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error());
    if lim.rlim_max >= want {
        return;
    }
    let raised = libc::rlimit { rlim_cur: lim.rlim_cur, rlim_max: want };
    // SAFETY: raised is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return;
    }
    panic!(
        "this test cannot run: hard RLIMIT_NOFILE is {} and cannot be raised to {want}: {}",
        lim.rlim_max,
        std::io::Error::last_os_error()
    );
}

/// The answer (status line, headers and body) of the control API at `socket` to `GET path`,
/// or what went wrong; bounded by 5 s.
fn api_get(socket: &Path, path: &str) -> String {
    let mut s = match std::os::unix::net::UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) => return format!("connect: {e}"),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if let Err(e) = s.write_all(format!("GET {path} HTTP/1.1\r\nHost: usernet\r\nConnection: close\r\n\r\n").as_bytes())
    {
        return format!("send: {e}");
    }
    let mut answer = String::new();
    match s.read_to_string(&mut answer) {
        Ok(_) => answer,
        Err(e) => format!("read: {e} after {answer:?}"),
    }
}

/// Established TCP connections on the host whose local port is `port` (server side).
fn established_on(port: u16) -> usize {
    let out = sh(&format!("ss -Htn state established '( sport = :{port} )' | wc -l"));
    out.assert_ok();
    out.stdout.trim().parse().unwrap_or(0)
}

/// The number after `key=` in `s` (e.g. `curl=18`), if any.
fn value_of(s: &str, key: &str) -> Option<i64> {
    let pat = format!("{key}=");
    let at = s.find(&pat)? + pat.len();
    let digits: String = s[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '-').collect();
    digits.parse().ok()
}

/// dig's `;; Query time: N msec`, if present.
fn dig_query_ms(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.trim().strip_prefix(";; Query time:"))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
}

/// A remote host whose namespace drops every TCP SYN to port 9 (and counts them in
/// `nft list chain inet t in`): a connect there never gets an answer.
fn silent_remote() -> RemoteHost {
    let remote = RemoteHost::new();
    remote
        .exec(&[
            "sh",
            "-c",
            "nft add table inet t && \
             nft add chain inet t in '{ type filter hook input priority 0; }' && \
             nft add rule inet t in tcp dport 9 counter drop",
        ])
        .assert_ok();
    remote
}

/// How a host-side reader's connection ended.
#[derive(Debug)]
enum Ending {
    Eof(u64),
    Error(ErrorKind, u64),
    Hung(u64),
}

/// Reads `s` until EOF or an error, each read bounded by 20 s and the whole by 60 s.
fn read_until_end(mut s: TcpStream) -> Ending {
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let end = Instant::now() + Duration::from_secs(60);
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    while Instant::now() < end {
        match s.read(&mut buf) {
            Ok(0) => return Ending::Eof(total),
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return Ending::Hung(total),
            Err(e) => return Ending::Error(e.kind(), total),
        }
    }
    Ending::Hung(total)
}

// ---------------------------------------------------------------------------
// Tests.

/// The guest opens 3000 connects to a port whose SYNs are dropped and keeps them pending;
/// meanwhile a download from the host's loopback by name works and its hash matches, the
/// gateway answers ping, none of the flooded connects ever completes, and usernet exits
/// cleanly when the guest closes everything.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn syn_flood_does_not_starve_real_connections() {
    require(&["ip", "dnsmasq", "python3", "curl", "nft", "ping", "sha256sum"]);
    let _heavy = heavy();
    let dns = DnsUpstream::start();
    let remote = silent_remote();
    let (dir, http, want) = serve_random_file("flood", "f", 4 << 20);
    let d = dir.path().display();
    let ping = ping_cmd();
    let script = format!(
        "{flood} > {d}/flood.out 2>&1 & fp=$!; \
         i=0; while ! grep -q OPENED {d}/flood.out; do \
           i=$((i+1)); [ $i -gt 1200 ] && {{ echo flood-not-open; cat {d}/flood.out; exit 9; }}; sleep 0.05; done; \
         sleep 1; \
         t0=$(date +%s%N); \
         timeout 30 curl -sS --max-time 20 -o {d}/got http://host.docker.internal:{p}/f; echo curl=$?; \
         echo curl-ms=$(( ($(date +%s%N) - t0) / 1000000 )); \
         sha256sum {d}/got; \
         timeout 20 {ping} -c 3 -W 5 {GATEWAY_IP}; echo ping=$?; \
         touch {d}/done; wait $fp; echo flood=$?; cat {d}/flood.out",
        flood = robust_sh(&format!("synflood {} 9 {FLOOD_CONNECTS} {d}/done", remote.ip)),
        p = http.port,
    );
    let out = Usernet::new(&dns).timeout(Duration::from_secs(150)).sh(&script);
    eprintln!("{out}");
    // usernet exits cleanly, with the guest's status, once the guest closed everything.
    out.assert_ok();
    assert!(out.stdout.contains(&format!("OPENED {FLOOD_CONNECTS}")), "{out}");
    assert_eq!(value_of(&out.stdout, "curl"), Some(0), "download during the flood failed:\n{out}");
    assert_eq!(hex_hashes(&out.stdout), vec![want], "download corrupted:\n{out}");
    assert_eq!(value_of(&out.stdout, "ping"), Some(0), "gateway unresponsive during the flood:\n{out}");
    assert_eq!(value_of(&out.stdout, "flood"), Some(0), "{out}");
    // Nothing answers port 9 there: a "connected" socket would be a SYN-ACK usernet made up.
    assert_eq!(value_of(&out.stdout, "connected"), Some(0), "a flooded connect completed:\n{out}");
    assert!(out.stdout.contains("CLOSED"), "{out}");
    // The SYNs really reached the remote host and were dropped there.
    let rules = remote.exec(&["nft", "list", "chain", "inet", "t", "in"]);
    let dropped = value_of(&rules.stdout.replace("packets ", "packets="), "packets").unwrap_or(0);
    eprintln!("SYNs dropped at the remote host: {dropped}");
    assert!(dropped >= 1000, "only {dropped} SYNs reached the remote host:\n{rules}\n{out}");
}

/// 10,000 idle connections from the guest to a host server: all established, usernet's
/// VmRSS grows by at most [`IDLE_RSS_BOUND`]; after the guest closes them, the host side
/// drains and a new connection moves data.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ten_thousand_idle_connections() {
    require(&["ip", "dnsmasq", "python3", "ss", "sha256sum"]);
    require_descriptors(IDLE_CONNS as u64 + 1000);
    let _heavy = heavy();
    let dns = DnsUpstream::start();
    let mut hold = helper(&["hold-server"]);
    let port = hold.port();
    let sink = Server::start(ServerKind::Sink, None);
    let dir = TempDir::new("idle10k");
    let go = dir.join("go");
    let close = dir.join("close");
    let script = format!(
        "ulimit -n $(ulimit -Hn); echo STARTED; exec timeout 400 {}",
        robust_sh(&format!(
            "idle-clients {HOST_IP} {port} {IDLE_CONNS} {} {} {}",
            go.display(),
            close.display(),
            sink.port
        ))
    );
    let mut bg = usernet_bg(Usernet::new(&dns), &script);
    bg.wait_line("STARTED", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let pid = bg.pid();
    let before = vm_rss(pid);

    std::fs::write(&go, b"").expect("write go file");
    let line = bg.wait_line("CONNECTED ", Duration::from_secs(300));
    let n: usize = line["CONNECTED ".len()..].trim().parse().unwrap_or(0);
    assert_eq!(n, IDLE_CONNS, "guest connected only {n}:\n{}", bg.describe());
    let mut count = 0;
    let all = wait_until(Duration::from_secs(60), || {
        count = established_on(port);
        count >= IDLE_CONNS
    });
    assert!(all, "host server holds {count} established connections, not {IDLE_CONNS}:\n{}", bg.describe());
    // Let the engine settle, then measure.
    std::thread::sleep(Duration::from_secs(1));
    let after = vm_rss(pid);
    let grown = after.saturating_sub(before);
    eprintln!(
        "usernet VmRSS: {} KiB before, {} KiB with {IDLE_CONNS} connections (+{} KiB, {} bytes each)",
        before / 1024,
        after / 1024,
        grown / 1024,
        grown / IDLE_CONNS as u64
    );
    assert!(
        grown <= IDLE_RSS_BOUND,
        "usernet's VmRSS grew by {} KiB for {IDLE_CONNS} idle connections (bound {} KiB)",
        grown / 1024,
        IDLE_RSS_BOUND / 1024
    );

    std::fs::write(&close, b"").expect("write close file");
    bg.wait_line("CLOSED", Duration::from_secs(120));
    let sink_line = bg.wait_line("SINK ", Duration::from_secs(120));
    let want = format!("SINK {} {}", sha256_bytes(&vec![b'r'; 1 << 20]), 1 << 20);
    assert_eq!(sink_line, want, "new connection after closing:\n{}", bg.describe());
    let code = bg.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", bg.describe());
    // Every close reached the host: the server sees no connection left.
    let drained = wait_until(Duration::from_secs(60), || {
        count = established_on(port);
        count == 0
    });
    assert!(drained, "{count} host connections left after the guest closed all");
}

/// A host server killed (SIGKILL) mid-transfer: the guest's curl (its request was read,
/// so the server's kernel ends with a FIN) fails with an error, and a raw client (whose
/// bytes were never read, so the kernel resets) sees a reset or EOF. Neither hangs.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn host_server_killed_mid_transfer() {
    require(&["ip", "dnsmasq", "python3", "curl"]);
    let dns = DnsUpstream::start();
    let mut server = helper(&["stream-server"]);
    let port = server.port();
    let script = format!(
        "(timeout 90 curl -sS -o /dev/null http://host.docker.internal:{port}/big; echo curl=$?) & \
         (timeout 90 {}; echo raw=$?) & wait",
        robust_sh(&format!("vanish-client {HOST_IP} {port}"))
    );
    let mut bg = usernet_bg(Usernet::new(&dns), &script);
    server.wait_lines("STREAMING ", 2, Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(500));
    server.signal(libc::SIGKILL);
    assert!(server.wait_exit(Duration::from_secs(10)).is_some(), "server not killed");
    // Both clients must notice by themselves, well before their own 90 s timeouts.
    let code = bg.wait_exit(Duration::from_secs(60));
    let out = bg.stdout();
    eprintln!("{}", bg.describe());
    assert!(code.is_some(), "the guest's clients hang after the server died:\n{}", bg.describe());
    let curl = value_of(&out, "curl");
    // 0: it believed the transfer complete; 28 or 124: it timed out.
    assert!(
        matches!(curl, Some(c) if c != 0 && c != 28 && c != 124),
        "curl should fail with an error (18: partial transfer):\n{}",
        bg.describe()
    );
    assert!(
        out.lines().any(|l| l.starts_with("ERROR ConnectionResetError") || l.starts_with("EOF ")),
        "the raw client should see a reset or EOF:\n{}",
        bg.describe()
    );
    assert_eq!(value_of(&out, "raw"), Some(0), "{}", bg.describe());
}

/// The raw client of [`host_server_killed_mid_transfer`] had bytes the server never read:
/// the server's kernel answers the close with a RST, and the guest must see that reset
/// (not a plain EOF, which would claim the stream ended normally).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn host_reset_after_kill_reaches_guest_as_reset() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let mut server = helper(&["stream-server"]);
    let port = server.port();
    let script = format!("timeout 90 {}; echo raw=$?", robust_sh(&format!("vanish-client {HOST_IP} {port}")));
    let mut bg = usernet_bg(Usernet::new(&dns), &script);
    server.wait_line("STREAMING RAW", Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(300));
    server.signal(libc::SIGKILL);
    let code = bg.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", bg.describe());
    assert!(
        bg.stdout().lines().any(|l| l.starts_with("ERROR ConnectionResetError")),
        "expected a reset:\n{}",
        bg.describe()
    );
}

/// A guest server behind `-p` killed (SIGKILL) mid-transfer: both host clients (one whose
/// bytes the server read, one whose bytes it never read) see EOF or a reset, not a hang.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_server_killed_mid_transfer() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let p = free_port();
    let script = format!("{} & wait; echo SERVER-GONE; sleep 60", robust_sh("stream-guest-server 80"));
    let mut bg = usernet_bg(Usernet::new(&dns).arg("-p").arg(format!("127.0.0.1:{p}:80")), &script);
    let ready_line = bg.wait_line("READY ", Duration::from_secs(20));
    let guest_pid: i32 = ready_line["READY ".len()..].trim().parse().expect("guest server pid");
    let addr = format!("127.0.0.1:{p}");
    let mut readers = Vec::new();
    for i in 0..2 {
        let mut c = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}\n{}", bg.describe()));
        c.write_all(b"hello\n").expect("send hello");
        readers.push(std::thread::spawn(move || (i, read_until_end(c))));
        // One at a time: the guest must have accepted the first before the second arrives.
        std::thread::sleep(Duration::from_millis(300));
    }
    bg.wait_line("STREAMING 2", Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(500));
    let cmdline = std::fs::read(format!("/proc/{guest_pid}/cmdline")).unwrap_or_default();
    assert!(String::from_utf8_lossy(&cmdline).contains("stream-guest-server"), "pid {guest_pid} is not the server");
    // SAFETY: kill(2) of the guest's server, a descendant of our usernet (no PID namespace).
    unsafe {
        libc::kill(guest_pid, libc::SIGKILL);
    }
    bg.wait_line("SERVER-GONE", Duration::from_secs(10));
    for r in readers {
        let (i, ending) = r.join().expect("reader thread");
        eprintln!("host client {i}: {ending:?}");
        match ending {
            Ending::Eof(n) | Ending::Error(ErrorKind::ConnectionReset, n) => {
                assert!(n > 0, "client {i} got no data at all:\n{}", bg.describe())
            }
            Ending::Hung(n) => panic!("host client {i} hangs after {n} bytes: no EOF, no reset:\n{}", bg.describe()),
            other => panic!("host client {i} ended with {other:?}, expected EOF or reset:\n{}", bg.describe()),
        }
    }
}

/// A single connect to an address that never answers: usernet gives up on its host-side
/// connect after its connect timeout (30 s) and resets the guest, long before the guest's
/// own SYN retries (about 127 s) would end.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn connect_to_silent_host_is_reset_in_bounded_time() {
    require(&["ip", "dnsmasq", "python3", "nft"]);
    let dns = DnsUpstream::start();
    let remote = silent_remote();
    let out = Usernet::new(&dns)
        .timeout(Duration::from_secs(120))
        .sh(&format!("timeout 100 {}", robust_sh(&format!("connect-wait {} 9", remote.ip))));
    eprintln!("{out}");
    out.assert_ok();
    assert!(out.stdout.contains("REFUSED"), "the guest's connect should be reset:\n{out}");
}

/// The guest's client is killed (SIGKILL) while downloading from a host server: the
/// server's sends fail (reset or broken pipe) while usernet still runs; it is not left
/// blocked on a connection nobody reads.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_client_killed_mid_download() {
    require(&["ip", "dnsmasq", "python3", "curl"]);
    let dns = DnsUpstream::start();
    let mut server = helper(&["stream-server"]);
    let port = server.port();
    let script = format!(
        "curl -sS --max-time 60 -o /dev/null http://{HOST_IP}:{port}/big & echo CURL $!; wait; \
         echo CURL-GONE; sleep 60"
    );
    let mut bg = usernet_bg(Usernet::new(&dns), &script);
    let line = bg.wait_line("CURL ", Duration::from_secs(20));
    let curl_pid: i32 = line["CURL ".len()..].trim().parse().expect("curl pid");
    server.wait_line("STREAMING GET", Duration::from_secs(30));
    let cmdline = std::fs::read(format!("/proc/{curl_pid}/cmdline")).unwrap_or_default();
    assert!(String::from_utf8_lossy(&cmdline).starts_with("curl"), "pid {curl_pid} is not the guest's curl");
    // SAFETY: kill(2) of the guest's curl, a descendant of our usernet (no PID namespace).
    unsafe {
        libc::kill(curl_pid, libc::SIGKILL);
    }
    bg.wait_line("CURL-GONE", Duration::from_secs(10));
    let ended = server.wait_line("ENDED ", Duration::from_secs(20));
    assert!(bg.wait_exit(Duration::ZERO).is_none(), "usernet exited early:\n{}", bg.describe());
    assert!(
        ended.contains("ConnectionResetError") || ended.contains("BrokenPipeError"),
        "server's send ended with {ended:?}"
    );
}

/// Host clients of a published port vanish mid-transfer (closed with unread data, so
/// their kernel resets): the guest server's sends fail instead of blocking forever.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn host_client_vanishes_from_published_port() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let p = free_port();
    let script = format!("timeout 90 {}; echo SERVER-DONE=$?", robust_sh("stream-guest-server 80"));
    let mut bg = usernet_bg(Usernet::new(&dns).arg("-p").arg(format!("127.0.0.1:{p}:80")), &script);
    bg.wait_line("READY ", Duration::from_secs(20));
    let addr = format!("127.0.0.1:{p}");
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        c.write_all(b"hello\n").expect("send hello");
        clients.push(c);
        std::thread::sleep(Duration::from_millis(300));
    }
    // Read a little from each so that data is in flight, then vanish.
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let mut buf = vec![0u8; 1 << 16];
        c.read_exact(&mut buf).unwrap_or_else(|e| panic!("read: {e}\n{}", bg.describe()));
    }
    bg.wait_line("STREAMING 2", Duration::from_secs(30));
    drop(clients);
    bg.wait_lines("ENDED ", 2, Duration::from_secs(30));
    assert_eq!(bg.wait_exit(Duration::from_secs(30)), Some(0), "{}", bg.describe());
    assert!(bg.stdout().contains("SERVER-DONE=0"), "{}", bg.describe());
    for l in bg.lines_with("ENDED ") {
        assert!(l.contains("ConnectionResetError") || l.contains("BrokenPipeError"), "{}", bg.describe());
    }
}

/// usernet's open-file limit (RLIMIT_NOFILE) at 128 and 100 loopback clients of a published
/// port, each holding its connection open: none is lost, and the control API still answers.
/// Past the ceiling of guest flows (the limit less `--fd-reserve`, here half of it) a
/// loopback client goes through the guest link, one descriptor each, rather than be
/// spliced, five more each; the last descriptors are kept for the API and the services, so
/// the rest wait in the listener's backlog, and are served as soon as 70 clients close (the
/// listener is watched again every 100 ms, with no new client to wake it). Each shortage is
/// logged once, not at every retry.
///
/// Before, only 17 of the 100 were served at first (every one spliced), 4 to 6 of the rest
/// were reset when their pipes could not be made, the retry logged a warning every 100 ms,
/// and the API, out of descriptors, answered nothing (and logged every 50 ms).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn published_port_at_the_open_file_limit_loses_nothing() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let p = free_port();
    let dir = TempDir::new("nofile");
    let api = dir.join("api.sock");
    let go = dir.join("go");
    let script = format!("exec timeout 120 {}", robust_sh("echo-server 80"));
    let mut cmd = Usernet::new(&dns)
        .arg("-p")
        .arg(format!("127.0.0.1:{p}:80"))
        .arg("--api")
        .arg(&api)
        .command(&["sh", "-c", &script]);
    with_open_file_limit(&mut cmd, 128);
    let mut bg = Background::start(cmd, Stdio::piped());
    bg.wait_line("READY", Duration::from_secs(20));
    let mut clients = helper(&["published-clients", &p.to_string(), "100", "30", &go.to_string_lossy()]);
    let served = clients.wait_line("SERVED ", Duration::from_secs(60));
    // The clients hold every connection: the API still answers.
    let stats = api_get(&api, "/v1/stats");
    std::fs::write(&go, b"").expect("write go file");
    assert!(
        stats.starts_with("HTTP/1.1 200"),
        "the API, with every other descriptor taken: {stats:?}\n{}",
        bg.describe()
    );
    let after = clients.wait_line("AFTER ", Duration::from_secs(60));
    let served: usize = served["SERVED ".len()..].trim().parse().unwrap_or(0);
    eprintln!("with 128 descriptors: {served} of 100 clients served at once; then {after}");
    let log = bg.stderr();
    // About 40 descriptors are usernet's own; spliced only, 15 clients fitted.
    assert!(served >= 40, "only {served} of 100 clients served at once\n{}", bg.describe());
    assert_eq!(after, "AFTER answered=30 of=30 lost=0", "{}\n{}", clients.describe(), bg.describe());
    assert!(log.contains("limit=fd_reserve") && log.contains("loopback clients go through the guest link"), "{log}");
    assert!(log.contains("limit=open_files") && log.contains("the rest kept for the API and the services"), "{log}");
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(warnings <= 6, "{warnings} warnings for two shortages:\n{log}");
    assert!(!log.contains("cannot splice"), "{log}");
}

/// More UDP flows than usernet keeps (4096): the newest still exchange datagrams, the
/// oldest (evicted) comes back when it sends again, and a new flow works.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_flows_beyond_the_cap() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let echo = Server::start(ServerKind::UdpEcho, None);
    let out = Usernet::new(&dns).timeout(Duration::from_secs(90)).sh(&format!(
        "ulimit -n $(ulimit -Hn); timeout 80 {}",
        robust_sh(&format!("udp-many {HOST_IP} {} 5000", echo.port))
    ));
    eprintln!("{out}");
    out.assert_ok();
    assert!(out.stdout.contains("SENT 5000"), "{out}");
    assert!(out.stdout.contains("NEWEST-ANSWERED 10"), "{out}");
    assert!(out.stdout.contains("OLDEST-AGAIN ok"), "{out}");
    assert!(out.stdout.contains("FRESH ok"), "{out}");
}

/// A guest client with aggressive keep-alive (a probe after 1 s idle, every 1 s, dead
/// after 2 unanswered) stays idle 6 s and then sends: the probes were answered and the
/// data arrives.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn keepalive_probes_are_answered() {
    require(&["ip", "dnsmasq", "python3", "socat", "ss"]);
    let dns = DnsUpstream::start();
    let sink = Server::start(ServerKind::Sink, None);
    let p = sink.port;
    let out = Usernet::new(&dns).sh(&format!(
        "(sleep 6; echo late-data) | timeout 30 socat -t 10 - \
           TCP:host.docker.internal:{p},keepalive,keepidle=1,keepintvl=1,keepcnt=2 & s=$!; \
         sleep 3; ss -tno state established '( dport = :{p} )'; \
         wait $s; echo socat=$?"
    ));
    assert!(out.stdout.contains("keepalive"), "keep-alive not on in the guest:\n{out}");
    let want = format!("{} 10", sha256_bytes(b"late-data\n"));
    assert!(out.stdout.contains(&want), "data after the idle time lost:\n{out}");
    assert_eq!(value_of(&out.stdout, "socat"), Some(0), "{out}");
    out.assert_ok();
}

/// A connection idle for 35 s without keep-alive still carries data afterwards.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn idle_connection_survives_35_seconds() {
    require(&["ip", "dnsmasq", "python3", "socat"]);
    let dns = DnsUpstream::start();
    let sink = Server::start(ServerKind::Sink, None);
    let out = Usernet::new(&dns).timeout(Duration::from_secs(80)).sh(&format!(
        "(sleep 35; echo idle-data) | timeout 60 socat -t 10 - TCP:{HOST_IP}:{p}; echo socat=$?",
        p = sink.port
    ));
    let want = format!("{} 10", sha256_bytes(b"idle-data\n"));
    assert!(out.stdout.contains(&want), "data after 35 s idle lost:\n{out}");
    assert_eq!(value_of(&out.stdout, "socat"), Some(0), "{out}");
    out.assert_ok();
}

/// Through `-p`: the host client sends 5 MiB and shuts down its sending side; the guest
/// server reads to EOF and answers. Then the other way: the guest server sends 1 MiB and
/// shuts down; the host client reads to EOF and answers; the guest gets the answer.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn half_close_both_ways_through_published_port() {
    require(&["ip", "dnsmasq", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let p = free_port();
    let script = format!("exec timeout 90 {}", robust_sh("halfclose-server 80"));
    let mut bg = usernet_bg(Usernet::new(&dns).arg("-p").arg(format!("127.0.0.1:{p}:80")), &script);
    bg.wait_line("READY", Duration::from_secs(20));
    let addr = format!("127.0.0.1:{p}");

    // Host -> guest, then half-close; the answer comes back after our FIN.
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut c = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    c.set_write_timeout(Some(Duration::from_secs(30))).expect("timeout");
    c.write_all(&data).unwrap_or_else(|e| panic!("send: {e}\n{}", bg.describe()));
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let mut answer = String::new();
    c.read_to_string(&mut answer).unwrap_or_else(|e| panic!("read answer: {e}\n{}", bg.describe()));
    assert_eq!(answer.trim(), format!("{} {}", sha256_bytes(&data), data.len()), "{}", bg.describe());
    drop(c);

    // Guest -> host, guest half-closes; we answer after its FIN.
    let mut c = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut got = Vec::new();
    c.read_to_end(&mut got).unwrap_or_else(|e| panic!("read guest data: {e}\n{}", bg.describe()));
    assert_eq!(got.len(), 1 << 20, "{}", bg.describe());
    let reply = format!("{} {}\n", sha256_bytes(&got), got.len());
    c.write_all(reply.as_bytes()).unwrap_or_else(|e| panic!("send reply after guest FIN: {e}\n{}", bg.describe()));
    c.shutdown(Shutdown::Write).expect("shutdown write");
    let line = bg.wait_line("GOT ", Duration::from_secs(30));
    assert_eq!(line, format!("GOT {}", reply.trim()), "{}", bg.describe());
    assert_eq!(sha256_bytes(&got), sha256_bytes(&vec![b'g'; 1 << 20]));
    assert_eq!(bg.wait_exit(Duration::from_secs(30)), Some(0), "{}", bg.describe());
}

/// UDP to a port nobody listens on, on the host's loopback and on a remote host: the
/// guest's connected socket gets ECONNREFUSED (an ICMP port unreachable reached it).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_to_closed_port_is_refused() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let closed = free_port();
    let out = Usernet::new(&dns).sh(&format!(
        "echo host: $({}); echo remote: $({})",
        robust_sh(&format!("udp-refused {HOST_IP} {closed}")),
        robust_sh(&format!("udp-refused {} 9", remote.ip))
    ));
    out.assert_ok();
    assert!(out.stdout.contains("host: REFUSED"), "{out}");
    assert!(out.stdout.contains("remote: REFUSED"), "{out}");
}

/// The only DNS upstream reads queries and never answers: a forwarded name gets SERVFAIL
/// well before dig gives up (10 s), and a built-in name asked meanwhile answers while the
/// forwarded query is still pending.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn silent_dns_upstream_gives_servfail() {
    require(&["ip", "python3", "dig"]);
    let mut hole = helper(&["blackhole-dns"]);
    let port = hole.port();
    let dir = TempDir::new("dnshole");
    let d = dir.path().display();
    let out = Usernet::without_dns().arg("--dns-upstream").arg(format!("127.0.0.1:{port}")).sh(&format!(
        "(dig +tries=1 +time=10 name.test > {d}/slow 2>&1; echo slow-done >> {d}/order) & \
         sleep 0.3; \
         dig +tries=1 +time=5 host.docker.internal > {d}/fast 2>&1; echo fast=$? >> {d}/order; \
         wait; echo === slow; cat {d}/slow; echo === fast; cat {d}/fast; echo === order; cat {d}/order"
    ));
    eprintln!("{out}");
    out.assert_ok();
    let slow = std::fs::read_to_string(dir.join("slow")).unwrap_or_default();
    let fast = std::fs::read_to_string(dir.join("fast")).unwrap_or_default();
    let order = std::fs::read_to_string(dir.join("order")).unwrap_or_default();
    assert!(slow.contains("status: SERVFAIL"), "forwarded name:\n{out}");
    let ms = dig_query_ms(&slow).unwrap_or(u64::MAX);
    assert!(ms <= 8000, "SERVFAIL took {ms} ms:\n{out}");
    assert!(fast.contains("status: NOERROR") && fast.contains(HOST_IP), "built-in name:\n{out}");
    // The built-in name did not wait behind the stuck forward.
    assert_eq!(order.lines().collect::<Vec<_>>(), vec!["fast=0", "slow-done"], "{out}");
    assert!(!hole.lines_with("QUERY").is_empty(), "the query never reached the upstream");
}

// ---------------------------------------------------------------------------
// What the command sent just before it exited.

/// Bytes the guest's sender of [`drain_sender`] sends, random.
const DRAIN_BYTES: usize = 24 << 20;

/// A python program for the guest: connects to ADDR PORT (or, with `listen`, accepts one
/// client on PORT, after printing READY), sends [`DRAIN_BYTES`] random bytes, prints
/// `SENT <sha256>`, and exits at once: what the kernel has not sent yet is in its buffers.
fn drain_sender(how: &str, addr: &str, port: u16) -> Vec<String> {
    let script = r#"
import hashlib, os, socket, sys
how, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
data = os.urandom(int(sys.argv[4]))
if how == "listen":
    l = socket.socket()
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    l.bind(("0.0.0.0", port)); l.listen(1)
    print("READY", flush=True)
    s, _ = l.accept()
else:
    s = socket.create_connection((addr, port), timeout=30)
s.sendall(data)
s.close()
print("SENT", hashlib.sha256(data).hexdigest(), flush=True)
"#;
    ["python3", "-c", script, how, addr, &port.to_string(), &DRAIN_BYTES.to_string()].map(String::from).to_vec()
}

/// Reads `s` slowly (64 KiB, then a 1 ms pause) to its end: the bytes' sha256, how many,
/// and how the stream ended (None: end of stream).
fn read_slowly(mut s: TcpStream) -> (String, usize, Option<ErrorKind>) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (sha256_bytes(&got), got.len(), None),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return (sha256_bytes(&got), got.len(), Some(e.kind())),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The command uploads 24 MiB to a slow reader on the host's loopback and exits as soon as
/// its last write returns: usernet passes on what the guest's kernel still held (it
/// drains before it stops), so the reader gets every byte, then the end of stream.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn an_upload_the_command_finished_just_before_exiting_arrives_whole() {
    require(&["python3", "dnsmasq", "sha256sum"]);
    let dns = DnsUpstream::start();
    let port = free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the host's reader");
    let reader = std::thread::spawn(move || read_slowly(accept_within(&listener, Duration::from_secs(60))));
    let out = Usernet::new(&dns).run(&drain_sender("connect", HOST_IP, port));
    out.assert_ok();
    let sent = value_after(&out.stdout, "SENT ").unwrap_or_else(|| panic!("the sender did not finish:\n{out}"));
    let (hash, len, ended) = reader.join().expect("the reader");
    assert_eq!(ended, None, "the reader's stream ended with an error after {len} bytes:\n{out}");
    assert_eq!(len, DRAIN_BYTES, "the reader got {len} bytes of {DRAIN_BYTES}:\n{out}");
    assert_eq!(hash, sent, "the bytes differ:\n{out}");
}

/// The same through a published port: the command serves 24 MiB to one client and exits;
/// a slow client on the host's loopback (a spliced connection) gets all of it.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_download_the_command_served_just_before_exiting_arrives_whole() {
    require(&["python3", "dnsmasq", "sha256sum"]);
    let dns = DnsUpstream::start();
    let port = free_port();
    let mut bg = Background::start(
        Usernet::new(&dns).args(&["-p", &format!("127.0.0.1:{port}:8080")]).command(&drain_sender("listen", "", 8080)),
        Stdio::null(),
    );
    bg.wait_line("READY", Duration::from_secs(30));
    let client = TcpStream::connect(("127.0.0.1", port)).expect("connect to the published port");
    let (hash, len, ended) = read_slowly(client);
    assert_eq!(bg.wait_exit(Duration::from_secs(60)), Some(0), "{}", bg.describe());
    let sent = value_after(&bg.stdout(), "SENT ").unwrap_or_else(|| panic!("no SENT line:\n{}", bg.describe()));
    assert_eq!(ended, None, "the client's stream ended with an error after {len} bytes:\n{}", bg.describe());
    assert_eq!(len, DRAIN_BYTES, "the client got {len} bytes of {DRAIN_BYTES}:\n{}", bg.describe());
    assert_eq!(hash, sent, "the bytes differ:\n{}", bg.describe());
}

/// The host's reader takes nothing after the command exits: the guest's data cannot move,
/// so usernet stops draining after its idle bound (5 s) and resets the connection. The
/// reader, reading at last, gets an error, not an end of stream that would pass the cut
/// transfer for a whole one; and usernet exits with the command's status.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_transfer_the_drain_gives_up_on_is_reset_not_ended() {
    require(&["python3", "dnsmasq", "sha256sum"]);
    let dns = DnsUpstream::start();
    let port = free_port();
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).expect("bind the host's reader");
    // The sender's sendall blocks once every buffer is full; `timeout` kills it then, and
    // its kernel holds what it had not sent.
    let mut cmd = vec!["timeout".to_string(), "-s".into(), "KILL".into(), "3".into()];
    cmd.extend(drain_sender("connect", HOST_IP, port));
    let mut bg = Background::start(Usernet::new(&dns).command(&cmd), Stdio::null());
    let conn = accept_within(&listener, Duration::from_secs(60));
    let code = bg.wait_exit(Duration::from_secs(60));
    assert_eq!(code, Some(137), "usernet should exit with the killed command's status:\n{}", bg.describe());
    let (_, len, ended) = read_slowly(conn);
    assert!(len < DRAIN_BYTES, "the reader got everything; the test proves nothing:\n{}", bg.describe());
    assert_eq!(ended, Some(ErrorKind::ConnectionReset), "after {len} bytes:\n{}", bg.describe());
}

/// The first connection to `listener`; panics if none comes within `limit`.
fn accept_within(listener: &std::net::TcpListener, limit: Duration) -> TcpStream {
    listener.set_nonblocking(true).expect("non-blocking listener");
    let end = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).expect("blocking stream");
                return s;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < end => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("no connection to the host's reader: {e}"),
        }
    }
}

/// The text after `prefix` on the first line that starts with it.
fn value_after(out: &str, prefix: &str) -> Option<String> {
    out.lines().find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().to_string())
}

/// A tenth of the guest's TCP frames go out through a slower class of an htb discipline on
/// its eth0, about 2 ms late, so later frames overtake them: a 50 MB upload to the host
/// arrives whole, and does not stall. usernet keeps the segments that come after a gap
/// until it is filled (`flows/tcp/mod.rs`); when it dropped them, the guest (which has no
/// SACK with usernet) waited for its retransmission timer again and again, backing off: 5
/// of 5 such uploads had not finished after 100 s, where they now take under a second.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn an_upload_whose_frames_are_reordered_arrives_whole_without_stalling() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum", "tc", "nft"]);
    let (out, _dir) = upload_from_guest(
        "reorder-up",
        50 << 20,
        |_| Vec::new(),
        "tc qdisc add dev eth0 root handle 1: htb default 10 r2q 1000 && \
         tc class add dev eth0 parent 1: classid 1:10 htb rate 20gbit && \
         tc class add dev eth0 parent 1: classid 1:20 htb rate 300mbit && \
         nft add table inet reorder && \
         nft add chain inet reorder out '{ type filter hook output priority 0; }' && \
         nft add rule inet reorder out oifname eth0 meta l4proto tcp numgen random mod 100 '<' 10 \
           counter meta priority set 1:20",
        "nft list chain inet reorder out | grep -o 'counter packets [0-9]*' | sed 's/^/reordered /'",
    );
    let reordered = out.stdout.lines().find_map(|l| l.strip_prefix("reordered counter packets "));
    assert!(reordered.and_then(|n| n.trim().parse::<u64>().ok()).is_some_and(|n| n > 0), "{out}");
}

/// Three in a hundred of the guest's TCP frames are lost on its way out (one segment each,
/// `gso_max_segs` 1): nftables marks them, and a tc filter on eth0 redirects the marked ones
/// into a veth pair that nobody reads, so the guest's TCP believes them sent (a drop in the
/// output path itself is reported back to TCP, which only sends again: no loss at all). A
/// 20 MB upload at MTU 1500 arrives whole, and the guest recovers by SACK: usernet's
/// SYN-ACK offers it and its duplicate ACKs carry SACK blocks (`flows/tcp/mod.rs`), read
/// from `--pcap`; the guest's kernel entered SACK recovery and never saw usernet renege.
/// Without SACK from usernet such an upload took 5.5-7.5 s where it now takes 0.3 s, and
/// one in a few stalled for over 100 s on a retransmission timer that kept backing off.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn an_upload_that_loses_frames_recovers_by_sack() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum", "tc", "nft", "nstat", "tcpdump"]);
    // The tc filter is classic BPF: load skb->mark (SKF_AD_OFF + SKF_AD_MARK), match 0x5ac.
    let (out, dir) = upload_from_guest(
        "sack-up",
        20 << 20,
        |dir| vec!["--mtu".into(), "1500".into(), "--pcap".into(), dir.join("guest.pcap").into()],
        "ip link add lossA type veth peer name lossB && ip link set lossA up && ip link set lossB up && \
         ip link set dev eth0 gso_max_segs 1 && \
         tc qdisc add dev eth0 clsact && \
         tc filter add dev eth0 egress prio 1 protocol all \
           bpf bytecode '4,32 0 0 4294963220,21 0 1 1452,6 0 0 4294967295,6 0 0 0' \
           action mirred egress redirect dev lossA && \
         nft add table inet lossy && \
         nft add chain inet lossy out '{ type filter hook output priority 0; }' && \
         nft add rule inet lossy out oifname eth0 meta l4proto tcp 'tcp flags & syn == 0' \
           numgen random mod 100 '<' 3 counter meta mark set 0x5ac",
        "nstat -asz TcpExtTCPSackRecovery TcpExtTCPSACKReneging | sed -n 's/^TcpExt\\([A-Za-z]*\\) *\\([0-9]*\\).*/\\1 \\2/p'
         ip -s link show lossB | awk 'f { print \"lost\", $2; exit } /RX:/ { f = 1 }'",
    );
    let pcap = dir.join("guest.pcap");
    let sink_port = out.stdout.lines().find_map(|l| l.strip_prefix("sink-port ")).expect("the sink's port").to_string();
    let count = |key: &str| {
        out.stdout
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {key}: {out}"))
    };
    assert!(count("lost ") > 50, "frames were lost on the way: {out}");
    assert!(count("TCPSackRecovery ") > 0, "the guest recovered by SACK: {out}");
    assert_eq!(count("TCPSACKReneging "), 0, "usernet never dropped what it had listed: {out}");
    // usernet's side of the capture: a SYN-ACK that offers SACK, and ACKs with blocks.
    let dump = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .arg(format!("tcp and src host {HOST_IP} and src port {sink_port}"))
        .output()
        .expect("run tcpdump");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(
        text.lines().any(|l| l.contains("Flags [S.]") && l.contains("sackOK")),
        "no SYN-ACK with sackOK:\n{}",
        &text[..text.len().min(2000)]
    );
    let with_blocks = text
        .lines()
        .filter(|l| {
            l.contains("sack 1 {") || l.contains("sack 2 {") || l.contains("sack 3 {") || l.contains("sack 4 {")
        })
        .count();
    assert!(with_blocks > 0, "no ACK carried SACK blocks ({} lines)", text.lines().count());
}

/// Five in a hundred of the frames usernet sends the guest are lost (the guest's input
/// hook drops them; SYNs spared; each is a 64 KiB frame of the TAP's offloads, about 500
/// of them): a 32 MB download at MTU 1500 arrives whole (sha256), and usernet sent again
/// only what the guest's SACK blocks showed missing: its `/metrics` (read by the guest
/// over the API socket) count bytes resent for SACK blocks, and under a quarter of the
/// size resent in all. Before usernet read the guest's blocks, every loss resent
/// everything from the lost byte on (go-back-N): a 50 MB download resent 118 MB; and 200
/// downloads of 256 KiB with 2% of such loss took 4.8-5.6 s, 20 of them over 150 ms (a
/// lost last segment waited for the 200 ms timer), now 0.4-0.5 s, none over 150 ms.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_download_that_loses_frames_recovers_by_sack() {
    require(&["dnsmasq", "curl", "python3", "sha256sum", "nft"]);
    const SIZE: usize = 32 << 20;
    let (_files, http, want) = serve_random_file("sack-down-files", "d", SIZE);
    let out = downloads_losing_frames(
        "sack-down",
        &["--mtu", "1500"],
        "",
        &format!("timeout 100 curl -sS http://{HOST_IP}:{port}/d | sha256sum | sed 's/^/got /'", port = http.port),
    );
    assert!(out.stdout.lines().any(|l| l == format!("got {want}  -")), "the download is not whole: {out}");
    assert!(count(&out, "dropped ") >= 5.0, "frames were lost on the way: {out}");
    let resent = |cause: &str| count(&out, &format!("usernet_tcp_resent_bytes_total{{cause=\"{cause}\"}} "));
    assert!(resent("sack") > 0.0, "nothing was resent for SACK blocks: {out}");
    let all = resent("sack") + resent("probe") + resent("dup_acks") + resent("timeout");
    assert!(all < (SIZE / 4) as f64, "{all} bytes resent for a {SIZE}-byte download: {out}");
}

/// A guest without SACK (`net.ipv4.tcp_sack` 0, as some hardened images set it) loses five
/// in a hundred of the frames usernet sends it (the input hook, as above), over 100
/// downloads of 256 KiB (each about four 64 KiB frames): every download arrives whole
/// (sha256), and lost last frames, which bring no duplicate ACKs, were found by tail-loss
/// probes, whose one duplicate ACK names the first byte lost (the probe came behind all
/// that was sent): `/metrics` counts bytes resent for probes. Before such guests got
/// probes, each lost tail waited for the 200 ms retransmission timer: 200 downloads with
/// 2% loss took 4.3-8.9 s, 19-33 of them over 150 ms; now 0.5-0.7 s, none.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn downloads_to_a_guest_without_sack_find_lost_tails_by_probes() {
    require(&["dnsmasq", "curl", "python3", "sha256sum", "nft"]);
    const COUNT: usize = 100;
    let (_files, http, want) = serve_random_file("nosack-down-files", "d", 256 << 10);
    let out = downloads_losing_frames(
        "nosack-down",
        &[],
        "echo 0 > /proc/sys/net/ipv4/tcp_sack",
        &format!(
            "for i in $(seq {COUNT}); do timeout 20 curl -sS http://{HOST_IP}:{port}/d | sha256sum; done | \
               sort | uniq -c | sed 's/^ */sums /'",
            port = http.port
        ),
    );
    assert!(out.stdout.lines().any(|l| l == format!("sums {COUNT} {want}  -")), "not every download is whole: {out}");
    assert!(count(&out, "dropped ") >= 5.0, "frames were lost on the way: {out}");
    let resent = |cause: &str| count(&out, &format!("usernet_tcp_resent_bytes_total{{cause=\"{cause}\"}} "));
    assert_eq!(resent("sack"), 0.0, "SACK blocks from a guest without SACK: {out}");
    assert!(resent("probe") > 0.0, "no lost tail was found by a probe: {out}");
}

/// Runs `usernet run ARGS --api SOCKET` whose guest, after `setup` (if any), drops five
/// in a hundred of usernet's TCP frames to it in its input hook (SYNs spared), runs
/// `downloads`, and then prints `dropped N` (frames the hook dropped) and usernet's
/// `usernet_tcp_resent_bytes_total` counters (read over the API socket). Asserts that the
/// setup worked and usernet exited cleanly.
fn downloads_losing_frames(tag: &str, args: &[&str], setup: &str, downloads: &str) -> Output {
    let dns = DnsUpstream::start();
    let dir = TempDir::new(tag);
    let sock = dir.join("api.sock");
    let setup = if setup.is_empty() { String::new() } else { format!("{setup} && ") };
    let out = Usernet::new(&dns).args(args).arg("--api").arg(&sock).timeout(Duration::from_secs(150)).sh(&format!(
        "{setup}nft add table inet lossy && \
         nft add chain inet lossy in '{{ type filter hook input priority 0; }}' && \
         nft add rule inet lossy in iifname eth0 meta l4proto tcp 'tcp flags & syn == 0' \
           numgen random mod 100 '<' 5 counter drop || echo setup-failed
         {downloads}
         nft list chain inet lossy in | grep -o 'counter packets [0-9]*' | sed 's/^counter packets/dropped/'
         curl -sS -m 10 --unix-socket {sock} http://usernet/metrics | grep '^usernet_tcp_resent_bytes_total'",
        sock = sock.display(),
    ));
    out.assert_ok();
    assert!(!out.stdout.contains("setup-failed"), "{out}");
    out
}

/// The number on the line of `out`'s standard output that starts with `key`.
fn count(out: &Output, key: &str) -> f64 {
    out.stdout
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {key}: {out}"))
}

/// Uploads `size` random bytes from the guest to a server on the host with curl, after the
/// guest ran `setup` and before it runs `after` (usernet run with the arguments `args`
/// makes of the test's directory); asserts that the setup worked and the upload arrived
/// whole in time (sha256 at the server), and returns the output (whose line `sink-port N`
/// names the server's port) and the directory.
fn upload_from_guest(
    tag: &str,
    size: usize,
    args: impl FnOnce(&TempDir) -> Vec<std::ffi::OsString>,
    setup: &str,
    after: &str,
) -> (Output, TempDir) {
    let dns = DnsUpstream::start();
    let dir = TempDir::new(tag);
    let file = dir.join("u");
    write_random_file(&file, size);
    let want = sha256_file(&file);
    let sink = Server::start(ServerKind::Http, Some(dir.path()));
    let out = Usernet::new(&dns).args(&args(&dir)).timeout(Duration::from_secs(150)).sh(&format!(
        "{setup} || echo setup-failed
         timeout 100 curl -sS -T {f} http://{HOST_IP}:{s}/u; echo upload-exit $?
         echo sink-port {s}
         {after}",
        f = file.display(),
        s = sink.port,
    ));
    out.assert_ok();
    assert!(!out.stdout.contains("setup-failed"), "{out}");
    assert!(out.stdout.contains("upload-exit 0"), "the upload stalled or failed: {out}");
    assert!(out.stdout.lines().any(|l| l == format!("{want} {size}")), "{out}");
    (out, dir)
}
