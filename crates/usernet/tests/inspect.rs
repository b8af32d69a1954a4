//! `usernet ps`, `flows`, `top` and `capture` against real `usernet run` instances.
//!
//! Every test gives its instances and its clients a runtime directory of its own
//! (`XDG_RUNTIME_DIR`, owned by the user usernet runs as), so the instances a test sees
//! are its own, whatever else runs. Guests download from helper servers on the host's
//! loopback (sha256 checked); captures are read by tcpdump, through a pipe and from a file,
//! and one is not read at all (the network goes on at full speed, usernet drops and counts).
//! With `USERNET_TEST_USER` set, usernet and its clients run as that user.

mod common;

use common::*;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A runtime directory (`XDG_RUNTIME_DIR`) of the test's own, owned by the user usernet
/// runs as; the registry is its `usernet` subdirectory.
struct Runtime {
    dir: TempDir,
}

impl Runtime {
    fn new() -> Runtime {
        let dir = TempDir::new("inspect-xdg");
        if let Some(user) = test_user() {
            must("chown", &[&user, dir.path().to_str().unwrap()]);
        }
        Runtime { dir }
    }

    fn registry(&self) -> PathBuf {
        self.dir.join("usernet")
    }

    /// `usernet ARGS` as the test user, with this runtime directory, bounded.
    fn client(&self, args: &[&str]) -> Output {
        let mut c = as_test_user(usernet_bin());
        c.args(args).env("XDG_RUNTIME_DIR", self.dir.path()).env("PATH", search_path());
        run_bounded(&mut c, Duration::from_secs(30))
    }

    /// `usernet run ARGS -- sh -c SCRIPT` in the background, registered here.
    fn start(&self, dns: &DnsUpstream, args: &[&str], script: &str) -> Background {
        let mut c = Usernet::new(dns).args(args).command(&["sh", "-c", script]);
        c.env("XDG_RUNTIME_DIR", self.dir.path());
        Background::start(c, Stdio::null())
    }

