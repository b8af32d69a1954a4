//! The shared harness of usernet's integration tests.
//!
//! Theory of operation: every test drives the real `usernet` binary
//! (`CARGO_BIN_EXE_usernet`) with real programs inside the guest (curl, dig,
//! socat, ping, ...) and real servers outside it. The rules of docs/testing.md hold
//! throughout: test traffic goes only to loopback and to namespaces the test made.
//!
//! - [`Usernet`] builds a `usernet run` command line. It always passes
//!   `--dns-upstream 127.0.0.1:PORT` of a [`DnsUpstream`] (a dnsmasq with static
//!   records only), so no test ever touches the machine's own resolver. Every
//!   run is bounded by a timeout: the whole process group gets SIGTERM, then
//!   SIGKILL.
//! - [`RemoteHost`] is a namespace of the test's own, joined to the host by a
//!   veth pair with a /30 from 203.0.113.0/24. The /30 is claimed by creating the
//!   namespace `unrh<slot>` (which fails if another test, thread or process
//!   holds it), so tests running in parallel, even under cargo-nextest, never
//!   collide. `ip route get` must leave through the veth before it is used.
//! - [`Server`] runs tests/helpers/testserver.py (an HTTP server that does no
//!   lookups, a TCP sink, a resetter, a UDP echo) on the host's loopback or in a
//!   [`RemoteHost`]. It binds port 0 and reports the port it got, and it exits
//!   by itself when the test that started it goes away (its stdin closes).
//! - Everything that a test starts or creates is removed on Drop, panics included.
//!
//! A test that needs root or a tool is marked
//! `#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]`
//! (the same literal everywhere), so a plain `cargo test` lists it as ignored, and calls
//! [`require`] first: run with `--include-ignored`, it fails there, naming what is
//! missing (root, a tool), rather than passing without having run.
#![allow(dead_code)]

pub mod dropin;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// The guest's address (`usernet run` assigns it statically).
pub const GUEST_IP: &str = "192.168.65.2";
/// The gateway: usernet itself (ARP, ping, DHCP, DNS).
pub const GATEWAY_IP: &str = "192.168.65.1";
/// The host's 127.0.0.1 as the guest sees it.
pub const HOST_IP: &str = "192.168.65.254";
/// The default MTU of `usernet run`.
pub const RUN_MTU: u32 = 65520;

/// Static records of [`DnsUpstream`].
pub const REMOTE_TEST_A: &str = "203.0.113.10";
pub const DUAL_TEST_A: &str = "203.0.113.11";
pub const DUAL_TEST_AAAA: &str = "2001:db8::11";
pub const AAAA_ONLY_TEST_AAAA: &str = "2001:db8::10";
pub const TXT_TEST_TEXT: &str = "usernet test record";
pub const MAIL_TEST_A: &str = "203.0.113.25";

/// Default bound of one `usernet run` (and of any other command run by the harness).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Environment: root, tools, CI.

/// The binary under test: `CARGO_BIN_EXE_usernet`, unless `USERNET_TEST_BIN`
/// names another (e.g. tests/helpers/fake_usernet.sh, to check the tests themselves).
/// The unprivileged user the `run` suites run usernet as, when `USERNET_TEST_USER` is set
/// (the binary under test must be executable by that user).
pub fn test_user() -> Option<String> {
    std::env::var("USERNET_TEST_USER").ok().filter(|u| !u.is_empty())
}

/// A command that runs the binary under test: as the test user when there is one.
pub fn usernet_command() -> Command {
    as_test_user(usernet_bin())
}

/// `program` as the test user when there is one (`setpriv`, which execs, so the child is
/// the program itself and signals reach it), else as it is.
pub fn as_test_user(program: impl AsRef<OsStr>) -> Command {
    match test_user() {
        None => Command::new(program),
        Some(user) => {
            let gid = run("id", &["-g", &user]).stdout.trim().to_string();
            let mut c = Command::new("setpriv");
            c.args(["--reuid", &user, "--regid", &gid, "--clear-groups", "--"]).arg(program);
            c
        }
    }
}

pub fn usernet_bin() -> PathBuf {
    let built = match std::env::var_os("USERNET_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_usernet")),
    };
    match test_user() {
        Some(_) => copy_for_test_user(&built),
        None => built,
    }
}

/// A copy of `bin` that any user can run (the build's own directory may be closed to
/// them, under /root say), made once per build: /tmp/usernet-test-bin/<size>-<mtime>/usernet,
/// written under a temporary name and renamed, so parallel test binaries can share it.
fn copy_for_test_user(bin: &Path) -> PathBuf {
    static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    COPY.get_or_init(|| {
        let meta = std::fs::metadata(bin).unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        let top = PathBuf::from("/tmp/usernet-test-bin");
        let dir = top.join(format!("{}-{}", meta.len(), mtime.map_or(0, |d| d.as_nanos())));
        let dst = dir.join("usernet");
        if !dst.exists() {
            std::fs::create_dir_all(&dir).expect("create the binary's directory");
            for d in [&top, &dir] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            }
            let tmp = dir.join(format!("usernet.{}", std::process::id()));
            std::fs::copy(bin, &tmp).expect("copy usernet");
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod usernet");
            std::fs::rename(&tmp, &dst).expect("rename usernet");
        }
        dst
    })
    .clone()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// PATH with the sbin directories added (tools such as ip, nft, dnsmasq live there).
