//! `usernet run`: COMMAND in new namespaces, its network served by the engine.
//!
//! Theory of operation. The order matters:
//!
//! 1. Parse the configuration, parse the published ports and bind their host sockets
//!    (`-p`, `-P`) and the dashboard's (`--web`), then create the `--pcap` file: failures
//!    here touch nothing (a file of the capture's name stays as it was) and start nothing.
//!    Wherever the host port was picked, its `docker port` line goes to stderr.
//! 2. Block SIGCHLD and the signals forwarded to COMMAND (SIGINT, SIGTERM, SIGHUP, SIGQUIT,
//!    SIGUSR1, SIGUSR2, SIGALRM) and open a signalfd for them, while
//!    the process still has one thread: every thread started later inherits the mask, so
//!    these signals are only ever read from the signalfd.
//! 3. Fork the sandbox (`netns::sandbox`), still single-threaded, and while it makes
//!    COMMAND's namespaces and TAP device (COMMAND not yet started) compile the seccomp
//!    filter (`usernet_host::confine`, applied before step 5) and fork the DNS follower
//!    (`dns_watch`; its thread starts after the join below). It hands over the TAP, then the
//!    guest's resolv.conf (an open file, which `dns_watch` rewrites when the host's search
//!    domains or `ndots` change; not with `--dns-upstream`). Rootless,
//!    usernet then joins the user namespace it made for COMMAND (still single-threaded, as
//!    the kernel requires), so that it may enter the guest's network namespace to make the
//!    sockets of loopback clients' connections (`engine::guest_sockets`).
//! 4. Start the gateway services (their runtime thread) and build the engine on the TAP;
//!    hand it the bound listeners (it owns them from then on, so they close when it is
//!    dropped) and start the control API on the engine's control handle: on `--api PATH`,
//!    or else on `<pid>.sock` in the user's runtime directory, where `usernet ps` finds it
//!    (the directory is made before step 3, `network::runtime_dir`), and the dashboard
//!    (`--web`) on the API's thread, its URL printed on stderr.
//! 5. Let the sandbox exec COMMAND: exit 127 or 126 if that fails.
//! 6. Run the engine with [`RunSupervisor`] watching the signalfd: on SIGCHLD it reaps, and
//!    when COMMAND has exited the loop stops with its status (128 + N if killed by signal
//!    N); the others are forwarded to COMMAND, as `docker run` forwards them (their default
//!    action would end usernet with nothing cleaned up and COMMAND left). SIGINT and SIGQUIT
//!    typed at the terminal (sent by the kernel) are not forwarded: the terminal already
//!    delivered them to COMMAND, which shares usernet's process group.
//!    Then the engine drains (`usernet_core::engine::drain`): while a connection is still
//!    sending from the guest (its kernel sends what COMMAND wrote before it exited, then
//!    the FIN), the loop runs on, after killing the processes COMMAND left behind, until
//!    none is, or none moved a byte for [`DRAIN_IDLE`], or a signal comes; what is left
//!    then is reset, so that the host's peer does not read a cut transfer as a whole one.
//! 7. Clean up: if COMMAND left processes behind, every process in the namespace is killed
//!    and reaped (see `netns::sandbox`); the TAP and the namespace go with the last
//!    descriptor. Every error path after step 3 drops the
//!    sandbox, which does the same, and usernet exits 125 with one line on stderr.

use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use anyhow::Context;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::net_opts::{NetOpts, bind_published, dns_watch_error};
use crate::network::{Network, start_network};
use usernet_core::config::{MTU_NETNS, NetConfig};
use usernet_core::engine::Supervisor;
use usernet_core::link::tap::Tap;
use usernet_core::pcap::PcapWriter;
use usernet_host::netns::Interface;
use usernet_host::netns::resolv;
use usernet_host::netns::sandbox::{GUEST_MAC, Sandbox, SandboxSpec, StartError};

// `--engine-threads`' range is the sandbox's bound on the TAP device's queues.
const _: () = assert!(usernet_host::netns::sandbox::MAX_QUEUES == 8);

/// After COMMAND exited: how long the guest's data may not move toward the host before the
/// connections still sending are reset (see step 6).
const DRAIN_IDLE: std::time::Duration = std::time::Duration::from_secs(5);

