//! Guest UDP datagrams gathered over one batch of frames and sent with one sendmmsg(2) per
//! flow, instead of one send(2) each: half the system calls of a UDP stream.
//!
//! A flow's datagrams of one length in a row (a bulk sender's, all full but perhaps the
//! last) go as one message with UDP_SEGMENT (Linux 4.18): the kernel builds one buffer for
//! them, routes it once, and cuts it into the same datagrams on the way, so that the send
//! path runs once per group instead of once per datagram. How much one message may carry
//! is the flow's `sock::Segmenting`: nothing on a service's socketpair, which would take it as
//! one datagram; over IPv4, what fits the route's MTU, read before each group (the kernel
//! sets DF only on a send that fits it: a larger one's datagrams would leave fragmentable,
//! their identifications taken once per send). A socket that cannot segment (a route
//! through IPsec, an IPv6 datagram above the path MTU, a host firewall that judges the
//! unsplit message) refuses the message whole: its datagrams then go one by one (the kernel
//! fragments what is above the MTU, as before), and that flow is not segmented again.
//!
//! A published port's answers go the same way on its listening socket, each message with
//! its client's address (`flows::udp::published_segmenting` says how far they segment).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};

use super::flows::FlowId;
use super::sock::{self, Segmenting, UDP_SEGMENT};

/// Bytes of payload held before a flush is forced.
const CAPACITY: usize = 512 * 1024;
/// Messages per sendmmsg call.
const MAX_MSGS: usize = 64;
/// Datagrams in one segmented send. The kernel takes 64 (128 since Linux 6.10), but before
/// its fix of December 2021 it counted the UDP header in, and refused 64 full ones.
const MAX_SEGMENTS: usize = 63;
/// Payload of one segmented send: what one IPv4 datagram can carry (the kernel's bound).
const MAX_SEGMENTED_BYTES: usize = sock::UDP_MAX_SEGMENTED_BYTES;
/// Flows remembered as not to be segmented; past this, forgotten all at once (each then
/// costs one refused send more).
const MAX_REFUSED: usize = 1024;

/// A datagram queued.
#[derive(Clone, Copy)]
struct Item {
    flow: FlowId,
    /// The socket it leaves on.
    fd: RawFd,
    /// Where it starts in `data`, and its length.
    start: usize,
    len: usize,
    segmenting: Segmenting,
    /// Its destination when the socket is not connected (a published port's listener
    /// answering its client).
    to: Option<SocketAddr>,
}

/// One message of a flush: `items[first..end]` of one flow, contiguous in `data`.
#[derive(Clone, Copy)]
struct Group {
    first: usize,
    end: usize,
    /// Every datagram of the group but the last is this long; 0 for a single datagram.
    segment: u16,
}

/// Room for one control message carrying a u16 (CMSG_SPACE(2) is 24 on 64-bit Linux).
#[derive(Clone, Copy, Default)]
#[repr(C, align(8))]
struct SegmentCmsg([u8; 32]);

#[derive(Default)]
pub struct UdpBatch {
    data: Vec<u8>,
    items: Vec<Item>,
    /// Flows whose socket refused a segmented send.
    refused: HashSet<FlowId>,
    /// Scratch for sendmmsg, kept between flushes so that a flush allocates nothing (but
    /// when a flow is first refused).
    groups: Vec<Group>,
    iovs: Vec<libc::iovec>,
    cmsgs: Vec<SegmentCmsg>,
    msgs: Vec<libc::mmsghdr>,
    /// Messages sent segmented, and the datagrams in them; messages sent again after an
    /// error (read by the tests).
    pub segmented: (u64, u64),
    pub sent_again: u64,
}

impl UdpBatch {
    /// True when `len` more bytes do not fit: flush first.
    pub fn full(&self, len: usize) -> bool {
        self.data.len() + len > CAPACITY
    }

