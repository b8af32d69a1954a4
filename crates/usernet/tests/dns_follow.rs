//! The gateway's DNS follows the host's resolver configuration while usernet runs (issue
//! 18): /etc/resolv.conf rewritten in place, replaced by a rename, re-pointed as a symlink,
//! or replaced as a plain file; `--dns-upstream` staying fixed; the names of /etc/hosts;
//! `GET /v1/resolver`; the guest's own /etc/resolv.conf in `usernet run`, which stays
//! usernet's whatever the host does to its file, and whose search domains and ndots follow
//! the host's (as root and rootless).
//!
//! Each test makes a world of its own with `unshare -m -n`: a private mount namespace whose
//! /etc is an overlay (the host's /etc below, a tmpfs above), so the test may replace
//! /etc/resolv.conf and /etc/hosts there freely, and a private network namespace whose
//! loopback holds two dnsmasq (no upstream, no hosts file, static records only) on
//! 127.0.0.2:53 and 127.0.0.3:53, answering `follow.test` with 203.0.113.2 and 203.0.113.3.
//! `usernet run` starts in that world; its guest asks the gateway (`dig @192.168.65.1`) in a
//! loop and prints each answer (or reads its /etc/resolv.conf and asks through it), and the
//! test watches the answers change. No query leaves the test's namespaces.

mod common;

use common::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FIRST: &str = "203.0.113.2";
const SECOND: &str = "203.0.113.3";
/// The bound on how soon an answer follows a change: the watcher's 2 s, plus the guest's
/// loop (0.2 s between queries) and dig.
const FOLLOW_LIMIT: Duration = Duration::from_millis(2500);

const TOOLS: &[&str] = &["ip", "dnsmasq", "dig", "unshare", "nsenter", "mount", "sh", "timeout"];

/// `usernet run` in a mount and network namespace of the test's own (see the module comment).
struct World {
    /// Dropped first: stops usernet and both dnsmasq (one process group).
    bg: Background,
    dir: TempDir,
}

impl World {
    /// `setup` runs (as sh) inside the namespaces before usernet starts, with `$T` the test's
    /// directory; then `usernet run ARGS -- sh -c GUEST`, `{T}` in ARGS standing for the
    /// directory too.
    fn start(tag: &str, setup: &str, args: &[&str], guest: &str) -> World {
        World::start_as(tag, setup, args, guest, None)
    }

    /// As [`World::start`], with usernet run as `user` (`runuser -u USER`, from a copy of
    /// the binary in the test's directory) when there is one: rootless.
    fn start_as(tag: &str, setup: &str, args: &[&str], guest: &str, user: Option<&str>) -> World {
        World::start_mode(tag, setup, "run", args, guest, user)
    }

