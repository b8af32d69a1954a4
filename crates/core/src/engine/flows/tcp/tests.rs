//! Focused tests of the translator against the model socket: regressions for what the
//! simulation found, and the model checked against a kernel socket.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::model::ModelSocket;
use super::sim::{Pkt, Recorder, switch, take_frames};
use super::state::{ToGuest, ToHost};
use super::{ACK_DELAY, HostSocket, KernelSocket, RTO_MAX, RTO_MIN, TcpFlow, Verdict};
use crate::engine::metrics::Resend;
use crate::engine::switch::Switch;
use usernet_wire::tcp::{ACK, FIN, PSH, RST, SYN, TcpHeader, seq_lt};

const GUEST_ISN: u32 = 1000;
const ISN: u32 = 5000;

fn guest() -> std::net::SocketAddr {
    "192.168.65.2:40000".parse().unwrap()
}

fn remote() -> std::net::SocketAddr {
    "203.0.113.10:80".parse().unwrap()
}

fn seg(seq: u32, ack: u32, flags: u8, window: u16) -> TcpHeader {
    TcpHeader { src_port: guest().port(), dst_port: remote().port(), seq, ack, flags, window, ..Default::default() }
}

/// TCP segments sent to the guest since the last call.
fn sent(rec: &Recorder) -> Vec<(TcpHeader, Vec<u8>)> {
    take_frames(rec, false)
        .into_iter()
        .filter_map(|p| match p {
            Pkt::Tcp { h, data, .. } => Some((h, data)),
            Pkt::Unreachable => None,
        })
        .collect()
}

/// An established outbound flow on a model socket: the guest offered `window` (no scaling)
/// and acknowledged our SYN-ACK.
fn open(window: u16, now: Instant) -> (TcpFlow<ModelSocket>, Switch, Recorder) {
    open_with(window, false, now)
}

/// The same, with a guest that offers SACK when `sack`.
fn open_with(window: u16, sack: bool, now: Instant) -> (TcpFlow<ModelSocket>, Switch, Recorder) {
    let (mut sw, rec) = switch(1500, false);
    let mut syn = seg(GUEST_ISN, 0, SYN, window);
    syn.mss = Some(1460);
    syn.sack_permitted = sack;
    let sock = ModelSocket::new(1 << 20, 1 << 20);
    let (mut f, v) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
    assert_eq!(v, Verdict::Keep);
    let synack = sent(&rec);
    assert!(synack[0].0.has(SYN) && synack[0].0.has(ACK));
    assert_eq!(synack[0].0.sack_permitted, sack, "SACK offered back only to a guest that offers it");
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK, window), &[], now), Verdict::Keep);
    (f, sw, rec)
}

/// The engine's end of a round for a flow that owes an ACK.
fn end_of_round(f: &mut TcpFlow<ModelSocket>, sw: &mut Switch, now: Instant) -> Verdict {
    if !f.need_ack {
        return Verdict::Keep;
    }
    let v = f.write_gathered(sw, now);
    if v == Verdict::Keep {
        f.flush_ack(sw, now);
    }
    v
}

/// Host data arrives: the socket is readable.
fn host_writes(f: &mut TcpFlow<ModelSocket>, sw: &mut Switch, data: &[u8], now: Instant) -> Verdict {
    assert_eq!(f.sock.peer_write(data), data.len());
    let (r, w, e) = f.sock.take_edges().unwrap_or_default();
    f.on_socket(sw, r, w, e, now)
}

/// The host peer closes its end: epoll reports RDHUP with the readable edge.
fn host_closes(f: &mut TcpFlow<ModelSocket>, sw: &mut Switch, now: Instant) -> Verdict {
    f.sock.peer_shutdown();
    assert!(f.sock.take_read_closed());
    f.host_read_closed();
    let (r, w, e) = f.sock.take_edges().unwrap_or_default();
    f.on_socket(sw, r, w, e, now)
}

/// Regression: gathered guest data was never written when the segment that brought it
/// also let host data go (its ACK rode on that data, which cleared `need_ack`, so the
/// engine did not call `write_gathered`); the guest's retransmissions, answered at once,
/// did not help: the connection stalled for good.
#[test]
fn gathered_data_is_written_when_its_ack_rides_on_host_data() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(0, now);
    // Host data waits for the guest's window.
    assert_eq!(host_writes(&mut f, &mut sw, &[7; 100], now), Verdict::Keep);
    assert!(sent(&rec).iter().all(|(_, d)| d.is_empty()), "nothing goes into a zero window");
    // A small request that also opens the window: the host data goes, carrying an ACK.
    let v = f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK | PSH, 65535), b"hello", now);
    assert_eq!(v, Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out.iter().map(|(_, d)| d.len()).sum::<usize>(), 100);
    assert!(f.need_ack, "the engine must still write the gathered bytes at the end of the round");
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    let mut got = Vec::new();
    f.sock.peer_read(100, &mut got);
    assert_eq!(got, b"hello");
    // ... and acknowledged (at once: the ACK that rode on the data could not include it).
    assert!(sent(&rec).iter().any(|(h, _)| h.ack == GUEST_ISN + 6), "the request is acknowledged");
    // A retransmission of it changes nothing.
    f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 101, ACK | PSH, 65535), b"hello", now);
    end_of_round(&mut f, &mut sw, now);
    got.clear();
    assert_eq!(f.sock.peer_read(100, &mut got), 0);
}

/// Regression: after the first zero-window probe the retransmission timer only rewound
/// (nothing went into the zero window: no probe), and every expiry counted towards giving
/// up, answered or not: a guest that kept its window shut for a few minutes (a paused
/// reader), or whose window update was lost, was reset. A guest that answers the probes is
/// now probed for as long as it likes, with backoff.
#[test]
fn a_zero_window_is_probed_for_as_long_as_the_guest_answers() {
    let mut now = Instant::now();
    let (mut f, mut sw, rec) = open(4, now);
    assert_eq!(host_writes(&mut f, &mut sw, b"0123456789", now), Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out.iter().map(|(_, d)| d.as_slice()).collect::<Vec<_>>(), [b"0123"]);
    // The guest takes them and shuts its window.
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK, 0), &[], now), Verdict::Keep);
    let mut probes = 0;
    for _ in 0..100 {
        now += RTO_MAX + Duration::from_secs(1);
        assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep, "a guest that answers is not given up");
        for (h, d) in sent(&rec) {
            assert!(!h.has(RST));
            if !d.is_empty() {
                assert_eq!((h.seq, d.as_slice()), (ISN + 5, &b"4"[..]), "a one-byte probe");
                probes += 1;
            }
        }
        // The guest drops the byte (its window is shut) and says so.
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK, 0), &[], now), Verdict::Keep);
    }
    assert_eq!(probes, 100, "one probe per expiry");
    // The window opens: the rest goes, from the last probe's byte, which the guest
    // dropped. (It was not taken for sent: then the rest went without it, and it waited
    // for the retransmission timer.)
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK, 100), &[], now), Verdict::Keep);
    let data: Vec<u8> = sent(&rec).into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"456789");
}

/// Regression: after a zero-window probe, our ACKs carried snd_nxt, one past the guest's
/// shut window: a Linux guest drops such a segment, its ACK too, and answers with a
/// duplicate ACK. A guest that sent while its window was shut (an echo server whose reader
/// waits on its writer) had its data acknowledged to no effect and sent a segment per 50
/// ms or so on its timers. ACKs now carry the window's edge.
#[test]
fn acks_after_a_zero_window_probe_stay_within_the_guests_window() {
    let mut now = Instant::now();
    let (mut f, mut sw, rec) = open(4, now);
    assert_eq!(host_writes(&mut f, &mut sw, b"0123456789", now), Verdict::Keep);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK, 0), &[], now), Verdict::Keep);
    sent(&rec);
    now += RTO_MAX;
    assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
    let probe = sent(&rec);
    assert_eq!(probe.iter().map(|(h, d)| (h.seq, d.len())).collect::<Vec<_>>(), [(ISN + 5, 1)]);
    // The guest drops the byte, says its window is shut, and sends data of its own.
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK, 0), &[], now), Verdict::Keep);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK | PSH, 0), b"hello", now), Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    // (The ACK waits a little for data to ride on.)
    now += ACK_DELAY;
    assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
    let acks = sent(&rec);
    assert_eq!(acks.iter().map(|(h, d)| (h.seq, h.ack, d.len())).collect::<Vec<_>>(), [(ISN + 5, GUEST_ISN + 6, 0)]);
}

/// Regression: a guest that does not scale its window (a Linux listener answering with a
/// SYN cookie) got segments of its full MSS, 64 KiB on a TAP of MTU 65520, and kept its
/// window shut for good after one of them. Segments to it are now at most half the largest
/// window it can offer; a guest that scales gets its MSS.
#[test]
fn a_guest_that_does_not_scale_its_window_gets_segments_of_half_the_largest_window() {
    let now = Instant::now();
    for (scale, largest) in [(None, 32767), (Some(7), 65480)] {
        let (mut sw, rec) = switch(65520, false);
        let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
        syn.mss = Some(65480);
        syn.window_scale = scale;
        let sock = ModelSocket::new(1 << 20, 1 << 20);
        let (mut f, v) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
        assert_eq!(v, Verdict::Keep);
        sent(&rec);
        let ack = seg(GUEST_ISN + 1, ISN + 1, ACK, if scale.is_some() { 1024 } else { 65535 });
        assert_eq!(f.on_segment(&mut sw, &ack, &[], now), Verdict::Keep);
        assert_eq!(host_writes(&mut f, &mut sw, &[5; 65535], now), Verdict::Keep);
        let sizes: Vec<usize> = data_sent(&rec).iter().map(|&(_, n)| n).collect();
        assert_eq!(sizes.iter().max(), Some(&largest), "{sizes:?}");
    }
}

/// Regression: a window that shrank to zero with data in flight (its update lost) was
/// never probed: each expiry rewound, sent nothing, and the flow gave up.
#[test]
fn a_window_shut_with_data_in_flight_is_probed_after_the_rewind() {
    let mut now = Instant::now();
    let (mut f, mut sw, rec) = open(8, now);
    host_writes(&mut f, &mut sw, b"0123456789", now);
    assert_eq!(sent(&rec).iter().map(|(_, d)| d.len()).sum::<usize>(), 8);
    // The guest takes four and shrinks its window to nothing (the rest is in flight).
    f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 5, ACK, 0), &[], now);
    now += Duration::from_secs(1);
    assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!((out[0].0.seq, out[0].1.as_slice()), (ISN + 5, &b"4"[..]), "a probe after the rewind");
}

