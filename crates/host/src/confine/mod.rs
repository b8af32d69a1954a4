//! Least privilege once setup is done: what a compromised usernet could still do.
//!
//! Theory of operation. usernet needs privileges to set up (namespaces, a TAP device,
//! entering a runtime's namespace, binding a low port) and almost none afterwards: the
//! engine only moves bytes between sockets it already has or makes in its own network
//! namespace. So each mode, once its setup is done and before the guest's first frame is
//! read, calls [`apply`], which in this order:
//!
//! 1. lowers the capabilities of every thread of the process (`caps`) to the two the
//!    engine may still use, when it holds them: CAP_NET_BIND_SERVICE (a port published
//!    later through the API below 1024) and CAP_NET_RAW (ICMP echo through a raw socket
//!    where ping sockets are not allowed). Nothing else is kept, never CAP_SYS_ADMIN: what
//!    must happen inside the guest's namespace is done by threads that entered it during
//!    setup (`engine::guest_sockets`, pasta mode's forwarder) and need no privilege to stay;
//! 2. sets no_new_privs: nothing usernet could execute gains privileges;
//! 3. installs a seccomp filter on every thread (`seccomp`): an allowlist of the system
//!    calls the engine, its services, the API and the runtime libraries make. Any other
//!    call (mount, ptrace, execve, setns, unshare, bpf, a module load...) stops usernet: the
//!    thread gets SIGSYS, whose handler writes one line naming the call to stderr and ends
//!    the process with that signal.
//!
//! Capabilities belong to each thread, and `capset(2)` changes only the caller's: the
//! threads that setup started (the services' and the API's runtimes, the DNS watcher, the
//! namespace threads) are each asked, by a signal, to lower their own, then checked in
//! /proc/self/task. The seccomp filter and no_new_privs reach every thread at once
//! (SECCOMP_FILTER_FLAG_TSYNC). Threads started later inherit all three.
//!
//! `--no-sandbox` (`USERNET_NO_SANDBOX=1` in the drop-in modes) skips all of it, for
//! debugging; `USERNET_SECCOMP_LOG=1` keeps the filter but lets a call outside the list
//! through, logged by the kernel (`dmesg`: "audit: type=1326 ... syscall=N"), to find what a
//! new code path needs.

mod allowlist_bpf;
pub(crate) mod caps;
mod files;
mod seccomp;

pub use caps::Capability;

/// What [`apply`] did, for one debug line and for tests.
#[derive(Debug)]
pub struct Confined {
    /// Capabilities kept (of those usernet may still use, the ones it held).
    pub kept: Vec<Capability>,
    /// System calls allowed.
    pub allowed: usize,
    /// The filter only logs what it would stop (`USERNET_SECCOMP_LOG=1`).
    pub log_only: bool,
    /// The directories where files may still be removed, when the kernel has Landlock
    /// (`files`); None: it has not, and file access is as the process's user has it.
    pub removable: Option<Vec<std::path::PathBuf>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot lower the capabilities of thread {tid}: {reason}")]
    Capabilities { tid: i32, reason: String },
    #[error("cannot install the seccomp filter: {0}")]
    Seccomp(String),
    #[error("cannot restrict file access: {0}")]
    Files(String),
}

/// The sandbox, ready to apply: what can be done before setup ends (compiling the
/// seccomp filter) is done.
pub struct Prepared {
    filter: seccomp::Compiled,
    log_only: bool,
}

/// Prepares the sandbox (nothing changes for the process yet).
pub fn prepare() -> Result<Prepared, ConfineError> {
    let log_only = std::env::var_os("USERNET_SECCOMP_LOG").is_some_and(|v| v == "1");
    Ok(Prepared { filter: seccomp::compile(log_only)?, log_only })
}

impl Prepared {
    /// Applies the sandbox to the whole process (see the module's documentation). An error
    /// leaves the process as it was or with fewer privileges, never more.
    pub fn apply(self) -> Result<Confined, ConfineError> {
        use std::os::fd::AsRawFd;
        let removable = files::removable_dirs(&usernet_core::own_files::noted());
        let ruleset = files::ruleset(&removable).map_err(|e| ConfineError::Files(e.to_string()))?;
        let kept = caps::lower_all_threads(
            &[Capability::NetBindService, Capability::NetRaw],
            ruleset.as_ref().map(|fd| fd.as_raw_fd()),
        )?;
        let allowed = seccomp::install(self.filter)?;
        Ok(Confined { kept, allowed, log_only: self.log_only, removable: ruleset.map(|_| removable) })
    }
}

/// A Landlock ruleset that lets whoever joins it write, make or remove no file (reading
/// stays allowed), for helper processes that must read the host's files (`dns_watch`'s
/// follower); None when the kernel has no Landlock or it cannot be made.
pub fn read_only_ruleset() -> Option<std::os::fd::OwnedFd> {
    files::read_only().unwrap_or_else(|e| {
        tracing::debug!("sandbox: no read-only ruleset: {e}");
        None
    })
}

/// Prepares and applies the sandbox at once (see [`Prepared::apply`]).
pub fn apply() -> Result<Confined, ConfineError> {
    prepare()?.apply()
}

/// Whether the drop-in modes run without the sandbox (`USERNET_NO_SANDBOX=1`).
pub fn disabled_by_env() -> bool {
    std::env::var_os("USERNET_NO_SANDBOX").is_some_and(|v| v == "1")
}

/// Applies the sandbox unless `disabled`, logging what it did; `prepared` is the sandbox
/// prepared beforehand ([`prepare`]; None: prepared now). An error is for the caller to
/// report (usernet does not go on half-confined without saying so).
pub fn apply_unless(disabled: bool, prepared: Option<Result<Prepared, ConfineError>>) -> Result<(), ConfineError> {
    if disabled {
        tracing::debug!("sandbox off: capabilities and system calls are not restricted");
        return Ok(());
    }
    let c = prepared.unwrap_or_else(prepare)?.apply()?;
    let files = match &c.removable {
        Some(dirs) => format!("files: its own /proc files read, its own files in {dirs:?} removed, nothing else"),
        None => "file access not restricted (no Landlock in this kernel)".to_string(),
    };
    tracing::debug!(
        "sandbox on: capabilities kept {:?}, no_new_privs, {} system calls allowed{}, {files}",
        c.kept,
        c.allowed,
        if c.log_only { " (others logged, not stopped)" } else { "" }
    );
    Ok(())
}

#[cfg(test)]
mod tests;
