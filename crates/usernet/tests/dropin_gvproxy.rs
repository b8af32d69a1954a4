//! usernet as gvproxy: started through a symlink named `gvproxy` with the command line that
//! Podman machine's QEMU provider gives gvproxy (gvisor-tap-vsock's GvproxyCommand: `-debug
//! -mtu 1500 -ssh-port N -listen-qemu unix://... -forward-sock ... -forward-dest ...
//! -forward-user ... -forward-identity ... -pid-file ... -log-file ...`), serving a QEMU guest
//! (TCG) started with Podman machine's own network options (`-netdev stream,id=vlan,
//! server=off,addr.type=unix,addr.path=...` and a virtio-net device with MAC
//! 5a:94:ef:e4:0c:ee, the MAC of gvproxy's static lease).
//!
//! The guest is tests/vm/qemu.rs's image built with sshd (vm-guest/build-initramfs.sh
//! --with-ssh): its /init checks DHCP (gvproxy's 192.168.127.2), DNS (host.docker.internal
//! from the gateway), a download from the host's loopback through 192.168.127.254 (sha256
//! checked inside the guest) and a ping of the gateway; then the test logs in with OpenSSH's
//! client through `-ssh-port`, and sends a line through `-forward-sock` to a Unix-socket
//! server inside the guest (socat), as Podman reaches its API socket. Bad input: a second
//! QEMU client is turned away with one log line and the VM goes on. When the VM goes,
//! usernet exits 1 as gvproxy does, its pid file and sockets removed.
//!
//! usernet (and QEMU) run as the unprivileged test user when USERNET_TEST_USER is set.

mod common;
#[path = "vm/harness.rs"]
mod harness;
#[path = "vm/qemu.rs"]
mod qemu;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Background, TempDir};
use qemu::{Image, VM_TIMEOUT, Vm, require_vm};

/// The MAC that Podman machine gives its VM, and that gvproxy leases 192.168.127.2 to.
const PODMAN_MAC: &str = "5a:94:ef:e4:0c:ee";
/// Size of the file the guest downloads.
const FILE_SIZE: usize = 1 << 20;

