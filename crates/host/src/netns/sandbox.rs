//! The sandbox of `usernet run`: COMMAND's process in new namespaces, with a configured TAP.
//!
//! Theory of operation. [`Sandbox::create`] forks; it must be called while the process has a
//! single thread (before the engine's services start their runtime), with the signals the
//! caller wants to supervise already blocked. The child:
//!
//! 1. asks for SIGKILL when usernet dies (PR_SET_PDEATHSIG), so nothing outlives usernet;
//! 2. when not root, enters a new user namespace like `unshare -r` (setgroups "deny", uid and
//!    gid mapped to 0); as root it tries without one and falls back to one on EPERM;
//! 3. enters new network and mount namespaces and makes `/` rprivate (nothing it mounts
//!    reaches the host);
//! 4. creates the TAP device (persistent: it goes with the namespace, see `Tap::persist`),
//!    configures `lo`, the TAP (MAC, MTU, address, default route) through netlink, while a
//!    thread of its own installs the guest's /etc/resolv.conf (see `resolv`: a file of a
//!    tmpfs shadowing /etc, which the host cannot replace);
//! 5. sends the TAP and a handle on its network namespace to usernet over a SOCK_SEQPACKET
//!    socketpair (SCM_RIGHTS); usernet starts its network meanwhile;
//! 6. waits for that thread and sends the resolv.conf, open (so that usernet can rewrite it
//!    when the host's search domains change); then waits for the go-ahead;
//! 7. resets every signal to its default, unblocks them and execs COMMAND.
//!
//! The socketpair is the only channel. Child to parent: `R` with the TAP and the namespace
//! (ready), `C` with the resolv.conf, `E` + text (a setup step failed: one line for the
//! user; the child exits 125), `X` + errno (exec failed; the child exits 126 or 127). The
//! child's end is close-on-exec, so end-of-file after the go-ahead means the exec
//! succeeded. Parent to child: `G` (go). If usernet drops the sandbox before the go-ahead, the child sees
//! end-of-file and exits.
//!
//! Cleanup. usernet is a child subreaper, so whatever COMMAND leaves behind is re-parented to
//! it and reaped by [`Sandbox::reap`]. [`Sandbox::finish`] (also run on drop) kills COMMAND if
//! it still runs; then, if COMMAND left processes behind (usernet still has a child), it
//! SIGKILLs every process whose /proc/PID/ns/net is the sandbox's network namespace (same
//! device and inode), repeating until none is left (bounded), and reaps them. If it left
//! none, /proc is not searched at all: that search stats every process of the host, 0.35 ms
//! with 70 of them and 1.8 ms with 675 (`usernet run -- true`, hyperfine), and then only a
//! process that entered the namespace from outside (`nsenter -t PID -n`) could be found.
//! Such a process is not COMMAND's: it keeps running, as docker leaves a shell nsenter'd
//! into a container when the container stops.

use std::ffi::{CString, OsString};
use std::fmt;
use std::fs;
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::mount::{MsFlags, mount};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, signal, sigprocmask};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};
use nix::sys::stat::Mode;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid, getppid};

use super::describe;
use super::resolv;
use usernet_core::link::tap::Tap;

/// How the guest's network looks from inside.
#[derive(Debug, Clone)]
pub struct SandboxSpec {
    pub iface: super::Interface,
    /// The text of /etc/resolv.conf as COMMAND sees it.
    pub resolv_conf: String,
    /// Queues of the TAP device (1 to [`MAX_QUEUES`]): more than one makes it
    /// IFF_MULTI_QUEUE, with a descriptor per queue (see [`Sandbox::take_more_queues`]).
    pub queues: usize,
}

/// The most queues [`SandboxSpec::queues`] may ask for.
pub const MAX_QUEUES: usize = 8;

/// The guest's MAC address in `usernet run` (locally administered).
pub const GUEST_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A setup step in the sandbox failed; the text is meant for the user.
    #[error("{0}")]
    Setup(String),
    /// The OS error is part of the message, so it is not also a `source` (printed as a
    /// chain, `{:#}`, it would come twice); the rule of `BindError` in
    /// crates/host/src/publish/listen.rs.
    #[error("{context}: {err}")]
    Io { context: &'static str, err: io::Error },
}

fn io_err(context: &'static str) -> impl FnOnce(Errno) -> SandboxError {
    move |e| SandboxError::Io { context, err: e.into() }
}

