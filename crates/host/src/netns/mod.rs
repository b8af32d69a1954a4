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
    /// Whether the interface gets `address` and the IPv4 default route (false with
    /// `--ipv6-only`).
    pub ipv4: bool,
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
///
/// A `multi_queue` TAP first gets one root pfifo_fast, shared by its queues: the one
/// queueing discipline a single-queue TAP gets. Left to the kernel's default, bringing it
/// up would build an `mq` discipline with a pfifo_fast for each of the 256 transmit queues
/// such a device has, about 1.2 ms of `usernet run --engine-threads 2`'s start-up here
/// (against 0.1 ms). TAP drops what its reader does not take and never stops a queue, so
/// no discipline holds a packet either way.
pub(crate) fn configure_interface(i: &Interface, multi_queue: bool) -> std::io::Result<()> {
    let (mac, mtu, address, prefix, gateway) = (i.mac, i.mtu, i.address, i.prefix, i.gateway);
    let index = nix::net::if_::if_nametoindex(i.ifname.as_str())?;
    let lo = nix::net::if_::if_nametoindex("lo")?;
    // Before the link is up, so that no router advertisement finds it still on.
    let ipv6 = i.ipv6.filter(|_| ipv6_without_slaac(&i.ifname));
    let mut rtnl = netlink::Rtnl::open()?;
    if multi_queue {
        rtnl.add_root_qdisc(index, "pfifo_fast").map_err(|e| annotate(e, "giving it a queueing discipline"))?;
    }
    rtnl.set_link(lo, None, None, true).map_err(|e| annotate(e, "bringing lo up"))?;
    rtnl.set_link(index, Some(mac), Some(mtu), true).map_err(|e| annotate(e, "setting MAC, MTU and up"))?;
    if i.ipv4 {
        rtnl.add_ipv4_address(index, address, prefix).map_err(|e| annotate(e, "adding the address"))?;
        match rtnl.add_ipv4_default_route(index, gateway) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(|e| annotate(e, "adding the default route")),
        }?;
    }
    let Some((address6, gateway6)) = ipv6 else {
        if !i.ipv4 {
            return Err(std::io::Error::other(format!(
                "{}: IPv6 is off in this network namespace, and --ipv6-only leaves it no IPv4",
                i.ifname
            )));
        }
        return Ok(());
    };
    match rtnl.add_ipv6_address(index, address6, 64) {
        // IPv6 turned off on the interface after all (a sysctl changed meanwhile).
        Err(e) if e.raw_os_error() == Some(libc::EACCES) && i.ipv4 => {
            tracing::debug!("{}: IPv6 is off; the guest is IPv4-only", i.ifname);
            return Ok(());
        }
        r => r.map_err(|e| annotate(e, "adding the IPv6 address"))?,
    }
    match rtnl.add_ipv6_default_route(index, gateway6) {
        Ok(()) => {
            // The route is there: the router advertisements that follow need not add it.
            // Each one's attempt would fail (the same route, of another origin) and log
            // "ICMPv6: RA: ndisc_router_discovery failed to add default route" in the
            // host's kernel log, once per `usernet run`.
            let defrtr = std::path::Path::new("/proc/sys/net/ipv6/conf").join(&i.ifname).join("accept_ra_defrtr");
            if let Err(e) = std::fs::write(defrtr, "0") {
                tracing::debug!("{}: cannot turn off default routes from router advertisements: {e}", i.ifname);
            }
            Ok(())
        }
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(annotate(e, "adding the IPv6 default route")),
    }
}

/// Whether the interface takes IPv6 (the kernel has it, and the namespace has not turned
/// it off, as Docker does in containers of networks without IPv6), and if so turns off
/// SLAAC on it: it gets usernet's address, and without this would also make one of its own
/// from the prefix, leaving the kernel to choose which one a connection leaves from.
/// (/proc/sys/net is the calling thread's namespace's.)
fn ipv6_without_slaac(ifname: &str) -> bool {
    let conf = std::path::Path::new("/proc/sys/net/ipv6/conf").join(ifname);
    let off = |name: &str| std::fs::read_to_string(conf.join(name)).map(|v| v.trim() == "1");
    match (off("disable_ipv6"), off("../all/disable_ipv6")) {
        (Ok(false), Ok(false) | Err(_)) => {}
        _ => {
            tracing::debug!("{ifname}: no IPv6 here; the guest is IPv4-only");
            return false;
        }
    }
    if let Err(e) = std::fs::write(conf.join("autoconf"), "0") {
        tracing::debug!("{ifname}: cannot turn SLAAC off ({e}); the guest may have a second address");
    }
    true
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
