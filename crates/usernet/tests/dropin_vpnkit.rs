//! usernet as vpnkit: started through a symlink named `vpnkit` with rootlesskit 1.1.0's
//! command line (`--ethernet PATH --mtu N`, plus `--host-ip 0.0.0.0` for rootlesskit's
//! `--disable-host-loopback`), and as `usernet serve --listen-vpnkit unix:PATH`.
//!
//! Debian 12's rootlesskit is built without its vpnkit driver (`--net=vpnkit` answers "not
//! supported in this Debian package"), so the driver's steps are run by
//! tests/helpers/vmnet_client.py exactly as rootlesskit's parent and child take them: the
//! parent connects, says hello, asks for an interface by UUID and finds its address with the
//! Go client's own DHCP probe; the child connects again with the same UUID from inside the
//! guest's namespace and carries frames between it and a TAP device, configured as
//! rootlesskit's child configures it. Real clients run in that namespace: curl (a file
//! checked by its hash) to the host's loopback through 192.168.65.2, dig to the gateway's
//! DNS, ping.
//!
//! usernet runs as the unprivileged test user when USERNET_TEST_USER is set (as rootlesskit
//! runs it); the namespace and the bridge are root's.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const UUID_A: &str = "0f9e6c9a-3c1b-4d5e-8f70-123456789abc";
const UUID_B: &str = "5d2a8a2e-7c1f-4a55-9b1e-fedcba987654";

fn vmnet_client() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/helpers/vmnet_client.py")
}

/// A directory with a `vpnkit` symlink to the binary under test.
fn vpnkit_symlink(dir: &TempDir) -> std::path::PathBuf {
    let link = dir.join("vpnkit");
    std::os::unix::fs::symlink(usernet_bin(), &link).expect("symlink vpnkit");
    link
}

/// A network namespace of the test's own, removed on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("vk{tag}{}", unique_id());
        must("ip", &["netns", "add", &name]);
        must("ip", &["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Netns { name }
    }

    fn sh(&self, script: &str) -> Output {
        run_bounded(Command::new("ip").args(["netns", "exec", &self.name, "sh", "-c", script]), DEFAULT_TIMEOUT)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// rootlesskit's parent: the interface's MTU, MAC and DHCP address; the connection stays
/// open (idle) while the returned process lives.
fn probe(socket: &std::path::Path, uuid: &str) -> (Background, u32, String, String) {
    let mut c = Command::new(python());
    c.arg(vmnet_client()).arg("probe").arg(socket).arg(uuid);
    let mut p = Background::start(c, Stdio::piped());
    let ip = p.wait_line("ip ", Duration::from_secs(20))[3..].to_string();
    let mtu = p.lines_with("mtu ")[0][4..].parse().expect("mtu");
    let mac = p.lines_with("mac ")[0][4..].to_string();
    (p, mtu, mac, ip)
}

/// rootlesskit's child: the TAP `tap0` in `ns`, bridged to a second connection with the
/// same UUID, and configured as rootlesskit's child does it (address /24, MTU, up, the
/// default route via the gateway).
fn bridge(ns: &Netns, socket: &std::path::Path, uuid: &str, ip: &str, mtu: u32) -> Background {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &ns.name]).arg(python()).arg(vmnet_client()).arg("bridge").arg(socket).arg(uuid);
    c.arg("tap0").env("PATH", search_path());
    let mut b = Background::start(c, Stdio::null());
    b.wait_line("bridging", Duration::from_secs(20));
    ns.sh(&format!(
        "ip link set tap0 mtu {mtu} up && ip addr add {ip}/24 dev tap0 && ip route add default via 192.168.65.1"
    ))
    .assert_ok();
    b
}

fn start_vpnkit(dir: &TempDir, extra: &[&str]) -> (Background, std::path::PathBuf) {
    let socket = dir.join("vpnkit-ethernet.sock");
    let mut c = as_test_user(vpnkit_symlink(dir));
    // rootlesskit's exact argv (pkg/network/vpnkit: ConfigureNetwork).
    c.arg("--ethernet").arg(&socket).args(["--mtu", "1500"]).args(extra);
    let vk = Background::start(c, Stdio::null());
    (vk, socket)
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn rootlesskit_driver_steps() {
    require(&["ip", "curl", "dig", "sha256sum", "setpriv"]);
    let (_www, server, hash) = serve_random_file("vk-www", "f", 3 << 20);
    let dir = TempDir::new("vk");
    let (mut vk, socket) = start_vpnkit(&dir, &[]);

    let (_parent, mtu, mac, ip) = probe(&socket, UUID_A);
    assert_eq!((mtu, mac.as_str(), ip.as_str()), (1500, "5a:94:ef:e4:0c:ee", "192.168.65.3"), "{}", vk.describe());
    let ns = Netns::new("a");
    let _child = bridge(&ns, &socket, UUID_A, &ip, mtu);

    let out = ns.sh(&format!(
        "curl -sS --max-time 20 http://192.168.65.2:{}/f | sha256sum; \
         dig +short +time=3 +tries=2 @192.168.65.1 host.docker.internal; \
         ping -c 1 -W 3 192.168.65.1 >/dev/null && echo ping-ok",
        server.port
    ));
    let text = out.stdout.clone();
    assert!(text.contains(&hash), "download through 192.168.65.2 (want {hash}):\n{text}\n{}", vk.describe());
    assert!(text.lines().any(|l| l == "192.168.65.2"), "host.docker.internal from the gateway's DNS:\n{text}");
    assert!(text.contains("ping-ok"), "ping of the gateway:\n{text}\n{}", out.stderr);

    // The socket is the owner's alone, as every transport socket.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).expect("socket").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // rootlesskit ends it with a signal: exit 0, the socket gone.
    assert_eq!(vk.stop(), 0, "{}", vk.describe());
    assert!(!socket.exists(), "the ethernet socket is removed on exit");
}

/// `--host-ip 0.0.0.0` (rootlesskit's `--disable-host-loopback`): 192.168.65.2 no longer
/// leads to the host's loopback, and a connection to it is refused at once.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn disable_host_loopback() {
    require(&["ip", "curl", "setpriv"]);
    let (_www, server, _) = serve_random_file("vk-www0", "f", 1000);
    let dir = TempDir::new("vk-nohost");
    let (vk, socket) = start_vpnkit(&dir, &["--host-ip", "0.0.0.0"]);
    let (_parent, mtu, _mac, ip) = probe(&socket, UUID_A);
    let ns = Netns::new("n");
    let _child = bridge(&ns, &socket, UUID_A, &ip, mtu);
    let out = ns.sh(&format!(
        "curl -sS --max-time 10 -o /dev/null -w '%{{http_code}}\\n' http://192.168.65.2:{}/; echo exit=$?",
        server.port
    ));
    assert!(out.stdout.contains("exit=7"), "refused (curl exit 7):\n{}\n{}\n{}", out.stdout, out.stderr, vk.describe());
}

