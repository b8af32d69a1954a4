//! `--pcap FILE`: every frame of the guest link, in the classic pcap format (pcap-file);
//! and live captures (`/v1/capture`, `usernet capture`): [`LiveTap`]s that receive the
//! frames a [`CaptureFilter`] matches as ready-made pcap records.
//!
//! A live tap never slows the engine: a record goes into a bounded channel with `try_send`,
//! and when the reader is behind by more than [`TAP_QUEUE_BYTES`] the record is dropped and
//! counted instead. A tap whose reader went away is forgotten at its next frame.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::net::Ipv4Addr;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use usernet_wire::arp::ArpPacket;
use usernet_wire::ethernet::{self, EthernetHeader};
use usernet_wire::ipv4::Ipv4Header;
use usernet_wire::{PROTO_ICMP, PROTO_TCP, PROTO_UDP};

use pcap_file::DataLink;
use pcap_file::pcap::{PcapHeader, PcapPacket};

/// The buffered file, shared so that the loop can flush it when it goes idle.
#[derive(Clone)]
struct SharedFile(Rc<RefCell<BufWriter<File>>>);

impl Write for SharedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.borrow_mut().flush()
    }
}

/// Writes frames as a pcap capture (LINKTYPE_ETHERNET). A write error (a full disk) is
/// reported once and the capture stops; the network goes on.
pub struct PcapWriter {
    out: Option<pcap_file::pcap::PcapWriter<SharedFile>>,
    file: Option<SharedFile>,
    path: String,
    snaplen: u32,
    taps: Vec<LiveTap>,
    /// Records the taps dropped (slow readers), over the writer's life.
    tap_dropped: u64,
}

impl PcapWriter {
    pub fn create(path: &Path, snaplen: u32) -> io::Result<PcapWriter> {
        let file = SharedFile(Rc::new(RefCell::new(BufWriter::with_capacity(256 * 1024, open_capture(path)?))));
        let header = PcapHeader { snaplen, datalink: DataLink::ETHERNET, ..Default::default() };
        let out = pcap_file::pcap::PcapWriter::with_header(file.clone(), header).map_err(io::Error::other)?;
        let mut w = PcapWriter {
            out: Some(out),
            file: Some(file),
            path: path.display().to_string(),
            snaplen,
            taps: Vec::new(),
            tap_dropped: 0,
        };
        w.flush();
        Ok(w)
    }

    /// A writer with no file, for live taps only.
    pub fn live_only() -> PcapWriter {
        PcapWriter { out: None, file: None, path: String::new(), snaplen: 0, taps: Vec::new(), tap_dropped: 0 }
    }

    /// Starts sending the frames to `tap` too.
    pub fn add_tap(&mut self, tap: LiveTap) {
        self.taps.push(tap);
    }

    /// Records dropped by live taps so far (their readers were too slow).
    pub fn tap_dropped(&self) -> u64 {
        self.tap_dropped
    }

    /// Records one frame (truncated to the snap length).
    pub fn write(&mut self, frame: &[u8]) {
        if !self.taps.is_empty() {
            self.send_to_taps(frame);
        }
        let Some(out) = self.out.as_mut() else { return };
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let caplen = frame.len().min(self.snaplen as usize);
        if let Err(e) = out.write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame[..caplen])) {
            self.fail(&describe(&e));
        }
    }

    fn send_to_taps(&mut self, frame: &[u8]) {
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let mut dropped = 0;
        self.taps.retain(|tap| match tap.offer(ts, frame) {
            Offer::Taken | Offer::Filtered => true,
            Offer::Dropped => {
                dropped += 1;
                true
            }
            Offer::Gone => false,
        });
        self.tap_dropped += dropped;
    }

    /// Pushes buffered frames to the file (called when the loop goes idle).
    pub fn flush(&mut self) {
        if self.out.is_some()
            && let Some(file) = self.file.as_mut()
            && let Err(e) = file.flush()
        {
            self.fail(&e.to_string());
        }
    }

    fn fail(&mut self, e: &str) {
        // An error: logged whatever the verbosity (`--quiet` too), once.
        tracing::error!("pcap {}: {e}; capture stopped, networking goes on", self.path);
        self.out = None;
    }
}

/// The capture file at `path`, created or emptied. A FIFO (`mkfifo`, for a live reader such
/// as `wireshark -k -i PATH`) opens once it has a reader: without one yet, that is said, and
/// the open waits for it (a signal still ends usernet meanwhile). Written to as a file is:
/// a reader slower than the network holds the engine back, as tcpdump's `-w` to a FIFO is.
fn open_capture(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    if std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo()) {
        match std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path) {
            Ok(f) => {
                set_blocking(&f)?;
                return Ok(f);
            }
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                tracing::warn!(
                    "pcap {}: a FIFO with no reader yet; waiting for one (e.g. `wireshark -k -i {0}`)",
                    path.display()
                );
            }
            Err(e) => return Err(e),
        }
    }
    File::create(path)
}

