//! The web dashboard (`--web`) end to end: a real `usernet run --web 127.0.0.1:0` with a
//! published port served by an HTTP server in the guest, whose guest makes real traffic
//! (lookups with dig through the gateway, one answered by the gateway itself from
//! `--add-host`, one by the harness's dnsmasq; a request through the gateway's explicit
//! proxy; a slow download from a server on the host's loopback that stays open as a live
//! flow), and a host client on the published port. Then:
//!
//! - with curl: the URL usernet printed on stderr (with the port it bound); 403 and no data
//!   without the token or with a wrong one; `/metrics` with the token, read by the
//!   Prometheus project's own parser (python3-prometheus-client); nothing but GET;
//! - in headless Chromium (Debian's `chromium`): the page loaded with the printed URL,
//!   its DOM dumped (`--dump-dom`) until it shows the guest's address and MAC, the published
//!   port, the download's flow, both DNS log entries with their answers and the proxy
//!   request (bounded: 60 s), then a screenshot, kept as
//!   `target/test-artifacts/web-dashboard.png` (its path is printed).
//!
//! A second test: a `--web` port already taken is exit 125, with one line, before COMMAND
//! runs.
//!
//! Traffic goes to loopback and the guest only; DNS goes to the harness's dnsmasq; Chromium
//! runs with background networking off and every host but 127.0.0.1 unresolvable
//! (`--host-resolver-rules`), so it reaches nothing but the dashboard. (The host's file
//! server may print a reset connection at the end: the slow download is cut when usernet
//! stops.)

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const GUEST_SERVER: &str = r#"
import http.server, socketserver

class Server(http.server.HTTPServer):
    allow_reuse_address = True
    def server_bind(self):
        # No getfqdn(): no name lookups at all.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "guest"
        self.server_port = self.server_address[1]

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from the guest\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

Server(("0.0.0.0", 8080), H).serve_forever()
"#;

/// Reads an exposition on stdin with `prometheus_client.parser`; prints the number of
/// samples, then `name value` for the link bytes and the DNS queries.
const PARSE: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
n = 0
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        n += 1
        if s.name in ("usernet_link_bytes_total", "usernet_dns_queries_total"):
            print(s.name, s.labels.get("direction", "-"), float(s.value))
print("samples", n)
"#;

/// The download that stays open while the dashboard is looked at (rate-limited by curl).
const SLOW_FILE_LEN: usize = 8 << 20;
/// A name the gateway answers itself (`--add-host`).
const LOCAL_NAME: &str = "dashboard.test";
const LOCAL_IP: &str = "10.77.0.7";
/// What the Chromium runs are given (see the module comment): headless, no sandbox (as
/// root), and nothing that reaches beyond the dashboard.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-pings",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
];

fn prerequisites() {
    require_with_prometheus_parser(&["bash", "curl", "dig", "python3", "chromium"]);
}

/// Stops the guest's wait, and usernet with it, whatever happens to the test.
struct Running {
    _run: StopFileRun,
    stderr: Arc<Mutex<String>>,
}

