//! Forwarding a guest's query to the upstream servers, as glibc's resolver does.
//!
//! The servers and options are one snapshot of the shared [`crate::config::HostDns`],
//! taken when the query arrives: a query in flight finishes against the servers it was sent
//! to, whatever the host side swaps in meanwhile.
//!
//! Order (resolv.conf(5)): `attempts` rounds (default [`super::UPSTREAM_ATTEMPTS`]); in each
//! round every server still in the running is sent the query in turn and given `timeout`
//! seconds (default [`super::UPSTREAM_TIMEOUT`], at most 30) before the next one is asked. With `rotate` each query
//! starts one server further than the one before. Unlike glibc, a server asked earlier
//! stays heard: its late answer is taken while the next server is being waited for (each
//! server has a socket of its own, connected, with its own random ID and source port).
//!
//! A server leaves the running for this query when it cannot be reached (a socket error,
//! such as ICMP port unreachable on loopback) or when it answers SERVFAIL or REFUSED: the
//! query moves on at once to the next server (split DNS where one server knows a zone the
//! others refuse works this way). Any other answer (NOERROR, NXDOMAIN, ...) goes back to the
//! guest. An answer with TC set is asked again over TCP from the same server. When no
//! server gives a usable answer the guest gets the last SERVFAIL or REFUSED one, or a
//! SERVFAIL of ours. An answer to another question, or one that does not parse, is not
//! taken (`Question::answered_by`, glibc's check): the wait for that server goes on.

use std::future::poll_fn;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout, timeout_at};
use tracing::debug;

use super::{DnsServer, Question, Transport, error_reply, guest_udp_max, random_id, with_id};
use crate::config::ResolvOptions;
use crate::services::metrics::UpstreamFailure;

/// Largest `timeout` and `attempts` taken from resolv.conf (glibc's limits).
const MAX_TIMEOUT_SECS: u8 = 30;
const MAX_ATTEMPTS: u8 = 5;

/// One server, for one query.
enum Server {
    /// Not asked yet.
    Idle,
    /// Asked (at least once): its socket and our ID.
    Asked(UdpSocket, [u8; 2]),
    /// Out of the running: unreachable, or answered SERVFAIL/REFUSED.
    Done,
}

/// One query being forwarded.
struct Ask<'a> {
    /// As the guest sent it.
    query: &'a [u8],
    /// Its question, which an answer must carry.
    question: Question<'a>,
    transport: Transport,
    upstreams: &'a [SocketAddr],
    /// How long a TCP retry (after TC) may take: what UDP had.
    tcp_budget: Duration,
}

/// What waiting for answers gave.
enum Heard {
    /// A usable answer, for the guest, and the server it came from.
    Answer(Vec<u8>, SocketAddr),
    /// The server being waited for is out of the running (or the time is up): next one.
    Next,
}

impl DnsServer {
    /// The per-server wait and the number of rounds: resolv.conf's options, else the defaults.
    fn timeouts(&self, options: &ResolvOptions) -> (Duration, u32) {
        let per_try = options
            .timeout
            .map_or(self.attempt_timeout, |s| Duration::from_secs(u64::from(s.clamp(1, MAX_TIMEOUT_SECS))));
        let rounds = options.attempts.map_or(self.attempts, |a| u32::from(a.clamp(1, MAX_ATTEMPTS)));
        (per_try, rounds)
    }

    /// Ask the upstreams; see the module comment for the policy. Also tells which server
    /// gave the answer (None when none answered usably: the answer is then a SERVFAIL of
    /// ours or the last refusal).
    pub(super) async fn forward(&self, query: &[u8], transport: Transport) -> (Vec<u8>, Option<SocketAddr>) {
        let conf = self.host_dns.upstreams();
        let upstreams = &conf.servers;
        let n = upstreams.len();
        if n == 0 {
            return (error_reply(query, ResponseCode::ServFail, true), None);
        }
        let (per_try, rounds) = self.timeouts(&conf.options);
        let first = if conf.options.rotate { self.rotation.fetch_add(1, Ordering::Relaxed) % n } else { 0 };
        let ask = Ask { query, question: Question::of(query), transport, upstreams, tcp_budget: per_try * rounds };
        let mut servers: Vec<Server> = (0..n).map(|_| Server::Idle).collect();
        let mut out = query.to_vec();
        let mut buf = vec![0u8; 65536];
        let mut fallback: Option<Vec<u8>> = None;
        for _ in 0..rounds {
            for k in 0..n {
                let i = (first + k) % n;
                if !self.send(&mut servers[i], upstreams[i], &mut out).await {
                    continue;
                }
                let deadline = Instant::now() + per_try;
                let heard = self.listen(&ask, &mut servers, i, deadline, &mut buf, &mut fallback).await;
                if let Heard::Answer(answer, from) = heard {
                    return (with_id(answer, query), Some(from));
                }
                if servers.iter().all(|s| matches!(s, Server::Done)) {
                    return (give_up(query, fallback), None);
                }
            }
        }
        (give_up(query, fallback), None)
    }

