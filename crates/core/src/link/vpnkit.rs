//! vpnkit's ethernet transport (`serve --listen-vpnkit unix:PATH`, and the `vpnkit` drop-in
//! mode that rootlesskit's `--net=vpnkit` starts): the "vmnet" protocol of HyperKit's
//! virtio-vpnkit device and of vpnkit's Go client (`go/pkg/vmnet` in moby/vpnkit).
//!
//! The protocol, on a Unix stream socket, client first:
//!
//! 1. Hello, both ways: 49 bytes, the magic `VMN3T`, a version (u32 little-endian, 22),
//!    and a 40-byte commit id. usernet answers with its own hello once the client's is
//!    read; a wrong magic ends the connection.
//! 2. The client's command, 41 bytes: a type (1: "ethernet", 8: "ethernet with this IPv4
//!    address"), the interface's UUID as 36 characters of text, and the address as a u32
//!    written little-endian (the octets reversed; 0 with type 1).
//! 3. usernet's answer, 258 bytes: type 1, the MTU and the largest frame (u16 each,
//!    little-endian), the MAC that the guest must use, zeros. Or, refused: a type other
//!    than 1, a length byte and that many bytes of message.
//! 4. Then frames both ways, each preceded by its length, 2 bytes little-endian: the
//!    stream framing of [`super::qemu`] with [`Framing::Le16`].
//!
//! An interface UUID keeps its MAC for as long as usernet runs (a reconnecting client gets
//! the same one, so DHCP gives it the same address again), and a new connection for a
//! UUID replaces the older one: rootlesskit's parent connects, learns the MAC and its DHCP
//! address, and then its child connects again with the same UUID for the frames, leaving
//! the first connection idle. Type 8's address becomes a static DHCP lease.
//!
//! Theory of operation. The handshake is a few blocking reads and writes that a client
//! may never finish, so it does not run in the event loop: the acceptor has a thread that
//! accepts, and a short-lived thread per connection does the handshake (with a time limit,
//! and at most [`MAX_HANDSHAKES`] at once). A finished handshake hands the connection to
//! the event loop as a link, through a [`Handoff`]. A garbled or abandoned handshake is one log line and a
//! closed connection, nothing else.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::handoff::{Handoff, HandoffSender};
use super::qemu::{Framing, StreamLink, listen_stream};
use super::{Link, LinkAcceptor};
use crate::config::Ipv4Subnet;

/// The hello's magic.
pub const MAGIC: [u8; 5] = *b"VMN3T";
/// The protocol version usernet speaks (vpnkit's and its clients' since 2017).
pub const VERSION: u32 = 22;
/// Length of a hello: magic, version, commit.
pub const HELLO_LEN: usize = 5 + 4 + 40;
/// Length of the client's command: type, UUID text, address.
pub const COMMAND_LEN: usize = 1 + 36 + 4;
/// Length of the answer to an ethernet command.
pub const VIF_REPLY_LEN: usize = 258;
/// Handshakes in progress at once; more connections wait in the listen backlog.
pub const MAX_HANDSHAKES: usize = 16;
/// How long a client may take over its hello and command.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Interface UUIDs remembered (each keeps its MAC).
pub const MAX_INTERFACES: usize = 1024;

/// The client's command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EthernetRequest {
    /// The interface's UUID, as the client wrote it.
    pub uuid: String,
    /// The address it asks for (type 8).
    pub ip: Option<Ipv4Addr>,
}

/// Checks a hello: the magic must be vpnkit's; the version is returned (any is accepted:
/// every version since 22 has this handshake).
pub fn parse_hello(hello: &[u8; HELLO_LEN]) -> Result<u32, String> {
    if hello[..5] != MAGIC {
        return Err(format!("not a vmnet hello (magic {:02x?}, want \"VMN3T\")", &hello[..5]));
    }
    Ok(u32::from_le_bytes([hello[5], hello[6], hello[7], hello[8]]))
}

