//! `usernet run`: the gateway's DNS, queried with dig and libc inside the
//! guest. Names usernet answers itself (host.docker.internal, --add-host ...),
//! names forwarded to the test's dnsmasq upstream (tests/common), TCP,
//! failover between upstreams and SERVFAIL when none answers.

mod common;

use common::*;
use std::net::UdpSocket;
use std::time::Duration;

/// One dig answer: the status and the answer section's records as
/// "TYPE RDATA" (e.g. "A 192.168.65.254").
#[derive(Debug)]
struct Dig {
    status: String,
    answers: Vec<String>,
}

/// Runs each query (dig arguments, e.g. "host.docker.internal A") in one
/// `usernet run`, and parses the results in order.
fn dig_all(usernet: Usernet, queries: &[&str]) -> (Vec<Dig>, Output) {
    let script: String = queries
        .iter()
        .map(|q| format!("echo '@@@'; timeout 30 dig +time=5 +tries=2 +noall +comments +answer {q}; "))
        .collect();
    let out = usernet.sh(&script);
    let digs = out
        .stdout
        .split("@@@")
        .skip(1)
        .map(|section| Dig {
            status: section
                .split("status: ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .unwrap_or("NO ANSWER")
                .to_string(),
            answers: section
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with(';'))
                .map(|l| l.split_whitespace().skip(3).collect::<Vec<_>>().join(" "))
                .collect(),
        })
        .collect::<Vec<_>>();
    assert_eq!(digs.len(), queries.len(), "{out}");
    (digs, out)
}

fn check(digs: &[Dig], out: &Output, i: usize, status: &str, answers: &[&str]) {
    assert_eq!(digs[i].status, status, "query {i}: {:?}\n{out}", digs[i]);
    assert_eq!(digs[i].answers, answers, "query {i}: {:?}\n{out}", digs[i]);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn gateway_answers_its_own_names() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let (d, out) = dig_all(
        Usernet::new(&dns),
        &[
            "host.docker.internal A",
            "host.containers.internal A",
            "gateway.docker.internal A",
            "gateway.containers.internal A",
            "HOST.Docker.Internal A",
            "host.docker.internal AAAA",
            &format!("@{GATEWAY_IP} host.docker.internal A"),
        ],
    );
    out.assert_ok();
    check(&d, &out, 0, "NOERROR", &["A 192.168.65.254"]);
    check(&d, &out, 1, "NOERROR", &["A 192.168.65.254"]);
    check(&d, &out, 2, "NOERROR", &["A 192.168.65.1"]);
    check(&d, &out, 3, "NOERROR", &["A 192.168.65.1"]);
    check(&d, &out, 4, "NOERROR", &["A 192.168.65.254"]);
    // The host address over IPv6, ::254 of the network's prefix.
    check(&d, &out, 5, "NOERROR", &["AAAA fd75:7365:726e::254"]);
    check(&d, &out, 6, "NOERROR", &["A 192.168.65.254"]);
    // None of these went upstream.
    assert!(!dns.log_text().contains("docker.internal"), "{}", dns.log_text());
}

/// Twenty queries of one length sent back to back on one socket get twenty answers: the
/// gateway's DNS takes datagrams on a socketpair, where a segmented send (UDP_SEGMENT,
/// engine/udp_batch.rs) would arrive as one message.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_burst_of_queries_on_one_socket_gets_an_answer_each() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let client = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], 53))
s.settimeout(5)
name = b"".join(bytes([len(p)]) + p for p in b"host.docker.internal".split(b".")) + b"\0"
for i in range(1, 21):
    s.send(struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + name + struct.pack(">HH", 1, 1))
ids, ok = set(), 0
try:
    while len(ids) < 20:
        answer = s.recv(4096)
        ids.add(struct.unpack(">H", answer[:2])[0])
        ok += answer[3] & 0xF == 0 and bytes([192, 168, 65, 254]) in answer
except socket.timeout:
    pass