/// COMMAND could not be executed.
#[derive(Debug, Clone)]
pub struct ExecError {
    pub program: String,
    pub errno: Errno,
}

impl ExecError {
    /// 127 when not found, 126 when it cannot be invoked (as shells and `docker run`).
    pub fn exit_code(&self) -> i32 {
        match self.errno {
            Errno::ENOENT | Errno::ENOTDIR => crate::exit_code::NOT_FOUND,
            _ => crate::exit_code::CANNOT_INVOKE,
        }
    }
}

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.errno == Errno::ENOENT && !self.program.contains('/') {
            write!(f, "{}: command not found", self.program)
        } else {
            write!(f, "{}: {}", self.program, self.errno.desc())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Exec(ExecError),
    #[error("cannot start the command: {0}")]
    Io(io::Error),
}

/// The sandbox process just forked, making its namespaces and TAP device: what
/// [`Sandbox::create`] returns, so that the caller may work meanwhile (`usernet run`
/// compiles its seccomp filter then). Dropped before [`Starting::ready`], the process is
/// killed and reaped, as a dropped [`Sandbox`] is.
pub struct Starting(Sandbox);

impl Starting {
    /// Waits until the sandbox's namespaces and TAP device are ready and takes them (its
    /// resolv.conf comes later: [`Sandbox::take_resolv_conf`]); a setup error is the
    /// child's line for the user.
    pub fn ready(self) -> Result<Sandbox, SandboxError> {
        let Starting(mut sandbox) = self;
        sandbox.wait_ready()?;
        Ok(sandbox)
    }
}

/// COMMAND's process, stopped just before exec until [`Sandbox::start`].
pub struct Sandbox {
    pid: Pid,
    /// COMMAND's name, for messages.
    program: String,
    ctl: OwnedFd,
    tap: Option<OwnedFd>,
    /// The TAP device's other queues' descriptors (`SandboxSpec::queues` beyond the first).
    more_queues: Vec<OwnedFd>,
    /// Queues the TAP device has (at least one).
    queues: usize,
    netns: Option<OwnedFd>,
    /// The child sent its resolv.conf (or failed to make it): nothing more comes before
    /// the go-ahead.
    resolv_conf_received: bool,
    /// COMMAND's exit code once it was reaped (128 + N when killed by signal N).
    status: Option<i32>,
    finished: bool,
}

const MSG_READY: u8 = b'R';
const MSG_RESOLV_CONF: u8 = b'C';
const MSG_SETUP_ERROR: u8 = b'E';
const MSG_EXEC_ERROR: u8 = b'X';
const MSG_GO: u8 = b'G';