/// `ssh root@127.0.0.1 -p PORT echo ...` with the machine's key: its stdout.
fn ssh_echo(port: u16, key: &Path, word: &str) -> common::Output {
    common::run_bounded(
        Command::new("ssh").args([
            "-F",
            "/dev/null",
            "-p",
            &port.to_string(),
            "-i",
            &key.to_string_lossy(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=30",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            "echo",
            word,
        ]),
        Duration::from_secs(60),
    )
}

/// One line through the forwarded socket: what the guest's server answered. The forward
/// connects its SSH session in the background, so this tries for up to a minute.
fn through_forward(sock: &Path, line: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    while Instant::now() < deadline {
        match UnixStream::connect(sock) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                s.write_all(format!("{line}\n").as_bytes()).unwrap();
                let mut answer = String::new();
                match s.read_to_string(&mut answer) {
                    Ok(_) if !answer.is_empty() => return answer,
                    r => last = format!("{r:?} {answer:?}"),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no answer through {}: {last}", sock.display());
}

fn log_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// All that usernet said: its output and its -log-file.
fn log(gv: &Background, log_file: &Path) -> String {
    format!("{}\n  log file:\n{}", gv.describe(), log_text(log_file))
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn podman_machine_vm_through_gvproxy_mode() {
    require_vm();
    common::require(&["ssh", "ssh-keygen", "sshd", "socat"]);
    let dir = TempDir::new("gvproxy");
    let key = dir.join("machine");
    common::must("ssh-keygen", &["-q", "-t", "ed25519", "-N", "", "-C", "usernet-test", "-f", &key.to_string_lossy()]);
    let image = Image::build_with(&["--with-ssh", &dir.join("machine.pub").to_string_lossy()]);
    if let Some(user) = common::test_user() {
        // usernet reads the identity as that user; OpenSSH's client (root) takes a key of
        // another owner whatever its mode.
        common::dropin::chown(&key, &user);
    }
    let (_files, http, hash) = common::serve_random_file("gvproxy-file", "f", FILE_SIZE);

    let gvproxy = dir.join("gvproxy");
    std::os::unix::fs::symlink(common::usernet_bin(), &gvproxy).expect("symlink gvproxy");
    let (qemu_sock, podman_sock) = (dir.join("qemu.sock"), dir.join("podman.sock"));
    let (pid_file, log_file) = (dir.join("gvproxy.pid"), dir.join("gvproxy.log"));
    let ssh_port = common::free_port();
    let mut cmd = common::as_test_user(&gvproxy);
    cmd.args(["-debug", "-mtu", "1500", "-ssh-port", &ssh_port.to_string(), "-listen-qemu"])
        .arg(format!("unix://{}", qemu_sock.display()))
        .arg("-forward-sock")
        .arg(&podman_sock)
        .args(["-forward-dest", "/run/guest.sock", "-forward-user", "root", "-forward-identity"])
        .arg(&key)
        .arg("-pid-file")
        .arg(&pid_file)
        .arg("-log-file")
        .arg(&log_file);
    let mut gv = Background::start(cmd, Stdio::null());
    assert!(
        common::wait_until(Duration::from_secs(10), || qemu_sock.exists() && pid_file.exists()),
        "no QEMU socket or pid file:\n{}\n{}",
        gv.describe(),
        log_text(&log_file)
    );
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), gv.pid().to_string());

    let netdev = format!("stream,id=vlan,server=off,addr.type=unix,addr.path={}", qemu_sock.display());
    let device = format!("virtio-net-pci,netdev=vlan,mac={PODMAN_MAC}");
    let params = format!("un.http=192.168.127.254:{} un.size={FILE_SIZE} un.hostaddr=192.168.127.254", http.port);
    let mut vm = Vm::boot_with("podman-machine", &image, &["-netdev", &netdev, "-device", &device], &params);
    vm.wait_for("USERNET-VM ready", VM_TIMEOUT);
    assert_eq!(vm.check("dhcp"), "192.168.127.2 mtu=1500", "{}", log(&gv, &log_file));
    assert_eq!(vm.check("dns"), "192.168.127.254");
    assert_eq!(vm.check("download"), format!("sha256={hash}"));
    assert_eq!(vm.check("ping"), "192.168.127.1");
    assert_eq!(vm.check("sshd"), "22");

    // -ssh-port: the host's 127.0.0.1:PORT is the guest's sshd.
    let out = ssh_echo(ssh_port, &key, "ssh-reached-the-guest");
    assert_eq!(out.stdout.trim(), "ssh-reached-the-guest", "{out}\n{}", log(&gv, &log_file));

    // -forward-sock: a connection to the host's socket reaches the guest's /run/guest.sock.
    assert_eq!(
        through_forward(&podman_sock, "hello podman").trim(),
        "guest-socket: hello podman",
        "{}",
        log(&gv, &log_file)
    );

    // A second QEMU on the same socket is turned away (one log line); the VM goes on.
    let mut second = UnixStream::connect(&qemu_sock).expect("connect a second client");
    second.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    assert!(matches!(second.read(&mut buf), Ok(0) | Err(_)), "a second client was kept");
    assert!(
        common::wait_until(Duration::from_secs(5), || log_text(&log_file).contains("turned away")),
        "{}",
        log(&gv, &log_file)
    );
    assert_eq!(log_text(&log_file).matches("turned away").count(), 1, "{}", log(&gv, &log_file));
    assert_eq!(through_forward(&podman_sock, "still there").trim(), "guest-socket: still there");

    // The VM goes: usernet exits 1 as gvproxy does, and leaves nothing behind.
    drop(vm);
    let code = gv.exit_code(Duration::from_secs(15));
    assert_eq!(code, 1, "{}", log(&gv, &log_file));
    let text = log_text(&log_file);
    assert!(text.contains("gvproxy exiting: the VM disconnected"), "{text}");
    for gone in [&pid_file, &qemu_sock, &podman_sock] {
        assert!(!gone.exists(), "{} left behind", gone.display());
    }
    assert!(!common::dropin::port_listening(ssh_port), "the ssh port still listens");
}

/// A network namespace of the test's own (a VM's inside), removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("gv{tag}{}", common::unique_id());
        common::must("ip", &["netns", "add", &name]);
        common::must("ip", &["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Netns { name }
    }

    fn sh(&self, script: &str) -> common::Output {
        common::run_bounded(
            Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]),
            Duration::from_secs(60),
        )
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = common::run("ip", &["netns", "del", &self.name]);
    }
}

