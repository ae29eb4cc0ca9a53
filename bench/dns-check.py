#!/usr/bin/env python3
"""Checks the DNS answers of one server for the dns.sh benchmark.

    dns-check.py SYSTEM HOST PORT [--quick N] [--rounds N]

Talks raw DNS (no third-party module) and prints one TSV line per check:

    SYSTEM  CHECK  ok|FAIL|info  DETAIL

Expected data (the same in Meshwork's catalog and BIND's zone): service
`web` with 10 instances hostN (N = 1..10) at 198.18.1.N, port 8000+N.

  web.service.mesh. A    the 10 addresses, TTL 0, AA, no TC (with EDNS)
  web.service.mesh. SRV  10 x "1 1 800N hostN.node.dc1.mesh.", and an A
                         record for every target in the additional section

Without --quick it also checks: UDP without EDNS (reports TC and what was
kept), TCP, NXDOMAIN, NODATA (AAAA) and whether A answers are shuffled.
With --quick N it sends N A + N SRV queries over UDP with EDNS and checks
each answer (used in the middle of a load run). Exit status is 1 if any
check failed, else 0.
"""

import os
import random
import socket
import struct
import sys
import time

N_INSTANCES = 10
NAME = "web.service.mesh."
EXPECTED_A = {f"198.18.1.{i}" for i in range(1, N_INSTANCES + 1)}
EXPECTED_SRV = {(1, 1, 8000 + i, f"host{i}.node.dc1.mesh.") for i in range(1, N_INSTANCES + 1)}
EXPECTED_TARGET_A = {f"host{i}.node.dc1.mesh.": f"198.18.1.{i}" for i in range(1, N_INSTANCES + 1)}

T_A, T_NS, T_SOA, T_AAAA, T_SRV, T_OPT = 1, 2, 6, 28, 33, 41
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def encode_name(name):
    out = b""
    for label in name.rstrip(".").split("."):
        out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def build_query(name, qtype, edns, qid=None):
    qid = random.randrange(65536) if qid is None else qid
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    body = encode_name(name) + struct.pack(">HH", qtype, 1)
    if edns:
        # root name, OPT, udp payload 4096, ext-rcode/version/flags 0, rdlen 0
        body += b"\0" + struct.pack(">HHIH", T_OPT, 4096, 0, 0)
    return qid, header + body


def read_name(msg, off):
    labels, jumped, end, hops = [], False, off, 0
    while True:
        if off >= len(msg):
            raise ValueError("name runs past the end of the message")
        length = msg[off]
        if length & 0xC0 == 0xC0:
            if off + 1 >= len(msg):
                raise ValueError("truncated compression pointer")
            ptr = ((length & 0x3F) << 8) | msg[off + 1]
            if not jumped:
                end = off + 2
            jumped, off, hops = True, ptr, hops + 1
            if hops > 64:
                raise ValueError("compression loop")
            continue
        if length == 0:
            if not jumped:
                end = off + 1
            break
        labels.append(msg[off + 1 : off + 1 + length].decode("ascii", "replace"))
        off += 1 + length
    return (".".join(labels) + ".").lower(), end


def parse(msg):
    if len(msg) < 12:
        raise ValueError(f"short message ({len(msg)} bytes)")
    qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        _, off = read_name(msg, off)
        off += 4
    sections = []
    for count in (an, ns, ar):
        records = []
        for _ in range(count):
            name, off = read_name(msg, off)
            rtype, rclass, ttl, rdlen = struct.unpack(">HHIH", msg[off : off + 10])
            off += 10
            rdata_off, rdata = off, msg[off : off + rdlen]
            if len(rdata) != rdlen:
                raise ValueError("record runs past the end of the message")
            off += rdlen
            if rtype == T_A and rdlen == 4:
                value = socket.inet_ntoa(rdata)
            elif rtype == T_SRV:
                prio, weight, port = struct.unpack(">HHH", rdata[:6])
                target, _ = read_name(msg, rdata_off + 6)
                value = (prio, weight, port, target)
            else:
                value = rdata
            records.append((name, rtype, rclass, ttl, value))
        sections.append(records)
    if off != len(msg):
        raise ValueError(f"{len(msg) - off} trailing bytes")
    return {
        "id": qid,
        "qr": bool(flags & 0x8000),
        "aa": bool(flags & 0x0400),
        "tc": bool(flags & 0x0200),
        "rcode": flags & 0xF,
        "answer": sections[0],
        "authority": sections[1],
        "additional": sections[2],
        "size": len(msg),
    }


