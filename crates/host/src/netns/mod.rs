//! Namespaces: creating the guest's network, mount and user namespaces, configuring them
//! through netlink, and the guest's /etc/resolv.conf.
//!
//! - `sandbox`: the `run` command's child process: namespaces, TAP, exec, cleanup.
//! - `attach`: `serve --netns`: a TAP in a namespace that already exists.
//! - `netlink`: a small synchronous rtnetlink client (links, addresses, routes).
//! - `resolv`: the host's resolvers, and the guest's resolv.conf.

pub mod attach;
pub mod netlink;
pub mod resolv;
pub mod sandbox;

/// The guest's interface in a namespace, as `run` and `serve --netns` configure it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Name of the TAP device, e.g. `eth0`.
    pub ifname: String,
    pub mac: [u8; 6],
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub mtu: u32,
}

/// Configures the guest's side of a namespace through netlink: lo up; the interface with its
/// MAC and MTU, up; its address; a default route via its gateway (a namespace that already
/// has one keeps it: the subnet route reaches the gateway anyway).
pub(crate) fn configure_interface(i: &Interface) -> std::io::Result<()> {
    let (mac, mtu, address, prefix, gateway) = (i.mac, i.mtu, i.address, i.prefix, i.gateway);
    let index = nix::net::if_::if_nametoindex(i.ifname.as_str())?;
    let lo = nix::net::if_::if_nametoindex("lo")?;
    let mut rtnl = netlink::Rtnl::open()?;
    rtnl.set_link(lo, None, None, true).map_err(|e| annotate(e, "bringing lo up"))?;
    rtnl.set_link(index, Some(mac), Some(mtu), true).map_err(|e| annotate(e, "setting MAC, MTU and up"))?;
    rtnl.add_ipv4_address(index, address, prefix).map_err(|e| annotate(e, "adding the address"))?;
    match rtnl.add_ipv4_default_route(index, gateway) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map_err(|e| annotate(e, "adding the default route")),
    }
}

/// An error with what was being done, as one line for the user.
pub(crate) fn annotate(e: std::io::Error, what: &str) -> std::io::Error {
    std::io::Error::new(e.kind(), format!("{what}: {}", describe(&e)))
}

/// An error as one line for the user: "Operation not permitted", without "(os error 1)".
pub(crate) fn describe(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => nix::errno::Errno::from_raw(n).desc().to_string(),
        None => e.to_string(),
    }
}
