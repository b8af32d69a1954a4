//! `GET /metrics`: the engine's and the services' counters in Prometheus' text exposition
//! format, version 0.0.4.
//!
//! The format is a few lines per metric family (`# HELP`, `# TYPE`, then one sample per
//! label set) with three escapes, so it is written here ([`TextWriter`]) rather than with a
//! Prometheus client crate: such a crate would bring its own registry of live metric objects,
//! while the counters already exist as plain integers in the engine (one thread, see
//! crates/core/src/engine/metrics.rs) and in the services (atomics, see
//! crates/core/src/services/metrics.rs) and only need to be printed from a copy, once per
//! scrape. The tests of this file check the escapes, and the integration test
//! (crates/usernet/tests/metrics.rs) reads the whole output with the Prometheus project's
//! own Python parser.
//!
//! Names follow Prometheus' conventions: the `usernet_` prefix, `_total` on counters, base
//! units (`_bytes`, `_seconds`); `process_start_time_seconds` has the name every Prometheus
//! client library gives it, so that dashboards find it.

use std::fmt::Write as _;

use hyper::StatusCode;

use usernet_core::engine::control::Command;
use usernet_core::engine::metrics::EngineMetrics;
use usernet_core::policy::Policy;
use usernet_core::ports::Proto;
use usernet_core::services::metrics::UpstreamFailure;

use super::state::{Reply, State, engine_gone};

/// The Content-Type of the text format, version 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type, as its `# TYPE` line says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// Writes metric families in the text exposition format.
#[derive(Default)]
pub struct TextWriter {
    out: String,
}

impl TextWriter {
    /// Starts a family: its `# HELP` and `# TYPE` lines. Every sample of the family must
    /// follow before the next family starts (the format wants a family's lines together).
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) {
        debug_assert!(valid_name(name, true), "bad metric name {name}");
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let _ = writeln!(self.out, "# HELP {name} {}", escape(help, false));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    /// One sample: `name{label="value",...} value`.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                debug_assert!(valid_name(k, false), "bad label name {k}");
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v, true));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    /// A family with one sample and no labels.
    pub fn single(&mut self, name: &str, kind: Kind, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }

    pub fn finish(self) -> String {
        self.out
    }
}

/// Escapes HELP text (backslash, newline) or a label value (also the double quote).
pub fn escape(s: &str, label_value: bool) -> std::borrow::Cow<'_, str> {
    if !s.contains(['\\', '\n', '"']) {
        return s.into();
    }
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if label_value => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

