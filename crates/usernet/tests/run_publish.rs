//! `usernet run -p/-P`: guest ports published on the host, as `docker run -p` does.
//!
//! Each test starts `usernet run` in the background with a real server inside the guest
//! (a python HTTP or UDP-echo server that does no name lookups, or socat), waits for the
//! server's READY line, and drives it from the host with real clients (curl, socat, UDP
//! sockets): over 127.0.0.1, ::1 and `localhost`, bulk data in both directions checked by
//! sha256, ranges, picked ports (read from usernet's `docker port` lines on stderr), `-P`,
//! taken ports (Docker's message, exit 125, COMMAND never started), the ports' release on
//! exit, and a client in a namespace of the test's own whose real address the guest sees.
//!
//! Traffic goes only to loopback and to the test's own namespace (198.51.100.0/24 over a
//! veth pair). Every command is bounded; host ports are unique per test and checked free.

mod common;

/// Where a client on the host's loopback appears in a namespace guest: its connection is
/// spliced socket to socket inside the namespace, from the guest's own loopback.
const LOOPBACK_CLIENT: &str = "127.0.0.1";

use common::*;
use std::net::{Ipv6Addr, TcpListener, UdpSocket};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Size of a bulk transfer.
const BULK: usize = 20 << 20;
/// How long a guest server may take to come up.
const READY_LIMIT: Duration = Duration::from_secs(20);
/// Bound of every guest server (it is normally stopped long before).
const GUEST_LIFETIME: &str = "90";

/// The guest's servers. `http PORTS DIR`: one HTTP server per port of the comma-separated
/// list, serving DIR; `/whoami` answers `port P client IP`; `http6 PORTS DIR` the same on
/// IPv6 only (`[::]`, IPV6_V6ONLY). `udp-echo PORT`: echoes every
/// datagram. `whoami-tcp PORT`: answers each TCP connection with its client's address and a
/// newline, then waits for the client to close first (as a server of a protocol where the
/// client says when it is done). All print `READY` once bound and `CLIENT <ip>` for every
/// request, datagram or connection.
const GUEST_SERVER: &str = r#"
import http.server, socket, socketserver, sys, threading

def log(s):
    sys.stdout.write(s + "\n")
    sys.stdout.flush()

class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):
        # No getfqdn(): no name lookups at all.
        socketserver.TCPServer.server_bind(self)
        self.server_name = "guest"
        self.server_port = self.server_address[1]

def handler(port, directory):
    class H(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=directory, **k)
        def log_message(self, *a):
            pass
        def do_GET(self):
            log("CLIENT %s" % self.client_address[0])
            if self.path == "/whoami":
                body = ("port %d client %s\n" % (port, self.client_address[0])).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            super().do_GET()
    return H

class Server6(Server):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        Server.server_bind(self)

if sys.argv[1] in ("http", "http6"):
    ports = [int(p) for p in sys.argv[2].split(",")]
    if sys.argv[1] == "http6":
        servers = [Server6(("::", p), handler(p, sys.argv[3])) for p in ports]
    else:
        servers = [Server(("0.0.0.0", p), handler(p, sys.argv[3])) for p in ports]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    log("READY")
    servers[0].serve_forever()
elif sys.argv[1] == "whoami-tcp":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    s.listen(16)
    log("READY")
    while True:
        conn, peer = s.accept()
        log("CLIENT %s" % peer[0])
        conn.sendall((peer[0] + "\n").encode())
        while conn.recv(4096):
            pass
        conn.close()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", int(sys.argv[2])))
    log("READY")
    while True:
        data, peer = s.recvfrom(65535)
        log("CLIENT %s" % peer[0])
        s.sendto(data, peer)
"#;

// ---------------------------------------------------------------------------
// Helpers of this file.

/// True when `port` is free within 5 s. A check made once can fail though nothing of
/// usernet's holds the port: another test thread forking copies the socket `port_free` has just
/// bound into its child until that child calls exec, and the next bind of the check then finds
/// the port taken (1 check in 50 failed so with a thread spawning `true` in a loop).
fn port_released(port: u16) -> bool {
    wait_until(Duration::from_secs(5), || port_free(port))
}

/// A directory with the guest server script and a file `f` of `len` random bytes.
fn guest_dir(tag: &str, len: usize) -> (TempDir, String) {
    let dir = TempDir::new(tag);
    std::fs::write(dir.join("guestsrv.py"), GUEST_SERVER).expect("write guest server");
    write_random_file(&dir.join("f"), len);
    let hash = sha256_file(&dir.join("f"));
    (dir, hash)
}

/// `timeout N python3 guestsrv.py ARGS...` as one shell word list.
fn guest_server_cmd(dir: &TempDir, args: &[&str]) -> Vec<String> {
    let mut v = vec![
        "timeout".to_string(),
        GUEST_LIFETIME.to_string(),
        python().to_string_lossy().into_owned(),
        dir.join("guestsrv.py").to_string_lossy().into_owned(),
    ];
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// `usernet run ARGS -- CMD...` in the background (stdin /dev/null).
fn usernet_bg<S: AsRef<std::ffi::OsStr>>(dns: &DnsUpstream, args: &[&str], cmd: &[S]) -> Background {
    Background::start(Usernet::new(dns).args(args).command(cmd), Stdio::null())
}

/// `curl` from the host (never through a proxy), bounded; its output.
fn curl(args: &[&str]) -> Output {
    let mut all = vec!["-sS", "--noproxy", "*", "-m", "30"];
    all.extend_from_slice(args);
    run("curl", &all)
}

/// GET `url` and return the body; panics with context if it fails.
fn get(url: &str, ctx: &Background) -> String {
    let out = curl(&["-f", url]);
    assert!(out.success(), "GET {url} failed:\n{out}\nusernet:\n{}", ctx.describe());
    out.stdout
}

/// The `docker port` lines usernet printed on stderr.
fn port_lines(stderr: &str) -> Vec<String> {
    stderr.lines().filter(|l| l.contains(" -> ")).map(|l| l.trim().to_string()).collect()
}

/// The port of a `docker port` line (`80/tcp -> 0.0.0.0:49153`).
fn line_port(line: &str) -> u16 {
    line.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("no port in {line:?}"))
}

/// Sends `msg` to `to` over UDP and waits for the echo (a few tries, bounded).
fn udp_echo(from: &str, to: &str, msg: &[u8]) -> bool {
    let sock = UdpSocket::bind(from).expect("bind UDP client");
    sock.set_read_timeout(Some(Duration::from_millis(500))).expect("timeout");
    let mut buf = vec![0u8; 65536];
    for _ in 0..10 {
        sock.send_to(msg, to).expect("send");
        if let Ok(n) = sock.recv(&mut buf)
            && &buf[..n] == msg
        {
            return true;
        }
    }
    false
}