/// Regression: the window was taken from every segment, measured from snd_una: a late
/// segment with an older ACK (a pure ACK overtaken by a later retransmission of guest
/// data, which carries a newer ACK) or a stale window of the same ACK moved the window's
/// right edge where the guest no longer had it: data went beyond the guest's window, or
/// a window that had opened was taken as shut.
#[test]
fn reordered_segments_do_not_move_the_window_edge() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(1000, now);
    // The guest sent 49 bytes; they were acknowledged.
    f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK | PSH, 1000), &[1; 49], now);
    end_of_round(&mut f, &mut sw, now);
    host_writes(&mut f, &mut sw, &[2; 3000], now);
    assert_eq!(sent(&rec).iter().map(|(_, d)| d.len()).sum::<usize>(), 1000);
    // Sent by the guest in this order: an ACK of half (window 500: right edge unchanged),
    // then, having got everything and with its buffer full, a retransmission of its 49
    // bytes (an old sequence number) acknowledging all (window 0). They arrive reversed.
    let late_ack = seg(GUEST_ISN + 50, ISN + 501, ACK, 500);
    let retransmission = seg(GUEST_ISN + 1, ISN + 1001, ACK | PSH, 0);
    f.on_segment(&mut sw, &retransmission, &[1; 49], now);
    f.on_segment(&mut sw, &late_ack, &[], now);
    end_of_round(&mut f, &mut sw, now);
    let out = sent(&rec);
    assert!(out.iter().all(|(_, d)| d.is_empty()), "nothing beyond the guest's window: {out:?}");
    // The window opens (ACK 1001, window 700); then a stale copy of the zero window.
    f.on_segment(&mut sw, &seg(GUEST_ISN + 50, ISN + 1001, ACK, 700), &[], now);
    assert_eq!(sent(&rec).iter().map(|(_, d)| d.len()).sum::<usize>(), 700);
    f.on_segment(&mut sw, &seg(GUEST_ISN + 50, ISN + 1001, ACK, 0), &[], now);
    f.on_segment(&mut sw, &seg(GUEST_ISN + 50, ISN + 1301, ACK, 600), &[], now);
    // (ACK 1301 with window 600: edge 1901, 200 more than before.)
    assert_eq!(sent(&rec).iter().map(|(_, d)| d.len()).sum::<usize>(), 200, "the stale zero window was ignored");
}

/// Regression: a RST to the guest carried snd_nxt, which after a rewind is back at
/// snd_una, below what the guest has received: a guest that follows RFC 5961 (Linux)
/// drops such a RST, and a half-closed one that only waits for data then waits for ever.
#[test]
fn a_reset_goes_at_the_highest_sequence_number_sent() {
    let mut now = Instant::now();
    let (mut f, mut sw, rec) = open(10000, now);
    host_writes(&mut f, &mut sw, &[3; 2000], now);
    assert_eq!(sent(&rec).iter().map(|(_, d)| d.len()).sum::<usize>(), 2000);
    // The host resets; the flow finds out when the timer rewinds and it peeks again.
    f.sock.fail(libc::ECONNRESET);
    now += Duration::from_secs(1);
    assert_eq!(f.on_timer(&mut sw, now), Verdict::Close);
    let out = sent(&rec);
    assert_eq!(out.len(), 1);
    assert!(out[0].0.has(RST));
    assert_eq!(out[0].0.seq, ISN + 2001, "at snd_max, not at the rewound snd_nxt");
}

/// The guest's RST resets the host side; a host error resets the guest.
#[test]
fn resets_are_mapped_both_ways() {
    let now = Instant::now();
    let (mut f, mut sw, _rec) = open(1000, now);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, RST, 0), &[], now), Verdict::Close);
    assert!(f.sock.linger_zero, "the host's peer sees a reset");

    let (mut f, mut sw, rec) = open(1000, now);
    f.sock.fail(libc::ECONNRESET);
    let (r, w, e) = f.sock.take_edges().unwrap_or_default();
    assert_eq!(f.on_socket(&mut sw, r, w, e, now), Verdict::Close);
    let out = sent(&rec);
    assert!(out.iter().any(|(h, _)| h.has(RST) && h.seq == ISN + 1 && h.ack == GUEST_ISN + 1), "{out:?}");
}

/// RFC 5961 3.2: a guest RST resets the host only at exactly the next sequence number
/// expected; one ahead of it in the window gets a challenge ACK (at the number expected);
/// one behind it, or beyond the window, is ignored. A blind RST must guess exactly.
#[test]
fn a_guest_rst_resets_only_at_the_expected_number() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(1000, now);
    sent(&rec);
    let expected = GUEST_ISN + 1;
    for seq in [expected.wrapping_sub(1), expected.wrapping_add(1 << 30)] {
        assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, RST, 0), &[], now), Verdict::Keep, "seq {seq}");
        assert!(sent(&rec).is_empty(), "no answer to a RST outside the window (seq {seq})");
    }
    assert_eq!(f.on_segment(&mut sw, &seg(expected + 100, ISN + 1, RST, 0), &[], now), Verdict::Keep);
    let out = sent(&rec);
    assert!(
        out.len() == 1 && out[0].0.flags == ACK && out[0].0.ack == expected,
        "a challenge ACK at the number expected: {out:?}"
    );
    assert!(!f.sock.linger_zero, "the host's peer was not reset");
    // The guest answers the challenge with a RST at that number: the flow resets.
    assert_eq!(f.on_segment(&mut sw, &seg(expected, ISN + 1, RST, 0), &[], now), Verdict::Close);
    assert!(f.sock.linger_zero);
}

/// The same calls, through the trait, on the model and on a kernel socket (one end of a
/// socketpair) give the same answers: the simulation's socket behaves as the real one.
#[test]
fn the_model_socket_behaves_as_a_kernel_socket() {
    let (ours, mut peer) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    peer.set_nonblocking(true).unwrap();
    let mut kernel = KernelSocket::new(OwnedFd::from(ours), false);
    let mut model = ModelSocket::new(1 << 20, 1 << 20);

    let data: Vec<u8> = (0..100u8).collect();
    peer.write_all(&data).unwrap();
    model.peer_write(&data);

    fn peek(s: &mut impl HostSocket) -> String {
        let mut b = [0u8; 10];
        match s.peek(&mut b) {
            Ok(n) => format!("peek {n} from {}", b[0]),
            Err(e) => format!("peek {:?}", e.kind()),
        }
    }
    fn script(s: &mut impl HostSocket) -> Vec<String> {
        let mut log = Vec::new();
        s.set_peek_offset(0).unwrap();
        log.push(peek(s));
        log.push(peek(s));
        log.push(format!("discard {:?}", s.discard(5).ok()));
        log.push(peek(s));
        s.set_peek_offset(0).unwrap();
        log.push(peek(s));
        log.push(format!("discard {:?}", s.discard(95).ok()));
        log.push(peek(s));
        log.push(format!("send {:?}", s.send(b"abc").ok()));
        log.push(format!("error {}", s.take_error()));
        log
    }
    let k = script(&mut kernel);
    let m = script(&mut model);
    assert_eq!(k, m);
    assert_eq!(k[0], "peek 10 from 0");
    assert_eq!(k[2], "discard Some(5)");
    assert_eq!(k[3], "peek 10 from 20", "a discard moves the peek offset back");
    assert_eq!(k[4], "peek 10 from 5", "offset 0: the front");
    assert_eq!(k[6], "peek WouldBlock");

    // End of stream after the peer's shutdown; half-close the other way.
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    model.peer_shutdown();
    let mut b = [0u8; 4];
    assert_eq!(kernel.peek(&mut b).ok(), Some(0));
    assert_eq!(model.peek(&mut b).ok(), Some(0));
    kernel.shutdown_write();
    model.shutdown_write();
    let mut rest = Vec::new();
    peer.set_nonblocking(false).unwrap();
    peer.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, b"abc");
    let mut got = Vec::new();
    model.peer_read(100, &mut got);
    assert_eq!((got.as_slice(), model.tx_shut), (&b"abc"[..], true));
}

/// A host peer that never reads: once its socket is full, the window stops growing (its
/// right edge stays put) and everything the guest sends within it is held, none dropped (a
/// guest without SACK recovers a dropped window one segment per round trip, then by its
/// backed-off retransmission timer: a 20 MiB upload took minutes); about `ROOM_MARGIN` per
/// flow, since the window was the room in the socket and that margin. The window reopens as soon as the socket drains; with the socket still full after
/// `--tcp-stall-timeout`, the connection is reset.
#[test]
fn a_host_peer_that_never_reads_costs_at_most_the_margin() {
    let mut now = Instant::now();
    let (mut sw, rec) = switch(1500, false);
    let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
    syn.mss = Some(1460);
    syn.window_scale = Some(7);
    let sock = ModelSocket::new(1 << 20, 1 << 20);
    let (mut f, v) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
    assert_eq!(v, Verdict::Keep);
    let synack = sent(&rec);
    let scale = synack[0].0.window_scale.expect("window scaling agreed");
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK, 65535), &[], now), Verdict::Keep);
    let edge_of = |h: &TcpHeader| h.ack.wrapping_add((h.window as u32) << scale);
    // The window of a SYN is never scaled.
    let mut edge = synack[0].0.ack.wrapping_add(synack[0].0.window as u32);
    let mut next = GUEST_ISN + 1;
    let chunk = vec![9u8; 60_000];
    // The guest sends all that its window lets it: the socket fills after 1 MiB.
    for _ in 0..200 {
        let len = (edge.wrapping_sub(next) as usize).min(chunk.len());
        if len == 0 {
            break;
        }
        f.on_segment(&mut sw, &seg(next, ISN + 1, ACK, 65535), &chunk[..len], now);
        assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
        next = next.wrapping_add(len as u32);
        assert_eq!(f.rcv_nxt.wrapping_add(f.pending_len() as u32), next, "every byte within the window is taken");
        for (h, _) in sent(&rec) {
            let e = edge_of(&h);
            assert!(!usernet_wire::tcp::seq_lt(e, edge), "the window's edge moved left: {e} < {edge}");
            edge = e;
        }
    }
    assert_eq!(next, edge, "the guest filled the window");
    assert!(f.stalled_since.is_some());
    // The window was the room in the socket and the margin: once the socket is full,
    // usernet holds about the margin (not the 4 MiB of the largest window); a little more
    // as the edge, never moved left, is rounded up to the window's scale at each ACK.
    let bound = super::ROOM_MARGIN + (16 << 10);
    assert!(f.pending_len() > 0 && f.pending_len() <= bound, "held {}", f.pending_len());
    assert!(sw.budget.used() <= 2 * super::ROOM_MARGIN, "budget {}", sw.budget.used());
    // A retransmission of held data changes nothing; the window stays where it was.
    f.on_segment(&mut sw, &seg(f.rcv_nxt, ISN + 1, ACK, 65535), &chunk, now);
    end_of_round(&mut f, &mut sw, now);
    assert!(sent(&rec).iter().all(|(h, _)| edge_of(h) == edge), "a full socket stops the window");
    // The peer reads: the held bytes go (each time the socket drains, at once, not at the
    // guest's next retransmission) and the window opens again.
    let mut got = Vec::new();
    for _ in 0..10 {
        f.sock.peer_read(1 << 30, &mut got);
        let (r, w, e) = f.sock.take_edges().unwrap_or_default();
        assert_eq!(f.on_socket(&mut sw, r, w, e, now), Verdict::Keep);
        let update = sent(&rec);
        assert!(update.last().is_some_and(|(h, _)| h.ack == f.rcv_nxt), "{update:?}");
        if f.pending_len() == 0 {
            assert!(update.last().is_some_and(|(h, _)| usernet_wire::tcp::seq_lt(edge, edge_of(h))), "{update:?}");
            break;
        }
    }
    f.sock.peer_read(1 << 30, &mut got);
    assert_eq!((f.pending_len(), got.len()), (0, next.wrapping_sub(GUEST_ISN + 1) as usize));
    assert!(f.stalled_since.is_none());

    // Full again, and then nothing for the stall timeout: reset.
    sw.budget.set(sw.budget.max(), Duration::from_secs(60));
    for _ in 0..40 {
        let seq = f.rcv_nxt.wrapping_add(f.pending_len() as u32);
        f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &chunk, now);
        end_of_round(&mut f, &mut sw, now);
    }
    let since = f.stalled_since.expect("stalled");
    assert_eq!(f.deadline(), Some(since + Duration::from_secs(60)).min(f.deadline()));
    now = since + Duration::from_secs(61);
    assert_eq!(f.on_timer(&mut sw, now), Verdict::Close);
    assert!(sent(&rec).iter().any(|(h, _)| h.has(RST)));
    let stalled = sw.counters.limits().find(|(l, _)| *l == crate::engine::metrics::Limit::TcpStalled);
    assert_eq!(stalled.map(|(_, n)| n), Some(1));
    drop(f);
    assert_eq!(sw.budget.used(), 0, "a flow gives back what it held");
}

