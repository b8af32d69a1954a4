//! `usernet serve --netns PATH|PID`: a TAP device in a network namespace that already
//! exists (a container runtime's), as pasta and slirp4netns attach to one.
//!
//! Theory of operation. Entering a user namespace is only allowed to a single-threaded
//! process, and usernet must not leave its own namespaces, so the work happens in a forked
//! child while usernet is still single-threaded (before any runtime or thread starts):
//!
//! 1. The parent opens the target's network namespace (`/proc/PID/ns/net`, or PATH such as
//!    `/run/netns/NAME`) and, when not root and given a PID, its user namespace
//!    (`/proc/PID/ns/user`, as pasta does), then forks.
//! 2. The child enters the user namespace (if any), then the network namespace; creates
//!    the TAP; brings `lo` up; sets the TAP's MAC, MTU and address (the address the DHCP
//!    server would give that MAC) and a default route via the gateway, as `usernet run`
//!    configures its own namespace; then sends the TAP's descriptor to the parent over a
//!    socketpair (SCM_RIGHTS), or one line saying what failed, and exits.
//! 3. The parent receives the descriptor and reaps the child. The parent never changed
//!    namespace; the TAP lives in the target namespace for as long as usernet holds its
//!    descriptor.
//!
//! The namespace's /etc/resolv.conf is left alone (it belongs to the container runtime);
//! point it at the gateway to use usernet's DNS.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, open};
use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg, sendmsg, socketpair,
};
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{ForkResult, fork};

use super::describe;
use usernet_core::link::tap::Tap;

/// Where `ip netns add NAME` puts its namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The namespace to attach to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetnsTarget {
    Pid(i32),
    Path(PathBuf),
}

impl std::str::FromStr for NetnsTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty --netns".into());
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<i32>().map(NetnsTarget::Pid).map_err(|_| format!("invalid PID: {s}"));
        }
        // A name without a slash is one of `ip netns`'s, as pasta reads its --netns (a file
        // in the current directory is `./NAME`).
        if !s.contains('/') {
            return Ok(NetnsTarget::Path(Path::new(NETNS_RUN_DIR).join(s)));
        }
        Ok(NetnsTarget::Path(PathBuf::from(s)))
    }
}

impl std::fmt::Display for NetnsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetnsTarget::Pid(p) => write!(f, "PID {p}"),
            NetnsTarget::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How to set up the TAP inside the namespace.
#[derive(Clone, Debug)]
pub struct AttachSpec {
    pub target: NetnsTarget,
    /// The user namespace to enter first (slirp4netns's `--userns-path`); None: the target
    /// process's own when not root and given a PID, else none.
    pub userns: Option<PathBuf>,
    /// Configure the TAP (MAC, MTU, address, route, up) and `lo`; false leaves the new
    /// device down and bare, for a caller that configures it itself (rootlesskit does).
    pub configure: bool,
    pub iface: super::Interface,
}

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("cannot open the network namespace of {target}: {err}")]
    Open { target: NetnsTarget, err: String },
    #[error("cannot attach to {target}: {msg}")]
    Child { target: NetnsTarget, msg: String },
    #[error("cannot attach to {target}: {err}")]
    Io { target: NetnsTarget, err: io::Error },
}

fn open_ns(path: &PathBuf) -> Result<OwnedFd, Errno> {
    open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
}

/// What [`attach`] gives: the TAP, and the namespace it lives in (for the engine's sockets of
/// loopback clients, `Engine::set_guest_netns`).
pub struct Attached {
    pub tap: OwnedFd,
    pub netns: OwnedFd,
}

/// Creates and configures the TAP in the target namespace; returns its descriptor.
/// Call it while the process is single-threaded.
pub fn attach(spec: &AttachSpec) -> Result<Attached, AttachError> {
    let target = spec.target.clone();
    let net_path = match &spec.target {
        NetnsTarget::Pid(p) => PathBuf::from(format!("/proc/{p}/ns/net")),
        NetnsTarget::Path(p) => p.clone(),
    };
    let netns =
        open_ns(&net_path).map_err(|e| AttachError::Open { target: target.clone(), err: e.desc().to_string() })?;
    let user_path = match (&spec.userns, &spec.target, nix::unistd::geteuid().is_root()) {
        (Some(path), _, _) => Some(path.clone()),
        (None, NetnsTarget::Pid(p), false) => Some(PathBuf::from(format!("/proc/{p}/ns/user"))),
        _ => None,
    };
    let userns = match user_path {
        Some(path) => {
            Some(open_ns(&path).map_err(|e| AttachError::Open { target: target.clone(), err: e.desc().to_string() })?)
        }
        None => None,
    };
    let (parent_end, child_end) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
        .map_err(|e| AttachError::Io { target: target.clone(), err: e.into() })?;

    // SAFETY: the caller guarantees a single-threaded process; the child only runs the
    // setup below and exits with _exit.
    match unsafe { fork() }.map_err(|e| AttachError::Io { target: target.clone(), err: e.into() })? {
        ForkResult::Child => {
            drop(parent_end);
            let code = match child_setup(spec, userns.as_ref(), &netns) {
                Ok(tap) => send_result(&child_end, Ok(&tap)),
                Err(msg) => send_result(&child_end, Err(&msg)),
            };
            // SAFETY: _exit ends the child without running the parent's destructors.
            unsafe { libc::_exit(if code.is_ok() { 0 } else { 1 }) }
        }
        ForkResult::Parent { child } => {
            drop(child_end);
            drop(userns);
            let got = recv_result(&parent_end);
            let _ = waitpid(child, None);
            match got {
                Ok(Ok(tap)) => Ok(Attached { tap, netns }),
                Ok(Err(msg)) => Err(AttachError::Child { target, msg }),
                Err(err) => Err(AttachError::Io { target, err }),
            }
        }
    }
}