/// A TCP socket bound to [::]:port with IPV6_V6ONLY and listening: holds the port on
/// IPv6 only.
fn hold_v6only(port: u16) -> OwnedFd {
    // SAFETY: plain socket syscalls on a descriptor we own; sockaddr_in6 is fully initialised.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket");
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        // SO_REUSEADDR, as std's TcpListener (and so `port_free`, which chose the port) sets
        // it: without it, a port an earlier test left in TIME_WAIT is refused here (CI failed
        // so once, "bind [::]:21110"). A listener on the port still makes it taken.
        for (level, option) in [(libc::SOL_SOCKET, libc::SO_REUSEADDR), (libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)] {
            let size = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            libc::setsockopt(raw, level, option, (&one as *const libc::c_int).cast(), size);
        }
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_port = port.to_be();
        let rc = libc::bind(
            raw,
            (&sa as *const libc::sockaddr_in6).cast(),
            std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind [::]:{port}");
        assert_eq!(libc::listen(raw, 16), 0, "listen");
        fd
    }
}

/// A namespace of the test's own joined to the host by a veth pair with a /30 from
/// 198.51.100.0-199: the host side is `host_ip`, the namespace side `ip`. The slot is
/// claimed by creating the namespace `unpub<slot>`. Removed on Drop.
struct PeerNs {
    ns: String,
    host_veth: String,
    host_ip: String,
    ip: String,
    /// The same over IPv6, in 2001:db8:76:<slot>::/64 (host side ::1, namespace ::2).
    host_ip6: String,
    ip6: String,
}

impl PeerNs {
    fn new() -> PeerNs {
        const SLOTS: u32 = 50;
        let first = std::process::id().wrapping_mul(13);
        for i in 0..SLOTS {
            let slot = (first + i) % SLOTS;
            let ns = format!("unpub{slot}");
            if !run("ip", &["netns", "add", &ns]).success() {
                continue;
            }
            let peer = PeerNs {
                host_veth: format!("{ns}h"),
                host_ip: format!("198.51.100.{}", slot * 4 + 1),
                ip: format!("198.51.100.{}", slot * 4 + 2),
                // Written the way programs print them (slot 0 is 2001:db8:76::2, not :0::2).
                host_ip6: Ipv6Addr::new(0x2001, 0xdb8, 0x76, slot as u16, 0, 0, 0, 1).to_string(),
                ip6: Ipv6Addr::new(0x2001, 0xdb8, 0x76, slot as u16, 0, 0, 0, 2).to_string(),
                ns,
            };
            let inner = format!("{}r", peer.ns);
            must("ip", &["link", "add", &peer.host_veth, "type", "veth", "peer", "name", &inner, "netns", &peer.ns]);
            must("ip", &["addr", "add", &format!("{}/30", peer.host_ip), "dev", &peer.host_veth]);
            must("ip", &["link", "set", &peer.host_veth, "up"]);
            peer.exec(&["ip", "addr", "add", &format!("{}/30", peer.ip), "dev", &inner]).assert_ok();
            peer.exec(&["ip", "link", "set", &inner, "up"]).assert_ok();
            peer.exec(&["ip", "link", "set", "lo", "up"]).assert_ok();
            must("ip", &["-6", "addr", "add", &format!("{}/64", peer.host_ip6), "dev", &peer.host_veth, "nodad"]);
            peer.exec(&["ip", "-6", "addr", "add", &format!("{}/64", peer.ip6), "dev", &inner, "nodad"]).assert_ok();
            // The client's traffic must go over the veth to the host, nowhere else.
            for host in [&peer.host_ip, &peer.host_ip6] {
                let route = peer.exec(&["ip", "route", "get", host]);
                assert!(route.stdout.contains(&format!("dev {inner} ")), "route to host:\n{route}");
            }
            return peer;
        }
        panic!("no free namespace slot unpub0..unpub{SLOTS}");
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).args(cmd).env("PATH", search_path());
        run_bounded(&mut c, DEFAULT_TIMEOUT)
    }
}

impl Drop for PeerNs {
    fn drop(&mut self) {
        for pid in run("ip", &["netns", "pids", &self.ns]).stdout.split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill(2) of a process in our own namespace.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = run("ip", &["link", "del", &self.host_veth]);
        let _ = run("ip", &["netns", "del", &self.ns]);
    }
}

const TOOLS: &[&str] = &["ip", "dnsmasq", "timeout", "sh", "curl", "python3", "sha256sum"];

// ---------------------------------------------------------------------------
// Tests.

/// `-p P:80`: the guest's HTTP server answers on 127.0.0.1, ::1 and localhost; a 20 MB
/// download arrives intact; a loopback client's connection is spliced socket to socket inside
/// the guest's namespace, so the guest sees it come from its own 127.0.0.1 (as with pasta).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn http_over_ipv4_ipv6_and_localhost() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, want) = guest_dir("pub-http", BULK);
    let p = free_ports(1);
    let dir_s = dir.path().to_string_lossy().into_owned();
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:80")], &guest_server_cmd(&dir, &["http", "80", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);

    for url in [
        format!("http://127.0.0.1:{p}/whoami"),
        format!("http://[::1]:{p}/whoami"),
        format!("http://localhost:{p}/whoami"),
    ] {
        let body = get(&url, &bg);
        assert_eq!(body.trim(), format!("port 80 client {LOOPBACK_CLIENT}"), "{url}");
    }
    // A fixed port: usernet prints no `docker port` line.
    assert!(port_lines(&bg.stderr()).is_empty(), "{}", bg.describe());

    let got = dir.join("got");
    let url = format!("http://127.0.0.1:{p}/f");
    let out = curl(&["-f", "-o", &got.to_string_lossy(), &url]);
    assert!(out.success(), "download:\n{out}\n{}", bg.describe());
    assert_eq!(sha256_file(&got), want, "20 MB download corrupted");
    let got6 = dir.join("got6");
    let url6 = format!("http://[::1]:{p}/f");
    let out = curl(&["-f", "-o", &got6.to_string_lossy(), &url6]);
    assert!(out.success(), "download over ::1:\n{out}\n{}", bg.describe());
    assert_eq!(sha256_file(&got6), want, "20 MB download over ::1 corrupted");

    bg.stop();
    let clients: Vec<String> =
        bg.stdout().lines().filter_map(|l| l.strip_prefix("CLIENT ")).map(str::to_string).collect();
    assert!(clients.len() >= 5, "{}", bg.describe());
    assert!(
        clients.iter().all(|c| c == LOOPBACK_CLIENT),
        "a loopback client must appear as {LOOPBACK_CLIENT}:\n{}",
        bg.describe()
    );
}