/// A stall timeout too long to add to a time (no flag allows one) is no deadline: a
/// stalled flow is never reset for it, and nothing panics.
#[test]
fn an_endless_stall_timeout_is_no_deadline() {
    let now = Instant::now();
    let (mut sw, rec) = switch(1500, false);
    sw.budget.set(sw.budget.max(), Duration::MAX);
    let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
    syn.mss = Some(1460);
    let sock = ModelSocket::new(1 << 16, 1 << 16);
    let (mut f, _) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK, 65535), &[], now), Verdict::Keep);
    let chunk = vec![9u8; 1460];
    for _ in 0..200 {
        let seq = f.rcv_nxt.wrapping_add(f.pending_len() as u32);
        f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &chunk, now);
        end_of_round(&mut f, &mut sw, now);
    }
    assert!(f.stalled_since.is_some(), "the socket filled");
    assert!(f.deadline().is_none_or(|d| d < now + Duration::from_secs(3600)));
    assert_eq!(f.on_timer(&mut sw, now + Duration::from_secs(365 * 24 * 3600)), Verdict::Keep);
    assert!(!sent(&rec).iter().any(|(h, _)| h.has(RST)));
}

/// A bulk upload fills its socket again and again: `pending` keeps its buffer from one
/// fill to the next (no new allocation grown by doubling each time), and gives it back to
/// the shared budget once it stayed empty for `RELEASE_AFTER`.
#[test]
fn pending_keeps_its_buffer_between_fills_and_releases_it_when_idle() {
    let mut now = Instant::now();
    let (mut sw, rec) = switch(65520, false);
    let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
    syn.mss = Some(65480);
    syn.window_scale = Some(7);
    let sock = ModelSocket::new(1 << 20, 64 << 10);
    let (mut f, _) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK, 65535), &[], now), Verdict::Keep);
    let chunk = vec![7u8; 60_000];
    let mut got = Vec::new();
    let mut capacity = None;
    for fill in 0..3 {
        if fill == 2 {
            // The budget has no room left but the buffer this flow keeps: that is its own.
            let stall = sw.budget.stall_timeout().unwrap_or_default();
            sw.budget.set(sw.budget.used(), stall);
        }
        // Five segments: the socket takes 64 KiB, what the window allows of the rest
        // waits in `pending` (the guest would send the others again).
        for _ in 0..5 {
            let seq = f.rcv_nxt.wrapping_add(f.pending_len() as u32);
            assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &chunk, now), Verdict::Keep);
            assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
        }
        assert!(f.pending_len() > super::KEEP_IDLE, "fill {fill}: held {}", f.pending_len());
        if fill == 2 {
            // The peer reads a little: part of `pending` is written, its front is free.
            f.sock.peer_read(16 << 10, &mut got);
            let (r, w, e) = f.sock.take_edges().unwrap_or_default();
            assert_eq!(f.on_socket(&mut sw, r, w, e, now), Verdict::Keep);
            assert!(f.pending_head > 0, "nothing of pending was written");
            // A buffer with no spare room at its end (Vec's growth leaves some), charged as
            // such, and still no room in the budget.
            f.pending.shrink_to_fit();
            assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
            let stall = sw.budget.stall_timeout().unwrap_or_default();
            sw.budget.set(sw.budget.used(), stall);
            // The window offered reaches past what the buffer holds (as after the socket's
            // room grew): only the budget limits what the flow takes.
            f.rcv_edge = f.rcv_edge.wrapping_add(64 << 10);
            // More comes: it goes over the written front; the buffer does not grow past the
            // budget.
            let seq = f.rcv_nxt.wrapping_add(f.pending_len() as u32);
            assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &chunk, now), Verdict::Keep);
            assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
            assert!(sw.budget.used() <= sw.budget.max(), "{} held of {}", sw.budget.used(), sw.budget.max());
        }
        // The peer reads everything; the socket drains `pending`.
        while f.pending_len() > 0 {
            f.sock.peer_read(1 << 30, &mut got);
            let (r, w, e) = f.sock.take_edges().unwrap_or_default();
            assert_eq!(f.on_socket(&mut sw, r, w, e, now), Verdict::Keep);
        }
        f.sock.peer_read(1 << 30, &mut got);
        assert_eq!(got.len(), f.rcv_nxt.wrapping_sub(GUEST_ISN + 1) as usize, "every byte taken reached the peer");
        // Empty, but its buffer is kept, counted against the budget, with a deadline.
        let cap = f.pending.capacity();
        assert!(cap > super::KEEP_IDLE, "fill {fill}: capacity {cap}");
        assert_eq!(sw.budget.used(), cap);
        if fill < 2 {
            assert_eq!(*capacity.get_or_insert(cap), cap, "fill {fill}: the buffer was allocated anew");
        } else {
            assert!(capacity.is_some_and(|c| cap <= c), "fill {fill}: the buffer grew to {cap}");
        }
        assert_eq!(f.release_deadline, Some(now + super::RELEASE_AFTER));
        assert!(f.deadline().is_some_and(|d| d <= now + super::RELEASE_AFTER));
        now += super::RELEASE_AFTER / 2;
        // A timer before the deadline keeps it.
        assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
        assert_eq!(f.pending.capacity(), cap);
    }
    // Idle: the deadline gives the buffer back.
    now += super::RELEASE_AFTER;
    assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
    assert_eq!((f.pending.capacity(), sw.budget.used(), f.release_deadline), (0, 0, None));
    assert!(got.iter().all(|&b| b == 7));
    drop(rec);
}

/// Over the shared budget, small segments are not gathered: they go straight into the
/// socket, so a well-behaved flow keeps going while others hold the budget.
#[test]
fn over_the_budget_small_segments_go_straight_to_the_socket() {
    let now = Instant::now();
    let (mut f, mut sw, _rec) = open(65535, now);
    sw.budget.set(100, Duration::ZERO);
    f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK | PSH, 65535), &[1; 1000], now);
    assert_eq!(f.pending_len(), 0);
    let mut got = Vec::new();
    assert_eq!(f.sock.peer_read(4096, &mut got), 1000);
    assert_eq!(sw.budget.used(), 0);
}

/// The window offered follows the room in the host socket's send buffer (as passt's does):
/// a small send buffer gets a window of its room and the margin, a large one the largest
/// window; the room is measured once per `MEASURE_EVERY` bytes written, not per segment.
#[test]
fn the_window_follows_the_room_in_the_socket() {
    for (send_buffer, widest) in [(64 << 10, (64 << 10) + super::ROOM_MARGIN), (16 << 20, super::RECV_BUF)] {
        let now = Instant::now();
        let (mut sw, rec) = switch(1500, false);
        let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
        syn.mss = Some(1460);
        syn.window_scale = Some(7);
        let sock = ModelSocket::new(1 << 20, send_buffer);
        let (mut f, _) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
        let synack = sent(&rec);
        let scale = synack[0].0.window_scale.expect("window scaling agreed");
        f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK, 65535), &[], now);
        let mut edge = synack[0].0.ack.wrapping_add(synack[0].0.window as u32);
        let mut next = GUEST_ISN + 1;
        let mut widest_seen = 0;
        let chunk = vec![7u8; 60_000];
        let mut got = Vec::new();
        // The guest sends all its window lets it; the peer reads everything after each round.
        for _ in 0..400 {
            let len = (edge.wrapping_sub(next) as usize).min(chunk.len());
            if len > 0 {
                f.on_segment(&mut sw, &seg(next, ISN + 1, ACK, 65535), &chunk[..len], now);
                next = next.wrapping_add(len as u32);
            }
            end_of_round(&mut f, &mut sw, now);
            f.sock.peer_read(1 << 30, &mut got);
            if let Some((r, w, e)) = f.sock.take_edges() {
                f.on_socket(&mut sw, r, w, e, now);
            }
            for (h, _) in sent(&rec) {
                let window = (h.window as usize) << scale;
                widest_seen = widest_seen.max(window);
                edge = edge.max(h.ack.wrapping_add(window as u32));
            }
        }
        let total = next.wrapping_sub(GUEST_ISN + 1) as usize;
        f.sock.peer_read(1 << 30, &mut got);
        assert_eq!(got.len() + f.pending_len(), total, "every byte arrives once");
        assert!(widest_seen <= widest, "send buffer {send_buffer}: window {widest_seen} > {widest}");
        // Measured just after a write, the room is what the peer has not read yet less.
        assert!(widest_seen > widest - chunk.len() - (2 << scale), "send buffer {send_buffer}: widest {widest_seen}");
        let measures = f.sock.calls[3] as usize;
        assert!(measures <= total / super::MEASURE_EVERY + 2, "{measures} measures for {total} bytes");
    }
}

/// An inbound flow over IPv6 whose guest resets the SYN (it listens on IPv4 only) sends
/// the same SYN again over IPv4, to the fallback addresses, and goes on from there; a RST
/// that does not answer our SYN changes nothing; without a fallback a RST ends the flow.
#[test]
fn an_inbound_flow_falls_back_to_ipv4_when_the_guest_resets_its_ipv6_syn() {
    let now = Instant::now();
    let (mut sw, rec) = switch(1500, false);
    let guest6: std::net::SocketAddr = "[fd75:7365:726e::2]:80".parse().unwrap();
    let client6: std::net::SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    let sock = ModelSocket::new(1 << 20, 1 << 20);
    let mut f = TcpFlow::inbound(&mut sw, guest6, client6, sock, ISN, now);
    f.fallback = Some(Box::new((guest(), remote())));
    // The IPv6 SYN waits for the guest's MAC (a neighbour solicitation went out instead).
    let first: Vec<Vec<u8>> = std::mem::take(&mut *rec.frames.borrow_mut());
    assert!(first.iter().all(|f| f[12..14] == [0x86, 0xdd]), "IPv6 only");
    let rst = |ack| TcpHeader { src_port: 80, dst_port: 50000, seq: 0, ack, flags: RST | ACK, ..Default::default() };
    // A RST for another sequence number: ignored, no fallback yet.
    assert_eq!(f.on_segment(&mut sw, &rst(ISN + 7), &[], now), Verdict::Keep);
    assert_eq!(f.guest, guest6);
    // The guest's answer to our SYN: the same SYN, over IPv4.
    assert_eq!(f.on_segment(&mut sw, &rst(ISN + 1), &[], now), Verdict::Keep);
    assert_eq!((f.guest, f.remote, f.fallback.as_deref().copied()), (guest(), remote(), None));
    let syn = sent(&rec);
    assert_eq!(syn.len(), 1);
    assert!(syn[0].0.has(SYN) && !syn[0].0.has(ACK) && syn[0].0.seq == ISN);
    // The guest answers over IPv4: established.
    let mut synack = seg(GUEST_ISN, ISN + 1, SYN | ACK, 65535);
    (synack.src_port, synack.dst_port) = (guest().port(), remote().port());
    assert_eq!(f.on_segment(&mut sw, &synack, &[], now), Verdict::Keep);
    assert!(sent(&rec).iter().any(|(h, _)| h.has(ACK) && h.ack == GUEST_ISN + 1));
    // No fallback left: a RST now ends it as for any flow.
    let mut f2 = TcpFlow::inbound(&mut sw, guest(), remote(), ModelSocket::new(1 << 20, 1 << 20), ISN, now);
    let _ = sent(&rec);
    assert_eq!(f2.on_segment(&mut sw, &rst(ISN + 1), &[], now), Verdict::Close);
}

