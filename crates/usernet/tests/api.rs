//! The control API (`--api`) end to end: a real `usernet run` with a real server in the
//! guest, driven from the host with curl over the Unix socket (the gvisor-tap-vsock
//! endpoints, as Podman and Lima call them), with `usernet port ls|add|rm`, and with real
//! clients on the published ports. DNS records added through the API are resolved inside
//! the guest with dig.
//!
//! The guest runs an HTTP server on port 80 and a UDP echo on port 5353 (python, no name
//! lookups), and a small loop that runs the shell script the test drops into its directory
//! (`cmd`), writing `cmd.out`, until the test drops `stop`. Everything is bounded; traffic
//! goes to loopback and the guest only; the DNS upstream is the harness's dnsmasq.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const GUEST_SERVER: &str = r#"
import http.server, socket, socketserver, sys, threading

class Server(http.server.HTTPServer):
    allow_reuse_address = True
    def server_bind(self):
        # No getfqdn(): no name lookups at all.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "guest"
        self.server_port = self.server_address[1]

class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello from guest\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

def udp_echo():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", 5353))
    ready.set()
    while True:
        data, peer = s.recvfrom(65535)
        s.sendto(data, peer)

ready = threading.Event()
threading.Thread(target=udp_echo, daemon=True).start()
httpd = Server(("0.0.0.0", 80), H)
ready.wait(10)
print("READY", flush=True)
httpd.serve_forever()
"#;

/// A `usernet run --api SOCK` with the guest servers up.
struct Guest {
    dir: TempDir,
    sock: PathBuf,
    child: Child,
    _dns: DnsUpstream,
}

impl Guest {
    fn start() -> Guest {
        let dns = DnsUpstream::start();
        let dir = TempDir::new("api");
        let sock = dir.join("api.sock");
        std::fs::write(dir.join("server.py"), GUEST_SERVER).unwrap();
        let d = dir.path().display();
        let script = format!(
            "timeout 90 {py} {d}/server.py & P=$!; \
             i=0; while [ ! -e {d}/stop ] && [ $i -lt 900 ]; do \
               if [ -e {d}/cmd ]; then sh {d}/cmd > {d}/cmd.tmp 2>&1; mv {d}/cmd.tmp {d}/cmd.out; rm -f {d}/cmd; fi; \
               sleep 0.1; i=$((i+1)); \
             done; kill $P",
            py = python().display()
        );
        let mut cmd = Usernet::new(&dns).arg("--api").arg(&sock).command(&["sh", "-c", &script]);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).process_group(0);
        let mut child = cmd.spawn().expect("start usernet run");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let guest = Guest { dir, sock, child, _dns: dns };
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) if line.trim() == "READY" => {}
            other => panic!("guest server not ready: {other:?}"),
        }
        assert!(guest.sock.exists(), "no API socket");
        guest
    }

    /// curl over the API socket: (HTTP status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut args = vec![
            "-s".to_string(),
            "-m".into(),
            "20".into(),
            "--unix-socket".into(),
            self.sock.display().to_string(),
            "-X".into(),
            method.into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ];
        if let Some(b) = body {
            args.push("-d".into());
            args.push(b.into());
        }
        args.push(format!("http://usernet{path}"));
        let out = run("curl", &args);
        let (body, code) = out.stdout.rsplit_once('\n').unwrap_or(("", ""));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `usernet port ARGS --api SOCK`.
    fn port(&self, args: &[&str]) -> Output {
        let mut all: Vec<String> = vec!["port".into()];
        all.extend(args.iter().map(|s| s.to_string()));
        all.push("--api".into());
        all.push(self.sock.display().to_string());
        run(usernet_bin().to_str().unwrap(), &all)
    }

    /// Runs a shell script inside the guest and returns its output.
    fn exec(&self, script: &str) -> String {
        let out = self.dir.join("cmd.out");
        let _ = std::fs::remove_file(&out);
        let tmp = self.dir.join("cmd.new");
        std::fs::write(&tmp, script).unwrap();
        std::fs::rename(&tmp, self.dir.join("cmd")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&out) {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("guest command did not finish: {script}");
    }

    /// Stops the guest and waits for usernet to exit.
    fn stop(mut self) -> i32 {
        std::fs::write(self.dir.join("stop"), b"").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("usernet did not exit");
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("stop"), b"");
        if let Ok(None) = self.child.try_wait() {
            std::thread::sleep(Duration::from_millis(500));
            if let Ok(None) = self.child.try_wait() {
                // SAFETY: kill(2) on our own child's process group.
                unsafe {
                    libc::kill(-(self.child.id() as i32), libc::SIGKILL);
                }
                let _ = self.child.wait();
            }
        }
    }
}

