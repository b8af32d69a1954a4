//! Gateway services: what the guest reaches at the gateway address (DHCP, DNS).
//!
//! Theory of operation: DHCP ([`dhcp::DhcpServer`]) is pure state-machine code the engine
//! calls inline for every datagram to port 67. DNS needs I/O towards the upstreams, so it
//! runs on a runtime of its own: [`ServiceHub::start`] spawns one thread with a tokio
//! current-thread runtime and keeps a channel to it.
//!
//! When a guest opens a flow to the gateway's port 53, the engine asks [`ServiceHub`] for a
//! socket: `connect_udp` / `connect_tcp` make a non-blocking, close-on-exec socketpair
//! (SOCK_SEQPACKET for UDP, SOCK_STREAM for TCP), send one end to the runtime and return the
//! other. The engine then treats the service like any host socket: it writes the guest's
//! UDP payloads (or TCP byte stream) into its end and reads the replies from it. On the
//! runtime side:
//!
//! - UDP: each message read is one DNS query, answered by a task of its own (a slow upstream
//!   does not hold up the next query); each reply is one message. SOCK_SEQPACKET keeps the
//!   boundaries of datagrams and, unlike SOCK_DGRAM, tells each end when the other closed:
//!   when the engine ends the flow (idle, or evicted: engine/flow_policy.rs bounds the
//!   gateway's DNS flows) the service sees the end at once and closes its end, its pending
//!   queries abandoned; it also closes after [`UDP_IDLE`] without queries or pending answers.
//!   A guest cannot make these grow without bound: at most [`MAX_DNS_UDP`] such socketpairs
//!   exist at once (counting those still on their way to the runtime; past it `connect_udp`
//!   refuses, which the guest sees as an ICMP port unreachable), and at most
//!   [`UDP_MAX_PENDING_ALL`] queries are being answered at once over all of them (each may
//!   hold a socket to an upstream); each bound is logged once when first reached.
//! - TCP: DNS over TCP framing (2-byte length prefix, RFC 7766), several queries per
//!   connection, answered concurrently (at most [`TCP_MAX_PENDING`] at a time) and written
//!   back as they complete. The service closes its end once the guest side has closed (EOF)
//!   and every pending answer is written, or after [`TCP_IDLE`] without a query.
//!
//! The HTTP proxy ([`proxy`]) runs on the same runtime: the explicit proxy is the gateway's
//! port 3128 (`connect_tcp`, like DNS over TCP), and [`ServiceHub::proxy_hook`] is the
//! engine hook that hands transparently intercepted connections to it. Its configuration
//! ([`ServiceHub::proxy_settings`]) is shared and may change at run time.
//!
//! Dropping the hub closes the channel; the runtime then stops, closing every service socket.
//! (The proxy hook holds only a weak sender, so it never keeps the runtime alive.)

pub mod activity;
pub mod dhcp;
pub mod dhcp6;
pub mod dns;
pub mod metrics;
pub mod proxy;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::debug;

use crate::config::NetConfig;
use crate::guest::GuestKey;
use dns::{DnsRecords, DnsServer, QueryFrom, Transport};
use proxy::{PROXY_PORT, Proxy, ProxySettings};

/// The DNS port.
pub const DNS_PORT: u16 = 53;
/// A UDP DNS socketpair with no traffic for this long is closed.
pub const UDP_IDLE: Duration = Duration::from_secs(30);
/// A TCP DNS connection with no query for this long is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(120);
/// Queries answered at once on one UDP socketpair; more are dropped (the guest retries).
pub const UDP_MAX_PENDING: usize = 256;
/// Queries answered at once over every UDP socketpair; more are dropped (the guest retries).
pub const UDP_MAX_PENDING_ALL: usize = 128;
/// UDP DNS socketpairs at once. The engine keeps at most its own bound of gateway DNS flows
/// (engine/flow_policy.rs, 64); the rest is room for ends it closed that the runtime has not
/// yet seen close.
pub const MAX_DNS_UDP: usize = 96;
/// Queries answered at once on one TCP connection; reading pauses beyond that.
pub const TCP_MAX_PENDING: usize = 32;

