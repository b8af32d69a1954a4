//! The four setups `usernet-bench` compares, how each one is built and torn down, and the
//! peer namespace that plays a remote client.
//!
//! Each setup yields an [`Env`]: the address the host-side servers bind to, the address the
//! agent dials from inside the namespace, the command prefix that runs the agent there, the
//! published port (the agent serves on it inside; host clients reach it from outside), and the
//! process whose CPU time and memory are the tool's cost:
//!
//! | setup       | namespace made by                  | agent runs under            | dials         | publishes                | tool process |
//! |-------------|------------------------------------|-----------------------------|---------------|--------------------------|--------------|
//! | usernet     | `usernet run` itself               | `usernet run -p P:P --`     | 192.168.65.254| `-p P:P`                 | `usernet run`|
//! | pasta       | `unshare -rUn sleep`, then `pasta` | `nsenter -t PID -U -n ...`  | its gateway   | `-t P`                   | pasta        |
//! | slirp4netns | `unshare -n sleep`, `slirp4netns`  | `nsenter -t PID -n`         | 10.0.2.2      | `add_hostfwd` on its API | slirp4netns  |
//! | veth        | `ip netns add`, a veth pair        | `ip netns exec NAME`        | host end      | nothing: dialled directly| none         |
//!
//! For the three user-mode stacks the servers listen on the host's 127.0.0.1 (each maps one
//! address of its network to the host's loopback); for veth they listen on the host end of the
//! pair. Over IPv6 (one row): usernet's ::254 leads to the host's [::1], veth's pair has
//! documentation addresses, slirp4netns (`--enable-ipv6`) has libslirp's fd00::2 for the
//! host's [::1], and pasta maps the IPv6 gateway it copied from the host to the host's [::1]
//! (a row only where the host has an IPv6 default route for pasta to copy). The MTU of the namespace's link is the tool's default (65520 for all four) or the one
//! asked for. Everything an `Env` started or created is undone when it is dropped: processes
//! are ours (children, or the pid pasta wrote to our pidfile, checked by name before it is
//! signalled), the veth namespace carries our pid in its name, and its pair goes with it.
//!
//! [`Peer`] is a namespace of our own joined to the host by a veth pair with documentation
//! addresses (198.51.100.1 on the host, .2 inside): a client there reaches a published port at
//! 198.51.100.1 and keeps its own address, so the tools cannot take their loopback shortcuts
//! (pasta's splice) and must carry the connection through their guest link.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// One of the compared setups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    Usernet,
    /// usernet with `--busy-poll 0`: no busy polling (on by default), to show what it buys.
    UsernetNoBusyPoll,
    /// usernet with `--engine-threads 2`: two engines, a TAP queue each, to show what the
    /// second core buys (and costs).
    UsernetTwoEngines,
    Pasta,
    Slirp4netns,
    Veth,
    /// passt: VMs only (the `--vm` phase), no namespace.
    Passt,
    /// usernet started as `slirp4netns` (a symlink), with the slirp4netns setup's arguments.
    UsernetAsSlirp4netns,
    /// usernet started as `pasta` (a symlink), with the pasta setup's arguments.
    UsernetAsPasta,
    /// A container of podman's (rootful, `--rootfs`) on `slirp4netns:port_handler=slirp4netns`.
    PodmanSlirp4netns,
    /// The same, with usernet as podman's slirp4netns (`--network-cmd-path`).
    PodmanUsernet,
}

