//! The host files the DNS watcher follows, looked at and read by a process of their own,
//! outside usernet's sandbox: once confined, usernet itself may read none of the host's
//! files (`crate::confine`), and resolv.conf may be re-pointed to any directory.
//!
//! Theory of operation. [`Follower::start`] forks the follower (during setup, before the
//! sandbox; from the watcher thread, so that the child dies with that thread:
//! PR_SET_PDEATHSIG), its write end a pipe to the thread. The child names itself
//! `usernet-dns-follower` (its command line, as `ps` shows it, and `usernet-dns` as its
//! thread name), keeps only that pipe (every other descriptor is closed, and the standard
//! ones point at /dev/null), drops every capability, and joins a Landlock ruleset that lets
//! it write nothing (`confine`'s read-only ruleset). It sees no guest input: all it does is, every interval, `stat` each path (following symlinks), wait
//! for a changed file to stay the same for 100 ms (so that a writer that truncates and then
//! writes is not read half-way), read it, and write it whole to the pipe as one message:
//! `[index u8][what u8][length u32 LE][bytes]`, what being [`CHANGED`], [`GONE`] or
//! [`UNREADABLE`] (length 0, then an errno as u32). The parent's watcher thread reads the
//! messages ([`Follower::next`]) and does the rest: parsing, comparing, logging.
//!
//! Why a fork and not usernet run again: an earlier version spawned `/proc/self/exe` under
//! the follower's name, so that no page of usernet would be shared copy-on-write. That cost
//! more than the copies it spared: a new process image loads and relocates the 14 MB binary
//! and starts the C library again (on a VM, whose `cpuid` instructions trap, about 1 ms of
//! CPU). Forked (with its buffer mapped by hand: `PageBuf`), `usernet run -- true` took
//! 12.4-12.7 ms against 13.3-14.1 (medians of 80 runs interleaved, three runs), with 579-580
//! page faults against 703-708, 2,616-3,159 against 4,662-5,471 over a 3 s iperf3 run
//! (`perf stat -e page-faults`), and the follower's proportional memory (Pss) was 628 KiB
//! against 1,919.
//!
//! Forked, the child runs in a copy of a process with threads, so it may only make system
//! calls: its paths, state and buffer are made before the fork, and it allocates nothing,
//! takes no lock and never unwinds. It ends when its thread ends (the parent's death signal), when
//! the pipe is closed (EPIPE), or when [`Follower`] is dropped (SIGKILL through a pidfd).

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

/// A file's new content.
pub const CHANGED: u8 = 1;
/// The path leads to nothing now.
pub const GONE: u8 = 2;
/// The path leads to a file that could not be read (the message carries its errno).
pub const UNREADABLE: u8 = 3;

/// How long a changed file must stay unchanged before it is read.
const SETTLE: Duration = Duration::from_millis(100);
/// At most this many settle waits per change (a file rewritten without end is read anyway).
const SETTLE_ROUNDS: u32 = 10;

/// What the child tells of one path.
#[derive(Debug)]
pub enum Event {
    Changed(usize, Vec<u8>),
    Gone(usize),
    Unreadable(usize, io::Error),
}

/// The child process, seen from the parent.
pub struct Follower {
    pipe: std::fs::File,
    pidfd: OwnedFd,
}

/// The identity and version of a file: (device, inode, size, mtime, ctime in ns).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp(u64, u64, i64, i64, i64, i64, i64);

/// What a path led to at the last look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    Unknown,
    Missing,
    File(Stamp),
}

/// What the child calls itself in `ps` (its command line) and in /proc/PID/comm.
const NAME: &[u8] = b"usernet-dns-follower\0";
const COMM: &[u8] = b"usernet-dns\0";

/// Everything the child uses, made before the fork.
struct Child {
    /// Where the process's command line is, to be written over (see `Child::rename`).
    args: Option<(usize, usize)>,
    paths: Vec<CString>,
    /// The size limit of each path's file.
    limits: Vec<usize>,
    last: Vec<Seen>,
    /// A message's header and the largest file.
    buf: PageBuf,
    interval: libc::timespec,
}

/// Zeroed memory mapped for the child's buffer, outside the C library's allocator: the
/// buffer is as large as the largest file followed (16 MiB for /etc/hosts), and freeing a
/// block that large through malloc raises malloc's thresholds for the rest of usernet's
/// life (its mmap threshold to the block's size, its trim threshold to twice that), so that
/// usernet's heap then kept freed memory: with the buffer a Vec, usernet's RSS with 10,000
/// connections grew by 9.2 MiB instead of 5.3 (`usernet-bench`). Pages never written cost
/// nothing; the parent unmaps its copy right after the fork.
struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        // SAFETY: an anonymous private mapping; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(PageBuf { ptr, len })
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, readable, and lives as long as self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, writable, and borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