pub fn search_path() -> OsString {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    for d in ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let d = PathBuf::from(d);
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    std::env::join_paths(dirs).unwrap_or_else(|_| OsString::from("/usr/sbin:/usr/bin:/sbin:/bin"))
}

/// Full path of an executable found on [`search_path`].
pub fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&search_path())
        .map(|d| d.join(name))
        .find(|p| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

pub fn have_tool(name: &str) -> bool {
    find_tool(name).is_some()
}

/// The ping to use inside the guest: iputils' if present, else busybox's.
pub fn ping_cmd() -> &'static str {
    if have_tool("ping") { "ping" } else { "busybox ping" }
}

/// The python interpreter for the helper servers (Debian's first).
pub fn python() -> PathBuf {
    let debian = PathBuf::from("/usr/bin/python3");
    if debian.exists() { debian } else { find_tool("python3").unwrap_or_else(|| PathBuf::from("python3")) }
}

/// The Debian package that installs `tool`, when known (for the messages of [`require`]).
fn debian_package(tool: &str) -> Option<&'static str> {
    Some(match tool {
        "ip" | "ss" => "iproute2",
        "dig" => "dnsutils",
        "dnsmasq" => "dnsmasq-base",
        "nft" => "nftables",
        "nc" => "netcat-openbsd",
        "busybox" => "busybox-static",
        "ping" => "iputils-ping",
        "pgrep" => "procps",
        "qemu-system-x86_64" => "qemu-system-x86",
        "xz" => "xz-utils",
        "curl" => "curl",
        "socat" => "socat",
        "iperf3" => "iperf3",
        "tcpdump" => "tcpdump",
        "python3" => "python3",
        "tinyproxy" => "tinyproxy",
        "openssl" => "openssl",
        "podman" => "podman",
        "runc" => "runc",
        "rootlesskit" | "rootlessctl" | "rootlesskit-docker-proxy" => "rootlesskit",
        "dockerd" | "docker-proxy" => "docker.io",
        "containerd" | "containerd-shim-runc-v2" => "containerd",
        "iptables" => "iptables",
        "tar" => "tar",
        "newuidmap" | "newgidmap" => "uidmap",
        "useradd" => "passwd",
        "getent" => "libc-bin",
        "sh" => "dash",
        "bash" => "bash",
        "groff" => "groff-base",
        "git" => "git",
        "unshare" | "nsenter" | "runuser" | "setpriv" | "setsid" | "mount" => "util-linux",
        "sha256sum" | "timeout" | "sleep" | "cat" => "coreutils",
        _ => return None,
    })
}

/// What is missing of `tools`, one phrase each.
fn missing_tools(tools: &[&str]) -> Vec<String> {
    tools
        .iter()
        .filter(|t| match **t {
            "ping" => !have_tool("ping") && !have_tool("busybox"),
            other => !have_tool(other),
        })
        .map(|t| match debian_package(t) {
            Some(package) => format!("tool {t} not found (Debian package {package})"),
            None => format!("tool {t} not found"),
        })
        .collect()
}

fn fail_if_missing(missing: &[String]) {
    assert!(
        missing.is_empty(),
        "this test cannot run: {}; run it as root with the test tools installed, e.g. sudo bash .ci/run",
        missing.join(", ")
    );
}

/// Panics, naming what is missing, unless this process is root and every tool of `tools`
/// is installed ("ping" is satisfied by busybox too). Tests that call it are `#[ignore]`d:
/// a plain `cargo test` lists them as ignored, and with `--include-ignored` they fail
/// here instead of passing without having run, whether or not `CI` is set.
pub fn require(tools: &[&str]) {
    let mut missing = Vec::new();
    if !is_root() {
        // SAFETY: geteuid has no preconditions and cannot fail.
        missing.push(format!("not running as root (uid {})", unsafe { libc::geteuid() }));
    }
    missing.extend(missing_tools(tools));
    fail_if_missing(&missing);
}

/// As [`require`] without root, for the tests that need only programs every Debian
/// system has (they are not ignored).
pub fn require_tools(tools: &[&str]) {
    fail_if_missing(&missing_tools(tools));
}

/// The tools nearly every `usernet run` test needs.
pub const BASE_TOOLS: &[&str] = &["ip", "dnsmasq", "timeout", "sh"];

/// A name unique within the machine for this run: `<pid>-<n>`.
pub fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!("{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// Bounded commands.

/// What a bounded command did.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit status; for a process killed by signal N, 128 + N (as a shell reports it).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub timed_out: bool,
    /// The command line, for messages.
    pub cmdline: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == 0 && !self.timed_out
    }

    /// Panics with everything known unless the command exited 0.
    pub fn assert_ok(&self) -> &Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// Panics with everything known unless the command exited with `code`.
    pub fn assert_code(&self, code: i32) -> &Self {
        assert!(self.code == code && !self.timed_out, "expected exit status {code}:\n{self}");
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  command: {}", self.cmdline)?;
        writeln!(
            f,
            "  status: {}{} after {:.1?}",
            self.code,
            if self.timed_out { " (TIMED OUT, killed)" } else { "" },
            self.elapsed
        )?;
        writeln!(f, "  stdout:\n{}", indent(&self.stdout))?;
        write!(f, "  stderr:\n{}", indent(&self.stderr))
    }
}