impl Setup {
    /// Every setup, in the table's column order.
    pub const ALL: [Setup; 11] = [
        Setup::Usernet,
        Setup::UsernetNoBusyPoll,
        Setup::UsernetTwoEngines,
        Setup::Pasta,
        Setup::Slirp4netns,
        Setup::Veth,
        Setup::Passt,
        Setup::UsernetAsSlirp4netns,
        Setup::UsernetAsPasta,
        Setup::PodmanSlirp4netns,
        Setup::PodmanUsernet,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Setup::Usernet => "usernet",
            Setup::UsernetNoBusyPoll => "usernet-no-busy-poll",
            Setup::UsernetTwoEngines => "usernet-2-engines",
            Setup::Pasta => "pasta",
            Setup::Slirp4netns => "slirp4netns",
            Setup::Veth => "veth",
            Setup::Passt => "passt",
            Setup::UsernetAsSlirp4netns => "usernet-as-slirp4netns",
            Setup::UsernetAsPasta => "usernet-as-pasta",
            Setup::PodmanSlirp4netns => "podman-slirp4netns",
            Setup::PodmanUsernet => "podman-usernet",
        }
    }

    /// The drop-in setups (`--drop-in`): usernet under the other programs' names, and podman
    /// with either slirp4netns.
    pub fn is_drop_in(self) -> bool {
        matches!(
            self,
            Setup::UsernetAsSlirp4netns | Setup::UsernetAsPasta | Setup::PodmanSlirp4netns | Setup::PodmanUsernet
        )
    }

    /// Whether the tool's process is `usernet run` itself, the agent's parent (no other pid).
    pub fn is_usernet_run(self) -> bool {
        matches!(self, Setup::Usernet | Setup::UsernetNoBusyPoll | Setup::UsernetTwoEngines)
    }

    /// Whether the setup gives a network namespace (the main phases); passt serves VMs only.
    pub fn has_namespace(self) -> bool {
        self != Setup::Passt
    }

    /// Whether it serves a VM in the VM phase (`usernet serve`, passt).
    pub fn serves_vms(self) -> bool {
        matches!(self, Setup::Usernet | Setup::Passt)
    }

    pub fn parse(s: &str) -> Option<Setup> {
        Setup::ALL.into_iter().find(|x| x.name() == s || (s == "slirp" && *x == Setup::Slirp4netns))
    }

    /// Why this setup cannot run on this machine, if it cannot.
    pub fn unavailable(self, opts: &Tools) -> Option<String> {
        let root = nix::unistd::geteuid().is_root();
        match self {
            Setup::Usernet | Setup::UsernetNoBusyPoll | Setup::UsernetTwoEngines if !opts.usernet_bin.exists() => {
                Some(format!("{} not found", opts.usernet_bin.display()))
            }
            Setup::Usernet | Setup::UsernetNoBusyPoll | Setup::UsernetTwoEngines => None,
            Setup::Pasta if opts.pasta_bin.components().count() > 1 && !opts.pasta_bin.is_file() => {
                Some(format!("{} not found", opts.pasta_bin.display()))
            }
            Setup::Pasta if opts.pasta_bin.components().count() == 1 => {
                missing(&[&opts.pasta_bin.to_string_lossy(), "unshare", "nsenter"])
            }
            Setup::Pasta => missing(&["unshare", "nsenter"]),
            Setup::Slirp4netns if !root => Some("needs root".into()),
            Setup::Slirp4netns => missing(&["slirp4netns", "unshare", "nsenter"]),
            Setup::Veth if !root => Some("needs root".into()),
            Setup::Veth => missing(&["ip"]),
            Setup::Passt if opts.passt_bin.components().count() > 1 => {
                (!opts.passt_bin.is_file()).then(|| format!("{} not found", opts.passt_bin.display()))
            }
            Setup::Passt => missing(&[&opts.passt_bin.to_string_lossy()]),
            Setup::UsernetAsSlirp4netns | Setup::UsernetAsPasta | Setup::PodmanUsernet
                if !opts.usernet_bin.exists() =>
            {
                Some(format!("{} not found", opts.usernet_bin.display()))
            }
            Setup::UsernetAsPasta => missing(&["unshare", "nsenter"]),
            Setup::UsernetAsSlirp4netns if !root => Some("needs root".into()),
            Setup::UsernetAsSlirp4netns => missing(&["unshare", "nsenter"]),
            Setup::PodmanSlirp4netns | Setup::PodmanUsernet if !root => Some("needs root".into()),
            Setup::PodmanSlirp4netns => missing(&["podman", "slirp4netns", "busybox", "nsenter", "runuser"]),
            Setup::PodmanUsernet => missing(&["podman", "busybox", "nsenter", "runuser"]),
        }
    }
}

fn missing(tools: &[&str]) -> Option<String> {
    tools.iter().find(|t| find_in_path(t).is_none()).map(|t| format!("{t} not installed"))
}

pub(super) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(name)).find(|p| p.is_file())
}

/// The binaries under test and a private directory for pidfiles, logs and sockets.
pub struct Tools {
    pub usernet_bin: PathBuf,
    pub pasta_bin: PathBuf,
    /// passt, for the VM phase.
    pub passt_bin: PathBuf,
    /// The user podman runs as (rootless), for the podman setups; None: rootful.
    pub podman_user: Option<String>,
    pub tmp: PathBuf,
}

/// A built setup, ready for one agent.
pub struct Env {
    /// Where the host-side servers listen.
    pub bind_ip: IpAddr,
    /// What the agent dials to reach them.
    pub target_ip: IpAddr,
    /// The same over IPv6 (where the servers listen, what the agent dials); None where the
    /// setup gives the namespace no IPv6 path to the host.
    pub ipv6: Option<(IpAddr, IpAddr)>,
    /// The command that runs the agent (appended) inside the namespace.
    pub prefix: Vec<OsString>,
    /// The port the agent serves on inside the namespace.
    pub sink_port: u16,
    /// What a host client on loopback dials to reach it (the published port, or for veth
    /// the namespace's own address).
    pub lo_target: SocketAddr,
    /// What the peer namespace dials to reach it; None where it cannot (veth: the host
    /// dials `lo_target` instead).
    pub peer_target: Option<SocketAddr>,
    /// The tool's process, if it is not the prefix's own process (`usernet run` is).
    pub tool_pid: Option<i32>,
    /// How the setup was built, for the report.
    pub setup_commands: Vec<String>,
    _cleanup: Cleanup,
}

