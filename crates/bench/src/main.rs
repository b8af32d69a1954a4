//! `usernet-bench`: usernet against pasta, slirp4netns and a veth pair, side by side.
//!
//! Method. For every setup (usernet; usernet with `--busy-poll 0`, to show what its default
//! busy polling buys; pasta, slirp4netns, a plain veth pair as the kernel's own limit) and
//! every repeat, the bench builds a fresh namespace the way that tool is meant to be
//! used (see [`setups`]), with one port published into it, and starts an agent inside: this
//! same executable, re-run as `usernet-bench agent` under `usernet run -p P:P --`,
//! `nsenter` or `ip netns exec`, taking one request at a time on its stdin (see [`agent`]).
//! The driver starts the host-side servers itself (see [`traffic`]) and, between requests,
//! reads the CPU time and memory of the tool's process. A run of a setup has three phases,
//! each on a freshly built setup:
//!
//! 1. Main, at the tool's default MTU (65520 for all four):
//!    - TCP throughput, each for `--duration` seconds, measured where the data lands (bytes
//!      read from first byte to EOF): namespace -> host, one stream and 4 parallel streams;
//!      host -> namespace through the published port, from a client on the host's loopback
//!      (pasta splices these) and from a client that keeps its address: an agent in a peer
//!      namespace joined to the host by a veth pair (198.51.100.0/24), dialling the host's
//!      address on that pair (pasta's TAP path; slirp4netns's `add_hostfwd`; usernet's
//!      `-p`). veth has nothing to publish: its "published" paths are the host dialling the
//!      namespace's address directly, from the host for both;
//!    - CPU seconds of the tool per GB moved on each throughput path: utime + stime of its
//!      process (all threads) from /proc/PID/stat before and after (in the VM phase, the
//!      run times of its threads from their schedstat, to the nanosecond). For veth the work is the
//!      kernel's, in softirq context of whichever task runs: not attributable, so n/a;
//!    - how busy the whole machine was (all CPUs, from /proc/stat) during the namespace ->
//!      host runs, 1 and 4 streams: what is left for a second thread of the tool to use, when
//!      the clients, the servers and the tool share the machine's cores;
//!    - 1-byte request/response latency (mean, median), with the tool's CPU time per round
//!      trip, and new connections per second;
//!    - the median round trip of an independent ping-pong tool, sockperf, over TCP and UDP
//!      (its server on the host, its client in the namespace; see [`sockperf`]);
//!    - UDP: 1 Gbit/s of 1400-byte datagrams namespace -> host for 3 s from a paced sender;
//!      the host's sink (8 MiB receive buffer) counts; received rate and loss %.
//! 2. MTU 1500 (`usernet run --mtu 1500`, `pasta --mtu 1500`, `slirp4netns --mtu=1500`,
//!    veth mtu 1500; the peer pair follows the MTU of the phase): the single-stream and both
//!    published throughput paths again, with their CPU cost.
//! 3. Memory, at the default MTU: VmRSS of the tool's process once the agent is up and idle,
//!    then with `--conns` (10,000) idle TCP connections opened by the agent to a host server
//!    and held 2 s, and the growth per connection. Where a tool cannot hold that many here
//!    (pasta spends two descriptors per connection and exits when it runs out; libslirp opens
//!    them in quadratic time) it holds what it can and the table says so.
//!
//! 4. VM, with `--vm` only: TCP between a QEMU guest (TCG) and the host over QEMU's stream
//!    transport, served by `usernet serve --listen-qemu` and by passt (a column of its own,
//!    VMs only): the guest sends `--vm-mib` MiB to a sink on the host's loopback, then
//!    receives as much from a source there; throughput and the tool's CPU per GB, each way.
//!    The guest's emulated CPU is the bottleneck there, and the report says how busy it was
//!    (see [`vm`]). The namespace tools have no VM transport: n/a.
//!
//! Setups run interleaved (one run of each, then again), so a noisy neighbour spreads across
//! all of them; the table shows the median of `--repeat` runs and each peer's ratio to
//! usernet (peer / usernet, whatever the direction of "better"). `--json` keeps every run,
//! `--svg` draws the medians as grouped horizontal bars.
//!
//! The host side of every path is the host's loopback (the address each tool maps to it:
//! usernet 192.168.65.254, pasta its default gateway, slirp4netns 10.0.2.2), the host end of
//! the veth pair, or the peer namespace. No other address is ever dialled, usernet gets a
//! dead loopback DNS upstream, and everything started or created is removed after each phase.
//! A setup that is missing reads "n/a (...)"; one that fails reads "failed: ..." and the
//! bench goes on. The open-files limit is raised (inherited by the tools) for the memory test.

mod agent;
mod setups;
mod sockperf;
mod svg;
mod traffic;
mod vm;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;

use agent::{Agent, Reply, Request};
use setups::{DEFAULT_MTU, Env, Peer, Setup, Tools};
use traffic::{Kind, Server, StreamResult, UdpSink};

/// The MTU of the second phase.
const LOW_MTU: u32 = 1500;
/// Parallel streams of the multi-stream test.
const STREAMS: u32 = 4;
/// Offered UDP load: payload bits per second, and payload size.
const UDP_RATE_BPS: f64 = 1e9;
const UDP_SIZE: usize = 1400;
/// Datagrams per send in the bursts row: a window of 40, as QUIC stacks send with
/// UDP_SEGMENT.
const UDP_BURST: usize = 40;
/// Open files the bench asks for (the memory test holds thousands on each side).
const NOFILE: u64 = 65_536;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds of each throughput run [default: 2; 1 with --quick].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=60))]
    pub duration: Option<u64>,
    /// Runs of each setup; the table shows the median [default: 3; 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: Option<u32>,
    /// A short run, about a minute: 1 repeat of 1-second tests, 2,000 idle connections.
    #[arg(long)]
    pub quick: bool,
    /// Setups to run, comma-separated: usernet, usernet-no-busy-poll, usernet-2-engines, pasta,
    /// slirp4netns, veth, passt, usernet-as-slirp4netns, usernet-as-pasta, podman-slirp4netns,
    /// podman-usernet (default: the first six, passt with --vm, the last four with --drop-in).
    #[arg(long, value_name = "SETUPS", value_delimiter = ',', value_parser = parse_setup)]
    pub only: Vec<Setup>,
    /// Also measure the drop-in paths: usernet started as slirp4netns and as pasta (the same
    /// arguments as the real ones get), and a rootful podman container on slirp4netns with
    /// the real slirp4netns and with usernet as podman's slirp4netns.
    #[arg(long)]
    pub drop_in: bool,
    /// Run the podman setups rootless as USER (a user with sub-ids in /etc/subuid), as most
    /// people run podman; without it they run rootful.
    #[arg(long, value_name = "USER")]
    pub podman_user: Option<String>,
    /// The usernet binary to measure [default: `usernet` beside this executable, else in PATH].
    #[arg(long, value_name = "PATH")]
    pub usernet_bin: Option<PathBuf>,
    /// The pasta binary to measure (a name is looked up in PATH).
    #[arg(long, value_name = "PATH", default_value = "pasta")]
    pub pasta_bin: PathBuf,
    /// Also write the results, every run included, to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Also draw the medians as an SVG chart in FILE.
    #[arg(long, value_name = "FILE")]
    pub svg: Option<PathBuf>,
    /// Round trips of the latency test [default: 10000; 1000 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rr_count: Option<u32>,
    /// Idle TCP connections of the memory test [default: 10000; 2000 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=30_000))]
    pub conns: Option<u32>,
    /// Also measure TCP between a QEMU guest (TCG) and the host over QEMU's stream transport,
    /// served by usernet and by passt. Needs qemu-system-x86_64, a kernel in /boot with its
    /// modules, and busybox-static.
    #[arg(long)]
    pub vm: bool,
    /// With --vm: the VM phase alone, for the setups that serve VMs (usernet, passt); the
    /// namespace rows are skipped.
    #[arg(long, requires = "vm")]
    pub vm_only: bool,
    /// The script that builds the guest's initramfs [default: the repository's
    /// vm-guest/build-initramfs.sh, built into this binary].
    #[arg(long, value_name = "PATH")]
    pub vm_initramfs_script: Option<PathBuf>,
    /// MiB the guest sends, then receives, in each VM run [default: 64; 32 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=128))]
    pub vm_mib: Option<u32>,
    /// MTU of the guest's link in the VM runs, for both tools (usernet serve's default).
    #[arg(long, value_name = "N", default_value_t = 1500, value_parser = clap::value_parser!(u32).range(576..=65520))]
    pub vm_mtu: u32,
    /// The transport between QEMU and usernet in the VM runs; passt follows to vhost-user when
    /// it has `--vhost-user`, and stays on stream otherwise.
    #[arg(long, value_name = "KIND", value_enum, default_value_t = vm::VmTransport::Stream)]
    pub vm_transport: vm::VmTransport,
    /// The passt binary of the VM phase [default: passt next to --pasta-bin, else in PATH].
    #[arg(long, value_name = "PATH")]
    pub passt_bin: Option<PathBuf>,
}

#[derive(clap::Parser, Debug)]
#[command(
    name = "usernet-bench",
    version,
    about = "usernet against pasta, slirp4netns, passt and a veth pair, side by side",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(clap::Subcommand, Debug, Clone, Copy)]
enum Role {
    /// The agent half, which the driver runs inside each namespace: takes requests on
    /// stdin, answers on stdout.
    Agent,
}

fn parse_setup(s: &str) -> Result<Setup, String> {
    Setup::parse(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = Setup::ALL.iter().map(|s| s.name()).collect();
        format!("unknown setup {s:?} (want one of {})", names.join(", "))
    })
}

fn main() {
    use clap::Parser;
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).try_init();
    let result = match cli.role {
        Some(Role::Agent) => agent::agent_main(),
        None => driver_main(&cli.args),
    };
    std::process::exit(match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("usernet-bench: {e:#}");
            1
        }
    });
}