/// usernet's hello: the magic, [`VERSION`], and a commit id naming usernet.
pub fn hello() -> [u8; HELLO_LEN] {
    let mut out = [0u8; HELLO_LEN];
    out[..5].copy_from_slice(&MAGIC);
    out[5..9].copy_from_slice(&VERSION.to_le_bytes());
    let commit = format!("{:0<40}", concat!("usernet-", env!("CARGO_PKG_VERSION")));
    out[9..].copy_from_slice(&commit.as_bytes()[..40]);
    out
}

/// Parses the client's command.
pub fn parse_command(cmd: &[u8; COMMAND_LEN]) -> Result<EthernetRequest, String> {
    let uuid = &cmd[1..37];
    let valid_uuid = uuid.iter().enumerate().all(|(i, &c)| match i {
        8 | 13 | 18 | 23 => c == b'-',
        _ => c.is_ascii_hexdigit(),
    });
    if !valid_uuid {
        return Err(format!("the interface UUID is not a UUID: {:?}", String::from_utf8_lossy(uuid)));
    }
    let uuid = String::from_utf8_lossy(uuid).to_ascii_lowercase();
    let raw = u32::from_le_bytes([cmd[37], cmd[38], cmd[39], cmd[40]]);
    match cmd[0] {
        1 => Ok(EthernetRequest { uuid, ip: None }),
        8 => Ok(EthernetRequest { uuid, ip: Some(Ipv4Addr::from(raw)) }),
        other => Err(format!("unknown vmnet command {other} (usernet serves 1 and 8: ethernet)")),
    }
}

/// The answer to an ethernet command: the guest's MTU and MAC.
pub fn vif_reply(mtu: u16, mac: [u8; 6]) -> [u8; VIF_REPLY_LEN] {
    let mut out = [0u8; VIF_REPLY_LEN];
    out[0] = 1;
    out[1..3].copy_from_slice(&mtu.to_le_bytes());
    out[3..5].copy_from_slice(&mtu.saturating_add(14).to_le_bytes());
    out[5..11].copy_from_slice(&mac);
    out
}

/// A refusal the client shows as its error.
pub fn error_reply(message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(255)];
    let mut out = vec![0u8, msg.len() as u8];
    out.extend_from_slice(msg);
    out
}

/// The interfaces known by UUID, each with its MAC (and the address it asked for).
pub struct Interfaces {
    subnet: Ipv4Subnet,
    mac_base: [u8; 6],
    next: u32,
    by_uuid: HashMap<String, ([u8; 6], Option<Ipv4Addr>)>,
}

impl Interfaces {
    /// Interfaces with MACs `mac_base`, `mac_base`+1, ... (in their last three bytes), and
    /// requested addresses checked against `subnet`.
    pub fn new(subnet: Ipv4Subnet, mac_base: [u8; 6]) -> Interfaces {
        Interfaces { subnet, mac_base, next: 0, by_uuid: HashMap::new() }
    }

    /// The MAC (and static address) of the interface a request names: the one it had, or
    /// a new one.
    pub fn resolve(&mut self, req: &EthernetRequest) -> Result<([u8; 6], Option<Ipv4Addr>), String> {
        if let Some(ip) = req.ip {
            if !self.subnet.contains(ip) {
                return Err(format!(
                    "address {ip} is not in the virtual network {}/{}",
                    self.subnet.network, self.subnet.prefix
                ));
            }
            if self.by_uuid.iter().any(|(u, (_, a))| *a == Some(ip) && *u != req.uuid) {
                return Err(format!("address {ip} is already used by another interface"));
            }
        }
        if let Some(entry) = self.by_uuid.get_mut(&req.uuid) {
            if req.ip.is_some() {
                entry.1 = req.ip;
            }
            return Ok(*entry);
        }
        if self.by_uuid.len() >= MAX_INTERFACES {
            return Err(format!("too many interfaces ({MAX_INTERFACES})"));
        }
        let base = u32::from_be_bytes([0, self.mac_base[3], self.mac_base[4], self.mac_base[5]]);
        let low = (base + self.next).to_be_bytes();
        self.next += 1;
        let mac = [self.mac_base[0], self.mac_base[1], self.mac_base[2], low[1], low[2], low[3]];
        self.by_uuid.insert(req.uuid.clone(), (mac, req.ip));
        Ok((mac, req.ip))
    }
}

