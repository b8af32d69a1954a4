//! The VM phase of `usernet-bench` (`--vm`): TCP between a QEMU guest and the host over
//! QEMU's stream transport (`-netdev stream`), served by `usernet serve --listen-qemu` and by
//! passt, which speaks the same protocol on its socket; with `--vm-transport dgram` or
//! `vhost-user`, usernet serves the VM over `-netdev dgram` (`--listen-vfkit`) or as its
//! vhost-user back-end (`--listen-vhost-user`, the guest's RAM a shared memfd). With
//! `vhost-user`, passt is the back-end too (`passt --vhost-user`) when it has that mode
//! (passt from 2025 on); otherwise, and with `dgram`, which passt lacks, passt stays on stream.
//!
//! Method. The guest is Debian's kernel with a busybox initramfs, built once per bench by the
//! repository's `vm-guest/build-initramfs.sh` (built into this binary; `--vm-initramfs-script` for another). The tests' `/init`
//! stays in it; the bench appends a second cpio archive holding its own `/bench-init` (see
//! [`GUEST_INIT`]) and boots with `rdinit=/bench-init`. That script takes a DHCP lease, writes
//! N MiB of zeros to a tmpfs file and sends it with busybox `nc` to a sink on the host, then
//! receives N MiB from a source on the host with `nc` (output to /dev/null), printing
//! `BENCH-VM ...` markers on the serial console, which QEMU's stdout carries to the driver.
//! Each run boots a fresh QEMU (`-accel tcg -m 256 -nographic -no-reboot`; TCG because KVM
//! guests hang on these machines) on a fresh tool:
//!
//! - usernet: `usernet serve --listen-qemu unix:SOCK --dns-upstream 127.0.0.1:9 --mtu M`; the
//!   guest dials 192.168.65.254, which usernet maps to the host's 127.0.0.1;
//! - passt: `passt -f -4 -s SOCK --mtu M -a 10.0.2.15 -n 24 -g 10.0.2.2` (plus `--runas 0:0`
//!   as root, `--map-host-loopback 10.0.2.2` where passt has it; older passt maps its gateway
//!   to the host's loopback by default); the guest dials 10.0.2.2.
//!
//! The host side is ours, on 127.0.0.1 only: the sink counts bytes from the first byte to EOF;
//! the source writes N MiB, half-closes, and stops its clock when the guest closes. The guest
//! keeps its side open until `nc` has read everything (its stdin is a FIFO held open by the
//! script), so that close means "all delivered", not "all buffered on the way". At the first
//! and the last byte each server samples the CPU time of the tool's process and of QEMU's
//! vCPU thread(s), giving the tool's CPU seconds per GB and how busy the guest's CPU was.
//! Under TCG the guest's emulated CPU is the bottleneck (its vCPU thread is busy nearly all
//! the time), so the throughput rows say more about the guest than about the tools; the CPU
//! per GB rows compare the tools' own cost.
//!
//! Bounds and cleanup: each VM run is limited to [`VM_TIMEOUT`] from boot to power-off and
//! QEMU is killed past it; every read and write on the host side has a timeout. QEMU, the
//! tool, the servers and the run's directory (socket, logs) go when the run ends, however it
//! ends.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::setups::show;

/// Longest one VM run may take, from starting QEMU to its power-off.
pub const VM_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the host side waits for the next byte (or for room to write one).
const STALL: Duration = Duration::from_secs(20);
/// How often blocked host-side I/O looks at the stop flag.
const TICK: Duration = Duration::from_millis(200);
/// Longest building the initramfs may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest's view of the host, per tool.
const USERNET_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 254);
const PASST_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const PASST_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The tool's stdout and stderr, and passt's own log (`-l`), in the run's directory.
const TOOL_LOG: &str = "tool.log";
const PASST_LOG: &str = "passt.log";
/// Console markers.
const MARK: &str = "BENCH-VM ";
/// The most console text kept (the guest prints a few lines; a runaway one is cut).
const CONSOLE_MAX: usize = 256 * 1024;

/// `/bench-init`: the guest's side of the VM phase. Parameters on the kernel command line:
/// `un.host=IP un.up=PORT un.down=PORT un.mib=N`.
pub const GUEST_INIT: &str = r#"#!/bin/busybox sh
# /bench-init of `usernet-bench --vm`: a DHCP lease, then N MiB to the host's sink
# (un.host:un.up) and N MiB from the host's source (un.host:un.down), with busybox nc.
# Markers "BENCH-VM ..." go to the serial console; the VM powers off at the end.
/bin/busybox mkdir -p /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
for m in $(cat /lib/mods/order); do
    insmod "/lib/mods/$m.ko" 2>/dev/null
