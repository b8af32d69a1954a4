//! `usernet top`: a live view of a running usernet, redrawn every second: the instance,
//! the guest links' rates and totals, then its flows, fastest first, with each one's rate
//! each way over the last interval. Rates come from two samples of `/v1/stats` and
//! `/v1/flows` (a flow is matched across samples by protocol and endpoints).
//!
//! On a terminal the frame is redrawn in place (ANSI: cursor home, erase to the end of each
//! line and of the screen) until interrupted; with `--once`, or when stdout is not a
//! terminal, one frame is printed, after one interval, and `top` exits.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::Args;

use usernet_host::api::{FlowView, Info, StatsView};

use super::{InstanceOpt, get, human_bytes, human_duration, table};

#[derive(Args, Debug)]
pub struct TopArgs {
    #[command(flatten)]
    pub instance: InstanceOpt,
    /// Print one frame and exit (the default when stdout is not a terminal).
    #[arg(long)]
    pub once: bool,
    /// Seconds between frames.
    #[arg(long, value_name = "SECONDS", default_value_t = 1.0,
          value_parser = |s: &str| s.parse::<f64>().ok().filter(|v| (0.1..=3600.0).contains(v)).ok_or("want 0.1 to 3600 seconds"))]
    pub interval: f64,
    /// Flows shown at most (default: what fits the terminal, or all when not one).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// One look at the instance.
struct Sample {
    at: Instant,
    stats: StatsView,
    flows: Vec<FlowView>,
}

type Key = (String, String, String, Option<String>);

fn key(f: &FlowView) -> Key {
    (f.proto.clone(), f.guest.clone(), f.remote.clone(), f.host.clone())
}

fn sample(socket: &std::path::Path) -> anyhow::Result<Sample> {
    Ok(Sample { at: Instant::now(), stats: get(socket, "/v1/stats")?, flows: get(socket, "/v1/flows")? })
}

/// `1.2 MiB/s`.
fn rate(bytes: u64, secs: f64) -> String {
    format!("{}/s", human_bytes((bytes as f64 / secs.max(1e-3)) as u64))
}

