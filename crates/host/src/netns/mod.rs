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
    /// The interface's IPv6 address in a /64 and its next hop (usernet's link-local
    /// address); None: IPv4 only.
    pub ipv6: Option<(std::net::Ipv6Addr, std::net::Ipv6Addr)>,
}

/// Configures the guest's side of a namespace through netlink: lo up; the interface with its
/// MAC and MTU, up; its address; a default route via its gateway (a namespace that already
/// has one keeps it: the subnet route reaches the gateway anyway). With IPv6, the same for
/// IPv6, and the interface takes no address of its own from router advertisements (it has
/// usernet's; the advertisements still bring the route and the DNS server).
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
    }?;
    let Some((address6, gateway6)) = i.ipv6 else { return Ok(()) };
    let conf = std::path::Path::new("/proc/sys/net/ipv6/conf").join(&i.ifname);
    if !conf.exists() {
        // The kernel has IPv6 turned off (ipv6.disable=1): the guest stays IPv4-only.
        tracing::debug!("{}: no IPv6 in this kernel; the guest is IPv4-only", i.ifname);
        return Ok(());
    }
    // Without this the guest would also make an address of its own from the prefix: two
    // addresses, and which one a connection leaves from would be the kernel's choice.
    // (/proc/sys/net is the calling thread's namespace's.)
    if let Err(e) = std::fs::write(conf.join("autoconf"), "0") {
        tracing::debug!("{}: cannot turn SLAAC off ({e}); the guest may have a second address", i.ifname);
    }
    rtnl.add_ipv6_address(index, address6, 64).map_err(|e| annotate(e, "adding the IPv6 address"))?;
    match rtnl.add_ipv6_default_route(index, gateway6) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.map_err(|e| annotate(e, "adding the IPv6 default route")),
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
