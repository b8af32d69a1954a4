//! slirp4netns mode: usernet started as `slirp4netns` (a symlink of that name, or
//! `usernet slirp4netns ARGS...`) takes slirp4netns 1.2's command line, network layout,
//! readiness and exit protocol and API socket, so that Podman, rootlesskit and rootless
//! Docker use it unchanged.
//!
//! Theory of operation.
//! 1. Parse the command line as slirp4netns does (getopt_long: `--opt=V`, `--opt V`, `-mV`,
//!    `-m V`); a mistake prints slirp4netns's usage and exits 1. Callers read `--help` first
//!    and pass only the options they find there, so the help lists what usernet honours:
//!    `--enable-sandbox`, `--enable-seccomp` and `--target-type` are left out, and given
//!    anyway they are an error naming them.
//! 2. The network is slirp4netns's: CIDR 10.0.2.0/24 (`--cidr`), the guest .100, the
//!    gateway .2, which is also the host (its 127.0.0.1, unless `--disable-host-loopback`),
//!    DNS .3 (none with `--disable-dns`), MTU 1500 (`--mtu`). With `--enable-ipv6`, libslirp's
//!    IPv6 too: fd00::/64, the host fd00::2, DNS fd00::3, the guest's address by SLAAC from
//!    usernet's router advertisements.
//! 3. Attach a TAP named TAPNAME (default tap0) to the namespace of PID, or of PATH with
//!    `--netns-type=path`, entering `--userns-path` first when given (`usernet_host::netns::
//!    attach`, while single-threaded). With `-c` it is configured as slirp4netns does
//!    (10.0.2.100/24, up, default route via the gateway; `--macaddress`); without, it is
//!    left for the caller (rootlesskit configures it itself).
//! 4. Start the network, serve the API socket (`-a`), write "1" to the ready fd (`-r`),
//!    and run until SIGINT or SIGTERM, until the exit fd (`-e`) is closed or readable, or
//!    until the target PID exits (the TAP itself keeps the namespace alive, so the process
//!    is what shows its end) or the TAP fails: exit 0, every forwarded port released.
//!
//! API (`-a PATH`): one JSON request per connection, answered in slirp4netns's words:
//! `add_hostfwd` {proto, host_addr (default 0.0.0.0), host_port, guest_addr (default the
//! guest, also for ""), guest_port} -> `{"return":{"id":N}}`; `list_hostfwd` ->
//! `{"entries":[...]}`; `remove_hostfwd` {id} -> `{"return":{}}`; errors
//! `{"error":{"desc":"bad request: ..."}}`.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Value, json};

use usernet_core::config::{Ipv4Subnet, Ipv6Net, NetConfig};
use usernet_core::engine::control::{Command, ControlHandle};
use usernet_core::link::tap::Tap;
use usernet_core::ports::Proto;
use usernet_core::services::proxy::ProxyConfig;
use usernet_host::netns::Interface;
use usernet_host::netns::attach::{AttachSpec, NetnsTarget};
use usernet_host::publish::spec::PortSpec;

use super::getopt::{self, Opt, Positionals, flag, valued};
use super::lifecycle::{SignalSupervisor, stop_when_process_exits, stop_when_readable};
use crate::net_opts::NetOpts;
use crate::network::{Network, start_network};
use usernet_host::dns_watch;

/// The slirp4netns release whose command line this mode follows.
const SLIRP4NETNS_VERSION: &str = "1.2.0";

const USAGE: &str = "Usage: slirp4netns [OPTION]... PID|PATH [TAPNAME]
User-mode networking for unprivileged network namespaces.
";

