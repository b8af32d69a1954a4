//! Following the host's resolver configuration while usernet runs: /etc/resolv.conf (the
//! upstream servers, search domains and options of the gateway's DNS) and /etc/hosts (names
//! the gateway answers itself), pushed into the core's shared [`HostDns`].
//!
//! Theory of operation. [`DnsWatch::start`] forks a small process that follows the files
//! from outside usernet's sandbox (`follower`: once confined, usernet reads no host file
//! itself) and starts one thread, `usernet-dns-watch`, which reads what it says. `usernet
//! run` does it in three steps: [`DnsWatch::fork`] while it waits for its sandbox's
//! namespaces (no thread yet: rootless, it joins the sandbox's user namespace next),
//! [`ForkedWatch::begin`] once it has, and [`PendingWatch::finish`] with the guest's
//! resolv.conf once usernet is confined. So the fork overlaps the sandbox's setup instead of
//! the network's start, where it contended with the threads being started (0.4 ms waited
//! for it there). Every second the follower `stat`s each
//! file by its path, following symlinks, and keeps the device, inode, size, mtime and ctime
//! of what the path leads to. When any of them differs from last time, it waits until they
//! stay the same for 100 ms (so that a writer that truncates and then writes is not read
//! half-way) and sends the file's bytes to the thread, which parses them with the same
//! parser as at startup ([`resolv::parse_resolv_conf`], [`hosts::parse_hosts`]) and, when
//! the result differs from what the gateway uses, swaps it in and logs one `info` line saying what
//! changed (`dns: /etc/resolv.conf changed: servers 10.0.0.1:53 -> 10.0.0.2:53`). A change
//! takes effect within about 1.1 s; queries already being forwarded finish against the
//! servers they were sent to (the core takes one snapshot per query).
//!
//! Why polling and not inotify: the host's /etc/resolv.conf changes in three ways: rewritten
//! in place, replaced by a rename (NetworkManager, resolvconf), or re-pointed as a symlink
//! into /run (systemd-resolved, resolvconf), and it may be a bind mount (containers). inotify
//! watches inodes and directories: following all of these would need watches on every
//! directory along the symlink chain, re-armed whenever a link in it changes, and sees nothing
//! of a bind mount changed from another mount namespace. A `stat` per file per second sees
//! every case alike, costs nothing measurable, and needs no dependency.
//!
//! A file that disappears (a symlink being re-pointed by `rm` and `ln`, a resolver daemon
//! restarting) leaves the configuration as it was, with one `info` line; it is read again
//! when it comes back. A resolv.conf that exists but names no server does take effect: the
//! gateway then answers SERVFAIL to what it does not know, as at startup.
//!
//! In `usernet run` the guest's own /etc/resolv.conf follows too ([`PendingWatch::finish`]):
//! when a change of the host's file changes the search domains or `ndots`, the guest's file is
//! rewritten in place right after the gateway's configuration is swapped, under the same log
//! line (how, and why in place: `resolv::GuestResolvConf::update`). Its nameserver stays the
//! gateway. If the guest wrote that file itself, it keeps its own and is not followed any more
//! (one `info` line).
//!
//! `--dns-upstream` on the command line fixes the servers: the resolv.conf is not followed
//! then (the caller passes no path), but /etc/hosts still is. The guest's resolv.conf is then
//! fixed too: `--dns-upstream` brings no search domains or options (`Upstreams::command_line`
//! in `crates/core/src/config.rs`), so the guest's file names the gateway alone, as at start,
//! whatever the host's file says, with `--dns-search`'s domains if given. `--dns-search`
//! fixes the search domains alone ([`WatchSpec::search`]): the servers and options still
//! follow the host's file.

mod follower;

use std::fs;
use std::io::{self, Read};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{debug, info, warn};
use usernet_core::config::{DnsOrigin, HostDns, HostsTable, ResolvOptions, Upstreams};
use usernet_core::services::dns::hosts::{self, MAX_HOSTS_FILE};

use crate::netns::resolv::{self, GuestResolvConf, GuestUpdate, HostResolvers};
use follower::Event;