/// A guest connected over vpnkit's protocol: the stream link, and the interface it is.
pub struct VpnkitLink {
    inner: StreamLink,
    mac: [u8; 6],
    ip: Option<Ipv4Addr>,
}

impl Link for VpnkitLink {
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.recv(buf)?;
        fill_ipv4_checksum(&mut buf[..n]);
        Ok(n)
    }
    fn readable_edge(&mut self, peer_closed: bool) {
        self.inner.readable_edge(peer_closed);
    }
    fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.inner.send(frame)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
    fn polling(&self) -> bool {
        self.inner.polling()
    }
    fn read_events(&self) -> bool {
        self.inner.read_events()
    }
    fn write_events(&self) -> bool {
        self.inner.write_events()
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn guest(&self) -> Option<([u8; 6], Option<Ipv4Addr>)> {
        Some((self.mac, self.ip))
    }
}

/// Fills in an IPv4 header checksum that a client left at zero. vpnkit never checks them,
/// and its Go client relies on that: its DHCP probe goes out with none ("assume offload").
/// A header with a checksum that is set is left alone (and checked by the engine).
fn fill_ipv4_checksum(frame: &mut [u8]) {
    const ETH: usize = 14;
    if frame.len() < ETH + 20 || frame[12..14] != [0x08, 0x00] || frame[ETH] >> 4 != 4 {
        return;
    }
    let header_len = ((frame[ETH] & 0x0f) as usize) * 4;
    if header_len < 20 || frame.len() < ETH + header_len || frame[ETH + 10..ETH + 12] != [0, 0] {
        return;
    }
    let sum = usernet_wire::checksum::checksum(&frame[ETH..ETH + header_len]);
    frame[ETH + 10..ETH + 12].copy_from_slice(&sum.to_be_bytes());
}

/// What the acceptor's threads share with it.
struct Shared {
    links: HandoffSender,
    interfaces: Mutex<Interfaces>,
    handshaking: AtomicUsize,
    stop: AtomicBool,
    mtu: u16,
    path: PathBuf,
}

