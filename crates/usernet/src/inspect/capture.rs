//! `usernet capture [EXPRESSION]`: a live pcap stream of a running usernet's guest links
//! (`/v1/capture`), to stdout or a file, for `usernet capture | tcpdump -r -` or Wireshark
//! (`usernet capture | wireshark -k -i -`).
//!
//! The expression is a small part of tcpdump's: `tcp`, `udp`, `icmp`, `arp`, `host IP`,
//! `port N`, joined by `and` (or nothing); usernet applies it before the frames leave the
//! engine. `-c N` stops after N packets; SIGINT or SIGTERM end the capture between packets
//! (the stream stays a valid pcap file), as does the reader closing the pipe. The number
//! of packets captured, and of those usernet dropped because the reader was too slow, goes
//! to stderr at the end, as tcpdump reports its own.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;

use usernet_host::api::{StatsView, client};

use super::{InstanceOpt, get};

#[derive(Args, Debug)]
pub struct CaptureArgs {
    #[command(flatten)]
    pub instance: InstanceOpt,
    /// Where to write the pcap stream (`-`: stdout, which must not be a terminal).
    #[arg(short = 'w', value_name = "FILE", default_value = "-")]
    pub write: PathBuf,
    /// Stop after this many packets.
    #[arg(short = 'c', value_name = "COUNT")]
    pub count: Option<u64>,
    /// Cut each frame at this many bytes (64 to 262144).
    #[arg(short = 's', long = "snaplen", value_name = "BYTES")]
    pub snaplen: Option<u32>,
    /// Filter: `tcp`, `udp`, `icmp`, `arp`, `host IP`, `port N`, joined by `and`.
    #[arg(value_name = "EXPRESSION", trailing_var_arg = true)]
    pub expression: Vec<String>,
}

/// The query string of `/v1/capture` for an expression (and a snap length).
pub fn query(words: &[String], snaplen: Option<u32>) -> anyhow::Result<String> {
    let mut params: Vec<(&str, String)> = Vec::new();
    let set = |key: &'static str, value: String, params: &mut Vec<(&str, String)>| -> anyhow::Result<()> {
        if params.iter().any(|(k, _)| *k == key) {
            bail!("the expression gives {key} twice (only `and` of different conditions is supported)");
        }
        params.push((key, value));
        Ok(())
    };
    let words: Vec<String> = words.iter().flat_map(|w| w.split_whitespace().map(str::to_ascii_lowercase)).collect();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "and" | "&&" => {}
            "tcp" | "udp" | "icmp" | "arp" => set("proto", w.clone(), &mut params)?,
            "host" => {
                let ip = it.next().context("`host` needs an address")?;
                ip.parse::<std::net::Ipv4Addr>().map_err(|_| anyhow::anyhow!("host: not an IPv4 address: {ip}"))?;
                set("host", ip.clone(), &mut params)?;
            }
            "port" => {
                let port = it.next().context("`port` needs a number")?;
                port.parse::<u16>().map_err(|_| anyhow::anyhow!("port: not a port number: {port}"))?;
                set("port", port.clone(), &mut params)?;
            }
            other => bail!(
                "unsupported filter word {other:?}: usernet capture knows tcp, udp, icmp, arp, host IP, port N and `and`"
            ),
        }
    }
    if let Some(s) = snaplen {
        set("snaplen", s.to_string(), &mut params)?;
    }
    Ok(params.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&"))
}

/// How long the capture may take to end after SIGINT or SIGTERM (it may be blocked writing
/// to a reader that does not read) before it exits anyway.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends the capture cleanly on SIGINT or SIGTERM: a thread waits for them (blocked in
/// every thread) and shuts the API connection down, so the reading loop sees its end
/// between packets. If the loop is stuck writing to a reader that does not read, the
/// process exits after [`STOP_GRACE`].
fn end_on_signals(conn: std::os::unix::net::UnixStream) -> anyhow::Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    set.thread_block().context("blocking signals")?;
    std::thread::Builder::new().name("usernet-capture-signals".into()).spawn(move || {
        if set.wait().is_ok() {
            let _ = conn.shutdown(std::net::Shutdown::Both);
            std::thread::sleep(STOP_GRACE);
            eprintln!("usernet: capture: the reader is not reading; stopping (the last packet may be cut short)");
            std::process::exit(0);
        }
    })?;
    Ok(())
}

