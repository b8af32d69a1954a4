//! Lowering the capabilities of every thread of the process.
//!
//! `capset(2)` changes the calling thread's sets only. So the caller lowers its own and
//! sends every other thread a real-time signal whose handler makes the same `capset` call
//! for that thread (as libcap's psx does); the handler uses nothing but the system call and
//! atomics. Then /proc/self/task/*/status says whether every thread got there.

use std::sync::atomic::{AtomicI32, AtomicU32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::ConfineError;

/// The capabilities usernet may keep after setup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// Binding a port below `net.ipv4.ip_unprivileged_port_start` (a port published later).
    NetBindService,
    /// Raw ICMP sockets (echo where ping sockets are not allowed).
    NetRaw,
}

impl Capability {
    fn bit(self) -> u32 {
        match self {
            Capability::NetBindService => 10, // CAP_NET_BIND_SERVICE
            Capability::NetRaw => 13,         // CAP_NET_RAW
        }
    }
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling thread's sets (two words: capabilities 0-31 and 32-63).
fn get() -> std::io::Result<[Data; 2]> {
    let mut h = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let mut d = [Data::default(); 2];
    // SAFETY: capget(2) with a version 3 header and room for two data structs.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(d)
}

/// Sets the calling thread's effective and permitted sets to `keep` (a mask of
/// capabilities 0-31), the inheritable set to nothing. Async-signal-safe.
pub(crate) fn set(keep: u32) -> bool {
    let mut h = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let d = [Data { effective: keep, permitted: keep, inheritable: 0 }, Data::default()];
    // SAFETY: capset(2) with a version 3 header and two data structs.
    unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) == 0 }
}

/// What the other threads' handlers set, and how many of them did.
static KEEP: AtomicU32 = AtomicU32::new(0);
/// The Landlock ruleset each thread joins (`files`), or -1.
static RULESET: AtomicI32 = AtomicI32::new(-1);
static DONE: AtomicUsize = AtomicUsize::new(0);
static FAILED_TID: AtomicI32 = AtomicI32::new(0);
static FAILED_RULESET_TID: AtomicI32 = AtomicI32::new(0);

/// Joins the Landlock ruleset `fd` (after no_new_privs, which joining takes without
/// CAP_SYS_ADMIN); only system calls, so that a signal handler may do it.
pub(crate) fn join_ruleset(fd: i32) -> bool {
    // SAFETY: prctl(2) and landlock_restrict_self(2) with plain integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
            && libc::syscall(libc::SYS_landlock_restrict_self, fd, 0) == 0
    }
}

extern "C" fn lower_this_thread(_: libc::c_int) {
    // SAFETY: errno is thread-local; the handler leaves it as it found it.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: gettid(2) has no arguments.
    let tid = || unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    if !set(KEEP.load(Ordering::SeqCst)) {
        FAILED_TID.store(tid(), Ordering::SeqCst);
    }
    let ruleset = RULESET.load(Ordering::SeqCst);
    if ruleset >= 0 && !join_ruleset(ruleset) {
        FAILED_RULESET_TID.store(tid(), Ordering::SeqCst);
    }
    DONE.fetch_add(1, Ordering::SeqCst);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// The signal that asks a thread to lower its capabilities (one nothing else uses).
fn signal() -> libc::c_int {
    libc::SIGRTMIN() + 5
}

fn tids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The effective and permitted sets of thread `tid`, from /proc (None: it is gone).
fn of_thread(tid: i32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    Some((field("CapEff:")?, field("CapPrm:")?))
}

/// The first thread (and its sets) holding a capability outside `keep`.
fn first_thread_beyond(keep: u32) -> Option<(i32, u64)> {
    tids().into_iter().find_map(|t| {
        let (eff, prm) = of_thread(t)?;
        ((eff | prm) & !u64::from(keep) != 0).then_some((t, eff | prm))
    })
}

/// Lowers every thread's capabilities to those of `wanted` that the calling thread holds
/// now (effective), and has every thread join the Landlock `ruleset` when there is one
/// (`files`); returns the capabilities kept.
pub fn lower_all_threads(wanted: &[Capability], ruleset: Option<i32>) -> Result<Vec<Capability>, ConfineError> {
    // SAFETY: gettid(2) has no arguments.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    let fail = |tid: i32, reason: String| ConfineError::Capabilities { tid, reason };
    let now = get().map_err(|e| fail(me, e.to_string()))?;
    let kept: Vec<Capability> = wanted.iter().copied().filter(|c| now[0].effective & (1 << c.bit()) != 0).collect();
    let keep = kept.iter().fold(0u32, |m, c| m | (1 << c.bit()));
    if now.iter().all(|d| d.permitted & !keep == 0 && d.effective & !keep == 0 && d.inheritable == 0)
        && first_thread_beyond(keep).is_none()
        && ruleset.is_none()
    {
        // Nothing to lower (rootless: no capabilities in the first place).
        return Ok(kept);
    }

    KEEP.store(keep, Ordering::SeqCst);
    RULESET.store(ruleset.unwrap_or(-1), Ordering::SeqCst);
    DONE.store(0, Ordering::SeqCst);
    FAILED_TID.store(0, Ordering::SeqCst);
    FAILED_RULESET_TID.store(0, Ordering::SeqCst);
    // SAFETY: a handler that makes one system call and touches only atomics; SA_RESTART so
    // that the calls it interrupts carry on.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = lower_this_thread as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(signal(), &sa, std::ptr::null_mut()) < 0 {
            return Err(fail(me, format!("sigaction: {}", std::io::Error::last_os_error())));
        }
    }
    let pid = std::process::id() as i32;
    let mut asked = 0;
    for tid in tids().into_iter().filter(|&t| t != me) {
        // SAFETY: tgkill(2) to a thread of this process.
        if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, signal()) } == 0 {
            asked += 1;
        }
    }
    if !set(keep) {
        return Err(fail(me, std::io::Error::last_os_error().to_string()));
    }
    if let Some(fd) = ruleset
        && !join_ruleset(fd)
    {
        return Err(ConfineError::Files(format!("thread {me}: {}", std::io::Error::last_os_error())));
    }
    // Every thread that was asked answers at once (a thread blocking the signal would not:
    // the check below then names it).
    // They answer within microseconds: yield to them first, and sleep only if they are slow.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(2);
    while DONE.load(Ordering::SeqCst) < asked && Instant::now() < deadline {
        if started.elapsed() < Duration::from_millis(2) {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let failed = FAILED_TID.load(Ordering::SeqCst);
    if failed != 0 {
        return Err(fail(failed, "capset refused".into()));
    }
    let failed = FAILED_RULESET_TID.load(Ordering::SeqCst);
    if failed != 0 {
        return Err(ConfineError::Files(format!("thread {failed} could not join the Landlock ruleset")));
    }
    let answered = DONE.load(Ordering::SeqCst);
    if ruleset.is_some() && answered < asked {
        return Err(ConfineError::Files(format!(
            "{} of {asked} threads did not answer signal {} to join the Landlock ruleset",
            asked - answered,
            signal()
        )));
    }
    if let Some((tid, held)) = first_thread_beyond(keep) {
        return Err(fail(tid, format!("it still holds {held:#x} (did it block signal {}?)", signal())));
    }
    Ok(kept)
}
