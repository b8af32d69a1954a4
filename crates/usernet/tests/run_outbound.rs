//! `usernet run`: the guest's outbound traffic, with real clients inside the
//! guest: TCP to the host's loopback (192.168.65.254 / host.docker.internal)
//! and to a remote host (a namespace of the test's own, reached through the
//! host's routing table), refused and unroutable connects, half-close, reset,
//! packet loss, UDP and ping. Bulk transfers are checked with sha256.

mod common;

use common::*;
use std::time::Duration;

/// Size of a bulk transfer.
const BULK: usize = 20 << 20;
/// Bound of a `usernet run` that moves bulk data.
const BULK_TIMEOUT: Duration = Duration::from_secs(150);

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn download_from_host_loopback_by_name() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("dl", "f", BULK);
    let out = Usernet::new(&dns)
        .timeout(BULK_TIMEOUT)
        .sh(&format!("timeout 120 curl -sSf http://host.docker.internal:{}/f | sha256sum", http.port));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
}

/// With `--busy-poll` the bytes are the same, and spinning that does not pay off stops: a
/// ping to the gateway every 5 ms (longer apart than the 3 ms window) leaves usernet mostly
/// asleep. A window that never shrank would spin 3 ms of every 5 (60% of a CPU).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn busy_polling_moves_bytes_and_backs_off() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum", "ping"]);
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("busy", "f", BULK);
    // Fields 14 and 15 of /proc/PID/stat: user and system time in clock ticks; the
    // command's parent is usernet itself.
    let cpu = "awk '{print $14 + $15}' /proc/$PPID/stat";
    let out = Usernet::new(&dns).args(&["--busy-poll", "3000"]).timeout(BULK_TIMEOUT).sh(&format!(
        "timeout 120 curl -sSf http://host.docker.internal:{}/f | sha256sum
         a=$({cpu}); t0=$(date +%s%N)
         ping -q -i 0.005 -c 600 {GATEWAY_IP} >/dev/null || echo ping failed
         b=$({cpu}); t1=$(date +%s%N)
         echo trickle-ticks $((b - a)) of $(( (t1 - t0) * $(getconf CLK_TCK) / 1000000000 ))",
        http.port
    ));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
    assert!(!out.stdout.contains("ping failed"), "{out}");
    let line = out.stdout.lines().find(|l| l.starts_with("trickle-ticks")).unwrap_or_else(|| panic!("{out}"));
    let words: Vec<u64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    assert!(words.len() == 2 && words[0] * 4 < words[1], "usernet kept spinning between pings: {line}\n{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn upload_to_host_loopback() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("ul");
    let file = dir.join("u");
    write_random_file(&file, BULK);
    let want = sha256_file(&file);
    let http = Server::start(ServerKind::Http, Some(dir.path()));
    let out = Usernet::new(&dns).timeout(BULK_TIMEOUT).sh(&format!(
        "timeout 120 curl -sSf -T {} http://{HOST_IP}:{}/u",
        file.display(),
        http.port
    ));
    out.assert_ok();
    assert_eq!(out.stdout.trim(), format!("{want} {BULK}"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn many_parallel_connections_to_host() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("par", "f", 1 << 20);
    let outdir = TempDir::new("par-out");
    let out = Usernet::new(&dns).timeout(BULK_TIMEOUT).sh(&format!(
        "for i in $(seq 1 32); do \
           timeout 60 curl -sSf -o {d}/o$i http://{HOST_IP}:{p}/f & \
         done; wait; sha256sum {d}/o*",
        d = outdir.path().display(),
        p = http.port
    ));
    out.assert_ok();
    let hashes = hex_hashes(&out.stdout);
    assert_eq!(hashes.len(), 32, "{out}");
    assert!(hashes.iter().all(|h| *h == want), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn download_and_upload_with_remote_host() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum", "nc"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let dir = TempDir::new("remote");
    write_random_file(&dir.join("f"), BULK);
    let want = sha256_file(&dir.join("f"));
    let http = Server::start_in(&remote, ServerKind::Http, Some(dir.path()));
    let sink = Server::start_in(&remote, ServerKind::Sink, None);
    let out = Usernet::new(&dns).timeout(BULK_TIMEOUT).sh(&format!(
        "timeout 120 curl -sSf http://{ip}:{p}/f | sha256sum; \
         timeout 120 nc -N {ip} {s} < {f}",
        ip = remote.ip,
        p = http.port,
        s = sink.port,
        f = dir.join("f").display()
    ));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want.clone(), want], "{out}");
    assert!(out.stdout.contains(&format!(" {BULK}")), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn connect_to_closed_port_is_refused_at_once() {
    require(&["ip", "dnsmasq", "curl", "nc"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let closed = free_port();
    let out = Usernet::new(&dns).sh(&format!(
        "timeout 20 curl -sS --connect-timeout 10 http://{HOST_IP}:{closed}/; echo curl-host=$?; \
         timeout 20 curl -sS --connect-timeout 10 http://{ip}:{closed}/; echo curl-remote=$?; \
         timeout 20 nc -v -z -w 10 {HOST_IP} {closed}",
        ip = remote.ip
    ));
    assert!(out.stdout.contains("curl-host=7"), "{out}");
    assert!(out.stdout.contains("curl-remote=7"), "{out}");
    assert!(out.stderr.contains("Connection refused"), "{out}");
    // A SYN left unanswered would take the 10 s connect timeout, three times.
    assert!(out.elapsed < Duration::from_secs(9), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn connect_without_route_fails_at_once() {
    require(&["ip", "dnsmasq", "curl", "nc"]);
    let dns = DnsUpstream::start();
    let route = UnreachableRoute::new();
    let out = Usernet::new(&dns).sh(&format!(
        "timeout 20 curl -sS --connect-timeout 10 http://{ip}:80/; echo curl=$?; \
         timeout 20 nc -v -z -w 10 {ip} 80",
        ip = route.ip
    ));
    assert!(out.stdout.contains("curl=7"), "{out}");
    assert!(out.stderr.contains("No route to host") || out.stderr.contains("Network is unreachable"), "{out}");
    assert!(out.elapsed < Duration::from_secs(9), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn half_close_keeps_the_other_direction_open() {
    require(&["ip", "dnsmasq", "nc", "socat", "python3"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("half");
    let file = dir.join("h");
    let len = 5 << 20;
    write_random_file(&file, len);
    let want = format!("{} {len}", sha256_file(&file));
    // The sink answers only after it read EOF: the guest must shut down its
    // sending side (FIN) and still receive the answer.
    let sink = Server::start(ServerKind::Sink, None);
    let out = Usernet::new(&dns).sh(&format!(
        "timeout 60 nc -N {HOST_IP} {p} < {f}; echo ===; \
         timeout 60 socat -t 30 - TCP:host.docker.internal:{p} < {f}; echo ===; \
         printf '' | timeout 60 nc -N {HOST_IP} {p}",
        p = sink.port,
        f = file.display()
    ));
    out.assert_ok();
    let parts: Vec<&str> = out.stdout.split("===").map(str::trim).collect();
    let empty = format!("{} 0", sha256_bytes(b""));
    assert_eq!(parts, vec![want.as_str(), want.as_str(), empty.as_str()], "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn reset_by_server_reaches_the_guest() {
    require(&["ip", "dnsmasq", "curl", "python3"]);
    let dns = DnsUpstream::start();
    let rst = Server::start(ServerKind::Rst, None);
    let out = Usernet::new(&dns).sh(&format!("timeout 30 curl -sS --max-time 20 http://{HOST_IP}:{}/", rst.port));
    // 56: "Recv failure: Connection reset by peer" (not 52, an empty reply after FIN).
    assert_eq!(out.code, 56, "{out}");
    assert!(out.stderr.contains("reset"), "{out}");
    assert!(out.elapsed < Duration::from_secs(15), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn bulk_transfers_survive_packet_loss() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum", "nft"]);
    let dns = DnsUpstream::start();
    let (dir, http, want) = serve_random_file("lossy", "f", BULK);
    let up = dir.join("f");
    // 3% loss each way on the guest's eth0 (docs/testing.md: no netem on these kernels).
    let out = Usernet::new(&dns).timeout(Duration::from_secs(280)).sh(&format!(
        "set -e; \
         nft add table inet lossy; \
         nft add chain inet lossy in '{{ type filter hook input priority 0; }}'; \
         nft add chain inet lossy out '{{ type filter hook output priority 0; }}'; \
         nft add rule inet lossy in iifname eth0 numgen random mod 100 '<' 3 drop; \
         nft add rule inet lossy out oifname eth0 numgen random mod 100 '<' 3 drop; \
         timeout 120 curl -sSf http://{HOST_IP}:{p}/f | sha256sum; \
         timeout 120 curl -sSf -T {f} http://{HOST_IP}:{p}/up; \
         nft list ruleset | grep -c drop",
        p = http.port,
        f = up.display()
    ));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want.clone(), want], "{out}");
    assert!(out.stdout.trim_end().ends_with('2'), "rules missing:\n{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_to_host_loopback_and_remote_host() {
    require(&["ip", "dnsmasq", "socat", "python3"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let host_echo = Server::start(ServerKind::UdpEcho, None);
    let remote_echo = Server::start_in(&remote, ServerKind::UdpEcho, None);
    let big = "x".repeat(1400);
    let out = Usernet::new(&dns).sh(&format!(
        "echo hello-host | timeout 20 socat -t 2 -T 10 - UDP:{HOST_IP}:{h}; \
         echo hello-by-name | timeout 20 socat -t 2 -T 10 - UDP:host.docker.internal:{h}; \
         echo hello-remote | timeout 20 socat -t 2 -T 10 - UDP:{ip}:{r}; \
         echo {big} | timeout 20 socat -t 2 -T 10 - UDP:{ip}:{r}",
        h = host_echo.port,
        ip = remote.ip,
        r = remote_echo.port
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines, vec!["hello-host", "hello-by-name", "hello-remote", big.as_str()], "{out}");
}

/// A guest on a 1500-byte link (a VM's, or `--mtu 1500`) fragments a UDP datagram that does
/// not fit, and takes fragments: usernet reassembles what the guest sends and fragments what
/// it answers, over IPv4 and IPv6, up to the largest datagram each carries, and answers a
/// ping of the gateway as large. Each echo is checked byte for byte (sha256); the guest's
/// own counters show that it cut its datagrams and put usernet's fragments together (before,
/// usernet dropped every fragment, and a datagram beyond the MTU never came back).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_and_ping_beyond_the_mtu_go_in_fragments() {
    require(&["ip", "dnsmasq", "python3", "ping"]);
    let dns = DnsUpstream::start();
    let echo4 = Server::start(ServerKind::UdpEcho, None);
    let echo6 = Server::start_on(ServerKind::UdpEcho, None, "::1");
    let client = r#"
import hashlib, socket, sys
def counter(path, name):
    for line in open(path):
        if line.startswith(name + " ") or line.startswith(name + "\t"):
            return int(line.split()[1])
    heads, values = [l.split() for l in open(path) if l.startswith("Ip:")]
    return int(values[heads.index(name)])
def echo(family, host, port, sizes):
    for n in sizes:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(5)
        data = bytes((i * 7 + n) % 251 for i in range(n))
        s.sendto(data, (host, port))
        try:
            got = s.recv(70000)
        except socket.timeout:
            print(n, "timeout")
            continue
        same = hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()
        print(n, "same" if same else "differs %d" % len(got))
before = counter("/proc/net/snmp", "ReasmOKs"), counter("/proc/net/snmp6", "Ip6ReasmOKs")
echo(socket.AF_INET, sys.argv[1], int(sys.argv[2]), [1472, 1473, 4000, 30000, 65507])
echo(socket.AF_INET6, sys.argv[3], int(sys.argv[4]), [1452, 1453, 4000, 65527])
after = counter("/proc/net/snmp", "ReasmOKs"), counter("/proc/net/snmp6", "Ip6ReasmOKs")
print("reassembled", after[0] - before[0], after[1] - before[1])
print("fragmented", counter("/proc/net/snmp", "FragOKs"), counter("/proc/net/snmp6", "Ip6FragOKs"))
"#;
    // In a directory of the test's own: the guest's /tmp is the host's, shared by every
    // test and by the test user.
    let dir = TempDir::new("frag");
    let script = dir.join("client.py");
    std::fs::write(&script, client).unwrap();
    let ping = ping_cmd();
    let out = Usernet::new(&dns).arg("--mtu").arg("1500").sh(&format!(
        "python3 {script} {HOST_IP} {p4} fd75:7365:726e::254 {p6}; \
         timeout 20 {ping} -c 1 -W 5 -s 3000 {GATEWAY_IP} | grep -c '1 received'; \
         timeout 20 {ping} -6 -c 1 -W 5 -s 20000 fd75:7365:726e::1 | grep -c '1 received'",
        script = script.display(),
        p4 = echo4.port,
        p6 = echo6.port
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let want = [
        "1472 same",
        "1473 same",
        "4000 same",
        "30000 same",
        "65507 same",
        "1452 same",
        "1453 same",
        "4000 same",
        "65527 same",
    ];
    assert_eq!(lines[..want.len()], want, "{out}");
    // Fragments both ways: the guest put together the 4 IPv4 and 3 IPv6 echoes beyond its
    // MTU (and the ping replies), and cut its own datagrams.
    let counts = |prefix: &str| -> Vec<u64> {
        let line = lines.iter().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix}: {out}"));
        line.split_whitespace().skip(1).map(|n| n.parse().unwrap()).collect()
    };
    let reassembled = counts("reassembled");
    assert!(reassembled[0] >= 4 && reassembled[1] >= 3, "{reassembled:?}: {out}");
    let fragmented = counts("fragmented");
    assert!(fragmented[0] >= 4 && fragmented[1] >= 3, "{fragmented:?}: {out}");
    assert_eq!(lines[lines.len() - 2..], ["1", "1"], "pings of the gateway: {out}");
}

/// A guest's burst of datagrams of one size to one destination leaves usernet as one
/// segmented send (UDP_SEGMENT, engine/udp_batch.rs), which the host's kernel cuts into the
/// same datagrams again: every datagram reaches the echo server as it was sent, one by one,
/// whole (its sha256 against the copy the guest kept) and in order, in windows whose last is
/// shorter. To the host's loopback over IPv4 and IPv6 (segmented); to a remote host behind
/// a 1500-byte link: over IPv4, 100-byte datagrams segmented 14 at a time and 1,400-byte
/// ones one by one, all with DF (a segmented send beyond the route's MTU would leave its
/// datagrams without it: the remote host counts any that come so, and none may); over
/// IPv6 1,400-byte ones segmented; 3,000-byte ones over IPv6 refused segmented (EMSGSIZE)
/// and sent one by one, which the kernel fragments, and over IPv4 one by one.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_bursts_of_one_size_arrive_datagram_by_datagram() {
    require(&["ip", "dnsmasq", "python3", "nft"]);
    let dns = DnsUpstream::start();
    let echo4 = Server::start(ServerKind::UdpEcho, None);
    let echo6 = Server::start_on(ServerKind::UdpEcho, None, "::1");
    let remote = RemoteHost::new();
    let remote_echo = Server::start_in_on(&remote, ServerKind::UdpEcho, None, "::");
    // Whole IPv4 datagrams to the echo without DF (fragment offset, MF and DF all 0), seen
    // before the kernel puts fragments together (priority -500).
    let nft = format!(
        "ip netns exec {ns} nft add table ip burst && \
         ip netns exec {ns} nft add counter ip burst nodf && \
         ip netns exec {ns} nft add chain ip burst pre '{{ type filter hook prerouting priority -500; }}' && \
         ip netns exec {ns} nft add rule ip burst pre 'ip frag-off & 0x7fff == 0' udp dport {p} counter name nodf",
        ns = remote.ns,
        p = remote_echo.port
    );
    sh(&nft).assert_ok();
    let client = r#"
import hashlib, socket, sys
def burst(family, host, port, size, count, windows):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(5)
    # Each window in one send that the guest's kernel cuts into the datagrams
    # (UDP_SEGMENT): they reach usernet's TAP together, as a bulk sender's do.
    s.setsockopt(socket.SOL_UDP, 103, size)
    same = lost = wrong = reordered = 0
    for window in range(windows):
        sent, order, datagrams = {}, [], []
        for i in range(count):
            n = size // 2 if i == count - 1 else size
            head = b"%03d:%02d:" % (window, i)
            data = head + bytes((window * 13 + i * 7 + k) % 251 for k in range(n - len(head)))
            sent[head] = hashlib.sha256(data).hexdigest()
            order.append(head)
            datagrams.append(data)
        s.send(b"".join(datagrams))
        for _ in range(count):
            try:
                got = s.recv(70000)
            except socket.timeout:
                lost += 1
                continue
            if got[:7] in order and order.index(got[:7]) != 0:
                reordered += 1
            if got[:7] in order:
                order.remove(got[:7])
            if sent.pop(got[:7], None) == hashlib.sha256(got).hexdigest():
                same += 1
            else:
                wrong += 1
    print(family.name, size, "same", same, "wrong", wrong, "lost", lost, "reordered", reordered)
host4, port4, host6, port6, remote4, remote6, rport = sys.argv[1:]
burst(socket.AF_INET, host4, int(port4), 1400, 32, 40)
burst(socket.AF_INET6, host6, int(port6), 1400, 32, 40)
burst(socket.AF_INET, remote4, int(rport), 100, 32, 10)
burst(socket.AF_INET, remote4, int(rport), 1400, 16, 10)
burst(socket.AF_INET6, remote6, int(rport), 1400, 16, 10)
burst(socket.AF_INET, remote4, int(rport), 3000, 16, 10)
burst(socket.AF_INET6, remote6, int(rport), 3000, 16, 10)
"#;
    let dir = TempDir::new("burst");
    let script = dir.join("client.py");
    std::fs::write(&script, client).unwrap();
    let out = Usernet::new(&dns).sh(&format!(
        "python3 {script} {HOST_IP} {p4} fd75:7365:726e::254 {p6} {ip} {ip6} {r}",
        script = script.display(),
        p4 = echo4.port,
        p6 = echo6.port,
        ip = remote.ip,
        ip6 = remote.ip6,
        r = remote_echo.port
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let want = [
        "AF_INET 1400 same 1280 wrong 0 lost 0 reordered 0",
        "AF_INET6 1400 same 1280 wrong 0 lost 0 reordered 0",
        "AF_INET 100 same 320 wrong 0 lost 0 reordered 0",
        "AF_INET 1400 same 160 wrong 0 lost 0 reordered 0",
        "AF_INET6 1400 same 160 wrong 0 lost 0 reordered 0",
        "AF_INET 3000 same 160 wrong 0 lost 0 reordered 0",
        "AF_INET6 3000 same 160 wrong 0 lost 0 reordered 0",
    ];
    assert_eq!(lines, want, "{out}");
    let counter = sh(&format!("ip netns exec {} nft list counter ip burst nodf", remote.ns));
    counter.assert_ok();
    assert!(counter.stdout.contains("packets 0 bytes 0"), "IPv4 datagrams without DF: {counter}");
}

/// A server that answers with bursts sent segmented (UDP_SEGMENT, as QUIC servers send):
/// they reach usernet's flow socket as one coalesced read (UDP_GRO), and the guest gets
/// them as one segmented frame that its kernel cuts (a TAP with USO), or one by one. Either
/// way each datagram arrives as the server cut it, in order (sha256 of each, the last of
/// each window half as long), over IPv4 and IPv6, with 1,400 and 100-byte datagrams.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_bursts_sent_segmented_reach_the_guest_datagram_by_datagram() {
    require(&["ip", "dnsmasq", "python3"]);
    let dns = DnsUpstream::start();
    let burst4 = Server::start(ServerKind::UdpBurst, None);
    let burst6 = Server::start_on(ServerKind::UdpBurst, None, "::1");
    let client = r#"
import sys
sys.path.insert(0, sys.argv[1])
from testserver import check_bursts
port4, port6 = int(sys.argv[2]), int(sys.argv[3])
check_bursts(sys.argv[4], port4, 1400, 40, 30)
check_bursts("fd75:7365:726e::254", port6, 1400, 40, 30)
check_bursts(sys.argv[4], port4, 100, 60, 10)
check_bursts("fd75:7365:726e::254", port6, 1200, 2, 10)
"#;
    let dir = TempDir::new("gro");
    let script = dir.join("client.py");
    std::fs::write(&script, client).unwrap();
    let helpers = common::helper_script();
    let out = Usernet::new(&dns).sh(&format!(
        "python3 {script} {helpers} {p4} {p6} {HOST_IP}",
        script = script.display(),
        helpers = helpers.parent().unwrap().display(),
        p4 = burst4.port,
        p6 = burst6.port,
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    let want = [
        "AF_INET 1400 same 1200 wrong 0 lost 0 reordered 0",
        "AF_INET6 1400 same 1200 wrong 0 lost 0 reordered 0",
        "AF_INET 100 same 600 wrong 0 lost 0 reordered 0",
        "AF_INET6 1200 same 20 wrong 0 lost 0 reordered 0",
    ];
    assert_eq!(lines, want, "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ping_gateway_host_and_remote() {
    require(&["ip", "dnsmasq", "ping", "id"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let ping = ping_cmd();
    if let Some(user) = test_user()
        && !ping_sockets_allowed(&user)
    {
        // Rootless without ping sockets for usernet's group: the gateway still answers;
        // echo to the host and beyond is dropped, and usernet says why, once.
        let out = Usernet::new(&dns).sh(&format!(
            "timeout 20 {ping} -c 2 -W 5 {GATEWAY_IP}; \
             timeout 20 {ping} -c 1 -W 2 {HOST_IP}; timeout 20 {ping} -c 1 -W 2 {ip}; true",
            ip = remote.ip
        ));
        out.assert_ok();
        assert_eq!(out.stdout.matches("2 packets transmitted, 2 ").count(), 1, "{out}");
        assert_eq!(out.stderr.matches("ping_group_range").count(), 1, "one warning: {out}");
        return;
    }
    let out = Usernet::new(&dns).sh(&format!(
        "set -e; \
         timeout 20 {ping} -c 2 -W 5 {GATEWAY_IP}; \
         timeout 20 {ping} -c 2 -W 5 {HOST_IP}; \
         timeout 20 {ping} -c 2 -W 5 host.docker.internal; \
         timeout 20 {ping} -c 2 -W 5 {ip}",
        ip = remote.ip
    ));
    out.assert_ok();
    assert_eq!(out.stdout.matches("2 packets transmitted, 2 ").count(), 4, "{out}");
}
