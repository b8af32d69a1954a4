//! IP reassembly: a guest's fragmented datagrams made whole again, over IPv4 (RFC 791) and
//! IPv6 (RFC 8200 section 4.5).
//!
//! Theory of operation. A guest fragments what does not fit its MTU: a UDP datagram above
//! 1,472 bytes on a VM's 1500-byte link (a large DNS query, syslog, NFS, Kerberos), a big
//! ping. usernet re-creates each datagram from a host socket, which takes it whole, so the
//! fragments are put together here first; the engine then handles the datagram as if it had
//! come in one frame (dispatch.rs). The other way, the switch cuts what is too large for the
//! guest's link into fragments (`Switch::fragment`), so the guest's kernel reassembles.
//!
//! A datagram is known by its source, destination and identification (and protocol, over
//! IPv4). Each fragment's bytes are copied to their place in the datagram's buffer as it
//! comes, in any order, and the ranges held are kept merged; the datagram is whole when
//! its last fragment (no more-fragments flag) fixed its length and the ranges cover it.
//! What cannot be part of a datagram discards the whole datagram and every fragment of it
//! held, as Linux does: a fragment overlapping bytes held, unless all its bytes are held
//! already (a duplicate, ignored, the first copy kept: RFC 5722 and its erratum); a fragment reaching past 64 KiB or past
//! the end a last fragment set; a second last fragment that disagrees; a fragment other
//! than the last whose length is not a multiple of 8. An IPv6 fragment with offset 0 and no
//! more to come (an atomic fragment, RFC 6946) is whole by itself and touches no datagram.
//!
//! A guest is untrusted, so what this holds is bounded: at most [`MAX_DATAGRAMS`]
//! datagrams in progress and [`MAX_BYTES`] of their buffers (each as long as its furthest
//! fragment reaches), at most [`MAX_RANGES`] separate ranges a datagram, and
//! [`TIMEOUT`] for a datagram to complete (Linux's `ipfrag_time`). A new datagram that
//! would pass a bound evicts the oldest ones (the engine counts and logs the limit): its
//! source's own once that source holds half of the datagrams or bytes, so that a guest
//! that floods fragments does not take the room of another's datagrams; and a
//! datagram past its time is dropped when the next fragment comes or at the engine's
//! timers. Reassembly is not on the data path of a stream: TCP never fragments.

use std::net::IpAddr;
use std::time::{Duration, Instant};

/// Datagrams being reassembled at once.
pub const MAX_DATAGRAMS: usize = 64;
/// Bytes of buffers for datagrams being reassembled, all together.
pub const MAX_BYTES: usize = 1 << 20;
/// Separate ranges of data (what lies between holes) one datagram may hold.
pub const MAX_RANGES: usize = 64;
/// Time a datagram has from its first fragment to complete.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Which datagram a fragment belongs to. `protocol` is IPv4's; IPv6 keys have 0 there (its
/// datagram is known by addresses and identification alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub ident: u32,
}

/// One fragment: where its data goes in the datagram, and whether more follow.
#[derive(Clone, Copy, Debug)]
pub struct Piece<'a> {
    pub offset: usize,
    pub more: bool,
    /// The upper-layer protocol this fragment names (the datagram's is the first
    /// fragment's).
    pub protocol: u8,
    pub data: &'a [u8],
}

/// A datagram made whole.
#[derive(Debug)]
pub struct Whole {
    pub protocol: u8,
    /// The datagram's payload from [`Reassembly::head`] on; the bytes before are left for
    /// the headers the engine writes in front of it.
    pub packet: Vec<u8>,
}

/// What a fragment did.
#[derive(Debug, Default)]
pub struct Added {
    /// Its datagram is whole.
    pub whole: Option<Whole>,
    /// Fragments dropped: this one if refused, with those held of a datagram it
    /// discarded, and those of datagrams evicted or timed out.
    pub dropped: u64,
    /// A datagram was evicted to keep within [`MAX_DATAGRAMS`] or [`MAX_BYTES`].
    pub evicted: bool,
}