const HEADER: usize = 6;
/// The pipe's write end in the child, and the read-only ruleset's descriptor.
const CHILD_PIPE: RawFd = 3;
const CHILD_RULESET: RawFd = 4;

impl Follower {
    /// Starts the follower of `files` (each a path and the most bytes read of it), looking
    /// every `interval`. Call it during setup, from the thread whose end should end the
    /// follower.
    pub fn start(files: &[(PathBuf, usize)], interval: Duration) -> io::Result<Follower> {
        Follower::fork(files, interval, crate::confine::read_only_ruleset().as_ref())
    }

    /// Forks the follower; `ruleset` is the read-only Landlock ruleset it joins (None: the
    /// kernel has no Landlock).
    fn fork(files: &[(PathBuf, usize)], interval: Duration, ruleset: Option<&OwnedFd>) -> io::Result<Follower> {
        let mut child = Child::new(files, interval)?;
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2(2) writes two descriptors into `fds`.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both are fresh descriptors that we own from here.
        let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let ruleset = ruleset.map_or(-1, |fd| fd.as_raw_fd());
        // SAFETY: getpid(2) has no arguments.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child runs `Child::run`, which makes system calls only (see the
        // module's documentation), and never returns.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(io::Error::last_os_error());
        }
        if pid == 0 {
            child.run(parent, write_end.as_raw_fd(), ruleset);
        }
        drop(write_end);
        let pidfd = pidfd_of(pid)?;
        Ok(Follower { pipe: std::fs::File::from(read_end), pidfd })
    }

    /// The next message (blocking); an UnexpectedEof error once the child is gone.
    pub fn next(&mut self) -> io::Result<Event> {
        let mut head = [0u8; HEADER];
        self.pipe.read_exact(&mut head)?;
        let index = usize::from(head[0]);
        let len = u32::from_le_bytes([head[2], head[3], head[4], head[5]]) as usize;
        let mut bytes = vec![0u8; len];
        self.pipe.read_exact(&mut bytes)?;
        match head[1] {
            CHANGED => Ok(Event::Changed(index, bytes)),
            GONE => Ok(Event::Gone(index)),
            UNREADABLE if len == 4 => {
                let errno = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                Ok(Event::Unreadable(index, io::Error::from_raw_os_error(errno as i32)))
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidData, "garbled message from the file follower")),
        }
    }

    /// A handle that ends the child (see [`Stopper::stop`]); the watcher thread keeps the
    /// follower and reads it, the thread that stops it keeps this.
    pub fn stopper(&self) -> io::Result<Stopper> {
        Ok(Stopper { pidfd: self.pidfd.try_clone()? })
    }
}

/// A pidfd of our child `pid`, which nobody has reaped: a child is reaped only once it
/// ended, and it ends only when the thread that started it does or when we kill it. On
/// failure the child is killed and reaped.
fn pidfd_of(pid: libc::pid_t) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: kill(2) and waitpid(2) of our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(e);
    }
    // SAFETY: a fresh descriptor that we own from here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Ends the follower's child from another thread.
pub struct Stopper {
    pidfd: OwnedFd,
}

impl Stopper {
    /// SIGKILLs the child, without waiting for it to go.
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal(2) on our child's pidfd.
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, 0, 0) };
    }

    /// SIGKILLs the child and reaps it (if `usernet run`'s supervisor, which reaps any
    /// child, has not already).
    pub fn stop(&self) {
        self.kill();
        // SAFETY: waitid(2) on our child's pidfd.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PIDFD, self.pidfd.as_raw_fd() as libc::id_t, &mut info, libc::WEXITED);
        }
    }
}

/// Where this process's command line is in its memory (`arg_start` and `arg_end`, fields
/// 48 and 49 of /proc/self/stat).
fn command_line_span() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after "PID (COMM)": the third of them is field 3 (COMM may hold spaces).
    let mut rest = stat[stat.rfind(')')? + 1..].split_whitespace().skip(45);
    let start: usize = rest.next()?.parse().ok()?;
    let end: usize = rest.next()?.parse().ok()?;
    (end > start).then_some((start, end))
}

