//! Guest RAM that a vhost-user front-end shares with usernet, guarded against the front-end
//! shrinking the file under it.
//!
//! Theory of operation. A front-end passes its guest RAM as files (memfds) that usernet
//! maps. If it then truncates one, the next access to a page past the new end raises
//! SIGBUS, whose default action ends the whole process and with it every other VM and
//! namespace usernet serves. QEMU seals its RAM against that; a front-end that does not
//! (a bug, or a hostile one) must cost its own link only.
//!
//! [`guard`] registers a mapping in a fixed table (no allocation: the SIGBUS handler reads
//! it). The handler, installed once with the first guard, looks up the faulting address:
//! inside a guarded mapping, it replaces the whole mapping with private zero pages
//! (mmap(2) MAP_FIXED, which is async-signal-safe), marks it lost and returns, so the
//! access that faulted is retried and reads zeros; the link checks [`Guarded::lost`]
//! after each use of guest memory and ends itself with a clear error. Any other SIGBUS goes
//! to the handler that was there before (Rust's own, for stack overflows), or, if none,
//! kills the process as it would have.
//!
//! A guard must be dropped before its mapping is unmapped (dropping it after would leave a
//! window where the handler could map zeros over addresses reused by something else);
//! its owner keeps guards in a field declared before the mappings'.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Mappings guarded at once: a vhost-user memory table has at most 32 regions (the `vhost`
/// crate's bound; QEMU sends up to 8), so this is 16 to 64 VMs' worth. Beyond it a mapping
/// cannot be guarded, and its owner refuses it (unguarded, it could end the process).
const SLOTS: usize = 512;

struct Slot {
    /// Claimed by a [`Guarded`].
    taken: AtomicBool,
    start: AtomicUsize,
    /// 0 while the slot is being filled or emptied: the handler skips it.
    len: AtomicUsize,
    lost: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot {
    taken: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    lost: AtomicBool::new(false),
};
static TABLE: [Slot; SLOTS] = [EMPTY; SLOTS];

/// The SIGBUS action there was before ours, to pass other faults on to.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
/// Whether the handler is installed (tried once).
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// A guarded mapping; unguarded when dropped.
#[derive(Debug)]
pub struct Guarded {
    slot: usize,
}

impl Guarded {
    /// The front-end shrank the file under this mapping: it now reads zeros.
    pub fn lost(&self) -> bool {
        TABLE[self.slot].lost.load(Ordering::Relaxed)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let slot = &TABLE[self.slot];
        slot.len.store(0, Ordering::SeqCst);
        slot.start.store(0, Ordering::SeqCst);
        slot.lost.store(false, Ordering::SeqCst);
        slot.taken.store(false, Ordering::SeqCst);
    }
}

/// Guards the `len` bytes mapped at `start` (a shared mapping of a front-end's file); why
/// not when the handler cannot be installed or the table is full: the caller must not use
/// the mapping then (a shrunk file would end the process). Only atomics: no lock, no
/// allocation.
pub fn guard(start: *const u8, len: usize) -> Result<Guarded, &'static str> {
    if !install() {
        return Err("the SIGBUS handler that guards guest memory cannot be installed");
    }
    if len == 0 {
        return Err("an empty mapping");
    }
    for (i, slot) in TABLE.iter().enumerate() {
        if slot.taken.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            slot.lost.store(false, Ordering::SeqCst);
            slot.start.store(start as usize, Ordering::SeqCst);
            slot.len.store(len, Ordering::SeqCst);
            return Ok(Guarded { slot: i });
        }
    }
    Err("more guest memory regions mapped than can be guarded against SIGBUS (512)")
}

