//! Commands to the engine from other threads (the control API): each carries a channel for
//! its answer. The engine's loop drains them whenever its waker fires.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::mpsc;

use serde::Serialize;

use super::Engine;
use super::flows::Flow;
use super::metrics::{EngineMetrics, FLOW_STATES, LinkSample, ListenerSample};

use crate::ports::BoundListener;
use crate::ports::Proto;

/// One published port as the engine serves it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Published {
    /// The host address and port it listens on.
    pub host: SocketAddr,
    pub proto: Proto,
    /// Where connections go in the guest network: an IPv4 address, or an IPv6 one.
    pub guest_ip: IpAddr,
    pub guest_port: u16,
}

/// Engine counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stats {
    pub frames_in: u64,
    pub frames_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped_in: u64,
    pub tcp_flows: usize,
    pub udp_flows: usize,
    pub icmp_flows: usize,
    /// Frames that live captures (`/v1/capture`) dropped because their reader was slow.
    pub capture_dropped: u64,
}

impl Stats {
    /// The counters of two engines serving one guest, together.
    pub fn merge(&self, o: &Stats) -> Stats {
        Stats {
            frames_in: self.frames_in + o.frames_in,
            frames_out: self.frames_out + o.frames_out,
            bytes_in: self.bytes_in + o.bytes_in,
            bytes_out: self.bytes_out + o.bytes_out,
            dropped_in: self.dropped_in + o.dropped_in,
            tcp_flows: self.tcp_flows + o.tcp_flows,
            udp_flows: self.udp_flows + o.udp_flows,
            icmp_flows: self.icmp_flows + o.icmp_flows,
            capture_dropped: self.capture_dropped + o.capture_dropped,
        }
    }
}

/// One active flow, for `/v1/flows`.
#[derive(Clone, Debug, Serialize)]
pub struct FlowInfo {
    pub proto: &'static str,
    /// The guest's end (a spliced flow's socket inside the guest's namespace).
    pub guest: String,
    /// The other end as the guest sees it.
    pub remote: String,
    /// The far end of the host socket, where the flow really goes (or comes from, for a
    /// published port); None when the socket has none (a gateway service's socketpair).
    pub host: Option<String>,
    /// The TCP state (`established`, `syn-sent`, ...), `spliced`, or `open` for UDP and ICMP.
    pub state: &'static str,
    /// Payload bytes from the guest to the host side, and back.
    pub bytes_from_guest: u64,
    pub bytes_to_guest: u64,
    /// Milliseconds since the flow began, and since it last carried a packet.
    pub age_ms: u64,
    pub idle_ms: u64,
}

/// The address at the far end of a socket, as text (IPv4 `a.b.c.d:port`, IPv6 `[..]:port`).
fn peer_of(fd: std::os::fd::BorrowedFd<'_>) -> Option<String> {
    use nix::sys::socket::{SockaddrLike, SockaddrStorage, getpeername};
    use std::os::fd::AsRawFd;
    let addr = getpeername::<SockaddrStorage>(fd.as_raw_fd()).ok()?;
    match addr.family() {
        Some(nix::sys::socket::AddressFamily::Inet | nix::sys::socket::AddressFamily::Inet6) => Some(addr.to_string()),
        _ => None,
    }
}

impl FlowInfo {
    fn of(flow: &Flow, now: std::time::Instant) -> FlowInfo {
        use std::os::fd::AsFd;
        let t = flow.traffic();
        let (proto, guest, remote, host, state) = match flow {
            Flow::Tcp(f) => ("tcp", f.guest.to_string(), f.remote.to_string(), peer_of(f.sock.as_fd()), f.state_name()),
            Flow::Udp(f) => {
                let host = match &f.socket {
                    super::flows::udp::UdpSocket::Own(s) => peer_of(s.as_fd()),
                    super::flows::udp::UdpSocket::Published(i) => Some(i.client.to_string()),
                };
                ("udp", f.guest.to_string(), f.remote.to_string(), host, "open")
            }
            Flow::Icmp(f) => ("icmp", f.guest.to_string(), f.remote.to_string(), None, "open"),
            Flow::Splice(f) => {
                let guest = peer_of(f.guest.as_fd()).unwrap_or_else(|| "guest loopback".to_string());
                ("tcp-spliced", guest, "host loopback".to_string(), peer_of(f.host.as_fd()), "spliced")
            }
        };
        FlowInfo {
            proto,
            guest,
            remote,
            host,
            state,
            bytes_from_guest: t.from_guest,
            bytes_to_guest: t.to_guest,
            age_ms: now.saturating_duration_since(t.born).as_millis() as u64,
            idle_ms: now.saturating_duration_since(t.last).as_millis() as u64,
        }
    }
}