enum Job {
    /// A guest's DNS over UDP: (socket, the guest's address, the guest it counts against).
    DnsUdp(OwnedFd, SocketAddr, GuestKey, Live),
    DnsTcp(OwnedFd, SocketAddr, GuestKey),
    /// A guest connection to the explicit proxy (port 3128).
    ProxyExplicit(OwnedFd, SocketAddr),
    /// An intercepted guest connection: (socket, original destination, guest).
    ProxyTransparent(OwnedFd, SocketAddr, SocketAddr),
}

/// A service that may take over a new guest TCP connection: given the destination and the
/// guest's address, it returns None to leave the connection alone, or the engine's end of a
/// stream socketpair (non-blocking) whose other end it serves, or an error the guest sees as
/// a refused or unreachable connect. The guest API inside the guest network and the
/// transparent HTTP proxy are such hooks. Addresses are of either family.
pub type TcpHook = Box<dyn FnMut(SocketAddr, SocketAddr) -> Option<io::Result<OwnedFd>>>;

/// The gateway's stream and datagram services, served on their own runtime thread.
/// The engine binds a guest flow to the gateway to one end of a socketpair and hands
/// the other end here, so the translator treats built-in services like any host socket.
pub struct ServiceHub {
    cfg: Arc<NetConfig>,
    records: Arc<DnsRecords>,
    proxy: ProxySettings,
    jobs: Option<mpsc::UnboundedSender<Job>>,
    /// UDP DNS socketpairs alive (see [`MAX_DNS_UDP`]), and whether the log said it is full.
    dns_udp_live: Arc<AtomicUsize>,
    told_dns_udp_full: AtomicBool,
    thread: Option<JoinHandle<()>>,
    metrics: Arc<metrics::ServiceMetrics>,
    activity: Arc<activity::Activity>,
}

impl ServiceHub {
    /// Start the service thread (call after any fork: this creates a thread).
    pub fn start(cfg: Arc<NetConfig>) -> io::Result<ServiceHub> {
        Self::start_with(cfg, |dns| dns)
    }

    /// `start` with a hook to adjust the DNS server (tests shorten its timeouts).
    pub fn start_with(cfg: Arc<NetConfig>, tune: impl FnOnce(DnsServer) -> DnsServer) -> io::Result<ServiceHub> {
        let records = Arc::new(DnsRecords::from_config(&cfg));
        let dns = Arc::new(tune(DnsServer::new(&cfg, records.clone())));
        let metrics = dns.metrics().clone();
        let activity = dns.activity().clone();
        let proxy = ProxySettings::default();
        let proxy_ctx = Arc::new(Proxy::new(proxy.clone(), cfg.clone(), dns.clone()));
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("usernet-services".into())
            .spawn(move || runtime.block_on(serve(rx, dns, proxy_ctx)))?;
        Ok(ServiceHub {
            cfg,
            records,
            proxy,
            jobs: Some(tx),
            thread: Some(thread),
            metrics,
            activity,
            dns_udp_live: Arc::new(AtomicUsize::new(0)),
            told_dns_udp_full: AtomicBool::new(false),
        })
    }

    /// Another handle on the same services, for another engine serving the same guest
    /// (`engine::shard`). The first hub ends the services when it goes, after waiting for
    /// every handle to go.
    pub fn handle(&self) -> ServiceHub {
        ServiceHub {
            cfg: self.cfg.clone(),
            records: self.records.clone(),
            proxy: self.proxy.clone(),
            jobs: self.jobs.clone(),
            dns_udp_live: self.dns_udp_live.clone(),
            told_dns_udp_full: AtomicBool::new(false),
            thread: None,
            metrics: self.metrics.clone(),
            activity: self.activity.clone(),
        }
    }

    /// The services' counters (DNS forwarding per upstream, the proxy), for `/metrics`.
    pub fn metrics(&self) -> Arc<metrics::ServiceMetrics> {
        self.metrics.clone()
    }

    /// The services' recent activity (DNS queries, proxy requests), for the dashboard.
    pub fn activity(&self) -> Arc<activity::Activity> {
        self.activity.clone()
    }

    /// The network this hub serves.
    pub fn config(&self) -> &Arc<NetConfig> {
        &self.cfg
    }

    /// The local DNS table, to add or remove records at run time.
    pub fn dns_records(&self) -> Arc<DnsRecords> {
        self.records.clone()
    }