fn indent(s: &str) -> String {
    const MAX: usize = 8000;
    let s = if s.len() > MAX {
        let mut cut = s.len() - MAX;
        while !s.is_char_boundary(cut) {
            cut += 1;
        }
        &s[cut..]
    } else {
        s
    };
    s.lines().map(|l| format!("    | {l}\n")).collect()
}

fn cmdline(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Collects a pipe in a thread; the buffer is readable at any time.
fn collect(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, mpsc::Receiver<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done_rx) = mpsc::channel();
    let b = Arc::clone(&buf);
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => b.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]),
            }
        }
        let _ = done_tx.send(());
    });
    (buf, done_rx)
}

/// Appends what `pipe` gives, line by line, to `buf` on a thread of its own (for the
/// background processes of the publishing and robustness tests).
pub fn collect_lines(pipe: impl Read + Send + 'static, buf: Arc<Mutex<String>>) {
    std::thread::spawn(move || {
        let mut r = BufReader::new(pipe);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => buf.lock().unwrap_or_else(|e| e.into_inner()).push_str(&line),
            }
        }
    });
}

fn kill_group(pgid: u32, sig: i32) {
    if let Ok(pgid) = i32::try_from(pgid) {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory involved.
        unsafe {
            libc::kill(-pgid, sig);
        }
    }
}

/// Ends a child that leads its own process group, if still running: SIGTERM to the group,
/// SIGKILL 3 s later, then reaps it.
pub fn stop_group(child: &mut std::process::Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    kill_group(child.id(), libc::SIGTERM);
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    kill_group(child.id(), libc::SIGKILL);
    let _ = child.wait();
}

/// Runs `cmd` (stdin /dev/null) in its own process group, for at most `timeout`.
/// On timeout the group gets SIGTERM, then SIGKILL 3 s later. Never hangs on
/// a pipe held open by a stray grandchild: output is taken 3 s after exit.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    let line = cmdline(cmd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let start = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => panic!("cannot start {line}: {e}"),
    };
    let (out, out_done) = collect(child.stdout.take().expect("piped stdout"));
    let (err, err_done) = collect(child.stderr.take().expect("piped stderr"));
    let pgid = child.id();
    let mut timed_out = false;
    let mut term_sent: Option<Instant> = None;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => panic!("waiting for {line}: {e}"),
        }
        if start.elapsed() >= timeout {
            match term_sent {
                None => {
                    timed_out = true;
                    kill_group(pgid, libc::SIGTERM);
                    term_sent = Some(Instant::now());
                }
                Some(t) if t.elapsed() > Duration::from_secs(3) => {
                    kill_group(pgid, libc::SIGKILL);
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let elapsed = start.elapsed();
    if timed_out {
        // Whatever is left of the group goes too.
        kill_group(pgid, libc::SIGKILL);
    }
    let grace = Instant::now() + Duration::from_secs(3);
    for done in [&out_done, &err_done] {
        let left = grace.saturating_duration_since(Instant::now());
        let _ = done.recv_timeout(left);
    }
    let text =
        |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let code = status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Output { code, stdout: text(&out), stderr: text(&err), elapsed, timed_out, cmdline: line }
}

/// Runs a program with arguments, bounded by [`DEFAULT_TIMEOUT`].
pub fn run<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args).env("PATH", search_path());
    run_bounded(&mut cmd, DEFAULT_TIMEOUT)
}

/// Runs `sh -c SCRIPT` on the host, bounded by [`DEFAULT_TIMEOUT`].
pub fn sh(script: &str) -> Output {
    run("sh", &["-c", script])
}

/// Runs a program that must succeed; panics with its output otherwise.
pub fn must<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Output {
    let out = run(program, args);
    out.assert_ok();
    out
}

// ---------------------------------------------------------------------------
// Files and hashes.

/// A directory removed on Drop: /tmp/usernet-test-<tag>-<pid>-<n>, mode 0755.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("usernet-test-{tag}-{}", unique_id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        // Writable by the unprivileged user usernet may run as (see `test_user`).
        let mode = if test_user().is_some() { 0o777 } else { 0o755 };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Writes `len` random bytes (from /dev/urandom) to `path`, mode 0644.
pub fn write_random_file(path: &Path, len: usize) {
    let mut src = std::fs::File::open("/dev/urandom").expect("open /dev/urandom");
    let mut dst = std::fs::File::create(path).expect("create random file");
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        src.read_exact(&mut buf[..n]).expect("read /dev/urandom");
        dst.write_all(&buf[..n]).expect("write random file");
        left -= n;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).expect("chmod random file");
}

/// sha256 of a file, lowercase hex (via sha256sum).
pub fn sha256_file(path: &Path) -> String {
    let out = must("sha256sum", &[path]);
    first_word(&out.stdout)
}