pub type Reply<T> = tokio::sync::oneshot::Sender<T>;

pub enum Command {
    /// Serve already-bound listeners, forwarding to `guest_ip:guest_port` of each listener.
    Publish {
        listeners: Vec<BoundListener>,
        guest_ip: IpAddr,
        reply: Reply<Vec<Published>>,
    },
    /// Stop serving the listener bound at `host` for `proto`; answers whether one was found.
    Unpublish {
        host: SocketAddr,
        proto: Proto,
        reply: Reply<bool>,
    },
    ListPorts {
        reply: Reply<Vec<Published>>,
    },
    /// DHCP leases: (address, MAC).
    Leases {
        reply: Reply<Vec<(Ipv4Addr, [u8; 6])>>,
    },
    Stats {
        reply: Reply<Stats>,
    },
    Flows {
        reply: Reply<Vec<FlowInfo>>,
    },
    /// Every counter, for `/metrics`.
    Metrics {
        reply: Reply<EngineMetrics>,
    },
    /// Carry the connected host stream `fd` to TCP `guest` in the guest network, from the
    /// host address (gvproxy's `/tunnel`); answers whether the flow was made.
    Tunnel {
        fd: std::os::fd::OwnedFd,
        guest: std::net::SocketAddr,
        reply: Reply<Result<(), String>>,
    },
    /// Close a guest link whose guest is gone although its descriptor says nothing yet (a
    /// namespace that `serve --netns` attached to was deleted: the TAP keeps it alive), with
    /// the reason for the log. A link that went already is left alone.
    DropLink {
        link: super::LinkId,
        why: String,
    },
    /// Start a live capture (`/v1/capture`): the frames of the guest links go to `tap` too,
    /// as they go to `--pcap`, until its reader goes away.
    Capture {
        tap: crate::pcap::LiveTap,
    },
    /// An answer gathered along a set of engines (see shard.rs): the engine adds its own
    /// part and passes it to the next, or answers when it is the last.
    Gather(Box<Gather>),
}

/// The parts of an answer that all engines of a set of shards give (boxed in [`Command`]).
#[allow(clippy::large_enum_variant)]
pub enum Gather {
    Stats(Stats, Reply<Stats>),
    Flows(Vec<FlowInfo>, Reply<Vec<FlowInfo>>),
    Metrics(EngineMetrics, Reply<EngineMetrics>),
}

/// A cloneable handle that sends commands to a running engine.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Command>,
    waker: Arc<mio::Waker>,
}

impl ControlHandle {
    pub fn new(tx: mpsc::Sender<Command>, waker: Arc<mio::Waker>) -> ControlHandle {
        ControlHandle { tx, waker }
    }

    /// Sends a command; false when the engine is gone.
    pub fn send(&self, cmd: Command) -> bool {
        self.tx.send(cmd).is_ok() && self.waker.wake().is_ok()
    }

    /// Sends a command built around a reply channel and waits for the answer.
    pub async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(make(tx)) {
            return None;
        }
        rx.await.ok()
    }

    /// `ask` for a thread outside any async runtime: blocks until the engine answers.
    pub fn ask_blocking<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.send(make(tx)) {
            return None;
        }
        rx.blocking_recv().ok()
    }
}

