//! DHCPv4 server for the virtual network (RFC 2131), free of I/O.
//!
//! Theory of operation: the engine hands [`DhcpServer::handle`] the UDP payload of every
//! datagram a guest sends to port 67, together with the Ethernet source MAC. The server
//! decodes it with `dhcproto`, updates its lease table and returns at most one reply: the
//! DHCP message for UDP 67 -> 68 plus where to send it (IP and MAC). The engine wraps the
//! reply in UDP/IPv4/Ethernet with the gateway as source.
//!
//! Leases are stable per MAC for the life of the server: the first MAC seen gets
//! `cfg.guest` (.2 by default), later MACs the next free address of the pool, which runs
//! from `cfg.guest` to the last address before the broadcast address and never contains the
//! network, gateway, host or broadcast addresses. A binding is made when the address is
//! offered, so a client that retries DISCOVER sees the same offer. RELEASE keeps the
//! binding (the same MAC gets the same address back) but lets the address be reclaimed if the
//! pool ever runs dry; DECLINE (the client found the address in use) takes the address out of
//! the pool and drops the binding. A lease that was acknowledged does not expire: the
//! virtual network is small and private, and a lease outliving its lease time harms nobody.
//! An offer does: a guest that sends DISCOVERs from ever new MACs (and never REQUESTs) must
//! not take the pool. Offers not taken up within [`OFFER_TTL`] are forgotten, at most
//! `--max-dhcp-offers` wait at once (beyond, the oldest is forgotten, counted in
//! `offers_evicted`), and when the pool is full the oldest offer gives its address up.
//!
//! The server is authoritative for its subnet: a client in INIT-REBOOT or RENEWING that asks
//! for an address we have no record of gets it when it is free (usernet restarted under a
//! running VM), and a NAK when it is taken or outside the pool.
//!
//! Offers and ACKs carry the gateway as router and DNS server, the MTU, the lease times and,
//! when the host's resolv.conf has search domains, the first as the domain name (option 15)
//! and all of them as the domain search list (option 119, RFC 3397). The search domains are
//! read from the live [`crate::config::HostDns`] for every reply, so a guest that renews its
//! lease after the host's resolv.conf changed gets the new list.
//!
//! Reply destinations follow RFC 2131 section 4.1: NAKs are broadcast; a client with
//! `ciaddr` set is unicast there; a client that set the broadcast flag gets a broadcast;
//! otherwise the reply is unicast to `yiaddr` at the client's hardware address. Relay agents
//! (`giaddr`) do not exist on this link and are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::{
    Decodable, Decoder, DhcpOption, DhcpOptions, Encodable, Flags, HType, Message, MessageType, Opcode, OptionCode,
};
use hickory_proto::rr::Name;

use crate::config::NetConfig;

/// The broadcast Ethernet address.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];

/// BOOTP's minimum message size; some clients drop shorter replies.
const MIN_REPLY_LEN: usize = 300;

/// Length of the fixed BOOTP header, up to the magic cookie.
const FIXED_LEN: usize = 236;
/// The DHCP magic cookie that starts the options.
const MAGIC_COOKIE: [u8; 4] = [99, 130, 83, 99];
/// The options the server reads; every other option is dropped before decoding.
const USED_OPTIONS: [u8; 4] = [
    53, // message type
    50, // requested IP address
    54, // server identifier
    61, // client identifier
];

/// Upper bound on the lease table, so a guest inventing MACs cannot grow it without limit.
const MAX_BINDINGS: usize = 65536;

/// How long an offer waits for the client's REQUEST before its address is free again.
pub const OFFER_TTL: Duration = Duration::from_secs(60);

/// A reply to send to the client: UDP from gateway:67 to `dst_ip`:68, Ethernet to `dst_mac`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DhcpReply {
    /// The encoded DHCP message (the UDP payload).
    pub payload: Vec<u8>,
    pub dst_ip: Ipv4Addr,
    pub dst_mac: [u8; 6],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Offered, not yet requested.
    Offered,
    /// Acknowledged: the client uses it.
    Bound,
    /// Released by the client; same MAC gets it back, reclaimable when the pool is full.
    Released,
}

#[derive(Clone, Copy, Debug)]
struct Binding {
    addr: Ipv4Addr,
    state: State,
    /// When the address was offered (in `offers`), while the state is `Offered`.
    offered_at: Option<Instant>,
}

/// The DHCPv4 server state: configuration plus the lease table.
pub struct DhcpServer {
    cfg: Arc<NetConfig>,
    /// MAC -> binding.
    bindings: BTreeMap<[u8; 6], Binding>,
    /// Addresses held by a binding (any state), for quick "is it free" checks.
    used: BTreeMap<Ipv4Addr, [u8; 6]>,
    /// Addresses a client declined (in use by someone we do not know).
    declined: BTreeSet<Ipv4Addr>,
    /// Offers not taken up yet, oldest first (when made, and to which MAC).
    offers: BTreeSet<(Instant, [u8; 6])>,
    /// Offers forgotten because `--max-dhcp-offers` were waiting.
    pub offers_evicted: u64,
}