done
arg() {
    for w in $(cat /proc/cmdline); do
        case "$w" in "un.$1="*) echo "${w#*=}"; return ;; esac
    done
}
fail() {
    echo "BENCH-VM fail $*"
    poweroff -f
    sleep 30
}
echo "BENCH-VM booted"
ip link set lo up
ip link set eth0 up || fail "no eth0"
udhcpc -i eth0 -s /etc/udhcpc/default.script -O mtu -n -q -t 10 -T 1 >/tmp/dhcp.log 2>&1 \
    || fail "dhcp: $(tail -n 3 /tmp/dhcp.log | tr '\n' ' ')"
addr=$(ip -4 -o addr show dev eth0 | sed -n 's/.*inet \([0-9./]*\).*/\1/p' | head -n 1)
echo "BENCH-VM lease $addr mtu=$(cat /sys/class/net/eth0/mtu)"
host=$(arg host)
up=$(arg up)
down=$(arg down)
mib=$(arg mib)
dd if=/dev/zero of=/tmp/z bs=1M count="$mib" 2>/dev/null || fail "dd"
echo "BENCH-VM up-start"
nc -w 10 "$host" "$up" </tmp/z >/dev/null
echo "BENCH-VM up-done rc=$?"
rm -f /tmp/z
# nc half-closes when its stdin ends: a FIFO held open keeps the connection whole until the
# source's EOF, so the guest's close tells the host that everything arrived.
mkfifo /tmp/hold
nc -w 10 "$host" "$down" </tmp/hold >/dev/null &
exec 3>/tmp/hold
wait $!
echo "BENCH-VM down-done rc=$?"
exec 3>&-
echo "BENCH-VM end"
poweroff -f
sleep 30
"#;

/// The settings of the VM phase.
#[derive(Debug, Clone, Serialize)]
pub struct VmPlan {
    /// MiB moved each way.
    pub mib: u32,
    /// The guest link's MTU, for both tools.
    pub mtu: u32,
    /// The script that builds the initramfs; None: the repository's `vm-guest/`, built in.
    pub script: Option<PathBuf>,
    /// The transport between QEMU and usernet.
    pub transport: VmTransport,
    /// The transport between QEMU and passt: vhost-user when that was asked for and this
    /// passt has `--vhost-user` (passt from 2025 on), else stream (passt has no datagram one).
    pub passt_transport: VmTransport,
}

impl VmPlan {
    /// The transport `tool` is served on.
    pub fn transport_of(&self, tool: VmTool) -> VmTransport {
        match tool {
            VmTool::Usernet => self.transport,
            VmTool::Passt => self.passt_transport,
        }
    }
}

/// The transport passt serves the VM on when usernet's is `wanted`: see
/// [`VmPlan::passt_transport`].
/// `dir` holds `passt --help`'s output for the moment it runs.
pub fn passt_transport(bin: &Path, wanted: VmTransport, dir: &Path) -> VmTransport {
    if wanted == VmTransport::VhostUser && passt_has_option(bin, "--vhost-user", dir) {
        VmTransport::VhostUser
    } else {
        VmTransport::Stream
    }
}

/// Whether this passt's `--help` lists `option` (its output goes through files in `dir`).
fn passt_has_option(bin: &Path, option: &str, dir: &Path) -> bool {
    let mut cmd = Command::new(bin);
    cmd.arg("--help");
    output_bounded(&mut cmd, Duration::from_secs(5), dir)
        .map(|(_, out, err)| out.contains(option) || err.contains(option))
        .unwrap_or(false)
}

/// How QEMU's frames reach usernet in the VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum VmTransport {
    /// `-netdev stream` to `usernet serve --listen-qemu` (a length before each frame).
    Stream,
    /// `-netdev dgram` to `usernet serve --listen-vfkit` (a datagram per frame, as vfkit).
    Dgram,
    /// `-netdev vhost-user` to `usernet serve --listen-vhost-user` (the guest's rings in
    /// shared memory: its RAM a memfd shared with usernet).
    #[serde(rename = "vhost-user")]
    VhostUser,
}