impl Sandbox {
    /// Forks the sandbox process, which makes its namespaces and TAP device while the
    /// caller goes on ([`Starting::ready`] waits for them). `command` is the program and its
    /// arguments (looked up in PATH).
    pub fn create(spec: &SandboxSpec, command: &[OsString]) -> Result<Starting, SandboxError> {
        if thread_count() > 1 {
            tracing::warn!("forking the sandbox from a multi-threaded process");
        }
        let argv: Vec<CString> = command
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| SandboxError::Setup("the command contains a NUL byte".into()))?;
        if argv.is_empty() {
            return Err(SandboxError::Setup("no command given".into()));
        }
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(io_err("socketpair"))?;
        // Orphans of COMMAND come to us, so we can reap them.
        nix::sys::prctl::set_child_subreaper(true).map_err(io_err("PR_SET_CHILD_SUBREAPER"))?;
        let parent = getpid();
        // SAFETY: the child only runs `child_main`, which never returns; callers fork while
        // single-threaded (see the module comment).
        match unsafe { fork() }.map_err(io_err("fork"))? {
            ForkResult::Child => {
                drop(ours);
                child_main(spec, &argv, theirs, parent)
            }
            ForkResult::Parent { child } => {
                drop(theirs);
                Ok(Starting(Sandbox {
                    pid: child,
                    program: command[0].to_string_lossy().into_owned(),
                    ctl: ours,
                    tap: None,
                    more_queues: Vec::new(),
                    queues: spec.queues.clamp(1, MAX_QUEUES),
                    netns: None,
                    resolv_conf_received: false,
                    status: None,
                    finished: false,
                }))
            }
        }
    }

    fn wait_ready(&mut self) -> Result<(), SandboxError> {
        let mut fds = self.receive_setup(MSG_READY, 1 + self.queues, "its TAP device")?.into_iter();
        self.tap = fds.next();
        self.netns = fds.next();
        self.more_queues = fds.collect();
        Ok(())
    }

    /// Waits for the setup message `kind` and the `count` descriptors it carries (`what`
    /// names them, should they be missing); a setup error is the child's line for the user.
    fn receive_setup(&self, kind: u8, count: usize, what: &str) -> Result<Vec<OwnedFd>, SandboxError> {
        let mut buf = [0u8; 4096];
        let (n, fds) = recv_with_fds(&self.ctl, &mut buf)
            .map_err(|e| SandboxError::Io { context: "waiting for the sandbox", err: e })?;
        match buf[..n].split_first() {
            Some((&k, _)) if k == kind && fds.len() == count => Ok(fds),
            Some((&k, _)) if k == kind => Err(SandboxError::Setup(format!("the sandbox did not pass {what}"))),
            Some((&MSG_SETUP_ERROR, text)) => Err(SandboxError::Setup(String::from_utf8_lossy(text).into_owned())),
            _ => Err(SandboxError::Setup("the sandbox process ended during setup".into())),
        }
    }

    /// COMMAND's process id.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The TAP device's descriptor (once).
    pub fn take_tap(&mut self) -> Option<OwnedFd> {
        self.tap.take()
    }

    /// The descriptors of the TAP device's other queues (once; none unless
    /// `SandboxSpec::queues` asked for more than one).
    pub fn take_more_queues(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.more_queues)
    }

    /// The guest's /etc/resolv.conf, open for reading and writing (see
    /// `resolv::GuestResolvConf`): waits until the sandbox has made it (it does so while
    /// usernet starts its network). Ok(None) after the first call.
    pub fn take_resolv_conf(&mut self) -> Result<Option<fs::File>, SandboxError> {
        if self.resolv_conf_received {
            return Ok(None);
        }
        self.resolv_conf_received = true;
        let fds = self.receive_setup(MSG_RESOLV_CONF, 1, "the guest's resolv.conf")?;
        Ok(fds.into_iter().next().map(fs::File::from))
    }

    /// A new descriptor of the guest's network namespace (for sockets opened inside it).
    pub fn netns(&self) -> Option<OwnedFd> {
        self.netns.as_ref().and_then(|fd| fd.try_clone().ok())
    }

    /// Joins the user namespace the sandbox made for COMMAND (rootless, as `unshare -r`),
    /// so that this process, which owns it, holds the capabilities over the guest's
    /// network namespace that entering it needs (see `usernet_core::engine::guest_sockets`).
    /// usernet's files and sockets stay as they are: its user and group ids are the same
    /// ones, seen as root inside. Ok(false) when the sandbox made no user namespace. Call
    /// while this process has a single thread: the kernel refuses it otherwise.
    pub fn join_user_namespace(&self) -> io::Result<bool> {
        let theirs = fs::File::open(format!("/proc/{}/ns/user", self.pid))?;
        let ours = fs::metadata("/proc/self/ns/user")?;
        let meta = theirs.metadata()?;
        if (meta.dev(), meta.ino()) == (ours.dev(), ours.ino()) {
            return Ok(false);
        }
        if thread_count() != 1 {
            return Err(io::Error::other("usernet already runs several threads"));
        }
        // SAFETY: setns(2) on a namespace descriptor we hold; the process is single-threaded.
        if unsafe { libc::setns(theirs.as_raw_fd(), libc::CLONE_NEWUSER) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(true)
    }

    /// Lets the sandbox exec COMMAND and reports whether the exec succeeded.
    pub fn start(&mut self) -> Result<(), StartError> {
        if !self.resolv_conf_received {
            self.take_resolv_conf().map_err(|e| StartError::Io(io::Error::other(e.to_string())))?;
        }
        send_retry(&self.ctl, &[MSG_GO]).map_err(StartError::Io)?;
        let mut buf = [0u8; 64];
        let (n, _) = recv_with_fds(&self.ctl, &mut buf).map_err(StartError::Io)?;
        match buf[..n].split_first() {
            // End of file: the exec closed the child's end.
            None => Ok(()),
            Some((&MSG_EXEC_ERROR, rest)) if rest.len() >= 4 => {
                let raw = i32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]);
                // The child exits right after; reap it so `finish` has nothing to kill.
                self.wait_blocking();
                Err(StartError::Exec(ExecError { program: self.program.clone(), errno: Errno::from_raw(raw) }))
            }
            Some(_) => Err(StartError::Io(io::Error::other("unexpected message from the sandbox"))),
        }
    }

    /// Sends `sig` to COMMAND unless it has already exited.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none()
            && let Err(e) = kill(self.pid, sig)
        {
            tracing::debug!("forwarding {sig} to {}: {e}", self.pid);
        }
    }

    /// Reaps every exited child without blocking; returns COMMAND's exit code once it exited.
    pub fn reap(&mut self) -> Option<i32> {
        // Bounded: each iteration reaps one process.
        for _ in 0..4096 {
            match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(status) => self.note(status),
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!("waitpid: {e}");
                    break;
                }
            }
        }
        self.status
    }

    fn note(&mut self, status: WaitStatus) {
        match status {
            WaitStatus::Exited(pid, code) if pid == self.pid => self.status = Some(code),
            WaitStatus::Signaled(pid, sig, _) if pid == self.pid => self.status = Some(128 + sig as i32),
            other => tracing::trace!("reaped {other:?}"),
        }
    }

    /// Waits for COMMAND to end (after it was killed or failed to exec).
    fn wait_blocking(&mut self) {
        while self.status.is_none() {
            match waitpid(self.pid, None) {
                Ok(status @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => self.note(status),
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!("waitpid {}: {e}", self.pid);
                    break;
                }
            }
        }
    }

    /// Waits (bounded) until the processes we killed are reaped: the ones re-parented to us
    /// (we are a subreaper) are reaped here, so none is left even as a zombie.
    fn wait_gone(&mut self, killed: &[Pid]) {
        let mut pending: Vec<Pid> = killed.to_vec();
        for _ in 0..1000 {
            pending.retain(|&pid| match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => true,
                Err(Errno::EINTR) => true,
                Ok(status) => {
                    self.note(status);
                    false
                }
                // Not our child: its own parent reaps it; it is already dying.
                Err(_) => false,
            });
            if pending.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        tracing::warn!("killed processes did not exit: {pending:?}");
    }

    /// Once COMMAND has exited: kills every process it left in the network namespace and
    /// reaps them, so that their sockets close too, while the namespace stays for the
    /// engine to drain (`usernet_core::engine::drain`). `finish` does the same later anyway.
    pub fn kill_leftovers(&mut self) {
        if self.status.is_none() || self.finished {
            return;
        }
        if let Some(netns) = self.netns() {
            self.kill_in(netns);
        }
    }

    /// Kills every process in the network namespace `netns` (see
    /// [`kill_namespace_processes`]) and waits until they are reaped.
    fn kill_in(&mut self, netns: OwnedFd) {
        let killed = kill_namespace_processes(netns, || {
            self.reap();
        });
        self.wait_gone(&killed);
    }

    /// Kills COMMAND if it still runs and every other process left in the sandbox's network
    /// namespace, reaps them and closes the namespace. Idempotent; also run on drop.
    pub fn finish(&mut self) {
        if self.finished {
            return;
        }
        self.finished = true;
        if self.reap().is_none() {
            let _ = kill(self.pid, Signal::SIGKILL);
            self.wait_blocking();
        }
        if let Some(netns) = self.netns.take() {
            self.kill_in(netns);
        }
        self.reap();
        self.tap = None;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.finish();
    }
}

