//! The gateway's DNS server: local names answered here, everything else forwarded.
//!
//! Theory of operation: [`DnsServer::handle`] takes one DNS message as the guest sent it
//! (a UDP payload, or one frame of a TCP stream without its length prefix) and returns the
//! message to send back, or None to stay silent. It runs in two steps:
//!
//! 1. [`DnsServer::local`] (pure, no I/O) reads the header and the question with
//!    `hickory-proto` and decides: drop it (shorter than a header, or a response), answer
//!    FORMERR (a header but no readable single question), answer from the local names
//!    ([`DnsRecords`]: `host.docker.internal` and friends, `--add-host`, records added at run
//!    time, then the host's /etc/hosts, see [`hosts`]), or forward. A local name is answered
//!    authoritatively (AA, TTL 60) for type A, and AAAA where /etc/hosts gives it an IPv6
//!    address (ANY gets both); for any other type it gets NOERROR with no answer (NODATA),
//!    never NXDOMAIN, so that a resolver asking AAAA and A in parallel still uses the A
//!    answer. The reverse name (`in-addr.arpa`, `ip6.arpa`) of an address with a local name
//!    is answered the same way, with a PTR record.
//! 2. Forwarding ([`forward`]) asks the upstream servers as glibc's resolver does, with the
//!    host's `timeout`, `attempts` and `rotate` options, and moves on from a server that is
//!    silent, unreachable, or answers SERVFAIL or REFUSED. The servers are read from the
//!    shared [`HostDns`] once per query: a query finishes against the servers it started
//!    with while the host side swaps in new ones.
//!
//! Each forwarded answer may teach the egress policy (crate::policy) the addresses of a name
//! an `--allow-domain` covers ([`learn`]).
//!
//! Guests on TCP are forwarded the same way (UDP first, TCP on TC): UDP is what every
//! upstream serves best, and TCP is only needed for answers too large for UDP. A guest on UDP
//! gets the full TCP answer only when it fits what the guest accepts (512 bytes or its EDNS
//! payload size) and the link MTU; otherwise it gets the upstream's truncated answer and comes
//! back over TCP itself. An answer larger than the link can carry in one datagram is
//! replaced by a truncated (TC) answer for the same reason.
//!
//! Every query ends up in the services' DNS log ([`Activity`]: the last few hundred, with
//! the name, type, RCODE, answers and the server that answered), for the dashboard.
//!
//! Nothing here panics on what a guest sends: every length is checked and every parse error
//! becomes FORMERR or silence.

pub mod forward;
pub mod hosts;
pub mod records;

use std::hash::{BuildHasher, Hasher, RandomState};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::sync::Semaphore;

use crate::guest::GuestKey;
use tracing::debug;

use super::activity::{Activity, DnsLogEntry, clip, now_ms};
use super::metrics::ServiceMetrics;
use crate::config::{HostDns, NetConfig};
pub use records::{DnsError, DnsRecords};

/// TTL of locally answered records.
pub const LOCAL_TTL: u32 = 60;
/// Time to wait for one upstream's UDP answer when resolv.conf sets no `timeout`.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Rounds over the upstreams when resolv.conf sets no `attempts`.
pub const UPSTREAM_ATTEMPTS: u32 = 2;
/// Queries being forwarded at once, over all guests (each holds an upstream socket).
/// Beyond that new queries are dropped; the guest's resolver retries.
pub const MAX_FORWARDS: usize = 1024;

const HEADER_LEN: usize = 12;
/// Largest UDP answer a guest without EDNS accepts (RFC 1035).
const CLASSIC_UDP_MAX: usize = 512;
/// EDNS payload size we advertise in local answers (the DNS flag day 2020 value).
const OUR_EDNS_PAYLOAD: u16 = 1232;
/// IPv4 + UDP header bytes: what a UDP answer costs beyond its payload on the link.
const IPV4_UDP_OVERHEAD: usize = 28;

/// How the guest's query arrived: it decides how large an answer may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What [`DnsServer::local`] decided for one message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Local {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Not ours to answer: forward to the upstreams.
    Forward,
    /// Not a query we can answer at all: stay silent.
    Drop,
}