const HELP: &str = "
-c, --configure          bring up the interface
-e, --exit-fd=FD         specify the FD for terminating slirp4netns
-r, --ready-fd=FD        specify the FD to write to when the network is configured
-m, --mtu=MTU            specify MTU (default=1500, max=65520)
-6, --enable-ipv6        enable IPv6 (fd00::/64: the guest takes its address by SLAAC, fd00::2 is the host, fd00::3 the DNS)
-a, --api-socket=PATH    specify API socket path
--cidr=CIDR              specify network address CIDR (default=10.0.2.0/24)
--disable-host-loopback  prohibit connecting to 127.0.0.1:* on the host namespace
--netns-type=TYPE        specify network namespace type ([path|pid], default=pid)
--userns-path=PATH       specify user namespace path
--outbound-addr=IPv4     sets outbound ipv4 address to bound to
--outbound-addr6=IPv6    sets outbound ipv6 address to bound to
--disable-dns            disables 10.0.2.3 (or configured internal ip) to host dns redirect
--macaddress=MAC         specify the MAC address of the TAP (only valid with -c)
-h, --help               show this help and exit
-v, --version            show version and exit
";

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub configure: bool,
    pub exit_fd: Option<RawFd>,
    pub ready_fd: Option<RawFd>,
    pub mtu: u32,
    pub enable_ipv6: bool,
    pub api_socket: Option<PathBuf>,
    pub cidr: Ipv4Subnet,
    pub disable_host_loopback: bool,
    pub netns_path: bool,
    pub userns_path: Option<PathBuf>,
    pub outbound_addr: Option<Ipv4Addr>,
    pub outbound_addr6: Option<Ipv6Addr>,
    pub disable_dns: bool,
    pub macaddress: Option<[u8; 6]>,
    pub target: String,
    pub tapname: String,
}

#[derive(Debug, PartialEq)]
pub enum Parsed {
    Run(Box<Options>),
    Help,
    Version,
}

/// A command-line mistake: the message, then the usage (as slirp4netns prints it), or not.
#[derive(Debug, PartialEq)]
pub struct Mistake {
    pub message: String,
    pub usage: bool,
}

fn mistake(message: impl Into<String>) -> Mistake {
    Mistake { message: message.into(), usage: true }
}

/// slirp4netns's options (getopt_long's table).
const OPTS: &[Opt] = &[
    flag("configure", Some('c')),
    valued("exit-fd", Some('e')),
    valued("ready-fd", Some('r')),
    valued("mtu", Some('m')),
    flag("enable-ipv6", Some('6')),
    valued("api-socket", Some('a')),
    valued("cidr", None),
    flag("disable-host-loopback", None),
    valued("netns-type", None),
    valued("userns-path", None),
    valued("outbound-addr", None),
    valued("outbound-addr6", None),
    flag("disable-dns", None),
    valued("macaddress", None),
    valued("target-type", None),
    flag("enable-sandbox", None),
    flag("enable-seccomp", None),
    flag("help", Some('h')),
    flag("version", Some('v')),
];

fn parse_fd(name: &str, v: &str) -> Result<RawFd, Mistake> {
    v.parse::<RawFd>()
        .ok()
        .filter(|fd| *fd >= 0)
        .ok_or_else(|| mistake(format!("{name} must be a non-negative integer")))
}

/// The address `--outbound-addr6` names: an IPv6 address, or an interface's first global one.
fn outbound_address6(v: &str) -> Result<Ipv6Addr, Mistake> {
    if let Ok(ip) = v.parse::<Ipv6Addr>() {
        if !super::usable_outbound6(ip) {
            return Err(mistake(format!(
                "outbound-addr6: {v} is not an address connections can leave from (loopback, link-local, \
                 multicast or unspecified)"
            )));
        }
        return Ok(ip);
    }
    super::interface_ipv6(v).ok_or_else(|| {
        mistake(format!("outbound-addr6: {v} is neither an IPv6 address nor an interface with a global one"))
    })
}

/// The address `--outbound-addr` names: an IPv4 address, or an interface's first one.
fn outbound_address(v: &str) -> Result<Ipv4Addr, Mistake> {
    if let Ok(ip) = v.parse::<Ipv4Addr>() {
        return Ok(ip);
    }
    super::interface_ipv4(v)
        .ok_or_else(|| mistake(format!("outbound-addr: {v} is neither an IPv4 address nor an interface with one")))
}

