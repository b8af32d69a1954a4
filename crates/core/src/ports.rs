//! Published ports as the engine receives them: the protocol and the bound host socket.
//!
//! The host side (`usernet_host::publish`) parses Docker's grammar and binds these sockets
//! before anything runs, so a taken port is reported at once; the engine then owns them,
//! accepts connections and receives datagrams on them, and turns each into a guest flow.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};

/// Transport protocol of a published port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A bound (and for TCP, listening) non-blocking host socket of a published port.
#[derive(Debug)]
pub struct BoundListener {
    pub fd: OwnedFd,
    /// The address and port actually bound (the port is known even when 0 was asked).
    pub local: SocketAddr,
    pub proto: Proto,
    /// The guest port connections go to.
    pub guest_port: u16,
}