def ask_udp(host, port, name, qtype, edns, timeout=2.0):
    qid, packet = build_query(name, qtype, edns)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        t0 = time.perf_counter()
        s.send(packet)
        deadline = t0 + timeout
        while True:
            s.settimeout(max(0.001, deadline - time.perf_counter()))
            data = s.recv(65535)
            r = parse(data)
            if r["id"] == qid:
                r["latency"] = time.perf_counter() - t0
                return r


def ask_tcp(host, port, name, qtype, timeout=2.0):
    qid, packet = build_query(name, qtype, False)
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(struct.pack(">H", len(packet)) + packet)

        def read_exact(n):
            buf = b""
            while len(buf) < n:
                chunk = s.recv(n - len(buf))
                if not chunk:
                    raise ValueError("connection closed")
                buf += chunk
            return buf

        (length,) = struct.unpack(">H", read_exact(2))
        r = parse(read_exact(length))
        if r["id"] != qid:
            raise ValueError("wrong id over TCP")
        return r


def check_a(r, allow_tc=False):
    """Returns a list of problems with an A answer for web.service.mesh."""
    p = []
    if not r["qr"]:
        p.append("QR not set")
    if r["rcode"] != 0:
        p.append(f"rcode {RCODES.get(r['rcode'], r['rcode'])}")
    if not r["aa"]:
        p.append("AA not set")
    if r["tc"] and not allow_tc:
        p.append("TC set")
    got = [rec for rec in r["answer"] if rec[1] == T_A]
    other = [rec for rec in r["answer"] if rec[1] != T_A]
    if other:
        p.append(f"{len(other)} non-A records in the answer")
    addrs = [rec[4] for rec in got]
    if set(addrs) != EXPECTED_A or len(addrs) != len(EXPECTED_A):
        p.append(f"answer addresses {sorted(addrs)}")
    if any(rec[0] != NAME for rec in got):
        p.append("answer owner name is not " + NAME)
    if any(rec[3] != 0 for rec in got):
        p.append(f"TTLs {sorted({rec[3] for rec in got})} (expected 0)")
    return p


def check_srv(r, want_additional=True, allow_tc=False):
    p = []
    if not r["qr"]:
        p.append("QR not set")
    if r["rcode"] != 0:
        p.append(f"rcode {RCODES.get(r['rcode'], r['rcode'])}")
    if not r["aa"]:
        p.append("AA not set")
    if r["tc"] and not allow_tc:
        p.append("TC set")
    srv = [rec for rec in r["answer"] if rec[1] == T_SRV]
    if len(srv) != len(r["answer"]):
        p.append("non-SRV records in the answer")
    values = [rec[4] for rec in srv]
    if set(values) != EXPECTED_SRV or len(values) != len(EXPECTED_SRV):
        p.append(f"SRV answers {sorted(values)}")
    if any(rec[0] != NAME for rec in srv):
        p.append("answer owner name is not " + NAME)
    if any(rec[3] != 0 for rec in srv):
        p.append(f"SRV TTLs {sorted({rec[3] for rec in srv})} (expected 0)")
    if want_additional:
        extra = {rec[0]: rec[4] for rec in r["additional"] if rec[1] == T_A}
        missing = [t for t in EXPECTED_TARGET_A if t not in extra]
        wrong = [t for t, ip in EXPECTED_TARGET_A.items() if t in extra and extra[t] != ip]
        if missing:
            p.append(f"additional A missing for {len(missing)} targets")
        if wrong:
            p.append(f"additional A wrong for {wrong}")
    return p


def emit(system, check, status, detail):
    print(f"{system}\t{check}\t{status}\t{detail}", flush=True)


