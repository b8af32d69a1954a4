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

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use syscalls::Sysno;

use super::ConfineError;

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
    // Threads and processes: new threads (clone3's flags cannot be filtered); the reaping
    // and the killing of `usernet run`'s leftover processes.
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

/// The filter, compiled (a few hundred BPF instructions) ahead of [`install`], so that the
/// compiling need not wait until setup is done.
pub struct Compiled {
    program: BpfProgram,
    /// How many calls it allows.
    pub allowed: usize,
}

/// Compiles the filter. `log_only`: calls outside the list go through, logged by the kernel.
pub fn compile(log_only: bool) -> Result<Compiled, ConfineError> {
    let err = |e: &dyn std::fmt::Display| ConfineError::Seccomp(e.to_string());
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(|e| err(&e))?;
    let rules: BTreeMap<i64, Vec<seccompiler::SeccompRule>> =
        ALLOWED.iter().filter_map(|name| Sysno::from_str(name).ok()).map(|s| (s.id() as i64, Vec::new())).collect();
    let allowed = rules.len();
    let on_other = if log_only { SeccompAction::Log } else { SeccompAction::Trap };
    let filter = SeccompFilter::new(rules, on_other, SeccompAction::Allow, arch).map_err(|e| err(&e))?;
    let program: BpfProgram = filter.try_into().map_err(|e: seccompiler::BackendError| err(&e))?;
    Ok(Compiled { program, allowed })
}

/// Installs the filter on every thread (and sets no_new_privs); returns how many calls it
/// allows.
pub fn install(filter: Compiled) -> Result<usize, ConfineError> {
    let err = |e: &dyn std::fmt::Display| ConfineError::Seccomp(e.to_string());
    install_sigsys_handler().map_err(|e| err(&e))?;
    seccompiler::apply_filter_all_threads(&filter.program).map_err(|e| err(&e))?;
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
