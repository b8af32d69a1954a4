#!/usr/bin/env python3
"""Small servers for usernet's integration tests.

Every server binds port 0 (the kernel picks a free port, so parallel tests never
collide), prints "PORT <n>" on its first stdout line, and exits when its stdin
reaches end-of-file, i.e. when the test that started it goes away. None of them
does any name lookup (python's http.server calls getfqdn() when it binds, which
would query the machine's resolver: see docs/testing.md).

  testserver.py http DIR [--bind ADDR]  GET serves files from DIR; PUT answers the
                                        body's sha256 (hex) and its length
  testserver.py sink [--bind ADDR]      TCP: reads to EOF, then answers
                                        "<sha256 hex> <length>\n" and closes
                                        (exercises half-close: the client shuts
                                        down its sending side and keeps reading)
  testserver.py rst [--bind ADDR]       TCP: reads the first bytes, then resets
                                        the connection (SO_LINGER 0)
  testserver.py udp-echo [--bind ADDR]  UDP: sends every datagram back
  testserver.py udp-burst [--bind ADDR] UDP: answers "burst SIZE COUNT WINDOW" with COUNT
                                        datagrams (the last half as long) in one send cut by
                                        the kernel (UDP_SEGMENT), as a QUIC server sends;
                                        its client is check_bursts, which tests import
"""

import argparse
import hashlib
import http.server
import os
import socket
import socketserver
import struct
import sys
import threading


def burst_datagram(window, i, size, count):
    """Datagram i of a udp-burst window: a head that names it, then bytes of a pattern."""
    n = size // 2 if i == count - 1 else size
    head = b"%03d:%02d:" % (window, i)
    return head + bytes((window * 13 + i * 7 + k) % 251 for k in range(n - len(head)))


def check_bursts(host, port, size, count, windows):
    """The client of a udp-burst server: asks for WINDOWS bursts and prints how many of
    their datagrams came the same and in order (sha256), wrong, reordered or never."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.connect((host, port))
    s.settimeout(5)
    same = lost = wrong = reordered = 0
    for window in range(windows):
        want = [hashlib.sha256(burst_datagram(window, i, size, count)).hexdigest() for i in range(count)]
        s.send(b"burst %d %d %d" % (size, count, window))
        for i in range(count):
            try:
                got = s.recv(70000)
            except socket.timeout:
                lost += count - i
                break
            digest = hashlib.sha256(got).hexdigest()
            if digest == want[i]:
                same += 1
            elif digest in want:
                reordered += 1
            else:
                wrong += 1
    print(family.name, size, "same", same, "wrong", wrong, "lost", lost, "reordered", reordered, flush=True)


def exit_when_stdin_closes():
    def watch():
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except OSError:
            pass
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def announce(port):
    sys.stdout.write("PORT %d\n" % port)
    sys.stdout.flush()


class NoLookupHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer without the getfqdn() call of HTTPServer.server_bind."""

    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = port


class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass

    def do_PUT(self):
        length = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        body = ("%s %d\n" % (digest.hexdigest(), length - remaining)).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_PUT


class ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SinkHandler(socketserver.BaseRequestHandler):
    def handle(self):
        digest = hashlib.sha256()
        total = 0
        while True:
            chunk = self.request.recv(1 << 16)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        self.request.sendall(("%s %d\n" % (digest.hexdigest(), total)).encode())
        self.request.shutdown(socket.SHUT_WR)


class RstHandler(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.recv(1024)
        self.request.setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        self.request.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["http", "sink", "rst", "udp-echo", "udp-burst"])
    parser.add_argument("dir", nargs="?")
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    exit_when_stdin_closes()
    family = socket.AF_INET6 if ":" in args.bind else socket.AF_INET
    NoLookupHTTPServer.address_family = family
    ThreadingTCP.address_family = family

    if args.mode == "http":
        if not args.dir:
            parser.error("http needs DIR")
        handler = lambda *a, **kw: Handler(*a, directory=args.dir, **kw)
        server = NoLookupHTTPServer((args.bind, args.port), handler)
    elif args.mode == "sink":
        server = ThreadingTCP((args.bind, args.port), SinkHandler)
    elif args.mode == "rst":
        server = ThreadingTCP((args.bind, args.port), RstHandler)
    elif args.mode == "udp-burst":
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((args.bind, args.port))
        announce(sock.getsockname()[1])
        while True:
            data, peer = sock.recvfrom(65535)
            _, size, count, window = data.split()
            size, count, window = int(size), int(count), int(window)
            burst = b"".join(burst_datagram(window, i, size, count) for i in range(count))
            udp_segment = 103
            sock.sendmsg([burst], [(socket.SOL_UDP, udp_segment, struct.pack("H", size))], 0, peer)
    else:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((args.bind, args.port))
        announce(sock.getsockname()[1])
        while True:
            data, peer = sock.recvfrom(65535)
            sock.sendto(data, peer)

    announce(server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