/// SIGKILLs every process in the network namespace `netns`, until none is left (bounded),
/// when COMMAND left any behind (usernet, their subreaper, has a child); returns the
/// processes it killed. A process counts when its /proc/PID/ns/net is the
/// namespace, or, where that link may not be read, when it descends from usernet (every
/// process usernet has is the sandbox's; orphans come back to it, the subreaper). Reading
/// another process's namespace links takes CAP_SYS_PTRACE over it, which usernet no longer
/// has once confined (`confine`) while COMMAND, run as root, holds every capability.
fn kill_namespace_processes(netns: OwnedFd, mut reap: impl FnMut()) -> Vec<Pid> {
    let mut killed = Vec::new();
    // Every process COMMAND started comes back to usernet when its parent exits: no child,
    // no leftover (see the module's comment).
    if !has_children() {
        return killed;
    }
    let Ok(ns) = fs::File::from(netns).metadata() else {
        return killed;
    };
    let me = getpid().as_raw();
    for round in 0..200 {
        let mut found = 0;
        let Ok(dir) = fs::read_dir("/proc") else {
            return killed;
        };
        let pids: Vec<i32> =
            dir.flatten().filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<i32>().ok())).collect();
        // Every process's parent, read only once a namespace link could not be, and only
        // while usernet has children at all (a descendant whose parent died comes back to
        // usernet, the subreaper, as a child).
        let mut parents: Option<std::collections::HashMap<i32, i32>> = None;
        let orphans_possible = has_children();
        let mut descends_from_me = |mut p: i32| {
            if !orphans_possible {
                return false;
            }
            let parents =
                parents.get_or_insert_with(|| pids.iter().filter_map(|&p| Some((p, parent_of(p)?))).collect());
            for _ in 0..64 {
                match parents.get(&p) {
                    Some(&pp) if pp == me => return true,
                    Some(&pp) if pp > 1 => p = pp,
                    _ => return false,
                }
            }
            false
        };
        for &pid in &pids {
            if pid == me {
                continue;
            }
            let ours = match fs::metadata(format!("/proc/{pid}/ns/net")) {
                Ok(m) => m.ino() == ns.ino() && m.dev() == ns.dev(),
                // Unreadable: another user's process, one that just exited, or (confined)
                // COMMAND's.
                Err(_) => descends_from_me(pid),
            };
            if ours {
                tracing::debug!("killing leftover process {pid}");
                let pid = Pid::from_raw(pid);
                let _ = kill(pid, Signal::SIGKILL);
                if !killed.contains(&pid) {
                    killed.push(pid);
                }
                found += 1;
            }
        }
        reap();
        if found == 0 {
            return killed;
        }
        std::thread::sleep(Duration::from_millis(if round < 10 { 1 } else { 20 }));
    }
    tracing::warn!("processes are still running in the sandbox's network namespace");
    killed
}

