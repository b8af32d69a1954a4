//! `usernet serve` transports that no VM in the suite speaks, driven by hand: SOCK_SEQPACKET
//! (`--listen-bess`) and stdio (`--listen-stdio`). Each test sends an ARP request for the
//! gateway as a raw frame and expects the gateway's reply, and checks that garbled framing
//! closes only the guilty guest's link.

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