impl DhcpServer {
    pub fn new(cfg: Arc<NetConfig>) -> Self {
        DhcpServer {
            cfg,
            bindings: BTreeMap::new(),
            used: BTreeMap::new(),
            declined: BTreeSet::new(),
            offers: BTreeSet::new(),
            offers_evicted: 0,
        }
    }

    /// Handle one DHCP message (the UDP payload of a datagram to port 67) sent from the
    /// Ethernet address `chaddr`. Returns the reply to send, if any. Malformed input, BOOTP
    /// without a DHCP message type, and messages meant for another server give None.
    pub fn handle(&mut self, chaddr: [u8; 6], payload: &[u8]) -> Option<DhcpReply> {
        self.handle_at(chaddr, payload, Instant::now())
    }

    /// [`Self::handle`] at time `now` (offers expire, see the top of this file).
    pub fn handle_at(&mut self, chaddr: [u8; 6], payload: &[u8], now: Instant) -> Option<DhcpReply> {
        self.expire_offers(now);
        let clean = sanitize(payload)?;
        let msg = Message::decode(&mut Decoder::new(&clean)).ok()?;
        if msg.opcode() != Opcode::BootRequest || msg.opts().is_empty() {
            return None;
        }
        // chaddr() slices by hlen and would panic past 16: check before using it.
        let mac = if msg.htype() == HType::Eth && msg.hlen() == 6 {
            <[u8; 6]>::try_from(msg.chaddr()).unwrap_or(chaddr)
        } else {
            chaddr
        };
        let kind = msg.opts().msg_type()?;
        let reply = match kind {
            MessageType::Discover => self.discover(&msg, mac, now),
            MessageType::Request => self.request(&msg, mac),
            MessageType::Release => {
                self.release(&msg, mac);
                None
            }
            MessageType::Decline => {
                self.decline(&msg, mac);
                None
            }
            MessageType::Inform => self.inform(&msg, mac),
            _ => None,
        };
        // What a guest asked and whether it was answered (RUST_LOG=usernet_core=debug): a
        // guest that gets no lease shows here whether its messages arrived.
        tracing::debug!(
            mac = %crate::guest::GuestKey::Mac(mac),
            kind = ?kind,
            answered = reply.is_some(),
            "DHCP"
        );
        reply
    }

    /// Active leases (acknowledged and not released): address and MAC, by address.
    pub fn leases(&self) -> Vec<(Ipv4Addr, [u8; 6])> {
        let mut out: Vec<_> =
            self.bindings.iter().filter(|(_, b)| b.state == State::Bound).map(|(mac, b)| (b.addr, *mac)).collect();
        out.sort();
        out
    }

    /// Record a lease made outside DHCP (e.g. `usernet run` configures the first guest
    /// statically), so the address is never handed to another MAC. Replaces any binding
    /// `mac` had; fails (false) when the address is outside the pool or held by another MAC.
    pub fn add_static(&mut self, mac: [u8; 6], addr: Ipv4Addr) -> bool {
        if !self.in_pool(addr) {
            return false;
        }
        if let Some(owner) = self.used.get(&addr)
            && *owner != mac
        {
            return false;
        }
        self.bind(mac, addr, State::Bound);
        true
    }

    fn discover(&mut self, msg: &Message, mac: [u8; 6], now: Instant) -> Option<DhcpReply> {
        let addr = match self.bindings.get(&mac).copied() {
            Some(b) => {
                if b.state == State::Offered {
                    // The client asks again: its offer waits from now.
                    self.bind(mac, b.addr, State::Offered);
                    self.note_offer(mac, now);
                }
                b.addr
            }
            None => {
                while self.offers.len() >= self.cfg.limits.max_dhcp_offers.max(1) {
                    self.forget_oldest_offer();
                    self.offers_evicted += 1;
                }
                let addr = self.allocate()?;
                self.bind(mac, addr, State::Offered);
                self.note_offer(mac, now);
                addr
            }
        };
        Some(self.reply(msg, mac, MessageType::Offer, addr))
    }

    /// Offers waiting for a REQUEST.
    pub fn offers_waiting(&self) -> usize {
        self.offers.len()
    }

    fn note_offer(&mut self, mac: [u8; 6], now: Instant) {
        if let Some(b) = self.bindings.get_mut(&mac) {
            b.offered_at = Some(now);
            self.offers.insert((now, mac));
        }
    }

    /// Forgets offers older than [`OFFER_TTL`].
    fn expire_offers(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.offers.first() {
            if now.saturating_duration_since(at) < OFFER_TTL {
                break;
            }
            self.forget_oldest_offer();
        }
    }

