//! usernet: user-mode networking for containers and virtual machines.
//!
//! A guest's Ethernet frames come in over a link (a TAP device, a socket), the engine
//! translates every guest connection into an ordinary host socket, and the gateway services
//! (ARP, DHCP, DNS) answer what is addressed to usernet itself.

pub mod api;
pub mod cli;
pub mod config;
pub mod engine;
pub mod link;
pub mod netns;
pub mod pcap;
pub mod publish;
pub mod services;
pub mod wire;
