//! The gateway's DNS server: local names answered here, everything else forwarded.
//!
//! Theory of operation: [`DnsServer::handle`] takes one DNS message as the guest sent it
//! (a UDP payload, or one frame of a TCP stream without its length prefix) and returns the
//! message to send back, or None to stay silent. It runs in two steps:
//!
//! 1. [`DnsServer::local`] (pure, no I/O) reads the header and the question with
//!    `hickory-proto` and decides: drop it (shorter than a header, or a response), answer
//!    FORMERR (a header but no readable single question), answer from the local table
//!    ([`DnsRecords`]: `host.docker.internal` and friends, `--add-host`, records added at run
//!    time), or forward. A local name is answered authoritatively (AA, TTL 60) for type A
//!    (and ANY); for any other type it gets NOERROR with no answer (NODATA), never NXDOMAIN,
//!    so that a resolver asking AAAA and A in parallel still uses the A answer.
//! 2. Forwarding sends the guest's bytes to the upstreams in order, with our own random ID
//!    on a fresh UDP socket (a random source port), resending once after the per-attempt
//!    timeout. A refused/unreachable or silent upstream, or one that answers SERVFAIL or
//!    REFUSED, passes the query to the next one. An answer with TC set is asked again over
//!    TCP from the same upstream. The answer goes back byte-intact except for the ID, which
//!    is restored to the guest's. When no upstream is configured the guest gets SERVFAIL at
//!    once; when none answers, SERVFAIL (or the last SERVFAIL/REFUSED an upstream gave).
//!
//! Guests on TCP are forwarded the same way (UDP first, TCP on TC): UDP is what every
//! upstream serves best, and TCP is only needed for answers too large for UDP. A guest on UDP
//! gets the full TCP answer only when it fits what the guest accepts (512 bytes or its EDNS
//! payload size) and the link MTU; otherwise it gets the upstream's truncated answer and comes
//! back over TCP itself. An answer larger than the link can carry in one datagram is
//! replaced by a truncated (TC) answer for the same reason.
//!
//! Nothing here panics on what a guest sends: every length is checked and every parse error
//! becomes FORMERR or silence.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::op::{Edns, Header, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::debug;

use crate::config::{GATEWAY_NAMES, HOST_NAMES, NetConfig};

/// TTL of locally answered records.
pub const LOCAL_TTL: u32 = 60;
/// Default time to wait for an upstream's UDP answer before resending (once).
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_millis(1500);
/// Default number of UDP sends to one upstream before moving on.
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

/// Errors of the local record table.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS name: {0:?}")]
    InvalidName(String),
}

/// The local record table: lower-case names without trailing dot -> IPv4 address.
///
/// Shared (`Arc<DnsRecords>`) between the DNS server and whoever manages records at run
/// time (the control API); the table sits behind an `RwLock`, so every method takes `&self`.
#[derive(Debug, Default)]
pub struct DnsRecords {
    table: RwLock<BTreeMap<String, Ipv4Addr>>,
}

