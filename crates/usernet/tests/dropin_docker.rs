//! Rootless Docker with usernet as its slirp4netns: Debian's docker.io 20.10
//! (`dockerd-rootless.sh`, which starts rootlesskit 1.1.0, which starts `slirp4netns` and
//! dockerd inside), run as a user of the test's own (`usernet-dropin`) without systemd,
//! the way `dockerd-rootless.sh` is run by hand: the directory where `slirp4netns` is
//! usernet first in PATH, a private XDG_RUNTIME_DIR, a data root of the test's own and the
//! vfs storage driver. There is no registry: the image is `docker import`ed from a tar of
//! the busybox root file system.
//!
//! - `dockerd_rootless_slirp4netns_port_driver`: `DOCKERD_ROOTLESS_ROOTLESSKIT_NET=slirp4netns`,
//!   `..._PORT_DRIVER=slirp4netns`, `..._MTU=65520`: published ports are usernet's
//!   listeners (`add_hostfwd`/`remove_hostfwd` on the API socket, through
//!   rootlesskit-docker-proxy). `docker run -d -p PORT:80 IMAGE httpd` answers on the host
//!   (sha256); a container fetches a file from a remote-host namespace (sha256), resolves
//!   through 10.0.2.3 and finds the host's loopback closed (dockerd-rootless.sh always passes
//!   `--disable-host-loopback`); `docker rm -f` releases the port; stopping dockerd (SIGTERM
//!   to dockerd itself) ends rootlesskit and usernet, with a container still running.
//! - `dockerd_rootless_defaults`: no settings at all: dockerd-rootless.sh picks slirp4netns
//!   from `slirp4netns --help` (it greps for `--netns-type`) with MTU 65520 and rootlesskit's
//!   builtin port driver; published port and outbound traffic; SIGTERM to rootlesskit (what
//!   `systemctl --user stop docker` does) ends everything.
//!
//! Both check that the `slirp4netns` rootlesskit ran is usernet (its /proc/PID/exe is the
//! copy under test), with neither `--enable-sandbox` nor `--enable-seccomp` (rootlesskit's
//! `auto` finds them missing from `--help`), and that no process of the daemon is left.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::dropin::*;
use common::*;

/// Debian's docker.io puts the script here (not on PATH).
const DOCKERD_ROOTLESS: &str = "/usr/share/docker.io/contrib/dockerd-rootless.sh";
/// docker.io's client (another docker may come first on PATH).
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "usernet-busybox:1";

const TOOLS: &[&str] = &[
    "dockerd",
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "rootlesskit",
    "rootlesskit-docker-proxy",
    "docker-proxy",
    "iptables",
    "newuidmap",
    "newgidmap",
    "runuser",
    "setpriv",
    "useradd",
    "busybox",
    "tar",
    "curl",
    "ss",
    "ip",
    "python3",
];

/// [`require`], and the two files of docker.io that are not found on PATH.
fn require_docker() {
    require(TOOLS);
    for file in [DOCKERD_ROOTLESS, DOCKER] {
        assert!(
            Path::new(file).is_file(),
            "this test cannot run: {file} not found (Debian package docker.io); run it as root with the test \
             tools installed, e.g. sudo bash .ci/run"
        );
    }
}

/// One process, from /proc.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    ppid: u32,
    uid: u32,
    cmdline: String,
    exe: Option<PathBuf>,
}

fn processes() -> Vec<Proc> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let after = &stat[stat.rfind(')')? + 1..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            let uid = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&raw).trim_end_matches('\0').replace('\0', " ");
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            Some(Proc { pid, ppid, uid, cmdline, exe })
        })
        .collect()
}

fn process_alive(pid: u32) -> bool {
    // A zombie is gone for our purposes (its parent has yet to reap it).
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 1..].trim_start().starts_with('Z')))
        .is_some_and(|zombie| !zombie)
}

/// A rootless dockerd started by dockerd-rootless.sh as [`USER`], stopped and cleaned up
/// on Drop (every process it started, the containers' shims included, is killed).
struct RootlessDocker {
    r: Rootless,
    data: TempDir,
    /// setpriv execs env, which execs the script, which execs rootlesskit: this is rootlesskit.
    daemon: Background,
}

