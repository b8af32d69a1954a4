//! What the tests of the drop-in modes share: a rootless caller (a user of the test's own
//! with sub-ids, a private XDG_RUNTIME_DIR, a directory where `slirp4netns` and `pasta` are
//! usernet, a busybox root file system with a random file), and waiting helpers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::*;

/// The test user (created when missing) and the sub-ids its user namespaces map.
pub const USER: &str = "usernet-dropin";
pub const SUBIDS: &str = "400000-465535";

/// A rootless caller's environment: the user, a short private XDG_RUNTIME_DIR (Unix
/// socket paths must stay under 108 bytes), a directory whose `slirp4netns` is usernet,
/// and a busybox root file system with a random file to serve.
pub struct Rootless {
    pub runtime: PathBuf,
    pub bin_dir: TempDir,
    pub rootfs: TempDir,
    pub file_hash: String,
}

pub fn chown(path: &Path, user: &str) {
    must("chown", &["-R", user, &path.to_string_lossy()]);
}

impl Rootless {
    pub fn new(tag: &str) -> Rootless {
        {
            // The tests of one binary run in parallel: one of them makes the user.
            static MAKING_USER: std::sync::Mutex<()> = std::sync::Mutex::new(());
            let _one = MAKING_USER.lock().unwrap_or_else(|e| e.into_inner());
            if run("id", &["-u", USER]).code != 0 {
                must("useradd", &["-m", "-s", "/bin/sh", USER]);
            }
            let subuids = std::fs::read_to_string("/etc/subuid").unwrap_or_default();
            if !subuids.lines().any(|l| l.starts_with(&format!("{USER}:"))) {
                must("usermod", &["--add-subuids", SUBIDS, "--add-subgids", SUBIDS, USER]);
            }
        }
        let runtime = PathBuf::from(format!("/tmp/ud-{}", unique_id()));
        let _ = std::fs::remove_dir_all(&runtime);
        std::fs::create_dir(&runtime).expect("create XDG_RUNTIME_DIR");
        chown(&runtime, USER);
        must("chmod", &["0700", &runtime.to_string_lossy()]);

        let bin_dir = TempDir::new(&format!("{tag}-bin"));
        let usernet = copy_binary_for_others(&bin_dir);
        for name in ["slirp4netns", "pasta"] {
            std::os::unix::fs::symlink(&usernet, bin_dir.join(name)).expect("symlink the drop-in name");
        }

        let rootfs = TempDir::new(&format!("{tag}-rootfs"));
        for d in ["bin", "www", "etc", "tmp", "proc", "sys", "dev"] {
            std::fs::create_dir_all(rootfs.join(d)).expect("rootfs dir");
        }
        let busybox = find_tool("busybox").expect("busybox");
        std::fs::copy(busybox, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in ["sh", "wget", "nslookup", "httpd", "sleep", "sha256sum", "ip", "cat", "tail", "grep"] {
            std::os::unix::fs::symlink("busybox", rootfs.join(&format!("bin/{applet}"))).expect("applet");
        }
        write_random_file(&rootfs.join("www/f"), 1 << 20);
        let file_hash = sha256_file(&rootfs.join("www/f"));
        chown(rootfs.path(), USER);
        Rootless { runtime, bin_dir, rootfs, file_hash }
    }

    pub fn home(&self) -> String {
        format!("/home/{USER}")
    }

    /// `runuser -u USER -- env ... program args`, with the caller's environment.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("runuser");
        self.as_user(&mut c, program);
        c
    }

    /// [`Rootless::command`] inside the network namespace `netns` (a name of `ip netns
    /// add`'s): the user's programs see its interfaces and routes as the host's.
    pub fn command_in_netns(&self, netns: &str, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{netns}")).arg("runuser");
        self.as_user(&mut c, program);
        c
    }

