//! Commands to the engine from other threads (the control API): each carries a channel for
//! its answer. The engine's loop drains them whenever its waker fires.

use std::net::{Ipv4Addr, SocketAddr};
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
    /// Where connections go in the guest network.
    pub guest_ip: Ipv4Addr,
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
}

/// One active flow, for `/v1/flows`.
#[derive(Clone, Debug, Serialize)]
pub struct FlowInfo {
    pub proto: &'static str,
    pub guest: String,
    pub remote: String,
}

pub type Reply<T> = tokio::sync::oneshot::Sender<T>;

pub enum Command {
    /// Serve already-bound listeners, forwarding to `guest_ip:guest_port` of each listener.
    Publish {
        listeners: Vec<BoundListener>,
        guest_ip: Ipv4Addr,
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
                Command::Stats { reply } => {
                    let s = self.switch.stats;
                    let _ = reply.send(Stats {
                        frames_in: s.frames_in,
                        frames_out: s.frames_out,
                        bytes_in: s.bytes_in,
                        bytes_out: s.bytes_out,
                        dropped_in: s.dropped_in,
                        tcp_flows: self.flows.tcp_count,
                        udp_flows: self.flows.udp_count,
                        icmp_flows: self.flows.icmp_count,
                    });
                }
                Command::Flows { reply } => {
                    let list = self
                        .flows
                        .ids()
                        .map(|(_, f)| match f {
                            Flow::Tcp(t) => {
                                FlowInfo { proto: "tcp", guest: t.guest.to_string(), remote: t.remote.to_string() }
                            }
                            Flow::Udp(u) => {
                                FlowInfo { proto: "udp", guest: u.guest.to_string(), remote: u.remote.to_string() }
                            }
                            Flow::Icmp(i) => {
                                FlowInfo { proto: "icmp", guest: i.guest.to_string(), remote: i.remote.to_string() }
                            }
                            Flow::Splice(_) => FlowInfo {
                                proto: "tcp-spliced",
                                guest: "guest loopback".to_string(),
                                remote: "host loopback".to_string(),
                            },
                        })
                        .collect();
                    let _ = reply.send(list);
                }
                Command::Metrics { reply } => {
                    let _ = reply.send(self.metrics());
                }
            }
        }
    }

    /// A copy of every counter (off the data path: it walks the links, flows and listeners).
    pub fn metrics(&self) -> EngineMetrics {
        let links = (self.switch.links.iter().enumerate())
            .filter_map(|(index, slot)| slot.as_ref().map(|s| (index, s)))
            .map(|(index, s)| LinkSample { index, name: s.link.describe(), counters: s.counters })
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
                guest: std::net::SocketAddrV4::new(l.guest_ip, l.guest_port),
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
