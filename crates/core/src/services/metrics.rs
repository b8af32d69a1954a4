//! Counters of the gateway services for `/metrics`: DNS forwarding per upstream server, and
//! the HTTP proxy's requests by outcome.
//!
//! The services run on their own thread (see the module comment of `services`), and the
//! control API reads these counters from another one, so they are shared: atomics for the
//! fixed counters, and a map under a mutex for the per-upstream ones, whose keys (the
//! upstream servers) change while usernet runs (`dns_watch` follows /etc/resolv.conf). The
//! lock is taken once per event of a forwarded query (sent, answered, failed), which is
//! negligible next to the query's own system calls; the engine's data path never takes it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why an upstream server did not give a usable answer to one query.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum UpstreamFailure {
    /// No answer within its wait.
    Timeout,
    /// A socket error (ICMP port unreachable on loopback, no route, ...).
    Unreachable,
    /// It answered SERVFAIL.
    Servfail,
    /// It answered REFUSED.
    Refused,
}

impl UpstreamFailure {
    pub const ALL: [UpstreamFailure; 4] =
        [UpstreamFailure::Timeout, UpstreamFailure::Unreachable, UpstreamFailure::Servfail, UpstreamFailure::Refused];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamFailure::Timeout => "timeout",
            UpstreamFailure::Unreachable => "unreachable",
            UpstreamFailure::Servfail => "servfail",
            UpstreamFailure::Refused => "refused",
        }
    }
}

/// What one upstream server was asked and answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpstreamCounters {
    /// Queries sent to it (each retry of a round counts; a TCP retry after TC counts).
    pub queries: u64,
    /// Answers from it that went to the guest (anything but SERVFAIL and REFUSED).
    pub answers: u64,
    /// Failures, in the order of [`UpstreamFailure::ALL`].
    pub failures: [u64; UpstreamFailure::ALL.len()],
}

/// How a request to the HTTP proxy ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyOutcome {
    /// Forwarded (or tunnelled) and answered by the other side, whatever its status.
    Forwarded,
    /// Refused by the proxy itself (a bad request: 400).
    BadRequest,
    /// The destination or the upstream proxy could not be reached, or refused the tunnel.
    UpstreamError,
    /// The egress policy denied the destination (403).
    Denied,
}

impl ProxyOutcome {
    pub const ALL: [ProxyOutcome; 4] =
        [ProxyOutcome::Forwarded, ProxyOutcome::BadRequest, ProxyOutcome::UpstreamError, ProxyOutcome::Denied];

    /// The `outcome` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyOutcome::Forwarded => "forwarded",
            ProxyOutcome::BadRequest => "bad_request",
            ProxyOutcome::UpstreamError => "upstream_error",
            ProxyOutcome::Denied => "denied",
        }
    }
}

/// A bound of the services that a guest reached (`usernet_limit_reached_total`'s `limit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceLimit {
    /// `--max-dns-queries-per-guest`: a query was not forwarded.
    DnsQueriesPerGuest,
    /// `--max-proxy-connections`: a connection to the proxy was refused.
    ProxyConnections,
    /// `--proxy-header-timeout`: a request's header did not come in time.
    ProxyHeaderTimeout,
    /// `--proxy-idle-timeout`: a proxied connection carried nothing for that long.
    ProxyIdleTimeout,
}

impl ServiceLimit {
    pub const ALL: [ServiceLimit; 4] = [
        ServiceLimit::DnsQueriesPerGuest,
        ServiceLimit::ProxyConnections,
        ServiceLimit::ProxyHeaderTimeout,
        ServiceLimit::ProxyIdleTimeout,
    ];

    /// The `limit` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceLimit::DnsQueriesPerGuest => "dns_queries_per_guest",
            ServiceLimit::ProxyConnections => "proxy_connections",
            ServiceLimit::ProxyHeaderTimeout => "proxy_header_timeout",
            ServiceLimit::ProxyIdleTimeout => "proxy_idle_timeout",
        }
    }
}

