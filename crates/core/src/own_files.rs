//! The files usernet makes during setup and removes when it ends: its sockets (transports,
//! the API, gvproxy's), pid files and its `usernet ps` registration. They are noted here as
//! they are made, so that the sandbox (`usernet_host::confine`), which otherwise lets usernet
//! make, change or remove no file at all once set up, can still let it remove these.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

static NOTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Notes that this process made `path` and will remove it when it ends.
pub fn note(path: &Path) {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut noted = NOTED.lock().unwrap_or_else(|e| e.into_inner());
    if !noted.contains(&path) {
        noted.push(path);
    }
}

/// Every file noted so far.
pub fn noted() -> Vec<PathBuf> {
    NOTED.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    #[test]
    fn files_are_noted_once_with_absolute_paths() {
        super::note(std::path::Path::new("relative-for-a-test.sock"));
        super::note(std::path::Path::new("relative-for-a-test.sock"));
        let here = std::env::current_dir().unwrap().join("relative-for-a-test.sock");
        assert_eq!(super::noted().iter().filter(|p| **p == here).count(), 1);
    }
}
