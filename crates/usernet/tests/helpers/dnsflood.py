#!/usr/bin/env python3
"""DNS queries to the gateway from many fresh source ports (run inside `usernet run`).

    dnsflood.py PID GATEWAY NAME COUNT

Sends COUNT queries for NAME (type A), each from a new UDP socket (so a new source port,
so a new UDP flow in usernet), without waiting for the answers, and counts the open
descriptors of usernet (process PID: the shell that runs this passes its $PPID) as it goes.
Then it waits and counts again, and makes one well-behaved lookup (waits for its answer).
Lines:

    PROC name             the name of process PID (/proc/PID/comm)
    FDS before N
    FDS peak N            the most seen while the queries went out
    FDS after N           5 s after the last query
    ANSWER a.b.c.d        the well-behaved lookup's first A record (or ANSWER none)

Used by crates/usernet/tests/run_hostile.rs.
"""

import os
import random
import socket
import struct
import sys
import time


def query(name, qid):
    q = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.strip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\0" + struct.pack("!HH", 1, 1)


def first_a(msg, qid):
    if len(msg) < 12:
        return None
    rid, flags, qd, an = struct.unpack("!HHHH", msg[:8])
    if rid != qid or not flags & 0x8000:
        return None
    i = 12
    for _ in range(qd):
        while msg[i] != 0:
            if msg[i] & 0xC0 == 0xC0:
                i += 1
                break
            i += msg[i] + 1
        i += 1 + 4
    for _ in range(an):
        if msg[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while msg[i] != 0:
                i += msg[i] + 1
            i += 1
        rtype, _, _, rdlen = struct.unpack("!HHIH", msg[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            return socket.inet_ntoa(msg[i:i + 4])
        i += rdlen
    return None


def main():
    pid, gateway, name, count = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    fd_dir = "/proc/%d/fd" % pid
    print("PROC %s" % open("/proc/%d/comm" % pid).read().strip(), flush=True)

    def fds():
        return len(os.listdir(fd_dir))

    print("FDS before %d" % fds(), flush=True)
    peak = 0
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(query(name, random.randrange(65536)), (gateway, 53))
        s.close()
        if i % 100 == 99:
            peak = max(peak, fds())
            # A short breath now and then, so that usernet's loop and its DNS service run
            # while the queries pile up, as they would with a real guest.
            time.sleep(0.001)
    peak = max(peak, fds())
    print("FDS peak %d" % peak, flush=True)
    time.sleep(5)
    print("FDS after %d" % fds(), flush=True)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    answer = None
    for _ in range(3):
        qid = random.randrange(65536)
        s.sendto(query(name, qid), (gateway, 53))
        try:
            answer = first_a(s.recv(4096), qid)
        except socket.timeout:
            continue
        if answer:
            break
    print("ANSWER %s" % (answer or "none"), flush=True)


if __name__ == "__main__":
    main()