impl DnsRecords {
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in names (HOST_NAMES -> host, GATEWAY_NAMES and the explicit proxy's
    /// `http.docker.internal` -> gateway) plus
    /// `cfg.extra_hosts`, which may override the built-in ones.
    pub fn from_config(cfg: &NetConfig) -> Self {
        let records = Self::new();
        let builtin = HOST_NAMES
            .iter()
            .map(|n| (*n, cfg.host))
            .chain(GATEWAY_NAMES.iter().map(|n| (*n, cfg.gateway)))
            .chain(crate::config::PROXY_NAMES.iter().map(|n| (*n, cfg.gateway)));
        let extra = cfg.extra_hosts.iter().map(|(n, a)| (n.as_str(), *a));
        for (name, addr) in builtin.chain(extra) {
            if let Err(e) = records.add(name, addr) {
                debug!("dns: skipping record: {e}");
            }
        }
        records
    }

    /// Add or replace the A record of `name` (case-insensitive, trailing dot optional).
    pub fn add(&self, name: &str, addr: Ipv4Addr) -> Result<(), DnsError> {
        let key = normalize(name);
        if key.is_empty() || key.len() > 253 || Name::from_ascii(&key).is_err() {
            return Err(DnsError::InvalidName(name.to_string()));
        }
        self.write().insert(key, addr);
        Ok(())
    }

    /// Remove the record of `name`; true when there was one.
    pub fn remove(&self, name: &str) -> bool {
        self.write().remove(&normalize(name)).is_some()
    }

    /// Every record, sorted by name.
    pub fn list(&self) -> Vec<(String, Ipv4Addr)> {
        self.read().iter().map(|(n, a)| (n.clone(), *a)).collect()
    }

    /// The address of `name`, if it is a local name.
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        self.read().get(&normalize(name)).copied()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

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
    upstreams: Vec<SocketAddr>,
    attempt_timeout: Duration,
    attempts: u32,
    /// Largest UDP payload the guest link carries in one packet.
    udp_link_max: usize,
    /// Bounds the queries being forwarded at once.
    forward_slots: Semaphore,
}

impl DnsServer {
    pub fn new(cfg: &NetConfig, records: Arc<DnsRecords>) -> Self {
        DnsServer {
            records,
            upstreams: cfg.dns_upstreams.clone(),
            attempt_timeout: UPSTREAM_TIMEOUT,
            attempts: UPSTREAM_ATTEMPTS,
            udp_link_max: (cfg.mtu as usize)
                .saturating_sub(IPV4_UDP_OVERHEAD)
                .clamp(CLASSIC_UDP_MAX, u16::MAX as usize),
            forward_slots: Semaphore::new(MAX_FORWARDS),
        }
    }

    /// Change the forwarding timeouts: wait `per_attempt` for an answer, send `attempts`
    /// times (at least once) to each upstream before moving on.
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
        let reply = match self.local(query) {
            Local::Reply(r) => r,
            Local::Drop => return None,
            Local::Forward => {
                let Ok(_slot) = self.forward_slots.try_acquire() else {
                    debug!("dns: too many queries in flight, dropping one");
                    return None;
                };
                self.forward(query, transport).await
            }
        };
        match transport {
            Transport::Udp if reply.len() > self.udp_link_max => truncated(&reply),
            _ => Some(reply),
        }
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
        let addr = match self.records.lookup(&question.name().to_ascii()) {
            Some(addr) if class == DNSClass::IN || class == DNSClass::ANY => addr,
            _ => return self.forward_or_servfail(query),
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
        let qtype = question.query_type();
        let name = question.name().clone();
        resp.add_query(question);
        if qtype == RecordType::A || qtype == RecordType::ANY {
            resp.add_answer(Record::from_rdata(name, LOCAL_TTL, RData::A(A(addr))));
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
        if self.upstreams.is_empty() {
            Local::Reply(error_reply(query, ResponseCode::ServFail, true))
        } else {
            Local::Forward
        }
    }

    /// Ask the upstreams in order; see the module comment for the policy.
    async fn forward(&self, query: &[u8], transport: Transport) -> Vec<u8> {
        let mut fallback: Option<Vec<u8>> = None;
        for &upstream in &self.upstreams {
            let answer = match self.ask_udp(upstream, query).await {
                Ok(a) => a,
                Err(e) => {
                    debug!("dns: upstream {upstream} over udp: {e}");
                    continue;
                }
            };
            let answer =
                if answer[2] & 0x02 != 0 { self.retry_tcp(upstream, query, answer, transport).await } else { answer };
            let rcode = answer[3] & 0x0f;
            if rcode == ResponseCode::ServFail.low() || rcode == ResponseCode::Refused.low() {
                fallback = Some(answer);
                continue;
            }
            return with_id(answer, query);
        }
        match fallback {
            Some(answer) => with_id(answer, query),
            None => error_reply(query, ResponseCode::ServFail, true),
        }
    }

    /// The upstream answered with TC: ask it over TCP, and use that answer when the guest
    /// can take it; otherwise keep the truncated one.
    async fn retry_tcp(&self, upstream: SocketAddr, query: &[u8], truncated: Vec<u8>, transport: Transport) -> Vec<u8> {
        let limit = match transport {
            Transport::Tcp => u16::MAX as usize,
            Transport::Udp => guest_udp_max(query).min(self.udp_link_max),
        };
        match self.ask_tcp(upstream, query).await {
            Ok(full) if full.len() <= limit => full,
            Ok(_) => truncated,
            Err(e) => {
                debug!("dns: upstream {upstream} over tcp: {e}");
                truncated
            }
        }
    }

    /// One query over UDP: our own ID and socket, resent after each silent attempt.
    /// Returns a response with our ID (at least a header).
    async fn ask_udp(&self, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
        let bind: SocketAddr = if upstream.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(bind).await?;
        sock.connect(upstream).await?;
        let id = random_id();
        let mut out = query.to_vec();
        out[..2].copy_from_slice(&id);
        let mut buf = vec![0u8; 65536];
        for _ in 0..self.attempts {
            sock.send(&out).await?;
            let deadline = Instant::now() + self.attempt_timeout;
            loop {
                match timeout_at(deadline, sock.recv(&mut buf)).await {
                    Err(_) => break,
                    Ok(Err(e)) => return Err(e),
                    Ok(Ok(n)) if is_response_to(&buf[..n], id) => return Ok(buf[..n].to_vec()),
                    Ok(Ok(_)) => {} // stray or spoofed: keep waiting
                }
            }
        }
        Err(io::Error::new(io::ErrorKind::TimedOut, "no answer"))
    }

    /// One query over TCP (RFC 7766 framing), bounded by the time UDP would have had.
    async fn ask_tcp(&self, upstream: SocketAddr, query: &[u8]) -> io::Result<Vec<u8>> {
        let budget = self.attempt_timeout * self.attempts;
        let id = random_id();
        let work = async {
            let mut stream = TcpStream::connect(upstream).await?;
            let len = u16::try_from(query.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
            let mut out = Vec::with_capacity(query.len() + 2);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&id);
            out.extend_from_slice(&query[2..]);
            stream.write_all(&out).await?;
            loop {
                let n = stream.read_u16().await? as usize;
                let mut buf = vec![0u8; n];
                stream.read_exact(&mut buf).await?;
                if is_response_to(&buf, id) {
                    return Ok(buf);
                }
            }
        };
        timeout(budget, work).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
    }
}

/// True when `msg` is a response (QR set) carrying `id`, with at least a header.
fn is_response_to(msg: &[u8], id: [u8; 2]) -> bool {
    msg.len() >= HEADER_LEN && msg[..2] == id && msg[2] & 0x80 != 0
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
    use proptest::prelude::*;
    use tokio::net::TcpListener;

    fn cfg(upstreams: Vec<SocketAddr>) -> NetConfig {
        NetConfig {
            dns_upstreams: upstreams,
            extra_hosts: vec![("myhost.test".into(), Ipv4Addr::new(10, 1, 2, 3))],
            ..NetConfig::default()
        }
    }

    fn server(upstreams: Vec<SocketAddr>) -> DnsServer {
        let c = cfg(upstreams);
        DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_millis(200), 2)
    }