/// The usernet binary to measure when none is named: the one built beside this executable
/// (`target/release/usernet` next to `target/release/usernet-bench`), else `usernet` in PATH.
fn default_usernet(self_exe: &Path) -> PathBuf {
    self_exe.parent().map(|dir| dir.join("usernet")).filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("usernet"))
}

/// The settings of one bench, defaults and `--quick` resolved.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    duration: Duration,
    repeat: u32,
    rr_count: u32,
    crr: Duration,
    udp: Duration,
    conns: u32,
    hold: Duration,
    /// Longest the agent may take to open the idle connections.
    open_limit: Duration,
    /// The VM phase, with `--vm`.
    vm: Option<vm::VmPlan>,
    /// The VM phase alone (`--vm-only`).
    vm_only: bool,
}

impl Plan {
    fn from_args(args: &BenchArgs) -> Plan {
        let q = args.quick;
        let duration = Duration::from_secs(args.duration.unwrap_or(if q { 1 } else { 2 }));
        Plan {
            duration,
            repeat: args.repeat.unwrap_or(if q { 1 } else { 3 }),
            rr_count: args.rr_count.unwrap_or(if q { 1_000 } else { 10_000 }),
            crr: duration.min(Duration::from_secs(3)),
            udp: Duration::from_secs(if q { 1 } else { 3 }),
            conns: args.conns.unwrap_or(if q { 2_000 } else { 10_000 }),
            hold: Duration::from_secs(if q { 1 } else { 2 }),
            open_limit: Duration::from_secs(if q { 10 } else { 30 }),
            vm: args.vm.then(|| vm::VmPlan {
                mib: args.vm_mib.unwrap_or(if q { 32 } else { 64 }),
                mtu: args.vm_mtu,
                script: args.vm_initramfs_script.clone(),
                transport: args.vm_transport,
                // Settled by driver_main once passt's binary is known.
                passt_transport: vm::VmTransport::Stream,
            }),
            vm_only: args.vm_only,
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Whether SIGINT, SIGTERM or SIGHUP arrived: the bench then stops and cleans up.
fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn catch_signals() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { sigaction(sig, &action) };
    }
}

/// Raises the open-files limit (root: to [`NOFILE`]; otherwise the soft limit to the hard).
/// The tools and agents started later inherit it.
fn raise_nofile() {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if nix::unistd::geteuid().is_root() && lim.rlim_max < NOFILE {
            lim.rlim_max = NOFILE;
        }
        lim.rlim_cur = lim.rlim_max;
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// One measurement: a value, not applicable to this setup (why), or failed (why).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case")]
enum Measure {
    Value(f64),
    NotApplicable(String),
    Failed(String),
}

/// Everything one run of one setup measured.
#[derive(Debug, Default)]
struct Run {
    metrics: BTreeMap<String, Measure>,
    /// Raw findings behind the metrics (server counts, sender counts, ...), for `--json`.
    details: serde_json::Map<String, serde_json::Value>,
    /// What was observed about the setup (its interfaces and their MTU).
    notes: Vec<String>,
    commands: Vec<String>,
}

impl Run {
    fn set(&mut self, key: &str, m: Measure) {
        self.metrics.insert(key.to_string(), m);
    }

    fn set_result(&mut self, key: &str, r: Result<f64, String>) {
        self.set(key, r.map_or_else(Measure::Failed, Measure::Value));
    }
}

/// Everything measured for one setup.
struct Outcome {
    setup: Setup,
    unavailable: Option<String>,
    runs: Vec<Run>,
}

/// A private scratch directory (pidfiles, logs, sockets), removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The remote client: the peer namespace and its agent (stopped before the namespace goes).
struct PeerSide {
    agent: Agent,
    peer: Peer,
}

fn start_peer(self_exe: &Path) -> anyhow::Result<PeerSide> {
    let peer = Peer::create().context("peer namespace")?;
    let prefix = peer.prefix();
    let mut cmd = Command::new(&prefix[0]);
    cmd.args(&prefix[1..]).arg(self_exe).arg("agent");
    let agent = Agent::spawn(&mut cmd).context("peer agent")?;
    Ok(PeerSide { agent, peer })
}

/// What a phase needs from the driver.
struct Ctx<'a> {
    self_exe: &'a Path,
    tools: &'a Tools,
    plan: &'a Plan,
}

fn driver_main(args: &BenchArgs) -> anyhow::Result<i32> {
    let self_exe = std::env::current_exe().context("find this executable")?;
    let mut plan = Plan::from_args(args);
    let chosen: Vec<Setup> = if args.only.is_empty() {
        Setup::ALL
            .into_iter()
            .filter(|s| args.vm || s.has_namespace())
            .filter(|s| args.drop_in || !s.is_drop_in())
            .filter(|s| !args.vm_only || s.serves_vms())
            .collect()
    } else {
        Setup::ALL.into_iter().filter(|s| args.only.contains(s)).collect()
    };
    catch_signals();
    raise_nofile();
    let tmp = TempDir(std::env::temp_dir().join(format!("usernet-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir(&tmp.0).with_context(|| format!("create {}", tmp.0.display()))?;
    let tools = Tools {
        usernet_bin: args.usernet_bin.clone().unwrap_or_else(|| default_usernet(&self_exe)),
        pasta_bin: args.pasta_bin.clone(),
        passt_bin: args.passt_bin.clone().unwrap_or_else(|| default_passt(&args.pasta_bin)),
        podman_user: args.podman_user.clone(),
        tmp: tmp.0.clone(),
    };
    if let Some(v) = plan.vm.as_mut()
        && chosen.contains(&Setup::Passt)
    {
        v.passt_transport = vm::passt_transport(&tools.passt_bin, v.transport, &tmp.0);
    }
    let ctx = Ctx { self_exe: &self_exe, tools: &tools, plan: &plan };

    let mut outcomes: Vec<Outcome> = chosen
        .iter()
        .map(|&setup| {
            let unavailable = if !setup.has_namespace() && plan.vm.is_none() {
                Some("VMs only: needs --vm".into())
            } else {
                setup.unavailable(&tools)
            };
            Outcome { setup, unavailable, runs: Vec::new() }
        })
        .collect();
    let mut vm_state =
        plan.vm.as_ref().map(|p| VmState { unavailable: vm::unavailable(p.script.as_deref()), image: None });
    let needs_peer = !plan.vm_only
        && outcomes.iter().any(|o| o.unavailable.is_none() && o.setup.has_namespace() && o.setup != Setup::Veth);
    let mut peer: Result<PeerSide, String> = if !needs_peer {
        Err("not needed".into())
    } else if !nix::unistd::geteuid().is_root() {
        Err("the peer namespace needs root".into())
    } else {
        start_peer(&self_exe).map_err(|e| format!("{e:#}"))
    };
    let mut peer_commands = Vec::new();
    match &peer {
        Ok(p) => peer_commands.clone_from(&p.peer.commands),
        Err(e) if needs_peer => eprintln!("usernet-bench: no remote client: {e}"),
        Err(_) => {}
    }

    let started = std::time::Instant::now();
    'repeats: for round in 1..=plan.repeat {
        for o in outcomes.iter_mut().filter(|o| o.unavailable.is_none()) {
            if interrupted() {
                break 'repeats;
            }
            eprintln!(
                "usernet-bench: {} run {round}/{} ({} s so far)",
                o.setup.name(),
                plan.repeat,
                started.elapsed().as_secs()
            );
            let mut run = Run::default();
            if o.setup.has_namespace() && !plan.vm_only {
                for p in Phase::ALL {
                    if !interrupted() {
                        phase(o.setup, p, &ctx, &mut peer, &mut run);
                    }
                }
            } else {
                let why = if plan.vm_only { "skipped: --vm-only" } else { "VMs only" };
                for k in Phase::ALL.iter().flat_map(|p| p.keys()) {
                    run.set(&k, Measure::NotApplicable(why.into()));
                }
            }
            if let Some(state) = vm_state.as_mut()
                && !interrupted()
            {
                vm_phase(o.setup, &ctx, state, &mut run);
            }
            if interrupted() {
                // A run cut short measures nothing.
                eprintln!("usernet-bench: interrupted, cleaned up");
                break 'repeats;
            }
            o.runs.push(run);
        }
    }
    drop(peer);
    eprintln!("usernet-bench: done in {} s", started.elapsed().as_secs());

    let metrics = metric_list(&plan);
    print_report(&outcomes, &metrics, &plan, &peer_commands);
    if let Some(path) = &args.json {
        let doc = json_report(&outcomes, &metrics, &plan, &tools, &peer_commands);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, svg_report(&outcomes, &metrics, &plan))
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(if interrupted() { 130 } else { 0 })
}

/// passt next to `pasta_bin` when that is a path (both come from the same build), else
/// `passt` from PATH.
fn default_passt(pasta_bin: &Path) -> PathBuf {
    if pasta_bin.components().count() > 1
        && let Some(dir) = pasta_bin.parent()
        && dir.join("passt").is_file()
    {
        return dir.join("passt");
    }
    PathBuf::from("passt")
}

/// The VM phase's state across runs: whether it can run here, and the guest image (built at
/// the first VM run, reused by the rest).
struct VmState {
    unavailable: Option<String>,
    image: Option<Result<vm::Image, String>>,
}

/// The metrics of the VM phase, each way.
const VM_KEYS: [&str; 6] = [
    "vm_up_gbps",
    "vm_down_gbps",
    "cpu_s_per_gb_vm_up",
    "cpu_s_per_gb_vm_down",
    "vm_vcpu_busy_up_pct",
    "vm_vcpu_busy_down_pct",
];

/// One VM run of `setup` (usernet or passt; the others have no VM transport): fills `run`.
fn vm_phase(setup: Setup, ctx: &Ctx, state: &mut VmState, run: &mut Run) {
    let set_all = |run: &mut Run, m: Measure| {
        for k in VM_KEYS {
            run.set(k, m.clone());
        }
    };
    let (tool, bin) = match setup {
        Setup::Usernet => (vm::VmTool::Usernet, &ctx.tools.usernet_bin),
        Setup::Passt => (vm::VmTool::Passt, &ctx.tools.passt_bin),
        _ => return set_all(run, Measure::NotApplicable("namespaces only".into())),
    };
    let Some(plan) = &ctx.plan.vm else { return };
    if let Some(why) = &state.unavailable {
        return set_all(run, Measure::NotApplicable(why.clone()));
    }
    let image = state.image.get_or_insert_with(|| {
        eprintln!("usernet-bench: building the VM's initramfs");
        vm::build_image(plan.script.as_deref(), &ctx.tools.tmp.join("vm-image"))
            .map_err(|e| format!("initramfs: {e:#}"))
    });
    let image = match image {
        Ok(image) => image,
        Err(e) => return set_all(run, Measure::Failed(e.clone())),
    };
    let result = match vm::run(tool, bin, image, plan, &ctx.tools.tmp) {
        Ok(r) => r,
        Err(e) => return set_all(run, Measure::Failed(format!("{e:#}"))),
    };
    run.commands.push(format!("# VM phase: {} MiB each way, guest MTU {}", plan.mib, plan.mtu));
    run.commands.extend(result.commands.iter().cloned());
    let note = format!(
        "VM phase: lease {} after {}",
        result.lease.as_deref().unwrap_or("none"),
        result.lease_secs.map_or("-".into(), |s| format!("{s:.1} s"))
    );
    run.commands.push(format!("# {note}"));
    run.notes.push(note);
    for (dir, r) in [("up", &result.up), ("down", &result.down)] {
        let measure = |v: Option<f64>, what: &str| match r {
            Ok(_) => v.map_or_else(|| Measure::Failed(format!("cannot read {what}")), Measure::Value),
            Err(e) => Measure::Failed(e.clone()),
        };
        let t = r.as_ref().ok();
        run.set(&format!("vm_{dir}_gbps"), measure(t.map(vm::Transfer::gbps), "the rate"));
        run.set(
            &format!("cpu_s_per_gb_vm_{dir}"),
            measure(t.and_then(vm::Transfer::cpu_per_gb), "the tool's CPU time"),
        );
        run.set(
            &format!("vm_vcpu_busy_{dir}_pct"),
            measure(t.and_then(vm::Transfer::vcpu_busy_pct), "QEMU's vCPU time"),
        );
    }
    run.details.insert("vm".into(), json!(result));
}

/// A TCP throughput path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TcpPath {
    NsHost,
    /// One stream whose client uses the congestion control most distributions default to
    /// (`CUBIC`), whatever this machine's default is.
    NsHostCubic,
    NsHostMulti,
    /// One stream over IPv6.
    NsHost6,
    HostNsLoopback,
    HostNsPeer,
    /// `STREAMS` streams over two instances of the tool, half each (usernet run only): what
    /// a usernet with two engines, one per core, could reach at best on this machine.
    NsHostPair,
}

impl TcpPath {
    const ALL: [TcpPath; 7] = [
        TcpPath::NsHost,
        TcpPath::NsHostCubic,
        TcpPath::NsHostMulti,
        TcpPath::NsHostPair,
        TcpPath::NsHost6,
        TcpPath::HostNsLoopback,
        TcpPath::HostNsPeer,
    ];
    /// The paths measured again at MTU 1500.
    const LOW_MTU: [TcpPath; 3] = [TcpPath::NsHost, TcpPath::HostNsLoopback, TcpPath::HostNsPeer];

    fn stem(self) -> &'static str {
        match self {
            TcpPath::NsHost => "ns_host",
            TcpPath::NsHostCubic => "ns_host_cubic",
            TcpPath::NsHostMulti => "ns_host_x4",
            TcpPath::NsHost6 => "ns_host_v6",
            TcpPath::HostNsLoopback => "host_ns_lo",
            TcpPath::HostNsPeer => "host_ns_peer",
            TcpPath::NsHostPair => "ns_host_2x2",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            TcpPath::NsHost => "ns->host, 1 stream",
            TcpPath::NsHostCubic => "ns->host, 1 stream, client on cubic",
            TcpPath::NsHostMulti => "ns->host, 4 streams",
            TcpPath::NsHost6 => "ns->host, 1 stream, IPv6",
            TcpPath::HostNsLoopback => "host->ns published, loopback client",
            TcpPath::HostNsPeer => "host->ns published, client keeps its address",
            TcpPath::NsHostPair => "ns->host, 4 streams over two instances, 2 each",
        }
    }
}

/// The congestion control of the row `NsHostCubic`: Linux's default, and most
/// distributions'. A new namespace starts with the machine's default, and where that is BBR
/// (as on some cloud images) it paces every stream; one stream through a tool, whose ACKs
/// come once per batch of frames it read, loses more to it than one over a veth pair (on a
/// 2-core test VM defaulting to BBR, one stream through usernet ran at 0.58-0.71x veth's, and
/// at 0.74-0.79x with the machine switched to cubic). Set before the connect: a socket that
/// started on BBR stays paced.
const CUBIC: &str = "cubic";

fn mtu_suffix(mtu: u32) -> &'static str {
    if mtu == DEFAULT_MTU { "" } else { "_mtu1500" }
}

