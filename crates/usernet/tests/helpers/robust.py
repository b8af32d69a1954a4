#!/usr/bin/env python3
"""Clients and servers for usernet's robustness tests (tests/run_robust.rs).

Nothing here does a name lookup: every address is given as a number. Every
loop is bounded in count and time. Servers print "PORT <n>" (or "READY") on
their first stdout line and exit when their stdin reaches end-of-file.

Host side:
  robust.py hold-server            TCP on 127.0.0.1:0: accepts everything and holds
                                   it; closes a connection when its peer does
  robust.py stream-server          TCP on 127.0.0.1:0: a connection that starts with
                                   "GET " gets its request read and an HTTP response
                                   that never ends; one that starts with "RAW\\n" gets
                                   endless bytes and nothing more read (so whatever
                                   else it sent stays unread). Prints "STREAMING GET"
                                   or "STREAMING RAW" once the first MiB is out, and
                                   "ENDED <error name>" when a send fails.
  robust.py blackhole-dns          UDP on 127.0.0.1:0: reads queries, never answers;
                                   prints "QUERY" for each
  robust.py published-clients PORT N KEEP GO
                                   N TCP connections to 127.0.0.1:PORT, kept open, each
                                   sending "hello <i>\n" to an echo server; prints
                                   "SERVED k" (answered within 3 s), waits for the file
                                   GO (at most 60 s), then closes all but the last KEEP,
                                   sends "again\n" on those and prints
                                   "AFTER answered=a of=b lost=c" (answered whole within
                                   30 s; lost: ended or reset first)

Guest side:
  robust.py synflood IP PORT N DONE    N non-blocking connects to IP:PORT, kept
                                   pending until the file DONE exists (at most 90 s);
                                   prints "OPENED n", then "STATUS connected=.. failed=..
                                   pending=.." and "CLOSED"
  robust.py idle-clients IP PORT N GO CLOSE SINKPORT
                                   waits for the file GO, opens N TCP connections
                                   (at most 256 connecting at once), prints
                                   "CONNECTED n", waits for the file CLOSE, closes them
                                   all ("CLOSED"), then sends 1 MiB of b"r" to
                                   IP:SINKPORT with a half-close and prints "SINK <answer>"
  robust.py vanish-client IP PORT  connects, sends "RAW\\n" and 64 KiB the server never
                                   reads, then reads until EOF or an error (at most
                                   60 s): prints "EOF <bytes>", "ERROR <name> <bytes>"
                                   or "TIMEOUT <bytes>"
  robust.py udp-refused IP PORT    a connected UDP socket sends up to 3 datagrams and
                                   waits 3 s for each: prints "REFUSED", "ANSWER" or
                                   "TIMEOUT"
  robust.py connect-wait IP PORT   one blocking connect (at most 90 s): prints
                                   "CONNECTED", "REFUSED after=<s>", "TIMEOUT" or
                                   "ERROR <name> after=<s>"
  robust.py udp-many IP PORT N     N UDP sockets each send one datagram to IP:PORT;
                                   prints "SENT n", "NEWEST-ANSWERED k" (how many of the
                                   last 10 still exchange a datagram), "OLDEST-AGAIN
                                   ok|none" (the first socket, once more) and "FRESH
                                   ok|none" (a new socket)
  robust.py halfclose-server PORT  on 0.0.0.0:PORT, two connections in turn: the first
                                   is read to EOF and answered "<sha256> <len>"; to the
                                   second it sends 1 MiB of b"g", shuts down its sending
                                   side, reads to EOF and prints "GOT <what it read>"
  robust.py echo-server PORT       on 0.0.0.0:PORT: prints "READY", then echoes back
                                   whatever each connection sends, and closes it at
                                   its EOF
  robust.py stream-guest-server PORT
                                   on 0.0.0.0:PORT: prints "READY <its pid>", accepts
                                   two connections and sends both endless bytes; the
                                   first is never read (what its client sent stays
                                   unread), the second has its first line read first.
                                   Prints "STREAMING 2" once both are under way and
                                   "ENDED <error name>" when a send fails
"""

