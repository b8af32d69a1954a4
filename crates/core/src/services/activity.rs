//! What the gateway services did lately, for the dashboard and the control API's
//! `/v1/log/dns` and `/v1/log/proxy`: the last [`LOG_CAPACITY`] DNS queries and proxy
//! requests.
//!
//! Each log is a ring under a mutex, taken once per query or request after it was answered
//! (never on the engine's data path: the services run on their own thread, see the module
//! comment of `services`), and by the control API when a client reads it. The oldest
//! entry goes when a new one comes, so a guest that floods the gateway costs at most the
//! ring's bound; `total` keeps counting, so a reader can tell how many went by.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Entries kept by each log.
pub const LOG_CAPACITY: usize = 200;
/// Longest text kept in one field of an entry (names, hosts, answers); longer is cut.
pub const MAX_FIELD: usize = 256;

/// A bounded log: the last `capacity` entries, oldest first.
#[derive(Debug)]
pub struct Ring<T> {
    entries: Mutex<VecDeque<T>>,
    capacity: usize,
    total: AtomicU64,
}

impl<T: Clone> Ring<T> {
    pub fn new(capacity: usize) -> Ring<T> {
        Ring { entries: Mutex::new(VecDeque::with_capacity(capacity.min(64))), capacity, total: AtomicU64::new(0) }
    }

    /// Adds an entry, dropping the oldest when full.
    pub fn push(&self, entry: T) {
        if self.capacity == 0 {
            return;
        }
        // A poisoned lock only means a panic elsewhere while logging: the entries stand.
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
        self.total.fetch_add(1, Ordering::Relaxed);
    }

    /// A copy of the entries, oldest first.
    pub fn snapshot(&self) -> Vec<T> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    /// Entries pushed since the start (kept or not).
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// One DNS query to the gateway and its answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsLogEntry {
    /// When it was answered, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `udp` or `tcp`.
    pub transport: &'static str,
    /// The name asked (without the final dot), `?` when the question did not parse.
    pub name: String,
    /// The record type asked (`A`, `AAAA`, `PTR`, ...).
    pub qtype: String,
    /// The answer's RCODE as dig names it (`NOERROR`, `NXDOMAIN`, `SERVFAIL`, ...), or
    /// `dropped` when the guest got no answer.
    pub rcode: String,
    /// The answer's records, as text (`192.168.65.254`, `CNAME a.example.`), at most 8.
    pub answers: Vec<String>,
    /// Who answered: `gateway` (its own table or the host's /etc/hosts), the upstream
    /// server's address, or None when no server answered usably.
    pub upstream: Option<String>,
    /// How long answering took, in milliseconds.
    pub duration_ms: u64,
}

/// One request to the HTTP proxy (or one intercepted TLS connection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxyLogEntry {
    /// When it was answered, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The guest's address and port.
    pub guest: String,
    /// `explicit` (the gateway's port 3128), `transparent` (intercepted HTTP) or `tls`
    /// (intercepted TLS, relayed through CONNECT or directly).
    pub mode: &'static str,
    /// The request's method (`GET`, `CONNECT`); `TLS` for an intercepted TLS connection.
    pub method: String,
    /// The destination: `host[:port]` as the request named it (the TLS SNI name).
    pub host: String,
    /// The HTTP status the guest got (None for a TLS connection).
    pub status: Option<u16>,
    /// `forwarded`, `bad_request` or `upstream_error` (as `/metrics` counts them).
    pub outcome: &'static str,
    /// Where it went: `direct ADDR` or `upstream HOST:PORT` for HTTP and CONNECT, `direct`
    /// or the upstream proxy's `HOST:PORT` for intercepted TLS; empty when it went nowhere.
    pub via: String,
}

/// The services' logs, shared by the DNS server, the proxy and the control API.
#[derive(Debug)]
pub struct Activity {
    pub dns: Ring<DnsLogEntry>,
    pub proxy: Ring<ProxyLogEntry>,
}

impl Default for Activity {
    fn default() -> Activity {
        Activity { dns: Ring::new(LOG_CAPACITY), proxy: Ring::new(LOG_CAPACITY) }
    }
}

/// Now, in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// `s` cut to [`MAX_FIELD`] bytes (at a character boundary).
pub fn clip(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_string();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_last_entries() {
        let ring = Ring::new(3);
        for i in 0..10u32 {
            ring.push(i);
        }
        assert_eq!(ring.snapshot(), vec![7, 8, 9]);
        assert_eq!(ring.total(), 10);
        let empty: Ring<u32> = Ring::new(0);
        empty.push(1);
        assert!(empty.snapshot().is_empty());
    }

    #[test]
    fn logs_are_bounded() {
        let a = Activity::default();
        for i in 0..(LOG_CAPACITY as u64 * 3) {
            a.dns.push(DnsLogEntry {
                time_ms: i,
                transport: "udp",
                name: clip(&"x".repeat(10_000)),
                qtype: "A".into(),
                rcode: "NOERROR".into(),
                answers: vec![],
                upstream: None,
                duration_ms: 0,
            });
        }
        let entries = a.dns.snapshot();
        assert_eq!(entries.len(), LOG_CAPACITY);
        assert_eq!(entries[0].time_ms, LOG_CAPACITY as u64 * 2);
        assert!(entries[0].name.len() <= MAX_FIELD + '…'.len_utf8());
        assert_eq!(a.dns.total(), LOG_CAPACITY as u64 * 3);
        assert!(a.proxy.snapshot().is_empty());
    }

    #[test]
    fn clip_cuts_at_a_character() {
        let s = "é".repeat(MAX_FIELD);
        let c = clip(&s);
        assert!(c.ends_with('…'));
        assert!(c.len() <= MAX_FIELD + 3);
        assert_eq!(clip("short"), "short");
    }
}
