#!/usr/bin/env python3
"""A guest that writes its own frames (run inside `usernet run`, as root of its namespace).

Its kernel never sends a packet to 127.0.0.0/8 out of eth0, but a VM or a process with
CAP_NET_RAW can: this helper builds such frames by hand on an AF_PACKET socket, sends them
to the gateway's MAC, and reports what comes back, one line per probe:

    rawguest.py syn IP PORT [COUNT]   a TCP SYN (COUNT of them, from consecutive source
                                      ports, one after the other's answer): SYNACK, RST,
                                      ICMP <type> <code> or NONE
    rawguest.py udp IP PORT TEXT      a UDP datagram: UDP <payload>, ICMP <type> <code>
                                      or NONE
    rawguest.py frags IP PORT COUNT   the first fragment of COUNT datagrams that never
                                      complete, then a 3,600-byte datagram in three
                                      fragments, the last first: ECHO if it comes back
                                      whole, else what came
    rawguest.py overlap IP PORT       a datagram in two fragments whose second overlaps
                                      the first by 8 bytes: what comes back (NONE, when
                                      the datagram is discarded)

Used by crates/usernet/tests/run_hostile.rs.
"""

import os
import random
import select
import socket
import struct
import sys
import time

IFACE = "eth0"
ETH_P_IP = 0x0800
WAIT = 2.0


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def own_addresses():
    mac = open("/sys/class/net/%s/address" % IFACE).read().strip()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("192.0.2.1", 9))  # only picks the source address: nothing is sent
    ip = s.getsockname()[0]
    s.close()
    return bytes.fromhex(mac.replace(":", "")), ip


def gateway_mac():
    """The default gateway's MAC, from the kernel's neighbour table (resolved first by a
    datagram to the gateway's DNS port, which the gateway answers or drops harmlessly)."""
    gw = None
    for line in open("/proc/net/route").read().splitlines()[1:]:
        f = line.split()
        if f[0] == IFACE and f[1] == "00000000":
            gw = socket.inet_ntoa(struct.pack("<I", int(f[2], 16)))
    if gw is None:
        sys.exit("no default route on %s" % IFACE)
    deadline = time.time() + 5
    while time.time() < deadline:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"\0" * 12, (gw, 53))
        s.close()
        time.sleep(0.1)
        for line in open("/proc/net/arp").read().splitlines()[1:]:
            f = line.split()
            if f[0] == gw and f[3] != "00:00:00:00:00:00":
                return bytes.fromhex(f[3].replace(":", ""))
    sys.exit("the gateway %s did not answer ARP" % gw)


def ipv4(src, dst, proto, payload):
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), random.randrange(65536), 0x4000, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    h = h[:10] + struct.pack("!H", checksum(h)) + h[12:]
    return h + payload


def ipv4_fragment(src, dst, proto, ident, offset, more, data):
    """One fragment of a datagram: `data` at byte `offset` of its payload."""
    flags = (0x2000 if more else 0) | (offset // 8)
    h = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(data), ident, flags, 64, proto, 0,
                    socket.inet_aton(src), socket.inet_aton(dst))
    h = h[:10] + struct.pack("!H", checksum(h)) + h[12:]
    return h + data


def l4_checksum(src, dst, proto, seg):
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, len(seg))
    return checksum(pseudo + seg)


def tcp_syn(src, dst, sport, dport, seq):
    # MSS option 1460.
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 6 << 4, 0x02, 65535, 0, 0) + b"\x02\x04\x05\xb4"
    c = l4_checksum(src, dst, 6, seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(src, dst, sport, dport, payload):
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    c = l4_checksum(src, dst, 17, seg) or 0xFFFF
    return seg[:6] + struct.pack("!H", c) + seg[8:]


def answer(sock, src_ip, dst, dport, proto, sport):
    """The first reply to our probe: a TCP/UDP packet from dst:dport to our port, or an
    ICMP error quoting our packet."""
    deadline = time.time() + WAIT
    while True:
        left = deadline - time.time()
        if left <= 0:
            return "NONE"
        r, _, _ = select.select([sock], [], [], left)
        if not r:
            return "NONE"
        frame = sock.recv(65600)
        if len(frame) < 34 or struct.unpack("!H", frame[12:14])[0] != ETH_P_IP:
            continue
        ip = frame[14:]
        ihl = (ip[0] & 15) * 4
        p = ip[9]
        s, d = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
        body = ip[ihl:]
        if d != src_ip:
            continue
        if p == 1 and len(body) >= 8 + 20 + 4:
            quoted = body[8:]
            qihl = (quoted[0] & 15) * 4
            qdst = socket.inet_ntoa(quoted[16:20])
            qsport, qdport = struct.unpack("!HH", quoted[qihl:qihl + 4])
            if quoted[9] == proto and qdst == dst and qsport == sport and qdport == dport:
                return "ICMP %d %d" % (body[0], body[1])
            continue
        if p != proto or s != dst or len(body) < 8:
            continue
        bsport, bdport = struct.unpack("!HH", body[:4])
        if bsport != dport or bdport != sport:
            continue
        if p == 6:
            flags = body[13]
            if flags & 0x04:
                return "RST"
            if flags & 0x12 == 0x12:
                return "SYNACK"
            continue
        return "UDP " + body[8:].decode(errors="replace").strip()


def main():
    mode, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])
    my_mac, my_ip = own_addresses()
    gw_mac = gateway_mac()
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_IP))
    sock.bind((IFACE, ETH_P_IP))
    eth = gw_mac + my_mac + struct.pack("!H", ETH_P_IP)
    sport = random.randrange(20000, 60000)
    if mode == "syn":
        count = int(sys.argv[4]) if len(sys.argv) > 4 else 1
        for i in range(count):
            seq = random.randrange(1 << 32)
            sock.send(eth + ipv4(my_ip, dst, 6, tcp_syn(my_ip, dst, sport + i, dport, seq)))
            print(answer(sock, my_ip, dst, dport, 6, sport + i), flush=True)
    elif mode == "udp":
        payload = sys.argv[4].encode()
        sock.send(eth + ipv4(my_ip, dst, 17, udp(my_ip, dst, sport, dport, payload)))
        print(answer(sock, my_ip, dst, dport, 17, sport), flush=True)
    elif mode == "frags":
        for i in range(int(sys.argv[4])):
            junk = udp(my_ip, dst, sport, dport, b"x" * 3000)
            sock.send(eth + ipv4_fragment(my_ip, dst, 17, 1000 + i, 0, True, junk[:1480]))
        payload = b"after the flood " * 225
        dgram = udp(my_ip, dst, sport, dport, payload)
        for off in (2960, 1480, 0):
            part = dgram[off:off + 1480]
            sock.send(eth + ipv4_fragment(my_ip, dst, 17, 7, off, off + 1480 < len(dgram), part))
        r = answer(sock, my_ip, dst, dport, 17, sport)
        print("ECHO" if r == "UDP " + payload.decode().strip() else r[:60], flush=True)
    elif mode == "overlap":
        dgram = udp(my_ip, dst, sport, dport, b"overlapping" * 200)
        sock.send(eth + ipv4_fragment(my_ip, dst, 17, 8, 0, True, dgram[:1480]))
        sock.send(eth + ipv4_fragment(my_ip, dst, 17, 8, 1472, False, dgram[1472:]))
        print(answer(sock, my_ip, dst, dport, 17, sport), flush=True)
    else:
        sys.exit("unknown mode %s" % mode)


if __name__ == "__main__":
    main()