/// Snap length of `--pcap` captures: whole frames, even 64 KiB segments.
const PCAP_SNAPLEN: u32 = 262_144;

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub net: NetOpts,
    /// Threads that serve the network (1 to 8), each an engine with its own queue of the
    /// guest's interface: connections are spread over them by the kernel's hash of their
    /// addresses, so that several busy ones use more than one core. The bounds on flows
    /// and buffered data are divided among them. Not with --pcap.
    #[arg(long = "engine-threads", value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=8))]
    pub engine_threads: u8,
    /// Testing aid: set up the sandbox and supervise COMMAND without serving its network.
    #[arg(long = "debug-no-engine", hide = true)]
    pub no_engine: bool,
    /// The command to run, after `--`.
    #[arg(required = true, trailing_var_arg = true, value_name = "COMMAND")]
    pub command: Vec<std::ffi::OsString>,
}

/// The signals usernet supervises.
fn supervised_signals() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGALRM,
    ] {
        set.add(sig);
    }
    set
}

/// The sandbox spec for a network configuration.
pub fn sandbox_spec(cfg: &NetConfig) -> SandboxSpec {
    SandboxSpec {
        iface: Interface {
            ifname: "eth0".into(),
            mac: GUEST_MAC,
            ipv4: cfg.ipv4,
            address: cfg.guest,
            prefix: cfg.subnet.prefix,
            gateway: cfg.gateway,
            mtu: cfg.mtu,
            ipv6: cfg.v6.map(|n| (n.guest, usernet_core::config::GATEWAY_LINK_LOCAL)),
        },
        resolv_conf: {
            let dns = cfg.host_dns.upstreams();
            let server = match (&cfg.v6, cfg.ipv4) {
                (Some(v6), false) => v6.gateway.into(),
                _ => cfg.gateway.into(),
            };
            resolv::render_guest(server, &dns.search, dns.options.ndots)
        },
        queues: 1,
    }
}

pub fn main(args: RunArgs) -> anyhow::Result<i32> {
    let engines = usize::from(args.engine_threads);
    if engines > 1 && args.net.pcap.is_some() {
        anyhow::bail!("--pcap records one engine's frames: it needs --engine-threads 1");
    }
    let mut cfg = args.net.to_config(MTU_NETNS)?;
    cfg.limits = cfg.limits.per_engine(engines);
    let cfg = Arc::new(cfg);

    // Published ports are bound before anything else exists: a bad spec or a taken port is
    // one line and exit 125, before COMMAND starts, with nothing left listening.
    let specs = args.net.published_specs()?;
    let listeners = bind_published(&specs)?;
    // The dashboard's port likewise (`--web`).
    let web = args.net.bind_web()?;
    // The capture file last: a mistake above leaves a file of that name as it was.
    let pcap = match &args.net.pcap {
        Some(path) => {
            Some(PcapWriter::create(path, PCAP_SNAPLEN).with_context(|| format!("cannot create {}", path.display()))?)
        }
        None => None,
    };
    let spec = SandboxSpec { queues: engines, ..sandbox_spec(&cfg) };
    execute(Launch {
        net: &args.net,
        cfg,
        pcap,
        listeners,
        web,
        spec,
        command: &args.command,
        no_engine: args.no_engine,
        with_engine: None,
        register: true,
    })
}

/// What [`execute`] starts: the network of `cfg` (its published ports already bound) and
/// COMMAND in the sandbox of `spec`.
pub struct Launch<'a> {
    /// The proxy, `--api`, busy polling and DNS-following options.
    pub net: &'a NetOpts,
    pub cfg: Arc<NetConfig>,
    pub pcap: Option<PcapWriter>,
    pub listeners: Vec<usernet_core::ports::BoundListener>,
    /// The dashboard's socket and token (`--web`), already bound.
    pub web: Option<crate::net_opts::WebPort>,
    pub spec: SandboxSpec,
    pub command: &'a [std::ffi::OsString],
    pub no_engine: bool,
    /// Started with the engine's control handle and the guest's network namespace once the
    /// engine exists (pasta mode's `-T` and `auto` forwarding).
    pub with_engine: Option<WithEngine<'a>>,
    /// Registers the instance for `usernet ps` (`usernet run`; not the drop-in modes).
    pub register: bool,
}

/// See [`Launch::with_engine`].
pub type WithEngine<'a> =
    Box<dyn FnOnce(usernet_core::engine::control::ControlHandle, std::os::fd::OwnedFd) -> anyhow::Result<()> + 'a>;

