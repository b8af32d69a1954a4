//! `usernet serve` transports driven by hand: SOCK_SEQPACKET (`--listen-bess`) and stdio
//! (`--listen-stdio`), which no VM in the suite speaks, QEMU's stream transport
//! (`--listen-qemu`) for guests that reconnect, and vhost-user
//! (`--listen-vhost-user`) by a front-end that misbehaves as QEMU does not. Each test sends
//! a frame from a guest, and checks that a fault (garbled framing, guest memory gone) closes
//! only the guilty guest's link.

mod common;
#[path = "vm/harness.rs"]
mod harness;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, UnixAddr, connect, recv, send, socket};

use common::{DnsUpstream, TempDir};
use harness::Serve;

/// An ARP request for the gateway from `mac`.
/// An ARP request for the gateway from the guest `mac`, whose address is 192.168.65.N with
/// N its fifth byte: each guest its own (`serve` binds a link to its guest's address).
fn arp_request(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(42);
    f.extend([0xff; 6]);
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend([192, 168, 65, mac[4]]);
    f.extend([0; 6]);
    f.extend([192, 168, 65, 1]);
    f
}

/// Whether `frame` is the gateway's ARP reply to `mac`.
fn is_gateway_reply(frame: &[u8], mac: [u8; 6]) -> bool {
    frame.len() >= 42
        && frame[..6] == mac
        && frame[12..14] == [0x08, 0x06]
        && frame[20..22] == [0, 2]
        && frame[28..32] == [192, 168, 65, 1]
}

fn seqpacket_client(path: &std::path::Path) -> OwnedFd {
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
    connect(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    let tv = nix::sys::time::TimeVal::new(5, 0);
    nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv).unwrap();
    fd
}

