#!/usr/bin/env python3
"""The steps of gvisor-tap-vsock's guest-side forwarder (`gvforwarder`, its cmd/vm), which
joins a VM to gvproxy's network through gvproxy's `-listen` endpoint; that Go program
cannot be built here (no Go module proxy), so crates/usernet/tests/dropin_gvproxy.rs runs
its steps with this helper:

    gvforwarder.py URL TAP MAC [NETNS]

URL is what gvforwarder's -url takes: vsock://CID:PORT/connect, or unix:///PATH (for which
gvforwarder always asks for /connect); tcp://HOST:PORT/connect is taken too, for gvproxy's
TCP endpoints. The helper connects, writes the request exactly as Go's
http.Request.Write writes gvforwarder's `POST /connect` (and reads no answer, as
gvforwarder reads none), creates the TAP device TAP with MAC and brings it up, then carries
frames between the two (each preceded by its length, 2 bytes little-endian) until either
ends. Prints "bridging" when frames flow; the caller then runs DHCP on TAP, as gvforwarder
runs udhcpc. With NETNS (a path such as /run/netns/NAME), the connection is made where
the helper runs and the TAP in that network namespace, as a VM's forwarder reaches its
host from inside the VM.
"""

import ctypes

import fcntl
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def dial(url):
    u = urlparse(url)
    deadline = time.time() + 10
    while True:
        try:
            if u.scheme == "unix":
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(u.path)
                return s, "/connect"
            if u.scheme == "tcp":
                s = socket.create_connection((u.hostname, u.port))
                return s, u.path
            if u.scheme == "vsock":
                s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
                s.connect((int(u.hostname), u.port))
                return s, u.path
            sys.exit("unexpected scheme %s" % u.scheme)
        except (FileNotFoundError, ConnectionRefusedError):
            if time.time() > deadline:
                raise
            time.sleep(0.05)


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


CLONE_NEWNET = 0x40000000


def enter_netns(path):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, "setns %s: %s" % (path, os.strerror(e)))
    os.close(fd)


def main(url, tap, mac, netns=None):
    s, path = dial(url)
    if netns:
        enter_netns(netns)
    if path:
        # Go's http.NewRequest("POST", path, nil).Write(conn): no host in the URL, so an
        # empty Host header; a POST without a body says Content-Length: 0.
        s.sendall(
            ("POST %s HTTP/1.1\r\nHost: \r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 0\r\n\r\n" % path).encode()
        )
    subprocess.run(["ip", "tuntap", "add", "name", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", tap, "address", mac, "up"], check=True)
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    print("bridging", flush=True)

    def tap_to_conn():
        try:
            while True:
                frame = os.read(fd, 65536)
                if not frame:
                    break
                s.sendall(struct.pack("<H", len(frame)) + frame)
        except OSError:
            pass
        finally:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=tap_to_conn, daemon=True).start()
    try:
        while True:
            (n,) = struct.unpack("<H", recv_exact(s, 2))
            os.write(fd, recv_exact(s, n))
    except (EOFError, OSError) as e:
        print("bridge ended: %s" % e, flush=True)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit("usage: gvforwarder.py URL TAP MAC [NETNS]")
    main(*sys.argv[1:])