/// sha256 of bytes, lowercase hex (via sha256sum).
pub fn sha256_bytes(data: &[u8]) -> String {
    let mut child =
        Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("start sha256sum");
    {
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin.write_all(data).expect("write to sha256sum");
    }
    let out = child.wait_with_output().expect("sha256sum");
    first_word(&String::from_utf8_lossy(&out.stdout))
}

/// The first whitespace-separated word of the first line that has one.
pub fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").to_string()
}

/// Every 64-hex-digit word in `s`, in order (for picking hashes out of output).
pub fn hex_hashes(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_ascii_hexdigit()).filter(|w| w.len() == 64).map(|w| w.to_ascii_lowercase()).collect()
}

/// True when `port` is free for TCP and UDP on every address of both families right now (a
/// published port is bound on [::] or 0.0.0.0). [::] is dual-stack here (bindv6only=0), so it
/// covers 0.0.0.0 too; both are checked anyway, one after the other.
pub fn port_free(port: u16) -> bool {
    let v6 = || Path::new("/proc/net/if_inet6").exists();
    TcpListener::bind(("0.0.0.0", port)).is_ok()
        && UdpSocket::bind(("0.0.0.0", port)).is_ok()
        && (TcpListener::bind(("::", port)).is_ok() || !v6())
        && (UdpSocket::bind(("::", port)).is_ok() || !v6())
}

/// The first of `n` consecutive host ports that are free now ([`port_free`]), different for
/// every call in this process, and below the kernel's ephemeral range. A port the kernel hands
/// out for bind(0) is an ephemeral one, which any test's outgoing connection may take before
/// usernet binds it: CI failed so once, usernet exiting with "Bind for [::]:38355 failed: port
/// is already allocated". Ports below that range are never taken for a connect(2), so only
/// what binds them by number (these calls, and the host's services) can hold them.
pub fn free_ports(n: u16) -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Linux's default is 32768-60999; a machine that lowered it leaves fewer ports here.
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (20000u32, ephemeral_low.clamp(21000, 32768));
    let span = high - low - u32::from(n);
    let spread = std::process::id().wrapping_mul(97);
    for _ in 0..500 {
        let k = NEXT.fetch_add(u32::from(n) + 1, Ordering::Relaxed);
        let base = (low + spread.wrapping_add(k) % span) as u16;
        if (base..base + n).all(port_free) {
            return base;
        }
    }
    panic!("no {n} consecutive free ports in {low}-{high}");
}

/// A host port free now for TCP and UDP on every address ([`free_ports`]).
pub fn free_port() -> u16 {
    free_ports(1)
}

// ---------------------------------------------------------------------------
// The DNS upstream: dnsmasq with static records on loopback.

/// dnsmasq on 127.0.0.1:PORT (UDP and TCP) with static records for `.test`
/// names only (`--local=/test/`: any other `.test` name is NXDOMAIN; names
/// outside `.test` are REFUSED, since it has no upstream of its own).
///
/// | name | records |
/// |---|---|
/// | remote.test | A 203.0.113.10 |
/// | dual.test | A 203.0.113.11, AAAA 2001:db8::11 |
/// | aaaa-only.test | AAAA 2001:db8::10 (A: NOERROR, no answer) |
/// | txt.test | TXT "usernet test record" |
/// | mx.test | MX 10 mail.test |
/// | mail.test | A 203.0.113.25 |
/// | _http._tcp.srv.test | SRV 0 5 8080 remote.test |
pub struct DnsUpstream {
    pub port: u16,
    child: Child,
    log: PathBuf,
}

impl DnsUpstream {
    pub fn start() -> DnsUpstream {
        DnsUpstream::start_with(&[])
    }

