//! TCP sockets made inside the guest's network namespace, for loopback clients of
//! published ports (see `listeners`: they are carried socket to socket, never through the
//! guest link).
//!
//! A socket belongs to the network namespace of the thread that creates it, and stays
//! there whichever thread uses it later. So one thread of its own enters the guest's
//! namespace once (setns), stays there, and keeps up to 16 fresh sockets ready in a pool
//! (one pool per family: IPv4, and IPv6 once a client over IPv6 asked for one);
//! the engine takes one per connection without waiting (and binds and connects it from its
//! own thread), and wakes the thread to fill the pool up again only when fewer than half are
//! left, so a burst of connections costs one wake-up per eight. Nothing moves between
//! namespaces per connection. The thread ends when the engine drops its handle.
//!
//! Entering the namespace needs CAP_SYS_ADMIN in the user namespace that owns it and in
//! the thread's own. As root that holds everywhere; rootless, `usernet run` first joins the
//! user namespace it made for the guest (see `usernet_host::netns::sandbox`), whose owner it
//! is, while the process is still single-threaded.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use super::sock;

/// Sockets kept ready: enough for a burst of connections accepted in one round.
const READY: usize = 16;
/// The thread refills only once fewer than this are left, so that it wakes once per
/// several connections, not once per connection (a wake-up costs more than the sockets).
const LOW_WATER: usize = READY / 2;
/// Longest the engine waits for a socket when the ready ones ran out.
const WAIT: Duration = Duration::from_millis(50);

/// The sockets made and not yet taken, and whether the engine is gone.
struct Pool {
    /// IPv4 sockets, then IPv6 ones.
    sockets: [Vec<io::Result<OwnedFd>>; 2],
    /// Which families to keep ready: IPv4 from the start, IPv6 from its first use.
    wanted: [bool; 2],
    closed: bool,
}

impl Pool {
    /// Whether some wanted family ran low.
    fn low(&self) -> bool {
        (0..2).any(|f| self.wanted[f] && self.sockets[f].len() < LOW_WATER)
    }
}

/// A socket family of the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4 = 0,
    V6 = 1,
}

struct Shared {
    pool: Mutex<Pool>,
    /// The engine took the pool below the low-water mark, or went away.
    refill: Condvar,
    /// The thread put sockets in.
    made: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub struct GuestSockets {
    shared: Arc<Shared>,
    /// Whether the thread entered the namespace, until [`GuestSockets::entered`] was asked.
    entered: Option<std::sync::mpsc::Receiver<io::Result<()>>>,
}

impl GuestSockets {
    /// Starts the thread in the namespace `netns`; fails at once if it cannot enter it.
    pub fn start(netns: OwnedFd) -> io::Result<GuestSockets> {
        let mut sockets = GuestSockets::spawn(netns)?;
        sockets.entered()?;
        Ok(sockets)
    }

    /// Starts the thread without waiting for it to enter the namespace ([`entered`] says
    /// whether it did): on a busy machine a new thread may wait milliseconds for a CPU, and
    /// `usernet run` has other things to do on its way to starting COMMAND.
    ///
    /// [`entered`]: GuestSockets::entered
    pub fn spawn(netns: OwnedFd) -> io::Result<GuestSockets> {
        let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let shared = Arc::new(Shared {
            pool: Mutex::new(Pool {
                sockets: [Vec::with_capacity(READY), Vec::new()],
                wanted: [true, false],
                closed: false,
            }),
            refill: Condvar::new(),
            made: Condvar::new(),
        });
        let theirs = shared.clone();
        let thread = std::thread::Builder::new().name("usernet-guest-ns".into()).spawn(move || {
            // SAFETY: setns(2) on a namespace descriptor this thread owns; only this thread moves.
            if !is_current_netns(&netns) && unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
                let _ = entered_tx.send(Err(io::Error::last_os_error()));
                return;
            }
            drop(netns);
            if entered_tx.send(Ok(())).is_err() {
                return;
            }
            refill_until_closed(&theirs);
        })?;
        drop(thread);
        Ok(GuestSockets { shared, entered: Some(entered_rx) })
    }