    /// Waits until `usernet ps --json` lists `n` instances; returns them.
    fn wait_instances(&self, n: usize) -> Vec<serde_json::Value> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self.client(&["ps", "--json"]);
            out.assert_ok();
            let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
            if list.len() == n {
                return list;
            }
            assert!(Instant::now() < end, "not {n} instances within 20 s:\n{out}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The usernet process behind a background `usernet run` (itself, or the child of
/// `runuser` when it runs as the test user).
fn usernet_pid(bg: &Background) -> u32 {
    let pid = bg.pid() as u32;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        if std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "usernet") {
            return pid;
        }
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
                let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
                // pid (comm) state ppid ...
                let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
                let ppid = after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok());
                if ppid == Some(pid) && stat.contains("(usernet)") {
                    return child;
                }
            }
        }
        assert!(Instant::now() < end, "no usernet process under {pid}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Root and the tools of these tests (panics otherwise: see [`require`]).
fn prerequisites(extra: &[&str]) {
    let mut t = BASE_TOOLS.to_vec();
    t.extend(["curl", "python3", "sha256sum", "chown", "runuser", "setpriv"]);
    t.extend(extra);
    require(&t);
}

/// A guest script that runs `body` once `dir/go` exists, writes its output to `dir/out`
/// (renamed into place when complete), then waits for `dir/stop`; every wait bounded.
fn guest_script(dir: &Path, body: &str) -> String {
    let d = dir.display();
    format!(
        "i=0; while [ ! -e {d}/go ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; \
         ( {body} ) > {d}/out.tmp 2>&1; mv {d}/out.tmp {d}/out; \
         i=0; while [ ! -e {d}/stop ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
    )
}

/// Waits for the guest's `dir/out`.
fn guest_output(dir: &TempDir, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        if let Ok(text) = std::fs::read_to_string(dir.join("out")) {
            return text;
        }
        assert!(Instant::now() < end, "the guest wrote no output within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ps_lists_instances_and_clients_pick_the_only_one() {
    prerequisites(&[]);
    let rt = Runtime::new();
    let dns = DnsUpstream::start();
    let dir = TempDir::new("inspect-ps");
    let api = dir.join("b.sock");
    let port = free_port();
    let mut a = rt.start(&dns, &[], "sleep 50 # instance-a");
    let mut b = rt.start(
        &dns,
        &["--api", api.to_str().unwrap(), "-p", &format!("127.0.0.1:{port}:80")],
        "sleep 50 # instance-b",
    );
    let (pid_a, pid_b) = (usernet_pid(&a), usernet_pid(&b));
    let list = rt.wait_instances(2);

    // --json: pid, mode, command, guests, ports, the API socket.
    let find = |pid: u32| list.iter().find(|i| i["pid"] == pid).unwrap_or_else(|| panic!("no {pid}: {list:?}"));
    let (ia, ib) = (find(pid_a), find(pid_b));
    assert_eq!(ia["mode"], "run");
    assert_eq!(ia["command"], serde_json::json!(["sh", "-c", "sleep 50 # instance-a"]));
    assert_eq!(ia["guests"][0]["ip"], GUEST_IP);
    assert_eq!(ia["api"], rt.registry().join(format!("{pid_a}.sock")).display().to_string());
    assert_eq!(ib["api"], api.display().to_string());
    assert_eq!(ib["ports"][0]["host_port"], port);
    // The --api socket is registered with a symlink.
    assert_eq!(std::fs::read_link(rt.registry().join(format!("{pid_b}.sock"))).unwrap(), api);

    // The table: one line each, with pid, guest, port and command.
    let out = rt.client(&["ps"]);
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].starts_with("PID ") && lines[0].contains("GUESTS") && lines[0].contains("UPTIME"), "{out}");
    let line_a = lines.iter().find(|l| l.starts_with(&format!("{pid_a} "))).unwrap_or_else(|| panic!("{out}"));
    let line_b = lines.iter().find(|l| l.starts_with(&format!("{pid_b} "))).unwrap_or_else(|| panic!("{out}"));
    assert!(line_a.contains(" run ") && line_a.contains(GUEST_IP) && line_a.ends_with("instance-a"), "{out}");
    assert!(line_b.contains(&format!("127.0.0.1:{port}->80/tcp")) && line_b.contains(api.to_str().unwrap()), "{out}");

    // Two instances and no --api: a clear error naming both, exit 125.
    let out = rt.client(&["flows"]);
    out.assert_code(125);
    assert!(out.stderr.contains("several usernets are running; name one with --api PATH"), "{out}");
    assert!(out.stderr.contains(&format!("pid {pid_a}")) && out.stderr.contains(&format!("pid {pid_b}")), "{out}");
    // With --api, either one.
    rt.client(&["flows", "--api", api.to_str().unwrap()]).assert_ok();

    // A stale entry (a socket nobody serves) is removed by ps and not listed.
    let stale = rt.registry().join("999999.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    if let Some(user) = test_user() {
        must("chown", &["-h", &user, stale.to_str().unwrap()]);
    }
    assert_eq!(rt.wait_instances(2).len(), 2);
    assert!(std::fs::symlink_metadata(&stale).is_err(), "stale entry left behind");

    // A stops: its entry goes, and the clients pick B alone.
    a.stop();
    assert!(!rt.registry().join(format!("{pid_a}.sock")).exists(), "entry of a stopped instance left behind");
    rt.wait_instances(1);
    let out = rt.client(&["flows"]);
    out.assert_ok();
    assert!(out.stdout.starts_with("PROTO "), "{out}");
    let out = rt.client(&["top", "--once", "--interval", "0.2"]);
    out.assert_ok();
    assert!(out.stdout.starts_with(&format!("usernet {pid_b} (run: sh -c sleep 50 # instance-b)")), "{out}");

    b.stop();
    assert!(std::fs::symlink_metadata(rt.registry().join(format!("{pid_b}.sock"))).is_err(), "symlink left behind");
    assert!(!api.exists(), "API socket left behind");
    let out = rt.client(&["flows"]);
    out.assert_code(125);
    assert!(out.stderr.contains("no usernet is running for this user"), "{out}");
    assert_eq!(rt.client(&["ps"]).stdout.lines().count(), 1);
}

/// The `/v1/flows` entry (from `flows --json`) whose remote is `remote`.
fn flow_to(rt: &Runtime, remote: &str) -> Option<serde_json::Value> {
    let out = rt.client(&["flows", "--json"]);
    out.assert_ok();
    let list: Vec<serde_json::Value> = serde_json::from_str(&out.stdout).unwrap();
    list.into_iter().find(|f| f["remote"] == remote)
}

