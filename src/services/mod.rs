//! Gateway services: what the guest reaches at the gateway address (DHCP, DNS).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::config::NetConfig;

/// The gateway's stream and datagram services, served on their own runtime thread.
/// The engine binds a guest flow to the gateway to one end of a socketpair and hands
/// the other end here, so the translator treats built-in services like any host socket.
pub struct ServiceHub {
    _cfg: Arc<NetConfig>,
}

impl ServiceHub {
    pub fn start(cfg: Arc<NetConfig>) -> io::Result<ServiceHub> {
        Ok(ServiceHub { _cfg: cfg })
    }

    /// A guest opened TCP to the gateway's `port`: our (non-blocking, SOCK_STREAM) end of a
    /// socketpair whose other end the service serves, or None when nothing listens there.
    pub fn connect_tcp(&self, port: u16, guest: SocketAddrV4) -> Option<OwnedFd> {
        let _ = (port, guest);
        None
    }

    /// The same for UDP (SOCK_DGRAM socketpair; one datagram per guest datagram).
    pub fn connect_udp(&self, port: u16, guest: SocketAddrV4) -> Option<OwnedFd> {
        let _ = (port, guest);
        None
    }
}