/// Idle connections from the host's loopback (spliced, a pipe each way) keep pipes of the
/// kernel's default size: pipes count against their user's pipe pages, and past
/// fs.pipe-user-pages-soft an unprivileged user's new pipes, any program's, are cut to
/// 8 KiB. 100 connections with 1 MiB pipes would pass it; run as the test user, a fresh
/// pipe of that user's is checked to be whole. A download then still works (its pipe grows).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn idle_published_connections_leave_the_users_pipes_alone() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, want) = guest_dir("pub-pipes", BULK);
    let p = free_ports(1);
    let dir_s = dir.path().to_string_lossy().into_owned();
    let spec = format!("{p}:80");
    let mut bg = usernet_bg(&dns, &["-p", &spec], &guest_server_cmd(&dir, &["http", "80", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);
    let usernet = pids_matching(&spec)
        .into_iter()
        .find(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "usernet"))
        .unwrap_or_else(|| panic!("no usernet process with {spec}:\n{}", bg.describe()));

    let idle: Vec<std::net::TcpStream> = (0..100)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", p)).expect("connect to the published port"))
        .collect();
    // Every connection is spliced (two pipes) once usernet has accepted it.
    let enough = wait_until(Duration::from_secs(20), || pipe_sizes(usernet).len() >= 200);
    let sizes = pipe_sizes(usernet);
    assert!(enough, "{} pipes for {} connections:\n{}", sizes.len(), idle.len(), bg.describe());
    let largest = sizes.iter().copied().max().unwrap_or(0);
    assert!(largest <= 64 << 10, "an idle connection's pipe holds {largest} bytes");
    if test_user().is_some() {
        let out = run_bounded(
            as_test_user(python()).args(["-c", "import os,fcntl; r,w=os.pipe(); print(fcntl.fcntl(w, 1032))"]),
            Duration::from_secs(20),
        );
        assert_eq!(out.stdout.trim(), (64 << 10).to_string(), "a new pipe of the test user's:\n{out}");
    }

    let got = dir.join("got");
    let out = curl(&["-f", "-o", &got.to_string_lossy(), &format!("http://127.0.0.1:{p}/f")]);
    assert!(out.success(), "download beside 100 idle connections:\n{out}\n{}", bg.describe());
    assert_eq!(sha256_file(&got), want, "20 MB download corrupted");
    drop(idle);
    bg.stop();
}

/// Loopback clients that close their connections first keep being spliced. Closing first
/// leaves usernet's socket inside the guest in TIME_WAIT, holding its port for a minute. The
/// guest's ephemeral ports are cut to four here, so that a dial which took its port at bind(2)
/// would find them all held after four connections; connect(2) picking the port reuses a
/// loopback port from TIME_WAIT (net.ipv4.tcp_tw_reuse), so every connection gets through,
/// still from the guest's 127.0.0.1. (With the guest's usual 28,232 ports, bind(2) searched
/// them: 6 ms per connection once 15,000 were held, and the engine waited meanwhile.)
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn loopback_clients_that_close_first_stay_spliced() {
    use std::io::{BufRead, BufReader};
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-close-first", 0);
    let p = free_ports(1);
    let server = guest_server_cmd(&dir, &["whoami-tcp", "80"]).join(" ");
    let script = format!("echo 40000 40003 > /proc/sys/net/ipv4/ip_local_port_range && exec {server}");
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:80")], &["sh", "-c", &script]);
    bg.wait_line("READY", READY_LIMIT);

    // Twelve connections: three rounds of the four ports. A connection waits 0.4 s after the
    // last, so that of the four ports' TIME_WAITs at least two are over a second old, as
    // the kernel's reuse asks.
    for i in 0..12 {
        let conn = std::net::TcpStream::connect(("127.0.0.1", p)).expect("connect to the published port");
        conn.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut line = String::new();
        let read = BufReader::new(&conn).read_line(&mut line);
        assert!(matches!(read, Ok(n) if n > 0), "connection {i}: no answer ({read:?})\n{}", bg.describe());
        assert_eq!(line.trim(), LOOPBACK_CLIENT, "connection {i} came from elsewhere\n{}", bg.describe());
        drop(conn);
        std::thread::sleep(Duration::from_millis(400));
    }
    bg.stop();
}

/// The capacity of each pipe `pid` holds (F_GETPIPE_SZ through /proc/PID/fd), once per pipe.
fn pipe_sizes(pid: u32) -> Vec<i32> {
    use std::os::fd::AsRawFd;
    let mut seen = std::collections::HashSet::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return Vec::new() };
    fds.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:") && seen.insert(l))
        })
        .filter_map(|e| {
            use std::os::unix::fs::OpenOptionsExt;
            let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(e.path()).ok()?;
            // SAFETY: F_GETPIPE_SZ on a descriptor we own; it takes no argument.
            let n = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETPIPE_SZ) };
            (n > 0).then_some(n)
        })
        .collect()
}

/// 20 MB uploaded from the host with socat into a guest-side `socat -u TCP-LISTEN:80`.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn upload_into_guest_socat() {
    require(&["ip", "dnsmasq", "timeout", "sh", "socat", "ss", "sha256sum"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("pub-up");
    let src = dir.join("src");
    write_random_file(&src, BULK);
    let want = sha256_file(&src);
    let dst = dir.join("dst");
    let p = free_ports(1);
    let script = format!(
        "timeout 90 socat -u TCP4-LISTEN:80,reuseaddr CREATE:{dst} & pid=$!; i=0; \
         while ! ss -Hltn 'sport = :80' | grep -q .; do i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.05; done; \
         echo READY; wait $pid; echo \"socat $?\"; sha256sum {dst}",
        dst = dst.display()
    );
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:80")], &["sh", "-c", &script]);
    bg.wait_line("READY", READY_LIMIT);
    let out =
        run("timeout", &["90", "socat", "-u", &format!("FILE:{}", src.display()), &format!("TCP4:127.0.0.1:{p}")]);
    assert!(out.success(), "host socat:\n{out}\n{}", bg.describe());
    let code = bg.exit_code(Duration::from_secs(90));
    assert_eq!(code, 0, "{}", bg.describe());
    assert!(bg.stdout().contains("socat 0"), "{}", bg.describe());
    assert_eq!(hex_hashes(&bg.stdout()), vec![want], "upload corrupted:\n{}", bg.describe());
}

/// The very first datagram to a fresh guest's published UDP port is answered: it is not
/// lost while usernet learns the guest's MAC (it knows it from the start in `run`, and a
/// frame for an unknown MAC waits for the ARP reply). One datagram, no retry.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn first_udp_datagram_to_a_fresh_guest_is_answered() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-udp-first", 0);
    let p = free_ports(1);
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:7/udp")], &guest_server_cmd(&dir, &["udp-echo", "7"]));
    bg.wait_line("READY", READY_LIMIT);
    let sock = UdpSocket::bind("127.0.0.1:0").expect("bind UDP client");
    sock.set_read_timeout(Some(Duration::from_secs(3))).expect("timeout");
    let msg: Vec<u8> = (0..1200u32).map(|i| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    sock.send_to(&msg, ("127.0.0.1", p)).expect("send");
    let mut buf = vec![0u8; 65536];
    let got =
        sock.recv(&mut buf).unwrap_or_else(|e| panic!("the first datagram got no answer: {e}\n{}", bg.describe()));
    assert_eq!(sha256_bytes(&buf[..got]), sha256_bytes(&msg), "{}", bg.describe());
    bg.stop();
}

/// A host client's bursts sent segmented (UDP_SEGMENT, as a QUIC client sends) to a
/// published UDP port reach the guest's server as the datagrams they were: usernet reads
/// each burst at once from its listening socket (UDP_GRO) and hands it on segmented (USO)
/// or one by one; each echo is checked by sha256 and order, over IPv4 and IPv6.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_bursts_sent_segmented_to_a_published_port_arrive_datagram_by_datagram() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-udp-gro", 0);
    let p = free_ports(1);
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:7/udp")], &guest_server_cmd(&dir, &["udp-echo", "7"]));
    bg.wait_line("READY", READY_LIMIT);
    // Each datagram is known by its head (window and index): one that comes late, after
    // its window's wait ran out under load, is still matched, and counted as lost only if
    // it never comes. A wrong one (other bytes, or a whole burst as one datagram) never
    // matches.
    let client = r#"
import hashlib, socket, sys
def bursts(family, host, port, size, count, windows):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(3)
    s.setsockopt(socket.SOL_UDP, 103, size)
    want = {}
    same = wrong = 0
    for window in range(windows):
        datagrams = []
        for i in range(count):
            n = size // 2 if i == count - 1 else size
            head = b"%03d:%02d:" % (window, i)
            datagrams.append(head + bytes((window * 13 + i * 7 + k) % 251 for k in range(n - len(head))))
            want[head] = hashlib.sha256(datagrams[-1]).digest()
        s.send(b"".join(datagrams))
        for i in range(count):
            try:
                got = s.recv(70000)
            except socket.timeout:
                break
            if want.pop(got[:7], None) == hashlib.sha256(got).digest():
                same += 1
            else:
                wrong += 1
    print(family.name, size, "same", same, "wrong", wrong, "lost", len(want))
port = int(sys.argv[1])
bursts(socket.AF_INET, "127.0.0.1", port, 1400, 40, 20)
bursts(socket.AF_INET6, "::1", port, 1400, 40, 20)
bursts(socket.AF_INET, "127.0.0.1", port, 200, 60, 10)
"#;
    let out = Command::new("python3").arg("-c").arg(client).arg(p.to_string()).output().expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let want = [
        "AF_INET 1400 same 800 wrong 0 lost 0",
        "AF_INET6 1400 same 800 wrong 0 lost 0",
        "AF_INET 200 same 600 wrong 0 lost 0",
    ];
    assert_eq!(lines, want, "{}\n{}", String::from_utf8_lossy(&out.stderr), bg.describe());
    bg.stop();
}

