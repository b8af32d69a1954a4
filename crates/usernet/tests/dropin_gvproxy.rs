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
    let ssh_port = common::free_service_port();
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
