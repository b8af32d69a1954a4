//! `usernet run --engine-threads 2`: two engines, each with its own queue of the guest's
//! TAP device, serve one guest (crates/core/src/engine/shard.rs). Parallel transfers both
//! ways arrive whole (sha256) and the second engine carries some of them; frames for engine
//! 0 (DNS to the gateway) reach it from either queue; the control API answers for the flows
//! of both engines. run_publish.rs has published ports with two engines.

mod common;

use common::*;
use std::process::Stdio;
use std::time::Duration;

/// Size of each transfer.
const EACH: usize = 4 << 20;
/// Transfers each way.
const PARALLEL: usize = 8;

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn two_engines_carry_parallel_transfers_both_ways() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum", "tc"]);
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("eng-dl", "f", EACH);
    let updir = TempDir::new("eng-up");
    let file = updir.join("u");
    write_random_file(&file, EACH);
    let up_want = sha256_file(&file);
    let sink = Server::start(ServerKind::Http, Some(updir.path()));
    let outdir = TempDir::new("eng-out");
    // Downloads look the host up by name: DNS queries to the gateway that reach the second
    // engine's queue are handed to engine 0, the gateway's (each query from another port).
    // The command's parent is usernet: its threads' CPU time (fields 14 and 15 of stat).
    let out = Usernet::new(&dns).args(&["--engine-threads", "2"]).timeout(Duration::from_secs(150)).sh(&format!(
        "for i in $(seq 1 {PARALLEL}); do \
           timeout 100 curl -sSf -o {d}/o$i http://host.docker.internal:{p}/f & \
           timeout 100 curl -sSf -T {f} http://{HOST_IP}:{s}/u > {d}/u$i & \
         done; wait; sha256sum {d}/o*; cat {d}/u*; \
         for t in /proc/$PPID/task/*; do echo thread $(cat $t/comm) $(awk '{{print $14 + $15}}' $t/stat); done; \
         tc qdisc show dev eth0 | sed 's/^/tc: /'",
        d = outdir.path().display(),
        p = http.port,
        s = sink.port,
        f = file.display(),
    ));
    out.assert_ok();
    let downloads = hex_hashes(&out.stdout);
    assert_eq!(downloads.iter().filter(|h| **h == want).count(), PARALLEL, "{out}");
    let uploads = out.stdout.lines().filter(|l| **l == format!("{up_want} {EACH}")).count();
    assert_eq!(uploads, PARALLEL, "{out}");
    // 16 connections, each to the second engine with even odds: it had work.
    let engine1 =
        out.stdout.lines().find(|l| l.starts_with("thread usernet-engine1 ")).unwrap_or_else(|| panic!("{out}"));
    let ticks: u64 = engine1.rsplit(' ').next().and_then(|t| t.parse().ok()).unwrap_or(0);
    assert!(ticks > 0, "the second engine did no work: {engine1}\n{out}");
    // The multi-queue TAP has one root pfifo_fast, as a single-queue TAP does, not the
    // kernel's `mq` with a pfifo_fast per queue (slower to bring up: netns/mod.rs).
    let qdiscs: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("tc: ")).collect();
    assert_eq!(qdiscs.len(), 1, "{out}");
    assert!(qdiscs[0].starts_with("tc: qdisc pfifo_fast ") && qdiscs[0].contains(" root "), "{out}");
}

/// With two engines, fragments of a guest's datagram go to engine 0, which reassembles
/// them, and the whole datagram goes to the engine of its flow: 16 UDP flows (each opened by
/// a small datagram, so spread over both engines by the TAP's queues) each echo datagrams of
/// 4,000 and 30,000 bytes at MTU 1500, byte for byte, over IPv4 and IPv6.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn fragmented_datagrams_reach_flows_of_either_engine() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let echo4 = Server::start(ServerKind::UdpEcho, None);
    let echo6 = Server::start_on(ServerKind::UdpEcho, None, "::1");
    let client = r#"
import socket, sys
def run(family, host, port):
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(16)]
    ok = 0
    for n in (8, 4000, 30000):
        for i, s in enumerate(socks):
            s.settimeout(5)
            data = bytes((j * 7 + i + n) % 251 for j in range(n))
            s.sendto(data, (host, port))
            try:
                ok += s.recv(70000) == data
            except socket.timeout:
                pass
    print(family.name, ok)
