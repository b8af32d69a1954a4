//! Records the version `usernet --version` prints: the crate's version, and the git
//! revision when the build runs in a git checkout of this repository, as
//! `0.1.0 (git abc1234)`. Without git, or outside a checkout (a source tarball), the
//! version alone: the build never fails for want of git. The date of that commit
//! (YYYY-MM-DD, empty without git) dates the man page (`src/man.rs`).
//!
//! Cargo reruns this script only when HEAD moves: a commit, a checkout, a reset. It
//! watches HEAD, the branch HEAD points to (or, for a packed ref, packed-refs and the
//! folder where the loose ref would appear) and nothing else, so editing files does not
//! rerun it. For the same reason the revision carries no `-dirty` mark: edits after the
//! script ran would not update it, and a mark that may be stale says nothing. The watched
//! paths are given relative to the crate, as cargo resolves them against the package it
//! builds: a target folder copied from another checkout (worktrees made with a seeded
//! `target/`) then reruns the script for this checkout instead of keeping the other's
//! revision.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let version = env!("CARGO_PKG_VERSION");
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    println!("cargo::rerun-if-changed=build.rs");
    let (full, date) = match revision(&dir) {
        Some((rev, date)) => (format!("{version} (git {rev})"), date),
        None => (version.to_string(), String::new()),
    };
    println!("cargo::rustc-env=USERNET_VERSION={full}");
    println!("cargo::rustc-env=USERNET_COMMIT_DATE={date}");
}

/// `git` in `dir`, its trimmed standard output when it succeeds.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git").arg("-C").arg(dir).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// The short revision of HEAD and its commit date, when `dir` is in a git checkout that tracks this build
/// script (not some other repository the sources were unpacked into). Emits the
/// rerun-if-changed lines for HEAD and its ref.
fn revision(dir: &Path) -> Option<(String, String)> {
    git(dir, &["ls-files", "--error-unmatch", "build.rs"])?;
    let rev = git(dir, &["rev-parse", "--short", "HEAD"])?;
    let date = git(dir, &["log", "-1", "--format=%cs", "HEAD"]).unwrap_or_default();
    // `--git-path` may answer relative to `dir`; a worktree's HEAD is in its own git
    // folder, its branches in the main repository's.
    let git_path = |p: &str| git(dir, &["rev-parse", "--git-path", p]).map(|s| dir.join(s));
    let mut watched = vec![git_path("HEAD")?];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        let loose = git_path(&branch)?;
        if loose.exists() {
            watched.push(loose);
        } else {
            // A packed ref: a new commit writes the loose file, in a folder that may not
            // exist yet; watch the nearest one that does (cargo scans it whole).
            watched.extend(git_path("packed-refs"));
            watched.extend(loose.ancestors().skip(1).find(|p| p.is_dir()).map(Path::to_path_buf));
        }
    }
    for path in watched.iter().filter(|p| p.exists()) {
        // A path that does not exist would rerun the script on every build.
        println!("cargo::rerun-if-changed={}", relative_to(dir, path).display());
    }
    Some((rev, date))
}

/// `path` relative to `base` (both made canonical), or `path` as it is when either cannot be.
fn relative_to(base: &Path, path: &Path) -> PathBuf {
    let (Ok(base), Ok(full)) = (base.canonicalize(), path.canonicalize()) else {
        return path.to_path_buf();
    };
    let b: Vec<_> = base.components().collect();
    let p: Vec<_> = full.components().collect();
    let common = b.iter().zip(&p).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in &p[common..] {
        rel.push(c);
    }
    rel
}