impl VmTransport {
    /// As QEMU's `-netdev` names it.
    pub fn name(self) -> &'static str {
        match self {
            VmTransport::Stream => "stream",
            VmTransport::Dgram => "dgram",
            VmTransport::VhostUser => "vhost-user",
        }
    }
}

/// The user-mode stack serving the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmTool {
    Usernet,
    Passt,
}

/// Why the VM phase cannot run on this machine, if it cannot.
pub fn unavailable(script: Option<&Path>) -> Option<String> {
    if let Some(script) = script
        && !script.is_file()
    {
        return Some(format!("no {} (--vm-initramfs-script)", script.display()));
    }
    for tool in ["qemu-system-x86_64", "busybox"] {
        if super::setups::find_in_path(tool).is_none() {
            return Some(format!("{tool} not installed"));
        }
    }
    let kernels = std::fs::read_dir("/boot")
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-")))
        .unwrap_or(false);
    if !kernels {
        return Some("no kernel in /boot".into());
    }
    None
}

/// The guest's kernel and initramfs.
pub struct Image {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// The repository's guest image builder (`vm-guest/`), the same the VM tests use,
/// built into this binary so the bench runs from anywhere.
const VM_GUEST_FILES: [(&str, &str); 3] = [
    ("build-initramfs.sh", include_str!("../../../vm-guest/build-initramfs.sh")),
    ("init", include_str!("../../../vm-guest/init")),
    ("udhcpc.script", include_str!("../../../vm-guest/udhcpc.script")),
];

/// Runs the initramfs script (`script`, or the built-in one) into `dir`, then appends the
/// bench's `/bench-init`.
pub fn build_image(script: Option<&Path>, dir: &Path) -> anyhow::Result<Image> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let builtin;
    let script = match script {
        Some(s) => s,
        None => {
            let src = dir.join("vm-guest");
            std::fs::create_dir_all(&src).with_context(|| format!("create {}", src.display()))?;
            for (name, text) in VM_GUEST_FILES {
                std::fs::write(src.join(name), text).with_context(|| format!("write {name}"))?;
            }
            builtin = src.join("build-initramfs.sh");
            &builtin
        }
    };
    let mut cmd = Command::new("sh");
    cmd.arg(script).arg(dir);
    let shown = show(&cmd);
    let (status, stdout, stderr) =
        output_bounded(&mut cmd, BUILD_TIMEOUT, dir).with_context(|| format!("run {shown}"))?;
    if !status.success() {
        anyhow::bail!("{shown}: {status}: {}", stderr.trim());
    }
    let kernel = stdout
        .lines()
        .find_map(|l| l.strip_prefix("KERNEL="))
        .map(PathBuf::from)
        .with_context(|| format!("{shown} printed no KERNEL= line"))?;
    let base = dir.join("initramfs.cpio");
    let mut archive = std::fs::read(&base).with_context(|| format!("read {}", base.display()))?;
    // The kernel reads concatenated archives; the next one must start 4-byte aligned.
    archive.resize(archive.len().next_multiple_of(4), 0);
    archive.extend(cpio_newc(&[("bench-init", 0o100_755, GUEST_INIT.as_bytes())]));
    let initrd = dir.join("bench-initramfs.cpio");
    std::fs::write(&initrd, archive).with_context(|| format!("write {}", initrd.display()))?;
    Ok(Image { kernel, initrd })
}

/// Runs `cmd` for at most `limit`, its output going through files in `dir`; returns its
/// exit status, stdout and stderr.
fn output_bounded(cmd: &mut Command, limit: Duration, dir: &Path) -> anyhow::Result<(ExitStatus, String, String)> {
    let (out_path, err_path) = (dir.join("cmd.out"), dir.join("cmd.err"));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()?;
    let status = super::setups::wait_bounded(&mut child, limit);
    let read = |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let (out, err) = (read(&out_path), read(&err_path));
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok((status?, out, err))
}

/// A cpio archive in the "newc" format the kernel unpacks: regular files (name, mode,
/// contents), then the trailer.
fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let fields = [ino, mode, 0, 0, 1, 0, data.len() as u32, 0, 0, 0, 0, name.len() as u32 + 1, 0];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        out.resize(out.len().next_multiple_of(4), 0);
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(4), 0);
    }
    let mut out = Vec::new();
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(&mut out, i as u32 + 1, name, *mode, data);
    }
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// One direction of a VM run, as the host saw it.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Transfer {
    pub bytes: u64,
    /// First byte to the end (EOF for the sink, the guest's close for the source).
    pub secs: f64,
    /// CPU seconds of the tool's process over that time.
    pub tool_cpu_s: Option<f64>,
    /// CPU seconds of QEMU's vCPU thread(s) over that time.
    pub vcpu_s: Option<f64>,
}

