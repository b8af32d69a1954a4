//! Tests of the test harness itself (tests/common): the DNS upstream, remote
//! hosts, helper servers and the unreachable route work on their own, from the
//! host, without usernet. When one of these fails, the `usernet run` tests
//! that use the same piece cannot be trusted either.

mod common;

use common::*;
use std::time::Duration;

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dns_upstream_answers_static_records() {
    require(&["dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let port = dns.port.to_string();
    let dig = |args: &[&str]| {
        let mut all = vec!["@127.0.0.1", "-p", &port, "+time=2", "+tries=1"];
        all.extend_from_slice(args);
        must("dig", &all)
    };
    assert_eq!(dig(&["+short", "remote.test", "A"]).stdout.trim(), REMOTE_TEST_A);
    assert_eq!(dig(&["+short", "aaaa-only.test", "AAAA"]).stdout.trim(), AAAA_ONLY_TEST_AAAA);
    let a_of_aaaa_only = dig(&["aaaa-only.test", "A"]);
    assert!(a_of_aaaa_only.stdout.contains("status: NOERROR"), "{a_of_aaaa_only}");
    assert!(a_of_aaaa_only.stdout.contains("ANSWER: 0"), "{a_of_aaaa_only}");
    assert!(dig(&["+short", "txt.test", "TXT"]).stdout.contains(TXT_TEST_TEXT));
    assert_eq!(dig(&["+short", "mx.test", "MX"]).stdout.trim(), "10 mail.test.");
    assert_eq!(dig(&["+short", "_http._tcp.srv.test", "SRV"]).stdout.trim(), "0 5 8080 remote.test.");
    let nx = dig(&["nonexistent.test", "A"]);
    assert!(nx.stdout.contains("status: NXDOMAIN"), "{nx}");
    assert_eq!(dig(&["+tcp", "+short", "dual.test", "AAAA"]).stdout.trim(), DUAL_TEST_AAAA);
    assert!(dns.log_text().contains("query[A] remote.test"));
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn remote_host_is_reachable_through_its_veth() {
    require(&["ip", "curl", "python3"]);
    let remote = RemoteHost::new();
    let route = must("ip", &["route", "get", &remote.ip]);
    assert!(route.stdout.contains(&remote.host_veth), "{route}");

    let dir = TempDir::new("remote");
    write_random_file(&dir.join("f"), 1 << 20);
    let want = sha256_file(&dir.join("f"));
    let server = Server::start_in(&remote, ServerKind::Http, Some(dir.path()));
    let out = sh(&format!("timeout 30 curl -sSf http://{}:{}/f | sha256sum", remote.ip, server.port));
    out.assert_ok();
    assert_eq!(first_word(&out.stdout), want);

    // Two remote hosts at once get different addresses.
    let other = RemoteHost::new();
    assert_ne!(other.ip, remote.ip);
    assert_ne!(other.ns, remote.ns);
    let ns = remote.ns.clone();
    drop(server);
    drop(remote);
    let list = must("ip", &["netns", "list"]);
    assert!(!list.stdout.split_whitespace().any(|w| w == ns), "{ns} left behind:\n{list}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn helper_servers_work_on_loopback() {
    require(&["curl", "python3", "nc", "socat"]);
    let (_dir, http, want) = serve_random_file("helpers", "f", 3 << 20);
    let get = sh(&format!("timeout 30 curl -sSf http://127.0.0.1:{}/f | sha256sum", http.port));
    get.assert_ok();
    assert_eq!(first_word(&get.stdout), want);

    // PUT answers the body's hash.
    let up = TempDir::new("helpers-up");
    write_random_file(&up.join("u"), 1 << 20);
    let put = run(
        "curl",
        &[
            "-sSf".into(),
            "--max-time".into(),
            "30".into(),
            "-T".into(),
            up.join("u").into_os_string(),
            format!("http://127.0.0.1:{}/u", http.port).into(),
        ],
    );
    put.assert_ok();
    assert_eq!(first_word(&put.stdout), sha256_file(&up.join("u")));

    // The sink answers after the client's half-close.
    let sink = Server::start(ServerKind::Sink, None);
    let out = sh(&format!("printf hello | timeout 10 nc -N 127.0.0.1 {}", sink.port));
    out.assert_ok();
    assert_eq!(out.stdout.trim(), format!("{} 5", sha256_bytes(b"hello")));

    // The resetter resets.
    let rst = Server::start(ServerKind::Rst, None);
    let out = sh(&format!("timeout 10 curl -sS http://127.0.0.1:{}/", rst.port));
    assert_eq!(out.code, 56, "{out}");
    assert!(out.stderr.contains("reset"), "{out}");

    // UDP echo.
    let udp = Server::start(ServerKind::UdpEcho, None);
    let out = sh(&format!("echo ping-over-udp | timeout 10 socat -t 2 -T 10 - UDP:127.0.0.1:{}", udp.port));
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "ping-over-udp");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn unreachable_route_fails_connect_at_once() {
    require(&["ip", "curl"]);
    let route = UnreachableRoute::new();
    let out = sh(&format!("timeout 20 curl -sS --connect-timeout 15 http://{}:80/", route.ip));
    assert_eq!(out.code, 7, "{out}");
    assert!(out.elapsed < Duration::from_secs(5), "{out}");
    let ip = route.ip.clone();
    drop(route);
    let after = run("ip", &["route", "show", &format!("{ip}/32")]);
    assert!(after.stdout.trim().is_empty(), "{after}");
}

#[test]
fn bounded_commands_are_killed_on_timeout() {
    require_tools(&["sh", "sleep"]);
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "sleep 30 & sleep 30"]);
    let out = run_bounded(&mut cmd, Duration::from_millis(500));
    assert!(out.timed_out);
    assert!(out.elapsed < Duration::from_secs(5), "{out}");
}
