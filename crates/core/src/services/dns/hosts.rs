//! The host's /etc/hosts as the gateway answers it: text in, [`HostsTable`] out, no I/O.
//!
//! hosts(5): one address per line followed by its names (the first is the canonical name),
//! `#` starts a comment. The guest gets, for each name:
//!
//! - the name's first IPv4 address in the file (glibc's order), as an A record;
//! - a loopback address (127.0.0.0/8: `127.0.0.1`, Debian's `127.0.1.1` for the machine's own
//!   name) becomes the host address (192.168.65.254), since that is how a guest reaches the
//!   host's loopback: the machine's name resolves in the guest to the machine, as Docker
//!   Desktop and gvisor-tap-vsock have it (when the host address does not reach the host's
//!   loopback, slirp4netns's `--disable-host-loopback`, such names are left out);
//! - other IPv4 addresses as they are (the guest dials them from the host);
//! - names that mean "this machine's loopback" wherever they are resolved (`localhost`,
//!   `*.localhost`, `localhost.localdomain`, `localhost4`, `localhost6`, `ip6-localhost`,
//!   `ip6-loopback`) are left out: in a guest they must stay the guest's own loopback;
//! - a name's first global IPv6 address, as an AAAA record, as the host's own resolver
//!   answers it (and as AAAA answers are forwarded for every other name): loopback (`::1`),
//!   link-local (which needs the host's zone) and multicast lines are left out. A name with
//!   only IPv6 addresses gets no A record (its A query gets NOERROR with no answer).
//!
//! PTR: each IPv4 address that is not loopback, and each IPv6 address kept, gets the first
//! name of its first line.

use std::net::{IpAddr, Ipv4Addr};

use crate::config::HostsTable;

/// Longest hosts file read (larger files are cut here).
pub const MAX_HOSTS_FILE: usize = 16 << 20;

/// The table of `text` (an /etc/hosts file); `host` is what loopback addresses become (None:
/// their lines are left out).
pub fn parse_hosts(text: &str, host: Option<Ipv4Addr>) -> HostsTable {
    let mut table = HostsTable::default();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let Some(addr) = words.next().and_then(parse_addr) else {
            continue;
        };
        let v4 = match addr {
            IpAddr::V4(v4) => v4,
            IpAddr::V6(v6) => {
                add_v6(&mut table, v6, words);
                continue;
            }
        };
        let loopback = v4.is_loopback();
        let guest_addr = match (loopback, host) {
            (false, _) => v4,
            (true, Some(host)) => host,
            (true, None) => continue,
        };
        let mut first = true;
        for name in words.filter_map(normalize_name) {
            if is_loopback_name(&name) {
                continue;
            }
            if first && !loopback {
                table.ptr.entry(v4).or_insert_with(|| name.clone());
            }
            first = false;
            table.names.entry(name).or_insert(guest_addr);
        }
    }
    table
}

/// The names of an IPv6 line, when its address is one a guest could be given.
fn add_v6<'a>(table: &mut HostsTable, v6: std::net::Ipv6Addr, words: impl Iterator<Item = &'a str>) {
    let link_local = v6.segments()[0] & 0xffc0 == 0xfe80;
    if v6.is_loopback() || v6.is_unspecified() || v6.is_multicast() || link_local {
        return;
    }
    let mut first = true;
    for name in words.filter_map(normalize_name) {
        if is_loopback_name(&name) {
            continue;
        }
        if first {
            table.ptr6.entry(v6).or_insert_with(|| name.clone());
        }
        first = false;
        table.names6.entry(name).or_insert(v6);
    }
}

/// An address word: IPv4, or IPv6 with an optional `%zone`.
fn parse_addr(word: &str) -> Option<IpAddr> {
    let addr = word.split_once('%').map_or(word, |(a, _)| a);
    addr.parse().ok()
}

/// Lower case without the trailing dot, when it is a valid DNS name.
pub fn normalize_name(word: &str) -> Option<String> {
    let name = word.trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|l| !l.is_empty() && l.len() <= 63)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    valid.then_some(name)
}