/// The listening socket of `--listen-vpnkit unix:PATH`. Removes its socket file on drop.
pub struct VpnkitAcceptor {
    shared: Arc<Shared>,
    handoff: Handoff,
    listener: Arc<UnixListener>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl VpnkitAcceptor {
    /// Listens at `path` (owner-only) for clients of an `mtu`-byte network; interfaces get
    /// MACs from `mac_base` on, and may ask for addresses of `subnet`.
    pub fn bind(path: &Path, mtu: u16, subnet: Ipv4Subnet, mac_base: [u8; 6]) -> io::Result<VpnkitAcceptor> {
        let listener = Arc::new(listen_stream(path)?);
        let handoff = Handoff::new(format!("vpnkit unix:{}", path.display()))?;
        let shared = Arc::new(Shared {
            links: handoff.sender(),
            interfaces: Mutex::new(Interfaces::new(subnet, mac_base)),
            handshaking: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            mtu,
            path: path.to_path_buf(),
        });
        let thread = {
            let (shared, listener) = (shared.clone(), listener.clone());
            std::thread::Builder::new().name("vpnkit-accept".into()).spawn(move || accept_loop(&shared, &listener))?
        };
        Ok(VpnkitAcceptor { shared, handoff, listener, thread: Some(thread) })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener) {
    let mut accept_errors = crate::config::LogEvery::default();
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(_) if shared.stop.load(Ordering::Relaxed) => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
            Err(e) => {
                if let Some(times) = accept_errors.due(std::time::Instant::now()) {
                    tracing::warn!(listener = %shared.path.display(), error = %e, times, "vpnkit: accept failed");
                }
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        if shared.handshaking.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
            shared.handshaking.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!("vpnkit: {MAX_HANDSHAKES} handshakes already in progress: a new client is turned away");
            continue;
        }
        let shared = shared.clone();
        let spawned = std::thread::Builder::new().name("vpnkit-handshake".into()).spawn(move || {
            match handshake(&shared, stream) {
                Ok(link) => shared.links.send(Box::new(link)),
                Err(e) => tracing::warn!(listener = %shared.path.display(), "vpnkit: handshake failed: {e}"),
            }
            shared.handshaking.fetch_sub(1, Ordering::AcqRel);
        });
        if let Err(e) = spawned {
            tracing::warn!("vpnkit: cannot start a handshake: {e}");
        }
    }
}

/// Runs the handshake on a blocking stream; the link on success.
fn handshake(shared: &Shared, mut stream: UnixStream) -> Result<VpnkitLink, String> {
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)).map_err(|e| e.to_string())?;
    let read_err = |what: &str, e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("the client closed the connection during its {what}"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("no {what} from the client within {} s", HANDSHAKE_TIMEOUT.as_secs())
        }
        _ => format!("reading the {what}: {e}"),
    };
    let mut theirs = [0u8; HELLO_LEN];
    stream.read_exact(&mut theirs).map_err(|e| read_err("hello", e))?;
    let version = parse_hello(&theirs)?;
    stream.write_all(&hello()).map_err(|e| format!("writing the hello: {e}"))?;
    let mut cmd = [0u8; COMMAND_LEN];
    stream.read_exact(&mut cmd).map_err(|e| read_err("command", e))?;
    let req = match parse_command(&cmd) {
        Ok(r) => r,
        Err(e) => {
            let _ = stream.write_all(&error_reply(&e));
            return Err(e);
        }
    };
    let resolved = shared.interfaces.lock().unwrap_or_else(|e| e.into_inner()).resolve(&req);
    let (mac, ip) = match resolved {
        Ok(x) => x,
        Err(e) => {
            let _ = stream.write_all(&error_reply(&e));
            return Err(format!("interface {}: {e}", req.uuid));
        }
    };
    stream.write_all(&vif_reply(shared.mtu, mac)).map_err(|e| format!("writing the interface: {e}"))?;
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    stream.set_write_timeout(None).map_err(|e| e.to_string())?;
    stream.set_nonblocking(true).map_err(|e| e.to_string())?;
    let name = format!("vpnkit unix:{} interface {}", shared.path.display(), req.uuid);
    tracing::debug!(link = %name, version, "vpnkit: handshake done");
    Ok(VpnkitLink { inner: StreamLink::new(OwnedFd::from(stream), Framing::Le16, name), mac, ip })
}

impl Drop for VpnkitAcceptor {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread: accept(2) fails on a listener that is shut down.
        // SAFETY: shutdown on a descriptor we own.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.shared.path);
    }
}

impl LinkAcceptor for VpnkitAcceptor {
    fn fd(&self) -> RawFd {
        self.handoff.fd()
    }

    fn accept(&mut self) -> io::Result<Option<Box<dyn Link>>> {
        self.handoff.accept()
    }