/// Parses slirp4netns's command line (without the program name).
pub fn parse(args: &[OsString]) -> Result<Parsed, Mistake> {
    let given = getopt::parse("slirp4netns", OPTS, args, Positionals::Anywhere).map_err(mistake)?;
    let mut positional: Vec<String> = given.positionals.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut o = Options {
        configure: false,
        exit_fd: None,
        ready_fd: None,
        mtu: 1500,
        enable_ipv6: false,
        api_socket: None,
        cidr: "10.0.2.0/24".parse().map_err(mistake)?,
        disable_host_loopback: false,
        netns_path: false,
        userns_path: None,
        outbound_addr: None,
        outbound_addr6: None,
        disable_dns: false,
        macaddress: None,
        target: String::new(),
        tapname: "tap0".into(),
    };
    for (name, value) in given.options {
        let v = value.unwrap_or_default();
        match name {
            "help" => return Ok(Parsed::Help),
            "version" => return Ok(Parsed::Version),
            "configure" => o.configure = true,
            "exit-fd" => o.exit_fd = Some(parse_fd("exit-fd", &v)?),
            "ready-fd" => o.ready_fd = Some(parse_fd("ready-fd", &v)?),
            "mtu" => {
                o.mtu = v
                    .parse::<u32>()
                    .ok()
                    .filter(|m| (576..=65520).contains(m))
                    .ok_or_else(|| mistake("MTU must be an integer from 576 to 65520"))?
            }
            "enable-ipv6" => o.enable_ipv6 = true,
            "api-socket" => o.api_socket = Some(PathBuf::from(v)),
            "cidr" => {
                let cidr: Ipv4Subnet = v.parse().map_err(|e| mistake(format!("invalid CIDR {v}: {e}")))?;
                if !(1..=25).contains(&cidr.prefix) {
                    return Err(Mistake { message: "prefix length needs to be 1-25".into(), usage: false });
                }
                // As slirp4netns: 10.0.2.5/24 is a mistake, not 10.0.2.0/24.
                if v.split('/').next().and_then(|a| a.parse::<std::net::Ipv4Addr>().ok()) != Some(cidr.network) {
                    return Err(Mistake { message: "CIDR needs to be a network address".into(), usage: false });
                }
                o.cidr = cidr;
            }
            "disable-host-loopback" => o.disable_host_loopback = true,
            "netns-type" => match v.as_str() {
                "pid" => o.netns_path = false,
                "path" => o.netns_path = true,
                _ => return Err(mistake(format!("unknown netns type: {v} (want pid or path)"))),
            },
            "userns-path" if !Path::new(&v).exists() => {
                return Err(Mistake { message: format!("userns path doesn't exist: {v}"), usage: false });
            }
            "userns-path" => o.userns_path = Some(PathBuf::from(v)),
            "outbound-addr" => o.outbound_addr = Some(outbound_address(&v)?),
            "disable-dns" => o.disable_dns = true,
            "macaddress" => {
                o.macaddress = Some(super::parse_mac(&v).ok_or_else(|| Mistake {
                    message: format!(
                        "\"{v}\" is an invalid MAC address.\nmacaddress has to be a valid MAC address \
                         (hex string, 6 bytes, each byte separated by a ':')."
                    ),
                    usage: false,
                })?)
            }
            "outbound-addr6" => o.outbound_addr6 = Some(outbound_address6(&v)?),
            // What usernet cannot honour is an error naming it, never ignored.
            "target-type" if v == "netns" => {}
            "target-type" => return Err(mistake(format!("--target-type={v}: usernet serves network namespaces only"))),
            "enable-sandbox" | "enable-seccomp" => {
                return Err(mistake(format!("--{name}: not supported by usernet's slirp4netns mode")));
            }
            _ => return Err(mistake(format!("slirp4netns: unrecognized option '--{name}'"))),
        }
    }
    if o.macaddress.is_some() && !o.configure {
        return Err(mistake("--macaddr cannot be specified when --configure or -c is not specified"));
    }
    match positional.len() {
        1 => o.target = positional.remove(0),
        2 => {
            o.tapname = positional.pop().unwrap_or_default();
            o.target = positional.remove(0);
        }
        0 => return Err(Mistake { message: String::new(), usage: true }),
        _ => return Err(mistake("too many arguments")),
    }
    if !o.netns_path && o.target.parse::<i32>().map_or(true, |p| p <= 0) {
        return Err(mistake(format!("PID must be a positive integer (or give --netns-type=path): {}", o.target)));
    }
    Ok(Parsed::Run(Box::new(o)))
}

/// usernet's network options as slirp4netns's command line sets them (DNS from the host's
/// resolv.conf and /etc/hosts, followed while usernet runs, as `run` and `serve` do).
fn net_opts(o: &Options) -> NetOpts {
    let mut net = NetOpts::defaults();
    net.subnet = o.cidr;
    net.mtu = Some(o.mtu);
    net
}

