//! /etc/resolv.conf: reading the host's resolvers, writing the guest's.
//!
//! Theory of operation. The gateway answers DNS for the guest and forwards what it does not
//! know to the host's resolvers, so two things happen here:
//!
//! - [`host_resolvers`] reads the host's file (resolv.conf(5)): `nameserver` lines (IPv4 and
//!   IPv6, port 53, an IPv6 zone such as `%eth0` kept as the scope id) become upstreams, the
//!   last `search` or `domain` line gives the search domains, and `options` lines give
//!   `ndots`, `timeout`, `attempts` and `rotate` (the other options are about the host's own
//!   resolver and are ignored). Anything malformed is skipped. `dns_watch` calls it again
//!   whenever the file changes.
//! - [`render_guest`] writes the guest's file (`nameserver <gateway>`, the search domains and
//!   `options ndots:N` when the host sets it). The host's `timeout`, `attempts` and `rotate`
//!   are not passed on: they are about talking to the upstream servers, which the gateway
//!   does (and honours them); the guest has one server, the gateway, and keeps its resolver's
//!   defaults (5 s, 2 attempts), which leave the gateway time to fail over.
//!   and [`install_guest_resolv_conf`], run inside the guest's private mount namespace, makes
//!   COMMAND see it at /etc/resolv.conf. It "shadows" /etc: a tmpfs is mounted on /etc
//!   inside the namespace, the original /etc (with the mounts below it) is attached on
//!   `/etc/.usernet-host-etc` in it, every original entry but resolv.conf is a symlink
//!   there (a symlink of the original is copied as it is), and resolv.conf is written as a
//!   plain file in the tmpfs. The rest of /etc reads the same; files COMMAND creates (or
//!   renames) directly in /etc go to the tmpfs and vanish with the namespace, and nothing
//!   is ever created on the host's disk.
//!
//! Why shadow /etc rather than bind-mount a file over /etc/resolv.conf (usernet did that
//! first): a mount sits on a dentry, and when the host replaces /etc/resolv.conf by a rename
//! (NetworkManager, systemd-resolved and resolvconf all do, on the file or on the target of
//! its symlink) the kernel detaches every mount whose mountpoint was that dentry, in every
//! mount namespace. COMMAND then read the host's own file (say `nameserver 127.0.0.53`,
//! useless in the guest's network; `crates/usernet/tests/dns_follow.rs` reproduces it). The
//! tmpfs is mounted on /etc itself, which no resolver manager renames, and our resolv.conf is
//! a file of that tmpfs, which the host cannot reach at all; so whatever the host does to its
//! file (rewrite, rename over it, re-point or remove the symlink, leave it missing or
//! dangling), the guest reads usernet's. The same path also covers a missing or dangling
//! /etc/resolv.conf, where there would be nothing to mount over. Why symlinks rather than a
//! bind mount per entry (usernet did that before): two mounts instead of one per entry of
//! /etc (about 150 on Debian, 2-4 ms of `usernet run`'s start), and the symlinks resolve
//! by name each time, so a host file replaced by a rename (`sed -i /etc/hosts`) is seen at
//! once. The price: /etc's entries are symlinks in the guest (`ls -l` shows them, and an
//! open with O_NOFOLLOW fails), as with rootless Docker's copy-up of /etc.
//!
//! [`install_guest_resolv_conf`] returns the open file, and [`GuestResolvConf`] rewrites it
//! in place from outside the namespace when the host's search domains or `ndots` change
//! (`dns_watch` calls it).

use std::ffi::OsStr;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use usernet_core::config::ResolvOptions;

/// Where the guest looks for its resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

#[derive(Debug, Default, Clone, PartialEq)]
pub struct HostResolvers {
    pub nameservers: Vec<SocketAddr>,
    pub search: Vec<String>,
    pub options: ResolvOptions,
}

/// Largest resolv.conf read (glibc's files are a few hundred bytes).
pub const MAX_RESOLV_CONF: u64 = 1 << 20;

/// The host's nameservers and search domains; empty when the file is missing or has none.
pub fn host_resolvers(path: &Path) -> HostResolvers {
    match read_resolv_conf(path) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("cannot read {}: {e}", path.display());
            HostResolvers::default()
        }
    }
}