impl Running {
    fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The text of the element `<TAG id="ID" ...>` up to its closing tag (no nesting of TAG
/// inside), tags removed, entities of the page's text decoded, whitespace collapsed.
fn element_text(dom: &str, tag: &str, id: &str) -> String {
    let Some(start) = dom.find(&format!("<{tag} id=\"{id}\"")) else {
        return String::new();
    };
    let rest = &dom[start..];
    let end = rest.find(&format!("</{tag}>")).unwrap_or(rest.len());
    let mut out = String::new();
    let mut in_tag = false;
    for c in rest[..end].chars() {
        match c {
            '<' => {
                in_tag = true;
                out.push(' ');
            }
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Chromium with the flags above and a profile in `dir`, bounded.
fn chromium(dir: &Path, args: &[&str]) -> Output {
    let mut c = Command::new("chromium");
    c.args(CHROMIUM_FLAGS).arg(format!("--user-data-dir={}", dir.join("chromium-profile").display()));
    c.args(args).env("HOME", dir).env("PATH", search_path());
    run_bounded(&mut c, Duration::from_secs(60))
}

/// curl's HTTP status for `url` with `extra` arguments.
fn status_of(url: &str, extra: &[&str]) -> String {
    let mut args = vec!["-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}"];
    args.extend(extra);
    args.push(url);
    run("curl", &args).stdout.trim().to_string()
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dashboard_shows_live_traffic() {
    prerequisites();
    let dns = DnsUpstream::start();
    let (_files, http, _hash) = serve_random_file("web-files", "f", SLOW_FILE_LEN);
    let dir = TempDir::new("web");
    std::fs::write(dir.join("server.py"), GUEST_SERVER).unwrap();
    let published = free_port();
    let d = dir.path().display();
    let script = format!(
        "timeout 120 {py} {d}/server.py & \
         dig +short +tries=1 +time=5 @{GATEWAY_IP} remote.test > {d}/dig.out 2>&1; \
         dig +short +tries=1 +time=5 @{GATEWAY_IP} {LOCAL_NAME} >> {d}/dig.out 2>&1; \
         curl -sS -m 20 -x http://http.docker.internal:3128 -o /dev/null -w '%{{http_code}}\\n' \
              http://{HOST_IP}:{port}/f > {d}/proxy.out 2>&1; \
         timeout 120 curl -sS -m 110 --limit-rate 50k -o /dev/null http://{HOST_IP}:{port}/f & \
         i=0; while [ $i -lt 100 ] && ! (echo > /dev/tcp/127.0.0.1/8080) 2>/dev/null; do sleep 0.1; i=$((i+1)); done; \
         touch {d}/ready; \
         i=0; while [ ! -e {d}/stop ] && [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done",
        py = python().display(),
        port = http.port
    );
    let mut cmd = Usernet::new(&dns)
        .args(&["--web", "127.0.0.1:0"])
        .args(&["--add-host", &format!("{LOCAL_NAME}:{LOCAL_IP}")])
        .args(&["-p", &format!("127.0.0.1:{published}:8080")])
        .command(&["bash", "-c", &script]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("start usernet run");
    let stderr = Arc::new(Mutex::new(String::new()));
    collect_lines(child.stderr.take().unwrap(), stderr.clone());
    let running = Running { _run: StopFileRun { child, stop: dir.join("stop") }, stderr };
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || dir.join("ready").exists()),
        "the guest's traffic did not finish; usernet said: {}",
        running.stderr()
    );

    // The URL, with the port the kernel picked and the token.
    let line = running.stderr().lines().find(|l| l.starts_with("usernet: dashboard at ")).map(str::to_string);
    let url = line.as_deref().and_then(|l| l.strip_prefix("usernet: dashboard at ")).unwrap_or_else(|| {
        panic!("no dashboard URL on stderr: {}", running.stderr());
    });
    let (base, token) = url.split_once("/?token=").unwrap_or_else(|| panic!("{url}"));
    assert!(base.starts_with("http://127.0.0.1:") && !base.ends_with(":0"), "{url}");
    assert_eq!(token.len(), 64, "{url}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{url}");

    // The guest's own traffic went through.
    let answers = read("dig.out");
    assert!(answers.contains(REMOTE_TEST_A) && answers.contains(LOCAL_IP), "dig: {answers}");
    assert_eq!(read("proxy.out").trim(), "200", "the request through the explicit proxy");
    // A host client on the published port, answered by the guest's server.
    let hello = run("curl", &["-sS", "-m", "10", &format!("http://127.0.0.1:{published}/")]);
    assert_eq!(hello.stdout, "hello from the guest\n", "{hello}");

    // (a) Without the token, or with a wrong one: 403, and no data.
    for path in ["/", "/metrics", "/v1/info", "/v1/flows", "/v1/log/dns"] {
        assert_eq!(status_of(&format!("{base}{path}"), &[]), "403", "{path} without the token");
        let wrong = format!("{base}{path}?token={}", "0".repeat(64));
        assert_eq!(status_of(&wrong, &[]), "403", "{path} with a wrong token");
    }
    let denied = run("curl", &["-s", "-m", "10", &format!("{base}/v1/info")]);
    assert!(!denied.stdout.contains(GUEST_IP), "{denied}");
    let bearer = format!("Authorization: Bearer {token}");
    // Read-only: no POST, no capture.
    assert_eq!(status_of(&format!("{base}/v1/ports"), &["-X", "POST", "-H", &bearer, "-d", "{}"]), "405");
    assert_eq!(status_of(&format!("{base}/v1/capture"), &["-H", &bearer]), "404");

    // /metrics with the token, as Prometheus reads it.
    let metrics = run("curl", &["-sS", "-m", "10", &format!("{base}/metrics?token={token}")]);
    assert!(metrics.success(), "{metrics}");
    std::fs::write(dir.join("metrics.txt"), &metrics.stdout).unwrap();
    std::fs::write(dir.join("parse.py"), PARSE).unwrap();
    let parsed = sh(&format!("{} {d}/parse.py < {d}/metrics.txt", python().display()));
    assert!(parsed.success(), "the Prometheus parser rejected the exposition: {parsed}\n{}", metrics.stdout);
    let number = |name: &str, dir: &str| -> f64 {
        parsed
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{name} {dir} ")))
            .map(|v| v.parse::<f64>().unwrap())
            .sum()
    };
    assert!(number("usernet_link_bytes_total", "tx") > 0.0, "{}", parsed.stdout);
    assert!(number("usernet_dns_queries_total", "-") >= 2.0, "{}", parsed.stdout);

    // The API the page reads, with the cookie the page load sets.
    let jar = dir.join("cookies");
    let jar = jar.to_str().unwrap();
    assert_eq!(status_of(&format!("{base}/?token={token}"), &["-c", jar]), "200");
    let info = run("curl", &["-sS", "-m", "10", "-b", jar, &format!("{base}/v1/info")]);
    assert!(info.stdout.contains(GUEST_IP), "{info}");

    // (b) The page in Chromium: dumped until it shows everything (its first poll is at
    // load, then one a second), bounded.
    let remote = format!("{HOST_IP}:{}", http.port);
    let published_at = format!("127.0.0.1:{published}");
    let dnsmasq = dns.addr();
    let mut dom = String::new();
    let mut missing: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let out = chromium(dir.path(), &["--virtual-time-budget=3000", "--dump-dom", url]);
        dom = out.stdout.clone();
        let guests = element_text(&dom, "section", "guests");
        let ports = element_text(&dom, "section", "ports");
        let flows = element_text(&dom, "section", "flows");
        let dns_log = element_text(&dom, "section", "dns");
        let proxy_log = element_text(&dom, "section", "proxy");
        let links = element_text(&dom, "section", "throughput");
        let checks: Vec<(String, bool)> = vec![
            (format!("guest {GUEST_IP} 5a:94:ef:e4:0c:ee"), guests.contains(&format!("{GUEST_IP} 5a:94:ef:e4:0c:ee"))),
            (
                format!("port {published_at} -> {GUEST_IP}:8080"),
                ports.contains(&format!("{published_at} {GUEST_IP}:8080 tcp")),
            ),
            (format!("flow to {remote}"), flows.contains(&format!("tcp {GUEST_IP}:")) && flows.contains(&remote)),
            (
                format!("DNS remote.test from {dnsmasq}"),
                dns_log.contains(&format!("remote.test A {REMOTE_TEST_A} NOERROR {dnsmasq}")),
            ),
            (
                format!("DNS {LOCAL_NAME} from the gateway"),
                dns_log.contains(&format!("{LOCAL_NAME} A {LOCAL_IP} NOERROR gateway")),
            ),
            (
                format!("proxy GET {remote}"),
                proxy_log.contains(&format!("explicit GET {remote} 200 forwarded direct 127.0.0.1:{}", http.port)),
            ),
            ("a link with its rates".into(), links.contains("tap eth0") && links.contains("B/s")),
            ("a graph".into(), dom.contains("<polyline") && dom.contains("class=\"tx\"")),
            ("mode run".into(), element_text(&dom, "b", "mode") == "run"),
        ];
        missing = checks.into_iter().filter(|(_, ok)| !ok).map(|(what, _)| what).collect();
        if missing.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(missing.is_empty(), "the dashboard does not show {missing:?}:\n{dom}\nusernet said: {}", running.stderr());

    // A screenshot, kept, once usernet has sampled the links for the graph ten times (once
    // a second; bounded), so that the graph has a few points.
    let samples = || {
        let h = run("curl", &["-sS", "-m", "10", "-H", &bearer, &format!("{base}/history")]);
        h.stdout.matches("\"t_ms\"").count()
    };
    assert!(wait_until(Duration::from_secs(30), || samples() >= 10), "the graph's samples: {}", samples());
    let artifacts = Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("web-dashboard.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(
        dir.path(),
        &["--virtual-time-budget=8000", "--window-size=1400,1100", &format!("--screenshot={}", png.display()), url],
    );
    let bytes = std::fs::read(&png).unwrap_or_default();
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "no screenshot: {shot}");
    println!("dashboard screenshot: {}", png.display());
    drop(running);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn taken_web_port_is_exit_125_before_anything_runs() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = TempDir::new("web-taken");
    let marker = dir.join("ran");
    let out = Usernet::new(&dns).args(&["--web", &addr.to_string()]).run(&[
        "sh",
        "-c",
        &format!("touch {}", marker.display()),
    ]);
    out.assert_code(125);
    assert!(out.stderr.contains(&format!("cannot serve the dashboard on {addr}: address already in use")), "{out}");
    assert!(!out.stderr.contains("dashboard at"), "{out}");
    assert!(!marker.exists(), "COMMAND ran");
    // A malformed address is a usage error too.
    let out = Usernet::new(&dns).args(&["--web", "nowhere"]).run(&["true"]);
    out.assert_code(125);
    assert!(out.stderr.contains("invalid web address"), "{out}");
}