    /// As [`World::start_as`], with `usernet MODE` (`run`, or a drop-in mode) for `usernet run`.
    fn start_mode(tag: &str, setup: &str, mode: &str, args: &[&str], guest: &str, user: Option<&str>) -> World {
        let dir = TempDir::new(tag);
        let t = dir.path().display().to_string();
        let (runner, bin) = match user {
            None => (String::new(), usernet_bin()),
            Some(user) => {
                std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
                    .expect("chmod the test's directory");
                (format!("runuser -u {user} -- "), copy_binary_for_others(&dir))
            }
        };
        let mut dnsmasq = String::new();
        for (n, ip) in [(2, FIRST), (3, SECOND)] {
            dnsmasq.push_str(&format!(
                "dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --pid-file \
                 --bind-interfaces --listen-address=127.0.0.{n} --port=53 --log-facility=- --log-queries \
                 --address=/follow.test/{ip} 2>>\"$T/dnsmasq{n}.log\" &\n"
            ));
        }
        let script = format!(
            "set -e\n\
             T='{t}'\n\
             ip link set lo up\n\
             mkdir \"$T/ovl\"\n\
             mount -t tmpfs tmpfs \"$T/ovl\"\n\
             mkdir \"$T/ovl/upper\" \"$T/ovl/work\"\n\
             mount -t overlay overlay -o \"lowerdir=/etc,upperdir=$T/ovl/upper,workdir=$T/ovl/work\" /etc\n\
             {setup}\n\
             {dnsmasq}\
             for i in $(seq 100); do\n\
               if dig +short +time=1 +tries=1 @127.0.0.2 follow.test | grep -q {FIRST} &&\n\
                  dig +short +time=1 +tries=1 @127.0.0.3 follow.test | grep -q {SECOND}; then break; fi\n\
               sleep 0.1\n\
             done\n\
             echo READY\n\
             exec {runner}\"$USERNET\" {mode} \"$@\"\n"
        );
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "-n", "--propagation", "private", "--", "sh", "-c", &script, "sh"])
            .args(args.iter().map(|a| a.replace("{T}", &t)))
            .args(["--", "sh", "-c", guest])
            .env("USERNET", bin)
            .env("PATH", search_path())
            .env("RUST_LOG", "warn,usernet_host::dns_watch=info");
        let mut bg = Background::start(cmd, Stdio::piped());
        bg.wait_line("READY", Duration::from_secs(30));
        World { bg, dir }
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    /// Runs `sh -c SCRIPT` in the world's mount namespace (the namespace of usernet itself).
    fn inside(&self, script: &str) {
        let pid = self.bg.pid().to_string();
        let out = run("nsenter", &["-t", &pid, "-m", "--", "sh", "-c", script]);
        assert!(out.success(), "{out}\n{}", self.describe());
    }

    fn describe(&self) -> String {
        let log = |n: u8| std::fs::read_to_string(self.path(&format!("dnsmasq{n}.log"))).unwrap_or_default();
        format!("{}\n  dnsmasq 127.0.0.2:\n{}\n  dnsmasq 127.0.0.3:\n{}", self.bg.describe(), log(2), log(3))
    }

    /// The guest's answers so far: lines `ANSWER <n> <ip or nothing>`.
    fn answers(&self) -> Vec<String> {
        self.seen("ANSWER")
    }

    /// What the guest printed on its lines `<KIND> <n> <text>`: each text.
    fn seen(&self, kind: &str) -> Vec<String> {
        self.bg
            .lines_with(&format!("{kind} "))
            .iter()
            .map(|l| l.splitn(3, ' ').nth(2).unwrap_or("").trim().to_string())
            .collect()
    }

    /// Waits until every guest answer after the `after`-th is `want`, and at least three
    /// of them: how long the first took. Panics if it takes longer than `limit`.
    fn wait_answers(&self, after: usize, want: &str, limit: Duration) -> Duration {
        self.wait_seen("ANSWER", after, want, limit)
    }

    /// As [`World::wait_answers`], for the guest's lines `<KIND> <n> <text>`.
    fn wait_seen(&self, kind: &str, after: usize, want: &str, limit: Duration) -> Duration {
        let start = Instant::now();
        let mut first = None;
        loop {
            let answers = self.seen(kind);
            let new = answers.get(after..).unwrap_or(&[]);
            if let Some(i) = new.iter().position(|a| a == want) {
                first.get_or_insert_with(|| start.elapsed());
                let since = &new[i..];
                assert!(since.iter().all(|a| a == want), "answers went back and forth: {new:?}\n{}", self.describe());
                if since.len() >= 3 {
                    return first.unwrap_or_default();
                }
            }
            assert!(
                start.elapsed() < limit + Duration::from_secs(2),
                "no {want} within {limit:?}: {new:?}\n{}",
                self.describe()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET `path` on the API socket: the JSON body.
    fn api_get(&self, path: &str) -> serde_json::Value {
        let mut s = UnixStream::connect(self.path("api.sock")).expect("connect to the API");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        write!(s, "GET {path} HTTP/1.1\r\nHost: usernet\r\nConnection: close\r\n\r\n").expect("write request");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read answer");
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Writes `text` to a new file beside `path` and renames it over `path`.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    write(&tmp, text);
    std::fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
}

/// A guest that asks the gateway for follow.test every 0.2 s and prints `ANSWER n IP`.
const ASK_LOOP: &str = "i=0; while :; do i=$((i+1)); \
     echo \"ANSWER $i $(dig +short +time=1 +tries=1 @192.168.65.1 follow.test | head -n1)\"; \
     sleep 0.2; done";

/// /etc/resolv.conf a symlink to `$T/r/resolv.conf`, which names 127.0.0.2.
const RESOLV_SETUP: &str = "mkdir \"$T/r\"\n\
     printf 'nameserver 127.0.0.2\\n' > \"$T/r/resolv.conf\"\n\
     printf 'nameserver 127.0.0.3\\n' > \"$T/r/other.conf\"\n\
     rm -f /etc/resolv.conf\n\
     ln -s \"$T/r/resolv.conf\" /etc/resolv.conf";

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn upstreams_follow_the_hosts_resolv_conf() {
    require(TOOLS);
    let w = World::start("dns-follow", RESOLV_SETUP, &["--api", "{T}/api.sock"], ASK_LOOP);
    let target = w.path("r/resolv.conf");
    w.wait_answers(0, FIRST, Duration::from_secs(20));
    let v = w.api_get("/v1/resolver");
    assert_eq!(v["source"], "file", "{v}");
    assert_eq!(v["path"], "/etc/resolv.conf", "{v}");
    assert_eq!(v["servers"], serde_json::json!(["127.0.0.2:53"]), "{v}");

    let mut took = Vec::new();
    // 1. The file rewritten in place (through the symlink: same inode).
    let n = w.answers().len();
    write(&target, "nameserver 127.0.0.3\n");
    took.push(("in place", w.wait_answers(n, SECOND, FOLLOW_LIMIT)));
    // 2. A new file renamed over it.
    let n = w.answers().len();
    replace(&target, "# by rename\nnameserver 127.0.0.2\n");
    took.push(("rename", w.wait_answers(n, FIRST, FOLLOW_LIMIT)));
    // 3. The symlink re-pointed, as resolvconf and systemd-resolved do (ln -s, then rename).
    let n = w.answers().len();
    let other = w.path("r/other.conf").display().to_string();
    w.inside(&format!("ln -s '{other}' /etc/resolv.conf.new && mv -T /etc/resolv.conf.new /etc/resolv.conf"));
    took.push(("symlink", w.wait_answers(n, SECOND, FOLLOW_LIMIT)));
    // 4. The symlink replaced by a plain file, renamed into place (NetworkManager).
    let n = w.answers().len();
    w.inside(
        "printf 'search corp.test\\nnameserver 127.0.0.2\\noptions ndots:2\\n' > /etc/resolv.conf.tmp && \
         mv -T /etc/resolv.conf.tmp /etc/resolv.conf",
    );
    took.push(("plain file", w.wait_answers(n, FIRST, FOLLOW_LIMIT)));
    for (how, t) in &took {
        assert!(*t <= FOLLOW_LIMIT, "{how}: the answer followed after {t:?}\n{}", w.describe());
    }
    eprintln!("answers followed after: {took:?}");

    let v = w.api_get("/v1/resolver");
    assert_eq!(v["servers"], serde_json::json!(["127.0.0.2:53"]), "{v}");
    assert_eq!(v["search"], serde_json::json!(["corp.test"]), "{v}");
    assert_eq!(v["options"]["ndots"], 2, "{v}");

    // One info line per change, saying what changed.
    let stderr = w.bg.stderr();
    let changes: Vec<&str> = stderr.lines().filter(|l| l.contains("dns: /etc/resolv.conf changed:")).collect();
    assert_eq!(changes.len(), 4, "{}", w.describe());
    assert!(changes[0].contains("servers 127.0.0.2:53 -> 127.0.0.3:53"), "{}", w.describe());
    assert!(changes[1].contains("servers 127.0.0.3:53 -> 127.0.0.2:53"), "{}", w.describe());
    assert!(changes[2].contains("servers 127.0.0.2:53 -> 127.0.0.3:53"), "{}", w.describe());
    assert!(changes[3].contains("search (none) -> corp.test"), "{}", w.describe());
    assert!(changes[3].contains("options (none) -> ndots:2"), "{}", w.describe());
    assert!(changes.iter().all(|l| l.contains("INFO")), "{}", w.describe());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dns_upstream_on_the_command_line_stays_fixed() {
    require(TOOLS);
    let w =
        World::start("dns-fixed", RESOLV_SETUP, &["--dns-upstream", "127.0.0.3", "--api", "{T}/api.sock"], READ_LOOP);
    w.wait_answers(0, SECOND, Duration::from_secs(20));
    let v = w.api_get("/v1/resolver");
    assert_eq!(v["source"], "command-line", "{v}");
    assert_eq!(v["path"], serde_json::Value::Null, "{v}");
    assert_eq!(v["servers"], serde_json::json!(["127.0.0.3:53"]), "{v}");
    // The host's file changes; neither the gateway nor the guest's resolv.conf follows it
    // (the servers are fixed, and so is the guest's file: no search domain, as at start).
    let n = w.answers().len();
    replace(&w.path("r/resolv.conf"), "nameserver 127.0.0.2\nsearch fixed.test\noptions ndots:4\n");
    std::thread::sleep(Duration::from_secs(3));
    let answers = w.answers();
    assert!(answers.len() >= n + 5, "{}", w.describe());
    assert!(answers[n..].iter().all(|a| a == SECOND), "{answers:?}\n{}", w.describe());
    let reads = w.seen("RESOLV");
    assert!(reads.len() >= n + 5 && reads.iter().all(|r| r == "nameserver 192.168.65.1|"), "{reads:?}");
    assert!(!w.bg.stderr().contains("changed:"), "{}", w.describe());
}

/// `--dns-search` fixes the search domains alone: the guest's resolv.conf and the API show
/// them, not the host's, while the servers and options still follow the host's file; `.`
/// alone means none.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn dns_search_on_the_command_line_stays_fixed() {
    require(TOOLS);
    let args = ["--dns-search", "corp.test", "--dns-search", "Two.Test.", "--api", "{T}/api.sock"];
    let w = World::start("dns-search", PLAIN_SETUP, &args, READ_LOOP);
    w.wait_seen("RESOLV", 0, "nameserver 192.168.65.1|search corp.test two.test|", Duration::from_secs(20));
    w.wait_answers(0, FIRST, Duration::from_secs(20));
    let (n, a) = (w.seen("RESOLV").len(), w.answers().len());
    w.inside("printf 'nameserver 127.0.0.3\\nsearch host.test\\noptions ndots:3\\n' > /etc/resolv.conf");
    w.wait_answers(a, SECOND, FOLLOW_LIMIT);
    w.wait_seen("RESOLV", n, "nameserver 192.168.65.1|search corp.test two.test|options ndots:3|", GUEST_LIMIT);
    let v = w.api_get("/v1/resolver");
    assert_eq!(v["search"], serde_json::json!(["corp.test", "two.test"]), "{v}");
    assert_eq!(v["servers"], serde_json::json!(["127.0.0.3:53"]), "{v}");
    drop(w);

    let w = World::start("dns-search-none", PLAIN_SETUP, &["--dns-search", "."], READ_LOOP);
    w.wait_seen("RESOLV", 0, "nameserver 192.168.65.1|", Duration::from_secs(20));
    w.wait_answers(0, FIRST, Duration::from_secs(20));
}

/// pasta mode's `-D`, `--dns-host` and `-S` (Podman's `pasta_options`): the servers usernet's
/// DNS forwards to and the search list, instead of the host's resolv.conf's; a `-D` naming
/// the `--dns-forward` address is usernet's own DNS, which then forwards to the host's
/// resolvers, as pasta's does.
#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn pasta_mode_dns_servers_and_search_domains() {
    require(TOOLS);
    let pasta = |tag: &str, args: &[&str]| {
        let args = [&["--config-net", "--dns-forward", "10.0.2.3"], args].concat();
        World::start_mode(tag, PLAIN_SETUP, "pasta", &args, READ_LOOP, None)
    };
    // The host's (127.0.0.2, FIRST) without them.
    let w = pasta("pasta-dns-host", &[]);
    w.wait_seen("RESOLV", 0, "nameserver 10.0.2.3|search one.test|", Duration::from_secs(20));
    w.wait_answers(0, FIRST, Duration::from_secs(20));
    drop(w);
    let w = pasta("pasta-dns-d", &["-D", "127.0.0.3", "-S", "corp.test", "-S", "none", "-S", "b.test"]);
    w.wait_seen("RESOLV", 0, "nameserver 10.0.2.3|search b.test|", Duration::from_secs(20));
    w.wait_answers(0, SECOND, Duration::from_secs(20));
    drop(w);
    // With usernet's own address among -D's, usernet's DNS forwards to the host's, as pasta's.
    let w = pasta("pasta-dns-own", &["-D", "10.0.2.3", "-D", "127.0.0.3"]);
    w.wait_answers(0, FIRST, Duration::from_secs(20));
    drop(w);
    let w = pasta("pasta-dns-dns-host", &["-D", "127.0.0.2", "--dns-host", "127.0.0.3", "-S", "none"]);
    w.wait_seen("RESOLV", 0, "nameserver 10.0.2.3|", Duration::from_secs(20));
    w.wait_answers(0, SECOND, Duration::from_secs(20));
}

/// A guest that reads its /etc/resolv.conf every 0.2 s (`RESOLV n line|line|`, comments
/// left out) and asks for follow.test through it (`ANSWER n IP`: dig without `@` asks the
/// nameserver of that file).
const READ_LOOP: &str = "i=0; while :; do i=$((i+1)); \
     echo \"RESOLV $i $(grep -v '^#' /etc/resolv.conf | tr '\\n' '|')\"; \
     echo \"ANSWER $i $(dig +short +time=1 +tries=1 follow.test | head -n1)\"; \
     sleep 0.2; done";

/// How soon the guest's resolv.conf follows a change of the host's: the watcher's 1.1 s,
/// the guest's loop (0.2 s) and some slack for a busy machine.
const GUEST_LIMIT: Duration = Duration::from_secs(2);

/// /etc/resolv.conf a plain file naming 127.0.0.2, with a search domain.
const PLAIN_SETUP: &str = "mkdir \"$T/r\"\n\
     rm -f /etc/resolv.conf\n\
     printf 'nameserver 127.0.0.2\\nsearch one.test\\n' > /etc/resolv.conf";

/// The guest's /etc/resolv.conf stays usernet's whatever the host does to its own (renames
/// over it, rewrites it, re-points it as a symlink, renames over the symlink's target), and
/// its search domains and ndots follow the host's within [`GUEST_LIMIT`].
fn guest_resolv_conf_follows(user: Option<&str>) {
    // The guest says whose user namespace it is in first: rootless, `0 <user's uid> 1`.
    let guest = format!("echo \"UIDMAP $(awk '{{print $1, $2, $3}}' /proc/self/uid_map)\"; {READ_LOOP}");
    let w = World::start_as("dns-guest", PLAIN_SETUP, &[], &guest, user);
    w.wait_seen("RESOLV", 0, "nameserver 192.168.65.1|search one.test|", Duration::from_secs(20));
    if let Some(user) = user {
        let uid = run("id", &["-u", user]).stdout.trim().to_string();
        assert_eq!(w.seen("UIDMAP"), vec![format!("{uid} 1")], "not rootless as {user}\n{}", w.describe());
    }
    w.wait_answers(0, FIRST, Duration::from_secs(20));

    let mut took = Vec::new();
    let mut step = |how: &'static str, change: &dyn Fn(), want: &str, answer: &str| {
        let (n, a) = (w.seen("RESOLV").len(), w.answers().len());
        change();
        took.push((how, w.wait_seen("RESOLV", n, want, GUEST_LIMIT)));
        w.wait_answers(a, answer, FOLLOW_LIMIT);
    };
    // 1. A new file renamed over the host's (NetworkManager's way): the kernel detaches
    //    mounts whose mountpoint was replaced, in every namespace.
    step(
        "rename",
        &|| {
            w.inside(
                "printf 'nameserver 127.0.0.3\\nsearch two.test\\noptions ndots:3 timeout:1\\n' > /etc/resolv.conf.tmp \
                 && mv -T /etc/resolv.conf.tmp /etc/resolv.conf",
            )
        },
        "nameserver 192.168.65.1|search two.test|options ndots:3|",
        SECOND,
    );
    // 2. Rewritten in place.
    step(
        "in place",
        &|| w.inside("printf 'nameserver 127.0.0.3\\nsearch three.test\\n' > /etc/resolv.conf"),
        "nameserver 192.168.65.1|search three.test|",
        SECOND,
    );
    // 3. Re-pointed as a symlink (ln -s, then rename: resolvconf, systemd-resolved).
    let four = w.path("r/four.conf");
    write(&four, "nameserver 127.0.0.2\nsearch four.test\n");
    step(
        "symlink",
        &|| {
            w.inside(&format!(
                "ln -s '{}' /etc/resolv.conf.new && mv -T /etc/resolv.conf.new /etc/resolv.conf",
                four.display()
            ))
        },
        "nameserver 192.168.65.1|search four.test|",
        FIRST,
    );
    // 4. A new file renamed over the symlink's target.
    step(
        "rename of the target",
        &|| replace(&four, "nameserver 127.0.0.2\nsearch five.test ex.test\n"),
        "nameserver 192.168.65.1|search five.test ex.test|",
        FIRST,
    );
    // 5. No search domain any more.
    step("no search", &|| replace(&four, "nameserver 127.0.0.2\n"), "nameserver 192.168.65.1|", FIRST);
    // 6. The host's file gone (and back): the guest keeps reading its own meanwhile.
    step(
        "gone",
        &|| {
            w.inside("rm /etc/resolv.conf");
            std::thread::sleep(Duration::from_millis(1500));
        },
        "nameserver 192.168.65.1|",
        FIRST,
    );
    step(
        "back",
        &|| w.inside("printf 'nameserver 127.0.0.3\\nsearch six.test\\n' > /etc/resolv.conf"),
        "nameserver 192.168.65.1|search six.test|",
        SECOND,
    );
    for (how, t) in took.iter().filter(|(how, _)| *how != "gone") {
        assert!(*t <= GUEST_LIMIT, "{how}: the guest's resolv.conf followed after {t:?}\n{}", w.describe());
    }
    eprintln!("the guest's resolv.conf followed after: {took:?}");

    // The guest never read anything but usernet's file: the gateway as its only server,
    // never the host's servers, never an empty or half-written file.
    let reads = w.seen("RESOLV");
    assert!(
        reads.iter().all(|r| r.starts_with("nameserver 192.168.65.1|") && r.matches("nameserver").count() == 1),
        "the guest read another file: {reads:?}\n{}",
        w.describe()
    );
    // One line per change, dns_watch's own.
    let stderr = w.bg.stderr();
    let changes = stderr.lines().filter(|l| l.contains("dns: /etc/resolv.conf changed:")).count();
    assert_eq!(changes, 6, "{}", w.describe());
    assert!(stderr.contains("dns: /etc/resolv.conf is gone"), "{}", w.describe());
    assert!(!stderr.contains("WARN") && !stderr.contains("ERROR"), "{}", w.describe());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_resolv_conf_is_usernets_and_follows_the_host() {
    require(&[TOOLS, &["awk"]].concat());
    guest_resolv_conf_follows(None);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_resolv_conf_is_usernets_and_follows_the_host_rootless() {
    require(&[TOOLS, &["runuser", "awk"]].concat());
    guest_resolv_conf_follows(Some("nobody"));
}

/// The rest of the guest's /etc is the host's: a host file replaced by a rename while
/// COMMAND runs is seen at once, and what COMMAND writes or renames in /etc stays in its
/// tmpfs (the host's files untouched, nothing made on the host's disk).
fn guest_etc_is_the_hosts(user: Option<&str>) {
    let setup =
        format!("{PLAIN_SETUP}\nprintf 'one\\n' > /etc/usernet-marker\nprintf 'host\\n' > /etc/usernet-renamed");
    // The guest renames a file of its own over one of the host's, then reads the host's
    // marker every 0.2 s.
    let guest = "printf 'guest\\n' > /etc/usernet-made && mv /etc/usernet-made /etc/usernet-renamed; \
         echo \"WROTE 1 $(cat /etc/usernet-renamed)|$(getent passwd root | cut -d: -f1)\"; \
         i=0; while :; do i=$((i+1)); echo \"MARKER $i $(cat /etc/usernet-marker)\"; sleep 0.2; done";
    let w = World::start_as("dns-etc", &setup, &[], guest, user);
    w.wait_seen("MARKER", 0, "one", Duration::from_secs(20));
    assert_eq!(w.seen("WROTE"), vec!["guest|root".to_string()], "{}", w.describe());
    // The host's files are as they were, and the guest's own file is not among them.
    w.inside("test \"$(cat /etc/usernet-renamed)\" = host && test ! -e /etc/usernet-made");
    // `sed -i`'s way: a new file renamed over the host's.
    let n = w.seen("MARKER").len();
    w.inside("printf 'two\\n' > /etc/usernet-marker.tmp && mv -T /etc/usernet-marker.tmp /etc/usernet-marker");
    let took = w.wait_seen("MARKER", n, "two", GUEST_LIMIT);
    assert!(took <= GUEST_LIMIT, "the guest saw the renamed file after {took:?}\n{}", w.describe());
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_etc_is_the_hosts_and_its_own_writes_stay_in_it() {
    require(&[TOOLS, &["getent", "cut"]].concat());
    guest_etc_is_the_hosts(None);
}

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn guest_etc_is_the_hosts_and_its_own_writes_stay_in_it_rootless() {
    require(&[TOOLS, &["runuser", "getent", "cut"]].concat());
    guest_etc_is_the_hosts(Some("nobody"));
}

/// The hosts file of the host: the machine's own name on 127.0.1.1 (Debian's way), a name
/// on another address, a name that --add-host also gives.
const HOSTS: &str = "127.0.0.1 localhost\n\
     127.0.1.1 mybox.example mybox\n\
     10.0.0.5 db.corp.example db\n\
     10.0.0.6 added.example\n\
     ::1 localhost ip6-localhost ip6-loopback\n\
     2001:db8::5 six.example\n\
     2001:db8::6 db.corp.example\n";

#[test]
#[ignore = "needs root: run as root with the test tools, e.g. sudo bash .ci/run"]
fn the_hosts_etc_hosts_is_answered_and_followed() {
    require(TOOLS);
    // /etc/hosts a symlink to the test's file; usernet's upstream fixed (the hosts file is
    // followed all the same).
    let setup = format!(
        "printf '{}' > \"$T/hosts\"\n\
         rm -f /etc/hosts\n\
         ln -s \"$T/hosts\" /etc/hosts",
        HOSTS.replace('\n', "\\n")
    );
    let ask = |q: &str| format!("echo \"Q {q}: $(dig +short +time=2 +tries=2 @192.168.65.1 {q} | tr '\\n' ' ')\"; ");
    let status = |q: &str| {
        format!(
            "echo \"S {q}: $(dig +noall +comments +time=2 +tries=2 @192.168.65.1 {q} | grep -o 'status: [A-Z]*')\"; "
        )
    };
    let mut guest = String::new();
    for q in [
        "mybox.example",
        "MYBOX",
        "db.corp.example",
        "db",
        "added.example",
        "host.docker.internal",
        "localhost",
        "six.example",
    ] {
        guest.push_str(&ask(q));
    }
    guest.push_str(&ask("-x 10.0.0.5"));
    guest.push_str(&ask("-x 192.168.65.254"));
    guest.push_str(&ask("db.corp.example AAAA"));
    guest.push_str(&ask("six.example AAAA"));
    guest.push_str(&status("six.example"));
    guest.push_str(&ask("mybox.example AAAA"));
    guest.push_str(&status("mybox.example AAAA"));
    guest.push_str(&ask("-x 2001:db8::5"));
    guest.push_str(
        "echo DONE; i=0; while :; do i=$((i+1)); \
        echo \"ANSWER $i $(dig +short +time=1 +tries=1 @192.168.65.1 new.example | head -n1)\"; sleep 0.2; done",
    );
    let w = World::start(
        "dns-hosts",
        &setup,
        &["--dns-upstream", "127.0.0.2", "--add-host", "added.example:10.9.9.9", "--api", "{T}/api.sock"],
        &guest,
    );
    let bg_wait = |w: &World| {
        let end = Instant::now() + Duration::from_secs(60);
        while !w.bg.stdout().contains("DONE") {
            assert!(Instant::now() < end, "{}", w.describe());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    bg_wait(&w);
    let out = w.bg.stdout();
    let answer = |q: &str| -> String {
        let prefix = format!("Q {q}:");
        let line =
            out.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {prefix}\n{}", w.describe()));
        line[prefix.len()..].trim().to_string()
    };
    // The machine's own name reaches the host: its loopback address becomes the host address.
    assert_eq!(answer("mybox.example"), HOST_IP, "{}", w.describe());
    assert_eq!(answer("MYBOX"), HOST_IP, "{}", w.describe());
    assert_eq!(answer("db.corp.example"), "10.0.0.5", "{}", w.describe());
    assert_eq!(answer("db"), "10.0.0.5", "{}", w.describe());
    // --add-host wins over /etc/hosts.
    assert_eq!(answer("added.example"), "10.9.9.9", "{}", w.describe());
    assert_eq!(answer("host.docker.internal"), HOST_IP, "{}", w.describe());
    // localhost stays the guest's own: not answered with the host address.
    assert!(!answer("localhost").contains(HOST_IP), "{}", w.describe());
    // IPv6 lines give AAAA records; an IPv6-only name has no A record, but exists (NOERROR).
    assert_eq!(answer("six.example"), "", "{}", w.describe());
    assert!(out.contains("S six.example: status: NOERROR"), "{}", w.describe());
    assert_eq!(answer("six.example AAAA"), "2001:db8::5", "{}", w.describe());
    assert_eq!(answer("db.corp.example AAAA"), "2001:db8::6", "{}", w.describe());
    assert_eq!(answer("-x 10.0.0.5"), "db.corp.example.", "{}", w.describe());
    assert_eq!(answer("-x 192.168.65.254"), "host.docker.internal.", "{}", w.describe());
    assert_eq!(answer("-x 2001:db8::5"), "six.example.", "{}", w.describe());
    // The machine's own name has only loopback lines (::1 is no address for a guest): no
    // AAAA, but the name exists (NOERROR, not NXDOMAIN).
    assert_eq!(answer("mybox.example AAAA"), "", "{}", w.describe());
    assert!(out.contains("S mybox.example AAAA: status: NOERROR"), "{}", w.describe());
    // None of these went upstream, but localhost.
    let upstream_log = std::fs::read_to_string(w.path("dnsmasq2.log")).unwrap_or_default();
    assert!(!upstream_log.contains("mybox") && !upstream_log.contains("db.corp"), "{}", w.describe());

    let v = w.api_get("/v1/resolver");
    assert_eq!(v["hosts"]["path"], "/etc/hosts", "{v}");
    assert_eq!(v["hosts"]["names"], 5, "{v}");
    assert_eq!(v["hosts"]["names6"], 2, "{v}");
    // The API's table is its own records: /etc/hosts is behind it, not in it.
    let records = w.api_get("/v1/dns");
    assert!(!records.to_string().contains("mybox"), "{records}");

    // The file changes: a new name is answered within the bound.
    let n = w.answers().len();
    let start = Instant::now();
    replace(&w.path("hosts"), &format!("{HOSTS}10.0.0.7 new.example\n"));
    let took = w.wait_answers(n, "10.0.0.7", FOLLOW_LIMIT);
    assert!(took <= FOLLOW_LIMIT, "took {took:?} ({:?})\n{}", start.elapsed(), w.describe());
    assert!(w.bg.stderr().contains("dns: /etc/hosts changed: 5 -> 6 names"), "{}", w.describe());
}
