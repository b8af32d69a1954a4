#!/usr/bin/env python3
"""A client of vpnkit's ethernet ("vmnet") protocol that does what rootlesskit 1.1.0's
vpnkit network driver does with it (Debian's rootlesskit is built without that driver, so
crates/usernet/tests/dropin_vpnkit.rs runs its steps with this helper):

    vmnet_client.py probe SOCKET UUID
        rootlesskit's parent: connect (retrying while the socket is not there yet, for up
        to 10 s), exchange hellos, ask for an ethernet interface with UUID, read its MTU and
        MAC, then find its address with a DHCP discover sent every second until an offer
        comes, read as the Go client reads it (the message type at offset 240 of the DHCP
        payload). Prints "mtu N", "mac M", "ip A", then keeps the connection open, idle,
        until stdin closes (rootlesskit's parent holds it for its whole life).

    vmnet_client.py bridge SOCKET UUID TAP
        rootlesskit's child (run inside the guest's namespace): the same handshake and DHCP
        discover with the same UUID, then frames between the TAP device TAP (created here
        with the interface's MAC; the caller configures addresses) and the connection,
        until either ends. Prints "bridging" when frames flow.

    vmnet_client.py raw SOCKET HEX...
        Sends the given bytes (hex strings, written one after another, a pause between
        them), reads what comes back, and prints "closed N bytes" when the server closes
        the connection, or "open N bytes" when it is still open 3 s later (then closes it
        itself): garbled handshakes and abandoned frames for the bad-input tests.
"""

import errno
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time

HELLO = b"VMN3T" + struct.pack("<I", 22) + b"0123456789012345678901234567890123456789"


def recv_exact(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


def connect(path, wait=10.0):
    deadline = time.time() + wait
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.time() > deadline:
                raise
            time.sleep(0.01)


def handshake(s, uuid):
    s.sendall(HELLO)
    theirs = recv_exact(s, 49)
    if theirs[:5] != b"VMN3T":
        raise ValueError("bad hello from the server: %r" % theirs[:5])
    s.sendall(b"\x01" + uuid.encode() + struct.pack("<I", 0))
    kind = recv_exact(s, 1)[0]
    if kind != 1:
        n = recv_exact(s, 1)[0]
        raise ValueError("refused: %s" % recv_exact(s, n).decode(errors="replace"))
    mtu, max_packet = struct.unpack("<HH", recv_exact(s, 4))
    mac = recv_exact(s, 6)
    recv_exact(s, 1 + 256 - 6 - 2 - 2)
    return mtu, max_packet, mac


def write_frame(s, frame):
    s.sendall(struct.pack("<H", len(frame)) + frame)


def read_frame(s):
    (n,) = struct.unpack("<H", recv_exact(s, 2))
    return recv_exact(s, n)


def dhcp_discover(mac):
    """The frame vmnet.go's dhcp() sends: a broadcast DISCOVER, no checksums (offload)."""
    bootp = bytes([1, 1, 6, 0, 1, 0, 0, 0, 0, 0, 0x80, 0]) + bytes(16) + mac + bytes(202)
    bootp += bytes([0x63, 0x82, 0x53, 0x63, 0x35, 0x01, 0x01, 0xFF])
    udp = struct.pack("!HHHH", 68, 67, 8 + len(bootp), 0) + bootp
    ip = bytes([0x45, 0, *struct.pack("!H", 20 + len(udp)), 0x7F, 0x61, 0, 0, 0x40, 0x11, 0, 0])
    ip += bytes(4) + bytes([255, 255, 255, 255])
    return b"\xff" * 6 + mac + b"\x08\x00" + ip + udp


def dhcp(s, mac):
    """Sends DISCOVERs each second until an OFFER comes; returns the offered address."""
    done = threading.Event()

    def send():
        while not done.is_set():
            write_frame(s, dhcp_discover(mac))
            done.wait(1.0)

    threading.Thread(target=send, daemon=True).start()
    try:
        while True:
            f = read_frame(s)
            if len(f) < 14 + 20 or f[12:14] != b"\x08\x00":
                continue
            ihl = (f[14] & 0xF) * 4
            ip = f[14:]
            udp = ip[ihl:]
            if len(udp) < 8:
                continue
            sport, dport = struct.unpack("!HH", udp[:4])
            data = udp[8:]
            if sport != 67 or dport != 68 or len(data) < 243:
                continue
            if data[240:243] != bytes([53, 1, 2]):
                continue
            return socket.inet_ntoa(data[16:20])
    finally:
        done.set()


def fmt_mac(mac):
    return ":".join("%02x" % b for b in mac)


def probe(path, uuid):
    s = connect(path)
    mtu, _, mac = handshake(s, uuid)
    ip = dhcp(s, mac)
    print("mtu %d" % mtu)
    print("mac %s" % fmt_mac(mac))
    print("ip %s" % ip, flush=True)
    sys.stdin.read()
    s.close()


TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000


def open_tap(tap):
    """The TAP device `tap` (created by the caller), opened for frames."""
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def carry(s, fd):
    """Frames between the TAP `fd` and the connection `s`, each preceded by its length (2
    bytes little-endian), until either ends. Also used by gvforwarder.py."""

    def tap_to_vif():
        try:
            while True:
                frame = os.read(fd, 65536)
                if not frame:
                    break
                write_frame(s, frame)
        except OSError:
            pass
        finally:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    threading.Thread(target=tap_to_vif, daemon=True).start()
    try:
        while True:
            frame = read_frame(s)
            try:
                os.write(fd, frame)
            except OSError as e:
                # EIO: the TAP is not up yet (the test configures it after "bridging");
                # the frame is lost, as the kernel loses frames for a down interface.
                if e.errno != errno.EIO:
                    raise
    except (EOFError, OSError) as e:
        print("bridge ended: %s" % e, flush=True)


def bridge(path, uuid, tap):
    s = connect(path)
    mtu, _, mac = handshake(s, uuid)
    subprocess.run(["ip", "tuntap", "add", "name", tap, "mode", "tap"], check=True)
    subprocess.run(["ip", "link", "set", tap, "address", fmt_mac(mac)], check=True)
    fd = open_tap(tap)
    dhcp(s, mac)
    print("bridging", flush=True)
    carry(s, fd)


def raw(path, parts):
    s = connect(path)
    s.settimeout(3)
    for p in parts:
        try:
            s.sendall(bytes.fromhex(p))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.2)
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except (socket.timeout, TimeoutError):
        print("open %d bytes" % len(got), flush=True)
        s.close()
        return
    except ConnectionResetError:
        pass
    print("closed %d bytes" % len(got), flush=True)


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "probe":
        probe(sys.argv[2], sys.argv[3])
    elif cmd == "bridge":
        bridge(sys.argv[2], sys.argv[3], sys.argv[4])
    elif cmd == "raw":
        raw(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("unknown command %s" % cmd)