struct Datagram {
    key: Key,
    started: Instant,
    /// The protocol, once the fragment at offset 0 came.
    protocol: Option<u8>,
    /// The datagram's length, once its last fragment came.
    total: Option<usize>,
    /// The ranges held, sorted, merged where they touch.
    ranges: Vec<(usize, usize)>,
    /// `head` bytes of room, then the datagram's bytes as far as any fragment reached.
    packet: Vec<u8>,
    fragments: u64,
}

impl Datagram {
    fn bytes(&self) -> usize {
        self.packet.len()
    }
}

pub struct Reassembly {
    head: usize,
    /// In order of their first fragment: the oldest first.
    datagrams: Vec<Datagram>,
    bytes: usize,
}

/// Why a fragment discards its datagram.
enum Refused {
    /// This fragment alone is dropped (a duplicate).
    Duplicate,
    /// The datagram it belongs to is discarded with it.
    Datagram,
}

impl Reassembly {
    /// Datagrams are made whole with `head` bytes of room in front of their payload.
    pub fn new(head: usize) -> Reassembly {
        Reassembly { head, datagrams: Vec::new(), bytes: 0 }
    }

    pub fn head(&self) -> usize {
        self.head
    }

    pub fn is_empty(&self) -> bool {
        self.datagrams.is_empty()
    }

    /// Datagrams in progress and the bytes they hold.
    #[cfg(test)]
    pub fn held(&self) -> (usize, usize) {
        (self.datagrams.len(), self.bytes)
    }

    /// Takes one fragment of the datagram `key`, whose payload may be at most `max_len`
    /// bytes (the IP header's length field bounds it).
    pub fn add(&mut self, key: Key, piece: Piece<'_>, max_len: usize, now: Instant) -> Added {
        let mut added = Added { dropped: self.expire(now), ..Added::default() };
        let end = piece.offset + piece.data.len();
        if piece.offset == 0 && !piece.more && key.protocol == 0 {
            // An IPv6 atomic fragment: whole as it is.
            let mut packet = vec![0; self.head + end];
            packet[self.head..].copy_from_slice(piece.data);
            added.whole = Some(Whole { protocol: piece.protocol, packet });
            return added;
        }
        let mut at = self.datagrams.iter().position(|d| d.key == key);
        let valid = end <= max_len && (!piece.more || (!piece.data.is_empty() && piece.data.len().is_multiple_of(8)));
        if !valid {
            added.dropped += 1 + at.map_or(0, |i| self.discard(i));
            return added;
        }
        // Room first: older datagrams go (never this fragment's own) until a new datagram
        // fits the count, and this fragment's bytes fit the total. A source that holds half
        // of either already makes room from its own, so that one guest flooding fragments
        // cannot evict another's (`serve`: guests are bound to their addresses).
        let grow = (self.head + end).saturating_sub(at.map_or(0, |i| self.datagrams[i].bytes()));
        while (at.is_none() && self.datagrams.len() >= MAX_DATAGRAMS) || self.bytes + grow > MAX_BYTES {
            let own = self.datagrams.iter().filter(|d| d.key.src == key.src);
            let (count, bytes) = own.fold((0, 0), |(c, b), d| (c + 1, b + d.bytes()));
            let greedy = 2 * count >= MAX_DATAGRAMS || 2 * (bytes + grow) > MAX_BYTES;
            let others = || (0..self.datagrams.len()).filter(|&v| Some(v) != at);
            let own_first = others().find(|&v| greedy && self.datagrams[v].key.src == key.src);
            let Some(victim) = own_first.or_else(|| others().next()) else { break };
            added.dropped += self.discard(victim);
            added.evicted = true;
            if let Some(i) = at.as_mut()
                && victim < *i
            {
                *i -= 1;
            }
        }
        let i = match at {
            Some(i) => i,
            None => {
                self.datagrams.push(Datagram {
                    key,
                    started: now,
                    protocol: None,
                    total: None,
                    ranges: Vec::new(),
                    packet: vec![0; self.head],
                    fragments: 0,
                });
                self.bytes += self.head;
                self.datagrams.len() - 1
            }
        };
        match self.place(i, piece, end) {
            Ok(()) => {}
            Err(Refused::Duplicate) => {
                added.dropped += 1;
                return added;
            }
            Err(Refused::Datagram) => {
                added.dropped += 1 + self.discard(i);
                return added;
            }
        }
        let d = &self.datagrams[i];
        if let (Some(total), Some(protocol)) = (d.total, d.protocol)
            && d.ranges == [(0, total)]
        {
            let mut d = self.datagrams.remove(i);
            self.bytes -= d.bytes();
            d.packet.truncate(self.head + total);
            added.whole = Some(Whole { protocol, packet: d.packet });
        }
        added
    }