fn tcp_key(path: TcpPath, mtu: u32) -> String {
    format!("tcp_{}_gbps{}", path.stem(), mtu_suffix(mtu))
}

fn cpu_key(path: TcpPath, mtu: u32) -> String {
    format!("cpu_s_per_gb_{}{}", path.stem(), mtu_suffix(mtu))
}

/// The paths (at the default MTU) during which the bench also reads how busy the whole machine
/// was: whether a second thread of the tool would find a core to use.
const BUSY_PATHS: [TcpPath; 3] = [TcpPath::NsHost, TcpPath::NsHostMulti, TcpPath::NsHostPair];

fn busy_key(path: TcpPath) -> String {
    format!("machine_busy_pct_{}", path.stem())
}

/// The three environments of one run: each builds the setup afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Default MTU: every throughput path, latency, connection rate, UDP.
    Main,
    /// MTU 1500: the single-stream and the published throughput paths.
    LowMtu,
    /// Default MTU, fresh: idle memory, then memory with many idle connections.
    Memory,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Main, Phase::LowMtu, Phase::Memory];

    fn mtu(self) -> u32 {
        if self == Phase::LowMtu { LOW_MTU } else { DEFAULT_MTU }
    }

    fn paths(self) -> &'static [TcpPath] {
        match self {
            Phase::Main => &TcpPath::ALL,
            Phase::LowMtu => &TcpPath::LOW_MTU,
            Phase::Memory => &[],
        }
    }

    /// Every metric this phase measures.
    fn keys(self) -> Vec<String> {
        let mtu = self.mtu();
        let mut keys: Vec<String> = self.paths().iter().flat_map(|&p| [tcp_key(p, mtu), cpu_key(p, mtu)]).collect();
        let more: &[&str] = match self {
            Phase::Main => &[
                "rr_mean_us",
                "rr_median_us",
                "rr_cpu_us",
                SOCKPERF_KEYS[0],
                SOCKPERF_KEYS[1],
                "crr_per_sec",
                "crr_own_session_per_sec",
                "crr_published_per_sec",
                "udp_rx_mbps",
                "udp_loss_pct",
                "udp_sent_mbps",
                "udp_cpu_us",
                "udp_gso_rx_mbps",
                "udp_gso_loss_pct",
                "udp_gso_sent_mbps",
                "udp_gso_cpu_us",
            ],
            Phase::LowMtu => &[],
            Phase::Memory => &["startup_ms", MEMORY_KEYS[0], MEMORY_KEYS[1], MEMORY_KEYS[2], MEMORY_KEYS[3]],
        };
        keys.extend(more.iter().map(|k| k.to_string()));
        if self == Phase::Main {
            keys.extend(BUSY_PATHS.map(busy_key));
        }
        keys
    }
}

/// The sockperf rows, in the order of [`sockperf::Proto::ALL`].
const SOCKPERF_KEYS: [&str; 2] = ["sockperf_tcp_median_us", "sockperf_udp_median_us"];

const MEMORY_KEYS: [&str; 4] = ["rss_idle_mib", "anon_idle_mib", "rss_conns_mib", "rss_per_conn_kib"];

/// Builds the setup for `phase`, runs its tests, tears it down; fills `run`.
fn phase(setup: Setup, phase: Phase, ctx: &Ctx, peer: &mut Result<PeerSide, String>, run: &mut Run) {
    if phase == Phase::Memory {
        run.set("startup_ms", startup_measure(setup, ctx.tools));
    }
    let result = if phase == Phase::Memory && setup == Setup::Veth {
        for k in MEMORY_KEYS {
            run.set(k, Measure::NotApplicable("kernel only".into()));
        }
        Ok(())
    } else {
        measure_phase(setup, phase, ctx, peer, run)
    };
    if let Err(e) = result {
        // Whatever was not measured before the failure failed with it.
        let why = format!("{e:#}");
        for k in phase.keys() {
            run.metrics.entry(k).or_insert_with(|| Measure::Failed(why.clone()));
        }
    }
}

