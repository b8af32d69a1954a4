//! The network core of usernet: a guest's Ethernet frames come in over a link (a TAP
//! device, a socket), the switch delivers them, the engine translates every guest
//! connection into an ordinary host socket, and the gateway services (ARP, DHCP, DNS, the
//! HTTP proxy) answer what is addressed to usernet itself.
//!
//! Layers inside this crate, lowest first (a module imports only from those before it):
//! `guest`, `own_files`, `policy` < `config`, `pcap` < `link` < `services` < `engine`. The frame formats are the crate
//! `usernet_wire` below this one; the host side (namespaces, publishing, the control API)
//! is `usernet_host` above it.

pub mod config;
pub mod engine;
pub mod fd_limit;
pub mod guest;
pub mod link;
pub mod own_files;
pub mod pcap;
pub mod policy;
pub mod ports;
pub mod services;
