//! The open-file limit: raised to its hard maximum once, at start, since each guest flow
//! and each published port's socket holds a descriptor (with a soft limit of 1,024, a range
//! of 500 published ports could not be bound); the programs usernet starts get the limit
//! they would have had without it (`restore_for_exec`).

use std::sync::atomic::{AtomicU64, Ordering};

/// The soft limit before [`raise`] changed it; `u64::MAX` while unchanged.
static ORIGINAL_SOFT: AtomicU64 = AtomicU64::new(u64::MAX);

/// Raises the soft open-file limit to the hard one; idempotent.
pub fn raise() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return;
    }
    let soft = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: lim is a valid rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
        let _ = ORIGINAL_SOFT.compare_exchange(u64::MAX, soft, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// Gives back the soft limit [`raise`] found, in a child about to exec a program of the
/// user's (async-signal-safe: an atomic load and two system calls).
pub fn restore_for_exec() {
    let soft = ORIGINAL_SOFT.load(Ordering::Relaxed);
    if soft == u64::MAX {
        return;
    }
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur = soft.min(lim.rlim_max);
        // SAFETY: lim is a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}
