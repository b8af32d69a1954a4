//! `usernet serve`: networking for virtual machines (and existing namespaces), a drop-in
//! for gvisor-tap-vsock's gvproxy.
//!
//! Theory of operation. The order matters:
//!
//! 1. Parse everything (configuration, `--pcap`, published ports and their host sockets,
//!    the dashboard's socket (`--web`), the transports' addresses): a mistake is one line
//!    and exit 125, nothing started.
//! 2. Block SIGINT, SIGTERM, SIGHUP and SIGQUIT, each of which stops usernet (its sockets
//!    removed), and open a signalfd for them while the process has one thread, so every
//!    later thread inherits the mask.
//! 3. `--netns`: attach a TAP to each namespace (`netns::attach` forks, which must happen
//!    while usernet is single-threaded). The i-th namespace gets MAC `5a:94:ef:e4:0c:ee`+i
//!    and the address the DHCP server would give it, .2+i, recorded as a static lease.
//!    The TAP keeps its namespace alive, so each namespace is watched
//!    (`watch::when_netns_gone`: its file polled, or its process's pidfd): when it goes,
//!    the engine closes its link (`Command::DropLink`), and with no `--listen-*` the engine
//!    stops once no link is left, as pasta quits with its namespace.
//! 4. Bind the listening transports: `--listen-qemu unix:PATH` (stream, 4-byte big-endian
//!    lengths; one link per connection, so a rebooted VM simply connects again),
//!    `--listen-bess unixpacket:PATH` (SOCK_SEQPACKET, the same), `--listen-vfkit
//!    unixgram:PATH` (one datagram socket; the peer is learnt from what it receives) and
//!    `--listen-stdio` (2-byte little-endian lengths on stdin/stdout), `--listen-vpnkit
//!    unix:PATH` (vpnkit's vmnet handshake, then 2-byte little-endian lengths; one link per
//!    connection, a reconnecting interface UUID replacing its older link),
//!    `--listen-vhost-user PATH` (QEMU's `-netdev vhost-user`: usernet is the back-end and
//!    reads and fills the guest's virtio rings in shared memory; a control thread per
//!    connection, and a fresh link each time the guest's driver starts its rings).
//! 5. Start the gateway services and the engine, add links and acceptors, publish the
//!    `-p` ports to the first guest (192.168.65.2, the first DHCP lease), start the API (on
//!    `--api PATH`, or else on `<pid>.sock` in the user's runtime directory, where
//!    `usernet ps` finds it; the directory is made in step 1) and the dashboard (`--web`),
//!    and
//!    with `--guest-api` let the engine hand guest connections to gateway:80 to the API
//!    (gvproxy serves its API there too), which then knows the calling guest's address and
//!    asks for the token (printed on stderr, or `--guest-api-token-file`).
//!    The HTTP proxy flags (`--http-proxy`, ...) apply as in `run`.
//! 6. Run the engine until SIGINT or SIGTERM: exit 0. Dropping the API removes its socket;
//!    dropping the engine closes every link and removes the transports' socket files.

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::net_opts::{NetOpts, bind_published};
use crate::network::{Network, start_network};
use crate::watch::when_netns_gone;
use usernet_core::config::{MTU_VM, NetConfig};
use usernet_core::engine::Supervisor;
use usernet_core::engine::control::Command;
use usernet_core::link::dgram::DgramLink;
use usernet_core::link::qemu::{QemuAcceptor, parse_socket_url};
use usernet_core::link::seqpacket::SeqpacketAcceptor;
use usernet_core::link::tap::Tap;
use usernet_core::link::vhost_user::VhostUserAcceptor;
use usernet_core::link::vpnkit::VpnkitAcceptor;
use usernet_core::link::{Link, LinkAcceptor};
use usernet_core::pcap::PcapWriter;
use usernet_host::netns::Interface;
use usernet_host::netns::attach::{AttachSpec, NetnsTarget};
use usernet_host::netns::sandbox::GUEST_MAC;