    /// The proxy configuration (shared: setting it changes what new connections do).
    pub fn proxy_settings(&self) -> ProxySettings {
        self.proxy.clone()
    }

    /// The engine hook for transparent proxying (`engine.add_tcp_hook(hub.proxy_hook())`):
    /// it takes over guest TCP to the configured ports while an upstream proxy is set.
    pub fn proxy_hook(&self) -> TcpHook {
        let jobs = self.jobs.as_ref().map(|tx| tx.downgrade());
        proxy::hook(self.proxy.clone(), self.cfg.clone(), move |fd, dst, guest| {
            let Some(tx) = jobs.as_ref().and_then(|w| w.upgrade()) else {
                return false;
            };
            tx.send(Job::ProxyTransparent(fd, dst, guest)).is_ok()
        })
    }

    /// A guest opened TCP to the gateway's `port`: our (non-blocking, SOCK_STREAM) end of a
    /// socketpair whose other end the service serves, or None when nothing listens there.
    /// `who` is the guest its DNS queries count against (`--max-dns-queries-per-guest`).
    pub fn connect_tcp(&self, port: u16, guest: SocketAddr, who: GuestKey) -> Option<OwnedFd> {
        if port != DNS_PORT && port != PROXY_PORT {
            return None;
        }
        let (ours, theirs) = StdUnixStream::pair().ok()?;
        ours.set_nonblocking(true).ok()?;
        theirs.set_nonblocking(true).ok()?;
        let job = match port {
            PROXY_PORT => Job::ProxyExplicit(theirs.into(), guest),
            _ => Job::DnsTcp(theirs.into(), guest, who),
        };
        self.submit(job)?;
        Some(ours.into())
    }

    /// The same for UDP: a SOCK_SEQPACKET socketpair, one message per guest datagram (0
    /// bytes read means the service closed its end).
    pub fn connect_udp(&self, port: u16, guest: SocketAddr, who: GuestKey) -> Option<OwnedFd> {
        if port != DNS_PORT {
            return None;
        }
        if self.dns_udp_live.load(Ordering::Relaxed) >= MAX_DNS_UDP {
            if !self.told_dns_udp_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "{MAX_DNS_UDP} UDP DNS flows being served at once: further queries from new ports are \
                     refused until some end (said once)"
                );
            }
            return None;
        }
        let (ours, theirs) = seqpacket_pair().ok()?;
        self.submit(Job::DnsUdp(theirs, guest, who, Live::new(&self.dns_udp_live)))?;
        Some(ours)
    }

    fn submit(&self, job: Job) -> Option<()> {
        match self.jobs.as_ref()?.send(job) {
            Ok(()) => Some(()),
            Err(_) => {
                debug!("services: runtime thread is gone");
                None
            }
        }
    }
}

/// Gives a slot of [`UdpSlots`] back when dropped (the task that held it ended or was aborted).
struct SlotBack(Arc<UdpSlots>);

impl Drop for SlotBack {
    fn drop(&mut self) {
        self.0.free.add_permits(1);
    }
}

/// One of the UDP DNS socketpairs counted in [`MAX_DNS_UDP`], from `connect_udp` until its
/// service ends (or its job is dropped unserved).
struct Live(Arc<AtomicUsize>);