    fn as_user(&self, c: &mut Command, program: &str) {
        c.args(["-u", USER, "--", "env"])
            .arg(format!("XDG_RUNTIME_DIR={}", self.runtime.display()))
            .arg(format!("HOME={}", self.home()))
            .arg(format!("PATH={}:{}", self.bin_dir.path().display(), search_path().to_string_lossy()))
            .arg(program)
            .current_dir("/");
    }

    pub fn slirp4netns(&self) -> PathBuf {
        self.bin_dir.join("slirp4netns")
    }

    pub fn pasta(&self) -> PathBuf {
        self.bin_dir.join("pasta")
    }

    /// Tells the guest's script to finish (it waits for this file, bounded).
    pub fn release_guest(&self) {
        std::fs::write(self.rootfs.join("www/stop"), b"").expect("write stop file");
    }
}

impl Drop for Rootless {
    fn drop(&mut self) {
        // Rootless podman leaves a pause process holding its user namespace (its pid file is
        // where podman's database says, not always under this runtime dir): every process
        // still running with this runtime dir in its environment is the test's to stop.
        let marker = format!("XDG_RUNTIME_DIR={}", self.runtime.display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|b| *b == 0).any(|v| v == marker.as_bytes()) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
            }
        }
        let _ = std::fs::remove_dir_all(&self.runtime);
    }
}