/// The host's names file.
pub const HOSTS: &str = "/etc/hosts";
/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// The gateway's upstream configuration from the resolv.conf at `path`; with `search`
/// (`--dns-search`), those search domains instead of the file's.
pub fn upstreams_from_file(path: &Path, search: Option<&[String]>) -> Upstreams {
    upstreams_of(path, resolv::host_resolvers(path), search)
}

fn upstreams_of(path: &Path, r: HostResolvers, search: Option<&[String]>) -> Upstreams {
    Upstreams {
        servers: r.nameservers,
        search: search.map_or(r.search, <[String]>::to_vec),
        options: r.options,
        origin: DnsOrigin::File(path.to_path_buf()),
    }
}

/// The gateway's table of the hosts file at `path` (empty when it cannot be read);
/// loopback addresses become `host` (None: left out).
pub fn hosts_from_file(path: &Path, host: Option<Ipv4Addr>) -> HostsTable {
    match read_hosts(path, host) {
        Ok(table) => table,
        Err(e) => {
            debug!("dns: cannot read {}: {e}", path.display());
            HostsTable { path: Some(path.to_path_buf()), ..HostsTable::default() }
        }
    }
}

fn read_hosts(path: &Path, host: Option<Ipv4Addr>) -> io::Result<HostsTable> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.take(MAX_HOSTS_FILE as u64).read_to_end(&mut bytes)?;
    let mut table = hosts::parse_hosts(&String::from_utf8_lossy(&bytes), host);
    table.path = Some(path.to_path_buf());
    Ok(table)
}

/// What the watcher follows.
#[derive(Debug)]
pub struct WatchSpec {
    /// The resolv.conf whose servers the gateway forwards to; None: fixed servers.
    pub resolv_conf: Option<PathBuf>,
    /// Search domains that stand instead of the resolv.conf's (`--dns-search`); None: the
    /// file's, followed.
    pub search: Option<Vec<String>>,
    /// The hosts file whose names the gateway answers; None: not followed.
    pub hosts: Option<PathBuf>,
    /// What loopback addresses of the hosts file become (the host address; None when it
    /// does not reach the host's loopback).
    pub host_addr: Option<Ipv4Addr>,
    pub interval: Duration,
}

/// The watcher thread and its file follower; dropping it stops both.
pub struct DnsWatch {
    stopper: Option<follower::Stopper>,
    thread: Option<JoinHandle<()>>,
}

/// The follower of a watch, forked by the calling thread ([`DnsWatch::fork`]);
/// [`ForkedWatch::begin`] starts the thread that reads it. Dropped before, it stops the
/// follower.
pub struct ForkedWatch {
    files: Vec<Watched>,
    follower: Option<(follower::Follower, follower::Stopper)>,
}

/// A watch whose thread runs ([`ForkedWatch::begin`]) and waits for the guest's resolv.conf
/// ([`PendingWatch::finish`]). Dropped unfinished, it stops the follower and the thread.
pub struct PendingWatch {
    running: Option<Running>,
}

struct Running {
    stopper: follower::Stopper,
    guest: mpsc::Sender<Option<GuestResolvConf>>,
    thread: JoinHandle<()>,
}

impl DnsWatch {
    /// Starts following the files of `spec` into `dns`: forks the follower (call it during
    /// setup, from a thread that lives as long as the watch, after any other fork and before
    /// the sandbox) and starts the thread that reads what it says. The files are read once at
    /// once, so a change since the caller read them is not missed.
    pub fn start(dns: HostDns, spec: WatchSpec) -> io::Result<DnsWatch> {
        Ok(DnsWatch::fork(spec)?.begin(dns)?.finish(None))
    }