/// slirp4netns's network for these options.
pub fn network_config(o: &Options, net: &NetOpts) -> anyhow::Result<NetConfig> {
    let mut cfg = net.to_config(o.mtu)?;
    // slirp4netns's IPv6 (libslirp's layout): fd00::/64, the host at fd00::2 (as 10.0.2.2),
    // DNS at fd00::3 (as 10.0.2.3); the guest takes its address from the router
    // advertisement (SLAAC), as with slirp4netns.
    cfg.v6 = o.enable_ipv6.then(|| {
        let mut net = Ipv6Net::new(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0));
        (net.host, net.dns) = (net.at(2), net.at(3));
        net.gateway = net.host;
        net
    });
    cfg.gateway = o.cidr.host(2);
    cfg.host = o.cidr.host(2);
    cfg.dns = (!o.disable_dns).then(|| o.cidr.host(3));
    cfg.guest = o.cidr.host(100);
    cfg.host_loopback = !o.disable_host_loopback;
    cfg.outbound_addr = o.outbound_addr;
    cfg.outbound_addr6 = o.outbound_addr6;
    // /etc/hosts' loopback names stand for the host address, which moved.
    let loopback_to = cfg.host_loopback.then_some(cfg.host);
    cfg.host_dns.set_hosts(dns_watch::hosts_from_file(Path::new(dns_watch::HOSTS), loopback_to));
    Ok(cfg)
}

/// Entry point: the exit status.
pub fn main(args: &[OsString]) -> i32 {
    crate::init_logging("warn");
    let o = match parse(args) {
        Ok(Parsed::Help) => {
            print!("{USAGE}{HELP}");
            return 0;
        }
        Ok(Parsed::Version) => {
            println!("slirp4netns version {SLIRP4NETNS_VERSION}");
            println!("usernet: {}", env!("USERNET_VERSION"));
            return 0;
        }
        Ok(Parsed::Run(o)) => o,
        Err(m) => {
            if !m.message.is_empty() {
                eprintln!("{}", m.message);
            }
            if m.usage {
                eprint!("{USAGE}");
            }
            return 1;
        }
    };
    match run(&o) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("slirp4netns (usernet): {e:#}");
            1
        }
    }
}

fn run(o: &Options) -> anyhow::Result<i32> {
    let net = net_opts(o);
    let cfg = Arc::new(network_config(o, &net)?);
    let mut sup = SignalSupervisor::new()?;
    // Taken now, so that nothing started later inherits them by accident.
    // SAFETY: the caller handed these descriptors to us on the command line; nothing else owns them.
    let ready = o.ready_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });
    // SAFETY: as above.
    let exit = o.exit_fd.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) });

    // Attaching forks: it must happen while usernet is single-threaded.
    let target = if o.netns_path {
        NetnsTarget::Path(PathBuf::from(&o.target))
    } else {
        o.target.parse().map_err(anyhow::Error::msg)?
    };
    let spec = AttachSpec {
        target,
        userns: o.userns_path.clone(),
        configure: o.configure,
        iface: Interface {
            ifname: o.tapname.clone(),
            mac: o.macaddress.unwrap_or(usernet_host::netns::sandbox::GUEST_MAC),
            ipv4: true,
            address: cfg.guest,
            prefix: cfg.subnet.prefix,
            gateway: cfg.gateway,
            mtu: cfg.mtu,
            ipv6: None,
        },
    };
    let attached = usernet_host::netns::attach::attach(&spec)?;
    let tap = Tap::from_fd(attached.tap).context("TAP device")?;

    // Follows the host's resolv.conf and /etc/hosts (a thread: after the fork above).
    let _dns_watch = net.start_dns_watch(&cfg).map_err(|e| tracing::warn!("{e:#}")).ok();
    let Network { mut engine, proxy_hook, .. } =
        start_network(&cfg, ProxyConfig::default(), None, Some(Box::new(tap)))?;
    engine.add_tcp_hook(proxy_hook);
    engine.add_static_lease(spec.iface.mac, cfg.guest);
    if o.configure {
        // `-c`: usernet set the interface's MAC itself (otherwise the caller did).
        engine.set_guest_mac(spec.iface.mac, cfg.guest);
    }
    engine.stop_without_links();
    // Loopback clients of forwarded ports spliced inside the namespace, as in `run`; where
    // usernet may not enter it (rootlesskit runs it outside the namespace's user namespace),
    // they go through the TAP.
    if let Err(e) = engine.set_guest_netns(attached.netns) {
        tracing::info!("loopback clients of forwarded ports go through the TAP: {e}");
    }
    let _api = match &o.api_socket {
        Some(path) => Some(ApiSocket::start(path, engine.control_handle()?, cfg.guest)?),
        None => None,
    };
    if let Some(exit) = exit {
        stop_when_readable(exit, "exit fd closed")?;
    }
    // The TAP holds the namespace alive, so its end shows nowhere else: follow the process.
    if let NetnsTarget::Pid(pid) = spec.target
        && let Err(e) = stop_when_process_exits(pid)
    {
        tracing::warn!("{e:#}");
    }
    if let Some(ready) = ready {
        let mut f = std::fs::File::from(ready);
        f.write_all(b"1").context("writing to the ready fd")?;
    }
    crate::network::confine(usernet_host::confine::disabled_by_env());
    engine.run(&mut sup).context("network engine failed")
}