/// Snap length of `--pcap` captures: whole frames.
const PCAP_SNAPLEN: u32 = 262_144;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    #[command(flatten)]
    pub net: NetOpts,
    /// Serve QEMU's stream transport (`-netdev stream`) on a Unix socket: `unix:PATH`
    /// (repeatable).
    #[arg(long = "listen-qemu", value_name = "unix:PATH")]
    pub listen_qemu: Vec<String>,
    /// Serve the datagram transport (vfkit, QEMU `-netdev dgram`) on a Unix datagram
    /// socket: `unixgram:PATH` (repeatable).
    #[arg(long = "listen-vfkit", value_name = "unixgram:PATH")]
    pub listen_vfkit: Vec<String>,
    /// Serve the SOCK_SEQPACKET transport (BESS) on a Unix socket: `unixpacket:PATH`
    /// (repeatable).
    #[arg(long = "listen-bess", value_name = "unixpacket:PATH")]
    pub listen_bess: Vec<String>,
    /// Serve vpnkit's ethernet protocol (vmnet: HyperKit's virtio-vpnkit, rootlesskit's
    /// vpnkit driver) on a Unix socket: `unix:PATH` (repeatable).
    #[arg(long = "listen-vpnkit", value_name = "unix:PATH")]
    pub listen_vpnkit: Vec<String>,
    /// Serve QEMU's vhost-user network back-end (`-netdev vhost-user`, with the guest's RAM
    /// shared: `-object memory-backend-memfd,...,share=on`) on a Unix socket: `PATH`
    /// (repeatable).
    #[arg(long = "listen-vhost-user", value_name = "PATH")]
    pub listen_vhost_user: Vec<PathBuf>,
    /// Serve one guest on stdin and stdout (2-byte little-endian length prefixes).
    #[arg(long = "listen-stdio")]
    pub listen_stdio: bool,
    /// Attach a TAP device to an existing network namespace: a PID, a path, or the NAME of
    /// one that `ip netns add` made (/run/netns/NAME, as pasta reads it) (repeatable). When
    /// the namespace goes (its file removed, as by `ip netns del`, or the process exited),
    /// its TAP goes too; with no `--listen-*`, usernet exits once none is left, as pasta does.
    #[arg(long = "netns", value_name = "PATH|NAME|PID")]
    pub netns: Vec<NetnsTarget>,
    /// Name of the TAP device created by `--netns`.
    #[arg(long = "netns-ifname", value_name = "NAME", default_value = "eth0")]
    pub netns_ifname: String,
    /// Serve the control API to the guests at the gateway's port 80, as gvproxy does: only
    /// publishing to the calling guest's own address and read-only views, and only with a
    /// token (`Authorization: Bearer TOKEN`): a fresh one printed on stderr, or the first
    /// line of --guest-api-token-file.
    #[arg(long = "guest-api")]
    pub guest_api: bool,
    /// The guest API's token, the first line of this file (for a VM tool that hands it to
    /// its guest).
    #[arg(long = "guest-api-token-file", value_name = "PATH", requires = "guest_api")]
    pub guest_api_token_file: Option<PathBuf>,
}

/// The guest API's token: the first line of `file`, or a fresh random one.
fn guest_api_token(file: Option<&std::path::Path>) -> anyhow::Result<String> {
    let Some(path) = file else {
        return usernet_host::api::web::new_token().context("a token for the guest API");
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("--guest-api-token-file {}", path.display()))?;
    let token = text.lines().next().unwrap_or("").trim().to_string();
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        anyhow::bail!(
            "--guest-api-token-file {}: the first line must be a token of at least 16 printable characters",
            path.display()
        );
    }
    Ok(token)
}

/// The MAC of the i-th `--netns` guest.
pub fn netns_mac(i: usize) -> [u8; 6] {
    let mut mac = GUEST_MAC;
    mac[5] = mac[5].wrapping_add(i as u8);
    mac
}