    /// Puts `piece` (ending at `end`) into datagram `i`.
    fn place(&mut self, i: usize, piece: Piece<'_>, end: usize) -> Result<(), Refused> {
        let head = self.head;
        let d = &mut self.datagrams[i];
        let start = piece.offset;
        // Bytes held already: a duplicate (a last fragment's only where the last one ended),
        // ignored with the first copy kept; a part of them, an overlap.
        let within = d.ranges.iter().any(|&(s, e)| s <= start && end <= e) && start < end;
        if (within && (piece.more || d.total == Some(end))) || (start == end && d.total == Some(end) && !piece.more) {
            return Err(Refused::Duplicate);
        }
        if within || d.ranges.iter().any(|&(s, e)| start < e && s < end) {
            return Err(Refused::Datagram);
        }
        match (piece.more, d.total) {
            (false, Some(_)) => return Err(Refused::Datagram),
            (false, None) if d.ranges.last().is_some_and(|&(_, e)| e > end) => return Err(Refused::Datagram),
            (false, None) => d.total = Some(end),
            (true, Some(total)) if end > total => return Err(Refused::Datagram),
            (true, _) => {}
        }
        // Where the new range goes, merged with the ranges it touches.
        let after = d.ranges.partition_point(|&(s, _)| s < start);
        let joins_before = after > 0 && d.ranges[after - 1].1 == start;
        let joins_after = d.ranges.get(after).is_some_and(|&(s, _)| s == end);
        match (joins_before, joins_after) {
            (true, true) => {
                d.ranges[after - 1].1 = d.ranges[after].1;
                d.ranges.remove(after);
            }
            (true, false) => d.ranges[after - 1].1 = end,
            (false, true) => d.ranges[after].0 = start,
            (false, false) if start == end => {}
            (false, false) => {
                if d.ranges.len() == MAX_RANGES {
                    return Err(Refused::Datagram);
                }
                d.ranges.insert(after, (start, end));
            }
        }
        if d.packet.len() < head + end {
            self.bytes += head + end - d.packet.len();
            d.packet.resize(head + end, 0);
        }
        d.packet[head + start..head + end].copy_from_slice(piece.data);
        if start == 0 {
            d.protocol = Some(piece.protocol);
        }
        d.fragments += 1;
        Ok(())
    }

    /// Drops datagram `i`; returns how many fragments it held.
    fn discard(&mut self, i: usize) -> u64 {
        let d = self.datagrams.remove(i);
        self.bytes -= d.bytes();
        d.fragments
    }