/// The gateway's DNS logic: local table plus forwarding policy.
pub struct DnsServer {
    records: Arc<DnsRecords>,
    /// The upstream servers and options, live.
    host_dns: HostDns,
    /// Per-server wait and rounds when resolv.conf sets none.
    attempt_timeout: Duration,
    attempts: u32,
    /// Where the next query starts with `options rotate`.
    rotation: AtomicUsize,
    /// Largest UDP payload the guest link carries in one packet.
    udp_link_max: usize,
    /// Bounds the queries being forwarded at once.
    forward_slots: Semaphore,
    /// Queries and their fate, per upstream (for `/metrics`).
    metrics: Arc<ServiceMetrics>,
    /// Queries being forwarded per guest (by its MAC where known, as the engine names it:
    /// see [`GuestKey`]), at most `max_per_guest` each (`--max-dns-queries-per-guest`): one
    /// guest cannot take every forwarding slot, whatever number of addresses it uses.
    per_guest: std::sync::Mutex<std::collections::HashMap<GuestKey, usize>>,
    max_per_guest: usize,
    /// The egress policy, which learns the addresses of `--allow-domain` names from the
    /// answers forwarded ([`learn`]).
    policy: Arc<crate::policy::Policy>,
    /// The recent queries (shared with the proxy and the control API).
    activity: Arc<Activity>,
    /// A record type guests cannot use, answered here with no records (NODATA) instead of
    /// forwarded: A with `--ipv6-only`, as Docker Desktop filters DNS records by its
    /// network mode.
    filtered: Option<RecordType>,
}

/// Whom a query comes from: the address it was sent from and the guest it counts against.
#[derive(Clone, Copy, Debug)]
pub struct QueryFrom {
    pub addr: std::net::IpAddr,
    pub guest: GuestKey,
}

/// One query of a guest's counted in `DnsServer::per_guest`, until dropped.
struct GuestQuery<'a> {
    server: &'a DnsServer,
    guest: GuestKey,
}

impl Drop for GuestQuery<'_> {
    fn drop(&mut self) {
        let mut map = self.server.per_guest.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.guest) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.guest);
            }
        }
    }
}

impl DnsServer {
    pub fn new(cfg: &NetConfig, records: Arc<DnsRecords>) -> Self {
        DnsServer {
            records,
            host_dns: cfg.host_dns.clone(),
            attempt_timeout: UPSTREAM_TIMEOUT,
            attempts: UPSTREAM_ATTEMPTS,
            rotation: AtomicUsize::new(0),
            udp_link_max: (cfg.mtu as usize)
                .saturating_sub(IPV4_UDP_OVERHEAD)
                .clamp(CLASSIC_UDP_MAX, u16::MAX as usize),
            forward_slots: Semaphore::new(MAX_FORWARDS),
            metrics: Arc::default(),
            per_guest: Default::default(),
            max_per_guest: cfg.limits.max_dns_queries_per_guest,
            policy: cfg.policy.clone(),
            activity: Arc::default(),
            filtered: (!cfg.ipv4).then_some(RecordType::A),
        }
    }