    /// Sends `out` (the guest's query) to one server with its own ID, opening its socket the
    /// first time. False when the server is (or just went) out of the running.
    async fn send(&self, server: &mut Server, upstream: SocketAddr, out: &mut [u8]) -> bool {
        if matches!(server, Server::Idle) {
            *server = match open(upstream).await {
                Ok(sock) => Server::Asked(sock, random_id()),
                Err(e) => {
                    debug!("dns: upstream {upstream}: {e}");
                    self.metrics.upstream_failure(upstream, UpstreamFailure::Unreachable);
                    Server::Done
                }
            };
        }
        let Server::Asked(sock, id) = server else {
            return false;
        };
        out[..2].copy_from_slice(id);
        if let Err(e) = sock.send(out).await {
            debug!("dns: upstream {upstream} over udp: {e}");
            self.metrics.upstream_failure(upstream, UpstreamFailure::Unreachable);
            *server = Server::Done;
            return false;
        }
        self.metrics.upstream_query(upstream);
        true
    }

    /// Waits until `deadline` for an answer from any server asked so far; returns early when
    /// server `current` goes out of the running.
    async fn listen(
        &self,
        ask: &Ask<'_>,
        servers: &mut [Server],
        current: usize,
        deadline: Instant,
        buf: &mut [u8],
        fallback: &mut Option<Vec<u8>>,
    ) -> Heard {
        loop {
            let Ok((j, received)) = timeout_at(deadline, recv_any(servers, buf)).await else {
                // (The time given to one server ended; an answer may still come later.)
                self.metrics.upstream_failure(ask.upstreams[current], UpstreamFailure::Timeout);
                return Heard::Next;
            };
            let upstream = ask.upstreams[j];
            let len = match received {
                Ok(len) => len,
                Err(e) => {
                    debug!("dns: upstream {upstream} over udp: {e}");
                    self.metrics.upstream_failure(upstream, UpstreamFailure::Unreachable);
                    servers[j] = Server::Done;
                    if j == current {
                        return Heard::Next;
                    }
                    continue;
                }
            };
            let Server::Asked(_, id) = &servers[j] else {
                continue;
            };
            if !ask.question.answered_by(&buf[..len], *id) {
                // Stray, spoofed, another question's, or garbled: keep waiting.
                debug!("dns: upstream {upstream}: not an answer to the query, not taken");
                continue;
            }
            let mut answer = buf[..len].to_vec();
            if answer[2] & 0x02 != 0 {
                answer = self.retry_tcp(ask, upstream, answer).await;
            }
            let rcode = answer[3] & 0x0f;
            if rcode != ResponseCode::ServFail.low() && rcode != ResponseCode::Refused.low() {
                self.metrics.upstream_answer(upstream);
                return Heard::Answer(answer, upstream);
            }
            let why = if rcode == ResponseCode::ServFail.low() {
                UpstreamFailure::Servfail
            } else {
                UpstreamFailure::Refused
            };
            self.metrics.upstream_failure(upstream, why);
            debug!("dns: upstream {upstream} answered {}", ResponseCode::from_low(rcode));
            *fallback = Some(answer);
            servers[j] = Server::Done;
            if j == current {
                return Heard::Next;
            }
        }
    }

    /// The upstream answered with TC: ask it over TCP, and use that answer when the guest
    /// can take it; otherwise keep the truncated one. A TCP try that fails is counted as the
    /// server's failure: a timeout when its time ran out, unreachable otherwise (refused,
    /// reset, closed without an answer), as a refusal over UDP is.
    async fn retry_tcp(&self, ask: &Ask<'_>, upstream: SocketAddr, truncated: Vec<u8>) -> Vec<u8> {
        let limit = match ask.transport {
            Transport::Tcp => u16::MAX as usize,
            Transport::Udp => guest_udp_max(ask.query).min(self.udp_link_max),
        };
        self.metrics.upstream_query(upstream);
        match ask_tcp(upstream, ask).await {
            Ok(full) if full.len() <= limit => full,
            Ok(_) => truncated,
            Err(e) => {
                debug!("dns: upstream {upstream} over tcp: {e}");
                let why = if e.kind() == io::ErrorKind::TimedOut {
                    UpstreamFailure::Timeout
                } else {
                    UpstreamFailure::Unreachable
                };
                self.metrics.upstream_failure(upstream, why);
                truncated
            }
        }
    }
}

/// The guest's answer when no server gave a usable one.
fn give_up(query: &[u8], fallback: Option<Vec<u8>>) -> Vec<u8> {
    match fallback {
        Some(answer) => with_id(answer, query),
        None => error_reply(query, ResponseCode::ServFail, true),
    }
}