/// A slow HTTP download in the guest: a small receive buffer, 64 KiB per 20 ms (about
/// 3 MB/s), so that the transfer lasts seconds instead of landing in the guest kernel's
/// buffers at once; prints the body's sha256.
const SLOW_READER: &str = r#"
import hashlib, socket, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
s.settimeout(30)
s.connect((host, port))
s.sendall(("GET %s HTTP/1.0\r\nHost: test\r\n\r\n" % path).encode())
head, body, h = b"", False, hashlib.sha256()
while True:
    d = s.recv(65536)
    if not d:
        break
    if body:
        h.update(d)
    else:
        head += d
        if b"\r\n\r\n" in head:
            h.update(head.split(b"\r\n\r\n", 1)[1])
            body = True
    time.sleep(0.02)
print(h.hexdigest())
"#;

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn flows_and_top_follow_a_download() {
    prerequisites(&[]);
    let rt = Runtime::new();
    let dns = DnsUpstream::start();
    let (_files, server, hash) = serve_random_file("inspect-flows", "big.bin", 12 << 20);
    let dir = TempDir::new("inspect-flows-guest");
    let remote = format!("{HOST_IP}:{}", server.port);
    std::fs::write(dir.join("reader.py"), SLOW_READER).unwrap();
    let script = guest_script(
        dir.path(),
        &format!("{} {}/reader.py {HOST_IP} {} /big.bin", python().display(), dir.path().display(), server.port),
    );
    let mut guest = rt.start(&dns, &[], &script);
    rt.wait_instances(1);
    std::fs::write(dir.join("go"), b"").unwrap();

    // The download's flow, sampled twice: its bytes to the guest grow.
    let end = Instant::now() + Duration::from_secs(20);
    let first = loop {
        if let Some(f) = flow_to(&rt, &remote)
            && f["bytes_to_guest"].as_u64().unwrap() > 0
        {
            break f;
        }
        assert!(Instant::now() < end, "no flow to {remote}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(first["proto"], "tcp");
    assert_eq!(first["state"], "established");
    assert_eq!(first["host"], format!("127.0.0.1:{}", server.port));
    assert!(first["guest"].as_str().unwrap().starts_with(&format!("{GUEST_IP}:")), "{first}");
    assert!(first["bytes_from_guest"].as_u64().unwrap() > 0, "the request: {first}");
    // The guest reads 64 KiB per 20 ms: the flow moves all along, in small bursts.
    let end = Instant::now() + Duration::from_secs(5);
    let second = loop {
        std::thread::sleep(Duration::from_millis(200));
        let f = flow_to(&rt, &remote).expect("the download ended too soon");
        if f["bytes_to_guest"].as_u64() > first["bytes_to_guest"].as_u64() {
            break f;
        }
        assert!(Instant::now() < end, "the download's bytes did not grow: {first}\n{f}");
    };
    assert!(second["age_ms"].as_u64() > first["age_ms"].as_u64(), "{first}\n{second}");
    assert!(second["idle_ms"].as_u64() <= second["age_ms"].as_u64(), "{second}");

    // The table, and top's one frame, show it.
    let out = rt.client(&["flows"]);
    out.assert_ok();
    let row = out.stdout.lines().find(|l| l.contains(&remote)).unwrap_or_else(|| panic!("{out}"));
    assert!(row.starts_with("tcp ") && row.contains("established") && row.contains("iB "), "{out}");
    // top: one frame over a 1.5 s interval shows the flow moving (a few tries at most).
    let mut tries = 0;
    loop {
        tries += 1;
        let out = rt.client(&["top", "--once", "--interval", "1.5"]);
        out.assert_ok();
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert!(lines[0].starts_with("usernet ") && lines[1].starts_with("from guests "), "{out}");
        assert!(lines.iter().any(|l| l.starts_with("PROTO ") && l.contains("TO-GUEST/S")), "{out}");
        assert!(!out.stdout.contains('\x1b'), "no terminal codes when stdout is a pipe: {out}");
        let row = lines.iter().find(|l| l.contains(&remote)).unwrap_or_else(|| panic!("{out}"));
        if row.contains("KiB/s") || row.contains("MiB/s") {
            break;
        }
        assert!(tries < 3, "a moving download: {out}");
    }

    let text = guest_output(&dir, Duration::from_secs(30));
    assert_eq!(first_word(&text), hash, "download corrupted: {text}");
    std::fs::write(dir.join("stop"), b"").unwrap();
    assert_eq!(guest.exit_code(Duration::from_secs(20)), 0, "{}", guest.describe());
}

/// `usernet capture ARGS` as the test user, its stdout into a pipe (for tcpdump).
fn spawn_capture(rt: &Runtime, args: &[&str]) -> Child {
    let mut c: Command = as_test_user(usernet_bin());
    c.arg("capture")
        .args(args)
        .env("XDG_RUNTIME_DIR", rt.dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    c.spawn().expect("start usernet capture")
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn capture_is_read_by_tcpdump_and_filtered() {
    prerequisites(&["tcpdump"]);
    let rt = Runtime::new();
    let dns = DnsUpstream::start();
    // Two servers: the filter keeps the first's traffic and not the second's.
    let (_f1, s1, hash1) = serve_random_file("inspect-cap1", "inspect-known-path.bin", 300_000);
    let (_f2, s2, hash2) = serve_random_file("inspect-cap2", "other-path.bin", 200_000);
    let dir = TempDir::new("inspect-capture-guest");
    let script = guest_script(
        dir.path(),
        &format!(
            "curl -sS http://{HOST_IP}:{}/inspect-known-path.bin | sha256sum; \
             curl -sS http://{HOST_IP}:{}/other-path.bin | sha256sum",
            s1.port, s2.port
        ),
    );
    let mut guest = rt.start(&dns, &[], &script);
    rt.wait_instances(1);

    // Filtered, through a pipe into tcpdump; unfiltered, to a file.
    let mut filtered = spawn_capture(&rt, &["tcp", "and", "port", &s1.port.to_string()]);
    let mut tcpdump = Command::new("tcpdump");
    tcpdump.args(["-nn", "-A", "-r", "-"]).env("PATH", search_path());
    let tcpdump = Background::start(tcpdump, Stdio::from(filtered.stdout.take().unwrap()));
    let file = dir.join("all.pcap");
    let mut all = spawn_capture(&rt, &["-w", file.to_str().unwrap()]);
    let three_file = dir.join("three.pcap");
    let mut three = spawn_capture(&rt, &["-c", "3", "-w", three_file.to_str().unwrap()]);
    // Both streams have begun (tcpdump read the header; the file has it).
    let end = Instant::now() + Duration::from_secs(15);
    while !(tcpdump.stderr().contains("reading from file -") && std::fs::metadata(&file).is_ok_and(|m| m.len() >= 24)) {
        assert!(Instant::now() < end, "the captures did not start:\n{}", tcpdump.describe());
        std::thread::sleep(Duration::from_millis(50));
    }

    std::fs::write(dir.join("go"), b"").unwrap();
    let text = guest_output(&dir, Duration::from_secs(30));
    assert_eq!(hex_hashes(&text), [hash1, hash2], "downloads corrupted: {text}");
    // Let the last segments and ACKs through, then end both captures (SIGTERM: between
    // packets, so the streams stay whole).
    std::thread::sleep(Duration::from_millis(500));
    for c in [&filtered, &all] {
        // SAFETY: kill(2) of our own child; no memory involved.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    }
    let mut tcpdump = tcpdump;
    for (name, c) in [("filtered", &mut filtered), ("all", &mut all)] {
        let end = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(s)) = c.try_wait() {
                break s;
            }
            assert!(Instant::now() < end, "capture {name} did not end on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert_eq!(status.code(), Some(0), "capture {name}: {err}");
        assert!(err.contains(" packets captured"), "capture {name}: {err}");
    }
    assert_eq!(tcpdump.exit_code(Duration::from_secs(10)), 0, "{}", tcpdump.describe());

    // The pipe: the guest's GET of the known path, and nothing of the other server.
    let seen = tcpdump.stdout();
    assert!(seen.contains("GET /inspect-known-path.bin HTTP/1.1"), "{}", tcpdump.describe());
    let packets: Vec<&str> = seen.lines().filter(|l| l.contains(" IP ")).collect();
    assert!(packets.len() > 10, "{}", tcpdump.describe());
    let p1 = format!(".{}", s1.port);
    assert!(packets.iter().all(|l| l.contains(&p1)), "a packet outside the filter:\n{seen}");
    assert!(!seen.contains("other-path.bin"), "the filter let the other download through:\n{seen}");

    // The file: both downloads, read back by tcpdump.
    let out = must("tcpdump", &["-nn", "-A", "-r", file.to_str().unwrap()]);
    assert!(out.stdout.contains("GET /inspect-known-path.bin") && out.stdout.contains("GET /other-path.bin"), "{out}");
    assert!(out.stdout.contains(&format!("{HOST_IP}.{}", s2.port)), "{out}");
    let end = Instant::now() + Duration::from_secs(10);

    // -c: the count ended that capture by itself, with that many packets.
    let status = loop {
        if let Ok(Some(s)) = three.try_wait() {
            break s;
        }
        assert!(Instant::now() < end, "capture -c 3 did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let out = must("tcpdump", &["-nn", "-r", three_file.to_str().unwrap()]);
    assert_eq!(out.stdout.lines().count(), 3, "{out}");
    std::fs::write(dir.join("stop"), b"").unwrap();
    assert_eq!(guest.exit_code(Duration::from_secs(20)), 0, "{}", guest.describe());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_capture_that_is_not_read_loses_packets_not_the_network() {
    prerequisites(&[]);
    let rt = Runtime::new();
    let dns = DnsUpstream::start();
    let (_files, server, hash) = serve_random_file("inspect-slow", "big.bin", 40 << 20);
    let dir = TempDir::new("inspect-slow-guest");
    let script = guest_script(dir.path(), &format!("curl -sS http://{HOST_IP}:{}/big.bin | sha256sum", server.port));
    let mut guest = rt.start(&dns, &[], &script);
    rt.wait_instances(1);
    // Its stdout is a pipe nobody reads: it fills, then usernet's queue does.
    let mut capture = spawn_capture(&rt, &[]);
    let unread = capture.stdout.take().unwrap();
    // The capture has begun once usernet holds a tap: wait for the header in the pipe.
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes an int through the pointer.
        unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&unread), libc::FIONREAD, &mut n) };
        if n >= 24 {
            break;
        }
        assert!(Instant::now() < end, "the capture did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let start = Instant::now();
    std::fs::write(dir.join("go"), b"").unwrap();
    let text = guest_output(&dir, Duration::from_secs(30));
    assert_eq!(first_word(&text), hash, "download corrupted: {text}");
    let took = start.elapsed();
    assert!(took < Duration::from_secs(20), "the download took {took:?}");
    // The reader goes away: the capture ends and reports what usernet dropped.
    drop(unread);
    // SAFETY: kill(2) of our own child; no memory involved.
    unsafe { libc::kill(capture.id() as i32, libc::SIGTERM) };
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Ok(Some(s)) = capture.try_wait() {
            break s;
        }
        assert!(Instant::now() < end, "the capture did not end");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(capture.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("packets dropped by usernet (the reader was too slow)"), "{err}");
    std::fs::write(dir.join("stop"), b"").unwrap();
    assert_eq!(guest.exit_code(Duration::from_secs(20)), 0, "{}", guest.describe());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn serve_is_listed_too() {
    prerequisites(&[]);
    let rt = Runtime::new();
    let dns = DnsUpstream::start();
    let dir = TempDir::new("inspect-serve");
    let bess = format!("unixpacket:{}", dir.join("bess.sock").display());
    let mut c = as_test_user(usernet_bin());
    c.args(["serve", "--listen-bess", &bess, "--dns-upstream", &dns.addr()])
        .env("XDG_RUNTIME_DIR", rt.dir.path())
        .env("PATH", search_path());
    let mut serve = Background::start(c, Stdio::null());
    let list = rt.wait_instances(1);
    assert_eq!(list[0]["pid"], serve.pid(), "{list:?}");
    assert_eq!(list[0]["mode"], "serve");
    assert_eq!(list[0]["command"], serde_json::json!(["serve", "--listen-bess", bess, "--dns-upstream", dns.addr()]));
    let entry = rt.registry().join(format!("{}.sock", serve.pid()));
    assert!(entry.exists());
    assert_eq!(serve.stop(), 0, "{}", serve.describe());
    assert!(!entry.exists(), "entry left behind");
}
