//! The seccomp allowlist, and what happens to a call outside it.
//!
//! The list is by name (the `syscalls` crate maps names to this architecture's numbers; a
//! name the architecture does not have, such as `open` on aarch64, is skipped). It holds
//! what the engine, the gateway services (tokio, hickory, hyper), the control API, the SSH
//! forwarder (russh), the DNS watcher and the cleanup of `usernet run` were seen to call
//! across the test suites, found with `USERNET_SECCOMP_LOG=1`. Calls that could widen
//! what usernet can do are not in it: no execve, mount, setns, unshare, ptrace,
//! process_vm_*, bpf, keyctl, perf_event_open, init_module, chroot, pivot_root, reboot...
//!
//! A call outside the list gets SECCOMP_RET_TRAP: the kernel sends the thread SIGSYS, and
//! the handler writes one line to stderr (the call's name and number; async-signal-safe:
//! a stack buffer and write(2)), restores the default action and signals the thread again,
//! which ends the process with SIGSYS.
//!
//! Three calls of the list are also judged by their arguments, in a second filter stacked on
//! the first (the kernel takes the strictest answer of the two), whose refusal is EPERM, an
//! error the caller sees, rather than the end of usernet:
//! - `ioctl` only with the requests of [`IOCTLS`]: non-blocking mode, close-on-exec, bytes
//!   queued, terminal queries and the TAP device's own. Above all no TIOCSTI (typing into
//!   a terminal usernet shares with its caller), no TIOCSETD, no filesystem or block ioctls.
//! - `clone` only for threads: CLONE_THREAD set, no CLONE_NEW* namespace flag. usernet
//!   starts no process once confined (`run`'s command was forked before).
//! - `socket` never for AF_UNIX: usernet's own Unix sockets are made at setup or come from
//!   socketpair(2), so a new one could only serve to reach a host service's socket (a
//!   container runtime's, a desktop bus), which Landlock (`files`) does not judge.
//!
//! `clone3` passes its flags in memory, where seccomp cannot look, so the allowlist's filter
//! answers it ENOSYS: the C library then makes its threads with `clone`, judged as above
//! (what container runtimes' default profiles do).
//!
//! The allowlist's filter is a binary search over the numbers (`allowlist_bpf`), which the
//! kernel takes on faster at each start than seccompiler's chain; the argument filter is
//! seccompiler's.

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use syscalls::Sysno;

use super::{ConfineError, allowlist_bpf};