/// Installs the SIGBUS handler (once); whether it is installed.
fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        // SAFETY: sigaction(2) with zeroed structs filled in below; the handler only makes
        // async-signal-safe calls (mmap, sigaction) and touches atomics.
        unsafe {
            let mut ours: libc::sigaction = std::mem::zeroed();
            ours.sa_sigaction = on_sigbus as *const () as usize;
            ours.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut ours.sa_mask);
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) < 0 {
                return false;
            }
            // Set before ours goes in: the handler reads it.
            let _ = PREVIOUS.set(previous);
            if libc::sigaction(libc::SIGBUS, &ours, std::ptr::null_mut()) < 0 {
                tracing::debug!("cannot guard guest memory: sigaction: {}", std::io::Error::last_os_error());
                return false;
            }
        }
        true
    })
}

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    for slot in &TABLE {
        let len = slot.len.load(Ordering::SeqCst);
        let start = slot.start.load(Ordering::SeqCst);
        if len == 0 || addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces, in place, a mapping that its guard's owner still holds (guards
        // go before their mappings); private zero pages that nothing else sees.
        let mapped = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if mapped as usize == start {
            slot.lost.store(true, Ordering::SeqCst);
            return;
        }
        break;
    }
    pass_on(sig, info, ctx);
}

/// A SIGBUS that is not ours: to the previous handler, or the default action.
fn pass_on(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    match PREVIOUS.get() {
        Some(p) if p.sa_sigaction != libc::SIG_DFL && p.sa_sigaction != libc::SIG_IGN => {
            if p.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO handler has this signature.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain handler has this signature.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(p.sa_sigaction) };
                f(sig);
            }
        }
        _ => {
            // The default action: returning retries the access, which faults again and
            // ends the process as it would have without us.
            // SAFETY: signal(2) to SIG_DFL is async-signal-safe.
            unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A shared mapping of a fresh memfd of `len` bytes, and the memfd.
    fn shared_memfd(len: usize) -> (*mut u8, std::os::fd::OwnedFd) {
        let fd = nix::sys::memfd::memfd_create(c"usernet-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, len as i64).unwrap();
        // SAFETY: a new shared mapping of a descriptor we hold.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (p.cast(), fd)
    }

    /// A guarded mapping whose file shrank reads zeros and says it is lost; unguarded, the
    /// same fault still ends the process with SIGBUS (in a child), as without the handler.
    #[test]
    fn a_shrunk_file_under_a_guarded_mapping_reads_zeros_and_others_still_fault() {
        let len = 4 * 4096;
        let (p, fd) = shared_memfd(len);
        // SAFETY: p maps len bytes.
        unsafe { p.add(4096).write_volatile(9) };
        let guarded = guard(p, len).expect("a guard");
        assert!(!guarded.lost());
        nix::unistd::ftruncate(&fd, 0).unwrap();
        // SAFETY: p still maps len bytes (of zeros, once the fault is handled).
        let read = unsafe { p.add(4096).read_volatile() };
        assert_eq!(read, 0);
        assert!(guarded.lost());
        drop(guarded);
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(p.cast(), len) };

        let (q, fd) = shared_memfd(len);
        nix::unistd::ftruncate(&fd, 0).unwrap();
        // The child shares the descriptor table (CLONE_FILES) rather than copying it as
        // fork(2) does: a copy would hold every other test's descriptors open while the
        // child lives, and a test whose peer closes a socket would miss the hang-up
        // (link::qemu's did). Without CLONE_VM this is fork otherwise: the child runs on a
        // copy of this stack and memory.
        // SAFETY: the child only reads q (which faults) and exits, both async-signal-safe;
        // every argument after the flags is unused without CLONE_VM, CLONE_SETTLS and the
        // TID flags.
        let child = unsafe {
            libc::syscall(libc::SYS_clone, libc::CLONE_FILES | libc::SIGCHLD, 0usize, 0usize, 0usize, 0usize)
        };
        assert!(child >= 0, "clone: {}", std::io::Error::last_os_error());
        if child == 0 {
            // SAFETY: q maps len bytes of a file now empty: this faults.
            let _ = unsafe { q.read_volatile() };
            // SAFETY: ends the child without running anything of the parent's.
            unsafe { libc::_exit(0) }
        }
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(child as libc::pid_t), None).unwrap();
        assert!(
            matches!(status, nix::sys::wait::WaitStatus::Signaled(_, nix::sys::signal::Signal::SIGBUS, _)),
            "{status:?}"
        );
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(q.cast(), len) };
    }
}