pub fn main(args: ServeArgs) -> anyhow::Result<i32> {
    let cfg = Arc::new(args.net.to_config(MTU_VM)?);
    let transports = Transports::parse(&args)?;
    if transports.is_empty() && args.netns.is_empty() {
        anyhow::bail!(
            "no transport: give --listen-qemu, --listen-vfkit, --listen-bess, --listen-vpnkit, --listen-vhost-user, --listen-stdio or --netns"
        );
    }
    if args.netns.len() > 250 {
        anyhow::bail!("too many --netns");
    }
    let specs = args.net.published_specs()?;
    let listeners = bind_published(&specs)?;
    let web = args.net.bind_web()?;
    // The capture file last: a mistake above leaves a file of that name as it was.
    let pcap = match &args.net.pcap {
        Some(path) => {
            Some(PcapWriter::create(path, PCAP_SNAPLEN).with_context(|| format!("cannot create {}", path.display()))?)
        }
        None => None,
    };
    let proxy = args.net.proxy_config()?;
    let started = std::time::SystemTime::now();
    let runtime = crate::network::runtime_dir();

    let mut signals = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        signals.add(sig);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).context("blocking signals")?;
    let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    // Namespaces first: attaching forks, which needs a single-threaded process.
    let mut taps = Vec::new();
    for (i, target) in args.netns.iter().enumerate() {
        let spec = AttachSpec {
            target: target.clone(),
            userns: None,
            configure: true,
            iface: Interface {
                ifname: args.netns_ifname.clone(),
                mac: netns_mac(i),
                ipv4: cfg.ipv4,
                address: cfg.subnet.host(2 + i as u32),
                prefix: cfg.subnet.prefix,
                gateway: cfg.gateway,
                mtu: cfg.mtu,
                ipv6: cfg.v6.map(|n| (n.at(2 + i as u64), usernet_core::config::GATEWAY_LINK_LOCAL)),
            },
        };
        let attached = usernet_host::netns::attach::attach(&spec)?;
        let tap = Tap::from_fd(attached.tap).context("TAP device")?;
        taps.push((spec, tap));
    }

    // Its guests get MACs after the `--netns` ones.
    let (acceptors, links) = transports.bind(&cfg, netns_mac(args.netns.len()))?;

    let Network { mut engine, shared, proxy_hook, .. } = start_network(&cfg, proxy, pcap, None)?;
    // One guest per link: none may use another's MAC or address.
    engine.bind_guests_to_links();
    // Follows the host's resolv.conf and /etc/hosts until usernet stops.
    let dns_watch = match args.net.start_dns_watch(&cfg) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!("{e:#}");
            None
        }
    };
    engine.set_busy_poll(std::time::Duration::from_micros(args.net.busy_poll));
    for (spec, tap) in taps {
        engine.add_static_lease(spec.iface.mac, spec.iface.address);
        if let Some((ip6, _)) = spec.iface.ipv6 {
            engine.reserve_guest6(spec.iface.mac, ip6);
        }
        let link = engine.add_link(Box::new(tap));
        // The TAP keeps the namespace alive: when its user is done with it (`ip netns del`,
        // or the process named exited), the link goes, as pasta quits then.
        let handle = engine.control_handle().context("control API")?;
        when_netns_gone(&spec.target, move |why| {
            let why = format!("{why}: the namespace is gone, and its link with it");
            handle.send(Command::DropLink { link, why });
        })
        .with_context(|| format!("cannot follow the namespace {}", spec.target))?;
    }
    if transports.is_empty() {
        // Only namespaces to serve: none left, nothing left to do.
        engine.stop_without_links();
    }
    for link in links {
        engine.add_link(link);
    }
    for a in acceptors {
        let name = a.describe();
        engine.add_acceptor(a).with_context(|| format!("{name}: cannot watch it"))?;
    }
    if !listeners.is_empty() {
        for p in engine.publish(listeners, cfg.first_guest()) {
            tracing::debug!("publishing {}/{} on {}", p.guest_port, p.proto, p.host);
        }
    }

    // Kept alive until the engine returns; dropping it stops the API and removes its socket.
    let mut api = None;
    let handle = engine.control_handle().context("control API")?;
    let about = usernet_host::api::About {
        mode: "serve".into(),
        command: std::env::args().skip(1).collect(),
        started,
        api: None,
    };
    let registered = crate::network::start_api(
        args.net.api.as_deref(),
        runtime.as_deref(),
        handle.clone(),
        &shared,
        &cfg,
        about,
        web,
    )?;
    if args.guest_api {
        let token = guest_api_token(args.guest_api_token_file.as_deref())?;
        api = serve_guest_api(&mut engine, registered.as_ref(), handle, &shared, &cfg, Some(&token))?;
        if args.guest_api_token_file.is_none() {
            eprintln!(
                "usernet: guest API at http://{}/ with the header \"Authorization: Bearer {token}\"",
                cfg.gateway
            );
        }
    }
    // After the guest API's hook, so that gateway:80 stays the API's.
    engine.add_tcp_hook(proxy_hook);

    crate::network::confine(args.net.no_sandbox);
    let mut sup = ServeSupervisor { sfd };
    let code = engine.run(&mut sup).context("network engine failed")?;
    drop(registered);
    drop(api);
    drop(engine);
    drop(dns_watch);
    Ok(code)
}

