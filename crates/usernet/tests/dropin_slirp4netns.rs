//! usernet as slirp4netns, started by the real callers, rootless, as a user of the test's
//! own: rootlesskit (`--net=slirp4netns --port-driver=slirp4netns`, ports added and removed
//! with `rootlessctl`) and podman (`--network slirp4netns:port_handler=slirp4netns`, with
//! podman's defaults, which close the host's loopback, and with `allow_host_loopback=true`).
//! The caller finds usernet as `slirp4netns`: a symlink to a copy of the binary under test.
//! Each checks outbound HTTP to a server on the host's loopback through 10.0.2.2 (sha256 of
//! the body), DNS through 10.0.2.3, a published port from the host (sha256), and that
//! nothing is left running or listening afterwards.

mod common;

use std::time::Duration;

use common::dropin::*;
use common::*;

/// What the guest does: DNS through usernet, a download from the host's loopback through
/// the gateway (or the refusal, when the caller closed it), then serve /www on port 80
/// until the test says stop (bounded to 60 s).
fn guest_script(host_port: u16, host_port6: u16) -> String {
    format!(
        "nslookup host.docker.internal 10.0.2.3 2>&1 | grep -c 10.0.2.2 | sed 's/^/dns-answers /'; \
         wget -q -O - http://10.0.2.2:{host_port}/f | sha256sum | sed 's/^/outbound /'; \
         i=0; until ip -6 -o addr show scope global | grep 'inet6 fd00::' | grep -qv tentative || [ $i -ge 100 ]; \
         do sleep 0.1; i=$((i+1)); done; \
         ip -6 -o addr show scope global | grep -v tentative | grep -c 'inet6 fd00::' | sed 's/^/slaac /'; \
         nslookup -type=AAAA host.docker.internal fd00::3 2>&1 | grep -c fd00::2 | sed 's/^/dns6-answers /'; \
         wget -q -O - http://[fd00::2]:{host_port6}/f | sha256sum | sed 's/^/outbound6 /'; \
         httpd -p 80 -h /www; echo serving; \
         i=0; while [ ! -e /www/stop ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done"
    )
}