    /// Forks the follower of the files of `spec` from the calling thread (its Landlock
    /// ruleset, the fork and its pidfd: 0.2-0.5 ms on a VM, less while the process has a
    /// single thread). The follower dies with that thread (PR_SET_PDEATHSIG): call it from
    /// one that lives as long as the watch. No thread is started yet, so a process that must
    /// stay single-threaded a while longer (`usernet run` rootless, which joins a user
    /// namespace) may fork it while it waits for something else.
    pub fn fork(spec: WatchSpec) -> io::Result<ForkedWatch> {
        let mut files: Vec<Watched> = Vec::new();
        let mut follow: Vec<(PathBuf, usize)> = Vec::new();
        if let Some(path) = &spec.resolv_conf {
            let kind = Kind::ResolvConf(spec.search.clone());
            files.push(Watched { path: path.clone(), kind, looked: false, guest: None });
            follow.push((path.clone(), resolv::MAX_RESOLV_CONF as usize));
        }
        if let Some(path) = &spec.hosts {
            files.push(Watched { path: path.clone(), kind: Kind::Hosts(spec.host_addr), looked: false, guest: None });
            follow.push((path.clone(), MAX_HOSTS_FILE));
        }
        if files.is_empty() {
            return Ok(ForkedWatch { files, follower: None });
        }
        let follower = follower::Follower::start(&follow, spec.interval)?;
        let stopper = follower.stopper()?;
        Ok(ForkedWatch { files, follower: Some((follower, stopper)) })
    }
}

impl ForkedWatch {
    /// Starts the thread, `usernet-dns-watch`, that reads what the follower says into `dns`.
    pub fn begin(mut self, dns: HostDns) -> io::Result<PendingWatch> {
        let Some((mut follower, stopper)) = self.follower.take() else {
            return Ok(PendingWatch { running: None });
        };
        let mut files = std::mem::take(&mut self.files);
        let (guest_tx, guest_rx) = mpsc::channel::<Option<GuestResolvConf>>();
        let spawned = std::thread::Builder::new().name("usernet-dns-watch".into()).spawn(move || {
            // The guest's resolv.conf follows the host's (a resolv.conf's only); none when
            // the caller gave up before `finish`.
            let guest = guest_rx.recv().ok().flatten();
            if let Some(f) = files.iter_mut().find(|f| matches!(f.kind, Kind::ResolvConf(_))) {
                f.guest = guest;
            }
            loop {
                match follower.next() {
                    Ok(event) => {
                        let i = match &event {
                            Event::Changed(i, _) | Event::Gone(i) | Event::Unreadable(i, _) => *i,
                        };
                        if let Some(f) = files.get_mut(i) {
                            f.on_event(event, &dns);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return,
                    Err(e) => {
                        warn!("dns: the host files are no longer followed: {e}");
                        return;
                    }
                }
            }
        });
        match spawned {
            Ok(thread) => Ok(PendingWatch { running: Some(Running { stopper, guest: guest_tx, thread }) }),
            Err(e) => {
                stopper.stop();
                Err(e)
            }
        }
    }
}

impl Drop for ForkedWatch {
    fn drop(&mut self) {
        if let Some((_, stopper)) = self.follower.take() {
            stopper.stop();
        }
    }
}

impl PendingWatch {
    /// Hands the thread `guest_resolv`, the guest's resolv.conf (`usernet run`), rewritten
    /// when the search domains or options of the followed resolv.conf change (ignored when
    /// none is followed).
    pub fn finish(mut self, guest_resolv: Option<GuestResolvConf>) -> DnsWatch {
        let Some(running) = self.running.take() else {
            return DnsWatch { stopper: None, thread: None };
        };
        let _ = running.guest.send(guest_resolv);
        DnsWatch { stopper: Some(running.stopper), thread: Some(running.thread) }
    }
}

impl Drop for PendingWatch {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            // Unfinished: the follower is stopped; the thread then ends.
            let Running { stopper, guest, thread } = running;
            drop(guest);
            stopper.stop();
            let _ = thread.join();
        }
    }
}

impl DnsWatch {
    /// Kills the follower without waiting for it: its exit then overlaps whatever the caller
    /// tears down next, and dropping the watch reaps it.
    pub fn kill_follower(&self) {
        if let Some(s) = &self.stopper {
            s.kill();
        }
    }
}