/// A flow counts against the guest it was added for until it goes, whatever its addresses
/// become: one that fell back from IPv6 to IPv4 used to leave its IPv6 address counted for
/// good (counted by address when added, uncounted by its new one when removed), so that
/// enough of them closed that guest's new IPv6 connections (`--max-tcp-flows-per-guest`).
#[test]
fn a_flow_that_falls_back_leaves_its_guest_count_when_it_goes() {
    use crate::engine::flows::{Flow, FlowTable, GuestKey};
    let now = Instant::now();
    let (mut sw, _rec) = switch(1500, false);
    let guest6: std::net::SocketAddr = "[fd75:7365:726e::2]:80".parse().unwrap();
    let client6: std::net::SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    let (ours, _theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let mut f = TcpFlow::inbound(&mut sw, guest6, client6, KernelSocket::new(OwnedFd::from(ours), false), ISN, now);
    f.fallback = Some(Box::new((guest(), remote())));
    let mut table = FlowTable::default();
    let key = GuestKey::Mac([2, 0, 0, 0, 0, 2]);
    let id = table.insert(Flow::Tcp(f), Some(key));
    assert_eq!(table.tcp_of_guest(key), 1);
    // The guest resets the IPv6 SYN: the flow goes on over IPv4, re-indexed as the engine
    // re-indexes it.
    let old = table.get_mut(id).unwrap().key();
    let Some(Flow::Tcp(f)) = table.get_mut(id) else { unreachable!() };
    let rst = TcpHeader { src_port: 80, dst_port: 50000, seq: 0, ack: ISN + 1, flags: RST | ACK, ..Default::default() };
    assert_eq!(f.on_segment(&mut sw, &rst, &[], now), Verdict::Keep);
    assert_eq!(f.guest, guest());
    table.rekey(id, &old);
    assert_eq!(table.tcp_of_guest(key), 1);
    table.remove(id);
    assert_eq!(table.tcp_of_guest(key), 0);
}

/// An inbound flow over IPv6 whose SYN goes unanswered (the guest no longer has that
/// address) tries IPv4 after a few retransmissions, not after the minutes a SYN may wait.
#[test]
fn an_inbound_flow_falls_back_to_ipv4_when_its_ipv6_syn_goes_unanswered() {
    let start = Instant::now();
    let (mut sw, rec) = switch(1500, false);
    let guest6: std::net::SocketAddr = "[fd75:7365:726e::2]:80".parse().unwrap();
    let client6: std::net::SocketAddr = "[2001:db8::7]:50000".parse().unwrap();
    let mut f = TcpFlow::inbound(&mut sw, guest6, client6, ModelSocket::new(1 << 20, 1 << 20), ISN, start);
    f.fallback = Some(Box::new((guest(), remote())));
    let _ = std::mem::take(&mut *rec.frames.borrow_mut());
    let mut now = start;
    for _ in 0..super::FALLBACK_AFTER_RETRIES {
        assert_eq!(f.guest, guest6, "still over IPv6");
        now = f.deadline().expect("a retransmission timer");
        assert_eq!(f.on_timer(&mut sw, now), Verdict::Keep);
    }
    assert_eq!((f.guest, f.remote, f.fallback.as_deref().copied()), (guest(), remote(), None));
    assert!(now.duration_since(start) < std::time::Duration::from_secs(3), "{:?}", now.duration_since(start));
    let syn = sent(&rec);
    assert!(syn.last().is_some_and(|(h, _)| h.has(SYN) && !h.has(ACK) && h.seq == ISN), "a SYN over IPv4");
}

/// Host data that fits the guest's window is peeked once: a short peek means the socket
/// is drained (the next bytes come with an edge of their own), so no peek is made only to
/// hear EAGAIN. End of stream after data is still seen: with its RDHUP, a short peek found
/// everything in front of the FIN, and the guest gets the FIN on the last data segment,
/// with no peek that could only return 0.
#[test]
fn a_short_peek_waits_for_the_next_edge_and_end_of_stream_is_still_seen() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    let _ = sent(&rec);
    let peeks = |f: &TcpFlow<ModelSocket>| f.sock.calls[0];
    let before = peeks(&f);
    assert_eq!(host_writes(&mut f, &mut sw, b"hello", now), Verdict::Keep);
    assert_eq!(peeks(&f) - before, 1, "one peek for 5 bytes");
    let data: Vec<u8> = sent(&rec).into_iter().flat_map(|(_, d)| d).collect();
    assert_eq!(data, b"hello");
    // More data and the peer's shutdown, told as epoll tells them (EPOLLIN|EPOLLRDHUP).
    assert_eq!(f.sock.peer_write(b" world"), 6);
    f.sock.peer_shutdown();
    assert!(f.sock.take_read_closed());
    f.host_read_closed();
    let (r, w, e) = f.sock.take_edges().unwrap_or_default();
    let before = peeks(&f);
    assert_eq!(f.on_socket(&mut sw, r, w, e, now), Verdict::Keep);
    assert_eq!(peeks(&f) - before, 1, "one peek for the data and the end of stream");
    let out = sent(&rec);
    let data: Vec<u8> = out.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(data, b" world");
    assert_eq!(out.len(), 1, "the FIN rides on the data: {out:?}");
    assert!(out[0].0.has(FIN), "the FIN rides on the data: {out:?}");
    assert_eq!(out[0].0.seq, ISN + 1 + 5, "{out:?}");
}

/// A slow sender's full-sized segments without PSH (a VM under TCG sends one every ~170 µs,
/// one per engine round) are held until the segment with PSH that ends the guest's write:
/// one send(2) and one ACK for the write, not one of each per segment; nothing is
/// acknowledged before it is written.
#[test]
fn full_segments_without_psh_wait_for_the_end_of_the_write() {
    let mut now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    sent(&rec);
    let sends = f.sock.calls[1];
    let data: Vec<u8> = (0..1460 * 3).map(|i| (i % 251) as u8).collect();
    for (i, chunk) in data.chunks(1460).enumerate() {
        let last = i == 2;
        let flags = if last { ACK | PSH } else { ACK };
        let seq = GUEST_ISN + 1 + (i * 1460) as u32;
        assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, flags, 65535), chunk, now), Verdict::Keep);
        assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
        let acks = sent(&rec);
        if !last {
            assert_eq!(f.sock.calls[1], sends, "segment {i} written before the end of the write");
            assert!(acks.is_empty(), "segment {i}: nothing new to acknowledge, yet {acks:?}");
            assert!(f.deadline().is_some_and(|d| d <= now + Duration::from_millis(1)), "the hold is bounded");
        } else {
            assert_eq!(f.sock.calls[1], sends + 1, "one send for the whole write");
            assert_eq!(acks.len(), 1, "{acks:?}");
            assert_eq!(acks[0].0.ack, GUEST_ISN + 1 + data.len() as u32);
        }
        now += Duration::from_micros(170);
    }
    let mut got = Vec::new();
    f.sock.peer_read(1 << 20, &mut got);
    assert_eq!(got, data);
}

/// When the rest of the write does not come, what was held goes at the hold's deadline,
/// acknowledged at once; a segment shorter than a full one, or one with FIN, is not held.
#[test]
fn held_data_goes_at_the_deadline_and_short_segments_are_not_held() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    sent(&rec);
    let full = [5u8; 1460];
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK, 65535), &full, now), Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 0);
    let deadline = f.deadline().expect("a hold deadline");
    assert_eq!(f.on_timer(&mut sw, deadline), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 1460);
    let acks = sent(&rec);
    assert_eq!(acks.iter().map(|(h, _)| h.ack).collect::<Vec<_>>(), [GUEST_ISN + 1461]);

    // Not full-sized, no PSH: written at the end of its round.
    let seq = GUEST_ISN + 1461;
    assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &[6; 1000], deadline), Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, deadline), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 2460);

    // A full one with FIN: the flow's data ends there.
    let seq = seq + 1000;
    let v = f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK | FIN, 65535), &full, deadline);
    assert_eq!(v, Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, deadline), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 3920);
}

/// Review of the hold: a request (PSH) followed in the same round by the first segment of
/// the next write is not held; a round whose held data the timer wrote holds nothing
/// empty (a debug invariant: a hold deadline only with data).
#[test]
fn a_write_ending_in_psh_is_never_held_and_no_hold_is_empty() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    sent(&rec);
    let full = [3u8; 1460];
    let mut seq = GUEST_ISN + 1;
    assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK | PSH, 65535), b"request", now), Verdict::Keep);
    seq += 7;
    assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &full, now), Verdict::Keep);
    seq += 1460;
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 7 + 1460, "the request is written at the end of its round");

    // A hold, then a round past its deadline that brings more of the write: the timer
    // writes both, and the end of the round holds nothing.
    assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &full, now), Verdict::Keep);
    seq += 1460;
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 7 + 1460, "held");
    let later = now + Duration::from_millis(2);
    assert_eq!(f.on_segment(&mut sw, &seg(seq, ISN + 1, ACK, 65535), &full, later), Verdict::Keep);
    assert_eq!(f.on_timer(&mut sw, later), Verdict::Keep);
    assert_eq!(f.sock.peer_unread(), 7 + 3 * 1460);
    // The engine ends the round for every flow that owed an ACK when its event came, even
    // if the timer has paid it since.
    assert_eq!(f.write_gathered(&mut sw, later), Verdict::Keep);
    f.flush_ack(&mut sw, later);
    let acks = sent(&rec);
    assert_eq!(acks.last().map(|(h, _)| h.ack), Some(seq + 1460), "{acks:?}");
}

/// A host peer that answers and closes first (a server): the guest's FIN, which comes
/// after it acknowledged our FIN, ends the flow, and the close of the socket passes it on
/// (no shutdown(2)); nothing of the peer's is left unread, so the kernel sends a FIN, not a
/// reset (`a_close_after_everything_was_read_ends_the_stream` checks that on a kernel
/// socket). A guest that closes first still gets its FIN passed on at once.
#[test]
fn the_guests_fin_after_the_hosts_passes_on_by_the_close() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    let _ = sent(&rec);
    // The request; then the answer and the server's close.
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK | PSH, 65535), b"GET", now), Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    assert_eq!(f.sock.peer_write(b"answer"), 6);
    assert_eq!(host_closes(&mut f, &mut sw, now), Verdict::Keep);
    let out = sent(&rec);
    assert!(out.last().is_some_and(|(h, d)| h.has(FIN) && d == b"answer"), "{out:?}");
    // The guest acknowledges the answer and the FIN, then sends its own.
    let acked = ISN + 1 + 6 + 1;
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 4, acked, ACK, 65535), &[], now), Verdict::Keep);
    assert_eq!(f.sock.unread_by_flow(), 0, "the acknowledged answer was discarded");
    let v = f.on_segment(&mut sw, &seg(GUEST_ISN + 4, acked, ACK | FIN, 65535), &[], now);
    assert_eq!(v, Verdict::Close, "both FINs are through: the flow ends");
    assert!(!f.sock.tx_shut, "the close passes the guest's FIN on: no shutdown(2)");
    assert!(sent(&rec).iter().any(|(h, _)| h.ack == GUEST_ISN + 5), "the guest's FIN is acknowledged");

    // The guest closes first: its FIN goes to the host at once (the host may answer after
    // reading its end of stream).
    let (mut f, mut sw, rec) = open(65535, now);
    let _ = sent(&rec);
    let v = f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK | PSH | FIN, 65535), b"GET", now);
    assert_eq!(v, Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, now), Verdict::Keep);
    assert!(f.sock.tx_shut, "the guest's FIN is passed on while the host's data may follow");
}

