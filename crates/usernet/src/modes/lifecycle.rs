//! How a drop-in mode ends: SIGINT or SIGTERM read from a signalfd by the engine's loop,
//! and watcher threads that send usernet SIGTERM when what it serves is gone (an exit fd
//! closed, the target process exited, the namespace file removed).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use usernet_core::engine::Supervisor;

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
    std::thread::Builder::new()
        .name("usernet-watch".into())
        .spawn(move || {
            let mut pfd = [libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            loop {
                // SAFETY: pfd is a valid array of one pollfd.
                let r = unsafe { libc::poll(pfd.as_mut_ptr(), 1, -1) };
                if r > 0 || (r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted) {
                    break;
                }
            }
            stop(why);
        })
        .context("exit-fd watcher")?;
    Ok(())
}

/// Stops usernet when process `pid` exits. The TAP holds the namespace alive, so the end of
/// the process is what shows that the namespace's user is gone.
pub fn stop_when_process_exits(pid: i32) -> anyhow::Result<()> {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("following process {pid}"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    stop_when_readable(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }, "the namespace's process exited")
}

/// How often the namespace file is looked at: a stat(2), a few times a second.
const NETNS_POLL: Duration = Duration::from_millis(250);

/// Stops usernet when the namespace file at `path` goes away: removed, or unmounted (the
/// path then names another file), as Podman does when the container is gone. Polled: the
/// file is a bind mount of nsfs, whose removal inotify on the directory does not always
/// report (an unmount alone changes no directory entry).
pub fn stop_when_netns_file_gone(path: PathBuf) -> anyhow::Result<()> {
    // /proc/PID/ns/net lives as long as the process; once confined, usernet may no longer
    // look at it (that takes CAP_SYS_PTRACE over a process that holds capabilities usernet
    // dropped): follow the process instead, which needs nothing.
    if let Some(pid) = proc_pid_of(&path) {
        return stop_when_process_exits(pid);
    }
    let meta = std::fs::metadata(&path).with_context(|| format!("{}", path.display()))?;
    let (dev, ino) = (meta.dev(), meta.ino());
    std::thread::Builder::new()
        .name("usernet-netns-watch".into())
        .spawn(move || {
            loop {
                std::thread::sleep(NETNS_POLL);
                match std::fs::metadata(&path) {
                    Ok(m) if (m.dev(), m.ino()) == (dev, ino) => continue,
                    Ok(_) => return stop(&format!("{} is no longer the namespace", path.display())),
                    Err(e) => return stop(&format!("{}: {e}", path.display())),
                }
            }
        })
        .context("namespace watcher")?;
    Ok(())
}

/// PID, for a path of the form /proc/PID/ns/NAME (or /proc/PID/task/TID/ns/NAME).
fn proc_pid_of(path: &std::path::Path) -> Option<i32> {
    let mut parts = path.to_str()?.strip_prefix("/proc/")?.split('/');
    let pid = parts.next()?.parse().ok()?;
    let rest: Vec<&str> = parts.collect();
    match rest.as_slice() {
        ["ns", _] | ["task", _, "ns", _] => Some(pid),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::proc_pid_of;
    use std::path::Path;

    #[test]
    fn namespace_files_of_processes() {
        assert_eq!(proc_pid_of(Path::new("/proc/123/ns/net")), Some(123));
        assert_eq!(proc_pid_of(Path::new("/proc/7/task/8/ns/net")), Some(7));
        for other in
            ["/run/user/1000/netns/netns-1", "/proc/self/ns/net", "/proc/12/ns", "/proc/12/ns/net/x", "proc/1/ns/net"]
        {
            assert_eq!(proc_pid_of(Path::new(other)), None, "{other}");
        }
    }
}
