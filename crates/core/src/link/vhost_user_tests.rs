//! Unit tests of the vhost-user link: split rings laid out by hand in anonymous guest memory,
//! driven as a guest driver would (descriptors, available ring), read back from the used ring.

use super::*;
use crate::link::{MAX_FRAME, POLL_FRAME_BYTES, POLL_IDLE};
use proptest::prelude::*;

const SIZE: u16 = 16;
/// Where each ring's parts live in guest memory (ring `i` is 0x10000 further on).
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const DATA: u64 = 0x8000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn base(ring: usize) -> u64 {
    ring as u64 * 0x10000
}

/// A guest driver's view of the two rings.
struct Guest {
    dev: Arc<Mutex<Device>>,
    /// Next free descriptor and available index, per ring.
    next_desc: [u16; 2],
    avail_idx: [u16; 2],
    /// Next free byte of buffer space.
    data: u64,
}

impl Guest {
    fn mem<T>(&self, f: impl FnOnce(&GuestMemoryMmap) -> T) -> T {
        let dev = self.dev.lock().unwrap();
        f(dev.mem.as_ref().unwrap())
    }

    /// Makes a chain of buffers of `lens` on `ring` (each written with `fill`, write-only
    /// when `write`), offers it; returns its buffers' addresses.
    fn offer(&mut self, ring: usize, bufs: &[(&[u8], u32, u16)]) -> Vec<u64> {
        let head = self.next_desc[ring];
        let mut addrs = Vec::new();
        for (i, (fill, len, flags)) in bufs.iter().enumerate() {
            let idx = self.next_desc[ring];
            self.next_desc[ring] += 1;
            let addr = self.data;
            self.data += 0x1000;
            let last = i + 1 == bufs.len();
            let flags = flags | if last { 0 } else { F_NEXT };
            self.desc(ring, idx, addr, *len, flags, idx + 1);
            self.mem(|m| m.write_slice(fill, GuestAddress(addr)).unwrap());
            addrs.push(addr);
        }
        self.publish(ring, head);
        addrs
    }

    fn desc(&self, ring: usize, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = base(ring) + DESC + 16 * idx as u64;
        self.mem(|m| {
            m.write_obj(addr, GuestAddress(at)).unwrap();
            m.write_obj(len, GuestAddress(at + 8)).unwrap();
            m.write_obj(flags, GuestAddress(at + 12)).unwrap();
            m.write_obj(next, GuestAddress(at + 14)).unwrap();
        });
    }

    fn publish(&mut self, ring: usize, head: u16) {
        let slot = self.avail_idx[ring] % SIZE;
        self.avail_idx[ring] = self.avail_idx[ring].wrapping_add(1);
        let idx = self.avail_idx[ring];
        self.mem(|m| {
            m.write_obj(head, GuestAddress(base(ring) + AVAIL + 4 + 2 * slot as u64)).unwrap();
            m.write_obj(idx, GuestAddress(base(ring) + AVAIL + 2)).unwrap();
        });
    }

    /// The used ring's entries so far: (descriptor head, length).
    fn used(&self, ring: usize) -> Vec<(u32, u32)> {
        self.mem(|m| {
            let idx: u16 = m.read_obj(GuestAddress(base(ring) + USED + 2)).unwrap();
            (0..idx)
                .map(|i| {
                    let at = base(ring) + USED + 4 + 8 * (i % SIZE) as u64;
                    (m.read_obj(GuestAddress(at)).unwrap(), m.read_obj(GuestAddress(at + 4)).unwrap())
                })
                .collect()
        })
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem(|m| m.read_slice(&mut v, GuestAddress(addr)).unwrap());
        v
    }
}

/// The control thread's handler of a device, on a connection of its own.
fn control(dev: &Arc<Mutex<Device>>, handoff: &Handoff) -> Control {
    let (a, _b) = UnixStream::pair().unwrap();
    control_on(dev, handoff, a)
}

/// The same on `conn`, whose other end plays the front-end.
fn control_on(dev: &Arc<Mutex<Device>>, handoff: &Handoff, conn: UnixStream) -> Control {
    Control {
        dev: dev.clone(),
        conn: Arc::new(conn),
        handoff: handoff.sender(),
        name: "vu test".into(),
        sessions: 0,
        features_asked: false,
        protocol_acked: 0,
    }
}

/// A device as the control thread leaves it after QEMU's setup, and its link.
fn setup(features: u64) -> (Guest, VhostUserLink, Arc<Mutex<Device>>) {
    setup_mem(features, MEM_SIZE)
}

/// The same with `mem_size` bytes of guest memory.
fn setup_mem(features: u64, mem_size: usize) -> (Guest, VhostUserLink, Arc<Mutex<Device>>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
    let mut dev = Device::new();
    dev.acked = features;
    dev.features_set = true;
    for (i, ring) in dev.rings.iter_mut().enumerate() {
        ring.queue.set_size(SIZE);
        ring.queue.try_set_desc_table_address(GuestAddress(base(i) + DESC)).unwrap();
        ring.queue.try_set_avail_ring_address(GuestAddress(base(i) + AVAIL)).unwrap();
        ring.queue.try_set_used_ring_address(GuestAddress(base(i) + USED)).unwrap();
        ring.kick = Some(File::from(eventfd().unwrap()));
        ring.call = Some(File::from(eventfd().unwrap()));
        ring.started = true;
    }
    dev.mem = Some(mem);
    let dev = Arc::new(Mutex::new(dev));
    let handoff = Handoff::new("test").unwrap();
    let mut control = control(&dev, &handoff);
    let link = {
        let mut d = dev.lock().unwrap();
        assert!(d.can_run());
        control.start_session(&mut d).unwrap()
    };
    let guest = Guest { dev: dev.clone(), next_desc: [0; 2], avail_idx: [0; 2], data: DATA };
    (guest, link, dev)
}

/// The link hangs up with its front-end's connection (the descriptor the engine watches is
/// an epoll set of kicks, which never does).
#[test]
fn the_link_hangs_up_with_its_front_end() {
    let (_guest, _, dev) = setup(MODERN);
    let (ours, front_end) = UnixStream::pair().unwrap();
    let handoff = Handoff::new("test").unwrap();
    let mut control = control_on(&dev, &handoff, ours);
    let link = {
        let mut d = dev.lock().unwrap();
        control.start_session(&mut d).unwrap()
    };
    assert!(!link.hung_up(), "the front-end is there");
    drop(front_end);
    assert!(link.hung_up(), "the front-end went");
}

const MODERN: u64 = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_RING_F_EVENT_IDX);

#[test]
fn features_are_checked_and_decide_the_header() {
    assert_eq!(check_ack(FEATURES).unwrap(), Negotiated { hdr_len: 12, mrg_rxbuf: true, guest_offloads: true });
    assert_eq!(check_ack(0).unwrap(), Negotiated { hdr_len: 10, mrg_rxbuf: false, guest_offloads: false });
    assert_eq!(check_ack(bit(VIRTIO_F_VERSION_1)).unwrap().hdr_len, 12);
    // Offloads only with all three: a guest without TSO6 gets whole frames.
    let partial = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);
    assert!(!check_ack(partial).unwrap().guest_offloads);
    // A bit never offered (VIRTIO_NET_F_CTRL_VQ, 17) is refused.
    assert!(check_ack(FEATURES | bit(17)).unwrap_err().contains("never offered"));
    let csum = bit(virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_CSUM);
    assert_eq!(FEATURES & csum, HOST_OFFLOADS & csum);
}

#[test]
fn a_tx_frame_split_over_buffers_with_a_split_header() {
    let (mut g, mut link, _dev) = setup(MODERN);
    let frame: Vec<u8> = (0..100u8).collect();
    let mut hdr = [0u8; 12];
    hdr[0] = vnet_hdr::F_NEEDS_CSUM;
    // 5 bytes of header, then 7 bytes of header and 20 of frame, then the rest.
    let second: Vec<u8> = hdr[5..].iter().chain(&frame[..20]).copied().collect();
    g.offer(TX, &[(&hdr[..5], 5, 0), (&second, 27, 0), (&frame[20..], 80, 0)]);
    let mut buf = vec![0u8; MAX_FRAME];
    let n = link.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &frame[..]);
    assert_eq!(g.used(TX), vec![(0, 0)]);
    assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    // A second frame offered after the first look is read too.
    g.offer(TX, &[(&[0u8; 12], 12, 0), (b"hello", 5, 0)]);
    assert_eq!(link.recv(&mut buf).unwrap(), 5);
    assert_eq!(&buf[..5], b"hello");
    link.flush().unwrap();
}

#[test]
fn an_rx_frame_spreads_over_merged_buffers() {
    let (mut g, mut link, _dev) = setup(MODERN);
    let a = g.offer(RX, &[(&[], 16, F_WRITE)]);
    let b = g.offer(RX, &[(&[], 16, F_WRITE)]);
    let c = g.offer(RX, &[(&[], 16, F_WRITE)]);
    let frame: Vec<u8> = (100..130u8).collect();
    link.send(&frame).unwrap();
    // 12 + 30 bytes: 16, 16 and 10.
    assert_eq!(g.used(RX), vec![(0, 16), (1, 16), (2, 10)]);
    let mut got = g.read(a[0], 16);
    got.extend(g.read(b[0], 16));
    got.extend(g.read(c[0], 10));
    let (h, f) = got.split_at(12);
    assert_eq!(&h[..10], &[0u8; 10]);
    assert_eq!(u16::from_le_bytes([h[10], h[11]]), 3, "num_buffers");
    assert_eq!(f, &frame[..]);
    link.flush().unwrap();
}

#[test]
fn without_mrg_rxbuf_a_frame_needs_one_chain() {
    let (mut g, mut link, _dev) = setup(bit(VIRTIO_F_VERSION_1));
    g.offer(RX, &[(&[], 16, F_WRITE)]);
    g.offer(RX, &[(&[], 16, F_WRITE), (&[], 64, F_WRITE)]);
    // Too big for the first chain, and never cut over two: dropped, the chain kept.
    link.send(&[7u8; 40]).unwrap();
    assert!(!link.backlogged());
    assert_eq!(link.dropped, 1);
    assert!(g.used(RX).is_empty());
    // A short frame takes the first chain, the next one the second (80 bytes).
    link.send(&[1u8; 4]).unwrap();
    link.send(&[2u8; 60]).unwrap();
    assert_eq!(g.used(RX), vec![(0, 16), (1, 72)]);
    // No chain left: the next frame waits.
    link.send(&[3u8; 4]).unwrap();
    assert!(link.backlogged());
}