/// Steps 2 to 7 of the theory of operation: the sandbox, the engine, COMMAND, its status.
/// pasta mode's `pasta -- COMMAND` goes through here too.
pub fn execute(launch: Launch<'_>) -> anyhow::Result<i32> {
    let Launch { net, cfg, pcap, listeners, web, spec, command, no_engine, with_engine, register } = launch;
    let proxy = net.proxy_config()?;
    let started = std::time::SystemTime::now();
    let runtime = if register && !no_engine { crate::network::runtime_dir() } else { None };

    let signals = supervised_signals();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&signals), None).context("blocking signals")?;
    let sfd = SignalFd::with_flags(&signals, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).context("signalfd")?;

    let starting = Sandbox::create(&spec, command)?;
    // While the sandbox makes its namespaces and TAP (a child of its own): the seccomp
    // filter is compiled and the DNS watcher's follower forked (no thread is started yet:
    // rootless, usernet joins the sandbox's user namespace below, which only a process with
    // one thread may do).
    let prepared = (!no_engine && !net.no_sandbox).then(usernet_host::confine::prepare);
    let forked_watch = (!no_engine).then(|| net.fork_dns_watch(&cfg));
    let mut sandbox = starting.ready()?;
    let tap_fd = sandbox.take_tap().context("the sandbox passed no TAP device")?;
    let tap = Tap::from_fd(tap_fd).context("TAP device")?;
    if !no_engine
        && !nix::unistd::geteuid().is_root()
        && let Err(e) = sandbox.join_user_namespace()
    {
        tracing::warn!("cannot join the guest's user namespace: {e}");
    }

    // Kept alive until the engine returns; dropping it stops the API and removes its socket.
    let mut api = None;
    // Follows the host's resolv.conf and /etc/hosts (its thread: after the join above).
    let mut dns_watch = None;
    let mut pending_watch = None;
    let mut engine = if no_engine {
        drop(pcap);
        drop(listeners);
        drop(web);
        None
    } else {
        match forked_watch.map(|f| f.and_then(|w| w.begin(cfg.host_dns.clone()).map_err(dns_watch_error))) {
            Some(Ok(w)) => pending_watch = Some(w),
            Some(Err(e)) => tracing::warn!("{e:#}"),
            None => {}
        }
        let Network { mut engine, shared, proxy_hook, services } =
            start_network(&cfg, proxy, pcap, Some(Box::new(tap)))?;
        engine.add_tcp_hook(proxy_hook);
        engine.add_static_lease(spec.iface.mac, cfg.guest);
        // The sandbox set this MAC and these addresses on the guest's interface
        // (host/netns/sandbox.rs); every engine knows them (and `--busy-poll`).
        let guest = usernet_core::engine::shard::Guest {
            mac: spec.iface.mac,
            ip: cfg.guest,
            ip6: spec.iface.ipv6.map(|(ip6, _)| ip6),
            busy_poll: std::time::Duration::from_micros(net.busy_poll),
        };
        guest.configure(&mut engine);
        // When COMMAND exits, what the guest's kernel still sends for it reaches the host.
        engine.drain_after_exit(DRAIN_IDLE);
        // Its thread enters the namespace while the rest starts (checked below).
        if let Some(netns) = sandbox.netns()
            && let Err(e) = engine.start_guest_netns(netns)
        {
            tracing::warn!("loopback clients of published ports go through the guest link: {e}");
        }
        // The TAP device's other queues, an engine each (`--engine-threads`).
        let queues = sandbox.take_more_queues();
        if !queues.is_empty() {
            let links = queues
                .into_iter()
                .map(|fd| Tap::from_fd(fd).map(|t| Box::new(t) as Box<dyn usernet_core::link::Link + Send>))
                .collect::<std::io::Result<Vec<_>>>()
                .context("TAP device queue")?;
            usernet_core::engine::shard::start(&mut engine, cfg.clone(), &services, links, guest)
                .context("starting the other engine threads")?;
        }
        drop(services);
        if let Some(start) = with_engine {
            let netns = sandbox.netns().context("the sandbox kept no network namespace")?;
            start(engine.control_handle().context("control handle")?, netns)?;
        }
        if !listeners.is_empty() {
            for p in engine.publish(listeners, cfg.first_guest()) {
                tracing::debug!("publishing {}/{} on {}", p.guest_port, p.proto, p.host);
            }
        }
        if net.api.is_some() || runtime.is_some() || web.is_some() {
            let about = usernet_host::api::About {
                mode: "run".into(),
                command: command.iter().map(|a| a.to_string_lossy().into_owned()).collect(),
                started,
                api: None,
            };
            let handle = engine.control_handle().context("control API")?;
            api = crate::network::start_api(net.api.as_deref(), runtime.as_deref(), handle, &shared, &cfg, about, web)?;
        }
        if let Err(e) = engine.guest_netns_entered() {
            tracing::warn!("loopback clients of published ports go through the guest link: {e}");
        }
        Some(engine)
    };

    // Set up: from here on, least privilege (before COMMAND runs, so that it never sees
    // usernet otherwise).
    if !no_engine {
        crate::network::confine_prepared(net.no_sandbox, prepared);
    }
    if let Some(pending) = pending_watch {
        // The guest's resolv.conf, for the watcher to rewrite when the host's search domains
        // or options change. The sandbox made it while the network started and usernet
        // confined itself.
        let guest_resolv = sandbox.take_resolv_conf()?.map(|file| {
            resolv::GuestResolvConf::new(file, cfg.dns.unwrap_or(cfg.gateway).into(), spec.resolv_conf.clone())
        });
        dns_watch = Some(pending.finish(guest_resolv));
    }
    match sandbox.start() {
        Ok(()) => {}
        Err(StartError::Exec(e)) => {
            eprintln!("usernet: {e}");
            return Ok(e.exit_code());
        }
        Err(e) => return Err(e.into()),
    }

    let mut sup = RunSupervisor { sfd, sandbox: &mut sandbox };
    let code = match engine.as_mut() {
        Some(engine) => engine.run(&mut sup).context("network engine failed")?,
        None => supervise_only(&mut sup)?,
    };
    // The DNS follower is killed first, so that its exit overlaps the rest; then the API
    // (it stops taking requests and removes its socket), then the engine, which closes the
    // published ports.
    if let Some(w) = &dns_watch {
        w.kill_follower();
    }
    drop(api);
    drop(engine);
    drop(dns_watch);
    sandbox.finish();
    Ok(code)
}

