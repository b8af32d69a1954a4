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
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

# The frames are carried as vmnet_client.py carries vpnkit's (the same framing).
from vmnet_client import carry, open_tap


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
    fd = open_tap(tap)
    print("bridging", flush=True)
    carry(s, fd)


if __name__ == "__main__":
    if len(sys.argv) not in (4, 5):
        sys.exit("usage: gvforwarder.py URL TAP MAC [NETNS]")
    main(*sys.argv[1:])