/// One frame's lines, from the sample before and the one now.
fn frame(info: &Info, before: &Sample, now: &Sample, limit: Option<usize>) -> Vec<String> {
    let secs = now.at.duration_since(before.at).as_secs_f64();
    let (b, n) = (&before.stats, &now.stats);
    let mut lines = vec![
        format!(
            "usernet {} ({}: {})  guests {}  up {}",
            info.pid,
            info.mode,
            info.command.join(" "),
            info.guests.iter().map(|g| g.ip.to_string()).collect::<Vec<_>>().join(","),
            human_duration(info.uptime_ms),
        ),
        format!(
            "from guests {} ({} total)  to guests {} ({} total)  frames in {} out {}  dropped {}",
            rate(n.bytes_in.saturating_sub(b.bytes_in), secs),
            human_bytes(n.bytes_in),
            rate(n.bytes_out.saturating_sub(b.bytes_out), secs),
            human_bytes(n.bytes_out),
            n.frames_in,
            n.frames_out,
            n.dropped_in,
        ),
        format!("flows: tcp {}  udp {}  icmp {}", n.tcp_flows, n.udp_flows, n.icmp_flows),
        String::new(),
    ];
    let previous: HashMap<Key, &FlowView> = before.flows.iter().map(|f| (key(f), f)).collect();
    let mut rows: Vec<(u64, u64, &FlowView)> = now
        .flows
        .iter()
        .map(|f| {
            let (to, from) = match previous.get(&key(f)) {
                Some(p) => (
                    f.bytes_to_guest.saturating_sub(p.bytes_to_guest),
                    f.bytes_from_guest.saturating_sub(p.bytes_from_guest),
                ),
                // New since the last sample: everything it carried is recent.
                None => (f.bytes_to_guest, f.bytes_from_guest),
            };
            (to, from, f)
        })
        .collect();
    rows.sort_by(|a, b| {
        (b.0 + b.1)
            .cmp(&(a.0 + a.1))
            .then((b.2.bytes_to_guest + b.2.bytes_from_guest).cmp(&(a.2.bytes_to_guest + a.2.bytes_from_guest)))
    });
    let shown = limit.unwrap_or(usize::MAX).min(rows.len());
    let mut cells = vec![
        [
            "PROTO",
            "GUEST",
            "REMOTE",
            "HOST",
            "STATE",
            "TO-GUEST/S",
            "FROM-GUEST/S",
            "TO-GUEST",
            "FROM-GUEST",
            "AGE",
            "IDLE",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (to, from, f) in &rows[..shown] {
        cells.push(vec![
            f.proto.clone(),
            f.guest.clone(),
            f.remote.clone(),
            f.host.clone().unwrap_or_else(|| "-".into()),
            f.state.clone(),
            rate(*to, secs),
            rate(*from, secs),
            human_bytes(f.bytes_to_guest),
            human_bytes(f.bytes_from_guest),
            human_duration(f.age_ms),
            human_duration(f.idle_ms),
        ]);
    }
    lines.extend(table(&cells).lines().map(String::from));
    if shown < rows.len() {
        lines.push(format!("... and {} more", rows.len() - shown));
    }
    lines
}

/// Rows of the terminal on stdout, if it is one.
fn terminal_rows() -> Option<usize> {
    // SAFETY: TIOCGWINSZ fills a winsize; an all-zero one is valid to pass.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: ioctl on stdout with a pointer to a winsize of our own.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0).then_some(ws.ws_row as usize)
}

pub fn main(args: TopArgs) -> anyhow::Result<i32> {
    let socket = args.instance.socket()?;
    let interval = Duration::from_secs_f64(args.interval);
    let live = !args.once && std::io::stdout().is_terminal();
    let mut before = sample(&socket)?;
    loop {
        std::thread::sleep(interval.saturating_sub(before.at.elapsed()));
        let info: Info = get(&socket, "/v1/info")?;
        let now = sample(&socket)?;
        // Room for the 5 lines above the flows and the "more" line.
        let limit = args.limit.or_else(|| if live { terminal_rows().map(|r| r.saturating_sub(6)) } else { None });
        let lines = frame(&info, &before, &now, limit);
        let mut out = std::io::stdout().lock();
        if !live {
            for l in &lines {
                writeln!(out, "{l}")?;
            }
            return Ok(0);
        }
        write!(out, "\x1b[H")?;
        for l in &lines {
            writeln!(out, "{l}\x1b[K")?;
        }
        write!(out, "\x1b[J")?;
        out.flush()?;
        before = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(remote: &str, to: u64, from: u64) -> FlowView {
        FlowView {
            proto: "tcp".into(),
            guest: "192.168.65.2:40000".into(),
            remote: remote.into(),
            host: Some("127.0.0.1:80".into()),
            state: "established".into(),
            bytes_from_guest: from,
            bytes_to_guest: to,
            age_ms: 5000,
            idle_ms: 0,
        }
    }

    #[test]
    fn fastest_first_with_rates() {
        let info: Info = serde_json::from_str(
            r#"{"pid":7,"mode":"run","command":["sh"],"started":0,"uptime_ms":1000,"api":null,
                "subnet":"192.168.65.0/24","gateway":"192.168.65.1","guests":[],"ports":[]}"#,
        )
        .unwrap();
        let t0 = Instant::now();
        let before = Sample {
            at: t0,
            stats: StatsView::default(),
            flows: vec![flow("1.1.1.1:80", 100, 0), flow("2.2.2.2:80", 5 << 20, 0)],
        };
        let now = Sample {
            at: t0 + Duration::from_secs(1),
            stats: StatsView { bytes_out: 3 << 20, ..Default::default() },
            flows: vec![flow("1.1.1.1:80", 100 + (2 << 20), 0), flow("2.2.2.2:80", 5 << 20, 0)],
        };
        let lines = frame(&info, &before, &now, None);
        assert!(lines[1].contains("to guests 3.0 MiB/s"), "{lines:?}");
        let first = lines.iter().position(|l| l.contains("1.1.1.1:80")).unwrap();
        let second = lines.iter().position(|l| l.contains("2.2.2.2:80")).unwrap();
        assert!(first < second, "the busier flow first: {lines:?}");
        assert!(lines[first].contains("2.0 MiB/s"), "{}", lines[first]);
        let limited = frame(&info, &before, &now, Some(1));
        assert_eq!(limited.last().unwrap(), "... and 1 more");
    }
}