fn line_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootlesskit_with_usernet_as_slirp4netns() {
    require(&["rootlesskit", "rootlessctl", "runuser", "useradd", "newuidmap", "busybox", "curl", "ss"]);
    let r = Rootless::new("rk");
    let (_dir, server, hash) = serve_random_file("rk-host", "f", 1 << 20);
    let (port, port2) = (free_port(), free_port());
    let state = TempDir::new("rk-state");
    chown(state.path(), USER);
    let stop = r.rootfs.join("www/stop");
    // rootlesskit's child: its /www is the test's rootfs www (same files, same stop file).
    let script = format!(
        "cd {www}; busybox nslookup host.docker.internal 10.0.2.3 2>&1 | grep -c 10.0.2.2 | sed 's/^/dns-answers /'; \
         ip -4 -o addr show tap0 | sed 's/^/tap0 /'; \
         curl -s --max-time 5 http://10.0.2.2:{host}/f | sha256sum | sed 's/^/outbound /'; \
         busybox httpd -f -p 80 -h {www} & h=$!; echo serving; \
         i=0; while [ ! -e {stop} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; kill $h",
        www = r.rootfs.join("www").display(),
        host = server.port,
        stop = stop.display(),
    );
    let child = r
        .command("rootlesskit")
        .args(["--net=slirp4netns", "--port-driver=slirp4netns", "--copy-up=/etc", "--disable-host-loopback"])
        .arg(format!("--slirp4netns-binary={}", r.slirp4netns().display()))
        .arg(format!("--state-dir={}", state.join("rk").display()))
        .args(["--publish", &format!("127.0.0.1:{port}:80/tcp")])
        .args(["--", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start rootlesskit");

    // The port rootlesskit published at start, then one added and removed with rootlessctl.
    let published = fetch_hash(&format!("http://127.0.0.1:{port}/f"), Duration::from_secs(30));
    let api = state.join("rk/api.sock");
    let ctl = |args: &[&str]| {
        let mut c = r.command("rootlessctl");
        c.arg(format!("--socket={}", api.display())).args(args);
        run_bounded(&mut c, Duration::from_secs(20))
    };
    let added = ctl(&["add-ports", &format!("127.0.0.1:{port2}:80/tcp")]);
    let added_hash = fetch_hash(&format!("http://127.0.0.1:{port2}/f"), Duration::from_secs(10));
    let id = added.stdout.trim().to_string();
    let removed = ctl(&["remove-ports", &id]);
    let gone = !port_listening(port2);
    r.release_guest();
    let (code, text) = wait_output(child, Duration::from_secs(30));

    assert_eq!(code, 0, "rootlesskit: {text}");
    assert_eq!(line_value(&text, "tap0 ").map(|l| l.contains("10.0.2.100/24")), Some(true), "{text}");
    assert_eq!(line_value(&text, "dns-answers "), Some("1"), "DNS through 10.0.2.3: {text}");
    // --disable-host-loopback: the host's loopback is closed to the guest.
    assert_ne!(line_value(&text, "outbound ").map(first_word), Some(hash.clone()), "{text}");
    assert_eq!(published, r.file_hash, "published port: {text}");
    assert!(added.success(), "rootlessctl add-ports: {} {}", added.stdout, added.stderr);
    assert_eq!(added_hash, r.file_hash, "port added with rootlessctl");
    assert!(removed.success(), "rootlessctl remove-ports {id}: {}", removed.stderr);
    assert!(gone, "port {port2} still listening after remove-ports");
    assert!(!port_listening(port), "port {port} still listening after rootlesskit exited");
    assert!(pids_matching(&r.slirp4netns().to_string_lossy()).is_empty(), "usernet left running");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootlesskit_outbound_through_the_host_loopback() {
    require(&["rootlesskit", "runuser", "useradd", "newuidmap", "busybox", "curl"]);
    let r = Rootless::new("rk2");
    let (_dir, server, hash) = serve_random_file("rk2-host", "f", 1 << 20);
    let script = format!("curl -s --max-time 5 http://10.0.2.2:{}/f | sha256sum | sed 's/^/outbound /'", server.port);
    let mut c = r.command("rootlesskit");
    c.args(["--net=slirp4netns", "--copy-up=/etc"])
        .arg(format!("--slirp4netns-binary={}", r.slirp4netns().display()))
        .args(["--", "sh", "-c", &script]);
    let out = run_bounded(&mut c, Duration::from_secs(60));
    assert_eq!(out.code, 0, "{} {}", out.stdout, out.stderr);
    assert_eq!(line_value(&out.stdout, "outbound ").map(first_word), Some(hash), "{}", out.stdout);
}

/// One `podman run` of the guest script with a published port; what the guest printed and
/// the published port's answer.
fn podman_run(r: &Rootless, network: &str, host_port: u16, host_port6: u16) -> (i32, String, String, u16) {
    let port = free_port();
    let name = format!("usernet-{}", unique_id());
    let child = r
        .command("podman")
        .args(["run", "--rm", "--name", &name, "--network", network])
        .args(["-p", &format!("127.0.0.1:{port}:80")])
        .arg("--rootfs")
        .arg(r.rootfs.path())
        .args(["/bin/sh", "-c", &guest_script(host_port, host_port6)])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start podman");
    let published = fetch_hash(&format!("http://127.0.0.1:{port}/f"), Duration::from_secs(60));
    r.release_guest();
    let (code, text) = wait_output(child, Duration::from_secs(60));
    let _ = std::fs::remove_file(r.rootfs.join("www/stop"));
    (code, text, published, port)
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn podman_with_usernet_as_slirp4netns() {
    require(&["podman", "runc", "runuser", "useradd", "newuidmap", "busybox", "curl", "ss"]);
    let r = Rootless::new("pm");
    podman_config(&r);
    let (dir, server, hash) = serve_random_file("pm-host", "f", 1 << 20);
    let server6 = Server::start_on(ServerKind::Http, Some(dir.path()), "::1");

    // podman's defaults pass --disable-host-loopback (the host's loopback is closed) and
    // --enable-ipv6 (libslirp's fd00::/64, the address by SLAAC, DNS at fd00::3).
    let (code, text, published, port) =
        podman_run(&r, "slirp4netns:port_handler=slirp4netns", server.port, server6.port);
    assert_eq!(code, 0, "podman run: {text}");
    assert_eq!(line_value(&text, "dns-answers "), Some("1"), "DNS through 10.0.2.3: {text}");
    assert_ne!(line_value(&text, "outbound ").map(first_word), Some(hash.clone()), "{text}");
    assert_eq!(line_value(&text, "slaac "), Some("1"), "an address from fd00::/64 by SLAAC: {text}");
    assert_eq!(line_value(&text, "dns6-answers "), Some("1"), "AAAA fd00::2 through fd00::3: {text}");
    assert_ne!(line_value(&text, "outbound6 ").map(first_word), Some(hash.clone()), "{text}");
    assert_eq!(published, r.file_hash, "published port: {text}");
    assert!(!port_listening(port), "port {port} still listening after podman run --rm");

    let (code, text, published, port) =
        podman_run(&r, "slirp4netns:port_handler=slirp4netns,allow_host_loopback=true", server.port, server6.port);
    assert_eq!(code, 0, "podman run: {text}");
    assert_eq!(
        line_value(&text, "outbound ").map(first_word),
        Some(hash.clone()),
        "outbound to the host's loopback: {text}"
    );
    assert_eq!(
        line_value(&text, "outbound6 ").map(first_word),
        Some(hash),
        "outbound to the host's [::1] by fd00::2: {text}"
    );
    assert_eq!(published, r.file_hash, "published port: {text}");
    assert!(!port_listening(port), "port {port} still listening after podman run --rm");
    assert!(pids_matching(&r.slirp4netns().to_string_lossy()).is_empty(), "usernet left running");
}

/// The probes callers make before starting it: `--help` names the options they look
/// for, `--version` says slirp4netns's version; a wrong flag is slirp4netns's error, exit 1.
#[test]
fn answers_as_slirp4netns() {
    let dir = TempDir::new("s4-probe");
    let link = dir.join("slirp4netns");
    std::os::unix::fs::symlink(usernet_bin(), &link).expect("symlink");
    let help = run(&link.to_string_lossy(), &["--help"]);
    assert_eq!(help.code, 0);
    for name in ["--netns-type", "--userns-path", "--api-socket", "--disable-host-loopback", "--enable-ipv6", "--mtu"] {
        assert!(help.stdout.contains(name), "{name} missing from --help:\n{}", help.stdout);
    }
    let version = run(&link.to_string_lossy(), &["--version"]);
    assert!(version.stdout.starts_with("slirp4netns version 1."), "{}", version.stdout);
    let bad = run(&link.to_string_lossy(), &["--bogus", "1"]);
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.starts_with("slirp4netns: unrecognized option '--bogus'"), "{}", bad.stderr);
    let via_usernet = run(&usernet_bin().to_string_lossy(), &["slirp4netns", "--version"]);
    assert_eq!(via_usernet.stdout, version.stdout);
}

/// Podman's `outbound_addr` and `outbound_addr6` (slirp4netns's `--outbound-addr` and
/// `--outbound-addr6`), as interfaces and as addresses: a remote host sees the container's
/// connections come from the host's addresses they name, none of which the kernel would
/// have chosen.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn podman_outbound_addresses() {
    require(&["podman", "runc", "runuser", "useradd", "newuidmap", "busybox", "socat", "ss"]);
    let w = OutboundWorld::new();
    let r = Rootless::new("po6");
    podman_config(&r);
    let script = format!(
        "i=0; until ip -6 -o addr show scope global | grep 'inet6 fd00::' | grep -qv tentative || [ $i -ge 100 ]; \
         do sleep 0.1; i=$((i+1)); done; {}",
        w.busybox_script()
    );
    let want = (Some(w.out.0.clone()), Some(w.out.1.clone()));
    assert_ne!((Some(w.chosen.0.clone()), Some(w.chosen.1.clone())), want);
    for (v4, v6) in [(&w.dummy, &w.dummy), (&w.out.0, &w.out.1)] {
        let network = format!("slirp4netns:enable_ipv6=true,outbound_addr={v4},outbound_addr6={v6}");
        let mut c = r.command("podman");
        c.args(["run", "--rm", "--network", &network, "--rootfs"])
            .arg(r.rootfs.path())
            .args(["/bin/sh", "-c", &script]);
        let out = run_bounded(&mut c, Duration::from_secs(60));
        assert_eq!(out.code, 0, "{network}: {out}");
        assert_eq!(peers(&out.stdout), want, "{network}: {out}");
    }
}