/// One forwarded port, as `list_hostfwd` shows it.
struct HostFwd {
    id: u64,
    proto: Proto,
    host_addr: Ipv4Addr,
    host_port: u16,
    guest_addr: Ipv4Addr,
    guest_port: u16,
}

struct ApiState {
    control: ControlHandle,
    guest: Ipv4Addr,
    forwards: Vec<HostFwd>,
    next_id: u64,
}

/// slirp4netns's API socket, served on a thread of its own; the file goes with it.
struct ApiSocket {
    path: PathBuf,
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl ApiSocket {
    fn start(path: &Path, control: ControlHandle, guest: Ipv4Addr) -> anyhow::Result<ApiSocket> {
        // A socket file nobody serves any more (a slirp4netns that died) is replaced.
        let listener = usernet_core::link::qemu::listen_stream(path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        let mut state = ApiState { control, guest, forwards: Vec::new(), next_id: 1 };
        std::thread::Builder::new()
            .name("usernet-slirp-api".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(c) => serve_api_connection(&mut state, c),
                        Err(e) => tracing::warn!("API socket: {e}"),
                    }
                }
            })
            .context("API thread")?;
        Ok(ApiSocket { path: path.to_path_buf() })
    }
}

/// Largest request read (slirp4netns reads one buffer of 4 KiB).
const MAX_REQUEST: u64 = 4096;

fn serve_api_connection(state: &mut ApiState, mut conn: UnixStream) {
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
    let request = read_request(&mut conn);
    let reply = handle_request(state, &request);
    let _ = conn.write_all(reply.to_string().as_bytes());
}

/// Reads one request: up to a complete JSON value (the caller may keep its side open), the
/// end of the stream, an error or [`MAX_REQUEST`] bytes. A read that a signal interrupted is
/// tried again: with a read timeout set, the kernel does not restart it even under
/// SA_RESTART, and usernet signals every thread once when it confines itself, right after
/// the caller was told it is ready (rootlesskit then sends its first request).
fn read_request(conn: &mut impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match conn.take(MAX_REQUEST - buf.len() as u64).read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if serde_json::from_slice::<Value>(&buf).is_ok() || buf.len() as u64 >= MAX_REQUEST {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    buf
}

fn bad_request(what: &str) -> Value {
    json!({"error": {"desc": format!("bad request: {what}")}})
}

/// Answers one API request, in slirp4netns's JSON.
fn handle_request(state: &mut ApiState, body: &[u8]) -> Value {
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return bad_request("cannot parse JSON");
    };
    let args = req.get("arguments").cloned().unwrap_or(Value::Null);
    match req.get("execute").and_then(Value::as_str) {
        Some("add_hostfwd") => add_hostfwd(state, &args),
        Some("list_hostfwd") => json!({"entries": state.forwards.iter().map(|f| json!({
            "id": f.id,
            "proto": f.proto.as_str(),
            "host_addr": f.host_addr.to_string(),
            "host_port": f.host_port,
            "guest_addr": f.guest_addr.to_string(),
            "guest_port": f.guest_port,
        })).collect::<Vec<_>>()}),
        Some("remove_hostfwd") => remove_hostfwd(state, &args),
        _ => bad_request("unknown execute"),
    }
}