impl Live {
    fn new(count: &Arc<AtomicUsize>) -> Live {
        count.fetch_add(1, Ordering::Relaxed);
        Live(count.clone())
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A non-blocking, close-on-exec SOCK_SEQPACKET socketpair.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    let kind = libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
    // SAFETY: fds is valid for two ints; on success both are new descriptors we own.
    if unsafe { libc::socketpair(libc::AF_UNIX, kind, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The service's end of a UDP DNS socketpair (SOCK_SEQPACKET) on the runtime.
struct Packets(AsyncFd<OwnedFd>);

impl Packets {
    /// One message; Ok(0) once the engine closed its end.
    async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut ready = self.0.readable().await?;
            // SAFETY: recv(2) into a buffer valid for buf.len() bytes.
            let r = ready.try_io(|fd| {
                let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }

    /// One message.
    async fn send(&self, msg: &[u8]) -> io::Result<()> {
        loop {
            let mut ready = self.0.writable().await?;
            // SAFETY: send(2) from a buffer valid for msg.len() bytes.
            let r = ready.try_io(|fd| {
                let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), libc::MSG_NOSIGNAL) };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            });
            if let Ok(r) = r {
                return r;
            }
        }
    }
}

impl Drop for ServiceHub {
    fn drop(&mut self) {
        // Closing the channel ends `serve`, which stops the runtime and its tasks.
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The runtime's main task: start a service task for every socket handed over.
async fn serve(mut jobs: mpsc::UnboundedReceiver<Job>, dns: Arc<DnsServer>, proxy: Arc<Proxy>) {
    let udp_slots = Arc::new(UdpSlots { free: Semaphore::new(UDP_MAX_PENDING_ALL), told_full: AtomicBool::new(false) });
    while let Some(job) = jobs.recv().await {
        match job {
            // SAFETY: an OwnedFd is an open descriptor that stays open, and always the same
            // one, until the AsyncFd that owns it drops it.
            Job::DnsUdp(fd, guest, who, live) => match unsafe { AsyncFd::register(fd) } {
                Ok(fd) => {
                    let from = QueryFrom { addr: guest.ip(), guest: who };
                    tokio::spawn(serve_dns_udp(Packets(fd), dns.clone(), guest, from, live, udp_slots.clone()));
                }
                Err(e) => debug!("dns: udp socket for {guest}: {e}"),
            },
            Job::DnsTcp(fd, guest, who) => match UnixStream::from_std(fd.into()) {
                Ok(sock) => {
                    tokio::spawn(serve_dns_tcp(sock, dns.clone(), guest, QueryFrom { addr: guest.ip(), guest: who }));
                }
                Err(e) => debug!("dns: tcp socket for {guest}: {e}"),
            },
            Job::ProxyExplicit(fd, guest) => match UnixStream::from_std(fd.into()) {
                Ok(sock) => {
                    tokio::spawn(proxy::serve_explicit(proxy.clone(), sock, guest));
                }
                Err(e) => debug!("proxy: socket for {guest}: {e}"),
            },
            Job::ProxyTransparent(fd, dst, guest) => match UnixStream::from_std(fd.into()) {
                Ok(sock) => {
                    tokio::spawn(proxy::serve_transparent(proxy.clone(), sock, dst, guest));
                }
                Err(e) => debug!("proxy: socket for {guest} -> {dst}: {e}"),
            },
        }
    }
}

/// DNS over one SOCK_SEQPACKET socketpair: one query per message, one answer per message,
/// until the engine closes its end (then the pending queries are abandoned) or idleness.
/// The queries being answered over every UDP socketpair at once ([`UDP_MAX_PENDING_ALL`]).
struct UdpSlots {
    free: Semaphore,
    told_full: AtomicBool,
}

/// `slots` bounds the queries being answered over every socketpair at once; `live` counts
/// this socketpair until the service ends.
async fn serve_dns_udp(
    sock: Packets,
    dns: Arc<DnsServer>,
    guest: SocketAddr,
    from: QueryFrom,
    live: Live,
    slots: Arc<UdpSlots>,
) {
    let _live = live;
    let sock = Arc::new(sock);
    let mut pending = JoinSet::new();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = sock.recv(&mut buf) => match r {
                // The engine closed its end (an empty datagram, which is no query, reads
                // the same and ends the flow's service too).
                Ok(0) => break,
                Ok(n) => {
                    if pending.len() >= UDP_MAX_PENDING {
                        debug!("dns: {guest}: too many pending queries, dropping one");
                        continue;
                    }
                    let Ok(slot) = slots.free.try_acquire() else {
                        if !slots.told_full.swap(true, Ordering::Relaxed) {
                            tracing::warn!(
                                "{UDP_MAX_PENDING_ALL} UDP DNS queries being answered at once: \
                                 more are dropped until some are answered (said once)"
                            );
                        }
                        continue;
                    };
                    // The slot goes back when the task ends, answered or abandoned (also when
                    // it is aborted before it ever ran: `back` is dropped with it).
                    let back = SlotBack(slots.clone());
                    let query = buf[..n].to_vec();
                    let (sock, dns) = (sock.clone(), dns.clone());
                    slot.forget();
                    pending.spawn(async move {
                        let _back = back;
                        if let Some(answer) = dns.handle_from(Some(from), &query, Transport::Udp).await
                            && let Err(e) = sock.send(&answer).await
                        {
                            debug!("dns: {guest}: writing answer: {e}");
                        }
                    });
                }
                Err(e) => {
                    debug!("dns: {guest}: reading query: {e}");
                    break;
                }
            },
            Some(_) = pending.join_next(), if !pending.is_empty() => {}
            _ = tokio::time::sleep(UDP_IDLE), if pending.is_empty() => break,
        }
    }
    debug!("dns: {guest}: udp service closed");
}

/// DNS over one stream socketpair (RFC 7766 framing).
async fn serve_dns_tcp(sock: UnixStream, dns: Arc<DnsServer>, guest: SocketAddr, from: QueryFrom) {
    let (mut rd, mut wr) = sock.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_MAX_PENDING);
    let slots = Arc::new(Semaphore::new(TCP_MAX_PENDING));

    let reader = async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let query = match tokio::time::timeout(TCP_IDLE, read_frame(&mut rd)).await {
                Ok(Ok(Some(q))) => q,
                Ok(Ok(None)) => break, // the guest closed its side
                Ok(Err(e)) => {
                    debug!("dns: {guest}: tcp read: {e}");
                    break;
                }
                Err(_) => break, // idle
            };
            let (tx, dns) = (tx.clone(), dns.clone());
            tokio::spawn(async move {
                if let Some(answer) = dns.handle_from(Some(from), &query, Transport::Tcp).await {
                    let _ = tx.send(answer).await;
                }
                drop(slot);
            });
        }
        // `tx` drops here; the writer ends once every pending answer is sent.
    };

    let writer = async move {
        while let Some(answer) = rx.recv().await {
            let Ok(len) = u16::try_from(answer.len()) else {
                continue;
            };
            let mut frame = Vec::with_capacity(answer.len() + 2);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&answer);
            if let Err(e) = wr.write_all(&frame).await {
                debug!("dns: {guest}: tcp write: {e}");
                break;
            }
        }
    };

    tokio::join!(reader, writer);
    debug!("dns: {guest}: tcp service closed");
}

