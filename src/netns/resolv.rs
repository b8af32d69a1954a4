//! /etc/resolv.conf: reading the host's resolvers, writing the guest's.

use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostResolvers {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
}

/// The host's nameservers and search domains; empty when the file is missing or has none.
pub fn host_resolvers(path: &Path) -> HostResolvers {
    let _ = path;
    HostResolvers::default()
}