/// An eventfd's count since the last look (0 when it was not written).
fn eventfd_count(fd: &File) -> u64 {
    let mut count = [0u8; 8];
    match std::io::Read::read(&mut &*fd, &mut count) {
        Ok(_) => u64::from_ne_bytes(count),
        Err(_) => 0,
    }
}

/// The interrupts of `ring` since the last look.
fn interrupts(dev: &Arc<Mutex<Device>>, ring: usize) -> u64 {
    eventfd_count(dev.lock().unwrap().rings[ring].call.as_ref().unwrap())
}

#[test]
fn without_event_idx_no_interrupt_holds_interrupts_back() {
    let (mut g, mut link, dev) = setup(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MRG_RXBUF));
    for _ in 0..3 {
        g.offer(RX, &[(&[], 64, F_WRITE)]);
    }
    // A session's first decision interrupts whatever the flags.
    link.send(&[1u8; 20]).unwrap();
    link.flush().unwrap();
    assert_eq!(interrupts(&dev, RX), 1);
    // The driver, reaping, sets VRING_AVAIL_F_NO_INTERRUPT: no interrupt for the next frame.
    g.mem(|m| m.write_obj(1u16, GuestAddress(base(RX) + AVAIL)).unwrap());
    link.send(&[2u8; 20]).unwrap();
    link.flush().unwrap();
    assert_eq!(interrupts(&dev, RX), 0);
    // Done reaping, it clears the flag: the next used entry interrupts.
    g.mem(|m| m.write_obj(0u16, GuestAddress(base(RX) + AVAIL)).unwrap());
    link.send(&[3u8; 20]).unwrap();
    link.flush().unwrap();
    assert_eq!(interrupts(&dev, RX), 1);
    assert_eq!(g.used(RX).len(), 3);
}

#[test]
fn frames_wait_for_rx_buffers_then_go_in_order() {
    let (mut g, mut link, _dev) = setup(MODERN);
    link.send(&[1u8; 20]).unwrap();
    link.send(&[2u8; 20]).unwrap();
    assert!(link.backlogged());
    link.flush().unwrap();
    assert!(g.used(RX).is_empty());
    let a = g.offer(RX, &[(&[], 64, F_WRITE)]);
    let b = g.offer(RX, &[(&[], 64, F_WRITE)]);
    link.flush().unwrap();
    assert!(!link.backlogged());
    assert_eq!(g.used(RX), vec![(0, 32), (1, 32)]);
    assert_eq!(g.read(a[0] + 12, 20), vec![1u8; 20]);
    assert_eq!(g.read(b[0] + 12, 20), vec![2u8; 20]);
}

#[test]
fn offloaded_frames_carry_their_header() {
    let (mut g, mut link, _dev) = setup(FEATURES);
    assert!(link.offloads());
    let a = g.offer(RX, &[(&[], 128, F_WRITE)]);
    let hdr = VnetHdr {
        flags: vnet_hdr::F_NEEDS_CSUM,
        gso_type: vnet_hdr::GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1448,
        csum_start: 34,
        csum_offset: 16,
    };
    link.send_offloaded(&[9u8; 60], &hdr).unwrap();
    let mut want = [0u8; vnet_hdr::LEN];
    hdr.emit(&mut want);
    let got = g.read(a[0], 12);
    assert_eq!(&got[..10], &want);
    assert_eq!(&got[10..], &[1, 0]);
}

impl Guest {
    /// The used ring's flags (VRING_USED_F_NO_NOTIFY) and `avail_event` (EVENT_IDX).
    fn notify_fields(&self, ring: usize) -> (u16, u16) {
        self.mem(|m| {
            let flags = m.read_obj(GuestAddress(base(ring) + USED)).unwrap();
            let event = m.read_obj(GuestAddress(base(ring) + USED + 4 + 8 * SIZE as u64)).unwrap();
            (flags, event)
        })
    }

