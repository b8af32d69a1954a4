//! usernet as pasta, rootless, as a user of the test's own, with the command lines its
//! callers really pass (debian 12's podman 4.3.1 has no `--network pasta`, and rootlesskit 2
//! is not packaged there, so the callers' exact argv is run by the test):
//! - current Podman's (containers/common libnetwork/pasta) against a namespace file made
//!   inside `podman unshare`, as Podman makes it: outbound HTTP to the host through
//!   `--map-guest-addr` (sha256), the gateway refused (`--no-map-gw`), DNS through
//!   `--dns-forward`, the published port from the host (sha256), and usernet gone with the
//!   port released once the namespace file is unmounted and removed;
//! - rootlesskit 2's (`--userns`/`--netns` of a process, given addresses, `tap0`);
//! - the address options in both families (IPv6 gateway, DNS, host loopback and host
//!   address);
//! - `pasta --config-net -- COMMAND` with a published port, and the exit status passed on;
//! - mistakes answered as pasta answers them (exit 1), a taken port included.

mod common;

use std::time::{Duration, Instant};

use common::dropin::*;
use common::*;

fn line_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

/// The host's IPv4 default route has an address: `--map-guest-addr` maps to it.
fn host_default_address() -> Option<String> {
    let out = run("ip", &["-4", "-o", "route", "get", "192.0.2.255"]);
    out.stdout.split_whitespace().skip_while(|w| *w != "src").nth(1).map(str::to_string)
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn podman_command_line_in_podman_unshare() {
    require(&["podman", "runuser", "useradd", "newuidmap", "unshare", "nsenter", "busybox", "curl", "dig", "ss"]);
    assert!(
        host_default_address().is_some(),
        "this test needs an IPv4 default route on the host: --map-guest-addr maps to its address"
    );
    let r = Rootless::new("pa");
    podman_config(&r);
    let server = Server::start_on(ServerKind::Http, Some(&r.rootfs.join("www")), "0.0.0.0");
    let port = free_port();
    let state = TempDir::new("pa-state");
    chown(state.path(), USER);
    let www = r.rootfs.join("www");
    // containers/common's createPastaArgs for `podman run -p PORT:80`, word for word.
    let pasta_argv = format!(
        "--config-net -t {port}-{port}:80-80 --dns-forward 169.254.1.1 -u none -T none -U none --no-map-gw \
         --quiet --map-guest-addr 169.254.1.2 --pid {d}/pasta.pid --netns {d}/netns",
        d = state.path().display()
    );
    let script = format!(
        "d={d}; touch $d/netns; unshare --net=$d/netns true || echo unshare-failed; \
         start=$(date +%s%N); ({pasta} {pasta_argv} 2>&1; echo pasta-exit $?) | timeout 20 cat > $d/pasta.out; \
         echo output-closed $?; cat $d/pasta.out; \
         echo pasta-ms $(( ($(date +%s%N) - start) / 1000000 )); \
         p=$(cat $d/pasta.pid); echo pid $p; \
         nsenter --net=$d/netns ip -4 -o addr show | sed 's/^/addr /'; \
         nsenter --net=$d/netns curl -s --max-time 5 http://169.254.1.2:{sp}/f | sha256sum | sed 's/^/outbound /'; \
         nsenter --net=$d/netns curl -s --max-time 5 -o /dev/null -w '%{{http_code}}\\n' http://10.0.2.2:{sp}/f \
           | sed 's/^/gateway /'; \
         nsenter --net=$d/netns dig +short +time=2 +tries=1 @169.254.1.1 host.containers.internal | sed 's/^/dns /'; \
         nsenter --net=$d/netns busybox httpd -f -p 80 -h {www} & h=$!; \
         i=0; until curl -s -o /dev/null http://127.0.0.1:{port}/f || [ $i -ge 50 ]; do sleep 0.1; i=$((i+1)); done; \
         curl -s --max-time 5 http://127.0.0.1:{port}/f | sha256sum | sed 's/^/published /'; \
         kill $h; umount $d/netns; rm $d/netns; \
         i=0; while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         kill -0 $p 2>/dev/null && echo after-rm running || echo after-rm exited",
        d = state.path().display(),
        pasta = r.pasta().display(),
        sp = server.port,
        www = www.display(),
    );
    let child = r
        .command("podman")
        .args(["unshare", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start podman unshare");
    let (code, text) = wait_output(child, Duration::from_secs(90));
    assert_eq!(code, 0, "podman unshare: {text}");
    assert!(!text.contains("unshare-failed"), "{text}");
    assert_eq!(line_value(&text, "pasta-exit"), Some("0"), "{text}");
    // Podman reads pasta's output until it closes (CombinedOutput): once usernet is in the
    // background, nothing of it may hold the caller's stdout or stderr.
    assert_eq!(line_value(&text, "output-closed"), Some("0"), "the caller's output stayed open: {text}");
    assert!(
        text.lines().any(|l| l.starts_with("addr ") && l.contains("10.0.2.100/24")),
        "the namespace's address: {text}"
    );
    assert_eq!(line_value(&text, "outbound").map(first_word), Some(r.file_hash.clone()), "{text}");
    assert_eq!(line_value(&text, "gateway"), Some("000"), "--no-map-gw: the gateway is refused: {text}");
    assert_eq!(line_value(&text, "dns"), Some("169.254.1.2"), "{text}");
    assert_eq!(line_value(&text, "published").map(first_word), Some(r.file_hash.clone()), "{text}");
    assert_eq!(line_value(&text, "after-rm"), Some("exited"), "{text}");
    assert!(!port_listening(port), "port {port} still listening after the namespace went: {text}");
}

/// rootlesskit 2's `--net=pasta` command line, against a process in a user and network
/// namespace of the test user's own, its output read to the end as rootlesskit reads it.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootlesskit2_command_line() {
    require(&["runuser", "useradd", "unshare", "nsenter", "curl", "dig"]);
    let r = Rootless::new("pr");
    let (_dir, server, hash) = serve_random_file("pr-host", "f", 1 << 20);
    let script = format!(
        "unshare --user --map-root-user --net sleep 60 & t=$!; sleep 0.3; \
         exec 3>&1; \
         {{ {pasta} --stderr --ns-ifname=tap0 --mtu=65520 --config-net --address=10.0.2.100 --netmask=24 \
           --gateway=10.0.2.2 --dns-forward=10.0.2.3 --ipv4-only --tcp-ports=none --udp-ports=none \
           --userns=/proc/$t/ns/user --netns=/proc/$t/ns/net 2>&1 3>&-; echo pasta-exit $? >&3; }} \
           | timeout 10 cat >/dev/null; echo output-closed $?; exec 3>&-; \
         p=$(pgrep -n -f -- '--ns-ifname=tap0 --mtu=65520'); \
         nsenter -t $t -U -n --preserve-credentials ip -4 -o addr show tap0 | sed 's/^/tap0 /'; \
         nsenter -t $t -U -n --preserve-credentials ip -o link show tap0 | grep -o 'mtu [0-9]*' | sed 's/^/link /'; \
         nsenter -t $t -U -n --preserve-credentials curl -s --max-time 5 http://10.0.2.2:{sp}/f | sha256sum \
           | sed 's/^/outbound /'; \
         nsenter -t $t -U -n --preserve-credentials dig +short +time=2 +tries=1 @10.0.2.3 host.docker.internal \
           | sed 's/^/dns /'; \
         kill $t; wait $t; \
         i=0; while kill -0 $p 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
         kill -0 $p 2>/dev/null && echo after-exit running || echo after-exit exited",
        pasta = r.pasta().display(),
        sp = server.port,
    );
    let (code, text) = run_script(r.command("sh"), &script, Duration::from_secs(90));
    assert_eq!(code, 0, "{text}");
    assert_eq!(line_value(&text, "pasta-exit"), Some("0"), "{text}");
    // rootlesskit reads pasta's output to its end (Go's CombinedOutput): the background
    // usernet must not keep it open, --stderr or not.
    assert_eq!(line_value(&text, "output-closed"), Some("0"), "the caller's output still open: {text}");
    assert!(line_value(&text, "tap0").is_some_and(|l| l.contains("10.0.2.100/24")), "{text}");
    assert_eq!(line_value(&text, "link"), Some("mtu 65520"), "{text}");
    // Without --no-map-gw the gateway is the host's loopback.
    assert_eq!(line_value(&text, "outbound").map(first_word), Some(hash), "{text}");
    assert_eq!(line_value(&text, "dns"), Some("10.0.2.2"), "{text}");
    assert_eq!(line_value(&text, "after-exit"), Some("exited"), "usernet stays after its namespace's process: {text}");
}

/// pasta's address options in both families, each given once per family as pasta takes them,
/// with the IPv6 addresses newer containers/common defines (fc00::1 the gateway, fc00::2 for
/// `--map-guest-addr`, fc00::3 the namespace's): the route through `-g`'s address, the
/// host's [::1] and 127.0.0.1 through `--map-host-loopback`'s (with `--no-map-gw`), the
/// host's own addresses through `--map-guest-addr`'s, an address beyond the /64 through the
/// route, DNS on `--dns-forward`'s, each download by sha256; both gateways and the /64's
/// ::254 closed. The "host" is a namespace of
/// the test's own, with default routes in both families, so what `--map-guest-addr` maps to
/// does not depend on this machine's routes.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn address_options_in_both_families() {
    require(&["runuser", "useradd", "unshare", "nsenter", "curl", "dig", "ip"]);
    let host = RemoteHost::new();
    let inner = format!("{}r", host.ns);
    let via6 = host.ip6.replace("::2", "::1");
    host.exec(&["ip", "route", "add", "default", "via", &host.host_ip, "dev", &inner]).assert_ok();
    host.exec(&["ip", "-6", "route", "add", "default", "via", &via6, "dev", &inner]).assert_ok();
    let r = Rootless::new("p6");
    let dir = TempDir::new("p6-host");
    write_random_file(&dir.join("f"), 1 << 20);
    let hash = sha256_file(&dir.join("f"));
    let serve = |bind: &str| Server::start_in_on(&host, ServerKind::Http, Some(dir.path()), bind);
    let (lo4, lo6, own4, own6) = (serve("127.0.0.1"), serve("::1"), serve(&host.ip), serve(&host.ip6));
    let script = format!(
        "unshare --user --map-root-user --net sleep 60 & t=$!; sleep 0.3; \
         ns() {{ nsenter -t $t -U -n --preserve-credentials \"$@\"; }}; \
         {pasta} --config-net -a fc00::3 -g fc00::1 --dns-forward 169.254.1.1 --dns-forward fc00::53 \
           --map-host-loopback fc00::5 --map-host-loopback 169.254.1.5 --map-guest-addr fc00::2 \
           --map-guest-addr 169.254.1.2 --no-map-gw -t none -u none -T none -U none \
           --userns=/proc/$t/ns/user --netns=/proc/$t/ns/net; echo pasta-exit $?; \
         ns ip -6 route show default | sed 's/^/route6 /'; \
         ns ip -6 -o addr show scope global | sed 's/^/addr6 /'; \
         ns curl -s --max-time 5 -g 'http://[fc00::5]:{lo6}/f' | sha256sum | sed 's/^/loopback6 /'; \
         ns curl -s --max-time 5 http://169.254.1.5:{lo4}/f | sha256sum | sed 's/^/loopback4 /'; \
         ns curl -s --max-time 5 -g 'http://[fc00::2]:{own6}/f' | sha256sum | sed 's/^/own6 /'; \
         ns curl -s --max-time 5 http://169.254.1.2:{own4}/f | sha256sum | sed 's/^/own4 /'; \
         ns curl -s --max-time 5 -g 'http://[{ip6}]:{own6}/f' | sha256sum | sed 's/^/off-link6 /'; \
         ns dig +short +time=2 +tries=1 @fc00::53 host.containers.internal AAAA | sed 's/^/dns6 /'; \
         ns dig +short +time=2 +tries=1 @169.254.1.1 host.containers.internal A | sed 's/^/dns4 /'; \
         ns curl -s --max-time 3 -o /dev/null -w '%{{http_code}}\\n' -g 'http://[fc00::254]:{lo6}/f' \
           | sed 's/^/host6 /'; \
         ns curl -s --max-time 3 -o /dev/null -w '%{{http_code}}\\n' -g 'http://[fc00::1]:{lo6}/f' \
           | sed 's/^/ipv6-gateway /'; \
         ns curl -s --max-time 3 -o /dev/null -w '%{{http_code}}\\n' http://10.0.2.2:{lo4}/f | sed 's/^/gateway /'; \
         kill $t; wait $t; echo done",
        pasta = r.pasta().display(),
        lo4 = lo4.port,
        lo6 = lo6.port,
        own4 = own4.port,
        own6 = own6.port,
        ip6 = host.ip6,
    );
    let (code, text) = run_script(r.command_in_netns(&host.ns, "sh"), &script, Duration::from_secs(90));
    assert_eq!(code, 0, "{text}");
    assert_eq!(line_value(&text, "pasta-exit"), Some("0"), "{text}");
    assert!(line_value(&text, "route6").is_some_and(|l| l.starts_with("default via fc00::1 ")), "{text}");
    assert!(line_value(&text, "addr6").is_some_and(|l| l.contains("fc00::3/64")), "{text}");
    assert_eq!(line_value(&text, "loopback6").map(first_word), Some(hash.clone()), "[::1]: {text}");
    assert_eq!(line_value(&text, "loopback4").map(first_word), Some(hash.clone()), "127.0.0.1: {text}");
    assert_eq!(line_value(&text, "own6").map(first_word), Some(hash.clone()), "{}: {text}", host.ip6);
    assert_eq!(line_value(&text, "own4").map(first_word), Some(hash.clone()), "{}: {text}", host.ip);
    // Beyond the /64: through the route's next hop, fc00::1, which usernet answers for.
    assert_eq!(line_value(&text, "off-link6").map(first_word), Some(hash), "{}: {text}", host.ip6);
    assert_eq!(line_value(&text, "dns6"), Some("fc00::5"), "{text}");
    assert_eq!(line_value(&text, "dns4"), Some("169.254.1.5"), "{text}");
    assert_eq!(line_value(&text, "host6"), Some("000"), "::254 is no host address here: {text}");
    assert_eq!(line_value(&text, "ipv6-gateway"), Some("000"), "the IPv6 gateway is no host address: {text}");
    assert_eq!(line_value(&text, "gateway"), Some("000"), "--map-host-loopback and --no-map-gw: {text}");
}

/// pasta's defaults for TCP, `-t auto -T auto`: a host service on the host's loopback
/// reached from the namespace's loopback, a service started in the namespace published on the
/// host as it appears (and unpublished when it goes); and a fixed `-T` port.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn tcp_auto_forwarding_both_ways() {
    require(&["runuser", "useradd", "unshare", "nsenter", "curl", "busybox", "ss", "socat", "python3"]);
    let r = Rootless::new("pt");
    // auto leaves the ephemeral range alone: the host's services sit below it.
    let dir = TempDir::new("pt-host");
    write_random_file(&dir.join("f"), 1 << 20);
    let hash = sha256_file(&dir.join("f"));
    let server = Server::start_at_service_port(ServerKind::Http, Some(dir.path()));
    let echo = Server::start_at_service_port(ServerKind::UdpEcho, None);
    let (_dir2, server2, hash2) = serve_random_file("pt-host2", "f", 1 << 19);
    let port = free_port();
    let uport = free_port();
    let www = r.rootfs.join("www");
    // One datagram answered, then gone: nothing left holding the script's output.
    let udp_once = format!(
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('0.0.0.0', {uport})); \
         d, a = s.recvfrom(100); s.sendto(b'pong-ns', a)"
    );
    let script = format!(
        "unshare --user --map-root-user --net sleep 60 & t=$!; sleep 0.3; \
         ns() {{ nsenter -t $t -U -n --preserve-credentials \"$@\"; }}; \
         {pasta} --config-net -P {rt}/auto.pid --userns=/proc/$t/ns/user --netns=/proc/$t/ns/net; \
         echo auto-exit $?; \
         i=0; until ns curl -s -o /dev/null http://127.0.0.1:{sp}/f || [ $i -ge 50 ]; do sleep 0.1; i=$((i+1)); done; \
         ns curl -s --max-time 5 http://127.0.0.1:{sp}/f | sha256sum | sed 's/^/to-host /'; \
         echo udp-to-host $(echo ping-host | ns socat -t 2 - UDP:127.0.0.1:{ep}); \
         nsenter -t $t -U -n --preserve-credentials python3 -c \"{udp_once}\" & u=$!; \
         i=0; until ss -Hlun \"sport = :{uport}\" | grep -q {uport} || [ $i -ge 50 ]; do sleep 0.1; i=$((i+1)); done; \
         echo udp-to-ns $(echo ping | socat -t 2 - UDP:127.0.0.1:{uport}); kill $u 2>/dev/null; \
         nsenter -t $t -U -n --preserve-credentials busybox httpd -f -p {port} -h {www} & h=$!; \
         i=0; until curl -s -o /dev/null http://127.0.0.1:{port}/f || [ $i -ge 50 ]; do sleep 0.1; i=$((i+1)); done; \
         curl -s --max-time 5 http://127.0.0.1:{port}/f | sha256sum | sed 's/^/to-ns /'; \
         kill $h; i=0; while ss -Hltn \"sport = :{port}\" | grep -q {port} && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; \
         ss -Hltn \"sport = :{port}\" | grep -q {port} && echo after-stop listening || echo after-stop released; \
         a=$(cat {rt}/auto.pid); kill $a; i=0; while kill -0 $a 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; \
         {pasta} --config-net -t none -T {sp2} -U none -u none --userns=/proc/$t/ns/user --netns=/proc/$t/ns/net; \
         echo fixed-exit $?; \
         ns curl -s --max-time 5 http://127.0.0.1:{sp2}/f | sha256sum | sed 's/^/fixed-port /'; \
         ns curl -s --max-time 2 -o /dev/null -w '%{{http_code}}\\n' http://127.0.0.1:{sp}/f | sed 's/^/not-given /'; \
         kill $t; wait $t; echo done",
        pasta = r.pasta().display(),
        rt = r.runtime.display(),
        sp = server.port,
        sp2 = server2.port,
        ep = echo.port,
        www = www.display(),
    );
    let (code, text) = run_script(r.command("sh"), &script, Duration::from_secs(90));
    assert_eq!(code, 0, "{text}");
    assert_eq!(line_value(&text, "auto-exit"), Some("0"), "{text}");
    assert_eq!(line_value(&text, "to-host").map(first_word), Some(hash), "-T auto: {text}");
    assert_eq!(line_value(&text, "to-ns").map(first_word), Some(r.file_hash.clone()), "-t auto: {text}");
    assert_eq!(line_value(&text, "after-stop"), Some("released"), "-t auto: {text}");
    assert_eq!(line_value(&text, "udp-to-host"), Some("ping-host"), "-U auto: {text}");
    assert_eq!(line_value(&text, "udp-to-ns"), Some("pong-ns"), "-u auto: {text}");
    assert_eq!(line_value(&text, "fixed-exit"), Some("0"), "{text}");
    assert_eq!(line_value(&text, "fixed-port").map(first_word), Some(hash2), "-T PORT: {text}");
    assert_eq!(line_value(&text, "not-given"), Some("000"), "only the -T port given: {text}");
}

