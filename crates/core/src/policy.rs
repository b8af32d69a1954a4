//! The egress policy: which destinations a guest may reach (`--allow`, `--deny`,
//! `--allow-domain`, `PUT /v1/policy`).
//!
//! Rules are `CIDR[:PORTS]`: `10.0.0.0/8`, `203.0.113.7` (a /32), `10.1.0.0/16:80,443`,
//! `192.0.2.0/24:8000-8099,22`, and IPv6 in brackets when ports follow
//! (`[2001:db8::/32]:443`, or `2001:db8::/32` without ports). A rule without ports matches
//! every protocol; a rule with ports matches TCP and UDP to those ports only (never ICMP).
//!
//! Deciding one destination (address and port, as the host dials it):
//! 1. a deny rule that matches denies it (deny always wins);
//! 2. with no allow rule and no allow-domain, everything else is allowed;
//! 3. otherwise it is allowed only when an allow rule matches, or the address was learnt
//!    from a DNS answer for an allow-domain (below); everything else is denied.
//!
//! What is checked: the destination the host really dials. The host address (192.168.65.254,
//! and the IPv6 one, ::254 of the prefix) is checked as 127.0.0.1 (`--deny 127.0.0.1/32` closes it as `--no-host-loopback` does,
//! `--deny 127.0.0.1:5432` one port of it; with allow rules the host is reachable only if
//! one covers 127.0.0.1). The gateway's own services (DNS, DHCP, ping, the explicit proxy's
//! port, the API inside the guest network) are never subject to the policy, nor is traffic
//! between guests of one network (the switch). The loopback guard of engine/dial.rs comes
//! before the policy and is counted with it (reason `loopback`).
//!
//! `--allow-domain NAME` allows NAME and every name below it. When the gateway's DNS
//! forwards an answer to a question for such a name, the A and AAAA addresses of its answer
//! section (CNAME targets' included) join a dynamic allow set for the records' TTL, at least
//! [`MIN_LEARNT_TTL`] and at most [`MAX_LEARNT_TTL`]; the set holds at most [`MAX_LEARNT`]
//! addresses (the one that expires first makes room; said once in the log). The HTTP proxy,
//! which resolves names itself, checks the name against the allow-domains directly.
//!
//! Publishing: a published port's clients are chosen by its listen address (`-p
//! 127.0.0.1:8080:80`), not by the allow rules, but a deny rule without ports also refuses
//! them ([`Policy::denies_peer`]: a connection from such a client is reset, its datagrams are
//! dropped): `--deny 10.0.0.0/8` keeps the guest and that network apart both ways. The
//! guest's answers to its clients are no new flows; a datagram from a published UDP port to
//! anyone else is one, judged as any.
//!
//! Changes (`Policy::set_rules`) apply to new flows, connections and proxy requests;
//! flows already open keep going. Learnt addresses whose name is no longer covered by an
//! allow-domain are forgotten at the change.
//!
//! Cost: the engine asks once per new flow, never per packet; with no rule at all that is
//! one atomic load. Each denial is counted per protocol and reason (`/metrics`), and logged
//! once per (protocol, destination), at most [`MAX_LOGGED`] destinations.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Shortest time a learnt address stays allowed, whatever its record's TTL (a guest's
/// resolver or application may use an answer a little longer than its TTL).
pub const MIN_LEARNT_TTL: Duration = Duration::from_secs(300);
/// Longest time a learnt address stays allowed without being seen again in an answer.
pub const MAX_LEARNT_TTL: Duration = Duration::from_secs(86400);
/// Learnt addresses kept at once.
pub const MAX_LEARNT: usize = 4096;
/// Denied destinations remembered so that each is logged once.
pub const MAX_LOGGED: usize = 1024;

/// Why a rule, a domain or a whole policy could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("invalid rule {0:?}: {1}")]
    Rule(String, String),
    #[error("invalid domain {0:?}: {1}")]
    Domain(String, &'static str),
}