/// One length-prefixed DNS message; None at a clean end of stream.
async fn read_frame(rd: &mut OwnedReadHalf) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    rd.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, UdpSocket};
    // The engine's end of a UDP DNS socketpair is SOCK_SEQPACKET; std's UnixDatagram makes
    // the same send(2) and recv(2) calls on it.
    use std::os::unix::net::UnixDatagram as StdUnixDatagram;

    const GUEST: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(Ipv4Addr::new(192, 168, 65, 2), 40000));
    const WHO: GuestKey = GuestKey::Mac([0x52, 0x54, 0, 0, 0, 2]);

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    fn first_a(bytes: &[u8]) -> Option<Ipv4Addr> {
        let m = Message::from_vec(bytes).unwrap();
        m.answers.iter().find_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
    }

    /// A std-thread upstream on loopback answering `count` queries with 198.51.100.9.
    fn upstream(count: usize) -> std::net::SocketAddr {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            for _ in 0..count {
                let Ok((n, from)) = sock.recv_from(&mut buf) else {
                    return;
                };
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::response(q.id, q.op_code);
                r.add_queries(q.queries.clone());
                r.add_answer(hickory_proto::rr::Record::from_rdata(
                    q.queries[0].name().clone(),
                    30,
                    RData::A(hickory_proto::rr::rdata::A(Ipv4Addr::new(198, 51, 100, 9))),
                ));
                let _ = sock.send_to(&r.to_vec().unwrap(), from);
            }
        });
        addr
    }

    fn hub(upstreams: Vec<std::net::SocketAddr>) -> ServiceHub {
        let cfg = NetConfig {
            host_dns: crate::config::HostDns::new(crate::config::Upstreams::command_line(upstreams)),
            ..NetConfig::default()
        };
        ServiceHub::start_with(Arc::new(cfg), |d| d.with_timeouts(Duration::from_millis(300), 1)).unwrap()
    }

    #[test]
    fn other_ports_have_no_service() {
        let h = hub(vec![]);
        assert!(h.connect_udp(54, GUEST, WHO).is_none());
        assert!(h.connect_tcp(80, GUEST, WHO).is_none());
    }

    #[test]
    fn udp_end_to_end() {
        let h = hub(vec![upstream(1)]);
        h.dns_records().add("added.test", Ipv4Addr::new(10, 9, 8, 7)).unwrap();
        let fd = h.connect_udp(53, GUEST, WHO).unwrap();
        let s = StdUnixDatagram::from(fd);
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 65536];

        s.send(&query(1, "host.docker.internal")).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(first_a(&buf[..n]), Some(Ipv4Addr::new(192, 168, 65, 254)));

        s.send(&query(2, "added.test")).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(first_a(&buf[..n]), Some(Ipv4Addr::new(10, 9, 8, 7)));

        s.send(&query(3, "far.example")).unwrap();
        let n = s.recv(&mut buf).unwrap();
        assert_eq!(u16::from_be_bytes([buf[0], buf[1]]), 3);
        assert_eq!(first_a(&buf[..n]), Some(Ipv4Addr::new(198, 51, 100, 9)));
    }

    /// When the engine closes its end of a UDP DNS socketpair (the flow ended), the service
    /// closes its own at once, with whatever it had pending: nothing lingers for UDP_IDLE.
    /// At most MAX_DNS_UDP socketpairs are served at once; past that `connect_udp` refuses.
    #[test]
    fn udp_service_ends_with_the_engines_end_and_is_bounded() {
        // A silent upstream: every query stays pending (300 ms, see `hub`) with a socket.
        let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
        let h = hub(vec![silent.local_addr().unwrap()]);
        // The service's own count of the socketpairs it serves (its end of each is held for
        // exactly as long): not the process's descriptors, which the tests running beside
        // this one open and close too.
        let live = || h.dns_udp_live.load(Ordering::Relaxed);
        let ends: Vec<StdUnixDatagram> = (0..MAX_DNS_UDP as u16)
            .map(|i| {
                let s = StdUnixDatagram::from(h.connect_udp(53, GUEST, WHO).unwrap());
                s.send(&query(i, "far.example")).unwrap();
                s
            })
            .collect();
        assert!(h.connect_udp(53, GUEST, WHO).is_none(), "past MAX_DNS_UDP, refused");
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(live(), MAX_DNS_UDP, "every socketpair is served");
        drop(ends);
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        while live() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(live(), 0, "the service kept its ends after the engine closed its own");
        assert!(h.connect_udp(53, GUEST, WHO).is_some(), "room again once they ended");
    }

    #[test]
    fn tcp_end_to_end_several_queries() {
        let h = hub(vec![upstream(1)]);
        let fd = h.connect_tcp(53, GUEST, WHO).unwrap();
        let mut s = StdUnixStream::from(fd);
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Pipeline three queries in one write.
        let mut out = Vec::new();
        for (id, name) in [(10, "host.docker.internal"), (11, "far.example"), (12, "gateway.docker.internal")] {
            let q = query(id, name);
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(&q);
        }
        s.write_all(&out).unwrap();
        let mut answers = std::collections::BTreeMap::new();
        for _ in 0..3 {
            let mut len = [0u8; 2];
            s.read_exact(&mut len).unwrap();
            let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
            s.read_exact(&mut msg).unwrap();
            answers.insert(u16::from_be_bytes([msg[0], msg[1]]), first_a(&msg));
        }
        assert_eq!(answers[&10], Some(Ipv4Addr::new(192, 168, 65, 254)));
        assert_eq!(answers[&11], Some(Ipv4Addr::new(198, 51, 100, 9)));
        assert_eq!(answers[&12], Some(Ipv4Addr::new(192, 168, 65, 1)));
        // Half-close: the service finishes and closes its end (EOF here).
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        assert_eq!(s.read_to_end(&mut rest).unwrap(), 0);
    }

    #[test]
    fn servfail_without_upstreams_and_clean_drop() {
        let h = hub(vec![]);
        let s = StdUnixDatagram::from(h.connect_udp(53, GUEST, WHO).unwrap());
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.send(&query(5, "nowhere.example")).unwrap();
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        assert!(n >= 12);
        assert_eq!(buf[3] & 0x0f, 2);
        // Dropping the hub stops the runtime and closes the service's end.
        drop(h);
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(s.send(&query(6, "x.example")).is_err());
    }
}
