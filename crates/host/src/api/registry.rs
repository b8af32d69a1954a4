//! Where the running usernets of a user can be found: one entry per instance in a runtime
//! directory of that user's, named after the instance's pid (`<pid>.sock`). The entry is
//! the instance's API socket, or, when the instance was given `--api PATH`, a symlink to
//! that socket. `usernet ps` lists the directory; `usernet flows`, `top` and `capture` pick
//! an instance from it.
//!
//! The directory is `$XDG_RUNTIME_DIR/usernet` when `XDG_RUNTIME_DIR` names a directory of
//! this user's, else `/run/usernet` for root, else `/tmp/usernet-<uid>`. It is created with
//! mode 0700 and used only if it is a real directory (not a symlink) owned by this user
//! that nobody else may enter, so that another user cannot plant entries in it.
//!
//! An instance removes its entry when it exits; one that was killed leaves it behind.
//! Such a stale entry (a socket nobody accepts on, or a symlink to nothing) is removed by
//! whoever lists the directory ([`instances`]).

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The runtime directory of this user (it may not exist yet).
pub fn runtime_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if let Some(xdg) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && xdg.is_absolute()
        && std::fs::metadata(&xdg).is_ok_and(|m| m.is_dir() && m.uid() == uid)
    {
        return xdg.join("usernet");
    }
    if uid == 0 { PathBuf::from("/run/usernet") } else { PathBuf::from(format!("/tmp/usernet-{uid}")) }
}

/// Creates the runtime directory (mode 0700) if needed and checks that it is private.
pub fn create_runtime_dir() -> io::Result<PathBuf> {
    let dir = runtime_dir();
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
    check_private(&dir)?;
    Ok(dir)
}

/// A directory of this user's that nobody else may enter or write to.
fn check_private(dir: &Path) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(dir)?;
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{}: not a private directory of uid {uid}", dir.display()),
        ));
    }
    Ok(())
}

/// The entry of the instance with process id `pid`.
pub fn entry_path(dir: &Path, pid: u32) -> PathBuf {
    dir.join(format!("{pid}.sock"))
}

/// The symlink that registers an API socket given with `--api`; removed on drop (if it
/// still points where it did).
pub struct Registration {
    link: PathBuf,
    target: PathBuf,
}

impl Registration {
    /// Registers the API socket at `socket` as this process's entry in `dir`.
    pub fn link(dir: &Path, socket: &Path) -> io::Result<Registration> {
        let target = match socket.parent() {
            Some(p) if !p.as_os_str().is_empty() => {
                std::fs::canonicalize(p)?.join(socket.file_name().unwrap_or_default())
            }
            _ => std::env::current_dir()?.join(socket),
        };
        let link = entry_path(dir, std::process::id());
        // An entry with our pid can only be a dead process's.
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&target, &link)?;
        usernet_core::own_files::note(&link);
        Ok(Registration { link, target })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if std::fs::read_link(&self.link).is_ok_and(|t| t == self.target) {
            let _ = std::fs::remove_file(&self.link);
        }
    }
}

/// A running instance found in the runtime directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub pid: u32,
    /// Its entry in the runtime directory (a socket or a symlink to one): connect here.
    pub socket: PathBuf,
}

/// The instances of `dir` that accept connections, by pid. Stale entries (refused, or a
/// symlink to nothing) are removed; entries this user may not use are skipped.
pub fn instances(dir: &Path) -> Vec<Instance> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_suffix(".sock")).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let socket = entry.path();
        match std::os::unix::net::UnixStream::connect(&socket) {
            Ok(_) => found.push(Instance { pid, socket }),
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound) => {
                tracing::debug!("removing the stale entry {}: {e}", socket.display());
                let _ = std::fs::remove_file(&socket);
            }
            Err(e) => tracing::debug!("skipping {}: {e}", socket.display()),
        }
    }
    found.sort_by_key(|i| i.pid);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_stale_and_linked_entries() {
        let dir = std::env::temp_dir().join(format!("usernet-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        check_private(&dir).unwrap();
        // A live socket, a stale one, a symlink to a live socket elsewhere, a dangling
        // symlink and an unrelated file.
        let live = std::os::unix::net::UnixListener::bind(entry_path(&dir, 10)).unwrap();
        drop(std::os::unix::net::UnixListener::bind(entry_path(&dir, 11)).unwrap());
        let elsewhere = dir.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let _other = std::os::unix::net::UnixListener::bind(elsewhere.join("api.sock")).unwrap();
        let reg = Registration::link(&dir, &elsewhere.join("api.sock")).unwrap();
        std::os::unix::fs::symlink(elsewhere.join("gone.sock"), entry_path(&dir, 12)).unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        let me = std::process::id();
        let mut expected = vec![
            Instance { pid: 10, socket: entry_path(&dir, 10) },
            Instance { pid: me, socket: entry_path(&dir, me) },
        ];
        expected.sort_by_key(|i| i.pid);
        assert_eq!(instances(&dir), expected);
        assert!(!entry_path(&dir, 11).exists() && std::fs::symlink_metadata(entry_path(&dir, 12)).is_err());
        drop(reg);
        assert!(std::fs::symlink_metadata(entry_path(&dir, me)).is_err(), "registration removed on drop");
        assert!(elsewhere.join("api.sock").exists(), "the socket it pointed to stays");
        drop(live);
        // A directory others may enter is refused.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        assert!(check_private(&dir).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
