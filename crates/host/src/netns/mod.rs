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

/// Configures the guest's side of a namespace through netlink: lo up; `ifname` with its MAC
/// and MTU, up; its address; a default route via `gateway` (a namespace that already has
/// one keeps it: the subnet route reaches the gateway anyway).
pub(crate) fn configure_interface(
    ifname: &str,
    mac: [u8; 6],
    mtu: u32,
    address: std::net::Ipv4Addr,
    prefix: u8,
    gateway: std::net::Ipv4Addr,
) -> std::io::Result<()> {
    let index = nix::net::if_::if_nametoindex(ifname)?;
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
