//! `--pcap FILE`: every frame of the guest link, in the classic pcap format.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Writes frames as a pcap capture (LINKTYPE_ETHERNET). A write error (a full disk) is
/// reported once and the capture stops; the network goes on.
pub struct PcapWriter {
    out: Option<BufWriter<File>>,
    path: String,
    snaplen: u32,
}

impl PcapWriter {
    pub fn create(path: &Path, snaplen: u32) -> io::Result<PcapWriter> {
        let file = File::create(path)?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        // Global header: magic, version 2.4, thiszone, sigfigs, snaplen, linktype 1 (Ethernet).
        out.write_all(&0xa1b2_c3d4u32.to_le_bytes())?;
        out.write_all(&2u16.to_le_bytes())?;
        out.write_all(&4u16.to_le_bytes())?;
        out.write_all(&0i32.to_le_bytes())?;
        out.write_all(&0u32.to_le_bytes())?;
        out.write_all(&snaplen.to_le_bytes())?;
        out.write_all(&1u32.to_le_bytes())?;
        out.flush()?;
        Ok(PcapWriter {
            out: Some(out),
            path: path.display().to_string(),
            snaplen,
        })
    }

    /// Records one frame (truncated to the snap length).
    pub fn write(&mut self, frame: &[u8]) {
        let Some(out) = self.out.as_mut() else { return };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let caplen = frame.len().min(self.snaplen as usize);
        let res = (|| {
            out.write_all(&(now.as_secs() as u32).to_le_bytes())?;
            out.write_all(&now.subsec_micros().to_le_bytes())?;
            out.write_all(&(caplen as u32).to_le_bytes())?;
            out.write_all(&(frame.len() as u32).to_le_bytes())?;
            out.write_all(&frame[..caplen])
        })();
        if let Err(e) = res {
            self.fail(e);
        }
    }

    /// Pushes buffered frames to the file (called when the loop goes idle).
    pub fn flush(&mut self) {
        if let Some(out) = self.out.as_mut()
            && let Err(e) = out.flush()
        {
            self.fail(e);
        }
    }

    fn fail(&mut self, e: io::Error) {
        tracing::error!(
            "pcap {}: {e}; capture stopped, networking goes on",
            self.path
        );
        eprintln!(
            "usernet: pcap {}: {e}; capture stopped, networking goes on",
            self.path
        );
        self.out = None;
    }
}

impl Drop for PcapWriter {
    fn drop(&mut self) {
        self.flush();
    }
}