impl Engine {
    /// Carries out the commands other threads sent.
    pub(super) fn on_commands(&mut self) {
        while let Ok(cmd) = self.control_rx.try_recv() {
            match cmd {
                Command::Publish { listeners, guest_ip, reply } => {
                    let _ = reply.send(self.publish(listeners, guest_ip));
                }
                Command::Unpublish { host, proto, reply } => {
                    let _ = reply.send(self.unpublish(host, proto));
                }
                Command::ListPorts { reply } => {
                    let _ = reply.send(self.published());
                }
                Command::Leases { reply } => {
                    let _ = reply.send(self.dhcp.leases());
                }
                Command::Stats { reply } => self.gather(Gather::Stats(Stats::default(), reply)),
                Command::Flows { reply } => self.gather(Gather::Flows(Vec::new(), reply)),
                Command::Metrics { reply } => self.gather(Gather::Metrics(EngineMetrics::default(), reply)),
                Command::Gather(g) => self.gather(*g),
                Command::Tunnel { fd, guest, reply } => {
                    let _ = reply.send(self.tunnel(fd, guest, std::time::Instant::now()));
                }
                Command::DropLink { link, why } => self.drop_link_by_id(link, &why),
                Command::Capture { tap } => {
                    if let Some(next) = self.shard.as_ref().and_then(|s| s.next.as_ref()) {
                        next.send(Command::Capture { tap: tap.clone() });
                    }
                    self.switch.pcap.get_or_insert_with(crate::pcap::PcapWriter::live_only).add_tap(tap);
                }
            }
        }
    }

    /// Adds this engine's part to `g`, and passes it to the next engine or answers.
    fn gather(&mut self, g: Gather) {
        let g = match g {
            Gather::Stats(partial, reply) => {
                let s = self.switch.stats;
                let own = Stats {
                    frames_in: s.frames_in,
                    frames_out: s.frames_out,
                    bytes_in: s.bytes_in,
                    bytes_out: s.bytes_out,
                    dropped_in: s.dropped_in,
                    tcp_flows: self.flows.tcp_count,
                    udp_flows: self.flows.udp_count,
                    icmp_flows: self.flows.icmp_count,
                    capture_dropped: self.switch.pcap.as_ref().map_or(0, |p| p.tap_dropped()),
                };
                Gather::Stats(partial.merge(&own), reply)
            }
            Gather::Flows(mut list, reply) => {
                let now = std::time::Instant::now();
                list.extend(self.flows.ids().map(|(_, f)| FlowInfo::of(f, now)));
                Gather::Flows(list, reply)
            }
            Gather::Metrics(partial, reply) => Gather::Metrics(partial.merge(self.metrics()), reply),
        };
        match self.shard.as_ref().and_then(|s| s.next.as_ref()) {
            Some(next) => {
                next.send(Command::Gather(Box::new(g)));
            }
            None => {
                let _ = match g {
                    Gather::Stats(s, reply) => reply.send(s).is_ok(),
                    Gather::Flows(list, reply) => reply.send(list).is_ok(),
                    Gather::Metrics(m, reply) => reply.send(m).is_ok(),
                };
            }
        }
    }

    /// A copy of every counter (off the data path: it walks the links, flows and listeners).
    pub fn metrics(&self) -> EngineMetrics {
        let links = (self.switch.links.iter().enumerate())
            .filter_map(|(index, slot)| slot.as_ref().map(|s| (index, s)))
            .map(|(index, s)| LinkSample {
                index,
                name: s.link.describe(),
                counters: s.counters,
                guests: self.switch.guests_on(index),
            })
            .collect();
        let mut flows: Vec<((&'static str, &'static str), u64)> = FLOW_STATES.iter().map(|k| (*k, 0)).collect();
        for (_, f) in self.flows.ids() {
            let key = match f {
                Flow::Tcp(t) => ("tcp", t.state_name()),
                Flow::Splice(_) => ("tcp", "spliced"),
                Flow::Udp(_) => ("udp", "open"),
                Flow::Icmp(_) => ("icmp", "open"),
            };
            if let Some(slot) = flows.iter_mut().find(|(k, _)| *k == key) {
                slot.1 += 1;
            }
        }
        let listeners = (self.listeners.iter().flatten())
            .map(|l| ListenerSample {
                host: l.local,
                proto: l.proto,
                guest: SocketAddr::new(l.guest_ip, l.guest_port),
                accepted: l.accepted,
            })
            .collect();
        EngineMetrics {
            links,
            counters: self.switch.counters,
            flows,
            listeners,
            loop_counters: self.loop_counters,
            services: self.service_metrics.as_ref().map(|m| m.sample(&self.cfg.host_dns.upstreams().servers)),
        }
    }
}