impl Transfer {
    pub fn gbps(&self) -> f64 {
        if self.secs > 0.0 { self.bytes as f64 * 8.0 / self.secs / 1e9 } else { 0.0 }
    }

    /// The tool's CPU seconds per GB moved.
    pub fn cpu_per_gb(&self) -> Option<f64> {
        self.tool_cpu_s.filter(|_| self.bytes > 0).map(|c| c / (self.bytes as f64 / 1e9))
    }

    /// How busy the guest's vCPU was, % of the time.
    pub fn vcpu_busy_pct(&self) -> Option<f64> {
        self.vcpu_s.filter(|_| self.secs > 0.0).map(|c| c * 100.0 / self.secs)
    }
}

/// What one VM run measured.
#[derive(Debug, Serialize)]
pub struct VmRun {
    /// Guest to host.
    pub up: Result<Transfer, String>,
    /// Host to guest.
    pub down: Result<Transfer, String>,
    /// Seconds from starting QEMU to the guest's DHCP lease.
    pub lease_secs: Option<f64>,
    /// The guest's address and MTU, as it printed them.
    pub lease: Option<String>,
    pub commands: Vec<String>,
}

/// The processes whose CPU time the host-side servers sample: the tool, QEMU (set once it runs).
#[derive(Clone)]
struct Watched {
    tool: i32,
    qemu: Arc<AtomicI32>,
}

/// CPU samples at one instant.
struct Sample {
    at: Instant,
    tool: Option<f64>,
    vcpu: Option<f64>,
}

impl Watched {
    fn sample(&self) -> Sample {
        let qemu = self.qemu.load(Ordering::Relaxed);
        Sample {
            at: Instant::now(),
            tool: super::cpu_seconds_of_threads(self.tool),
            vcpu: (qemu > 0).then(|| vcpu_seconds(qemu)).flatten(),
        }
    }
}

/// CPU seconds of QEMU's vCPU threads (named "CPU n/TCG", "CPU n/KVM").
fn vcpu_seconds(pid: i32) -> Option<f64> {
    let mut total = None;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ")
            && let Some(s) = super::cpu_seconds_of(&task.path().join("stat"))
        {
            *total.get_or_insert(0.0) += s;
        }
    }
    total
}

fn transfer(bytes: u64, first: &Sample, last: &Sample) -> Transfer {
    let diff = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
    Transfer {
        bytes,
        secs: last.at.duration_since(first.at).as_secs_f64(),
        tool_cpu_s: diff(first.tool, last.tool),
        vcpu_s: diff(first.vcpu, last.vcpu),
    }
}

/// A one-connection server on 127.0.0.1 (a sink or a source) on its own thread.
struct OneShot {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<Transfer, String>>>,
}

impl OneShot {
    fn start(
        what: &'static str,
        watched: Watched,
        serve: fn(TcpStream, &Watched, &AtomicBool, u64) -> Result<Transfer, String>,
        bytes: u64,
    ) -> anyhow::Result<OneShot> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).with_context(|| format!("bind the {what}"))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                        if flag.load(Ordering::Relaxed) {
                            return Err(format!("the guest never connected to the {what}"));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(format!("{what}: accept: {e}")),
                }
            };
            conn.set_nonblocking(false).map_err(|e| e.to_string())?;
            serve(conn, &watched, &flag, bytes).map_err(|e| format!("{what}: {e}"))
        });
        Ok(OneShot { addr, stop, thread: Some(thread) })
    }

    /// Stops the server (if it is still waiting) and returns what it measured.
    fn finish(mut self) -> Result<Transfer, String> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err("server thread failed".into()),
        }
    }
}

impl Drop for OneShot {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether a read or write timed out (SO_RCVTIMEO/SO_SNDTIMEO give EAGAIN).
fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted)
}

