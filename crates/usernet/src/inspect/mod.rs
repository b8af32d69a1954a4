//! The commands that look into running usernets through their control API: `ps` (which
//! instances run), `flows` (their connections), `top` (the same, refreshed every second)
//! and `capture` (a live pcap stream).
//!
//! Every `usernet run` and `usernet serve` registers its API socket in the user's runtime
//! directory (`usernet_host::api::registry`). `ps` lists that directory; the others take
//! `--api PATH` to name an instance and, without it, pick the only one running. With more
//! than one, they ask which when stdin and stderr are a terminal, and otherwise fail with
//! the list (exit status 125, as every usernet failure).

pub mod capture;
pub mod flows;
pub mod ps;
pub mod top;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use usernet_host::api::client;
use usernet_host::api::registry;

/// `--api PATH`, optional: without it, the only running instance.
#[derive(Args, Debug, Clone)]
pub struct InstanceOpt {
    /// The instance's control API socket (default: the only usernet running for this user).
    #[arg(long, value_name = "PATH")]
    pub api: Option<PathBuf>,
}

impl InstanceOpt {
    /// The API socket to talk to.
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        match &self.api {
            Some(p) => Ok(p.clone()),
            None => pick(&registry::runtime_dir()),
        }
    }
}

/// The only instance registered in `dir`; with several, the one the user picks at the
/// terminal, else an error that lists them.
fn pick(dir: &Path) -> anyhow::Result<PathBuf> {
    let found = registry::instances(dir);
    match found.len() {
        0 => bail!(
            "no usernet is running for this user (none registered in {}); name one with --api PATH",
            dir.display()
        ),
        1 => return Ok(found[0].socket.clone()),
        _ => {}
    }
    let lines: Vec<String> = found
        .iter()
        .map(|i| match get_within::<usernet_host::api::Info>(&i.socket, "/v1/info", LIST_TIMEOUT) {
            Ok(info) => {
                format!("pid {} ({} {}): --api {}", i.pid, info.mode, info.command.join(" "), i.socket.display())
            }
            Err(_) => format!("pid {}: --api {}", i.pid, i.socket.display()),
        })
        .collect();
    if std::io::stdin().is_terminal() && std::io::stderr().is_terminal() {
        let mut err = std::io::stderr();
        for (n, line) in lines.iter().enumerate() {
            let _ = writeln!(err, "  {}) {line}", n + 1);
        }
        let _ = write!(err, "several usernets are running; which one? [1-{}] ", found.len());
        let _ = err.flush();
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        match answer.trim().parse::<usize>() {
            Ok(n) if (1..=found.len()).contains(&n) => return Ok(found[n - 1].socket.clone()),
            _ => bail!("no instance picked"),
        }
    }
    bail!("several usernets are running; name one with --api PATH:\n  {}", lines.join("\n  "))
}

/// How long an instance may take to describe itself in a list (`ps`, several found).
pub const LIST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// GET `path` and parse the JSON answer.
pub fn get<T: serde::de::DeserializeOwned>(socket: &Path, path: &str) -> anyhow::Result<T> {
    get_within(socket, path, client::TIMEOUT)
}

/// [`get`], each read and write bounded by `timeout`.
pub fn get_within<T: serde::de::DeserializeOwned>(
    socket: &Path,
    path: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<T> {
    let resp = client::request_within(socket, "GET", path, None, timeout)?;
    if resp.status != 200 {
        bail!("{path}: {}", resp.error_message());
    }
    serde_json::from_slice(&resp.body).with_context(|| format!("malformed answer from the usernet API to {path}"))
}

/// `1.5 KiB`, `12.0 MiB`: bytes for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `850ms`, `12s`, `3m05s`, `2h04m`, `3d07h`: a duration for people.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Rows as aligned columns (two spaces apart; the last column is not padded).
pub fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn people_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12 << 20), "12.0 MiB");
        assert_eq!(human_duration(850), "850ms");
        assert_eq!(human_duration(12_000), "12s");
        assert_eq!(human_duration(185_000), "3m05s");
        assert_eq!(human_duration(7_440_000), "2h04m");
        assert_eq!(human_duration(284_400_000), "3d07h");
    }

    #[test]
    fn aligned() {
        let t = table(&[vec!["A".into(), "BB".into(), "C".into()], vec!["long".into(), "x".into(), "y z".into()]]);
        assert_eq!(t, "A     BB  C\nlong  x   y z\n");
    }

    #[test]
    fn several_instances_without_a_terminal_are_an_error_that_lists_them() {
        let dir = std::env::temp_dir().join(format!("usernet-pick-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(pick(&dir).unwrap_err().to_string().starts_with("no usernet is running"));
        let _a = std::os::unix::net::UnixListener::bind(dir.join("101.sock")).unwrap();
        assert_eq!(pick(&dir).unwrap(), dir.join("101.sock"));
        let _b = std::os::unix::net::UnixListener::bind(dir.join("102.sock")).unwrap();
        if !std::io::stdin().is_terminal() || !std::io::stderr().is_terminal() {
            let e = pick(&dir).unwrap_err().to_string();
            assert!(e.contains("pid 101") && e.contains("pid 102") && e.contains("--api"), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