/// gvisor-tap-vsock's guest forwarder's steps (tests/helpers/gvforwarder.py) from `url`,
/// with its TAP `tap0` (MAC `mac`) in `ns`; then DHCP on it with busybox's udhcpc, as the
/// forwarder runs it. Returns the bridge and the leased address.
fn join_through_connect(ns: &Netns, dir: &TempDir, url: &str, mac: &str) -> (Background, String) {
    let helper = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/gvforwarder.py");
    let mut c = Command::new(common::python());
    c.arg(helper).args([url, "tap0", mac]).arg(format!("/run/netns/{}", ns.name)).env("PATH", common::search_path());
    let mut fw = Background::start(c, Stdio::null());
    fw.wait_line("bridging", Duration::from_secs(20));
    let script = dir.join(&format!("udhcpc-{}.sh", ns.name));
    std::fs::write(
        &script,
        "#!/bin/sh\ncase \"$1\" in bound|renew)\n  ip addr add \"$ip/$mask\" dev \"$interface\"\n  \
         ip route add default via \"${router%% *}\"\n  echo \"lease $ip\";;\nesac\n",
    )
    .unwrap();
    common::must("chmod", &["755", &script.to_string_lossy()]);
    let out = ns.sh(&format!("busybox udhcpc -f -q -n -t 10 -T 1 -i tap0 -s {}", script.display()));
    let ip = out.stdout.lines().find_map(|l| l.strip_prefix("lease ")).map(str::to_string);
    let ip = ip.unwrap_or_else(|| panic!("no DHCP lease through {url}: {out}\n{}", fw.describe()));
    (fw, ip)
}