fn child_setup(spec: &AttachSpec, userns: Option<&OwnedFd>, netns: &OwnedFd) -> Result<OwnedFd, String> {
    if let Some(userns) = userns {
        setns(userns, CloneFlags::CLONE_NEWUSER)
            .map_err(|e| format!("cannot enter its user namespace: {}", e.desc()))?;
    }
    setns(netns, CloneFlags::CLONE_NEWNET).map_err(|e| format!("cannot enter its network namespace: {}", e.desc()))?;
    let name = &spec.iface.ifname;
    // With a virtio-net header, as `run`'s: the kernel then hands usernet whole 64 KiB TCP
    // segments and takes them back (offloads), rather than one frame per MTU.
    let tap = Tap::create_with_vnet_hdr(name).map_err(|e| {
        // The kernel refuses the name of a device that is not a TAP (`lo`, a veth) with
        // EINVAL, which alone says nothing of the name.
        if e.raw_os_error() == Some(libc::EINVAL) && nix::net::if_::if_nametoindex(name.as_str()).is_ok() {
            format!("the namespace already has a device named {name} that is not a TAP: give another --netns-ifname")
        } else {
            format!("cannot create TAP device {name} (/dev/net/tun): {}", describe(&e))
        }
    })?;
    if spec.configure {
        super::configure_interface(&spec.iface, false)
            .map_err(|e| format!("cannot configure {name}: {}", describe(&e)))?;
    }
    Ok(tap.into_fd())
}

/// The child's answer: "ok" with the TAP's descriptor, or an error line.
fn send_result(sock: &OwnedFd, result: Result<&OwnedFd, &str>) -> nix::Result<usize> {
    match result {
        Ok(fd) => {
            let fds = [fd.as_raw_fd()];
            let cmsg = [ControlMessage::ScmRights(&fds)];
            sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(b"ok")], &cmsg, MsgFlags::empty(), None)
        }
        Err(msg) => {
            let text = format!("E{msg}");
            sendmsg::<()>(sock.as_raw_fd(), &[IoSlice::new(text.as_bytes())], &[], MsgFlags::empty(), None)
        }
    }
}

fn recv_result(sock: &OwnedFd) -> io::Result<Result<OwnedFd, String>> {
    let mut buf = [0u8; 1024];
    let mut cmsg_space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let (n, fds) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg_space), MsgFlags::MSG_CMSG_CLOEXEC) {
            Ok(msg) => {
                let mut fds = Vec::new();
                for c in msg.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        // SAFETY: descriptors received with SCM_RIGHTS are new and ours.
                        fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
                    }
                }
                break (msg.bytes, fds);
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let text = &buf[..n];
    if text == b"ok" {
        return fds.into_iter().next().map(Ok).ok_or_else(|| io::Error::other("no TAP descriptor received"));
    }
    match text.strip_prefix(b"E") {
        Some(msg) => Ok(Err(String::from_utf8_lossy(msg).into_owned())),
        None => Err(io::Error::other("the setup process died")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!("1234".parse::<NetnsTarget>(), Ok(NetnsTarget::Pid(1234)));
        assert_eq!("/run/netns/x".parse::<NetnsTarget>(), Ok(NetnsTarget::Path("/run/netns/x".into())));
        assert_eq!("x".parse::<NetnsTarget>(), Ok(NetnsTarget::Path("/run/netns/x".into())));
        assert_eq!("./x".parse::<NetnsTarget>(), Ok(NetnsTarget::Path("./x".into())));
        assert_eq!("12ab".parse::<NetnsTarget>(), Ok(NetnsTarget::Path("/run/netns/12ab".into())));
        assert!("".parse::<NetnsTarget>().is_err());
        assert!("99999999999999".parse::<NetnsTarget>().is_err());
    }
}