/// Whether this process has a child, running or exited and not reaped yet (waitid with
/// WNOWAIT: nothing is reaped).
fn has_children() -> bool {
    // SAFETY: siginfo_t is plain old data; waitid writes it.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid(2) with a valid siginfo_t to write; WNOHANG, so it does not block.
    let r = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOHANG | libc::WNOWAIT) };
    !(r < 0 && Errno::last() == Errno::ECHILD)
}

/// The parent of process `pid`, from /proc/PID/stat (readable for any process).
fn parent_of(pid: i32) -> Option<i32> {
    pidfd_parent_of(pid).ok().or_else(|| {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses; it ends at the last ')'.
        stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
    })
}

/// PIDFD_GET_INFO (Linux 6.13 on): `_IOWR(0xFF, 11, struct pidfd_info)`, its first version
/// being 64 bytes.
pub const PIDFD_GET_INFO: u64 = 0xC040_FF0B;

/// The first version of `struct pidfd_info`.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ids: [u32; 8],
    spare: u32,
}

/// The parent of process `pid`, asked of a pidfd (PIDFD_GET_INFO), which needs no file:
/// once confined, usernet may not read other processes' /proc files (`confine`).
fn pidfd_parent_of(pid: i32) -> std::io::Result<i32> {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that we own from here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut info = PidfdInfo { mask: 1, ..PidfdInfo::default() }; // PIDFD_INFO_PID
    // SAFETY: the ioctl writes at most 64 bytes, the size of `info`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), PIDFD_GET_INFO as _, &mut info) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(info.ppid as i32)
}

/// Whether this kernel says a process's parent through its pidfd (`pidfd_parent_of`); when
/// it does not, `confine` lets usernet read /proc's files instead.
pub fn parents_known_without_proc() -> bool {
    // SAFETY: getpid(2) and getppid(2) have no arguments.
    let (me, parent) = unsafe { (libc::getpid(), libc::getppid()) };
    pidfd_parent_of(me).is_ok_and(|p| p == parent)
}

/// Threads in this process (1 when /proc is unreadable: the check is only a warning).
fn thread_count() -> usize {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Threads:")).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(1)
}