/// `-p P:7/udp` to a guest server that answers with bursts sent segmented (UDP_SEGMENT, as
/// a QUIC server sends): every datagram reaches each client whole and in order (sha256),
/// over the loopback's IPv4 and IPv6 (the answers leave segmented too) and from a namespace
/// of the test's own over IPv4 (one by one: the port's socket cannot read the route's MTU)
/// and IPv6.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn a_guest_s_bursts_reach_a_published_port_s_clients_datagram_by_datagram() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let peer = PeerNs::new();
    let p = free_ports(1);
    let helpers = common::helper_script();
    let helpers_dir = helpers.parent().unwrap().to_string_lossy().into_owned();
    // The server exits when its stdin closes: the pipe from sleep keeps it open.
    let server = format!("sleep {GUEST_LIFETIME} | python3 {} udp-burst --bind 0.0.0.0 --port 7", helpers.display());
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:7/udp")], &["sh", "-c", &server]);
    bg.wait_line("PORT 7", READY_LIMIT);
    let dir = TempDir::new("pub-burst");
    let script = dir.join("client.py");
    std::fs::write(
        &script,
        r#"
import sys
sys.path.insert(0, sys.argv[1])
from testserver import check_bursts
host, port = sys.argv[2], int(sys.argv[3])
check_bursts(host, port, 1400, 40, 20)
check_bursts(host, port, 200, 60, 5)
check_bursts(host, port, 1200, 2, 5)
"#,
    )
    .unwrap();
    let client = |host: &str| {
        vec![
            "python3".to_string(),
            script.to_string_lossy().into_owned(),
            helpers_dir.clone(),
            host.into(),
            p.to_string(),
        ]
    };
    let want = |family: &str| {
        [
            format!("{family} 1400 same 800 wrong 0 lost 0 reordered 0"),
            format!("{family} 200 same 300 wrong 0 lost 0 reordered 0"),
            format!("{family} 1200 same 10 wrong 0 lost 0 reordered 0"),
        ]
    };
    for (host, family) in [("127.0.0.1", "AF_INET"), ("::1", "AF_INET6")] {
        let cmd = client(host);
        let out = run_bounded(Command::new(&cmd[0]).args(&cmd[1..]), DEFAULT_TIMEOUT);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines, want(family), "{host}: {out}\n{}", bg.describe());
    }
    for (host, family) in [(&peer.host_ip, "AF_INET"), (&peer.host_ip6, "AF_INET6")] {
        let cmd = client(host);
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let out = peer.exec(&args);
        let lines: Vec<&str> = out.stdout.lines().collect();
        assert_eq!(lines, want(family), "{host}: {out}\n{}", bg.describe());
    }
    bg.stop();
}

/// `-p P:53/udp`: datagrams from 127.0.0.1 and ::1 are echoed by the guest's UDP server,
/// which sees the host address as their source.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn udp_echo_through_published_port() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-udp", 0);
    let p = free_ports(1);
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:53/udp")], &guest_server_cmd(&dir, &["udp-echo", "53"]));
    bg.wait_line("READY", READY_LIMIT);
    assert!(udp_echo("127.0.0.1:0", &format!("127.0.0.1:{p}"), b"hello over v4"), "{}", bg.describe());
    assert!(udp_echo("[::1]:0", &format!("[::1]:{p}"), b"hello over v6"), "{}", bg.describe());
    // A big datagram too (the guest link's MTU is 65520).
    let big = vec![0x5au8; 30000];
    assert!(udp_echo("127.0.0.1:0", &format!("127.0.0.1:{p}"), &big), "{}", bg.describe());
    // And a TCP connect to the same port finds nothing: only UDP was published.
    let tcp =
        std::net::TcpStream::connect_timeout(&format!("127.0.0.1:{p}").parse().expect("addr"), Duration::from_secs(2));
    assert!(tcp.is_err(), "TCP {p} should not be published");
    bg.stop();
    assert!(bg.stdout().lines().filter_map(|l| l.strip_prefix("CLIENT ")).all(|c| c == HOST_IP), "{}", bg.describe());
}