fn measure_phase(
    setup: Setup,
    phase: Phase,
    ctx: &Ctx,
    peer: &mut Result<PeerSide, String>,
    run: &mut Run,
) -> anyhow::Result<()> {
    let plan = ctx.plan;
    let mtu = phase.mtu();
    if let Ok(p) = peer.as_ref()
        && let Err(e) = p.peer.set_mtu(mtu)
    {
        *peer = Err(format!("set the peer MTU: {e:#}"));
    }
    let peer_ip = peer.as_ref().ok().map(|p| p.peer.host_ip);
    run.commands.push(format!("# {phase:?} phase, MTU {mtu}"));
    let env = setups::prepare(setup, ctx.tools, mtu, peer_ip)?;
    run.commands.extend(env.setup_commands.iter().cloned());
    // Declared after `env`, so dropped (stopped) before the setup is torn down.
    let stream = Server::start(Kind::Stream, SocketAddr::new(env.bind_ip, 0))?;
    let rr = Server::start(Kind::Rr, SocketAddr::new(env.bind_ip, 0))?;
    let crr = Server::start(Kind::Crr, SocketAddr::new(env.bind_ip, 0))?;
    let stream6 = match env.ipv6 {
        Some((bind, target)) if phase.paths().contains(&TcpPath::NsHost6) => {
            Some((Server::start(Kind::Stream, SocketAddr::new(bind, 0))?, target))
        }
        _ => None,
    };
    let mut cmd = Command::new(&env.prefix[0]);
    cmd.args(&env.prefix[1..]).arg(ctx.self_exe).arg("agent");
    run.commands.push(setups::show(&cmd));
    let mut agent = Agent::spawn(&mut cmd)?;
    let reply = agent.call(&Request::Serve { port: env.sink_port }, Duration::from_secs(60));
    let Reply::Ready { interfaces } = reply.map_err(|e| anyhow::anyhow!("agent: {e}"))? else {
        anyhow::bail!("agent: unexpected reply to serve");
    };
    let shown: Vec<String> = interfaces.iter().map(|(n, m)| format!("{n} mtu {m}")).collect();
    let note = format!(
        "{phase:?} phase: asked for MTU {mtu}, the namespace has {}",
        if shown.is_empty() { "no interface".into() } else { shown.join(", ") }
    );
    run.commands.push(format!("# {note}"));
    run.notes.push(note);
    let tool_pid = env.tool_pid.or(setup.is_usernet_run().then(|| agent.pid()));
    let target = |port: u16| SocketAddr::new(env.target_ip, port);
    let secs = plan.duration.as_secs_f64();

    if phase == Phase::Memory {
        let Some(pid) = tool_pid else {
            anyhow::bail!("no tool process");
        };
        std::thread::sleep(Duration::from_millis(500));
        run.set("rss_idle_mib", rss_measure(tool_pid, "VmRSS"));
        run.set("anon_idle_mib", rss_measure(tool_pid, "RssAnon"));
        conns_test(&mut agent, &env, setup, pid, plan, run);
        return Ok(());
    }
    for &path in phase.paths() {
        if interrupted() {
            anyhow::bail!("interrupted");
        }
        if path == TcpPath::NsHostPair {
            pair_test(setup, ctx, &mut agent, target(stream.port()), mtu, run);
            continue;
        }
        if path == TcpPath::NsHost6 && stream6.is_none() {
            let why = Measure::NotApplicable("no IPv6 in this setup".into());
            run.set(&tcp_key(path, mtu), why.clone());
            run.set(&cpu_key(path, mtu), why);
            continue;
        }
        let before = tool_pid.and_then(cpu_seconds);
        let machine_before = machine_jiffies();
        let result: Result<StreamResult, String> = match path {
            TcpPath::NsHost6 => match &stream6 {
                Some((server, target)) => {
                    let req = Request::Stream {
                        addr: SocketAddr::new(*target, server.port()),
                        secs,
                        streams: 1,
                        congestion: None,
                    };
                    stream_reply(agent.call(&req, plan.duration + Duration::from_secs(45)))
                }
                None => Err("no IPv6 in this setup".into()),
            },
            TcpPath::NsHost | TcpPath::NsHostCubic | TcpPath::NsHostMulti => {
                let streams = if path == TcpPath::NsHostMulti { STREAMS } else { 1 };
                let congestion = (path == TcpPath::NsHostCubic).then(|| CUBIC.to_string());
                let req = Request::Stream { addr: target(stream.port()), secs, streams, congestion };
                stream_reply(agent.call(&req, plan.duration + Duration::from_secs(45)))
            }
            TcpPath::HostNsLoopback => host_stream(env.lo_target, plan.duration),
            TcpPath::NsHostPair => unreachable!("measured by pair_test"),
            TcpPath::HostNsPeer => match (env.peer_target, peer.as_mut()) {
                (None, _) => host_stream(env.lo_target, plan.duration),
                (Some(addr), Ok(p)) => {
                    let req = Request::Stream { addr, secs, streams: 1, congestion: None };
                    stream_reply(p.agent.call(&req, plan.duration + Duration::from_secs(45)))
                }
                (Some(_), Err(e)) => Err(format!("no remote client: {e}")),
            },
        };
        let after = tool_pid.and_then(cpu_seconds);
        let machine_after = machine_jiffies();
        if let Ok(r) = &result {
            run.details.insert(tcp_key(path, mtu), json!(r));
        }
        if phase == Phase::Main && BUSY_PATHS.contains(&path) {
            let busy = match (&result, machine_before.zip(machine_after).and_then(|(b, a)| busy_pct(b, a))) {
                (Err(e), _) => Measure::Failed(e.clone()),
                (Ok(_), Some(pct)) => Measure::Value(pct),
                (Ok(_), None) => Measure::Failed("cannot read /proc/stat".into()),
            };
            run.set(&busy_key(path), busy);
        }
        run.set_result(&tcp_key(path, mtu), result.as_ref().map(StreamResult::gbps).map_err(Clone::clone));
        let cpu = match (tool_pid, before, after, &result) {
            (None, ..) => Measure::NotApplicable("kernel only".into()),
            (Some(_), Some(b), Some(a), Ok(r)) if r.bytes > 0 => Measure::Value((a - b) / (r.bytes as f64 / 1e9)),
            (Some(_), _, _, Err(e)) => Measure::Failed(e.clone()),
            _ => Measure::Failed("cannot read the tool's CPU time".into()),
        };
        run.set(&cpu_key(path, mtu), cpu);
    }
    if phase != Phase::Main {
        return Ok(());
    }

    let rr_req = Request::Rr { addr: target(rr.port()), count: plan.rr_count, secs };
    let before = tool_pid.and_then(cpu_seconds);
    let reply = agent.call(&rr_req, plan.duration + Duration::from_secs(30));
    let after = tool_pid.and_then(cpu_seconds);
    match reply {
        Ok(Reply::Rr(s)) => {
            run.set("rr_mean_us", Measure::Value(s.mean_us));
            run.set("rr_median_us", Measure::Value(s.median_us));
            let cpu = match (tool_pid, before, after) {
                (None, ..) => Measure::NotApplicable("kernel only".into()),
                (Some(_), Some(b), Some(a)) if s.count > 0 => Measure::Value((a - b) * 1e6 / s.count as f64),
                _ => Measure::Failed("cannot read the tool's CPU time".into()),
            };
            run.set("rr_cpu_us", cpu);
            run.details.insert("rr".into(), json!(s));
        }
        other => {
            let why = unexpected(other);
            run.set("rr_mean_us", Measure::Failed(why.clone()));
            run.set("rr_median_us", Measure::Failed(why.clone()));
            run.set("rr_cpu_us", Measure::Failed(why));
        }
    }
    sockperf_test(&mut agent, &env, plan, run);
    let crr_req = Request::Crr { addr: target(crr.port()), secs: plan.crr.as_secs_f64() };
    let crr_result = match agent.call(&crr_req, plan.crr + Duration::from_secs(30)) {
        Ok(Reply::Crr { per_sec }) => Ok(per_sec),
        other => Err(unexpected(other)),
    };
    run.set_result("crr_per_sec", crr_result);
    let own_session = crr_own_session(ctx.self_exe, &mut agent, &env, plan, run);
    run.set_result("crr_own_session_per_sec", own_session);

    // Connections per second through the published port, from the host's loopback.
    let at = SocketAddr::from(([0, 0, 0, 0], env.sink_port));
    let published_crr = match agent.call(&Request::ServeCrr { addr: at }, Duration::from_secs(30)) {
        Ok(Reply::Listening { .. }) => traffic::crr_client(env.lo_target, plan.crr).map_err(|e| format!("{e:#}")),
        other => Err(unexpected(other)),
    };
    run.set_result("crr_published_per_sec", published_crr);

    udp_test(&mut agent, &env, plan, run, tool_pid, 1);
    udp_test(&mut agent, &env, plan, run, tool_pid, UDP_BURST);
    drop(agent);
    Ok(())
}

/// The `NsHostPair` path: a second instance of `setup` beside the one `agent` runs in, and
/// `STREAMS / 2` streams through each at once to the same server at `target`. Two usernet
/// processes share nothing, so this is the upper bound of a usernet that runs two engines
/// (one per core, flows split between them): it shows whether the target of four streams
/// over one tool (issue 15: 1.3x a single stream) fits in this machine's CPUs at all.
fn pair_test(setup: Setup, ctx: &Ctx, agent: &mut Agent, target: SocketAddr, mtu: u32, run: &mut Run) {
    let keys = [tcp_key(TcpPath::NsHostPair, mtu), cpu_key(TcpPath::NsHostPair, mtu), busy_key(TcpPath::NsHostPair)];
    let outcome = if setup.is_usernet_run() {
        pair_streams(setup, ctx, agent, target, mtu, run).map_err(|e| format!("{e:#}"))
    } else {
        let why = Measure::NotApplicable("usernet run only".into());
        for k in &keys {
            run.set(k, why.clone());
        }
        return;
    };
    match outcome {
        Ok((result, cpu_s, busy)) => {
            run.details.insert(keys[0].clone(), json!(result));
            run.set(&keys[0], Measure::Value(result.gbps()));
            run.set(
                &keys[1],
                cpu_s.map_or(Measure::Failed("cannot read the tools' CPU time".into()), |s| {
                    Measure::Value(s / (result.bytes as f64 / 1e9))
                }),
            );
            run.set(&keys[2], busy.map_or(Measure::Failed("cannot read /proc/stat".into()), Measure::Value));
        }
        Err(why) => {
            for k in &keys {
                run.set(k, Measure::Failed(why.clone()));
            }
        }
    }
}