fn send_retry(fd: &OwnedFd, data: &[u8]) -> io::Result<()> {
    loop {
        match nix::sys::socket::send(fd.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message and any descriptors passed with it (close-on-exec).
fn recv_with_fds(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    // The most a message carries: the TAP's queues and the namespace (MSG_READY).
    let mut cmsg = nix::cmsg_space!([RawFd; MAX_QUEUES + 1]);
    loop {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(m) => m,
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        let mut fds = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just gave us these descriptors; nobody else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        return Ok((msg.bytes, fds));
    }
}

// ---------------------------------------------------------------------------------------
// The child side. Everything below runs in the forked process and ends in exec or _exit.

fn child_main(spec: &SandboxSpec, argv: &[CString], ctl: OwnedFd, parent: Pid) -> ! {
    // Die with usernet; checking the parent afterwards closes the race with its death.
    if nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).is_err() || getppid() != parent {
        exit_now(crate::exit_code::USERNET_FAILED);
    }
    let setup_failed = |msg: String| -> ! {
        let mut out = vec![MSG_SETUP_ERROR];
        out.extend_from_slice(msg.as_bytes());
        let _ = send_retry(&ctl, &out);
        exit_now(crate::exit_code::USERNET_FAILED)
    };
    let (taps, netns, resolv_conf) = child_setup(spec).unwrap_or_else(|msg| setup_failed(msg));
    let mut fds = vec![taps[0].as_raw_fd(), netns.as_raw_fd()];
    fds.extend(taps[1..].iter().map(|t| t.as_raw_fd()));
    let sent = send_fds(&ctl, MSG_READY, &fds);
    drop(taps);
    drop(netns);
    if sent.is_err() {
        exit_now(crate::exit_code::USERNET_FAILED);
    }
    // usernet starts its network meanwhile.
    let resolv_conf = resolv_conf
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("its thread panicked")))
        .unwrap_or_else(|e| setup_failed(format!("cannot set up {}: {}", resolv::RESOLV_CONF, describe(&e))));
    if send_fds(&ctl, MSG_RESOLV_CONF, &[resolv_conf.as_raw_fd()]).is_err() {
        exit_now(crate::exit_code::USERNET_FAILED);
    }
    drop(resolv_conf);
    // Wait for the go-ahead; anything else (end of file: usernet gave up) ends us quietly.
    let mut buf = [0u8; 16];
    match recv_with_fds(&ctl, &mut buf) {
        Ok((n, _)) if n >= 1 && buf[0] == MSG_GO => {}
        _ => exit_now(crate::exit_code::USERNET_FAILED),
    }

    reset_signals();
    usernet_core::fd_limit::restore_for_exec();
    let mut err = match nix::unistd::execvp(&argv[0], argv) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    // execvp reports EACCES when a PATH directory could not be searched, even if the
    // command is in none of them (rootless, PATH often names root's directories); a shell
    // says "command not found" then, and so does usernet.
    if err == Errno::EACCES && !argv[0].as_bytes().contains(&b'/') && !found_in_path(argv[0].as_bytes()) {
        err = Errno::ENOENT;
    }
    let mut out = vec![MSG_EXEC_ERROR];
    out.extend_from_slice(&(err as i32).to_ne_bytes());
    let _ = send_retry(&ctl, &out);
    let code = ExecError { program: String::new(), errno: err }.exit_code();
    exit_now(code)
}

/// Whether some directory of PATH holds a file named `name` (one this process can see).
fn found_in_path(name: &[u8]) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path).any(|dir| dir.join(std::ffi::OsStr::from_bytes(name)).exists())
}

fn exit_now(code: i32) -> ! {
    // SAFETY: _exit skips destructors and atexit handlers that belong to the parent.
    unsafe { libc::_exit(code) }
}