/// `pasta --config-net -t PORT:80 -- COMMAND`: COMMAND's network, its published port, its
/// DNS, its exit status.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn command_mode_with_a_published_port() {
    require(&["runuser", "useradd", "newuidmap", "busybox", "curl", "getent"]);
    let r = Rootless::new("pc");
    let (dir, server, hash) = serve_random_file("pc-host", "f", 1 << 20);
    let server6 = Server::start_on(ServerKind::Http, Some(dir.path()), "::1");
    let port = free_port();
    let www = r.rootfs.join("www");
    let stop = www.join("stop");
    let script = format!(
        "ip -4 -o addr show | sed 's/^/addr /'; getent ahostsv4 host.docker.internal | head -n1 | sed 's/^/dns /'; \
         getent ahostsv6 host.docker.internal | head -n1 | sed 's/^/dns6 /'; \
         curl -s --max-time 5 http://10.0.2.2:{sp}/f | sha256sum | sed 's/^/outbound /'; \
         ip neigh show 10.0.2.2 | sed 's/^/neigh /'; \
         ip -6 -o addr show scope global | sed 's/^/addr6 /'; \
         curl -6 -s --max-time 5 http://host.docker.internal:{sp6}/f | sha256sum | sed 's/^/outbound6 /'; \
         busybox httpd -p 80 -h {www}; echo serving; \
         i=0; while [ ! -e {stop} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; exit 7",
        sp = server.port,
        sp6 = server6.port,
        www = www.display(),
        stop = stop.display(),
    );
    let child = r
        .command(&r.pasta().to_string_lossy())
        .args(["--config-net", "-M", "02:aa:bb:cc:dd:ee", "-t", &format!("{port}:80"), "--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start pasta");
    let published = fetch_hash(&format!("http://127.0.0.1:{port}/f"), Duration::from_secs(20));
    let over6 = fetch_hash(&format!("http://[::1]:{port}/f"), Duration::from_secs(5));
    r.release_guest();
    let (code, text) = wait_output(child, Duration::from_secs(60));
    assert_eq!(code, 7, "COMMAND's exit status: {text}");
    assert_eq!(published, r.file_hash, "published port: {text}");
    assert!(text.lines().any(|l| l.starts_with("addr ") && l.contains("10.0.2.100/24")), "{text}");
    assert_eq!(line_value(&text, "dns").map(first_word).as_deref(), Some("10.0.2.2"), "{text}");
    assert_eq!(line_value(&text, "outbound").map(first_word), Some(hash.clone()), "{text}");
    // -M: usernet's MAC address, the gateway's as the namespace learnt it.
    assert!(line_value(&text, "neigh").is_some_and(|n| n.contains("lladdr 02:aa:bb:cc:dd:ee")), "{text}");
    // IPv6 on usernet's /64: the host's [::1] by host.docker.internal's AAAA (::254).
    assert!(text.lines().any(|l| l.starts_with("addr6 ") && l.contains("fd75:7365:726e::2/64")), "{text}");
    assert_eq!(line_value(&text, "dns6").map(first_word).as_deref(), Some("fd75:7365:726e::254"), "{text}");
    assert_eq!(line_value(&text, "outbound6").map(first_word), Some(hash), "{text}");
    assert_eq!(over6, r.file_hash, "published port over [::1]: {text}");
    assert!(!port_listening(port), "port {port} still listening after COMMAND exited");
}