/// The socket transports to listen on, from `serve`'s flags (or gvproxy's).
#[derive(Debug, Default)]
pub struct Transports {
    pub qemu: Vec<PathBuf>,
    pub vfkit: Vec<PathBuf>,
    pub bess: Vec<PathBuf>,
    pub vpnkit: Vec<PathBuf>,
    pub vhost_user: Vec<PathBuf>,
    pub stdio: bool,
}

/// What [`Transports::bind`] makes: acceptors (a link per connection) and links.
pub type BoundTransports = (Vec<Box<dyn LinkAcceptor>>, Vec<Box<dyn Link>>);

/// The file a socket path names, however written (`./a.sock`, `a.sock`, `dir/../a.sock`,
/// through a symlinked directory): its directory resolved, or, where that does not exist
/// (the bind will say so), the path made absolute and its `.` and `..` taken as written.
fn socket_path_key(path: &std::path::Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if let (Some(dir), Some(name)) = (abs.parent(), abs.file_name())
        && let Ok(dir) = std::fs::canonicalize(dir)
    {
        return dir.join(name);
    }
    abs.components().fold(PathBuf::new(), |mut p, c| {
        match c {
            std::path::Component::ParentDir => {
                p.pop();
            }
            std::path::Component::CurDir => {}
            c => p.push(c),
        }
        p
    })
}

impl Transports {
    fn parse(args: &ServeArgs) -> anyhow::Result<Transports> {
        let parse = |urls: &[String], scheme: &str| -> anyhow::Result<Vec<PathBuf>> {
            urls.iter().map(|u| parse_socket_url(u, scheme).map_err(anyhow::Error::msg)).collect()
        };
        let t = Transports {
            qemu: parse(&args.listen_qemu, "unix")?,
            vfkit: parse(&args.listen_vfkit, "unixgram")?,
            bess: parse(&args.listen_bess, "unixpacket")?,
            vpnkit: parse(&args.listen_vpnkit, "unix")?,
            vhost_user: args
                .listen_vhost_user
                .iter()
                .map(|p| match p.to_str().and_then(|s| s.strip_prefix("unix:")) {
                    Some(rest) => PathBuf::from(rest.strip_prefix("//").unwrap_or(rest)),
                    None => p.clone(),
                })
                .collect(),
            stdio: args.listen_stdio,
        };
        t.check_paths_differ()?;
        Ok(t)
    }