import errno
import hashlib
import os
import resource
import select
import selectors
import socket
import sys
import threading
import time

from testserver import exit_when_stdin_closes  # same folder: on sys.path as the script's

CHUNK = b"\0" * 65536


def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def wait_for_file(path, limit):
    end = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


# ---------------------------------------------------------------------------
# Host side.


def listener(addr):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(addr)
    lsock.listen(4096)
    lsock.setblocking(False)
    return lsock


def serve_connections(lsock, echo):
    """Accepts everything on `lsock` and holds it: what a connection sends is echoed
    back (`echo`) or dropped; a connection closes when its peer does."""
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select(1.0):
            s = key.fileobj
            if s is lsock:
                for _ in range(1024):
                    try:
                        c, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        # Out of descriptors: leave the rest in the backlog.
                        break
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ)
                continue
            try:
                data = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(s)
                s.close()
            elif echo:
                s.setblocking(True)
                s.sendall(data)
                s.setblocking(False)


def hold_server():
    raise_nofile()
    exit_when_stdin_closes()
    lsock = listener(("127.0.0.1", 0))
    say("PORT %d" % lsock.getsockname()[1])
    serve_connections(lsock, echo=False)


def stream_server():
    exit_when_stdin_closes()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    say("PORT %d" % lsock.getsockname()[1])

    def serve(c):
        try:
            head = b""
            while len(head) < 4:
                d = c.recv(4 - len(head))
                if not d:
                    return
                head += d
            kind = "RAW"
            if head == b"GET ":
                kind = "GET"
                req = head
                while b"\r\n\r\n" not in req and len(req) < 65536:
                    d = c.recv(4096)
                    if not d:
                        return
                    req += d
                c.sendall(
                    b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
                    b"Content-Length: 1000000000000\r\n\r\n"
                )
            sent = 0
            announced = False
            # Endless, but bounded: the test kills us long before 10 minutes.
            end = time.monotonic() + 600
            while time.monotonic() < end:
                c.sendall(CHUNK)
                sent += len(CHUNK)
                if not announced and sent >= 1 << 20:
                    say("STREAMING " + kind)
                    announced = True
        except OSError as e:
            say("ENDED " + type(e).__name__)

    for _ in range(64):
        c, _ = lsock.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def blackhole_dns():
    exit_when_stdin_closes()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    say("PORT %d" % s.getsockname()[1])
    while True:
        s.recvfrom(65535)
        say("QUERY")


# ---------------------------------------------------------------------------
# Guest side.


