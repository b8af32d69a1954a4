//! The virtual network's shape: addresses, MTU, DNS, shared by every engine and service.

use std::net::{Ipv4Addr, SocketAddr};

/// MAC address the gateway (usernet itself) answers with. Locally administered.
pub const GATEWAY_MAC: [u8; 6] = [0x5a, 0x94, 0xef, 0xe4, 0x0c, 0xdd];

/// Default MTU for a network-namespace guest (`usernet run`).
pub const MTU_NETNS: u32 = 65520;
/// Default MTU for a VM guest (`usernet serve`).
pub const MTU_VM: u32 = 1500;

/// Names that resolve to the host address.
pub const HOST_NAMES: &[&str] = &["host.docker.internal", "host.containers.internal"];
/// Names that resolve to the gateway address.
pub const GATEWAY_NAMES: &[&str] = &["gateway.docker.internal", "gateway.containers.internal"];
/// The explicit proxy's name (served by the gateway's DNS).
pub const PROXY_NAMES: &[&str] = &["http.docker.internal"];

/// An IPv4 subnet, e.g. 192.168.65.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Ipv4Subnet {
    pub fn mask(&self) -> Ipv4Addr {
        let bits = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix as u32) };
        Ipv4Addr::from(bits)
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let m = u32::from(self.mask());
        u32::from(addr) & m == u32::from(self.network) & m
    }

    /// The address with host part `n` (1 = .1 in a /24).
    pub fn host(&self, n: u32) -> Ipv4Addr {
        Ipv4Addr::from((u32::from(self.network) & u32::from(self.mask())) | n)
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !u32::from(self.mask()))
    }
}

impl std::str::FromStr for Ipv4Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| format!("invalid subnet: {s} (want A.B.C.D/N)"))?;
        let network: Ipv4Addr = addr.parse().map_err(|_| format!("invalid subnet address: {addr}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("invalid subnet prefix: {prefix}"))?;
        if !(8..=30).contains(&prefix) {
            return Err(format!("invalid subnet prefix: /{prefix} (must be between /8 and /30)"));
        }
        let mut s = Ipv4Subnet { network, prefix };
        s.network = Ipv4Addr::from(u32::from(network) & u32::from(s.mask()));
        Ok(s)
    }
}

/// Everything the engine and the gateway services need to know about the virtual network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    pub subnet: Ipv4Subnet,
    /// usernet itself: ARP, DHCP, DNS, ping.
    pub gateway: Ipv4Addr,
    /// Stands for the host's 127.0.0.1.
    pub host: Ipv4Addr,
    /// The first guest's address (static in `run`, first DHCP lease in `serve`).
    pub guest: Ipv4Addr,
    pub gateway_mac: [u8; 6],
    pub mtu: u32,
    /// Where DNS queries the gateway does not answer itself go, in order of preference.
    pub dns_upstreams: Vec<SocketAddr>,
    /// Extra DNS A records (`--add-host`), names lower-case without trailing dot.
    pub extra_hosts: Vec<(String, Ipv4Addr)>,
    /// Search domains handed out by DHCP (from the host's resolv.conf).
    pub search_domains: Vec<String>,
    /// DHCP lease time in seconds.
    pub lease_secs: u32,
}

impl NetConfig {
    pub fn new(subnet: Ipv4Subnet, mtu: u32) -> Self {
        NetConfig {
            subnet,
            gateway: subnet.host(1),
            host: subnet.host(254),
            guest: subnet.host(2),
            gateway_mac: GATEWAY_MAC,
            mtu,
            dns_upstreams: Vec::new(),
            extra_hosts: Vec::new(),
            search_domains: Vec::new(),
            lease_secs: 3600,
        }
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig::new(Ipv4Subnet { network: Ipv4Addr::new(192, 168, 65, 0), prefix: 24 }, MTU_NETNS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_addresses() {
        let c = NetConfig::default();
        assert_eq!(c.gateway, Ipv4Addr::new(192, 168, 65, 1));
        assert_eq!(c.host, Ipv4Addr::new(192, 168, 65, 254));
        assert_eq!(c.guest, Ipv4Addr::new(192, 168, 65, 2));
        assert_eq!(c.subnet.broadcast(), Ipv4Addr::new(192, 168, 65, 255));
    }

    #[test]
    fn subnet_parse() {
        let s: Ipv4Subnet = "10.0.5.7/16".parse().unwrap();
        assert_eq!(s.network, Ipv4Addr::new(10, 0, 0, 0));
        assert!(s.contains(Ipv4Addr::new(10, 0, 200, 1)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 0, 1)));
        assert!("10.0.0.0".parse::<Ipv4Subnet>().is_err());
        assert!("10.0.0.0/33".parse::<Ipv4Subnet>().is_err());
        assert!("x/24".parse::<Ipv4Subnet>().is_err());
    }
}
