//! `usernet run`'s process plumbing, tested on the real binary: namespaces, TAP and netlink
//! configuration, resolv.conf, exit codes, signal forwarding, cleanup, rootless mode.
//!
//! These tests use the hidden `--debug-no-engine` flag: the sandbox is set up and supervised
//! exactly as in normal runs, but no engine serves its network (no traffic leaves it). All
//! but one need root (to create namespaces and switch to `nobody`): they are ignored unless
//! asked for, and fail when run without root or a tool they use (see `common::require`).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_usernet");

/// `usernet run --debug-no-engine [opts] -- sh -c script`, with a loopback DNS upstream so
/// nothing reads or uses the machine's resolvers.
fn run_sh(opts: &[&str], script: &str) -> Output {
    Command::new(BIN)
        .args(["run", "--debug-no-engine", "--dns-upstream", "127.0.0.1:5399"])
        .args(opts)
        .args(["--", "sh", "-c", script])
        .output()
        .expect("spawn usernet")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_network_is_configured() {
    common::require(&["ip", "sh", "cat"]);
    let out = run_sh(
        &[],
        "ip -o link show lo; ip -o link show eth0; ip -o -4 addr show eth0; ip route; \
         cat /etc/resolv.conf",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].contains("<LOOPBACK,UP,LOWER_UP>"), "{stdout}");
    assert!(lines[1].contains("mtu 65520"), "{stdout}");
    assert!(lines[1].contains(",UP"), "{stdout}");
    assert!(lines[1].contains("link/ether 5a:94:ef:e4:0c:ee"), "{stdout}");
    assert!(stdout.contains("inet 192.168.65.2/24 brd 192.168.65.255"), "{stdout}");
    assert!(stdout.contains("default via 192.168.65.1 dev eth0"), "{stdout}");
    assert!(stdout.contains("\nnameserver 192.168.65.1\n"), "{stdout}");
    assert_eq!(stdout.matches("nameserver").count(), 1, "{stdout}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn subnet_and_mtu_options() {
    common::require(&["ip", "sh", "cat"]);
    let out = run_sh(
        &["--subnet", "10.9.8.0/24", "--mtu", "1500"],
        "ip -o link show eth0; ip -o -4 addr show eth0; ip route; cat /etc/resolv.conf",
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("mtu 1500"), "{stdout}");
    assert!(stdout.contains("inet 10.9.8.2/24"), "{stdout}");
    assert!(stdout.contains("default via 10.9.8.1 dev eth0"), "{stdout}");
    assert!(stdout.contains("nameserver 10.9.8.1"), "{stdout}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn host_namespaces_are_untouched() {
    common::require(&["ip", "sh"]);
    let before = std::fs::read("/etc/resolv.conf").ok();
    let out = run_sh(&[], "ip link show eth0 >/dev/null && exit 0");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read("/etc/resolv.conf").ok(), before);
    // No temporary resolv.conf left behind.
    let tmp = std::env::temp_dir();
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("usernet-resolv-{}", std::process::id())))
        .collect();
    assert!(left.is_empty());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn exit_codes() {
    common::require(&["sh"]);
    assert_eq!(run_sh(&[], "exit 0").status.code(), Some(0));
    assert_eq!(run_sh(&[], "exit 3").status.code(), Some(3));
    // Killed by a signal: 128 + N, as shells report it.
    assert_eq!(run_sh(&[], "kill -TERM $$").status.code(), Some(143));

    let run = |cmd: &str| {
        Command::new(BIN)
            .args(["run", "--debug-no-engine", "--dns-upstream", "127.0.0.1:5399", "--"])
            .arg(cmd)
            .output()
            .expect("spawn usernet")
    };
    let out = run("usernet-no-such-command");
    assert_eq!(out.status.code(), Some(127));
    assert_eq!(text(&out.stderr).trim(), "usernet: usernet-no-such-command: command not found");
    let out = run("/nonexistent/usernet/cmd");
    assert_eq!(out.status.code(), Some(127));

    let dir = TempDir::new("noexec");
    let file = dir.path().join("script.sh");
    std::fs::write(&file, "echo should not run\n").unwrap();
    let out = run(file.to_str().unwrap());
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("Permission denied"));
    assert!(out.stdout.is_empty());
}