    /// Counts one more query being forwarded for `guest`; None when it has its bound.
    fn guest_query(&self, guest: GuestKey) -> Option<GuestQuery<'_>> {
        let mut map = self.per_guest.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(guest).or_insert(0);
        if *n >= self.max_per_guest {
            return None;
        }
        *n += 1;
        Some(GuestQuery { server: self, guest })
    }

    /// The services' recent activity (this server's queries, the proxy's requests).
    pub fn activity(&self) -> &Arc<Activity> {
        &self.activity
    }

    /// The counters this server keeps (shared with the other services for `/metrics`).
    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// Change the forwarding defaults (what applies when resolv.conf has no `timeout` or
    /// `attempts` option): wait `per_attempt` for each server's answer, make `attempts`
    /// rounds (at least one) over the servers.
    pub fn with_timeouts(mut self, per_attempt: Duration, attempts: u32) -> Self {
        self.attempt_timeout = per_attempt;
        self.attempts = attempts.max(1);
        self
    }

    pub fn records(&self) -> &Arc<DnsRecords> {
        &self.records
    }

    /// Answer one guest message: locally, by forwarding, or not at all.
    pub async fn handle(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.handle_from(None, query, transport).await
    }

    /// [`Self::handle`] for a query from `guest`: beyond its bound of queries being
    /// forwarded (`--max-dns-queries-per-guest`), a query is dropped (it retries).
    pub async fn handle_from(&self, guest: Option<QueryFrom>, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        self.metrics.dns_queries.fetch_add(1, Ordering::Relaxed);
        let started = std::time::Instant::now();
        let (reply, from) = match self.local(query) {
            Local::Reply(r) => {
                self.metrics.dns_local.fetch_add(1, Ordering::Relaxed);
                (r, Some("gateway".to_string()))
            }
            Local::Drop => {
                self.log(query, None, transport, None, started);
                return None;
            }
            Local::Forward => {
                let _guest_slot = match guest {
                    Some(from) => match self.guest_query(from.guest) {
                        Some(slot) => Some(slot),
                        None => {
                            let max = self.max_per_guest;
                            self.metrics.limit_reached(
                                crate::services::metrics::ServiceLimit::DnsQueriesPerGuest,
                                || {
                                    let who = match from.guest {
                                        GuestKey::Mac(_) => format!("{} ({})", from.addr, from.guest),
                                        GuestKey::Addr(_) => from.addr.to_string(),
                                    };
                                    format!(
                                        "guest {who} has {max} DNS queries being forwarded \
                                         (--max-dns-queries-per-guest): more are dropped"
                                    )
                                },
                            );
                            return None;
                        }
                    },
                    None => None,
                };
                let Ok(_slot) = self.forward_slots.try_acquire() else {
                    debug!("dns: too many queries in flight, dropping one");
                    self.log(query, None, transport, None, started);
                    return None;
                };
                let (reply, from) = self.forward(query, transport).await;
                learn(&self.policy, &reply);
                (reply, from.map(|a| a.to_string()))
            }
        };
        let reply = match transport {
            Transport::Udp if reply.len() > self.udp_link_max => truncated(&reply),
            _ => Some(reply),
        };
        self.log(query, reply.as_deref(), transport, from, started);
        reply
    }

    /// Adds a query and its answer (None: the guest got none) to the DNS log.
    fn log(
        &self,
        query: &[u8],
        reply: Option<&[u8]>,
        transport: Transport,
        upstream: Option<String>,
        started: std::time::Instant,
    ) {
        let mut decoder = BinDecoder::new(query);
        let question = Header::read(&mut decoder)
            .ok()
            .filter(|h| h.counts.queries >= 1)
            .and_then(|_| Query::read(&mut decoder).ok());
        let (name, qtype) = match &question {
            Some(q) => {
                let name = q.name().to_ascii();
                let name = name.strip_suffix('.').filter(|n| !n.is_empty()).unwrap_or(&name);
                (clip(name), q.query_type().to_string())
            }
            None => ("?".to_string(), "?".to_string()),
        };
        let (rcode, answers) = match reply {
            None => ("dropped".to_string(), Vec::new()),
            Some(r) => (
                r.get(3).map_or("?".to_string(), |b| rcode_name(b & 0x0f)),
                Message::from_vec(r)
                    .map(|m| m.answers.iter().take(8).map(|rec| clip(&answer_text(&rec.data))).collect())
                    .unwrap_or_default(),
            ),
        };
        self.activity.dns.push(DnsLogEntry {
            time_ms: now_ms(),
            transport: match transport {
                Transport::Udp => "udp",
                Transport::Tcp => "tcp",
            },
            name,
            qtype,
            rcode,
            answers,
            upstream,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }

    /// The I/O-free part: decide what to do with `query`, building the answer when it is
    /// ours to give (local names, FORMERR, SERVFAIL when there is no upstream).
    pub fn local(&self, query: &[u8]) -> Local {
        if query.len() < HEADER_LEN || query[2] & 0x80 != 0 {
            // No header, or a response: nothing to answer.
            return Local::Drop;
        }
        let mut decoder = BinDecoder::new(query);
        let Ok(header) = Header::read(&mut decoder) else {
            return Local::Drop;
        };
        if header.op_code != OpCode::Query {
            return self.forward_or_servfail(query);
        }
        if header.counts.queries != 1 {
            return Local::Reply(error_reply(query, ResponseCode::FormErr, false));
        }
        let Ok(question) = Query::read(&mut decoder) else {
            return Local::Reply(error_reply(query, ResponseCode::FormErr, false));
        };
        let class = question.query_class();
        if class != DNSClass::IN && class != DNSClass::ANY {
            return self.forward_or_servfail(query);
        }
        let qtype = question.query_type();
        let wants = |t: RecordType| (qtype == t || qtype == RecordType::ANY) && self.filtered != Some(t);
        let ascii = question.name().to_ascii();
        // Some(answer): the name is ours (answer None: it has no record of that type).
        let (v4, v6) = (self.records.lookup(&ascii), self.records.lookup6(&ascii));
        let reverse = || {
            reverse_v4(&ascii)
                .and_then(|ip| self.records.reverse(ip))
                .or_else(|| reverse_v6(&ascii).and_then(|ip| self.records.reverse6(ip)))
        };
        let answers: Vec<RData> = if self.filtered == Some(qtype) {
            // A type the guests cannot use: no records, whoever has the name.
            Vec::new()
        } else if v4.is_some() || v6.is_some() {
            let a = v4.filter(|_| wants(RecordType::A)).map(|addr| RData::A(A(addr)));
            let aaaa = v6.filter(|_| wants(RecordType::AAAA)).map(|addr| RData::AAAA(AAAA(addr)));
            a.into_iter().chain(aaaa).collect()
        } else if let Some(target) = reverse() {
            let Ok(target) = Name::from_ascii(format!("{target}.")) else {
                return self.forward_or_servfail(query);
            };
            wants(RecordType::PTR).then_some(RData::PTR(PTR(target))).into_iter().collect()
        } else {
            return self.forward_or_servfail(query);
        };
        // A local name. The rest of the message must parse too (we answer EDNS with EDNS).
        let Ok(request) = Message::from_vec(query) else {
            return Local::Reply(error_reply(query, ResponseCode::FormErr, false));
        };
        let mut resp = Message::response(header.id, OpCode::Query);
        resp.metadata.authoritative = true;
        resp.metadata.recursion_desired = header.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.checking_disabled = header.checking_disabled;
        let name = question.name().clone();
        resp.add_query(question);
        for rdata in answers {
            resp.add_answer(Record::from_rdata(name.clone(), LOCAL_TTL, rdata));
        }
        if request.edns.is_some() {
            let mut edns = Edns::new();
            edns.set_max_payload(OUR_EDNS_PAYLOAD);
            resp.set_edns(edns);
        }
        match resp.to_vec() {
            Ok(bytes) => Local::Reply(bytes),
            Err(_) => Local::Reply(error_reply(query, ResponseCode::ServFail, true)),
        }
    }

    fn forward_or_servfail(&self, query: &[u8]) -> Local {
        if self.host_dns.upstreams().servers.is_empty() {
            Local::Reply(error_reply(query, ResponseCode::ServFail, true))
        } else {
            Local::Forward
        }
    }
}

/// An upstream's answer on its way to a guest: when its question is for a name an
/// `--allow-domain` covers, the A and AAAA addresses of its answer section (those of CNAME
/// targets included) are allowed for their TTL (see crate::policy).
fn learn(policy: &crate::policy::Policy, answer: &[u8]) {
    if !policy.is_active() || policy.rules().allow_domains.is_empty() {
        return;
    }
    let Ok(m) = Message::from_vec(answer) else {
        return;
    };
    let [question] = &m.queries[..] else {
        return;
    };
    let addrs: Vec<(std::net::IpAddr, u32)> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((std::net::IpAddr::V4(a.0), r.ttl)),
            RData::AAAA(a) => Some((std::net::IpAddr::V6(a.0), r.ttl)),
            _ => None,
        })
        .collect();
    policy.learn(&question.name().to_ascii(), &addrs);
}