    /// Whether a Linux driver kicks after moving its available index from `old` to `new`
    /// (`vring_need_event`).
    fn kicks(&self, ring: usize, old: u16, new: u16) -> bool {
        let (_, event) = self.notify_fields(ring);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

impl Guest {
    /// Offers a TX frame of `len` bytes (its header and the frame in one buffer), reusing
    /// the descriptor and buffer of its ring slot: for tests that send more frames than the
    /// ring and the buffer space hold, each read before its slot comes round again.
    fn offer_tx_frame(&mut self, len: usize, fill: u8) {
        let slot = self.avail_idx[TX] % SIZE;
        let addr = DATA + (slot as u64 % 8) * 0x1000;
        let mut bytes = vec![0u8; 12];
        bytes.resize(12 + len, fill);
        self.mem(|m| m.write_slice(&bytes, GuestAddress(addr)).unwrap());
        self.desc(TX, slot, addr, bytes.len() as u32, 0, 0);
        self.publish(TX, slot);
    }
}

/// Offers and reads runs of bulk frames until the link polls its TX ring (a run whose frames
/// took longer than POLL_IDLE to read, on a loaded machine, does not start it).
fn start_polling(g: &mut Guest, link: &mut VhostUserLink) {
    let mut buf = vec![0u8; MAX_FRAME];
    for _ in 0..10 {
        for _ in 0..crate::link::upload_poll::POLL_AFTER_FRAMES {
            g.offer_tx_frame(POLL_FRAME_BYTES, 2);
            assert_eq!(link.recv(&mut buf).unwrap(), POLL_FRAME_BYTES);
        }
        if link.polling() {
            return;
        }
    }
    panic!("no polling after ten runs of bulk frames");
}

#[test]
fn an_upload_polls_the_tx_ring_and_asks_a_kick_per_half_ring() {
    let (mut g, mut link, _dev) = setup(MODERN);
    let mut buf = vec![0u8; MAX_FRAME];
    let would_block = |link: &mut VhostUserLink, buf: &mut [u8]| {
        assert_eq!(link.recv(buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    };
    // A request, and a bulk frame alone, leave the ring on kicks: the next empty look
    // turns them back on, at the next available index.
    g.offer_tx_frame(60, 1);
    g.offer_tx_frame(1500, 1);
    assert_eq!(link.recv(&mut buf).unwrap(), 60);
    assert_eq!(link.recv(&mut buf).unwrap(), 1500);
    would_block(&mut link, &mut buf);
    assert!(!link.polling());
    assert_eq!(g.notify_fields(TX).1, 2);
    assert!(g.kicks(TX, 2, 3), "a ring on kicks wakes the engine at the next frame");

    // A run of bulk frames: the ring is polled, and the guest is asked to kick only once it
    // has queued half a ring (8 of 16) after the frames read so far.
    start_polling(&mut g, &mut link);
    would_block(&mut link, &mut buf);
    let next = g.avail_idx[TX];
    assert_eq!(g.notify_fields(TX).1, next.wrapping_add(SIZE / 2 - 1));
    assert!(!g.kicks(TX, next, next + SIZE / 2 - 1), "seven frames queued: no kick, the next poll reads them");
    assert!(g.kicks(TX, next, next + SIZE / 2), "half a ring queued: a kick");

    // POLL_IDLE without a bulk frame: notifications go back on.
    std::thread::sleep(POLL_IDLE + std::time::Duration::from_millis(1));
    would_block(&mut link, &mut buf);
    assert!(!link.polling());
    assert_eq!(g.notify_fields(TX).1, next);
    assert!(g.kicks(TX, next, next + 1));
    link.flush().unwrap();
    assert_eq!(g.used(TX).len(), next as usize, "every frame read is used");
}

#[test]
fn without_event_idx_a_polled_ring_turns_kicks_off() {
    let (mut g, mut link, _dev) = setup(bit(VIRTIO_F_VERSION_1));
    let mut buf = vec![0u8; MAX_FRAME];
    start_polling(&mut g, &mut link);
    assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    // VRING_USED_F_NO_NOTIFY while polled; no avail_event written (the guest has no
    // threshold to kick at).
    assert_eq!(g.notify_fields(TX), (1, 0));
    std::thread::sleep(POLL_IDLE + std::time::Duration::from_millis(1));
    assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
    assert!(!link.polling());
    assert_eq!(g.notify_fields(TX), (0, 0));
}

/// Whether `fd` (a link's epoll descriptor) is readable now: the engine would be woken.
fn readable(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: one pollfd, no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) == 1 }
}

fn garbled(link: &mut VhostUserLink) -> String {
    let mut buf = vec![0u8; MAX_FRAME];
    let e = link.recv(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    e.to_string()
}

#[test]
fn garbled_tx_chains_close_the_link() {
    // A write-only buffer in a TX chain.
    let (mut g, mut link, _dev) = setup(MODERN);
    g.offer(TX, &[(&[0u8; 12], 12, 0), (&[], 10, F_WRITE)]);
    assert!(garbled(&mut link).contains("write-only"));

    // A buffer outside guest memory.
    let (mut g, mut link, _dev) = setup(MODERN);
    g.desc(TX, 0, 0x1000_0000, 64, 0, 0);
    g.publish(TX, 0);
    assert!(garbled(&mut link).contains("TX buffer"));

    // A chain that loops on itself.
    let (mut g, mut link, _dev) = setup(MODERN);
    g.desc(TX, 0, DATA, 64, F_NEXT, 0);
    g.publish(TX, 0);
    assert!(garbled(&mut link).contains("loops"));

    // A head index beyond the table.
    let (mut g, mut link, _dev) = setup(MODERN);
    g.publish(TX, 200);
    let _ = garbled(&mut link);

    // An available index too far ahead of the device.
    let (g, mut link, _dev) = setup(MODERN);
    g.mem(|m| m.write_obj(1000u16, GuestAddress(base(TX) + AVAIL + 2)).unwrap());
    assert!(garbled(&mut link).contains("TX ring"));

    // A frame longer than the largest frame.
    let (mut g, mut link, _dev) = setup(MODERN);
    g.desc(TX, 0, DATA, 12 + MAX_FRAME as u32 + 1, 0, 0);
    g.publish(TX, 0);
    assert!(garbled(&mut link).contains("longer"));

    // Nothing after the header.
    let (mut g, mut link, _dev) = setup(MODERN);
    g.offer(TX, &[(&[0u8; 12], 12, 0)]);
    assert!(garbled(&mut link).contains("no frame"));
}

#[test]
fn garbled_rx_chains_close_the_link_at_the_next_recv() {
    let (mut g, mut link, _dev) = setup(MODERN);
    g.offer(RX, &[(&[], 64, 0)]);
    link.send(&[1u8; 20]).unwrap();
    assert!(garbled(&mut link).contains("read-only"));
    // Later frames are dropped quietly; the engine has been told.
    link.send(&[1u8; 20]).unwrap();

    // A head beyond the table, one chain per frame (no MRG_RXBUF): garbled, not a chain
    // too small for every frame to come.
    let (mut g, mut link, _dev) = setup(bit(VIRTIO_F_VERSION_1));
    g.publish(RX, 200);
    link.send(&[1u8; 20]).unwrap();
    assert!(garbled(&mut link).contains("leaves its table"));
    assert_eq!(link.dropped, 0);
}

/// Guest memory of the tests of enormous chains, and where their parts live in it: a ring
/// of `BIG_SIZE` entries, an indirect table of up to 65,535 descriptors (1 MiB), a buffer.
const BIG_MEM: usize = 0x400000;
const BIG_SIZE: u16 = MAX_QUEUE_SIZE;
const BIG_DESC: u64 = 0x100000;
const BIG_AVAIL: u64 = 0x104000;
const BIG_USED: u64 = 0x105000;
const BIG_TABLE: u64 = 0x200000;
const BIG_BUF: u64 = 0x300000;
const F_INDIRECT: u16 = 4;

/// Moves `ring` to a ring of `BIG_SIZE` entries, every one of them available and naming
/// descriptor 0: an INDIRECT descriptor to a table of `entries` chained descriptors of `len`
/// bytes each (all over one buffer), with `flags`. What a hostile guest can offer: each
/// frame's walk could visit `BIG_SIZE` times `entries` descriptors.
fn enormous_chains(dev: &Arc<Mutex<Device>>, ring: usize, entries: u16, len: u32, flags: u16) {
    let mut d = dev.lock().unwrap();
    let d = &mut *d;
    let (mem, q) = (d.mem.as_ref().unwrap(), &mut d.rings[ring].queue);
    q.set_size(BIG_SIZE);
    q.try_set_desc_table_address(GuestAddress(BIG_DESC)).unwrap();
    q.try_set_avail_ring_address(GuestAddress(BIG_AVAIL)).unwrap();
    q.try_set_used_ring_address(GuestAddress(BIG_USED)).unwrap();
    q.set_next_avail(0);
    q.set_next_used(0);
    let desc = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = addr.to_le_bytes().to_vec();
        d.extend(len.to_le_bytes());
        d.extend(flags.to_le_bytes());
        d.extend(next.to_le_bytes());
        d
    };
    mem.write_slice(&desc(BIG_TABLE, 16 * u32::from(entries), F_INDIRECT, 0), GuestAddress(BIG_DESC)).unwrap();
    let table: Vec<u8> = (0..entries)
        .flat_map(|i| {
            let more = i + 1 < entries;
            desc(BIG_BUF, len, flags | if more { F_NEXT } else { 0 }, if more { i + 1 } else { 0 })
        })
        .collect();
    mem.write_slice(&table, GuestAddress(BIG_TABLE)).unwrap();
    // virtq_avail: flags, idx (a whole ring ahead), then the heads, all 0.
    let mut avail = vec![0u8; 4 + 2 * usize::from(BIG_SIZE)];
    avail[2..4].copy_from_slice(&BIG_SIZE.to_le_bytes());
    mem.write_slice(&avail, GuestAddress(BIG_AVAIL)).unwrap();
    mem.write_slice(&[0u8; 4], GuestAddress(BIG_USED)).unwrap();
}

/// The chains the device took from `ring` so far.
fn chains_taken(dev: &Arc<Mutex<Device>>, ring: usize) -> u16 {
    dev.lock().unwrap().rings[ring].queue.next_avail()
}

/// A guest with MRG_RXBUF offers a whole ring of RX chains, each an indirect table of
/// 65,535 descriptors: zero-length ones (the frame would never find room, and the engine
/// would walk all 67 million descriptors, keeping 1 GiB of them, at every try), or of one
/// byte. The link refuses the ring as garbled after one chain, having kept at most
/// `MAX_FRAME_DESCS` buffers.
#[test]
fn an_rx_ring_of_enormous_chains_is_garbled_after_bounded_work() {
    for (len, why) in [(0, "zero-length buffer"), (1, "more than 1024 buffers for one RX frame")] {
        let (_g, mut link, dev) = setup_mem(MODERN, BIG_MEM);
        enormous_chains(&dev, RX, u16::MAX, len, F_WRITE);
        link.send(&[1u8; 60]).unwrap();
        assert!(garbled(&mut link).contains(why), "{len}");
        assert!(link.segs.capacity() <= MAX_FRAME_DESCS, "{len}: {} buffers kept", link.segs.capacity());
        assert_eq!(chains_taken(&dev, RX), 1, "{len}");
        assert!(!link.backlogged());
    }
}

/// The same in a TX ring: a chain of zero-length descriptors, or of more than
/// `MAX_FRAME_DESCS`, is garbled; a chain of `MAX_FRAME_DESCS` one-byte buffers is a frame.
#[test]
fn a_tx_chain_of_enormous_length_is_garbled() {
    for (entries, len, why) in [(u16::MAX, 0, "zero-length buffer"), (u16::MAX, 1, "more than 1024 buffers")] {
        let (_g, mut link, dev) = setup_mem(MODERN, BIG_MEM);
        enormous_chains(&dev, TX, entries, len, 0);
        assert!(garbled(&mut link).contains(why), "{len}");
        assert_eq!(chains_taken(&dev, TX), 1, "{len}");
    }
    let (_g, mut link, dev) = setup_mem(MODERN, BIG_MEM);
    enormous_chains(&dev, TX, MAX_FRAME_DESCS as u16, 1, 0);
    let mut buf = vec![0u8; MAX_FRAME];
    assert_eq!(link.recv(&mut buf).unwrap(), MAX_FRAME_DESCS - 12);
}

/// A frame that the guest's whole RX ring cannot hold (MRG_RXBUF, every chain too small) is
/// dropped and counted, not kept at the head of the queue, where it would stop every frame
/// behind it for good; while the ring is not full it waits for more buffers.
#[test]
fn a_frame_no_whole_ring_can_hold_is_dropped_and_the_next_goes() {
    let (mut g, mut link, _dev) = setup(MODERN);
    for _ in 0..SIZE - 1 {
        g.offer(RX, &[(&[], 16, F_WRITE)]);
    }
    link.send(&[7u8; 1000]).unwrap();
    assert!(link.backlogged(), "the guest may still add a chain");
    link.flush().unwrap();
    g.offer(RX, &[(&[], 16, F_WRITE)]);
    link.flush().unwrap();
    assert!(!link.backlogged());
    assert_eq!(link.dropped, 1);
    assert!(g.used(RX).is_empty());
    // The next frame takes the first two chains.
    link.send(&[8u8; 20]).unwrap();
    assert_eq!(g.used(RX), vec![(0, 16), (1, 16)]);
    assert!(!link.backlogged());
}

/// A frame too big for the guest's RX buffer (without MRG_RXBUF, one buffer of 1518 bytes
/// and the header a frame, as Linux's driver gives without big packets; usernet's `--mtu
/// 9000`) is dropped with one warning a link, not only a trace: else the guest's downloads
/// stall with nothing said. The smaller frames behind it still go.
#[test]
fn a_frame_too_big_for_the_guests_buffers_is_logged_once() {
    let log = Arc::new(Mutex::new(Vec::<u8>::new()));
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || LogWriter(writer.clone()))
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let (mut g, mut link, _dev) = setup(bit(VIRTIO_F_VERSION_1));
        for _ in 0..4 {
            g.offer(RX, &[(&[], 1530, F_WRITE)]);
        }
        link.send(&[7u8; 9014]).unwrap();
        link.send(&[7u8; 9014]).unwrap();
        link.send(&[8u8; 1514]).unwrap();
        link.flush().unwrap();
        assert_eq!(link.dropped, 2);
        assert_eq!(g.used(RX), vec![(0, 1526)]);
    });
    let log = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    assert_eq!(log.matches("9014-byte frame does not fit in the guest's RX buffers").count(), 1, "{log}");
    assert!(log.contains("(one buffer a frame, no MRG_RXBUF: 1530 bytes)"), "{log}");
}

/// A `tracing` writer into a shared buffer.
struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Whether `fd`'s open file is O_NONBLOCK; sets or clears it to `set`.
fn o_nonblock(fd: &File, set: Option<bool>) -> bool {
    let fd = fd.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor the test holds.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if let Some(on) = set {
        let flags = if on { flags | libc::O_NONBLOCK } else { flags & !libc::O_NONBLOCK };
        // SAFETY: the same.
        assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }, 0);
    }
    flags & libc::O_NONBLOCK != 0
}