/// Without an engine: wait on the signalfd alone until COMMAND exits.
fn supervise_only(sup: &mut RunSupervisor<'_>) -> anyhow::Result<i32> {
    loop {
        let mut fds = [PollFd::new(sup.sfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e).context("poll"),
        }
        if let Some(code) = sup.on_ready() {
            return Ok(code);
        }
    }
}

/// Watches the signalfd for the engine: reaps children, forwards signals to COMMAND.
pub struct RunSupervisor<'a> {
    sfd: SignalFd,
    sandbox: &'a mut Sandbox,
}

impl RunSupervisor<'_> {
    /// The signals the signalfd holds, read without blocking. Bounded: the kernel queues at
    /// most one instance of each standard signal.
    fn pending_signals(&mut self) -> Vec<nix::sys::signalfd::siginfo> {
        let mut got = Vec::new();
        for _ in 0..64 {
            match self.sfd.read_signal() {
                Ok(Some(info)) => got.push(info),
                Ok(None) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!("reading signals: {e}");
                    break;
                }
            }
        }
        got
    }
}

impl Supervisor for RunSupervisor<'_> {
    fn fd(&self) -> RawFd {
        self.sfd.as_raw_fd()
    }

    fn on_ready(&mut self) -> Option<i32> {
        for info in self.pending_signals() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            if sig == Signal::SIGCHLD {
                continue;
            }
            let from_terminal = info.ssi_code == libc::SI_KERNEL && matches!(sig, Signal::SIGINT | Signal::SIGQUIT);
            if from_terminal {
                tracing::debug!("{sig} from the terminal: COMMAND got it too");
            } else {
                tracing::debug!("forwarding {sig} to COMMAND");
                self.sandbox.signal(sig);
            }
        }
        self.sandbox.reap()
    }

    fn interrupts_drain(&mut self) -> bool {
        let interrupted = self.pending_signals().iter().any(|info| info.ssi_signo != Signal::SIGCHLD as u32);
        self.sandbox.reap();
        if interrupted {
            tracing::debug!("a signal while the guest's last data drained: stopping now");
        }
        interrupted
    }

    fn draining(&mut self) {
        self.sandbox.kill_leftovers();
    }
}