/// An RCODE (the header's four bits) as dig names it.
fn rcode_name(rcode: u8) -> String {
    match rcode {
        0 => "NOERROR".into(),
        1 => "FORMERR".into(),
        2 => "SERVFAIL".into(),
        3 => "NXDOMAIN".into(),
        4 => "NOTIMP".into(),
        5 => "REFUSED".into(),
        n => format!("RCODE{n}"),
    }
}

/// One answer record as the DNS log shows it: the address alone for A and AAAA, the type
/// and the data for the others (`CNAME a.example.`).
fn answer_text(data: &RData) -> String {
    match data {
        RData::A(a) => a.0.to_string(),
        RData::AAAA(a) => a.0.to_string(),
        other => format!("{} {other}", other.record_type()),
    }
}

/// The IPv4 address of a reverse name, `4.3.2.1.in-addr.arpa.` -> 1.2.3.4.
fn reverse_v4(name: &str) -> Option<Ipv4Addr> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = lower.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut labels = rest.split('.');
    for o in octets.iter_mut().rev() {
        let label = labels.next()?;
        if label.is_empty() || label.len() > 3 || (label.len() > 1 && label.starts_with('0')) {
            return None;
        }
        *o = label.parse().ok()?;
    }
    labels.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// The IPv6 address of an `ip6.arpa` name (32 nibble labels, least significant first).