    fn query(name: &str, rtype: RecordType) -> Vec<u8> {
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

    fn a_answers(m: &Message) -> Vec<Ipv4Addr> {
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

    #[test]
    fn local_other_types_are_nodata() {
        let s = server(vec![]);
        for t in [RecordType::AAAA, RecordType::MX, RecordType::TXT, RecordType::HTTPS] {
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
    fn records_table() {
        let r = DnsRecords::new();
        r.add("Foo.Example.", Ipv4Addr::new(1, 2, 3, 4)).unwrap();
        assert_eq!(r.lookup("foo.example"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(r.lookup("FOO.EXAMPLE."), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(r.list(), vec![("foo.example".into(), Ipv4Addr::new(1, 2, 3, 4))]);
        assert!(r.add("", Ipv4Addr::LOCALHOST).is_err());
        assert!(r.add(&"a".repeat(300), Ipv4Addr::LOCALHOST).is_err());
        assert!(r.remove("foo.EXAMPLE"));
        assert!(!r.remove("foo.example"));
        assert_eq!(r.lookup("foo.example"), None);
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

    // ---- fake upstreams on loopback ----

    /// An upstream answering every UDP query with `answer_ip` (and TC when `truncate`), and
    /// every TCP query with `tcp_records` A records. Returns its address.
    async fn fake_upstream(answer_ip: Ipv4Addr, truncate: bool, tcp_records: usize) -> SocketAddr {
        // The TCP side needs the UDP side's port, which something else may hold: try again.
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp, addr);
            }
        };
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut r = Message::response(q.id, OpCode::Query);
                r.metadata.recursion_available = true;
                r.add_queries(q.queries.clone());
                if truncate {
                    r.metadata.truncation = true;
                } else if let Some(qq) = q.queries.first() {
                    r.add_answer(Record::from_rdata(qq.name().clone(), 300, RData::A(A(answer_ip))));
                }
                let _ = udp.send_to(&r.to_vec().unwrap(), from).await;
            }
        });
        tokio::spawn(async move {
            while let Ok((mut s, _)) = tcp.accept().await {
                tokio::spawn(async move {
                    while let Ok(n) = s.read_u16().await {
                        let mut b = vec![0; n as usize];
                        if s.read_exact(&mut b).await.is_err() {
                            return;
                        }
                        let q = Message::from_vec(&b).unwrap();
                        let mut r = Message::response(q.id, OpCode::Query);
                        r.add_queries(q.queries.clone());
                        let name = q.queries[0].name().clone();
                        for i in 0..tcp_records {
                            let ip = Ipv4Addr::new(10, 0, (i / 256) as u8, i as u8);
                            r.add_answer(Record::from_rdata(name.clone(), 300, RData::A(A(ip))));
                        }
                        let bytes = r.to_vec().unwrap();
                        let _ = s.write_u16(bytes.len() as u16).await;
                        let _ = s.write_all(&bytes).await;
                    }
                });
            }
        });
        addr
    }

    /// A bound UDP socket that never answers (kept alive by the returned value).
    async fn silent_upstream() -> (UdpSocket, SocketAddr) {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = s.local_addr().unwrap();
        (s, a)
    }

    /// A loopback port with nobody listening (ICMP port unreachable -> ECONNREFUSED).
    fn closed_port() -> SocketAddr {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    }

    #[tokio::test]
    async fn forwards_and_restores_id() {
        let up = fake_upstream(Ipv4Addr::new(198, 51, 100, 7), false, 0).await;
        let s = server(vec![up]);
        let q = query("www.example.com", RecordType::A);
        let r = s.handle(&q, Transport::Udp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.id, 0xbeef);
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(198, 51, 100, 7)]);
        // Non-A types for non-local names are forwarded too.
        let q = query("www.example.com", RecordType::AAAA);
        assert!(s.handle(&q, Transport::Udp).await.is_some());
    }