/// Ranges: `A-A+2:80-82` maps pairwise; `B-B+3:80` takes the first free port of the range
/// and says which; `90-91` maps each container port to a random port on both addresses.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn port_ranges() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-range", 0);
    let a = free_ports(3);
    let b = free_ports(4);
    // The first port of B's range is taken: usernet must pick B+1.
    let holder = TcpListener::bind(("0.0.0.0", b)).expect("hold B");
    let dir_s = dir.path().to_string_lossy().into_owned();
    let args = [
        "-p".to_string(),
        format!("{a}-{}:80-82", a + 2),
        "-p".into(),
        format!("{b}-{}:80", b + 3),
        "-p".into(),
        "90-91".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut bg = usernet_bg(&dns, &args, &guest_server_cmd(&dir, &["http", "80,81,82,90,91", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);

    for i in 0..3u16 {
        let body = get(&format!("http://127.0.0.1:{}/whoami", a + i), &bg);
        assert!(body.starts_with(&format!("port {} ", 80 + i)), "{body}");
    }

    let lines = port_lines(&bg.stderr());
    let picked: Vec<&String> = lines.iter().filter(|l| l.starts_with("80/tcp")).collect();
    assert_eq!(
        picked,
        vec![&format!("80/tcp -> 0.0.0.0:{}", b + 1), &format!("80/tcp -> [::]:{}", b + 1)],
        "{}",
        bg.describe()
    );
    let body = get(&format!("http://127.0.0.1:{}/whoami", b + 1), &bg);
    assert!(body.starts_with("port 80 "), "{body}");

    for guest in [90u16, 91] {
        let mine: Vec<&String> = lines.iter().filter(|l| l.starts_with(&format!("{guest}/tcp -> "))).collect();
        assert_eq!(mine.len(), 2, "{}", bg.describe());
        assert!(mine[0].contains(" -> 0.0.0.0:") && mine[1].contains(" -> [::]:"), "{mine:?}");
        let port = line_port(mine[0]);
        assert_eq!(port, line_port(mine[1]), "both addresses share one port: {mine:?}");
        let body = get(&format!("http://127.0.0.1:{port}/whoami"), &bg);
        assert!(body.starts_with(&format!("port {guest} ")), "{body}");
        let body = get(&format!("http://[::1]:{port}/whoami"), &bg);
        assert!(body.starts_with(&format!("port {guest} ")), "{body}");
    }
    // Exactly what was asked: 3 pairwise (no lines) + 2 for B + 2 x 2 for 90-91.
    assert_eq!(lines.len(), 6, "{}", bg.describe());
    drop(holder);
}

/// `-p 127.0.0.1::80`: one `docker port` line for 127.0.0.1 only, and that port works.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn picked_port_on_loopback_is_printed() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-pick", 0);
    let dir_s = dir.path().to_string_lossy().into_owned();
    let mut bg = usernet_bg(&dns, &["-p", "127.0.0.1::80"], &guest_server_cmd(&dir, &["http", "80", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);
    let lines = port_lines(&bg.stderr());
    assert_eq!(lines.len(), 1, "{}", bg.describe());
    assert!(lines[0].starts_with("80/tcp -> 127.0.0.1:"), "{}", lines[0]);
    let port = line_port(&lines[0]);
    assert_ne!(port, 0);
    let body = get(&format!("http://127.0.0.1:{port}/whoami"), &bg);
    assert_eq!(body.trim(), format!("port 80 client {LOOPBACK_CLIENT}"));
    // Not on [::1]: only 127.0.0.1 was asked for.
    let out = curl(&[&format!("http://[::1]:{port}/whoami")]);
    assert!(!out.success(), "[::1]:{port} should not be published:\n{out}");
}

/// `-P --expose 80`: published on a random port of both 0.0.0.0 and [::], printed.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn publish_all_exposed_ports() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let (dir, _) = guest_dir("pub-all", 0);
    let dir_s = dir.path().to_string_lossy().into_owned();
    let mut bg = usernet_bg(&dns, &["-P", "--expose", "80"], &guest_server_cmd(&dir, &["http", "80", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);
    let lines = port_lines(&bg.stderr());
    assert_eq!(lines.len(), 2, "{}", bg.describe());
    assert!(lines[0].starts_with("80/tcp -> 0.0.0.0:"), "{lines:?}");
    assert!(lines[1].starts_with("80/tcp -> [::]:"), "{lines:?}");
    let port = line_port(&lines[0]);
    assert_eq!(port, line_port(&lines[1]));
    for url in [format!("http://127.0.0.1:{port}/whoami"), format!("http://[::1]:{port}/whoami")] {
        assert!(get(&url, &bg).starts_with("port 80 "));
    }
}

/// A taken port or a bad spec: Docker's message on one line, exit 125, COMMAND never
/// started, and nothing of the run left bound.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn taken_port_and_bad_specs_fail_before_command() {
    require(&["ip", "dnsmasq", "timeout", "sh"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("pub-taken");
    let marker = dir.join("started");
    let cmd = ["sh", "-c", &format!("touch {}", marker.display())];
    let check = |args: &[&str], want: &str| {
        let out = Usernet::new(&dns).args(args).timeout(Duration::from_secs(30)).run(&cmd);
        out.assert_code(125);
        assert_eq!(out.stderr, format!("usernet: {want}\n"), "{out}");
        assert!(!marker.exists(), "COMMAND ran:\n{out}");
    };

    // Taken on 0.0.0.0 (a listener on all IPv4 addresses).
    let (p, q) = (free_ports(1), free_ports(1));
    let holder = TcpListener::bind(("0.0.0.0", p)).expect("hold");
    // The spec before it must not stay bound either.
    check(
        &["-p", &format!("{q}:80"), "-p", &format!("{p}:80")],
        &format!("Bind for 0.0.0.0:{p} failed: port is already allocated"),
    );
    assert!(port_released(q), "port {q} of an earlier -p left bound");
    // A file named by --pcap is left as it was: the capture starts only once the ports are bound.
    let kept = dir.join("kept.pcap");
    std::fs::write(&kept, b"the user's data").expect("write");
    let out = Usernet::new(&dns).arg("--pcap").arg(&kept).args(&["-p", &format!("{p}:80")]).run(&cmd);
    out.assert_code(125);
    assert_eq!(std::fs::read(&kept).expect("read"), b"the user's data", "--pcap's file emptied: {out}");
    drop(holder);

    // Taken on [::] only: the 0.0.0.0 socket bound just before is released.
    let v6 = free_ports(1);
    let holder6 = hold_v6only(v6);
    check(&["-p", &format!("{v6}:80")], &format!("Bind for [::]:{v6} failed: port is already allocated"));
    assert!(
        wait_until(Duration::from_secs(5), || TcpListener::bind(("0.0.0.0", v6)).is_ok()),
        "0.0.0.0:{v6} left bound"
    );
    drop(holder6);

    // UDP.
    let u = free_ports(1);
    let holder_udp = UdpSocket::bind(("127.0.0.1", u)).expect("hold udp");
    check(
        &["-p", &format!("127.0.0.1:{u}:53/udp")],
        &format!("Bind for 127.0.0.1:{u} failed: port is already allocated"),
    );
    drop(holder_udp);

    // Every port of a range taken.
    let r = free_ports(2);
    let h1 = TcpListener::bind(("127.0.0.1", r)).expect("hold");
    let h2 = TcpListener::bind(("127.0.0.1", r + 1)).expect("hold");
    check(
        &["-p", &format!("127.0.0.1:{r}-{}:80", r + 1)],
        &format!("Bind for 127.0.0.1:{r}-{} failed: port is already allocated", r + 1),
    );
    drop((h1, h2));

    // Not an address of this host (TEST-NET-1: nothing is sent, the bind fails).
    check(
        &["-p", "192.0.2.1:8000:80"],
        "Error starting userland proxy: listen tcp4 192.0.2.1:8000: bind: cannot assign requested address",
    );

    // Bad specs, in Docker's words.
    check(&["-p", "70000:80"], "invalid hostPort: 70000");
    check(&["-p", "8000:abc"], "invalid containerPort: abc");
    check(&["-p", "8000:0"], "invalid containerPort: 0");
    check(&["-p", "80/xyz"], "invalid proto: xyz");
    check(&["-p", "1.2.3:8000:80"], "invalid IP address: 1.2.3");
    check(&["-p", "8000-8005:80-90"], "invalid ranges specified for container and host Ports: 80-90 and 8000-8005");
    check(&["-p", "127.0.0.1:8000:"], "no port specified: 127.0.0.1:8000:<empty>");
    check(&["--expose", "8000:80", "-P"], "invalid port format for --expose: 8000:80");
}

/// A network namespace of the test's own (`ip netns add`), deleted on Drop.
struct TestNetns(String);

impl TestNetns {
    fn new(tag: &str) -> TestNetns {
        let ns = format!("{tag}{}", unique_id());
        must("ip", &["netns", "add", &ns]);
        let ns = TestNetns(ns);
        ns.sh("ip link set lo up");
        ns
    }

    /// `sh -c SCRIPT` inside the namespace, as root; it must succeed.
    fn sh(&self, script: &str) -> Output {
        must("ip", &["netns", "exec", &self.0, "sh", "-c", script])
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.0]);
    }
}

/// Rootless, a port below `net.ipv4.ip_unprivileged_port_start` cannot be published: the
/// error says so and what to change (the sysctl, with its current value, or a larger port),
/// as rootless Podman's and Docker's do, where it gave only "permission denied". On the
/// command line and through the API (after usernet confined itself: it must still read the
/// sysctl), and the advice works: with the sysctl lowered the same port is published. In a
/// namespace of the test's own, so that the sysctl is known whatever the machine's.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn privileged_port_rootless_says_what_to_change() {
    require(&["ip", "runuser", "curl", "sh", "sysctl"]);
    let ns = TestNetns::new("unpp");
    ns.sh("sysctl -q -w net.ipv4.ip_unprivileged_port_start=1024");
    let dir = TempDir::new("pub-privileged");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let bin = copy_binary_for_others(&dir);
    let usernet_in_ns = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns.0, "runuser", "-u", "nobody", "--"]).arg(&bin).arg("run");
        c.args(["--dns-upstream", "127.0.0.1:9"]).args(args).env("PATH", search_path());
        run_bounded(&mut c, Duration::from_secs(30))
    };

    let out = usernet_in_ns(&["-p", "80:80", "--", "true"]);
    out.assert_code(125);
    assert_eq!(
        out.stderr.trim_end(),
        "usernet: Error starting userland proxy: cannot expose privileged port 80, you can add \
         'net.ipv4.ip_unprivileged_port_start=80' to /etc/sysctl.conf (currently 1024), or choose a larger \
         port number (>= 1024): listen tcp4 0.0.0.0:80: bind: permission denied",
        "{out}"
    );

    // Through the API, once usernet runs confined.
    let api = dir.join("api.sock");
    let out = usernet_in_ns(&[
        "--api",
        &api.display().to_string(),
        "--",
        "curl",
        "-sS",
        "--unix-socket",
        &api.display().to_string(),
        "http://usernet/v1/ports",
        "-d",
        r#"{"spec":"127.0.0.1:1000:53/udp"}"#,
    ]);
    out.assert_ok();
    assert!(
        out.stdout.contains(
            "cannot expose privileged port 1000, you can add 'net.ipv4.ip_unprivileged_port_start=1000' to \
             /etc/sysctl.conf (currently 1024), or choose a larger port number (>= 1024): listen udp4 \
             127.0.0.1:1000: bind: permission denied"
        ),
        "{out}"
    );

    // Done as it says, the port is published.
    ns.sh("sysctl -q -w net.ipv4.ip_unprivileged_port_start=80");
    usernet_in_ns(&["-p", "80:80", "--", "true"]).assert_ok();
}