/// The system calls usernet makes after setup.
const ALLOWED: &[&str] = &[
    // Bytes: sockets, pipes, files already open.
    "read",
    "write",
    "readv",
    "writev",
    "pread64",
    "pwrite64",
    "preadv",
    "pwritev",
    "recvfrom",
    "sendto",
    "recvmsg",
    "sendmsg",
    "recvmmsg",
    "sendmmsg",
    "splice",
    "sendfile",
    "lseek",
    "ftruncate",
    "fsync",
    "fdatasync",
    // Sockets.
    "socket",
    "socketpair",
    "bind",
    "listen",
    "accept",
    "accept4",
    "connect",
    "getsockname",
    "getpeername",
    "setsockopt",
    "getsockopt",
    "shutdown",
    // Descriptors.
    "close",
    "close_range",
    "dup",
    "dup2",
    "dup3",
    "fcntl",
    "ioctl",
    "pipe",
    "pipe2",
    "eventfd2",
    "timerfd_create",
    "timerfd_settime",
    "timerfd_gettime",
    "signalfd4",
    "inotify_init1",
    "inotify_add_watch",
    "inotify_rm_watch",
    "pidfd_open",
    "pidfd_send_signal",
    // Waiting.
    "epoll_create1",
    "epoll_ctl",
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "futex",
    "nanosleep",
    "clock_nanosleep",
    "sched_yield",
    "restart_syscall",
    // Time, randomness, identity.
    "clock_gettime",
    "clock_getres",
    "gettimeofday",
    "getrandom",
    "getpid",
    "gettid",
    "getppid",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getresuid",
    "getresgid",
    "getgroups",
    "uname",
    "sysinfo",
    "getrlimit",
    "prlimit64",
    "getrusage",
    "sched_getaffinity",
    "capget",
    // Files: the pcap, the API's socket, resolv.conf and /etc/hosts, /proc.
    "openat",
    "open",
    "stat",
    "fstat",
    "lstat",
    "newfstatat",
    "statx",
    "statfs",
    "fstatfs",
    "access",
    "faccessat",
    "faccessat2",
    "readlink",
    "readlinkat",
    "getdents64",
    "getcwd",
    "unlink",
    "unlinkat",
    "rename",
    "renameat",
    "renameat2",
    "mkdir",
    "mkdirat",
    "fchmod",
    "chmod",
    "fchmodat",
    // Memory.
    "mmap",
    "munmap",
    "mremap",
    "mprotect",
    "madvise",
    "brk",
    "membarrier",
    // Keys kept out of swap (russh, the SSH forwarder of gvproxy mode).
    "mlock",
    "mlock2",
    "munlock",
    // Threads and processes: new threads (clone by its flags, clone3 answered ENOSYS: see
    // the module's comment); the reaping and the killing of `usernet run`'s leftover
    // processes.
    "clone",
    "clone3",
    "set_robust_list",
    "rseq",
    "prctl",
    "sigaltstack",
    "rt_sigaction",
    "rt_sigprocmask",
    "rt_sigreturn",
    "rt_sigtimedwait",
    "tgkill",
    "tkill",
    "kill",
    "wait4",
    "waitid",
    "exit",
    "exit_group",
];

/// The ioctl requests allowed (as the kernel compares them: 32 bits). (The casts are for
/// architectures where libc's request type is not u64.)
#[allow(clippy::unnecessary_cast)]
const IOCTLS: &[(&str, u64)] = &[
    ("FIONBIO", libc::FIONBIO as u64),
    ("FIOCLEX", libc::FIOCLEX as u64),
    ("FIONCLEX", libc::FIONCLEX as u64),
    // SIOCINQ and SIOCOUTQ: bytes queued in a socket.
    ("FIONREAD", libc::FIONREAD as u64),
    ("TIOCOUTQ", libc::TIOCOUTQ as u64),
    // isatty(3) and the terminal's size, read only.
    ("TCGETS", libc::TCGETS as u64),
    ("TIOCGWINSZ", libc::TIOCGWINSZ as u64),
    // The TAP device (`run`, `serve --netns`, the pasta and slirp4netns modes).
    ("TUNSETIFF", libc::TUNSETIFF as u64),
    ("TUNGETIFF", libc::TUNGETIFF as u64),
    ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD as u64),
    ("TUNSETPERSIST", libc::TUNSETPERSIST as u64),
    ("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ as u64),
    ("TUNGETFEATURES", libc::TUNGETFEATURES as u64),
    // A process's parent, through its pidfd (`run`'s cleanup; no /proc file read).
    ("PIDFD_GET_INFO", crate::netns::sandbox::PIDFD_GET_INFO),
];

/// The namespace flags a thread's clone may not carry.
const CLONE_NAMESPACES: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// The filters, compiled (a few hundred BPF instructions) ahead of [`install`], so that the
/// compiling need not wait until setup is done.
pub struct Compiled {
    /// The allowlist (with clone3's ENOSYS), then the argument checks.
    programs: Vec<BpfProgram>,
    /// How many calls it allows.
    pub allowed: usize,
}

