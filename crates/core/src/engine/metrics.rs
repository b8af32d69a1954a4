//! The engine's own counters for `/metrics` (crates/host/src/api/metrics.rs writes them out):
//! plain integers, because only the engine's thread touches them. The control API gets a
//! copy of them ([`super::control::Command::Metrics`]) between two rounds of the loop.
//!
//! What counts where: frames and bytes per link at the link reads (`event_loop`) and the
//! link sends (`switch`); frames dropped, by reason, in `dispatch` and `switch`; failed
//! connects, by reason, where the guest is told of them (`flows::tcp::refuse`); rounds of
//! the loop and the time they took in `event_loop`; connections accepted on published ports
//! in `listeners`.

use serde::Serialize;

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// From a guest: too short or inconsistent to parse (Ethernet, IPv4 or IPv6 header).
    Malformed,
    /// From a guest: neither ARP, IPv4 nor IPv6 (IPv6 with `--ipv4-only`, ARP and IPv4
    /// with `--ipv6-only`).
    Ethertype,
    /// From a guest: an IP fragment that made no whole datagram (overlapping, of a datagram
    /// past 64 KiB or not whole within its time, or evicted: reassembly.rs).
    Fragment,
    /// From a guest: an IP protocol other than TCP, UDP, ICMP and ICMPv6.
    IpProtocol,
    /// From a guest: an ICMPv6 message that is invalid (checksum, length, a neighbour
    /// discovery message with a hop limit below 255) or not for a guest to send (a router
    /// advertisement, a redirect).
    Icmpv6,
    /// From a guest: a source MAC or address that is not its link's guest's (`serve`).
    Spoofed,
    /// From a guest: a frame for another engine (`--engine-threads`, see shard.rs) whose
    /// queue of handed frames was full (the guest's TCP retransmits, as after a full TAP
    /// queue).
    Handover,
    /// To a guest: its MAC is not known yet and the frame could not wait for the ARP reply
    /// (an offloaded frame, a full queue of held frames, or no reply within 1 s; see switch.rs).
    NoNeighbour,
    /// To a guest: the link would not take the frame (full, or an error).
    SendError,
}

impl DropReason {
    pub const ALL: [DropReason; 9] = [
        DropReason::Malformed,
        DropReason::Ethertype,
        DropReason::Fragment,
        DropReason::IpProtocol,
        DropReason::Icmpv6,
        DropReason::Spoofed,
        DropReason::Handover,
        DropReason::NoNeighbour,
        DropReason::SendError,
    ];

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Ethertype => "ethertype",
            DropReason::Fragment => "fragment",
            DropReason::IpProtocol => "ip_protocol",
            DropReason::Icmpv6 => "icmpv6",
            DropReason::Spoofed => "spoofed",
            DropReason::Handover => "handover",
            DropReason::NoNeighbour => "no_neighbour",
            DropReason::SendError => "send_error",
        }
    }

    /// The `direction` label: rx for frames from a guest, tx for frames to one.
    pub fn direction(self) -> &'static str {
        match self {
            DropReason::NoNeighbour | DropReason::SendError => "tx",
            _ => "rx",
        }
    }
}

/// Why a guest's connect failed, as the guest was told (RST or ICMP unreachable).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectFailure {
    Refused,
    Unreachable,
    Timeout,
    /// The egress policy denied it (crate::policy; EACCES inside the engine).
    Denied,
    Other,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Refused,
        ConnectFailure::Unreachable,
        ConnectFailure::Timeout,
        ConnectFailure::Denied,
        ConnectFailure::Other,
    ];

    /// The failure an errno of `connect(2)` (or `SO_ERROR`) stands for.
    pub fn from_errno(err: i32) -> ConnectFailure {
        match err {
            libc::ECONNREFUSED => ConnectFailure::Refused,
            libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EADDRNOTAVAIL | libc::ENETDOWN | libc::EHOSTDOWN => {
                ConnectFailure::Unreachable
            }
            libc::ETIMEDOUT => ConnectFailure::Timeout,
            libc::EACCES => ConnectFailure::Denied,
            _ => ConnectFailure::Other,
        }
    }

    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Denied => "denied",
            ConnectFailure::Other => "other",
        }
    }
}

