//! `usernet serve --netns PATH|NAME|PID`: a TAP in namespaces that already exist (one named
//! with `ip netns add`, one held by a process), both on one virtual network.

mod common;
#[path = "vm/harness.rs"]
mod harness;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{DnsUpstream, TempDir};
use harness::Serve;

/// A named network namespace (`ip netns add`), deleted on drop.
struct NamedNs(String);

impl NamedNs {
    fn new() -> NamedNs {
        let name = format!("unsv{}", common::unique_id());
        common::must("ip", &["netns", "add", &name]);
        NamedNs(name)
    }

    fn exec(&self, cmd: &[&str]) -> common::Output {
        let mut args = vec!["netns", "exec", &self.0];
        args.extend_from_slice(cmd);
        common::run("ip", &args)
    }
}

impl Drop for NamedNs {
    fn drop(&mut self) {
        let _ = common::run("ip", &["netns", "del", &self.0]);
    }
}

/// A process in a new network namespace (`unshare -n sleep`, or as another user with
/// `unshare -rUn`), killed on drop.
struct NsProcess(Child);

impl NsProcess {
    fn new(user: Option<&str>) -> NsProcess {
        let mut cmd = match user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--", "unshare", "-rUn", "sleep", "120"]);
                c
            }
            None => {
                let mut c = Command::new("unshare");
                c.args(["-n", "sleep", "120"]);
                c
            }
        };
        let child = cmd.stdin(Stdio::null()).spawn().expect("start unshare");
        let p = NsProcess(child);
        // Wait until the process is in its own namespace (runuser forks first).
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if p.sleeper().is_some() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("unshare did not start");
    }

    /// The pid of `sleep` in the new namespace.
    fn sleeper(&self) -> Option<u32> {
        let me = std::fs::read_link("/proc/self/ns/net").ok()?;
        let mut pid = self.0.id();
        // runuser forks: follow the children down to the process that left our namespace.
        for _ in 0..4 {
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            if ns != me && comm.trim() == "sleep" {
                return Some(pid);
            }
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
            pid = children.split_whitespace().next()?.parse().ok()?;
        }
        None
    }

    fn exec(&self, user_ns: bool, cmd: &[&str]) -> common::Output {
        let pid = self.sleeper().expect("namespace process").to_string();
        let mut args = vec!["-t", &pid, "-n"];
        if user_ns {
            args.extend_from_slice(&["-U", "--preserve-credentials"]);
        }
        args.extend_from_slice(cmd);
        common::run("nsenter", &args)
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.sleeper() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn two_namespaces_on_one_serve() {
    common::require(&["ip", "dnsmasq", "unshare", "nsenter", "curl", "dig", "ping", "socat", "tcpdump"]);
    let dns = DnsUpstream::start();
    let (_files, server, hash) = common::serve_random_file("netnsfile", "f", 4 << 20);
    let named = NamedNs::new();
    let proc_ns = NsProcess::new(None);
    let dir = TempDir::new("serve-netns");
    let pid = proc_ns.sleeper().expect("pid").to_string();
    let pcap = dir.join("switch.pcap");
    // The first by its name, as `ip netns` and pasta take it (/run/netns/NAME).
    let serve = Serve::start(
        &dir,
        &dns,
        &[format!("--netns={}", named.0), format!("--netns={pid}"), format!("--pcap={}", pcap.display())],
        &[],
    );

    // The first namespace has the first address, the second the next one.
    let addr = named.exec(&["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.stdout.contains("inet 192.168.65.2/24"), "{addr}\n{}", serve.log());
    let addr = proc_ns.exec(false, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
    assert!(addr.stdout.contains("inet 192.168.65.3/24"), "{addr}");
    let mtu = named.exec(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.stdout.trim(), "1500");

    let ping = common::ping_cmd();
    named.exec(&[ping, "-c", "1", "-W", "5", "192.168.65.1"]).assert_ok();
    // The namespaces reach each other through usernet's switch.
    named.exec(&[ping, "-c", "2", "-W", "5", "192.168.65.3"]).assert_ok();
    proc_ns.exec(false, &[ping, "-c", "2", "-W", "5", "192.168.65.2"]).assert_ok();
    // DNS and the host's loopback from the second one.
    let dig = proc_ns.exec(false, &["dig", "+short", "+time=3", "+tries=2", "@192.168.65.1", "host.docker.internal"]);
    assert_eq!(dig.stdout.trim(), "192.168.65.254", "{dig}");
    let url = format!("http://192.168.65.254:{}/f", server.port);
    let got = proc_ns.exec(false, &["sh", "-c", &format!("curl -sf -m 20 {url} | sha256sum")]);
    assert_eq!(common::first_word(&got.stdout), hash, "{got}");

    // TCP between the namespaces, both ways: each kernel hands usernet 64 KiB frames with
    // partial checksums, which the switch passes to the other TAP with their virtio-net
    // header (forwarded without it, the other kernel dropped every segment).
    let blob = dir.join("blob");
    common::write_random_file(&blob, 3 << 20);
    let blob_hash = common::sha256_file(&blob);
    let send = format!("OPEN:{}", blob.display());
    let from_named = ["socat", "-u", &send, "TCP-LISTEN:8089,reuseaddr"];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &named.0]).args(from_named);
    let sender = common::Background::start(cmd, Stdio::null());
    let fetch =
        "for i in $(seq 50); do socat -u TCP:192.168.65.2:8089 STDOUT 2>/dev/null && exit; sleep 0.1; done | sha256sum";
    let got = proc_ns.exec(false, &["timeout", "30", "sh", "-c", fetch]);
    assert_eq!(common::first_word(&got.stdout), blob_hash, "named -> pid namespace: {got}\n{}", serve.log());
    drop(sender);
    let pid_ns = proc_ns.sleeper().expect("pid").to_string();
    let from_pid = ["-t", &pid_ns, "-n", "socat", "-u", &send, "TCP-LISTEN:8090,reuseaddr"];
    let mut cmd = Command::new("nsenter");
    cmd.args(from_pid);
    let sender = common::Background::start(cmd, Stdio::null());
    let fetch = fetch.replace("192.168.65.2:8089", "192.168.65.3:8090");
    let got = named.exec(&["timeout", "30", "sh", "-c", &fetch]);
    assert_eq!(common::first_word(&got.stdout), blob_hash, "pid -> named namespace: {got}\n{}", serve.log());
    drop(sender);
    // The same over IPv6, named -> pid namespace.
    let addr6 = named.exec(&["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]);
    let named6 = addr6.stdout.split_whitespace().nth(3).and_then(|a| a.split('/').next()).expect("an IPv6 address");
    let addr6 = proc_ns.exec(false, &["ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "global"]);
    let pid6 = addr6.stdout.split_whitespace().nth(3).and_then(|a| a.split('/').next()).expect("an IPv6 address");
    let from_named6 = ["socat", "-u", &send, "TCP6-LISTEN:8091,reuseaddr"];
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &named.0]).args(from_named6);
    let sender = common::Background::start(cmd, Stdio::null());
    let fetch6 = fetch.replace("TCP:192.168.65.3:8090", &format!("TCP6:[{named6}]:8091"));
    let got = proc_ns.exec(false, &["timeout", "30", "sh", "-c", &fetch6]);
    assert_eq!(common::first_word(&got.stdout), blob_hash, "named -> pid namespace, IPv6: {got}\n{}", serve.log());
    drop(sender);
    // With two links up, both TAPs kept their offloads: the capture has frames from one
    // namespace to the other larger than the MTU.
    let large = |from: &str, to: &str| {
        common::frames_in_capture(&pcap, &format!("src host {from} and dst host {to} and greater 1600"))
    };
    assert!(large(named6, pid6) > 0, "no 64 KiB IPv6 frame from the named namespace");
    assert!(large("192.168.65.2", "192.168.65.3") > 0, "no 64 KiB frame from the named namespace");
    assert!(large("192.168.65.3", "192.168.65.2") > 0, "no 64 KiB frame from the pid namespace");

    let (status, leases) = serve.api("GET", "/services/dhcp/leases", "");
    assert_eq!(status, 200);
    assert!(leases.contains("\"192.168.65.2\":\"5a:94:ef:e4:0c:ee\""), "{leases}");
    assert!(leases.contains("\"192.168.65.3\":\"5a:94:ef:e4:0c:ef\""), "{leases}");

    // When usernet stops, its TAP devices go with it.
    drop(serve);
    let gone = named.exec(&["ip", "link", "show", "eth0"]);
    assert!(!gone.success(), "eth0 outlived usernet:\n{gone}");
}

/// A namespace whose user is done with it takes its link with it, as pasta quits then: the
/// TAP would otherwise keep it alive, and served, after `ip netns del` (with no name left to
/// reach it by) or after the process named exited. With nothing else to serve (no
/// `--listen-*`), usernet exits 0 once no namespace is left.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_namespace_deleted_or_left_takes_its_link_and_the_last_one_serve() {
    common::require(&["ip", "dnsmasq", "unshare", "nsenter", "ping"]);
    let dns = DnsUpstream::start();
    let named = NamedNs::new();
    let proc_ns = NsProcess::new(None);
    let dir = TempDir::new("serve-netns-gone");
    let pid = proc_ns.sleeper().expect("pid").to_string();
    let mut serve = Serve::start(&dir, &dns, &[format!("--netns={}", named.0), format!("--netns={pid}")], &[]);
    let ping = common::ping_cmd();
    proc_ns.exec(false, &[ping, "-c", "1", "-W", "5", "192.168.65.2"]).assert_ok();

    // A process stays in the named namespace, so that only its name goes.
    let mut inside =
        Command::new("ip").args(["netns", "exec", &named.0, "sleep", "60"]).spawn().expect("ip netns exec");
    let inside_pid = inside.id().to_string();
    let has_eth0 = || common::run("nsenter", &["-t", &inside_pid, "-n", "ip", "link", "show", "eth0"]).success();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !has_eth0() {
        assert!(Instant::now() < deadline, "no eth0 seen from the process in {}", named.0);
        std::thread::sleep(Duration::from_millis(20));
    }
    // Watched for a while already (a few times a second): the namespace is still served.
    std::thread::sleep(Duration::from_millis(600));
    assert!(has_eth0(), "eth0 went while the namespace still has its name:\n{}", serve.log());
    common::must("ip", &["netns", "del", &named.0]);
    // Polled a few times a second: the TAP goes within a second or so.
    let deadline = Instant::now() + Duration::from_secs(10);
    while has_eth0() {
        assert!(Instant::now() < deadline, "eth0 outlived `ip netns del`:\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(serve.log_shows("the namespace is gone, and its link with it"), "{}", serve.log());
    assert!(serve.running(), "usernet stopped while it still serves a namespace:\n{}", serve.log());
    proc_ns.exec(false, &[ping, "-c", "1", "-W", "5", "192.168.65.1"]).assert_ok();
    let _ = inside.kill();
    let _ = inside.wait();

    // The other namespace's process exits: nothing is left to serve.
    drop(proc_ns);
    let status = serve.exits_within(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "usernet did not exit 0 ({status:?}):\n{}", serve.log());
    assert!(serve.log().contains(&format!("the namespace's process ({pid}) exited")), "{}", serve.log());
}

/// A TAP name the namespace already has for another device (`lo`) is refused with what is
/// wrong and what to do, not the kernel's bare EINVAL; usernet exits 125 and serves nothing.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_tap_name_the_namespace_has_is_refused_by_name() {
    common::require(&["ip"]);
    let named = NamedNs::new();
    let mut cmd = Command::new(common::usernet_bin());
    cmd.args(["serve", "--dns-upstream", "127.0.0.1:9", "--netns", &named.0, "--netns-ifname", "lo"]);
    let out = common::run_bounded(&mut cmd, Duration::from_secs(20));
    assert_eq!(out.code, 125, "{out}");
    let want = format!(
        "cannot attach to /run/netns/{}: the namespace already has a device named lo that is not a TAP: give another --netns-ifname",
        named.0
    );
    assert!(out.stderr.contains(&want), "{out}");
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootless_serve_attaches_to_a_user_namespace() {
    common::require(&["ip", "dnsmasq", "unshare", "nsenter", "runuser", "curl"]);
    let dns = DnsUpstream::start();
    let (_files, server, hash) = common::serve_random_file("netnsfile", "f", 1 << 20);
    let dir = TempDir::new("serve-rootless");
    let bin = common::copy_binary_for_others(&dir);
    let ns = NsProcess::new(Some("nobody"));
    let pid = ns.sleeper().expect("pid").to_string();
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "nobody", "--"]).arg(&bin).args(["serve", "--dns-upstream", &dns.addr(), "--netns", &pid]);
    let mut serve = Serve::spawn(cmd, dir.join("no-api"), &[]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = ns.exec(true, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"]);
        if out.stdout.contains("inet 192.168.65.2/24") {
            break;
        }
        assert!(serve.running(), "usernet serve exited:\n{}", serve.log());
        assert!(Instant::now() < deadline, "no eth0 in the namespace:\n{out}\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let url = format!("http://192.168.65.254:{}/f", server.port);
    let got = ns.exec(true, &["sh", "-c", &format!("curl -sf -m 20 {url} | sha256sum")]);
    assert_eq!(common::first_word(&got.stdout), hash, "{got}\n{}", serve.log());
    // The namespace's process exits: the unprivileged usernet follows it (a pidfd) and exits.
    drop(ns);
    let status = serve.exits_within(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "usernet did not exit 0 ({status:?}):\n{}", serve.log());
}
