//! gvproxy mode: usernet started as `gvproxy` (a symlink of that name, or `usernet gvproxy
//! ARGS...`) takes gvisor-tap-vsock's gvproxy command line, network and exit behaviour, so
//! that Podman machine (its QEMU and vfkit providers), CRC and anything else that starts
//! gvproxy for a VM starts usernet instead.
//!
//! Theory of operation.
//! 1. Parse the command line with Go's `flag` grammar (`modes::goflag`): `-listen` (the
//!    HTTP API on `unix://`, `tcp://` or `vsock://`, repeatable, where a VM may also join
//!    with `POST /connect`), `-services` (the same API elsewhere, without `/connect`),
//!    the transports `-listen-qemu unix://`, `-listen-bess unixpacket://`, `-listen-vfkit
//!    unixgram://`, `-listen-vpnkit unix://`, `-listen-stdio`, and `-mtu`, `-ssh-port` (the
//!    host's 127.0.0.1:PORT to the guest's port 22; -1: none), `-subnet`, `-gatewayIP`,
//!    `-deviceIP`, `-hostIP`, `-pcap`, `-debug`, `-pid-file`, `-log-file`, the forwards
//!    (`-forward-sock`, `-forward-dest`, `-forward-user`, `-forward-identity`, repeated
//!    together) and `-ec2-metadata-access`. A flag usernet cannot honour (`-config`,
//!    `-notification`) is an error naming it. Mistakes of grammar are
//!    Go's messages and exit 2; checks of gvproxy's own (an existing socket file, a wrong
//!    scheme, an ssh port out of range, forwards given unevenly, an identity that does not
//!    load) are one log line and exit 1, as gvproxy's `log.Fatal`.
//! 2. The network is gvproxy's: 192.168.127.0/24, the gateway the first address (its MAC
//!    5a:94:ef:e4:0c:dd, usernet's own), the device (guest) the second, with a static lease
//!    for 5a:94:ef:e4:0c:ee, the host the last usable one (.254), leading to the host's
//!    127.0.0.1, and DNS names for both under docker.internal and containers.internal. Guest
//!    connections to 169.254.0.0/16 are refused unless `-ec2-metadata-access`, as gvproxy's.
//! 3. Start as `serve` does (the same transports, engine, gateway services), with gvproxy's
//!    API to the guests at the gateway's port 80 (only what gvproxy offers them there), and
//!    the forwards (`usernet_host::ssh_forward`) over the `-ssh-port` forward, or over a
//!    loopback port of their own with `-ssh-port -1`.
//! 4. The QEMU and BESS transports serve one VM, as gvproxy's do: a second client is turned
//!    away with a log line. gvproxy ends when its VM goes and on SIGINT or SIGTERM, with
//!    "gvproxy exiting: ..." and exit status 1 either way; so does this mode, the pid file
//!    and every socket removed.

use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::goflag::{self, Flag, Stop, boolean, value};
use super::lifecycle::SignalSupervisor;
use crate::net_opts::{NetOpts, bind_published};
use crate::network::{Network, start_network};
use crate::serve::{Transports, serve_guest_api};
use usernet_core::config::{Ipv4Subnet, MTU_VM, NetConfig};
use usernet_core::engine::Supervisor;
use usernet_core::link::handoff::Handoff;
use usernet_core::link::qemu::Framing;
use usernet_core::link::{Link, LinkAcceptor};
use usernet_core::pcap::PcapWriter;
use usernet_core::ports::Proto;
use usernet_host::api::Endpoint;
use usernet_host::netns::sandbox::GUEST_MAC;
use usernet_host::publish::spec::PortSpec;
use usernet_host::ssh_forward::{self, ForwardSpec};

/// The gvisor-tap-vsock release whose command line this mode follows.
const GVPROXY_VERSION: &str = "0.8.7";

const FLAGS: &[Flag] = &[
    value("config"),
    value("listen"),
    boolean("debug"),
    value("pcap"),
    value("mtu"),
    value("ssh-port"),
    value("subnet"),
    value("gatewayIP"),
    value("deviceIP"),
    value("hostIP"),
    value("listen-vpnkit"),
    value("listen-qemu"),
    value("listen-bess"),
    value("listen-stdio"),
    value("listen-vfkit"),
    value("forward-sock"),
    value("forward-dest"),
    value("forward-user"),
    value("forward-identity"),
    value("pid-file"),
    value("log-file"),
    value("services"),
    boolean("ec2-metadata-access"),
    value("notification"),
    boolean("version"),
];