/// Clears O_NONBLOCK on `f`.
fn set_blocking(f: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl(2) on a descriptor `f` owns; no memory is passed.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What went wrong, in the I/O error's words: pcap-file says "Error reading bytes" of any,
/// writes too (a full disk: "No space left on device").
fn describe(e: &pcap_file::PcapError) -> String {
    match e {
        pcap_file::PcapError::IoError(io) => io.to_string(),
        e => e.to_string(),
    }
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

/// How far a live tap's reader may fall behind, in bytes of queued records.
pub const TAP_QUEUE_BYTES: usize = 8 << 20;
/// Records a tap's channel holds at most (small frames).
const TAP_QUEUE_RECORDS: usize = 16 * 1024;
/// The classic pcap file header's size, and each record header's.
pub const FILE_HEADER_LEN: usize = 24;
pub const RECORD_HEADER_LEN: usize = 16;

/// The header of a classic pcap stream (microsecond timestamps, this machine's byte
/// order, LINKTYPE_ETHERNET), as `tcpdump -r` and Wireshark read it.
pub fn file_header(snaplen: u32) -> [u8; FILE_HEADER_LEN] {
    let mut h = [0u8; FILE_HEADER_LEN];
    h[0..4].copy_from_slice(&0xa1b2_c3d4u32.to_ne_bytes());
    h[4..6].copy_from_slice(&2u16.to_ne_bytes());
    h[6..8].copy_from_slice(&4u16.to_ne_bytes());
    // thiszone and sigfigs stay 0.
    h[16..20].copy_from_slice(&snaplen.to_ne_bytes());
    h[20..24].copy_from_slice(&1u32.to_ne_bytes());
    h
}

/// One pcap record: its header and the frame, cut at `snaplen`.
pub fn record(ts: Duration, frame: &[u8], snaplen: u32) -> Vec<u8> {
    let caplen = frame.len().min(snaplen as usize);
    let mut r = Vec::with_capacity(RECORD_HEADER_LEN + caplen);
    r.extend_from_slice(&(ts.as_secs() as u32).to_ne_bytes());
    r.extend_from_slice(&ts.subsec_micros().to_ne_bytes());
    r.extend_from_slice(&(caplen as u32).to_ne_bytes());
    r.extend_from_slice(&(frame.len() as u32).to_ne_bytes());
    r.extend_from_slice(&frame[..caplen]);
    r
}

/// A protocol a capture may be limited to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureProto {
    Tcp,
    Udp,
    Icmp,
    Arp,
}

impl std::str::FromStr for CaptureProto {
    type Err = String;
    fn from_str(s: &str) -> Result<CaptureProto, String> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(CaptureProto::Tcp),
            "udp" => Ok(CaptureProto::Udp),
            "icmp" => Ok(CaptureProto::Icmp),
            "arp" => Ok(CaptureProto::Arp),
            _ => Err(format!("unknown protocol {s:?} (want tcp, udp, icmp or arp)")),
        }
    }
}

/// Which frames a live capture keeps: every condition given must hold (as tcpdump's
/// `tcp and host A and port N`). `host` matches either IPv4 address (ARP: sender or
/// target), `port` either TCP or UDP port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    pub proto: Option<CaptureProto>,
    pub host: Option<Ipv4Addr>,
    pub port: Option<u16>,
}

impl CaptureFilter {
    pub fn matches(&self, frame: &[u8]) -> bool {
        if *self == CaptureFilter::default() {
            return true;
        }
        let Some((eth, payload)) = EthernetHeader::parse(frame) else { return false };
        match eth.ethertype {
            ethernet::ETHERTYPE_ARP => {
                if self.port.is_some() || self.proto.is_some_and(|p| p != CaptureProto::Arp) {
                    return false;
                }
                match (self.host, ArpPacket::parse(payload)) {
                    (None, _) => true,
                    (Some(h), Some(a)) => a.sender_ip == h || a.target_ip == h,
                    (Some(_), None) => false,
                }
            }
            ethernet::ETHERTYPE_IPV4 => {
                let Some((ip, l4)) = Ipv4Header::parse(payload) else { return false };
                let proto = match ip.protocol {
                    PROTO_TCP => Some(CaptureProto::Tcp),
                    PROTO_UDP => Some(CaptureProto::Udp),
                    PROTO_ICMP => Some(CaptureProto::Icmp),
                    _ => None,
                };
                if self.proto.is_some_and(|p| Some(p) != proto) {
                    return false;
                }
                if self.host.is_some_and(|h| ip.src != h && ip.dst != h) {
                    return false;
                }
                match self.port {
                    None => true,
                    Some(port) => {
                        matches!(proto, Some(CaptureProto::Tcp | CaptureProto::Udp))
                            && l4.len() >= 4
                            && (u16::from_be_bytes([l4[0], l4[1]]) == port
                                || u16::from_be_bytes([l4[2], l4[3]]) == port)
                    }
                }
            }
            _ => false,
        }
    }
}