    /// The same, with more records: `NAME,IP` each (dnsmasq's `--host-record`), for names a
    /// test points at its own remote hosts.
    pub fn start_with(host_records: &[String]) -> DnsUpstream {
        let dnsmasq = find_tool("dnsmasq").expect("dnsmasq (Debian package dnsmasq-base)");
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let log = std::env::temp_dir().join(format!("usernet-test-dnsmasq-{}.log", unique_id()));
            let logfile = std::fs::File::create(&log).expect("create dnsmasq log");
            let child = Command::new(&dnsmasq)
                .args([
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--no-resolv",
                    "--no-hosts",
                    "--pid-file",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--log-facility=-",
                    "--log-queries",
                    "--local=/test/",
                    "--host-record=remote.test,203.0.113.10",
                    "--host-record=dual.test,203.0.113.11,2001:db8::11",
                    "--host-record=aaaa-only.test,2001:db8::10",
                    "--host-record=mail.test,203.0.113.25",
                    "--txt-record=txt.test,usernet test record",
                    "--mx-host=mx.test,mail.test,10",
                    "--srv-host=_http._tcp.srv.test,remote.test,8080,0,5",
                ])
                .arg(format!("--port={port}"))
                .args(host_records.iter().map(|r| format!("--host-record={r}")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(logfile))
                .spawn()
                .expect("start dnsmasq");
            let mut up = DnsUpstream { port, child, log };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = up.child.try_wait() {
                    break;
                }
                if query_a(port, "remote.test") == Some(Ipv4Addr::new(203, 0, 113, 10)) {
                    return up;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            last_error = up.log_text();
            // Drop kills it; try another port.
        }
        panic!("dnsmasq did not come up:\n{last_error}");
    }

    /// `127.0.0.1:PORT`, as `--dns-upstream` takes it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// dnsmasq's log so far (it logs every query).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for DnsUpstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Asks 127.0.0.1:port for NAME's A record over UDP (one try, 300 ms); the
/// first address of the answer, if any. Used to see that an upstream is up.
pub fn query_a(port: u16, name: &str) -> Option<Ipv4Addr> {
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
    let id: u16 = 0x5a5a;
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(u8::try_from(label.len()).ok()?);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    sock.send_to(&q, ("127.0.0.1", port)).ok()?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).ok()?;
    let r = &buf[..n];
    if r.len() < 12 || r[0..2] != id.to_be_bytes() || r[3] & 0x0f != 0 {
        return None;
    }
    let ancount = u16::from_be_bytes([r[6], r[7]]);
    if ancount == 0 {
        return None;
    }
    // Skip the question (same length as ours), then look for the first A record.
    let mut i = q.len();
    for _ in 0..ancount {
        // Name: a pointer (2 bytes) or labels.
        loop {
            let b = *r.get(i)?;
            if b & 0xc0 == 0xc0 {
                i += 2;
                break;
            }
            if b == 0 {
                i += 1;
                break;
            }
            i += 1 + usize::from(b);
        }
        let rtype = u16::from_be_bytes([*r.get(i)?, *r.get(i + 1)?]);
        let rdlen = usize::from(u16::from_be_bytes([*r.get(i + 8)?, *r.get(i + 9)?]));
        let data = r.get(i + 10..i + 10 + rdlen)?;
        if rtype == 1 && rdlen == 4 {
            return Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + rdlen;
    }
    None
}

// ---------------------------------------------------------------------------
// `usernet run`.

/// A `usernet run` command line under construction.
pub struct Usernet {
    args: Vec<OsString>,
    timeout: Duration,
    user: Option<(String, PathBuf)>,
}

impl Usernet {
    /// `usernet run --dns-upstream <dns>`.
    pub fn new(dns: &DnsUpstream) -> Usernet {
        Usernet::without_dns().arg("--dns-upstream").arg(dns.addr())
    }

    /// `usernet run` with no `--dns-upstream` of the harness: the test MUST pass
    /// its own (loopback) upstreams, or usernet would use the machine's resolver.
    pub fn without_dns() -> Usernet {
        Usernet { args: Vec::new(), timeout: DEFAULT_TIMEOUT, user: None }
    }

    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Usernet {
        self.args.push(a.as_ref().to_owned());
        self
    }

    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Usernet {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn timeout(mut self, t: Duration) -> Usernet {
        self.timeout = t;
        self
    }

    /// Runs usernet as `user` (with `runuser -u USER --`) from `bin`, a copy of
    /// the binary that USER can execute (see [`copy_binary_for_others`]).
    pub fn run_as(mut self, user: &str, bin: &Path) -> Usernet {
        self.user = Some((user.to_string(), bin.to_owned()));
        self
    }

    /// The full command: `usernet run ARGS -- CMD...`. With `USERNET_TEST_USER` set, the
    /// whole suite runs usernet as that unprivileged user (CI runs the `run` suites both ways).
    pub fn command<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Command {
        let user = self.user.clone().or_else(|| test_user().map(|u| (u, usernet_bin())));
        let mut c = match &user {
            None => Command::new(usernet_bin()),
            Some((user, bin)) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(bin);
                c
            }
        };
        c.arg("run").args(&self.args).arg("--").args(cmd);
        c.env("PATH", search_path());
        if std::env::var_os("RUST_LOG").is_none() {
            c.env("RUST_LOG", "warn");
        }
        c
    }

    /// Runs `usernet run ARGS -- CMD...`, bounded.
    pub fn run<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Output {
        run_bounded(&mut self.command(cmd), self.timeout)
    }

    /// Runs `usernet run ARGS -- sh -c SCRIPT`, bounded.
    pub fn sh(&self, script: &str) -> Output {
        self.run(&["sh", "-c", script])
    }
}

/// `usernet run --dns-upstream <dns> ARGS -- CMD...` with the default timeout.
pub fn run_usernet<S: AsRef<OsStr>, T: AsRef<OsStr>>(dns: &DnsUpstream, args: &[S], cmd: &[T]) -> Output {
    Usernet::new(dns).args(args).run(cmd)
}

/// Runs `cmd` with its open-file limit (RLIMIT_NOFILE, soft and hard) at `n`: usernet
/// raises its soft limit to the hard one, so `n` is what it gets.
#[allow(dead_code)]
pub fn with_open_file_limit(cmd: &mut Command, n: u64) {
    // SAFETY: setrlimit(2) only, between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
        });
    }
}

/// A copy of the usernet binary (mode 0755, in a 0755 directory) that any
/// user can run, for rootless tests with `runuser -u nobody`.
pub fn copy_binary_for_others(dir: &TempDir) -> PathBuf {
    let dst = dir.join("usernet");
    std::fs::copy(usernet_bin(), &dst).expect("copy usernet binary");
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o755)).expect("chmod usernet copy");
    dst
}