/// Reads exactly `buf.len()` bytes; false at the end of the stream (even mid-way).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> bool {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return false,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!("capture: {e}");
                return false;
            }
        }
    }
    true
}

pub fn main(args: CaptureArgs) -> anyhow::Result<i32> {
    let to_stdout = args.write.as_os_str() == "-";
    if to_stdout && std::io::stdout().is_terminal() {
        bail!("not writing a pcap stream to a terminal: pipe it (`usernet capture | tcpdump -r -`) or use -w FILE");
    }
    let query = query(&args.expression, args.snaplen)?;
    let socket = args.instance.socket()?;
    let dropped_before = get::<StatsView>(&socket, "/v1/stats").map(|s| s.capture_dropped).unwrap_or(0);
    let mut stream = client::stream(&socket, &format!("/v1/capture?{query}"))?;
    if stream.status != 200 {
        bail!("{}", stream.into_response()?.error_message());
    }
    end_on_signals(stream.connection()?)?;
    let mut out: Box<dyn Write> = if to_stdout {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(std::fs::File::create(&args.write).with_context(|| format!("cannot create {}", args.write.display()))?)
    };
    let mut header = [0u8; 24];
    if !read_full(&mut stream, &mut header) {
        bail!("the usernet API ended the capture before it began");
    }
    let dest = if to_stdout { "standard output".to_string() } else { args.write.display().to_string() };
    out.write_all(&header).and_then(|()| out.flush()).with_context(|| format!("cannot write to {dest}"))?;
    let mut packets = 0u64;
    let mut record = Vec::new();
    while args.count.is_none_or(|c| packets < c) {
        let mut head = [0u8; 16];
        if !read_full(&mut stream, &mut head) {
            break;
        }
        let caplen = u32::from_ne_bytes([head[8], head[9], head[10], head[11]]) as usize;
        if caplen > 262_144 {
            bail!("malformed capture stream (a {caplen}-byte record)");
        }
        record.clear();
        record.extend_from_slice(&head);
        record.resize(16 + caplen, 0);
        if !read_full(&mut stream, &mut record[16..]) {
            break;
        }
        match out.write_all(&record).and_then(|()| out.flush()) {
            Ok(()) => {}
            // The reader went away (tcpdump -c): the capture is over, not failed.
            Err(e) if to_stdout && e.kind() == std::io::ErrorKind::BrokenPipe => break,
            Err(e) => bail!("cannot write to {dest} after {packets} packets: {e}"),
        }
        packets += 1;
    }
    drop(stream);
    eprintln!("{packets} packets captured");
    if let Ok(s) = get::<StatsView>(&socket, "/v1/stats")
        && s.capture_dropped > dropped_before
    {
        eprintln!("{} packets dropped by usernet (the reader was too slow)", s.capture_dropped - dropped_before);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> anyhow::Result<String> {
        query(&s.split(' ').filter(|w| !w.is_empty()).map(String::from).collect::<Vec<_>>(), None)
    }

    #[test]
    fn expressions() {
        assert_eq!(q("").unwrap(), "");
        assert_eq!(q("tcp and port 80").unwrap(), "proto=tcp&port=80");
        assert_eq!(q("host 192.168.65.2 udp").unwrap(), "host=192.168.65.2&proto=udp");
        assert_eq!(query(&["TCP port 8080".into()], Some(128)).unwrap(), "proto=tcp&port=8080&snaplen=128");
        assert!(q("tcp or udp").is_err());
        assert!(q("tcp udp").is_err());
        assert!(q("port").is_err());
        assert!(q("port http").is_err());
        assert!(q("host example.test").is_err());
    }
}
