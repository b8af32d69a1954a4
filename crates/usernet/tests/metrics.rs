//! `GET /metrics` on the control API end to end: a real `usernet run --api SOCK` whose guest
//! makes real traffic (a download with curl from a Python HTTP server on the host's
//! loopback through the host address, lookups with dig through the gateway to the
//! harness's dnsmasq on 127.0.0.1, a connect to a closed port of the host's loopback), and
//! a host client on a published port. Then the metrics are fetched with curl over the Unix
//! socket, read with the Prometheus project's own text-format parser (Debian's
//! python3-prometheus-client), and the counters must have moved by at least the traffic made.
//!
//! Traffic goes to loopback and the guest only; the DNS upstream is the harness's dnsmasq.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Reads the exposition on stdin with `prometheus_client.parser` and prints every sample
/// as `name US labels US value US type`, labels as `k=v` joined by RS (US and RS are the
/// ASCII unit and record separators, which no label value here holds). A malformed
/// exposition makes the parser raise, and the script fails.
const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
text = sys.stdin.read()
n = 0
for family in text_string_to_metric_families(text):
    if family.type not in ("counter", "gauge"):
        sys.exit("family %s has type %s" % (family.name, family.type))
    if not family.documentation:
        sys.exit("family %s has no HELP" % family.name)
    for s in family.samples:
        labels = "\x1e".join("%s=%s" % kv for kv in sorted(s.labels.items()))
        print("\x1f".join([s.name, labels, repr(float(s.value)), family.type]))
        n += 1
if n == 0:
    sys.exit("no samples")
"#;

/// One sample as the parser read it.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
    kind: String,
}

fn parse_with_prometheus_client(text: &str, dir: &TempDir) -> Vec<Sample> {
    let script = dir.join("parse.py");
    std::fs::write(&script, PARSE).unwrap();
    let input = dir.join("metrics.txt");
    std::fs::write(&input, text).unwrap();
    let out = sh(&format!("{} {} < {}", python().display(), script.display(), input.display()));
    assert!(out.success(), "the Prometheus parser rejected the exposition: {out}\n{text}");
    out.stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split('\x1f').collect();
            assert_eq!(f.len(), 4, "{line:?}");
            let labels = f[1]
                .split('\x1e')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_string(), v.to_string())
                })
                .collect();
            Sample { name: f[0].into(), labels, value: f[2].parse().unwrap(), kind: f[3].into() }
        })
        .collect()
}

/// The sum of the samples named `name` whose labels include `labels`, and how many there were.
fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> (f64, usize) {
    let matching: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .collect();
    (matching.iter().map(|s| s.value).sum(), matching.len())
}

/// Like [`sum`], but there must be at least one such sample.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    let (v, n) = sum(samples, name, labels);
    assert!(n > 0, "no sample {name} with {labels:?}");
    v
}

/// Root, the tools, and the Prometheus parser (panics otherwise: see [`require`]).
fn prerequisites() {
    require_with_prometheus_parser(&["curl", "dig", "python3"]);
}

/// Stops the guest's wait, and usernet with it, whatever happens to the test.
type Running = StopFileRun;

