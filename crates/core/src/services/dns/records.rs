//! The names the gateway answers itself, in order of precedence:
//!
//! 1. the explicit table: the built-in names (`host.docker.internal` and friends), then
//!    `--add-host`, then records added at run time through the API (each may replace the
//!    one before);
//! 2. the host's /etc/hosts ([`HostsTable`], kept current by the host side through the
//!    shared [`HostDns`]).
//!
//! PTR records come from the same two places: an address of the explicit table gets its
//! first built-in name (`host.docker.internal`, `gateway.docker.internal`) or else its
//! first name in alphabetical order; then the hosts table's.
//!
//! The built-in names have AAAA records too when the network has IPv6 (the host's ::254,
//! the gateway's and the explicit proxy's ::1), for as long as their A record is the
//! built-in one (`--add-host host.docker.internal:IP` replaces both).
//!
//! `--add-host NAME:IPV6` gives NAME an AAAA record of the explicit table: it wins over a
//! built-in one, and a name with only such records has no A record (not /etc/hosts' either),
//! as a line of the container's /etc/hosts would be with Docker.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::RwLock;

use hickory_proto::rr::Name;
use tracing::debug;

use crate::config::{GATEWAY_NAMES, HOST_NAMES, HostDns, NetConfig, PROXY_NAMES};

/// Errors of the local record table.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid DNS name: {0:?}")]
    InvalidName(String),
}

/// The local record table: lower-case names without trailing dot -> IPv4 address (A) and
/// IPv6 address (AAAA), and the host's /etc/hosts behind it.
///
/// Shared (`Arc<DnsRecords>`) between the DNS server and whoever manages records at run
/// time (the control API); the table sits behind an `RwLock`, so every method takes `&self`.
#[derive(Debug, Default)]
pub struct DnsRecords {
    table: RwLock<BTreeMap<String, Ipv4Addr>>,
    /// The explicit table's IPv6 addresses (`--add-host NAME:IPV6`).
    table6: RwLock<BTreeMap<String, Ipv6Addr>>,
    /// The built-in names' IPv6 addresses, each with the IPv4 address it goes with.
    builtin6: Vec<(&'static str, Ipv4Addr, Ipv6Addr)>,
    host_dns: HostDns,
}

impl DnsRecords {
    /// An empty table, with no /etc/hosts behind it.
    pub fn new() -> Self {
        Self::default()
    }

    /// The built-in names (HOST_NAMES -> host, GATEWAY_NAMES and the explicit proxy's
    /// `http.docker.internal` -> gateway) plus `cfg.extra_hosts`, which may override the
    /// built-in ones; behind them the hosts table of `cfg.host_dns`.
    pub fn from_config(cfg: &NetConfig) -> Self {
        let builtin6 = match cfg.v6 {
            Some(net) => HOST_NAMES
                .iter()
                .map(|n| (*n, cfg.host, net.host))
                .chain(GATEWAY_NAMES.iter().chain(PROXY_NAMES).map(|n| (*n, cfg.gateway, net.gateway)))
                .collect(),
            None => Vec::new(),
        };
        let records = DnsRecords {
            table: RwLock::default(),
            table6: RwLock::default(),
            builtin6,
            host_dns: cfg.host_dns.clone(),
        };
        let builtin = HOST_NAMES
            .iter()
            .map(|n| (*n, IpAddr::V4(cfg.host)))
            .chain(GATEWAY_NAMES.iter().map(|n| (*n, IpAddr::V4(cfg.gateway))))
            .chain(PROXY_NAMES.iter().map(|n| (*n, IpAddr::V4(cfg.gateway))));
        let extra = cfg.extra_hosts.iter().map(|(n, a)| (n.as_str(), *a));
        for (name, addr) in builtin.chain(extra) {
            let added = match addr {
                IpAddr::V4(a) => records.add(name, a),
                IpAddr::V6(a) => records.add6(name, a),
            };
            if let Err(e) = added {
                debug!("dns: skipping record: {e}");
            }
        }
        records
    }

    /// Add or replace the A record of `name` (case-insensitive, trailing dot optional).
    pub fn add(&self, name: &str, addr: Ipv4Addr) -> Result<(), DnsError> {
        self.write().insert(record_key(name)?, addr);
        Ok(())
    }