/// A soft open-file limit too low for the ports asked (100, for 60 ports on two addresses):
/// usernet raises its own to the hard limit before it binds them, as Docker and Podman do,
/// where it failed with "too many open files"; COMMAND still gets the limit it was given.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn many_ports_under_a_low_soft_open_file_limit() {
    require(&["sh"]);
    let base = free_ports(60);
    let script = format!(
        "ulimit -Sn 100 && exec {bin} run --dns-upstream 127.0.0.1:9 -p {base}-{end}:8000-8059 -- sh -c 'ulimit -Sn'",
        bin = usernet_bin().display(),
        end = base + 59,
    );
    let mut cmd = as_test_user("sh");
    cmd.args(["-c", &script]).env("PATH", search_path());
    let out = run_bounded(&mut cmd, Duration::from_secs(30));
    out.assert_ok();
    assert_eq!(out.stdout.trim(), "100", "COMMAND's soft limit: {out}");
}

/// The host ports are free again as soon as usernet exits, by itself or by a signal.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ports_released_on_exit() {
    require(&["ip", "dnsmasq", "timeout", "sh", "sleep"]);
    let dns = DnsUpstream::start();
    let p = free_ports(1);
    let out = Usernet::new(&dns).args(&["-p", &format!("{p}:80"), "-p", &format!("{p}:80/udp")]).run(&["true"]);
    out.assert_ok();
    assert!(port_released(p), "port {p} still bound after usernet exited:\n{out}");

    // Killed by SIGTERM while COMMAND runs.
    let q = free_ports(1);
    let mut bg = usernet_bg(
        &dns,
        &["-p", &format!("{q}:80"), "-p", &format!("{q}:80/udp")],
        &["sh", "-c", "echo READY; exec sleep 60"],
    );
    bg.wait_line("READY", READY_LIMIT);
    assert!(TcpListener::bind(("0.0.0.0", q)).is_err(), "usernet does not listen on {q}:\n{}", bg.describe());
    assert!(TcpListener::bind(("::", q)).is_err(), "usernet does not listen on [::]:{q}");
    let code = bg.stop();
    assert_eq!(code, 128 + libc::SIGTERM, "{}", bg.describe());
    assert!(port_released(q), "port {q} still bound after usernet was stopped:\n{}", bg.describe());
}

