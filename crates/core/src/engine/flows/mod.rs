//! The flow table: every guest connection and the host socket behind it.
//!
//! Flows live in a slab of slots; a slot's index and generation make the event-loop token
//! of the flow's socket, so a stale event for a reused slot is recognised and ignored.
//! A hash map from the flow's addresses to its slot makes each packet O(1): IPv4 flows in
//! one keyed by IPv4 addresses (16 bytes a key, where std's `SocketAddr` alone takes 32),
//! the others (IPv6, spliced) in a second.

pub mod icmp;
pub mod lru;
pub mod owners;
pub mod splice;
pub mod tcp;
pub mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{AsRawFd, RawFd};
use std::time::Instant;

pub use crate::guest::GuestKey;

pub use icmp::IcmpFlow;
pub use splice::SpliceFlow;
pub use tcp::{TcpFlow, Verdict};
pub use udp::UdpFlow;

/// How a readable socket's round of reads ended. Sockets are watched edge-triggered, so
/// one whose round stopped at its cap, with data perhaps still queued, must be watched
/// again (`Engine::watch_again`): else nothing reports the rest before the next arrival.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadRound {
    /// The socket said it had no more (or the flow is done with it).
    Drained,
    /// The round read its most; more may wait.
    Capped,
}

/// What a flow carried and when, for `/v1/flows` (`usernet flows`, `usernet top`): payload
/// bytes each way (TCP: what the other side took; UDP and ICMP: datagrams and messages),
/// when the flow began and when it last carried a packet.
#[derive(Clone, Copy, Debug)]
pub struct Traffic {
    pub born: Instant,
    pub last: Instant,
    pub from_guest: u64,
    pub to_guest: u64,
}

impl Traffic {
    pub fn new(now: Instant) -> Traffic {
        Traffic { born: now, last: now, from_guest: 0, to_guest: 0 }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FlowKey {
    Tcp {
        guest: SocketAddr,
        remote: SocketAddr,
    },
    Udp {
        guest: SocketAddr,
        remote: SocketAddr,
    },
    Icmp {
        guest: IpAddr,
        remote: IpAddr,
        ident: u16,
    },
    /// Socket-to-socket flows are never looked up by address: a serial number.
    Splice {
        id: u64,
    },
}

/// A flow of any kind. TCP flows are the largest and by far the most numerous: they stay
/// inline (boxing them would add an allocation and a pointer chase per flow to save memory
/// only on the fewer UDP, ICMP and spliced ones).
#[allow(clippy::large_enum_variant)]
pub enum Flow {
    Tcp(TcpFlow),
    Udp(UdpFlow),
    Icmp(IcmpFlow),
    Splice(SpliceFlow),
}

impl Flow {
    /// A UDP flow to the gateway's DNS service.
    pub fn is_gateway_dns(&self) -> bool {
        matches!(self, Flow::Udp(u) if u.gateway_dns)
    }

    /// Whether the guest is still sending to the host through this connection: it is open
    /// both ways, and the guest's end of stream has not been passed on to the host yet.
    /// `run` waits for these when its command exits (`Engine::drain_after_exit`), and one
    /// cut short is reset ([`Flow::reset_on_close`]), so that the host's peer does not
    /// take an end of stream for the end of the data.
    pub fn guest_still_sending(&self) -> bool {
        match self {
            Flow::Tcp(f) => f.guest_still_sending(),
            Flow::Splice(f) => f.guest_still_sending(),
            Flow::Udp(_) | Flow::Icmp(_) => false,
        }
    }

    /// Makes the close of the flow's host socket a reset (RST), not an end of stream.
    pub fn reset_on_close(&mut self) {
        match self {
            Flow::Tcp(f) => f.reset_on_close(),
            Flow::Splice(f) => f.reset_on_close(),
            Flow::Udp(_) | Flow::Icmp(_) => {}
        }
    }

    /// What the flow carried (see [`Traffic`]).
    pub fn traffic(&self) -> Traffic {
        match self {
            Flow::Tcp(f) => f.traffic,
            Flow::Udp(f) => Traffic { last: f.last_used, ..f.traffic },
            Flow::Icmp(f) => Traffic { last: f.last_used, ..f.traffic },
            Flow::Splice(f) => f.traffic,
        }
    }

    pub fn key(&self) -> FlowKey {
        match self {
            Flow::Tcp(f) => FlowKey::Tcp { guest: f.guest, remote: f.remote },
            Flow::Udp(f) => FlowKey::Udp { guest: f.guest, remote: f.remote },
            Flow::Icmp(f) => FlowKey::Icmp { guest: f.guest, remote: f.remote, ident: f.ident },
            Flow::Splice(f) => FlowKey::Splice { id: f.id },
        }
    }

    /// The flow's own socket to watch; None for inbound UDP flows (their listener is watched).
    pub fn fd(&self) -> Option<RawFd> {
        match self {
            Flow::Tcp(f) => Some(f.sock.as_raw_fd()),
            Flow::Udp(f) => f.own_fd().map(|s| s.as_raw_fd()),
            Flow::Icmp(f) => Some(f.sock.as_raw_fd()),
            Flow::Splice(f) => Some(f.host.as_raw_fd()),
        }
    }

    pub fn deadline(&self) -> Option<Instant> {
        match self {
            Flow::Tcp(f) => f.deadline(),
            Flow::Udp(f) => f.deadline(),
            Flow::Icmp(f) => f.deadline(),
            Flow::Splice(_) => None,
        }
    }

    pub fn scheduled_mut(&mut self) -> &mut Option<Instant> {
        match self {
            Flow::Tcp(f) => &mut f.scheduled,
            Flow::Udp(f) => &mut f.scheduled,
            Flow::Icmp(f) => &mut f.scheduled,
            Flow::Splice(f) => &mut f.scheduled,
        }
    }
}

/// Generations wrap at 24 bits so that flow tokens stay clear of the high token bits.
const GENERATION_MASK: u32 = 0xff_ffff;

/// The bounded kinds of flows, each kept in order of age or use (see [`lru`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Outbound TCP flows whose host connect is in progress, oldest first.
    Connecting,
    /// UDP flows other than the gateway DNS's, least recently used first.
    Udp,
    /// UDP flows to the gateway's DNS, least recently used first.
    GatewayDns,
    /// ICMP echo flows, least recently used first.
    Icmp,
}

/// The key of an IPv4 flow in [`FlowTable`]'s first index: a [`FlowKey`] in its compact form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Key4 {
    Tcp(SocketAddrV4, SocketAddrV4),
    Udp(SocketAddrV4, SocketAddrV4),
    Icmp(Ipv4Addr, Ipv4Addr, u16),
}