/// A sample value as the format writes it (Go's ParseFloat reads it back): integers without
/// a fraction, `+Inf`, `-Inf` and `NaN` spelt so.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// `[a-zA-Z_:][a-zA-Z0-9_:]*` for metric names, without the colons for label names.
fn valid_name(name: &str, metric: bool) -> bool {
    let ok = |c: char, first: bool| {
        c == '_' || (metric && c == ':') || c.is_ascii_alphabetic() || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// When this process started, in seconds since the Unix epoch, as the kernel keeps it: the
/// start time in clock ticks after boot (`/proc/self/stat`, field 22) plus the boot time
/// (`btime` of `/proc/stat`). None when /proc cannot say.
pub fn process_start_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz <= 0 {
        return None;
    }
    Some(boot + ticks / hz as f64)
}

/// The whole exposition for one scrape; `policy` is the egress policy, whose denials are
/// counted apart from the engine (the proxy counts them too).
pub fn render(m: &EngineMetrics, policy: Option<&Policy>, start_time: Option<f64>) -> String {
    let mut w = TextWriter::default();
    w.family("usernet_build_info", Kind::Gauge, "Always 1; the labels say which usernet this is.");
    w.sample("usernet_build_info", &[("version", env!("CARGO_PKG_VERSION"))], 1.0);
    if let Some(t) = start_time {
        w.single(
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since the Unix epoch, in seconds.",
            t,
        );
    }

    // Per link and direction.
    let links: Vec<(String, &_)> = m.links.iter().map(|l| (l.index.to_string(), l)).collect();
    w.family(
        "usernet_link_frames_total",
        Kind::Counter,
        "Frames carried by each guest link, by direction (rx: from the guest).",
    );
    for (index, l) in &links {
        let c = &l.counters;
        for (dir, v) in [("rx", c.rx_frames), ("tx", c.tx_frames)] {
            w.sample("usernet_link_frames_total", &[("link", index), ("name", &l.name), ("direction", dir)], v as f64);
        }
    }
    w.family(
        "usernet_link_bytes_total",
        Kind::Counter,
        "Bytes of the frames carried by each guest link, by direction (rx: from the guest).",
    );
    for (index, l) in &links {
        let c = &l.counters;
        for (dir, v) in [("rx", c.rx_bytes), ("tx", c.tx_bytes)] {
            w.sample("usernet_link_bytes_total", &[("link", index), ("name", &l.name), ("direction", dir)], v as f64);
        }
    }
    w.single("usernet_links", Kind::Gauge, "Guest links attached now.", m.links.len() as f64);

    w.family("usernet_dropped_frames_total", Kind::Counter, "Frames dropped by the engine, by direction and reason.");
    for (why, v) in m.counters.drops() {
        w.sample("usernet_dropped_frames_total", &[("direction", why.direction()), ("reason", why.as_str())], v as f64);
    }

    w.family("usernet_flows", Kind::Gauge, "Guest flows now, by protocol and state.");
    for ((proto, state), v) in &m.flows {
        w.sample("usernet_flows", &[("proto", proto), ("state", state)], *v as f64);
    }

    w.family(
        "usernet_connect_failures_total",
        Kind::Counter,
        "Guest TCP connects that failed, by reason (as the guest was told: RST or ICMP unreachable).",
    );
    for (why, v) in m.counters.connect_failures() {
        w.sample("usernet_connect_failures_total", &[("reason", why.as_str())], v as f64);
    }

    w.family(
        "usernet_tcp_resent_bytes_total",
        Kind::Counter,
        "TCP data sent to guests again, by cause (sack: only what the guest's SACK blocks showed \
         missing; dup_acks, timeout: everything from the first unacknowledged byte; probe: the \
         last byte, a tail-loss probe, and for a guest without SACK everything from the byte \
         its answer asked for).",
    );
    for (cause, v) in m.counters.resent_bytes() {
        w.sample("usernet_tcp_resent_bytes_total", &[("cause", cause.as_str())], v as f64);
    }

    w.family(
        "usernet_limit_reached_total",
        Kind::Counter,
        "Times a guest reached one of usernet's bounds, by limit (see `usernet run --help`).",
    );
    for (limit, v) in m.counters.limits() {
        w.sample("usernet_limit_reached_total", &[("limit", limit.as_str())], v as f64);
    }
    if let Some(s) = &m.services {
        for (limit, v) in &s.limits {
            w.sample("usernet_limit_reached_total", &[("limit", limit.as_str())], *v as f64);
        }
    }
    if let Some(p) = policy {
        w.family(
            "usernet_policy_denied_total",
            Kind::Counter,
            "New guest flows and proxy requests the egress policy denied, by protocol and reason \
             (deny_rule, not_allowed, loopback: the host's loopback guard).",
        );
        for (via, why, v) in p.denied_counts() {
            w.sample("usernet_policy_denied_total", &[("proto", via.as_str()), ("reason", why.as_str())], v as f64);
        }
        w.single(
            "usernet_policy_learnt_addresses",
            Kind::Gauge,
            "Addresses allowed now because DNS answers for an --allow-domain name gave them.",
            p.learnt().len() as f64,
        );
    }

    w.family("usernet_published_ports", Kind::Gauge, "Published ports (host sockets listening), by protocol.");
    for proto in [Proto::Tcp, Proto::Udp] {
        let n = m.listeners.iter().filter(|l| l.proto == proto).count();
        w.sample("usernet_published_ports", &[("proto", proto.as_str())], n as f64);
    }
    w.family(
        "usernet_published_connections_accepted_total",
        Kind::Counter,
        "TCP connections accepted on each published port (host address and port).",
    );
    for l in m.listeners.iter().filter(|l| l.proto == Proto::Tcp) {
        let (host, guest) = (l.host.to_string(), l.guest.to_string());
        w.sample(
            "usernet_published_connections_accepted_total",
            &[("host", &host), ("guest", &guest), ("proto", "tcp")],
            l.accepted as f64,
        );
    }

    w.single(
        "usernet_event_loop_iterations_total",
        Kind::Counter,
        "Rounds of the engine's event loop.",
        m.loop_counters.iterations as f64,
    );
    w.single(
        "usernet_event_loop_busy_seconds_total",
        Kind::Counter,
        "Time the engine's event loop spent working (not waiting for events), in seconds.",
        m.loop_counters.busy_nanos as f64 / 1e9,
    );

    if let Some(s) = &m.services {
        w.single(
            "usernet_dns_queries_total",
            Kind::Counter,
            "DNS queries from guests to the gateway (UDP and TCP).",
            s.dns_queries as f64,
        );
        w.single(
            "usernet_dns_local_answers_total",
            Kind::Counter,
            "DNS queries the gateway answered itself (its own names, /etc/hosts, errors).",
            s.dns_local as f64,
        );
        let upstreams: Vec<(String, _)> = s.upstreams.iter().map(|(a, c)| (a.to_string(), c)).collect();
        w.family(
            "usernet_dns_upstream_queries_total",
            Kind::Counter,
            "DNS queries forwarded to each upstream server (retries and TCP retries included).",
        );
        for (up, c) in &upstreams {
            w.sample("usernet_dns_upstream_queries_total", &[("upstream", up)], c.queries as f64);
        }
        w.family(
            "usernet_dns_upstream_answers_total",
            Kind::Counter,
            "Answers from each upstream server that went to the guest (any but SERVFAIL and REFUSED).",
        );
        for (up, c) in &upstreams {
            w.sample("usernet_dns_upstream_answers_total", &[("upstream", up)], c.answers as f64);
        }
        w.family(
            "usernet_dns_upstream_failures_total",
            Kind::Counter,
            "Queries an upstream server did not answer usably, by reason.",
        );
        for (up, c) in &upstreams {
            for why in UpstreamFailure::ALL {
                w.sample(
                    "usernet_dns_upstream_failures_total",
                    &[("upstream", up), ("reason", why.as_str())],
                    c.failures[why as usize] as f64,
                );
            }
        }
        w.family(
            "usernet_proxy_requests_total",
            Kind::Counter,
            "Requests to the HTTP proxy (and intercepted TLS connections), by outcome.",
        );
        for (outcome, v) in &s.proxy {
            w.sample("usernet_proxy_requests_total", &[("outcome", outcome.as_str())], *v as f64);
        }
    }
    w.finish()
}

/// `GET /metrics`.
pub async fn metrics(state: &State) -> Reply {
    match state.control.ask(|reply| Command::Metrics { reply }).await {
        Some(m) => Reply {
            status: StatusCode::OK,
            content_type: Some(CONTENT_TYPE),
            allow: None,
            body: render(&m, Some(&state.cfg.policy), process_start_time()).into_bytes(),
        },
        None => engine_gone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut w = TextWriter::default();
        w.family("usernet_test_total", Kind::Counter, "A help text with a \\ and a\nnewline \"quoted\".");
        w.sample("usernet_test_total", &[("a", "back\\slash"), ("b", "a \"quote\""), ("c", "new\nline")], 3.0);
        w.sample("usernet_test_total", &[], 0.5);
        assert_eq!(
            w.finish(),
            "# HELP usernet_test_total A help text with a \\\\ and a\\nnewline \"quoted\".\n\
             # TYPE usernet_test_total counter\n\
             usernet_test_total{a=\"back\\\\slash\",b=\"a \\\"quote\\\"\",c=\"new\\nline\"} 3\n\
             usernet_test_total 0.5\n"
        );
    }

    #[test]
    fn plain_values_are_borrowed_unchanged() {
        assert!(matches!(escape("127.0.0.1:53", true), std::borrow::Cow::Borrowed("127.0.0.1:53")));
        assert_eq!(escape("a\\\"b\n", true), "a\\\\\\\"b\\n");
        // HELP text keeps its quotes.
        assert_eq!(escape("a\\\"b\n", false), "a\\\\\"b\\n");
    }

    #[test]
    fn values() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(18446744073.0), "18446744073");
        assert_eq!(format_value(0.25), "0.25");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(1e20), "100000000000000000000");
    }

    #[test]
    fn names() {
        assert!(valid_name("usernet_link_bytes_total", true));
        assert!(valid_name("a:b", true));
        assert!(!valid_name("a:b", false));
        assert!(!valid_name("0abc", true));
        assert!(!valid_name("", false));
        assert!(!valid_name("a-b", false));
    }

    #[test]
    fn start_time_is_in_the_past() {
        let t = process_start_time().expect("/proc says when this process started");
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(t <= now + 1.0 && t > now - 86400.0 * 365.0, "start {t}, now {now}");
    }
}