/// What `the_guests_fin_after_the_hosts_passes_on_by_the_close` relies on, on a kernel TCP
/// socket: once the peer's bytes were all discarded (MSG_TRUNC) and its FIN came, close(2)
/// without shutdown(2) ends the peer's stream cleanly after the bytes written to it; the
/// peer reads them and end of stream, not ECONNRESET.
#[test]
fn a_close_after_everything_was_read_ends_the_stream() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (mut peer, _) = listener.accept().unwrap();
    peer.write_all(b"answer").unwrap();
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let mut sock = KernelSocket::new(OwnedFd::from(ours), true);
    // The bytes, then the FIN (over loopback both are in before the peer's calls return,
    // unless the machine defers their delivery: waited for, up to a bound).
    let mut buf = [0u8; 16];
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut peek = |sock: &mut KernelSocket| loop {
        match sock.peek(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1))
            }
            other => return other.unwrap(),
        }
    };
    assert_eq!(peek(&mut sock), 6);
    assert_eq!(peek(&mut sock), 0, "end of stream after the bytes");
    assert_eq!(sock.discard(6).unwrap(), 6);
    sock.send(b"request").unwrap();
    drop(sock);
    let mut got = Vec::new();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer.read_to_end(&mut got).expect("end of stream, not a reset");
    assert_eq!(got, b"request");
}

/// Guest segments that come after a gap are kept: the one that fills the gap lets them all
/// through, in order, with one ACK for everything, so the guest need not send them again
/// (before, they were dropped, and a guest without SACK resent them one round trip at a
/// time, or by its retransmission timer). A segment beyond the window offered, and a FIN
/// after a gap, are handled as the in-order ones would be.
#[test]
fn segments_after_a_gap_are_kept_until_it_is_filled() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 + i / 255) as u8).collect();
    let at = |off: usize| GUEST_ISN + 1 + off as u32;
    // Segments 2, 4 and 3 of four (1000 bytes each), and 3 again: gaps, each answered by a
    // duplicate ACK of the first byte.
    for off in [1000, 3000, 2000, 2000] {
        let v = f.on_segment(&mut sw, &seg(at(off), ISN + 1, ACK, 65535), &data[off..off + 1000], now);
        assert_eq!(v, Verdict::Keep);
        let acks = sent(&rec);
        assert_eq!(acks.len(), 1, "a duplicate ACK at once");
        assert_eq!(acks[0].0.ack, at(0));
    }
    let mut got = Vec::new();
    assert_eq!(f.sock.peer_read(10_000, &mut got), 0, "nothing passed on across the gap");
    // The first segment fills the gap: all four go to the socket, in order.
    let v = f.on_segment(&mut sw, &seg(at(0), ISN + 1, ACK | PSH, 65535), &data[..1000], now);
    assert_eq!(v, Verdict::Keep);
    end_of_round(&mut f, &mut sw, now);
    f.sock.peer_read(10_000, &mut got);
    assert_eq!(got, data, "the bytes, once each, in order");
    let acks = sent(&rec);
    assert_eq!(acks.last().map(|(h, _)| h.ack), Some(at(4000)), "one ACK for all of it");
    assert_eq!(f.out_of_order_cost, 0);
    // A FIN after a gap is kept too, and passed on after the data before it.
    f.on_segment(&mut sw, &seg(at(4500), ISN + 1, ACK | FIN, 65535), &data[..10], now);
    assert_eq!(f.to_host, ToHost::Open, "the FIN waits behind the gap");
    f.on_segment(&mut sw, &seg(at(4000), ISN + 1, ACK, 65535), &data[..500], now);
    end_of_round(&mut f, &mut sw, now);
    got.clear();
    f.sock.peer_read(10_000, &mut got);
    assert_eq!(got.len(), 510);
    assert_ne!(f.to_host, ToHost::Open, "the FIN passed on");
    assert!(f.out_of_order.is_empty());
}

/// Beyond the window offered, or beyond the shared budget, a segment after a gap is not
/// kept (the guest sends it again).
#[test]
fn segments_after_a_gap_are_kept_only_within_the_window_and_the_budget() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    let edge = f.rcv_edge.wrapping_sub(GUEST_ISN + 1) as usize;
    let at = |off: usize| GUEST_ISN + 1 + off as u32;
    f.on_segment(&mut sw, &seg(at(edge - 100), ISN + 1, ACK, 65535), &[1; 200], now);
    assert!(f.out_of_order.is_empty(), "past the window's edge");
    f.on_segment(&mut sw, &seg(at(edge - 200), ISN + 1, ACK, 65535), &[1; 200], now);
    assert_eq!(f.out_of_order.len(), 1, "within it");
    sent(&rec);
    let budget = f.held.budget().clone();
    budget.set(0, std::time::Duration::ZERO);
    f.on_segment(&mut sw, &seg(at(1000), ISN + 1, ACK, 65535), &[1; 100], now);
    assert_eq!(f.out_of_order.len(), 1, "no room in the budget");
    // One-byte segments cost their entries too: a budget of ten such is ten kept, not more.
    budget.set(budget.used() + 10 * (1 + super::OUT_OF_ORDER_ENTRY_COST), std::time::Duration::ZERO);
    for i in 0..20 {
        f.on_segment(&mut sw, &seg(at(2000 + 2 * i), ISN + 1, ACK, 65535), &[1], now);
    }
    assert_eq!(f.out_of_order.len(), 11, "the first and ten one-byte segments");
}

/// With SACK (both ends offered it), each duplicate ACK for a gap lists the segments kept
/// after it: the block that holds the segment just come first, then the lowest others, at
/// most four, adjacent segments joined; once the gaps are filled, no block. Without SACK
/// offered, no block ever.
#[test]
fn acks_after_a_gap_list_the_kept_segments_when_the_guest_takes_sack() {
    let now = Instant::now();
    let at = |off: u32| GUEST_ISN + 1 + off;
    let data = [7u8; 1000];
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    let mut blocks_after = |f: &mut TcpFlow<ModelSocket>, off: u32| {
        f.on_segment(&mut sw, &seg(at(off), ISN + 1, ACK, 65535), &data, now);
        let acks = sent(&rec);
        assert_eq!(acks.len(), 1, "a duplicate ACK at once");
        assert_eq!(acks[0].0.ack, at(0));
        acks[0].0.sack.as_slice().to_vec()
    };
    assert_eq!(blocks_after(&mut f, 1000), [(at(1000), at(2000))]);
    assert_eq!(blocks_after(&mut f, 3000), [(at(3000), at(4000)), (at(1000), at(2000))]);
    // Adjacent to the first: the two are one block, which goes first.
    assert_eq!(blocks_after(&mut f, 2000), [(at(1000), at(4000))]);
    for off in [5000, 7000, 9000, 11000] {
        blocks_after(&mut f, off);
    }
    assert_eq!(
        blocks_after(&mut f, 13000),
        [(at(13000), at(14000)), (at(1000), at(4000)), (at(5000), at(6000)), (at(7000), at(8000))],
        "the latest first, then the lowest three of six"
    );
    // A retransmission of a kept segment: its block goes first.
    assert_eq!(blocks_after(&mut f, 9000)[0], (at(9000), at(10000)));
    // The first gap filled: the ACK moves past the blocks it joined, the others remain (the
    // one with the segment that came last after a gap still first).
    f.on_segment(&mut sw, &seg(at(0), ISN + 1, ACK, 65535), &data, now);
    end_of_round(&mut f, &mut sw, now);
    let acks = sent(&rec);
    let last = &acks.last().unwrap().0;
    assert_eq!(last.ack, at(4000));
    assert_eq!(
        last.sack.as_slice(),
        [(at(9000), at(10000)), (at(5000), at(6000)), (at(7000), at(8000)), (at(11000), at(12000))]
    );
    // All filled: no block.
    for off in [4000, 6000, 8000, 10000, 12000] {
        f.on_segment(&mut sw, &seg(at(off), ISN + 1, ACK, 65535), &data, now);
    }
    end_of_round(&mut f, &mut sw, now);
    let acks = sent(&rec);
    let last = &acks.last().unwrap().0;
    assert_eq!(last.ack, at(14000));
    assert!(last.sack.is_empty());
    assert!(
        acks.iter().all(|(h, _)| h.sack.as_slice().iter().all(|&(l, _)| seq_lt(h.ack, l))),
        "blocks lie beyond the ACK"
    );

    // A guest that did not offer SACK gets no block.
    let (mut f, mut sw, rec) = open_with(65535, false, now);
    f.on_segment(&mut sw, &seg(at(1000), ISN + 1, ACK, 65535), &data, now);
    let acks = sent(&rec);
    assert_eq!(acks.len(), 1);
    assert!(acks[0].0.sack.is_empty());
}

/// A published port's SYN to the guest offers SACK; the guest's SYN-ACK decides.
#[test]
fn our_syn_offers_sack_and_the_guest_decides() {
    let now = Instant::now();
    for guest_sack in [true, false] {
        let (mut sw, rec) = switch(1500, false);
        let sock = ModelSocket::new(1 << 20, 1 << 20);
        let mut f = TcpFlow::inbound(&mut sw, guest(), remote(), sock, ISN, now);
        let syn = sent(&rec);
        assert!(syn[0].0.has(SYN) && syn[0].0.sack_permitted);
        let mut synack = seg(GUEST_ISN, ISN + 1, SYN | ACK, 65535);
        synack.mss = Some(1460);
        synack.sack_permitted = guest_sack;
        f.on_segment(&mut sw, &synack, &[], now);
        sent(&rec);
        f.on_segment(&mut sw, &seg(GUEST_ISN + 1001, ISN + 1, ACK, 65535), &[1; 100], now);
        let acks = sent(&rec);
        assert_eq!(acks.len(), 1);
        assert_eq!(acks[0].0.ack, GUEST_ISN + 1);
        let expect: &[(u32, u32)] = if guest_sack { &[(GUEST_ISN + 1001, GUEST_ISN + 1101)] } else { &[] };
        assert_eq!(acks[0].0.sack.as_slice(), expect);
    }
}

/// Segments listed in a SACK block are acknowledged once the gap before them is filled,
/// even when the socket takes only part of them: a Linux guest takes an ACK that stops
/// inside data it was told arrived for reneging (after 10 ms it sends everything from
/// there again, its window back to one segment). The flow holds them in `pending` until
/// the socket takes them, and the window's right edge does not move for it.
#[test]
fn listed_segments_are_acknowledged_once_contiguous_though_the_socket_is_full() {
    let now = Instant::now();
    let at = |off: u32| GUEST_ISN + 1 + off;
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 13 + i / 7) as u8).collect();
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    f.sock.tx_cap = 1500;
    f.on_segment(&mut sw, &seg(at(1000), ISN + 1, ACK, 65535), &data[1000..2000], now);
    f.on_segment(&mut sw, &seg(at(2000), ISN + 1, ACK | PSH, 65535), &data[2000..], now);
    let acks = sent(&rec);
    assert_eq!(acks.last().unwrap().0.sack.as_slice(), [(at(1000), at(3000))]);
    let edge_before = f.rcv_edge;
    f.on_segment(&mut sw, &seg(at(0), ISN + 1, ACK, 65535), &data[..1000], now);
    end_of_round(&mut f, &mut sw, now);
    let acks = sent(&rec);
    let last = &acks.last().unwrap().0;
    assert_eq!(last.ack, at(3000), "all that was listed, though the socket took 1500 bytes");
    assert!(last.sack.is_empty());
    assert_eq!(f.pending_len(), 1500);
    let edge = last.ack.wrapping_add(u32::from(last.window) << f.our_wscale);
    assert!(!seq_lt(edge, edge_before), "the window's right edge never moves left");
    // The socket drains: the rest goes, in order, and nothing is acknowledged twice.
    let mut got = Vec::new();
    f.sock.peer_read(10_000, &mut got);
    let (r, w, e) = f.sock.take_edges().unwrap_or_default();
    f.on_socket(&mut sw, r, w, e, now);
    end_of_round(&mut f, &mut sw, now);
    f.sock.peer_read(10_000, &mut got);
    assert_eq!(got, data);
    assert_eq!(f.pending_len(), 0);
    assert!(sent(&rec).iter().all(|(h, _)| h.ack == at(3000)));
}