impl Key4 {
    /// The compact key of an IPv4 flow; None for the others.
    fn of(key: &FlowKey) -> Option<Key4> {
        match *key {
            FlowKey::Tcp { guest: SocketAddr::V4(g), remote: SocketAddr::V4(r) } => Some(Key4::Tcp(g, r)),
            FlowKey::Udp { guest: SocketAddr::V4(g), remote: SocketAddr::V4(r) } => Some(Key4::Udp(g, r)),
            FlowKey::Icmp { guest: IpAddr::V4(g), remote: IpAddr::V4(r), ident } => Some(Key4::Icmp(g, r, ident)),
            _ => None,
        }
    }
}

/// A flow's handle: slot index and generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowId {
    pub slot: u32,
    pub generation: u32,
}

impl FlowId {
    pub fn token(self, base: usize) -> mio::Token {
        mio::Token(base + (((self.generation & GENERATION_MASK) as usize) << 32 | self.slot as usize))
    }

    pub fn from_token(t: mio::Token, base: usize) -> FlowId {
        let v = t.0 - base;
        FlowId { slot: (v & 0xffff_ffff) as u32, generation: (v >> 32) as u32 }
    }
}

struct Slot {
    generation: u32,
    flow: Option<Flow>,
    /// Whom the flow counts against in `tcp_per_guest` (kept here: a flow's own addresses
    /// may change, as an inbound flow's do when it falls back from IPv6 to IPv4).
    guest: Option<GuestKey>,
}