    /// Add or replace the AAAA record of `name` (case-insensitive, trailing dot optional).
    pub fn add6(&self, name: &str, addr: Ipv6Addr) -> Result<(), DnsError> {
        self.write6().insert(record_key(name)?, addr);
        Ok(())
    }

    /// Remove the records of `name` from the explicit table; true when there was one.
    pub fn remove(&self, name: &str) -> bool {
        let key = normalize(name);
        let v6 = self.write6().remove(&key).is_some();
        self.write().remove(&key).is_some() || v6
    }

    /// Every record of the explicit table (not /etc/hosts), A and AAAA, sorted by name; a
    /// name with both has its A record first. The built-in names' AAAA records are there
    /// while they are answered (see the module comment).
    pub fn list(&self) -> Vec<(String, IpAddr)> {
        let table = self.read();
        let table6 = self.read6();
        let names: BTreeSet<&String> = table.keys().chain(table6.keys()).collect();
        names
            .into_iter()
            .flat_map(|name| self.addresses(name, &table, &table6).into_iter().map(|a| (name.clone(), a)))
            .collect()
    }

    /// The explicit records of `name` (not /etc/hosts): its IPv4 address, then its IPv6
    /// address, each if it has one; empty for a name the explicit table does not have.
    pub fn get(&self, name: &str) -> Vec<IpAddr> {
        self.addresses(&normalize(name), &self.read(), &self.read6())
    }

    /// The A and AAAA records of `key` in the explicit table, A first.
    fn addresses(
        &self,
        key: &str,
        table: &BTreeMap<String, Ipv4Addr>,
        table6: &BTreeMap<String, Ipv6Addr>,
    ) -> Vec<IpAddr> {
        let v4 = table.get(key).copied();
        let v6 = table6.get(key).copied().or_else(|| self.builtin_aaaa(key, v4?));
        v4.map(IpAddr::V4).into_iter().chain(v6.map(IpAddr::V6)).collect()
    }

    /// The built-in AAAA record of `key`, if `key` is a built-in name whose A record is
    /// still the built-in `v4`.
    fn builtin_aaaa(&self, key: &str, v4: Ipv4Addr) -> Option<Ipv6Addr> {
        self.builtin6.iter().find(|(n, a4, _)| *n == key && *a4 == v4).map(|(_, _, a6)| *a6)
    }

    /// The address the gateway answers for `name`: the explicit table's, else /etc/hosts'
    /// for a name the explicit table does not have.
    pub fn lookup(&self, name: &str) -> Option<Ipv4Addr> {
        let key = normalize(name);
        if let Some(addr) = self.read().get(&key) {
            return Some(*addr);
        }
        if self.read6().contains_key(&key) {
            return None;
        }
        self.host_dns.hosts().names.get(&key).copied()
    }

    /// The IPv6 address the gateway answers for `name` (AAAA): the explicit table's
    /// (`--add-host`); else a built-in name's while its A record is the built-in one; else
    /// /etc/hosts', for a name the explicit table does not have (its other names are IPv4
    /// only, and win).
    pub fn lookup6(&self, name: &str) -> Option<Ipv6Addr> {
        let key = normalize(name);
        if let Some(addr) = self.read6().get(&key) {
            return Some(*addr);
        }
        if let Some(v4) = self.read().get(&key).copied() {
            return self.builtin_aaaa(&key, v4);
        }
        self.host_dns.hosts().names6.get(&key).copied()
    }

    /// The name of the PTR record of IPv6 address `addr`: a built-in name's, else the
    /// first in alphabetical order of the explicit table's, else /etc/hosts'.
    pub fn reverse6(&self, addr: Ipv6Addr) -> Option<String> {
        if let Some((name, _, _)) = self.builtin6.iter().find(|(n, _, a6)| *a6 == addr && self.lookup6(n) == Some(addr))
        {
            return Some(name.to_string());
        }
        if let Some((name, _)) = self.read6().iter().find(|(_, a)| **a == addr) {
            return Some(name.clone());
        }
        self.host_dns.hosts().ptr6.get(&addr).cloned()
    }

    /// The name of the PTR record of `addr`, if the gateway has one (see the module comment).
    pub fn reverse(&self, addr: Ipv4Addr) -> Option<String> {
        {
            let table = self.read();
            let preferred = HOST_NAMES.iter().chain(GATEWAY_NAMES).chain(PROXY_NAMES);
            if let Some(name) = preferred.into_iter().find(|n| table.get(**n) == Some(&addr)) {
                return Some(name.to_string());
            }
            if let Some((name, _)) = table.iter().find(|(_, a)| **a == addr) {
                return Some(name.clone());
            }
        }
        self.host_dns.hosts().ptr.get(&addr).cloned()
    }