/// Reads to EOF, timing first byte to EOF.
fn serve_sink(mut conn: TcpStream, watched: &Watched, stop: &AtomicBool, expect: u64) -> Result<Transfer, String> {
    conn.set_read_timeout(Some(TICK)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total: u64 = 0;
    let mut first: Option<Sample> = None;
    let mut last_progress = Instant::now();
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if first.is_none() {
                    first = Some(watched.sample());
                }
                total += n as u64;
                last_progress = Instant::now();
            }
            Err(e) if timed_out(&e) => {
                if stop.load(Ordering::Relaxed) || last_progress.elapsed() > STALL {
                    return Err(format!("stalled after {total} bytes"));
                }
            }
            Err(e) => return Err(format!("after {total} bytes: {e}")),
        }
    }
    let end = watched.sample();
    let Some(first) = first else {
        return Err("the guest sent nothing".into());
    };
    if total != expect {
        return Err(format!("received {total} of {expect} bytes"));
    }
    Ok(transfer(total, &first, &end))
}

/// Writes `count` bytes, half-closes, waits for the guest's close.
fn serve_source(mut conn: TcpStream, watched: &Watched, stop: &AtomicBool, count: u64) -> Result<Transfer, String> {
    conn.set_write_timeout(Some(TICK)).map_err(|e| e.to_string())?;
    conn.set_read_timeout(Some(TICK)).map_err(|e| e.to_string())?;
    let buf = vec![0u8; 1 << 20];
    let mut sent: u64 = 0;
    let first = watched.sample();
    let mut last_progress = Instant::now();
    while sent < count {
        let n = (count - sent).min(buf.len() as u64) as usize;
        match conn.write(&buf[..n]) {
            Ok(0) => return Err(format!("the connection closed after {sent} bytes")),
            Ok(w) => {
                sent += w as u64;
                last_progress = Instant::now();
            }
            Err(e) if timed_out(&e) => {
                if stop.load(Ordering::Relaxed) || last_progress.elapsed() > STALL {
                    return Err(format!("stalled after sending {sent} bytes"));
                }
            }
            Err(e) => return Err(format!("after sending {sent} bytes: {e}")),
        }
    }
    conn.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    // The guest sends nothing; its FIN comes once its nc has read everything. A reset
    // instead means it went away with data unread.
    let waiting = Instant::now();
    let mut b = [0u8; 64];
    loop {
        match conn.read(&mut b) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if timed_out(&e) => {
                if stop.load(Ordering::Relaxed) || waiting.elapsed() > STALL {
                    return Err(format!("sent {sent} bytes, the guest never closed"));
                }
            }
            Err(e) => return Err(format!("sent {sent} bytes, then: {e}")),
        }
    }
    let end = watched.sample();
    Ok(transfer(sent, &first, &end))
}

/// A process of the run, stopped on drop: SIGTERM, then SIGKILL after `grace`.
struct Proc {
    child: Child,
    grace: Duration,
}

