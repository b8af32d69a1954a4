//! `GET /v1/capture`: a live capture of the guest links, as a classic pcap stream (the
//! file header, then one record per frame) for as long as the client reads it.
//!
//! The query narrows it down, every condition given must hold: `proto=tcp|udp|icmp|arp`,
//! `host=IPv4` (either address), `port=N` (either TCP or UDP port); `snaplen=N` cuts frames
//! (default and most: 262144, whole offloaded frames). The engine applies the filter and
//! queues records in a bounded channel ([`usernet_core::pcap::LiveTap`]): a reader that
//! falls behind loses frames (counted in `/v1/stats` as `capture_dropped`) rather than
//! slowing the network. The capture ends when the client goes away or the engine stops.
//! Guests (the API inside the guest network) may not capture: 403.

use std::convert::Infallible;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::StatusCode;
use hyper::body::{Bytes, Frame};

use usernet_core::engine::control::Command;
use usernet_core::pcap::{CaptureFilter, LiveTap, TapReceiver, file_header};

use super::state::{Reply, State, engine_gone};

/// The largest (and default) snap length.
pub const MAX_SNAPLEN: u32 = 262_144;
/// Records gathered into one chunk of the response, at most.
const CHUNK_BYTES: usize = 256 * 1024;

/// The response body: the pcap header, then records as the engine sends them.
pub struct CaptureBody {
    header: Option<Bytes>,
    rx: TapReceiver,
}

impl hyper::body::Body for CaptureBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(h) = self.header.take() {
            return Poll::Ready(Some(Ok(Frame::data(h))));
        }
        match self.rx.records.poll_recv(cx) {
            Poll::Ready(Some(first)) => {
                self.rx.taken(&first);
                let mut chunk = first;
                while chunk.len() < CHUNK_BYTES {
                    match self.rx.records.try_recv() {
                        Ok(r) => {
                            self.rx.taken(&r);
                            chunk.extend_from_slice(&r);
                        }
                        Err(_) => break,
                    }
                }
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The filter and snap length of a query string.
pub fn parse_query(query: &str) -> Result<(CaptureFilter, u32), String> {
    let mut filter = CaptureFilter::default();
    let mut snaplen = MAX_SNAPLEN;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "proto" => filter.proto = Some(value.parse()?),
            "host" => {
                filter.host =
                    Some(value.parse::<Ipv4Addr>().map_err(|_| format!("host: not an IPv4 address: {value:?}"))?)
            }
            "port" => filter.port = Some(value.parse::<u16>().map_err(|_| format!("port: not a port: {value:?}"))?),
            "snaplen" => {
                snaplen = match value.parse::<u32>() {
                    Ok(n) if (64..=MAX_SNAPLEN).contains(&n) => n,
                    _ => return Err(format!("snaplen: want 64 to {MAX_SNAPLEN}, not {value:?}")),
                }
            }
            _ => return Err(format!("unknown parameter {key:?} (want proto, host, port, snaplen)")),
        }
    }
    Ok((filter, snaplen))
}

/// Starts a capture for this request: its body, or the error to answer.
pub fn start(state: &State, caller: Option<Ipv4Addr>, query: &str) -> Result<CaptureBody, Reply> {
    if caller.is_some() {
        return Err(Reply::error(StatusCode::FORBIDDEN, "guests may not capture the network"));
    }
    let (filter, snaplen) = parse_query(query).map_err(|e| Reply::error(StatusCode::BAD_REQUEST, e))?;
    let (tap, rx) = LiveTap::new(filter, snaplen);
    if !state.control.send(Command::Capture { tap }) {
        return Err(engine_gone());
    }
    Ok(CaptureBody { header: Some(Bytes::copy_from_slice(&file_header(snaplen))), rx })
}

#[cfg(test)]
mod tests {
    use super::*;
    use usernet_core::pcap::CaptureProto;

    #[test]
    fn queries() {
        assert_eq!(parse_query("").unwrap(), (CaptureFilter::default(), MAX_SNAPLEN));
        let (f, s) = parse_query("proto=tcp&host=192.168.65.2&port=80&snaplen=128").unwrap();
        assert_eq!(
            f,
            CaptureFilter { proto: Some(CaptureProto::Tcp), host: Some([192, 168, 65, 2].into()), port: Some(80) }
        );
        assert_eq!(s, 128);
        assert!(parse_query("proto=sctp").is_err());
        assert!(parse_query("host=example.test").is_err());
        assert!(parse_query("port=70000").is_err());
        assert!(parse_query("snaplen=1").is_err());
        assert!(parse_query("color=blue").is_err());
    }
}