fn reverse_v6(name: &str) -> Option<std::net::Ipv6Addr> {
    let lower = name.trim_end_matches('.').to_ascii_lowercase();
    let rest = lower.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<&str> = rest.split('.').collect();
    if nibbles.len() != 32 {
        return None;
    }
    let mut value: u128 = 0;
    for label in nibbles.iter().rev() {
        if label.len() != 1 {
            return None;
        }
        value = (value << 4) | u128::from(u8::from_str_radix(label, 16).ok()?);
    }
    Some(std::net::Ipv6Addr::from(value))
}

/// What an upstream's message must carry to be the answer to a guest's query, read from
/// the query once: its question section (with its count), as glibc's resolver checks
/// (`res_queriesmatch`: the same questions, names in any case). An answer to another
/// question (a confused or spoofing server) or one that does not parse is not passed on
/// to the guest, and the wait for a real one goes on.
#[derive(Clone, Copy)]
struct Question<'q> {
    /// QDCOUNT and the section's bytes; None when the query's question cannot be read,
    /// and then an answer is matched by its ID alone.
    asked: Option<(&'q [u8], &'q [u8])>,
}

impl<'q> Question<'q> {
    fn of(query: &'q [u8]) -> Question<'q> {
        Question { asked: question_section(query).map(|section| (&query[4..6], section)) }
    }

    /// Whether `msg` is a response with the ID `id` (the one the query went upstream with)
    /// to this question, whole. An answer with TC set need only carry the question: a
    /// server may cut it anywhere.
    fn answered_by(&self, msg: &[u8], id: [u8; 2]) -> bool {
        if msg.len() < HEADER_LEN || msg[..2] != id || msg[2] & 0x80 == 0 {
            return false;
        }
        let Some((count, asked)) = self.asked else {
            return true;
        };
        let same = msg[4..6] == *count && question_section(msg).is_some_and(|q| q.eq_ignore_ascii_case(asked));
        same && (msg[2] & 0x02 != 0 || Message::from_vec(msg).is_ok())
    }
}

/// The bytes of a message's question section (QDCOUNT names, uncompressed as a question's
/// are, each with its type and class), or None when it does not fit or reads wrong.
fn question_section(msg: &[u8]) -> Option<&[u8]> {
    let count = u16::from_be_bytes([*msg.get(4)?, *msg.get(5)?]);
    let mut at = HEADER_LEN;
    for _ in 0..count {
        loop {
            let len = usize::from(*msg.get(at)?);
            at += 1;
            if len == 0 {
                break;
            }
            if len > 63 {
                return None;
            }
            at += len;
        }
        at += 4;
    }
    msg.get(HEADER_LEN..at)
}

/// `answer` with the ID of `query` (the guest's).
fn with_id(mut answer: Vec<u8>, query: &[u8]) -> Vec<u8> {
    answer[..2].copy_from_slice(&query[..2]);
    answer
}

/// The largest UDP answer the guest said it accepts: 512, or its EDNS payload size.
fn guest_udp_max(query: &[u8]) -> usize {
    Message::from_vec(query)
        .ok()
        .and_then(|m| m.edns.map(|e| e.max_payload() as usize))
        .unwrap_or(CLASSIC_UDP_MAX)
        .max(CLASSIC_UDP_MAX)
}

/// Where the single question of `msg` ends, when it has exactly one readable question.
fn question_end(msg: &[u8]) -> Option<usize> {
    let mut decoder = BinDecoder::new(msg);
    let header = Header::read(&mut decoder).ok()?;
    if header.counts.queries != 1 {
        return None;
    }
    Query::read(&mut decoder).ok()?;
    Some(decoder.index())
}

/// A response to `query` with no records and `rcode`: header flags derived from the
/// query's (ID, opcode, RD, CD), the question echoed when there is exactly one readable
/// question. `ra` sets recursion-available. `query` must hold at least a header.
fn error_reply(query: &[u8], rcode: ResponseCode, ra: bool) -> Vec<u8> {
    let question = question_end(query).map(|end| &query[HEADER_LEN..end]);
    let mut out = Vec::with_capacity(HEADER_LEN + question.map_or(0, <[u8]>::len));
    out.extend_from_slice(&query[..2]);
    // QR, the query's opcode and RD.
    out.push(0x80 | (query[2] & 0x79));
    // RA, CD from the query, the rcode.
    out.push(if ra { 0x80 } else { 0 } | (query[3] & 0x10) | (rcode.low() & 0x0f));
    let qdcount: u16 = if question.is_some() { 1 } else { 0 };
    out.extend_from_slice(&qdcount.to_be_bytes());
    out.extend_from_slice(&[0; 6]);
    if let Some(q) = question {
        out.extend_from_slice(q);
    }
    out
}

/// `answer` cut down to its header and question with TC set, so the guest retries over TCP.
fn truncated(answer: &[u8]) -> Option<Vec<u8>> {
    if answer.len() < HEADER_LEN {
        return None;
    }
    let end = question_end(answer);
    let mut out = answer[..end.unwrap_or(HEADER_LEN)].to_vec();
    out[2] |= 0x02;
    let qdcount: u16 = if end.is_some() { 1 } else { 0 };
    out[4..6].copy_from_slice(&qdcount.to_be_bytes());
    out[6..12].fill(0);
    Some(out)
}

/// A random 16-bit message ID (std's per-instance random hash keys; no extra crate).
fn random_id() -> [u8; 2] {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() as u16).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Upstreams;
    use proptest::prelude::*;
    use std::net::SocketAddr;

