//! `usernet run` over IPv6, with real clients in the guest and IPv6 only where it matters
//! (`curl -6`, `ping -6`, AAAA questions): the guest's address and routes, the host's
//! loopback through the host address and `host.docker.internal`, a remote host (a namespace
//! of the test's own) reached through the host's IPv6 routes, UDP, ping, DNS, a destination
//! the host has no route to, and `--ipv4-only`. Transfers are checked with sha256.

mod common;

use common::*;
use std::time::Duration;

/// usernet's IPv6 addresses in the default prefix (crates/core/src/config.rs).
const HOST6: &str = "fd75:7365:726e::254";
const GATEWAY6: &str = "fd75:7365:726e::1";
const GUEST6: &str = "fd75:7365:726e::2";

const SIZE: usize = 8 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn the_guest_has_its_address_and_reaches_the_hosts_loopback_by_address_and_name() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("v6dl");
    write_random_file(&dir.join("f"), SIZE);
    let want = sha256_file(&dir.join("f"));
    let http = Server::start_on(ServerKind::Http, Some(dir.path()), "::1");
    let out = Usernet::new(&dns).timeout(TIMEOUT).sh(&format!(
        "ip -6 addr show dev eth0 scope global; ip -6 route show default
         timeout 60 curl -6 -sSf http://[{HOST6}]:{p}/f | sha256sum
         timeout 60 curl -6 -sSf http://host.docker.internal:{p}/f | sha256sum
         timeout 60 curl -6 -sSf -T /proc/self/exe http://host.docker.internal:{p}/up >/dev/null && echo upload-ok
         ras() {{ awk '$1 == \"Icmp6InRouterAdvertisements\" {{print $2}}' /proc/net/snmp6; }}
         i=0; while [ \"$(ras)\" = 0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
         echo ras $(ras) defrtr $(cat /proc/sys/net/ipv6/conf/eth0/accept_ra_defrtr)
         ip -6 route show default | sed 's/^/after-ra /'",
        p = http.port
    ));
    out.assert_ok();
    assert!(out.stdout.contains(&format!("inet6 {GUEST6}/64")), "eth0's address: {out}");
    assert_eq!(out.stdout.matches("inet6 ").count(), 1, "one global address, none made by SLAAC: {out}");
    assert!(out.stdout.contains("default via fe80::1 dev eth0"), "the route: {out}");
    // Once usernet's router advertisement came, the route is still the one usernet set:
    // the guest takes no default route from advertisements (each would fail as a
    // duplicate, and log a warning in the host's kernel log).
    assert!(!out.stdout.contains("ras 0 "), "no router advertisement came: {out}");
    assert!(out.stdout.contains(" defrtr 0"), "{out}");
    let after: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("after-ra ")).collect();
    assert_eq!(after.len(), 1, "{out}");
    assert!(after[0].starts_with("after-ra default via fe80::1 dev eth0"), "{out}");
    assert_eq!(hex_hashes(&out.stdout), vec![want.clone(), want], "{out}");
    assert!(out.stdout.contains("upload-ok"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_remote_host_over_ipv6_through_the_hosts_routes() {
    require(&["ip", "dnsmasq", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let dir = TempDir::new("v6remote");
    write_random_file(&dir.join("f"), SIZE);
    let want = sha256_file(&dir.join("f"));
    let http = Server::start_in_on(&remote, ServerKind::Http, Some(dir.path()), "::");
    let echo = Server::start_in_on(&remote, ServerKind::UdpEcho, None, "::");
    // A UDP client over IPv6: 20 datagrams of 1,000 bytes each way, all of them back whole.
    let udp = format!(
        "import socket, hashlib
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.settimeout(5)
s.connect(('{ip}', {port}))
sent, got = hashlib.sha256(), hashlib.sha256()
for i in range(20):
    d = bytes([i]) * 1000; sent.update(d); s.send(d); got.update(s.recv(2000))
print('udp', sent.hexdigest() == got.hexdigest())",
        ip = remote.ip6,
        port = echo.port
    );
    std::fs::write(dir.join("udp.py"), udp).unwrap();
    let out = Usernet::new(&dns).timeout(TIMEOUT).sh(&format!(
        "timeout 60 curl -6 -sSf http://[{ip}]:{p}/f | sha256sum
         timeout 30 {py} {script}",
        ip = remote.ip6,
        p = http.port,
        py = python().display(),
        script = dir.join("udp.py").display()
    ));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
    assert!(out.stdout.contains("udp True"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ping_over_ipv6() {
    require(&["ip", "dnsmasq", "ping"]);
    let dns = DnsUpstream::start();
    let remote = RemoteHost::new();
    let ping = ping_cmd();
    // The gateway answers itself; the host address and beyond go through usernet's ICMPv6
    // sockets (ping sockets for its group, or raw ones as root).
    let beyond = test_user().is_none_or(|user| ping_sockets_allowed(&user));
    let script = if beyond {
        format!(
            "set -e; timeout 20 {ping} -6 -c 2 -W 5 {GATEWAY6}; timeout 20 {ping} -6 -c 2 -W 5 {HOST6}; \
             timeout 20 {ping} -6 -c 2 -W 5 {ip}",
            ip = remote.ip6
        )
    } else {
        format!("set -e; timeout 20 {ping} -6 -c 2 -W 5 {GATEWAY6}")
    };
    let out = Usernet::new(&dns).sh(&script);
    out.assert_ok();
    let want = if beyond { 3 } else { 1 };
    assert_eq!(out.stdout.matches("2 packets transmitted, 2 ").count(), want, "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dns_answers_aaaa_itself_and_forwards_the_rest() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let out = Usernet::new(&dns).sh(&format!(
        "dig +short +time=5 AAAA host.docker.internal; dig +short +time=5 AAAA gateway.docker.internal
         dig +short +time=5 AAAA dual.test; dig +short +time=5 AAAA aaaa-only.test
         dig +short +time=5 @{GATEWAY6} AAAA aaaa-only.test; dig +short +tcp +time=5 @{GATEWAY6} A remote.test"
    ));
    out.assert_ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        lines,
        vec![HOST6, GATEWAY6, "2001:db8::11", "2001:db8::10", "2001:db8::10", "203.0.113.10"],
        "built-in AAAA, forwarded AAAA, and the gateway's DNS over IPv6 (UDP and TCP): {out}"
    );
}

/// A destination the host has no route to: the guest hears it at once (an ICMPv6 no route
/// makes curl fail with "couldn't connect", exit 7, long before its 20 s timeout, 28).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_destination_without_a_route_on_the_host_is_unreachable() {
    require(&["ip", "dnsmasq", "curl"]);
    let dns = DnsUpstream::start();
    let _route = UnreachableRoute6::new();
    let out = Usernet::new(&dns).sh("curl -6 -sS -m 20 http://[2001:db8:dead::1]/; echo exit=$?");
    out.assert_ok();
    assert!(out.stdout.contains("exit=7"), "{out}");
}

/// An `unreachable` IPv6 route to 2001:db8:dead::/48 on the host while it lives.
struct UnreachableRoute6;

impl UnreachableRoute6 {
    fn new() -> UnreachableRoute6 {
        let _ = run("ip", &["-6", "route", "del", "unreachable", "2001:db8:dead::/48"]);
        must("ip", &["-6", "route", "add", "unreachable", "2001:db8:dead::/48"]);
        UnreachableRoute6
    }
}

impl Drop for UnreachableRoute6 {
    fn drop(&mut self) {
        let _ = run("ip", &["-6", "route", "del", "unreachable", "2001:db8:dead::/48"]);
    }
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ipv4_only_leaves_the_guest_without_ipv6() {
    require(&["ip", "dnsmasq", "dig"]);
    let dns = DnsUpstream::start();
    let out = Usernet::new(&dns)
        .arg("--ipv4-only")
        .sh("sleep 1; ip -6 addr show dev eth0 scope global; ip -6 route show default; dig +short AAAA host.docker.internal; echo done");
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "done", "no address, no route, no AAAA: {out}");
}

/// `--ipv6-only`: eth0 has no IPv4 address or route, the gateway's DNS is its IPv6 address
/// and gives no A records (its own names' or forwarded), AAAA as before, and the host's
/// loopback is reached over IPv6 by name, the download whole.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ipv6_only_leaves_the_guest_without_ipv4() {
    require(&["ip", "dnsmasq", "dig", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("v6only");
    write_random_file(&dir.join("f"), SIZE);
    let want = sha256_file(&dir.join("f"));
    let http = Server::start_on(ServerKind::Http, Some(dir.path()), "::1");
    let out = Usernet::new(&dns).arg("--ipv6-only").timeout(TIMEOUT).sh(&format!(
        "echo v4: $(ip -4 addr show dev eth0) $(ip -4 route show default) end
         grep '^nameserver' /etc/resolv.conf
         echo a: $(dig +short +time=5 A host.docker.internal) $(dig +short +time=5 A dual.test) end
         dig +short +time=5 AAAA host.docker.internal; dig +short +time=5 AAAA dual.test
         timeout 60 curl -sSf http://host.docker.internal:{p}/f | sha256sum",
        p = http.port
    ));
    out.assert_ok();
    assert!(out.stdout.contains("v4: end"), "no IPv4 address or route: {out}");
    assert!(out.stdout.contains(&format!("nameserver {GATEWAY6}")), "{out}");
    assert!(out.stdout.contains("a: end"), "no A records: {out}");
    assert!(out.stdout.contains(&format!("\n{HOST6}\n2001:db8::11\n")), "AAAA as before: {out}");
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
}

/// A guest that asks by stateless DHCPv6, as usernet's router advertisement invites (the O
/// flag): ISC dhclient's Information-Request gets the gateway as DNS server (dhclient hands
/// the options to its script, here one that prints them; nothing of the host changes). It
/// starts once eth0's link-local address is usable (its duplicate address detection done).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn stateless_dhcpv6_gives_the_dns_server() {
    use std::os::unix::fs::PermissionsExt;
    require(&["ip", "dnsmasq", "dhclient"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("dhcp6");
    let script = dir.join("script");
    std::fs::write(&script, "#!/bin/sh\necho \"dhcp6 servers=$new_dhcp6_name_servers\"\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Usernet::new(&dns).sh(&format!(
        "for i in $(seq 1 100); do \
           ip -6 addr show dev eth0 scope link | grep inet6 | grep -qv tentative && break; sleep 0.1; \
         done; timeout 20 dhclient -d -6 -S -sf {} -lf /dev/null -pf /dev/null eth0; echo exit=$?",
        script.display()
    ));
    out.assert_ok();
    assert!(out.stdout.contains("exit=0"), "{out}");
    assert!(out.stdout.contains(&format!("dhcp6 servers={GATEWAY6}")), "{out}");
}