/// As [`host_resolvers`], with the error of a file that cannot be read.
pub fn read_resolv_conf(path: &Path) -> io::Result<HostResolvers> {
    use std::io::Read;
    let mut bytes = Vec::new();
    fs::File::open(path)?.take(MAX_RESOLV_CONF).read_to_end(&mut bytes)?;
    Ok(parse_resolv_conf(&String::from_utf8_lossy(&bytes)))
}

/// Parses the text of a resolv.conf file (see [`host_resolvers`]).
pub fn parse_resolv_conf(text: &str) -> HostResolvers {
    let mut out = HostResolvers::default();
    for line in text.lines() {
        // Comments start with '#' or ';' anywhere on the line.
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => {
                if let Some(addr) = words.next().and_then(parse_nameserver)
                    && !out.nameservers.contains(&addr)
                {
                    out.nameservers.push(addr);
                }
            }
            // The last of `search` and `domain` wins (resolv.conf(5)).
            Some("search") => {
                out.search = words.filter(|d| valid_domain(d)).map(normalize).collect();
            }
            Some("domain") => {
                out.search = words.next().filter(|d| valid_domain(d)).map(normalize).into_iter().collect();
            }
            Some("options") => {
                for option in words {
                    parse_option(option, &mut out.options);
                }
            }
            _ => {}
        }
    }
    out
}

/// One word of an `options` line; later ones win, as in glibc. Values are capped as glibc
/// caps them (ndots 15, timeout 30, attempts 5).
fn parse_option(word: &str, options: &mut ResolvOptions) {
    let number = |cap: u8| -> Option<u8> {
        let (_, n) = word.split_once(':')?;
        let n: u32 = n.parse().ok()?;
        Some(n.min(u32::from(cap)) as u8)
    };
    match word.split(':').next() {
        Some("ndots") => options.ndots = number(15).or(options.ndots),
        Some("timeout") => options.timeout = number(30).filter(|n| *n > 0).or(options.timeout),
        Some("attempts") => options.attempts = number(5).filter(|n| *n > 0).or(options.attempts),
        Some("rotate") => options.rotate = true,
        _ => {}
    }
}

fn parse_nameserver(word: &str) -> Option<SocketAddr> {
    if let Ok(ip) = word.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    // An IPv6 address with a zone: fe80::1%eth0 or fe80::1%2.
    let (addr, zone) = word.split_once('%')?;
    let addr: Ipv6Addr = addr.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(n) => n,
        Err(_) => nix::net::if_::if_nametoindex(zone).ok()?,
    };
    Some(SocketAddr::V6(SocketAddrV6::new(addr, 53, 0, scope)))
}