const FILE_LEN: usize = 3 << 20;
/// Names of the harness's dnsmasq, each looked up once (see `DnsUpstream`).
const NAMES: [&str; 5] = ["remote.test", "dual.test", "mail.test", "txt.test", "mx.test"];

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn metrics_count_real_traffic() {
    prerequisites();
    let dns = DnsUpstream::start();
    let (_files, http, _hash) = serve_random_file("metrics-files", "f", FILE_LEN);
    let dir = TempDir::new("metrics");
    let sock = dir.join("api.sock");
    let closed = free_port();
    let published = free_port();
    let d = dir.path().display();
    let lookups: String =
        NAMES.iter().map(|n| format!("dig +short +tries=1 +time=5 @{GATEWAY_IP} {n} >> {d}/dig.out; ")).collect();
    let script = format!(
        "curl -sS -m 60 -o /dev/null -w '%{{size_download}}\\n' http://{HOST_IP}:{port}/f > {d}/curl.out 2>&1; \
         {lookups}\
         curl -sS -m 10 http://{HOST_IP}:{closed}/ > /dev/null 2> {d}/refused.out; echo \"exit $?\" >> {d}/refused.out; \
         touch {d}/ready; \
         i=0; while [ ! -e {d}/stop ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        port = http.port
    );
    let mut cmd = Usernet::new(&dns)
        .arg("--api")
        .arg(&sock)
        .args(&["-p", &format!("127.0.0.1:{published}:8080")])
        .command(&["sh", "-c", &script]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().expect("start usernet run");
    let running = Running { child, stop: dir.join("stop") };
    assert!(wait_until(Duration::from_secs(90), || dir.join("ready").exists()), "the guest's traffic did not finish");
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert_eq!(read("curl.out").trim(), FILE_LEN.to_string(), "the download: {}", read("curl.out"));
    let answers = read("dig.out");
    assert!(answers.contains("203.0.113.10") && answers.contains("203.0.113.25"), "dig: {answers}");
    // curl's exit status 7: it could not connect.
    assert!(read("refused.out").contains("exit 7"), "the connect to a closed port: {}", read("refused.out"));
    // A client on the published port (nothing listens behind it in the guest: it is
    // accepted, then closed, which is all this counts).
    let _ = run("curl", &["-s", "-m", "5", &format!("http://127.0.0.1:{published}/")]);

    let fetch = || {
        run(
            "curl",
            &[
                "-sS",
                "-m",
                "20",
                "--unix-socket",
                sock.to_str().unwrap(),
                "-D",
                dir.join("headers").to_str().unwrap(),
                "http://usernet/metrics",
            ],
        )
    };
    let out = fetch();
    assert!(out.success(), "GET /metrics: {out}");
    let headers = read("headers");
    assert!(headers.starts_with("HTTP/1.1 200"), "{headers}");
    assert!(
        headers.lines().any(|l| l.eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8")),
        "{headers}"
    );
    let text = out.stdout.clone();
    let m = parse_with_prometheus_client(&text, &dir);

    let build = m.iter().find(|s| s.name == "usernet_build_info").expect("usernet_build_info");
    assert_eq!((build.value, build.kind.as_str()), (1.0, "gauge"));
    assert!(!build.labels["version"].is_empty());
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let started = value(&m, "process_start_time_seconds", &[]);
    assert!(started <= now + 1.0 && started > now - 600.0, "started {started}, now {now}");

    // The download went to the guest over its link: at least the file's bytes (plus headers).
    let to_guest = value(&m, "usernet_link_bytes_total", &[("direction", "tx")]);
    let from_guest = value(&m, "usernet_link_bytes_total", &[("direction", "rx")]);
    assert!(to_guest >= FILE_LEN as f64, "tx bytes {to_guest} < {FILE_LEN}\n{text}");
    assert!(from_guest > 0.0, "{text}");
    assert!(value(&m, "usernet_link_frames_total", &[("direction", "tx")]) > 0.0);
    assert!(value(&m, "usernet_link_frames_total", &[("direction", "rx")]) > 0.0);
    assert_eq!(m.iter().find(|s| s.name == "usernet_link_bytes_total").unwrap().kind, "counter");

    // Every lookup reached the upstream, counted under its address.
    let upstream = dns.addr();
    let up = [("upstream", upstream.as_str())];
    let queries = value(&m, "usernet_dns_upstream_queries_total", &up);
    let answered = value(&m, "usernet_dns_upstream_answers_total", &up);
    assert!(queries >= NAMES.len() as f64, "{queries} queries to {upstream}\n{text}");
    assert!(answered >= NAMES.len() as f64, "{answered} answers from {upstream}\n{text}");
    assert!(value(&m, "usernet_dns_queries_total", &[]) >= NAMES.len() as f64);
    // The failures are reported per reason, even at zero.
    assert_eq!(sum(&m, "usernet_dns_upstream_failures_total", &up).1, 4, "{text}");

    assert!(value(&m, "usernet_connect_failures_total", &[("reason", "refused")]) >= 1.0, "{text}");
    // Every reason is reported, even at zero: refused, unreachable, timeout, denied, other.
    assert_eq!(sum(&m, "usernet_connect_failures_total", &[]).1, 5, "{text}");
    // The egress policy's denials: 5 protocols times 3 reasons (here the guard's alone moves
    // nothing: no rule is set and the guest dials nothing on the host's loopback).
    assert_eq!(sum(&m, "usernet_policy_denied_total", &[]), (0.0, 15), "{text}");
    assert_eq!(value(&m, "usernet_published_ports", &[("proto", "tcp")]), 1.0, "{text}");
    let host = format!("127.0.0.1:{published}");
    assert!(value(&m, "usernet_published_connections_accepted_total", &[("host", host.as_str())]) >= 1.0, "{text}");
    assert!(sum(&m, "usernet_flows", &[("proto", "tcp")]).1 >= 4, "{text}");
    assert!(sum(&m, "usernet_dropped_frames_total", &[]).1 >= 6, "{text}");
    assert!(sum(&m, "usernet_proxy_requests_total", &[]).1 >= 3, "{text}");

    let iterations = value(&m, "usernet_event_loop_iterations_total", &[]);
    let busy = value(&m, "usernet_event_loop_busy_seconds_total", &[]);
    assert!(iterations > 0.0 && busy > 0.0, "{text}");
    // Counters only go up: a second scrape sees at least as much.
    let again = parse_with_prometheus_client(&fetch().stdout, &dir);
    assert!(value(&again, "usernet_event_loop_iterations_total", &[]) >= iterations);
    assert!(value(&again, "usernet_link_bytes_total", &[("direction", "tx")]) >= to_guest);
    drop(running);
}
