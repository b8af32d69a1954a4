//! `--pcap FILE`: every frame of the guest link, in the classic pcap format (pcap-file).

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::rc::Rc;
use std::time::{SystemTime, UNIX_EPOCH};

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
    file: SharedFile,
    path: String,
    snaplen: u32,
}

impl PcapWriter {
    pub fn create(path: &Path, snaplen: u32) -> io::Result<PcapWriter> {
        let file = SharedFile(Rc::new(RefCell::new(BufWriter::with_capacity(256 * 1024, File::create(path)?))));
        let header = PcapHeader { snaplen, datalink: DataLink::ETHERNET, ..Default::default() };
        let out = pcap_file::pcap::PcapWriter::with_header(file.clone(), header).map_err(io::Error::other)?;
        let mut w = PcapWriter { out: Some(out), file, path: path.display().to_string(), snaplen };
        w.flush();
        Ok(w)
    }

    /// Records one frame (truncated to the snap length).
    pub fn write(&mut self, frame: &[u8]) {
        let Some(out) = self.out.as_mut() else { return };
        let ts = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let caplen = frame.len().min(self.snaplen as usize);
        if let Err(e) = out.write_packet(&PcapPacket::new(ts, frame.len() as u32, &frame[..caplen])) {
            self.fail(&e.to_string());
        }
    }

    /// Pushes buffered frames to the file (called when the loop goes idle).
    pub fn flush(&mut self) {
        if self.out.is_some()
            && let Err(e) = self.file.flush()
        {
            self.fail(&e.to_string());
        }
    }

    fn fail(&mut self, e: &str) {
        tracing::error!("pcap {}: {e}; capture stopped, networking goes on", self.path);
        eprintln!("usernet: pcap {}: {e}; capture stopped, networking goes on", self.path);
        self.out = None;
    }
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        self.flush();
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
    }
}