/// A port argument: 1 to 65535. Port 0, which slirp4netns refuses too, would bind a port
/// the kernel picks, which `list_hostfwd` could not tell and `remove_hostfwd` not find.
fn port_arg(args: &Value, name: &str) -> Option<u16> {
    args.get(name).and_then(Value::as_u64).and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

fn addr_arg(args: &Value, name: &str, default: Ipv4Addr) -> Option<Ipv4Addr> {
    match args.get(name) {
        None | Some(Value::Null) => Some(default),
        Some(Value::String(s)) if s.is_empty() => Some(default),
        Some(Value::String(s)) => s.parse().ok(),
        Some(_) => None,
    }
}

fn add_hostfwd(state: &mut ApiState, args: &Value) -> Value {
    let proto = match args.get("proto").and_then(Value::as_str) {
        Some("tcp") => Proto::Tcp,
        Some("udp") => Proto::Udp,
        _ => return bad_request("add_hostfwd: bad arguments.proto"),
    };
    let Some(host_addr) = addr_arg(args, "host_addr", Ipv4Addr::UNSPECIFIED) else {
        return bad_request("add_hostfwd: bad arguments.host_addr");
    };
    let Some(host_port) = port_arg(args, "host_port") else {
        return bad_request("add_hostfwd: bad arguments.host_port");
    };
    let Some(guest_addr) = addr_arg(args, "guest_addr", state.guest) else {
        return bad_request("add_hostfwd: bad arguments.guest_addr");
    };
    let Some(guest_port) = port_arg(args, "guest_port") else {
        return bad_request("add_hostfwd: bad arguments.guest_port");
    };
    let spec = PortSpec {
        host_ip: Some(IpAddr::V4(host_addr)),
        host_ports: Some((host_port, host_port)),
        container_port: guest_port,
        proto,
    };
    let listeners = match usernet_host::publish::listen::bind(&spec) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!("add_hostfwd {host_addr}:{host_port}/{proto}: {e}");
            return bad_request("add_hostfwd: slirp_add_hostfwd failed");
        }
    };
    let published =
        state.control.ask_blocking(|reply| Command::Publish { listeners, guest_ip: guest_addr.into(), reply });
    if published.is_none_or(|p| p.is_empty()) {
        return bad_request("add_hostfwd: slirp_add_hostfwd failed");
    }
    let id = state.next_id;
    state.next_id += 1;
    state.forwards.push(HostFwd { id, proto, host_addr, host_port, guest_addr, guest_port });
    json!({"return": {"id": id}})
}