/// A bound that a guest reached (see `NetConfig::limits`): `usernet_limit_reached_total`'s
/// `limit` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `--max-tcp-flows`: a new guest SYN got a RST.
    TcpFlows,
    /// `--max-tcp-flows-per-guest`: a new SYN from that guest address got a RST.
    TcpFlowsPerGuest,
    /// `--max-pending-connects`: the oldest connect in progress was abandoned.
    PendingConnects,
    /// `--max-udp-flows`: the least recently used UDP flow was closed.
    UdpFlows,
    /// ICMP echo flows: the least recently used was closed.
    IcmpFlows,
    /// UDP flows to the gateway's DNS: the least recently used was closed.
    GatewayDns,
    /// `--max-buffered`: guest data was not taken (not acknowledged) for want of room.
    Buffered,
    /// `--tcp-stall-timeout`: a flow whose host peer took nothing for that long was reset.
    TcpStalled,
    /// `--fd-reserve`: a new guest flow was refused to keep descriptors for the rest, or a
    /// published port's loopback client went through the guest link, not spliced.
    Descriptors,
    /// `--max-dhcp-offers`: the oldest DHCP offer was forgotten.
    DhcpOffers,
    /// The process's open-file limit (RLIMIT_NOFILE): a published port's connections wait in
    /// its backlog, and a loopback client's goes through the guest link, not spliced.
    OpenFiles,
    /// Datagrams being reassembled from IP fragments (`reassembly::MAX_DATAGRAMS`,
    /// `MAX_BYTES`): the oldest was dropped.
    Fragments,
}

impl Limit {
    pub const ALL: [Limit; 12] = [
        Limit::TcpFlows,
        Limit::TcpFlowsPerGuest,
        Limit::PendingConnects,
        Limit::UdpFlows,
        Limit::IcmpFlows,
        Limit::GatewayDns,
        Limit::Buffered,
        Limit::TcpStalled,
        Limit::Descriptors,
        Limit::DhcpOffers,
        Limit::OpenFiles,
        Limit::Fragments,
    ];

    /// The `limit` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::TcpFlows => "tcp_flows",
            Limit::TcpFlowsPerGuest => "tcp_flows_per_guest",
            Limit::PendingConnects => "pending_connects",
            Limit::UdpFlows => "udp_flows",
            Limit::IcmpFlows => "icmp_flows",
            Limit::GatewayDns => "gateway_dns_flows",
            Limit::Buffered => "buffered_bytes",
            Limit::TcpStalled => "tcp_stalled",
            Limit::Descriptors => "fd_reserve",
            Limit::DhcpOffers => "dhcp_offers",
            Limit::OpenFiles => "open_files",
            Limit::Fragments => "reassembly",
        }
    }
}

pub use crate::config::LIMIT_LOG_EVERY;

/// Why guest-bound TCP data was sent again (`usernet_tcp_resent_bytes_total`'s `cause`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resend {
    /// The guest's SACK blocks showed data missing below data that arrived: only the
    /// missing ranges went again.
    Sack,
    /// Three duplicate ACKs without SACK blocks: everything from the first unacknowledged
    /// byte went again.
    DupAcks,
    /// The retransmission timer (or a probe of a shut window): everything from the first
    /// unacknowledged byte went again.
    Timeout,
    /// A tail-loss probe: the last byte sent, when the guest acknowledged nothing for a few
    /// round trips (its answer's SACK blocks then show what is missing); and, for a guest
    /// without SACK, everything from the byte its answer asked for.
    Probe,
}

impl Resend {
    pub const ALL: [Resend; 4] = [Resend::Sack, Resend::DupAcks, Resend::Timeout, Resend::Probe];

    /// The `cause` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Resend::Sack => "sack",
            Resend::DupAcks => "dup_acks",
            Resend::Timeout => "timeout",
            Resend::Probe => "probe",
        }
    }
}