/// Runs the pair's streams: (their total, both tools' CPU seconds, the machine's busy %).
fn pair_streams(
    setup: Setup,
    ctx: &Ctx,
    agent: &mut Agent,
    target: SocketAddr,
    mtu: u32,
    run: &mut Run,
) -> anyhow::Result<(StreamResult, Option<f64>, Option<f64>)> {
    let env = setups::prepare(setup, ctx.tools, mtu, None)?;
    let mut cmd = Command::new(&env.prefix[0]);
    cmd.args(&env.prefix[1..]).arg(ctx.self_exe).arg("agent");
    run.commands.push(format!("# the second instance of the pair: {}", setups::show(&cmd)));
    let mut second = Agent::spawn(&mut cmd)?;
    match second.call(&Request::Serve { port: env.sink_port }, Duration::from_secs(60)) {
        Ok(Reply::Ready { .. }) => {}
        other => anyhow::bail!("second agent: {}", unexpected(other)),
    }
    let pids = [agent.pid(), second.pid()];
    let tools_cpu = || pids.iter().map(|&p| cpu_seconds(p)).sum::<Option<f64>>();
    let duration = ctx.plan.duration;
    let req = Request::Stream { addr: target, secs: duration.as_secs_f64(), streams: STREAMS / 2, congestion: None };
    let (cpu_before, machine_before) = (tools_cpu(), machine_jiffies());
    let (a, b) = std::thread::scope(|scope| {
        let first = scope.spawn(|| stream_reply(agent.call(&req, duration + Duration::from_secs(45))));
        let b = stream_reply(second.call(&req, duration + Duration::from_secs(45)));
        (first.join().unwrap_or_else(|_| Err("stream thread panicked".into())), b)
    });
    let (cpu_after, machine_after) = (tools_cpu(), machine_jiffies());
    let (a, b) = (a.map_err(anyhow::Error::msg)?, b.map_err(|e| anyhow::anyhow!("second instance: {e}"))?);
    let total = StreamResult { bytes: a.bytes + b.bytes, secs: a.secs.max(b.secs) };
    let cpu = cpu_before.zip(cpu_after).map(|(b, a)| a - b);
    let busy = machine_before.zip(machine_after).and_then(|(b, a)| busy_pct(b, a));
    Ok((total, cpu, busy))
}

fn stream_reply(r: Result<Reply, String>) -> Result<StreamResult, String> {
    match r {
        Ok(Reply::Stream(s)) => Ok(s),
        other => Err(unexpected(other)),
    }
}

/// Connections per second as in `crr_per_sec`, against the same server in a process of its
/// own in a session of its own (setsid(2)), as a host's service usually runs: started from
/// another terminal or by systemd, not from the session of the container or VM that dials it.
///
/// Where the kernel groups processes by session for scheduling (`kernel.sched_autogroup_enabled`,
/// on in this machine's kernel), `crr_per_sec`'s server, a thread of this driver, shares one
/// group with the tool and the client it serves (pasta excepted: it daemonizes with setsid).
/// A server in a group of its own gives usernet's busy polling about a quarter more
/// connections per second on the 2-core VM of docs/bench.txt: this bench's agent as the
/// server, in a process of its own either way, 2 s runs, alternated: 9,484-10,194 in the
/// caller's session against 12,355-12,754 in its own. Not so with busy polling off
/// (5,686-5,917 against 5,932-6,136), nor for the kernel's veth (16,482-17,187 against
/// 16,310-16,536), nor with autogroups off (9,762-10,164 against 9,943-10,159). See
/// crates/core/src/engine/busy_poll.rs. The row runs after `crr_per_sec`, and the setups that
/// do not spin measured 2-14% less in it than in that row in docs/bench.txt.
fn crr_own_session(self_exe: &Path, agent: &mut Agent, env: &Env, plan: &Plan, run: &mut Run) -> Result<f64, String> {
    use std::os::unix::process::CommandExt;
    if interrupted() {
        return Err("interrupted".into());
    }
    let mut cmd = Command::new(self_exe);
    cmd.arg("agent");
    run.commands.push(format!("# the connection-rate server in a session of its own: setsid {}", setups::show(&cmd)));
    // SAFETY: setsid(2) is async-signal-safe and touches nothing of the forked child's memory.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
    }
    let mut server = Agent::spawn(&mut cmd).map_err(|e| format!("{e:#}"))?;
    let port = match server.call(&Request::ServeCrr { addr: SocketAddr::new(env.bind_ip, 0) }, Duration::from_secs(30))
    {
        Ok(Reply::Listening { port }) => port,
        other => return Err(format!("the server in its own session: {}", unexpected(other))),
    };
    let req = Request::Crr { addr: SocketAddr::new(env.target_ip, port), secs: plan.crr.as_secs_f64() };
    match agent.call(&req, plan.crr + Duration::from_secs(30)) {
        Ok(Reply::Crr { per_sec }) => Ok(per_sec),
        other => Err(format!("the client, against the server in its own session: {}", unexpected(other))),
    }
}

/// The error text for a reply that is an error or not the one expected.
fn unexpected(r: Result<Reply, String>) -> String {
    match r {
        Err(e) => e,
        Ok(other) => format!("unexpected agent reply {other:?}"),
    }
}

/// A single stream from the host (the driver itself) to the agent's server.
fn host_stream(addr: SocketAddr, duration: Duration) -> Result<StreamResult, String> {
    traffic::stream_client(addr, duration, 1, None).map_err(|e| format!("{e:#}"))
}

/// sockperf's ping-pong, TCP then UDP: its server on the host, its client run by the agent.
fn sockperf_test(agent: &mut Agent, env: &Env, plan: &Plan, run: &mut Run) {
    if !sockperf::available() {
        for k in SOCKPERF_KEYS {
            run.set(k, Measure::NotApplicable("sockperf is not installed".into()));
        }
        return;
    }
    let secs = plan.duration.as_secs().max(1) as u32;
    for (proto, key) in sockperf::Proto::ALL.into_iter().zip(SOCKPERF_KEYS) {
        let server = match sockperf::Server::start(env.bind_ip, proto) {
            Ok(s) => s,
            Err(e) => {
                run.set(key, Measure::Failed(format!("{e:#}")));
                continue;
            }
        };
        let req = Request::Sockperf { addr: SocketAddr::new(env.target_ip, server.addr.port()), proto, secs };
        match agent.call(&req, Duration::from_secs(u64::from(secs) + 30)) {
            Ok(Reply::Sockperf(s)) => {
                run.set(key, Measure::Value(s.median_us));
                run.details.insert(key.into(), json!(s));
            }
            other => run.set(key, Measure::Failed(unexpected(other))),
        }
    }
}

/// The paced UDP tests: the agent sends, a sink on the host counts, and the tool's CPU per
/// datagram sent is read around the send. `segments` datagrams go per send: 1 (the keys
/// `udp_*`), or [`UDP_BURST`] cut by the kernel (UDP_SEGMENT, as QUIC stacks send their
/// windows: the keys `udp_gso_*`).
fn udp_test(agent: &mut Agent, env: &Env, plan: &Plan, run: &mut Run, tool_pid: Option<i32>, segments: usize) {
    let prefix = if segments > 1 { "udp_gso" } else { "udp" };
    let key = |what: &str| format!("{prefix}_{what}");
    let fail = |run: &mut Run, why: String| {
        for k in ["rx_mbps", "loss_pct", "sent_mbps", "cpu_us"] {
            run.set(&key(k), Measure::Failed(why.clone()));
        }
    };
    let sink = match UdpSink::start(env.bind_ip) {
        Ok(s) => s,
        Err(e) => return fail(run, format!("{e:#}")),
    };
    let req = Request::Udp {
        addr: SocketAddr::new(env.target_ip, sink.addr.port()),
        secs: plan.udp.as_secs_f64(),
        rate_bps: UDP_RATE_BPS,
        size: UDP_SIZE,
        segments,
    };
    let before = tool_pid.and_then(cpu_seconds);
    let sent = match agent.call(&req, plan.udp + Duration::from_secs(30)) {
        Ok(Reply::Udp(s)) => s,
        other => return fail(run, unexpected(other)),
    };
    // Let what is still in flight land.
    std::thread::sleep(Duration::from_millis(300));
    let after = tool_pid.and_then(cpu_seconds);
    let (datagrams, bytes) = sink.received();
    run.details
        .insert(prefix.into(), json!({ "sent": sent, "received_datagrams": datagrams, "received_bytes": bytes }));
    if sent.datagrams == 0 || sent.secs <= 0.0 {
        return fail(run, format!("the sender sent nothing ({} errors)", sent.errors));
    }
    run.set(&key("rx_mbps"), Measure::Value(bytes as f64 * 8.0 / sent.secs / 1e6));
    run.set(&key("sent_mbps"), Measure::Value(sent.bytes as f64 * 8.0 / sent.secs / 1e6));
    let lost = sent.datagrams.saturating_sub(datagrams);
    run.set(&key("loss_pct"), Measure::Value(lost as f64 * 100.0 / sent.datagrams as f64));
    let cpu = match (tool_pid, before, after) {
        (None, ..) => Measure::NotApplicable("kernel only".into()),
        (Some(_), Some(b), Some(a)) => Measure::Value((a - b) * 1e6 / sent.datagrams as f64),
        _ => Measure::Failed("cannot read the tool's CPU time".into()),
    };
    run.set(&key("cpu_us"), cpu);
}