def quick(system, host, port, n):
    bad, lat = 0, []
    first_problem = ""
    for i in range(n):
        for qtype, fn in ((T_A, check_a), (T_SRV, check_srv)):
            try:
                r = ask_udp(host, port, NAME, qtype, True)
                lat.append(r["latency"])
                problems = fn(r)
            except (OSError, ValueError) as e:
                problems = [f"{type(e).__name__}: {e}"]
            if problems:
                bad += 1
                first_problem = first_problem or "; ".join(problems)
    lat.sort()
    med = lat[len(lat) // 2] * 1000 if lat else float("nan")
    status = "ok" if bad == 0 else "FAIL"
    emit(system, "under-load", status,
         f"{2 * n - bad}/{2 * n} answers correct (A+SRV, UDP+EDNS), median {med:.2f} ms"
         + (f"; first problem: {first_problem}" if first_problem else ""))
    return bad == 0


def full(system, host, port, rounds):
    ok = True

    def run(check, fn):
        nonlocal ok
        try:
            status, detail = fn()
        except (OSError, ValueError) as e:
            status, detail = "FAIL", f"{type(e).__name__}: {e}"
        if status == "FAIL":
            ok = False
        emit(system, check, status, detail)

    def a_edns():
        bad = [p for _ in range(rounds) for p in check_a(ask_udp(host, port, NAME, T_A, True))]
        r = ask_udp(host, port, NAME, T_A, True)
        return ("FAIL", "; ".join(sorted(set(bad)))) if bad else (
            "ok", f"{rounds} x: 10 A, TTL 0, AA, {r['size']} bytes")

    def srv_edns():
        bad = [p for _ in range(rounds) for p in check_srv(ask_udp(host, port, NAME, T_SRV, True))]
        r = ask_udp(host, port, NAME, T_SRV, True)
        return ("FAIL", "; ".join(sorted(set(bad)))) if bad else (
            "ok", f"{rounds} x: 10 SRV + {len(r['additional'])} additional "
                  f"({sum(1 for x in r['additional'] if x[1] == T_A)} A), "
                  f"{len(r['authority'])} authority, {r['size']} bytes")

    def a_noedns():
        r = ask_udp(host, port, NAME, T_A, False)
        bad = check_a(r)
        return ("FAIL", "; ".join(bad)) if bad else ("ok", f"10 A, {r['size']} bytes")

    def srv_noedns():
        # Not pass/fail: 10 SRV + 10 glue A do not fit in 512 bytes. Report
        # what the server did (set TC or drop additional records quietly).
        r = ask_udp(host, port, NAME, T_SRV, False)
        bad = check_srv(r, want_additional=False, allow_tc=True)
        n_add = sum(1 for x in r["additional"] if x[1] == T_A)
        detail = (f"{r['size']} bytes, TC={int(r['tc'])}, {len(r['answer'])} SRV, "
                  f"{n_add} additional A")
        if bad and not r["tc"]:
            return "FAIL", detail + "; " + "; ".join(bad)
        return "info", detail

    def srv_tcp():
        r = ask_tcp(host, port, NAME, T_SRV)
        bad = check_srv(r)
        return ("FAIL", "; ".join(bad)) if bad else (
            "ok", f"10 SRV + {len(r['additional'])} additional, {r['size']} bytes")

    def nxdomain():
        r = ask_udp(host, port, "nothere.service.mesh.", T_A, True)
        soa = any(x[1] == T_SOA for x in r["authority"])
        if r["rcode"] != 3:
            return "FAIL", f"rcode {RCODES.get(r['rcode'], r['rcode'])} (expected NXDOMAIN)"
        return "ok", f"NXDOMAIN, AA={int(r['aa'])}, SOA in authority: {soa}"

    def nodata():
        r = ask_udp(host, port, NAME, T_AAAA, True)
        soa = any(x[1] == T_SOA for x in r["authority"])
        if r["rcode"] != 0 or r["answer"]:
            return "FAIL", f"rcode {RCODES.get(r['rcode'], r['rcode'])}, {len(r['answer'])} answers (expected NOERROR, none)"
        return "ok", f"NOERROR/NODATA, SOA in authority: {soa}"

    def shuffle():
        firsts, orders = {}, set()
        for _ in range(rounds):
            r = ask_udp(host, port, NAME, T_A, True)
            addrs = tuple(x[4] for x in r["answer"])
            firsts[addrs[0]] = firsts.get(addrs[0], 0) + 1
            orders.add(addrs)
        status = "ok" if len(firsts) > 1 else "info"
        return status, (f"{rounds} A answers: {len(orders)} distinct orders, "
                        f"{len(firsts)} distinct first addresses")

    run("A udp+edns", a_edns)
    run("SRV udp+edns", srv_edns)
    run("A udp no-edns", a_noedns)
    run("SRV udp no-edns", srv_noedns)
    run("SRV tcp", srv_tcp)
    run("NXDOMAIN", nxdomain)
    run("NODATA AAAA", nodata)
    run("A order", shuffle)
    return ok


def main():
    args = sys.argv[1:]
    if len(args) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    system, host, port = args[0], args[1], int(args[2])
    opts = dict(zip(args[3::2], args[4::2]))
    if "--quick" in opts:
        return 0 if quick(system, host, port, int(opts["--quick"])) else 1
    return 0 if full(system, host, port, int(opts.get("--rounds", 100))) else 1


if __name__ == "__main__":
    sys.exit(main())
