//! The egress policy (issue 14) end to end: `usernet run` with `--deny`, `--allow`,
//! `--allow-domain` and the policy changed through the API while the guest runs. The
//! destinations are remote-host namespaces of the test's own (HTTP and UDP echo servers);
//! a denied TCP connect is refused at once (curl's exit status 7, never a timeout's 28), a
//! denied UDP socket gets EHOSTUNREACH (the ICMP administratively prohibited usernet sends),
//! the explicit proxy answers 403, and what is allowed still works (sha256 of a download).

mod common;

use common::*;

/// `udp IP PORT`: one datagram from the guest on a connected socket; prints `UDP <reply>`,
/// `UDP <errno name>` (EHOSTUNREACH for an ICMP administratively prohibited) or `UDP timeout`.
fn udp_fn() -> String {
    format!(
        r#"udp() {{ {py} -c '
import errno, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
try:
    s.send(b"hello")
    print("UDP", s.recv(100).decode())
except OSError as e:
    print("UDP", errno.errorcode.get(e.errno, "timeout") if e.errno else "timeout")
' "$1" "$2"; }}"#,
        py = python().display()
    )
}

/// `fetch URL`: prints `curl=<exit status>` and, on success, the body's sha256.
const GET_FN: &str = r#"fetch() { curl -sSf --connect-timeout 8 -m 20 -o /tmp/.policy-body.$$ "$1"; rc=$?; if [ $rc = 0 ]; then echo "curl=0 $(sha256sum < /tmp/.policy-body.$$ | cut -d' ' -f1)"; else echo "curl=$rc"; fi; rm -f /tmp/.policy-body.$$; }"#;

/// A remote host serving one random file `f` over HTTP and echoing UDP.
struct Remote {
    host: RemoteHost,
    _dir: TempDir,
    http: Server,
    udp: Server,
    hash: String,
}

impl Remote {
    fn start(tag: &str) -> Remote {
        let host = RemoteHost::new();
        let dir = TempDir::new(tag);
        write_random_file(&dir.join("f"), 256 * 1024);
        let hash = sha256_file(&dir.join("f"));
        let http = Server::start_in(&host, ServerKind::Http, Some(dir.path()));
        let udp = Server::start_in(&host, ServerKind::UdpEcho, None);
        Remote { host, _dir: dir, http, udp, hash }
    }

    fn ip(&self) -> &str {
        &self.host.ip
    }

    fn url(&self) -> String {
        format!("http://{}:{}/f", self.host.ip, self.http.port)
    }
}

/// Lines of `out`'s stderr that say the policy denied something `needle` names.
fn denials_logged(out: &Output, needle: &str) -> usize {
    out.stderr.lines().filter(|l| l.contains("denied guest") && l.contains(needle)).count()
}