#[derive(Default)]
pub struct FlowTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// IPv4 flows by their addresses.
    index4: HashMap<Key4, FlowId>,
    /// The other flows (IPv6, spliced) by theirs.
    index: HashMap<FlowKey, FlowId>,
    pub tcp_count: usize,
    pub udp_count: usize,
    pub icmp_count: usize,
    /// UDP flows to the gateway's DNS (bounded apart: see flow_policy's MAX_GATEWAY_DNS).
    pub gateway_dns_count: usize,
    connecting: lru::SlotList,
    udp: lru::SlotList,
    gateway_dns: lru::SlotList,
    icmp: lru::SlotList,
    /// TCP flows per guest, for the per-guest bound.
    tcp_per_guest: HashMap<GuestKey, usize>,
    /// With several engines (`engine::shard`): the map of which engine holds each flow,
    /// kept up to date with this table, and this engine's index there.
    owners: Option<(std::sync::Arc<owners::Owners>, usize)>,
}

impl FlowTable {
    /// Keeps `set`'s owner map up to date with this table, as engine `me`'s.
    pub fn share_owners(&mut self, set: std::sync::Arc<owners::Owners>, me: usize) {
        for (_, flow) in self.ids() {
            match flow.key() {
                FlowKey::Splice { .. } => set.count_splice(me, true),
                key => set.claim(key, me),
            }
        }
        self.owners = Some((set, me));
    }

    pub fn lookup(&self, key: &FlowKey) -> Option<FlowId> {
        match Key4::of(key) {
            Some(k) => self.index4.get(&k).copied(),
            None => self.index.get(key).copied(),
        }
    }