/// A client in another namespace, connecting to the host's veth address, appears in the
/// guest with its own address (198.51.100.x), not as the host address.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn remote_client_keeps_its_address() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let peer = PeerNs::new();
    let (dir, want) = guest_dir("pub-remote", 1 << 20);
    let dir_s = dir.path().to_string_lossy().into_owned();
    let p = free_ports(1);
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:80")], &guest_server_cmd(&dir, &["http", "80", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);

    let url = format!("http://{}:{p}/whoami", peer.host_ip);
    let out = peer.exec(&["curl", "-sSf", "--noproxy", "*", "-m", "30", &url]);
    assert!(out.success(), "{out}\n{}", bg.describe());
    assert_eq!(out.stdout.trim(), format!("port 80 client {}", peer.ip), "{}", bg.describe());

    // Data too, through the same path.
    let url = format!("http://{}:{p}/f", peer.host_ip);
    let got = dir.join("got");
    let out = peer.exec(&["curl", "-sSf", "--noproxy", "*", "-m", "30", "-o", &got.to_string_lossy(), &url]);
    assert!(out.success(), "{out}\n{}", bg.describe());
    assert_eq!(sha256_file(&got), want);

    // A loopback client at the same time is spliced: it appears as the guest's loopback.
    let body = get(&format!("http://127.0.0.1:{p}/whoami"), &bg);
    assert_eq!(body.trim(), format!("port 80 client {LOOPBACK_CLIENT}"));

    bg.stop();
    let log = bg.stdout();
    assert!(log.lines().any(|l| l == format!("CLIENT {}", peer.ip)), "guest never saw {}:\n{}", peer.ip, bg.describe());
}

/// `--engine-threads 2`: a published port's connections, from the host's loopback (spliced)
/// and from another address (through the TAP device, whose queues both engines read), all
/// arrive whole in parallel; engine 0, which accepts them, keeps every one.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn published_port_with_two_engine_threads() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let peer = PeerNs::new();
    let (dir, want) = guest_dir("pub-engines", 2 << 20);
    let dir_s = dir.path().to_string_lossy().into_owned();
    let p = free_ports(1);
    let args = ["--engine-threads", "2", "-p", &format!("{p}:80")];
    let mut bg = usernet_bg(&dns, &args, &guest_server_cmd(&dir, &["http", "80", &dir_s]));
    bg.wait_line("READY", READY_LIMIT);
    let got = TempDir::new("pub-engines-got");
    let fetch = |host: &str, tag: &str| {
        format!(
            "for i in 1 2 3 4 5 6 7 8; do curl -sSf --noproxy '*' -m 60 -o {d}/{tag}$i http://{host}:{p}/f & done; \
             wait; sha256sum {d}/{tag}*",
            d = got.path().display()
        )
    };
    let local = sh(&fetch("127.0.0.1", "l"));
    let remote = peer.exec(&["sh", "-c", &fetch(&peer.host_ip, "r")]);
    for out in [&local, &remote] {
        let hashes = hex_hashes(&out.stdout);
        assert!(hashes.len() == 8 && hashes.iter().all(|h| *h == want), "{out}\n{}", bg.describe());
    }
    bg.stop();
}

/// A guest whose listeners answer with SYN cookies (`net.ipv4.tcp_syncookies` 2; Linux
/// sends them when its queue of half-open connections is full). A cookie keeps window
/// scaling and SACK only in the timestamp it echoes, and while the listener's accept queue
/// is full it drops the ACK that would open the connection, keeping no trace of it, so
/// only a segment at the first byte after the handshake opens it later. Two listeners of
/// backlog 1 that accept only after a second, and eight clients from another address at
/// once to each. To an echo server, four send 1 MB, four a short request and their close
/// at once; to a server that speaks first (a 64 KiB greeting, then it closes), the eight
/// send nothing. Each gets what it should whole (sha256), and each accepted socket has
/// timestamps, SACK and window scaling (TCP_INFO's options, as usernet's SYN carries
/// timestamps). Before, usernet's 64 KiB segments shut such a guest's unscaled window for
/// good (seven of eight stalled), its probes of the last byte got the cookie's connection
/// reset, and so did a FIN resent apart from the short request it had come with; and a
/// server that speaks first never heard of some of its clients, which waited for good (as
/// a kernel's own clients do: usernet now sends its ACK of the handshake again while
/// nothing was exchanged).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn published_port_to_a_guest_answering_with_syn_cookies() {
    require(&["ip", "dnsmasq", "timeout", "sh", "python3", "socat", "sha256sum"]);
    let dns = DnsUpstream::start();
    let peer = PeerNs::new();
    let dir = TempDir::new("pub-cookies");
    let (big, short, greeting) = (dir.join("big"), dir.join("short"), dir.join("greeting"));
    write_random_file(&big, 1 << 20);
    write_random_file(&short, 300);
    write_random_file(&greeting, 64 << 10);
    let server = dir.join("server.py");
    let script = format!(
        "import socket, threading, time\n\
         def listen(port):\n    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         \x20   s.bind(('0.0.0.0', port)); s.listen(1); return s\n\
         echo_listener, greeting_listener = listen(80), listen(81)\n\
         print('READY', flush=True); time.sleep(1)\n\
         def echo(c):\n    while d := c.recv(65536): c.sendall(d)\n    c.close()\n\
         def greet(c):\n    c.sendall(open('{greeting}', 'rb').read()); c.close()\n\
         lock = threading.Lock()\n\
         def serve(listener, handle):\n    while True:\n        c = listener.accept()[0]\n\
         \x20       options = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[5]\n\
         \x20       with lock: print('OPTIONS', options, flush=True)\n\
         \x20       threading.Thread(target=handle, args=(c,)).start()\n\
         threading.Thread(target=serve, args=(greeting_listener, greet), daemon=True).start()\n\
         serve(echo_listener, echo)\n",
        greeting = greeting.display()
    );
    std::fs::write(&server, script).expect("write the guest's server");
    let p = free_ports(2);
    let guest = format!("echo 2 > /proc/sys/net/ipv4/tcp_syncookies && exec timeout 90 python3 {}", server.display());
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p}:80"), "-p", &format!("{}:81", p + 1)], &["sh", "-c", &guest]);
    bg.wait_line("READY", READY_LIMIT);
    let clients = format!(
        "for i in 1 2 3 4; do for f in big short; do \
         timeout 60 socat -t 20 - TCP4:{host}:{p} < {d}/$f > {d}/$f.got$i & done; done; \
         for i in 1 2 3 4 5 6 7 8; do timeout 60 socat -u TCP4:{host}:{p1} - > {d}/greeting.got$i & done; \
         wait; sha256sum {d}/big.got* {d}/short.got* {d}/greeting.got*",
        host = peer.host_ip,
        p1 = p + 1,
        d = dir.path().display()
    );
    let out = peer.exec(&["sh", "-c", &clients]);
    let hashes = hex_hashes(&out.stdout);
    let want = [vec![sha256_file(&big); 4], vec![sha256_file(&short); 4], vec![sha256_file(&greeting); 8]].concat();
    assert_eq!(hashes, want, "{out}\n{}", bg.describe());
    // tcpi_options: 1 timestamps, 2 SACK, 4 window scaling.
    let options = bg.lines_with("OPTIONS");
    assert!(options.len() == 16 && options.iter().all(|l| l == "OPTIONS 7"), "{options:?}\n{}", bg.describe());
    bg.stop();
}