/// A fresh UDP socket (random source port) connected to `upstream`.
async fn open(upstream: SocketAddr) -> io::Result<UdpSocket> {
    let bind: SocketAddr =
        if upstream.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (Ipv6Addr::UNSPECIFIED, 0).into() };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    Ok(sock)
}

/// The next datagram (or socket error) of any server asked so far: (its index, the result).
/// Pending for ever when none has been asked (the caller's deadline ends it).
///
/// A refusal (ICMP port unreachable) leaves an error on the connected socket without making
/// it readable: epoll reports EPOLLERR alone, which tokio takes as error readiness, not read
/// readiness, so `poll_recv` never gets to the `recv` that would return the error. Each
/// socket is therefore also waited on for its error readiness, and the error is then taken
/// with SO_ERROR. Neither wait is a system call: an answer still costs its one `recv`.
async fn recv_any(servers: &[Server], buf: &mut [u8]) -> (usize, io::Result<usize>) {
    let mut asked: Vec<_> = servers
        .iter()
        .enumerate()
        .filter_map(|(j, server)| match server {
            Server::Asked(sock, _) => Some((j, sock, Box::pin(sock.ready(Interest::ERROR)))),
            _ => None,
        })
        .collect();
    poll_fn(|cx| {
        for (j, sock, error) in &mut asked {
            let mut rb = ReadBuf::new(buf);
            match sock.poll_recv(cx, &mut rb) {
                Poll::Ready(Ok(())) => return Poll::Ready((*j, Ok(rb.filled().len()))),
                Poll::Ready(Err(e)) => return Poll::Ready((*j, Err(e))),
                Poll::Pending => {}
            }
            while let Poll::Ready(ready) = error.as_mut().poll(cx) {
                match ready.and_then(|_| sock.take_error()) {
                    Ok(Some(e)) | Err(e) => return Poll::Ready((*j, Err(e))),
                    Ok(None) => {
                        // Taken already: forget this readiness and wait for the next.
                        let _ = sock.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                        error.set(sock.ready(Interest::ERROR));
                    }
                }
            }
        }
        Poll::Pending
    })
    .await
}