// ---------------------------------------------------------------------------
// Remote hosts: namespaces of the test's own behind a veth pair.

/// A network namespace `unrh<slot>` joined to the host by the veth pair
/// `unrh<slot>h` (host side, `host_ip`/30) and `unrh<slot>r` (inside, `ip`/30),
/// both inside 203.0.113.0/24, and over IPv6 in 2001:db8:75:<slot>::/64 (host side ::1,
/// inside ::2). Deleted on Drop, with every process in it.
pub struct RemoteHost {
    pub ns: String,
    pub host_veth: String,
    pub host_ip: String,
    /// The remote host's own address: what guests dial.
    pub ip: String,
    /// Its IPv6 address.
    pub ip6: String,
}

const REMOTE_SLOTS: u32 = 64;

impl RemoteHost {
    pub fn new() -> RemoteHost {
        // Start at a different slot per process and call, to avoid contention.
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let first = std::process::id().wrapping_mul(7) + NEXT.fetch_add(1, Ordering::Relaxed);
        for i in 0..REMOTE_SLOTS {
            let slot = (first + i) % REMOTE_SLOTS;
            let ns = format!("unrh{slot}");
            // Claiming the slot: fails if the namespace exists.
            if !run("ip", &["netns", "add", &ns]).success() {
                continue;
            }
            let base = slot * 4;
            let host = RemoteHost {
                host_veth: format!("{ns}h"),
                host_ip: format!("203.0.113.{}", base + 1),
                ip: format!("203.0.113.{}", base + 2),
                // Written the way programs print them (slot 0 is 2001:db8:75::2, not :0::2).
                ip6: Ipv6Addr::new(0x2001, 0xdb8, 0x75, slot as u16, 0, 0, 0, 2).to_string(),
                ns,
            };
            if host.set_up() {
                return host;
            }
            // Drop deletes the namespace (and the pair, if half made); next slot.
        }
        panic!("no free remote-host slot (namespaces unrh0..unrh{REMOTE_SLOTS} all taken?)");
    }

    fn set_up(&self) -> bool {
        let inner = format!("{}r", self.ns);
        if !run("ip", &["link", "add", &self.host_veth, "type", "veth", "peer", "name", &inner, "netns", &self.ns])
            .success()
        {
            return false;
        }
        must("ip", &["addr", "add", &format!("{}/30", self.host_ip), "dev", &self.host_veth]);
        must("ip", &["link", "set", &self.host_veth, "up"]);
        self.exec(&["ip", "addr", "add", &format!("{}/30", self.ip), "dev", &inner]).assert_ok();
        self.exec(&["ip", "link", "set", &inner, "up"]).assert_ok();
        self.exec(&["ip", "link", "set", "lo", "up"]).assert_ok();
        // IPv6 (nodad: usable at once), when the host has it at all.
        let host_ip6 = self.ip6.replace("::2", "::1");
        let v6 =
            run("ip", &["-6", "addr", "add", &format!("{host_ip6}/64"), "dev", &self.host_veth, "nodad"]).success();
        if v6 {
            self.exec(&["ip", "-6", "addr", "add", &format!("{}/64", self.ip6), "dev", &inner, "nodad"]).assert_ok();
        }
        // Traffic to the remote host must leave through our veth, nowhere else.
        let mut routes = vec![must("ip", &["route", "get", &self.ip])];
        if v6 {
            routes.push(must("ip", &["-6", "route", "get", &self.ip6]));
        }
        for route in routes {
            assert!(
                route.stdout.contains(&format!("dev {} ", self.host_veth)),
                "route to the remote host does not leave through {}:\n{route}",
                self.host_veth
            );
        }
        true
    }

    /// Runs a command inside the namespace, bounded by [`DEFAULT_TIMEOUT`].
    pub fn exec<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(cmd).env("PATH", search_path());
        run_bounded(&mut c, DEFAULT_TIMEOUT)
    }

    /// A command (not started) that runs inside the namespace.
    pub fn command<S: AsRef<OsStr>>(&self, cmd: &[S]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(cmd).env("PATH", search_path());
        c
    }
}