/// GET http://127.0.0.1:PORT/ with curl: the body, or None when it failed.
fn http_get(host: &str, port: u16) -> Option<String> {
    let out = run("curl", &["-s", "-m", "10", &format!("http://{host}:{port}/")]);
    out.success().then_some(out.stdout)
}

fn udp_echo(port: u16) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut buf = [0u8; 64];
    for _ in 0..10 {
        s.send_to(b"ping-api", ("127.0.0.1", port)).unwrap();
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return Some(buf[..n].to_vec());
        }
    }
    None
}

/// Root and the tools of these tests (panics otherwise: see [`require`]).
fn prerequisites() {
    let mut t = BASE_TOOLS.to_vec();
    t.extend(["curl", "dig"]);
    require(&t);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn gvproxy_expose_unexpose_all() {
    prerequisites();
    let g = Guest::start();
    let port = free_port();
    let local = format!("127.0.0.1:{port}");

    let (code, body) = g.curl(
        "POST",
        "/services/forwarder/expose",
        Some(&format!(r#"{{"local":"{local}","remote":"192.168.65.2:80","protocol":"tcp"}}"#)),
    );
    assert_eq!((code, body.as_str()), (200, ""));
    assert_eq!(http_get("127.0.0.1", port).as_deref(), Some("hello from guest\n"));

    // UDP, remote without its IP (the first guest).
    let udp_port = free_port();
    let (code, _) = g.curl(
        "POST",
        "/services/forwarder/expose",
        Some(&format!(r#"{{"local":"127.0.0.1:{udp_port}","remote":":5353","protocol":"udp"}}"#)),
    );
    assert_eq!(code, 200);
    assert_eq!(udp_echo(udp_port).as_deref(), Some(&b"ping-api"[..]));

    let (code, all) = g.curl("GET", "/services/forwarder/all", None);
    assert_eq!(code, 200);
    let all: serde_json::Value = serde_json::from_str(&all).unwrap();
    let mut expected = vec![
        serde_json::json!({"local": local, "remote": "192.168.65.2:80", "protocol": "tcp"}),
        serde_json::json!({"local": format!("127.0.0.1:{udp_port}"), "remote": "192.168.65.2:5353", "protocol": "udp"}),
    ];
    expected.sort_by_key(|v| v["local"].as_str().unwrap().to_string());
    assert_eq!(all, serde_json::Value::Array(expected));

    // Already exposed; port taken by someone else.
    let (code, body) =
        g.curl("POST", "/services/forwarder/expose", Some(&format!(r#"{{"local":"{local}","remote":":80"}}"#)));
    assert_eq!((code, body.trim()), (500, format!("proxy already running for tcp on {local}").as_str()));
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let (code, body) = g.curl(
        "POST",
        "/services/forwarder/expose",
        Some(&format!(r#"{{"local":"127.0.0.1:{taken_port}","remote":":80"}}"#)),
    );
    assert_eq!(code, 500);
    assert_eq!(body.trim(), format!("Bind for 127.0.0.1:{taken_port} failed: port is already allocated"));

    // Unexpose: the port is closed again.
    let (code, _) =
        g.curl("POST", "/services/forwarder/unexpose", Some(&format!(r#"{{"local":"{local}","protocol":"tcp"}}"#)));
    assert_eq!(code, 200);
    assert_eq!(http_get("127.0.0.1", port), None);
    TcpListener::bind(("127.0.0.1", port)).expect("port free again after unexpose");
    let (code, body) =
        g.curl("POST", "/services/forwarder/unexpose", Some(&format!(r#"{{"local":"{local}","protocol":"tcp"}}"#)));
    assert_eq!((code, body.trim()), (500, "proxy not found"));

    let (code, stats) = g.curl("GET", "/stats", None);
    assert_eq!(code, 200);
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["BytesReceived"].as_u64().unwrap() > 0, "{stats}");

    let sock = g.sock.clone();
    assert_eq!(g.stop(), 0);
    assert!(!sock.exists(), "API socket left behind");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dns_records_added_through_the_api_resolve_in_the_guest() {
    prerequisites();
    let g = Guest::start();
    let (code, _) = g.curl(
        "POST",
        "/services/dns/add",
        Some(r#"{"Name":"apps.test.","Records":[{"Name":"web","IP":"192.168.65.77"}]}"#),
    );
    assert_eq!(code, 200);
    // host-gateway is both of the host's addresses, as with --add-host.
    let (code, body) = g.curl("POST", "/v1/dns", Some(r#"{"name":"db.local.test","ip":"host-gateway"}"#));
    assert_eq!(
        (code, body.trim()),
        (201, r#"{"name":"db.local.test","ip":"192.168.65.254","ips":["192.168.65.254","fd75:7365:726e::254"]}"#)
    );
    let out = g.exec(
        "dig +short +time=3 +tries=2 @192.168.65.1 web.apps.test A; \
         dig +short +time=3 +tries=2 @192.168.65.1 db.local.test A; \
         dig +short +time=3 +tries=2 @192.168.65.1 db.local.test AAAA",
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["192.168.65.77", "192.168.65.254", "fd75:7365:726e::254"],
        "{out}"
    );

    // AAAA records: a name of its own, and one next to the A record above.
    let (code, body) = g.curl("POST", "/v1/dns", Some(r#"{"name":"six.local.test","ip":"fd00::5"}"#));
    assert_eq!((code, body.trim()), (201, r#"{"name":"six.local.test","ip":"fd00::5"}"#));
    let (code, _) = g.curl("POST", "/v1/dns", Some(r#"{"name":"db.local.test","ip":"fd00::6"}"#));
    assert_eq!(code, 201);
    let (code, body) = g.curl("POST", "/v1/dns", Some(r#"{"name":"bad.local.test","ip":"fd00::6::7"}"#));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains(r#"invalid IP address: \"fd00::6::7\""#), "{body}");
    let out = g.exec(
        "dig +short +time=3 +tries=2 @192.168.65.1 six.local.test AAAA; \
         dig +short +time=3 +tries=2 @192.168.65.1 db.local.test AAAA; \
         dig +short +time=3 +tries=2 @192.168.65.1 db.local.test A",
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["fd00::5", "fd00::6", "192.168.65.254"], "{out}");
    let (code, list) = g.curl("GET", "/v1/dns", None);
    assert_eq!(code, 200);
    assert!(
        list.contains(r#"{"name":"db.local.test","ip":"192.168.65.254"},{"name":"db.local.test","ip":"fd00::6"}"#),
        "{list}"
    );
    let (code, body) = g.curl("GET", "/v1/dns/db.local.test", None);
    assert_eq!(
        (code, body.trim()),
        (200, r#"{"name":"db.local.test","ip":"192.168.65.254","ips":["192.168.65.254","fd00::6"]}"#)
    );

    // DELETE takes both records of the name.
    let (code, _) = g.curl("DELETE", "/v1/dns/db.local.test", None);
    assert_eq!(code, 204);
    let out = g.exec(
        "dig +short +time=3 +tries=2 @192.168.65.1 db.local.test AAAA; \
         dig +short +time=3 +tries=2 @192.168.65.1 db.local.test A; \
         dig +short +time=3 +tries=2 @192.168.65.1 six.local.test AAAA",
    );
    assert_eq!(out.split_whitespace().collect::<Vec<_>>(), ["fd00::5"], "{out}");
    let (code, _) = g.curl("DELETE", "/v1/dns/six.local.test", None);
    assert_eq!(code, 204);
    let (code, zones) = g.curl("GET", "/services/dns/all", None);
    assert_eq!(code, 200);
    assert!(zones.contains(r#"{"Name":"web","IP":"192.168.65.77"}"#), "{zones}");
    let zones: serde_json::Value = serde_json::from_str(&zones).unwrap();
    assert!(!zones.as_array().unwrap().iter().any(|z| z["Name"] == "local.test."), "{zones}");
    assert_eq!(g.stop(), 0);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn port_cli() {
    prerequisites();
    let g = Guest::start();
    g.port(&["ls"]).assert_ok();
    assert_eq!(g.port(&["ls"]).stdout, "");

    // A picked port, learnt from the output.
    let out = g.port(&["add", "127.0.0.1::80"]);
    out.assert_ok();
    let line = out.stdout.trim().to_string();
    let picked: u16 = line
        .strip_prefix("80/tcp -> 127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output: {out}"));
    assert_eq!(http_get("127.0.0.1", picked).as_deref(), Some("hello from guest\n"));

    // A fixed port on every address, IPv4 and IPv6.
    let port = free_port();
    let out = g.port(&["add", &format!("{port}:80")]);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("80/tcp -> 0.0.0.0:{port}")), "{out}");
    assert_eq!(http_get("127.0.0.1", port).as_deref(), Some("hello from guest\n"));
    if out.stdout.contains(&format!("80/tcp -> [::]:{port}")) {
        assert_eq!(http_get("[::1]", port).as_deref(), Some("hello from guest\n"));
    }
    let udp = free_port();
    g.port(&["add", &format!("127.0.0.1:{udp}:5353/udp")]).assert_ok();
    assert_eq!(udp_echo(udp).as_deref(), Some(&b"ping-api"[..]));

    let ls = g.port(&["ls"]);
    ls.assert_ok();
    assert!(ls.stdout.contains(&format!("80/tcp -> 127.0.0.1:{picked}\n")), "{ls}");
    assert!(ls.stdout.contains(&format!("5353/udp -> 127.0.0.1:{udp}\n")), "{ls}");

    // Errors: one line, 125, Docker's words.
    let out = g.port(&["add", &format!("{port}:80")]);
    out.assert_code(125);
    assert!(out.stderr.contains("port is already allocated"), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
    let out = g.port(&["add", "8080:80/xyz"]);
    out.assert_code(125);
    assert_eq!(out.stderr.trim(), "usernet: invalid proto: xyz");
    g.port(&["rm", "1"]).assert_code(125);

    // Remove.
    g.port(&["rm", &format!("127.0.0.1:{picked}")]).assert_ok();
    assert_eq!(http_get("127.0.0.1", picked), None);
    g.port(&["rm", &port.to_string(), &format!("{udp}/udp")]).assert_ok();
    assert_eq!(g.port(&["ls"]).stdout, "");
    TcpListener::bind(("127.0.0.1", port)).expect("port free again after rm");

    assert_eq!(g.stop(), 0);
    // No usernet to talk to any more: one line, 125.
    let out = run(
        usernet_bin().to_str().unwrap(),
        &["port", "ls", "--api", Path::new("/nonexistent/api.sock").to_str().unwrap()],
    );
    out.assert_code(125);
    assert!(out.stderr.starts_with("usernet: cannot connect to the usernet API"), "{out}");
}