/// The services' shared counters.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Guest DNS queries (UDP and TCP) that the gateway received.
    pub dns_queries: AtomicU64,
    /// Of those, the ones answered from the gateway's own table or the host's /etc/hosts.
    pub dns_local: AtomicU64,
    upstreams: Mutex<BTreeMap<SocketAddr, UpstreamCounters>>,
    proxy: [AtomicU64; ProxyOutcome::ALL.len()],
    limits: [AtomicU64; ServiceLimit::ALL.len()],
    /// When each limit was last logged, and its count then (log lines are rate-limited).
    limit_logged: Mutex<[Option<(std::time::Instant, u64)>; ServiceLimit::ALL.len()]>,
}

/// A copy of [`ServiceMetrics`], for one scrape.
#[derive(Clone, Debug, Default)]
pub struct ServicesSample {
    pub dns_queries: u64,
    pub dns_local: u64,
    pub upstreams: Vec<(SocketAddr, UpstreamCounters)>,
    pub proxy: Vec<(ProxyOutcome, u64)>,
    pub limits: Vec<(ServiceLimit, u64)>,
}

impl ServiceMetrics {
    fn upstream(&self, server: SocketAddr, f: impl FnOnce(&mut UpstreamCounters)) {
        // A poisoned lock only means a panic elsewhere while counting: the counts stand.
        let mut map = self.upstreams.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry(server).or_default());
    }

    pub fn upstream_query(&self, server: SocketAddr) {
        self.upstream(server, |c| c.queries += 1);
    }

    pub fn upstream_answer(&self, server: SocketAddr) {
        self.upstream(server, |c| c.answers += 1);
    }

    pub fn upstream_failure(&self, server: SocketAddr, why: UpstreamFailure) {
        self.upstream(server, |c| c.failures[why as usize] += 1);
    }

    /// Counts one reach of `limit` and logs `what` (the first time, then at most once per
    /// `config::LIMIT_LOG_EVERY`, with the count since).
    pub fn limit_reached(&self, limit: ServiceLimit, what: impl FnOnce() -> String) {
        let i = limit as usize;
        let n = self.limits[i].fetch_add(1, Ordering::Relaxed) + 1;
        let now = std::time::Instant::now();
        let mut logged = self.limit_logged.lock().unwrap_or_else(|e| e.into_inner());
        match logged[i] {
            Some((at, _)) if now.saturating_duration_since(at) < crate::config::LIMIT_LOG_EVERY => {}
            last => {
                let times = n - last.map_or(0, |(_, c)| c);
                logged[i] = Some((now, n));
                drop(logged);
                tracing::warn!(limit = limit.as_str(), times, "limit reached: {}", what());
            }
        }
    }

    pub fn proxy_request(&self, outcome: ProxyOutcome) {
        self.proxy[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the counters; `current` (the upstream servers in use) are listed even
    /// before their first query, with zeros, so that their series exist from the start.
    pub fn sample(&self, current: &[SocketAddr]) -> ServicesSample {
        let mut map = self.upstreams.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for server in current {
            map.entry(*server).or_default();
        }
        let upstreams = map.into_iter().collect();
        ServicesSample {
            dns_queries: self.dns_queries.load(Ordering::Relaxed),
            dns_local: self.dns_local.load(Ordering::Relaxed),
            upstreams,
            proxy: ProxyOutcome::ALL.iter().map(|o| (*o, self.proxy[*o as usize].load(Ordering::Relaxed))).collect(),
            limits: ServiceLimit::ALL.iter().map(|l| (*l, self.limits[*l as usize].load(Ordering::Relaxed))).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_upstream() {
        let m = ServiceMetrics::default();
        let a: SocketAddr = "127.0.0.1:53".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:5353".parse().unwrap();
        m.upstream_query(a);
        m.upstream_query(a);
        m.upstream_answer(a);
        m.upstream_query(b);
        m.upstream_failure(b, UpstreamFailure::Timeout);
        m.proxy_request(ProxyOutcome::Forwarded);
        let c: SocketAddr = "127.0.0.3:53".parse().unwrap();
        let s = m.sample(&[a, c]);
        assert_eq!(s.upstreams.len(), 3);
        assert_eq!(s.upstreams[2], (c, UpstreamCounters::default()));
        assert_eq!(s.upstreams[0], (a, UpstreamCounters { queries: 2, answers: 1, failures: [0; 4] }));
        assert_eq!(s.upstreams[1], (b, UpstreamCounters { queries: 1, answers: 0, failures: [1, 0, 0, 0] }));
        assert_eq!(s.proxy[0], (ProxyOutcome::Forwarded, 1));
    }
}