/// `--deny` of one remote host: TCP refused at once (twice, logged once), UDP gets
/// EHOSTUNREACH, ping a "Packet filtered" (as root), the explicit proxy a 403 for plain
/// HTTP and for CONNECT; another remote host works as before; `/metrics` counts the
/// denials by protocol.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn deny_refuses_at_once_and_the_rest_still_works() {
    require(&["ip", "dnsmasq", "python3", "curl", "sha256sum"]);
    let dns = DnsUpstream::start();
    let (denied, other) = (Remote::start("deny-a"), Remote::start("deny-b"));
    let dir = TempDir::new("policy-api");
    let sock = dir.join("api.sock");
    let ping = if test_user().is_none() && have_tool("ping") {
        format!(
            "{} -c 1 -W 3 {} 2>&1 | grep -o 'Packet filtered' | head -1 || true; echo ping-done",
            ping_cmd(),
            denied.ip()
        )
    } else {
        "echo 'Packet filtered'; echo ping-done".to_string()
    };
    let out = Usernet::new(&dns).arg("--deny").arg(denied.ip()).arg("--api").arg(&sock).sh(&format!(
        "{udp_fn}
         {GET_FN}
         fetch {a}; fetch {a}; fetch {b}
         udp {aip} {au}; udp {bip} {bu}
         {ping}
         curl -s -m 10 -o /dev/null -w 'proxy %{{http_code}}\\n' -x http://http.docker.internal:3128 {a}
         curl -s -m 10 -x http://http.docker.internal:3128 {a}
         curl -s -m 10 -p -o /dev/null -w 'connect %{{http_connect}}\\n' -x http://http.docker.internal:3128 {a}
         curl -s -m 10 --unix-socket {sock} http://x/metrics | grep '^usernet_policy_denied_total' | grep -v ' 0$'",
        udp_fn = udp_fn(),
        a = denied.url(),
        b = other.url(),
        aip = denied.ip(),
        au = denied.udp.port,
        bip = other.ip(),
        bu = other.udp.port,
        sock = sock.display(),
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let want_b = format!("curl=0 {}", other.hash);
    let body =
        format!("usernet: {}:{} is denied by the egress policy: a --deny rule matches", denied.ip(), denied.http.port);
    assert_eq!(
        lines[..9],
        [
            "curl=7",
            "curl=7",
            want_b.as_str(),
            "UDP EHOSTUNREACH",
            "UDP hello",
            "Packet filtered",
            "ping-done",
            "proxy 403",
            body.as_str(),
        ],
        "{out}"
    );
    assert_eq!(lines.get(9).copied(), Some("connect 403"), "{out}");
    let metrics = &lines[10..];
    for (proto, n) in [("tcp", 2), ("udp", 1), ("proxy", 3)] {
        let want = format!("usernet_policy_denied_total{{proto=\"{proto}\",reason=\"deny_rule\"}} {n}");
        assert!(metrics.contains(&want.as_str()), "{want}\n{out}");
    }
    assert_eq!(denials_logged(&out, &format!("tcp from {GUEST_IP}")), 1, "two connects, one line\n{out}");
    assert_eq!(denials_logged(&out, "udp from"), 1, "{out}");
    assert_eq!(denials_logged(&out, "proxy from"), 1, "the proxy's three: one destination, one line\n{out}");
}

/// `--allow` of one remote host: it works; another remote host, the host address (the
/// host's 127.0.0.1, which no rule allows) and UDP elsewhere are denied; the gateway's DNS
/// still answers.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn allow_admits_only_what_it_names() {
    require(&["ip", "dnsmasq", "python3", "curl", "sha256sum"]);
    let dns = DnsUpstream::start();
    let (allowed, other) = (Remote::start("allow-a"), Remote::start("allow-b"));
    let (_dir, host_http, _) = serve_random_file("allow-host", "f", 1024);
    let out = Usernet::new(&dns).arg("--allow").arg(format!("{}/32", allowed.ip())).sh(&format!(
        "{udp_fn}
         {GET_FN}
         fetch {a}; fetch {b}; fetch http://host.docker.internal:{hp}/f
         udp {aip} {au}; udp {bip} {bu}
         getent hosts remote.test",
        udp_fn = udp_fn(),
        a = allowed.url(),
        b = other.url(),
        hp = host_http.port,
        aip = allowed.ip(),
        au = allowed.udp.port,
        bip = other.ip(),
        bu = other.udp.port,
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    let want_a = format!("curl=0 {}", allowed.hash);
    assert_eq!(lines[..5], [want_a.as_str(), "curl=7", "curl=7", "UDP hello", "UDP EHOSTUNREACH"], "{out}");
    assert!(lines.get(5).is_some_and(|l| l.starts_with(REMOTE_TEST_A)), "the gateway's DNS answers\n{out}");
    assert_eq!(denials_logged(&out, &format!(" to {HOST_IP}:{}", host_http.port)), 1, "{out}");
}

/// `--allow-domain ok.test` (a dnsmasq of the test's own names ok.test and other.test after
/// two remote hosts): the first remote host's address is denied until the guest looks
/// ok.test up through the gateway, then allowed; other.test resolves but is denied; the
/// explicit proxy serves ok.test and refuses other.test.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn allow_domain_follows_the_gateways_answers() {
    require(&["ip", "dnsmasq", "python3", "curl", "sha256sum"]);
    let (ok, other) = (Remote::start("domain-a"), Remote::start("domain-b"));
    let dns = DnsUpstream::start_with(&[format!("www.ok.test,{}", ok.ip()), format!("other.test,{}", other.ip())]);
    let (p, q) = (ok.http.port, other.http.port);
    let out = Usernet::new(&dns).arg("--allow-domain").arg("ok.test").sh(&format!(
        "{GET_FN}
         fetch {a}
         fetch http://www.ok.test:{p}/f
         fetch {a}
         fetch http://other.test:{q}/f
         curl -s -m 10 -o /dev/null -w 'proxy %{{http_code}}\\n' -x http://http.docker.internal:3128 http://www.ok.test:{p}/f
         curl -s -m 10 -o /dev/null -w 'proxy %{{http_code}}\\n' -x http://http.docker.internal:3128 http://other.test:{q}/f",
        a = ok.url(),
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let want = format!("curl=0 {}", ok.hash);
    assert_eq!(
        lines,
        ["curl=7", want.as_str(), want.as_str(), "curl=7", "proxy 200", "proxy 403"],
        "before the lookup, denied; after it, allowed\n{out}"
    );
}

/// The policy changed through the API (`PUT /v1/policy`, from inside the guest, which
/// shares the host's files) applies to the next connection; `GET` shows it; an empty set
/// opens everything again.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn policy_changes_at_run_time_through_the_api() {
    require(&["ip", "dnsmasq", "python3", "curl", "sha256sum"]);
    let dns = DnsUpstream::start();
    let (a, b) = (Remote::start("api-a"), Remote::start("api-b"));
    let dir = TempDir::new("policy-put");
    let sock = dir.join("api.sock");
    let api = format!("curl -sS -m 10 --unix-socket {} http://x/v1/policy", sock.display());
    let out = Usernet::new(&dns).arg("--api").arg(&sock).sh(&format!(
        "{GET_FN}
         i=0; while [ ! -S {sock} ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
         fetch {ua}
         {api} -X PUT -d '{{\"deny\":[\"{aip}\"]}}' >/dev/null
         {api}
         fetch {ua}; fetch {ub}
         {api} -X PUT -d '{{}}' >/dev/null
         fetch {ua}",
        sock = sock.display(),
        ua = a.url(),
        ub = b.url(),
        aip = a.ip(),
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let (want_a, want_b) = (format!("curl=0 {}", a.hash), format!("curl=0 {}", b.hash));
    let shown = format!(r#"{{"allow":[],"deny":["{}"],"allow_domains":[],"default":"allow","learnt":[]}}"#, a.ip());
    assert_eq!(lines, [want_a.as_str(), shown.as_str(), "curl=7", want_b.as_str(), want_a.as_str()], "{out}");
}

/// A guest server that answers `hello` to every connection on port 80.
const HELLO_SERVER: &str = r#"
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 80))
s.listen(16)
print("READY", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello\n")
    c.close()
"#;

/// A client of `HOST:PORT`: prints the first line it reads, or the error.
const HELLO_CLIENT: &str = r#"
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    data = c.recv(100)
    print(data.decode().strip() if data else "closed")
except OSError as e:
    print(type(e).__name__)
"#;

/// Publishing: a `--deny` rule without ports refuses the clients it covers (a reset), the
/// other clients of the same published port, the host's loopback among them, are served.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn deny_rules_refuse_clients_of_published_ports() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let (denied, other) = (RemoteHost::new(), RemoteHost::new());
    let port = free_port();
    let specs = [
        format!("{}:{port}:80", denied.host_ip),
        format!("{}:{port}:80", other.host_ip),
        format!("127.0.0.1:{port}:80"),
    ];
    let mut run = Usernet::new(&dns).arg("--deny").arg(format!("{}/32", denied.ip));
    for s in &specs {
        run = run.arg("-p").arg(s);
    }
    let py = python().display().to_string();
    let mut bg =
        Background::start(run.command(&["timeout", "30", &py, "-c", HELLO_SERVER]), std::process::Stdio::null());
    bg.wait_line("READY", std::time::Duration::from_secs(20));
    let client = |host: Option<&RemoteHost>, to: &str| -> String {
        let args = [py.as_str(), "-c", HELLO_CLIENT, to, &port.to_string()];
        let out = match host {
            Some(h) => h.exec(&args),
            None => run_bounded(std::process::Command::new(&py).args(&args[1..]), DEFAULT_TIMEOUT),
        };
        out.stdout.trim().to_string()
    };
    let refused = client(Some(&denied), &denied.host_ip);
    assert!(["ConnectionResetError", "closed"].contains(&refused.as_str()), "{refused}\nusernet:\n{}", bg.describe());
    assert_eq!(client(Some(&other), &other.host_ip), "hello", "{}", bg.describe());
    assert_eq!(client(None, "127.0.0.1"), "hello", "{}", bg.describe());
    let said = bg.stderr().lines().filter(|l| l.contains("denied guest publish") && l.contains(&denied.ip)).count();
    assert_eq!(said, 1, "{}", bg.describe());
}