    /// Forgets the oldest offer: its binding goes, its address is free again.
    fn forget_oldest_offer(&mut self) -> Option<Ipv4Addr> {
        let (_, mac) = self.offers.pop_first()?;
        let b = self.bindings.remove(&mac)?;
        self.used.remove(&b.addr);
        Some(b.addr)
    }

    fn request(&mut self, msg: &Message, mac: [u8; 6]) -> Option<DhcpReply> {
        let server_id = match msg.opts().get(OptionCode::ServerIdentifier) {
            Some(DhcpOption::ServerIdentifier(id)) => Some(*id),
            _ => None,
        };
        let requested = match msg.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
            _ => None,
        };
        let current = self.bindings.get(&mac).map(|b| b.addr);

        if let Some(id) = server_id {
            // SELECTING: the client answers an offer.
            if id != self.cfg.gateway {
                // It chose another server; our offer stays reserved for it.
                return None;
            }
            return match (requested, current) {
                (Some(want), Some(have)) if want == have => self.ack(msg, mac, have),
                _ => Some(self.nak(msg, mac)),
            };
        }

        // INIT-REBOOT (requested address, no ciaddr) or RENEWING/REBINDING (ciaddr).
        let want = match requested {
            Some(ip) => ip,
            None if !msg.ciaddr().is_unspecified() => msg.ciaddr(),
            None => return Some(self.nak(msg, mac)),
        };
        match current {
            Some(have) if have == want => self.ack(msg, mac, have),
            Some(_) => Some(self.nak(msg, mac)),
            None if self.is_free(want) && self.bindings.len() < MAX_BINDINGS => {
                self.bind(mac, want, State::Offered);
                self.ack(msg, mac, want)
            }
            None => Some(self.nak(msg, mac)),
        }
    }

    fn ack(&mut self, msg: &Message, mac: [u8; 6], addr: Ipv4Addr) -> Option<DhcpReply> {
        self.bind(mac, addr, State::Bound);
        Some(self.reply(msg, mac, MessageType::Ack, addr))
    }

    fn release(&mut self, msg: &Message, mac: [u8; 6]) {
        if let Some(b) = self.bindings.get_mut(&mac)
            && b.addr == msg.ciaddr()
        {
            b.state = State::Released;
        }
    }

    fn decline(&mut self, msg: &Message, mac: [u8; 6]) {
        let Some(DhcpOption::RequestedIpAddress(addr)) = msg.opts().get(OptionCode::RequestedIpAddress) else {
            return;
        };
        if self.bindings.get(&mac).map(|b| b.addr) == Some(*addr) {
            if let Some(at) = self.bindings.get(&mac).and_then(|b| b.offered_at) {
                self.offers.remove(&(at, mac));
            }
            self.bindings.remove(&mac);
            self.used.remove(addr);
            self.declined.insert(*addr);
        }
    }

    fn inform(&mut self, msg: &Message, mac: [u8; 6]) -> Option<DhcpReply> {
        if msg.ciaddr().is_unspecified() {
            return None;
        }
        // RFC 2131 4.3.5: no lease times in an ACK to INFORM; reply goes to ciaddr.
        Some(self.reply(msg, mac, MessageType::Ack, Ipv4Addr::UNSPECIFIED))
    }

    /// Build an OFFER or ACK for `addr` with the network's options (an ACK to INFORM when
    /// `addr` is unspecified: no lease times).
    fn reply(&self, msg: &Message, mac: [u8; 6], kind: MessageType, addr: Ipv4Addr) -> DhcpReply {
        let cfg = &self.cfg;
        let mut out = base_reply(msg);
        out.set_yiaddr(addr);
        let opts = out.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(cfg.gateway));
        opts.insert(DhcpOption::SubnetMask(cfg.subnet.mask()));
        opts.insert(DhcpOption::Router(vec![cfg.gateway]));
        if let Some(dns) = cfg.dns {
            opts.insert(DhcpOption::DomainNameServer(vec![dns]));
        }
        opts.insert(DhcpOption::BroadcastAddr(cfg.subnet.broadcast()));
        opts.insert(DhcpOption::InterfaceMtu(u16::try_from(cfg.mtu).unwrap_or(u16::MAX)));
        if !addr.is_unspecified() {
            opts.insert(DhcpOption::AddressLeaseTime(cfg.lease_secs));
            opts.insert(DhcpOption::Renewal(cfg.lease_secs / 2));
            opts.insert(DhcpOption::Rebinding((u64::from(cfg.lease_secs) * 7 / 8) as u32));
        }
        // The host's search domains as they are now (they follow its resolv.conf).
        let upstreams = cfg.host_dns.upstreams();
        let names: Vec<Name> = upstreams.search.iter().filter_map(|d| Name::from_ascii(d).ok()).collect();
        if let Some(first) = upstreams.search.first() {
            opts.insert(DhcpOption::DomainName(first.clone()));
        }
        if !names.is_empty() {
            opts.insert(DhcpOption::DomainSearch(names));
        }
        let (dst_ip, dst_mac) = if !msg.ciaddr().is_unspecified() {
            (msg.ciaddr(), mac)
        } else if msg.flags().broadcast() {
            (Ipv4Addr::BROADCAST, BROADCAST_MAC)
        } else {
            (addr, mac)
        };
        DhcpReply { payload: encode(&out).unwrap_or_default(), dst_ip, dst_mac }
    }

    fn nak(&self, msg: &Message, _mac: [u8; 6]) -> DhcpReply {
        let mut out = base_reply(msg);
        out.opts_mut().insert(DhcpOption::MessageType(MessageType::Nak));
        out.opts_mut().insert(DhcpOption::ServerIdentifier(self.cfg.gateway));
        // A NAK is broadcast (RFC 2131 4.1): the client may not hold the address it asked for.
        let mut flags = Flags::default();
        flags = flags.set_broadcast();
        out.set_flags(flags);
        DhcpReply { payload: encode(&out).unwrap_or_default(), dst_ip: Ipv4Addr::BROADCAST, dst_mac: BROADCAST_MAC }
    }

    fn bind(&mut self, mac: [u8; 6], addr: Ipv4Addr, state: State) {
        if let Some(old) = self.bindings.insert(mac, Binding { addr, state, offered_at: None }) {
            if old.addr != addr {
                self.used.remove(&old.addr);
            }
            if let Some(at) = old.offered_at {
                self.offers.remove(&(at, mac));
            }
        }
        self.used.insert(addr, mac);
    }

    /// The first pool address `a` such that `a` is in the pool and nobody holds it; when the
    /// pool is full, reclaim the lowest released address.
    fn allocate(&mut self) -> Option<Ipv4Addr> {
        if self.bindings.len() >= MAX_BINDINGS {
            return self.reclaim();
        }
        let start = u32::from(self.cfg.guest);
        let end = u32::from(self.cfg.subnet.broadcast());
        let free = (start..end).map(Ipv4Addr::from).find(|a| self.is_free(*a));
        // The pool is full: a released address, else the oldest offer's.
        free.or_else(|| self.reclaim()).or_else(|| self.forget_oldest_offer())
    }

    fn reclaim(&mut self) -> Option<Ipv4Addr> {
        let (mac, addr) = self
            .bindings
            .iter()
            .filter(|(_, b)| b.state == State::Released)
            .map(|(mac, b)| (*mac, b.addr))
            .min_by_key(|(_, a)| *a)?;
        self.bindings.remove(&mac);
        self.used.remove(&addr);
        Some(addr)
    }

    fn in_pool(&self, addr: Ipv4Addr) -> bool {
        let cfg = &self.cfg;
        cfg.subnet.contains(addr) && addr >= cfg.guest && addr < cfg.subnet.broadcast() && !cfg.is_own_address(addr)
    }

    fn is_free(&self, addr: Ipv4Addr) -> bool {
        self.in_pool(addr) && !self.used.contains_key(&addr) && !self.declined.contains(&addr)
    }
}