/// Mistakes, as pasta answers them: the message and exit 1; nothing left running.
#[test]
fn mistakes_exit_1_with_pastas_words() {
    let bin = TempDir::new("pm-bin");
    let pasta = bin.join("pasta");
    std::os::unix::fs::symlink(usernet_bin(), &pasta).expect("symlink pasta");
    let run_pasta = |args: &[&str]| run_bounded(std::process::Command::new(&pasta).args(args), Duration::from_secs(20));
    for (args, words) in [
        (&["--bogus"][..], "pasta: unrecognized option '--bogus'"),
        (&["-t", "99999", "--", "true"][..], "Invalid port specifier 99999"),
        (&["-u", "all", "--", "true"][..], "-u all"),
        (&["-U", "127.0.0.1/53", "--", "true"][..], "loopback only"),
        (&["--netns"][..], "pasta: option '--netns' requires an argument"),
    ] {
        let out = run_pasta(args);
        assert_eq!(out.code, 1, "{args:?}: {}", out.stderr);
        assert!(out.stderr.contains(words), "{args:?}: {}", out.stderr);
    }
    // A taken port: one line, exit 1, before anything starts.
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let start = Instant::now();
    let out = run_pasta(&["--config-net", "-t", &port.to_string(), "--", "true"]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("Failed to bind") && out.stderr.contains(&port.to_string()), "{}", out.stderr);
    assert!(start.elapsed() < Duration::from_secs(10));
    let out = run_pasta(&["--version"]);
    assert_eq!(out.code, 0);
    assert!(out.stdout.starts_with("pasta"), "{}", out.stdout);
}