/// Engine-wide event counters (the per-link ones are in each link's slot).
#[derive(Clone, Copy, Debug, Default)]
pub struct Counters {
    drops: [u64; DropReason::ALL.len()],
    connect_failures: [u64; ConnectFailure::ALL.len()],
    limits: [u64; Limit::ALL.len()],
    /// Guest-bound TCP bytes sent again, by cause.
    resent: [u64; Resend::ALL.len()],
    /// When each limit was last logged, and its count then.
    limit_logged: [Option<(std::time::Instant, u64)>; Limit::ALL.len()],
}

impl Counters {
    #[inline]
    pub fn dropped(&mut self, why: DropReason) {
        self.drops[why as usize] += 1;
    }

    #[inline]
    pub fn dropped_n(&mut self, why: DropReason, n: u64) {
        self.drops[why as usize] += n;
    }

    #[inline]
    pub fn connect_failed(&mut self, err: i32) {
        self.connect_failures[ConnectFailure::from_errno(err) as usize] += 1;
    }

    #[inline]
    pub fn resent(&mut self, cause: Resend, bytes: usize) {
        self.resent[cause as usize] += bytes as u64;
    }

    pub fn resent_bytes(&self) -> impl Iterator<Item = (Resend, u64)> + '_ {
        Resend::ALL.iter().map(|c| (*c, self.resent[*c as usize]))
    }

    /// Frames dropped for `why` so far.
    pub fn dropped_count(&self, why: DropReason) -> u64 {
        self.drops[why as usize]
    }

    pub fn drops(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops[*r as usize]))
    }

    /// Counts one reach of `limit`; Some(times reached since the last log line) when a log
    /// line is due (the first time, then at most once per [`LIMIT_LOG_EVERY`]).
    pub fn limit_reached(&mut self, limit: Limit, now: std::time::Instant) -> Option<u64> {
        let i = limit as usize;
        self.limits[i] += 1;
        match self.limit_logged[i] {
            Some((at, _)) if now.saturating_duration_since(at) < LIMIT_LOG_EVERY => None,
            last => {
                let since = self.limits[i] - last.map_or(0, |(_, n)| n);
                self.limit_logged[i] = Some((now, self.limits[i]));
                Some(since)
            }
        }
    }

    pub fn limits(&self) -> impl Iterator<Item = (Limit, u64)> + '_ {
        Limit::ALL.iter().map(|l| (*l, self.limits[*l as usize]))
    }

    pub fn connect_failures(&self) -> impl Iterator<Item = (ConnectFailure, u64)> + '_ {
        ConnectFailure::ALL.iter().map(|r| (*r, self.connect_failures[*r as usize]))
    }

    /// Two engines' counters together (see `EngineMetrics::merge`).
    pub fn merge(&self, o: &Counters) -> Counters {
        let mut sum = *self;
        for (a, b) in sum.drops.iter_mut().zip(o.drops) {
            *a += b;
        }
        for (a, b) in sum.connect_failures.iter_mut().zip(o.connect_failures) {
            *a += b;
        }
        for (a, b) in sum.limits.iter_mut().zip(o.limits) {
            *a += b;
        }
        for (a, b) in sum.resent.iter_mut().zip(o.resent) {
            *a += b;
        }
        sum
    }
}

/// What one guest link carried.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LinkCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
}

/// The event loop's rounds and the time spent in them (not waiting).
#[derive(Clone, Copy, Debug, Default)]
pub struct LoopCounters {
    pub iterations: u64,
    pub busy_nanos: u64,
}

/// One link, as `/metrics` shows it.
#[derive(Clone, Debug)]
pub struct LinkSample {
    /// Its index in the switch (what the engine's log and tokens call it).
    pub index: usize,
    /// What it is (`tap usernet0`, `qemu unix:/path`).
    pub name: String,
    pub counters: LinkCounters,
    /// The guests behind it (MAC and addresses, as the switch learnt them).
    pub guests: Vec<(usernet_wire::Mac, Vec<std::net::IpAddr>)>,
}

/// One published port, as `/metrics` shows it.
#[derive(Clone, Debug)]
pub struct ListenerSample {
    /// The host address and port it listens on.
    pub host: std::net::SocketAddr,
    pub proto: crate::ports::Proto,
    /// Where its connections go in the guest network.
    pub guest: std::net::SocketAddr,
    /// TCP connections accepted on it.
    pub accepted: u64,
}