impl Drop for RemoteHost {
    fn drop(&mut self) {
        // Nothing may outlive the namespace.
        let pids = run("ip", &["netns", "pids", &self.ns]);
        for pid in pids.stdout.split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain kill(2) of a process inside our own namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = run("ip", &["link", "del", &self.host_veth]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

/// An `unreachable` route to one address of 198.51.100.200-249 on the host,
/// for as long as it lives: connecting there fails with EHOSTUNREACH at once.
pub struct UnreachableRoute {
    pub ip: String,
}

impl UnreachableRoute {
    pub fn new() -> UnreachableRoute {
        for last in 200..250u32 {
            let ip = format!("198.51.100.{last}");
            if run("ip", &["route", "add", "unreachable", &format!("{ip}/32")]).success() {
                let r = UnreachableRoute { ip };
                let route = run("ip", &["route", "get", &r.ip]);
                assert!(
                    route.stderr.contains("No route to host") || route.stdout.contains("unreachable"),
                    "route to {} is not unreachable:\n{route}",
                    r.ip
                );
                return r;
            }
        }
        panic!("no free address for an unreachable route in 198.51.100.200-249");
    }
}

impl Drop for UnreachableRoute {
    fn drop(&mut self) {
        let _ = run("ip", &["route", "del", "unreachable", &format!("{}/32", self.ip)]);
    }
}

// ---------------------------------------------------------------------------
// Helper servers (tests/helpers/testserver.py).

/// What a [`Server`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerKind {
    /// HTTP/1.0 without lookups: GET serves a directory, PUT/POST answer
    /// "<sha256 hex> <length>" of the body.
    Http,
    /// TCP: reads to EOF, answers "<sha256 hex> <length>\n", then closes.
    Sink,
    /// TCP: reads the first bytes, then resets the connection.
    Rst,
    /// UDP: echoes every datagram.
    UdpEcho,
    /// UDP: answers "burst SIZE COUNT WINDOW" with COUNT datagrams in one segmented send
    /// (UDP_SEGMENT; see testserver.py).
    UdpBurst,
}

/// A helper server on the host's loopback (127.0.0.1) or in a [`RemoteHost`]
/// (0.0.0.0). Killed on Drop; also exits by itself when the test process dies.
pub struct Server {
    pub port: u16,
    child: Child,
}

pub fn helper_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/testserver.py")
}

impl Server {
    /// On the host, bound to 127.0.0.1.
    pub fn start(kind: ServerKind, dir: Option<&Path>) -> Server {
        Server::spawn(Command::new(python()), kind, dir, "127.0.0.1")
    }

    /// On the host, bound to `bind` (e.g. 0.0.0.0, for a guest that reaches the host by its
    /// own address).
    pub fn start_on(kind: ServerKind, dir: Option<&Path>, bind: &str) -> Server {
        Server::spawn(Command::new(python()), kind, dir, bind)
    }

    /// On the host's 127.0.0.1 at a port below the ephemeral range ([`free_port`]),
    /// where a service would be (what pasta's `auto` forwards).
    pub fn start_at_service_port(kind: ServerKind, dir: Option<&Path>) -> Server {
        Server::spawn_at(Command::new(python()), kind, dir, "127.0.0.1", free_port())
    }

    /// Inside a remote host, bound to 0.0.0.0.
    pub fn start_in(remote: &RemoteHost, kind: ServerKind, dir: Option<&Path>) -> Server {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &remote.ns]).arg(python());
        Server::spawn(c, kind, dir, "0.0.0.0")
    }

    /// Inside a remote host, bound to `bind` (`::` for IPv6).
    pub fn start_in_on(remote: &RemoteHost, kind: ServerKind, dir: Option<&Path>, bind: &str) -> Server {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &remote.ns]).arg(python());
        Server::spawn(c, kind, dir, bind)
    }

    fn spawn(cmd: Command, kind: ServerKind, dir: Option<&Path>, bind: &str) -> Server {
        Server::spawn_at(cmd, kind, dir, bind, 0)
    }

    fn spawn_at(mut cmd: Command, kind: ServerKind, dir: Option<&Path>, bind: &str, port: u16) -> Server {
        let mode = match kind {
            ServerKind::Http => "http",
            ServerKind::Sink => "sink",
            ServerKind::Rst => "rst",
            ServerKind::UdpEcho => "udp-echo",
            ServerKind::UdpBurst => "udp-burst",
        };
        cmd.arg(helper_script()).arg(mode);
        if let Some(d) = dir {
            cmd.arg(d);
        }
        cmd.args(["--bind", bind, "--port", &port.to_string()])
            .env("PATH", search_path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let line = cmdline(&cmd);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {line}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut first = String::new();
            let _ = BufReader::new(stdout).read_line(&mut first);
            let _ = tx.send(first);
        });
        let first = rx.recv_timeout(Duration::from_secs(15)).unwrap_or_default();
        let port = first.strip_prefix("PORT ").and_then(|p| p.trim().parse::<u16>().ok());
        match port {
            Some(port) => Server { port, child },
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{line} did not report its port (got {first:?})");
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory holding `name` of `len` random bytes, served over HTTP on the
/// host's loopback. Returns (dir, server, sha256 of the file).
pub fn serve_random_file(tag: &str, name: &str, len: usize) -> (TempDir, Server, String) {
    let dir = TempDir::new(tag);
    let path = dir.join(name);
    write_random_file(&path, len);
    let hash = sha256_file(&path);
    let server = Server::start(ServerKind::Http, Some(dir.path()));
    (dir, server, hash)
}

// ---------------------------------------------------------------------------
// Looking at processes.

/// The pids of processes whose command line contains `needle` (from /proc).
pub fn pids_matching(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    let c: Vec<u8> = c.iter().map(|&b| if b == 0 { b' ' } else { b }).collect();
                    String::from_utf8_lossy(&c).contains(needle)
                })
                .unwrap_or(false)
        })
        .collect()
}

/// The pids of processes whose network namespace is `netns` (as
/// `readlink /proc/self/ns/net` prints it: `net:[4026532...]`).
pub fn pids_in_netns(netns: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| std::fs::read_link(format!("/proc/{pid}/ns/net")).is_ok_and(|l| l.to_string_lossy() == netns))
        .collect()
}