/// A guest ACK carrying SACK blocks about our data.
fn sack_ack(ack: u32, window: u16, blocks: &[(u32, u32)]) -> TcpHeader {
    let mut h = seg(GUEST_ISN + 1, ack, ACK, window);
    for &(left, right) in blocks {
        assert!(h.sack.push(left, right));
    }
    h
}

/// Guest-bound bytes sent again so far, by cause.
fn resent(sw: &Switch, cause: Resend) -> u64 {
    sw.counters.resent_bytes().find(|&(c, _)| c == cause).map_or(0, |(_, n)| n)
}

/// A published port's flow: our SYN to a guest listener, on a model socket with `room` to
/// write, answered by a SYN-ACK (MSS 1460) that `answer` may change, seeing our SYN.
fn to_a_listener(
    now: Instant,
    room: usize,
    answer: impl FnOnce(&TcpHeader, &mut TcpHeader),
) -> (TcpFlow<ModelSocket>, Switch, Recorder) {
    let (mut sw, rec) = switch(1500, false);
    let sock = ModelSocket::new(1 << 20, room);
    let mut f = TcpFlow::inbound(&mut sw, guest(), remote(), sock, ISN, now);
    let syn = sent(&rec).remove(0).0;
    let mut synack = seg(GUEST_ISN, ISN + 1, SYN | ACK, 65535);
    synack.mss = Some(1460);
    answer(&syn, &mut synack);
    assert_eq!(f.on_segment(&mut sw, &synack, &[], now), Verdict::Keep);
    (f, sw, rec)
}

/// The data segments sent since the last call, as (offset from our first byte, length).
fn data_sent(rec: &Recorder) -> Vec<(u32, usize)> {
    sent(rec).into_iter().filter(|(_, d)| !d.is_empty()).map(|(h, d)| (h.seq - (ISN + 1), d.len())).collect()
}

/// The guest lost one segment of ten and lists the eight after it: only the lost one goes
/// again (not everything from it on, as a go-back-N resend would), then new data.
#[test]
fn sack_blocks_from_the_guest_resend_only_what_is_missing() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    let data: Vec<u8> = (0..10 * 1460).map(|i| (i % 251) as u8).collect();
    assert_eq!(host_writes(&mut f, &mut sw, &data, now), Verdict::Keep);
    let first: Vec<(u32, usize)> = data_sent(&rec);
    assert_eq!(first.iter().map(|&(_, n)| n).sum::<usize>(), data.len());
    assert!(first.iter().all(|&(_, n)| n == 1460), "{first:?}");
    let at = |n: u32| ISN + 1 + n;
    // The guest has the first segment, not the second, and the eight after it.
    let h = sack_ack(at(1460), 65535, &[(at(2 * 1460), at(10 * 1460))]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    let again = data_sent(&rec);
    assert_eq!(again, [(1460, 1460)], "only the missing segment goes again");
    assert_eq!(resent(&sw, Resend::Sack), 1460);
    // More duplicate ACKs with the same blocks send nothing more.
    for _ in 0..3 {
        assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    }
    assert!(data_sent(&rec).is_empty(), "what was sent again is not sent again on the same news");
    assert_eq!(resent(&sw, Resend::DupAcks), 0, "no go-back-N for the duplicate ACKs");
    // New host data goes on from where the first send ended.
    assert_eq!(host_writes(&mut f, &mut sw, &[9; 100], now), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(10 * 1460, 100)]);
    // The guest has it all: the socket keeps only what is not acknowledged.
    let h = seg(GUEST_ISN + 1, at(10 * 1460 + 100), ACK, 65535);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    assert_eq!(f.sock.inspect(), Some((0, 0)));
}

/// Two holes below the highest block: both go again, each only once, and what was sent
/// beyond the highest block is not sent again (it may still be on its way).
#[test]
fn every_hole_below_the_highest_block_goes_again_and_nothing_past_it() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    assert_eq!(host_writes(&mut f, &mut sw, &[1; 10 * 1460], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 10);
    let at = |n: u32| ISN + 1 + n * 1460;
    // Missing: segment 0, and segments 3 and 4; listed: 1-2 and 5-6; 7-9 not heard of.
    let h = sack_ack(at(0), 65535, &[(at(5), at(7)), (at(1), at(3))]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    let again = data_sent(&rec);
    assert_eq!(again, [(0, 1460), (3 * 1460, 1460), (4 * 1460, 1460)], "the holes");
    assert_eq!(resent(&sw, Resend::Sack), 3 * 1460);
    // The first hole arrived; the ACK moves, the blocks stay: nothing new to send.
    let h = sack_ack(at(3), 65535, &[(at(5), at(7))]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    assert!(data_sent(&rec).is_empty());
    // Malformed or stale blocks say nothing: beyond what was sent, below the ACK (a
    // D-SACK), empty, reversed.
    let h = sack_ack(at(3), 65535, &[(at(9), at(11)), (at(0), at(1)), (at(8), at(8)), (at(9), at(8))]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    assert!(data_sent(&rec).is_empty());
}

/// The last segment was lost: no duplicate ACK can come. Two round trips later a probe
/// (the last byte) goes; the guest lists it, and the rest of what it misses goes at once,
/// long before the retransmission timer (200 ms).
#[test]
fn a_lost_last_segment_is_found_by_a_probe_before_the_timer() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    let at = |n: u32| ISN + 1 + 100 + n;
    // Before a round trip was measured, the probe would go after 10 ms.
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 100], now), Verdict::Keep);
    assert_eq!(f.deadline(), Some(now + Duration::from_millis(10)));
    // A round trip of 100 us.
    let t = now + Duration::from_micros(100);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(0), ACK, 65535), &[], t), Verdict::Keep);
    assert_eq!(f.deadline(), None);
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 3 * 1460], t), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 4);
    // The first two arrive, the third is lost.
    let t = t + Duration::from_micros(100);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(2 * 1460), ACK, 65535), &[], t), Verdict::Keep);
    let due = f.deadline().expect("a deadline");
    assert_eq!(due, t + Duration::from_micros(2200), "the probe is due after two round trips and 2 ms");
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(100 + 3 * 1460 - 1, 1)], "the probe: the last byte");
    assert_eq!(resent(&sw, Resend::Probe), 1);
    // The guest lists the probe: the rest of the lost segment goes.
    let h = sack_ack(at(2 * 1460), 65535, &[(at(3 * 1460 - 1), at(3 * 1460))]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(100 + 2 * 1460, 1459)]);
    // That is lost too: the next probe sends it again, not the byte that arrived.
    let due = f.deadline().expect("a deadline");
    assert!(due < t + Duration::from_millis(20));
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(100 + 2 * 1460, 1459)]);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(3 * 1460), ACK, 65535), &[], due), Verdict::Keep);
    assert_eq!(f.sock.inspect(), Some((0, 0)));
    assert_eq!(f.deadline(), None, "nothing in flight, nothing timed");
}

/// A guest without SACK: three duplicate ACKs resend everything from the first
/// unacknowledged byte (go-back-N).
#[test]
fn a_guest_without_sack_gets_a_go_back_n_resend_for_three_duplicate_acks() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, false, now);
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 5 * 1460], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 5);
    let t = now + Duration::from_micros(100);
    for _ in 0..4 {
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1 + 1460, ACK, 65535), &[], t), Verdict::Keep);
    }
    assert_eq!(data_sent(&rec).iter().map(|&(_, n)| n).sum::<usize>(), 4 * 1460);
    assert_eq!(resent(&sw, Resend::DupAcks), 4 * 1460);
}

/// `segments` full segments sent to a guest without SACK at `now`, of which it acknowledges
/// the first `acked` (at least one: `arm_probe`) 100 us later; then the tail-loss probe
/// goes: the last byte. Returns the flow and when the probe went.
fn probed_without_sack(segments: u32, acked: u32, now: Instant) -> (TcpFlow<ModelSocket>, Switch, Recorder, Instant) {
    let (mut f, mut sw, rec) = open_with(65535, false, now);
    let len = segments as usize * 1460;
    assert_eq!(host_writes(&mut f, &mut sw, &vec![3; len], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), segments as usize);
    let h = seg(GUEST_ISN + 1, ISN + 1 + acked * 1460, ACK, 65535);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now + Duration::from_micros(100)), Verdict::Keep);
    let due = f.deadline().expect("a deadline");
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(len as u32 - 1, 1)], "the probe: the last byte");
    (f, sw, rec, due)
}

/// The last segments to a guest without SACK were lost: no duplicate ACK comes. The probe
/// (the last byte) reaches the guest behind everything sent before it, so its answer, a
/// duplicate ACK, names the first byte lost, and everything from there goes again, long
/// before the retransmission timer (200 ms). An ACK of new data is progress, not an
/// answer (it may have left the guest before the probe reached it): the probe goes again.
#[test]
fn a_guest_without_sack_answers_a_probe_with_what_it_lost() {
    for partial_ack_first in [false, true] {
        let now = Instant::now();
        let at = |n: u32| ISN + 1 + n * 1460;
        // The first three arrive, the last two are lost. (The round trip is timed by the
        // end of the one send that sent all five, so it is not measured yet.)
        let (mut f, mut sw, rec, mut due) = probed_without_sack(5, 3, now);
        let t = now + Duration::from_micros(100);
        assert_eq!(due, t + Duration::from_millis(10), "the probe is due 10 ms after the ACK");
        let mut first_lost = 3;
        if partial_ack_first {
            // The fourth did arrive (the guest had delayed its ACK): progress, and later a
            // second probe, whose answer names the fifth.
            assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(4), ACK, 65535), &[], due), Verdict::Keep);
            assert!(data_sent(&rec).is_empty());
            due = f.deadline().expect("a deadline");
            assert!(due < t + Duration::from_millis(30), "the probe goes again before the timer");
            assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
            assert_eq!(data_sent(&rec), [(5 * 1460 - 1, 1)]);
            first_lost = 4;
        }
        let h = seg(GUEST_ISN + 1, at(first_lost), ACK, 65535);
        assert_eq!(f.on_segment(&mut sw, &h, &[], due), Verdict::Keep);
        let again: Vec<(u32, usize)> = (first_lost..5).map(|n| (n * 1460, 1460)).collect();
        assert_eq!(data_sent(&rec), again, "everything from the byte the answer asks for");
        let probes = if partial_ack_first { 2 } else { 1 };
        assert_eq!(resent(&sw, Resend::Probe), probes + (5 - u64::from(first_lost)) * 1460);
        assert_eq!(resent(&sw, Resend::DupAcks) + resent(&sw, Resend::Timeout), 0);
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(5), ACK, 65535), &[], due), Verdict::Keep);
        assert_eq!(f.sock.inspect(), Some((0, 0)));
        assert_eq!(f.deadline(), None, "nothing in flight, nothing timed");
    }
    // An answer that acknowledges the probe found nothing lost: nothing goes again.
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, false, now);
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 3 * 1460], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 3);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1 + 1460, ACK, 65535), &[], now), Verdict::Keep);
    let due = f.deadline().expect("a deadline");
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(3 * 1460 - 1, 1)]);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1 + 3 * 1460, ACK, 65535), &[], due), Verdict::Keep);
    assert!(data_sent(&rec).is_empty());
    assert_eq!(resent(&sw, Resend::Probe), 1);
}

