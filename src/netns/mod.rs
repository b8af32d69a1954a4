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