run(socket.AF_INET, sys.argv[1], int(sys.argv[2]))
run(socket.AF_INET6, sys.argv[3], int(sys.argv[4]))
"#;
    // In a directory of the test's own: the guest's /tmp is the host's, shared by every
    // test and by the test user.
    let dir = TempDir::new("engfrag");
    let script = dir.join("client.py");
    std::fs::write(&script, client).unwrap();
    let out = Usernet::new(&dns).args(&["--engine-threads", "2", "--mtu", "1500"]).sh(&format!(
        "python3 {script} {HOST_IP} {p4} fd75:7365:726e::254 {p6}",
        script = script.display(),
        p4 = echo4.port,
        p6 = echo6.port
    ));
    out.assert_ok();
    assert_eq!(out.stdout.lines().collect::<Vec<_>>(), ["AF_INET 48", "AF_INET6 48"], "{out}");
}

/// Flows spread over both engines are all in `/v1/flows`, `/v1/stats` and `/metrics`
/// (each engine adds its part to the answer). Twelve connections land all on one engine
/// with odds of 1 in 2,048.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn api_answers_for_both_engines() {
    require(&["ip", "dnsmasq", "curl", "nc"]);
    const CONNS: usize = 12;
    let dns = DnsUpstream::start();
    let sink = Server::start(ServerKind::Sink, None);
    let dir = TempDir::new("eng-api");
    let sock = dir.join("api.sock").to_string_lossy().into_owned();
    let mut bg = Background::start(
        Usernet::new(&dns).args(&["--engine-threads", "2", "--api", &sock]).command(&[
            "sh",
            "-c",
            &format!("for i in $(seq 1 {CONNS}); do sleep 60 | nc {HOST_IP} {} & done; echo READY; wait", sink.port),
        ]),
        Stdio::null(),
    );
    bg.wait_line("READY", Duration::from_secs(20));
    let api =
        |path: &str| run("curl", &["-sS", "-m", "10", "--unix-socket", &sock, &format!("http://usernet{path}")]).stdout;
    let remote = format!("{HOST_IP}:{}", sink.port);
    let mut flows = String::new();
    let all = wait_until(Duration::from_secs(15), || {
        flows = api("/v1/flows");
        flows.matches(&remote).count() >= CONNS
    });
    assert!(
        all,
        "/v1/flows lists {} of {CONNS} flows to {remote}:\n{flows}\n{}",
        flows.matches(&remote).count(),
        bg.describe()
    );
    let stats = api("/v1/stats");
    let tcp: usize = stats
        .split("\"tcp_flows\":")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(tcp >= CONNS, "/v1/stats: {stats}");
    // (A connect may still be completing: the state settles within the wait.)
    let mut metrics = String::new();
    let settled = wait_until(Duration::from_secs(15), || {
        metrics = api("/metrics");
        let established: f64 = metrics
            .lines()
            .find(|l| l.starts_with("usernet_flows{") && l.contains("\"tcp\"") && l.contains("\"established\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        established >= CONNS as f64
    });
    assert!(settled, "/metrics:\n{metrics}");
    bg.stop();
}

/// `--pcap` with more than one engine is refused before anything starts.
#[test]
fn pcap_needs_one_engine() {
    let out = run_bounded(
        usernet_command().args(["run", "--engine-threads", "2", "--pcap", "/nonexistent/x.pcap", "--", "true"]),
        Duration::from_secs(20),
    );
    assert!(!out.success(), "{out}");
    assert!(out.stderr.contains("--engine-threads 1"), "{out}");
}

/// Every way out ends every engine: a COMMAND that is not found exits 127 at once (the
/// other engines hold handles on the gateway services, which engine 0's end waits for).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn command_not_found_ends_every_engine() {
    require(&["ip", "dnsmasq"]);
    let dns = DnsUpstream::start();
    let out =
        Usernet::new(&dns).args(&["--engine-threads", "2"]).timeout(Duration::from_secs(20)).run(&["no-such-command"]);
    out.assert_code(127);
}

/// The most engines there may be: eight, seven of them threads of their own (each TAP queue
/// passed from the sandbox), and a download through them is whole.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn eight_engines() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("eng8", "f", EACH);
    let out = Usernet::new(&dns)
        .args(&["--engine-threads", "8"])
        .timeout(Duration::from_secs(60))
        .sh(&format!("timeout 50 curl -sSf http://{HOST_IP}:{}/f | sha256sum; cat /proc/$PPID/task/*/comm", http.port));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
    let engines = out.stdout.lines().filter(|l| l.starts_with("usernet-engine")).count();
    assert_eq!(engines, 7, "{out}");
    let out = Usernet::new(&dns).args(&["--engine-threads", "9"]).run(&["true"]);
    assert!(!out.success() && out.stderr.contains("--engine-threads"), "{out}");
}