impl Drop for Proc {
    fn drop(&mut self) {
        use nix::sys::signal::{Signal, kill};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + self.grace;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The run's scratch directory, removed on drop.
struct RunDir(PathBuf);

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The last `n` lines of a text that say something, on one line, without control characters
/// (the firmware's screen codes) and without passt's complaints about a missing syslog.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>().trim().to_string())
        .filter(|l| !l.is_empty() && !l.contains("to syslog"))
        .collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// The tail of a log file (or of several, in order).
fn log_tail(paths: &[&Path]) -> String {
    let text: String = paths
        .iter()
        .map(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned() + "\n")
        .collect();
    tail(&text, 3)
}

/// Where the guest got to: its last marker, or the console's last lines.
fn progress(console: &str) -> String {
    match console.lines().filter_map(|l| l.split_once(MARK).map(|(_, m)| m.trim())).next_back() {
        Some(m) => format!("the guest's last marker: {m}"),
        None => format!("no marker from the guest: {}", tail(console, 2)),
    }
}

/// Starts the tool on `sock` and waits for the socket; returns it and the address the guest
/// dials to reach the host's loopback.
fn start_tool(
    tool: VmTool,
    bin: &Path,
    plan: &VmPlan,
    dir: &Path,
    sock: &Path,
) -> anyhow::Result<(Proc, Ipv4Addr, String)> {
    let log = dir.join(TOOL_LOG);
    let passt_log = dir.join(PASST_LOG);
    let mut cmd = Command::new(bin);
    let host = match tool {
        VmTool::Usernet => {
            cmd.arg("serve");
            match plan.transport {
                VmTransport::Stream => cmd.arg("--listen-qemu").arg(format!("unix:{}", sock.display())),
                VmTransport::Dgram => cmd.arg("--listen-vfkit").arg(format!("unixgram:{}", sock.display())),
                VmTransport::VhostUser => cmd.arg("--listen-vhost-user").arg(sock),
            }
            // A dead loopback port: the guest resolves nothing, and must not reach the
            // machine's resolver even by accident.
            .args(["--dns-upstream", "127.0.0.1:9", "--mtu", &plan.mtu.to_string()]);
            USERNET_HOST
        }
        VmTool::Passt => {
            if nix::unistd::geteuid().is_root() {
                cmd.args(["--runas", "0:0"]);
            }
            if plan.passt_transport == VmTransport::VhostUser {
                cmd.arg("--vhost-user");
            }
            cmd.args(["-f", "-4", "-s"]).arg(sock).arg("-l").arg(&passt_log).args(["--mtu", &plan.mtu.to_string()]);
            cmd.args(["-a", &PASST_GUEST.to_string(), "-n", "24", "-g", &PASST_HOST.to_string()]);
            // passt from 2024 on; older passt maps its gateway to the host's loopback itself.
            if passt_has_option(bin, "--map-host-loopback", dir) {
                cmd.args(["--map-host-loopback", &PASST_HOST.to_string()]);
            }
            cmd.args(["--no-dhcp-dns", "--no-dhcp-search", "-t", "none", "-u", "none"]);
            PASST_HOST
        }
    };
    let shown = show(&cmd);
    let name = tool_name(tool);
    let file = std::fs::File::create(&log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("start {shown}"))?;
    let mut proc = Proc { child, grace: Duration::from_secs(3) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(status)) = proc.child.try_wait() {
            anyhow::bail!("{name} exited ({status}): {} [{shown}]", log_tail(&[&log, &passt_log]));
        }
        if Instant::now() >= deadline || super::interrupted() {
            anyhow::bail!(
                "{name} did not create {} within 10 s: {} [{shown}]",
                sock.display(),
                log_tail(&[&log, &passt_log])
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((proc, host, shown))
}

/// Collects a pipe into a shared string (at most [`CONSOLE_MAX`] bytes) from a thread.
fn collect(mut pipe: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let t = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if let Ok(mut s) = t.lock()
                        && s.len() < CONSOLE_MAX
                    {
                        s.push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                }
            }
        }
    });
    text
}

/// The value after `BENCH-VM <key> ` on the console, if the guest printed it.
fn marker<'a>(console: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{MARK}{key}");
    console.lines().find_map(|l| l.trim_end_matches('\r').split_once(&prefix).map(|(_, rest)| rest.trim()))
}

