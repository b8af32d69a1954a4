//! How a drop-in mode ends: SIGINT or SIGTERM read from a signalfd by the engine's loop,
//! and watcher threads (`crate::watch`) that send usernet SIGTERM when what it serves is
//! gone (an exit fd closed, the target process exited, the namespace file removed).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use anyhow::Context;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use usernet_core::engine::Supervisor;

use crate::watch;

/// Ends the engine's loop, status 0, on SIGINT or SIGTERM.
pub struct SignalSupervisor {
    sfd: SignalFd,
}

impl SignalSupervisor {
    /// Blocks SIGINT and SIGTERM (every thread started later inherits the mask) and opens
    /// the signalfd that the engine's loop reads them from.
    pub fn new() -> anyhow::Result<SignalSupervisor> {
        let mut signals = SigSet::empty();
        signals.add(Signal::SIGINT);
        signals.add(Signal::SIGTERM);
        sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).context("blocking signals")?;
        let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).context("signalfd")?;
        Ok(SignalSupervisor { sfd })
    }
}

impl Supervisor for SignalSupervisor {
    fn fd(&self) -> RawFd {
        self.sfd.as_raw_fd()
    }

    fn on_ready(&mut self) -> Option<i32> {
        match self.sfd.read_signal() {
            Ok(Some(info)) => {
                tracing::info!(signal = info.ssi_signo, "stopping on a signal");
                Some(0)
            }
            _ => None,
        }
    }
}

fn stop(why: &str) {
    tracing::info!("{why}: stopping");
    let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
}

/// Stops usernet (SIGTERM to itself, read from the signalfd) when `fd` becomes readable or
/// is closed: the exit fd, as slirp4netns does, or a pidfd of the target process.
pub fn stop_when_readable(fd: OwnedFd, why: &'static str) -> anyhow::Result<()> {
    watch::when_readable(fd, why.to_string(), Box::new(stop))
}

/// Stops usernet when process `pid` exits. The TAP holds the namespace alive, so the end of
/// the process is what shows that the namespace's user is gone.
pub fn stop_when_process_exits(pid: i32) -> anyhow::Result<()> {
    watch::when_process_exits(pid, Box::new(stop))
}

/// Stops usernet when the namespace file at `path` goes away: removed, or unmounted (the
/// path then names another file), as Podman does when the container is gone.
pub fn stop_when_netns_file_gone(path: PathBuf) -> anyhow::Result<()> {
    watch::when_netns_file_gone(path, Box::new(stop))
}