    /// Queues a datagram for `flow`'s socket `fd` (to `to` when `fd` is not connected: a
    /// published port's listener answering its client), whose sends may be segmented as
    /// `segmenting` says. The engine flushes the batch at the end of each round and before
    /// it closes any flow or published port, so `fd` is still open when it is sent.
    pub fn push(&mut self, flow: FlowId, fd: RawFd, payload: &[u8], segmenting: Segmenting, to: Option<SocketAddr>) {
        if self.data.capacity() == 0 {
            self.data.reserve(CAPACITY);
        }
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.items.push(Item { flow, fd, start, len: payload.len(), segmenting, to });
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends everything, in order, each run of one flow's datagrams (to one destination) in
    /// sendmmsg calls.
    /// A socket that cannot take a datagram drops it, as a full network would.
    pub fn flush(&mut self) {
        let mut i = 0;
        while i < self.items.len() {
            let Item { flow, fd, segmenting, to, .. } = self.items[i];
            let mut j = i;
            // A published port's flow answers the latest address of its client: a run ends
            // where that moved.
            while j < self.items.len() && self.items[j].flow == flow && self.items[j].to == to {
                j += 1;
            }
            let mut k = i;
            while k < j {
                let refused = !self.refused.is_empty() && self.refused.contains(&flow);
                let bound = match segmenting {
                    _ if refused || j - k < 2 => 0,
                    Segmenting::Never => 0,
                    // SAFETY: `fd` stays open until the flush is done (see `push`).
                    Segmenting::RouteMtu => route_mtu_payload(unsafe { BorrowedFd::borrow_raw(fd) }),
                    Segmenting::Full => MAX_SEGMENTED_BYTES,
                };
                self.groups.clear();
                group(&self.items[k..j], k, bound, MAX_MSGS, &mut self.groups);
                k = self.groups.last().map_or(j, |g| g.end);
                if let Err(e) = self.send_groups(fd, to) {
                    tracing::debug!("udp: {e}; the rest of this round's datagrams of the flow dropped");
                    break;
                }
            }
            i = j;
        }
        self.items.clear();
        self.data.clear();
    }

    /// Sends `groups` (one flow's, on `fd`), one message each. An error ends it (the rest
    /// is dropped, as a full network would) when the socket is full (EAGAIN, ENOBUFS) or
    /// when the message fails twice.
    ///
    /// A message refused for being segmented goes again as single datagrams, with every
    /// later one, and the flow is not segmented again. Any other error may be an earlier
    /// one the socket held (an ICMP error's ECONNREFUSED or EHOSTUNREACH, which the send
    /// reports and clears, sending nothing): the message is sent once more.
    fn send_groups(&mut self, fd: RawFd, to: Option<SocketAddr>) -> io::Result<()> {
        let to = to.map(sock::sockaddr);
        let mut at = 0;
        let mut again = false;
        while at < self.groups.len() {
            let (sent, failed) = send_many(
                fd,
                to.as_ref(),
                &self.data,
                &self.items,
                &self.groups[at..],
                &mut self.iovs,
                &mut self.cmsgs,
                &mut self.msgs,
            );
            for g in &self.groups[at..at + sent] {
                if g.segment > 0 {
                    self.segmented.0 += 1;
                    self.segmented.1 += (g.end - g.first) as u64;
                }
            }
            at += sent;
            let Some(e) = failed else { return Ok(()) };
            if sent > 0 {
                again = false;
            }
            if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::ENOBUFS)) {
                return Err(e);
            }
            let g = self.groups[at];
            if g.segment > 0 && refuses_segmenting(&e) {
                if self.refused.len() >= MAX_REFUSED {
                    self.refused.clear();
                }
                self.refused.insert(self.items[g.first].flow);
                let end = self.groups.last().map_or(g.end, |last| last.end);
                self.groups.truncate(at);
                self.groups.extend((g.first..end).map(|k| Group { first: k, end: k + 1, segment: 0 }));
                again = false;
            } else if again {
                return Err(e);
            } else {
                again = true;
                self.sent_again += 1;
            }
        }
        Ok(())
    }
}

/// The payload one IPv4 send on `fd` can carry within its route's MTU (IP_MTU, the path's
/// as the kernel knows it now), at most [`MAX_SEGMENTED_BYTES`]; 0 when it cannot be read.
fn route_mtu_payload(fd: BorrowedFd<'_>) -> usize {
    sock::get_int(fd, libc::IPPROTO_IP, libc::IP_MTU)
        .map_or(0, |mtu| usize::try_from(mtu).unwrap_or(0).saturating_sub(28).min(MAX_SEGMENTED_BYTES))
}