impl Child {
    /// The follower's state for `files`, every buffer made now.
    fn new(files: &[(PathBuf, usize)], interval: Duration) -> io::Result<Child> {
        let paths = files
            .iter()
            .map(|(p, _)| CString::new(p.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into()))
            .collect::<io::Result<Vec<_>>>()?;
        let limits: Vec<usize> = files.iter().map(|(_, n)| *n).collect();
        let biggest = limits.iter().copied().max().unwrap_or(0);
        Ok(Child {
            args: command_line_span(),
            last: vec![Seen::Unknown; paths.len()],
            paths,
            limits,
            buf: PageBuf::new(HEADER + biggest.max(4))?,
            interval: libc::timespec {
                tv_sec: interval.as_secs() as libc::time_t,
                tv_nsec: interval.subsec_nanos() as libc::c_long,
            },
        })
    }

    /// Writes `NAME` over the command line the child shares with usernet (as setproctitle
    /// does), so that `ps` and `pgrep` tell it from usernet: a drop-in's caller looks for
    /// one `slirp4netns` or `pasta` process.
    fn rename(&self) {
        // SAFETY: prctl(2) with a NUL-terminated name.
        unsafe { libc::prctl(libc::PR_SET_NAME, COMM.as_ptr(), 0, 0, 0) };
        let Some((start, end)) = self.args else { return };
        // SAFETY: [start, end) is the child's own copy of the command line's memory (the
        // kernel's arg_start..arg_end, on the stack, writable), written within its bounds.
        unsafe {
            let args = std::slice::from_raw_parts_mut(start as *mut u8, end - start);
            args.fill(0);
            let n = NAME.len().min(args.len());
            args[..n].copy_from_slice(&NAME[..n]);
        }
    }