    #[tokio::test]
    async fn fails_over_to_next_upstream() {
        let (_keep, silent) = silent_upstream().await;
        let good = fake_upstream(Ipv4Addr::new(198, 51, 100, 8), false, 0).await;
        let s = server(vec![closed_port(), silent, good]);
        let start = std::time::Instant::now();
        let r = s.handle(&query("a.example", RecordType::A), Transport::Udp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(198, 51, 100, 8)]);
        // silent: 2 attempts x 200 ms; the closed port fails at once.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(350), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
    }

    #[tokio::test]
    async fn servfail_when_nobody_answers() {
        let (_keep, silent) = silent_upstream().await;
        let s = server(vec![silent]);
        let start = std::time::Instant::now();
        let r = s.handle(&query("b.example", RecordType::A), Transport::Udp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.response_code, ResponseCode::ServFail);
        assert_eq!(m.id, 0xbeef);
        let took = start.elapsed();
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn truncated_answer_retried_over_tcp() {
        let up = fake_upstream(Ipv4Addr::UNSPECIFIED, true, 3).await;
        let s = server(vec![up]);
        // Small enough for classic UDP: the TCP answer is passed on.
        let r = s.handle(&query("c.example", RecordType::A), Transport::Udp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert!(!m.truncation);
        assert_eq!(a_answers(&m).len(), 3);
        assert_eq!(m.id, 0xbeef);

        // Too big for a guest without EDNS over UDP: it gets the truncated answer...
        let up = fake_upstream(Ipv4Addr::UNSPECIFIED, true, 100).await;
        let s = server(vec![up]);
        let q = query("d.example", RecordType::A);
        let r = s.handle(&q, Transport::Udp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert!(m.truncation);
        assert_eq!(m.id, 0xbeef);
        // ...and over TCP the whole thing.
        let r = s.handle(&q, Transport::Tcp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert!(!m.truncation);
        assert_eq!(a_answers(&m).len(), 100);
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