/// A guest listener (a published port's connection) that has acknowledged none of our data
/// may hold us as a SYN cookie: its accept queue was full, so it dropped our ACK of its
/// SYN-ACK and the data after it, and it resets any segment but one at our first byte. So
/// it gets one segment at a time until it acknowledges data (a second one would be reset
/// while the queue is still full), and the probe sends that first segment again, never
/// its last byte, with or without SACK and window scaling (a cookie keeps both when the
/// SYN had timestamps, as ours has). Once the guest has acknowledged data, a lost tail is
/// probed with its last byte. Regressions: the probe of the last byte, and a first flight
/// of several frames, got the cookie's connection reset.
#[test]
fn a_guest_listener_that_acknowledged_nothing_is_probed_from_the_first_byte() {
    for options in [false, true] {
        let now = Instant::now();
        let (mut f, mut sw, rec) = to_a_listener(now, 1 << 20, |_, synack| {
            if options {
                synack.sack_permitted = true;
                synack.window_scale = Some(7);
            }
        });
        sent(&rec);
        assert_eq!(host_writes(&mut f, &mut sw, &[7; 3 * 1460], now), Verdict::Keep);
        assert_eq!(data_sent(&rec), [(0, 1460)], "one segment until the guest acknowledges data");
        let due = f.deadline().expect("a deadline");
        assert!(due < now + Duration::from_millis(200), "a probe before the timer");
        assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
        assert_eq!(data_sent(&rec), [(0, 1460)], "the first segment again");
        assert_eq!(resent(&sw, Resend::Probe), 1460);
        // The guest opened the connection with it: the rest goes.
        let t = due + Duration::from_micros(100);
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1 + 1460, ACK, 65535), &[], t), Verdict::Keep);
        assert_eq!(data_sent(&rec), [(1460, 1460), (2920, 1460)]);
        // Now a lost tail is probed with its last byte.
        let due = f.deadline().expect("a deadline");
        assert!(due < t + Duration::from_millis(200), "a probe before the timer");
        assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
        assert_eq!(data_sent(&rec), [(3 * 1460 - 1, 1)], "the probe: the last byte");
    }
    // A guest that opened the connection (it is no listener) is probed with the last byte
    // before it acknowledged any data.
    let now = Instant::now();
    let (mut f, mut sw, rec) = open(65535, now);
    assert_eq!(host_writes(&mut f, &mut sw, &[7; 3 * 1460], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 3);
    let due = f.deadline().expect("a deadline");
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(3 * 1460 - 1, 1)], "the probe: the last byte");
}

/// A guest listener that has acknowledged none of our data gets our FIN on its first
/// segment or after the guest takes it, never alone behind it: a guest that holds us as a
/// SYN cookie and dropped that segment (its accept queue full) answers a FIN at a later
/// sequence number with a reset, and the client's request would be lost. So a resend
/// that reaches our FIN carries it, as the segment it resends did: the probes and the
/// timer's go-back-N open the connection and close it in one segment. (Before, a probe
/// sent the data again without the FIN.) When the close came after the first segment
/// went, the probes send that segment as it was, and the FIN goes after the guest's ACK,
/// or on the timer's resend, which finds the end of the stream behind the data.
#[test]
fn a_guest_listener_gets_our_fin_on_the_first_segment_or_after_it() {
    for (closed_at_once, guest_acks_after_the_probes) in [(true, false), (false, true), (false, false)] {
        let now = Instant::now();
        let (mut f, mut sw, rec) = to_a_listener(now, 1 << 20, |_, _| {});
        sent(&rec);
        // The client's request and its close: in one round, or each in a round of its own.
        assert_eq!(f.sock.peer_write(b"request"), 7);
        if !closed_at_once {
            let (r, w, e) = f.sock.take_edges().unwrap_or_default();
            assert_eq!(f.on_socket(&mut sw, r, w, e, now), Verdict::Keep);
        }
        assert_eq!(host_closes(&mut f, &mut sw, now), Verdict::Keep);
        let out = sent(&rec);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].0.seq == ISN + 1 && out[0].1 == b"request", "{out:?}");
        assert_eq!(out[0].0.has(FIN), closed_at_once, "{out:?}");
        // The probes: the segment again, as it was.
        let mut t = f.deadline().expect("a deadline");
        while t < now + RTO_MIN {
            assert_eq!(f.on_timer(&mut sw, t), Verdict::Keep);
            let again = sent(&rec);
            assert_eq!(again.len(), 1, "{again:?}");
            assert_eq!((again[0].0.seq, again[0].0.flags, &again[0].1), (out[0].0.seq, out[0].0.flags, &out[0].1));
            t = f.deadline().expect("a deadline");
        }
        assert!(resent(&sw, Resend::Probe) > 0);
        if guest_acks_after_the_probes {
            // The guest takes the data: only now the end of stream, and the FIN alone.
            assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 8, ACK, 65535), &[], t), Verdict::Keep);
            let out = sent(&rec);
            assert_eq!(out.len(), 1, "{out:?}");
            assert!(out[0].0.has(FIN) && out[0].0.seq == ISN + 8 && out[0].1.is_empty(), "{out:?}");
            continue;
        }
        // The retransmission timer: the data and the FIN in one segment.
        assert_eq!(f.on_timer(&mut sw, t), Verdict::Keep);
        assert_eq!(resent(&sw, Resend::Timeout), 7);
        let again = sent(&rec);
        assert_eq!(again.len(), 1, "{again:?}");
        assert!(again[0].0.has(FIN) && again[0].0.seq == ISN + 1 && again[0].1 == b"request", "{again:?}");
        // The guest takes it: everything is acknowledged, and the FIN is not sent again.
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 9, ACK, 65535), &[], t), Verdict::Keep);
        assert_eq!(f.to_guest, ToGuest::FinAcked);
        let out = sent(&rec);
        assert!(out.is_empty(), "{out:?}");
    }
}

/// A guest listener whose SYN cookie we answered may have dropped that ACK (its accept
/// queue full) and know nothing of the connection: a server that speaks first would never
/// speak. So while neither side has sent a byte, the ACK goes again (with the echo the
/// cookie needs), from 200 ms after the handshake and doubling, eight times at most; and
/// no more once the guest has sent something, or we have.
#[test]
fn our_ack_of_a_guest_listeners_syn_ack_goes_again_while_nothing_was_exchanged() {
    for first in ["nobody", "guest", "guest, held", "host"] {
        let now = Instant::now();
        // (A socket with no room: the guest's data waits in `pending`.)
        let room = if first == "guest, held" { 0 } else { 1 << 20 };
        let (mut f, mut sw, rec) = to_a_listener(now, room, |syn, synack| {
            let (val, _) = syn.timestamps.expect("our SYN offers timestamps");
            synack.timestamps = Some((77, val));
        });
        let handshake_ack =
            |h: &TcpHeader, d: &[u8]| h.flags == ACK && h.seq == ISN + 1 && h.ack == GUEST_ISN + 1 && d.is_empty();
        assert!(sent(&rec).iter().all(|(h, d)| handshake_ack(h, d)));
        let mut at = Vec::new();
        match first {
            "nobody" => {
                while let Some(t) = f.deadline() {
                    assert_eq!(f.on_timer(&mut sw, t), Verdict::Keep);
                    let out = sent(&rec);
                    assert_eq!(out.len(), 1, "{out:?}");
                    assert!(handshake_ack(&out[0].0, &out[0].1), "{out:?}");
                    assert_eq!(out[0].0.timestamps.map(|(_, ecr)| ecr), Some(77), "the cookie's echo");
                    at.push((t - now).as_millis());
                }
                assert_eq!(at, [200, 600, 1400, 3000, 6200, 12600, 25400, 51000]);
            }
            "guest" | "guest, held" => {
                // The server's banner: the guest has the connection.
                let t = now + Duration::from_millis(50);
                let v = f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 1, ACK | PSH, 65535), b"HELLO", t);
                assert_eq!(v, Verdict::Keep);
                assert_eq!(end_of_round(&mut f, &mut sw, t), Verdict::Keep);
                sent(&rec);
                for t in [now + Duration::from_millis(200), now + Duration::from_secs(60)] {
                    assert_eq!(f.on_timer(&mut sw, t), Verdict::Keep);
                }
                // (The banner's ACK, delayed for an answer to ride on, goes once the socket
                // took it; nothing else.)
                let out = sent(&rec);
                assert!(out.iter().all(|(h, d)| h.ack == GUEST_ISN + 6 && d.is_empty()), "{out:?}");
                assert_eq!(f.sock.peer_unread(), if room == 0 { 0 } else { 5 });
            }
            _ => {
                // The client's request: it opens the connection itself (and is probed).
                let t = now + Duration::from_millis(50);
                assert_eq!(host_writes(&mut f, &mut sw, b"GET", t), Verdict::Keep);
                while let Some(t) = f.deadline().filter(|&d| d < now + Duration::from_secs(2)) {
                    assert_eq!(f.on_timer(&mut sw, t), Verdict::Keep);
                }
                let out = sent(&rec);
                assert!(!out.is_empty() && out.iter().all(|(h, d)| h.seq == ISN + 1 && d == b"GET"), "{out:?}");
            }
        }
    }
}

/// Timestamps (RFC 7323), when the guest's SYN offers them: the SYN-ACK echoes its TSval,
/// and every segment after carries our clock (milliseconds, never going back) and the
/// TSval of the guest's latest segment at or before what we acknowledged (so not one that
/// came after a gap). Data segments make room for them: 12 bytes less of the guest's MSS,
/// the bytes whole.
#[test]
fn timestamps_go_on_every_segment_once_the_guest_offers_them() {
    let now = Instant::now();
    let (mut sw, rec) = switch(1500, false);
    let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
    syn.mss = Some(1460);
    syn.timestamps = Some((100, 0));
    let sock = ModelSocket::new(1 << 20, 1 << 20);
    let (mut f, v) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
    assert_eq!(v, Verdict::Keep);
    let out = sent(&rec);
    let (val, ecr) = out[0].0.timestamps.expect("the SYN-ACK has timestamps");
    assert_eq!(ecr, 100);
    let mut ack = seg(GUEST_ISN + 1, ISN + 1, ACK, 65535);
    ack.timestamps = Some((101, val));
    assert_eq!(f.on_segment(&mut sw, &ack, &[], now), Verdict::Keep);
    let t = now + Duration::from_millis(5);
    let data: Vec<u8> = (0..3000).map(|i| (i % 251) as u8).collect();
    assert_eq!(host_writes(&mut f, &mut sw, &data, t), Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(), [1448, 1448, 104]);
    assert_eq!(out.iter().flat_map(|(_, d)| d.iter().copied()).collect::<Vec<_>>(), data);
    for (h, _) in &out {
        assert_eq!(h.timestamps, Some((val + 5, 101)));
    }
    // A segment after a gap: its TSval is not echoed (it is not what we acknowledge).
    let mut late = seg(GUEST_ISN + 11, ISN + 3001, ACK, 65535);
    late.timestamps = Some((300, val + 5));
    assert_eq!(f.on_segment(&mut sw, &late, b"0123456789", t), Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out[0].0.ack, GUEST_ISN + 1);
    assert_eq!(out[0].0.timestamps, Some((val + 5, 101)));
    // The one that fills the gap is, newer than 101.
    let mut fill = seg(GUEST_ISN + 1, ISN + 3001, ACK, 65535);
    fill.timestamps = Some((301, val + 5));
    let t = t + Duration::from_millis(1);
    assert_eq!(f.on_segment(&mut sw, &fill, b"abcdefghij", t), Verdict::Keep);
    assert_eq!(end_of_round(&mut f, &mut sw, t), Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out.last().unwrap().0.ack, GUEST_ISN + 21);
    assert_eq!(out.last().unwrap().0.timestamps, Some((val + 6, 301)));
    // An older TSval (a retransmission from before) is not taken.
    let mut old = seg(GUEST_ISN + 1, ISN + 3001, ACK, 65535);
    old.timestamps = Some((250, val + 5));
    assert_eq!(f.on_segment(&mut sw, &old, b"abcdefghij", t), Verdict::Keep);
    let out = sent(&rec);
    assert_eq!(out.last().unwrap().0.timestamps, Some((val + 6, 301)));
}