print("answers", len(ids), "ok", ok)
"#;
    let dir = TempDir::new("dnsburst");
    let script = dir.join("client.py");
    std::fs::write(&script, client).unwrap();
    let out = Usernet::new(&dns).sh(&format!("python3 {} {GATEWAY_IP}", script.display()));
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "answers 20 ok 20", "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn add_host_records() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let usernet = Usernet::new(&dns).args(&["--add-host", "foo.test:10.1.2.3", "--add-host", "bar.test:host-gateway"]);
    let (d, out) = dig_all(usernet, &["foo.test A", "bar.test A", "FOO.test A", "bar.test AAAA", "foo.test AAAA"]);
    out.assert_ok();
    check(&d, &out, 0, "NOERROR", &["A 10.1.2.3"]);
    check(&d, &out, 1, "NOERROR", &["A 192.168.65.254"]);
    check(&d, &out, 2, "NOERROR", &["A 10.1.2.3"]);
    // host-gateway is each of the host's addresses, as Docker 28's is the default bridge's
    // IPv4 and IPv6 gateways: the IPv6 network's host address too.
    check(&d, &out, 3, "NOERROR", &["AAAA fd75:7365:726e::254"]);
    check(&d, &out, 4, "NOERROR", &[]);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn forwards_to_the_upstream() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let (d, out) = dig_all(
        Usernet::new(&dns),
        &[
            "remote.test A",
            "aaaa-only.test AAAA",
            "aaaa-only.test A",
            "txt.test TXT",
            "mx.test MX",
            "_http._tcp.srv.test SRV",
            "nonexistent.test A",
            "dual.test AAAA",
        ],
    );
    out.assert_ok();
    check(&d, &out, 0, "NOERROR", &["A 203.0.113.10"]);
    check(&d, &out, 1, "NOERROR", &["AAAA 2001:db8::10"]);
    check(&d, &out, 2, "NOERROR", &[]);
    check(&d, &out, 3, "NOERROR", &["TXT \"usernet test record\""]);
    check(&d, &out, 4, "NOERROR", &["MX 10 mail.test."]);
    check(&d, &out, 5, "NOERROR", &["SRV 0 5 8080 remote.test."]);
    check(&d, &out, 6, "NXDOMAIN", &[]);
    check(&d, &out, 7, "NOERROR", &["AAAA 2001:db8::11"]);
    assert!(dns.log_text().contains("query[A] remote.test from 127.0.0.1"), "{}", dns.log_text());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dns_over_tcp() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let (d, out) = dig_all(
        Usernet::new(&dns),
        &["+tcp host.docker.internal A", "+tcp remote.test A", "+tcp txt.test TXT", "+tcp nonexistent.test A"],
    );
    out.assert_ok();
    check(&d, &out, 0, "NOERROR", &["A 192.168.65.254"]);
    check(&d, &out, 1, "NOERROR", &["A 203.0.113.10"]);
    check(&d, &out, 2, "NOERROR", &["TXT \"usernet test record\""]);
    check(&d, &out, 3, "NXDOMAIN", &[]);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn fails_over_from_a_refusing_upstream() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    // Nothing listens there: queries get ICMP port unreachable at once.
    let dead = format!("127.0.0.1:{}", free_port());
    let usernet = Usernet::without_dns().args(&["--dns-upstream", &dead, "--dns-upstream", &dns.addr()]);
    let (d, out) = dig_all(usernet, &["remote.test A", "mx.test MX"]);
    out.assert_ok();
    check(&d, &out, 0, "NOERROR", &["A 203.0.113.10"]);
    check(&d, &out, 1, "NOERROR", &["MX 10 mail.test."]);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn fails_over_from_a_silent_upstream() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    // A socket that takes queries and never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let usernet = Usernet::without_dns().args(&["--dns-upstream", &silent_addr, "--dns-upstream", &dns.addr()]);
    let out = usernet.sh("timeout 40 dig +time=10 +tries=3 +short remote.test A");
    out.assert_ok();
    // dig may report a timed-out try of its own (";; communications error").
    let answers: Vec<&str> = out.stdout.lines().filter(|l| !l.starts_with(';') && !l.trim().is_empty()).collect();
    assert_eq!(answers, vec![REMOTE_TEST_A], "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn servfail_when_no_upstream_answers() {
    require(&["ip", "dig"]);
    let silent = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr").to_string();
    let dead = format!("127.0.0.1:{}", free_port());
    for upstream in [&dead, &silent_addr] {
        let out = Usernet::without_dns()
            .args(&["--dns-upstream", upstream])
            .sh("timeout 40 dig +time=20 +tries=1 remote.test A");
        out.assert_ok();
        assert!(out.stdout.contains("status: SERVFAIL"), "{out}");
        // An answer, and soon: not dig's 20 s timeout.
        assert!(out.elapsed < Duration::from_secs(15), "{out}");
    }
    // usernet's own names need no upstream.
    let out = Usernet::without_dns()
        .args(&["--dns-upstream", &dead])
        .sh("timeout 30 dig +time=5 +tries=1 +short host.docker.internal");
    out.assert_ok();
    assert_eq!(out.stdout.trim(), HOST_IP, "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn libc_resolver_works() {
    require(&["ip", "dnsmasq", "getent"]);
    let dns = DnsUpstream::start();
    let out = Usernet::new(&dns).args(&["--add-host", "foo.test:10.1.2.3"]).sh(
        "timeout 20 getent ahostsv4 host.docker.internal; \
             timeout 20 getent ahostsv6 host.docker.internal; \
             timeout 20 getent ahostsv4 gateway.docker.internal; \
             timeout 20 getent hosts foo.test; \
             timeout 20 getent ahostsv4 remote.test",
    );
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let first = |prefix: &str| lines.iter().find(|l| l.starts_with(prefix)).map(|l| l.to_string());
    assert!(first("192.168.65.254").is_some_and(|l| l.contains("host.docker.internal")), "{out}");
    assert!(first("fd75:7365:726e::254").is_some(), "{out}");
    assert!(first("192.168.65.1 ").is_some(), "{out}");
    assert!(first("10.1.2.3").is_some_and(|l| l.contains("foo.test")), "{out}");
    assert!(first("203.0.113.10").is_some(), "{out}");
}