/// `-o ADDR` and `-o ADDR6` (pasta's outbound source addresses, one per family), and
/// `--outbound-if4`/`--outbound-if6` naming their interface: the remote host sees the
/// namespace's connections come from them, as root and rootless, and from the kernel's choice
/// without them.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn outbound_addresses_of_both_families() {
    require(&["ip", "socat", "ss", "runuser", "useradd", "newuidmap"]);
    let w = OutboundWorld::new();
    let some = |(a, b): &(String, String)| (Some(a.clone()), Some(b.clone()));
    let pasta = usernet_bin();
    let out = run(&pasta.to_string_lossy(), &["pasta", "--config-net", "--", "sh", "-c", &w.script()]);
    assert_eq!(peers(&out.stdout), some(&w.chosen), "without -o: {out}");
    let args = ["pasta", "--config-net", "-o", &w.out.0, "-o", &w.out.1, "--", "sh", "-c", &w.script()];
    let out = run(&pasta.to_string_lossy(), &args);
    assert_eq!(peers(&out.stdout), some(&w.out), "with -o: {out}");
    let args = ["pasta", "--config-net", "--outbound-if4", &w.dummy, "--outbound-if6", &w.dummy, "--", "sh", "-c"];
    let out = run(&pasta.to_string_lossy(), &[&args[..], &[&w.script()]].concat());
    assert_eq!(peers(&out.stdout), some(&w.out), "with --outbound-if4 and --outbound-if6: {out}");
    // Rootless, as Podman starts it.
    let r = Rootless::new("po");
    let (code, text) = run_script(
        r.command("sh"),
        &format!("{} --config-net -o {} -o {} -- sh -c '{}'", r.pasta().display(), w.out.0, w.out.1, w.script()),
        Duration::from_secs(30),
    );
    assert_eq!(code, 0, "{text}");
    assert_eq!(peers(&text), some(&w.out), "rootless, with -o: {text}");
}
