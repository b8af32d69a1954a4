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