/// Undoes a setup: signals our daemons, kills our children, deletes our namespace.
#[derive(Default)]
struct Cleanup {
    /// Commands that undo what a tool made (`podman rm`), run first.
    undo: Vec<Command>,
    /// Daemons known by a pidfile read at cleanup (pidfile, expected name prefix).
    pidfiles: Vec<(PathBuf, &'static str)>,
    /// Directories of ours outside the run's temporary directory, removed last.
    dirs: Vec<PathBuf>,
    /// Daemonized processes (pid, expected name prefix).
    daemons: Vec<(i32, &'static str)>,
    children: Vec<Child>,
    netns: Option<String>,
    veth_host: Option<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cmd in &mut self.undo {
            let _ = run_checked(cmd);
        }
        for (file, comm) in &self.pidfiles {
            if let Some(pid) = std::fs::read_to_string(file).ok().and_then(|t| t.trim().parse::<i32>().ok()) {
                stop_daemon(pid, comm);
            }
        }
        for &(pid, comm) in &self.daemons {
            stop_daemon(pid, comm);
        }
        for child in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting one end of a veth pair deletes both at once; the pair would also go with
        // the namespace, but the kernel dismantles namespaces in the background.
        if let Some(link) = &self.veth_host
            && Path::new("/sys/class/net").join(link).exists()
        {
            let _ = run_checked(Command::new("ip").args(["link", "del", link]));
        }
        if let Some(ns) = &self.netns {
            let _ = run_checked(Command::new("ip").args(["netns", "del", ns]));
        }
        for dir in &self.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// SIGTERM, then SIGKILL after a second, to a daemon we started (if it is still that daemon).
fn stop_daemon(pid: i32, comm: &str) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let is_ours = || std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|c| c.starts_with(comm)).unwrap_or(false);
    if !is_ours() {
        return;
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(1);
    while is_ours() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if is_ours() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Runs a setup command to completion (bounded), failing with its stderr on error.
fn run_checked(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = show(cmd);
    let out = cmd.stdin(Stdio::null()).output().with_context(|| format!("run {shown}"))?;
    if !out.status.success() {
        anyhow::bail!("{shown}: {} {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A command as a shell-like line, for messages and the report.
pub fn show(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The MTU every setup uses unless asked for another: the default of all three tools.
pub const DEFAULT_MTU: u32 = 65520;

/// Where [`free_port`] looks: below Linux's default ephemeral range (32768-60999). A port the
/// kernel handed out to pick one is an ephemeral one, which the bench's own clients may take for
/// an outgoing connection (thousands of them in the connection-rate test) before the tool binds
/// it; that failed a run with "port is already allocated".
const PUBLISHED_PORTS: std::ops::Range<u16> = 20000..32768;

/// A TCP port that is free on the host right now, on every address of both families (for a
/// published port, which the tools bind on [::] or 0.0.0.0).
fn free_port() -> anyhow::Result<u16> {
    let span = PUBLISHED_PORTS.end - PUBLISHED_PORTS.start;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = (std::process::id() ^ nanos) as u16 % span;
    let free = |port: u16| {
        // One after the other: a dual-stack [::] bind conflicts with a 0.0.0.0 one still held.
        let bindable = |ip: IpAddr| TcpListener::bind((ip, port)).map(drop).is_ok();
        bindable(Ipv4Addr::UNSPECIFIED.into())
            && (bindable(Ipv6Addr::UNSPECIFIED.into()) || !Path::new("/proc/net/if_inet6").exists())
    };
    (0..span)
        .map(|i| PUBLISHED_PORTS.start + (start + i) % span)
        .find(|&p| free(p))
        .with_context(|| format!("no free TCP port in {PUBLISHED_PORTS:?}"))
}

/// Builds `setup` with a link MTU of `mtu`.
pub fn prepare(setup: Setup, tools: &Tools, mtu: u32, peer_ip: Option<Ipv4Addr>) -> anyhow::Result<Env> {
    let port = free_port()?;
    let mut env = match setup {
        Setup::Usernet => usernet(&tools.usernet_bin, mtu, port, &[]),
        Setup::UsernetNoBusyPoll => usernet(&tools.usernet_bin, mtu, port, &["--busy-poll", "0"]),
        Setup::UsernetTwoEngines => usernet(&tools.usernet_bin, mtu, port, &["--engine-threads", "2"]),
        Setup::Pasta => pasta(&tools.pasta_bin, &tools.tmp, mtu, port, Runas::AsPasta),
        Setup::Slirp4netns => slirp4netns(Path::new("slirp4netns"), &tools.tmp, mtu, port),
        Setup::Veth => return veth(mtu, port),
        Setup::Passt => anyhow::bail!("passt serves VMs only"),
        Setup::UsernetAsSlirp4netns => slirp4netns(&drop_in_link(tools, "slirp4netns")?, &tools.tmp, mtu, port),
        Setup::UsernetAsPasta => pasta(&drop_in_link(tools, "pasta")?, &tools.tmp, mtu, port, Runas::Never),
        Setup::PodmanSlirp4netns => podman(None, tools.podman_user.as_deref(), &tools.tmp, mtu, port),
        Setup::PodmanUsernet => podman(Some(&tools.usernet_bin), tools.podman_user.as_deref(), &tools.tmp, mtu, port),
    }?;
    env.peer_target = peer_ip.map(|ip| SocketAddr::new(ip.into(), port));
    Ok(env)
}

/// The command that starts `setup` with a fresh network around `true` and ends with it,
/// for the start-up row; Err: why the setup has no such command.
pub fn startup_command(setup: Setup, tools: &Tools) -> Result<Command, String> {
    match setup {
        Setup::Usernet | Setup::UsernetTwoEngines => {
            let mut cmd = Command::new(&tools.usernet_bin);
            cmd.args(["run", "--dns-upstream", "127.0.0.1:9"]);
            if setup == Setup::UsernetTwoEngines {
                cmd.args(["--engine-threads", "2"]);
            }
            cmd.args(["--", "true"]);
            Ok(cmd)
        }
        Setup::Pasta => {
            let mut cmd = Command::new(&tools.pasta_bin);
            if nix::unistd::geteuid().is_root() {
                cmd.args(["--runas", "0:0"]);
            }
            cmd.args(["--config-net", "-q", "--", "true"]);
            Ok(cmd)
        }
        // No tool: the kernel's floor, a new network namespace.
        Setup::Veth => {
            let mut cmd = Command::new("unshare");
            cmd.args(["-n", "true"]);
            Ok(cmd)
        }
        Setup::Slirp4netns => Err("it runs no command: its caller makes the namespace".into()),
        _ => Err("measured for usernet (one engine and two), pasta and the kernel only".into()),
    }
}

/// `usernet run`'s setup, with `options` beyond the defaults.
fn usernet(bin: &Path, mtu: u32, port: u16, options: &[&str]) -> anyhow::Result<Env> {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        // A dead loopback port: the benchmark never resolves a name, and must not reach the
        // machine's resolver even by accident.
        .args(["--dns-upstream", "127.0.0.1:9"])
        .args(["-p", &format!("{port}:{port}")]);
    cmd.args(options);
    if mtu != DEFAULT_MTU {
        cmd.args(["--mtu", &mtu.to_string()]);
    }
    cmd.arg("--");
    let prefix = std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(OsString::from).collect();
    Ok(Env {
        bind_ip: Ipv4Addr::LOCALHOST.into(),
        target_ip: Ipv4Addr::new(192, 168, 65, 254).into(),
        // The host address of usernet's default IPv6 prefix (::254 of fd75:7365:726e::/64)
        // leads to the host's [::1].
        ipv6: Some((Ipv6Addr::LOCALHOST.into(), Ipv6Addr::new(0xfd75, 0x7365, 0x726e, 0, 0, 0, 0, 0x254).into())),
        prefix,
        sink_port: port,
        lo_target: (Ipv4Addr::LOCALHOST, port).into(),
        peer_target: None,
        tool_pid: None,
        setup_commands: Vec::new(),
        _cleanup: Cleanup::default(),
    })
}

/// Starts `unshare ARGS sleep 600` and waits until the sleeper is in a new network namespace.
fn namespace_holder(unshare_args: &[&str], cleanup: &mut Cleanup) -> anyhow::Result<(i32, String)> {
    let mut cmd = Command::new("unshare");
    cmd.args(unshare_args).args(["sleep", "600"]);
    let shown = show(&cmd);
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {shown}"))?;
    let pid = child.id() as i32;
    cleanup.children.push(child);
    let ours = std::fs::read_link("/proc/self/ns/net").context("read our network namespace")?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        // unshare execs sleep in place, so the child's pid is the sleeper's.
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net"));
        let exe = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if matches!(&theirs, Ok(ns) if *ns != ours) && exe.trim() == "sleep" {
            return Ok((pid, shown));
        }
        if Instant::now() >= deadline {
            anyhow::bail!("{shown} did not make a namespace within 5 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a default route in `pid`'s network namespace and returns its gateway.
fn wait_default_gateway(pid: i32, what: &str, log: Option<&Path>) -> anyhow::Result<Ipv4Addr> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/route"))
            && let Some(gw) = default_gateway(&table)
        {
            return Ok(gw);
        }
        if Instant::now() >= deadline {
            let log = log
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|l| format!(": {}", l.trim()))
                .unwrap_or_default();
            anyhow::bail!("{what} set up no default route within 10 s{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to 10 s until the namespace entered with `prefix` (nsenter's arguments) has a
/// global IPv6 address past duplicate address detection and an IPv6 default route; the
/// route's gateway, or None when it gets none (the setup then has no IPv6 row).
fn wait_ipv6_gateway(prefix: &[OsString]) -> Option<Ipv6Addr> {
    let ip = |args: &[&str]| {
        let (cmd, rest) = prefix.split_first()?;
        let out = Command::new(cmd).args(rest).arg("ip").args(args).stdin(Stdio::null()).output().ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let usable = ip(&["-6", "-o", "addr", "show", "scope", "global"])
            .is_some_and(|a| a.lines().any(|l| !l.contains("tentative")));
        let gateway = ip(&["-6", "route", "show", "default"]).and_then(|r| {
            let words: Vec<&str> = r.split_whitespace().collect();
            words.windows(2).find(|w| w[0] == "via").and_then(|w| w[1].parse::<Ipv6Addr>().ok())
        });
        if let (true, Some(gw)) = (usable, gateway) {
            return Some(gw);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The gateway of the default route in a /proc/net/route table.
fn default_gateway(table: &str) -> Option<Ipv4Addr> {
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || f[1] != "00000000" {
            return None;
        }
        // The kernel prints the network-order address as a native-endian hex word.
        let raw = u32::from_str_radix(f[2], 16).ok()?;
        let gw = Ipv4Addr::from(raw.to_ne_bytes());
        (!gw.is_unspecified()).then_some(gw)
    })
}

/// A symlink named `name` to the usernet under test, in a directory of the run's own: usernet
/// looks at the name it was started under.
fn drop_in_link(tools: &Tools, name: &str) -> anyhow::Result<PathBuf> {
    let dir = tools.tmp.join("drop-in");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let link = dir.join(name);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(&tools.usernet_bin, &link).with_context(|| format!("create {}", link.display()))?;
    }
    Ok(link)
}

/// Whether pasta gets `--runas 0:0` as root (pasta otherwise drops to nobody, and nobody
/// cannot enter root's namespaces); usernet's pasta mode drops nothing and refuses it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Runas {
    AsPasta,
    Never,
}

fn pasta(bin: &Path, tmp: &Path, mtu: u32, port: u16, runas: Runas) -> anyhow::Result<Env> {
    let mut cleanup = Cleanup::default();
    let (pid, holder) = namespace_holder(&["-rUn"], &mut cleanup)?;
    let pidfile = tmp.join(format!("pasta-{pid}.pid"));
    let logfile = tmp.join(format!("pasta-{pid}.log"));
    let mut cmd = Command::new(bin);
    if runas == Runas::AsPasta && nix::unistd::geteuid().is_root() {
        cmd.args(["--runas", "0:0"]);
    }
    cmd.args(["--config-net", "-q", "--mtu", &mtu.to_string()])
        .args(["-t", &port.to_string(), "-u", "none", "-T", "none", "-U", "none"])
        .arg("-P")
        .arg(&pidfile)
        .arg(pid.to_string());
    let shown = show(&cmd);
    let log = std::fs::File::create(&logfile)?;
    // pasta configures the namespace, then daemonizes: its exit means "ready".
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log).spawn().with_context(|| format!("start {shown}"))?;
    let status = wait_bounded(&mut child, Duration::from_secs(10));
    let mut daemon_pid = None;
    if let Ok(text) = std::fs::read_to_string(&pidfile)
        && let Ok(daemon) = text.trim().parse::<i32>()
    {
        cleanup.daemons.push((daemon, "pas"));
        daemon_pid = Some(daemon);
    }
    let status = status.with_context(|| format!("run {shown}"))?;
    if !status.success() {
        let log = std::fs::read_to_string(&logfile).unwrap_or_default();
        anyhow::bail!("{shown}: {status}: {}", log.trim());
    }
    let gw = wait_default_gateway(pid, "pasta", Some(&logfile))?;
    let prefix: Vec<OsString> =
        ["nsenter", "-t", &pid.to_string(), "-U", "-n", "--preserve-credentials"].iter().map(OsString::from).collect();
    // pasta copies the host's IPv6 address and routes, and maps the gateway to the host's
    // [::1] as it does the IPv4 one.
    let gw6 = wait_ipv6_gateway(&prefix);
    Ok(Env {
        bind_ip: Ipv4Addr::LOCALHOST.into(),
        target_ip: gw.into(),
        ipv6: gw6.map(|gw6| (Ipv6Addr::LOCALHOST.into(), gw6.into())),
        prefix,
        sink_port: port,
        lo_target: (Ipv4Addr::LOCALHOST, port).into(),
        peer_target: None,
        tool_pid: daemon_pid,
        setup_commands: vec![holder, shown],
        _cleanup: cleanup,
    })
}

fn slirp4netns(bin: &Path, tmp: &Path, mtu: u32, port: u16) -> anyhow::Result<Env> {
    let mut cleanup = Cleanup::default();
    let (pid, holder) = namespace_holder(&["-n"], &mut cleanup)?;
    let logfile = tmp.join(format!("slirp4netns-{pid}.log"));
    let api = tmp.join(format!("slirp4netns-{pid}.sock"));
    let mut cmd = Command::new(bin);
    cmd.args(["--configure", &format!("--mtu={mtu}"), "--disable-dns", "--enable-ipv6"])
        .arg(format!("--api-socket={}", api.display()))
        .arg(pid.to_string())
        .arg("tap0");
    let shown = show(&cmd);
    let log = std::fs::File::create(&logfile)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {shown}"))?;
    let slirp_pid = child.id() as i32;
    // Kill slirp4netns before its namespace holder (children are killed last-first).
    cleanup.children.push(child);
    wait_default_gateway(pid, "slirp4netns", Some(&logfile))?;
    let request = format!(
        r#"{{"execute": "add_hostfwd", "arguments": {{"proto": "tcp", "host_addr": "0.0.0.0", "host_port": {port}, "guest_port": {port}}}}}"#
    );
    let answer = slirp_api(&api, &request).context("slirp4netns add_hostfwd")?;
    if !answer.contains("\"return\"") {
        anyhow::bail!("slirp4netns add_hostfwd: {}", answer.trim());
    }
    let prefix: Vec<OsString> = ["nsenter", "-t", &pid.to_string(), "-n"].iter().map(OsString::from).collect();
    // libslirp's IPv6: fd00::/64 by SLAAC, fd00::2 the host (its [::1]).
    let ipv6 = wait_ipv6_gateway(&prefix)
        .map(|_| (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2).into()));
    Ok(Env {
        bind_ip: Ipv4Addr::LOCALHOST.into(),
        target_ip: Ipv4Addr::new(10, 0, 2, 2).into(),
        ipv6,
        prefix,
        sink_port: port,
        lo_target: (Ipv4Addr::LOCALHOST, port).into(),
        peer_target: None,
        tool_pid: Some(slirp_pid),
        setup_commands: vec![holder, shown, format!("# on {}: {request}", api.display())],
        _cleanup: cleanup,
    })
}

/// A podman container on `slirp4netns:port_handler=slirp4netns` (podman's own forwarding
/// through slirp4netns's API; `allow_host_loopback=true`, since the servers listen on the
/// host's loopback): rootless as `podman_user` when given (the way most people run podman),
/// else rootful. Its root file system is a static busybox (`--rootfs`: no image registry
/// needed); the agent runs in the container's network namespace only. `slirp` is the
/// slirp4netns podman starts (`--network-cmd-path`, copied where the user can run it): None
/// is the one in PATH.
fn podman(slirp: Option<&Path>, podman_user: Option<&str>, tmp: &Path, mtu: u32, port: u16) -> anyhow::Result<Env> {
    let mut cleanup = Cleanup::default();
    let store = tmp.join(format!("podman-{port}"));
    let rootfs = store.join("rootfs");
    for dir in ["bin", "proc", "sys", "dev", "etc", "tmp"] {
        std::fs::create_dir_all(rootfs.join(dir)).with_context(|| format!("create {}", rootfs.display()))?;
    }
    let busybox = find_in_path("busybox").context("busybox not installed")?;
    std::fs::copy(&busybox, rootfs.join("bin/busybox")).context("copy busybox into the rootfs")?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sleep")).context("rootfs: sleep")?;
    let slirp = match slirp {
        Some(bin) => {
            let copy = store.join("slirp4netns");
            std::fs::copy(bin, &copy).with_context(|| format!("copy {}", bin.display()))?;
            Some(copy)
        }
        None => None,
    };
    // Short: podman puts slirp4netns's API socket under it, and a Unix socket's path must
    // stay under 108 bytes.
    let xdg = std::env::temp_dir().join(format!("ub{}-{port}", std::process::id()));
    std::fs::create_dir_all(&xdg)?;
    cleanup.dirs.push(xdg.clone());
    if let Some(user) = podman_user {
        std::fs::set_permissions(&xdg, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        run_checked(Command::new("chown").args(["-R", user]).arg(&store).arg(&xdg))?;
    }
    let podman = || {
        let mut cmd = match podman_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--", "env"])
                    .arg(format!("XDG_RUNTIME_DIR={}", xdg.display()))
                    .arg(format!("HOME={}", store.display()))
                    .arg("podman");
                c
            }
            None => Command::new("podman"),
        };
        cmd.current_dir(&store);
        cmd.arg("--root").arg(store.join("root")).arg("--runroot").arg(store.join("run"));
        cmd.args(["--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        if let Some(bin) = &slirp {
            cmd.arg("--network-cmd-path").arg(bin);
        }
        cmd
    };
    let name = format!("usernet-bench-{}-{port}", std::process::id());
    let mut run = podman();
    run.args(["run", "-d", "--name", &name, "--rootfs"])
        .args(["--network", &format!("slirp4netns:port_handler=slirp4netns,allow_host_loopback=true,mtu={mtu}")])
        .args(["-p", &format!("{port}:{port}")])
        .arg(&rootfs)
        .args(["/bin/sleep", "600"]);
    let shown = show(&run);
    let mut rm = podman();
    rm.args(["rm", "-f", "-t", "0", &name]);
    cleanup.undo.push(rm);
    run_checked(&mut run)?;
    // Rootless podman keeps a pause process holding its user namespace: ours to stop, after
    // `podman rm` (which needs it).
    cleanup.pidfiles.push((xdg.join("libpod/tmp/pause.pid"), "podman"));
    let inspect = |format: &str| -> anyhow::Result<String> {
        let out = podman().args(["inspect", "-f", format, &name]).stdin(Stdio::null()).output()?;
        anyhow::ensure!(out.status.success(), "podman inspect: {}", String::from_utf8_lossy(&out.stderr).trim());
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let pid: i32 = inspect("{{.State.Pid}}")?.parse().context("podman inspect: the container's pid")?;
    let netns = inspect("{{.NetworkSettings.SandboxKey}}")?;
    wait_default_gateway(pid, "podman's slirp4netns", None)?;
    Ok(Env {
        bind_ip: Ipv4Addr::LOCALHOST.into(),
        target_ip: Ipv4Addr::new(10, 0, 2, 2).into(),
        ipv6: None,
        prefix: ["nsenter", "-t", &pid.to_string(), "-n"].iter().map(OsString::from).collect(),
        sink_port: port,
        lo_target: (Ipv4Addr::LOCALHOST, port).into(),
        peer_target: None,
        tool_pid: process_with_argument(&netns),
        setup_commands: vec![shown],
        _cleanup: cleanup,
    })
}

/// The process whose command line has `arg` as one of its arguments (the slirp4netns that
/// podman started for a namespace path).
fn process_with_argument(arg: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|b| *b == 0);
        let program = args.next()?;
        (program.ends_with(b"slirp4netns") && args.any(|a| a == arg.as_bytes())).then_some(pid)
    })
}

/// One request on slirp4netns's API socket (it answers, then closes the connection).
fn slirp_api(socket: &Path, request: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(c) => break c,
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("connect to {}", socket.display()));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    conn.write_all(request.as_bytes())?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

fn veth(mtu: u32, port: u16) -> anyhow::Result<Env> {
    let me = std::process::id();
    let ns = format!("usernet-bench-{me}");
    let host_if = format!("ubh{me}");
    let ns_if = format!("ubn{me}");
    let (host_ip, ns_ip) = free_veth_subnet()?;
    // IPv6 from the documentation prefix, a /64 per process (nodad: usable at once).
    let host_ip6 = Ipv6Addr::new(0x2001, 0xdb8, 0xb0, me as u16, 0, 0, 0, 1);
    let ns_ip6 = Ipv6Addr::new(0x2001, 0xdb8, 0xb0, me as u16, 0, 0, 0, 2);
    // Registered before the first step, so a half-built setup is undone too.
    let mut cleanup = Cleanup::default();
    cleanup.netns = Some(ns.clone());
    cleanup.veth_host = Some(host_if.clone());
    // No name here contains a space, so each step splits into its arguments on whitespace.
    let steps = [
        format!("netns add {ns}"),
        format!("link add {host_if} mtu {mtu} type veth peer name {ns_if} mtu {mtu} netns {ns}"),
        format!("addr add {host_ip}/30 dev {host_if}"),
        format!("link set {host_if} up"),
        format!("-n {ns} addr add {ns_ip}/30 dev {ns_if}"),
        format!("-n {ns} link set {ns_if} up"),
        format!("-n {ns} link set lo up"),
        format!("-6 addr add {host_ip6}/64 dev {host_if} nodad"),
        format!("-n {ns} -6 addr add {ns_ip6}/64 dev {ns_if} nodad"),
    ];
    let mut shown = Vec::new();
    for step in &steps {
        let mut cmd = Command::new("ip");
        cmd.args(step.split_whitespace());
        shown.push(show(&cmd));
        run_checked(&mut cmd)?;
    }
    // The rule for test traffic: it must stay on our pair.
    for ip in [IpAddr::from(ns_ip), IpAddr::from(ns_ip6)] {
        let out = Command::new("ip").args(["route", "get", &ip.to_string()]).output().context("ip route get")?;
        let route = String::from_utf8_lossy(&out.stdout);
        if !route.contains(&format!("dev {host_if} ")) {
            anyhow::bail!("{ip} is not routed through {host_if}: {}", route.trim());
        }
    }
    Ok(Env {
        bind_ip: host_ip.into(),
        target_ip: host_ip.into(),
        ipv6: Some((host_ip6.into(), host_ip6.into())),
        prefix: ["ip", "netns", "exec", &ns].iter().map(OsString::from).collect(),
        sink_port: port,
        lo_target: (ns_ip, port).into(),
        peer_target: None,
        tool_pid: None,
        setup_commands: shown,
        _cleanup: cleanup,
    })
}

/// The remote client's namespace: `usernet-bench-peer-PID`, joined to the host by a veth
/// pair, 198.51.100.1 on the host, 198.51.100.2 inside. Removed on drop.
pub struct Peer {
    pub ns: String,
    host_if: String,
    peer_if: String,
    /// The host's address on the pair: what the peer dials.
    pub host_ip: Ipv4Addr,
    /// How it was built, for the report.
    pub commands: Vec<String>,
}

impl Peer {
    pub fn create() -> anyhow::Result<Peer> {
        let me = std::process::id();
        let host_ip = Ipv4Addr::new(198, 51, 100, 1);
        let peer_ip = Ipv4Addr::new(198, 51, 100, 2);
        let out = |args: &[&str]| -> anyhow::Result<String> {
            let o = Command::new("ip").args(args).output().context("run ip")?;
            Ok(String::from_utf8_lossy(&o.stdout).into_owned())
        };
        let used = out(&["-4", "-o", "addr", "show"])? + &out(&["-4", "route", "show", "table", "all"])?;
        if used.contains("198.51.100.") {
            anyhow::bail!("198.51.100.0/24 is already in use on this machine");
        }
        let mut peer = Peer {
            ns: format!("usernet-bench-peer-{me}"),
            host_if: format!("ubp{me}"),
            peer_if: format!("ubq{me}"),
            host_ip,
            commands: Vec::new(),
        };
        let (ns, host_if, peer_if) = (peer.ns.clone(), peer.host_if.clone(), peer.peer_if.clone());
        let steps = [
            format!("netns add {ns}"),
            format!("link add {host_if} mtu {DEFAULT_MTU} type veth peer name {peer_if} mtu {DEFAULT_MTU} netns {ns}"),
            format!("addr add {host_ip}/24 dev {host_if}"),
            format!("link set {host_if} up"),
            format!("-n {ns} addr add {peer_ip}/24 dev {peer_if}"),
            format!("-n {ns} link set {peer_if} up"),
            format!("-n {ns} link set lo up"),
        ];
        for step in &steps {
            let mut cmd = Command::new("ip");
            cmd.args(step.split_whitespace());
            peer.commands.push(show(&cmd));
            run_checked(&mut cmd)?;
        }
        let route = out(&["route", "get", &peer_ip.to_string()])?;
        if !route.contains(&format!("dev {host_if} ")) {
            anyhow::bail!("{peer_ip} is not routed through {host_if}: {}", route.trim());
        }
        Ok(peer)
    }

    /// Sets the MTU of both ends of the pair.
    pub fn set_mtu(&self, mtu: u32) -> anyhow::Result<()> {
        let mtu = mtu.to_string();
        run_checked(Command::new("ip").args(["link", "set", "dev", &self.host_if, "mtu", &mtu]))?;
        run_checked(Command::new("ip").args(["-n", &self.ns, "link", "set", "dev", &self.peer_if, "mtu", &mtu]))
    }

    /// The command prefix that runs a program inside the peer namespace.
    pub fn prefix(&self) -> Vec<OsString> {
        ["ip", "netns", "exec", &self.ns].iter().map(OsString::from).collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        if Path::new("/sys/class/net").join(&self.host_if).exists() {
            let _ = run_checked(Command::new("ip").args(["link", "del", &self.host_if]));
        }
        let _ = run_checked(Command::new("ip").args(["netns", "del", &self.ns]));
    }
}

/// A /30 in 10.250.0.0/16 that no address or route of this machine touches yet.
fn free_veth_subnet() -> anyhow::Result<(Ipv4Addr, Ipv4Addr)> {
    let out = |args: &[&str]| -> anyhow::Result<String> {
        let o = Command::new("ip").args(args).output().context("run ip")?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let used = out(&["-4", "-o", "addr", "show"])? + &out(&["-4", "route", "show", "table", "all"])?;
    if !used.contains("10.250.0.0/16") {
        for k in 0..=255u8 {
            if !used.contains(&format!("10.250.{k}.")) {
                return Ok((Ipv4Addr::new(10, 250, k, 1), Ipv4Addr::new(10, 250, k, 2)));
            }
        }
    }
    anyhow::bail!("no free /30 in 10.250.0.0/16 for the veth pair")
}

/// Waits for a child at most `limit`, killing it if it overstays.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline || super::interrupted() {
            let _ = child.kill();
            let _ = child.wait();
            if super::interrupted() {
                anyhow::bail!("interrupted");
            }
            anyhow::bail!("still running after {} s, killed", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_port_is_outside_the_ephemeral_range_and_bindable_on_both_families() {
        let port = free_port().unwrap();
        assert!(PUBLISHED_PORTS.contains(&port), "{port}");
        drop(TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap());
        if Path::new("/proc/net/if_inet6").exists() {
            drop(TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).unwrap());
        }
        // Taken on IPv4: no longer chosen.
        let held = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).unwrap();
        for _ in 0..50 {
            assert_ne!(free_port().unwrap(), port);
        }
        drop(held);
    }

    #[test]
    fn parses_default_gateway() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(default_gateway(table), Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(default_gateway("Iface\n"), None);
        assert_eq!(default_gateway("Iface\nx 00000000 zz\n"), None);
    }

    #[test]
    fn setup_names_round_trip() {
        for s in Setup::ALL {
            assert_eq!(Setup::parse(s.name()), Some(s));
        }
        assert_eq!(Setup::parse("slirp"), Some(Setup::Slirp4netns));
        assert_eq!(Setup::parse("docker"), None);
    }
}