    pub fn get_mut(&mut self, id: FlowId) -> Option<&mut Flow> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.flow.as_mut()
    }

    fn list(&mut self, kind: Kind) -> &mut lru::SlotList {
        match kind {
            Kind::Connecting => &mut self.connecting,
            Kind::Udp => &mut self.udp,
            Kind::GatewayDns => &mut self.gateway_dns,
            Kind::Icmp => &mut self.icmp,
        }
    }

    /// The bounded kind a flow belongs to when it is made.
    fn kind_of(flow: &Flow) -> Option<Kind> {
        match flow {
            Flow::Tcp(f) if f.is_connecting() => Some(Kind::Connecting),
            Flow::Tcp(_) | Flow::Splice(_) => None,
            Flow::Udp(u) if u.gateway_dns => Some(Kind::GatewayDns),
            Flow::Udp(_) => Some(Kind::Udp),
            Flow::Icmp(_) => Some(Kind::Icmp),
        }
    }

    /// How many flows of `kind` there are.
    pub fn count(&self, kind: Kind) -> usize {
        match kind {
            Kind::Connecting => self.connecting.len(),
            Kind::Udp => self.udp.len(),
            Kind::GatewayDns => self.gateway_dns.len(),
            Kind::Icmp => self.icmp.len(),
        }
    }

    /// The oldest (least recently used) flow of `kind`.
    pub fn oldest(&self, kind: Kind) -> Option<FlowId> {
        let list = match kind {
            Kind::Connecting => &self.connecting,
            Kind::Udp => &self.udp,
            Kind::GatewayDns => &self.gateway_dns,
            Kind::Icmp => &self.icmp,
        };
        let slot = list.front()?;
        Some(FlowId { slot, generation: self.slots[slot as usize].generation })
    }

    /// The flow was just used: it is the last of its kind to evict.
    pub fn touch(&mut self, id: FlowId) {
        for kind in [Kind::Udp, Kind::GatewayDns, Kind::Icmp] {
            self.list(kind).touch(id.slot);
        }
    }

    /// The flow's connect completed: it no longer counts among the connects in progress.
    pub fn connected(&mut self, id: FlowId) {
        self.connecting.remove(id.slot);
    }

    /// Whether the flow counts among the connects in progress.
    pub fn is_counted_connecting(&self, id: FlowId) -> bool {
        self.connecting.contains(id.slot)
    }

    /// TCP flows of `guest` (spliced ones, which never cross the link, aside).
    pub fn tcp_of_guest(&self, guest: GuestKey) -> usize {
        self.tcp_per_guest.get(&guest).copied().unwrap_or(0)
    }

    /// Adds `flow`; a TCP flow counts against `guest` until it is removed.
    pub fn insert(&mut self, flow: Flow, guest: Option<GuestKey>) -> FlowId {
        let key = flow.key();
        if let Some((set, me)) = &self.owners {
            match key {
                FlowKey::Splice { .. } => set.count_splice(*me, true),
                key => set.claim(key, *me),
            }
        }
        if flow.is_gateway_dns() {
            self.gateway_dns_count += 1;
        }
        match &flow {
            Flow::Tcp(_) => self.tcp_count += 1,
            Flow::Udp(_) => self.udp_count += 1,
            Flow::Icmp(_) => self.icmp_count += 1,
            Flow::Splice(_) => self.tcp_count += 1,
        }
        let guest = guest.filter(|_| matches!(flow, Flow::Tcp(_)));
        if let Some(g) = guest {
            *self.tcp_per_guest.entry(g).or_insert(0) += 1;
        }
        let kind = Self::kind_of(&flow);
        let id = if let Some(slot) = self.free.pop() {
            let s = &mut self.slots[slot as usize];
            s.flow = Some(flow);
            s.guest = guest;
            FlowId { slot, generation: s.generation }
        } else {
            self.slots.push(Slot { generation: 0, flow: Some(flow), guest });
            FlowId { slot: (self.slots.len() - 1) as u32, generation: 0 }
        };
        match Key4::of(&key) {
            Some(k) => self.index4.insert(k, id),
            None => self.index.insert(key, id),
        };
        if let Some(kind) = kind {
            self.list(kind).push_back(id.slot);
        }
        id
    }

    /// The flow `id`, found under `old` until now, has new addresses (an inbound flow that
    /// fell back from IPv6 to IPv4): index it under them.
    pub fn rekey(&mut self, id: FlowId, old: &FlowKey) {
        let Some(new) = self.slots.get(id.slot as usize).and_then(|s| s.flow.as_ref()).map(Flow::key) else { return };
        let elsewhere = self.owners.as_ref().is_some_and(|(set, me)| set.owner(&new).is_some_and(|o| o != *me));
        if new == *old || self.lookup(&new).is_some() || elsewhere {
            // (Another flow has those addresses already: this one keeps its old key, and
            // the guest's answers to it go unheard until it times out.)
            return;
        }
        match Key4::of(old) {
            Some(k) => self.index4.remove(&k),
            None => self.index.remove(old),
        };
        if let Some((set, me)) = &self.owners {
            set.release(old, *me);
            set.claim(new, *me);
        }
        match Key4::of(&new) {
            Some(k) => self.index4.insert(k, id),
            None => self.index.insert(new, id),
        };
    }

    pub fn remove(&mut self, id: FlowId) -> Option<Flow> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        let flow = s.flow.take()?;
        let guest = s.guest.take();
        s.generation = s.generation.wrapping_add(1) & GENERATION_MASK;
        self.free.push(id.slot);
        let key = flow.key();
        match Key4::of(&key) {
            Some(k) => self.index4.remove(&k),
            None => self.index.remove(&key),
        };
        if let Some((set, me)) = &self.owners {
            match key {
                FlowKey::Splice { .. } => set.count_splice(*me, false),
                key => set.release(&key, *me),
            }
        }
        for kind in [Kind::Connecting, Kind::Udp, Kind::GatewayDns, Kind::Icmp] {
            self.list(kind).remove(id.slot);
        }
        if let Some(g) = guest
            && let Some(n) = self.tcp_per_guest.get_mut(&g)
        {
            *n -= 1;
            if *n == 0 {
                self.tcp_per_guest.remove(&g);
            }
        }
        if flow.is_gateway_dns() {
            self.gateway_dns_count -= 1;
        }
        match &flow {
            Flow::Tcp(_) => self.tcp_count -= 1,
            Flow::Udp(_) => self.udp_count -= 1,
            Flow::Icmp(_) => self.icmp_count -= 1,
            Flow::Splice(_) => self.tcp_count -= 1,
        }
        Some(flow)
    }

    /// Every live flow (for eviction scans and shutdown).
    pub fn ids(&self) -> impl Iterator<Item = (FlowId, &Flow)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.flow.as_ref().map(|f| (FlowId { slot: i as u32, generation: s.generation }, f)))
    }

    pub fn len(&self) -> usize {
        self.index4.len() + self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index4.is_empty() && self.index.is_empty()
    }
}