def synflood(ip, port, n, done):
    raise_nofile()
    socks = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        rc = s.connect_ex((ip, port))
        if rc not in (0, errno.EINPROGRESS):
            say("CONNECT-ERROR %s" % errno.errorcode.get(rc, rc))
        socks.append(s)
    say("OPENED %d" % len(socks))
    wait_for_file(done, 90)
    p = select.poll()
    by_fd = {}
    for s in socks:
        p.register(s.fileno(), select.POLLOUT)
        by_fd[s.fileno()] = s
    connected = failed = 0
    for fd, _ in p.poll(0):
        err = by_fd[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err == 0:
            connected += 1
        else:
            failed += 1
    pending = len(socks) - connected - failed
    say("STATUS connected=%d failed=%d pending=%d" % (connected, failed, pending))
    for s in socks:
        s.close()
    say("CLOSED")


def idle_clients(ip, port, n, go, close, sink_port):
    raise_nofile()
    if not wait_for_file(go, 60):
        say("NO-GO")
        return 1
    connected = []
    connecting = {}
    sel = selectors.DefaultSelector()
    opened = 0
    errors = 0
    end = time.monotonic() + 240
    while len(connected) < n and time.monotonic() < end and errors < 100:
        while opened < n and len(connecting) < 256:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((ip, port))
            connecting[s.fileno()] = s
            sel.register(s, selectors.EVENT_WRITE)
            opened += 1
        for key, _ in sel.select(1.0):
            s = key.fileobj
            sel.unregister(s)
            del connecting[s.fileno()]
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                connected.append(s)
            else:
                say("CONNECT-ERROR %s" % errno.errorcode.get(err, err))
                errors += 1
                s.close()
                opened -= 1
    say("CONNECTED %d" % len(connected))
    if not wait_for_file(close, 120):
        say("NO-CLOSE")
    for s in connected:
        s.close()
    for s in list(connecting.values()):
        s.close()
    say("CLOSED")
    data = b"r" * (1 << 20)
    c = socket.create_connection((ip, sink_port), timeout=30)
    c.sendall(data)
    c.shutdown(socket.SHUT_WR)
    answer = b""
    while True:
        d = c.recv(4096)
        if not d:
            break
        answer += d
    say("SINK " + answer.decode(errors="replace").strip())
    return 0


def exchange(conns, sent, expected, limit):
    """Sends sent[i] on conns[i] and waits (at most `limit` s) for each to read back
    expected[i] whole; returns (answered, lost) as sets of indexes."""
    sel = selectors.DefaultSelector()
    got = {}
    for i, s in conns.items():
        s.setblocking(False)
        s.sendall(sent[i])
        sel.register(s, selectors.EVENT_READ, i)
        got[i] = b""
    answered, lost = set(), set()
    end = time.monotonic() + limit
    while len(answered) + len(lost) < len(conns) and time.monotonic() < end:
        for key, _ in sel.select(0.2):
            i = key.data
            try:
                d = key.fileobj.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                d = b""
            got[i] += d
            if not d or not expected[i].startswith(got[i]):
                lost.add(i)
                sel.unregister(key.fileobj)
            elif got[i] == expected[i]:
                answered.add(i)
                sel.unregister(key.fileobj)
    sel.close()
    return answered, lost


def published_clients(port, n, keep, go):
    raise_nofile()
    conns = {}
    for i in range(n):
        conns[i] = socket.create_connection(("127.0.0.1", port), timeout=10)
    hello = {i: b"hello %d\n" % i for i in range(n)}
    first, lost = exchange(conns, hello, hello, 3)
    say("SERVED %d" % len(first))
    wait_for_file(go, 60)
    for i in range(n - keep):
        conns.pop(i).close()
    again = {i: b"again\n" for i in conns}
    # One not served yet reads its hello back first.
    want = {i: (b"" if i in first else hello[i]) + b"again\n" for i in conns}
    answered, lost_after = exchange(conns, again, want, 30)
    say("AFTER answered=%d of=%d lost=%d" % (len(answered), len(conns), len(lost | lost_after)))
    for s in conns.values():
        s.close()


def echo_server(port):
    raise_nofile()
    exit_when_stdin_closes()
    lsock = listener(("0.0.0.0", port))
    say("READY")
    serve_connections(lsock, echo=True)


def vanish_client(ip, port):
    total = 0
    c = socket.create_connection((ip, port), timeout=60)
    c.sendall(b"RAW\n" + b"u" * 65536)
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end:
            d = c.recv(65536)
            if not d:
                say("EOF %d" % total)
                return
            total += len(d)
    except socket.timeout:
        pass
    except OSError as e:
        say("ERROR %s %d" % (type(e).__name__, total))
        return
    say("TIMEOUT %d" % total)


def udp_refused(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect((ip, port))
    s.settimeout(3)
    for _ in range(3):
        try:
            s.send(b"anybody there?")
            s.recv(2048)
            say("ANSWER")
            return
        except ConnectionRefusedError:
            say("REFUSED")
            return
        except socket.timeout:
            continue
    say("TIMEOUT")


def connect_wait(ip, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(90)
    start = time.monotonic()
    try:
        s.connect((ip, port))
        say("CONNECTED")
    except ConnectionRefusedError:
        say("REFUSED after=%d" % (time.monotonic() - start))
    except socket.timeout:
        say("TIMEOUT")
    except OSError as e:
        say("ERROR %s after=%d" % (type(e).__name__, time.monotonic() - start))


def udp_exchange(s, msg):
    s.settimeout(2)
    for _ in range(3):
        try:
            s.send(msg)
            if s.recv(2048) == msg:
                return True
        except OSError:
            continue
    return False


def udp_many(ip, port, n):
    raise_nofile()
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((ip, port))
        s.send(b"flow %d" % i)
        socks.append(s)
        if i % 100 == 99:
            # Paced, so that no receive buffer on the way overflows.
            time.sleep(0.02)
    say("SENT %d" % len(socks))
    # The newest flows are still there; the oldest was evicted and comes back.
    answered = sum(udp_exchange(s, b"newest") for s in socks[-10:])
    say("NEWEST-ANSWERED %d" % answered)
    say("OLDEST-AGAIN %s" % ("ok" if udp_exchange(socks[0], b"oldest") else "none"))
    for s in socks:
        s.close()
    fresh = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fresh.connect((ip, port))
    say("FRESH %s" % ("ok" if udp_exchange(fresh, b"fresh") else "none"))


def halfclose_server(port):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(4)
    say("READY")
    # 1: read to EOF, then answer.
    c, _ = lsock.accept()
    c.settimeout(60)
    h = hashlib.sha256()
    total = 0
    while True:
        d = c.recv(65536)
        if not d:
            break
        h.update(d)
        total += len(d)
    c.sendall(("%s %d\n" % (h.hexdigest(), total)).encode())
    c.close()
    say("ANSWERED %d" % total)
    # 2: send, half-close, then read the peer's answer to EOF.
    c, _ = lsock.accept()
    c.settimeout(60)
    c.sendall(b"g" * (1 << 20))
    c.shutdown(socket.SHUT_WR)
    got = b""
    while len(got) < 4096:
        d = c.recv(4096)
        if not d:
            break
        got += d
    c.close()
    say("GOT " + got.decode(errors="replace").strip())


def stream_guest_server(port):
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("0.0.0.0", port))
    lsock.listen(4)
    say("READY %d" % os.getpid())
    started = []
    lock = threading.Lock()

    def serve(c, read_first):
        sent = 0
        announced = False
        end = time.monotonic() + 120
        try:
            if read_first:
                line = b""
                while not line.endswith(b"\n") and len(line) < 4096:
                    d = c.recv(1)
                    if not d:
                        return
                    line += d
            while time.monotonic() < end:
                c.sendall(CHUNK)
                sent += len(CHUNK)
                if not announced and sent >= 1 << 20:
                    announced = True
                    with lock:
                        started.append(1)
                        if len(started) == 2:
                            say("STREAMING 2")
        except OSError as e:
            say("ENDED " + type(e).__name__)

    threads = []
    for i in range(2):
        c, _ = lsock.accept()
        t = threading.Thread(target=serve, args=(c, i == 1), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()


def main():
    a = sys.argv[1:]
    if not a:
        sys.exit(__doc__)
    mode = a[0]
    if mode == "hold-server":
        hold_server()
    elif mode == "stream-server":
        stream_server()
    elif mode == "blackhole-dns":
        blackhole_dns()
    elif mode == "synflood":
        synflood(a[1], int(a[2]), int(a[3]), a[4])
    elif mode == "idle-clients":
        sys.exit(idle_clients(a[1], int(a[2]), int(a[3]), a[4], a[5], int(a[6])))
    elif mode == "published-clients":
        published_clients(int(a[1]), int(a[2]), int(a[3]), a[4])
    elif mode == "echo-server":
        echo_server(int(a[1]))
    elif mode == "vanish-client":
        vanish_client(a[1], int(a[2]))
    elif mode == "udp-refused":
        udp_refused(a[1], int(a[2]))
    elif mode == "connect-wait":
        connect_wait(a[1], int(a[2]))
    elif mode == "udp-many":
        udp_many(a[1], int(a[2]), int(a[3]))
    elif mode == "halfclose-server":
        halfclose_server(int(a[1]))
    elif mode == "stream-guest-server":
        stream_guest_server(int(a[1]))
    else:
        sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