/// GET url until it answers with a body, for up to `limit`; the body's sha256.
pub fn fetch_hash(url: &str, limit: Duration) -> String {
    let start = Instant::now();
    let dir = TempDir::new("fetch");
    let body = dir.join("body");
    loop {
        let out = run("curl", &["-s", "-f", "--max-time", "5", "-o", &body.to_string_lossy(), url]);
        if out.code == 0 {
            return sha256_file(&body);
        }
        if start.elapsed() > limit {
            return format!("no answer from {url}: {}", out.stderr);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn port_listening(port: u16) -> bool {
    run("ss", &["-Hltn", &format!("sport = :{port}")]).stdout.contains(&format!(":{port}"))
}

/// Waits (bounded) for a child started with spawn to finish; its output.
/// Runs `sh -c script` as `shell` (a [`Rootless::command`] of `sh`), bounded by `limit`: its
/// exit status and its output (see [`wait_output`]).
pub fn run_script(mut shell: Command, script: &str, limit: Duration) -> (i32, String) {
    let child = shell
        .args(["-c", script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the script");
    wait_output(child, limit)
}

pub fn wait_output(child: std::process::Child, limit: Duration) -> (i32, String) {
    let start = Instant::now();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output());
    while !waiter.is_finished() && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !waiter.is_finished() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    let out = waiter.join().expect("waiter").expect("wait");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// podman 4.3.1 finds slirp4netns through containers.conf's `network_cmd_path`.
pub fn podman_config(r: &Rootless) {
    let dir = PathBuf::from(r.home()).join(".config/containers");
    std::fs::create_dir_all(&dir).expect("containers config dir");
    std::fs::write(
        dir.join("containers.conf"),
        format!(
            "[engine]\nruntime = \"runc\"\nnetwork_cmd_path = \"{}\"\nevents_logger = \"file\"\n\
             cgroup_manager = \"cgroupfs\"\n",
            r.slirp4netns().display()
        ),
    )
    .expect("containers.conf");
    std::fs::write(dir.join("storage.conf"), "[storage]\ndriver = \"vfs\"\n").expect("storage.conf");
    chown(&PathBuf::from(r.home()).join(".config"), USER);
}

/// A remote host whose servers answer each connection with the peer's address, and two
/// outbound addresses of the host's, one of each family, outside what the kernel would
/// choose for the remote host, that the remote host's routes lead back to: both on an
/// interface of the test's own ([`OutboundWorld::dummy`]), so that naming the interface
/// names them.
pub struct OutboundWorld {
    pub remote: RemoteHost,
    /// The host's addresses the kernel picks for the remote host.
    pub chosen: (String, String),
    /// The extra addresses.
    pub out: (String, String),
    /// The interface that holds them.
    pub dummy: String,
    servers: Vec<std::process::Child>,
}

impl Drop for OutboundWorld {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = run("ip", &["link", "del", &self.dummy]);
    }
}

/// The remote servers' ports (in the remote host's own namespace).
pub const PEER4_PORT: u16 = 8004;
pub const PEER6_PORT: u16 = 8006;

impl OutboundWorld {
    pub fn new() -> OutboundWorld {
        let remote = RemoteHost::new();
        let slot: u32 = remote.ns.trim_start_matches("unrh").parse().expect("slot");
        let host6 = remote.ip6.replace("::2", "::1");
        // 2001:db8:77::/48 is this world's alone (run_publish's peers are in 2001:db8:76::/48).
        let out6 = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0x77, slot as u16, 0, 0, 0, 0x10);
        let out = (format!("198.18.{slot}.1"), out6.to_string());
        let dummy = format!("{}d", remote.ns);
        let _ = run("ip", &["link", "del", &dummy]);
        // (A veth pair, both ends here: this machine's kernel has no dummy driver.)
        let peer = format!("{}e", remote.ns);
        must("ip", &["link", "add", &dummy, "type", "veth", "peer", "name", &peer]);
        must("ip", &["link", "set", &peer, "up"]);
        must("ip", &["link", "set", &dummy, "up"]);
        must("ip", &["addr", "add", &format!("{}/32", out.0), "dev", &dummy]);
        must("ip", &["-6", "addr", "add", &format!("{}/128", out.1), "dev", &dummy, "nodad"]);
        remote.exec(&["ip", "route", "add", "default", "via", &remote.host_ip]).assert_ok();
        remote.exec(&["ip", "-6", "route", "add", "default", "via", &host6]).assert_ok();
        let mut servers = Vec::new();
        for (listen, port, tag) in [("TCP4-LISTEN", PEER4_PORT, "peer4"), ("TCP6-LISTEN", PEER6_PORT, "peer6")] {
            let server = remote
                .command(&[
                    "socat",
                    &format!("{listen}:{port},fork,reuseaddr"),
                    &format!("SYSTEM:echo {tag} $SOCAT_PEERADDR"),
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("start socat");
            servers.push(server);
        }
        let ready = wait_until(Duration::from_secs(10), || {
            let ss = remote.exec(&["ss", "-Hltn"]).stdout;
            ss.contains(&format!(":{PEER4_PORT}")) && ss.contains(&format!(":{PEER6_PORT}"))
        });
        assert!(ready, "the remote servers did not start");
        let chosen = (remote.host_ip.clone(), host6);
        OutboundWorld { remote, chosen, out, dummy, servers }
    }

    /// What a container's script runs (busybox's nc alone): one connection of each family to
    /// the remote host, which answers with the peer's address.
    pub fn busybox_script(&self) -> String {
        format!("(sleep 2 | nc {} {PEER4_PORT}); (sleep 2 | nc {} {PEER6_PORT})", self.remote.ip, self.remote.ip6)
    }

    /// The same with socat, for a namespace that sees the host's programs.
    pub fn script(&self) -> String {
        format!(
            "socat -t5 -T5 - TCP4:{}:{PEER4_PORT} </dev/null; socat -t5 -T5 - TCP6:[{}]:{PEER6_PORT} </dev/null",
            self.remote.ip, self.remote.ip6
        )
    }
}

/// The peer addresses the remote host saw in `text` (`peer4 ADDR`, `peer6 [ADDR]`).
pub fn peers(text: &str) -> (Option<String>, Option<String>) {
    let v6 = text
        .lines()
        .find_map(|l| l.strip_prefix("peer6"))
        .and_then(|a| a.trim().trim_matches(|c| c == '[' || c == ']').parse::<std::net::Ipv6Addr>().ok())
        .map(|a| a.to_string());
    (text.lines().find_map(|l| l.strip_prefix("peer4")).map(|a| a.trim().to_string()), v6)
}