/// An address block, IPv4 or IPv6 (host bits cleared).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Cidr> {
        let addr = canonical(addr);
        match addr {
            IpAddr::V4(a) if prefix <= 32 => {
                let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
                Some(Cidr { addr: IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask)), prefix })
            }
            IpAddr::V6(a) if prefix <= 128 => {
                let mask = if prefix == 0 { 0 } else { u128::MAX << (128 - prefix) };
                Some(Cidr { addr: IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask)), prefix })
            }
            _ => None,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u32::MAX << (32 - self.prefix) };
                u32::from(a) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = if self.prefix == 0 { 0 } else { u128::MAX << (128 - self.prefix) };
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("{addr:?} is not an IP address"))?;
        let addr = canonical(addr);
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => {
                p.parse::<u8>().map_err(|_| format!("prefix /{p} is too long"))?
            }
            Some(p) => return Err(format!("prefix /{p} is not a number")),
        };
        Cidr::new(addr, prefix).ok_or_else(|| format!("prefix /{prefix} is longer than /{max}"))
    }
}

/// An IPv6 address that carries an IPv4 one as that IPv4 address: IPv4-mapped, and the
/// NAT64 well-known prefix 64:ff9b::/96 (RFC 6052), which a NAT64 on the host's path turns
/// into that IPv4 address (so `--deny 10.0.0.0/8` covers 64:ff9b::a00:1 too); anything
/// else as it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
            IpAddr::V4(Ipv4Addr::from(u128::from(v6) as u32))
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One rule: an address block and, optionally, ports (inclusive ranges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub net: Cidr,
    /// Empty: every port and every protocol.
    pub ports: Vec<(u16, u16)>,
}

impl Rule {
    /// Does it match `ip` and `port` (None: ICMP, which only a rule without ports matches)?
    pub fn matches(&self, ip: IpAddr, port: Option<u16>) -> bool {
        self.net.contains(ip)
            && (self.ports.is_empty()
                || port.is_some_and(|p| self.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&p))))
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let full = self.net.addr.is_ipv4() && self.net.prefix == 32 || self.net.prefix == 128;
        let net = if full { self.net.addr.to_string() } else { self.net.to_string() };
        if self.ports.is_empty() {
            return f.write_str(&net);
        }
        if self.net.addr.is_ipv4() {
            write!(f, "{net}:")?
        } else {
            write!(f, "[{net}]:")?
        }
        for (i, (lo, hi)) in self.ports.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi { write!(f, "{lo}")? } else { write!(f, "{lo}-{hi}")? }
        }
        Ok(())
    }
}

impl FromStr for Rule {
    type Err = PolicyError;
    fn from_str(raw: &str) -> Result<Rule, PolicyError> {
        let bad = |why: String| PolicyError::Rule(raw.to_string(), why);
        let s = raw.trim();
        if s.is_empty() {
            return Err(bad("empty".into()));
        }
        let (net, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (net, after) = rest.split_once(']').ok_or_else(|| bad("no closing ]".into()))?;
            match after {
                "" => (net, None),
                _ => (net, Some(after.strip_prefix(':').ok_or_else(|| bad("want :PORTS after ]".into()))?)),
            }
        } else if s.parse::<Cidr>().is_ok() {
            (s, None)
        } else {
            match s.rsplit_once(':') {
                // IPv4 with ports; an IPv6 block with ports needs brackets.
                Some((net, ports)) if !net.contains(':') => (net, Some(ports)),
                Some(_) => return Err(bad("an IPv6 block with ports is written [CIDR]:PORTS".into())),
                None => (s, None),
            }
        };
        let net: Cidr = net.parse().map_err(bad)?;
        let ports = match ports {
            None => Vec::new(),
            Some(p) => parse_ports(p).map_err(bad)?,
        };
        Ok(Rule { net, ports })
    }
}

/// `N`, `N-M`, or a comma list of those; port 0 is no port.
fn parse_ports(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let port = |p: &str| -> Result<u16, String> {
        match p.trim().parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("invalid port {:?} (want 1-65535)", p.trim())),
            Ok(n) => Ok(n),
        }
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let range = match part.split_once('-') {
            Some((lo, hi)) => (port(lo)?, port(hi)?),
            None => {
                let p = port(part)?;
                (p, p)
            }
        };
        if range.0 > range.1 {
            return Err(format!("invalid port range {part:?} (first above last)"));
        }
        out.push(range);
    }
    Ok(out)
}