/// Default dispositions and an empty mask, as a freshly started program expects (Rust
/// ignores SIGPIPE, and usernet blocks the signals it supervises).
fn reset_signals() {
    for sig in Signal::iterator() {
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP) {
            continue;
        }
        // SAFETY: installing SIG_DFL has no memory-safety requirements.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Sends message `kind` with descriptors `fds` (SCM_RIGHTS).
fn send_fds(ctl: &OwnedFd, kind: u8, fds: &[RawFd]) -> nix::Result<usize> {
    sendmsg::<()>(
        ctl.as_raw_fd(),
        &[IoSlice::new(&[kind])],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

/// What makes the guest's /etc/resolv.conf, on a thread of its own.
type ResolvConfThread = std::thread::JoinHandle<io::Result<fs::File>>;

/// Namespaces, then the TAP and its configuration while a thread makes the guest's
/// resolv.conf (both are mostly the kernel's work: on two cores, the sandbox is ready
/// sooner); returns the TAP's queues, the network namespace and that thread, or one line
/// for the user.
fn child_setup(spec: &SandboxSpec) -> Result<(Vec<OwnedFd>, OwnedFd, ResolvConfThread), String> {
    enter_namespaces()?;
    // Nothing we mount may propagate back to the host's mount namespace.
    mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
        .map_err(|e| format!("cannot make the mount namespace private: {}", e.desc()))?;
    let contents = spec.resolv_conf.clone();
    let resolv_conf = std::thread::Builder::new()
        .spawn(move || resolv::install_guest_resolv_conf(&contents))
        .map_err(|e| format!("cannot start a thread: {}", describe(&e)))?;

    let name = &spec.iface.ifname;
    // A multi-queue device only when asked: the kernel gives one 256 queues in sysfs.
    let taps = if spec.queues > 1 {
        Tap::create_multi_queue(name, spec.queues.min(MAX_QUEUES))
    } else {
        Tap::create_with_vnet_hdr(name).map(|t| vec![t])
    }
    .map_err(|e| format!("cannot create TAP device {name} (/dev/net/tun): {}", describe(&e)))?;
    // The namespace is usernet's alone: the device may go with it, in the background.
    if let Err(e) = taps[0].persist() {
        tracing::debug!("TUNSETPERSIST: {e}");
    }
    super::configure_interface(&spec.iface, taps.len() > 1)
        .map_err(|e| format!("cannot configure {name}: {}", describe(&e)))?;
    let netns = open("/proc/self/ns/net", OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| format!("cannot open the network namespace: {}", e.desc()))?;
    Ok((taps.into_iter().map(Tap::into_fd).collect(), netns, resolv_conf))
}

/// Enters new network and mount namespaces, in a new user namespace when needed.
fn enter_namespaces() -> Result<(), String> {
    let euid = nix::unistd::geteuid();
    let egid = nix::unistd::getegid();
    let net_mnt = CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS;
    const HINT: &str = "needs root or unprivileged user namespaces";
    if euid.is_root() {
        match unshare(net_mnt) {
            Ok(()) => return Ok(()),
            // Root without CAP_SYS_ADMIN (inside a container): try a user namespace.
            Err(Errno::EPERM) => {}
            Err(e) => return Err(format!("cannot create a network namespace: {}", e.desc())),
        }
    }
    unshare(CloneFlags::CLONE_NEWUSER).map_err(|e| format!("cannot create a user namespace: {} ({HINT})", e.desc()))?;
    let maps = [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("0 {euid} 1")),
        ("/proc/self/gid_map", format!("0 {egid} 1")),
    ];
    for (path, text) in maps {
        fs::write(path, text).map_err(|e| format!("cannot write {path}: {}", describe(&e)))?;
    }
    unshare(net_mnt).map_err(|e| format!("cannot create a network namespace: {} ({HINT})", e.desc()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The failure's errno is in the message, and only once in the chain `usernet` prints
    /// (`{:#}`), not again as a cause.
    #[test]
    fn a_cause_is_printed_once() {
        let e = io_err("waiting for the sandbox")(Errno::ENOBUFS);
        let cause = io::Error::from(Errno::ENOBUFS).to_string();
        assert_eq!(e.to_string(), format!("waiting for the sandbox: {cause}"));
        assert_eq!(format!("{:#}", anyhow::Error::from(e)).matches(&cause).count(), 1);
    }

    /// A process's parent, as the cleanup of `run` reads it: through a pidfd where the
    /// kernel says it (6.13 on), from /proc otherwise; the same either way.
    #[test]
    fn a_process_parent_is_known() {
        let child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let pid = child.id() as i32;
        assert_eq!(parent_of(pid), Some(std::process::id() as i32));
        if parents_known_without_proc() {
            assert_eq!(pidfd_parent_of(pid).unwrap(), std::process::id() as i32);
        }
        let mut child = child;
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn exec_error_codes_and_messages() {
        let e = |program: &str, errno| ExecError { program: program.into(), errno };
        assert_eq!(e("foo", Errno::ENOENT).exit_code(), 127);
        assert_eq!(e("foo", Errno::ENOENT).to_string(), "foo: command not found");
        assert_eq!(e("./foo", Errno::ENOENT).to_string(), "./foo: No such file or directory");
        assert_eq!(e("./foo", Errno::EACCES).exit_code(), 126);
        assert_eq!(e("./foo", Errno::ENOEXEC).exit_code(), 126);
        assert_eq!(e("./foo", Errno::EACCES).to_string(), "./foo: Permission denied");
    }
}