    pub(super) fn cfg(upstreams: Vec<SocketAddr>) -> NetConfig {
        NetConfig {
            host_dns: HostDns::new(Upstreams::command_line(upstreams)),
            extra_hosts: vec![("myhost.test".into(), Ipv4Addr::new(10, 1, 2, 3).into())],
            ..NetConfig::default()
        }
    }

    pub(super) fn server(upstreams: Vec<SocketAddr>) -> DnsServer {
        let c = cfg(upstreams);
        DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_millis(200), 2)
    }

    pub(super) fn query(name: &str, rtype: RecordType) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        m.to_vec().unwrap()
    }

    fn reply(l: Local) -> Message {
        match l {
            Local::Reply(b) => Message::from_vec(&b).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    pub(super) fn a_answers(m: &Message) -> Vec<Ipv4Addr> {
        m.answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn local_a_records() {
        let s = server(vec![]);
        let m = reply(s.local(&query("host.docker.internal.", RecordType::A)));
        assert_eq!(m.id, 0xbeef);
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert!(m.authoritative);
        assert!(m.recursion_desired);
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(192, 168, 65, 254)]);
        assert_eq!(m.answers[0].ttl, LOCAL_TTL);
        assert_eq!(m.queries.len(), 1);

        let m = reply(s.local(&query("Gateway.Containers.INTERNAL", RecordType::A)));
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(192, 168, 65, 1)]);
        // The question's case is echoed as asked.
        assert_eq!(m.queries[0].name().to_ascii(), "Gateway.Containers.INTERNAL.");

        let m = reply(s.local(&query("http.docker.internal", RecordType::A)));
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(192, 168, 65, 1)]);

        let m = reply(s.local(&query("MYHOST.test.", RecordType::A)));
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(10, 1, 2, 3)]);
    }

    /// `--ipv6-only`: A is answered here with no records, for our names and any other
    /// (never forwarded); AAAA as before.
    #[test]
    fn ipv6_only_filters_a_records() {
        let c = NetConfig { ipv4: false, ..cfg(vec!["127.0.0.1:9".parse().unwrap()]) };
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c)));
        for name in ["host.docker.internal", "www.example.com"] {
            let m = reply(s.local(&query(name, RecordType::A)));
            assert_eq!((m.response_code, m.answers.len()), (ResponseCode::NoError, 0), "{name}");
        }
        let m = reply(s.local(&query("host.docker.internal", RecordType::ANY)));
        assert!(m.answers.iter().all(|r| matches!(r.data, RData::AAAA(_))), "{m:?}");
        let m = reply(s.local(&query("host.docker.internal", RecordType::AAAA)));
        assert_eq!(m.answers.len(), 1);
        assert!(matches!(s.local(&query("www.example.com", RecordType::AAAA)), Local::Forward));
    }

    #[test]
    fn local_other_types_are_nodata() {
        let s = server(vec![]);
        // AAAA: the host's ::254 (the network has IPv6).
        let m = reply(s.local(&query("host.docker.internal", RecordType::AAAA)));
        let aaaa: Vec<_> =
            m.answers.iter().filter_map(|r| if let RData::AAAA(a) = &r.data { Some(a.0) } else { None }).collect();
        assert_eq!(aaaa, vec![crate::config::Ipv6Net::default().host]);
        for t in [RecordType::MX, RecordType::TXT, RecordType::HTTPS] {
            let m = reply(s.local(&query("host.docker.internal", t)));
            assert_eq!(m.response_code, ResponseCode::NoError, "{t:?}");
            assert!(m.answers.is_empty());
            assert!(m.authoritative);
        }
    }

    #[test]
    fn edns_is_answered_with_edns() {
        let s = server(vec![]);
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii("host.docker.internal").unwrap(), RecordType::A));
        let mut e = Edns::new();
        e.set_max_payload(4096);
        m.set_edns(e);
        let r = reply(s.local(&m.to_vec().unwrap()));
        assert!(r.edns.is_some());
        assert_eq!(a_answers(&r).len(), 1);
    }

    #[test]
    fn runtime_records_are_served() {
        let s = server(vec![]);
        s.records().add("new.test", Ipv4Addr::new(5, 6, 7, 8)).unwrap();
        let m = reply(s.local(&query("new.test", RecordType::A)));
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(5, 6, 7, 8)]);
    }

    #[test]
    fn no_upstreams_servfail_at_once() {
        let s = server(vec![]);
        let m = reply(s.local(&query("example.com", RecordType::A)));
        assert_eq!(m.response_code, ResponseCode::ServFail);
        assert_eq!(m.id, 0xbeef);
        assert_eq!(m.queries[0].name().to_ascii(), "example.com.");
        // With upstreams it is forwarded instead.
        let s = server(vec!["127.0.0.1:9".parse().unwrap()]);
        assert_eq!(s.local(&query("example.com", RecordType::A)), Local::Forward);
        // A local name is still answered locally.
        let m = reply(s.local(&query("host.docker.internal", RecordType::PTR)));
        assert_eq!(m.response_code, ResponseCode::NoError);
        assert!(m.answers.is_empty());
    }

    #[test]
    fn malformed_queries() {
        let s = server(vec![]);
        assert_eq!(s.local(&[]), Local::Drop);
        assert_eq!(s.local(&[0; 11]), Local::Drop);
        // A response is never answered.
        let mut q = query("host.docker.internal", RecordType::A);
        q[2] |= 0x80;
        assert_eq!(s.local(&q), Local::Drop);
        // Header only, one question announced but missing: FORMERR.
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let m = reply(s.local(&q));
        assert_eq!(m.response_code, ResponseCode::FormErr);
        assert_eq!(m.id, 0x1234);
        // Two questions: FORMERR.
        q[5] = 2;
        assert_eq!(reply(s.local(&q)).response_code, ResponseCode::FormErr);
        // Truncated question.
        let full = query("host.docker.internal", RecordType::A);
        for n in HEADER_LEN..full.len() {
            match s.local(&full[..n]) {
                Local::Reply(b) => assert_eq!(b[3] & 0x0f, 1, "len {n}"),
                other => panic!("len {n}: {other:?}"),
            }
        }
    }

    #[test]
    fn hosts_file_names_and_ptr() {
        let c = cfg(vec!["127.0.0.1:9".parse().unwrap()]);
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c)));
        assert_eq!(s.local(&query("mybox", RecordType::A)), Local::Forward);
        c.host_dns.set_hosts(hosts::parse_hosts(
            "127.0.1.1 mybox\n10.0.0.5 db.corp\n2001:db8::5 db.corp v6only.corp\n::1 mybox\n",
            Some(c.host),
        ));
        let m = reply(s.local(&query("MyBox.", RecordType::A)));
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(192, 168, 65, 254)]);
        assert!(m.authoritative);
        // AAAA from the file's IPv6 lines; ANY gets both; an IPv6-only name has no A (NODATA);
        // a name whose IPv6 line is ::1 has no AAAA (NODATA).
        let v6: std::net::Ipv6Addr = "2001:db8::5".parse().unwrap();
        let aaaa = |m: &Message| -> Vec<std::net::Ipv6Addr> {
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::AAAA(a) => Some(a.0),
                    _ => None,
                })
                .collect()
        };
        let m = reply(s.local(&query("db.corp", RecordType::AAAA)));
        assert_eq!((m.response_code, aaaa(&m)), (ResponseCode::NoError, vec![v6]));
        assert!(m.authoritative);
        let m = reply(s.local(&query("db.corp", RecordType::ANY)));
        assert_eq!((a_answers(&m), aaaa(&m)), (vec![Ipv4Addr::new(10, 0, 0, 5)], vec![v6]));
        let m = reply(s.local(&query("v6only.corp", RecordType::A)));
        assert!(m.answers.is_empty() && m.response_code == ResponseCode::NoError);
        let m = reply(s.local(&query("mybox", RecordType::AAAA)));
        assert!(m.answers.is_empty() && m.response_code == ResponseCode::NoError);
        // --add-host names win, AAAA included: no AAAA from the file behind them.
        let m = reply(s.local(&query("myhost.test", RecordType::AAAA)));
        assert!(m.answers.is_empty());
        // PTR of a hosts address, of the built-in ones, of an --add-host one.
        let ptr = |name: &str| {
            let m = reply(s.local(&query(name, RecordType::PTR)));
            m.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::PTR(p) => Some(p.0.to_ascii()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(ptr("5.0.0.10.in-addr.arpa."), vec!["db.corp."]);
        assert_eq!(ptr("254.65.168.192.IN-ADDR.ARPA"), vec!["host.docker.internal."]);
        assert_eq!(ptr("1.65.168.192.in-addr.arpa"), vec!["gateway.docker.internal."]);
        assert_eq!(ptr("3.2.1.10.in-addr.arpa"), vec!["myhost.test."]);
        assert_eq!(ptr("5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa."), vec!["db.corp."]);
        // Other types of a local reverse name: NODATA; unknown addresses are forwarded.
        let m = reply(s.local(&query("5.0.0.10.in-addr.arpa", RecordType::A)));
        assert!(m.answers.is_empty() && m.authoritative);
        assert_eq!(s.local(&query("6.0.0.10.in-addr.arpa", RecordType::PTR)), Local::Forward);
        assert_eq!(s.local(&query("8.8.8.in-addr.arpa", RecordType::PTR)), Local::Forward);
    }

    #[test]
    fn reverse_names() {
        assert_eq!(reverse_v4("4.3.2.1.in-addr.arpa."), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(reverse_v4("4.3.2.1.In-Addr.Arpa"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(reverse_v4("3.2.1.in-addr.arpa"), None);
        assert_eq!(reverse_v4("5.4.3.2.1.in-addr.arpa"), None);
        assert_eq!(reverse_v4("04.3.2.1.in-addr.arpa"), None);
        assert_eq!(reverse_v4("256.3.2.1.in-addr.arpa"), None);
        assert_eq!(reverse_v4("4.3.2.1.ip6.arpa"), None);
        assert_eq!(reverse_v4(".3.2.1.in-addr.arpa"), None);
        let v6 = |s: &str| s.parse::<std::net::Ipv6Addr>().ok();
        assert_eq!(
            reverse_v6("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.B.D.0.1.0.0.2.IP6.ARPA."),
            v6("2001:db8::1")
        );
        assert_eq!(reverse_v6("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.ip6.arpa"), None);
        assert_eq!(reverse_v6("10.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"), None);
        assert_eq!(reverse_v6("g.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa"), None);
        assert_eq!(reverse_v6("4.3.2.1.in-addr.arpa"), None);
    }

    #[test]
    fn upstreams_are_live() {
        let c = cfg(vec![]);
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c)));
        assert!(matches!(s.local(&query("example.com", RecordType::A)), Local::Reply(_)));
        c.host_dns.set_upstreams(Upstreams::command_line(vec!["127.0.0.1:9".parse().unwrap()]));
        assert_eq!(s.local(&query("example.com", RecordType::A)), Local::Forward);
    }

    #[test]
    fn oversized_udp_answer_is_truncated() {
        let mut big = Message::response(7, OpCode::Query);
        big.add_query(Query::query(Name::from_ascii("x.test").unwrap(), RecordType::A));
        for i in 0..200u8 {
            big.add_answer(Record::from_rdata(
                Name::from_ascii("x.test").unwrap(),
                1,
                RData::A(A(Ipv4Addr::new(10, 0, 0, i))),
            ));
        }
        let t = truncated(&big.to_vec().unwrap()).unwrap();
        let m = Message::from_vec(&t).unwrap();
        assert!(m.truncation);
        assert!(m.answers.is_empty());
        assert_eq!(m.queries.len(), 1);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            let s = server(vec![]);
            let _ = s.local(&data);
            let _ = truncated(&data);
            let _ = question_end(&data);
        }

        #[test]
        fn mutated_queries_never_panic(edits in proptest::collection::vec((0usize..64, any::<u8>()), 1..8)) {
            let s = server(vec![]);
            let mut q = query("host.docker.internal", RecordType::A);
            for (i, b) in edits {
                if let Some(x) = q.get_mut(i) {
                    *x = b;
                }
            }
            let _ = s.local(&q);
        }
    }
}