/// Waits up to `limit` for `cond` to hold, checking every 50 ms.
/// How many frames of the capture file `pcap` match the tcpdump `filter`, once usernet has
/// written them out (it does when its engine goes idle: waits up to 10 s for the first).
pub fn frames_in_capture(pcap: &Path, filter: &str) -> usize {
    let count = || run("tcpdump", &["-nr", &pcap.to_string_lossy(), filter]).stdout.lines().count();
    wait_until(Duration::from_secs(10), || count() > 0);
    count()
}

pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A process in the background (its own process group) whose stdout and stderr are
/// collected line by line. With a piped stdin (held until Drop) the helper servers exit by
/// themselves if the test dies. The group is stopped on Drop.
pub struct Background {
    child: Child,
    out: Arc<Mutex<String>>,
    err: Arc<Mutex<String>>,
    line: String,
}

impl Background {
    pub fn start(mut cmd: Command, stdin: Stdio) -> Background {
        let mut line = vec![cmd.get_program().to_string_lossy().into_owned()];
        line.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
        let line = line.join(" ");
        cmd.stdin(stdin).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {line}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        let err = Arc::new(Mutex::new(String::new()));
        collect_lines(child.stdout.take().expect("piped stdout"), out.clone());
        collect_lines(child.stderr.take().expect("piped stderr"), err.clone());
        Background { child, out, err, line }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits i32")
    }

    pub fn stdout(&self) -> String {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn describe(&self) -> String {
        format!("  command: {}\n  stdout:\n{}\n  stderr:\n{}", self.line, self.stdout(), self.stderr())
    }

    /// Lines of stdout that start with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.stdout().lines().filter(|l| l.starts_with(prefix)).map(str::to_string).collect()
    }

    /// Waits until stdout has `count` lines starting with `prefix`; returns the first.
    /// Panics (with all output) if the process exits or `limit` passes first.
    pub fn wait_lines(&mut self, prefix: &str, count: usize, limit: Duration) -> String {
        let end = Instant::now() + limit;
        loop {
            let found = self.lines_with(prefix);
            if found.len() >= count {
                return found[0].clone();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                std::thread::sleep(Duration::from_millis(300));
                let found = self.lines_with(prefix);
                if found.len() >= count {
                    return found[0].clone();
                }
                panic!("exited ({status}) before printing {count} x {prefix:?}:\n{}", self.describe());
            }
            assert!(Instant::now() < end, "no {count} x {prefix:?} within {limit:?}:\n{}", self.describe());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> String {
        self.wait_lines(prefix, 1, limit)
    }

    /// The port of a helper server's `PORT n` line.
    pub fn port(&mut self) -> u16 {
        let l = self.wait_line("PORT ", Duration::from_secs(15));
        l["PORT ".len()..].trim().parse().unwrap_or_else(|_| panic!("bad port line {l:?}"))
    }

    /// Waits for the process to exit by itself, at most `limit`: its exit status (128 + N
    /// for signal N), or None if it is still running.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let end = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                // Let the reader threads catch the last lines.
                std::thread::sleep(Duration::from_millis(300));
                return Some(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exit status once the process exits by itself; panics (with all output) if it
    /// is still running after `limit`.
    pub fn exit_code(&mut self, limit: Duration) -> i32 {
        match self.wait_exit(limit) {
            Some(code) => code,
            None => panic!("did not exit within {limit:?}:\n{}", self.describe()),
        }
    }

    /// SIGTERM to the process itself (usernet forwards it to COMMAND), then its exit status.
    pub fn stop(&mut self) -> i32 {
        self.signal(libc::SIGTERM);
        self.exit_code(Duration::from_secs(15))
    }

    /// Sends `sig` to the process itself (not its group).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) of our own child; no memory involved.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        stop_group(&mut self.child);
    }
}

/// Root, `tools`, and the Prometheus project's text-format parser for python (panics
/// otherwise, as [`require`] does).
pub fn require_with_prometheus_parser(tools: &[&str]) {
    let mut t = BASE_TOOLS.to_vec();
    t.extend(tools);
    require(&t);
    let probe = run(python().to_str().unwrap(), &["-c", "import prometheus_client.parser"]);
    assert!(
        probe.success(),
        "this test cannot run: python module prometheus_client not found (Debian package \
         python3-prometheus-client); run it as root with the test tools installed, e.g. sudo bash .ci/run"
    );
}

/// A `usernet run` whose guest waits until the file `stop` appears: on Drop the file is
/// made, the run gets 10 s to end by itself, then its process group is stopped.
pub struct StopFileRun {
    pub child: Child,
    pub stop: PathBuf,
}

impl Drop for StopFileRun {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.stop, b"");
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stop_group(&mut self.child);
    }
}

/// Whether `user` may open ping sockets (its group in net.ipv4.ping_group_range).
pub fn ping_sockets_allowed(user: &str) -> bool {
    let gid: u32 = run("id", &["-g", user]).stdout.trim().parse().unwrap_or(u32::MAX);
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ping_group_range").unwrap_or_default();
    let mut it = range.split_whitespace().filter_map(|v| v.parse::<u32>().ok());
    matches!((it.next(), it.next()), (Some(lo), Some(hi)) if lo <= gid && gid <= hi)
}