/// Two interfaces, two guests; bad clients (a garbled hello, an unknown command, a client
/// gone mid-handshake and one gone mid-frame) each cost one log line and their own
/// connection, and the guests keep working.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn two_guests_and_bad_clients() {
    require(&["ip", "curl", "sha256sum", "setpriv"]);
    let (_www, server, hash) = serve_random_file("vk-www2", "f", 1 << 20);
    let dir = TempDir::new("vk-two");
    let (vk, socket) = start_vpnkit(&dir, &[]);
    let (_pa, mtu, mac_a, ip_a) = probe(&socket, UUID_A);
    let (_pb, _, mac_b, ip_b) = probe(&socket, UUID_B);
    assert_ne!(mac_a, mac_b);
    assert_ne!(ip_a, ip_b);
    let (na, nb) = (Netns::new("a"), Netns::new("b"));
    let _ca = bridge(&na, &socket, UUID_A, &ip_a, mtu);
    let _cb = bridge(&nb, &socket, UUID_B, &ip_b, mtu);
    let fetch =
        |ns: &Netns| ns.sh(&format!("curl -sS --max-time 20 http://192.168.65.2:{}/f | sha256sum", server.port));

    let hello = "564d4e3354".to_string() + "16000000" + &"30".repeat(40);
    let mut garbled_uuid = "01".to_string();
    garbled_uuid.push_str(&"7a".repeat(36));
    garbled_uuid.push_str("00000000");
    let raw = |parts: &[&str]| {
        let mut c = Command::new(python());
        c.arg(vmnet_client()).arg("raw").arg(&socket).args(parts);
        run_bounded(&mut c, Duration::from_secs(30)).stdout
    };
    // Garbage instead of a hello: closed without a reply.
    assert_eq!(raw(&[&"41".repeat(49)]).trim(), "closed 0 bytes");
    // A hello, then a command that names no UUID: our hello, then a refusal.
    let out = raw(&[&hello, &garbled_uuid]);
    let n: usize = out.trim().trim_start_matches("closed ").trim_end_matches(" bytes").parse().unwrap_or(0);
    assert!(n > 49 && n < 49 + 258, "hello and a refusal: {out}");
    // Half a hello, then gone.
    assert_eq!(raw(&["564d4e33"]).trim(), "open 0 bytes");
    // A whole handshake, then half a frame, then gone.
    let cmd = format!("01{}00000000", hex(b"99999999-2222-3333-4444-555555555555"));
    // (What follows the hello and the interface may be frames for everyone, ARP say.)
    let out = raw(&[&hello, &cmd, "e803aabbcc"]);
    let n: usize = out.trim().trim_start_matches("open ").trim_end_matches(" bytes").parse().unwrap_or(0);
    assert!(out.starts_with("open") && n >= 49 + 258, "a whole handshake: {out}");

    for ns in [&na, &nb] {
        let out = fetch(ns);
        assert!(out.stdout.contains(&hash), "{}: {}\n{}\n{}", ns.name, out.stdout, out.stderr, vk.describe());
    }
    let log = vk.stderr();
    for want in ["not a vmnet hello", "not a UUID", "closed the connection during its hello", "guest went away"] {
        assert_eq!(log.matches(want).count(), 1, "one line for {want:?}:\n{log}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `usernet serve --listen-vpnkit unix:PATH`: the same protocol beside serve's others, on
/// serve's network (the guest from .2, the host at .254).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn serve_listen_vpnkit() {
    require(&["ip", "curl", "sha256sum", "setpriv"]);
    let (_www, server, hash) = serve_random_file("vk-www3", "f", 1 << 20);
    let dir = TempDir::new("vk-serve");
    let socket = dir.join("vk.sock");
    let mut c = usernet_command();
    c.args(["serve", "--dns-upstream", "127.0.0.1:9", "--listen-vpnkit"]).arg(format!("unix:{}", socket.display()));
    let sv = Background::start(c, Stdio::null());
    let (_p, mtu, _mac, ip) = probe(&socket, UUID_A);
    assert_eq!(ip, GUEST_IP, "{}", sv.describe());
    let ns = Netns::new("s");
    let _child = bridge(&ns, &socket, UUID_A, &ip, mtu);
    let out = ns.sh(&format!("curl -sS --max-time 20 http://{HOST_IP}:{}/f | sha256sum", server.port));
    assert!(out.stdout.contains(&hash), "{}\n{}\n{}", out.stdout, out.stderr, sv.describe());
}