impl Drop for DnsWatch {
    fn drop(&mut self) {
        if let Some(s) = self.stopper.take() {
            s.stop();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Clone, Debug)]
enum Kind {
    /// With the search domains that stand instead of the file's, if any.
    ResolvConf(Option<Vec<String>>),
    /// With what loopback addresses become.
    Hosts(Option<Ipv4Addr>),
}

struct Watched {
    path: PathBuf,
    kind: Kind,
    /// The follower has said something of it already.
    looked: bool,
    /// The guest's resolv.conf, following this one (a resolv.conf's only).
    guest: Option<GuestResolvConf>,
}

impl Watched {
    /// What the follower said of this file; updates `dns` when its content changed.
    fn on_event(&mut self, event: Event, dns: &HostDns) {
        let first = !std::mem::replace(&mut self.looked, true);
        let shown = self.path.display();
        let bytes = match event {
            Event::Changed(_, bytes) => bytes,
            Event::Gone(_) => {
                if !first {
                    info!("dns: {shown} is gone; the gateway keeps its configuration until it is back");
                }
                return;
            }
            Event::Unreadable(_, e) => {
                debug!("dns: cannot read {shown}: {e}");
                return;
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        match &self.kind {
            Kind::ResolvConf(search) => {
                let new = upstreams_of(&self.path, resolv::parse_resolv_conf(&text), search.as_deref());
                let current = dns.upstreams();
                if *current != new {
                    info!("dns: {shown} changed: {}", describe_change(&current, &new));
                    self.follow_in_guest(&new);
                    dns.set_upstreams(new);
                }
            }
            Kind::Hosts(host) => {
                let mut new = hosts::parse_hosts(&text, *host);
                new.path = Some(self.path.clone());
                let current = dns.hosts();
                if *current != new {
                    info!("dns: {shown} changed: {} -> {} names", current.names.len(), new.names.len());
                    dns.set_hosts(new);
                }
            }
        }
    }
}

impl Watched {
    /// Rewrites the guest's resolv.conf, if any, for the search domains and options of `new`.
    fn follow_in_guest(&mut self, new: &Upstreams) {
        let Some(guest) = &mut self.guest else {
            return;
        };
        match guest.update(&new.search, new.options.ndots) {
            Ok(GuestUpdate::Rewritten) => debug!("dns: the guest's {} rewritten", resolv::RESOLV_CONF),
            Ok(GuestUpdate::Unchanged) => {}
            Ok(GuestUpdate::LeftAlone) => {
                info!("dns: the guest wrote its own {}; it is left alone from now on", resolv::RESOLV_CONF);
                self.guest = None;
            }
            Err(e) => warn!("dns: cannot rewrite the guest's {}: {e}", resolv::RESOLV_CONF),
        }
    }
}

/// `servers A, B -> C; search x -> (none)`: the parts of the configuration that differ.
pub fn describe_change(old: &Upstreams, new: &Upstreams) -> String {
    let list = |items: Vec<String>| if items.is_empty() { "(none)".to_string() } else { items.join(", ") };
    let mut parts = Vec::new();
    if old.servers != new.servers {
        let show = |u: &Upstreams| list(u.servers.iter().map(ToString::to_string).collect());
        parts.push(format!("servers {} -> {}", show(old), show(new)));
    }
    if old.search != new.search {
        parts.push(format!("search {} -> {}", list(old.search.clone()), list(new.search.clone())));
    }
    if old.options != new.options {
        parts.push(format!(
            "options {} -> {}",
            list(describe_options(&old.options)),
            list(describe_options(&new.options))
        ));
    }
    if old.origin != new.origin && parts.is_empty() {
        parts.push("source".to_string());
    }
    parts.join("; ")
}

/// The options as resolv.conf writes them: `ndots:2`, `rotate`, ...
pub fn describe_options(o: &ResolvOptions) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(n) = o.ndots {
        out.push(format!("ndots:{n}"));
    }
    if let Some(n) = o.timeout {
        out.push(format!("timeout:{n}"));
    }
    if let Some(n) = o.attempts {
        out.push(format!("attempts:{n}"));
    }
    if o.rotate {
        out.push("rotate".to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use std::os::unix::fs::symlink;
    use std::time::Instant;

    const HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 65, 254);

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("usernet-dns-watch-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn servers(dns: &HostDns) -> Vec<SocketAddr> {
        dns.upstreams().servers.clone()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Waits (up to 3 s) for `cond`; returns how long it took.
    fn within(cond: impl Fn() -> bool) -> Duration {
        let start = Instant::now();
        while !cond() {
            assert!(start.elapsed() < Duration::from_secs(3), "not within 3 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        start.elapsed()
    }

    fn watch(dns: &HostDns, resolv: Option<&Path>, hosts: Option<&Path>) -> DnsWatch {
        let spec = WatchSpec {
            resolv_conf: resolv.map(Path::to_path_buf),
            search: None,
            hosts: hosts.map(Path::to_path_buf),
            host_addr: Some(HOST),
            interval: Duration::from_millis(100),
        };
        DnsWatch::start(dns.clone(), spec).unwrap()
    }

    #[test]
    fn follows_in_place_rename_and_symlink_changes() {
        let d = Dir::new("resolv");
        let a = d.0.join("a.conf");
        let b = d.0.join("b.conf");
        let link = d.0.join("resolv.conf");
        fs::write(&a, "nameserver 127.0.0.2\n").unwrap();
        fs::write(&b, "nameserver 127.0.0.3\nsearch b.example\noptions rotate\n").unwrap();
        symlink(&a, &link).unwrap();
        let dns = HostDns::new(upstreams_from_file(&link, None));
        assert_eq!(servers(&dns), vec![sa("127.0.0.2:53")]);
        assert_eq!(dns.upstreams().origin, DnsOrigin::File(link.clone()));
        let _w = watch(&dns, Some(&link), None);

        // Rewritten in place (same inode), through the symlink.
        fs::write(&a, "nameserver 127.0.0.4\nnameserver 127.0.0.5\n").unwrap();
        within(|| servers(&dns) == vec![sa("127.0.0.4:53"), sa("127.0.0.5:53")]);
        // The symlink re-pointed atomically (ln -s + rename, as resolvconf does).
        let tmp = d.0.join("resolv.conf.new");
        symlink(&b, &tmp).unwrap();
        fs::rename(&tmp, &link).unwrap();
        within(|| servers(&dns) == vec![sa("127.0.0.3:53")]);
        assert_eq!(dns.upstreams().search, vec!["b.example"]);
        assert!(dns.upstreams().options.rotate);
        // A new file renamed over the symlink's target (NetworkManager's way).
        let tmp = d.0.join("b.tmp");
        fs::write(&tmp, "nameserver 127.0.0.6\n").unwrap();
        fs::rename(&tmp, &b).unwrap();
        within(|| servers(&dns) == vec![sa("127.0.0.6:53")]);
        // Gone: kept. Back: read again.
        fs::remove_file(&link).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(servers(&dns), vec![sa("127.0.0.6:53")]);
        fs::write(&link, "nameserver 127.0.0.7\n").unwrap();
        within(|| servers(&dns) == vec![sa("127.0.0.7:53")]);
        // No server at all: that is the configuration now.
        fs::write(&link, "# nothing\n").unwrap();
        within(|| servers(&dns).is_empty());
    }

    #[test]
    fn fixed_search_domains_stay_while_the_servers_follow() {
        let d = Dir::new("search");
        let path = d.0.join("resolv.conf");
        fs::write(&path, "nameserver 127.0.0.2\nsearch host.example\n").unwrap();
        let fixed = vec!["corp.example".to_string()];
        let dns = HostDns::new(upstreams_from_file(&path, Some(&fixed)));
        assert_eq!(dns.upstreams().search, fixed);
        let spec = WatchSpec {
            resolv_conf: Some(path.clone()),
            search: Some(fixed.clone()),
            hosts: None,
            host_addr: Some(HOST),
            interval: Duration::from_millis(100),
        };
        let _w = DnsWatch::start(dns.clone(), spec).unwrap();
        fs::write(&path, "nameserver 127.0.0.3\nsearch other.example\n").unwrap();
        within(|| servers(&dns) == vec![sa("127.0.0.3:53")]);
        assert_eq!(dns.upstreams().search, fixed);
        // None given (`--dns-search .`): none, whatever the file says.
        let dns = HostDns::new(upstreams_from_file(&path, Some(&[])));
        assert!(dns.upstreams().search.is_empty());
    }

    #[test]
    fn a_truncating_writer_is_not_read_half_way() {
        let d = Dir::new("settle");
        let path = d.0.join("resolv.conf");
        fs::write(&path, "nameserver 127.0.0.2\n").unwrap();
        let dns = HostDns::new(upstreams_from_file(&path, None));
        let _w = watch(&dns, Some(&path), None);
        std::thread::sleep(Duration::from_millis(150));
        // Truncate, and write the rest 50 ms later: the watcher never sees the empty file.
        let mut f = fs::File::create(&path).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        std::io::Write::write_all(&mut f, b"nameserver 127.0.0.3\n").unwrap();
        drop(f);
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(600) {
            assert!(!servers(&dns).is_empty(), "saw the truncated file");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(servers(&dns), vec![sa("127.0.0.3:53")]);
    }

    #[test]
    fn follows_the_hosts_file() {
        let d = Dir::new("hosts");
        let path = d.0.join("hosts");
        fs::write(&path, "127.0.0.1 localhost\n127.0.1.1 mybox\n").unwrap();
        let dns = HostDns::default();
        dns.set_hosts(hosts_from_file(&path, Some(HOST)));
        assert_eq!(dns.hosts().names.get("mybox"), Some(&HOST));
        let _w = watch(&dns, None, Some(&path));
        let tmp = d.0.join("hosts.new");
        fs::write(&tmp, "127.0.1.1 mybox\n10.0.0.5 db.corp\n").unwrap();
        fs::rename(&tmp, &path).unwrap();
        within(|| dns.hosts().names.get("db.corp") == Some(&Ipv4Addr::new(10, 0, 0, 5)));
        // The resolv.conf side was not touched.
        assert_eq!(dns.upstreams().origin, DnsOrigin::Unset);
        assert_eq!(hosts_from_file(&d.0.join("missing"), Some(HOST)).names.len(), 0);
    }

    #[test]
    fn change_lines() {
        let old = Upstreams {
            servers: vec![sa("10.0.0.1:53"), sa("10.0.0.2:53")],
            origin: DnsOrigin::File("/etc/resolv.conf".into()),
            ..Upstreams::default()
        };
        let new = Upstreams { servers: vec![sa("10.0.0.3:53")], search: vec!["corp.example".into()], ..old.clone() };
        assert_eq!(
            describe_change(&old, &new),
            "servers 10.0.0.1:53, 10.0.0.2:53 -> 10.0.0.3:53; search (none) -> corp.example"
        );
        let opts = Upstreams {
            options: ResolvOptions { ndots: Some(2), rotate: true, ..ResolvOptions::default() },
            ..old.clone()
        };
        assert_eq!(describe_change(&old, &opts), "options (none) -> ndots:2, rotate");
    }

    #[test]
    fn stops_when_dropped() {
        let dns = HostDns::default();
        let spec = WatchSpec {
            resolv_conf: None,
            search: None,
            hosts: None,
            host_addr: Some(HOST),
            interval: Duration::from_secs(3600),
        };
        let start = Instant::now();
        drop(DnsWatch::start(dns, spec).unwrap());
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// `fork`, `begin`, then `finish`: the watch follows as `start`'s does, a change made
    /// before `finish` included; a pending watch dropped unfinished stops its follower and thread
    /// (the drop returns, which it could not while the thread waited on a live follower).
    #[test]
    fn a_pending_watch_follows_once_finished_and_stops_unfinished() {
        let dir = Dir::new("pending");
        let resolv = dir.0.join("resolv.conf");
        fs::write(&resolv, "nameserver 10.0.0.1\n").unwrap();
        let spec = |path: &Path| WatchSpec {
            resolv_conf: Some(path.to_path_buf()),
            search: None,
            hosts: None,
            host_addr: Some(HOST),
            interval: Duration::from_millis(100),
        };
        let dns = HostDns::default();
        let pending = DnsWatch::fork(spec(&resolv)).unwrap().begin(dns.clone()).unwrap();
        fs::write(&resolv, "nameserver 10.0.0.2\n").unwrap();
        let w = pending.finish(None);
        within(|| servers(&dns) == vec![sa("10.0.0.2:53")]);
        fs::write(&resolv, "nameserver 10.0.0.3\n").unwrap();
        within(|| servers(&dns) == vec![sa("10.0.0.3:53")]);
        drop(w);

        let start = Instant::now();
        drop(DnsWatch::fork(spec(&resolv)).unwrap().begin(HostDns::default()).unwrap());
        assert!(start.elapsed() < Duration::from_secs(1));
    }
}
