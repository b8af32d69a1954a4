//! `usernet run` basics: the guest's interface, routes and resolv.conf; exit
//! statuses; nothing left behind; rootless mode; packet capture.

mod common;

use common::*;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_interface_route_and_resolv_conf() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let out = Usernet::new(&dns).sh("ip -o addr show dev eth0; echo ===; ip -o link show dev eth0; echo ===; \
         ip route show default; echo ===; cat /etc/resolv.conf; echo ===; ip -o link show dev lo");
    out.assert_ok();
    let parts: Vec<&str> = out.stdout.split("===").collect();
    assert_eq!(parts.len(), 5, "{out}");
    assert!(parts[0].contains(&format!("inet {GUEST_IP}/24")), "{out}");
    assert!(parts[1].contains(&format!("mtu {RUN_MTU} ")), "{out}");
    assert!(parts[1].contains("UP"), "{out}");
    assert!(parts[2].contains(&format!("default via {GATEWAY_IP} dev eth0")), "{out}");
    let nameservers: Vec<&str> =
        parts[3].lines().filter_map(|l| l.trim().strip_prefix("nameserver")).map(str::trim).collect();
    assert_eq!(nameservers, vec![GATEWAY_IP], "{out}");
    assert!(parts[4].contains("UP"), "lo is not up:\n{out}");
    // The host's own resolv.conf is untouched (the guest's is in its own mount namespace).
    assert_eq!(std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(), host_resolv);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn mtu_option_sets_the_guest_mtu() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    let out = Usernet::new(&dns).args(&["--mtu", "1500"]).run(&["ip", "-o", "link", "show", "dev", "eth0"]);
    out.assert_ok();
    assert!(out.stdout.contains("mtu 1500 "), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn exit_status_is_the_commands() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    Usernet::new(&dns).run(&["true"]).assert_code(0);
    Usernet::new(&dns).sh("exit 7").assert_code(7);
    Usernet::new(&dns).run(&["false"]).assert_code(1);
    // Killed by a signal: 128 + the signal, as docker run and shells report it.
    Usernet::new(&dns).sh("kill -TERM $$").assert_code(143);
    // The command's output passes through.
    let out = Usernet::new(&dns).sh("echo to-stdout; echo to-stderr >&2");
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "to-stdout", "{out}");
    assert!(out.stderr.contains("to-stderr"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn exit_status_127_when_not_found() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    Usernet::new(&dns).run(&["usernet-test-no-such-command"]).assert_code(127);
    Usernet::new(&dns).run(&["/nonexistent/usernet-test/cmd"]).assert_code(127);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn exit_status_126_when_not_executable() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("noexec");
    let file = dir.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho should not run\n").expect("write file");
    let out = Usernet::new(&dns).run(&[&file]);
    out.assert_code(126);
    assert!(!out.stdout.contains("should not run"), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn exit_status_125_when_usernet_fails() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    let out = Usernet::new(&dns).arg("--no-such-flag").run(&["echo", "should not run"]);
    out.assert_code(125);
    assert!(!out.stdout.contains("should not run"), "{out}");
    Usernet::new(&dns).args(&["--add-host", "missing-ip"]).run(&["true"]).assert_code(125);
    Usernet::new(&dns).args(&["--add-host", "name.test:not-an-ip"]).run(&["true"]).assert_code(125);
    Usernet::new(&dns).args(&["--mtu", "100"]).run(&["true"]).assert_code(125);
    // No command at all.
    let mut cmd = std::process::Command::new(usernet_bin());
    cmd.arg("run");
    run_bounded(&mut cmd, DEFAULT_TIMEOUT).assert_code(125);
}

/// The guest's network namespace as `readlink /proc/self/ns/net` prints it.
fn host_netns() -> String {
    std::fs::read_link("/proc/self/ns/net").map(|l| l.to_string_lossy().into_owned()).unwrap_or_default()
}

/// Kills what a failed test left behind, then says whether anything was there.
fn reap(pids: &[u32]) -> bool {
    for &pid in pids {
        if let Ok(pid) = i32::try_from(pid) {
            // SAFETY: kill(2) of a process this test started (matched by a unique marker).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    !pids.is_empty()
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn nothing_left_behind_when_the_command_exits() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    // A unique sleep, so parallel tests never see each other's.
    let marker = format!("sleep 300.{}", unique_id().replace('-', ""));
    let out = Usernet::new(&dns)
        .sh(&format!("readlink /proc/self/ns/net; {marker} >/dev/null 2>&1 </dev/null & echo started"));
    out.assert_ok();
    let netns = out.stdout.lines().next().unwrap_or("").trim().to_string();
    assert!(netns.starts_with("net:["), "{out}");
    assert_ne!(netns, host_netns(), "the command ran in the host's namespace");
    assert!(out.stdout.contains("started"), "{out}");

    let gone =
        wait_until(Duration::from_secs(5), || pids_matching(&marker).is_empty() && pids_in_netns(&netns).is_empty());
    let left = pids_matching(&marker);
    let in_ns = pids_in_netns(&netns);
    reap(&left);
    reap(&in_ns);
    assert!(gone, "left behind: {left:?} ({marker}), processes in {netns}: {in_ns:?}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn nothing_left_behind_when_usernet_is_signalled() {
    require(BASE_TOOLS);
    let dns = DnsUpstream::start();
    let marker = format!("sleep 300.{}", unique_id().replace('-', ""));
    let mut cmd = Usernet::new(&dns).command(&["sh", "-c", &format!("readlink /proc/self/ns/net; exec {marker}")]);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let mut child = cmd.spawn().expect("start usernet");
    let stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let netns = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(line) => line.trim().to_string(),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the command did not start within 30 s");
        }
    };
    assert!(netns.starts_with("net:["), "got {netns:?}");
    // The command is running; now signal usernet itself.
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: kill(2) of our own child.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let exited = wait_until(Duration::from_secs(10), || matches!(child.try_wait(), Ok(Some(_))));
    if !exited {
        let _ = child.kill();
    }
    let _ = child.wait();
    let gone =
        wait_until(Duration::from_secs(5), || pids_matching(&marker).is_empty() && pids_in_netns(&netns).is_empty());
    let left = pids_matching(&marker);
    let in_ns = pids_in_netns(&netns);
    reap(&left);
    reap(&in_ns);
    assert!(exited, "usernet did not exit within 10 s of SIGTERM");
    assert!(gone, "left behind: {left:?} ({marker}), processes in {netns}: {in_ns:?}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootless_as_nobody() {
    require(&["ip", "dnsmasq", "runuser", "curl", "python3", "sha256sum"]);
    let dns = DnsUpstream::start();
    let bin_dir = TempDir::new("rootless-bin");
    let bin = copy_binary_for_others(&bin_dir);
    let (_dir, http, want) = serve_random_file("rootless", "f", 5 << 20);
    let out = Usernet::new(&dns).run_as("nobody", &bin).sh(&format!(
        "id -u; ip -o addr show dev eth0; ip route show default; \
         timeout 60 curl -sSf http://host.docker.internal:{}/f | sha256sum",
        http.port
    ));
    out.assert_ok();
    assert!(out.stdout.contains(&format!("inet {GUEST_IP}/24")), "{out}");
    assert!(out.stdout.contains(&format!("default via {GATEWAY_IP}")), "{out}");
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn pcap_captures_the_guest_link() {
    require(&["ip", "dnsmasq", "tcpdump", "ping"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("pcap");
    let pcap = dir.join("guest.pcap");
    let out = Usernet::new(&dns).arg("--pcap").arg(&pcap).sh(&format!("{} -c 2 -W 5 {GATEWAY_IP}", ping_cmd()));
    out.assert_ok();
    let dump = run("tcpdump", &["-n".into(), "-r".into(), pcap.into_os_string()]);
    dump.assert_ok();
    let requests = dump.stdout.matches("ICMP echo request").count();
    let replies = dump.stdout.matches("ICMP echo reply").count();
    assert!(requests >= 2 && replies >= 2, "{dump}");
    assert!(dump.stdout.contains(&format!("{GUEST_IP} > {GATEWAY_IP}: ICMP echo request")), "{dump}");
}

/// `--pcap` naming a FIFO with no reader says it waits for one, and COMMAND starts once
/// tcpdump reads it; tcpdump gets the whole capture (the guest's pings) until usernet ends.
/// Rootless too.
fn pcap_to_a_fifo(user: Option<&str>) {
    let dns = DnsUpstream::start();
    let dir = TempDir::new("pcapfifo");
    let fifo = dir.join("capture");
    // Writable by whoever usernet runs as (the CI's test user, or `nobody`).
    must("mkfifo", &["-m", "0666", fifo.to_string_lossy().as_ref()]);
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut usernet = Usernet::new(&dns);
    if let Some(user) = user {
        usernet = usernet.run_as(user, &copy_binary_for_others(&dir));
    }
    let mut cmd = usernet.arg("--pcap").arg(&fifo).command(&[
        "sh",
        "-c",
        &format!("echo started; {} -c 2 -W 5 {GATEWAY_IP}", ping_cmd()),
    ]);
    cmd.env("RUST_LOG", "warn");
    let mut bg = Background::start(cmd, Stdio::null());
    let said =
        wait_until(Duration::from_secs(10), || bg.stderr().contains("a FIFO with no reader yet; waiting for one"));
    assert!(said, "no word of the wait:\n{}", bg.describe());
    std::thread::sleep(Duration::from_millis(300));
    assert!(bg.lines_with("started").is_empty(), "COMMAND started before the capture had a reader:\n{}", bg.describe());
    let dump = run("tcpdump", &["-n".into(), "-r".into(), fifo.into_os_string()]);
    assert_eq!(bg.exit_code(Duration::from_secs(30)), 0, "{}", bg.describe());
    dump.assert_ok();
    assert!(dump.stdout.matches("ICMP echo request").count() >= 2, "{dump}");
    assert!(dump.stdout.matches("ICMP echo reply").count() >= 2, "{dump}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn pcap_to_a_fifo_waits_for_its_reader() {
    require(&["ip", "dnsmasq", "tcpdump", "ping", "mkfifo"]);
    pcap_to_a_fifo(None);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn pcap_to_a_fifo_waits_for_its_reader_rootless() {
    require(&["ip", "dnsmasq", "tcpdump", "ping", "mkfifo", "runuser"]);
    pcap_to_a_fifo(Some("nobody"));
}

/// A capture to a disk that is full (/dev/full: every write fails with ENOSPC) stops the
/// capture with a clear error, and the network goes on: a 5 MiB download arrives whole.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn pcap_to_a_full_disk_stops_the_capture_not_the_network() {
    require(&[BASE_TOOLS, &["curl", "sha256sum"]].concat());
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("pcapfull", "f", 5 << 20);
    let out = Usernet::new(&dns)
        .arg("--pcap")
        .arg("/dev/full")
        .sh(&format!("timeout 60 curl -sSf http://{HOST_IP}:{}/f | sha256sum", http.port));
    out.assert_ok();
    assert_eq!(hex_hashes(&out.stdout), vec![want], "{out}");
    assert!(out.stderr.contains("pcap /dev/full: No space left on device"), "{out}");
    assert!(out.stderr.contains("capture stopped, networking goes on"), "{out}");
}

/// Once set up, every thread of usernet has least privilege: no capability but
/// CAP_NET_BIND_SERVICE and CAP_NET_RAW (bits 10 and 13; rootless, usernet joined the
/// guest's user namespace and holds those two there only, for binding in the guest's
/// namespace, nothing on the host),
/// no_new_privs, a seccomp filter (mode 2) — and the guest still reaches the host (the
/// download's hash). `--no-sandbox` leaves the process as it was.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn confined_once_set_up() {
    require(&[BASE_TOOLS, &["curl", "sha256sum", "grep"]].concat());
    let dns = DnsUpstream::start();
    let (_dir, http, want) = serve_random_file("confined", "f", 1 << 20);
    let script = format!(
        "for t in /proc/$PPID/task/*/status; do grep -E '^(Name|CapEff|CapPrm|NoNewPrivs|Seccomp):' $t | tr '\\n' ' '; echo; done; \
         for p in /proc/[0-9]*; do grep -qx \"PPid:\t$PPID\" $p/status 2>/dev/null && [ \"$(cat $p/comm)\" = usernet-dns ] && \
           {{ printf 'FOLLOWER '; grep -E '^(CapEff|CapPrm|NoNewPrivs):' $p/status | tr '\\n' ' '; tr '\\0' ' ' < $p/cmdline; echo; }}; done; \
         curl -sSf http://{HOST_IP}:{}/f | sha256sum",
        http.port
    );
    let field = |line: &str, name: &str| -> String {
        let rest = line.split(&format!("{name}:")).nth(1).unwrap_or_else(|| panic!("{name} in {line}"));
        rest.split_whitespace().next().unwrap().to_string()
    };
    let out = Usernet::new(&dns).sh(&script);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("{want}  -")), "{out}");
    let threads: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("Name:")).collect();
    assert!(threads.len() >= 3, "the engine, the services' and the API's threads at least\n{out}");
    // The DNS watcher's follower (`dns_watch`): usernet's child, usernet again under its
    // own name, with no capability and no way to get one.
    let followers: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("FOLLOWER ")).collect();
    assert_eq!(followers.len(), 1, "one follower process\n{out}");
    let f = followers[0];
    assert_eq!(field(f, "CapEff"), "0000000000000000", "{f}");
    assert_eq!(field(f, "CapPrm"), "0000000000000000", "{f}");
    assert_eq!(field(f, "NoNewPrivs"), "1", "{f}");
    assert!(f.contains("usernet-dns-follower"), "{f}");
    for t in &threads {
        assert_eq!(field(t, "Seccomp"), "2", "{t}");
        assert_eq!(field(t, "NoNewPrivs"), "1", "{t}");
        for caps in ["CapEff", "CapPrm"] {
            let v = u64::from_str_radix(&field(t, caps), 16).unwrap();
            assert_eq!(v & !0x2400, 0, "{caps} of {t}");
        }
    }

    let out = Usernet::new(&dns).args(&["--no-sandbox"]).sh(&script);
    out.assert_ok();
    assert!(out.stdout.contains(&format!("{want}  -")), "{out}");
    for t in out.stdout.lines().filter(|l| l.starts_with("Name:")) {
        assert_eq!(field(t, "Seccomp"), "0", "{t}");
        assert_eq!(field(t, "NoNewPrivs"), "0", "{t}");
    }
}