    fn describe(&self) -> String {
        self.handoff.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "0f9e6c9a-3c1b-4d5e-8f70-123456789abc";

    fn command(ty: u8, uuid: &str, ip: Option<Ipv4Addr>) -> [u8; COMMAND_LEN] {
        let mut c = [0u8; COMMAND_LEN];
        c[0] = ty;
        c[1..37].copy_from_slice(uuid.as_bytes());
        // As the Go client writes it: the big-endian value of the address, little-endian.
        let v = ip.map_or(0, u32::from);
        c[37..41].copy_from_slice(&v.to_le_bytes());
        c
    }

    fn subnet() -> Ipv4Subnet {
        "192.168.65.0/24".parse().unwrap()
    }

    #[test]
    fn missing_ipv4_checksums_are_filled_in() {
        let mut f = vec![0xffu8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [0x45, 0, 0, 28, 0x7f, 0x61, 0, 0, 0x40, 0x11, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0, 68, 0, 67, 0, 8, 0, 0]);
        fill_ipv4_checksum(&mut f);
        assert!(usernet_wire::ipv4::Ipv4Header::parse(&f[14..]).is_some());
        // A wrong checksum stays wrong; short and odd frames are left alone.
        ip[10] = 1;
        let mut g = f[..14].to_vec();
        g.extend_from_slice(&ip);
        fill_ipv4_checksum(&mut g);
        assert_eq!(g[24..26], [1, 0]);
        for mut short in [vec![], f[..20].to_vec(), [&f[..14], &[0x4f][..], &[0u8; 19][..]].concat()] {
            fill_ipv4_checksum(&mut short);
        }
    }

    #[test]
    fn hello_round_trip_and_garbage() {
        let h = hello();
        assert_eq!(&h[..5], b"VMN3T");
        assert_eq!(parse_hello(&h), Ok(22));
        let mut bad = h;
        bad[0] = b'X';
        assert!(parse_hello(&bad).unwrap_err().contains("not a vmnet hello"));
        assert!(parse_hello(&[0u8; HELLO_LEN]).is_err());
    }

    #[test]
    fn commands_parse_with_reversed_address() {
        assert_eq!(parse_command(&command(1, UUID, None)), Ok(EthernetRequest { uuid: UUID.into(), ip: None }));
        let ip = Ipv4Addr::new(192, 168, 65, 9);
        let c = command(8, UUID, Some(ip));
        assert_eq!(&c[37..41], &[9, 65, 168, 192]);
        assert_eq!(parse_command(&c).unwrap().ip, Some(ip));
        assert!(parse_command(&command(3, UUID, None)).unwrap_err().contains("unknown vmnet command 3"));
        assert!(parse_command(&command(1, "not-a-uuid-at-all-but-36-characters!", None)).is_err());
        assert!(parse_command(&[0xff; COMMAND_LEN]).is_err());
        // Upper case is the same interface.
        assert_eq!(parse_command(&command(1, &UUID.to_uppercase(), None)).unwrap().uuid, UUID);
    }

    #[test]
    fn replies_have_the_clients_layout() {
        let r = vif_reply(1500, [2, 3, 4, 5, 6, 7]);
        assert_eq!(r.len(), 258);
        assert_eq!(r[0], 1);
        assert_eq!(u16::from_le_bytes([r[1], r[2]]), 1500);
        assert_eq!(u16::from_le_bytes([r[3], r[4]]), 1514);
        assert_eq!(&r[5..11], &[2, 3, 4, 5, 6, 7]);
        assert!(r[11..].iter().all(|&b| b == 0));
        let e = error_reply(&"x".repeat(300));
        assert_eq!((e[0], e[1] as usize, e.len()), (0, 255, 257));
    }

    #[test]
    fn interfaces_keep_their_mac_and_addresses_are_checked() {
        let mut ifs = Interfaces::new(subnet(), [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xfe]);
        let a = ifs.resolve(&EthernetRequest { uuid: UUID.into(), ip: None }).unwrap();
        let b =
            ifs.resolve(&EthernetRequest { uuid: "11111111-2222-3333-4444-555555555555".into(), ip: None }).unwrap();
        assert_eq!(a.0, [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xfe]);
        // The count carries into the next byte.
        assert_eq!(b.0, [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xff]);
        assert_eq!(ifs.resolve(&EthernetRequest { uuid: UUID.into(), ip: None }).unwrap(), a);
        let ip = Ipv4Addr::new(192, 168, 65, 20);
        let c = "22222222-2222-3333-4444-555555555555";
        assert_eq!(ifs.resolve(&EthernetRequest { uuid: c.into(), ip: Some(ip) }).unwrap().1, Some(ip));
        assert!(
            ifs.resolve(&EthernetRequest { uuid: UUID.into(), ip: Some(ip) }).unwrap_err().contains("already used")
        );
        let far = Some(Ipv4Addr::new(10, 0, 0, 1));
        assert!(ifs.resolve(&EthernetRequest { uuid: UUID.into(), ip: far }).unwrap_err().contains("not in"));
    }

    fn connect_hello(path: &Path) -> UnixStream {
        let mut s = UnixStream::connect(path).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&hello()).unwrap();
        let mut theirs = [0u8; HELLO_LEN];
        s.read_exact(&mut theirs).unwrap();
        assert_eq!(parse_hello(&theirs), Ok(VERSION));
        s
    }