#[test]
fn usage_errors_are_125() {
    let out = Command::new(BIN).args(["run", "--mtu", "12", "--", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    let out = Command::new(BIN)
        .args(["run", "--debug-no-engine", "--pcap", "/nonexistent/dir/x.pcap", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert_eq!(text(&out.stderr).lines().count(), 1, "{}", text(&out.stderr));
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn signals_are_forwarded() {
    common::require(&["sh", "sleep"]);
    for (sig, name) in [
        (libc::SIGTERM, "TERM"),
        (libc::SIGINT, "INT"),
        (libc::SIGHUP, "HUP"),
        (libc::SIGQUIT, "QUIT"),
        (libc::SIGUSR1, "USR1"),
        (libc::SIGUSR2, "USR2"),
        (libc::SIGALRM, "ALRM"),
    ] {
        let script = format!(
            "trap 'echo got-{name}; exit 7' {name}; echo ready; \
             i=0; while [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; exit 1"
        );
        let mut child = Command::new(BIN)
            .args(["run", "--debug-no-engine", "--dns-upstream", "127.0.0.1:5399"])
            .args(["--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = wait_bounded(&mut child, Duration::from_secs(10));
        assert_eq!(lines.next().unwrap().unwrap(), format!("got-{name}"));
        assert_eq!(status, Some(7), "signal {name}");
    }
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn leftover_processes_are_killed() {
    common::require(&["sh", "sleep", "setsid"]);
    // A background child, and a daemon that left the process tree (setsid, reparented).
    let out = run_sh(&[], "sleep 1000 & echo $!; (setsid sleep 1001 & echo $!); sleep 0.2; exit 4");
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let pids: Vec<i32> = text(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        // usernet reaps them before it exits: they are gone, not even zombies.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(comm.trim(), "sleep", "pid {pid} survived");
    }
}

/// A process that entered the namespace from outside while COMMAND ran (`nsenter`, as one
/// debugs a container) is not COMMAND's: when COMMAND ends and leaves nothing behind, usernet
/// exits without searching /proc, and that process keeps running.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_process_that_entered_from_outside_keeps_running() {
    common::require(&["sh", "nsenter", "sleep"]);
    let mut child = Command::new(BIN)
        .args(["run", "--debug-no-engine", "--dns-upstream", "127.0.0.1:5399", "--"])
        .args(["sh", "-c", "echo $$; read x; exit 0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn usernet");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let pid = lines.next().unwrap().unwrap().trim().to_string();
    let netns = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let mut outsider = Command::new("nsenter").args(["-t", &pid, "-n", "--", "sleep", "60"]).spawn().unwrap();
    // Until nsenter has joined the namespace and exec'd sleep.
    let start = Instant::now();
    let inside = |p: u32| {
        std::fs::read_link(format!("/proc/{p}/ns/net")).ok() == Some(netns.clone())
            && std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sleep")
    };
    while !inside(outsider.id()) {
        assert!(start.elapsed() < Duration::from_secs(10), "nsenter did not join the namespace");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(child.stdin.take());
    let status = wait_bounded(&mut child, Duration::from_secs(10));
    let running = outsider.try_wait().unwrap().is_none();
    let _ = outsider.kill();
    let _ = outsider.wait();
    assert_eq!(status, Some(0));
    assert!(running, "usernet killed a process that entered its namespace from outside");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootless_as_nobody() {
    common::require(&["runuser", "ip", "sh", "cat"]);
    // The build tree may not be readable by nobody: run a copy.
    let dir = TempDir::new("rootless");
    let bin = dir.path().join("usernet");
    std::fs::copy(BIN, &bin).unwrap();
    chmod(dir.path(), 0o755);
    chmod(&bin, 0o755);
    let out = Command::new("runuser")
        .args(["-u", "nobody", "--"])
        .arg(&bin)
        .args(["run", "--debug-no-engine", "--dns-upstream", "127.0.0.1:5399", "--"])
        .args(["sh", "-c", "id -u; ip -o -4 addr show eth0; ip route; cat /etc/resolv.conf; exit 5"])
        .current_dir("/")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(5), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("0\n"), "{stdout}");
    assert!(stdout.contains("inet 192.168.65.2/24"), "{stdout}");
    assert!(stdout.contains("default via 192.168.65.1 dev eth0"), "{stdout}");
    assert!(stdout.contains("nameserver 192.168.65.1"), "{stdout}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn no_namespaces_allowed_is_one_line_and_125() {
    common::require(&["unshare", "setpriv", "sh"]);
    // Root in a user namespace that may create no further user namespace, without any
    // capability: neither a network namespace nor the user-namespace fallback can work.
    let script = format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && \
         exec setpriv --inh-caps=-all --bounding-set=-all {BIN} run --debug-no-engine \
         --dns-upstream 127.0.0.1:5399 -- true"
    );
    let out = Command::new("unshare")
        .args(["--user", "--map-root-user", "sh", "-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("this test cannot run: cannot start unshare: {e}"));
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("setpriv: not found") && !stderr.contains("max_user_namespaces"),
        "this test cannot run: cannot build its environment (setpriv, or a user namespace \
         whose max_user_namespaces can be set to 0): {stderr}"
    );
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("usernet: cannot create a "), "{stderr}");
    assert!(stderr.contains("user namespaces"), "{stderr}");
}

/// /etc/resolv.conf missing or a dangling symlink: /etc is shadowed, the rest still visible,
/// mounts below /etc too.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn missing_or_dangling_resolv_conf() {
    common::require(&["unshare", "mount", "sh", "cat"]);
    for dangling in [false, true] {
        shadowed_etc_shows_the_original(dangling, "");
    }
}

/// The same where the kernel has no open_tree(2) (before Linux 5.2, or a seccomp profile
/// that refuses it): a seccomp filter (libseccomp's Python binding) makes it fail with
/// ENOSYS, and /etc is shadowed the older way (`resolv::shadow_etc`).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn etc_is_shadowed_without_open_tree() {
    common::require(&["unshare", "mount", "sh", "cat", "/usr/bin/python3"]);
    let probe = Command::new("/usr/bin/python3").args(["-c", "import seccomp"]).output().unwrap();
    assert!(
        probe.status.success(),
        "this test cannot run: no libseccomp for Python (Debian's python3-seccomp): {}",
        text(&probe.stderr)
    );
    let without_open_tree = "/usr/bin/python3 -c 'import errno, os, sys, seccomp; \
         f = seccomp.SyscallFilter(seccomp.ALLOW); f.add_rule(seccomp.ERRNO(errno.ENOSYS), \"open_tree\"); \
         f.load(); os.execv(sys.argv[1], sys.argv[1:])'";
    shadowed_etc_shows_the_original(true, without_open_tree);
}

/// Runs `usernet run` (through `wrapper`, a command line that execs its arguments, if not
/// empty) in a private mount namespace whose /etc is a test directory, with a directory
/// bind-mounted below it and a missing or (`dangling`) dangling resolv.conf; checks what
/// COMMAND reads there, and that nothing was created in the directory.
fn shadowed_etc_shows_the_original(dangling: bool, wrapper: &str) {
    let dir = TempDir::new("etc");
    let etc = dir.path().join("etc");
    std::fs::create_dir(&etc).unwrap();
    std::fs::write(etc.join("marker"), "marker-text\n").unwrap();
    std::fs::create_dir(etc.join("sub")).unwrap();
    std::fs::write(etc.join("sub/inner"), "inner-text\n").unwrap();
    std::fs::create_dir(etc.join("mounted")).unwrap();
    let below = dir.path().join("below");
    std::fs::create_dir(&below).unwrap();
    std::fs::write(below.join("file"), "below-text\n").unwrap();
    std::os::unix::fs::symlink("marker", etc.join("link")).unwrap();
    if dangling {
        std::os::unix::fs::symlink("../run/usernet-nonexistent/resolv.conf", etc.join("resolv.conf")).unwrap();
    }
    // A private mount namespace whose /etc is our test directory (the binary needs no
    // /etc to start), with a mount below it (as a container's /etc/hosts is). The usernet
    // inside sees the missing or dangling resolv.conf.
    let script = format!(
        "mount --bind {etc} /etc && mount --bind {below} /etc/mounted && \
         {wrapper} {BIN} run --debug-no-engine --dns-upstream 127.0.0.1:5399 \
         -- sh -c 'cat /etc/resolv.conf /etc/marker /etc/sub/inner /etc/link /etc/mounted/file'",
        etc = etc.display(),
        below = below.display(),
    );
    let out = Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]).output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("nameserver 192.168.65.1\n"), "{stdout}");
    assert!(stdout.contains("marker-text\ninner-text\nmarker-text\nbelow-text\n"), "{stdout}");
    // Nothing was created in the (bind-mounted) directory itself.
    let mut names: Vec<String> =
        std::fs::read_dir(&etc).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let mut want = vec!["link", "marker", "mounted", "sub"];
    if dangling {
        want.push("resolv.conf");
    }
    want.sort();
    assert_eq!(names, want);
}

fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("usernet did not exit within {limit:?}");
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let path = std::env::temp_dir().join(format!("usernet-test-{tag}-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir(&path).unwrap();
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