/// A domain of `--allow-domain`: lower case, no trailing dot; `*.name` and `.name` mean
/// `name` (which already covers every name below it).
pub fn normalize_domain(raw: &str) -> Result<String, PolicyError> {
    let bad = |why| PolicyError::Domain(raw.to_string(), why);
    let s = raw.trim().trim_end_matches('.').to_ascii_lowercase();
    let s = s.strip_prefix("*.").or_else(|| s.strip_prefix('.')).unwrap_or(&s).to_string();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    for label in s.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("a label is empty or longer than 63 characters"));
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(bad("only letters, digits, '-' and '_' in a name"));
        }
    }
    if s.parse::<IpAddr>().is_ok() {
        return Err(bad("an address, not a name (use --allow)"));
    }
    Ok(s)
}

/// `name` is `domain` or below it (both normalized).
fn under(name: &str, domain: &str) -> bool {
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

/// A whole rule set, as the command line and `PUT /v1/policy` give it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub allow: Vec<Rule>,
    pub deny: Vec<Rule>,
    /// Normalized (see [`normalize_domain`]).
    pub allow_domains: Vec<String>,
}

impl Rules {
    /// Parses the three lists; the first bad entry is the error.
    pub fn parse<S: AsRef<str>>(allow: &[S], deny: &[S], allow_domains: &[S]) -> Result<Rules, PolicyError> {
        let rules = |list: &[S]| list.iter().map(|r| r.as_ref().parse::<Rule>()).collect::<Result<Vec<_>, _>>();
        let mut domains = Vec::new();
        for d in allow_domains {
            let d = normalize_domain(d.as_ref())?;
            if !domains.contains(&d) {
                domains.push(d);
            }
        }
        Ok(Rules { allow: rules(allow)?, deny: rules(deny)?, allow_domains: domains })
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty() && self.allow_domains.is_empty()
    }

    /// Whether what no rule allows is denied (any allow rule or allow-domain).
    pub fn default_deny(&self) -> bool {
        !self.allow.is_empty() || !self.allow_domains.is_empty()
    }

    /// Does an allow-domain cover `name` (any case, trailing dot or not)?
    pub fn allows_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.allow_domains.iter().any(|d| under(&name, d))
    }
}

/// One line for logs: `allow=[..] deny=[..] allow_domains=[..]`.
pub fn describe(rules: &Rules) -> String {
    let list = |v: Vec<String>| v.join(",");
    format!(
        "allow=[{}] deny=[{}] allow_domains=[{}]",
        list(rules.allow.iter().map(Rule::to_string).collect()),
        list(rules.deny.iter().map(Rule::to_string).collect()),
        rules.allow_domains.join(",")
    )
}

/// Why a destination was denied (the `reason` label of `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DenyReason {
    /// A `--deny` rule matched.
    DenyRule,
    /// Allow rules or allow-domains are set, and none covers it.
    NotAllowed,
    /// The host's loopback addressed directly, or the host address closed
    /// (`--no-host-loopback`): the guard of engine/dial.rs.
    Loopback,
}

impl DenyReason {
    pub const ALL: [DenyReason; 3] = [DenyReason::DenyRule, DenyReason::NotAllowed, DenyReason::Loopback];

    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyRule => "deny_rule",
            DenyReason::NotAllowed => "not_allowed",
            DenyReason::Loopback => "loopback",
        }
    }

    /// Why, in words (log lines, the proxy's 403).
    pub fn explain(self) -> &'static str {
        match self {
            DenyReason::DenyRule => "a --deny rule matches",
            DenyReason::NotAllowed => "no --allow rule or --allow-domain covers it",
            DenyReason::Loopback => "the host's loopback",
        }
    }
}

/// What asked (the `proto` label of `/metrics`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Via {
    Tcp,
    Udp,
    Icmp,
    /// The HTTP proxy (explicit or transparent).
    Proxy,
    /// A client of a published port (a `--deny` rule without ports).
    Publish,
}

impl Via {
    pub const ALL: [Via; 5] = [Via::Tcp, Via::Udp, Via::Icmp, Via::Proxy, Via::Publish];

    pub fn as_str(self) -> &'static str {
        match self {
            Via::Tcp => "tcp",
            Via::Udp => "udp",
            Via::Icmp => "icmp",
            Via::Proxy => "proxy",
            Via::Publish => "publish",
        }
    }
}

/// The decision for one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(DenyReason),
}

/// One learnt address: until when, and the name whose answer gave it.
#[derive(Clone, Debug)]
struct Learnt {
    until: Instant,
    name: Arc<str>,
}