fn remove_hostfwd(state: &mut ApiState, args: &Value) -> Value {
    let id = args.get("id").and_then(Value::as_u64);
    let Some(index) = id.and_then(|id| state.forwards.iter().position(|f| f.id == id)) else {
        return bad_request("remove_hostfwd: bad arguments.id");
    };
    let f = state.forwards.remove(index);
    let host = SocketAddr::new(IpAddr::V4(f.host_addr), f.host_port);
    let proto = f.proto;
    if state.control.ask_blocking(|reply| Command::Unpublish { host, proto, reply }) != Some(true) {
        tracing::warn!("remove_hostfwd {host}/{proto}: the engine did not serve it");
    }
    json!({"return": {}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_ports_are_1_to_65535() {
        let port = |v: Value| port_arg(&json!({ "host_port": v }), "host_port");
        assert_eq!(port(json!(80)), Some(80));
        assert_eq!(port(json!(65535)), Some(65535));
        for bad in [json!(0), json!(65536), json!(-1), json!("80"), json!(8.5), Value::Null] {
            assert_eq!(port(bad.clone()), None, "{bad}");
        }
        assert_eq!(port_arg(&json!({}), "host_port"), None);
    }

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn run_opts(s: &str) -> Options {
        match parse(&args(s)) {
            Ok(Parsed::Run(o)) => *o,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn podman_and_rootlesskit_command_lines() {
        let o = run_opts(
            "--disable-host-loopback --mtu=65520 --enable-ipv6 -c -e 3 -r 4 --netns-type=path /run/user/1000/netns/x tap0",
        );
        assert!(o.disable_host_loopback && o.configure && o.enable_ipv6 && o.netns_path);
        assert_eq!((o.mtu, o.exit_fd, o.ready_fd), (65520, Some(3), Some(4)));
        assert_eq!((o.target.as_str(), o.tapname.as_str()), ("/run/user/1000/netns/x", "tap0"));
        let o = run_opts("--mtu 65520 -r 3 --api-socket /tmp/s 1234 tap0");
        assert!(!o.configure);
        assert_eq!((o.mtu, o.ready_fd, o.api_socket.clone()), (65520, Some(3), Some(PathBuf::from("/tmp/s"))));
        assert_eq!(o.target, "1234");
        // dockerd-rootless.sh's rootlesskit 1.1.0 (slirp4netns port driver), as captured.
        let o = run_opts(
            "--mtu 65520 -r 3 --disable-host-loopback --api-socket /tmp/rootlesskit1827073932/.s4nn.sock 29092 tap0",
        );
        assert!(o.disable_host_loopback && !o.configure && o.exit_fd.is_none());
        assert_eq!((o.mtu, o.ready_fd, o.target.as_str()), (65520, Some(3), "29092"));
        assert_eq!(o.api_socket, Some(PathBuf::from("/tmp/rootlesskit1827073932/.s4nn.sock")));
        let o = run_opts("-cr4 -m1500 77");
        assert!(o.configure);
        assert_eq!((o.ready_fd, o.mtu, o.tapname.as_str()), (Some(4), 1500, "tap0"));
    }

    /// A request read in pieces, with a signal in between (usernet confines itself while
    /// rootlesskit sends its first request): read whole, up to the end of the JSON value.
    #[test]
    fn a_request_survives_an_interrupted_read() {
        struct Pieces(Vec<std::io::Result<&'static [u8]>>);
        impl Read for Pieces {
            fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
                if self.0.is_empty() {
                    return Ok(0);
                }
                let piece = self.0.remove(0)?;
                let n = piece.len().min(out.len());
                out[..n].copy_from_slice(&piece[..n]);
                if n < piece.len() {
                    self.0.insert(0, Ok(&piece[n..]));
                }
                Ok(n)
            }
        }
        let interrupted = || Err(std::io::Error::from(std::io::ErrorKind::Interrupted));
        let mut conn =
            Pieces(vec![interrupted(), Ok(b"{\"execute\":\"list_"), interrupted(), Ok(b"hostfwd\"}"), Ok(b"trailing")]);
        assert_eq!(read_request(&mut conn), b"{\"execute\":\"list_hostfwd\"}");
        // Any other error ends the request where it is.
        let mut conn = Pieces(vec![Ok(b"{\"exe"), Err(std::io::Error::from(std::io::ErrorKind::TimedOut))]);
        assert_eq!(read_request(&mut conn), b"{\"exe");
        // A caller that sends more than slirp4netns reads: cut at MAX_REQUEST.
        let big: &'static [u8] = Box::leak(vec![b' '; 3000].into_boxed_slice());
        let mut conn = Pieces(vec![Ok(big), Ok(big), Ok(big)]);
        assert_eq!(read_request(&mut conn).len() as u64, MAX_REQUEST);
    }

    #[test]
    fn mistakes_are_slirp4netns_words() {
        let err = |s: &str| parse(&args(s)).unwrap_err();
        assert_eq!(err("--foo 1").message, "slirp4netns: unrecognized option '--foo'");
        assert!(err("--mtu=abc 1").message.contains("MTU"));
        assert_eq!(err("-e").message, "slirp4netns: option requires an argument -- 'e'");
        assert_eq!(err("--exit-fd=x 1").message, "exit-fd must be a non-negative integer");
        assert_eq!(
            err("--cidr=10.0.2.0/26 1"),
            Mistake { message: "prefix length needs to be 1-25".into(), usage: false }
        );
        // The shared subnet parser's ranges (crates/core/src/config.rs): no loopback,
        // multicast ... network, though slirp4netns itself checks only the form and the prefix length.
        for (cidr, why) in [("127.0.0.0/24", "loopback"), ("224.0.0.0/24", "multicast"), ("0.0.0.0/24", "0.0.0.0/8")] {
            let m = err(&format!("--cidr={cidr} 1")).message;
            assert!(m.starts_with(&format!("invalid CIDR {cidr}: ")) && m.contains(why), "{m}");
        }
        assert_eq!(err("--cidr=10.9.0.5/24 1").message, "CIDR needs to be a network address");
        assert_eq!(err("--userns-path=/nonexistent/ns 1").message, "userns path doesn't exist: /nonexistent/ns");
        assert_eq!(run_opts("--userns-path=/proc/self/ns/user 1").userns_path, Some("/proc/self/ns/user".into()));
        let small = Ipv4Subnet { network: Ipv4Addr::new(10, 0, 2, 128), prefix: 25 };
        assert_eq!(run_opts("--cidr=10.0.2.128/25 1").cidr, small);
        assert!(err("--macaddress=zz -c 1").message.contains("invalid MAC"));
        assert!(err("--macaddress=02:00:00:00:00:01 1").message.contains("--configure"));
        assert!(err("--enable-sandbox 1").message.contains("--enable-sandbox"));
        assert!(err("--enable-seccomp 1").message.contains("--enable-seccomp"));
        assert_eq!(run_opts("--outbound-addr6=2001:db8::7 1").outbound_addr6, Some("2001:db8::7".parse().unwrap()));
        assert_eq!(run_opts("--outbound-addr=lo 1").outbound_addr, Some(Ipv4Addr::LOCALHOST));
        assert!(err("--outbound-addr6=lo 1").message.contains("neither an IPv6 address nor an interface"));
        for bad in ["::1", "::", "fe80::1", "ff02::1"] {
            assert!(err(&format!("--outbound-addr6={bad} 1")).message.contains("not an address"), "{bad}");
        }
        assert!(err("--outbound-addr6=10.0.0.1 1").message.contains("outbound-addr6: 10.0.0.1"));
        assert!(err("--target-type=bess 1").message.contains("bess"));
        assert_eq!(err("").message, "");
        assert_eq!(err("1 tap0 extra").message, "too many arguments");
        assert!(err("notapid").message.contains("PID"));
        assert_eq!(parse(&args("--help")), Ok(Parsed::Help));
        assert_eq!(parse(&args("-v")), Ok(Parsed::Version));
    }

    /// Callers decide from the option names in --help: podman requires --enable-ipv6 and
    /// --mtu there; what usernet cannot honour must not be there.
    #[test]
    fn help_lists_what_callers_look_for() {
        for name in [
            "--netns-type",
            "--userns-path",
            "--api-socket",
            "--disable-host-loopback",
            "--enable-ipv6",
            "--mtu",
            "--cidr",
            "--configure",
            "--exit-fd",
            "--ready-fd",
            "--disable-dns",
            "--macaddress",
            "--outbound-addr=",
            "--outbound-addr6=",
        ] {
            assert!(HELP.contains(name), "{name}");
        }
        for name in ["--enable-sandbox", "--enable-seccomp", "--target-type"] {
            assert!(!HELP.contains(name), "{name}");
        }
    }

    #[test]
    fn slirp4netns_layout() {
        let o = run_opts("--cidr=10.0.5.0/24 --disable-host-loopback 1");
        let cfg = network_config(&o, &net_opts(&o)).unwrap();
        assert_eq!(cfg.gateway, Ipv4Addr::new(10, 0, 5, 2));
        assert_eq!(cfg.host, Ipv4Addr::new(10, 0, 5, 2));
        assert_eq!(cfg.dns, Some(Ipv4Addr::new(10, 0, 5, 3)));
        assert_eq!(cfg.guest, Ipv4Addr::new(10, 0, 5, 100));
        assert!(!cfg.host_loopback);
        let o = run_opts("--disable-dns 1");
        assert_eq!(network_config(&o, &net_opts(&o)).unwrap().dns, None);
        assert_eq!(cfg.v6, None, "IPv6 only with --enable-ipv6");
        let o = run_opts("--enable-ipv6 1");
        let v6 = network_config(&o, &net_opts(&o)).unwrap().v6.unwrap();
        let ip = |s: &str| s.parse::<Ipv6Addr>().unwrap();
        assert_eq!(
            (v6.prefix, v6.host, v6.gateway, v6.dns),
            (ip("fd00::"), ip("fd00::2"), ip("fd00::2"), ip("fd00::3"))
        );
    }
}
