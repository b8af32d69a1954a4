//! HTTP/HTTPS proxy support, end to end: a real upstream proxy (tinyproxy) on the host's
//! loopback, origin servers in a namespace of the test's own (HTTP on port 80 and on a
//! random port, HTTPS on 443 with a test certificate made by the openssl CLI), and curl in
//! the guest.
//!
//! tinyproxy resolves names through the machine's resolver, so it runs inside `unshare -m`
//! with its own /etc/hosts (the test names -> the origin namespace) and a resolv.conf naming
//! 127.0.0.1 bind-mounted over the real ones. The guest resolves the same names through
//! usernet's DNS (`--add-host`). Whether a request went through the upstream or not is read
//! from tinyproxy's log.

mod common;

use common::*;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const CONTENT: &str = "hello from the origin";
/// Names of the origin; all resolve to the origin namespace.
const NAMES: &[&str] = &["www.test", "secure.test", "x.corp.test", "other.test", "blocked.test"];

/// Origin servers in a remote namespace: HTTP on 80 (busybox httpd) and on a random port
/// (testserver.py), HTTPS on 443 (openssl s_server) for secure.test and blocked.test.
struct Origin {
    remote: RemoteHost,
    dir: TempDir,
    http: Server,
    children: Vec<Child>,
}

impl Origin {
    fn start() -> Origin {
        let remote = RemoteHost::new();
        let dir = TempDir::new("proxy-origin");
        std::fs::write(dir.join("hello.txt"), format!("{CONTENT}\n")).expect("write hello.txt");
        must(
            "openssl",
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=secure.test",
                "-addext",
                "subjectAltName=DNS:secure.test,DNS:blocked.test",
                "-keyout",
                dir.join("key.pem").to_str().expect("utf-8 path"),
                "-out",
                dir.join("cert.pem").to_str().expect("utf-8 path"),
            ],
        );
        let http = Server::start_in(&remote, ServerKind::Http, Some(dir.path()));
        let d = dir.path().to_str().expect("utf-8 path").to_string();
        let httpd = remote.command(&["busybox", "httpd", "-f", "-p", "80", "-h", &d]);
        let tls = remote.command(&[
            "sh",
            "-c",
            &format!("cd {d} && exec openssl s_server -quiet -accept 443 -cert cert.pem -key key.pem -WWW"),
        ]);
        let mut children = Vec::new();
        for mut c in [httpd, tls] {
            c.stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
            children.push(c.spawn().expect("start origin server"));
        }
        let origin = Origin { remote, dir, http, children };
        for port in [80, 443, origin.http.port] {
            let up =
                wait_until(Duration::from_secs(10), || TcpStream::connect((origin.remote.ip.as_str(), port)).is_ok());
            assert!(up, "origin port {port} did not come up");
        }
        origin
    }

    fn ip(&self) -> &str {
        &self.remote.ip
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// `--add-host NAME:IP` for every test name.
    fn add_hosts(&self) -> Vec<String> {
        NAMES.iter().flat_map(|n| ["--add-host".to_string(), format!("{n}:{}", self.ip())]).collect()
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// tinyproxy on 127.0.0.1, in its own mount namespace with the test names in /etc/hosts.
struct Tinyproxy {
    port: u16,
    dir: TempDir,
    child: Child,
}

impl Tinyproxy {
    /// `auth`: BasicAuth user and password; `deny`: host names tinyproxy refuses (403).
    fn start(origin_ip: &str, auth: Option<(&str, &str)>, deny: &[&str]) -> Tinyproxy {
        let dir = TempDir::new("tinyproxy");
        let hosts: String = NAMES.iter().map(|n| format!("{origin_ip} {n}\n")).collect();
        std::fs::write(dir.join("hosts"), format!("127.0.0.1 localhost\n{hosts}")).expect("write hosts");
        std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.1\n").expect("write resolv.conf");
        let port = free_port();
        let d = dir.path().display();
        let mut conf = format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{d}/tinyproxy.log\"\nLogLevel Info\n\
             MaxClients 50\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
        );
        if let Some((user, pass)) = auth {
            conf.push_str(&format!("BasicAuth {user} {pass}\n"));
        }
        if !deny.is_empty() {
            let filter: String = deny.iter().map(|n| format!("^{}$\n", n.replace('.', "\\."))).collect();
            std::fs::write(dir.join("filter"), filter).expect("write filter");
            conf.push_str(&format!("Filter \"{d}/filter\"\nFilterExtended On\n"));
        }
        std::fs::write(dir.join("tinyproxy.conf"), conf).expect("write tinyproxy.conf");
        let script = format!(
            "mount --bind {d}/hosts /etc/hosts && mount --bind {d}/resolv.conf /etc/resolv.conf \
             && exec tinyproxy -d -c {d}/tinyproxy.conf"
        );
        let child = Command::new("unshare")
            .args(["-m", "sh", "-c", &script])
            .env("PATH", search_path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tinyproxy");
        let tp = Tinyproxy { port, dir, child };
        let up = wait_until(Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).is_ok());
        assert!(up, "tinyproxy did not come up:\n{}", tp.log());
        tp
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }

    /// The requests tinyproxy got (`GET http://... HTTP/1.1`, `CONNECT name:443 HTTP/1.1`).
    fn requests(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter_map(|l| l.split_once("Request (file descriptor ").map(|(_, r)| r))
            .filter_map(|r| r.split_once("): ").map(|(_, req)| req.to_string()))
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tools of every test here.
const TOOLS: &[&str] = &["ip", "dnsmasq", "curl", "python3", "tinyproxy", "openssl", "unshare", "busybox"];

/// Guest scripts start with no proxy variables of the test's environment.
const CLEAN_ENV: &str = "unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY all_proxy ALL_PROXY no_proxy NO_PROXY; ";

fn guest(dns: &DnsUpstream, origin: &Origin, args: &[String], script: &str) -> Output {
    Usernet::new(dns).args(&origin.add_hosts()).args(args).sh(&format!("{CLEAN_ENV}{script}"))
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn explicit_proxy_http_and_https_through_upstream() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let tp = Tinyproxy::start(origin.ip(), None, &[]);
    let args = strings(&["--http-proxy", &tp.url(), "--https-proxy", &tp.url(), "--proxy-ports", ""]);
    let cert = origin.cert();
    let out = guest(
        &dns,
        &origin,
        &args,
        &format!(
            "curl -fsS -m 20 -x http://http.docker.internal:3128 http://www.test:{port}/hello.txt && \
             curl -fsS -m 20 -x http://http.docker.internal:3128 --cacert {cert} https://secure.test/hello.txt && \
             HTTPS_PROXY=http://http.docker.internal:3128 curl -fsS -m 20 --cacert {cert} https://secure.test/hello.txt",
            port = origin.http.port,
            cert = cert.display()
        ),
    );
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 3, "{out}");
    let reqs = tp.requests();
    assert!(
        reqs.iter().any(|r| r.starts_with(&format!("GET http://www.test:{}/hello.txt", origin.http.port))),
        "{reqs:?}"
    );
    assert_eq!(reqs.iter().filter(|r| r.starts_with("CONNECT secure.test:443 ")).count(), 2, "{reqs:?}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn explicit_proxy_without_upstream_goes_direct() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let out = guest(
        &dns,
        &origin,
        &[],
        &format!(
            "curl -fsS -m 20 -x http://http.docker.internal:3128 http://www.test:{port}/hello.txt && \
             curl -fsS -m 20 -x http://http.docker.internal:3128 --cacert {cert} https://secure.test/hello.txt && \
             curl -sS -m 20 -o /dev/null -w '%{{http_code}}\\n' -x http://http.docker.internal:3128 http://gateway.docker.internal/",
            port = origin.http.port,
            cert = origin.cert().display()
        ),
    );
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 2, "{out}");
    // The gateway itself is not a destination of the proxy.
    assert!(out.stdout.contains("403"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn transparent_http_and_https_through_upstream() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let tp = Tinyproxy::start(origin.ip(), None, &[]);
    let port = origin.http.port;
    let ports = format!("80,443,{port}");
    let args = strings(&["--http-proxy", &tp.url(), "--https-proxy", &tp.url(), "--proxy-ports", &ports]);
    let out = guest(
        &dns,
        &origin,
        &args,
        &format!(
            // Two requests on one keep-alive connection, then HTTPS on 443, then HTTP on a
            // port added with --proxy-ports.
            "curl -fsS -m 20 http://www.test/hello.txt http://www.test/hello.txt?again && \
             curl -fsS -m 20 --cacert {cert} https://secure.test/hello.txt && \
             curl -fsS -m 20 http://other.test:{port}/hello.txt",
            cert = origin.cert().display()
        ),
    );
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 4, "{out}");
    let reqs = tp.requests();
    assert!(reqs.iter().any(|r| r.starts_with("GET http://www.test/hello.txt ")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with("GET http://www.test/hello.txt?again ")), "{reqs:?}");
    // HTTPS went through CONNECT with the name from the ClientHello, not the IP.
    assert!(reqs.iter().any(|r| r.starts_with("CONNECT secure.test:443 ")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with(&format!("GET http://other.test:{port}/hello.txt "))), "{reqs:?}");
}

/// The egress policy through the upstream proxy: with `--allow` of the origin's address and
/// `--allow-domain secure.test`, a name the upstream would resolve is judged by name (an
/// allow-domain) or by the address the gateway's DNS gives it (`--add-host`); a name with no
/// address (nowhere.test) is denied whichever way it comes: a transparent request's Host
/// header (403), an intercepted TLS ClientHello (reset), an explicit CONNECT (403). The
/// upstream never hears of it.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn egress_policy_judges_the_names_sent_upstream() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let tp = Tinyproxy::start(origin.ip(), None, &[]);
    let allow = format!("{}/32:80,443", origin.ip());
    let args = strings(&[
        "--http-proxy",
        &tp.url(),
        "--https-proxy",
        &tp.url(),
        "--proxy-ports",
        "80,443",
        "--allow",
        &allow,
        "--allow-domain",
        "secure.test",
    ]);
    let (ip, cert) = (origin.ip(), origin.cert());
    let out = guest(
        &dns,
        &origin,
        &args,
        &format!(
            "curl -fsS -m 20 http://www.test/hello.txt
             curl -s -m 20 -w 'host %{{http_code}}\n' -H 'Host: nowhere.test' http://{ip}/hello.txt
             curl -s -m 20 -k --resolve nowhere.test:443:{ip} https://nowhere.test/hello.txt; echo tls=$?
             curl -fsS -m 20 -x http://http.docker.internal:3128 --cacert {cert} https://secure.test/hello.txt
             curl -s -m 20 -p -o /dev/null -w 'connect %{{http_connect}}\n' -x http://http.docker.internal:3128 http://nowhere.test/ || true",
            cert = cert.display()
        ),
    );
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let body = "usernet: nowhere.test:80 is denied by the egress policy: no --allow rule or --allow-domain covers it";
    assert_eq!(lines.len(), 6, "{out}");
    assert_eq!(
        [lines[0], lines[1], lines[2], lines[4], lines[5]],
        [CONTENT, body, "host 403", CONTENT, "connect 403"],
        "{out}"
    );
    assert!(lines[3].starts_with("tls=") && lines[3] != "tls=0", "{out}");
    let reqs = tp.requests();
    assert!(reqs.iter().any(|r| r.starts_with("GET http://www.test/hello.txt ")), "{reqs:?}");
    assert!(reqs.iter().any(|r| r.starts_with("CONNECT secure.test:443 ")), "{reqs:?}");
    assert!(!reqs.iter().any(|r| r.contains("nowhere.test")), "{reqs:?}");
    let said = out.stderr.lines().filter(|l| l.contains("denied guest proxy") && l.contains("nowhere.test")).count();
    // nowhere.test:80 and :443 from the transparent proxy; :80 again through CONNECT is
    // the same destination, logged once.
    assert_eq!(said, 2, "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn no_proxy_bypass_by_name_wildcard_and_cidr() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let tp = Tinyproxy::start(origin.ip(), None, &[]);
    let cert = origin.cert();
    let script = format!(
        "curl -fsS -m 20 http://www.test/hello.txt && curl -fsS -m 20 http://x.corp.test/hello.txt && \
         curl -fsS -m 20 --cacert {cert} https://secure.test/hello.txt && curl -fsS -m 20 http://other.test/hello.txt",
        cert = cert.display()
    );
    // By name and by wildcard: www.test, *.corp.test and secure.test bypass; other.test does not.
    let args = strings(&[
        "--http-proxy",
        &tp.url(),
        "--https-proxy",
        &tp.url(),
        "--no-proxy",
        "www.test, *.corp.test,secure.test",
    ]);
    let out = guest(&dns, &origin, &args, &script);
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 4, "{out}");
    let reqs = tp.requests();
    assert_eq!(reqs.len(), 1, "only other.test goes upstream: {reqs:?}");
    assert!(reqs[0].starts_with("GET http://other.test/hello.txt "), "{reqs:?}");

    // By CIDR: the origin's network bypasses whatever the name.
    let cidr = format!("{}/24", origin.ip());
    let args = strings(&["--http-proxy", &tp.url(), "--https-proxy", &tp.url(), "--no-proxy", &cidr]);
    let out = guest(&dns, &origin, &args, &script);
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 4, "{out}");
    assert_eq!(tp.requests().len(), 1, "nothing more went upstream: {:?}", tp.requests());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn upstream_basic_auth() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let tp = Tinyproxy::start(origin.ip(), Some(("alice", "s3cret-pw")), &[]);
    let with_auth = format!("http://alice:s3cret-pw@127.0.0.1:{}", tp.port);
    let cert = origin.cert();
    let script = format!(
        "curl -fsS -m 20 http://www.test/hello.txt && curl -fsS -m 20 --cacert {cert} https://secure.test/hello.txt && \
         curl -fsS -m 20 -x http://http.docker.internal:3128 --cacert {cert} https://secure.test/hello.txt",
        cert = cert.display()
    );
    let args = strings(&["--http-proxy", &with_auth, "--https-proxy", &with_auth]);
    let out =
        Usernet::new(&dns).args(&origin.add_hosts()).args(&args).run(&["sh", "-c", &format!("{CLEAN_ENV}{script}")]);
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 3, "{out}");
    assert_eq!(tp.requests().len(), 3, "{:?}", tp.requests());

    // The same from the environment (--proxy-from-env), with debug logs: no password in them.
    let mut cmd = Usernet::new(&dns).args(&origin.add_hosts()).arg("--proxy-from-env").command(&[
        "sh",
        "-c",
        &format!("{CLEAN_ENV}{script}"),
    ]);
    cmd.env("HTTP_PROXY", &with_auth).env("https_proxy", &with_auth).env("RUST_LOG", "debug");
    let out = run_bounded(&mut cmd, DEFAULT_TIMEOUT);
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 3, "{out}");
    assert!(!out.stderr.contains("s3cret-pw"), "password in the log:\n{out}");

    // No credentials: the upstream's 407 becomes a 502 with usernet's one-line reason
    // (plain HTTP and CONNECT), intercepted TLS is reset, and each failure is logged.
    let script = format!(
        "curl -sS -m 20 -w '%{{http_code}}\\n' http://www.test/hello.txt; \
         curl -sS -m 20 --cacert {cert} https://secure.test/hello.txt; echo tls=$?; \
         curl -sS -m 20 -x http://http.docker.internal:3128 --cacert {cert} https://secure.test/hello.txt; echo connect=$?",
        cert = cert.display()
    );
    let out = guest(&dns, &origin, &strings(&["--http-proxy", &tp.url(), "--https-proxy", &tp.url()]), &script);
    assert!(
        out.stdout
            .contains(&format!("usernet: upstream proxy 127.0.0.1:{} refused http://www.test/hello.txt: 407", tp.port)),
        "{out}"
    );
    assert!(out.stdout.contains("502"), "{out}");
    assert!(!out.stdout.contains(CONTENT), "{out}");
    assert!(!out.stdout.contains("tls=0") && out.stdout.contains("tls="), "{out}");
    assert!(!out.stdout.contains("connect=0") && out.stdout.contains("connect="), "{out}");
    assert!(out.stderr.contains("CONNECT tunnel failed, response 502"), "{out}");
    assert!(out.stderr.matches("WARN").count() >= 3, "one log line per failure:\n{out}");

    // A wrong password (tinyproxy answers 401): the same, except that plain HTTP gets the
    // upstream's 401 page as it is (an origin may send 401 too); the log names the refusal.
    let wrong = format!("http://alice:wrong-pw@127.0.0.1:{}", tp.port);
    let out = guest(&dns, &origin, &strings(&["--http-proxy", &wrong, "--https-proxy", &wrong]), &script);
    assert!(out.stdout.contains("401"), "{out}");
    assert!(!out.stdout.contains(CONTENT), "{out}");
    assert!(!out.stdout.contains("tls=0") && out.stdout.contains("tls="), "{out}");
    assert!(!out.stdout.contains("connect=0") && out.stdout.contains("connect="), "{out}");
    assert!(out.stderr.contains("CONNECT tunnel failed, response 502"), "{out}");
    assert!(out.stderr.matches("WARN").count() >= 3, "one log line per failure:\n{out}");
    assert!(!out.stderr.contains("wrong-pw"), "password in the log:\n{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn upstream_down_or_refusing() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let cert = origin.cert();
    let script = format!(
        "curl -sS -m 20 -w '%{{http_code}}\\n' http://{name}/hello.txt; \
         curl -sS -m 20 --cacert {cert} https://{name}/hello.txt; echo tls=$?; \
         curl -sS -m 20 -x http://http.docker.internal:3128 --cacert {cert} https://{name}/hello.txt; echo connect=$?",
        name = "blocked.test",
        cert = cert.display()
    );

    // Nobody listens where the upstream should be.
    let down = format!("http://127.0.0.1:{}", free_port());
    let out = guest(&dns, &origin, &strings(&["--http-proxy", &down, "--https-proxy", &down]), &script);
    assert!(out.stdout.contains("usernet: upstream proxy 127.0.0.1:") && out.stdout.contains("unreachable"), "{out}");
    assert!(out.stdout.contains("502"), "{out}");
    assert!(!out.stdout.contains("tls=0") && !out.stdout.contains("connect=0"), "{out}");
    assert!(!out.stdout.contains(CONTENT), "{out}");
    assert!(out.stderr.matches("WARN").count() >= 3, "{out}");

    // The upstream refuses the destination (403 from tinyproxy's filter).
    let tp = Tinyproxy::start(origin.ip(), None, &["blocked.test"]);
    let out = guest(&dns, &origin, &strings(&["--http-proxy", &tp.url(), "--https-proxy", &tp.url()]), &script);
    assert!(out.stdout.contains("403"), "{out}");
    assert!(!out.stdout.contains(CONTENT), "{out}");
    assert!(!out.stdout.contains("tls=0") && !out.stdout.contains("connect=0"), "{out}");
    assert!(out.stderr.contains("CONNECT tunnel failed, response 403"), "{out}");
    assert!(out.stderr.contains("refused blocked.test:443: 403"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn api_shows_and_changes_the_proxy() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let origin = Origin::start();
    let tp = Tinyproxy::start(origin.ip(), None, &[]);
    let dir = TempDir::new("proxy-api");
    let api = dir.join("api.sock");
    let flag = dir.join("changed");
    // The guest fetches once (no upstream: direct), waits for the test to set the upstream
    // through the API, and fetches again (now through tinyproxy).
    let script = format!(
        "{CLEAN_ENV} curl -fsS -m 20 http://www.test/hello.txt && touch {d}/first && \
         for i in $(seq 200); do [ -e {flag} ] && break; sleep 0.1; done && \
         curl -fsS -m 20 http://www.test/hello.txt",
        d = dir.path().display(),
        flag = flag.display()
    );
    let mut cmd = Usernet::new(&dns)
        .args(&origin.add_hosts())
        // The first fetch goes direct (www.test is excluded; the upstream on port 1 is down);
        // the PUT sets a working upstream and clears the exclusion.
        .args(&["--api", api.to_str().expect("utf-8 path"), "--http-proxy", "http://bob:pw@127.0.0.1:1"])
        .args(&["--no-proxy", "www.test"])
        .command(&["sh", "-c", &script]);
    let sock = api.clone();
    let first = dir.join("first");
    let flag_path = flag.clone();
    let tp_url = tp.url();
    let driver = std::thread::spawn(move || {
        let api = |args: &[&str]| {
            let mut c = vec!["-sS", "-m", "10", "--unix-socket", sock.to_str().unwrap_or("")];
            c.extend_from_slice(args);
            run("curl", &c)
        };
        if !wait_until(Duration::from_secs(30), || first.exists()) {
            return (String::new(), String::new(), String::new());
        }
        let metrics = api(&["http://usernet/metrics"]).stdout;
        let shown = api(&["http://usernet/v1/proxy"]).stdout;
        let body = format!("{{\"http_proxy\": \"{tp_url}\", \"no_proxy\": \"\"}}");
        let put = api(&["-X", "PUT", "--data", &body, "http://usernet/v1/proxy"]).stdout;
        let _ = std::fs::write(&flag_path, "");
        (shown, put, metrics)
    });
    let out = run_bounded(&mut cmd, DEFAULT_TIMEOUT);
    let (shown, put, metrics) = driver.join().expect("driver thread");
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 2, "{out}");
    assert!(shown.contains("\"http_proxy\":\"http://bob:***@127.0.0.1:1\""), "{shown}");
    assert!(!shown.contains("pw@"), "{shown}");
    assert!(put.contains(&format!("\"http_proxy\":\"{}\"", tp.url())), "{put}");
    // The first fetch, taken by the transparent proxy and sent direct, counted on /metrics.
    let forwarded = r#"usernet_proxy_requests_total{outcome="forwarded"} 1"#;
    assert!(metrics.lines().any(|l| l == forwarded), "{metrics}");
    let reqs = tp.requests();
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert!(reqs[0].starts_with("GET http://www.test/hello.txt "), "{reqs:?}");
}

/// The proxy over IPv6, with `curl -6` in the guest: the explicit proxy reached at
/// `http.docker.internal`'s AAAA (the gateway's ::1), for a name that has only an AAAA
/// record (resolved through the gateway's DNS, dialled over IPv6) and without an upstream,
/// directly; and a connection to an IPv6 address intercepted on its way out and sent
/// through the upstream (tinyproxy) by that address.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn proxy_over_ipv6_explicit_and_transparent() {
    require(TOOLS);
    let origin = Origin::start();
    let ip6 = origin.remote.ip6.parse::<std::net::Ipv6Addr>().expect("the origin's IPv6 address").to_string();
    let dns = DnsUpstream::start_with(&[format!("v6only.test,{ip6}")]);
    let http6 = Server::start_in_on(&origin.remote, ServerKind::Http, Some(origin.dir.path()), "::");
    let port = http6.port;
    // Explicit, direct (no upstream): the proxy resolves the AAAA-only name itself.
    let out = guest(
        &dns,
        &origin,
        &[],
        &format!("curl -6 -fsS -m 20 -x http://http.docker.internal:3128 http://v6only.test:{port}/hello.txt"),
    );
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 1, "{out}");
    // Transparent, through the upstream.
    let tp = Tinyproxy::start(origin.ip(), None, &[]);
    let args = strings(&["--http-proxy", &tp.url(), "--proxy-ports", &port.to_string()]);
    let out = guest(&dns, &origin, &args, &format!("curl -6 -fsS -m 20 http://[{ip6}]:{port}/hello.txt"));
    out.assert_ok();
    assert_eq!(out.stdout.matches(CONTENT).count(), 1, "{out}");
    let reqs = tp.requests();
    assert!(reqs.iter().any(|r| r.starts_with(&format!("GET http://[{ip6}]:{port}/hello.txt "))), "{reqs:?}\n{out}");
}