/// The live policy, shared by the engine, the services and the API (`NetConfig::policy`).
pub struct Policy {
    rules: RwLock<Arc<Rules>>,
    /// Any rule at all: false skips every lock (the default).
    active: AtomicBool,
    learnt: Mutex<HashMap<IpAddr, Learnt>>,
    told_learnt_full: AtomicBool,
    denied: [[AtomicU64; DenyReason::ALL.len()]; Via::ALL.len()],
    logged: Mutex<HashSet<(Via, String)>>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy::new(Rules::default())
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy").field("rules", &self.rules()).finish_non_exhaustive()
    }
}

/// A learnt address as `GET /v1/policy` shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LearntView {
    pub ip: IpAddr,
    pub name: String,
    pub expires_in: Duration,
}

impl Policy {
    pub fn new(rules: Rules) -> Policy {
        Policy {
            active: AtomicBool::new(!rules.is_empty()),
            rules: RwLock::new(Arc::new(rules)),
            learnt: Mutex::new(HashMap::new()),
            told_learnt_full: AtomicBool::new(false),
            denied: Default::default(),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// The rules in force.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the rules (new flows follow them at once); returns the old ones. Learnt
    /// addresses stay only where an allow-domain still covers their name.
    pub fn set_rules(&self, rules: Rules) -> Arc<Rules> {
        let rules = Arc::new(rules);
        {
            let mut learnt = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
            learnt.retain(|_, l| rules.allows_name(&l.name));
        }
        self.active.store(!rules.is_empty(), Ordering::Release);
        std::mem::replace(&mut *self.rules.write().unwrap_or_else(|e| e.into_inner()), rules)
    }

    /// Whether any rule is set.
    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// The decision for `ip` at `port` (None for ICMP), as the host would dial it.
    pub fn check(&self, ip: IpAddr, port: Option<u16>) -> Verdict {
        if !self.is_active() {
            return Verdict::Allow;
        }
        self.check_at(ip, port, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, port: Option<u16>, now: Instant) -> Verdict {
        let ip = canonical(ip);
        let rules = self.rules();
        if rules.deny.iter().any(|r| r.matches(ip, port)) {
            return Verdict::Deny(DenyReason::DenyRule);
        }
        if !rules.default_deny() || rules.allow.iter().any(|r| r.matches(ip, port)) {
            return Verdict::Allow;
        }
        if !rules.allow_domains.is_empty() {
            let learnt = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
            if learnt.get(&ip).is_some_and(|l| l.until > now) {
                return Verdict::Allow;
            }
        }
        Verdict::Deny(DenyReason::NotAllowed)
    }

    /// The decision for a destination given by name (the proxy): deny rules on `ip` (when
    /// known) win; then an allow-domain covering `name` allows it; then `ip` as [`check`].
    /// Without an address, a name no allow-domain covers is denied only when the policy
    /// denies by default.
    ///
    /// [`check`]: Policy::check
    pub fn check_name(&self, name: &str, ip: Option<IpAddr>, port: u16) -> Verdict {
        if !self.is_active() {
            return Verdict::Allow;
        }
        let rules = self.rules();
        if let Some(ip) = ip
            && rules.deny.iter().any(|r| r.matches(canonical(ip), Some(port)))
        {
            return Verdict::Deny(DenyReason::DenyRule);
        }
        if rules.allows_name(name) {
            return Verdict::Allow;
        }
        match ip {
            Some(ip) => self.check(ip, Some(port)),
            None if rules.default_deny() => Verdict::Deny(DenyReason::NotAllowed),
            None => Verdict::Allow,
        }
    }

    /// Whether a client at `ip` is refused by a published port: a deny rule without ports
    /// covers it (a rule with ports names services of the destination; allow rules and
    /// allow-domains say where the guest may go, not who may reach its published ports).
    pub fn denies_peer(&self, ip: IpAddr) -> bool {
        self.is_active() && self.rules().deny.iter().any(|r| r.ports.is_empty() && r.net.contains(ip))
    }

    /// Whether the rules would want an address for `name` to decide (the proxy then looks
    /// it up): some rule is set and no allow-domain covers the name.
    pub fn needs_address(&self, name: &str) -> bool {
        self.is_active() && !self.rules().allows_name(name)
    }

    /// A DNS answer to a question for `name` was forwarded to a guest, with these addresses
    /// and TTLs (seconds): when an allow-domain covers `name`, they join the allow set.
    pub fn learn(&self, name: &str, addrs: &[(IpAddr, u32)]) {
        if addrs.is_empty() || !self.is_active() {
            return;
        }
        let rules = self.rules();
        if !rules.allows_name(name) {
            return;
        }
        self.learn_at(name, addrs, Instant::now());
    }

    fn learn_at(&self, name: &str, addrs: &[(IpAddr, u32)], now: Instant) {
        let name: Arc<str> = name.trim_end_matches('.').to_ascii_lowercase().into();
        let mut learnt = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
        for (ip, ttl) in addrs {
            let ip = canonical(*ip);
            let until = now + Duration::from_secs(u64::from(*ttl)).clamp(MIN_LEARNT_TTL, MAX_LEARNT_TTL);
            if let Some(l) = learnt.get_mut(&ip) {
                l.until = l.until.max(until);
                l.name = name.clone();
                continue;
            }
            if learnt.len() >= MAX_LEARNT {
                learnt.retain(|_, l| l.until > now);
            }
            if learnt.len() >= MAX_LEARNT {
                if !self.told_learnt_full.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "{MAX_LEARNT} addresses learnt for --allow-domain: the one that expires first makes \
                         room for each new one (said once)"
                    );
                }
                if let Some(first) = learnt.iter().min_by_key(|(_, l)| l.until).map(|(ip, _)| *ip) {
                    learnt.remove(&first);
                }
            }
            learnt.insert(ip, Learnt { until, name: name.clone() });
        }
    }

    /// The learnt addresses still allowed, soonest to expire first.
    pub fn learnt(&self) -> Vec<LearntView> {
        let now = Instant::now();
        let learnt = self.learnt.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<LearntView> = learnt
            .iter()
            .filter(|(_, l)| l.until > now)
            .map(|(ip, l)| LearntView { ip: *ip, name: l.name.to_string(), expires_in: l.until - now })
            .collect();
        out.sort_by_key(|v| (v.expires_in, v.ip));
        out
    }

    /// Counts a denial and logs it, once per (`via`, `dst`); `guest` says who asked. `dst`
    /// is an address and port, or a name and port (the proxy).
    pub fn denied(&self, via: Via, reason: DenyReason, dst: impl fmt::Display, guest: Option<SocketAddr>) {
        self.count(via, reason);
        let what = dst.to_string();
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            let full = logged.len() >= MAX_LOGGED;
            let first = !full && logged.insert((via, what.clone()));
            if first && logged.len() == MAX_LOGGED {
                tracing::warn!("{MAX_LOGGED} destinations denied by the egress policy: further ones are not logged");
            }
            first
        };
        if first {
            let from = guest.map_or(String::new(), |g| format!(" from {g}"));
            tracing::warn!(
                "denied guest {}{from} to {what}: {} (egress policy); not logged again for this destination",
                via.as_str(),
                reason.explain()
            );
        }
    }