    /// The live DNS configuration the hosts table comes from.
    pub fn host_dns(&self) -> &HostDns {
        &self.host_dns
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Ipv4Addr>> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read6(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Ipv6Addr>> {
        self.table6.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write6(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Ipv6Addr>> {
        self.table6.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// The addresses the IP of an `--add-host` record or of a `POST /v1/dns` stands for, as
/// Docker reads `--add-host`'s: an IPv4 or IPv6 address, in brackets or not
/// (`[fd00::5]`), or `host-gateway`, the host's addresses (`host_addresses`: IPv4 and IPv6
/// when the network has both, a record each, as Docker 28's host-gateway is its default
/// bridge's IPv4 and IPv6 gateways). None: `ip` is neither.
pub fn record_addresses(ip: &str, host_addresses: &[IpAddr]) -> Option<Vec<IpAddr>> {
    if ip == "host-gateway" {
        return Some(host_addresses.to_vec());
    }
    let bare = ip.strip_prefix('[').and_then(|i| i.strip_suffix(']')).unwrap_or(ip);
    bare.parse().ok().map(|ip| vec![ip])
}

/// A record's name as the table keys it: lower case, without a trailing dot.
pub fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The table's key for a record of `name`, or why `name` cannot have one.
fn record_key(name: &str) -> Result<String, DnsError> {
    let key = normalize(name);
    if key.is_empty() || key.len() > 253 || Name::from_ascii(&key).is_err() {
        return Err(DnsError::InvalidName(name.to_string()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::dns::hosts::parse_hosts;

    #[test]
    fn built_in_names_have_aaaa_while_their_a_is_built_in() {
        let cfg = NetConfig::default();
        let net = cfg.v6.unwrap();
        let r = DnsRecords::from_config(&cfg);
        assert_eq!(r.lookup6("host.docker.internal"), Some(net.host));
        assert_eq!(r.lookup6("host.containers.internal"), Some(net.host));
        assert_eq!(r.lookup6("gateway.docker.internal"), Some(net.gateway));
        assert_eq!(
            r.lookup6("http.docker.internal"),
            Some(crate::config::Ipv6Net::default().gateway),
            "the explicit proxy's name"
        );
        assert_eq!(r.reverse6(net.host).as_deref(), Some("host.docker.internal"));
        r.add("host.docker.internal", Ipv4Addr::new(10, 1, 2, 3)).unwrap();
        assert_eq!(r.lookup6("host.docker.internal"), None, "replaced: no AAAA left behind");
        assert_eq!(r.lookup6("host.containers.internal"), Some(net.host));
        let v4_only = DnsRecords::from_config(&NetConfig { v6: None, ..NetConfig::default() });
        assert_eq!(v4_only.lookup6("host.docker.internal"), None);
    }

    #[test]
    fn records_table() {
        let r = DnsRecords::new();
        r.add("Foo.Example.", Ipv4Addr::new(1, 2, 3, 4)).unwrap();
        assert_eq!(r.lookup("foo.example"), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(r.lookup("FOO.EXAMPLE."), Some(Ipv4Addr::new(1, 2, 3, 4)));
        assert_eq!(r.get("FOO.EXAMPLE."), vec![IpAddr::V4(Ipv4Addr::new(1, 2, 3, 4))]);
        assert_eq!(r.list(), vec![("foo.example".into(), Ipv4Addr::new(1, 2, 3, 4).into())]);
        assert!(r.add("", Ipv4Addr::LOCALHOST).is_err());
        assert!(r.add(&"a".repeat(300), Ipv4Addr::LOCALHOST).is_err());
        assert!(r.remove("foo.EXAMPLE"));
        assert!(!r.remove("foo.example"));
        assert_eq!(r.lookup("foo.example"), None);
    }

    #[test]
    fn hosts_file_behind_the_explicit_table() {
        let cfg = NetConfig {
            extra_hosts: vec![("db.corp".into(), Ipv4Addr::new(10, 9, 9, 9).into())],
            ..NetConfig::default()
        };
        let r = DnsRecords::from_config(&cfg);
        assert_eq!(r.lookup("mybox"), None);
        let mut table = parse_hosts("127.0.1.1 mybox\n10.0.0.5 db.corp\n10.0.0.6 files.corp\n", Some(cfg.host));
        table.path = Some("/etc/hosts".into());
        cfg.host_dns.set_hosts(table);
        // Read live: no new DnsRecords needed.
        assert_eq!(r.lookup("MyBox."), Some(cfg.host));
        assert_eq!(r.lookup("files.corp"), Some(Ipv4Addr::new(10, 0, 0, 6)));
        // --add-host wins over /etc/hosts, and so does a record added at run time.
        assert_eq!(r.lookup("db.corp"), Some(Ipv4Addr::new(10, 9, 9, 9)));
        r.add("files.corp", Ipv4Addr::new(10, 8, 8, 8)).unwrap();
        assert_eq!(r.lookup("files.corp"), Some(Ipv4Addr::new(10, 8, 8, 8)));
        // ...and the API's own view is the explicit table only.
        assert!(r.get("mybox").is_empty());
        assert!(!r.list().iter().any(|(n, _)| n == "mybox"));
        assert!(!r.remove("mybox"));
        assert_eq!(r.lookup("mybox"), Some(cfg.host));
        cfg.host_dns.set_hosts(Default::default());
        assert_eq!(r.lookup("mybox"), None);
    }

    /// `--add-host NAME:IPV6` gives an AAAA record, and no A record (not /etc/hosts' either),
    /// unless an IPv4 one is added too; it wins over a built-in name's AAAA; it has a PTR.
    #[test]
    fn ipv6_extra_hosts() {
        let v6: Ipv6Addr = "fd00::5".parse().unwrap();
        let cfg = NetConfig {
            extra_hosts: vec![
                ("bar.test".into(), v6.into()),
                ("both.test".into(), Ipv4Addr::new(10, 1, 2, 3).into()),
                ("both.test".into(), "fd00::6".parse().unwrap()),
                ("host.docker.internal".into(), "fd00::7".parse().unwrap()),
            ],
            ..NetConfig::default()
        };
        let r = DnsRecords::from_config(&cfg);
        cfg.host_dns.set_hosts(parse_hosts("10.0.0.5 bar.test\n", Some(cfg.host)));
        assert_eq!(r.lookup6("Bar.Test."), Some(v6));
        assert_eq!(r.lookup("bar.test"), None, "no A record, not /etc/hosts' either");
        assert_eq!(r.lookup("both.test"), Some(Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(r.lookup6("both.test"), Some("fd00::6".parse().unwrap()));
        assert_eq!(r.lookup6("host.docker.internal"), Some("fd00::7".parse().unwrap()));
        assert_eq!(r.lookup("host.docker.internal"), Some(cfg.host));
        assert_eq!(r.reverse6(v6).as_deref(), Some("bar.test"));
        assert!(r.remove("bar.test"));
        assert_eq!(r.lookup6("bar.test"), None);
        assert_eq!(r.lookup("bar.test"), Some(Ipv4Addr::new(10, 0, 0, 5)));
    }

    /// `list` and `get` show both families: a name with an A and an AAAA record twice, A
    /// first; a name with an AAAA record only once; the built-in names' AAAA records while
    /// their A record is the built-in one. `remove` takes both.
    #[test]
    fn list_and_get_show_both_families() {
        let cfg = NetConfig {
            extra_hosts: vec![
                ("zz.test".into(), Ipv4Addr::new(10, 1, 2, 3).into()),
                ("both.test".into(), "fd00::6".parse().unwrap()),
                ("both.test".into(), Ipv4Addr::new(10, 1, 2, 4).into()),
                ("six.test".into(), "fd00::5".parse().unwrap()),
            ],
            ..NetConfig::default()
        };
        let net = cfg.v6.unwrap();
        let r = DnsRecords::from_config(&cfg);
        let both: Vec<IpAddr> = vec![Ipv4Addr::new(10, 1, 2, 4).into(), "fd00::6".parse().unwrap()];
        assert_eq!(r.get("Both.Test."), both);
        assert_eq!(r.get("six.test"), vec!["fd00::5".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.get("host.docker.internal"), vec![IpAddr::V4(cfg.host), IpAddr::V6(net.host)]);
        assert!(r.get("nothing.test").is_empty());

        let list = r.list();
        let of = |name: &str| list.iter().filter(|(n, _)| n == name).map(|(_, a)| *a).collect::<Vec<_>>();
        assert_eq!(of("both.test"), both);
        assert_eq!(of("six.test"), vec!["fd00::5".parse::<IpAddr>().unwrap()]);
        assert_eq!(of("zz.test"), vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]);
        assert_eq!(of("gateway.docker.internal"), vec![IpAddr::V4(cfg.gateway), IpAddr::V6(net.gateway)]);
        let names: Vec<&str> = list.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.is_sorted(), "{names:?}");

        // A built-in name given another IPv4 address has no AAAA record left to list.
        r.add("host.docker.internal", Ipv4Addr::new(10, 9, 9, 9)).unwrap();
        assert_eq!(r.get("host.docker.internal"), vec![IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9))]);

        assert!(r.remove("both.test"));
        assert!(r.get("both.test").is_empty());
        assert!(!r.list().iter().any(|(n, _)| n == "both.test"));
        assert_eq!((r.lookup("both.test"), r.lookup6("both.test")), (None, None));
        assert!(r.remove("gateway.docker.internal"));
        assert_eq!(r.lookup6("gateway.docker.internal"), None, "the built-in AAAA goes with its A");
    }

    /// An address of either family, bracketed or not, or host-gateway for each of the
    /// host's; anything else is none.
    #[test]
    fn record_addresses_as_docker_reads_them() {
        let host: Vec<IpAddr> = vec![Ipv4Addr::new(192, 168, 65, 254).into(), "fd75:7365:726e::254".parse().unwrap()];
        let one = |ip: &str| record_addresses(ip, &host);
        assert_eq!(one("10.1.2.3"), Some(vec![Ipv4Addr::new(10, 1, 2, 3).into()]));
        assert_eq!(one("[10.1.2.3]"), Some(vec![Ipv4Addr::new(10, 1, 2, 3).into()]));
        assert_eq!(one("fd00::5"), Some(vec!["fd00::5".parse().unwrap()]));
        assert_eq!(one("[fd00::5]"), Some(vec!["fd00::5".parse().unwrap()]));
        assert_eq!(one("host-gateway"), Some(host.clone()));
        assert_eq!(record_addresses("host-gateway", &host[1..]), Some(host[1..].to_vec()));
        for bad in ["", "1.2.3", "[fd00::5", "fd00::5]", "[]", "fd00::5%eth0", "Host-Gateway", "b:10.1.2.3"] {
            assert_eq!(one(bad), None, "{bad:?}");
        }
        let cfg = NetConfig::default();
        assert_eq!(cfg.host_addresses(), vec![IpAddr::V4(cfg.host), IpAddr::V6(cfg.v6.unwrap().host)]);
        let v4_only = NetConfig { v6: None, ..NetConfig::default() };
        assert_eq!(v4_only.host_addresses(), vec![IpAddr::V4(cfg.host)]);
        let v6_only = NetConfig { ipv4: false, ..NetConfig::default() };
        assert_eq!(v6_only.host_addresses(), vec![IpAddr::V6(cfg.v6.unwrap().host)]);
    }

    #[test]
    fn reverse_names() {
        let cfg = NetConfig {
            extra_hosts: vec![
                ("zz.test".into(), Ipv4Addr::new(10, 1, 2, 3).into()),
                ("aa.test".into(), Ipv4Addr::new(10, 1, 2, 3).into()),
            ],
            ..NetConfig::default()
        };
        let r = DnsRecords::from_config(&cfg);
        cfg.host_dns.set_hosts(parse_hosts("10.0.0.5 db.corp\n10.1.2.3 hidden\n", Some(cfg.host)));
        assert_eq!(r.reverse(cfg.host).as_deref(), Some("host.docker.internal"));
        assert_eq!(r.reverse(cfg.gateway).as_deref(), Some("gateway.docker.internal"));
        assert_eq!(r.reverse(Ipv4Addr::new(10, 1, 2, 3)).as_deref(), Some("aa.test"));
        assert_eq!(r.reverse(Ipv4Addr::new(10, 0, 0, 5)).as_deref(), Some("db.corp"));
        assert_eq!(r.reverse(Ipv4Addr::new(10, 0, 0, 99)), None);
    }
}