/// A BOOTREPLY echoing the request's transaction fields, with no options yet.
fn base_reply(msg: &Message) -> Message {
    let mut out = Message::default();
    out.set_opcode(Opcode::BootReply)
        .set_htype(msg.htype())
        .set_xid(msg.xid())
        .set_flags(msg.flags())
        .set_ciaddr(msg.ciaddr())
        .set_giaddr(msg.giaddr());
    if msg.hlen() <= 16 {
        out.set_chaddr(msg.chaddr());
    }
    let mut opts = DhcpOptions::new();
    // RFC 6842: echo the client identifier.
    if let Some(id @ DhcpOption::ClientIdentifier(_)) = msg.opts().get(OptionCode::ClientIdentifier) {
        opts.insert(id.clone());
    }
    out.set_opts(opts);
    out
}

/// A copy of `payload` holding only the fixed header, the magic cookie and the options in
/// [`USED_OPTIONS`], or None when there is no DHCP cookie or the options run past the end.
///
/// `dhcproto` trusts option lengths in places (debug assertions, unchecked subtraction in
/// options we never use), so the options are walked here first and only those we read are
/// passed on, each with the length its type requires.
fn sanitize(payload: &[u8]) -> Option<Vec<u8>> {
    let header = payload.get(..FIXED_LEN + MAGIC_COOKIE.len())?;
    if header[FIXED_LEN..] != MAGIC_COOKIE {
        return None;
    }
    let mut out = header.to_vec();
    let mut rest = &payload[header.len()..];
    loop {
        match rest {
            [] | [255, ..] => break,
            [0, tail @ ..] => rest = tail,
            [code, len, tail @ ..] => {
                let len = *len as usize;
                let value = tail.get(..len)?;
                let fits = match *code {
                    53 => len == 1,
                    50 | 54 => len == 4,
                    61 => len >= 1,
                    _ => false,
                };
                if fits && USED_OPTIONS.contains(code) {
                    out.extend_from_slice(&[*code, len as u8]);
                    out.extend_from_slice(value);
                }
                rest = &tail[len..];
            }
            [_] => return None,
        }
    }
    out.push(255);
    Some(out)
}

