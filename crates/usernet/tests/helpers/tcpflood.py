#!/usr/bin/env python3
"""Many TCP connections to a host server that never reads (issue 14).

    tcpflood.py server PORTFILE FIRST
        On the host: listens on 127.0.0.1 (a free port, written to PORTFILE), accepts every
        connection, reads its first FIRST bytes (so that the sender's TCP gets up to speed)
        and then never reads from it again; keeps them open until killed (or until its
        parent goes).

    tcpflood.py flood PID HOST PORT COUNT HEAVY SECONDS CHECK
        In the guest: opens COUNT connections to HOST:PORT one after the other, each of
        which sends 64 KiB; the first HEAVY then keep sending all they can for SECONDS.
        Meanwhile it samples usernet's (process PID: the shell that runs this passes its
        $PPID) resident memory and open descriptors. Then it resets 16 of them (a guest at
        its bound of flows gets no new one) and, with the rest still open, it runs the
        shell command CHECK (a well-behaved client; its output passes
        through). Lines:

        PROC name             the name of process PID (/proc/PID/comm)
        BEFORE rss_kib fds
        OPENED ok refused     connections established and refused (RST: a bound)
        SENT bytes            what the guest's sockets took, all together
        PEAK rss_kib fds      the most seen while the connections were opened and fed
        ...                   CHECK's output
        CHECKED status        CHECK's exit status

Used by crates/usernet/tests/run_hostile.rs. Every loop is bounded in count and time.
"""

import errno
import os
import resource
import socket
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def usage(pid):
    """(resident KiB, open descriptors) of process pid."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def server(portfile, first):
    import selectors
    raise_nofile()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    ls.setblocking(False)
    with open(portfile + ".tmp", "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.rename(portfile + ".tmp", portfile)
    parent = os.getppid()
    held = []
    got = {}
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ)
    while os.getppid() == parent:
        for key, _ in sel.select(1.0):
            if key.fileobj is not ls:
                c = key.fileobj
                try:
                    n = len(c.recv(min(1 << 20, first - got[c])))
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    n = 0
                got[c] += n
                if n == 0 or got[c] >= first:
                    sel.unregister(c)
                continue
            while True:
                try:
                    c, _ = ls.accept()
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno in (errno.EMFILE, errno.ENFILE):
                        time.sleep(0.1)
                        break
                    raise
                held.append(c)
                if first > 0:
                    c.setblocking(False)
                    got[c] = 0
                    sel.register(c, selectors.EVENT_READ)


def flood(pid, host, port, count, heavy, seconds, check):
    raise_nofile()
    with open(f"/proc/{pid}/comm") as f:
        print("PROC", f.read().strip(), flush=True)
    rss, fds = usage(pid)
    print("BEFORE", rss, fds, flush=True)
    peak = [rss, fds]

    def sample():
        r, d = usage(pid)
        peak[0] = max(peak[0], r)
        peak[1] = max(peak[1], d)

    chunk = b"x" * 65536
    socks, refused, sent = [], 0, 0
    for i in range(count):
        s = socket.socket()
        s.settimeout(10)
        try:
            s.connect((host, port))
        except OSError:
            refused += 1
            s.close()
            continue
        s.setblocking(False)
        try:
            sent += s.send(chunk)
        except OSError:
            pass
        socks.append(s)
        if i % 500 == 0:
            sample()
    print("OPENED", len(socks), refused, flush=True)
    deadline = time.monotonic() + seconds
    last = 0.0
    while time.monotonic() < deadline:
        for s in socks[:heavy]:
            try:
                sent += s.send(chunk)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass
        now = time.monotonic()
        if now - last > 0.2:
            sample()
            last = now
            time.sleep(0.01)
    sample()
    print("SENT", sent, flush=True)
    print("PEAK", peak[0], peak[1], flush=True)
    # A guest at its bound of flows gets no new one: make room for CHECK's (with resets:
    # a FIN would wait behind the data the server does not read, and the flow with it).
    import struct
    for s in socks[-16:]:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    del socks[-16:]
    time.sleep(0.5)
    import subprocess
    try:
        status = subprocess.run(["sh", "-c", check], timeout=60).returncode
    except subprocess.TimeoutExpired:
        status = "timeout"
    print("CHECKED", status, flush=True)
    for s in socks:
        s.close()


def main():
    if sys.argv[1] == "server":
        server(sys.argv[2], int(sys.argv[3]))
    elif sys.argv[1] == "flood":
        pid, host, port, count, heavy, seconds, check = sys.argv[2:9]
        flood(int(pid), host, int(port), int(count), int(heavy), float(seconds), check)
    else:
        sys.exit("usage: tcpflood.py server PORTFILE FIRST | flood PID HOST PORT COUNT HEAVY SECONDS CHECK")


if __name__ == "__main__":
    main()
