//! The host side of usernet: what it sets up on the host around the network core.
//!
//! - `netns`: the guest's namespaces (`run`), attaching to a runtime's namespace
//!   (`serve --netns`), netlink configuration of the guest's interface, resolv.conf;
//! - `publish`: Docker's port grammar and the host listeners of published ports;
//! - `dns_watch`: follows the host's /etc/resolv.conf and /etc/hosts while usernet runs;
//! - `api`: the control API (usernet's `/v1` and gvisor-tap-vsock's endpoints) and its client;
//! - `exit_code`: the exit statuses usernet shares with `docker run`;
//! - `confine`: least privilege once setup is done (capabilities, no_new_privs, seccomp).
//!
//! Layers inside this crate, lowest first: `exit_code` < `publish` < `netns` < `dns_watch`,
//! `api`; `confine` stands apart (each mode calls it once its setup is done).

pub mod api;
pub mod confine;
pub mod dns_watch;
pub mod exit_code;
pub mod netns;
pub mod publish;
pub mod ssh_forward;
