//! Links: how a guest's Ethernet frames reach usernet (a TAP device, later sockets for VMs).

pub mod tap;

use std::io;
use std::os::fd::RawFd;

/// One guest link: a non-blocking source and sink of whole Ethernet frames.
pub trait Link {
    /// The file descriptor the event loop waits on for readability.
    fn fd(&self) -> RawFd;
    /// Reads one frame into `buf`; `Err(WouldBlock)` when none is waiting.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame. A frame the link cannot take right now may be dropped
    /// (the guest's TCP retransmits), never half-written.
    fn send(&mut self, frame: &[u8]) -> io::Result<()>;
}
