//! The engine: one event loop that owns the guest link and the flow table.

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use crate::config::NetConfig;
use crate::link::Link;
use crate::pcap::PcapWriter;
use crate::services::ServiceHub;

/// Something outside the network that the loop also watches (the `run` command's
/// signalfd, say): when its fd is readable the loop calls `on_ready`, and stops with
/// the returned exit code when it gives one.
pub trait Supervisor {
    fn fd(&self) -> RawFd;
    fn on_ready(&mut self) -> Option<i32>;
}

pub struct Engine {
    _cfg: Arc<NetConfig>,
    _link: Box<dyn Link>,
    _services: ServiceHub,
    _pcap: Option<PcapWriter>,
}

impl Engine {
    pub fn new(
        cfg: Arc<NetConfig>,
        link: Box<dyn Link>,
        services: ServiceHub,
        pcap: Option<PcapWriter>,
    ) -> io::Result<Engine> {
        Ok(Engine {
            _cfg: cfg,
            _link: link,
            _services: services,
            _pcap: pcap,
        })
    }

    /// Runs until the supervisor says stop; returns its exit code.
    pub fn run(&mut self, sup: &mut dyn Supervisor) -> io::Result<i32> {
        let _ = sup;
        Err(io::Error::other("engine not yet written"))
    }
}