/// One VM run: the tool, the host's sink and source, QEMU; everything stopped on return.
pub fn run(tool: VmTool, bin: &Path, image: &Image, plan: &VmPlan, tmp: &Path) -> anyhow::Result<VmRun> {
    static RUNS: AtomicI32 = AtomicI32::new(0);
    let dir = RunDir(tmp.join(format!("vm-{}", RUNS.fetch_add(1, Ordering::Relaxed))));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).with_context(|| format!("create {}", dir.0.display()))?;
    let sock = dir.0.join("net.sock");
    // Declared first, dropped last: the tool outlives QEMU and the servers.
    let (mut tool_proc, host, tool_cmd) = start_tool(tool, bin, plan, &dir.0, &sock)?;
    let watched = Watched { tool: tool_proc.child.id() as i32, qemu: Arc::new(AtomicI32::new(0)) };
    let bytes = u64::from(plan.mib) << 20;
    let sink = OneShot::start("sink", watched.clone(), serve_sink, bytes)?;
    let source = OneShot::start("source", watched.clone(), serve_source, bytes)?;

    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio"])
        // Named threads: the vCPU's is "CPU 0/TCG", whose CPU time says how busy the guest was.
        .args(["-name", "usernet-bench,debug-threads=on"])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 rdinit=/bench-init un.host={host} un.up={} un.down={} un.mib={}",
            sink.addr.port(),
            source.addr.port(),
            plan.mib
        ))
        .args(qemu_net_args(plan.transport_of(tool), &sock, &dir.0.join("qemu.sock")));
    let qemu_cmd = show(&cmd);
    let qemu_log = dir.0.join("qemu.log");
    let started = Instant::now();
    let mut qemu = Proc {
        child: cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&qemu_log)?)
            .spawn()
            .with_context(|| format!("start {qemu_cmd}"))?,
        grace: Duration::ZERO,
    };
    watched.qemu.store(qemu.child.id() as i32, Ordering::Relaxed);
    let console = match qemu.child.stdout.take() {
        Some(out) => collect(out),
        None => anyhow::bail!("no console from QEMU"),
    };
    let text = || console.lock().map(|s| s.clone()).unwrap_or_default();

    // Wait for the end, a failure, QEMU's exit or the time limit.
    let mut lease_secs = None;
    let outcome: Result<(), String> = loop {
        let now = text();
        if lease_secs.is_none() && marker(&now, "lease").is_some() {
            lease_secs = Some(started.elapsed().as_secs_f64());
        }
        if marker(&now, "end").is_some() {
            break Ok(());
        }
        if let Some(why) = marker(&now, "fail") {
            break Err(format!("the guest failed: {why}"));
        }
        if let Ok(Some(status)) = qemu.child.try_wait() {
            // Let the console reader catch up with the last lines.
            std::thread::sleep(Duration::from_millis(200));
            if marker(&text(), "end").is_some() {
                break Ok(());
            }
            break Err(format!("QEMU exited ({status}); {}; {}", progress(&text()), log_tail(&[&qemu_log])));
        }
        if let Ok(Some(status)) = tool_proc.child.try_wait() {
            break Err(format!("{} exited ({status}) during the run; {}", tool_name(tool), progress(&now)));
        }
        if super::interrupted() {
            break Err("interrupted".into());
        }
        if started.elapsed() > VM_TIMEOUT {
            break Err(format!("the VM run took over {} s, killed; {}", VM_TIMEOUT.as_secs(), progress(&now)));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    drop(qemu);
    let console_text = text();
    let guest_rc = |key: &str| marker(&console_text, key).map(|s| s.trim_start_matches("rc=").to_string());
    let check = |r: Result<Transfer, String>, key: &str| -> Result<Transfer, String> {
        let rc = guest_rc(key);
        match (r, rc.as_deref()) {
            (Ok(t), Some("0")) => Ok(t),
            (Ok(_), Some(rc)) => Err(format!("the guest's nc exited {rc}")),
            (Ok(_), None) => Err(outcome.clone().err().unwrap_or_else(|| format!("no {key} from the guest"))),
            (Err(e), _) => Err(match &outcome {
                Err(o) => format!("{e}; {o}"),
                Ok(()) => e,
            }),
        }
    };
    let up = check(sink.finish(), "up-done");
    let down = check(source.finish(), "down-done");
    if let (Err(e), Err(_), Err(_)) = (&outcome, &up, &down) {
        let logs = log_tail(&[&dir.0.join(TOOL_LOG), &dir.0.join(PASST_LOG)]);
        anyhow::bail!("{e} [{}: {logs}]", tool_name(tool));
    }
    drop(tool_proc);
    Ok(VmRun {
        up,
        down,
        lease_secs,
        lease: marker(&console_text, "lease").map(str::to_string),
        commands: vec![tool_cmd, qemu_cmd],
    })
}

/// Whether the QEMU in PATH runs a vhost-user virtio-net-pci with MSI-X, as VM tools start
/// it: from QEMU 10 (tests/serve_vm.rs boots both), where Debian 12's 7.2 crashes under TCG.
pub fn vhost_user_msix() -> bool {
    static MSIX: OnceLock<bool> = OnceLock::new();
    *MSIX.get_or_init(|| {
        let out = Command::new("qemu-system-x86_64").arg("--version").output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        // "QEMU emulator version 10.0.2 (Debian ...)"
        let major = text.split_whitespace().nth(3).and_then(|v| v.split('.').next()?.parse::<u32>().ok());
        major.is_some_and(|m| m >= 10)
    })
}

/// QEMU's network options on `transport`.
fn qemu_net_args(transport: VmTransport, sock: &Path, qemu_sock: &Path) -> Vec<String> {
    let netdev = match transport {
        VmTransport::Dgram => format!(
            "dgram,id=n0,local.type=unix,local.path={},remote.type=unix,remote.path={}",
            qemu_sock.display(),
            sock.display()
        ),
        VmTransport::VhostUser => {
            // The guest's RAM shared with the back-end; before QEMU 10, `vectors=0`: QEMU 7.2
            // under TCG crashes starting a vhost-user virtio-net-pci with MSI-X.
            let device =
                if vhost_user_msix() { "virtio-net-pci,netdev=n0" } else { "virtio-net-pci,netdev=n0,vectors=0" };
            return [
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
                "-machine",
                "memory-backend=mem",
                "-chardev",
                &format!("socket,id=c0,path={}", sock.display()),
                "-netdev",
                "vhost-user,id=n0,chardev=c0",
                "-device",
                device,
            ]
            .map(String::from)
            .to_vec();
        }
        VmTransport::Stream => format!("stream,id=n0,server=off,addr.type=unix,addr.path={}", sock.display()),
    };
    vec!["-netdev".into(), netdev, "-device".into(), "virtio-net-pci,netdev=n0".into()]
}

fn tool_name(tool: VmTool) -> &'static str {
    match tool {
        VmTool::Usernet => "usernet serve",
        VmTool::Passt => "passt",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_aligned_newc() {
        let a = cpio_newc(&[("bench-init", 0o100_755, b"#!/bin/sh\n")]);
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        // The first header: mode and size fields.
        let field = |i: usize| std::str::from_utf8(&a[6 + 8 * i..6 + 8 * (i + 1)]).unwrap().to_string();
        assert_eq!(field(1), format!("{:08x}", 0o100_755));
        assert_eq!(field(6), "0000000a");
        assert_eq!(field(11), "0000000b");
        // Header (110) + name "bench-init\0" (11) padded to 124, then the data.
        assert_eq!(&a[124..134], b"#!/bin/sh\n");
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn finds_markers() {
        let console =
            "noise\r\nBENCH-VM lease 192.168.65.2/24 mtu=1500\r\nBENCH-VM up-done rc=0\n[ 1.0] BENCH-VM end\n";
        assert_eq!(marker(console, "lease"), Some("192.168.65.2/24 mtu=1500"));
        assert_eq!(marker(console, "up-done"), Some("rc=0"));
        assert_eq!(marker(console, "end"), Some(""));
        assert_eq!(marker(console, "fail"), None);
    }

    #[test]
    fn transfer_rates() {
        let t = Transfer { bytes: 125_000_000, secs: 2.0, tool_cpu_s: Some(0.25), vcpu_s: Some(1.9) };
        assert!((t.gbps() - 0.5).abs() < 1e-9);
        assert!((t.cpu_per_gb().unwrap() - 2.0).abs() < 1e-9);
        assert!((t.vcpu_busy_pct().unwrap() - 95.0).abs() < 1e-9);
    }

    #[test]
    fn sink_and_source_on_loopback() {
        let watched = Watched { tool: std::process::id() as i32, qemu: Arc::new(AtomicI32::new(0)) };
        let sink = OneShot::start("sink", watched.clone(), serve_sink, 3 << 20).unwrap();
        let source = OneShot::start("source", watched, serve_source, 3 << 20).unwrap();
        let mut c = TcpStream::connect(sink.addr).unwrap();
        c.write_all(&vec![0u8; 3 << 20]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        let up = sink.finish().unwrap();
        assert_eq!(up.bytes, 3 << 20);
        assert!(up.tool_cpu_s.is_some() && up.vcpu_s.is_none());
        let mut d = TcpStream::connect(source.addr).unwrap();
        let mut got = Vec::new();
        d.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 3 << 20);
        drop(d);
        let down = source.finish().unwrap();
        assert_eq!(down.bytes, 3 << 20);
    }

    /// passt follows usernet to vhost-user only when its `--help` offers `--vhost-user`;
    /// stream otherwise, and for dgram, which passt lacks.
    #[test]
    fn passt_follows_to_vhost_user_when_it_can() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("usernet-bench-passt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = |name: &str, help: &str| {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\necho '{help}' >&2\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
            path
        };
        let new = fake("passt-2025", "  --vhost-user\t\tEnable vhost-user mode");
        let old = fake("passt-2023", "  -s, --socket PATH\tUNIX domain socket path");
        assert_eq!(passt_transport(&new, VmTransport::VhostUser, &dir), VmTransport::VhostUser);
        assert_eq!(passt_transport(&old, VmTransport::VhostUser, &dir), VmTransport::Stream);
        assert_eq!(passt_transport(&new, VmTransport::Dgram, &dir), VmTransport::Stream);
        assert_eq!(passt_transport(&new, VmTransport::Stream, &dir), VmTransport::Stream);
        assert_eq!(passt_transport(&dir.join("none"), VmTransport::VhostUser, &dir), VmTransport::Stream);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
