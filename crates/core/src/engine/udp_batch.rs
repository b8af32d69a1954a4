//! Guest UDP datagrams gathered over one batch of frames and sent with one sendmmsg(2) per
//! flow, instead of one send(2) each: half the system calls of a UDP stream.

use std::io;
use std::os::fd::RawFd;

use super::flows::FlowId;

/// Bytes of payload held before a flush is forced.
const CAPACITY: usize = 512 * 1024;
/// Datagrams per sendmmsg call.
const MAX_MSGS: usize = 64;

#[derive(Default)]
pub struct UdpBatch {
    data: Vec<u8>,
    /// (flow, socket, start, length) in arrival order.
    items: Vec<(FlowId, RawFd, usize, usize)>,
    /// Scratch for sendmmsg, kept between flushes so that a flush allocates nothing.
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
}

impl UdpBatch {
    /// True when `len` more bytes do not fit: flush first.
    pub fn full(&self, len: usize) -> bool {
        self.data.len() + len > CAPACITY
    }

    /// Queues a datagram for `flow`'s own socket `fd`. The engine flushes the batch at the
    /// end of each round and before it closes any flow, so `fd` is still open when it is sent.
    pub fn push(&mut self, flow: FlowId, fd: RawFd, payload: &[u8]) {
        if self.data.capacity() == 0 {
            self.data.reserve(CAPACITY);
        }
        let start = self.data.len();
        self.data.extend_from_slice(payload);
        self.items.push((flow, fd, start, payload.len()));
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Sends everything, in order, each run of one flow's datagrams in sendmmsg calls.
    /// A socket that cannot take a datagram drops it, as a full network would.
    pub fn flush(&mut self) {
        let mut i = 0;
        while i < self.items.len() {
            let (flow, fd, _, _) = self.items[i];
            let mut j = i;
            while j < self.items.len() && self.items[j].0 == flow && j - i < MAX_MSGS {
                j += 1;
            }
            if let Err(e) = send_many(fd, &self.data, &self.items[i..j], &mut self.iovs, &mut self.msgs) {
                tracing::debug!("udp: {e}");
            }
            i = j;
        }
        self.items.clear();
        self.data.clear();
    }
}

fn send_many(
    fd: RawFd,
    data: &[u8],
    items: &[(FlowId, RawFd, usize, usize)],
    iovs: &mut Vec<libc::iovec>,
    msgs: &mut Vec<libc::mmsghdr>,
) -> io::Result<()> {
    iovs.clear();
    iovs.extend(items.iter().map(|&(_, _, start, len)| libc::iovec {
        iov_base: data[start..].as_ptr() as *mut libc::c_void,
        iov_len: len,
    }));
    msgs.clear();
    // SAFETY: an all-zero mmsghdr is valid; each is pointed at one iovec below.
    msgs.extend((0..items.len()).map(|_| unsafe { std::mem::zeroed::<libc::mmsghdr>() }));
    for (m, iov) in msgs.iter_mut().zip(iovs.iter_mut()) {
        m.msg_hdr.msg_iov = iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0;
    while sent < msgs.len() {
        // SAFETY: msgs[sent..] and the iovecs they point to live across the call.
        let r = unsafe {
            libc::sendmmsg(
                fd,
                msgs[sent..].as_mut_ptr(),
                (msgs.len() - sent) as libc::c_uint,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // The rest of this run is dropped (EAGAIN: the socket is full; ECONNREFUSED:
            // the next receive reports it to the guest).
            return Err(e);
        }
        sent += r as usize;
        if r == 0 {
            break;
        }
    }
    Ok(())
}