/// The errors of a segmented send that a plain one need not meet (the message is refused
/// whole): EIO through IPsec, EMSGSIZE for a datagram above the route's MTU (EINVAL on
/// older kernels, as with checksums off), EPERM from a host firewall that judges the unsplit
/// message, ENOPROTOOPT or EOPNOTSUPP where segmenting is not there at all.
fn refuses_segmenting(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EMSGSIZE | libc::EINVAL | libc::EPERM | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Cuts one flow's datagrams `items` (at `offset` in the batch) into at most `max`
/// messages: a run of datagrams of one length, where the last may be shorter (not empty),
/// is one segmented message of at most `bound` bytes; any other datagram is a message of
/// its own (all of them when `bound` is 0).
fn group(items: &[Item], offset: usize, bound: usize, max: usize, out: &mut Vec<Group>) {
    let mut k = 0;
    while k < items.len() && out.len() < max {
        let len = items[k].len;
        let mut end = k + 1;
        let mut total = len;
        if len > 0 && len <= usize::from(u16::MAX) {
            while end < items.len() && end - k < MAX_SEGMENTS {
                let next = items[end].len;
                if next == 0 || next > len || total + next > bound {
                    break;
                }
                total += next;
                end += 1;
                if next < len {
                    break; // only the last may be shorter
                }
            }
        }
        let segment = if end - k > 1 { len as u16 } else { 0 };
        out.push(Group { first: offset + k, end: offset + end, segment });
        k = end;
    }
}

/// Sends `groups` on `fd` (to `to`, when it is not connected) with sendmmsg until one
/// fails: how many went, and the failure.
#[allow(clippy::too_many_arguments)]
fn send_many(
    fd: RawFd,
    to: Option<&(libc::sockaddr_storage, libc::socklen_t)>,
    data: &[u8],
    items: &[Item],
    groups: &[Group],
    iovs: &mut Vec<libc::iovec>,
    cmsgs: &mut Vec<SegmentCmsg>,
    msgs: &mut Vec<libc::mmsghdr>,
) -> (usize, Option<io::Error>) {
    // A group's datagrams were pushed one after another: its bytes are one slice.
    iovs.clear();
    iovs.extend(groups.iter().map(|g| {
        let start = items[g.first].start;
        let last = items[g.end - 1];
        libc::iovec { iov_base: data[start..].as_ptr() as *mut libc::c_void, iov_len: last.start + last.len - start }
    }));
    cmsgs.clear();
    cmsgs.resize(groups.len(), SegmentCmsg::default());
    msgs.clear();
    // SAFETY: an all-zero mmsghdr is valid; each is pointed at one iovec (and a control
    // message when segmented) below.
    msgs.extend((0..groups.len()).map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() }));
    for (((m, iov), cmsg), g) in msgs.iter_mut().zip(iovs.iter_mut()).zip(cmsgs.iter_mut()).zip(groups) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
        if let Some((addr, len)) = to {
            // The kernel only reads the address.
            m.msg_hdr.msg_name = addr as *const libc::sockaddr_storage as *mut libc::c_void;
            m.msg_hdr.msg_namelen = *len;
        }
        if g.segment > 0 {
            let value = g.segment.to_ne_bytes();
            // SAFETY: the buffer is 8-aligned and holds CMSG_SPACE(2) bytes; CMSG_FIRSTHDR
            // points into it once msg_control and msg_controllen are set.
            unsafe {
                m.msg_hdr.msg_control = cmsg.0.as_mut_ptr().cast();
                m.msg_hdr.msg_controllen = libc::CMSG_SPACE(value.len() as u32) as _;
                let c = libc::CMSG_FIRSTHDR(&m.msg_hdr);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(value.len() as u32) as _;
                std::ptr::copy_nonoverlapping(value.as_ptr(), libc::CMSG_DATA(c), value.len());
            }
        }
    }
    let mut sent = 0;
    while sent < msgs.len() {
        // SAFETY: msgs[sent..] and the iovecs, control messages and address they point to
        // live across the call.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                msgs[sent..].as_mut_ptr(),
                (msgs.len() - sent) as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (sent, Some(e));
        }
        if r == 0 {
            return (sent, Some(io::ErrorKind::WriteZero.into()));
        }
        sent += r as usize;
    }
    (sent, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::{AsFd, AsRawFd};
    use std::time::Duration;

    fn flow(slot: u32) -> FlowId {
        FlowId { slot, generation: 7 }
    }

    /// A receiver on the loopback and a sender connected to it.
    fn pair(v6: bool) -> (UdpSocket, UdpSocket) {
        let at = if v6 { "[::1]:0" } else { "127.0.0.1:0" };
        let rx = UdpSocket::bind(at).unwrap();
        // What rmem_max allows (at least 416 KiB): the tests send a few hundred KiB at once.
        sock::set_int(rx.as_fd(), libc::SOL_SOCKET, libc::SO_RCVBUF, 4 << 20).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let tx = UdpSocket::bind(at).unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        (rx, tx)
    }

    /// Datagram `index` of `len` bytes, each one different.
    fn datagram(index: usize, len: usize) -> Vec<u8> {
        (0..len).map(|b| (index * 31 + b * 7) as u8).collect()
    }

    /// The datagrams on `rx`, in order: `expected` of them waited for (loopback delivers
    /// them within the send, unless its softirq work was deferred), then any more waiting.
    fn received(rx: &UdpSocket, expected: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        rx.set_nonblocking(false).unwrap();
        while got.len() < expected {
            match rx.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break, // the read timeout: what came is compared
            }
        }
        rx.set_nonblocking(true).unwrap();
        while let Ok(n) = rx.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        got
    }

    /// A queued datagram of flow 1 at `start`, for the grouping tests (never sent).
    fn item(start: usize, len: usize) -> Item {
        Item { flow: flow(1), fd: -1, start, len, segmenting: Segmenting::Full, to: None }
    }

    fn lengths(groups: &[Group]) -> Vec<(usize, usize, u16)> {
        groups.iter().map(|g| (g.first, g.end, g.segment)).collect()
    }

    #[test]
    fn datagrams_of_one_length_in_a_row_make_one_message() {
        let items: Vec<_> = [300, 300, 300, 150, 300, 0, 300, 300, 301, 5]
            .iter()
            .scan(0, |start, &len| {
                let item = item(*start, len);
                *start += len;
                Some(item)
            })
            .collect();
        let mut out = Vec::new();
        group(&items, 10, MAX_SEGMENTED_BYTES, MAX_MSGS, &mut out);
        // A shorter one ends a group; an empty one is alone (it would vanish in a segmented
        // send); a longer one starts a new group, which a shorter one may end.
        assert_eq!(lengths(&out), [(10, 14, 300), (14, 15, 0), (15, 16, 0), (16, 18, 300), (18, 20, 301)]);
        out.clear();
        group(&items, 0, 0, MAX_MSGS, &mut out);
        assert_eq!(out.len(), items.len(), "one message each when the flow is not segmented");
        assert!(out.iter().all(|g| g.segment == 0 && g.end == g.first + 1));
        out.clear();
        group(&items, 0, MAX_SEGMENTED_BYTES, 2, &mut out);
        assert_eq!(lengths(&out), [(0, 4, 300), (4, 5, 0)], "at most `max` messages");
    }

    #[test]
    fn a_group_holds_at_most_the_kernels_segments_and_one_datagrams_bytes() {
        let items: Vec<_> = (0..200).map(|k| item(k * 100, 100)).collect();
        let mut out = Vec::new();
        group(&items, 0, MAX_SEGMENTED_BYTES, MAX_MSGS, &mut out);
        assert_eq!(lengths(&out), [(0, 63, 100), (63, 126, 100), (126, 189, 100), (189, 200, 100)]);
        out.clear();
        group(&items, 0, 1472, MAX_MSGS, &mut out);
        assert_eq!(out[0].end - out[0].first, 14, "within an IPv4 route's MTU of 1500: 14 of 100 bytes");
        let items: Vec<_> = (0..10).map(|k| item(k * 30_000, 30_000)).collect();
        out.clear();
        group(&items, 0, MAX_SEGMENTED_BYTES, MAX_MSGS, &mut out);
        assert!(out.iter().all(|g| g.end - g.first == 2), "two of 30,000 bytes fit in 65,507, three do not");
    }

    #[test]
    fn segmented_sends_arrive_as_the_datagrams_pushed() {
        for v6 in [false, true] {
            let (rx, tx) = pair(v6);
            let (rx2, tx2) = pair(v6);
            let segmenting = if v6 { Segmenting::Full } else { Segmenting::RouteMtu };
            let mut batch = UdpBatch::default();
            let lens =
                [1400; 40].into_iter().chain([700, 1200, 1200, 0, 1]).chain([200; 100]).chain([65_000, 9000, 9000]);
            let mut sent = Vec::new();
            let mut other = Vec::new();
            for (i, len) in lens.enumerate() {
                let d = datagram(i, len);
                batch.push(flow(1), tx.as_raw_fd(), &d, segmenting, None);
                sent.push(d);
                if i % 50 == 49 {
                    // Another flow's datagram between: each flow's runs are sent apart.
                    let d = datagram(1000 + i, 64);
                    batch.push(flow(2), tx2.as_raw_fd(), &d, segmenting, None);
                    other.push(d);
                }
            }
            batch.flush();
            assert!(batch.is_empty());
            assert_eq!(received(&rx, sent.len()), sent, "v6 {v6}");
            assert_eq!(received(&rx2, other.len()), other, "v6 {v6}");
            let (messages, datagrams) = batch.segmented;
            assert!(messages >= 4 && datagrams >= 130, "segmented {messages} messages of {datagrams} datagrams");
        }
    }

    #[test]
    fn a_socket_that_refuses_segmenting_still_gets_every_datagram() {
        let (rx, tx) = pair(false);
        // Without UDP checksums (SO_NO_CHECK), the kernel refuses segmented sends (EINVAL).
        sock::set_int(tx.as_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap();
        let mut batch = UdpBatch::default();
        let mut sent = Vec::new();
        for round in 0..2 {
            // Two groups a flush: the one after the refused one goes one by one too.
            for i in 0..30 {
                let d = datagram(round * 100 + i, if i < 15 { 500 } else { 300 });
                batch.push(flow(1), tx.as_raw_fd(), &d, Segmenting::Full, None);
                sent.push(d);
            }
            batch.flush();
        }
        assert_eq!(received(&rx, sent.len()), sent);
        assert_eq!(batch.segmented, (0, 0));
        assert!(batch.refused.contains(&flow(1)), "the flow is remembered as refusing");
    }

    /// An ICMP port unreachable leaves ECONNREFUSED on the socket, which the next send
    /// reports (sending nothing): the batch sends that message again, and loses nothing.
    #[test]
    fn an_error_the_socket_held_costs_no_datagram() {
        for v6 in [false, true] {
            let (rx, tx) = pair(v6);
            // Port 9 (discard), where nothing listens here: the refusal stays on the socket
            // across the connect to the receiver.
            let nobody = if v6 { "[::1]:9" } else { "127.0.0.1:9" };
            tx.connect(nobody).unwrap();
            tx.send(b"to nobody").unwrap();
            std::thread::sleep(Duration::from_millis(50)); // the ICMP error comes back
            tx.connect(rx.local_addr().unwrap()).unwrap();
            let mut batch = UdpBatch::default();
            let mut sent = Vec::new();
            for i in 0..100 {
                let d = datagram(i, if i < 50 { 1000 } else { 7 + i % 3 });
                batch.push(flow(1), tx.as_raw_fd(), &d, Segmenting::Full, None);
                sent.push(d);
            }
            batch.flush();
            assert_eq!(received(&rx, sent.len()), sent, "v6 {v6}");
            assert_eq!(batch.sent_again, 1, "the refusal was met, once (v6 {v6})");
        }
    }

    /// The kernels this runs on segment UDP sends, and a loopback route lets one IPv4 send
    /// carry all 65,507 bytes (lo's MTU is 65536).
    #[test]
    fn this_kernel_segments_and_the_loopback_takes_whole_groups() {
        assert!(super::super::dial::probe_udp_segment());
        let (_rx, tx) = pair(false);
        assert_eq!(route_mtu_payload(tx.as_fd()), MAX_SEGMENTED_BYTES);
    }

    #[test]
    fn a_services_socketpair_gets_each_datagram_as_a_message_of_its_own() {
        // The gateway's services take datagrams on SOCK_SEQPACKET socketpairs, which would
        // take a segmented send as one message.
        let (ours, service) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let mut batch = UdpBatch::default();
        let sent: Vec<_> = (0..20).map(|i| datagram(i, 100)).collect();
        for d in &sent {
            batch.push(flow(3), ours.as_raw_fd(), d, Segmenting::Never, None);
        }
        batch.flush();
        service.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = service.recv(&mut buf) {
            got.push(buf[..n].to_vec());
        }
        assert_eq!(got, sent);
        assert_eq!(batch.segmented, (0, 0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Any mix of lengths and flows: each flow's socket receives exactly its datagrams,
        /// in order.
        #[test]
        fn any_datagrams_arrive_whole_and_in_order(
            sends in proptest::collection::vec((0usize..3, proptest::sample::select(vec![0usize, 1, 99, 100, 1472, 3000])), 0..120)
        ) {
            let pairs: Vec<_> = (0..3).map(|_| pair(false)).collect();
            let mut batch = UdpBatch::default();
            let mut sent = vec![Vec::new(); 3];
            for (i, &(f, len)) in sends.iter().enumerate() {
                let d = datagram(i, len);
                if batch.full(len) {
                    batch.flush();
                }
                batch.push(flow(f as u32), pairs[f].1.as_raw_fd(), &d, Segmenting::Full, None);
                sent[f].push(d);
            }
            batch.flush();
            for (f, (rx, _)) in pairs.iter().enumerate() {
                proptest::prop_assert_eq!(&received(rx, sent[f].len()), &sent[f]);
            }
        }
    }
}
