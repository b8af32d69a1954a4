//! Thin wrappers over the socket calls of the data path (non-blocking, no SIGPIPE).

use std::io;
use std::os::fd::RawFd;

fn check(r: isize) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Reads (or with `peek`, looks at) up to `buf.len()` bytes.
pub fn recv(fd: RawFd, buf: &mut [u8], peek: bool) -> io::Result<usize> {
    let flags = libc::MSG_DONTWAIT | if peek { libc::MSG_PEEK } else { 0 };
    // SAFETY: buf is valid for writes of its length.
    check(unsafe { libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), flags) })
}

/// Sends what the socket takes now; returns how much that was.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: buf is valid for reads of its length.
    check(unsafe {
        libc::send(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })
}

/// Drops `n` bytes from the front of a receive queue: without copying on a TCP socket
/// (MSG_TRUNC), through a scratch buffer on a socketpair. Returns how many were dropped.
pub fn discard(fd: RawFd, mut n: usize, is_tcp: bool) -> io::Result<usize> {
    let mut done = 0;
    if is_tcp {
        while n > 0 {
            // SAFETY: with MSG_TRUNC a TCP socket copies nothing into the (null) buffer.
            let r = unsafe {
                libc::recv(
                    fd,
                    std::ptr::null_mut(),
                    n,
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            match check(r) {
                Ok(0) => break,
                Ok(k) => {
                    done += k;
                    n -= k.min(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    } else {
        let mut scratch = [0u8; 16384];
        while n > 0 {
            let want = n.min(scratch.len());
            match recv(fd, &mut scratch[..want], false) {
                Ok(0) => break,
                Ok(k) => {
                    done += k;
                    n -= k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(done)
}

/// Sets where the next MSG_PEEK starts, relative to the front of the receive queue.
pub fn set_peek_offset(fd: RawFd, off: i32) -> io::Result<()> {
    super::dial::set_int(fd, libc::SOL_SOCKET, libc::SO_PEEK_OFF, off)
}

pub fn shutdown_write(fd: RawFd) {
    // SAFETY: shutdown(2) on a descriptor we own.
    unsafe { libc::shutdown(fd, libc::SHUT_WR) };
}

/// Makes close(2) reset the connection instead of a graceful FIN.
pub fn set_linger_zero(fd: RawFd) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: l is a valid linger struct of the length given.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &l as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as u32,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// The translator relies on SO_PEEK_OFF semantics of TCP sockets: peeks advance the
    /// offset, a discard moves it back by the discarded amount, and 0 rewinds.
    #[test]
    fn peek_offset_semantics_on_tcp() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        let data: Vec<u8> = (0..100u8).collect();
        c.write_all(&data).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let fd = s.as_raw_fd();
        set_peek_offset(fd, 0).unwrap();
        let mut b = [0u8; 10];
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 0);
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 10);
        assert_eq!(discard(fd, 5, true).unwrap(), 5);
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 20, "offset moved back by the discarded amount");
        set_peek_offset(fd, 0).unwrap();
        assert_eq!(recv(fd, &mut b, true).unwrap(), 10);
        assert_eq!(b[0], 5, "rewound to the front");
    }

    #[test]
    fn peek_offset_semantics_on_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        (&a).write_all(&[1, 2, 3, 4, 5, 6]).unwrap();
        let fd = b.as_raw_fd();
        set_peek_offset(fd, 0).unwrap();
        let mut x = [0u8; 2];
        recv(fd, &mut x, true).unwrap();
        recv(fd, &mut x, true).unwrap();
        assert_eq!(x, [3, 4]);
        assert_eq!(discard(fd, 2, false).unwrap(), 2);
        recv(fd, &mut x, true).unwrap();
        assert_eq!(x, [5, 6]);
    }
}
