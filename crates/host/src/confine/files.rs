//! What usernet may still do to the host's files once set up: read a few of /proc's, and
//! remove the files it made itself (`usernet_core::own_files`), nothing else. A Landlock
//! ruleset (the kernel's unprivileged access control, Linux 5.13 on) that every thread
//! joins: what passt gets from an empty mount namespace, for every thread of a process
//! that has threads, rootless too.
//!
//! Theory of operation. [`ruleset`] builds a ruleset that handles every file access right
//! the kernel knows, and allows three: reading what is in [`READ_BENEATH`] and
//! [`READ_FILES`], listing [`LIST_BENEATH`], and removing a file, only in the directories of
//! the files usernet made and must remove when it ends (its sockets, pid file and `usernet
//! ps` entry). So once confined, usernet can open no other file (no /etc, no home, no
//! other process's /proc files), make no file, directory, socket file, fifo, device or link
//! anywhere, write, truncate or rename none, and remove none but its own directories'
//! entries. It also scopes abstract
//! Unix sockets (Linux 6.12 on): it cannot connect to one made outside the sandbox (a
//! desktop's or a container runtime's). Rights and scopes that the running kernel lacks are
//! left out (the crate's best effort); a kernel without Landlock gives no ruleset, and the
//! rest of the sandbox applies without it.
//!
//! The host's resolv.conf and /etc/hosts, which the gateway's DNS follows wherever their
//! symlinks lead, are read by a process of their own outside this ruleset (`dns_watch`'s
//! follower, which joins [`read_only`]). Files opened during setup (the TAP device, the pcap
//! file, the guest's resolv.conf) keep the access they were opened with: Landlock judges
//! opening, not the use of what is open.
//!
//! Landlock restricts the calling thread only (joining every thread at once takes Linux
//! 7.0), so `caps` has each thread join the ruleset in the same signal handler that lowers
//! its capabilities. Threads started later inherit it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetError, Scope,
};

/// The newest Landlock ABI whose rights and scopes the ruleset uses.
const ABI_USED: ABI = ABI::V6;

/// The directories in which usernet may remove files: those of the files it made.
pub fn removable_dirs(made: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = made.iter().filter_map(|p| p.parent()).map(Path::to_path_buf).collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// What usernet still reads once set up, all of it in /proc: its own files (/proc/self:
/// `/metrics`, pasta mode's port scan of /proc/net), the list of processes (`run` looks for
/// its guest's last ones; their namespace links are looked at by `stat`, which Landlock
/// does not judge, and their parents asked of a pidfd), and four files: the boot time for
/// `/metrics`, pasta mode's ephemeral port range, the first unprivileged port (named in
/// the error of a port published later that this user may not bind, `publish::listen`)
/// and /dev/urandom (where getrandom(2) is missing). A kernel that does not say a process's parent through its pidfd (before 6.13)
/// gets all of /proc readable instead, for the parents in /proc/PID/stat.
const READ_BENEATH: &[&str] = &["/proc/self"];
const LIST_BENEATH: &[&str] = &["/proc"];
const READ_FILES: &[&str] = &[
    "/proc/stat",
    "/proc/sys/net/ipv4/ip_local_port_range",
    "/proc/sys/net/ipv4/ip_unprivileged_port_start",
    "/dev/urandom",
];

/// The ruleset, ready for threads to join (`landlock_restrict_self`); None when the kernel
/// has no Landlock. A path that cannot be opened is left out.
pub fn ruleset(removable: &[PathBuf]) -> Result<Option<OwnedFd>, RulesetError> {
    let handled = AccessFs::from_all(ABI_USED);
    let mut created = Ruleset::default().handle_access(handled)?.scope(Scope::AbstractUnixSocket)?.create()?;
    let read_beneath: &[&str] =
        if crate::netns::sandbox::parents_known_without_proc() { READ_BENEATH } else { &["/proc"] };
    let rules = removable
        .iter()
        .map(|d| (d.as_path(), AccessFs::RemoveFile.into()))
        .chain(read_beneath.iter().map(|p| (Path::new(*p), AccessFs::ReadFile | AccessFs::ReadDir)))
        .chain(LIST_BENEATH.iter().map(|p| (Path::new(*p), AccessFs::ReadDir.into())))
        .chain(READ_FILES.iter().map(|p| (Path::new(*p), AccessFs::ReadFile.into())));
    for (path, access) in rules {
        match PathFd::new(path) {
            Ok(fd) => created = created.add_rule(PathBeneath::new(fd, access))?,
            Err(e) => tracing::debug!("sandbox: {} left out of the Landlock rules: {e}", path.display()),
        }
    }
    Ok(created.into())
}

/// A ruleset that lets read every file and write, make or remove none.
pub fn read_only() -> Result<Option<OwnedFd>, RulesetError> {
    let mut handled = AccessFs::from_all(ABI_USED);
    handled.remove(AccessFs::ReadFile | AccessFs::ReadDir);
    Ok(Ruleset::default().handle_access(handled)?.create()?.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_removable_directories_are_those_of_the_files_made() {
        let made = [PathBuf::from("/run/user/1000/usernet/1.sock"), "/tmp/vm.sock".into(), "/tmp/api.sock".into()];
        assert_eq!(removable_dirs(&made), vec![PathBuf::from("/run/user/1000/usernet"), "/tmp".into()]);
    }
}
