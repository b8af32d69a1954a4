//! Namespaces: creating the guest's network, mount and user namespaces, configuring them
//! through netlink, and the guest's /etc/resolv.conf.

pub mod resolv;