    /// Counts a denial without logging it (the loopback guard logs its own).
    pub fn count(&self, via: Via, reason: DenyReason) {
        self.denied[via as usize][reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Every (protocol, reason) counter, zeros included.
    pub fn denied_counts(&self) -> Vec<(Via, DenyReason, u64)> {
        Via::ALL
            .iter()
            .flat_map(|v| {
                DenyReason::ALL
                    .iter()
                    .map(move |r| (*v, *r, self.denied[*v as usize][*r as usize].load(Ordering::Relaxed)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(allow: &[&str], deny: &[&str], domains: &[&str]) -> Policy {
        Policy::new(Rules::parse(allow, deny, domains).unwrap())
    }

    #[test]
    fn rules_parse_and_print_back() {
        for (given, shown) in [
            ("10.0.0.0/8", "10.0.0.0/8"),
            ("10.1.2.3/8", "10.0.0.0/8"),
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.7/32", "203.0.113.7"),
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("10.0.0.0/8:80", "10.0.0.0/8:80"),
            ("10.0.0.0/8:80,443,8000-8099", "10.0.0.0/8:80,443,8000-8099"),
            ("203.0.113.7:22", "203.0.113.7:22"),
            (" 192.0.2.0/24 ", "192.0.2.0/24"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("2001:db8::1", "2001:db8::1"),
            ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("::ffff:10.0.0.1", "10.0.0.1"),
        ] {
            assert_eq!(rule(given).to_string(), shown, "{given}");
            assert_eq!(rule(shown), rule(given), "{shown} reads back");
        }
    }

    #[test]
    fn malformed_rules_are_errors() {
        for bad in [
            "",
            "  ",
            "10.0.0.0/33",
            "10.0.0.0/",
            "10.0.0.0/x",
            "10.0.0.0/-1",
            "10.0.0.0/0008",
            "10.0.0",
            "10.0.0.256",
            "example.com",
            "10.0.0.0/8:",
            "10.0.0.0/8:0",
            "10.0.0.0/8:65536",
            "10.0.0.0/8:80,",
            "10.0.0.0/8:90-80",
            "10.0.0.0/8:80-",
            "10.0.0.0/8:x",
            "10.0.0.0/8:80:90",
            "2001:db8::/129",
            "2001:db8::/32:443",
            "[2001:db8::/32",
            "[2001:db8::/32]443",
            "[2001:db8::/32]:",
            "[example]:80",
        ] {
            let r = bad.parse::<Rule>();
            assert!(matches!(r, Err(PolicyError::Rule(..))), "{bad:?} -> {r:?}");
        }
        let e = "10.0.0.0/33".parse::<Rule>().unwrap_err().to_string();
        assert_eq!(e, "invalid rule \"10.0.0.0/33\": prefix /33 is longer than /32");
    }

    #[test]
    fn matching_blocks_ports_and_protocols() {
        let r = rule("10.1.0.0/16:80,8000-8001");
        assert!(r.matches(ip("10.1.200.3"), Some(80)));
        assert!(r.matches(ip("10.1.0.0"), Some(8001)));
        assert!(!r.matches(ip("10.1.0.1"), Some(8002)));
        assert!(!r.matches(ip("10.2.0.1"), Some(80)));
        assert!(!r.matches(ip("10.1.0.1"), None), "a rule with ports never matches ICMP");
        let any = rule("10.1.0.0/16");
        assert!(any.matches(ip("10.1.0.1"), None) && any.matches(ip("10.1.0.1"), Some(1)));
        assert!(any.matches(ip("::ffff:10.1.0.1"), Some(5)), "IPv4-mapped is IPv4");
        assert!(!any.matches(ip("2001:db8::1"), Some(5)));
        assert!(rule("0.0.0.0/0").matches(ip("198.51.100.1"), None));
        assert!(!rule("0.0.0.0/0").matches(ip("2001:db8::1"), None));
        assert!(rule("2001:db8::/32").matches(ip("2001:db8:ffff::1"), Some(1)));
        assert!(!rule("2001:db8::/32").matches(ip("2001:db9::1"), Some(1)));
        // IPv6 forms of IPv4 addresses are judged as those: mapped, and NAT64's prefix.
        assert!(rule("10.0.0.0/8").matches(ip("::ffff:10.1.2.3"), None));
        assert!(rule("10.0.0.0/8").matches(ip("64:ff9b::a01:203"), None));
        assert!(!rule("10.0.0.0/8").matches(ip("64:ff9b:1::a01:203"), None));
    }

    #[test]
    fn precedence() {
        // No rule: everything.
        let p = Policy::default();
        assert!(!p.is_active());
        assert_eq!(p.check(ip("203.0.113.1"), Some(80)), Verdict::Allow);
        // Deny alone: the rest stays allowed.
        let p = policy(&[], &["203.0.113.0/24"], &[]);
        assert_eq!(p.check(ip("203.0.113.1"), Some(80)), Verdict::Deny(DenyReason::DenyRule));
        assert_eq!(p.check(ip("198.51.100.1"), Some(80)), Verdict::Allow);
        // Any allow: default deny; deny wins over allow.
        let p = policy(&["203.0.113.0/24", "198.51.100.1:53"], &["203.0.113.9"], &[]);
        assert_eq!(p.check(ip("203.0.113.1"), Some(80)), Verdict::Allow);
        assert_eq!(p.check(ip("203.0.113.9"), Some(80)), Verdict::Deny(DenyReason::DenyRule));
        assert_eq!(p.check(ip("198.51.100.1"), Some(53)), Verdict::Allow);
        assert_eq!(p.check(ip("198.51.100.1"), Some(54)), Verdict::Deny(DenyReason::NotAllowed));
        assert_eq!(p.check(ip("198.51.100.1"), None), Verdict::Deny(DenyReason::NotAllowed));
        assert_eq!(p.check(ip("127.0.0.1"), Some(80)), Verdict::Deny(DenyReason::NotAllowed));
        // An allow-domain alone makes the default deny too.
        let p = policy(&[], &[], &["example.test"]);
        assert_eq!(p.check(ip("203.0.113.1"), Some(80)), Verdict::Deny(DenyReason::NotAllowed));
        // Rules change at run time.
        p.set_rules(Rules::default());
        assert!(!p.is_active());
        assert_eq!(p.check(ip("203.0.113.1"), Some(80)), Verdict::Allow);
    }

    #[test]
    fn published_ports_refuse_clients_of_deny_rules_without_ports() {
        let p = policy(&["198.51.100.0/24"], &["203.0.113.0/24", "192.0.2.0/24:22", "127.0.0.1"], &[]);
        assert!(p.denies_peer(ip("203.0.113.9")));
        assert!(p.denies_peer(ip("::ffff:203.0.113.9")));
        assert!(p.denies_peer(ip("127.0.0.1")), "a loopback client (the host address) as 127.0.0.1");
        assert!(!p.denies_peer(ip("192.0.2.5")), "a rule with ports is about the destination's services");
        assert!(!p.denies_peer(ip("10.0.0.1")), "the allow list does not choose who may connect");
        assert!(!Policy::default().denies_peer(ip("203.0.113.9")));
    }

    #[test]
    fn domains() {
        for (given, want) in [("Example.TEST.", "example.test"), ("*.a.test", "a.test"), (".a.test", "a.test")] {
            assert_eq!(normalize_domain(given).unwrap(), want);
        }
        for bad in ["", ".", "*.", "a..b", "a b.test", "10.0.0.1", &"a".repeat(64), "a/b"] {
            assert!(normalize_domain(bad).is_err(), "{bad:?}");
        }
        let r = Rules::parse::<&str>(&[], &[], &["example.test", "EXAMPLE.test"]).unwrap();
        assert_eq!(r.allow_domains, vec!["example.test"]);
        assert!(r.allows_name("example.test") && r.allows_name("WWW.Example.Test."));
        assert!(r.allows_name("a.b.example.test"));
        assert!(!r.allows_name("badexample.test") && !r.allows_name("example.test.evil") && !r.allows_name("test"));
    }

    #[test]
    fn names_checked_by_the_proxy() {
        let p = policy(&["198.51.100.0/24"], &["203.0.113.66"], &["ok.test"]);
        assert_eq!(p.check_name("www.ok.test", None, 443), Verdict::Allow);
        assert_eq!(p.check_name("www.ok.test", Some(ip("203.0.113.5")), 443), Verdict::Allow);
        assert_eq!(p.check_name("www.ok.test", Some(ip("203.0.113.66")), 443), Verdict::Deny(DenyReason::DenyRule));
        assert_eq!(p.check_name("other.test", None, 443), Verdict::Deny(DenyReason::NotAllowed));
        assert_eq!(p.check_name("other.test", Some(ip("198.51.100.3")), 443), Verdict::Allow);
        assert!(p.needs_address("other.test") && !p.needs_address("ok.test"));
        // Deny rules only: a name without an address passes.
        let p = policy(&[], &["203.0.113.0/24"], &[]);
        assert_eq!(p.check_name("x.test", None, 80), Verdict::Allow);
        assert_eq!(p.check_name("x.test", Some(ip("203.0.113.1")), 80), Verdict::Deny(DenyReason::DenyRule));
    }

    #[test]
    fn learning_from_answers_with_ttl() {
        let p = policy(&["192.0.2.1"], &["203.0.113.66"], &["ok.test"]);
        let now = Instant::now();
        let a = ip("203.0.113.5");
        assert_eq!(p.check_at(a, Some(80), now), Verdict::Deny(DenyReason::NotAllowed));
        // An answer for another name teaches nothing.
        p.learn("evil.test", &[(a, 3600)]);
        assert_eq!(p.check_at(a, Some(80), now), Verdict::Deny(DenyReason::NotAllowed));
        p.learn_at("www.ok.test.", &[(a, 5), (ip("203.0.113.66"), 5)], now);
        assert_eq!(p.check_at(a, Some(80), now), Verdict::Allow);
        assert_eq!(p.check_at(a, None, now), Verdict::Allow);
        // A learnt address that a deny rule matches stays denied.
        assert_eq!(p.check_at(ip("203.0.113.66"), Some(80), now), Verdict::Deny(DenyReason::DenyRule));
        // A short TTL lasts MIN_LEARNT_TTL; then it is gone.
        assert_eq!(p.check_at(a, Some(80), now + MIN_LEARNT_TTL - Duration::from_secs(1)), Verdict::Allow);
        assert_eq!(p.check_at(a, Some(80), now + MIN_LEARNT_TTL), Verdict::Deny(DenyReason::NotAllowed));
        // A long TTL lasts as long, up to MAX_LEARNT_TTL.
        let b = ip("203.0.113.6");
        p.learn_at("ok.test", &[(b, 7200)], now);
        assert_eq!(p.check_at(b, Some(80), now + Duration::from_secs(7199)), Verdict::Allow);
        assert_eq!(p.check_at(b, Some(80), now + Duration::from_secs(7200)), Verdict::Deny(DenyReason::NotAllowed));
        let c = ip("203.0.113.7");
        p.learn_at("ok.test", &[(c, u32::MAX)], now);
        assert_eq!(p.check_at(c, Some(80), now + MAX_LEARNT_TTL), Verdict::Deny(DenyReason::NotAllowed));
        assert!(p.learnt().iter().any(|l| l.ip == b && l.name == "ok.test"));
        // A change that drops the domain forgets what it taught; one that keeps it keeps them.
        p.set_rules(Rules::parse(&["192.0.2.1"], &[], &["ok.test", "new.test"]).unwrap());
        assert_eq!(p.check_at(b, Some(80), now), Verdict::Allow);
        p.set_rules(Rules::parse(&["192.0.2.1"], &[], &["new.test"]).unwrap());
        assert_eq!(p.check_at(b, Some(80), now), Verdict::Deny(DenyReason::NotAllowed));
        assert!(p.learnt().is_empty());
    }

    #[test]
    fn the_learnt_set_is_bounded() {
        let p = policy(&[], &[], &["ok.test"]);
        let now = Instant::now();
        let addr = |i: usize| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32));
        // The first one expires first: it makes room for the one past the bound.
        p.learn_at("ok.test", &[(addr(0), 300)], now);
        let rest: Vec<(IpAddr, u32)> = (1..MAX_LEARNT).map(|i| (addr(i), 3600)).collect();
        p.learn_at("ok.test", &rest, now);
        assert_eq!(p.learnt.lock().unwrap().len(), MAX_LEARNT);
        p.learn_at("ok.test", &[(addr(MAX_LEARNT), 3600)], now);
        assert_eq!(p.learnt.lock().unwrap().len(), MAX_LEARNT);
        assert_eq!(p.check_at(addr(0), Some(1), now), Verdict::Deny(DenyReason::NotAllowed));
        assert_eq!(p.check_at(addr(MAX_LEARNT), Some(1), now), Verdict::Allow);
        assert_eq!(p.check_at(addr(1), Some(1), now), Verdict::Allow);
    }

    #[test]
    fn denials_are_counted_and_logged_once() {
        let p = policy(&[], &["203.0.113.0/24"], &[]);
        let dst = "203.0.113.1:80";
        for _ in 0..3 {
            p.denied(Via::Tcp, DenyReason::DenyRule, dst, None);
        }
        p.denied(Via::Proxy, DenyReason::NotAllowed, dst, None);
        let counts = p.denied_counts();
        assert_eq!(counts.len(), Via::ALL.len() * DenyReason::ALL.len());
        let of = |v, r| counts.iter().find(|(cv, cr, _)| *cv == v && *cr == r).unwrap().2;
        assert_eq!(of(Via::Tcp, DenyReason::DenyRule), 3);
        assert_eq!(of(Via::Proxy, DenyReason::NotAllowed), 1);
        assert_eq!(of(Via::Udp, DenyReason::DenyRule), 0);
        assert_eq!(p.logged.lock().unwrap().len(), 2);
        for i in 0..2 * MAX_LOGGED as u16 {
            p.denied(Via::Udp, DenyReason::DenyRule, SocketAddr::from(([203, 0, 113, 1], i + 1)), None);
        }
        assert_eq!(p.logged.lock().unwrap().len(), MAX_LOGGED, "the set of logged destinations is bounded");
    }
}