    /// Waits until the thread entered the namespace, or says why it could not (then it has
    /// ended). Once it said Ok, Ok at once.
    pub fn entered(&mut self) -> io::Result<()> {
        match self.entered.take() {
            Some(rx) => rx.recv().unwrap_or_else(|_| Err(io::Error::other("the namespace thread died"))),
            None => Ok(()),
        }
    }

    /// A fresh non-blocking TCP socket of the guest's namespace, of `family`.
    pub fn take(&self, family: Family) -> io::Result<OwnedFd> {
        let f = family as usize;
        let mut pool = self.shared.lock();
        pool.wanted[f] = true;
        if pool.sockets[f].is_empty() {
            self.shared.refill.notify_one();
            pool = self
                .shared
                .made
                .wait_timeout_while(pool, WAIT, |p| p.sockets[f].is_empty())
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let made = pool.sockets[f].pop().unwrap_or_else(|| Err(io::ErrorKind::TimedOut.into()));
        if pool.sockets[f].len() < LOW_WATER {
            self.shared.refill.notify_one();
        }
        made
    }
}

impl Drop for GuestSockets {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.refill.notify_one();
    }
}

/// The thread's loop: wait until the pool runs low, fill it up, until the engine is gone.
fn refill_until_closed(shared: &Shared) {
    loop {
        let missing = {
            let pool = shared.lock();
            let pool = shared.refill.wait_while(pool, |p| !p.closed && !p.low()).unwrap_or_else(|e| e.into_inner());
            if pool.closed {
                return;
            }
            [0, 1].map(|f| if pool.wanted[f] { READY.saturating_sub(pool.sockets[f].len()) } else { 0 })
        };
        // Made outside the lock, so that the engine never waits for socket(2).
        let v4: Vec<_> = (0..missing[0]).map(|_| sock::socket(libc::SOCK_STREAM, 0)).collect();
        let v6: Vec<_> = (0..missing[1])
            .map(|_| sock::socket_for(std::net::Ipv6Addr::UNSPECIFIED.into(), libc::SOCK_STREAM, 0))
            .collect();
        let mut pool = shared.lock();
        pool.sockets[0].extend(v4);
        pool.sockets[1].extend(v6);
        drop(pool);
        shared.made.notify_all();
    }
}

/// Whether `netns` is the calling thread's own network namespace (entering it would be a
/// no-op that still asks for CAP_SYS_ADMIN).
fn is_current_netns(netns: &OwnedFd) -> bool {
    use std::os::unix::fs::MetadataExt;
    let theirs = std::fs::metadata(format!("/proc/self/fd/{}", netns.as_raw_fd()));
    let ours = std::fs::metadata("/proc/thread-self/ns/net");
    match (theirs, ours) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The network namespace cookie of a socket (SO_NETNS_COOKIE; needs no privilege).
    fn netns_cookie(fd: &OwnedFd) -> u64 {
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: cookie and len are valid for writes of the sizes given.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                &mut cookie as *mut u64 as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        cookie
    }

    /// Sockets come from the namespace the thread is in: here our own (so the test needs no
    /// privilege), checked through the sockets' network namespace cookies.
    #[test]
    fn sockets_come_from_the_namespace_given() {
        let own = OwnedFd::from(std::fs::File::open("/proc/thread-self/ns/net").unwrap());
        let pool = GuestSockets::start(own).unwrap();
        let here = netns_cookie(&sock::socket(libc::SOCK_STREAM, 0).unwrap());
        for _ in 0..(READY * 2) {
            assert_eq!(netns_cookie(&pool.take(Family::V4).unwrap()), here);
        }
        for _ in 0..(READY * 2) {
            let fd = pool.take(Family::V6).unwrap();
            assert_eq!(netns_cookie(&fd), here);
            let domain = sock::get_int(std::os::fd::AsFd::as_fd(&fd), libc::SOL_SOCKET, libc::SO_DOMAIN).unwrap();
            assert_eq!(domain, libc::AF_INET6);
        }
    }

    #[test]
    fn a_namespace_it_cannot_enter_is_an_error_at_once() {
        // A descriptor that is not a network namespace.
        let not_ns = OwnedFd::from(std::fs::File::open("/proc/self/stat").unwrap());
        assert!(GuestSockets::start(not_ns).is_err());
    }
}