/// Names that stand for the resolving machine's own loopback (RFC 6761 and the usual
/// distribution entries).
pub fn is_loopback_name(name: &str) -> bool {
    name == "localhost"
        || name.ends_with(".localhost")
        || name.starts_with("localhost.")
        || name.starts_with("localhost4")
        || name.starts_with("localhost6")
        || name == "ip6-localhost"
        || name == "ip6-loopback"
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 254);

    #[test]
    fn debian_default_file() {
        let t = parse_hosts(
            "127.0.0.1\tlocalhost\n\
             127.0.1.1\tbuild01.corp.example\tbuild01\n\
             \n\
             # The following lines are desirable for IPv6 capable hosts\n\
             ::1     localhost ip6-localhost ip6-loopback\n\
             ff02::1 ip6-allnodes\n\
             ff02::2 ip6-allrouters\n",
            Some(HOST),
        );
        let mut names: Vec<_> = t.names.iter().map(|(n, a)| (n.as_str(), *a)).collect();
        names.sort();
        assert_eq!(names, vec![("build01", HOST), ("build01.corp.example", HOST)]);
        // Loopback lines give no PTR: the host address's PTR is the gateway's own name.
        assert!(t.ptr.is_empty());
        // ::1 and the multicast lines give the guest nothing.
        assert!(t.names6.is_empty() && t.ptr6.is_empty(), "{:?}", t.names6);
    }

    #[test]
    fn other_addresses_first_wins_and_ptr() {
        let t = parse_hosts(
            "10.0.0.5 DB.corp.example. db # the database\n\
             10.0.0.6 db other\n\
             10.0.0.5 alias5\n\
             0.0.0.0 ads.example\n\
             2001:db8::1 db six-only\n\
             fe80::1%eth0 linklocal\n\
             bogus line here\n\
             10.0.0.7\n\
             10.0.0.8 bad/name good8\n\
             # 10.0.0.9 commented\n",
            Some(HOST),
        );
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        assert_eq!(t.names.get("db.corp.example"), Some(&ip("10.0.0.5")));
        assert_eq!(t.names.get("db"), Some(&ip("10.0.0.5")));
        assert_eq!(t.names.get("other"), Some(&ip("10.0.0.6")));
        assert_eq!(t.names.get("alias5"), Some(&ip("10.0.0.5")));
        assert_eq!(t.names.get("ads.example"), Some(&ip("0.0.0.0")));
        assert_eq!(t.names.get("good8"), Some(&ip("10.0.0.8")));
        assert_eq!(t.names.get("six-only"), None);
        assert_eq!(t.names.get("linklocal"), None);
        let six: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
        assert_eq!(t.names6.get("six-only"), Some(&six));
        assert_eq!(t.names6.get("db"), Some(&six), "a name may have both");
        assert_eq!(t.names6.get("linklocal"), None, "link-local needs the host's zone");
        assert_eq!(t.ptr6.get(&six).map(String::as_str), Some("db"));
        assert_eq!(t.names.get("commented"), None);
        assert_eq!(t.names.len(), 6);
        assert_eq!(t.ptr.get(&ip("10.0.0.5")).map(String::as_str), Some("db.corp.example"));
        assert_eq!(t.ptr.get(&ip("10.0.0.6")).map(String::as_str), Some("db"));
        assert_eq!(t.ptr.get(&ip("10.0.0.8")).map(String::as_str), Some("good8"));
    }

    #[test]
    fn loopback_names_are_left_out() {
        let t = parse_hosts(
            "127.0.0.1 localhost localhost.localdomain localhost4 localhost4.localdomain4 app.localhost mybox\n\
             127.0.0.53 resolver.local\n\
             10.1.1.1 localhost\n",
            Some(HOST),
        );
        let mut names: Vec<_> = t.names.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, vec!["mybox", "resolver.local"]);
        assert!(t.names.values().all(|a| *a == HOST));
    }

    #[test]
    fn without_host_loopback() {
        let t = parse_hosts("127.0.1.1 mybox\n10.0.0.5 db\n", None);
        assert_eq!(t.names.len(), 1);
        assert_eq!(t.names.get("db"), Some(&Ipv4Addr::new(10, 0, 0, 5)));
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(normalize_name("Foo.Example."), Some("foo.example".into()));
        assert_eq!(normalize_name("a..b"), None);
        assert_eq!(normalize_name(&"x".repeat(64)), None);
        assert_eq!(normalize_name("."), None);
        assert_eq!(normalize_name("under_score"), Some("under_score".into()));
    }

    proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in "[ -~\t\n#%:.]{0,400}") {
            let t = parse_hosts(&text, Some(HOST));
            prop_assert!(t.names.values().all(|a| !a.is_loopback()));
        }
    }
}