    /// One socket per path: a path given twice would have its second listener find the
    /// first there ("another server is listening there"), which names the wrong culprit.
    fn check_paths_differ(&self) -> anyhow::Result<()> {
        let named = [
            ("--listen-qemu", &self.qemu),
            ("--listen-vfkit", &self.vfkit),
            ("--listen-bess", &self.bess),
            ("--listen-vpnkit", &self.vpnkit),
            ("--listen-vhost-user", &self.vhost_user),
        ];
        let mut seen: Vec<(PathBuf, &str)> = Vec::new();
        for (flag, paths) in named {
            for path in paths.iter() {
                let key = socket_path_key(path);
                if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
                    anyhow::bail!(
                        "{} is given twice ({first} and {flag}): each transport needs a socket path of its own",
                        path.display()
                    );
                }
                seen.push((key, flag));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.qemu.is_empty()
            && self.vfkit.is_empty()
            && self.bess.is_empty()
            && self.vpnkit.is_empty()
            && self.vhost_user.is_empty()
            && !self.stdio
    }

    /// Binds every transport: the acceptors (a link per connection) and the links that
    /// exist from the start (the datagram socket, stdio). vpnkit's guests get MACs from
    /// `vpnkit_macs` on.
    pub fn bind(&self, cfg: &NetConfig, vpnkit_macs: [u8; 6]) -> anyhow::Result<BoundTransports> {
        let mut acceptors: Vec<Box<dyn LinkAcceptor>> = Vec::new();
        let mut links: Vec<Box<dyn Link>> = Vec::new();
        for path in &self.qemu {
            let a = QemuAcceptor::bind(path).with_context(|| format!("cannot listen on unix:{}", path.display()))?;
            acceptors.push(Box::new(a));
        }
        for path in &self.bess {
            let a = SeqpacketAcceptor::bind(path)
                .with_context(|| format!("cannot listen on unixpacket:{}", path.display()))?;
            acceptors.push(Box::new(a));
        }
        for path in &self.vpnkit {
            let mtu = cfg.mtu.min(u16::MAX as u32 - 14) as u16;
            let a = VpnkitAcceptor::bind(path, mtu, cfg.subnet, vpnkit_macs)
                .with_context(|| format!("cannot listen on unix:{}", path.display()))?;
            acceptors.push(Box::new(a));
        }
        for path in &self.vhost_user {
            let a = VhostUserAcceptor::bind(path)
                .with_context(|| format!("cannot listen on vhost-user {}", path.display()))?;
            acceptors.push(Box::new(a));
        }
        for path in &self.vfkit {
            let l = DgramLink::bind(path).with_context(|| format!("cannot listen on unixgram:{}", path.display()))?;
            links.push(Box::new(l));
        }
        if self.stdio {
            links.push(Box::new(usernet_core::link::stdio::stdio_link().context("stdin/stdout")?));
        }
        Ok((acceptors, links))
    }
}

/// Serves the control API to the guests at the gateway's port 80, as gvproxy does: the
/// API of `registered`, or else one of its own (returned, to keep alive); with `token`,
/// only to requests that carry it.
pub fn serve_guest_api(
    engine: &mut usernet_core::engine::Engine,
    registered: Option<&crate::network::Api>,
    handle: usernet_core::engine::control::ControlHandle,
    shared: &crate::network::Shared,
    cfg: &Arc<NetConfig>,
    token: Option<&str>,
) -> anyhow::Result<Option<usernet_host::api::ApiServer>> {
    let (guest_api, own) = match registered {
        Some(a) => (a.server.guest_api(token), None),
        None => {
            let server = usernet_host::api::serve_without_socket(
                handle,
                shared.dns_records.clone(),
                cfg.clone(),
                Some(shared.proxy_settings.clone()),
            )
            .context("control API")?;
            (server.guest_api(token), Some(server))
        }
    };
    let api_addr = std::net::SocketAddr::V4(SocketAddrV4::new(cfg.gateway, 80));
    engine.add_tcp_hook(Box::new(move |dst, guest| match guest {
        std::net::SocketAddr::V4(guest) if dst == api_addr => Some(guest_api.connect(guest)),
        _ => None,
    }));
    Ok(own)
}

/// Stops the engine on SIGINT or SIGTERM, with exit status 0.
struct ServeSupervisor {
    sfd: SignalFd,
}

impl Supervisor for ServeSupervisor {
    fn fd(&self) -> RawFd {
        self.sfd.as_raw_fd()
    }

