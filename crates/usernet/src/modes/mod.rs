//! Drop-in modes: usernet under the name of the program a caller expects (a symlink of
//! that name, or `usernet NAME ARGS...`), with that program's command line, network
//! layout, readiness and exit protocol. Each mode is a thin translation into usernet's own
//! configuration; the data path is the same.

mod getopt;
mod goflag;
pub mod gvproxy;
mod lifecycle;
pub mod pasta;
pub mod slirp4netns;
pub mod vpnkit;

use std::ffi::OsString;

/// A MAC address as `aa:bb:cc:dd:ee:ff` (one or two hex digits a byte), as the C programs
/// take it.
pub(crate) fn parse_mac(v: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        mac[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// The first IPv4 address of the host's interface `name`.
pub(crate) fn interface_ipv4(name: &str) -> Option<std::net::Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        let sin = a.address.as_ref()?.as_sockaddr_in()?;
        (a.interface_name == name).then(|| sin.ip())
    })
}

/// The first global IPv6 address (not link-local, not loopback) of the host's interface
/// `name`.
pub(crate) fn interface_ipv6(name: &str) -> Option<std::net::Ipv6Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|a| {
        let ip = a.address.as_ref()?.as_sockaddr_in6()?.ip();
        (a.interface_name == name && usable_outbound6(ip)).then_some(ip)
    })
}

/// An IPv6 address outbound connections can leave from: one host's (not unspecified,
/// loopback, multicast or IPv4-mapped), and not link-local, which binds only with an
/// interface.
pub(crate) fn usable_outbound6(a: std::net::Ipv6Addr) -> bool {
    !(a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || a.is_unicast_link_local()
        || a.to_ipv4_mapped().is_some())
}

/// A mode's entry point: its arguments (without the program name) in, the exit status out.
pub type ModeMain = fn(&[OsString]) -> i32;

/// The modes, by program name.
const MODES: &[(&str, ModeMain)] =
    &[("slirp4netns", slirp4netns::main), ("pasta", pasta::main), ("vpnkit", vpnkit::main), ("gvproxy", gvproxy::main)];

/// The mode named by how usernet was started, if any: the program name itself (argv[0]'s
/// file name), or the first argument after `usernet`. Returns the mode and its arguments.
pub fn select(argv: &[OsString]) -> Option<(ModeMain, &[OsString])> {
    let program = argv.first().map(std::path::Path::new).and_then(|p| p.file_name())?;
    if let Some((_, main)) = MODES.iter().find(|(name, _)| program == *name) {
        return Some((*main, &argv[1..]));
    }
    let first = argv.get(1)?;
    MODES.iter().find(|(name, _)| first == *name).map(|(_, main)| (*main, &argv[2..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<OsString> {
        s.iter().map(OsString::from).collect()
    }

    #[test]
    fn by_program_name_or_first_argument() {
        let a = v(&["/usr/local/bin/slirp4netns", "--help"]);
        assert_eq!(select(&a).map(|(_, rest)| rest.len()), Some(1));
        let b = v(&["usernet", "slirp4netns", "-c", "1"]);
        assert_eq!(select(&b).map(|(_, rest)| rest.to_vec()), Some(v(&["-c", "1"])));
        assert!(select(&v(&["usernet", "run", "--", "slirp4netns"])).is_none());
        assert!(select(&v(&["usernet"])).is_none());
    }
}