/// Sends an ARP request and waits (bounded) for the gateway's reply.
fn arp_round_trip(fd: &OwnedFd, mac: [u8; 6]) -> bool {
    send(fd.as_raw_fd(), &arp_request(mac), MsgFlags::empty()).unwrap();
    let mut buf = vec![0u8; 70_000];
    for _ in 0..16 {
        match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) if is_gateway_reply(&buf[..n], mac) => return true,
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    false
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn bess_seqpacket_transport() {
    common::require(&["dnsmasq"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("serve-bess");
    let sock = dir.join("bess.sock");
    let serve = Serve::start(
        &dir,
        &dns,
        &[format!("--listen-bess=unixpacket:{}", sock.display())],
        std::slice::from_ref(&sock),
    );

    let a_mac = [0x52, 0x54, 0, 0, 0x0a, 1];
    let b_mac = [0x52, 0x54, 0, 0, 0x0b, 1];
    let a = seqpacket_client(&sock);
    let b = seqpacket_client(&sock);
    assert!(arp_round_trip(&a, a_mac), "{}", serve.log());
    assert!(arp_round_trip(&b, b_mac), "{}", serve.log());

    // An oversized message closes A's link only.
    let _ = nix::sys::socket::setsockopt(&a, nix::sys::socket::sockopt::SndBuf, &(1 << 20));
    send(a.as_raw_fd(), &vec![0u8; 70_000], MsgFlags::empty()).unwrap();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut closed = false;
    while Instant::now() < deadline {
        match recv(a.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(0) | Err(_) => {
                closed = true;
                break;
            }
            Ok(_) => {}
        }
    }
    assert!(closed, "usernet kept the garbled link open");
    assert!(serve.log_shows("garbled framing"), "{}", serve.log());
    assert!(arp_round_trip(&b, b_mac), "the other guest lost its link:\n{}", serve.log());

    // A guest that reconnects is served again.
    drop(a);
    let again = seqpacket_client(&sock);
    assert!(arp_round_trip(&again, a_mac), "{}", serve.log());
}

/// A client of the QEMU stream transport (`-netdev stream`): frames with a 4-byte
/// big-endian length before each.
fn stream_client(path: &std::path::Path) -> std::os::unix::net::UnixStream {
    let s = std::os::unix::net::UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// `frame` with its length before it, as the stream transport carries it.
fn length_prefixed(frame: &[u8]) -> Vec<u8> {
    let mut m = (frame.len() as u32).to_be_bytes().to_vec();
    m.extend(frame);
    m
}

/// Sends an ARP request over the stream transport and waits (bounded) for the gateway's
/// reply among the frames that come back.
fn stream_arp_round_trip(s: &mut std::os::unix::net::UnixStream, mac: [u8; 6]) -> bool {
    if s.write_all(&length_prefixed(&arp_request(mac))).is_err() {
        return false;
    }
    let mut frame = vec![0u8; 70_000];
    for _ in 0..16 {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return false;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > frame.len() || s.read_exact(&mut frame[..len]).is_err() {
            return false;
        }
        if is_gateway_reply(&frame[..len], mac) {
            return true;
        }
    }
    false
}

/// Whether usernet closed `s` within 5 s (whatever it sent before).
fn stream_closed(s: &mut std::os::unix::net::UnixStream) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Ok(_) | Err(_) => {}
        }
    }
    false
}

/// QEMU's stream transport (`--listen-qemu`) driven by hand, as QEMU's own `reconnect`
/// would (the QEMU of the VM tests is too old for it on `-netdev stream`): a guest that
/// goes away in the middle of a frame and comes back on a new connection is served again,
/// twice, with the same MAC, while another guest keeps its link throughout; a length past
/// the largest frame closes only that guest's link.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn qemu_stream_transport_guests_that_reconnect() {
    common::require(&["dnsmasq"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("serve-stream");
    let sock = dir.join("qemu.sock");
    let serve =
        Serve::start(&dir, &dns, &[format!("--listen-qemu=unix:{}", sock.display())], std::slice::from_ref(&sock));

    let a_mac = [0x52, 0x54, 0, 0, 0x0c, 1];
    let b_mac = [0x52, 0x54, 0, 0, 0x0d, 1];
    let mut b = stream_client(&sock);
    assert!(stream_arp_round_trip(&mut b, b_mac), "{}", serve.log());
    for round in 0..2 {
        let mut a = stream_client(&sock);
        assert!(stream_arp_round_trip(&mut a, a_mac), "round {round}: {}", serve.log());
        // Gone in the middle of a frame: its length and half of it.
        let half = length_prefixed(&arp_request(a_mac));
        a.write_all(&half[..half.len() / 2]).unwrap();
        drop(a);
        assert!(stream_arp_round_trip(&mut b, b_mac), "round {round}: the other guest lost its link:\n{}", serve.log());
    }
    let mut a = stream_client(&sock);
    assert!(stream_arp_round_trip(&mut a, a_mac), "after two reconnects: {}", serve.log());

    // A length no frame has closes A's link only.
    a.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(stream_closed(&mut a), "usernet kept the garbled link open\n{}", serve.log());
    assert!(serve.log_shows("garbled framing: frame length 4294967295"), "{}", serve.log());
    assert!(stream_arp_round_trip(&mut b, b_mac), "the other guest lost its link:\n{}", serve.log());
    let mut again = stream_client(&sock);
    assert!(stream_arp_round_trip(&mut again, a_mac), "{}", serve.log());
}

/// `usernet serve` stops on SIGHUP (its terminal gone) and SIGQUIT as on SIGTERM: exit 0,
/// its socket removed, where their default action ended it with the socket left behind.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn serve_stops_cleanly_on_hangup_and_quit() {
    use nix::sys::signal::Signal;
    common::require(&["dnsmasq"]);
    let dns = DnsUpstream::start();
    for sig in [Signal::SIGHUP, Signal::SIGQUIT] {
        let dir = TempDir::new("serve-hup");
        let sock = dir.join("qemu.sock");
        let mut serve =
            Serve::start(&dir, &dns, &[format!("--listen-qemu=unix:{}", sock.display())], std::slice::from_ref(&sock));
        serve.signal(sig);
        let status = serve.exits_within(Duration::from_secs(10));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{sig}: {}", serve.log());
        assert!(!sock.exists(), "{sig}: the socket left behind");
    }
}

/// `usernet serve --listen-qemu` with its open-file limit at 64, and 60 guests connecting:
/// those it has no descriptor for wait in the listener's backlog (logged once), and once
/// 30 of the others go away, the last to come is served without any new guest connecting
/// to wake the listener (it is watched again every 100 ms).
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn qemu_stream_transport_guests_wait_out_a_shortage_of_descriptors() {
    common::require(&["dnsmasq"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("serve-nofile");
    let sock = dir.join("qemu.sock");
    let api = dir.join("api.sock");
    let mut cmd = common::usernet_command();
    cmd.arg("serve").args(["--dns-upstream", &dns.addr()]).arg("--api").arg(&api);
    cmd.arg(format!("--listen-qemu=unix:{}", sock.display()));
    common::with_open_file_limit(&mut cmd, 64);
    let serve = Serve::spawn(cmd, api.clone(), &[sock.clone(), api]);

    let mut guests: Vec<_> = (0..60).map(|_| stream_client(&sock)).collect();
    let mac = [0x52, 0x54, 0, 0, 0x0e, 1];
    let mut last = guests.pop().unwrap();
    last.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(!stream_arp_round_trip(&mut last, mac), "a guest beyond the limit was served:\n{}", serve.log());
    assert!(serve.log_shows("Too many open files"), "{}", serve.log());
    guests.truncate(29);
    last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(stream_arp_round_trip(&mut last, mac), "the waiting guest was not served:\n{}", serve.log());
    let said = serve.log().matches("Too many open files").count();
    assert_eq!(said, 1, "logged {said} times, not once:\n{}", serve.log());
}

/// A child process killed (if still running) and reaped on drop.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn stdio_transport() {
    common::require(&["dnsmasq"]);
    let dns = DnsUpstream::start();
    let mut child = Reaped(
        common::usernet_command()
            .args(["serve", "--listen-stdio", "--dns-upstream", &dns.addr()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start usernet serve"),
    );
    let child = &mut child.0;
    let stderr = harness::collect(child.stderr.take().expect("stderr"));
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");

    let mac = [0x52, 0x54, 0, 0, 0x0c, 1];
    let frame = arp_request(mac);
    // The prefix and the frame in separate writes: usernet must reassemble them.
    stdin.write_all(&(frame.len() as u16).to_le_bytes()).unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    stdin.write_all(&frame).unwrap();
    stdin.flush().unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Read frames until the ARP reply (bounded by the channel's timeout below).
        for _ in 0..16 {
            let mut len = [0u8; 2];
            if stdout.read_exact(&mut len).is_err() {
                let _ = tx.send(false);
                return;
            }
            let mut f = vec![0u8; u16::from_le_bytes(len) as usize];
            if stdout.read_exact(&mut f).is_err() {
                let _ = tx.send(false);
                return;
            }
            if is_gateway_reply(&f, mac) {
                let _ = tx.send(true);
                return;
            }
        }
        let _ = tx.send(false);
    });
    let got = rx.recv_timeout(Duration::from_secs(10)).unwrap_or(false);
    if !got {
        panic!("no ARP reply over stdio:\n{}", stderr.lock().unwrap());
    }

    // A zero length is garbled framing: the link closes with a logged reason.
    stdin.write_all(&[0, 0]).unwrap();
    stdin.flush().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !stderr.lock().unwrap().contains("garbled framing") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut status = None;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = stderr.lock().unwrap().clone();
    assert!(log.contains("garbled framing"), "{log}");
    assert_eq!(status.and_then(|s| s.code()), Some(0), "SIGTERM should end serve with 0:\n{log}");
}

/// A vhost-user front-end of our own (`vhost`'s), with one memfd of guest RAM mapped at
/// guest address 0 and both rings set up in it, as QEMU sets a device up: VERSION_1 only
/// (12-byte header, no merged buffers, no event index).
struct VhostUserFrontEnd {
    front: vhost::vhost_user::Frontend,
    ram: std::fs::File,
    /// Our mapping of `ram` (the front-end's "userspace address" of guest RAM).
    va: *mut u8,
    kicks: [vmm_sys_util::eventfd::EventFd; 2],
    _calls: [vmm_sys_util::eventfd::EventFd; 2],
}

/// Guest RAM of [`VhostUserFrontEnd`], and where its rings and buffers lie in it.
const VU_RAM: usize = 0x40000;
const VU_RING: u16 = 16;
/// Ring `r` lies at `r * VU_RING_SPAN`: its descriptors, available and used rings, then
/// buffers, at these offsets.
const VU_RING_SPAN: usize = 0x10000;
const VU_DESC: usize = 0x1000;
const VU_AVAIL: usize = 0x2000;
const VU_USED: usize = 0x3000;
const VU_BUF: usize = 0x8000;
const VU_TX: usize = 1;

impl VhostUserFrontEnd {
    fn set_up(sock: &std::path::Path) -> VhostUserFrontEnd {
        use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
        use vmm_sys_util::eventfd::EventFd;
        let front = vhost::vhost_user::Frontend::connect(sock, 2).expect("connect to usernet's vhost-user socket");
        front.set_owner().unwrap();
        const VERSION_1: u64 = 1 << 32;
        assert!(front.get_features().unwrap() & VERSION_1 != 0);
        front.set_features(VERSION_1).unwrap();
        let fd = nix::sys::memfd::memfd_create(c"usernet-test-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let ram = std::fs::File::from(fd);
        ram.set_len(VU_RAM as u64).unwrap();
        // SAFETY: a new shared mapping of a file we hold.
        let va = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                VU_RAM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                ram.as_raw_fd(),
                0,
            )
        };
        assert_ne!(va, libc::MAP_FAILED);
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: VU_RAM as u64,
            userspace_addr: va as u64,
            mmap_offset: 0,
            mmap_handle: ram.as_raw_fd(),
        };
        front.set_mem_table(&[region]).unwrap();
        let kicks = [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()];
        let calls = [EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap()];
        for ring in 0..2 {
            let at = va as u64 + (ring * VU_RING_SPAN) as u64;
            front.set_vring_num(ring, VU_RING).unwrap();
            front.set_vring_base(ring, 0).unwrap();
            let addrs = VringConfigData {
                queue_max_size: VU_RING,
                queue_size: VU_RING,
                flags: 0,
                desc_table_addr: at + VU_DESC as u64,
                used_ring_addr: at + VU_USED as u64,
                avail_ring_addr: at + VU_AVAIL as u64,
                log_addr: None,
            };
            front.set_vring_addr(ring, &addrs).unwrap();
            front.set_vring_kick(ring, &kicks[ring]).unwrap();
            front.set_vring_call(ring, &calls[ring]).unwrap();
        }
        VhostUserFrontEnd { front, ram, va: va.cast(), kicks, _calls: calls }
    }

    /// Writes `value` at `offset` of guest RAM.
    fn poke<T: Copy>(&self, offset: usize, value: T) {
        assert!(offset + std::mem::size_of::<T>() <= VU_RAM);
        // SAFETY: within our mapping of guest RAM, which the file still backs.
        unsafe { self.va.add(offset).cast::<T>().write_unaligned(value) };
    }

    /// Writes `bytes` at `offset` of guest RAM.
    fn poke_bytes(&self, offset: usize, bytes: &[u8]) {
        assert!(offset + bytes.len() <= VU_RAM);
        // SAFETY: within our mapping of guest RAM, which the file still backs.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.va.add(offset), bytes.len()) };
    }

    fn peek_u16(&self, offset: usize) -> u16 {
        // SAFETY: within our mapping of guest RAM, which the file still backs.
        unsafe { self.va.add(offset).cast::<u16>().read_volatile() }
    }

    /// Offers `frame` (after a zero virtio-net header) as TX descriptor `n` and kicks.
    fn send(&self, n: u16, frame: &[u8]) {
        let tx = VU_TX * VU_RING_SPAN;
        let buf = tx + VU_BUF + n as usize * 0x800;
        let mut bytes = vec![0u8; 12];
        bytes.extend_from_slice(frame);
        self.poke_bytes(buf, &bytes);
        let desc = tx + VU_DESC + 16 * n as usize;
        self.poke(desc, buf as u64);
        self.poke(desc + 8, bytes.len() as u32);
        self.poke(desc + 12, 0u16);
        self.poke(desc + 14, 0u16);
        self.poke(tx + VU_AVAIL + 4 + 2 * (n % VU_RING) as usize, n);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.poke(tx + VU_AVAIL + 2, n + 1);
        self.kicks[VU_TX].write(1).unwrap();
    }

    /// How many TX frames usernet has taken (the used ring's index).
    fn sent(&self) -> u16 {
        self.peek_u16(VU_TX * VU_RING_SPAN + VU_USED + 2)
    }

    /// Shrinks the file of guest RAM to nothing (our own mapping is not to be touched again).
    fn shrink(&self) {
        self.ram.set_len(0).unwrap();
    }
}

/// `--listen-vhost-user` with a front-end that shrinks the file of the guest's memory under
/// the mapping it gave usernet (QEMU seals its memfd against it; a buggy or hostile front-end
/// may not): usernet's next access there raises SIGBUS, which used to end usernet and every
/// guest it served. Now that link alone ends, saying why, and usernet serves the next
/// front-end.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn vhost_user_front_end_that_shrinks_guest_memory_loses_only_its_link() {
    common::require(&["dnsmasq"]);
    let dns = DnsUpstream::start();
    let dir = TempDir::new("serve-vhost-shrink");
    let sock = dir.join("vhost.sock");
    let serve =
        Serve::start(&dir, &dns, &[format!("--listen-vhost-user={}", sock.display())], std::slice::from_ref(&sock));
    let mac = [0x52, 0x54, 0, 0, 0x0a, 1];
    let taken = |f: &VhostUserFrontEnd, n: u16| common::wait_until(Duration::from_secs(10), || f.sent() >= n);

    let hostile = VhostUserFrontEnd::set_up(&sock);
    hostile.send(0, &arp_request(mac));
    assert!(taken(&hostile, 1), "usernet took no frame from the front-end:\n{}", serve.log());
    hostile.shrink();
    hostile.kicks[VU_TX].write(1).unwrap();
    let shown =
        common::wait_until(Duration::from_secs(10), || serve.log_shows("shrank the file of the guest's memory"));
    assert!(shown, "{}", serve.log());
    // usernet ended the session and closed the connection.
    let closed = common::wait_until(Duration::from_secs(10), || {
        use vhost::VhostBackend;
        hostile.front.get_features().is_err()
    });
    assert!(closed, "the front-end's connection is still open:\n{}", serve.log());

    let next = VhostUserFrontEnd::set_up(&sock);
    next.send(0, &arp_request(mac));
    next.send(1, &arp_request(mac));
    assert!(taken(&next, 2), "usernet served no front-end after the fault:\n{}", serve.log());
}