/// The API's end of a live tap: pcap records, and how many bytes of them wait.
pub struct TapReceiver {
    pub records: tokio::sync::mpsc::Receiver<Vec<u8>>,
    queued: Arc<AtomicUsize>,
    /// Records this tap dropped.
    pub dropped: Arc<AtomicU64>,
}

impl TapReceiver {
    /// The reader took `record`: it no longer counts against the queue's bound.
    pub fn taken(&self, record: &[u8]) {
        self.queued.fetch_sub(record.len(), Ordering::Relaxed);
    }
}

/// The engine's end of a live capture (each engine of a set of shards has a copy).
#[derive(Clone)]
pub struct LiveTap {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
    filter: CaptureFilter,
    snaplen: u32,
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
}

enum Offer {
    Taken,
    Filtered,
    Dropped,
    Gone,
}

impl LiveTap {
    /// A tap for the frames `filter` matches, cut at `snaplen`, and its reader's end.
    pub fn new(filter: CaptureFilter, snaplen: u32) -> (LiveTap, TapReceiver) {
        let (tx, rx) = tokio::sync::mpsc::channel(TAP_QUEUE_RECORDS);
        let queued = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicU64::new(0));
        let tap = LiveTap { tx, filter, snaplen, queued: queued.clone(), dropped: dropped.clone() };
        (tap, TapReceiver { records: rx, queued, dropped })
    }

    fn offer(&self, ts: Duration, frame: &[u8]) -> Offer {
        if self.tx.is_closed() {
            return Offer::Gone;
        }
        if !self.filter.matches(frame) {
            return Offer::Filtered;
        }
        let len = RECORD_HEADER_LEN + frame.len().min(self.snaplen as usize);
        if self.queued.load(Ordering::Relaxed) + len > TAP_QUEUE_BYTES {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Offer::Dropped;
        }
        match self.tx.try_send(record(ts, frame, self.snaplen)) {
            Ok(()) => {
                self.queued.fetch_add(len, Ordering::Relaxed);
                Offer::Taken
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                Offer::Dropped
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readable_capture() {
        let dir = std::env::temp_dir().join(format!("usernet-pcap-{}", std::process::id()));
        let mut w = PcapWriter::create(&dir, 400).unwrap();
        w.write(&[1u8; 60]);
        w.write(&[2u8; 300]);
        drop(w);
        let data = std::fs::read(&dir).unwrap();
        std::fs::remove_file(&dir).unwrap();
        let mut r = pcap_file::pcap::PcapReader::new(&data[..]).unwrap();
        let p1 = r.next_packet().unwrap().unwrap();
        assert_eq!((p1.data.len(), p1.orig_len), (60, 60));
        let p2 = r.next_packet().unwrap().unwrap();
        assert_eq!((p2.data.len(), p2.orig_len), (300, 300));
        assert!(r.next_packet().is_none());
    }

    /// A frame: Ethernet, IPv4 with `proto`, and ports when TCP or UDP.
    fn frame(proto: u8, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ethernet::ETHERTYPE_IPV4.to_be_bytes());
        let l4_len = if proto == PROTO_ICMP { 8 } else { 20 };
        Ipv4Header::new(src.into(), dst.into(), proto, l4_len).emit(&mut f[14..]);
        f.truncate(14 + 20 + l4_len);
        f[34..36].copy_from_slice(&sport.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f
    }

    #[test]
    fn filters() {
        let web = frame(PROTO_TCP, [192, 168, 65, 2], [192, 168, 65, 254], 40000, 8080);
        let dns = frame(PROTO_UDP, [192, 168, 65, 2], [192, 168, 65, 1], 40001, 53);
        let ping = frame(PROTO_ICMP, [192, 168, 65, 1], [192, 168, 65, 2], 0, 0);
        let all = CaptureFilter::default();
        assert!(all.matches(&web) && all.matches(&dns) && all.matches(&ping) && all.matches(&[1, 2, 3]));
        let tcp = CaptureFilter { proto: Some(CaptureProto::Tcp), ..all };
        assert!(tcp.matches(&web) && !tcp.matches(&dns) && !tcp.matches(&ping));
        let port = CaptureFilter { port: Some(53), ..all };
        assert!(!port.matches(&web) && port.matches(&dns) && !port.matches(&ping));
        let host = CaptureFilter { host: Some([192, 168, 65, 254].into()), ..all };
        assert!(host.matches(&web) && !host.matches(&dns));
        let both = CaptureFilter { proto: Some(CaptureProto::Udp), port: Some(8080), ..all };
        assert!(!both.matches(&web) && !both.matches(&dns));
        assert!(!tcp.matches(&[1, 2, 3]));
    }

    #[test]
    fn live_tap_records_drops_and_forgets() {
        let mut w = PcapWriter::live_only();
        let (tap, mut rx) = LiveTap::new(CaptureFilter { port: Some(53), ..Default::default() }, 40);
        w.add_tap(tap);
        let dns = frame(PROTO_UDP, [192, 168, 65, 2], [192, 168, 65, 1], 40001, 53);
        w.write(&frame(PROTO_TCP, [192, 168, 65, 2], [192, 168, 65, 254], 40000, 8080));
        w.write(&dns);
        let r = rx.records.try_recv().unwrap();
        rx.taken(&r);
        assert_eq!(r.len(), RECORD_HEADER_LEN + 40, "cut at the snap length");
        assert_eq!(u32::from_ne_bytes(r[8..12].try_into().unwrap()), 40);
        assert_eq!(u32::from_ne_bytes(r[12..16].try_into().unwrap()), dns.len() as u32);
        assert_eq!(&r[RECORD_HEADER_LEN..], &dns[..40]);
        assert!(rx.records.try_recv().is_err(), "the TCP frame was filtered out");
        // A reader that does not read: the queue stops at its bound, the rest is counted.
        for _ in 0..TAP_QUEUE_RECORDS + 10 {
            w.write(&dns);
        }
        assert_eq!(w.tap_dropped(), 10);
        assert_eq!(rx.dropped.load(Ordering::Relaxed), 10);
        // A stream of the header and the records reads back with pcap-file (which takes
        // an original length beyond the header's snap length for an error: 65535 here).
        let mut stream = file_header(65535).to_vec();
        while let Ok(r) = rx.records.try_recv() {
            stream.extend_from_slice(&r);
        }
        let mut reader = pcap_file::pcap::PcapReader::new(&stream[..]).unwrap();
        let mut n = 0;
        while let Some(p) = reader.next_packet() {
            assert_eq!(p.unwrap().orig_len, dns.len() as u32);
            n += 1;
        }
        assert_eq!(n, TAP_QUEUE_RECORDS);
        // The reader goes away: the tap is forgotten at the next frame.
        drop(rx);
        w.write(&dns);
        assert!(w.taps.is_empty());
    }

    /// A FIFO: opened at once when it has a reader (and written to blocking), waited for
    /// when it has none yet; the reader gets the file's header either way.
    #[test]
    fn a_fifo_is_opened_for_its_reader() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("usernet-pcap-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("capture");
        let _ = std::fs::remove_file(&fifo);
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) of a path we own.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        // No reader: the open waits.
        let opener = {
            let fifo = fifo.clone();
            std::thread::spawn(move || PcapWriter::create(&fifo, 128).map(|w| w.out.is_some()))
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(!opener.is_finished(), "opened without a reader");
        let mut reader = File::open(&fifo).unwrap();
        assert!(opener.join().unwrap().unwrap());
        let mut header = [0u8; 24];
        reader.read_exact(&mut header).unwrap();
        let magic = 0xa1b2c3d4u32;
        assert!([magic.to_be_bytes(), magic.to_le_bytes()].contains(&header[..4].try_into().unwrap()), "{header:?}");
        // A reader already there: opened at once, blocking.
        let reader = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(&fifo).unwrap()
        };
        let w = PcapWriter::create(&fifo, 128).unwrap();
        let fd = w.file.as_ref().unwrap().0.borrow().get_ref().as_raw_fd();
        // SAFETY: F_GETFL on a descriptor the writer owns.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_GETFL) } & libc::O_NONBLOCK, 0);
        drop((w, reader));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn full_disk_stops_capture_without_panic() {
        let Ok(mut w) = PcapWriter::create(Path::new("/dev/full"), 65535) else {
            return;
        };
        for _ in 0..2000 {
            w.write(&[0u8; 1500]);
        }
        w.flush();
        assert!(w.out.is_none(), "the error was noticed");
        // A write's failure in the I/O error's own words, not pcap-file's "Error reading bytes".
        let full = pcap_file::PcapError::IoError(io::Error::from_raw_os_error(libc::ENOSPC));
        assert!(describe(&full).starts_with("No space left on device"), "{}", describe(&full));
    }
}