fn valid_domain(d: &str) -> bool {
    !d.is_empty()
        && d != "."
        && d.len() <= 253
        && d.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

fn normalize(d: &str) -> String {
    d.trim_end_matches('.').to_ascii_lowercase()
}

/// The guest's resolv.conf: the gateway is its only nameserver; the host's search domains
/// and `ndots` (see the module comment).
pub fn render_guest(gateway: IpAddr, search: &[String], ndots: Option<u8>) -> String {
    let mut out = String::from("# Written by usernet: the gateway answers DNS.\n");
    out.push_str(&format!("nameserver {gateway}\n"));
    let search: Vec<&str> = search.iter().map(String::as_str).filter(|d| valid_domain(d)).collect();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    if let Some(n) = ndots {
        out.push_str(&format!("options ndots:{}\n", n.min(15)));
    }
    out
}

/// Makes `/etc/resolv.conf` read `contents` in the current mount namespace, by shadowing /etc
/// (see the module comment); returns the file, open for reading and writing. Call it only in
/// a private mount namespace (after making `/` rprivate): it mounts things.
pub fn install_guest_resolv_conf(contents: &str) -> io::Result<fs::File> {
    shadow_etc(contents)
}

/// The directory of the guest's /etc where the host's /etc stays reachable (see
/// [`shadow_etc`]).
pub const HOST_ETC: &str = ".usernet-host-etc";

/// Mounts a tmpfs on /etc that mirrors the original /etc, with our resolv.conf in it
/// (whatever the original resolv.conf is: a file, a symlink, a directory, nothing).
///
/// Two mounts whatever the size of /etc: the original /etc is attached (recursively, with
/// the mounts below it) on [`HOST_ETC`] in the tmpfs, and each of its entries but
/// resolv.conf becomes a symlink into it (`passwd -> .usernet-host-etc/passwd`); a symlink
/// of the original is copied as it is, so that a relative target still resolves from /etc.
/// rootlesskit's copy-up of /etc for rootless Docker has the same shape. A mount per entry
/// cost about 20 µs each, most of `usernet run`'s wait for its sandbox on a Debian /etc.
fn shadow_etc(contents: &str) -> io::Result<fs::File> {
    // A handle on the original /etc, still reachable once the tmpfs hides it.
    let orig: OwnedFd = open("/etc", OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())?;
    let orig_path = PathBuf::from(format!("/proc/self/fd/{}", orig.as_raw_fd()));
    let entries: Vec<fs::DirEntry> = fs::read_dir(&orig_path)?.collect::<io::Result<_>>()?;
    // The original /etc's mounts, copied before the tmpfs goes on it.
    let tree = clone_etc_tree();

    mount(Some("tmpfs"), "/etc", Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=755"))?;
    let etc = Path::new("/etc");
    let host_etc = etc.join(HOST_ETC);
    fs::create_dir(&host_etc)?;
    let attached = tree.is_some_and(|tree| match attach_tree(&tree, &host_etc) {
        Ok(()) => true,
        Err(e) => {
            tracing::debug!("move_mount: {e}; bind-mounting /etc instead");
            false
        }
    });
    if !attached {
        // Recursive, to keep what is mounted below the original /etc (a container's
        // /etc/hosts, say). That takes along the tmpfs just mounted on it too, and puts its
        // copy on top: unmounting that copy leaves the original /etc showing.
        mount(Some(&orig_path), &host_etc, None::<&str>, MsFlags::MS_BIND | MsFlags::MS_REC, None::<&str>)?;
        nix::mount::umount2(&host_etc, nix::mount::MntFlags::MNT_DETACH)?;
    }
    let (shown, original) = (nix::sys::stat::stat(&host_etc)?, nix::sys::stat::fstat(&orig)?);
    if (shown.st_dev, shown.st_ino) != (original.st_dev, original.st_ino) {
        return Err(io::Error::other(format!("/etc/{HOST_ETC} does not show the original /etc")));
    }
    for entry in entries {
        let name = entry.file_name();
        if name == OsStr::new("resolv.conf") || name == OsStr::new(HOST_ETC) {
            continue;
        }
        let target = if entry.file_type()?.is_symlink() {
            fs::read_link(orig_path.join(&name))?
        } else {
            Path::new(HOST_ETC).join(&name)
        };
        symlink(target, etc.join(&name))?;
    }
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_CLOEXEC)
        .open(etc.join("resolv.conf"))?;
    file.write_all(contents.as_bytes())?;
    Ok(file)
}

/// open_tree(2)'s OPEN_TREE_CLONE and move_mount(2)'s MOVE_MOUNT_F_EMPTY_PATH
/// (linux/mount.h).
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

/// A detached copy of /etc with the mounts below it (open_tree(2), OPEN_TREE_CLONE and
/// AT_RECURSIVE), for [`attach_tree`] to put in the tmpfs that will shadow /etc. None
/// where the kernel has no open_tree (before Linux 5.2) or refuses it (a seccomp
/// profile): [`shadow_etc`] then bind-mounts /etc after the tmpfs and unmounts the copy
/// of the tmpfs that comes along. The copy made here has none, so nothing is unmounted;
/// an unmount waits for an RCU grace period (synchronize_rcu_expedited, 0.7 ms median
/// and up to 4 ms of `usernet run`'s start on a 2-CPU VM, where it also interrupts the
/// other CPU).
fn clone_etc_tree() -> Option<OwnedFd> {
    let flags = OPEN_TREE_CLONE | libc::AT_RECURSIVE as libc::c_uint | libc::O_CLOEXEC as libc::c_uint;
    // SAFETY: open_tree(2) with a NUL-terminated path; it returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c"/etc".as_ptr(), flags) };
    if fd < 0 {
        tracing::debug!("open_tree: {}; bind-mounting /etc instead", io::Error::last_os_error());
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Mounts the detached tree `tree` ([`clone_etc_tree`]) on the directory `on`
/// (move_mount(2)).
fn attach_tree(tree: &OwnedFd, on: &Path) -> io::Result<()> {
    let on = std::ffi::CString::new(on.as_os_str().as_encoded_bytes())?;
    // SAFETY: move_mount(2) from a descriptor we hold (empty path) to a NUL-terminated path.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            on.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// The guest's /etc/resolv.conf seen from usernet: the file [`install_guest_resolv_conf`]
/// made, open for reading and writing (the sandbox passes the descriptor out of its
/// namespace).
#[derive(Debug)]
pub struct GuestResolvConf {
    file: fs::File,
    gateway: IpAddr,
    /// What the file holds: what was written last.
    written: String,
    /// COMMAND wrote the file itself (see [`GuestResolvConf::update`]).
    left_alone: bool,
}

impl GuestResolvConf {
    /// `file` holds `written`, rendered for `gateway`.
    pub fn new(file: fs::File, gateway: IpAddr, written: String) -> GuestResolvConf {
        GuestResolvConf { file, gateway, written, left_alone: false }
    }

    /// Renders the guest's file for the host's `search` domains and `ndots` (the nameserver
    /// stays the gateway) and rewrites it in place when that differs from what it holds.
    ///
    /// In place, not by a rename: the file stays the inode COMMAND's namespace knows (and
    /// anything COMMAND bind-mounted from it sees the change). A reader never sees an empty
    /// or mixed file: the new text is written over the old one padded with newlines to the
    /// old length, then the file is cut to the new length, and every state in between is a
    /// whole resolv.conf. The first two lines (the comment and `nameserver <gateway>`) never
    /// change, so even a read torn by the write itself names the gateway. glibc (since 2.26)
    /// and musl notice the new size and mtime at their next lookup.
    ///
    /// If COMMAND wrote the file itself (it is root in its namespace), its text is not what
    /// usernet wrote last: COMMAND's wins, and the file is left alone from then on. (If it
    /// replaced /etc/resolv.conf by a new file, this one is no longer the guest's anyway.)
    pub fn update(&mut self, search: &[String], ndots: Option<u8>) -> io::Result<GuestUpdate> {
        use std::os::unix::fs::FileExt;
        if self.left_alone {
            return Ok(GuestUpdate::LeftAlone);
        }
        let new = render_guest(self.gateway, search, ndots);
        if new == self.written {
            return Ok(GuestUpdate::Unchanged);
        }
        let mut now = vec![0; self.written.len() + 1];
        let n = read_full_at(&self.file, &mut now)?;
        if now[..n] != *self.written.as_bytes() {
            self.left_alone = true;
            return Ok(GuestUpdate::LeftAlone);
        }
        let mut padded = new.clone().into_bytes();
        if padded.len() < n {
            padded.resize(n, b'\n');
        }
        self.file.write_all_at(&padded, 0)?;
        self.file.set_len(new.len() as u64)?;
        self.written = new;
        Ok(GuestUpdate::Rewritten)
    }
}

/// What [`GuestResolvConf::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestUpdate {
    /// The file already said that.
    Unchanged,
    Rewritten,
    /// COMMAND wrote the file itself: it keeps its text.
    LeftAlone,
}

/// Reads from offset 0 until `buf` is full or the file ends: how much was read.
fn read_full_at(file: &fs::File, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn nameservers_v4_v6_and_junk() {
        let r = parse_resolv_conf(
            "# comment\n\
             nameserver 10.255.255.53\n\
             nameserver   2001:db8::1  # trailing comment\n\
             nameserver not-an-ip\n\
             nameserver\n\
             nameserver 10.255.255.53\n\
             ; nameserver 192.0.2.9\n\
             nameserver fe80::1%7\n\
             nameserver fe80::2%no-such-interface-here\n\
             options ndots:5\n",
        );
        assert_eq!(
            r.nameservers,
            vec![
                "10.255.255.53:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
                SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 53, 0, 7)),
            ]
        );
        assert!(r.search.is_empty());
    }

    #[test]
    fn last_search_or_domain_wins() {
        let r = parse_resolv_conf("search a.example B.example.\ndomain c.example\n");
        assert_eq!(r.search, vec!["c.example"]);
        let r = parse_resolv_conf("domain c.example\nsearch a.example B.example. bad/name\n");
        assert_eq!(r.search, vec!["a.example", "b.example"]);
        let r = parse_resolv_conf("search\n");
        assert!(r.search.is_empty());
    }

    #[test]
    fn options() {
        let r = parse_resolv_conf("options ndots:3 timeout:2 attempts:4 rotate edns0 trust-ad\n");
        assert_eq!(r.options, ResolvOptions { ndots: Some(3), timeout: Some(2), attempts: Some(4), rotate: true });
        // Capped as glibc caps them; zero timeout/attempts and junk ignored; later wins.
        let r = parse_resolv_conf(
            "options ndots:99 timeout:0 attempts:x\noptions timeout:99 attempts:9 ndots:\n# options rotate\n",
        );
        assert_eq!(r.options, ResolvOptions { ndots: Some(15), timeout: Some(30), attempts: Some(5), rotate: false });
        let r = parse_resolv_conf("options timeout:1\noptions timeout:0 ndots:1\n");
        assert_eq!(r.options, ResolvOptions { ndots: Some(1), timeout: Some(1), ..ResolvOptions::default() });
        assert_eq!(parse_resolv_conf("nameserver 10.0.0.1\n").options, ResolvOptions::default());
    }

    #[test]
    fn missing_file_is_empty() {
        let r = host_resolvers(Path::new("/nonexistent/usernet/resolv.conf"));
        assert_eq!(r, HostResolvers::default());
    }

    #[test]
    fn reads_a_file() {
        let path = std::env::temp_dir().join(format!("usernet-test-resolv-{}", std::process::id()));
        fs::write(&path, "nameserver 127.0.0.53\nsearch corp.example\n").unwrap();
        let r = host_resolvers(&path);
        let _ = fs::remove_file(&path);
        assert_eq!(r.nameservers, vec!["127.0.0.53:53".parse().unwrap()]);
        assert_eq!(r.search, vec!["corp.example"]);
    }

    #[test]
    fn guest_file_rewritten_in_place() {
        let path = std::env::temp_dir().join(format!("usernet-test-guest-resolv-{}", std::process::id()));
        let _ = fs::remove_file(&path);
        let gw = IpAddr::V4(Ipv4Addr::new(192, 168, 65, 1));
        let first = render_guest(gw, &["a.example".into(), "b.example".into()], Some(3));
        fs::write(&path, &first).unwrap();
        let file = fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
        let mut guest = GuestResolvConf::new(file, gw, first.clone());
        let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&fs::metadata(p).unwrap());
        let before = ino(&path);
        assert_eq!(guest.update(&["a.example".into(), "b.example".into()], Some(3)).unwrap(), GuestUpdate::Unchanged);
        // Shorter: cut to the new length, no padding left behind.
        assert_eq!(guest.update(&["c.example".into()], None).unwrap(), GuestUpdate::Rewritten);
        assert_eq!(fs::read_to_string(&path).unwrap(), render_guest(gw, &["c.example".into()], None));
        // Longer.
        let long: Vec<String> = (0..6).map(|i| format!("domain{i}.example")).collect();
        assert_eq!(guest.update(&long, Some(1)).unwrap(), GuestUpdate::Rewritten);
        assert_eq!(fs::read_to_string(&path).unwrap(), render_guest(gw, &long, Some(1)));
        assert_eq!(ino(&path), before);
        // The guest wrote its own: it wins, now and later.
        fs::write(&path, "nameserver 10.0.0.1\n").unwrap();
        assert_eq!(guest.update(&[], None).unwrap(), GuestUpdate::LeftAlone);
        assert_eq!(guest.update(&long, Some(1)).unwrap(), GuestUpdate::LeftAlone);
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 10.0.0.1\n");
        let _ = fs::remove_file(&path);
    }

    #[test]
    fn guest_file() {
        let gw = IpAddr::V4(Ipv4Addr::new(192, 168, 65, 1));
        let text = render_guest(gw, &[], None);
        assert!(text.contains("\nnameserver 192.168.65.1\n"));
        assert!(!text.contains("search"));
        assert!(!text.contains("options"));
        let text = render_guest(gw, &["a.example".into(), "bad\nnameserver 1.2.3.4".into()], Some(2));
        assert!(text.ends_with("nameserver 192.168.65.1\nsearch a.example\noptions ndots:2\n"));
        // What we write is what a resolver reads back.
        let back = parse_resolv_conf(&text);
        assert_eq!(back.nameservers, vec![SocketAddr::new(gw, 53)]);
        assert_eq!(back.search, vec!["a.example"]);
        assert_eq!(back.options, ResolvOptions { ndots: Some(2), ..ResolvOptions::default() });
    }
}