/// A pipe: (read end, write end), blocking.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills two fresh descriptors that we then own.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors nobody else owns.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// A front-end passes kick and call descriptors that block: eventfds without EFD_NONBLOCK
/// (the kicks' count 0, the calls' at its largest), or pipes (the kicks' empty, the calls'
/// full). They are made non-blocking as they arrive, so the engine, which reads the kicks
/// when the TX ring runs empty and writes the calls at a flush, goes on; and it still does
/// when the front-end clears O_NONBLOCK again on its copy of a kick (the open file is
/// shared; the kicks are polled before they are read. A call is written as it is, one
/// write(2) per interrupt on the data path).
#[test]
fn blocking_kick_and_call_descriptors_do_not_stop_the_engine() {
    for (pipes, cleared) in [(false, false), (true, false), (false, true), (true, true)] {
        let (mut g, link, dev) = setup(MODERN);
        drop(link);
        let handoff = Handoff::new("test").unwrap();
        let mut control = control(&dev, &handoff);
        // The front-end's copies of the descriptors passed, and the pipes' other ends.
        let (mut copies, mut other_ends) = (Vec::new(), Vec::new());
        for ring in [RX, TX] {
            let (kick, call) = if pipes {
                let (kick, kick_w) = pipe();
                let (call_r, call) = pipe();
                o_nonblock(&call, Some(true));
                while std::io::Write::write(&mut &call, &[0u8; 4096]).is_ok() {}
                o_nonblock(&call, Some(false));
                other_ends.extend([kick_w, call_r]);
                (kick, call)
            } else {
                // SAFETY: eventfd returns a new descriptor that we then own.
                let blocking = || unsafe { File::from_raw_fd(libc::eventfd(0, libc::EFD_CLOEXEC)) };
                let (kick, call) = (blocking(), blocking());
                std::io::Write::write_all(&mut &call, &(u64::MAX - 1).to_ne_bytes()).unwrap();
                (kick, call)
            };
            assert!(!o_nonblock(&kick, None) && !o_nonblock(&call, None));
            copies.extend([kick.try_clone().unwrap(), call.try_clone().unwrap()]);
            control.set_vring_kick(ring as u8, Some(kick)).unwrap();
            control.set_vring_call(ring as u8, Some(call)).unwrap();
        }
        for (i, copy) in copies.iter().enumerate() {
            assert!(o_nonblock(copy, None), "pipes {pipes}: not made non-blocking");
            // Kicks at even places.
            if cleared && i % 2 == 0 {
                o_nonblock(copy, Some(false));
            }
        }
        let mut link = {
            let mut d = dev.lock().unwrap();
            assert!(d.can_run());
            control.start_session(&mut d).unwrap()
        };
        g.offer(RX, &[(&[], 2048, F_WRITE)]);
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; MAX_FRAME];
            // The TX ring is empty: the kicks are read. A frame and a flush: the calls written.
            let empty = link.recv(&mut buf).map_err(|e| e.kind());
            link.send(&[3u8; 60]).unwrap();
            link.flush().unwrap();
            let _ = done.send((empty, link.recv(&mut buf).map_err(|e| e.kind())));
        });
        let got = finished.recv_timeout(std::time::Duration::from_secs(10));
        let (empty, again) = got.unwrap_or_else(|_| panic!("pipes {pipes}, cleared {cleared}: the engine blocked"));
        assert_eq!(empty, Err(io::ErrorKind::WouldBlock));
        assert_eq!(again, Err(io::ErrorKind::WouldBlock));
        assert_eq!(g.used(RX), vec![(0, 72)]);
    }
}

/// A call eventfd swapped while a session runs (QEMU does as the guest masks and unmasks
/// its interrupts) is signalled once: an interrupt sent to the old one may have been lost.
/// Before a session, nothing is signalled.
#[test]
fn a_call_eventfd_swapped_while_running_is_signalled_once() {
    let (_g, _link, dev) = setup(MODERN);
    let handoff = Handoff::new("test").unwrap();
    let mut c = control(&dev, &handoff);
    let call = File::from(eventfd().unwrap());
    c.set_vring_call(RX as u8, Some(call.try_clone().unwrap())).unwrap();
    assert_eq!(eventfd_count(&call), 1);
    assert_eq!(interrupts(&dev, TX), 0);
    dev.lock().unwrap().end_session("the guest's device was reset (GET_VRING_BASE)", false);
    c.set_vring_call(TX as u8, Some(call.try_clone().unwrap())).unwrap();
    assert_eq!(eventfd_count(&call), 0);
}

