//! `usernet bench`: usernet against pasta, slirp4netns and a veth pair, side by side.
//!
//! Method. For every setup (usernet, pasta, slirp4netns, a plain veth pair as the kernel's own
//! limit) and every repeat, the bench builds a fresh namespace the way that tool is meant to be
//! used, starts three small TCP servers on the host side (in this process, see
//! [`traffic`]), and runs a client inside the namespace: this same executable, re-executed as
//! `usernet bench --role client ...` under `usernet run --`, `nsenter` or `ip netns exec`. The
//! client measures, one after the other:
//! - single-stream TCP throughput, namespace -> host: 128 KiB writes (as iperf3) for
//!   `--duration` seconds, then a half-close; the host side divides the bytes it read by the
//!   time from its first byte to EOF. Stricter than iperf3, which stops its clock at the end
//!   of the sending window: a path that stalls and drains late pays for the whole stall;
//! - 1-byte request/response latency on one TCP_NODELAY connection, `--rr-count` round trips
//!   (at most `--duration` seconds) after a warm-up, mean and median;
//! - new connections per second (connect, 1 byte each way, close) for up to 3 seconds.
//!
//! It prints one JSON line that the bench parses. Setups run interleaved (one run of each,
//! then again), so a noisy neighbour spreads across all of them; the table shows the median of
//! `--repeat` runs and each peer's ratio to usernet (peer / usernet, whatever the direction
//! of "better").
//!
//! The host side of every path is the host's loopback (the address each tool maps to it:
//! usernet 192.168.65.254, pasta its default gateway, slirp4netns 10.0.2.2), or for veth the
//! host end of the pair. No other address is ever dialled, usernet gets a dead loopback DNS
//! upstream, and everything started or created is removed after each run (see [`setups`]). A
//! setup that is missing reads "n/a (...)"; one that fails reads "failed: ..." and the bench
//! goes on.

mod setups;
mod traffic;

use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use serde_json::json;

use setups::Setup;
use traffic::{ClientPlan, ClientReport, REPORT_PREFIX, Servers};

/// Longest connection-rate test.
const CRR_SECONDS: u64 = 3;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Seconds of each throughput run (the latency test stops sooner, the connection-rate
    /// test after at most 3 s).
    #[arg(long, value_name = "SECS", default_value_t = 5,
          value_parser = clap::value_parser!(u64).range(1..=60))]
    pub duration: u64,
    /// Runs of each setup; the table shows the median.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=20))]
    pub repeat: u32,
    /// Setups to run, comma-separated: usernet, pasta, slirp4netns, veth (default: all).
    #[arg(long, value_name = "SETUPS", value_delimiter = ',', value_parser = parse_setup)]
    pub only: Vec<Setup>,
    /// The usernet binary to measure (default: this executable).
    #[arg(long, value_name = "PATH")]
    pub usernet_bin: Option<PathBuf>,
    /// Also write the results, every run included, to FILE as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Round trips of the latency test.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub rr_count: u32,

    // The client half, run inside each namespace by the bench itself.
    #[arg(long, hide = true, value_enum)]
    pub role: Option<Role>,
    #[arg(long, hide = true)]
    pub host: Option<IpAddr>,
    #[arg(long, hide = true, default_value_t = 0)]
    pub stream_port: u16,
    #[arg(long, hide = true, default_value_t = 0)]
    pub rr_port: u16,
    #[arg(long, hide = true, default_value_t = 0)]
    pub crr_port: u16,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum Role {
    /// Measure from inside a namespace and print one JSON line.
    Client,
}

fn parse_setup(s: &str) -> Result<Setup, String> {
    Setup::parse(s.trim()).ok_or_else(|| format!("unknown setup {s:?} (want usernet, pasta, slirp4netns or veth)"))
}

pub fn main(args: BenchArgs) -> anyhow::Result<i32> {
    match args.role {
        Some(Role::Client) => client_main(&args),
        None => driver_main(&args),
    }
}