    /// The child's life: system calls only, never returns.
    fn run(&mut self, parent: libc::pid_t, pipe: RawFd, ruleset: RawFd) -> ! {
        self.rename();
        // SAFETY: system calls with plain arguments; `_exit` ends the child.
        let ruleset = unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::getppid() != parent {
                libc::_exit(0); // The thread that forked already ended.
            }
            // Keep the pipe (as 3) and the ruleset (as 4); close everything else: the
            // parent's sockets, its TAP, its listeners. The standard descriptors go to
            // /dev/null (the child writes nothing): held, the caller's stdout and stderr
            // would stay open after usernet went to the background (pasta mode), and a
            // caller that reads them to their end (Podman, rootlesskit 2) would wait for
            // good.
            let ruleset = if ruleset >= 0 { libc::fcntl(ruleset, libc::F_DUPFD_CLOEXEC, 10) } else { -1 };
            if libc::dup2(pipe, CHILD_PIPE) < 0 {
                libc::_exit(1);
            }
            let ruleset = if ruleset >= 0 && libc::dup2(ruleset, CHILD_RULESET) >= 0 { CHILD_RULESET } else { -1 };
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
            for fd in 0..3 {
                if null < 0 || libc::dup2(null, fd) < 0 {
                    libc::close(fd);
                }
            }
            if null > 2 {
                libc::close(null);
            }
            libc::syscall(libc::SYS_close_range, (CHILD_RULESET + 1) as libc::c_uint, libc::c_uint::MAX, 0);
            ruleset
        };
        // No capability, no way to regain one, and (with Landlock) no write anywhere: the
        // sandbox's own calls, system calls only (they serve its signal handler too).
        crate::confine::caps::set(0);
        // SAFETY: prctl(2) with plain integer arguments.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if ruleset >= 0 {
            crate::confine::caps::join_ruleset(ruleset);
            // SAFETY: the ruleset's descriptor is ours and used no more.
            unsafe { libc::close(ruleset) };
        }
        loop {
            for i in 0..self.paths.len() {
                self.check(i);
            }
            // SAFETY: nanosleep(2) with a valid timespec.
            unsafe { libc::nanosleep(&self.interval, std::ptr::null_mut()) };
        }
    }

    fn look(&self, i: usize) -> Seen {
        // SAFETY: stat(2) of a NUL-terminated path into a zeroed struct.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            if libc::stat(self.paths[i].as_ptr(), &mut st) != 0 {
                return Seen::Missing;
            }
            Seen::File(Stamp(
                st.st_dev,
                st.st_ino,
                st.st_size,
                st.st_mtime,
                st.st_mtime_nsec,
                st.st_ctime,
                st.st_ctime_nsec,
            ))
        }
    }

    /// One look at path `i`; tells the parent when what it leads to changed.
    fn check(&mut self, i: usize) {
        let mut now = self.look(i);
        if now == self.last[i] {
            return;
        }
        if self.last[i] != Seen::Unknown {
            for _ in 0..SETTLE_ROUNDS {
                let settle = libc::timespec { tv_sec: 0, tv_nsec: SETTLE.as_nanos() as libc::c_long };
                // SAFETY: nanosleep(2) with a valid timespec.
                unsafe { libc::nanosleep(&settle, std::ptr::null_mut()) };
                let again = self.look(i);
                if again == now {
                    break;
                }
                now = again;
            }
        }
        self.last[i] = now;
        if now == Seen::Missing {
            self.send(i, GONE, 0);
            return;
        }
        match self.read(i) {
            Ok(n) => self.send(i, CHANGED, n),
            Err(errno) => {
                self.buf[HEADER..HEADER + 4].copy_from_slice(&(errno as u32).to_le_bytes());
                self.send(i, UNREADABLE, 4);
            }
        }
    }

    /// Reads path `i` into the buffer (after the header), at most its limit; the length,
    /// or the errno.
    fn read(&mut self, i: usize) -> Result<usize, i32> {
        let limit = self.limits[i];
        // SAFETY: open(2), read(2) into the buffer's free part, close(2); errno read at once.
        unsafe {
            let fd = libc::open(self.paths[i].as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(*libc::__errno_location());
            }
            let mut n = 0;
            while n < limit {
                let r = libc::read(fd, self.buf.as_mut_ptr().add(HEADER + n).cast(), limit - n);
                if r < 0 {
                    if *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    let e = *libc::__errno_location();
                    libc::close(fd);
                    return Err(e);
                }
                if r == 0 {
                    break;
                }
                n += r as usize;
            }
            libc::close(fd);
            Ok(n)
        }
    }

    /// Writes one message of `len` payload bytes (already in the buffer); ends the child
    /// when the parent's end is closed.
    fn send(&mut self, i: usize, what: u8, len: usize) {
        self.buf[0] = i as u8;
        self.buf[1] = what;
        self.buf[2..HEADER].copy_from_slice(&(len as u32).to_le_bytes());
        let total = HEADER + len;
        let mut done = 0;
        while done < total {
            // SAFETY: write(2) from the buffer's filled part to our pipe.
            let r = unsafe { libc::write(CHILD_PIPE, self.buf.as_ptr().add(done).cast(), total - done) };
            if r < 0 {
                // SAFETY: errno read at once.
                if unsafe { *libc::__errno_location() } == libc::EINTR {
                    continue;
                }
                // SAFETY: the parent is gone or closed its end: end here.
                unsafe { libc::_exit(0) };
            }
            done += r as usize;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pid_of(f: &Follower) -> i32 {
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", f.pidfd.as_raw_fd())).unwrap();
        info.lines().find_map(|l| l.strip_prefix("Pid:")).unwrap().trim().parse().unwrap()
    }

    /// The follower tells each file's content, then its changes, and keeps nothing of the
    /// parent's: not its name, no descriptor but its pipe, no capability, no way to regain
    /// one.
    #[test]
    fn the_follower_tells_changes_and_holds_nothing_of_its_parent() {
        let dir = std::env::temp_dir().join(format!("usernet-follower-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, missing) = (dir.join("a"), dir.join("missing"));
        std::fs::write(&a, "one").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut f = Follower::start(&[(a.clone(), 2), (missing.clone(), 100)], Duration::from_millis(20)).unwrap();
        let mut seen = Vec::new();
        for _ in 0..2 {
            seen.push(format!("{:?}", f.next().unwrap()));
        }
        seen.sort();
        assert_eq!(seen, ["Changed(0, [111, 110])", "Gone(1)"], "at most the limit is read");
        std::fs::write(&missing, "x").unwrap();
        assert_eq!(format!("{:?}", f.next().unwrap()), "Changed(1, [120])");

        let pid = pid_of(&f);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(cmdline.starts_with(b"usernet-dns-follower\0"), "{:?}", String::from_utf8_lossy(&cmdline));
        assert_eq!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap(), "usernet-dns\n");
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(fds.iter().all(|fd| ["0", "1", "2", "3"].contains(&fd.as_str())), "{fds:?}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        for line in ["CapEff:\t0000000000000000", "CapPrm:\t0000000000000000", "NoNewPrivs:\t1"] {
            assert!(status.lines().any(|l| l == line), "no {line:?} in {status}");
        }
        drop(listener);
        let stopper = f.stopper().unwrap();
        stopper.stop();
        assert!(matches!(f.next(), Err(e) if e.kind() == io::ErrorKind::UnexpectedEof));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