/// How many idle connections a tool can hold here, if fewer than asked, and why.
fn conns_cap(setup: Setup, pid: i32, asked: u32) -> Option<(u32, String)> {
    match setup {
        // libslirp polls every socket on every turn: opening slows down quadratically (7,060
        // in 30 s here), and it buffers ~260 KiB per connection.
        Setup::Slirp4netns if asked > SLIRP_CONNS => {
            Some((SLIRP_CONNS, format!("held {SLIRP_CONNS} only: libslirp opens them slowly (O(n) poll)")))
        }
        // pasta spends two descriptors per connection (socket and timerfd), and exits when it
        // runs out of them.
        Setup::Pasta => {
            let limit = open_files_limit(pid)?;
            let cap = (limit.saturating_sub(256) / 2) as u32;
            (cap < asked)
                .then(|| (cap, format!("held {cap} only: pasta uses 2 fds per connection, its limit is {limit}")))
        }
        _ => None,
    }
}

/// Idle connections slirp4netns is asked to hold (see [`conns_cap`]).
const SLIRP_CONNS: u32 = 2_000;

/// The soft RLIMIT_NOFILE of a process, from /proc/PID/limits.
fn open_files_limit(pid: i32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The memory test: many idle connections held through the tool, on a fresh setup whose
/// idle RSS was just read.
fn conns_test(agent: &mut Agent, env: &Env, setup: Setup, pid: i32, plan: &Plan, run: &mut Run) {
    let fail = |run: &mut Run, why: String| {
        for k in ["rss_conns_mib", "rss_per_conn_kib"] {
            run.set(k, Measure::Failed(why.clone()));
        }
    };
    let hold = match Server::start(Kind::Hold, SocketAddr::new(env.bind_ip, 0)) {
        Ok(s) => s,
        Err(e) => return fail(run, format!("{e:#}")),
    };
    let cap = conns_cap(setup, pid, plan.conns);
    let asked = cap.as_ref().map_or(plan.conns, |(n, _)| *n);
    let baseline = rss_mib(pid);
    let req = Request::Open {
        addr: SocketAddr::new(env.target_ip, hold.port()),
        count: asked,
        secs: plan.open_limit.as_secs_f64(),
    };
    let (count, secs, error) = match agent.call(&req, plan.open_limit + Duration::from_secs(30)) {
        Ok(Reply::Opened { count, secs, error }) => (count, secs, error),
        other => return fail(run, unexpected(other)),
    };
    std::thread::sleep(plan.hold);
    let loaded = rss_mib(pid);
    let closed = agent.call(&Request::Close, Duration::from_secs(60));
    drop(hold);
    run.details.insert(
        "conns".into(),
        json!({ "asked": plan.conns, "attempted": asked, "opened": count, "open_secs": secs, "error": error,
                "rss_before_mib": baseline, "rss_held_mib": loaded }),
    );
    let Some(loaded) = loaded else {
        return fail(run, "cannot read the tool's memory (did it exit?)".into());
    };
    if let Some(e) = error {
        return fail(run, format!("{e}; RSS then {loaded:.1} MiB"));
    }
    if let Err(e) = closed {
        tracing::debug!("bench: closing the idle connections: {e}");
    }
    match cap {
        Some((_, why)) => run.set("rss_conns_mib", Measure::NotApplicable(format!("{why}: {loaded:.1} MiB"))),
        None => run.set("rss_conns_mib", Measure::Value(loaded)),
    }
    match baseline {
        Some(b) if count > 0 => run.set("rss_per_conn_kib", Measure::Value((loaded - b) * 1024.0 / count as f64)),
        _ => run.set("rss_per_conn_kib", Measure::Failed("no baseline".into())),
    }
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: i32) -> Option<f64> {
    cpu_seconds_of(Path::new(&format!("/proc/{pid}/stat")))
}

/// CPU seconds of a process's threads alive now, to the nanosecond: the sum of their
/// run times (the first field of each /proc/PID/task/TID/schedstat). [`cpu_seconds`]
/// counts in clock ticks (10 ms), too coarse for the VM phase, whose transfers of 64 MiB
/// cost the tools well under a second (one tick is 0.15 s per GB there). Threads that
/// ended are not counted: for tools whose threads live as long as the transfer.
fn cpu_seconds_of_threads(pid: i32) -> Option<f64> {
    let mut nanos: u64 = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        nanos += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(nanos as f64 / 1e9)
}

/// utime + stime from a stat file of proc(5) (a process's, or a thread's under task/).
fn cpu_seconds_of(path: &Path) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); the first after ')' is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| (utime + stime) as f64 / hz as f64)
}