    fn wait_link(acc: &mut VpnkitAcceptor) -> Box<dyn Link> {
        for _ in 0..500 {
            if let Some(l) = acc.accept().unwrap() {
                return l;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("no link");
    }

    /// A whole session over a real socket: handshake, frames both ways; a garbled hello
    /// and a client gone mid-handshake leave the acceptor serving the next client.
    #[test]
    fn session_over_a_socket() {
        let dir = std::env::temp_dir().join(format!("usernet-vpnkit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("ethernet.sock");
        let mut acc = VpnkitAcceptor::bind(&path, 1500, subnet(), [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]).unwrap();

        // Garbage, then a client that goes away after its hello.
        let mut bad = UnixStream::connect(&path).unwrap();
        bad.write_all(&[b'x'; HELLO_LEN]).unwrap();
        let mut buf = [0u8; 1];
        bad.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(bad.read(&mut buf).unwrap(), 0, "a garbled hello gets the connection closed");
        drop(connect_hello(&path));

        let mut s = connect_hello(&path);
        s.write_all(&command(1, UUID, None)).unwrap();
        let mut reply = [0u8; VIF_REPLY_LEN];
        s.read_exact(&mut reply).unwrap();
        assert_eq!(reply[0], 1);
        assert_eq!(&reply[5..11], &[0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
        let mut link = wait_link(&mut acc);
        assert_eq!(link.guest(), Some(([0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee], None)));

        // A frame from the client, split mid-frame; one to it.
        s.write_all(&[3, 0, 0xaa]).unwrap();
        s.write_all(&[0xbb, 0xcc]).unwrap();
        let mut frame = vec![0u8; crate::link::MAX_FRAME];
        let n = loop {
            match link.recv(&mut frame) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(&frame[..n], &[0xaa, 0xbb, 0xcc]);
        link.send(&[1, 2, 3, 4]).unwrap();
        link.flush().unwrap();
        let mut got = [0u8; 6];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, [4, 0, 1, 2, 3, 4]);

        // The same UUID again: the same MAC.
        let mut again = connect_hello(&path);
        again.write_all(&command(1, UUID, None)).unwrap();
        again.read_exact(&mut reply).unwrap();
        assert_eq!(&reply[5..11], &[0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xee]);
        assert!(wait_link(&mut acc).guest().is_some());

        // A refused command gets the error form.
        let mut refused = connect_hello(&path);
        refused.write_all(&command(8, UUID, Some(Ipv4Addr::new(10, 1, 1, 1)))).unwrap();
        let mut head = [0u8; 2];
        refused.read_exact(&mut head).unwrap();
        assert_ne!(head[0], 1);
        drop(acc);
        assert!(!path.exists(), "the socket file goes with the acceptor");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