    /// Drops the datagrams whose time ran out; returns how many fragments they held.
    pub fn expire(&mut self, now: Instant) -> u64 {
        let mut dropped = 0;
        while self.datagrams.first().is_some_and(|d| now.saturating_duration_since(d.started) >= TIMEOUT) {
            dropped += self.discard(0);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    const HEAD: usize = 54;
    const MAX: usize = 65515;

    fn key(ident: u32) -> Key {
        Key { src: Ipv4Addr::new(192, 168, 65, 2).into(), dst: Ipv4Addr::new(127, 0, 0, 1).into(), protocol: 17, ident }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// Feeds `data` to `r` as fragments of `size` bytes in the order `order` gives (indices
    /// of the fragments); returns what the last one did.
    fn feed(r: &mut Reassembly, k: Key, data: &[u8], size: usize, order: &[usize], now: Instant) -> Added {
        let n = data.len().div_ceil(size);
        let mut last = Added::default();
        for &i in order {
            assert!(i < n);
            let end = ((i + 1) * size).min(data.len());
            let piece = Piece { offset: i * size, more: end < data.len(), protocol: 17, data: &data[i * size..end] };
            last = r.add(k, piece, MAX, now);
        }
        last
    }

    fn whole(added: Added) -> Vec<u8> {
        let w = added.whole.expect("whole");
        assert_eq!(w.protocol, 17);
        w.packet[HEAD..].to_vec()
    }

    #[test]
    fn in_order_reversed_and_shuffled() {
        let now = Instant::now();
        let d = data(4000);
        for order in [vec![0, 1, 2], vec![2, 1, 0], vec![1, 2, 0], vec![2, 0, 1]] {
            let mut r = Reassembly::new(HEAD);
            let last = feed(&mut r, key(1), &d, 1480, &order, now);
            assert_eq!(whole(last), d, "{order:?}");
            assert!(r.is_empty());
            assert_eq!(r.held(), (0, 0));
        }
    }

    #[test]
    fn not_whole_until_every_byte_came() {
        let now = Instant::now();
        let d = data(4000);
        let mut r = Reassembly::new(HEAD);
        let a = feed(&mut r, key(1), &d, 1480, &[0, 2], now);
        assert!(a.whole.is_none() && a.dropped == 0);
        assert_eq!(r.held(), (1, HEAD + 4000));
        assert_eq!(whole(feed(&mut r, key(1), &d, 1480, &[1], now)), d);
    }

    #[test]
    fn datagrams_apart_by_key() {
        let now = Instant::now();
        let (a, b) = (data(3000), data(2000).iter().map(|x| x ^ 0xff).collect::<Vec<_>>());
        let mut r = Reassembly::new(HEAD);
        feed(&mut r, key(1), &a, 1480, &[0], now);
        feed(&mut r, key(2), &b, 1480, &[0], now);
        let mut other_proto = key(1);
        other_proto.protocol = 1;
        let ignored = r.add(other_proto, Piece { offset: 1480, more: true, protocol: 1, data: &a[..8] }, MAX, now);
        assert!(ignored.whole.is_none());
        assert_eq!(whole(feed(&mut r, key(2), &b, 1480, &[1], now)), b);
        assert_eq!(whole(feed(&mut r, key(1), &a, 1480, &[1, 2], now)), a);
        assert_eq!(r.held().0, 1, "the other protocol's datagram is its own");
    }

    #[test]
    fn an_exact_duplicate_is_ignored() {
        let now = Instant::now();
        let d = data(4000);
        let mut r = Reassembly::new(HEAD);
        feed(&mut r, key(1), &d, 1480, &[0, 1], now);
        let dup = feed(&mut r, key(1), &d, 1480, &[1], now);
        assert_eq!((dup.dropped, dup.whole.is_none()), (1, true));
        assert_eq!(whole(feed(&mut r, key(1), &d, 1480, &[2], now)), d);
    }

    #[test]
    fn an_overlap_discards_the_datagram() {
        let now = Instant::now();
        let d = data(4000);
        let mut r = Reassembly::new(HEAD);
        feed(&mut r, key(1), &d, 1480, &[0, 2], now);
        // 8 bytes into the first fragment's range.
        let a = r.add(key(1), Piece { offset: 1472, more: true, protocol: 17, data: &d[1472..2960] }, MAX, now);
        assert_eq!((a.dropped, a.whole.is_none()), (3, true));
        assert!(r.is_empty());
        // Its remaining fragments start a new datagram, which never completes.
        assert!(feed(&mut r, key(1), &d, 1480, &[1], now).whole.is_none());
    }

    #[test]
    fn lengths_that_cannot_be() {
        let now = Instant::now();
        let d = data(4000);
        let mut r = Reassembly::new(HEAD);
        // Not the last, and not a multiple of 8.
        let a = r.add(key(1), Piece { offset: 0, more: true, protocol: 17, data: &d[..1001] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (1, true));
        // Not the last, and empty.
        let a = r.add(key(1), Piece { offset: 8, more: true, protocol: 17, data: &[] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (1, true));
        // Past the most an IP header can say, alone and into a datagram held.
        let a = r.add(key(1), Piece { offset: MAX - 8, more: false, protocol: 17, data: &d[..16] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (1, true));
        feed(&mut r, key(2), &d, 1480, &[0], now);
        let a = r.add(key(2), Piece { offset: 65528, more: true, protocol: 17, data: &d[..8] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (2, true));
        // Past the end the last fragment set, and a second last fragment.
        feed(&mut r, key(3), &d, 1480, &[2], now);
        let a = r.add(key(3), Piece { offset: 4000, more: true, protocol: 17, data: &d[..8] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (2, true));
        feed(&mut r, key(4), &d, 1480, &[2], now);
        let a = r.add(key(4), Piece { offset: 1480, more: false, protocol: 17, data: &d[..8] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (2, true));
        // A last fragment that ends before data held.
        feed(&mut r, key(5), &d, 1480, &[1], now);
        let a = r.add(key(5), Piece { offset: 0, more: false, protocol: 17, data: &d[..8] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (2, true));
    }

    #[test]
    fn the_protocol_is_the_first_fragments() {
        let now = Instant::now();
        let d = data(3000);
        let mut r = Reassembly::new(HEAD);
        let k = Key { protocol: 0, ..key(9) };
        r.add(k, Piece { offset: 1480, more: false, protocol: 44, data: &d[1480..] }, MAX, now);
        let w = r.add(k, Piece { offset: 0, more: true, protocol: 17, data: &d[..1480] }, MAX, now).whole.unwrap();
        assert_eq!((w.protocol, &w.packet[HEAD..]), (17, &d[..]));
    }

    #[test]
    fn an_atomic_fragment_is_whole_and_leaves_the_rest_alone() {
        let now = Instant::now();
        let d = data(3000);
        let mut r = Reassembly::new(HEAD);
        let k = Key { protocol: 0, ..key(9) };
        r.add(k, Piece { offset: 1480, more: false, protocol: 17, data: &d[1480..] }, MAX, now);
        let w = r.add(k, Piece { offset: 0, more: false, protocol: 58, data: b"ping" }, MAX, now).whole.unwrap();
        assert_eq!((w.protocol, &w.packet[HEAD..]), (58, &b"ping"[..]));
        assert_eq!(r.held().0, 1);
        let w = r.add(k, Piece { offset: 0, more: true, protocol: 17, data: &d[..1480] }, MAX, now).whole.unwrap();
        assert_eq!(&w.packet[HEAD..], &d[..]);
    }

    #[test]
    fn a_datagram_has_its_time() {
        let now = Instant::now();
        let d = data(4000);
        let mut r = Reassembly::new(HEAD);
        feed(&mut r, key(1), &d, 1480, &[0, 1], now);
        assert_eq!(r.expire(now + TIMEOUT - Duration::from_millis(1)), 0);
        let late = feed(&mut r, key(1), &d, 1480, &[2], now + TIMEOUT);
        assert_eq!((late.dropped, late.whole.is_none()), (2, true));
        assert_eq!(r.held().0, 1, "the late fragment starts a datagram of its own");
        assert_eq!(r.expire(now + 2 * TIMEOUT), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn bounded_in_datagrams_bytes_and_ranges() {
        let now = Instant::now();
        let d = data(65000);
        let mut r = Reassembly::new(HEAD);
        for i in 0..MAX_DATAGRAMS as u32 {
            assert!(!feed(&mut r, key(i), &d[..3000], 1480, &[0], now).evicted);
        }
        let a = feed(&mut r, key(1000), &d[..3000], 1480, &[0], now);
        assert_eq!((a.evicted, a.dropped, r.held().0), (true, 1, MAX_DATAGRAMS));
        // The oldest went: its next fragment starts anew, the others still complete.
        assert!(feed(&mut r, key(0), &d[..3000], 1480, &[1, 2], now).whole.is_none());
        assert!(feed(&mut r, key(2), &d[..3000], 1480, &[1, 2], now).whole.is_some());

        // Bytes: each datagram's last fragment first, so each holds 65 KiB at once.
        let mut r = Reassembly::new(HEAD);
        let fit = MAX_BYTES / (HEAD + 65000);
        let mut evicted = 0;
        for i in 0..fit as u32 + 3 {
            let a = r.add(key(i), Piece { offset: 64992, more: false, protocol: 17, data: &d[..8] }, MAX, now);
            evicted += u32::from(a.evicted);
            assert!(r.held().1 <= MAX_BYTES);
        }
        assert_eq!((r.held().0, evicted), (fit, 3));

        // Ranges: every other 8-byte piece.
        let mut r = Reassembly::new(HEAD);
        for i in 0..MAX_RANGES {
            let a = r.add(key(1), Piece { offset: i * 16, more: true, protocol: 17, data: &d[..8] }, MAX, now);
            assert_eq!(a.dropped, 0);
        }
        let a = r.add(key(1), Piece { offset: MAX_RANGES * 16, more: true, protocol: 17, data: &d[..8] }, MAX, now);
        assert_eq!((a.dropped, r.is_empty()), (MAX_RANGES as u64 + 1, true));
        // Filling a hole merges: the count of ranges never grows past the bound that way.
        for i in 0..2 * MAX_RANGES {
            let a = r.add(key(2), Piece { offset: i * 8, more: true, protocol: 17, data: &d[..8] }, MAX, now);
            assert_eq!(a.dropped, 0);
        }
    }

    #[test]
    fn a_source_that_floods_makes_room_from_its_own() {
        let now = Instant::now();
        let d = data(3000);
        let mut r = Reassembly::new(HEAD);
        let other = Key { src: Ipv4Addr::new(192, 168, 65, 3).into(), ..key(5) };
        r.add(other, Piece { offset: 0, more: true, protocol: 17, data: &d[..1480] }, MAX, now);
        for i in 0..1000 {
            let a = feed(&mut r, key(i), &d, 1480, &[0], now);
            assert!(r.held().0 <= MAX_DATAGRAMS, "{i}");
            assert!(i < MAX_DATAGRAMS as u32 || a.evicted);
        }
        let a = r.add(other, Piece { offset: 1480, more: false, protocol: 17, data: &d[1480..] }, MAX, now);
        assert_eq!(a.whole.expect("the other source's datagram survived the flood").packet[HEAD..], d[..]);
        // By bytes too: fragments that reach far.
        let mut r = Reassembly::new(HEAD);
        r.add(other, Piece { offset: 0, more: true, protocol: 17, data: &d[..1480] }, MAX, now);
        for i in 0..100 {
            r.add(key(i), Piece { offset: 64000, more: true, protocol: 17, data: &d[..8] }, MAX, now);
            assert!(r.held().1 <= MAX_BYTES);
        }
        let a = r.add(other, Piece { offset: 1480, more: false, protocol: 17, data: &d[1480..] }, MAX, now);
        assert!(a.whole.is_some());
    }

    proptest! {
        /// Any fragments at all: never a panic, the bounds always hold, and a datagram made
        /// whole is exactly the bytes its fragments carried.
        #[test]
        fn never_panics_and_stays_bounded(
            pieces in proptest::collection::vec((0u32..3, 0usize..9000, any::<bool>(), 0usize..3000), 0..200)
        ) {
            let now = Instant::now();
            let d = data(70000);
            let mut r = Reassembly::new(HEAD);
            for (ident, offset, more, len) in pieces {
                let offset = offset * 8;
                let len = if more { len / 8 * 8 } else { len };
                let end = (offset + len).min(d.len());
                let piece = Piece { offset, more, protocol: 17, data: &d[offset.min(end)..end] };
                let a = r.add(key(ident), piece, MAX, now);
                prop_assert!(r.held().0 <= MAX_DATAGRAMS && r.held().1 <= MAX_BYTES);
                if let Some(w) = a.whole {
                    prop_assert!(w.packet.len() - HEAD <= MAX);
                    prop_assert_eq!(&w.packet[HEAD..], &d[..w.packet.len() - HEAD]);
                }
            }
        }
    }
}