/// Clock ticks of all CPUs together since boot, from /proc/stat: (busy, total).
fn machine_jiffies() -> Option<(u64, u64)> {
    machine_jiffies_of(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn machine_jiffies_of(stat: &str) -> Option<(u64, u64)> {
    let fields = stat.lines().next()?.strip_prefix("cpu ")?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user already).
    let ticks: Vec<u64> = fields.split_whitespace().take(8).map(|f| f.parse().ok()).collect::<Option<_>>()?;
    if ticks.len() < 8 {
        return None;
    }
    let total: u64 = ticks.iter().sum();
    Some((total - ticks[3] - ticks[4], total))
}

/// How busy the machine was between two readings of [`machine_jiffies`], in % of all its CPUs.
fn busy_pct(before: (u64, u64), after: (u64, u64)) -> Option<f64> {
    let total = after.1.checked_sub(before.1).filter(|t| *t > 0)?;
    let busy = after.0.checked_sub(before.0)?;
    Some(100.0 * busy as f64 / total as f64)
}

/// VmRSS of a process, in MiB.
fn rss_mib(pid: i32) -> Option<f64> {
    status_mib(pid, "VmRSS")
}

/// A memory field of /proc/PID/status (proc(5)), in MiB: VmRSS, all the process's resident
/// pages; RssAnon, those of its heap and stacks only, without the pages of its executable
/// and libraries, which the page cache holds (and shares) anyway.
fn status_mib(pid: i32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status_field_mib(&status, field)
}

fn status_field_mib(status: &str, field: &str) -> Option<f64> {
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn rss_measure(pid: Option<i32>, field: &str) -> Measure {
    match pid {
        None => Measure::NotApplicable("kernel only".into()),
        Some(pid) => {
            status_mib(pid, field).map_or_else(|| Measure::Failed(format!("cannot read {field}")), Measure::Value)
        }
    }
}

/// Runs of the start-up test (after two that are not counted).
const STARTUP_RUNS: usize = 20;

/// Start-up: the median wall time of the setup's command around `true` (a fresh network,
/// COMMAND, and the network gone again), as hyperfine would measure it.
fn startup_measure(setup: Setup, tools: &setups::Tools) -> Measure {
    let mut cmd = match setups::startup_command(setup, tools) {
        Ok(cmd) => cmd,
        Err(why) => return Measure::NotApplicable(why),
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut times = Vec::with_capacity(STARTUP_RUNS);
    for i in 0..STARTUP_RUNS + 2 {
        let t = Instant::now();
        match cmd.status() {
            Ok(s) if s.success() => {}
            Ok(s) => return Measure::Failed(format!("{}: {s}", setups::show(&cmd))),
            Err(e) => return Measure::Failed(format!("{}: {e}", setups::show(&cmd))),
        }
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    times.sort_by(f64::total_cmp);
    Measure::Value(times[times.len() / 2])
}

/// Which way a row is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
    /// Neither: a measurement that explains others (how busy the machine was).
    Neither,
}

impl Better {
    /// The row's mark in the table: `+`, `-` or `.`.
    fn mark(self) -> &'static str {
        match self {
            Better::Higher => "+",
            Better::Lower => "-",
            Better::Neither => ".",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
            Better::Neither => "context, neither better",
        }
    }
}

/// A row of the table.
struct Metric {
    key: String,
    label: String,
    better: Better,
    decimals: usize,
}

fn metric_list(plan: &Plan) -> Vec<Metric> {
    let m = |key: String, label: String, better: Better, decimals: usize| Metric { key, label, better, decimals };
    let mut list = Vec::new();
    for mtu in [DEFAULT_MTU, LOW_MTU] {
        let paths: &[TcpPath] = if mtu == DEFAULT_MTU { &TcpPath::ALL } else { &TcpPath::LOW_MTU };
        for &p in paths {
            list.push(m(tcp_key(p, mtu), format!("TCP {}, MTU {mtu}, Gbit/s", p.describe()), Better::Higher, 2));
        }
    }
    if let Some(v) = &plan.vm {
        let transport = match (v.transport, v.passt_transport) {
            (a, b) if a == b => a.name().to_string(),
            (a, b) => format!("usernet's {} (passt's {})", a.name(), b.name()),
        };
        let how = format!("over the {transport} transport (TCG guest), MTU {}, Gbit/s", v.mtu);
        list.push(m("vm_up_gbps".into(), format!("TCP VM->host {how}"), Better::Higher, 3));
        list.push(m("vm_down_gbps".into(), format!("TCP host->VM {how}"), Better::Higher, 3));
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    for p in BUSY_PATHS {
        let label = format!("machine CPU busy during TCP {}, MTU {DEFAULT_MTU}, % of its {cpus} CPUs", p.describe());
        list.push(m(busy_key(p), label, Better::Neither, 0));
    }
    list.push(m("rr_mean_us".into(), "1-byte TCP round trip, mean, us".into(), Better::Lower, 1));
    list.push(m("rr_median_us".into(), "1-byte TCP round trip, median, us".into(), Better::Lower, 1));
    list.push(m("rr_cpu_us".into(), "tool CPU per 1-byte TCP round trip, us".into(), Better::Lower, 1));
    for (proto, key) in sockperf::Proto::ALL.into_iter().zip(SOCKPERF_KEYS) {
        let label = format!("sockperf ping-pong {}, 14-byte round trip, median, us", proto.name());
        list.push(m(key.into(), label, Better::Lower, 1));
    }
    list.push(m("crr_per_sec".into(), "TCP connections/s (1 byte each way)".into(), Better::Higher, 0));
    list.push(m(
        "crr_own_session_per_sec".into(),
        "TCP connections/s, the host's server in a session of its own".into(),
        Better::Higher,
        0,
    ));
    list.push(m(
        "crr_published_per_sec".into(),
        "TCP connections/s host->ns published, loopback client".into(),
        Better::Higher,
        0,
    ));
    let offered = format!("UDP ns->host, {} Mbit/s of {UDP_SIZE} B offered", UDP_RATE_BPS / 1e6);
    list.push(m("udp_rx_mbps".into(), format!("{offered}: received Mbit/s"), Better::Higher, 0));
    list.push(m("udp_loss_pct".into(), format!("{offered}: loss %"), Better::Lower, 2));
    list.push(m("udp_sent_mbps".into(), format!("{offered}: sender managed Mbit/s"), Better::Higher, 0));
    list.push(m("udp_cpu_us".into(), format!("tool CPU per datagram: {offered}, us"), Better::Lower, 2));
    let offered = format!(
        "UDP ns->host in bursts of {UDP_BURST} sent segmented (UDP_SEGMENT), {} Mbit/s of {UDP_SIZE} B offered",
        UDP_RATE_BPS / 1e6
    );
    list.push(m("udp_gso_rx_mbps".into(), format!("{offered}: received Mbit/s"), Better::Higher, 0));
    list.push(m("udp_gso_loss_pct".into(), format!("{offered}: loss %"), Better::Lower, 2));
    list.push(m("udp_gso_sent_mbps".into(), format!("{offered}: sender managed Mbit/s"), Better::Higher, 0));
    list.push(m("udp_gso_cpu_us".into(), format!("tool CPU per datagram: {offered}, us"), Better::Lower, 2));
    for mtu in [DEFAULT_MTU, LOW_MTU] {
        let paths: &[TcpPath] = if mtu == DEFAULT_MTU { &TcpPath::ALL } else { &TcpPath::LOW_MTU };
        for &p in paths {
            list.push(m(
                cpu_key(p, mtu),
                format!("tool CPU s per GB: TCP {}, MTU {mtu}", p.describe()),
                Better::Lower,
                3,
            ));
        }
    }
    if let Some(v) = &plan.vm {
        for (dir, what) in [("up", "VM->host"), ("down", "host->VM")] {
            let label = format!("tool CPU s per GB: TCP {what} (TCG guest), MTU {}", v.mtu);
            list.push(m(format!("cpu_s_per_gb_vm_{dir}"), label, Better::Lower, 3));
        }
    }
    list.push(m(
        "startup_ms".into(),
        format!("start-up: a fresh network around `true` and gone again, median of {STARTUP_RUNS}, ms"),
        Better::Lower,
        1,
    ));
    list.push(m("rss_idle_mib".into(), "tool RSS, idle, MiB".into(), Better::Lower, 1));
    list.push(m(
        "anon_idle_mib".into(),
        "tool RssAnon (RSS without its program's and libraries' pages), idle, MiB".into(),
        Better::Lower,
        1,
    ));
    list.push(m(
        "rss_conns_mib".into(),
        format!("tool RSS, {} idle TCP connections, MiB", plan.conns),
        Better::Lower,
        1,
    ));
    list.push(m("rss_per_conn_kib".into(), "tool RSS per idle TCP connection, KiB".into(), Better::Lower, 2));
    list
}

/// The values of one metric over a setup's runs, and the first reason among the others.
fn values(o: &Outcome, key: &str) -> (Vec<f64>, Option<Measure>) {
    let mut vals = Vec::new();
    let mut other = None;
    for run in &o.runs {
        match run.metrics.get(key) {
            Some(Measure::Value(v)) if v.is_finite() => vals.push(*v),
            Some(Measure::Value(v)) => {
                other.get_or_insert(Measure::Failed(format!("bad value {v}")));
            }
            Some(m) => {
                // "n/a" outranks "failed" only when nothing failed.
                let have_failure = matches!(other, Some(Measure::Failed(_)));
                if !have_failure && (other.is_none() || matches!(m, Measure::Failed(_))) {
                    other = Some(m.clone());
                }
            }
            None => {
                other.get_or_insert(Measure::Failed("not measured".into()));
            }
        }
    }
    (vals, other)
}

fn median(vals: &[f64]) -> Option<f64> {
    let mut v = vals.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Cuts a reason short enough for a table cell.
fn short(reason: &str) -> String {
    const MAX: usize = 48;
    let reason = reason.trim();
    if reason.chars().count() <= MAX {
        reason.to_string()
    } else {
        format!("{}...", reason.chars().take(MAX - 3).collect::<String>())
    }
}

/// A table cell: the median, its ratio to usernet's, and what is missing.
struct Cell {
    value: Option<f64>,
    ratio: Option<f64>,
    text: String,
}

fn cell(o: &Outcome, m: &Metric, usernet: Option<f64>) -> Cell {
    if let Some(why) = &o.unavailable {
        return Cell { value: None, ratio: None, text: format!("n/a ({})", short(why)) };
    }
    let (vals, other) = values(o, &m.key);
    let Some(value) = median(&vals) else {
        let text = match other {
            Some(Measure::NotApplicable(why)) => format!("n/a ({})", short(&why)),
            Some(Measure::Failed(why)) => format!("failed: {}", short(&why)),
            _ => "failed: no runs".into(),
        };
        return Cell { value: None, ratio: None, text };
    };
    let mut text = format!("{value:.*}", m.decimals);
    let mut ratio = None;
    if o.setup != Setup::Usernet
        && let Some(base) = usernet.filter(|b| *b > 0.0)
    {
        ratio = Some(value / base);
        text += &format!(" ({:.2}x)", value / base);
    }
    if vals.len() < o.runs.len() {
        text += &format!(" [{}/{} runs]", vals.len(), o.runs.len());
    }
    Cell { value: Some(value), ratio, text }
}

fn usernet_median(outcomes: &[Outcome], key: &str) -> Option<f64> {
    outcomes.iter().find(|o| o.setup == Setup::Usernet).and_then(|u| median(&values(u, key).0))
}

fn print_report(outcomes: &[Outcome], metrics: &[Metric], plan: &Plan, peer_commands: &[String]) {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec![String::from("metric (+ higher is better, - lower)")];
    header.extend(outcomes.iter().map(|o| o.setup.name().to_string()));
    rows.push(header);
    for m in metrics {
        let base = usernet_median(outcomes, &m.key);
        let mut row = vec![format!("{} {}", m.better.mark(), m.label)];
        row.extend(outcomes.iter().map(|o| cell(o, m, base).text));
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();

    println!();
    println!(
        "usernet-bench: median of {} run(s); TCP {} s per path, {} round trips, connections for {} s, \
         UDP {} s, {} idle connections held {} s; (Nx) = value / usernet's",
        plan.repeat,
        plan.duration.as_secs(),
        plan.rr_count,
        plan.crr.as_secs(),
        plan.udp.as_secs(),
        plan.conns,
        plan.hold.as_secs()
    );
    println!(
        "CPU: utime+stime of the tool's process (usernet run, pasta, slirp4netns; VMs: its threads' run times, \
         to the ns); veth: kernel only, n/a. \
         veth's published paths: the host dials the namespace directly."
    );
    // A new namespace starts with this default, so every setup's client uses it but in the
    // row that names its own.
    let congestion = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control");
    println!(
        "TCP congestion control: {} (this machine's default, which each new namespace starts with)",
        congestion.as_deref().map_or("unknown", str::trim)
    );
    println!();
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row.iter().zip(&widths).map(|(text, w)| format!("{text:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
        if i == 0 {
            let total = widths.iter().sum::<usize>() + 2 * (columns - 1);
            println!("{}", "-".repeat(total));
        }
    }

    if let Some(v) = &plan.vm {
        print_vm_notes(outcomes, v);
    }
    println!();
    println!("Setups (last run of each):");
    for o in outcomes {
        let Some(run) = o.runs.last() else { continue };
        println!("  {}:", o.setup.name());
        for c in &run.commands {
            println!("    {c}");
        }
    }
    if !peer_commands.is_empty() {
        println!("  remote client (peer namespace):");
        for c in peer_commands {
            println!("    {c}");
        }
    }
    let mut failures: Vec<String> = Vec::new();
    for o in outcomes {
        for (i, run) in o.runs.iter().enumerate() {
            for (key, m) in &run.metrics {
                if let Measure::Failed(why) = m {
                    failures.push(format!("  {} run {} {key}: {why}", o.setup.name(), i + 1));
                }
            }
        }
    }
    if !failures.is_empty() {
        println!();
        println!("Failures:");
        for f in failures {
            println!("{f}");
        }
    }
}

/// How the VM rows were measured, and how busy the guest's CPU was meanwhile.
fn print_vm_notes(outcomes: &[Outcome], v: &vm::VmPlan) {
    println!();
    let usernet_transport = match v.transport {
        vm::VmTransport::Stream => "-netdev stream on usernet serve --listen-qemu",
        vm::VmTransport::Dgram => "-netdev dgram on usernet serve --listen-vfkit",
        vm::VmTransport::VhostUser if vm::vhost_user_msix() => {
            "-netdev vhost-user on usernet serve --listen-vhost-user (guest RAM a shared memfd, MSI-X)"
        }
        vm::VmTransport::VhostUser => {
            "-netdev vhost-user on usernet serve --listen-vhost-user (guest RAM a shared memfd, vectors=0)"
        }
    };
    let passt_transport = match v.passt_transport {
        vm::VmTransport::VhostUser => "-netdev vhost-user on passt --vhost-user -s",
        _ => "-netdev stream on passt -s",
    };
    println!(
        "VM rows: QEMU -accel tcg (1 vCPU, 256 MiB), Debian's kernel and busybox; {usernet_transport} \
         (guest dials 192.168.65.254) or {passt_transport} (guest dials its gateway \
         10.0.2.2); both map that address to the host's 127.0.0.1, where the bench's sink and source run. \
         The guest sends {mib} MiB (busybox nc from a tmpfs file), then receives {mib} MiB (nc to /dev/null); \
         rate = bytes / time from the first byte to the end, at the host. Guest MTU {mtu} for both. \
         pasta, slirp4netns and veth serve namespaces only.",
        mib = v.mib,
        mtu = v.mtu
    );
    if let Some(why) = vm::unavailable(v.script.as_deref()) {
        println!("The VM phase did not run: {why}.");
        return;
    }
    let busy: Vec<String> = outcomes
        .iter()
        .filter(|o| o.unavailable.is_none() && matches!(o.setup, Setup::Usernet | Setup::Passt))
        .filter_map(|o| {
            let up = median(&values(o, "vm_vcpu_busy_up_pct").0)?;
            let down = median(&values(o, "vm_vcpu_busy_down_pct").0)?;
            Some(format!("{} {up:.0}% sending, {down:.0}% receiving", o.setup.name()))
        })
        .collect();
    let busy = if busy.is_empty() { String::new() } else { format!(" (QEMU's vCPU thread busy: {})", busy.join("; ")) };
    println!(
        "Under TCG the guest's emulated CPU is the bottleneck{busy}: the VM rows measure the guest more \
         than the tools, whose own cost shows in the CPU s per GB rows."
    );
}

fn json_report(
    outcomes: &[Outcome],
    metrics: &[Metric],
    plan: &Plan,
    tools: &Tools,
    peer_commands: &[String],
) -> serde_json::Value {
    let setups: serde_json::Map<String, serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            let ok = o.runs.iter().any(|r| r.metrics.values().any(|m| matches!(m, Measure::Value(_))));
            let status = match (&o.unavailable, ok) {
                (Some(_), _) => "n/a",
                (None, true) => "ok",
                (None, false) => "failed",
            };
            let medians: serde_json::Map<String, serde_json::Value> =
                metrics.iter().map(|m| (m.key.clone(), json!(median(&values(o, &m.key).0)))).collect();
            let runs: Vec<serde_json::Value> = o
                .runs
                .iter()
                .map(
                    |r| json!({ "metrics": r.metrics, "details": r.details, "notes": r.notes, "commands": r.commands }),
                )
                .collect();
            let value = json!({
                "status": status,
                "reason": o.unavailable,
                "median": medians,
                "runs": runs,
            });
            (o.setup.name().to_string(), value)
        })
        .collect();
    let metric_info: Vec<serde_json::Value> =
        metrics.iter().map(|m| json!({ "key": m.key, "label": m.label, "better": m.better.describe() })).collect();
    json!({
        "plan": {
            "duration_s": plan.duration.as_secs(),
            "repeat": plan.repeat,
            "rr_count": plan.rr_count,
            "crr_s": plan.crr.as_secs(),
            "udp_s": plan.udp.as_secs(),
            "udp_offered_bps": UDP_RATE_BPS,
            "udp_size": UDP_SIZE,
            "udp_burst": UDP_BURST,
            "conns": plan.conns,
            "hold_s": plan.hold.as_secs(),
            "streams": STREAMS,
            "low_mtu": LOW_MTU,
            "vm": plan.vm,
        },
        "usernet_bin": tools.usernet_bin,
        "pasta_bin": tools.pasta_bin,
        "peer_commands": peer_commands,
        "metrics": metric_info,
        "setups": setups,
    })
}

fn svg_report(outcomes: &[Outcome], metrics: &[Metric], plan: &Plan) -> String {
    let groups: Vec<svg::Group> = metrics
        .iter()
        .map(|m| {
            let base = usernet_median(outcomes, &m.key);
            let bars = outcomes
                .iter()
                .map(|o| {
                    let c = cell(o, m, base);
                    svg::Bar { setup: o.setup.name().to_string(), value: c.value, ratio: c.ratio, text: c.text }
                })
                .collect();
            svg::Group { title: format!("{} ({})", m.label, m.better.describe()), bars }
        })
        .collect();
    let subtitle = format!(
        "median of {} run(s), {} s per TCP path; ratios are value / usernet's",
        plan.repeat,
        plan.duration.as_secs()
    );
    let names: Vec<&str> = outcomes.iter().map(|o| o.setup.name()).collect();
    svg::render("usernet-bench", &subtitle, &names, &groups)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn short_cuts_long_reasons() {
        assert_eq!(short("  ok "), "ok");
        let long = "x".repeat(100);
        assert_eq!(short(&long).chars().count(), 48);
    }

    #[test]
    fn machine_busy_from_proc_stat() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 0 50 800 50 0 0 0 10 0\ncpu0 50 0 25 400 25 0 0 0 5 0\n";
        assert_eq!(machine_jiffies_of(stat), Some((150, 1000)));
        assert_eq!(busy_pct((150, 1000), (240, 1100)), Some(90.0));
        assert_eq!(busy_pct((150, 1000), (150, 1000)), None, "no time passed");
        assert_eq!(machine_jiffies_of("cpu  1 2 3\n"), None, "too few fields");
        assert_eq!(machine_jiffies_of("cpu0 1 2 3 4 5 6 7 8\n"), None, "not the all-CPU line");
        assert_eq!(machine_jiffies_of("cpu  1 x 3 4 5 6 7 8\n"), None);
        assert!(machine_jiffies().is_some(), "this machine's /proc/stat");
    }

    #[test]
    fn reads_own_cpu_and_memory() {
        let me = std::process::id() as i32;
        assert!(cpu_seconds(me).is_some());
        assert!(rss_mib(me).unwrap() > 0.0);
        assert!(status_mib(me, "RssAnon").unwrap() > 0.0);
        assert!(cpu_seconds(i32::MAX).is_none());
        // The threads' run times, to the nanosecond: at least what this thread's ticks say,
        // less a tick. (Not the whole process's ticks: they count the threads of other tests
        // that have ended, which the live threads' run times cannot.)
        let busy = std::time::Instant::now();
        while busy.elapsed() < std::time::Duration::from_millis(30) {}
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let ticks = cpu_seconds_of(Path::new(&format!("/proc/{me}/task/{tid}/stat"))).unwrap();
        let precise = cpu_seconds_of_threads(me).unwrap();
        assert!(precise > 0.02 && precise + 0.011 >= ticks, "{precise} s against {ticks} s in ticks");
        assert!(cpu_seconds_of_threads(i32::MAX).is_none());
    }

    #[test]
    fn memory_fields_of_proc_status() {
        let status = "Name:\tusernet\nVmRSSX:\t1 kB\nVmRSS:\t    8192 kB\nRssAnon:\t    2048 kB\n";
        assert_eq!(status_field_mib(status, "VmRSS"), Some(8.0), "not the longer name that starts alike");
        assert_eq!(status_field_mib(status, "RssAnon"), Some(2.0));
        assert_eq!(status_field_mib(status, "RssFile"), None);
        assert_eq!(status_field_mib("VmRSS:\tlots kB\n", "VmRSS"), None);
    }

    #[test]
    fn cells_show_ratio_and_reasons() {
        let mut a = Run::default();
        a.set("x", Measure::Value(2.0));
        let mut b = Run::default();
        b.set("x", Measure::Value(4.0));
        let usernet = Outcome { setup: Setup::Usernet, unavailable: None, runs: vec![a] };
        let pasta = Outcome { setup: Setup::Pasta, unavailable: None, runs: vec![b] };
        let m = Metric { key: "x".into(), label: "x".into(), better: Better::Higher, decimals: 1 };
        let base = usernet_median(&[usernet], "x");
        let c = cell(&pasta, &m, base);
        assert_eq!(c.text, "4.0 (2.00x)");
        let mut v = Run::default();
        v.set("x", Measure::NotApplicable("kernel only".into()));
        let veth = Outcome { setup: Setup::Veth, unavailable: None, runs: vec![v] };
        assert_eq!(cell(&veth, &m, base).text, "n/a (kernel only)");
    }

    #[test]
    fn every_phase_key_has_a_row() {
        let plan = Plan::from_args(&BenchArgs {
            duration: None,
            repeat: None,
            quick: true,
            only: Vec::new(),
            drop_in: false,
            podman_user: None,
            usernet_bin: None,
            pasta_bin: "pasta".into(),
            json: None,
            svg: None,
            rr_count: None,
            conns: None,
            vm: true,
            vm_only: false,
            vm_initramfs_script: None,
            vm_mib: None,
            vm_mtu: 1500,
            vm_transport: vm::VmTransport::Stream,
            passt_bin: None,
        });
        let rows: Vec<String> = metric_list(&plan).into_iter().map(|m| m.key).collect();
        for p in TcpPath::ALL {
            assert!(rows.contains(&tcp_key(p, DEFAULT_MTU)) && rows.contains(&cpu_key(p, DEFAULT_MTU)));
        }
        for p in TcpPath::LOW_MTU {
            assert!(rows.contains(&tcp_key(p, LOW_MTU)) && rows.contains(&cpu_key(p, LOW_MTU)));
        }
        for k in Phase::ALL.iter().flat_map(|p| p.keys()) {
            assert!(rows.contains(&k), "{k}");
        }
        for k in VM_KEYS.iter().filter(|k| !k.contains("vcpu")) {
            assert!(rows.iter().any(|r| r == k), "{k}");
        }
        assert_eq!(plan.conns, 2_000);
        assert_eq!(plan.vm.map(|v| v.mib), Some(32));
    }
}