    fn on_ready(&mut self) -> Option<i32> {
        // Bounded: the kernel queues at most one instance of each standard signal.
        for _ in 0..8 {
            match self.sfd.read_signal() {
                Ok(Some(info)) => {
                    tracing::info!(signal = info.ssi_signo, "stopping on a signal");
                    return Some(0);
                }
                Ok(None) => return None,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("reading signals: {e}");
                    return None;
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_parse() {
        let cli = crate::Cli::try_parse_from([
            "usernet",
            "serve",
            "--listen-qemu",
            "unix:/tmp/a.sock",
            "--listen-vfkit",
            "unixgram:///tmp/b.sock",
            "--netns",
            "123",
            "--guest-api",
            "-p",
            "8080:80",
        ])
        .unwrap();
        let crate::Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.listen_qemu, vec!["unix:/tmp/a.sock".to_string()]);
        assert_eq!(args.netns, vec![NetnsTarget::Pid(123)]);
        assert!(args.guest_api);
        assert_eq!(netns_mac(0), GUEST_MAC);
        assert_eq!(netns_mac(1)[5], GUEST_MAC[5].wrapping_add(1));
    }

    /// A socket path given twice, whatever the transports and however written, is refused
    /// by name before anything is bound.
    #[test]
    fn a_socket_path_given_twice_is_refused() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["usernet", "serve"];
            argv.extend_from_slice(extra);
            let cli = crate::Cli::try_parse_from(argv).unwrap();
            let crate::Command::Serve(args) = cli.command else { panic!("not serve") };
            Transports::parse(&args).map(|_| ()).map_err(|e| e.to_string())
        };
        let err = parse(&["--listen-qemu", "unix:/tmp/x/a.sock", "--listen-qemu", "unix:///tmp/x/a.sock"]).unwrap_err();
        assert_eq!(
            err,
            "/tmp/x/a.sock is given twice (--listen-qemu and --listen-qemu): each transport needs a socket path of its own"
        );
        let err =
            parse(&["--listen-vpnkit", "unix:/tmp/x/b.sock", "--listen-vhost-user", "/tmp/x/y/../b.sock"]).unwrap_err();
        assert!(err.contains("(--listen-vpnkit and --listen-vhost-user)"), "{err}");
        assert!(parse(&["--listen-qemu", "unix:/tmp/x/a.sock", "--listen-vfkit", "unixgram:/tmp/x/b.sock"]).is_ok());
        // Through a symlinked directory: the same file.
        let dir = std::env::temp_dir().join(format!("usernet-serve-paths-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("real")).unwrap();
        let _ = std::fs::remove_file(dir.join("link"));
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        let (a, b) = (dir.join("real/c.sock"), dir.join("link/c.sock"));
        let err = parse(
            &["--listen-qemu", &format!("unix:{}", a.display()), "--listen-bess"]
                .into_iter()
                .chain([format!("unixpacket:{}", b.display()).as_str()])
                .collect::<Vec<_>>(),
        )
        .unwrap_err();
        assert!(err.contains("given twice"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `--no-host-loopback` (run and serve share it) closes the host address to the host's
    /// loopback; without it, it is open.
    #[test]
    fn no_host_loopback_flag() {
        for (cmd, extra, open) in [
            ("serve", &["--listen-stdio"][..], true),
            ("serve", &["--listen-stdio", "--no-host-loopback"][..], false),
            ("run", &["--no-host-loopback", "--", "true"][..], false),
            ("run", &["--", "true"][..], true),
        ] {
            let mut args = vec!["usernet", cmd, "--dns-upstream", "127.0.0.1"];
            args.extend_from_slice(extra);
            let cli = crate::Cli::try_parse_from(args).unwrap();
            let net = match cli.command {
                crate::Command::Serve(a) => a.net,
                crate::Command::Run(a) => a.net,
                _ => panic!("{cmd}"),
            };
            assert_eq!(net.to_config(1500).unwrap().host_loopback, open, "{cmd} {extra:?}");
        }
    }

    /// `--busy-poll` is on by default (the engine's default window), 0 turns it off, and a
    /// window beyond the limit or not a number is a parse error naming the flag.
    #[test]
    fn busy_poll_flag() {
        let window = |extra: &[&str]| {
            let mut args = vec!["usernet", "run"];
            args.extend_from_slice(extra);
            args.extend(["--", "true"]);
            crate::Cli::try_parse_from(args).map(|cli| match cli.command {
                crate::Command::Run(a) => a.net.busy_poll,
                _ => unreachable!(),
            })
        };
        if std::env::var_os("USERNET_BUSY_POLL").is_none() {
            let default = usernet_core::engine::busy_poll::DEFAULT_MAX.as_micros() as u64;
            assert_eq!(window(&[]).unwrap(), default);
            assert!(default > 0);
        }
        assert_eq!(window(&["--busy-poll", "0"]).unwrap(), 0);
        assert_eq!(window(&["--busy-poll", "250"]).unwrap(), 250);
        for bad in ["10001", "soon", "1.5"] {
            let e = window(&["--busy-poll", bad]).unwrap_err().to_string();
            assert!(e.contains("--busy-poll"), "{e}");
        }
    }

    /// `--deny`, `--allow`, `--allow-domain` (run and serve share them) become the
    /// configuration's egress policy; a bad rule or name is a parse error (exit status 125,
    /// as every bad flag) that names it.
    #[test]
    fn egress_policy_flags() {
        use usernet_core::policy::{DenyReason, Verdict};
        let cli = crate::Cli::try_parse_from([
            "usernet",
            "run",
            "--dns-upstream",
            "127.0.0.1",
            "--deny",
            "198.51.100.66",
            "--allow",
            "198.51.100.0/24:80,443",
            "--allow",
            "[2001:db8::/32]:443",
            "--allow-domain",
            "Example.TEST.",
            "--",
            "true",
        ])
        .unwrap();
        let crate::Command::Run(a) = cli.command else { panic!("not run") };
        let cfg = a.net.to_config(1500).unwrap();
        let rules = cfg.policy.rules();
        assert_eq!(rules.allow.len(), 2);
        assert_eq!(rules.allow_domains, vec!["example.test".to_string()]);
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(cfg.policy.check(ip("198.51.100.7"), Some(443)), Verdict::Allow);
        assert_eq!(cfg.policy.check(ip("198.51.100.66"), Some(443)), Verdict::Deny(DenyReason::DenyRule));
        assert_eq!(cfg.policy.check(ip("203.0.113.1"), Some(443)), Verdict::Deny(DenyReason::NotAllowed));
        for (flag, bad, says) in [
            ("--deny", "10.0.0.0/33", "prefix /33"),
            ("--allow", "10.0.0.1:0", "invalid port"),
            ("--allow", "example.com", "not an IP address"),
            ("--allow-domain", "a b", "only letters"),
        ] {
            let e = crate::Cli::try_parse_from(["usernet", "serve", "--listen-stdio", flag, bad]).unwrap_err();
            let text = e.to_string();
            assert!(text.contains(bad) && text.contains(says), "{flag} {bad}: {text}");
        }
    }

    /// The guest API's token: a fresh one (64 hex digits) unless a file gives it; a file
    /// whose first line is too short, or missing, is an error naming the flag.
    #[test]
    fn guest_api_tokens() {
        let fresh = super::guest_api_token(None).unwrap();
        assert_eq!(fresh.len(), 64);
        assert_ne!(fresh, super::guest_api_token(None).unwrap());
        let dir = std::env::temp_dir().join(format!("usernet-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  usernet-token-0123456789  \nrest\n").unwrap();
        assert_eq!(super::guest_api_token(Some(&file)).unwrap(), "usernet-token-0123456789");
        std::fs::write(&file, "short\n").unwrap();
        let e = super::guest_api_token(Some(&file)).unwrap_err().to_string();
        assert!(e.contains("--guest-api-token-file") && e.contains("at least 16"), "{e}");
        let e = format!("{:#}", super::guest_api_token(Some(&dir.join("none"))).unwrap_err());
        assert!(e.contains("--guest-api-token-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// `--web` (run and serve share it): an address and port, `localhost:PORT`, nothing else;
    /// binding it gives the port picked for 0 and a token.
    #[test]
    fn web_flag() {
        let net = |extra: &[&str]| {
            let mut args = vec!["usernet", "serve", "--listen-stdio"];
            args.extend_from_slice(extra);
            crate::Cli::try_parse_from(args).map(|cli| match cli.command {
                crate::Command::Serve(a) => a.net,
                _ => panic!("not serve"),
            })
        };
        assert_eq!(net(&[]).unwrap().web, None);
        assert_eq!(net(&["--web", "127.0.0.1:8080"]).unwrap().web, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(net(&["--web", "[::1]:0"]).unwrap().web, Some("[::1]:0".parse().unwrap()));
        assert_eq!(net(&["--web", "localhost:9"]).unwrap().web, Some("127.0.0.1:9".parse().unwrap()));
        for bad in ["8080", "127.0.0.1", "example.com:80", "127.0.0.1:99999"] {
            assert!(net(&["--web", bad]).is_err(), "{bad}");
        }
        assert!(net(&[]).unwrap().bind_web().unwrap().is_none());
        let web = net(&["--web", "127.0.0.1:0"]).unwrap().bind_web().unwrap().unwrap();
        assert_ne!(web.addr.port(), 0);
        assert_eq!(web.listener.local_addr().unwrap(), web.addr);
        assert_eq!(web.token.len(), 64);
        // Its port is taken now: a second bind fails, naming it.
        let taken = net(&["--web", &web.addr.to_string()]).unwrap().bind_web().err().unwrap().to_string();
        assert_eq!(taken, format!("cannot serve the dashboard on {}: address already in use", web.addr));
    }
}