/// The hidden `--role client`: measure, print the report line.
fn client_main(args: &BenchArgs) -> anyhow::Result<i32> {
    let host = args.host.context("--role client needs --host")?;
    let duration = Duration::from_secs(args.duration);
    let plan = ClientPlan {
        host,
        stream_port: args.stream_port,
        rr_port: args.rr_port,
        crr_port: args.crr_port,
        duration,
        rr_count: args.rr_count,
        crr_time: duration.min(Duration::from_secs(CRR_SECONDS)),
    };
    let report = traffic::run_client(&plan);
    println!("{REPORT_PREFIX}{}", serde_json::to_string(&report)?);
    Ok(0)
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

/// Everything measured for one setup.
struct Outcome {
    setup: Setup,
    unavailable: Option<String>,
    runs: Vec<Result<ClientReport, String>>,
    commands: Vec<String>,
}

/// A private scratch directory (pidfiles, logs), removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn driver_main(args: &BenchArgs) -> anyhow::Result<i32> {
    let self_exe = std::env::current_exe().context("find this executable")?;
    let usernet_bin = args.usernet_bin.clone().unwrap_or_else(|| self_exe.clone());
    let chosen: Vec<Setup> = if args.only.is_empty() {
        Setup::ALL.to_vec()
    } else {
        Setup::ALL.into_iter().filter(|s| args.only.contains(s)).collect()
    };
    catch_signals();
    let tmp = TempDir(std::env::temp_dir().join(format!("usernet-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&tmp.0);
    std::fs::create_dir(&tmp.0).with_context(|| format!("create {}", tmp.0.display()))?;

    let mut outcomes: Vec<Outcome> = chosen
        .iter()
        .map(|&setup| Outcome {
            setup,
            unavailable: setup.unavailable(&usernet_bin),
            runs: Vec::new(),
            commands: Vec::new(),
        })
        .collect();

    'repeats: for round in 1..=args.repeat {
        for o in outcomes.iter_mut().filter(|o| o.unavailable.is_none()) {
            if interrupted() {
                break 'repeats;
            }
            eprintln!("usernet bench: {} run {round}/{}", o.setup.name(), args.repeat);
            let (commands, result) = run_once(o.setup, &self_exe, &usernet_bin, &tmp.0, args);
            if interrupted() {
                // A run cut short measures nothing.
                eprintln!("usernet bench: interrupted, cleaned up");
                break 'repeats;
            }
            if let Err(e) = &result {
                eprintln!("usernet bench: {} failed: {e}", o.setup.name());
            }
            o.commands = commands;
            o.runs.push(result);
        }
    }

    print_report(&outcomes, args);
    if let Some(path) = &args.json {
        let doc = json_report(&outcomes, args);
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok(if interrupted() { 130 } else { 0 })
}

/// One run of one setup: build it, serve, run the client inside, tear it all down.
/// Returns the commands used and the client's report.
fn run_once(
    setup: Setup,
    self_exe: &Path,
    usernet_bin: &Path,
    tmp: &Path,
    args: &BenchArgs,
) -> (Vec<String>, Result<ClientReport, String>) {
    let env = match setups::prepare(setup, usernet_bin, tmp) {
        Ok(env) => env,
        Err(e) => return (Vec::new(), Err(format!("{e:#}"))),
    };
    let mut commands = env.setup_commands.clone();
    // Declared after `env`, so dropped (stopped) before the setup is torn down.
    let servers = match Servers::start(env.bind_ip) {
        Ok(s) => s,
        Err(e) => return (commands, Err(format!("{e:#}"))),
    };
    let mut cmd = Command::new(&env.prefix[0]);
    cmd.args(&env.prefix[1..])
        .arg(self_exe)
        .args(["bench", "--role", "client", "--host"])
        .arg(env.target_ip.to_string())
        .args(["--stream-port", &servers.stream.port().to_string()])
        .args(["--rr-port", &servers.rr.port().to_string()])
        .args(["--crr-port", &servers.crr.port().to_string()])
        .args(["--duration", &args.duration.to_string()])
        .args(["--rr-count", &args.rr_count.to_string()]);
    commands.push(setups::show(&cmd));
    // Each test is bounded by its duration plus I/O timeouts; this is the backstop.
    let limit = Duration::from_secs(2 * args.duration + CRR_SECONDS + 60);
    let result = run_client(&mut cmd, limit);
    drop(servers);
    drop(env);
    (commands, result)
}

/// Runs the client command and returns the report it printed.
fn run_client(cmd: &mut Command, limit: Duration) -> Result<ClientReport, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {}: {e}", setups::show(cmd)))?;
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = setups::wait_bounded(&mut child, limit).map_err(|e| format!("client: {e:#}"))?;
    // A grandchild that outlives the client may hold the pipes: do not wait for it long.
    let grace = Duration::from_secs(2);
    let stdout = stdout.recv_timeout(grace).unwrap_or_default();
    let stderr = stderr.recv_timeout(grace).unwrap_or_default();
    let stdout = String::from_utf8_lossy(&stdout);
    if let Some(line) = stdout.lines().find_map(|l| l.strip_prefix(REPORT_PREFIX)) {
        return serde_json::from_str(line).map_err(|e| format!("unreadable client report: {e}"));
    }
    let stderr = String::from_utf8_lossy(&stderr);
    let why = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no output");
    Err(format!("{} ({status})", why.trim()))
}

/// Reads a pipe to its end on a thread of its own.
fn collect(pipe: Option<impl Read + Send + 'static>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut pipe) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// A row of the table: its label, how to pick its value from a report, how to print it.
struct Metric {
    key: &'static str,
    label: &'static str,
    pick: fn(&ClientReport) -> Result<f64, String>,
    decimals: usize,
}

const METRICS: [Metric; 4] = [
    Metric {
        key: "throughput_gbps",
        label: "TCP throughput ns->host, Gbit/s (higher is better)",
        pick: |r| r.throughput_gbps.clone(),
        decimals: 2,
    },
    Metric {
        key: "rr_mean_us",
        label: "1-byte TCP round trip, mean us (lower is better)",
        pick: |r| r.rr.as_ref().map(|s| s.mean_us).map_err(Clone::clone),
        decimals: 1,
    },
    Metric {
        key: "rr_median_us",
        label: "1-byte TCP round trip, median us (lower is better)",
        pick: |r| r.rr.as_ref().map(|s| s.median_us).map_err(Clone::clone),
        decimals: 1,
    },
    Metric {
        key: "crr_per_sec",
        label: "TCP connections/s, 1 byte each way (higher is better)",
        pick: |r| r.crr_per_sec.clone(),
        decimals: 0,
    },
];

/// The values of one metric over a setup's runs, and the first error among them.
fn values(o: &Outcome, m: &Metric) -> (Vec<f64>, Option<String>) {
    let mut vals = Vec::new();
    let mut first_err = None;
    for run in &o.runs {
        match run.as_ref().map_err(Clone::clone).and_then(m.pick) {
            Ok(v) if v.is_finite() => vals.push(v),
            Ok(v) => {
                first_err.get_or_insert(format!("bad value {v}"));
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    (vals, first_err)
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

fn cell(o: &Outcome, m: &Metric, usernet: Option<f64>) -> String {
    if let Some(why) = &o.unavailable {
        return format!("n/a ({why})");
    }
    let (vals, err) = values(o, m);
    let Some(value) = median(&vals) else {
        return format!("failed: {}", short(err.as_deref().unwrap_or("no runs")));
    };
    let mut text = format!("{value:.*}", m.decimals);
    if o.setup != Setup::Usernet
        && let Some(base) = usernet.filter(|b| *b > 0.0)
    {
        text += &format!(" ({:.2}x)", value / base);
    }
    if vals.len() < o.runs.len() {
        text += &format!(" [{}/{} runs]", vals.len(), o.runs.len());
    }
    text
}

fn print_report(outcomes: &[Outcome], args: &BenchArgs) {
    let usernet = outcomes.iter().find(|o| o.setup == Setup::Usernet);
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut header = vec![String::from("metric")];
    header.extend(outcomes.iter().map(|o| o.setup.name().to_string()));
    rows.push(header);
    for m in &METRICS {
        let base = usernet.and_then(|u| median(&values(u, m).0));
        let mut row = vec![m.label.to_string()];
        row.extend(outcomes.iter().map(|o| cell(o, m, base)));
        rows.push(row);
    }
    let columns = rows[0].len();
    let widths: Vec<usize> =
        (0..columns).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();

    println!();
    println!(
        "usernet bench: median of {} run(s); throughput {} s per run, {} round trips, \
         connections for {} s; (Nx) = value / usernet's",
        args.repeat,
        args.duration,
        args.rr_count,
        args.duration.min(CRR_SECONDS)
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

    println!();
    println!("Commands (last run of each setup):");
    for o in outcomes {
        if o.unavailable.is_some() || o.commands.is_empty() {
            continue;
        }
        println!("  {}:", o.setup.name());
        for c in &o.commands {
            println!("    {c}");
        }
    }
    let failures: Vec<(&Outcome, &String)> =
        outcomes.iter().flat_map(|o| o.runs.iter().filter_map(move |r| r.as_ref().err().map(|e| (o, e)))).collect();
    let metric_errors: Vec<(&Outcome, &str, String)> = outcomes
        .iter()
        .flat_map(|o| {
            o.runs
                .iter()
                .filter_map(|r| r.as_ref().ok())
                .flat_map(move |r| METRICS.iter().filter_map(move |m| (m.pick)(r).err().map(|e| (o, m.key, e))))
        })
        .collect();
    if !failures.is_empty() || !metric_errors.is_empty() {
        println!();
        println!("Failures:");
        for (o, e) in failures {
            println!("  {}: {e}", o.setup.name());
        }
        for (o, key, e) in metric_errors {
            println!("  {} {key}: {e}", o.setup.name());
        }
    }
}

fn json_report(outcomes: &[Outcome], args: &BenchArgs) -> serde_json::Value {
    let setups: serde_json::Map<String, serde_json::Value> = outcomes
        .iter()
        .map(|o| {
            let status = match (&o.unavailable, o.runs.iter().any(|r| r.is_ok())) {
                (Some(_), _) => "n/a",
                (None, true) => "ok",
                (None, false) => "failed",
            };
            let medians: serde_json::Map<String, serde_json::Value> =
                METRICS.iter().map(|m| (m.key.to_string(), json!(median(&values(o, m).0)))).collect();
            let runs: Vec<serde_json::Value> = o
                .runs
                .iter()
                .map(|r| match r {
                    Ok(report) => json!({ "ok": report }),
                    Err(e) => json!({ "error": e }),
                })
                .collect();
            let value = json!({
                "status": status,
                "reason": o.unavailable,
                "commands": o.commands,
                "median": medians,
                "runs": runs,
            });
            (o.setup.name().to_string(), value)
        })
        .collect();
    json!({
        "duration_s": args.duration,
        "repeat": args.repeat,
        "rr_count": args.rr_count,
        "crr_seconds": args.duration.min(CRR_SECONDS),
        "setups": setups,
    })
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
    fn client_round_trip_on_loopback() {
        let servers = Servers::start("127.0.0.1".parse().unwrap()).unwrap();
        let plan = ClientPlan {
            host: "127.0.0.1".parse().unwrap(),
            stream_port: servers.stream.port(),
            rr_port: servers.rr.port(),
            crr_port: servers.crr.port(),
            duration: Duration::from_millis(200),
            rr_count: 200,
            crr_time: Duration::from_millis(200),
        };
        let report = traffic::run_client(&plan);
        assert!(report.throughput_gbps.unwrap() > 0.0);
        assert!(report.rr.unwrap().count > 0);
        assert!(report.crr_per_sec.unwrap() > 0.0);
    }
}