/// A published port's SYN offers timestamps; the guest's SYN-ACK decides: echoed when it
/// has them, and none on any segment after when it has not.
#[test]
fn a_published_ports_syn_offers_timestamps_and_the_guest_decides() {
    for guest_takes in [true, false] {
        let now = Instant::now();
        let (mut sw, rec) = switch(1500, false);
        let sock = ModelSocket::new(1 << 20, 1 << 20);
        let mut f = TcpFlow::inbound(&mut sw, guest(), remote(), sock, ISN, now);
        let syn = sent(&rec);
        let (val, ecr) = syn[0].0.timestamps.expect("our SYN offers timestamps");
        assert_eq!(ecr, 0);
        let mut synack = seg(GUEST_ISN, ISN + 1, SYN | ACK, 65535);
        synack.mss = Some(1460);
        synack.window_scale = Some(7);
        if guest_takes {
            synack.timestamps = Some((77, val));
        }
        assert_eq!(f.on_segment(&mut sw, &synack, &[], now), Verdict::Keep);
        assert_eq!(host_writes(&mut f, &mut sw, &[1; 2000], now), Verdict::Keep);
        let mut out = sent(&rec);
        assert_eq!(out[0].0.ack, GUEST_ISN + 1, "the ACK of the SYN-ACK");
        let first = out[1].1.len() as u32;
        let mut ack = seg(GUEST_ISN + 1, ISN + 1 + first, ACK, 65535);
        ack.timestamps = synack.timestamps.map(|(v, _)| (v + 1, val));
        assert_eq!(f.on_segment(&mut sw, &ack, &[], now), Verdict::Keep);
        out.extend(sent(&rec));
        let stamps: Vec<_> = out.iter().map(|(h, _)| h.timestamps).collect();
        if guest_takes {
            // (The last goes after the guest's ACK: it echoes that one's TSval.)
            assert_eq!(stamps, [Some((val, 77)), Some((val, 77)), Some((val, 78))]);
            assert_eq!(out.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(), [0, 1448, 552]);
        } else {
            assert_eq!(stamps, [None, None, None]);
            assert_eq!(out.iter().map(|(_, d)| d.len()).collect::<Vec<_>>(), [0, 1460, 540]);
        }
    }
}

/// Beside timestamps an ACK has room for three SACK blocks (40 bytes of options), not four.
#[test]
fn sack_blocks_beside_timestamps_are_at_most_three() {
    let now = Instant::now();
    let (mut sw, rec) = switch(1500, false);
    let mut syn = seg(GUEST_ISN, 0, SYN, 65535);
    syn.mss = Some(1460);
    syn.sack_permitted = true;
    syn.timestamps = Some((1, 0));
    let sock = ModelSocket::new(1 << 20, 1 << 20);
    let (mut f, _) = TcpFlow::outbound(&mut sw, guest(), remote(), &syn, sock, true, ISN, now);
    let val = sent(&rec)[0].0.timestamps.unwrap().0;
    let at = |off: u32| GUEST_ISN + 1 + off;
    let mut last = None;
    for off in [0, 1000, 3000, 5000, 7000, 9000] {
        let mut h = seg(at(off), ISN + 1, ACK, 65535);
        h.timestamps = Some((2, val));
        if off == 0 {
            assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
            continue;
        }
        assert_eq!(f.on_segment(&mut sw, &h, &[5; 1000], now), Verdict::Keep);
        last = sent(&rec).pop();
    }
    let (h, _) = last.unwrap();
    assert_eq!(h.sack.as_slice(), [(at(9000), at(10000)), (at(1000), at(2000)), (at(3000), at(4000))]);
    assert!(h.timestamps.is_some());
}

/// Nothing was lost, but a guest without SACK was slow for longer than the probe waits:
/// the ACKs it sent before the probe reached it come after the probe went, and are not
/// taken for its answer (each acknowledges new data). Regression (found in review): the
/// first of them made everything after it go again.
#[test]
fn acks_sent_before_the_probe_arrived_are_not_its_answer() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, false, now);
    let at = |n: u32| ISN + 1 + 100 + n * 1460;
    // A round trip of 100 us.
    assert_eq!(host_writes(&mut f, &mut sw, &[1; 100], now), Verdict::Keep);
    let t = now + Duration::from_micros(100);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 101, ACK, 65535), &[], t), Verdict::Keep);
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 8 * 1460], t), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 9);
    let due = f.deadline().expect("a deadline");
    assert_eq!(due, t + Duration::from_micros(2200));
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(100 + 8 * 1460 - 1, 1)], "the probe");
    // The guest catches up, acknowledging every second segment, then answers the probe.
    let t = due + Duration::from_micros(800);
    for n in [2, 4, 6, 8, 8] {
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(n), ACK, 65535), &[], t), Verdict::Keep);
    }
    assert!(data_sent(&rec).is_empty(), "nothing was lost, nothing goes again");
    assert_eq!(resent(&sw, Resend::Probe), 1);
}

/// After a go-back-N, duplicate ACKs do not count until the guest acknowledges beyond what
/// had been sent then (RFC 6582's recovery point): the guest answers every byte it got
/// twice with one, and three of them would send again, needlessly, all that went since.
/// Regression (found in review): a probe's answer resent everything, then the late
/// duplicate ACKs of the same hole did again, and the duplicate ACKs that the resent
/// duplicates brought sent the new data again.
#[test]
fn duplicate_acks_after_a_go_back_n_send_nothing_more_until_it_is_acknowledged() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, false, now);
    let at = |n: u32| ISN + 1 + 100 + n * 1460;
    // (The guest acknowledged data before: it is probed.)
    assert_eq!(host_writes(&mut f, &mut sw, &[1; 100], now), Verdict::Keep);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 101, ACK, 65535), &[], now), Verdict::Keep);
    sent(&rec);
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 4 * 1460], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 4);
    // The first is lost; the duplicate ACK for the second arrives in time.
    let t = now + Duration::from_micros(100);
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(0), ACK, 65535), &[], t), Verdict::Keep);
    let due = f.deadline().expect("a deadline");
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(100 + 4 * 1460 - 1, 1)], "the probe");
    // Those for the third and fourth come late, then the probe's. The first of them is
    // taken for the answer (it cannot be told from it; the hole is real either way): one
    // go-back-N, and the others do not count.
    for _ in 0..3 {
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(0), ACK, 65535), &[], due), Verdict::Keep);
    }
    assert_eq!(data_sent(&rec).len(), 4, "one go-back-N");
    // The first resent segment fills the hole; the guest acknowledges all four, and new
    // data goes. The other three reach the guest twice: three duplicate ACKs, at the
    // recovery point, which send nothing.
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(4), ACK, 65535), &[], due), Verdict::Keep);
    assert_eq!(host_writes(&mut f, &mut sw, &[4; 4 * 1460], due), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 4);
    for _ in 0..3 {
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(4), ACK, 65535), &[], due), Verdict::Keep);
    }
    assert!(data_sent(&rec).is_empty(), "the new data is on its way behind the duplicates");
    assert_eq!(resent(&sw, Resend::DupAcks), 0);
    // Past the recovery point, three duplicate ACKs go back N again: the sixth was lost.
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(5), ACK, 65535), &[], due), Verdict::Keep);
    for _ in 0..3 {
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(5), ACK, 65535), &[], due), Verdict::Keep);
    }
    assert_eq!(data_sent(&rec), [(100 + 5 * 1460, 1460), (100 + 6 * 1460, 1460), (100 + 7 * 1460, 1460)]);
    assert_eq!(resent(&sw, Resend::DupAcks), 3 * 1460);
}

/// Four segments sent to a guest with SACK, which lists the last three: the first, alone,
/// went again.
fn first_of_four_resent_for_sack(now: Instant) -> (TcpFlow<ModelSocket>, Switch, Recorder) {
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    assert_eq!(host_writes(&mut f, &mut sw, &[4; 4 * 1460], now), Verdict::Keep);
    assert_eq!(data_sent(&rec).len(), 4);
    let at = |n: u32| ISN + 1 + n * 1460;
    let h = sack_ack(at(0), 65535, &[(at(1), at(4))]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], now), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(0, 1460)]);
    (f, sw, rec)
}

/// At a retransmission timeout the guest's SACK blocks are forgotten (a guest may drop
/// data it listed: Linux does under memory pressure): everything goes again.
#[test]
fn a_timeout_forgets_the_guests_sack_blocks() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = first_of_four_resent_for_sack(now);
    let later = now + Duration::from_secs(1);
    assert_eq!(f.on_timer(&mut sw, later), Verdict::Keep);
    let again = data_sent(&rec);
    assert_eq!(again.iter().map(|&(_, n)| n).sum::<usize>(), 4 * 1460, "{again:?}");
    assert_eq!(resent(&sw, Resend::Timeout), 4 * 1460);
}

/// A probe answered by an ACK of the byte it sent again was not needed: the guest delays
/// its ACKs (to let them ride on its answer). Its short tails are then left to the
/// retransmission timer, not probed at every exchange; long ones still are.
#[test]
fn a_guest_that_delays_its_acks_is_not_probed_for_short_tails() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = open_with(65535, true, now);
    assert_eq!(host_writes(&mut f, &mut sw, &[1; 100], now), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(0, 100)]);
    let due = f.deadline().expect("a deadline");
    assert!(due < now + Duration::from_millis(20), "a probe is armed");
    assert_eq!(f.on_timer(&mut sw, due), Verdict::Keep);
    assert_eq!(data_sent(&rec), [(99, 1)], "the probe");
    // The guest had it all along: its ACK covers the probe (and says so in a D-SACK).
    let h = sack_ack(ISN + 101, 65535, &[(ISN + 100, ISN + 101)]);
    assert_eq!(f.on_segment(&mut sw, &h, &[], due), Verdict::Keep);
    assert_eq!(f.deadline(), None);
    // The next short answer waits for the retransmission timer only.
    assert_eq!(host_writes(&mut f, &mut sw, &[2; 100], due), Verdict::Keep);
    assert_eq!(f.deadline(), Some(due + Duration::from_millis(200)));
    assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, ISN + 201, ACK, 65535), &[], due), Verdict::Keep);
    // A tail of two full segments or more is probed: the guest acknowledges it at once.
    assert_eq!(host_writes(&mut f, &mut sw, &[3; 2 * 1460], due), Verdict::Keep);
    assert!(f.deadline().expect("a deadline") < due + Duration::from_millis(20));
}

/// An ACK that stops at a range the guest listed says it dropped the range (reneging):
/// the blocks are forgotten, and three duplicate ACKs send everything from there again.
#[test]
fn an_ack_that_stops_at_listed_data_forgets_the_blocks() {
    let now = Instant::now();
    let (mut f, mut sw, rec) = first_of_four_resent_for_sack(now);
    let at = |n: u32| ISN + 1 + n * 1460;
    // The first segment arrived, the listed ones are gone from the guest.
    for _ in 0..4 {
        assert_eq!(f.on_segment(&mut sw, &seg(GUEST_ISN + 1, at(1), ACK, 65535), &[], now), Verdict::Keep);
    }
    assert_eq!(data_sent(&rec), [(1460, 1460), (2 * 1460, 1460), (3 * 1460, 1460)]);
    assert_eq!(resent(&sw, Resend::DupAcks), 3 * 1460);
}
