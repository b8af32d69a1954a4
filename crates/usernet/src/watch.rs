//! Watcher threads: each waits for one thing to be gone (a descriptor readable or closed,
//! a process exited, a namespace file removed or unmounted) and then calls what it was
//! given, once. The drop-in modes stop usernet then (`modes::lifecycle`); `serve --netns`
//! closes the link of the namespace that went.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

use usernet_host::netns::attach::NetnsTarget;

/// What a watcher thread does when what it watches is gone, given why.
pub type OnGone = Box<dyn FnOnce(&str) + Send>;

/// Calls `then` with `why` when `fd` becomes readable or is closed (an exit fd, a pidfd).
pub fn when_readable(fd: OwnedFd, why: String, then: OnGone) -> anyhow::Result<()> {
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
            then(&why);
        })
        .context("exit-fd watcher")?;
    Ok(())
}

/// Calls `then` when process `pid` exits (followed through a pidfd).
pub fn when_process_exits(pid: i32, then: OnGone) -> anyhow::Result<()> {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("following process {pid}"));
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    when_readable(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }, format!("the namespace's process ({pid}) exited"), then)
}

/// How often the namespace file is looked at: a stat(2), a few times a second.
const NETNS_POLL: Duration = Duration::from_millis(250);

/// Calls `then` when the namespace file at `path` goes away: removed, or unmounted (the
/// path then names another file), as Podman does when the container is gone. Polled: the
/// file is a bind mount of nsfs, whose removal inotify on the directory does not always
/// report (an unmount alone changes no directory entry).
pub fn when_netns_file_gone(path: PathBuf, then: OnGone) -> anyhow::Result<()> {
    // /proc/PID/ns/net lives as long as the process; once confined, usernet may no longer
    // look at it (that takes CAP_SYS_PTRACE over a process that holds capabilities usernet
    // dropped): follow the process instead, which needs nothing.
    if let Some(pid) = proc_pid_of(&path) {
        return when_process_exits(pid, then);
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
                    Ok(_) => return then(&format!("{} is no longer the namespace", path.display())),
                    Err(e) => return then(&format!("{}: {e}", path.display())),
                }
            }
        })
        .context("namespace watcher")?;
    Ok(())
}

/// Calls `then` with why when namespace `target` is gone: its file removed or unmounted
/// (`ip netns del`), or the process named exited. The TAP usernet put there keeps the
/// namespace itself alive, so this is what says that its user is done with it.
pub fn when_netns_gone(target: &NetnsTarget, then: impl FnOnce(&str) + Send + 'static) -> anyhow::Result<()> {
    match target {
        NetnsTarget::Path(path) => when_netns_file_gone(path.clone(), Box::new(then)),
        NetnsTarget::Pid(pid) => when_process_exits(*pid, Box::new(then)),
    }
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