fn encode(msg: &Message) -> Option<Vec<u8>> {
    let mut bytes = msg.to_vec().ok()?;
    message_type_first(&mut bytes);
    if bytes.len() < MIN_REPLY_LEN {
        bytes.resize(MIN_REPLY_LEN, 0);
    }
    Some(bytes)
}

/// Where the options start: after the fixed fields and the magic cookie.
const OPTIONS_OFF: usize = 240;

/// Moves the message type option (53) to the front of the options, where servers such as
/// dnsmasq and vpnkit put it and where simple clients look for it (vpnkit's Go client reads
/// the offer's type at a fixed offset). The encoder writes options by code.
fn message_type_first(bytes: &mut [u8]) {
    let Some(opts) = bytes.get_mut(OPTIONS_OFF..) else { return };
    let mut at = 0;
    while let Some(&code) = opts.get(at) {
        match code {
            0 => at += 1,
            255 => return,
            53 => {
                let Some(&len) = opts.get(at + 1) else { return };
                let end = at + 2 + len as usize;
                if end <= opts.len() {
                    // Rotate [0, end) so that the option at `at` comes first.
                    opts[..end].rotate_right(end - at);
                }
                return;
            }
            _ => match opts.get(at + 1) {
                Some(&len) => at += 2 + len as usize,
                None => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upstreams;

    #[test]
    fn message_type_is_the_first_option() {
        let mut s = DhcpServer::new(cfg());
        let reply = s.handle(MAC1, &request(MessageType::Discover, MAC1, vec![]).to_vec().unwrap()).unwrap();
        assert_eq!(&reply.payload[236..243], &[0x63, 0x82, 0x53, 0x63, 53, 1, 2]);
        let decoded = Message::decode(&mut Decoder::new(&reply.payload)).unwrap();
        assert_eq!(decoded.opts().msg_type(), Some(MessageType::Offer));
        assert!(decoded.opts().get(OptionCode::SubnetMask).is_some(), "the other options stay");
        // Truncated and odd option areas never panic.
        for bytes in [
            vec![0u8; 241],
            vec![0u8; 10],
            [vec![0u8; 240], vec![1, 200]].concat(),
            [vec![0u8; 240], vec![53]].concat(),
        ] {
            let mut b = bytes.clone();
            message_type_first(&mut b);
        }
    }
    use proptest::prelude::*;

    const MAC1: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const MAC2: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];

    fn cfg() -> Arc<NetConfig> {
        let cfg = NetConfig { mtu: 1500, ..NetConfig::default() };
        cfg.host_dns.set_upstreams(Upstreams {
            search: vec!["example.test".into(), "corp.test".into()],
            ..Upstreams::default()
        });
        Arc::new(cfg)
    }

    fn request(kind: MessageType, mac: [u8; 6], opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::new_with_id(
            0x1234_5678,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o);
        }
        m
    }

    fn send(s: &mut DhcpServer, mac: [u8; 6], m: &Message) -> Option<(Message, DhcpReply)> {
        let r = s.handle(mac, &m.to_vec().unwrap())?;
        let decoded = Message::decode(&mut Decoder::new(&r.payload)).unwrap();
        Some((decoded, r))
    }

    fn kind(m: &Message) -> MessageType {
        m.opts().msg_type().unwrap()
    }

    /// DISCOVER, then REQUEST the offered address; returns the ACKed address.
    fn lease(s: &mut DhcpServer, mac: [u8; 6]) -> Ipv4Addr {
        let (offer, _) = send(s, mac, &request(MessageType::Discover, mac, vec![])).unwrap();
        assert_eq!(kind(&offer), MessageType::Offer);
        let req = request(
            MessageType::Request,
            mac,
            vec![
                DhcpOption::RequestedIpAddress(offer.yiaddr()),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 65, 1)),
            ],
        );
        let (ack, _) = send(s, mac, &req).unwrap();
        assert_eq!(kind(&ack), MessageType::Ack);
        assert_eq!(ack.yiaddr(), offer.yiaddr());
        ack.yiaddr()
    }

    fn mac_n(i: u32) -> [u8; 6] {
        let b = i.to_be_bytes();
        [0x02, 0xee, b[0], b[1], b[2], b[3]]
    }

    /// A guest that sends DISCOVERs from ever new MACs and never REQUESTs: at most
    /// `--max-dhcp-offers` offers wait, the oldest go first, offers expire, and a
    /// well-behaved client still gets its lease.
    #[test]
    fn offers_to_a_discover_spray_are_bounded_and_expire() {
        let limits = crate::config::Limits { max_dhcp_offers: 10, ..Default::default() };
        let mut s = DhcpServer::new(Arc::new(NetConfig { limits, ..NetConfig::default() }));
        let now = Instant::now();
        for i in 0..1000 {
            let m = request(MessageType::Discover, mac_n(i), vec![]);
            assert!(s.handle_at(mac_n(i), &m.to_vec().unwrap(), now).is_some(), "offer {i}");
        }
        assert_eq!(s.offers_waiting(), 10);
        assert_eq!(s.offers_evicted, 990);
        assert!(s.bindings.len() <= 10);
        let a = lease(&mut s, MAC1);
        assert_eq!(s.leases(), vec![(a, MAC1)]);
        // Offers not taken up expire; the lease stays.
        let later = now + OFFER_TTL + Duration::from_secs(1);
        let m = request(MessageType::Inform, MAC2, vec![]);
        let _ = s.handle_at(MAC2, &m.to_vec().unwrap(), later);
        assert_eq!(s.offers_waiting(), 0);
        assert_eq!(s.bindings.len(), 1);
        assert_eq!(s.used.len(), 1);
    }

    /// Offers that fill the pool give their addresses up to new clients, oldest first.
    #[test]
    fn a_pool_full_of_offers_still_serves_new_clients() {
        let mut s = DhcpServer::new(cfg());
        let now = Instant::now();
        for i in 0..300 {
            let m = request(MessageType::Discover, mac_n(i), vec![]);
            let _ = s.handle_at(mac_n(i), &m.to_vec().unwrap(), now);
        }
        // 192.168.65.2 to .253, less the host's .254 (outside) : all offered, yet:
        let a = lease(&mut s, MAC1);
        assert!(s.in_pool(a));
        assert_eq!(s.leases(), vec![(a, MAC1)]);
        assert!(s.offers_waiting() < 256);
    }

    #[test]
    fn offer_has_options() {
        let mut s = DhcpServer::new(cfg());
        let m = request(MessageType::Discover, MAC1, vec![]);
        let (offer, r) = send(&mut s, MAC1, &m).unwrap();
        assert_eq!(offer.opcode(), Opcode::BootReply);
        assert_eq!(offer.xid(), 0x1234_5678);
        assert_eq!(offer.chaddr(), &MAC1);
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(192, 168, 65, 2));
        assert!(r.payload.len() >= MIN_REPLY_LEN);
        // No broadcast flag, no ciaddr: unicast to yiaddr at chaddr.
        assert_eq!(r.dst_ip, Ipv4Addr::new(192, 168, 65, 2));
        assert_eq!(r.dst_mac, MAC1);
        let o = offer.opts();
        let gw = Ipv4Addr::new(192, 168, 65, 1);
        assert_eq!(o.get(OptionCode::SubnetMask), Some(&DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0))));
        assert_eq!(o.get(OptionCode::Router), Some(&DhcpOption::Router(vec![gw])));
        assert_eq!(o.get(OptionCode::DomainNameServer), Some(&DhcpOption::DomainNameServer(vec![gw])));
        assert_eq!(o.get(OptionCode::ServerIdentifier), Some(&DhcpOption::ServerIdentifier(gw)));
        assert_eq!(o.get(OptionCode::InterfaceMtu), Some(&DhcpOption::InterfaceMtu(1500)));
        assert_eq!(o.get(OptionCode::AddressLeaseTime), Some(&DhcpOption::AddressLeaseTime(3600)));
        assert_eq!(o.get(OptionCode::Renewal), Some(&DhcpOption::Renewal(1800)));
        assert_eq!(o.get(OptionCode::Rebinding), Some(&DhcpOption::Rebinding(3150)));
        assert_eq!(
            o.get(OptionCode::BroadcastAddr),
            Some(&DhcpOption::BroadcastAddr(Ipv4Addr::new(192, 168, 65, 255)))
        );
        assert_eq!(o.get(OptionCode::DomainName), Some(&DhcpOption::DomainName("example.test".into())));
        let Some(DhcpOption::DomainSearch(names)) = o.get(OptionCode::DomainSearch) else {
            panic!("no domain search option");
        };
        let names: Vec<String> = names.iter().map(|n| n.to_ascii()).collect();
        assert_eq!(names, ["example.test.", "corp.test."]);
    }

    #[test]
    fn broadcast_flag_gives_broadcast_reply() {
        let mut s = DhcpServer::new(cfg());
        let mut m = request(MessageType::Discover, MAC1, vec![]);
        m.set_flags(Flags::default().set_broadcast());
        let (_, r) = send(&mut s, MAC1, &m).unwrap();
        assert_eq!(r.dst_ip, Ipv4Addr::BROADCAST);
        assert_eq!(r.dst_mac, BROADCAST_MAC);
    }

    #[test]
    fn leases_stable_per_mac_and_distinct() {
        let mut s = DhcpServer::new(cfg());
        let a1 = lease(&mut s, MAC1);
        let a2 = lease(&mut s, MAC2);
        assert_eq!(a1, Ipv4Addr::new(192, 168, 65, 2));
        assert_eq!(a2, Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(lease(&mut s, MAC1), a1);
        assert_eq!(lease(&mut s, MAC2), a2);
        assert_eq!(s.leases(), vec![(a1, MAC1), (a2, MAC2)]);
        // A repeated DISCOVER before any REQUEST offers the same address.
        let mac3 = [2, 0, 0, 0, 0, 3];
        let d = request(MessageType::Discover, mac3, vec![]);
        let (o1, _) = send(&mut s, mac3, &d).unwrap();
        let (o2, _) = send(&mut s, mac3, &d).unwrap();
        assert_eq!(o1.yiaddr(), o2.yiaddr());
        assert_eq!(o1.yiaddr(), Ipv4Addr::new(192, 168, 65, 4));
    }

    #[test]
    fn pool_skips_gateway_and_host_and_ends_at_253() {
        let mut s = DhcpServer::new(cfg());
        let mut last = Ipv4Addr::UNSPECIFIED;
        for i in 0..252u32 {
            let mac = [2, 0, 0, 0, (i >> 8) as u8, i as u8];
            let (offer, _) = send(&mut s, mac, &request(MessageType::Discover, mac, vec![])).unwrap();
            last = offer.yiaddr();
        }
        assert_eq!(last, Ipv4Addr::new(192, 168, 65, 253));
        // Pool full of offers: the oldest gives its address up.
        let mac = [2, 0, 0, 0, 9, 9];
        let (offer, _) = send(&mut s, mac, &request(MessageType::Discover, mac, vec![])).unwrap();
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(192, 168, 65, 2));
        // Pool full of leases: no offer.
        let mut s = DhcpServer::new(cfg());
        for i in 0..252u32 {
            lease(&mut s, [2, 0, 0, 0, (i >> 8) as u8, i as u8]);
        }
        assert!(send(&mut s, mac, &request(MessageType::Discover, mac, vec![])).is_none());
    }

    #[test]
    fn nak_for_wrong_address() {
        let mut s = DhcpServer::new(cfg());
        lease(&mut s, MAC1);
        // SELECTING with the wrong requested address.
        let req = request(
            MessageType::Request,
            MAC1,
            vec![
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 65, 77)),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 65, 1)),
            ],
        );
        let (nak, r) = send(&mut s, MAC1, &req).unwrap();
        assert_eq!(kind(&nak), MessageType::Nak);
        assert_eq!(r.dst_ip, Ipv4Addr::BROADCAST);
        assert_eq!(r.dst_mac, BROADCAST_MAC);
        // INIT-REBOOT asking for an address outside the subnet.
        let req = request(MessageType::Request, MAC2, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(10, 0, 0, 5))]);
        let (nak, _) = send(&mut s, MAC2, &req).unwrap();
        assert_eq!(kind(&nak), MessageType::Nak);
        // INIT-REBOOT asking for another MAC's address.
        let req =
            request(MessageType::Request, MAC2, vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 65, 2))]);
        let (nak, _) = send(&mut s, MAC2, &req).unwrap();
        assert_eq!(kind(&nak), MessageType::Nak);
    }

    #[test]
    fn other_server_id_is_ignored() {
        let mut s = DhcpServer::new(cfg());
        let req = request(
            MessageType::Request,
            MAC1,
            vec![
                DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 65, 2)),
                DhcpOption::ServerIdentifier(Ipv4Addr::new(192, 168, 65, 9)),
            ],
        );
        assert!(send(&mut s, MAC1, &req).is_none());
    }

    #[test]
    fn init_reboot_unknown_client_gets_free_address() {
        let mut s = DhcpServer::new(cfg());
        let want = Ipv4Addr::new(192, 168, 65, 40);
        let req = request(MessageType::Request, MAC1, vec![DhcpOption::RequestedIpAddress(want)]);
        let (ack, _) = send(&mut s, MAC1, &req).unwrap();
        assert_eq!(kind(&ack), MessageType::Ack);
        assert_eq!(ack.yiaddr(), want);
        assert_eq!(s.leases(), vec![(want, MAC1)]);
    }

    #[test]
    fn renew_unicasts_to_ciaddr() {
        let mut s = DhcpServer::new(cfg());
        let a = lease(&mut s, MAC1);
        let mut req = request(MessageType::Request, MAC1, vec![]);
        req.set_ciaddr(a);
        let (ack, r) = send(&mut s, MAC1, &req).unwrap();
        assert_eq!(kind(&ack), MessageType::Ack);
        assert_eq!(r.dst_ip, a);
        assert_eq!(r.dst_mac, MAC1);
    }

    #[test]
    fn release_keeps_address_for_same_mac() {
        let mut s = DhcpServer::new(cfg());
        let a = lease(&mut s, MAC1);
        let mut rel = request(MessageType::Release, MAC1, vec![]);
        rel.set_ciaddr(a);
        assert!(send(&mut s, MAC1, &rel).is_none());
        assert!(s.leases().is_empty());
        assert_eq!(lease(&mut s, MAC2), Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(lease(&mut s, MAC1), a);
    }

    #[test]
    fn decline_moves_client_on() {
        let mut s = DhcpServer::new(cfg());
        let a = lease(&mut s, MAC1);
        let dec = request(MessageType::Decline, MAC1, vec![DhcpOption::RequestedIpAddress(a)]);
        assert!(send(&mut s, MAC1, &dec).is_none());
        let b = lease(&mut s, MAC1);
        assert_ne!(a, b);
        assert_eq!(lease(&mut s, MAC2), Ipv4Addr::new(192, 168, 65, 4));
    }

    #[test]
    fn inform_acks_without_lease() {
        let mut s = DhcpServer::new(cfg());
        let mut m = request(MessageType::Inform, MAC1, vec![]);
        m.set_ciaddr(Ipv4Addr::new(192, 168, 65, 50));
        let (ack, r) = send(&mut s, MAC1, &m).unwrap();
        assert_eq!(kind(&ack), MessageType::Ack);
        assert_eq!(ack.yiaddr(), Ipv4Addr::UNSPECIFIED);
        assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(ack.opts().get(OptionCode::Router).is_some());
        assert_eq!(r.dst_ip, Ipv4Addr::new(192, 168, 65, 50));
        assert!(s.leases().is_empty());
    }

    #[test]
    fn client_identifier_echoed() {
        let mut s = DhcpServer::new(cfg());
        let id = DhcpOption::ClientIdentifier(vec![1, 2, 3]);
        let m = request(MessageType::Discover, MAC1, vec![id.clone()]);
        let (offer, _) = send(&mut s, MAC1, &m).unwrap();
        assert_eq!(offer.opts().get(OptionCode::ClientIdentifier), Some(&id));
    }

    #[test]
    fn static_lease_is_respected() {
        let mut s = DhcpServer::new(cfg());
        assert!(s.add_static(MAC1, Ipv4Addr::new(192, 168, 65, 2)));
        assert!(!s.add_static(MAC2, Ipv4Addr::new(192, 168, 65, 2)));
        assert!(!s.add_static(MAC2, Ipv4Addr::new(192, 168, 65, 254)));
        assert_eq!(lease(&mut s, MAC2), Ipv4Addr::new(192, 168, 65, 3));
        assert_eq!(lease(&mut s, MAC1), Ipv4Addr::new(192, 168, 65, 2));
    }

    #[test]
    fn garbage_is_ignored() {
        let mut s = DhcpServer::new(cfg());
        assert!(s.handle(MAC1, &[]).is_none());
        assert!(s.handle(MAC1, &[1, 2, 3]).is_none());
        // A BOOTREPLY is not for us.
        let mut m = request(MessageType::Discover, MAC1, vec![]);
        m.set_opcode(Opcode::BootReply);
        assert!(send(&mut s, MAC1, &m).is_none());
        // Truncated valid message.
        let bytes = request(MessageType::Discover, MAC1, vec![]).to_vec().unwrap();
        for n in 0..bytes.len() {
            let _ = s.handle(MAC1, &bytes[..n]);
        }
        // hlen beyond 16 must not panic.
        let mut bytes = bytes;
        bytes[2] = 200;
        let _ = s.handle(MAC1, &bytes);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..700)) {
            let mut s = DhcpServer::new(cfg());
            let _ = s.handle(MAC1, &data);
        }

        #[test]
        fn arbitrary_options_never_panic(opts in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut s = DhcpServer::new(cfg());
            let mut bytes = request(MessageType::Discover, MAC1, vec![]).to_vec().unwrap();
            bytes.truncate(FIXED_LEN + 4);
            bytes.extend_from_slice(&opts);
            let _ = s.handle(MAC1, &bytes);
        }

        #[test]
        fn mutated_requests_never_panic(
            idx in proptest::collection::vec((0usize..400, any::<u8>()), 1..20),
            ) {
            let mut s = DhcpServer::new(cfg());
            let mut bytes = request(
                MessageType::Request,
                MAC1,
                vec![DhcpOption::RequestedIpAddress(Ipv4Addr::new(192, 168, 65, 2))],
            )
            .to_vec()
            .unwrap();
            for (i, b) in idx {
                if let Some(x) = bytes.get_mut(i) {
                    *x = b;
                }
            }
            let _ = s.handle(MAC1, &bytes);
        }
    }
}