#[test]
fn a_reset_ends_the_session() {
    let (_g, mut link, dev) = setup(MODERN);
    dev.lock().unwrap().end_session("the guest's device was reset (GET_VRING_BASE)", false);
    let mut buf = vec![0u8; MAX_FRAME];
    let e = link.recv(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert!(e.to_string().contains("GET_VRING_BASE"));
    // Sending to an ended session drops the frame; nothing breaks.
    link.send(&[0u8; 20]).unwrap();
    // A new session may start on the same device, with a new number.
    let mut d = dev.lock().unwrap();
    assert!(!d.running);
    assert!(d.can_run());
    assert_eq!(d.session, 1);
}

/// A session that starts on rings an earlier one left quiet (a polled TX ring: NO_NOTIFY,
/// or `avail_event` half a ring ahead) turns the guest's kicks back on, and has the engine
/// look at the rings at once: a frame the guest queued meanwhile, without a kick, is read.
#[test]
fn a_new_session_turns_kicks_back_on_and_reads_what_waits() {
    for features in [bit(VIRTIO_F_VERSION_1), MODERN] {
        let (mut g, mut link, dev) = setup(features);
        let mut buf = vec![0u8; MAX_FRAME];
        start_polling(&mut g, &mut link);
        assert_eq!(link.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock);
        let quiet = g.notify_fields(TX);
        dev.lock().unwrap().end_session("the front-end reconnected", false);
        drop(link);
        // The guest queues a frame and, as the ring tells it, does not kick.
        let next = g.avail_idx[TX];
        assert!(!g.kicks(TX, next, next.wrapping_add(1)) || quiet.0 == 1, "{quiet:?}");
        g.offer_tx_frame(60, 3);
        let handoff = Handoff::new("test").unwrap();
        let mut control = control(&dev, &handoff);
        let mut link = {
            let mut d = dev.lock().unwrap();
            assert!(d.can_run());
            control.start_session(&mut d).unwrap()
        };
        // Kicks are on again: NO_NOTIFY cleared, or avail_event at the device's next index.
        let (flags, event) = g.notify_fields(TX);
        assert_eq!(flags, 0, "{features:#x}");
        if features & bit(VIRTIO_RING_F_EVENT_IDX) != 0 {
            assert_eq!(event, next, "{features:#x}");
        }
        // The engine is woken at once, and reads the frame that came without a kick.
        assert!(readable(link.fd()), "{features:#x}");
        assert_eq!(link.recv(&mut buf).unwrap(), 60);
    }
}

#[test]
fn ring_addresses_translate_through_the_memory_table() {
    let mut dev = Device::new();
    dev.mappings.push(Mapping { vmm_addr: 0x7f00_0000_0000, size: 0x1000_0000, gpa: 0 });
    dev.mappings.push(Mapping { vmm_addr: 0x7e00_0000_0000, size: 0x1000, gpa: 0x1_0000_0000 });
    assert_eq!(dev.va_to_gpa(0x7f00_0000_1234), Some(0x1234));
    assert_eq!(dev.va_to_gpa(0x7e00_0000_0fff), Some(0x1_0000_0fff));
    assert_eq!(dev.va_to_gpa(0x7e00_0000_1000), None);
    assert_eq!(dev.va_to_gpa(0), None);
}

/// A memfd of `len` bytes, as QEMU shares guest RAM.
fn memfd(len: u64) -> File {
    let fd = nix::sys::memfd::memfd_create(c"usernet-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

/// A memory table whose region runs past the end of its file is refused: mapped, its first
/// access there would be a SIGBUS that kills every link. One that fits is taken.
#[test]
fn a_region_past_the_end_of_its_file_is_refused() {
    let dev = Arc::new(Mutex::new(Device::new()));
    let handoff = Handoff::new("test").unwrap();
    let mut c = control(&dev, &handoff);
    let region = |size, offset| VhostUserMemoryRegion::new(0, size, 0x7f00_0000_0000, offset);
    for (size, offset) in [(0x20000, 0), (0x10000, 0x1000), (0x10000, u64::MAX)] {
        assert!(c.set_mem_table(&[region(size, offset)], vec![memfd(0x10000)], None).is_err(), "{size:#x}+{offset:#x}");
        assert!(dev.lock().unwrap().mem.is_none());
    }
    // Offsets of 64 KiB, a page on every kernel.
    c.set_mem_table(&[region(0x10000, 0x10000)], vec![memfd(0x20000)], None).unwrap();
    let dev = dev.lock().unwrap();
    dev.mem.as_ref().unwrap().write_obj(7u8, GuestAddress(0xffff)).unwrap();
    assert_eq!(dev.va_to_gpa(0x7f00_0000_ffff), Some(0xffff));
}

/// When no more mappings can be guarded (`ram_guard`'s table is full), a memory table is
/// refused, not mapped unguarded, where a front-end that shrinks its file would end usernet;
/// with a guard free again, it is taken. In a child process of its own: the table is the
/// whole process's, and other tests guard their memory meanwhile.
#[test]
fn a_memory_table_that_cannot_be_guarded_is_refused() {
    const CHILD: &str = "USERNET_TEST_GUARDS_FULL";
    const NAME: &str = "link::vhost_user::tests::a_memory_table_that_cannot_be_guarded_is_refused";
    if std::env::var_os(CHILD).is_none() {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        return;
    }
    // Every guard taken (the addresses guarded are never touched).
    let mut taken = Vec::new();
    while let Ok(guard) = crate::link::ram_guard::guard(std::ptr::dangling(), 4096) {
        taken.push(guard);
    }
    let dev = Arc::new(Mutex::new(Device::new()));
    let handoff = Handoff::new("test").unwrap();
    let mut c = control(&dev, &handoff);
    let region = VhostUserMemoryRegion::new(0, 0x10000, 0x7f00_0000_0000, 0);
    let e = c.set_mem_table(&[region], vec![memfd(0x10000)], None).unwrap_err();
    assert!(e.to_string().contains("guarded"), "{e}");
    assert!(dev.lock().unwrap().mem.is_none());
    taken.pop();
    c.set_mem_table(&[region], vec![memfd(0x10000)], None).unwrap();
    assert_eq!(dev.lock().unwrap().guards.len(), 1);
}

/// A memory table whose regions do not come in order of guest address (QEMU sends them in
/// order, the protocol does not ask it) is taken, each region where it says.
#[test]
fn memory_regions_in_any_order_are_taken() {
    let dev = Arc::new(Mutex::new(Device::new()));
    let handoff = Handoff::new("test").unwrap();
    let mut c = control(&dev, &handoff);
    let high = VhostUserMemoryRegion::new(0x100000, 0x10000, 0x7f00_0010_0000, 0);
    let low = VhostUserMemoryRegion::new(0, 0x10000, 0x7f00_0000_0000, 0);
    let (high_file, low_file) = (memfd(0x10000), memfd(0x10000));
    c.set_mem_table(&[high, low], vec![high_file.try_clone().unwrap(), low_file.try_clone().unwrap()], None).unwrap();
    let d = dev.lock().unwrap();
    let mem = d.mem.as_ref().unwrap();
    mem.write_obj(1u8, GuestAddress(0x100010)).unwrap();
    mem.write_obj(2u8, GuestAddress(0x10)).unwrap();
    let at = |file: &File| {
        let mut b = [0u8];
        std::os::unix::fs::FileExt::read_exact_at(file, &mut b, 0x10).unwrap();
        b[0]
    };
    assert_eq!((at(&high_file), at(&low_file)), (1, 2));
    assert_eq!(d.va_to_gpa(0x7f00_0010_0010), Some(0x100010));
}

/// A front-end that shrinks the file of guest memory under usernet's mapping (QEMU seals
/// its memfd against this; a buggy or hostile one may not) ends its own link, with an error
/// that says so, instead of usernet: the next access raises SIGBUS, the mapping becomes
/// zero pages (`ram_guard`), and the link fails. Another device goes on as before.
#[test]
fn a_front_end_that_shrinks_guest_memory_ends_only_its_link() {
    let (mut g, mut link, dev) = setup(MODERN);
    let file = memfd(MEM_SIZE as u64);
    let handoff = Handoff::new("test").unwrap();
    let region = VhostUserMemoryRegion::new(0, MEM_SIZE as u64, 0x7f00_0000_0000, 0);
    control(&dev, &handoff).set_mem_table(&[region], vec![file.try_clone().unwrap()], None).unwrap();
    let mut buf = vec![0u8; MAX_FRAME];
    g.offer_tx_frame(100, 7);
    assert_eq!(link.recv(&mut buf).unwrap(), 100, "the memfd's memory works");

    file.set_len(0).unwrap();
    let e = link.recv(&mut buf).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert!(e.to_string().contains("shrank the file of the guest's memory"), "{e}");
    // The mapping reads zeros now, and the link stays failed.
    assert_eq!(g.read(base(TX) + AVAIL, 4), vec![0u8; 4]);
    assert!(link.recv(&mut buf).unwrap_err().to_string().contains("shrank"));
    link.send(&[0u8; 60]).unwrap();
    link.flush().unwrap();

    let (mut other, mut other_link, _other_dev) = setup(MODERN);
    other.offer_tx_frame(64, 1);
    assert_eq!(other_link.recv(&mut buf).unwrap(), 64);
    assert_eq!(&buf[..64], &[1u8; 64][..]);
}

/// The acceptor's socket is the owner's alone, and a front-end that connects and sends a
/// message no protocol has is closed.
#[test]
fn acceptor_socket_is_owner_only_and_garbage_is_refused() {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("usernet-vhost-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let path = dir.join("vhost.sock");
    let mut acceptor = VhostUserAcceptor::bind(&path).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let mut client = UnixStream::connect(&path).unwrap();
    client.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    assert!(acceptor.accept().unwrap().is_none());
    client.write_all(&[0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(client.read(&mut buf), Ok(0) | Err(_)));
    drop(acceptor);
    assert!(!path.exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A vhost-user message: the header (request, flags with version 1, size), then `body`.
fn message(code: u32, flags: u32, body: &[u8]) -> Vec<u8> {
    let mut m = code.to_le_bytes().to_vec();
    m.extend((0x1 | flags).to_le_bytes());
    m.extend((body.len() as u32).to_le_bytes());
    m.extend(body);
    m
}

/// The next reply on `front_end`: its request code, flags and u64 payload.
fn reply(front_end: &mut UnixStream) -> (u32, u32, u64) {
    use std::io::Read;
    let mut r = [0u8; 20];
    front_end.read_exact(&mut r).expect("a reply");
    let word = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap());
    assert_eq!(word(8), 8, "a u64 payload");
    (word(0), word(4), u64::from_le_bytes(r[12..].try_into().unwrap()))
}

/// With REPLY_ACK acked, QEMU from 8.2 sends SET_VRING_ENABLE with NEED_REPLY and waits for
/// the reply; its first comes before SET_FEATURES, which the crate refuses before it replies.
/// The back-end acknowledges it itself (request 18, flags VERSION|REPLY, 0), and the
/// connection goes on in step: one without NEED_REPLY gets no reply.
#[test]
fn an_early_set_vring_enable_that_needs_a_reply_gets_one() {
    const GET_FEATURES: u32 = 1;
    const SET_PROTOCOL_FEATURES: u32 = 16;
    const SET_VRING_ENABLE: u32 = 18;
    const NEED_REPLY: u32 = 0x8;
    const REPLY: u32 = 0x4;
    let (ours, mut front_end) = UnixStream::pair().unwrap();
    front_end.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let handoff = Handoff::new("test").unwrap();
    let conn = Arc::new(ours.try_clone().unwrap());
    let sender = handoff.sender();
    let served = std::thread::spawn(move || serve_connection(ours, conn, sender, "vu test".into()));
    front_end.write_all(&message(GET_FEATURES, 0, &[])).unwrap();
    assert_eq!(reply(&mut front_end), (GET_FEATURES, 0x1 | REPLY, FEATURES));
    let reply_ack = VhostUserProtocolFeatures::REPLY_ACK.bits();
    front_end.write_all(&message(SET_PROTOCOL_FEATURES, 0, &reply_ack.to_le_bytes())).unwrap();
    // Ring 0 enabled (index, num), as QEMU's virtio-net sends it as the guest acks its features.
    let enable: Vec<u8> = [0u32, 1].iter().flat_map(|w| w.to_le_bytes()).collect();
    front_end.write_all(&message(SET_VRING_ENABLE, NEED_REPLY, &enable)).unwrap();
    assert_eq!(reply(&mut front_end), (SET_VRING_ENABLE, 0x1 | REPLY, 0));
    front_end.write_all(&message(SET_VRING_ENABLE, 0, &enable)).unwrap();
    front_end.write_all(&message(GET_FEATURES, 0, &[])).unwrap();
    assert_eq!(reply(&mut front_end), (GET_FEATURES, 0x1 | REPLY, FEATURES));
    drop(front_end);
    served.join().unwrap();
}

/// What a hostile (or broken) guest driver can do to the rings, and what the engine does
/// with the link, in any order.
#[derive(Debug, Clone)]
enum GuestOp {
    /// A descriptor with any fields: an address in its buffers, over the rings, across the
    /// end of memory or anywhere; any length; any flags (NEXT, WRITE, INDIRECT); any next.
    Desc {
        ring: usize,
        idx: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    },
    /// A head in the available ring, and the index moved past it.
    Publish {
        ring: usize,
        head: u16,
    },
    /// The available index moved by anything, back or past the chains offered.
    AvailStep {
        ring: usize,
        by: i32,
    },
    /// Any bytes anywhere in memory: over the used ring's event field, a ring, a buffer.
    Poke {
        at: u64,
        bytes: Vec<u8>,
    },
    /// A well-formed TX frame, so that runs of them reach the polled upload.
    OfferTx {
        len: usize,
    },
    /// A well-formed RX buffer.
    OfferRx {
        len: u32,
    },
    Recv,
    Send {
        len: usize,
        offloaded: bool,
    },
    Flush,
}

fn guest_op() -> impl Strategy<Value = GuestOp> {
    let ring = 0usize..2;
    let addr = prop_oneof![DATA..0x3f000u64, 0x3ff00u64..0x40100, 0u64..0x14000, any::<u64>(),];
    let len = prop_oneof![0u32..3000, any::<u32>()];
    let idx = prop_oneof![0u16..SIZE, any::<u16>()];
    prop_oneof![
        1 => (ring.clone(), idx.clone(), addr, len, 0u16..8, idx.clone())
            .prop_map(|(ring, idx, addr, len, flags, next)| GuestOp::Desc { ring, idx, addr, len, flags, next }),
        1 => (ring.clone(), idx).prop_map(|(ring, head)| GuestOp::Publish { ring, head }),
        1 => (ring, prop_oneof![-2i32..2 * SIZE as i32, any::<u16>().prop_map(i32::from)])
            .prop_map(|(ring, by)| GuestOp::AvailStep { ring, by }),
        2 => (0u64..0x40000, proptest::collection::vec(any::<u8>(), 1..24))
            .prop_map(|(at, bytes)| GuestOp::Poke { at, bytes }),
        8 => (1usize..1600).prop_map(|len| GuestOp::OfferTx { len }),
        6 => (1u32..0x1000).prop_map(|len| GuestOp::OfferRx { len }),
        10 => Just(GuestOp::Recv),
        6 => (14usize..3000, any::<bool>()).prop_map(|(len, offloaded)| GuestOp::Send { len, offloaded }),
        2 => Just(GuestOp::Flush),
    ]
}

impl Guest {
    fn outstanding(&self, ring: usize) -> u16 {
        let used: u16 = self.mem(|m| m.read_obj(GuestAddress(base(ring) + USED + 2)).unwrap());
        self.avail_idx[ring].wrapping_sub(used)
    }

    /// One RX buffer of `len` bytes in the slot its available index points at.
    fn offer_rx_buffer(&mut self, len: u32) {
        let slot = self.avail_idx[RX] % SIZE;
        self.desc(RX, slot, Driver::buffer(RX, slot), len, F_WRITE, 0);
        self.publish(RX, slot);
    }

    fn apply(&mut self, op: &GuestOp) {
        match *op {
            GuestOp::Desc { ring, idx, addr, len, flags, next } => {
                // Only the table's own entries: an index past it would write elsewhere.
                if idx < SIZE {
                    self.desc(ring, idx, addr, len, flags, next);
                }
            }
            GuestOp::Publish { ring, head } => self.publish(ring, head),
            GuestOp::AvailStep { ring, by } => {
                let idx = self.avail_idx[ring].wrapping_add(by as u16);
                self.avail_idx[ring] = idx;
                self.mem(|m| m.write_obj(idx, GuestAddress(base(ring) + AVAIL + 2)).unwrap());
            }
            GuestOp::Poke { at, ref bytes } => {
                let end = (at as usize + bytes.len()).min(0x40000);
                let n = end - at as usize;
                self.mem(|m| m.write_slice(&bytes[..n], GuestAddress(at)).unwrap());
            }
            // A driver offers at most a ring's worth of chains the device has not used.
            GuestOp::OfferTx { len } if self.outstanding(TX) < SIZE => self.offer_tx_frame(len, 7),
            GuestOp::OfferRx { len } if self.outstanding(RX) < SIZE => self.offer_rx_buffer(len),
            GuestOp::OfferTx { .. } | GuestOp::OfferRx { .. } => {}
            GuestOp::Recv | GuestOp::Send { .. } | GuestOp::Flush => {}
        }
    }
}

/// Bytes of the tests' guest memory.
const MEM_SIZE: usize = 0x40000;

/// What the device may write in guest memory laid out as `mem`: both used rings, and the
/// buffers that the RX ring's descriptors, and the indirect tables they point at, mark
/// write-only.
fn writable_ranges(mem: &[u8]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> =
        [RX, TX].iter().map(|&r| (base(r) + USED, base(r) + USED + 4 + 8 * SIZE as u64 + 2)).collect();
    let mut tables = vec![(base(RX) + DESC, SIZE as u64, true)];
    while let Some((at, count, top)) = tables.pop() {
        for i in 0..count {
            let Some(d) = at.checked_add(16 * i).and_then(|a| mem.get(a as usize..a as usize + 16)) else { break };
            let addr = u64::from_le_bytes(d[..8].try_into().unwrap());
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            if flags & F_WRITE != 0 {
                ranges.push((addr, addr.saturating_add(len as u64)));
            }
            if flags & 4 != 0 && top {
                tables.push((addr, (len / 16) as u64, false));
            }
        }
    }
    ranges
}

/// The first byte the device changed outside what it may write, if any.
fn stray_write(before: &[u8], after: &[u8]) -> Option<u64> {
    let allowed = [writable_ranges(before), writable_ranges(after)].concat();
    (0..before.len())
        .filter(|&i| before[i] != after[i])
        .map(|i| i as u64)
        .find(|&a| !allowed.iter().any(|&(from, to)| from <= a && a < to))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever a guest writes into its rings and buffers, the link never panics and never
    /// loops, and writes guest memory only where the guest let it (the used rings and the
    /// buffers it marked write-only): a receive gives a frame that fits the engine's
    /// buffer, nothing for now, or garbled descriptors (the engine then drops the link).
    #[test]
    fn a_hostile_guest_s_rings_never_panic_the_link(
        features in prop_oneof![
            Just(MODERN),
            Just(FEATURES),
            Just(bit(VIRTIO_F_VERSION_1)),
            Just(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)),
            Just(0u64),
        ],
        ops in proptest::collection::vec(guest_op(), 1..120),
    ) {
        let (mut g, mut link, _dev) = setup(features);
        let mut buf = vec![0u8; MAX_FRAME];
        let frame: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        for op in &ops {
            g.apply(op);
            let before = g.read(0, MEM_SIZE);
            match *op {
                GuestOp::Recv => match link.recv(&mut buf) {
                    Ok(n) => prop_assert!(n > 0 && n <= MAX_FRAME, "a frame of {n} bytes"),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                        prop_assert!(e.to_string().contains("garbled"), "{e}");
                        break;
                    }
                    Err(e) => prop_assert!(false, "unexpected error {e}"),
                },
                GuestOp::Send { len, offloaded } => {
                    let sent = if offloaded {
                        let hdr = VnetHdr { flags: 1, csum_start: 34, csum_offset: 16, ..VnetHdr::default() };
                        link.send_offloaded(&frame[..len], &hdr)
                    } else {
                        link.send(&frame[..len])
                    };
                    prop_assert!(sent.is_ok());
                }
                GuestOp::Flush => prop_assert!(link.flush().is_ok()),
                _ => {}
            }
            let after = g.read(0, MEM_SIZE);
            prop_assert_eq!(stray_write(&before, &after), None, "after {:?}", op);
        }
    }
}

/// A well-behaved driver that keeps count: descriptors from a free list, each with a buffer
/// of its own (RX ring: from 0x20000, TX ring: from 0x30000, 4 KiB each), chains reclaimed
/// from the used ring.
struct Driver {
    g: Guest,
    hdr_len: usize,
    mrg_rxbuf: bool,
    free: [Vec<u16>; 2],
    /// Per head: the chain's descriptors and their lengths.
    chains: [Vec<Vec<(u16, u32)>>; 2],
    used_seen: [u16; 2],
    /// Frames the device wrote, and the pieces of one still spread over merged buffers.
    rx_frames: Vec<Vec<u8>>,
    rx_partial: Option<(u16, Vec<u8>)>,
    /// The interrupt eventfds; per ring, whether the driver asked for an interrupt at the
    /// next used entry (as Linux's `virtqueue_enable_cb` does after a reap: `used_event`
    /// with EVENT_IDX, NO_INTERRUPT cleared without), and whether one came since.
    calls: [File; 2],
    armed: [bool; 2],
    interrupted: [bool; 2],
    /// The kick eventfds, and each ring's available index when the driver last decided
    /// whether to kick.
    kicks: [File; 2],
    kick_decided: [u16; 2],
    event_idx: bool,
}

impl Driver {
    fn new(g: Guest, features: u64) -> Driver {
        let n = Negotiated::from_features(features);
        let (calls, kicks) = {
            let dev = g.dev.lock().unwrap();
            (
                [0, 1].map(|i| dev.rings[i].call.as_ref().unwrap().try_clone().unwrap()),
                [0, 1].map(|i| dev.rings[i].kick.as_ref().unwrap().try_clone().unwrap()),
            )
        };
        Driver {
            g,
            hdr_len: n.hdr_len,
            mrg_rxbuf: n.mrg_rxbuf,
            free: [(0..SIZE).rev().collect(), (0..SIZE).rev().collect()],
            chains: [vec![Vec::new(); SIZE as usize], vec![Vec::new(); SIZE as usize]],
            used_seen: [0; 2],
            rx_frames: Vec::new(),
            rx_partial: None,
            calls,
            armed: [false; 2],
            interrupted: [false; 2],
            kicks,
            kick_decided: [0; 2],
            event_idx: features & bit(VIRTIO_RING_F_EVENT_IDX) != 0,
        }
    }

    /// After making chains available, kicks the device if it asked for it, as Linux's
    /// `virtqueue_kick_prepare` decides: with EVENT_IDX when the available index passed
    /// `avail_event`, without it unless the used ring's NO_NOTIFY flag is set.
    fn maybe_kick(&mut self, ring: usize) {
        let new = self.g.avail_idx[ring];
        let old = std::mem::replace(&mut self.kick_decided[ring], new);
        let kick = if self.event_idx {
            self.g.kicks(ring, old, new)
        } else {
            let flags: u16 = self.g.mem(|m| m.read_obj(GuestAddress(base(ring) + USED)).unwrap());
            flags & 1 == 0
        };
        if kick {
            std::io::Write::write_all(&mut &self.kicks[ring], &1u64.to_ne_bytes()).unwrap();
        }
    }

    /// Moves both rings' indexes, the driver's and the device's, to `start` (to cross the
    /// wrap of the 16-bit indexes soon).
    fn start_at(&mut self, start: u16) {
        let mut dev = self.g.dev.lock().unwrap();
        for ring in [RX, TX] {
            dev.rings[ring].queue.set_next_avail(start);
            dev.rings[ring].queue.set_next_used(start);
            let m = dev.mem.as_ref().unwrap();
            m.write_obj(start, GuestAddress(base(ring) + AVAIL + 2)).unwrap();
            m.write_obj(start, GuestAddress(base(ring) + USED + 2)).unwrap();
            self.g.avail_idx[ring] = start;
            self.used_seen[ring] = start;
            self.kick_decided[ring] = start;
        }
    }

    fn used_idx(&self, ring: usize) -> u16 {
        self.g.mem(|m| m.read_obj(GuestAddress(base(ring) + USED + 2)).unwrap())
    }

    /// After the device's flush: a driver that asked for an interrupt at the next used
    /// entry, and has one, got it.
    fn check_interrupts(&mut self) {
        for ring in [RX, TX] {
            if eventfd_count(&self.calls[ring]) > 0 {
                self.interrupted[ring] = true;
            }
            if self.armed[ring] && self.used_idx(ring) != self.used_seen[ring] {
                assert!(self.interrupted[ring], "ring {ring}: used entries past used_event and no interrupt");
            }
        }
    }

    fn buffer(ring: usize, desc: u16) -> u64 {
        (if ring == RX { 0x20000 } else { 0x30000 }) + desc as u64 * 0x1000
    }

    /// Offers a chain holding `bytes` cut at `cuts` (TX), or of buffers `lens` (RX); false
    /// when the table has too few free descriptors.
    fn offer(&mut self, ring: usize, parts: &[&[u8]], lens: &[u32]) -> bool {
        let count = if ring == TX { parts.len() } else { lens.len() };
        if self.free[ring].len() < count {
            return false;
        }
        let descs: Vec<u16> = (0..count).map(|_| self.free[ring].pop().unwrap()).collect();
        let mut chain = Vec::new();
        for (i, &d) in descs.iter().enumerate() {
            let addr = Driver::buffer(ring, d);
            let (len, flags) = if ring == TX {
                self.g.mem(|m| m.write_slice(parts[i], GuestAddress(addr)).unwrap());
                (parts[i].len() as u32, 0)
            } else {
                (lens[i], F_WRITE)
            };
            let more = i + 1 < descs.len();
            let next = if more { descs[i + 1] } else { 0 };
            self.g.desc(ring, d, addr, len, flags | if more { F_NEXT } else { 0 }, next);
            chain.push((d, len));
        }
        self.chains[ring][descs[0] as usize] = chain;
        self.g.publish(ring, descs[0]);
        true
    }

    /// Takes the used ring's new entries: frees their chains, and reassembles RX frames
    /// (a merged frame's first buffer says how many buffers it took).
    fn reap(&mut self) {
        for ring in [RX, TX] {
            let idx = self.used_idx(ring);
            while self.used_seen[ring] != idx {
                let at = base(ring) + USED + 4 + 8 * (self.used_seen[ring] % SIZE) as u64;
                let (head, len): (u32, u32) =
                    self.g.mem(|m| (m.read_obj(GuestAddress(at)).unwrap(), m.read_obj(GuestAddress(at + 4)).unwrap()));
                self.used_seen[ring] = self.used_seen[ring].wrapping_add(1);
                let chain = std::mem::take(&mut self.chains[ring][head as usize]);
                assert!(!chain.is_empty(), "ring {ring}: used head {head} was never offered");
                if ring == RX {
                    let mut bytes = Vec::new();
                    for &(d, dlen) in &chain {
                        let take = (len as usize - bytes.len()).min(dlen as usize);
                        bytes.extend(self.g.read(Driver::buffer(RX, d), take));
                    }
                    assert_eq!(bytes.len(), len as usize, "a used length beyond its chain");
                    self.rx_bytes(bytes);
                }
                self.free[ring].extend(chain.iter().map(|&(d, _)| d));
            }
            // A frame's buffers are published together: Linux does not wait for the rest.
            assert!(self.rx_partial.is_none(), "a merged frame published in parts");
            // Interrupt me at the next entry: virtq_avail's last word (used_event) with
            // EVENT_IDX, its flags without (NO_INTERRUPT cleared).
            if self.event_idx {
                let at = base(ring) + AVAIL + 4 + 2 * SIZE as u64;
                self.g.mem(|m| m.write_obj(self.used_seen[ring], GuestAddress(at)).unwrap());
            } else {
                self.g.mem(|m| m.write_obj(0u16, GuestAddress(base(ring) + AVAIL)).unwrap());
            }
            self.armed[ring] = true;
            self.interrupted[ring] = false;
        }
    }

    /// Turns interrupts off while busy, as Linux's `virtqueue_disable_cb` does: without
    /// EVENT_IDX, VRING_AVAIL_F_NO_INTERRUPT in the available ring's flags (with it, Linux
    /// only moves `used_event` away). The next reap turns them on again.
    fn quiet(&mut self) {
        if !self.event_idx {
            for ring in [RX, TX] {
                self.g.mem(|m| m.write_obj(1u16, GuestAddress(base(ring) + AVAIL)).unwrap());
                self.armed[ring] = false;
            }
        }
    }

    fn rx_bytes(&mut self, bytes: Vec<u8>) {
        let (left, mut frame) = match self.rx_partial.take() {
            Some((left, mut frame)) => {
                frame.extend(bytes);
                (left - 1, frame)
            }
            None => {
                let buffers = if self.mrg_rxbuf { u16::from_le_bytes([bytes[10], bytes[11]]) } else { 1 };
                assert!(buffers >= 1, "num_buffers 0");
                (buffers - 1, bytes)
            }
        };
        if left > 0 {
            self.rx_partial = Some((left, frame));
        } else {
            self.rx_frames.push(frame.split_off(self.hdr_len));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// A driver offering chains of any shape, and the engine sending and receiving in any
    /// order, across the wrap of the rings' indexes: every TX frame comes out whole and in
    /// order, every RX frame reaches the guest whole (its merged buffers published at once)
    /// and in order, or (one chain per frame, without MRG_RXBUF, and that chain too small)
    /// is dropped and counted; a driver that asked for an interrupt gets one.
    #[test]
    fn every_frame_crosses_the_rings_whole_and_in_order(
        features in prop_oneof![
            Just(MODERN),
            Just(bit(VIRTIO_F_VERSION_1)),
            Just(bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_RING_F_EVENT_IDX)),
            Just(bit(VIRTIO_NET_F_MRG_RXBUF)),
            Just(0u64),
        ],
        start in prop_oneof![Just(0u16), 65520u16..=65535],
        ops in proptest::collection::vec(
            prop_oneof![
                3 => (14usize..3000, proptest::collection::vec(1usize..1500, 0..3)).prop_map(|(len, cuts)| (0u8, len, cuts)),
                3 => proptest::collection::vec(64usize..4096, 1..4).prop_map(|lens| (1u8, 0, lens)),
                3 => Just((2u8, 0, vec![])),
                3 => (14usize..3000).prop_map(|len| (3u8, len, vec![])),
                1 => Just((4u8, 0, vec![])),
                2 => Just((5u8, 0, vec![])),
                1 => Just((6u8, 0, vec![])),
            ],
            1..150,
        ),
    ) {
        let (g, mut link, _dev) = setup(features);
        let mut d = Driver::new(g, features);
        d.start_at(start);
        let hdr_len = d.hdr_len;
        let mut buf = vec![0u8; MAX_FRAME];
        let (mut tx_sent, mut tx_got, mut rx_sent) = (Vec::new(), Vec::new(), Vec::new());
        let pattern = |n: usize, seed: usize| -> Vec<u8> { (0..n).map(|i| (i * 7 + seed * 13) as u8).collect() };
        // A round of the engine: it reads the link when its descriptor is readable (a kick,
        // the bell), while it polls, or when the last round's batch was full; then flushes.
        let mut more = false;
        let mut round = |link: &mut VhostUserLink, d: &mut Driver, got: &mut Vec<Vec<u8>>| {
            if std::mem::take(&mut more) || readable(link.fd()) || link.polling() {
                for n in 0..4 {
                    match link.recv(&mut buf) {
                        Ok(len) => got.push(buf[..len].to_vec()),
                        Err(e) => {
                            assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "{e}");
                            break;
                        }
                    }
                    more = n == 3;
                }
            }
            link.flush().unwrap();
            d.check_interrupts();
        };
        for (kind, len, cuts) in &ops {
            match kind {
                0 => {
                    // A TX frame: header and frame cut anywhere.
                    let frame = pattern(*len, tx_sent.len());
                    let mut wire = vec![0u8; hdr_len];
                    wire.extend(&frame);
                    let mut at: Vec<usize> = cuts.iter().map(|c| c % wire.len()).filter(|&c| c > 0).collect();
                    at.sort_unstable();
                    at.dedup();
                    let mut parts = Vec::new();
                    let mut from = 0;
                    for c in at.into_iter().chain([wire.len()]) {
                        parts.push(&wire[from..c]);
                        from = c;
                    }
                    if d.offer(TX, &parts, &[]) {
                        tx_sent.push(frame);
                        d.maybe_kick(TX);
                    }
                }
                1 => {
                    let lens: Vec<u32> = cuts.iter().map(|&l| l as u32).collect();
                    if d.offer(RX, &[], &lens) {
                        d.maybe_kick(RX);
                    }
                }
                2 => round(&mut link, &mut d, &mut tx_got),
                3 => {
                    let frame = pattern(*len, 1000 + rx_sent.len());
                    link.send(&frame).unwrap();
                    rx_sent.push(frame);
                }
                4 => {
                    link.flush().unwrap();
                    d.check_interrupts();
                }
                5 => d.reap(),
                _ => d.quiet(),
            }
        }
        // The engine runs its rounds, and the guest takes everything and offers room, until
        // nothing waits: a TX chain left with kicks off and no polling would stay.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            round(&mut link, &mut d, &mut tx_got);
            d.reap();
            if !link.backlogged() && tx_got.len() == tx_sent.len() {
                break;
            }
            let mut offered = false;
            while d.offer(RX, &[], &[4096, 4096]) {
                offered = true;
            }
            if offered {
                d.maybe_kick(RX);
            }
            std::thread::sleep(std::time::Duration::from_micros(100));
        }
        prop_assert!(tx_got == tx_sent, "TX: {} frames sent, {} received", tx_sent.len(), tx_got.len());
        prop_assert!(!link.backlogged());
        prop_assert!(d.rx_partial.is_none());
        prop_assert_eq!(d.rx_frames.len() as u64 + link.dropped, rx_sent.len() as u64);
        if d.mrg_rxbuf {
            prop_assert_eq!(link.dropped, 0);
        }
        // What arrived is what was sent, in order, less the frames dropped.
        let mut sent = rx_sent.iter();
        for got in &d.rx_frames {
            prop_assert!(sent.any(|s| s == got), "an RX frame of {} bytes garbled or out of order", got.len());
        }
    }
}

/// A guest that reads the used ring while usernet writes frames into it, on another CPU,
/// never sees part of a frame spread over merged buffers: the used index moves past all of
/// a frame's entries at once. (A race, so it can only fail when the two threads run at once;
/// with the index moved at every entry it failed within the first rounds.)
#[test]
fn a_guest_reading_meanwhile_never_sees_part_of_a_merged_frame() {
    use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
    const ROUNDS: usize = 3000;
    let (mut g, mut link, dev) = setup(MODERN);
    let mem = dev.lock().unwrap().mem.clone().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(AtomicU16::new(0));
    let reader = {
        let (done, progress) = (done.clone(), progress.clone());
        std::thread::spawn(move || -> Result<usize, String> {
            let (mut seen, mut frames) = (0u16, 0usize);
            loop {
                let finished = done.load(Ordering::Acquire);
                let idx = u16::from_le(mem.load(GuestAddress(base(RX) + USED + 2), Ordering::Acquire).unwrap());
                while seen != idx {
                    let at = base(RX) + USED + 4 + 8 * (seen % SIZE) as u64;
                    let head: u32 = mem.read_obj(GuestAddress(at)).unwrap();
                    let buffers: u16 = mem.read_obj(GuestAddress(Driver::buffer(RX, head as u16) + 10)).unwrap();
                    if idx.wrapping_sub(seen) < buffers {
                        return Err(format!(
                            "frame {frames}: {buffers} buffers, {} of them published",
                            idx.wrapping_sub(seen)
                        ));
                    }
                    seen = seen.wrapping_add(buffers.max(1));
                    frames += 1;
                }
                progress.store(seen, Ordering::Release);
                if finished {
                    return Ok(frames);
                }
            }
        })
    };
    let frame = vec![0x5au8; 700];
    for _ in 0..ROUNDS {
        // Fifteen buffers of 256 bytes: five frames of 712 bytes with the header, three each.
        for desc in 0..15u16 {
            g.desc(RX, desc, Driver::buffer(RX, desc), 256, F_WRITE, 0);
            g.publish(RX, desc);
        }
        for _ in 0..5 {
            link.send(&frame).unwrap();
        }
        link.flush().unwrap();
        // The guest reads them all before the buffers are offered again.
        let used: u16 = g.mem(|m| m.read_obj(GuestAddress(base(RX) + USED + 2)).unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while progress.load(Ordering::Acquire) != used && !reader.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the reading thread fell behind");
            std::thread::yield_now();
        }
        if reader.is_finished() {
            break;
        }
    }
    done.store(true, Ordering::Release);
    let frames = reader.join().unwrap().unwrap();
    assert_eq!(frames, ROUNDS * 5);
    assert_eq!(link.dropped, 0);
}

/// What a front-end can ask of the back-end, in any order and with any values (the message
/// parsing is the `vhost` crate's; these are its calls into the handler).
#[derive(Debug, Clone)]
enum FrontOp {
    Features(u64),
    MemTable {
        gpa: u64,
        size: u64,
        offset: u64,
    },
    Num {
        index: u32,
        num: u32,
    },
    /// Ring addresses, as offsets from the region's user address (or anything).
    Addr {
        index: u32,
        desc: u64,
        avail: u64,
        used: u64,
    },
    Base {
        index: u32,
        base: u32,
    },
    GetBase {
        index: u32,
    },
    Kick {
        index: u8,
        some: bool,
    },
    Call {
        index: u8,
        some: bool,
    },
    Enable {
        index: u32,
        on: bool,
    },
    ResetDevice,
    ResetOwner,
    /// The guest writes its memory anywhere.
    Poke {
        at: u64,
        bytes: Vec<u8>,
    },
    /// The engine reads, sends and flushes on the links it holds.
    Engine,
}

/// Guest RAM of the front-end property test: one memfd at this user address.
const VA: u64 = 0x7f00_0000_0000;
const RAM: u64 = 0x40000;

fn front_op() -> impl Strategy<Value = FrontOp> {
    let index = prop_oneof![4 => 0u32..2, 1 => 2u32..5];
    let addr = prop_oneof![3 => (0u64..RAM / 2).prop_map(|a| a & !15), 1 => any::<u64>()];
    prop_oneof![
        2 => prop_oneof![Just(MODERN), Just(0u64), Just(FEATURES), Just(FEATURES | bit(17)),
            Just(MODERN | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())].prop_map(FrontOp::Features),
        1 => (prop_oneof![Just(0u64), Just(0x10000), Just(u64::MAX - 0xfff)],
              prop_oneof![Just(RAM), Just(RAM / 2), Just(RAM * 2), Just(0)],
              prop_oneof![Just(0u64), Just(0x1000), Just(u64::MAX)])
            .prop_map(|(gpa, size, offset)| FrontOp::MemTable { gpa, size, offset }),
        2 => (index.clone(), prop_oneof![Just(16u32), Just(0), Just(3), Just(256), Just(32768), Just(65535)])
            .prop_map(|(index, num)| FrontOp::Num { index, num }),
        3 => (index.clone(), addr.clone(), addr.clone(), addr)
            .prop_map(|(index, desc, avail, used)| FrontOp::Addr { index, desc, avail, used }),
        2 => (index.clone(), prop_oneof![Just(0u32), any::<u32>()]).prop_map(|(index, base)| FrontOp::Base { index, base }),
        1 => index.clone().prop_map(|index| FrontOp::GetBase { index }),
        2 => (0u8..3, any::<bool>()).prop_map(|(index, some)| FrontOp::Kick { index, some }),
        1 => (0u8..3, any::<bool>()).prop_map(|(index, some)| FrontOp::Call { index, some }),
        2 => (index, any::<bool>()).prop_map(|(index, on)| FrontOp::Enable { index, on }),
        1 => Just(FrontOp::ResetDevice),
        1 => Just(FrontOp::ResetOwner),
        3 => (0u64..RAM, proptest::collection::vec(any::<u8>(), 1..32)).prop_map(|(at, bytes)| FrontOp::Poke { at, bytes }),
        4 => Just(FrontOp::Engine),
    ]
}

/// The messages QEMU sends to set a device up (after a reset, or as it reconnects), with
/// the rings as `Guest` lays them out.
fn qemu_setup() -> Vec<FrontOp> {
    let mut ops = vec![FrontOp::Features(MODERN), FrontOp::MemTable { gpa: 0, size: RAM, offset: 0 }];
    for index in 0..2u32 {
        let at = base(index as usize);
        ops.extend([
            FrontOp::Num { index, num: u32::from(SIZE) },
            FrontOp::Base { index, base: 0 },
            FrontOp::Addr { index, desc: at + DESC, avail: at + AVAIL, used: at + USED },
            FrontOp::Kick { index: index as u8, some: true },
            FrontOp::Call { index: index as u8, some: true },
        ]);
    }
    ops
}

/// Applies one front-end message (or a guest's or the engine's step).
fn front_apply(c: &mut Control, file: &File, links: &mut Vec<Box<dyn Link>>, op: &FrontOp) {
    use std::os::unix::fs::FileExt;
    let fd = || Some(File::from(eventfd().unwrap()));
    let _ = match op {
        FrontOp::Features(f) => c.set_features(*f),
        FrontOp::MemTable { gpa, size, offset } => {
            let region = VhostUserMemoryRegion::new(*gpa, *size, VA, *offset);
            c.set_mem_table(&[region], vec![file.try_clone().unwrap()], None).map(|_| ())
        }
        FrontOp::Num { index, num } => c.set_vring_num(*index, *num),
        FrontOp::Addr { index, desc, avail, used } => c.set_vring_addr(
            *index,
            VhostUserVringAddrFlags::empty(),
            VA.wrapping_add(*desc),
            VA.wrapping_add(*used),
            VA.wrapping_add(*avail),
            0,
        ),
        FrontOp::Base { index, base } => c.set_vring_base(*index, *base),
        FrontOp::GetBase { index } => c.get_vring_base(*index).map(|_| ()),
        FrontOp::Kick { index, some } => c.set_vring_kick(*index, if *some { fd() } else { None }),
        FrontOp::Call { index, some } => c.set_vring_call(*index, if *some { fd() } else { None }),
        FrontOp::Enable { index, on } => c.set_vring_enable(*index, *on),
        FrontOp::ResetDevice => c.reset_device(),
        FrontOp::ResetOwner => c.reset_owner(),
        FrontOp::Poke { at, bytes } => {
            let n = bytes.len().min((RAM - at) as usize);
            file.write_all_at(&bytes[..n], *at).unwrap();
            Ok(())
        }
        FrontOp::Engine => {
            let mut buf = vec![0u8; MAX_FRAME];
            links.retain_mut(|link| {
                for _ in 0..4 {
                    match link.recv(&mut buf) {
                        Ok(n) => assert!((1..=MAX_FRAME).contains(&n), "a frame of {n} bytes"),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(_) => return false, // the engine drops the link
                    }
                }
                // A send or flush that finds garbled rings fails the link's next recv.
                link.send(&[0x5a; 60]).is_ok()
                    && link.flush().is_ok()
                    && link.recv(&mut buf).map_or_else(|e| e.kind() == io::ErrorKind::WouldBlock, |_| true)
            });
            Ok(())
        }
    };
    // As the connection's thread does after each message. (After a refused one, the thread
    // closes the connection instead: going on here covers more.)
    c.after_message();
}

/// Whether the message stops the device as it was (vhost-user: a ring reconfigured, stopped
/// or disabled, a reset, other features acked): the running session must end, whatever the
/// values. Any other must leave it running.
fn ends_session(op: &FrontOp, dev: &Device) -> bool {
    match op {
        FrontOp::ResetDevice | FrontOp::ResetOwner => true,
        FrontOp::Features(f) => check_ack(*f).is_ok() && (*f != dev.acked || !dev.features_set),
        FrontOp::GetBase { .. } | FrontOp::Base { .. } | FrontOp::Kick { .. } | FrontOp::Addr { .. } => true,
        FrontOp::Enable { on, .. } => !on,
        FrontOp::Num { num, .. } => num.is_power_of_two() && *num <= u32::from(MAX_QUEUE_SIZE),
        _ => false,
    }
}

/// The links' sessions have ended: their next `recv` says so (the end of the session, not
/// garbled rings: the links held were read without fault since their last use), and the
/// engine drops them.
fn assert_ended(links: &mut Vec<Box<dyn Link>>, why: &str) {
    let mut buf = vec![0u8; MAX_FRAME];
    for old in links.iter_mut() {
        let e = old.recv(&mut buf).expect_err(why);
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{why}: {e}");
    }
    links.clear();
}

/// Takes the links handed to the engine; a new one means the session of every link before
/// it has ended.
fn take_links(handoff: &mut Handoff, links: &mut Vec<Box<dyn Link>>) -> usize {
    let mut new = 0;
    while let Some(link) = handoff.accept().unwrap() {
        assert_ended(links, "an older session's link still carries frames");
        links.push(link);
        new += 1;
    }
    new
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A front-end's messages in any order and with any values (rings resized, moved
    /// outside memory, restarted, disabled, reset; memory tables past their file or
    /// nowhere), a guest writing anywhere and the engine using its links meanwhile: nothing
    /// panics, a message that stops the device ends the running link, a new session's link
    /// comes only after the last one ended, and whatever came
    /// before, QEMU's setup after a reset gives a link that carries a frame each way.
    #[test]
    fn any_front_end_messages_leave_a_device_that_can_start_again(
        setup_first in any::<bool>(),
        ops in proptest::collection::vec(front_op(), 0..60),
    ) {
        use std::os::unix::fs::FileExt;
        let dev = Arc::new(Mutex::new(Device::new()));
        let mut handoff = Handoff::new("test").unwrap();
        let mut c = control(&dev, &handoff);
        let file = memfd(RAM);
        let mut links: Vec<Box<dyn Link>> = Vec::new();
        let prefix = if setup_first { qemu_setup() } else { Vec::new() };
        for op in prefix.iter().chain(&ops) {
            let (ends, running, session) = {
                let d = dev.lock().unwrap();
                (ends_session(op, &d), d.running, d.session)
            };
            front_apply(&mut c, &file, &mut links, op);
            if ends {
                assert_ended(&mut links, "a link outlived a message that stops the device");
            } else if running && !matches!(op, FrontOp::Engine) {
                // (The engine may drop a link it found garbled, which ends its session.)
                let d = dev.lock().unwrap();
                prop_assert!(d.running && d.session == session, "{:?} ended the session", op);
            }
            take_links(&mut handoff, &mut links);
        }
        // The guest reboots: its driver zeroes its rings, QEMU resets the device and sets it
        // up again.
        file.write_all_at(&vec![0u8; RAM as usize], 0).unwrap();
        front_apply(&mut c, &file, &mut links, &FrontOp::ResetDevice);
        for op in qemu_setup() {
            front_apply(&mut c, &file, &mut links, &op);
        }
        prop_assert_eq!(take_links(&mut handoff, &mut links), 1, "no fresh link after QEMU's setup");
        let mut link = links.pop().unwrap();
        let mut g = Guest { dev: dev.clone(), next_desc: [0; 2], avail_idx: [0; 2], data: DATA };
        // usernet -> guest.
        let rx = g.offer(RX, &[(&[], 2048, F_WRITE)]);
        link.send(&[0x11; 60]).unwrap();
        link.flush().unwrap();
        prop_assert_eq!(g.used(RX), vec![(0, 72)]);
        prop_assert_eq!(g.read(rx[0] + 12, 60), vec![0x11; 60]);
        // guest -> usernet.
        let mut frame = vec![0u8; 12];
        frame.extend([0x22; 60]);
        g.offer(TX, &[(&frame, 72, 0)]);
        let mut buf = vec![0u8; MAX_FRAME];
        prop_assert_eq!(link.recv(&mut buf).unwrap(), 60);
        prop_assert_eq!(&buf[..60], &[0x22; 60][..]);
    }
}