/// One query over TCP (RFC 7766 framing), bounded by the ask's TCP budget.
async fn ask_tcp(upstream: SocketAddr, ask: &Ask<'_>) -> io::Result<Vec<u8>> {
    let (query, id) = (ask.query, random_id());
    let work = async {
        let mut stream = TcpStream::connect(upstream).await?;
        let len =
            u16::try_from(query.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
        let mut out = Vec::with_capacity(query.len() + 2);
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&id);
        out.extend_from_slice(&query[2..]);
        stream.write_all(&out).await?;
        loop {
            let n = stream.read_u16().await? as usize;
            let mut buf = vec![0u8; n];
            stream.read_exact(&mut buf).await?;
            if ask.question.answered_by(&buf, id) {
                return Ok(buf);
            }
        }
    };
    timeout(ask.tcp_budget, work).await.map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

#[cfg(test)]
mod tests {
    use super::super::tests::{a_answers, cfg, query, server};
    use super::super::{DnsRecords, Local};
    use super::*;
    use crate::config::{NetConfig, Upstreams};
    use hickory_proto::op::{Message, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;

    /// How a fake upstream answers.
    #[derive(Clone, Copy)]
    struct Fake {
        /// The A record of every NOERROR answer.
        ip: Ipv4Addr,
        rcode: ResponseCode,
        /// UDP answers have TC set and no records; TCP answers have `tcp_records` records.
        truncate: bool,
        tcp_records: usize,
        /// Wait this long before answering.
        delay: Duration,
        /// Answer wrongly over UDP, with the query's ID all the same.
        wrong: Option<Wrong>,
    }

    /// How a confused or spoofing upstream answers.
    #[derive(Clone, Copy)]
    enum Wrong {
        /// The answer to another question.
        Question,
        /// The question, then five answers promised and three bytes of junk.
        Body,
    }

    impl Fake {
        fn answering(ip: Ipv4Addr) -> Fake {
            Fake {
                ip,
                rcode: ResponseCode::NoError,
                truncate: false,
                tcp_records: 0,
                delay: Duration::ZERO,
                wrong: None,
            }
        }

        fn rcode(rcode: ResponseCode) -> Fake {
            Fake { rcode, ..Fake::answering(Ipv4Addr::UNSPECIFIED) }
        }

        fn answer(&self, q: &Message, over_tcp: bool) -> Vec<u8> {
            match self.wrong.filter(|_| !over_tcp) {
                Some(Wrong::Question) => {
                    let mut other = q.clone();
                    other.queries[0].set_name(hickory_proto::rr::Name::from_ascii("other.example.").unwrap());
                    return Fake { wrong: None, ..*self }.answer(&other, false);
                }
                Some(Wrong::Body) => {
                    let mut bytes = Fake { wrong: None, rcode: ResponseCode::NoError, ..*self }.answer(q, false);
                    let question_end = bytes.len() - 16; // one A record (name pointer, 14 more)
                    bytes.truncate(question_end);
                    bytes[6..8].copy_from_slice(&5u16.to_be_bytes());
                    bytes.extend_from_slice(&[0xc0, 0xff, 0x01]);
                    return bytes;
                }
                None => {}
            }
            let mut r = Message::response(q.id, OpCode::Query);
            r.metadata.recursion_available = true;
            r.metadata.response_code = self.rcode;
            r.add_queries(q.queries.clone());
            let name = q.queries[0].name().clone();
            if over_tcp {
                for i in 0..self.tcp_records {
                    let ip = Ipv4Addr::new(10, 0, (i / 256) as u8, i as u8);
                    r.add_answer(Record::from_rdata(name.clone(), 300, RData::A(A(ip))));
                }
            } else if self.truncate {
                r.metadata.truncation = true;
            } else if self.rcode == ResponseCode::NoError {
                r.add_answer(Record::from_rdata(name, 300, RData::A(A(self.ip))));
            }
            r.to_vec().unwrap()
        }
    }

    /// A fake upstream on loopback (UDP, and TCP on the same port); counts the UDP queries
    /// it gets.
    async fn fake(how: Fake) -> (SocketAddr, Arc<AtomicUsize>) {
        // The TCP side needs the UDP side's port, which something else may hold: try again.
        let (udp, tcp, addr) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            if let Ok(tcp) = TcpListener::bind(addr).await {
                break (udp, tcp, addr);
            }
        };
        let count = Arc::new(AtomicUsize::new(0));
        let counter = count.clone();
        let udp = Arc::new(udp);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let Ok(q) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let udp = udp.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(how.delay).await;
                    let _ = udp.send_to(&how.answer(&q, false), from).await;
                });
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
                        let bytes = how.answer(&Message::from_vec(&b).unwrap(), true);
                        let _ = s.write_u16(bytes.len() as u16).await;
                        let _ = s.write_all(&bytes).await;
                    }
                });
            }
        });
        (addr, count)
    }

    async fn answering(ip: Ipv4Addr) -> SocketAddr {
        fake(Fake::answering(ip)).await.0
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

    async fn ask(s: &DnsServer, name: &str) -> Message {
        let r = s.handle(&query(name, RecordType::A), Transport::Udp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.id, 0xbeef);
        m
    }

    /// A server whose upstreams come from a "resolv.conf" with these options.
    fn server_with(servers: Vec<SocketAddr>, options: ResolvOptions) -> (NetConfig, DnsServer) {
        let c = cfg(vec![]);
        c.host_dns.set_upstreams(Upstreams { servers, options, ..Upstreams::default() });
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_millis(200), 2);
        (c, s)
    }

    const GOOD: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 8);

    /// A guest with `--max-dns-queries-per-guest` queries being forwarded gets no more
    /// forwarded (dropped at once), from any of its addresses, while another guest's still
    /// go: a guest is counted by its MAC, so rotating IPv6 addresses buys it nothing.
    #[tokio::test]
    async fn queries_in_flight_are_bounded_per_guest() {
        use crate::guest::GuestKey;
        use crate::services::dns::QueryFrom;
        let (_keep, silent) = silent_upstream().await;
        let mut c = cfg(vec![]);
        c.limits.max_dns_queries_per_guest = 2;
        c.host_dns.set_upstreams(Upstreams::command_line(vec![silent]));
        let s = Arc::new(
            DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_secs(5), 1),
        );
        let mac = GuestKey::Mac([0x52, 0x54, 0, 0, 0, 2]);
        let a = QueryFrom { addr: std::net::IpAddr::V4(Ipv4Addr::new(192, 168, 65, 2)), guest: mac };
        let a6 = QueryFrom { addr: "fd75:7365:726e::2".parse().unwrap(), guest: mac };
        let a6b = QueryFrom { addr: "fd75:7365:726e::9".parse().unwrap(), guest: mac };
        let b_addr = std::net::IpAddr::V4(Ipv4Addr::new(192, 168, 65, 3));
        let b = QueryFrom { addr: b_addr, guest: GuestKey::Addr(b_addr) };
        let q = query("slow.example", RecordType::A);
        let mut waiting = Vec::new();
        for from in [a, a6] {
            let (s, q) = (s.clone(), q.clone());
            waiting.push(tokio::spawn(async move { s.handle_from(Some(from), &q, Transport::Udp).await }));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        for from in [a, a6b] {
            let third =
                tokio::time::timeout(Duration::from_secs(1), s.handle_from(Some(from), &q, Transport::Udp)).await;
            assert_eq!(third.ok(), Some(None), "dropped at once, from {}", from.addr);
        }
        let other = tokio::time::timeout(Duration::from_millis(300), s.handle_from(Some(b), &q, Transport::Udp)).await;
        assert!(other.is_err(), "another guest's query is forwarded (and waits for the silent server)");
        let sample = s.metrics().sample(&[]);
        assert!(sample.limits.iter().any(|(l, n)| l.as_str() == "dns_queries_per_guest" && *n == 2));
        for w in waiting {
            w.abort();
        }
    }

    #[tokio::test]
    async fn forwards_and_restores_id() {
        let up = answering(Ipv4Addr::new(198, 51, 100, 7)).await;
        let s = server(vec![up]);
        let m = ask(&s, "www.example.com").await;
        assert_eq!(a_answers(&m), vec![Ipv4Addr::new(198, 51, 100, 7)]);
        // Non-A types for non-local names are forwarded too.
        let q = query("www.example.com", RecordType::AAAA);
        assert!(s.handle(&q, Transport::Udp).await.is_some());
    }

    #[tokio::test]
    async fn fails_over_from_unreachable_and_silent_servers() {
        use crate::services::metrics::UpstreamFailure;
        let failures = |s: &DnsServer, a: SocketAddr, why: UpstreamFailure| {
            let sample = s.metrics().sample(&[]);
            sample.upstreams.iter().find(|(u, _)| *u == a).map_or(0, |(_, c)| c.failures[why as usize])
        };
        // A refusing server (ICMP port unreachable: ECONNREFUSED on its connected socket) is
        // left at once: with a 5 s wait per server, the next one answers long before the
        // first wait would have ended (a timeout, not the refusal, would take the 5 s).
        let closed = closed_port();
        let good = answering(GOOD).await;
        let c = cfg(vec![closed, good]);
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_secs(5), 2);
        let start = std::time::Instant::now();
        assert_eq!(a_answers(&ask(&s, "a.example").await), vec![GOOD]);
        let took = start.elapsed();
        assert!(took < Duration::from_millis(2500), "{took:?}");
        assert_eq!(failures(&s, closed, UpstreamFailure::Unreachable), 1);
        assert_eq!(failures(&s, closed, UpstreamFailure::Timeout), 0);

        // The closed port fails at once, the silent server costs one 200 ms wait.
        let (_keep, silent) = silent_upstream().await;
        let s = server(vec![closed, silent, good]);
        let start = std::time::Instant::now();
        assert_eq!(a_answers(&ask(&s, "a.example").await), vec![GOOD]);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(180), "{took:?}");
        assert!(took < Duration::from_secs(1), "{took:?}");
        assert_eq!(failures(&s, closed, UpstreamFailure::Unreachable), 1);
        assert_eq!(failures(&s, closed, UpstreamFailure::Timeout), 0);
        assert_eq!(failures(&s, silent, UpstreamFailure::Timeout), 1);
    }

    #[tokio::test]
    async fn servfail_and_refused_move_on_at_once() {
        let (servfail, n1) = fake(Fake::rcode(ResponseCode::ServFail)).await;
        let (refused, n2) = fake(Fake::rcode(ResponseCode::Refused)).await;
        let (good, n3) = fake(Fake::answering(GOOD)).await;
        let s = server(vec![servfail, refused, good]);
        let start = std::time::Instant::now();
        assert_eq!(a_answers(&ask(&s, "split.example").await), vec![GOOD]);
        // No 200 ms wait for either of the refusing servers.
        assert!(start.elapsed() < Duration::from_millis(350), "{:?}", start.elapsed());
        let counts = [&n1, &n2, &n3].map(|n| n.load(Ordering::SeqCst));
        assert_eq!(counts, [1, 1, 1]);
    }

    /// The counters per upstream (for `/metrics`): what each server was sent,
    /// answered, and how it failed.
    #[tokio::test]
    async fn counts_per_upstream() {
        use crate::services::metrics::{UpstreamCounters, UpstreamFailure};
        let (_keep, silent) = silent_upstream().await;
        let closed = closed_port();
        let (servfail, _) = fake(Fake::rcode(ResponseCode::ServFail)).await;
        let (good, asked) = fake(Fake::answering(GOOD)).await;
        let s = server(vec![closed, silent, servfail, good]);
        for name in ["a.example", "b.example", "c.example"] {
            assert_eq!(a_answers(&ask(&s, name).await), vec![GOOD]);
        }
        let sample = s.metrics().sample(&[]);
        let of = |a: SocketAddr| sample.upstreams.iter().find(|(u, _)| *u == a).map(|(_, c)| *c).unwrap_or_default();
        let failures = |a: SocketAddr, why: UpstreamFailure| of(a).failures[why as usize];
        assert_eq!(sample.dns_queries, 3);
        assert_eq!(sample.dns_local, 0);
        assert_eq!(of(good), UpstreamCounters { queries: 3, answers: 3, failures: [0; 4] });
        assert_eq!(asked.load(Ordering::SeqCst), 3);
        assert_eq!(failures(silent, UpstreamFailure::Timeout), 3);
        assert_eq!(of(silent).queries, 3);
        assert_eq!((of(servfail).queries, of(servfail).answers), (3, 0));
        assert_eq!(failures(servfail, UpstreamFailure::Servfail), 3);
        // The closed port fails once per query: unreachable when its ICMP error is read, or
        // a timeout when the kernel rate-limited the ICMP error away.
        let closed_failures =
            failures(closed, UpstreamFailure::Unreachable) + failures(closed, UpstreamFailure::Timeout);
        assert_eq!(closed_failures, 3, "{sample:?}");
        assert_eq!(of(closed).answers, 0);
    }

    /// Every query lands in the DNS log: who answered, with what.
    #[tokio::test]
    async fn queries_are_logged() {
        let (servfail, _) = fake(Fake::rcode(ResponseCode::ServFail)).await;
        let (good, _) = fake(Fake::answering(GOOD)).await;
        let s = server(vec![servfail, good]);
        assert_eq!(a_answers(&ask(&s, "a.example").await), vec![GOOD]);
        let r = s.handle(&query("host.docker.internal", RecordType::A), Transport::Tcp).await.unwrap();
        assert!(!r.is_empty());
        let log = s.activity().dns.snapshot();
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!((log[0].name.as_str(), log[0].qtype.as_str(), log[0].rcode.as_str()), ("a.example", "A", "NOERROR"));
        assert_eq!(log[0].answers, vec![GOOD.to_string()]);
        assert_eq!(log[0].upstream, Some(good.to_string()));
        assert_eq!(log[0].transport, "udp");
        assert_eq!(log[1].name, "host.docker.internal");
        assert_eq!(log[1].answers, vec!["192.168.65.254".to_string()]);
        assert_eq!(log[1].upstream.as_deref(), Some("gateway"));
        assert_eq!(log[1].transport, "tcp");
        // Nobody answers usably: the refusal of the last server goes back, from nobody.
        let s = server(vec![servfail]);
        let _ = s.handle(&query("b.example", RecordType::AAAA), Transport::Udp).await;
        let log = s.activity().dns.snapshot();
        assert_eq!((log[0].rcode.as_str(), log[0].upstream.as_deref()), ("SERVFAIL", None));
        // A message that is no query: dropped, logged as such.
        assert_eq!(s.handle(b"\x00\x01", Transport::Udp).await, None);
        let log = s.activity().dns.snapshot();
        assert_eq!((log[1].name.as_str(), log[1].rcode.as_str()), ("?", "dropped"));
    }

    #[tokio::test]
    async fn nxdomain_is_an_answer() {
        let (nx, _) = fake(Fake::rcode(ResponseCode::NXDomain)).await;
        let (good, asked) = fake(Fake::answering(GOOD)).await;
        let s = server(vec![nx, good]);
        assert_eq!(ask(&s, "nowhere.example").await.response_code, ResponseCode::NXDomain);
        assert_eq!(asked.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_last_refusal_when_nobody_answers() {
        let (servfail, n1) = fake(Fake::rcode(ResponseCode::ServFail)).await;
        let (refused, n2) = fake(Fake::rcode(ResponseCode::Refused)).await;
        let s = server(vec![servfail, refused]);
        assert_eq!(ask(&s, "x.example").await.response_code, ResponseCode::Refused);
        // Both are out of the running after one answer each: no second round.
        assert_eq!([n1.load(Ordering::SeqCst), n2.load(Ordering::SeqCst)], [1, 1]);
    }

    #[tokio::test]
    async fn servfail_when_nobody_answers() {
        let (_keep, silent) = silent_upstream().await;
        let s = server(vec![silent]);
        let start = std::time::Instant::now();
        let m = ask(&s, "b.example").await;
        assert_eq!(m.response_code, ResponseCode::ServFail);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(380) && took < Duration::from_secs(2), "{took:?}");
    }

    /// An answer with the query's ID but to another question, or garbled, is not passed on
    /// (glibc's resolver drops it too): the next server's answer is, or SERVFAIL.
    #[tokio::test]
    async fn answers_to_another_question_or_garbled_are_not_taken() {
        for wrong in [Wrong::Question, Wrong::Body] {
            let (bad, asked) = fake(Fake { wrong: Some(wrong), ..Fake::answering(Ipv4Addr::new(192, 0, 2, 66)) }).await;
            let s = server(vec![bad, answering(GOOD).await]);
            let m = ask(&s, "q.example").await;
            assert_eq!(a_answers(&m), vec![GOOD], "the second server's answer");
            assert_eq!(m.queries[0].name().to_ascii(), "q.example.");
            assert!(asked.load(Ordering::SeqCst) >= 1);
            let s = server(vec![bad]);
            assert_eq!(ask(&s, "q.example").await.response_code, ResponseCode::ServFail);
        }
    }

    /// The check itself: a name in another case is the same question; a query whose
    /// question cannot be read is matched by its ID alone; a truncated answer needs only
    /// its question.
    #[test]
    fn an_answer_must_carry_the_question() {
        let q = query("Q.Example", RecordType::A);
        let id = [q[0], q[1]];
        let mut a = Message::from_vec(&q).unwrap();
        a.metadata.message_type = hickory_proto::op::MessageType::Response;
        a.queries[0].set_name(hickory_proto::rr::Name::from_ascii("q.EXAMPLE.").unwrap());
        let a = a.to_vec().unwrap();
        let question = Question::of(&q);
        assert!(question.answered_by(&a, id));
        assert!(!question.answered_by(&a, [id[0], id[1] ^ 1]), "another ID");
        assert!(!question.answered_by(&q, id), "the query itself, not a response");
        let aaaa = query("q.example", RecordType::AAAA);
        assert!(!Question::of(&aaaa).answered_by(&a, id), "another type");
        assert!(!question.answered_by(&a[..a.len() - 1], id), "cut short");
        assert!(Question::of(&q[..5]).answered_by(&a, id), "a query without a readable question");
        let mut cut = a.clone();
        cut[7] = 1; // one answer promised, none there
        assert!(!question.answered_by(&cut, id));
        cut[2] |= 0x02;
        assert!(question.answered_by(&cut, id), "TC: the question is enough");
    }

    #[tokio::test]
    async fn a_late_answer_is_taken_while_the_next_server_is_asked() {
        let (slow, _) = fake(Fake { delay: Duration::from_millis(300), ..Fake::answering(GOOD) }).await;
        let (_keep, silent) = silent_upstream().await;
        let s = server(vec![slow, silent]);
        let start = std::time::Instant::now();
        assert_eq!(a_answers(&ask(&s, "late.example").await), vec![GOOD]);
        let took = start.elapsed();
        // Without it: the slow server's second try, answered at 700 ms.
        assert!(took >= Duration::from_millis(280) && took < Duration::from_millis(600), "{took:?}");
    }

    #[tokio::test]
    async fn attempts_are_rounds_over_the_servers() {
        let (a, na) = fake(Fake { delay: Duration::from_secs(30), ..Fake::answering(GOOD) }).await;
        let (b, nb) = fake(Fake { delay: Duration::from_secs(30), ..Fake::answering(GOOD) }).await;
        let (_c, s) = server_with(vec![a, b], ResolvOptions { attempts: Some(3), ..ResolvOptions::default() });
        let start = std::time::Instant::now();
        assert_eq!(ask(&s, "slow.example").await.response_code, ResponseCode::ServFail);
        // 3 rounds x 2 servers x 200 ms.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1150) && took < Duration::from_secs(3), "{took:?}");
        assert_eq!([na.load(Ordering::SeqCst), nb.load(Ordering::SeqCst)], [3, 3]);
    }

    #[tokio::test]
    async fn timeout_option_is_seconds_per_server() {
        let (_keep, silent) = silent_upstream().await;
        let options = ResolvOptions { timeout: Some(1), attempts: Some(1), ..ResolvOptions::default() };
        let (_c, s) = server_with(vec![silent], options);
        let start = std::time::Instant::now();
        assert_eq!(ask(&s, "t.example").await.response_code, ResponseCode::ServFail);
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(950) && took < Duration::from_millis(1500), "{took:?}");
    }

    #[tokio::test]
    async fn rotate_spreads_queries() {
        let (a, na) = fake(Fake::answering(GOOD)).await;
        let (b, nb) = fake(Fake::answering(GOOD)).await;
        let (_c, s) = server_with(vec![a, b], ResolvOptions::default());
        for _ in 0..4 {
            ask(&s, "r.example").await;
        }
        assert_eq!([na.load(Ordering::SeqCst), nb.load(Ordering::SeqCst)], [4, 0]);
        let (_c, s) = server_with(vec![a, b], ResolvOptions { rotate: true, ..ResolvOptions::default() });
        for _ in 0..4 {
            ask(&s, "r.example").await;
        }
        assert_eq!([na.load(Ordering::SeqCst), nb.load(Ordering::SeqCst)], [6, 2]);
    }

    #[tokio::test]
    async fn a_query_in_flight_keeps_its_servers() {
        let old = Ipv4Addr::new(198, 51, 100, 1);
        let new = Ipv4Addr::new(198, 51, 100, 2);
        let (slow_old, _) = fake(Fake { delay: Duration::from_millis(150), ..Fake::answering(old) }).await;
        let (fresh, _) = fake(Fake::answering(new)).await;
        let c = cfg(vec![slow_old]);
        let s = Arc::new(DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))));
        let in_flight = tokio::spawn({
            let s = s.clone();
            async move { ask(&s, "swap.example").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        c.host_dns.set_upstreams(Upstreams::command_line(vec![fresh]));
        assert_eq!(a_answers(&ask(&s, "swap.example").await), vec![new]);
        assert_eq!(a_answers(&in_flight.await.unwrap()), vec![old]);
        // Swapped to nothing: SERVFAIL at once, without I/O.
        c.host_dns.set_upstreams(Upstreams::default());
        assert!(matches!(s.local(&query("swap.example", RecordType::A)), Local::Reply(_)));
    }

    /// Forwarded answers for a name an `--allow-domain` covers teach the egress policy its
    /// addresses; answers for other names, and local answers, teach nothing.
    #[tokio::test]
    async fn answers_for_allowed_domains_are_learnt() {
        use crate::policy::{Policy, Rules, Verdict};
        let up = answering(GOOD).await;
        let rules = Rules::parse::<&str>(&[], &[], &["ok.test"]).unwrap();
        let c = NetConfig { policy: Arc::new(Policy::new(rules)), ..cfg(vec![up]) };
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_millis(200), 2);
        let good = std::net::IpAddr::V4(GOOD);
        ask(&s, "other.test").await;
        assert!(matches!(c.policy.check(good, Some(80)), Verdict::Deny(_)));
        assert!(c.policy.learnt().is_empty());
        assert_eq!(a_answers(&ask(&s, "WWW.ok.test").await), vec![GOOD]);
        assert_eq!(c.policy.check(good, Some(80)), Verdict::Allow);
        let learnt = c.policy.learnt();
        assert_eq!(learnt.len(), 1);
        assert_eq!(learnt[0].name, "www.ok.test");
        assert!(learnt[0].expires_in > Duration::from_secs(290), "the record's TTL (300 s): {learnt:?}");
        // A local name (myhost.test, --add-host) teaches nothing even when covered.
        c.policy.set_rules(Rules::parse::<&str>(&[], &[], &["ok.test", "myhost.test"]).unwrap());
        ask(&s, "myhost.test").await;
        assert_eq!(c.policy.learnt().len(), 1);
    }

    #[tokio::test]
    async fn truncated_answer_retried_over_tcp() {
        let (up, _) = fake(Fake { truncate: true, tcp_records: 3, ..Fake::answering(GOOD) }).await;
        let s = server(vec![up]);
        // Small enough for classic UDP: the TCP answer is passed on.
        let m = ask(&s, "c.example").await;
        assert!(!m.truncation);
        assert_eq!(a_answers(&m).len(), 3);

        // Too big for a guest without EDNS over UDP: it gets the truncated answer...
        let (up, _) = fake(Fake { truncate: true, tcp_records: 100, ..Fake::answering(GOOD) }).await;
        let s = server(vec![up]);
        let m = ask(&s, "d.example").await;
        assert!(m.truncation);
        // ...and over TCP the whole thing.
        let r = s.handle(&query("d.example", RecordType::A), Transport::Tcp).await.unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert!(!m.truncation);
        assert_eq!(a_answers(&m).len(), 100);
    }

    /// A server that answers over UDP with TC set but refuses TCP (RST: ECONNREFUSED on
    /// connect): its truncated answer goes back at once, not after the TCP retry's time,
    /// and the refusal is counted as the server's being unreachable.
    #[tokio::test]
    async fn a_refused_tcp_retry_gives_the_truncated_answer_at_once() {
        use crate::services::metrics::UpstreamFailure;
        // The UDP side of an upstream whose TCP port nothing listens on.
        let udp = loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            if TcpListener::bind(udp.local_addr().unwrap()).await.is_ok() {
                break udp; // (the listener is dropped at once: the port refuses)
            }
        };
        let up = udp.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = udp.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let _ = udp.send_to(&Fake { truncate: true, ..Fake::answering(GOOD) }.answer(&q, false), from).await;
            }
        });
        let c = cfg(vec![up]);
        let s = DnsServer::new(&c, Arc::new(DnsRecords::from_config(&c))).with_timeouts(Duration::from_secs(5), 2);
        let start = std::time::Instant::now();
        let r = s.handle(&query("tc.example", RecordType::A), Transport::Tcp).await.unwrap();
        let took = start.elapsed();
        assert!(Message::from_vec(&r).unwrap().truncation);
        // The TCP retry may take what UDP had, 10 s: the refusal ends it long before.
        assert!(took < Duration::from_millis(2500), "{took:?}");
        let sample = s.metrics().sample(&[]);
        let counters = sample.upstreams.iter().find(|(u, _)| *u == up).map(|(_, c)| *c).unwrap();
        assert_eq!((counters.queries, counters.answers), (2, 1), "{counters:?}");
        assert_eq!(counters.failures[UpstreamFailure::Unreachable as usize], 1, "{counters:?}");
        assert_eq!(counters.failures[UpstreamFailure::Timeout as usize], 0, "{counters:?}");
    }
}