/// gvproxy's `-listen` endpoints take VMs as gvisor-tap-vsock's guest forwarder joins them:
/// `POST /connect`, then HyperKit-framed frames. Two VMs, over the Unix and the TCP
/// endpoint, get their DHCP leases (the static one for Podman's MAC), DNS, a download from
/// the host's loopback and a published port (exposed through the same TCP endpoint's API,
/// which still answers HTTP); a garbled client is one log line and the others go on;
/// (`vsock://` endpoints: `listen_vsock_holds_its_port`.)
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn gvforwarder_joins_through_listen() {
    common::require(&["ip", "busybox", "curl", "dig", "sha256sum"]);
    let dir = TempDir::new("gvconnect");
    let (_files, http, hash) = common::serve_random_file("gvconnect-file", "f", FILE_SIZE);
    let gvproxy = dir.join("gvproxy");
    std::os::unix::fs::symlink(common::usernet_bin(), &gvproxy).expect("symlink gvproxy");
    let (api, services, log_file) = (dir.join("api.sock"), dir.join("services.sock"), dir.join("gvproxy.log"));
    let tcp_port = common::free_port();
    let mut cmd = common::as_test_user(&gvproxy);
    cmd.args(["-ssh-port", "-1", "-listen"])
        .arg(format!("unix://{}", api.display()))
        .arg("-listen")
        .arg(format!("tcp://127.0.0.1:{tcp_port}"))
        .arg("-services")
        .arg(format!("unix://{}", services.display()))
        .arg("-log-file")
        .arg(&log_file);
    let mut gv = Background::start(cmd, Stdio::null());
    assert!(
        common::wait_until(Duration::from_secs(10), || log_text(&log_file).contains("waiting for clients")),
        "{}",
        log(&gv, &log_file)
    );

    // The first VM, over the Unix endpoint, with Podman's MAC: the static lease.
    let a = Netns::new("a");
    let (_fw_a, ip_a) = join_through_connect(&a, &dir, &format!("unix://{}", api.display()), PODMAN_MAC);
    assert_eq!(ip_a, "192.168.127.2", "{}", log(&gv, &log_file));
    let url = format!("http://192.168.127.254:{}/f", http.port);
    let got = a.sh(&format!("curl -s -f --max-time 20 {url} | sha256sum"));
    assert_eq!(common::first_word(&got.stdout), hash, "{got}\n{}", log(&gv, &log_file));
    let dns = a.sh("dig +short +time=3 +tries=2 @192.168.127.1 host.containers.internal");
    assert_eq!(dns.stdout.trim(), "192.168.127.254", "{dns}");

    // The second VM, over TCP (the helper connects from the host, its TAP in the namespace),
    // with another MAC: a lease of its own.
    let b = Netns::new("b");
    let tcp_url = format!("tcp://127.0.0.1:{tcp_port}/connect");
    let (_fw_b, ip_b) = join_through_connect(&b, &dir, &tcp_url, "5a:94:ef:e4:0c:ef");
    assert!(ip_b.starts_with("192.168.127.") && ip_b != ip_a, "{ip_b}");
    let got = b.sh(&format!("curl -s -f --max-time 20 {url} | sha256sum"));
    assert_eq!(common::first_word(&got.stdout), hash, "{got}");

    // The TCP endpoint still answers the API: publish the first VM's web server on the host.
    let served = dir.join("www");
    std::fs::create_dir_all(&served).unwrap();
    common::write_random_file(&served.join("g"), FILE_SIZE);
    let ghash = common::sha256_file(&served.join("g"));
    let mut httpd = Command::new("ip");
    httpd.args(["netns", "exec", &a.name, "busybox", "httpd", "-f", "-p", "192.168.127.2:8080", "-h"]).arg(&served);
    let _httpd = Background::start(httpd, Stdio::null());
    let host_port = common::free_port();
    let body = format!(r#"{{"local":"127.0.0.1:{host_port}","remote":"192.168.127.2:8080"}}"#);
    let expose = format!("http://127.0.0.1:{tcp_port}/services/forwarder/expose");
    let out = common::run("curl", &["-s", "-w", "%{http_code}", "-X", "POST", "-d", &body, &expose]);
    assert_eq!(out.stdout.trim(), "200", "{out}");
    let fetched = common::dropin::fetch_hash(&format!("http://127.0.0.1:{host_port}/g"), Duration::from_secs(20));
    assert_eq!(fetched, ghash);
    // gvproxy's /tunnel, on the TCP endpoint and on -services: "OK", then the bytes of the
    // first VM's web server.
    let tunnel = |mut s: Box<dyn ReadWrite>| -> (String, Vec<u8>) {
        s.write_all(b"GET /tunnel?ip=192.168.127.2&port=8080 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut ok = [0u8; 2];
        s.read_exact(&mut ok).unwrap();
        s.write_all(b"GET /g HTTP/1.0\r\n\r\n").unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let at = all.windows(4).position(|w| w == b"\r\n\r\n").map_or(all.len(), |i| i + 4);
        (String::from_utf8_lossy(&ok).into_owned(), all.split_off(at))
    };
    let tcp = std::net::TcpStream::connect(("127.0.0.1", tcp_port)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (ok, body) = tunnel(Box::new(tcp));
    assert_eq!((ok.as_str(), common::sha256_bytes(&body)), ("OK", ghash.clone()), "{}", log(&gv, &log_file));
    let unix = UnixStream::connect(&services).unwrap();
    unix.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let (ok, body) = tunnel(Box::new(unix));
    assert_eq!((ok.as_str(), common::sha256_bytes(&body)), ("OK", ghash.clone()), "{}", log(&gv, &log_file));
    let out = common::run("curl", &["-s", "-w", " %{http_code}", &format!("http://127.0.0.1:{tcp_port}/tunnel?ip=x")]);
    assert!(out.stdout.ends_with(" 500") && out.stdout.contains("ip is mandatory"), "{out}");
    // gvproxy's views of the two VMs: their leases, and the switch's table (two links).
    let leases = common::run("curl", &["-s", &format!("http://127.0.0.1:{tcp_port}/leases")]);
    let leases: serde_json::Value = serde_json::from_str(&leases.stdout).expect("leases JSON");
    assert_eq!(leases[ip_a.as_str()], PODMAN_MAC, "{leases}");
    assert_eq!(leases[ip_b.as_str()], "5a:94:ef:e4:0c:ef", "{leases}");
    let cam = common::run("curl", &["-s", &format!("http://127.0.0.1:{tcp_port}/cam")]);
    let cam: serde_json::Value = serde_json::from_str(&cam.stdout).expect("cam JSON");
    assert!(cam[PODMAN_MAC].is_u64() && cam["5a:94:ef:e4:0c:ef"].is_u64(), "{cam}");
    assert_ne!(cam[PODMAN_MAC], cam["5a:94:ef:e4:0c:ef"], "{cam}");
    // -services serves the API without /connect (gvproxy's ServicesMux).
    let out = common::run(
        "curl",
        &[
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            &services.to_string_lossy(),
            "http://x/connect",
        ],
    );
    assert_eq!(out.stdout.trim(), "404", "{out}");

    // Bad clients: a head cut short, and a /connect whose first frame says 0 bytes. One log
    // line for the garbled link; the VMs go on.
    let mut cut = UnixStream::connect(&api).unwrap();
    cut.write_all(b"POST /conn").unwrap();
    drop(cut);
    let mut garbled = UnixStream::connect(&api).unwrap();
    garbled.write_all(b"POST /connect HTTP/1.1\r\nHost: \r\nContent-Length: 0\r\n\r\n\x00\x00junk").unwrap();
    garbled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 64];
    match garbled.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("a garbled link was kept: {other:?}\n{}", log(&gv, &log_file)),
    }
    assert!(
        common::wait_until(Duration::from_secs(5), || log_text(&log_file).contains("garbled framing")),
        "{}",
        log(&gv, &log_file)
    );
    assert_eq!(log_text(&log_file).matches("garbled framing").count(), 1, "{}", log(&gv, &log_file));
    let got = a.sh(&format!("curl -s -f --max-time 20 {url} | sha256sum"));
    assert_eq!(common::first_word(&got.stdout), hash, "{got}");
    let got = b.sh(&format!("curl -s -f --max-time 20 {url} | sha256sum"));
    assert_eq!(common::first_word(&got.stdout), hash, "{got}");
    // A VM's neighbour discovery on this IPv4-only network is no spoof.
    assert!(!log_text(&log_file).contains(") refused: "), "{}", log(&gv, &log_file));

    // SIGTERM: exit 1 as gvproxy, every socket removed.
    gv.signal(libc::SIGTERM);
    assert_eq!(gv.exit_code(Duration::from_secs(15)), 1, "{}", log(&gv, &log_file));
    assert!(log_text(&log_file).contains("gvproxy exiting: signal caught"), "{}", log(&gv, &log_file));
    for gone in [&api, &services] {
        assert!(!gone.exists(), "{} left behind", gone.display());
    }
    assert!(!common::dropin::port_listening(tcp_port), "the TCP endpoint still listens");
}

/// `-listen vsock://:PORT` serves on AF_VSOCK: the port is usernet's (binding it again
/// fails) and it is named in the log; SIGTERM ends usernet as gvproxy. A machine without
/// AF_VSOCK (no /dev/vsock) cannot run this: the test fails saying so rather than pass.
/// No vsock client can connect here (no loopback transport; see the README).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn listen_vsock_holds_its_port() {
    assert!(Path::new("/dev/vsock").exists(), "not run: this machine has no /dev/vsock (AF_VSOCK)");
    let dir = TempDir::new("gvvsock");
    let gvproxy = dir.join("gvproxy");
    std::os::unix::fs::symlink(common::usernet_bin(), &gvproxy).expect("symlink gvproxy");
    let log_file = dir.join("gvproxy.log");
    let port = 20000 + std::process::id() % 20000;
    let mut cmd = common::as_test_user(&gvproxy);
    cmd.args(["-ssh-port", "-1", "-listen", &format!("vsock://:{port}"), "-log-file"]).arg(&log_file);
    let mut gv = Background::start(cmd, Stdio::null());
    assert!(
        common::wait_until(Duration::from_secs(10), || log_text(&log_file).contains("waiting for clients")),
        "{}",
        log(&gv, &log_file)
    );
    assert!(log_text(&log_file).contains(&format!("listening vsock://:{port}")), "{}", log(&gv, &log_file));
    let py = "import socket,sys\ns=socket.socket(socket.AF_VSOCK,socket.SOCK_STREAM)\n\
              try:\n  s.bind((socket.VMADDR_CID_ANY,int(sys.argv[1])))\n  print('free')\n\
              except OSError as e:\n  print('taken' if e.errno==98 else e)";
    let out = common::run(&common::python().to_string_lossy(), &["-c", py, &port.to_string()]);
    assert_eq!(out.stdout.trim(), "taken", "{out}\n{}", log(&gv, &log_file));
    gv.signal(libc::SIGTERM);
    assert_eq!(gv.exit_code(Duration::from_secs(15)), 1, "{}", log(&gv, &log_file));
}

/// A stream of either kind, for /tunnel.
trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