const USAGE: &str = "Usage of gvproxy (usernet):
  -debug                 Print debug info
  -ec2-metadata-access   Permits access to EC2 Metadata Service and Amazon Time Sync Service
  -forward-dest value    Forwards a unix socket to the guest virtual machine over SSH
  -forward-identity value  Path to SSH identity key for forwarding
  -forward-sock value    Forwards a unix socket to the guest virtual machine over SSH
  -forward-user value    SSH user to use for unix socket forward
  -gatewayIP string      Gateway IP address, default is first usable address of subnet
  -deviceIP string       Device IP address, default is second usable address of subnet
  -hostIP string         Host IP address, default is last usable address of subnet
  -listen value          control endpoint (unix://, tcp:// or vsock://); VMs join with POST /connect
  -listen-bess string    unixpacket socket to be used by Bess-compatible applications
  -listen-qemu string    Socket to be used by Qemu
  -listen-stdio string   accept stdio pipe
  -listen-vfkit string   unixgram socket to be used by vfkit-compatible applications
  -listen-vpnkit string  VPNKit socket to be used by Hyperkit
  -log-file string       Output log messages to a given file path
  -mtu int               Set the MTU (default: 1500)
  -pcap string           Capture network traffic to a pcap file
  -pid-file string       Generate a file with the PID in it
  -services string       Exposes the same HTTP API as the --listen flag
  -ssh-port int          Port to access the guest virtual machine. Must be between 1024 and 65535 (default 2222; -1: none)
  -subnet string         Subnet address in CIDR format (default \"192.168.127.0/24\")
  -version               Print version information and exit
Not served by usernet: -config, -notification.
";

/// gvproxy's network.
const GVPROXY_SUBNET: Ipv4Subnet = Ipv4Subnet { network: Ipv4Addr::new(192, 168, 127, 0), prefix: 24 };

/// gvproxy's guest MAC: the device address's static lease.
const DEVICE_MAC: [u8; 6] = GUEST_MAC;

/// What the command line asks for.
#[derive(Debug, Default, PartialEq)]
pub struct Options {
    pub listen: Vec<Endpoint>,
    pub services: Option<Endpoint>,
    pub debug: bool,
    pub pcap: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub ssh_port: i64,
    pub subnet: Option<Ipv4Subnet>,
    pub gateway_ip: Option<Ipv4Addr>,
    pub device_ip: Option<Ipv4Addr>,
    pub host_ip: Option<Ipv4Addr>,
    pub qemu: Option<String>,
    pub bess: Option<String>,
    pub vfkit: Option<String>,
    pub vpnkit: Option<String>,
    pub stdio: bool,
    pub forward_sock: Vec<String>,
    pub forward_dest: Vec<String>,
    pub forward_user: Vec<String>,
    pub forward_identity: Vec<String>,
    pub pid_file: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub ec2_metadata_access: bool,
}

#[derive(Debug, PartialEq)]
enum Parsed {
    Run(Box<Options>),
    Version,
}

/// A mistake and how gvproxy reports it: the flag package's (usage, exit 2) or its own
/// configuration checks (one line, exit 1).
#[derive(Debug, PartialEq)]
enum Mistake {
    Grammar(String),
    Config(String),
    Help,
}

fn parse(args: &[OsString]) -> Result<Parsed, Mistake> {
    let given = goflag::parse(FLAGS, args).map_err(|s| match s {
        Stop::Help => Mistake::Help,
        Stop::Mistake(m) => Mistake::Grammar(m),
    })?;
    // Go's flag package leaves arguments after the flags; gvproxy ignores them, and so
    // would a caller's mistake: name it.
    if let Some(extra) = given.rest.first() {
        return Err(Mistake::Config(format!("unexpected argument {:?}", extra.to_string_lossy())));
    }
    let config = |m: String| Mistake::Config(m);
    let mut o = Options { ssh_port: 2222, ..Options::default() };
    let ip = |name: &str, v: &str| -> Result<Ipv4Addr, Mistake> {
        v.parse().map_err(|_| config(format!("invalid IP address for -{name}: {v}")))
    };
    for (name, v) in given.flags {
        match name {
            "version" => return Ok(Parsed::Version),
            "listen" => o.listen.push(endpoint(name, &v)?),
            "services" => o.services = Some(endpoint(name, &v)?),
            "debug" => o.debug = v == "true",
            "pcap" => o.pcap = Some(PathBuf::from(v)),
            "mtu" => {
                let n = goflag::parse_int(name, &v).map_err(Mistake::Grammar)?;
                o.mtu = Some(
                    u32::try_from(n)
                        .ok()
                        .filter(|m| (576..=65520).contains(m) || *m == 0)
                        .ok_or_else(|| config(format!("-mtu {n}: must be between 576 and 65520")))?,
                )
                .filter(|m| *m != 0);
            }
            "ssh-port" => o.ssh_port = goflag::parse_int(name, &v).map_err(Mistake::Grammar)?,
            "subnet" => {
                o.subnet = Some(v.parse().map_err(|e| config(format!("failed to parse subnet: {e}")))?);
            }
            "gatewayIP" => o.gateway_ip = Some(ip(name, &v)?),
            "deviceIP" => o.device_ip = Some(ip(name, &v)?),
            "hostIP" => o.host_ip = Some(ip(name, &v)?),
            "listen-qemu" => o.qemu = Some(v),
            "listen-bess" => o.bess = Some(v),
            "listen-vfkit" => o.vfkit = Some(v),
            "listen-vpnkit" => o.vpnkit = Some(v),
            "listen-stdio" => o.stdio = !v.is_empty(),
            "forward-sock" => o.forward_sock.push(v),
            "forward-dest" => o.forward_dest.push(v),
            "forward-user" => o.forward_user.push(v),
            "forward-identity" => o.forward_identity.push(v),
            "pid-file" => o.pid_file = Some(PathBuf::from(v)),
            "log-file" => o.log_file = Some(PathBuf::from(v)),
            "ec2-metadata-access" => o.ec2_metadata_access = v == "true",
            "config" => return Err(config("-config: usernet's gvproxy mode takes its settings as flags only".into())),
            "notification" => return Err(config("-notification: not supported by usernet's gvproxy mode".into())),
            other => return Err(config(format!("-{other}: not supported by usernet's gvproxy mode"))),
        }
    }
    check(&o).map_err(config)?;
    Ok(Parsed::Run(Box::new(o)))
}

fn endpoint(name: &str, v: &str) -> Result<Endpoint, Mistake> {
    v.parse::<Endpoint>().map_err(|e| Mistake::Config(format!("-{name}: {e}")))
}

/// gvproxy's own checks of its configuration.
fn check(o: &Options) -> Result<(), String> {
    if o.ssh_port != -1 && !(1024..=65535).contains(&o.ssh_port) {
        return Err("ssh-port value must be between 1024 and 65535".into());
    }
    if o.vpnkit.is_some() && o.qemu.is_some() {
        return Err("cannot use qemu and vpnkit protocol at the same time".into());
    }
    if o.vpnkit.is_some() && o.bess.is_some() {
        return Err("cannot use bess and vpnkit protocol at the same time".into());
    }
    if o.qemu.is_some() && o.bess.is_some() {
        return Err("cannot use qemu and bess protocol at the same time".into());
    }
    let n = o.forward_sock.len();
    if o.forward_dest.len() != n || o.forward_user.len() != n || o.forward_identity.len() != n {
        return Err("--forward-sock, --forward-dest, --forward-user, and --forward-identity must all be specified \
                    together, the same number of times, or not at all"
            .into());
    }
    Ok(())
}

/// The path of a transport URL, with gvproxy's checks: the scheme it must have, and no
/// file already there.
fn socket_path(flag: &str, url: &str, scheme: &str) -> Result<PathBuf, String> {
    let path = usernet_core::link::qemu::parse_socket_url(url, scheme)
        .map_err(|_| format!("{flag} listen address must be {scheme}:// address"))?;
    if std::fs::symlink_metadata(&path).is_ok() {
        return Err(format!("\"{}\" already exists", path.display()));
    }
    Ok(path)
}

/// What -ec2-metadata-access opens: IPv4's link-local block.
const LINK_LOCAL: &str = "169.254.0.0/16";

/// The network of these options: gvproxy's addresses in `net`'s configuration.
fn network_config(o: &Options, net: &NetOpts) -> anyhow::Result<NetConfig> {
    let mut cfg = net.to_config(o.mtu.unwrap_or(MTU_VM))?;
    // gvproxy has no IPv6, and neither does usernet in its place.
    cfg.v6 = None;
    let subnet = cfg.subnet;
    let last = Ipv4Addr::from(u32::from(subnet.broadcast()) - 1);
    cfg.gateway = o.gateway_ip.unwrap_or(subnet.host(1));
    cfg.dns = Some(cfg.gateway);
    cfg.guest = o.device_ip.unwrap_or(subnet.host(2));
    cfg.host = o.host_ip.unwrap_or(last);
    for (what, a) in [("gateway", cfg.gateway), ("device", cfg.guest), ("host", cfg.host)] {
        if !subnet.contains(a) || a == subnet.network || a == subnet.broadcast() {
            anyhow::bail!(
                "failed to validate configuration IPs: {what} IP ({a}) not in subnet ({}/{})",
                subnet.network,
                subnet.prefix
            );
        }
    }
    if cfg.gateway == cfg.guest || cfg.guest == cfg.host {
        anyhow::bail!("failed to validate configuration IPs: the gateway, device and host IPs must differ");
    }
    if !o.ec2_metadata_access {
        // gvproxy refuses the guest's connections to link-local addresses (EC2's metadata
        // service, Amazon's time sync) unless -ec2-metadata-access: a deny rule here.
        let rules = usernet_core::policy::Rules::parse::<&str>(&[], &[LINK_LOCAL], &[])
            .map_err(|e| anyhow::anyhow!("{LINK_LOCAL}: {e}"))?;
        cfg.policy = Arc::new(usernet_core::policy::Policy::new(rules));
    }
    let loopback_to = cfg.host_loopback.then_some(cfg.host);
    cfg.host_dns
        .set_hosts(usernet_host::dns_watch::hosts_from_file(Path::new(usernet_host::dns_watch::HOSTS), loopback_to));
    Ok(cfg)
}

/// Entry point: the exit status.
pub fn main(args: &[OsString]) -> i32 {
    let o = match parse(args) {
        Ok(Parsed::Version) => {
            println!("gvproxy version v{GVPROXY_VERSION} (usernet {})", env!("USERNET_VERSION"));
            return 0;
        }
        Ok(Parsed::Run(o)) => o,
        Err(Mistake::Help) => {
            eprint!("{USAGE}");
            return 0;
        }
        Err(Mistake::Grammar(m)) => {
            eprintln!("{m}");
            eprint!("{USAGE}");
            return 2;
        }
        Err(Mistake::Config(m)) => {
            eprintln!("level=fatal msg=\"{m}\"");
            return 1;
        }
    };
    let level = if o.debug { "debug" } else { "info" };
    match &o.log_file {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => crate::logging::init_to_file(level, f),
            Err(_) => {
                println!("unable to open log file {}, exiting...", path.display());
                return 1;
            }
        },
        None => crate::init_logging(level),
    }
    tracing::info!("gvproxy version v{GVPROXY_VERSION} (usernet {})", env!("USERNET_VERSION"));
    let _pid_file = match o.pid_file.as_deref().map(PidFile::write).transpose() {
        Ok(p) => p,
        Err(e) => {
            // As gvproxy's Go error reads: the operation and the path, then the cause.
            let path = o.pid_file.as_deref().unwrap_or(Path::new("")).display();
            tracing::error!("failed to create pidfile: open {path}: {e}");
            return 1;
        }
    };
    match run(&o) {
        Ok(why) => {
            tracing::error!("gvproxy exiting: {why}");
            1
        }
        Err(e) => {
            tracing::error!("gvproxy exiting: {e:#}");
            eprintln!("gvproxy (usernet): {e:#}");
            1
        }
    }
}

/// The pid file, removed when usernet exits.
struct PidFile(PathBuf);

impl PidFile {
    fn write(path: &Path) -> std::io::Result<PidFile> {
        std::fs::write(path, std::process::id().to_string())?;
        usernet_core::own_files::note(path);
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs until the VM goes or a signal comes; says which.
fn run(o: &Options) -> anyhow::Result<String> {
    let mut net = NetOpts::defaults();
    net.subnet = o.subnet.unwrap_or(GVPROXY_SUBNET);
    net.mtu = o.mtu;
    let cfg = Arc::new(network_config(o, &net)?);
    let mut transports = Transports::default();
    if let Some(u) = &o.qemu {
        transports.qemu.push(socket_path("qemu", u, "unix").map_err(anyhow::Error::msg)?);
    }
    if let Some(u) = &o.bess {
        transports.bess.push(socket_path("bess", u, "unixpacket").map_err(anyhow::Error::msg)?);
    }
    if let Some(u) = &o.vfkit {
        transports.vfkit.push(socket_path("vfkit", u, "unixgram").map_err(anyhow::Error::msg)?);
    }
    if let Some(u) = &o.vpnkit {
        transports.vpnkit.push(usernet_core::link::qemu::parse_socket_url(u, "unix").map_err(anyhow::Error::msg)?);
    }
    transports.stdio = o.stdio;
    for identity in &o.forward_identity {
        std::fs::metadata(identity).with_context(|| format!("identity file {identity:?} can't be loaded"))?;
    }
    let pcap = match &o.pcap {
        Some(p) => Some(PcapWriter::create(p, 262_144).with_context(|| format!("cannot create {}", p.display()))?),
        None => None,
    };
    // The ssh port, or one of the forwards' own when there is none.
    let ssh_spec = PortSpec {
        host_ip: Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        host_ports: (o.ssh_port > 0).then_some((o.ssh_port as u16, o.ssh_port as u16)),
        container_port: 22,
        proto: Proto::Tcp,
    };
    let ssh_listeners = if o.ssh_port > 0 || !o.forward_sock.is_empty() {
        bind_published(std::slice::from_ref(&ssh_spec))?
    } else {
        Vec::new()
    };
    let ssh_addr: Option<SocketAddr> = ssh_listeners.first().map(|l| l.local);
    let proxy = net.proxy_config()?;
    let runtime = crate::network::runtime_dir();
    let started = std::time::SystemTime::now();
    let mut sup = GvproxySupervisor { signals: SignalSupervisor::new()?, signalled: false };

    let (acceptors, links) = transports.bind(&cfg, DEVICE_MAC)?;
    let Network { mut engine, shared, proxy_hook, .. } = start_network(&cfg, proxy, pcap, None)?;
    engine.bind_guests_to_links();
    engine.add_static_lease(DEVICE_MAC, cfg.guest);
    let _dns_watch = net.start_dns_watch(&cfg).map_err(|e| tracing::warn!("{e:#}")).ok();
    let one_vm = !transports.qemu.is_empty() || !transports.bess.is_empty() || transports.stdio;
    for link in links {
        engine.add_link(link);
    }
    for a in acceptors {
        let name = a.describe();
        // QEMU's and BESS's transports serve one VM (vpnkit's any number).
        let a: Box<dyn LinkAcceptor> = if name.starts_with("vpnkit") { a } else { Box::new(OneVm::new(a)) };
        engine.add_acceptor(a).with_context(|| format!("{name}: cannot watch it"))?;
    }
    if one_vm {
        engine.stop_without_links();
    }
    if !ssh_listeners.is_empty() {
        engine.publish(ssh_listeners, cfg.guest.into());
    }

    let handle = engine.control_handle().context("control API")?;
    let about = usernet_host::api::About {
        mode: "gvproxy".into(),
        command: std::env::args().skip(1).collect(),
        started,
        api: None,
    };
    let registered = crate::network::start_api(None, runtime.as_deref(), handle.clone(), &shared, &cfg, about, None)?;
    // gvproxy's API to the guests at gateway:80, without a token as gvproxy's (the guest's
    // tools send none), and only its safe subset; the host's endpoints on the same server.
    let own = serve_guest_api(&mut engine, registered.as_ref(), handle, &shared, &cfg, None)?;
    let server = registered.as_ref().map(|a| &a.server).or(own.as_ref());
    if !o.listen.is_empty() || o.services.is_some() {
        let server = server.context("the control API could not start")?;
        // `-listen` takes VMs too (`POST /connect`), framed as gvproxy frames them: QEMU's
        // way when it was given `-listen-qemu`, else HyperKit's.
        let connect = if o.listen.is_empty() {
            None
        } else {
            let handoff = Handoff::new("gvproxy /connect").context("gvproxy /connect")?;
            let framing = if o.qemu.is_some() { Framing::Be32 } else { Framing::Le16 };
            let target = usernet_host::api::Connect { links: handoff.sender(), framing };
            engine.add_acceptor(Box::new(handoff)).context("gvproxy /connect: cannot watch it")?;
            Some(target)
        };
        for e in &o.listen {
            let at = server.serve_also(e, connect.clone()).with_context(|| format!("cannot listen: {e}"))?;
            tracing::info!("listening {at}");
        }
        if let Some(e) = &o.services {
            let at = server.serve_also(e, None).with_context(|| format!("cannot listen: {e}"))?;
            tracing::info!("enabling services API. Listening {at}");
        }
    }
    engine.add_tcp_hook(proxy_hook);

    let _forwards = match ssh_addr {
        Some(ssh) if !o.forward_sock.is_empty() => {
            let specs = (0..o.forward_sock.len())
                .map(|i| ForwardSpec {
                    socket: PathBuf::from(
                        o.forward_sock[i].strip_prefix("unix://").unwrap_or(&o.forward_sock[i]).to_string(),
                    ),
                    dest: o.forward_dest[i].clone(),
                    user: o.forward_user[i].clone(),
                    identity: PathBuf::from(&o.forward_identity[i]),
                    ssh,
                })
                .collect();
            Some(ssh_forward::start(specs).context("forwards")?)
        }
        _ => None,
    };
    crate::network::confine(usernet_host::confine::disabled_by_env());
    tracing::info!("waiting for clients...");
    engine.run(&mut sup).context("network engine failed")?;
    Ok(if sup.signalled { "signal caught".into() } else { "the VM disconnected".into() })
}

/// Ends the loop on SIGINT or SIGTERM, remembering that it did.
struct GvproxySupervisor {
    signals: SignalSupervisor,
    signalled: bool,
}

impl Supervisor for GvproxySupervisor {
    fn fd(&self) -> RawFd {
        self.signals.fd()
    }

    fn on_ready(&mut self) -> Option<i32> {
        let stop = self.signals.on_ready();
        self.signalled |= stop.is_some();
        stop
    }
}

/// A transport that serves one VM, as gvproxy's QEMU and BESS transports do: the first
/// client is the VM; any later one is turned away (closed) with a log line.
struct OneVm {
    inner: Box<dyn LinkAcceptor>,
    served: bool,
}

impl OneVm {
    fn new(inner: Box<dyn LinkAcceptor>) -> OneVm {
        OneVm { inner, served: false }
    }
}

impl LinkAcceptor for OneVm {
    fn fd(&self) -> RawFd {
        self.inner.fd()
    }

    fn accept(&mut self) -> std::io::Result<Option<Box<dyn Link>>> {
        loop {
            let Some(link) = self.inner.accept()? else { return Ok(None) };
            if !self.served {
                self.served = true;
                return Ok(Some(link));
            }
            tracing::warn!(
                listener = %self.inner.describe(),
                "a second client on a transport that serves one VM (as gvproxy's): turned away"
            );
        }
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Parsed, Mistake> {
        let args: Vec<OsString> = line.split_whitespace().map(OsString::from).collect();
        parse(&args)
    }

    fn opts(line: &str) -> Options {
        match p(line) {
            Ok(Parsed::Run(o)) => *o,
            other => panic!("{line}: {other:?}"),
        }
    }

    /// Podman machine's command lines (QEMU and vfkit providers), as gvisor-tap-vsock's
    /// GvproxyCommand.ToCmdline writes them.
    #[test]
    fn podman_machine_command_lines() {
        let o = opts(
            "-debug -mtu 1500 -ssh-port 41234 -listen-qemu unix:///run/user/1000/podman/qemu.sock \
             -forward-sock /run/user/1000/podman/podman.sock -forward-dest /run/podman/podman.sock \
             -forward-user root -forward-identity /home/u/.ssh/machine -pid-file /run/user/1000/podman/gv.pid \
             -log-file /run/user/1000/podman/gv.log",
        );
        assert!(o.debug);
        assert_eq!((o.mtu, o.ssh_port), (Some(1500), 41234));
        assert_eq!(o.qemu.as_deref(), Some("unix:///run/user/1000/podman/qemu.sock"));
        assert_eq!(o.forward_user, vec!["root".to_string()]);
        let o = opts("-mtu 1500 -ssh-port -1 -listen-vfkit unixgram:///tmp/vf.sock -listen unix:///tmp/api.sock");
        assert_eq!(o.ssh_port, -1);
        assert_eq!(o.listen, vec![Endpoint::Unix("/tmp/api.sock".into())]);
        // CRC's and the Windows providers' vsock endpoint, with a TCP one beside it.
        let o = opts("-listen vsock://:1024 -listen tcp://127.0.0.1:7777 -services unix:///tmp/s.sock");
        let any = tokio_vsock_any();
        assert_eq!(o.listen[0], Endpoint::Vsock { cid: any, port: 1024 });
        assert_eq!(o.listen[1], Endpoint::Tcp("127.0.0.1:7777".parse().unwrap()));
        assert_eq!(o.services, Some(Endpoint::Unix("/tmp/s.sock".into())));
        let net = NetOpts::defaults();
        let cfg = network_config(&opts("-listen-stdio yes"), &NetOpts { subnet: GVPROXY_SUBNET, ..net }).unwrap();
        assert_eq!(
            (cfg.gateway, cfg.guest, cfg.host, cfg.dns),
            (
                Ipv4Addr::new(192, 168, 127, 1),
                Ipv4Addr::new(192, 168, 127, 2),
                Ipv4Addr::new(192, 168, 127, 254),
                Some(Ipv4Addr::new(192, 168, 127, 1))
            )
        );
    }

    /// Link-local destinations (EC2's metadata service) are denied unless
    /// -ec2-metadata-access, as gvproxy's forwarders refuse them.
    #[test]
    fn link_local_needs_ec2_metadata_access() {
        use usernet_core::policy::Verdict;
        let net = || NetOpts { subnet: GVPROXY_SUBNET, ..NetOpts::defaults() };
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        let elsewhere: IpAddr = "198.51.100.7".parse().unwrap();
        let cfg = network_config(&opts("-listen-stdio yes"), &net()).unwrap();
        assert!(matches!(cfg.policy.check(metadata, Some(80)), Verdict::Deny(_)));
        assert_eq!(cfg.policy.check(elsewhere, Some(80)), Verdict::Allow);
        let cfg = network_config(&opts("-listen-stdio yes -ec2-metadata-access"), &net()).unwrap();
        assert_eq!(cfg.policy.check(metadata, Some(80)), Verdict::Allow);
    }

    /// VMADDR_CID_ANY, the context ID of an endpoint that names none.
    fn tokio_vsock_any() -> u32 {
        u32::MAX
    }

    #[test]
    fn mistakes_as_gvproxy_reports_them() {
        assert_eq!(p("-nope"), Err(Mistake::Grammar("flag provided but not defined: -nope".into())));
        assert!(matches!(p("-mtu x"), Err(Mistake::Grammar(m)) if m.contains("invalid value \"x\" for flag -mtu")));
        for (line, want) in [
            ("-ssh-port 80", "ssh-port value must be between 1024 and 65535"),
            ("-listen-qemu unix:///a -listen-bess unixpacket:///b", "cannot use qemu and bess"),
            ("-forward-sock /a -forward-dest /b", "must all be specified together"),
            ("-config /etc/gvproxy.yaml", "-config"),
            ("-notification unix:///n", "-notification: not supported"),
            ("-listen ftp://x", "unsupported endpoint scheme ftp://"),
            ("-listen vsock://1024", "want vsock://[CID]:PORT"),
            ("-subnet 10.0.0.0/40", "failed to parse subnet"),
            ("-subnet 127.0.0.0/24", "loopback"),
            ("-subnet 255.255.255.0/24", "reserved"),
            ("-mtu 100", "-mtu 100"),
        ] {
            match p(line) {
                Err(Mistake::Config(m)) => assert!(m.contains(want), "{line}: {m}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        assert_eq!(p("-version"), Ok(Parsed::Version));
        assert_eq!(p("-help"), Err(Mistake::Help));
        let bad = network_config(&opts("-hostIP 10.0.0.1"), &NetOpts::defaults()).unwrap_err().to_string();
        assert!(bad.contains("not in subnet"), "{bad}");
        assert!(socket_path("vfkit", "unix:///tmp/x", "unixgram").unwrap_err().contains("unixgram://"));
    }
}