/// `--api PATH`: the control socket exists while usernet runs (next to published ports)
/// and is gone after it exits.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn api_socket_lives_with_usernet() {
    require(&["ip", "dnsmasq", "timeout", "sh", "curl"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("pub-api");
    let sock = dir.join("api.sock");
    let p = free_ports(1);
    let sock_s = sock.to_string_lossy().into_owned();
    let mut bg = usernet_bg(
        &dns,
        &["--api", &sock_s, "-p", &format!("127.0.0.1:{p}:80")],
        &["sh", "-c", "echo READY; exec sleep 60"],
    );
    bg.wait_line("READY", READY_LIMIT);
    assert!(wait_until(Duration::from_secs(5), || Path::new(&sock).exists()), "no API socket:\n{}", bg.describe());
    let out = run("curl", &["-sS", "-m", "10", "--unix-socket", &sock_s, "http://usernet/services/forwarder/all"]);
    assert!(out.success(), "{out}\n{}", bg.describe());
    assert!(out.stdout.contains(&p.to_string()), "published port {p} not listed:\n{out}");
    bg.stop();
    assert!(!sock.exists(), "API socket left behind");
}

/// `-p P:80` with an IPv6 client (a namespace of the test's own, over the host's veth): a
/// guest listening on IPv6 only is reached over IPv6 and sees the client's own address; a
/// guest listening on IPv4 only is reached all the same (the IPv6 SYN reset, then over IPv4,
/// from the host address); a download either way is whole (sha256). The host's own [::1]
/// is spliced to the guest's [::1], or to its 127.0.0.1 when the guest listens on IPv4 only.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ipv6_clients_reach_the_guest_over_ipv6_with_their_address() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let peer = PeerNs::new();
    let (dir, want) = guest_dir("pub-v6", BULK);
    let p6 = free_ports(2);
    let p4 = p6 + 1;
    let d = dir.path().to_string_lossy().into_owned();
    let srv = dir.join("guestsrv.py").to_string_lossy().into_owned();
    let py = python().to_string_lossy().into_owned();
    let script = format!(
        "timeout {GUEST_LIFETIME} {py} {srv} http6 80 {d} & timeout {GUEST_LIFETIME} {py} {srv} http 81 {d} & wait"
    );
    let mut bg = usernet_bg(&dns, &["-p", &format!("{p6}:80"), "-p", &format!("{p4}:81")], &["sh", "-c", &script]);
    bg.wait_line("READY", READY_LIMIT);
    std::thread::sleep(Duration::from_millis(500));
    let whoami = |port: u16| {
        let url = format!("http://[{}]:{port}/whoami", peer.host_ip6);
        let out = peer.exec(&["curl", "-sS", "-f", "--noproxy", "*", "-m", "30", &url]);
        assert!(out.success(), "GET {url} from {}:\n{out}\n{}", peer.ip6, bg.describe());
        out.stdout.trim().to_string()
    };
    assert_eq!(whoami(p6), format!("port 80 client {}", peer.ip6), "over IPv6, the client's address kept");
    assert_eq!(whoami(p4), "port 81 client 192.168.65.254", "an IPv4-only guest server, over IPv4");
    for port in [p6, p4] {
        let got = dir.join(&format!("got{port}"));
        let url = format!("http://[{}]:{port}/f", peer.host_ip6);
        let out = peer.exec(&["curl", "-sS", "-f", "--noproxy", "*", "-m", "60", "-o", &got.to_string_lossy(), &url]);
        assert!(out.success(), "download {url}:\n{out}\n{}", bg.describe());
        assert_eq!(sha256_file(&got), want, "{url}");
    }
    // The host's loopback over IPv6: to the guest's [::1], or its 127.0.0.1.
    assert_eq!(get(&format!("http://[::1]:{p6}/whoami"), &bg).trim(), "port 80 client ::1");
    assert_eq!(get(&format!("http://[::1]:{p4}/whoami"), &bg).trim(), "port 81 client 127.0.0.1");
    assert_eq!(get(&format!("http://127.0.0.1:{p4}/whoami"), &bg).trim(), "port 81 client 127.0.0.1");
    for port in [p6, p4] {
        let got = dir.join(&format!("lo{port}"));
        let url = format!("http://[::1]:{port}/f");
        let out = curl(&["-f", "-o", &got.to_string_lossy(), &url]);
        assert!(out.success(), "download {url}:\n{out}\n{}", bg.describe());
        assert_eq!(sha256_file(&got), want, "{url}");
    }
    bg.stop();
}

/// `--ipv6-only`: a guest listening on IPv6 only is reached on `-p P:80` from the host's
/// 127.0.0.1 and [::1] (spliced to its [::1]) and from an IPv6 client of a namespace of the
/// test's own (over IPv6, its address kept), and from an IPv4 one (from ::254); downloads
/// are whole (sha256).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn ipv6_only_guests_are_published_over_ipv6() {
    require(TOOLS);
    let dns = DnsUpstream::start();
    let peer = PeerNs::new();
    let (dir, want) = guest_dir("pub-v6only", BULK);
    let p = free_ports(1);
    let d = dir.path().to_string_lossy().into_owned();
    let mut bg = usernet_bg(&dns, &["-6", "-p", &format!("{p}:80")], &guest_server_cmd(&dir, &["http6", "80", &d]));
    bg.wait_line("READY", READY_LIMIT);
    assert_eq!(get(&format!("http://127.0.0.1:{p}/whoami"), &bg).trim(), "port 80 client ::1");
    assert_eq!(get(&format!("http://[::1]:{p}/whoami"), &bg).trim(), "port 80 client ::1");
    let from_peer = |url: &str| {
        let out = peer.exec(&["curl", "-sS", "-f", "--noproxy", "*", "-m", "30", url]);
        assert!(out.success(), "GET {url} from the peer:\n{out}\n{}", bg.describe());
        out.stdout.trim().to_string()
    };
    assert_eq!(from_peer(&format!("http://[{}]:{p}/whoami", peer.host_ip6)), format!("port 80 client {}", peer.ip6));
    assert_eq!(from_peer(&format!("http://{}:{p}/whoami", peer.host_ip)), "port 80 client fd75:7365:726e::254");
    for url in [format!("http://127.0.0.1:{p}/f"), format!("http://[{}]:{p}/f", peer.host_ip6)] {
        let got = dir.join("got");
        let out = if url.contains("127.0.0.1") {
            curl(&["-f", "-o", &got.to_string_lossy(), &url])
        } else {
            peer.exec(&["curl", "-sS", "-f", "--noproxy", "*", "-m", "60", "-o", &got.to_string_lossy(), &url])
        };
        assert!(out.success(), "download {url}:\n{out}\n{}", bg.describe());
        assert_eq!(sha256_file(&got), want, "{url}");
    }
    bg.stop();
}