/// Compiles the filters. `log_only`: calls outside the list go through, logged by the
/// kernel (and so do the arguments that the second filter refuses).
pub fn compile(log_only: bool) -> Result<Compiled, ConfineError> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompRule as Rule};
    let err = |e: &dyn std::fmt::Display| ConfineError::Seccomp(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(&e))?;
    let nr =
        |name: &str| Sysno::from_str(name).map(|s| s.id() as i64).map_err(|_| err(&format!("no system call {name}")));
    let compile = |rules: BTreeMap<i64, Vec<Rule>>, on_match, on_other| -> Result<BpfProgram, ConfineError> {
        let filter = SeccompFilter::new(rules, on_other, on_match, arch).map_err(|e| err(&e))?;
        filter.try_into().map_err(|e: seccompiler::BackendError| err(&e))
    };
    let numbers = allowed_numbers();
    let on_other = if log_only { SeccompAction::Log } else { SeccompAction::Trap };
    let refuse = if log_only { SeccompAction::Log } else { SeccompAction::Errno(libc::EPERM as u32) };
    // The allowlist as a tree (`allowlist_bpf`: 271 instructions where seccompiler's chain had 700, which the
    // kernel checks, compiles and runs for every number at each start).
    // clone3 is answered ENOSYS by this filter too (see the module's comment).
    let enosys = if log_only { SeccompAction::Log } else { SeccompAction::Errno(libc::ENOSYS as u32) };
    let first = [(nr("clone3")? as u32, enosys.into())];
    let main =
        allowlist_bpf::allowlist(allowlist_bpf::AUDIT_ARCH, &first, &numbers, libc::SECCOMP_RET_ALLOW, on_other.into());

    // The second filter matches what is refused: an ioctl whose request is none of the
    // list, a clone without CLONE_THREAD, a clone with a namespace flag, a Unix socket.
    let cond = |arg, op, value| Cond::new(arg, Len::Qword, op, value).map_err(|e| err(&e));
    let not_listed: Vec<Cond> = IOCTLS
        .iter()
        .map(|(_, req)| Cond::new(1, Len::Dword, Op::Ne, *req).map_err(|e| err(&e)))
        .collect::<Result<_, _>>()?;
    let mut clone_rules =
        vec![Rule::new(vec![cond(0, Op::MaskedEq(libc::CLONE_THREAD as u64), 0)?]).map_err(|e| err(&e))?];
    for flag in CLONE_NAMESPACES {
        clone_rules.push(Rule::new(vec![cond(0, Op::MaskedEq(*flag), *flag)?]).map_err(|e| err(&e))?);
    }
    let mut refused = BTreeMap::new();
    refused.insert(nr("ioctl")?, vec![Rule::new(not_listed).map_err(|e| err(&e))?]);
    refused.insert(nr("clone")?, clone_rules);
    // No new Unix socket: what usernet needs of them (its listeners, the services'
    // socketpairs) is made at setup or by socketpair(2); a new one could only connect to a
    // host service's socket (a container runtime's, a desktop's), abstract or not.
    refused.insert(
        nr("socket")?,
        vec![
            Rule::new(vec![Cond::new(0, Len::Dword, Op::Eq, libc::AF_UNIX as u64).map_err(|e| err(&e))?])
                .map_err(|e| err(&e))?,
        ],
    );
    let arguments = compile(refused, refuse, SeccompAction::Allow)?;
    Ok(Compiled { programs: vec![main, arguments], allowed: numbers.len() })
}

/// The numbers of [`ALLOWED`] on this architecture (`allowlist_bpf` sorts them).
fn allowed_numbers() -> Vec<u32> {
    ALLOWED.iter().filter_map(|name| Sysno::from_str(name).ok()).map(|s| s.id() as u32).collect()
}

/// Installs the filters on every thread (and sets no_new_privs); returns how many calls
/// they allow.
pub fn install(filter: Compiled) -> Result<usize, ConfineError> {
    let err = |e: &dyn std::fmt::Display| ConfineError::Seccomp(e.to_string());
    install_sigsys_handler().map_err(|e| err(&e))?;
    // The allowlist last: installing a filter is itself a call (seccomp(2)) that the
    // allowlist forbids. The order changes nothing else: the kernel runs every filter and
    // takes the strictest answer.
    for program in filter.programs.iter().rev() {
        seccompiler::apply_filter_all_threads(program).map_err(|e| err(&e))?;
    }
    Ok(filter.allowed)
}

fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: an async-signal-safe handler (see `on_sigsys`), SA_SIGINFO for the call's number.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The SIGSYS part of siginfo_t (the kernel's `_sigsys`): after the three ints that start
/// every siginfo_t (and the padding that aligns the union), the call's address, number and
/// architecture.
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    call_addr: *const libc::c_void,
    syscall: i32,
    arch: u32,
}

/// Appends `s` to `buf` at `*len`, as far as it fits.
fn put(buf: &mut [u8], len: &mut usize, s: &[u8]) {
    for &b in s {
        if *len < buf.len() {
            buf[*len] = b;
            *len += 1;
        }
    }
}

fn put_number(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    put(buf, len, &digits[i..]);
}

/// The line written when the filter stops call `nr`.
pub(super) fn stopped_line(buf: &mut [u8; 256], nr: i64) -> usize {
    let mut len = 0;
    put(buf, &mut len, b"usernet: the sandbox stopped a forbidden system call: ");
    let name = usize::try_from(nr).ok().and_then(Sysno::new).map(|s| s.name()).unwrap_or("unknown");
    put(buf, &mut len, name.as_bytes());
    put(buf, &mut len, b" (number ");
    put_number(buf, &mut len, nr.unsigned_abs());
    put(
        buf,
        &mut len,
        b"). This is a bug in usernet: please report it; --no-sandbox (USERNET_NO_SANDBOX=1) works around it.\n",
    );
    len
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a siginfo_t for SIGSYS, laid out as `SigsysInfo`.
    let nr = unsafe { (*(info as *const SigsysInfo)).syscall } as i64;
    let mut buf = [0u8; 256];
    let len = stopped_line(&mut buf, nr);
    // SAFETY: write(2), sigaction(2), sigprocmask(2) and tgkill(2) are async-signal-safe;
    // SIGSYS back at its default action ends the process once it is delivered again.
    unsafe {
        libc::write(2, buf.as_ptr() as *const libc::c_void, len);
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::syscall(libc::SYS_tgkill, libc::getpid(), libc::syscall(libc::SYS_gettid), libc::SIGSYS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::allowlist_bpf::AUDIT_ARCH;
    use crate::confine::allowlist_bpf::tests::{every_number, run};

    /// The tree answers every number as seccompiler's chain of the same list does, for both
    /// answers to the calls outside it, in less than half the chain's length; clone3 gets
    /// ENOSYS.
    #[test]
    fn the_tree_answers_as_the_chain() {
        let arch = TargetArch::try_from(std::env::consts::ARCH).unwrap();
        let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
            allowed_numbers().into_iter().map(|n| (n as i64, Vec::new())).collect();
        for log_only in [false, true] {
            let compiled = compile(log_only).unwrap();
            let tree = &compiled.programs[0];
            let other = if log_only { SeccompAction::Log } else { SeccompAction::Trap };
            let chain: BpfProgram =
                SeccompFilter::new(rules.clone(), other, SeccompAction::Allow, arch).unwrap().try_into().unwrap();
            assert!(tree.len() * 2 <= chain.len(), "tree {} against chain {}", tree.len(), chain.len());
            let clone3 = Sysno::clone3.id() as u32;
            for nr in every_number().filter(|&nr| nr != clone3) {
                for at in [AUDIT_ARCH, AUDIT_ARCH ^ 1] {
                    assert_eq!(run(tree, nr, at), run(&chain, nr, at), "nr {nr:#x} arch {at:#x}");
                }
            }
            let enosys = if log_only { libc::SECCOMP_RET_LOG } else { libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32 };
            assert_eq!(run(tree, clone3, AUDIT_ARCH), enosys);
        }
        assert_eq!(compile(false).unwrap().allowed, rules.len());
    }
}