/// The state names of [`EngineMetrics::flows`], with protocols: every pair is always
/// reported (zero when no flow is in it), so that a series does not come and go.
pub const FLOW_STATES: [(&str, &str); 7] = [
    ("tcp", "connecting"),
    ("tcp", "syn_sent"),
    ("tcp", "established"),
    ("tcp", "closing"),
    ("tcp", "spliced"),
    ("udp", "open"),
    ("icmp", "open"),
];

/// Everything the engine counts, copied out for `/metrics`.
#[derive(Clone, Debug, Default)]
pub struct EngineMetrics {
    pub links: Vec<LinkSample>,
    pub counters: Counters,
    /// Flows now, by (protocol, state), in the order of [`FLOW_STATES`].
    pub flows: Vec<((&'static str, &'static str), u64)>,
    pub listeners: Vec<ListenerSample>,
    pub loop_counters: LoopCounters,
    /// The gateway services' counters (DNS forwarding, the proxy), when the engine has them.
    pub services: Option<crate::services::metrics::ServicesSample>,
}

impl EngineMetrics {
    /// The metrics of two engines serving one guest (`engine::shard`), together: the
    /// counters of links with the same index (queues of one TAP device) add up, as do the
    /// flows, the drops and the loop's rounds and busy time; published ports and the
    /// services are engine 0's.
    pub fn merge(mut self, o: EngineMetrics) -> EngineMetrics {
        for link in o.links {
            match self.links.iter_mut().find(|l| l.index == link.index) {
                Some(l) => {
                    l.counters.rx_frames += link.counters.rx_frames;
                    l.counters.rx_bytes += link.counters.rx_bytes;
                    l.counters.tx_frames += link.counters.tx_frames;
                    l.counters.tx_bytes += link.counters.tx_bytes;
                }
                None => self.links.push(link),
            }
        }
        self.counters = self.counters.merge(&o.counters);
        for (key, n) in o.flows {
            match self.flows.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 += n,
                None => self.flows.push((key, n)),
            }
        }
        self.listeners.extend(o.listeners);
        self.loop_counters.iterations += o.loop_counters.iterations;
        self.loop_counters.busy_nanos += o.loop_counters.busy_nanos;
        self.services = self.services.or(o.services);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn errno_to_reason() {
        assert_eq!(ConnectFailure::from_errno(libc::ECONNREFUSED), ConnectFailure::Refused);
        assert_eq!(ConnectFailure::from_errno(libc::EHOSTUNREACH), ConnectFailure::Unreachable);
        assert_eq!(ConnectFailure::from_errno(libc::ENETUNREACH), ConnectFailure::Unreachable);
        assert_eq!(ConnectFailure::from_errno(libc::ETIMEDOUT), ConnectFailure::Timeout);
        assert_eq!(ConnectFailure::from_errno(libc::EPERM), ConnectFailure::Other);
        let mut c = Counters::default();
        c.connect_failed(libc::ECONNREFUSED);
        c.connect_failed(libc::ECONNREFUSED);
        c.dropped(DropReason::Fragment);
        assert!(c.connect_failures().any(|(r, n)| r == ConnectFailure::Refused && n == 2));
        assert!(c.drops().any(|(r, n)| r == DropReason::Fragment && n == 1));
        assert_eq!(c.drops().map(|(_, n)| n).sum::<u64>(), 1);
    }

    #[test]
    fn limit_log_lines_are_rate_limited() {
        let mut c = Counters::default();
        let t = std::time::Instant::now();
        assert_eq!(c.limit_reached(Limit::TcpFlows, t), Some(1));
        assert_eq!(c.limit_reached(Limit::TcpFlows, t + Duration::from_secs(1)), None);
        assert_eq!(c.limit_reached(Limit::TcpFlows, t + Duration::from_secs(2)), None);
        // Another limit has its own episode.
        assert_eq!(c.limit_reached(Limit::UdpFlows, t + Duration::from_secs(2)), Some(1));
        assert_eq!(c.limit_reached(Limit::TcpFlows, t + LIMIT_LOG_EVERY), Some(3));
        assert!(c.limits().any(|(l, n)| l == Limit::TcpFlows && n == 4));
    }
}