impl RootlessDocker {
    /// Starts dockerd-rootless.sh with `settings` (DOCKERD_ROOTLESS_* variables) and waits
    /// (bounded) until the daemon answers.
    fn start(tag: &str, settings: &[(&str, &str)]) -> RootlessDocker {
        let r = Rootless::new(tag);
        let data = TempDir::new(&format!("{tag}-data"));
        chown(data.path(), USER);
        let uid = must("id", &["-u", USER]).stdout.trim().to_string();
        let gid = must("id", &["-g", USER]).stdout.trim().to_string();
        let mut c = Command::new("setpriv");
        c.args(["--reuid", &uid, "--regid", &gid, "--clear-groups", "--", "env", "-i"])
            .arg(format!("XDG_RUNTIME_DIR={}", r.runtime.display()))
            .arg(format!("HOME={}", r.home()))
            .arg(format!(
                "PATH={}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                r.bin_dir.path().display()
            ));
        for (k, v) in settings {
            c.arg(format!("{k}={v}"));
        }
        c.arg(DOCKERD_ROOTLESS).arg("--data-root").arg(data.path()).args(["--storage-driver", "vfs"]).current_dir("/");
        let daemon = Background::start(c, Stdio::null());
        let mut d = RootlessDocker { r, data, daemon };
        let start = Instant::now();
        loop {
            let v = d.docker(&["version", "--format", "{{.Server.Version}}"]);
            if v.success() {
                break;
            }
            if let Some(code) = d.daemon.wait_exit(Duration::ZERO) {
                panic!("dockerd-rootless.sh exited ({code}) before the daemon answered:\n{}", d.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the daemon did not answer within 60 s: {v}\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        d
    }

    /// The client, as the user, talking to this daemon only.
    fn docker_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", USER, "--", "env", "-i"])
            .arg(format!("XDG_RUNTIME_DIR={}", self.r.runtime.display()))
            .arg(format!("HOME={}", self.r.home()))
            .arg(format!("DOCKER_HOST=unix://{}/docker.sock", self.r.runtime.display()))
            .arg("PATH=/usr/sbin:/usr/bin:/sbin:/bin")
            .arg(DOCKER)
            .args(args)
            .current_dir("/");
        c
    }

    fn docker(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.docker_command(args), Duration::from_secs(60))
    }

    fn must_docker(&self, args: &[&str]) -> Output {
        let out = self.docker(args);
        assert!(out.success(), "docker {}: {out}\n{}", args.join(" "), self.log());
        out
    }

    /// What the script, rootlesskit and dockerd said (without gRPC's chatter).
    fn log(&self) -> String {
        let all = format!("{}{}", self.daemon.stdout(), self.daemon.stderr());
        let lines: Vec<&str> = all.lines().filter(|l| !l.contains("module=grpc")).collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        format!("  daemon log (last {} lines):\n{}", tail.len(), tail.join("\n"))
    }

    /// The usernet copy rootlesskit runs as `slirp4netns` (through the symlink).
    fn usernet_exe(&self) -> PathBuf {
        self.r.bin_dir.join("usernet")
    }

    /// Every process of this daemon: those whose command line names its runtime directory
    /// or data root (rootlesskit, dockerd, containerd, the shims), usernet, and all their
    /// descendants (the containers' processes).
    fn processes(&self) -> Vec<Proc> {
        let all = processes();
        let runtime = self.r.runtime.to_string_lossy().into_owned();
        let data = self.data.path().to_string_lossy().into_owned();
        let usernet = self.usernet_exe();
        let me = std::process::id();
        let mut ours: BTreeSet<u32> = all
            .iter()
            .filter(|p| p.pid != me)
            .filter(|p| {
                p.cmdline.contains(&runtime)
                    || p.cmdline.contains(&data)
                    || p.exe.as_deref() == Some(usernet.as_path())
                    || p.pid == self.daemon.pid() as u32
            })
            .map(|p| p.pid)
            .collect();
        loop {
            let before = ours.len();
            for p in &all {
                if ours.contains(&p.ppid) {
                    ours.insert(p.pid);
                }
            }
            if ours.len() == before {
                break;
            }
        }
        all.into_iter().filter(|p| ours.contains(&p.pid) && process_alive(p.pid)).collect()
    }

    /// The `slirp4netns` process of this daemon; panics unless there is exactly one.
    fn slirp4netns(&self) -> Proc {
        let found: Vec<Proc> =
            self.processes().into_iter().filter(|p| p.cmdline.split(' ').next() == Some("slirp4netns")).collect();
        assert_eq!(found.len(), 1, "one slirp4netns process expected: {found:?}\n{}", self.log());
        found[0].clone()
    }

    /// The daemon's dockerd process.
    fn dockerd(&self) -> Proc {
        let found: Vec<Proc> =
            self.processes().into_iter().filter(|p| p.cmdline.split(' ').next() == Some("dockerd")).collect();
        assert_eq!(found.len(), 1, "one dockerd process expected: {found:?}\n{}", self.log());
        found[0].clone()
    }

    /// SIGKILL to every process of the daemon that is left, until none is (bounded).
    fn kill_leftovers(&self) {
        let _ = wait_until(Duration::from_secs(10), || {
            let left = self.processes();
            for p in &left {
                // SAFETY: plain kill(2) of a process this daemon started.
                unsafe {
                    libc::kill(p.pid as i32, libc::SIGKILL);
                }
            }
            left.is_empty()
        });
    }
}

impl Drop for RootlessDocker {
    fn drop(&mut self) {
        if self.daemon.wait_exit(Duration::ZERO).is_none() {
            self.daemon.signal(libc::SIGTERM);
            let _ = self.daemon.wait_exit(Duration::from_secs(30));
        }
        self.kill_leftovers();
    }
}

/// `docker import` of the busybox root file system (owned by root in the tar).
fn import_rootfs(d: &RootlessDocker) {
    let dir = TempDir::new("dk-tar");
    let tar = dir.join("rootfs.tar");
    must(
        "tar",
        &[
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "-C",
            &d.r.rootfs.path().to_string_lossy(),
            "-cf",
            &tar.to_string_lossy(),
            ".",
        ],
    );
    d.must_docker(&["import", &tar.to_string_lossy(), IMAGE]);
}

fn line_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

/// The checks every configuration shares: usernet is the slirp4netns, without the options
/// it does not list; its argv.
fn check_usernet_is_slirp4netns(d: &RootlessDocker) -> Proc {
    let s = d.slirp4netns();
    assert_eq!(s.exe.as_deref(), Some(d.usernet_exe().as_path()), "slirp4netns is not usernet: {s:?}");
    assert_eq!(s.uid, must("id", &["-u", USER]).stdout.trim().parse::<u32>().unwrap(), "{s:?}");
    for absent in ["--enable-sandbox", "--enable-seccomp"] {
        assert!(!s.cmdline.contains(absent), "{absent} passed to usernet: {}", s.cmdline);
    }
    assert!(s.cmdline.contains("--disable-host-loopback"), "{}", s.cmdline);
    assert!(s.cmdline.ends_with(" tap0"), "{}", s.cmdline);
    eprintln!("dockerd-rootless.sh's rootlesskit ran: {}", s.cmdline);
    s
}

/// A container that resolves a name through 10.0.2.3, downloads from the remote host and
/// tries the host's loopback through the gateway; what it printed.
fn outbound_from_a_container(d: &RootlessDocker, remote: &str, loopback_port: u16) -> String {
    let script = format!(
        "echo dns-answers $(nslookup host.docker.internal 2>&1 | grep -c 10.0.2.2); \
         echo outbound $(wget -q -O - http://{remote}/f | sha256sum); \
         echo loopback $(wget -q -T 5 -O - http://10.0.2.2:{loopback_port}/f 2>/dev/null | sha256sum)"
    );
    let out = d.must_docker(&["run", "--rm", IMAGE, "sh", "-c", &script]);
    out.stdout
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dockerd_rootless_slirp4netns_port_driver() {
    require_docker();
    let remote = RemoteHost::new();
    let files = TempDir::new("dk-remote");
    write_random_file(&files.join("f"), 1 << 20);
    let remote_hash = sha256_file(&files.join("f"));
    let remote_server = Server::start_in(&remote, ServerKind::Http, Some(files.path()));
    let (_lo_dir, lo_server, lo_hash) = serve_random_file("dk-lo", "f", 64 << 10);

    let d = RootlessDocker::start(
        "dk",
        &[
            ("DOCKERD_ROOTLESS_ROOTLESSKIT_NET", "slirp4netns"),
            ("DOCKERD_ROOTLESS_ROOTLESSKIT_MTU", "65520"),
            ("DOCKERD_ROOTLESS_ROOTLESSKIT_PORT_DRIVER", "slirp4netns"),
        ],
    );
    let s = check_usernet_is_slirp4netns(&d);
    assert!(s.cmdline.contains("--mtu 65520"), "{}", s.cmdline);
    assert!(s.cmdline.contains("--api-socket "), "the slirp4netns port driver needs the API socket: {}", s.cmdline);
    import_rootfs(&d);

    // A published port is usernet's listener (add_hostfwd through rootlesskit-docker-proxy).
    let port = free_port();
    d.must_docker(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &format!("{port}:80"),
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let published = fetch_hash(&format!("http://127.0.0.1:{port}/f"), Duration::from_secs(30));
    assert_eq!(published, d.r.file_hash, "published port {port}\n{}", d.log());
    let listener = run("ss", &["-Hltnp", &format!("sport = :{port}")]);
    assert!(listener.stdout.contains(&format!("pid={},", s.pid)), "port {port} is not usernet's: {listener}");

    let text = outbound_from_a_container(&d, &format!("{}:{}", remote.ip, remote_server.port), lo_server.port);
    assert_eq!(line_value(&text, "dns-answers "), Some("1"), "DNS through 10.0.2.3: {text}");
    assert_eq!(
        line_value(&text, "outbound ").map(first_word),
        Some(remote_hash),
        "outbound to the remote host: {text}"
    );
    // dockerd-rootless.sh passes --disable-host-loopback: 10.0.2.2 is not the host's loopback.
    assert_ne!(line_value(&text, "loopback ").map(first_word), Some(lo_hash), "host loopback open: {text}");

    d.must_docker(&["rm", "-f", "web"]);
    assert!(wait_until(Duration::from_secs(10), || !port_listening(port)), "port {port} still listening after rm -f");

    // Stopping dockerd with a container running (and publishing) ends rootlesskit and usernet.
    let port2 = free_port();
    d.must_docker(&[
        "run",
        "-d",
        "--stop-timeout",
        "2",
        "-p",
        &format!("127.0.0.1:{port2}:80"),
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    assert_eq!(fetch_hash(&format!("http://127.0.0.1:{port2}/f"), Duration::from_secs(30)), d.r.file_hash);
    let dockerd = d.dockerd();
    // SAFETY: kill(2) of the dockerd this test started.
    unsafe {
        libc::kill(dockerd.pid as i32, libc::SIGTERM);
    }
    let mut d = d;
    let exited = d.daemon.wait_exit(Duration::from_secs(40));
    assert!(exited.is_some(), "rootlesskit still running 40 s after SIGTERM to dockerd\n{}", d.log());
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(s.pid)),
        "usernet still running after dockerd stopped"
    );
    assert!(!port_listening(port2), "port {port2} still listening after dockerd stopped");
    let left = d.processes();
    assert!(left.is_empty(), "left running after dockerd stopped: {left:#?}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dockerd_rootless_defaults() {
    require_docker();
    let remote = RemoteHost::new();
    let files = TempDir::new("dk2-remote");
    write_random_file(&files.join("f"), 1 << 20);
    let remote_hash = sha256_file(&files.join("f"));
    let remote_server = Server::start_in(&remote, ServerKind::Http, Some(files.path()));
    let (_lo_dir, lo_server, lo_hash) = serve_random_file("dk2-lo", "f", 64 << 10);

    let mut d = RootlessDocker::start("dk2", &[]);
    let s = check_usernet_is_slirp4netns(&d);
    // Found through `slirp4netns --help`, which gives slirp4netns's MTU of 65520.
    assert!(s.cmdline.contains("--mtu 65520"), "{}", s.cmdline);
    import_rootfs(&d);

    // rootlesskit's builtin port driver: the listener is rootlesskit's own.
    let port = free_port();
    d.must_docker(&[
        "run",
        "-d",
        "--name",
        "web",
        "-p",
        &format!("{port}:80"),
        IMAGE,
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/www",
    ]);
    let published = fetch_hash(&format!("http://127.0.0.1:{port}/f"), Duration::from_secs(30));
    assert_eq!(published, d.r.file_hash, "published port {port}\n{}", d.log());

    let text = outbound_from_a_container(&d, &format!("{}:{}", remote.ip, remote_server.port), lo_server.port);
    assert_eq!(line_value(&text, "dns-answers "), Some("1"), "DNS through 10.0.2.3: {text}");
    assert_eq!(
        line_value(&text, "outbound ").map(first_word),
        Some(remote_hash),
        "outbound to the remote host: {text}"
    );
    assert_ne!(line_value(&text, "loopback ").map(first_word), Some(lo_hash), "host loopback open: {text}");

    d.must_docker(&["rm", "-f", "web"]);
    assert!(wait_until(Duration::from_secs(10), || !port_listening(port)), "port {port} still listening after rm -f");

    // SIGTERM to rootlesskit, the process dockerd-rootless.sh became.
    d.daemon.signal(libc::SIGTERM);
    let exited = d.daemon.wait_exit(Duration::from_secs(40));
    assert!(exited.is_some(), "rootlesskit still running 40 s after SIGTERM\n{}", d.log());
    assert!(
        wait_until(Duration::from_secs(10), || !process_alive(s.pid)),
        "usernet still running after rootlesskit exited"
    );
    let left = d.processes();
    assert!(left.is_empty(), "left running after rootlesskit exited: {left:#?}");
}
