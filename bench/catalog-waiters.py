#!/usr/bin/env python3
"""Load client for bench/catalog.sh (stdlib only, raw sockets on asyncio).

Subcommands (each prints one JSON object on stdout; progress goes to stderr):

  fanout  Opens N connections spread round-robin over the servers, sends a
          blocking `GET /v1/health/service/web?index=N&wait=60s` on each,
          waits until the servers hold them, samples the servers' /proc, then
          registers ONE new instance of `web` through one server and records
          when every waiter's response arrives.

  scale   Registers S services x I instances through `PUT /v1/catalog/register`
          with a bounded number of keep-alive connections spread over the
          servers, then checks every server sees all of them.

Arrival times are the kernel's receive timestamps (SO_TIMESTAMPNS, CLOCK_REALTIME)
of the segment that completed each response, so the time this single-threaded
client needs to get round to 10,000 sockets is not counted as server latency.
The user-space time (when the client read the bytes) is reported next to it.
"""

import argparse
import asyncio
import json
import os
import random
import resource
import socket
import struct
import sys
import time

HOST = "127.0.0.1"
# socket.SO_TIMESTAMPNS is missing from CPython; 35 is SO_TIMESTAMPNS_OLD on
# x86_64/arm64 (struct timespec of two native longs), and SCM_ equals SO_.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
CMSG_SPACE = socket.CMSG_SPACE(16)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}]   {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ /proc
def proc_sample(pid):
    """CPU seconds, memory (KiB) and open fds of one process."""
    out = {"pid": pid, "alive": True}
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        out["cpu_s"] = (int(fields[11]) + int(fields[12])) / CLK_TCK
        out["threads"] = int(fields[17])
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(val.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        out["alive"] = False
    return out


def procs_sample(pids):
    return [proc_sample(p) for p in pids]


def sys_cpu():
    """(total jiffies, idle jiffies) of the whole machine."""
    with open("/proc/stat") as f:
        parts = f.readline().split()[1:]
    vals = [int(x) for x in parts]
    return sum(vals[:8]), vals[3] + vals[4]


def all_procs_cpu():
    """{pid: (comm, cpu seconds)} of every process (for 'who else was busy')."""
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        try:
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            out[int(name)] = (comm, (int(fields[11]) + int(fields[12])) / CLK_TCK)
        except (ValueError, IndexError):
            continue
    return out


def top_others(a, b, exclude, n=4, ours=()):
    """The processes (not the servers, not this client) that used the most CPU
    between two all_procs_cpu() samples, as 'comm:seconds' ('*' = one of ours)."""
    used = []
    for pid, (comm, cpu) in b.items():
        if pid in exclude or pid == os.getpid():
            continue
        d = cpu - a.get(pid, (comm, 0.0))[1]
        if d >= 0.05:
            used.append((d, comm + ("*" if pid in ours else "")))
    used.sort(reverse=True)
    return [f"{c}:{d:.2f}" for d, c in used[:n]]


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def cpu_window(sys_a, sys_b, servers_a, servers_b, client_a, client_b):
    """Who used the machine between two samples."""
    dt = sys_b[0] - sys_a[0]
    di = sys_b[1] - sys_a[1]
    busy_s = (dt - di) / CLK_TCK
    server_s = [b.get("cpu_s", 0) - a.get("cpu_s", 0) for a, b in zip(servers_a, servers_b)]
    client_s = client_b - client_a
    return {
        "wall_cpu_s": dt / CLK_TCK,  # jiffies of all cpus
        "busy_pct": round(100.0 * (dt - di) / dt, 1) if dt > 0 else 0.0,
        "server_cpu_s": [round(x, 3) for x in server_s],
        "server_cpu_total_s": round(sum(server_s), 3),
        "client_cpu_s": round(client_s, 3),
        "other_cpu_s": round(max(0.0, busy_s - sum(server_s) - client_s), 3),
    }


def du_bytes(path):
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def pct(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * len(sorted_vals) + 0.5)) - 1))
    return sorted_vals[k]


# ------------------------------------------------------------------ HTTP
def parse_response(buf):
    """(status, headers dict lower-case, body) if buf holds a whole response, else None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        status = int(head[0].split(" ", 2)[1])
    except (IndexError, ValueError):
        return (-1, {}, bytes(buf))
    headers = {}
    for line in head[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    body_start = end + 4
    if "content-length" in headers:
        n = int(headers["content-length"])
        if len(buf) - body_start < n:
            return None
        return status, headers, bytes(buf[body_start:body_start + n])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        pos, body = body_start, bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if len(buf) < eol + 2 + size + 2:
                return None
            body += buf[eol + 2:eol + 2 + size]
            pos = eol + 2 + size + 2
            if size == 0:
                return status, headers, bytes(body)
    return status, headers, bytes(buf[body_start:])


async def simple_request(port, method, path, body=b"", timeout=30.0):
    """One request on a fresh connection; returns (status, headers, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        req = (f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nConnection: close\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        writer.write(req)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    parsed = parse_response(bytearray(data))
    if parsed is None:
        raise RuntimeError(f"{method} {path} on :{port}: incomplete response ({len(data)} bytes)")
    return parsed


class Waiter:
    """One connection with one request outstanding, read with kernel timestamps."""

    __slots__ = ("sock", "server", "buf", "kts", "uts", "done", "status", "index",
                 "has_new", "error", "early", "fd", "segments")

    def __init__(self, sock, server):
        self.sock = sock
        self.server = server
        self.buf = bytearray()
        self.kts = None  # kernel receive time of the completing segment, ns
        self.uts = None  # user-space read time of it, ns
        self.done = False
        self.status = None
        self.index = None
        self.has_new = False
        self.error = None
        self.early = False
        self.fd = sock.fileno()
        self.segments = 0


class Client:
    def __init__(self, loop):
        self.loop = loop
        self.waiters = []
        self.done_count = 0
        self.target = None
        self.all_done = loop.create_future()
        self.armed = False  # set just before the write: responses before it are early
        self.new_id = b""
        self.bad_kts = 0

    def on_readable(self, w):
        try:
            data, anc, _flags, _addr = w.sock.recvmsg(65536, CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.finish(w, error=f"recv: {e.strerror}")
            return
        now = time.time_ns()
        if not data:
            self.finish(w, error="connection closed before a full response")
            return
        kts = None
        for level, typ, d in anc:
            if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(d) >= 16:
                sec, nsec = struct.unpack("qq", d[:16])
                kts = sec * 1_000_000_000 + nsec
        if kts is None or kts > now or now - kts > 120_000_000_000:
            self.bad_kts += 1
            kts = now
        w.buf += data
        w.kts, w.uts = kts, now
        w.segments += 1
        parsed = parse_response(w.buf)
        if parsed is None:
            return
        status, headers, body = parsed
        w.status = status
        try:
            w.index = int(headers.get("x-consul-index", ""))
        except ValueError:
            w.index = None
        w.has_new = bool(self.new_id) and self.new_id in body
        self.finish(w)

    def finish(self, w, error=None):
        if w.done:
            return
        w.done = True
        w.error = error
        w.early = not self.armed
        if w.kts is None:
            w.kts = w.uts = time.time_ns()
        try:
            self.loop.remove_reader(w.fd)
        except (ValueError, OSError):
            pass
        self.done_count += 1
        if self.target is not None and self.done_count >= self.target and not self.all_done.done():
            self.all_done.set_result(None)


async def open_waiter(client, sem, server_idx, port, request):
    async with sem:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        w = Waiter(s, server_idx)
        for attempt in range(5):
            try:
                await client.loop.sock_connect(s, (HOST, port))
                break
            except OSError as e:
                if attempt == 4:
                    w.error = f"connect: {e.strerror}"
                    w.done = True
                    client.waiters.append(w)
                    s.close()
                    return
                s.close()
                await asyncio.sleep(0.2 * (attempt + 1))
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                w = Waiter(s, server_idx)
        await client.loop.sock_sendall(s, request)
        client.waiters.append(w)
        client.loop.add_reader(w.fd, client.on_readable, w)


async def timed_request(loop, port, request, timeout=30.0):
    """One request on a connection made beforehand by the caller: returns
    (send ns, kernel ack ns, user ack ns, status, body)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    await loop.sock_connect(s, (HOST, port))
    return s


async def send_and_wait(loop, s, request, timeout=30.0):
    fut = loop.create_future()
    buf = bytearray()
    state = {}

    def readable():
        try:
            data, anc, _f, _a = s.recvmsg(65536, CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if not fut.done():
                fut.set_exception(e)
            return
        now = time.time_ns()
        if not data:
            if not fut.done():
                fut.set_exception(RuntimeError("write connection closed"))
            return
        kts = now
        for level, typ, d in anc:
            if level == socket.SOL_SOCKET and typ == SO_TIMESTAMPNS and len(d) >= 16:
                sec, nsec = struct.unpack("qq", d[:16])
                kts = sec * 1_000_000_000 + nsec
        buf.extend(data)
        state["kts"], state["uts"] = kts, now
        parsed = parse_response(buf)
        if parsed is not None and not fut.done():
            fut.set_result(parsed)

    loop.add_reader(s.fileno(), readable)
    t_send = time.time_ns()
    s.send(request)
    try:
        status, _headers, body = await asyncio.wait_for(fut, timeout)
    finally:
        loop.remove_reader(s.fileno())
    return t_send, state["kts"], state["uts"], status, body


def put_request(port, path, body):
    return (f"PUT {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: meshwork-bench\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


async def leader_index(ports):
    """Which server (0-based) is the leader, from /v1/status/leader."""
    _s, _h, body = await simple_request(ports[0], "GET", "/v1/status/leader")
    leader = json.loads(body)
    return leader


async def wait_servers_quiet(pids, max_s, ticks_per_half_s=2):
    """Wait (bounded) until the servers together use < ticks per 0.5 s."""
    t0 = time.monotonic()
    prev = sum(proc_sample(p).get("cpu_s", 0) for p in pids)
    while time.monotonic() - t0 < max_s:
        await asyncio.sleep(0.5)
        cur = sum(proc_sample(p).get("cpu_s", 0) for p in pids)
        if (cur - prev) * CLK_TCK < ticks_per_half_s:
            return round(time.monotonic() - t0, 2), True
        prev = cur
    return round(time.monotonic() - t0, 2), False


# ------------------------------------------------------------------ fanout
async def fanout(args):
    loop = asyncio.get_running_loop()
    ports = [int(p) for p in args.ports.split(",")]
    pids = [int(p) for p in args.pids.split(",")]
    raft_addrs = args.raft_addrs.split(",")
    n = args.waiters
    result = {"kind": "fanout", "label": args.label, "waiters": n, "wait": args.wait,
              "write_server": args.write_server + 1, "started_unix": time.time()}

    # 1. The index each server reports for the plain read.
    indexes, counts = [], []
    for port in ports:
        status, headers, body = await simple_request(port, "GET", "/v1/health/service/web")
        if status != 200:
            raise RuntimeError(f"GET /v1/health/service/web on :{port} -> {status} {body[:200]!r}")
        indexes.append(int(headers["x-consul-index"]))
        counts.append(len(json.loads(body)))
    result["start_index_per_server"] = indexes
    result["start_instances_per_server"] = counts
    start_index = max(indexes)
    if len(set(indexes)) != 1:
        log(f"servers disagree on the start index: {indexes}; using each server's own")
    leader = json.loads((await simple_request(ports[0], "GET", "/v1/status/leader"))[2])
    result["leader"] = raft_addrs.index(leader) + 1 if leader in raft_addrs else leader
    result["write_via_leader"] = result["leader"] == args.write_server + 1

    client = Client(loop)
    client.new_id = f'"{args.new_id}"'.encode()
    await asyncio.sleep(0.5)
    before = procs_sample(pids)
    sys0, cli0 = sys_cpu(), self_cpu()

    # 2. Open the waiters, round-robin over the servers.
    requests = [(f"GET /v1/health/service/web?index={indexes[i]}&wait={args.wait} HTTP/1.1\r\n"
                 f"Host: {HOST}:{ports[i]}\r\nUser-Agent: meshwork-bench\r\n\r\n").encode()
                for i in range(len(ports))]
    sem = asyncio.Semaphore(args.connect_concurrency)
    t_open = time.monotonic()
    tasks = [asyncio.ensure_future(open_waiter(client, sem, i % len(ports), ports[i % len(ports)],
                                               requests[i % len(ports)]))
             for i in range(n)]
    await asyncio.gather(*tasks)
    result["open_s"] = round(time.monotonic() - t_open, 2)
    result["connect_errors"] = sum(1 for w in client.waiters if w.error and w.error.startswith("connect"))
    log(f"{n} waiters sent in {result['open_s']} s; holding {args.hold} s")
    await asyncio.sleep(args.hold)
    quiet_s, quiet = await wait_servers_quiet(pids, args.quiet_max)
    result["servers_quiet_after_s"] = quiet_s
    result["servers_quiet"] = quiet
    held = procs_sample(pids)
    sys1, cli1 = sys_cpu(), self_cpu()
    result["setup_cpu"] = cpu_window(sys0, sys1, before, held, cli0, cli1)
    early = [w for w in client.waiters if w.done]
    result["early_responses"] = len(early)
    result["early_detail"] = summarize_errors(early)
    per_server = [sum(1 for w in client.waiters if w.server == i) for i in range(len(ports))]
    result["waiters_per_server"] = per_server
    result["mem_before"] = before
    result["mem_held"] = held

    # 3. Optional unrelated writes while the waiters are held (they must not answer).
    write_port = ports[args.write_server]
    if args.noise_writes:
        result["noise"] = await noise_writes(loop, pids, write_port, args.noise_writes,
                                             args.label, client)

    # 4. The one registration change.
    wsock = await timed_request(loop, write_port, b"")
    body = json.dumps({"Node": args.new_node, "Address": args.new_addr,
                       "Service": {"Service": "web", "ID": args.new_id, "Port": 8080}}).encode()
    req = put_request(write_port, "/v1/catalog/register", body)
    await asyncio.sleep(0.2)
    all2 = all_procs_cpu()
    pre = procs_sample(pids)
    sys2, cli2 = sys_cpu(), self_cpu()
    client.target = n
    if client.done_count >= n and not client.all_done.done():
        client.all_done.set_result(None)
    client.armed = True
    t_send, ack_k, ack_u, wstatus, wbody = await send_and_wait(loop, wsock, req)
    wsock.close()
    result["write_status"] = wstatus
    result["write_body"] = wbody[:100].decode("latin-1")
    result["write_rtt_ms"] = round((ack_k - t_send) / 1e6, 3)
    try:
        await asyncio.wait_for(asyncio.shield(client.all_done), args.fanout_timeout)
        result["timed_out"] = False
    except asyncio.TimeoutError:
        result["timed_out"] = True
    t_end = time.time_ns()
    post = procs_sample(pids)
    sys3, cli3 = sys_cpu(), self_cpu()
    result["fanout_cpu"] = cpu_window(sys2, sys3, pre, post, cli2, cli3)
    result["fanout_cpu"]["top_others"] = top_others(all2, all_procs_cpu(), set(pids))
    result["write_unix"] = t_send / 1e9
    result["fanout_window_s"] = round((t_end - t_send) / 1e9, 3)
    result["mem_after_fanout"] = post
    result["bad_kernel_timestamps"] = client.bad_kts

    # 5. Latencies of the responses that came after the write.
    answered = [w for w in client.waiters if w.done and not w.early and w.error is None]
    good = [w for w in answered if w.status == 200 and w.index is not None
            and w.index > indexes[w.server] and w.has_new]
    good_ids = {id(w) for w in good}
    bad = [w for w in answered if id(w) not in good_ids]
    errors = [w for w in client.waiters if w.error is not None and not w.early]
    missing = [w for w in client.waiters if not w.done]
    result["answered_ok"] = len(good)
    result["answered_bad"] = len(bad)
    result["bad_detail"] = [
        {"server": w.server + 1, "status": w.status, "index": w.index, "has_new": w.has_new}
        for w in bad[:5]]
    result["errors_after_write"] = summarize_errors(errors)
    result["not_answered"] = len(missing)
    result["new_indexes"] = sorted({w.index for w in good})

    def lat_stats(ws, attr, ref):
        vals = sorted((getattr(w, attr) - ref) / 1e6 for w in ws)
        if not vals:
            return None
        return {"n": len(vals), "min_ms": round(vals[0], 2), "p50_ms": round(pct(vals, 50), 2),
                "p90_ms": round(pct(vals, 90), 2), "p99_ms": round(pct(vals, 99), 2),
                "max_ms": round(vals[-1], 2),
                "within_1s": sum(1 for v in vals if v <= 1000.0)}

    result["lat_kernel_vs_ack"] = lat_stats(good, "kts", ack_k)
    result["lat_user_vs_ack"] = lat_stats(good, "uts", ack_k)
    result["lat_kernel_vs_send"] = lat_stats(good, "kts", t_send)
    result["lat_kernel_vs_ack_per_server"] = [
        lat_stats([w for w in good if w.server == i], "kts", ack_k) for i in range(len(ports))]
    # How long the client took to get round to the last socket.
    result["client_lag_max_ms"] = round(max(((w.uts - w.kts) / 1e6 for w in good), default=0), 2)
    # A time histogram (10 ms buckets from the ack) for the report.
    hist = {}
    for w in good:
        b = int((w.kts - ack_k) / 1e7)
        hist[b] = hist.get(b, 0) + 1
    result["hist_10ms"] = sorted(hist.items())

    # 6. Close everything and see whether the memory goes back.
    for w in client.waiters:
        try:
            loop.remove_reader(w.fd)
        except (ValueError, OSError):
            pass
        w.sock.close()
    await asyncio.sleep(args.after_close)
    result["mem_after_close"] = procs_sample(pids)
    result["finished_unix"] = time.time()
    return result


def summarize_errors(ws):
    out = {}
    for w in ws:
        key = w.error or f"status {w.status} index {w.index}"
        out[key] = out.get(key, 0) + 1
    return out


async def noise_writes(loop, pids, port, count, label, client):
    """`count` sequential KV writes through `port`, timing and server CPU."""
    s = await timed_request(loop, port, b"")
    lat = []
    done_before = client.done_count
    a = procs_sample(pids)
    t0 = time.monotonic()
    for i in range(count):
        body = b"x" * 64
        req = put_request(port, f"/v1/kv/catalog-bench/noise/{label}/{i}", body)
        t_send, ack_k, _u, status, rbody = await send_and_wait(loop, s, req)
        if status != 200:
            raise RuntimeError(f"noise write -> {status} {rbody[:100]!r}")
        lat.append((ack_k - t_send) / 1e6)
    wall = time.monotonic() - t0
    b = procs_sample(pids)
    s.close()
    await asyncio.sleep(0.5)
    lat.sort()
    cpu = sum(y.get("cpu_s", 0) - x.get("cpu_s", 0) for x, y in zip(a, b))
    return {"writes": count, "wall_s": round(wall, 3), "server_cpu_s": round(cpu, 3),
            "server_cpu_ms_per_write": round(1000 * cpu / count, 2),
            "server_cpu_per_server_s": [round(y.get("cpu_s", 0) - x.get("cpu_s", 0), 3)
                                        for x, y in zip(a, b)],
            "p50_ms": round(pct(lat, 50), 2), "p99_ms": round(pct(lat, 99), 2),
            "max_ms": round(lat[-1], 2),
            "waiters_answered_by_noise": client.done_count - done_before}


async def noise_only(args):
    """The noise writes without waiters (baseline for --noise-writes)."""
    loop = asyncio.get_running_loop()
    ports = [int(p) for p in args.ports.split(",")]
    pids = [int(p) for p in args.pids.split(",")]
    t0 = time.time()
    client = Client(loop)
    res = await noise_writes(loop, pids, ports[args.write_server], args.noise_writes,
                             args.label, client)
    return {"kind": "noise", "label": args.label, "waiters": 0, "noise": res,
            "started_unix": t0, "finished_unix": time.time()}


# ------------------------------------------------------------------ connmem
async def connmem(args):
    """On one fresh server: RSS growth per idle connection, then per blocking
    request on those connections, then after closing them (twice)."""
    loop = asyncio.get_running_loop()
    port = int(args.ports.split(",")[0])
    pid = int(args.pids.split(",")[0])
    n = args.waiters
    t0 = time.time()
    _st, h, _b = await simple_request(port, "GET", "/v1/health/service/web")
    index = int(h["x-consul-index"])
    req = (f"GET /v1/health/service/web?index={index}&wait={args.wait} HTTP/1.1\r\n"
           f"Host: {HOST}:{port}\r\nUser-Agent: meshwork-bench\r\n\r\n").encode()
    passes = []
    for _ in range(args.passes):
        await asyncio.sleep(1)
        p = {"fresh": proc_sample(pid)}
        socks = []
        sem = asyncio.Semaphore(256)

        async def conn():
            async with sem:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setblocking(False)
                await loop.sock_connect(s, (HOST, port))
                socks.append(s)

        await asyncio.gather(*(conn() for _ in range(n)))
        await asyncio.sleep(args.hold)
        p["idle_conns"] = proc_sample(pid)
        for s in socks:
            await loop.sock_sendall(s, req)
        await asyncio.sleep(args.hold)
        await wait_servers_quiet([pid], 10)
        p["blocking"] = proc_sample(pid)
        for s in socks:
            s.close()
        await asyncio.sleep(args.hold)
        p["closed"] = proc_sample(pid)
        passes.append(p)
    return {"kind": "connmem", "label": args.label, "connections": n, "passes": passes,
            "started_unix": t0, "finished_unix": time.time()}


# ------------------------------------------------------------------ scale
async def read_one_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    body = await reader.readexactly(length) if length else b""
    return status, body


async def scale(args):
    ports = [int(p) for p in args.ports.split(",")]
    pids = [int(p) for p in args.pids.split(",")]
    dirs = args.data_dirs.split(",")
    total = args.services * args.instances
    nodes = args.nodes
    res = {"kind": "scale", "services": args.services, "instances": args.instances,
           "registrations": total, "concurrency": args.concurrency, "nodes": nodes}
    res["started_unix"] = time.time()
    res["du_before"] = [du_bytes(d) for d in dirs]
    all0 = all_procs_cpu()
    before = procs_sample(pids)
    sys0, cli0 = sys_cpu(), self_cpu()
    next_i = 0
    lat = []
    statuses = {}
    errors = {}
    peaks = [dict(p) for p in before]
    t0 = time.monotonic()
    deadline = t0 + args.max_s
    per_server_done = [0] * len(ports)

    def body_for(i):
        svc, k = divmod(i, args.instances)
        node = (svc * args.instances + k) % nodes
        return json.dumps({
            "Node": f"scale-node-{node:04d}",
            "Address": f"198.18.{node // 250}.{node % 250 + 1}",
            "Service": {"Service": f"svc-{svc:05d}", "ID": f"svc-{svc:05d}-{k}",
                        "Port": 20000 + k, "Tags": ["bench", f"i{k}"]}}).encode()

    async def worker(c):
        nonlocal next_i
        port = ports[c % len(ports)]
        reader = writer = None
        while True:
            if next_i >= total or time.monotonic() > deadline:
                break
            i = next_i
            next_i += 1
            body = body_for(i)
            req = put_request(port, "/v1/catalog/register", body)
            for attempt in range(3):
                try:
                    if writer is None:
                        reader, writer = await asyncio.open_connection(HOST, port)
                    t = time.perf_counter()
                    writer.write(req)
                    status, rbody = await asyncio.wait_for(read_one_response(reader), 30)
                    lat.append((time.perf_counter() - t) * 1000)
                    statuses[status] = statuses.get(status, 0) + 1
                    if status != 200:
                        key = f"{status} {rbody[:80].decode('latin-1')}"
                        errors[key] = errors.get(key, 0) + 1
                    else:
                        per_server_done[c % len(ports)] += 1
                    break
                except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as e:
                    key = f"{type(e).__name__}: {e}"[:120]
                    errors[key] = errors.get(key, 0) + 1
                    if writer is not None:
                        writer.close()
                    reader = writer = None
                    await asyncio.sleep(0.1)
        if writer is not None:
            writer.close()

    async def progress():
        last = 0
        while True:
            await asyncio.sleep(5)
            for j, p in enumerate(procs_sample(pids)):
                if p.get("VmRSS", 0) > peaks[j].get("VmRSS", 0):
                    peaks[j] = p
            el = time.monotonic() - t0
            log(f"{len(lat)}/{total} registrations, {len(lat) / el:.0f}/s overall, "
                f"{(len(lat) - last) / 5:.0f}/s last 5 s")
            last = len(lat)

    prog = asyncio.ensure_future(progress())
    await asyncio.gather(*(worker(c) for c in range(args.concurrency)))
    elapsed = time.monotonic() - t0
    prog.cancel()
    after = procs_sample(pids)
    sys1, cli1 = sys_cpu(), self_cpu()
    lat.sort()
    ok = statuses.get(200, 0)
    res.update({
        "completed": len(lat), "ok": ok, "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors, "hit_time_cap": len(lat) < total, "elapsed_s": round(elapsed, 2),
        "rate_per_s": round(ok / elapsed, 1),
        "p50_ms": round(pct(lat, 50), 2), "p90_ms": round(pct(lat, 90), 2),
        "p99_ms": round(pct(lat, 99), 2), "max_ms": round(lat[-1], 2),
        "per_server_ok": per_server_done,
        "cpu": dict(cpu_window(sys0, sys1, before, after, cli0, cli1),
                    top_others=top_others(all0, all_procs_cpu(), set(pids))),
        "mem_before": before, "mem_after": after, "mem_peak_sampled": peaks,
    })
    # Every server must see every service and instance.
    t1 = time.monotonic()
    seen = []
    while time.monotonic() - t1 < args.converge_s:
        seen = []
        for port in ports:
            _st, h, body = await simple_request(port, "GET", "/v1/catalog/services?stale")
            seen.append((len(json.loads(body)), int(h.get("x-consul-index", 0))))
        if len({s[1] for s in seen}) == 1:
            break
        await asyncio.sleep(0.5)
    res["converge_s"] = round(time.monotonic() - t1, 2)
    res["services_seen_per_server"] = [s[0] for s in seen]
    res["catalog_index_per_server"] = [s[1] for s in seen]
    sample = random.Random(7).sample(range(args.services), min(20, args.services))
    checks = []
    for port in ports:
        wrong = 0
        t = time.perf_counter()
        for svc in sample:
            st, _h, body = await simple_request(port, "GET", f"/v1/health/service/svc-{svc:05d}?stale")
            if st != 200 or len(json.loads(body)) != args.instances:
                wrong += 1
        checks.append({"port": port, "sampled": len(sample), "wrong": wrong,
                       "ms_per_read": round((time.perf_counter() - t) * 1000 / len(sample), 2)})
    res["instance_checks"] = checks
    # A full-catalog read, to show its size and cost.
    t = time.perf_counter()
    st, _h, body = await simple_request(ports[0], "GET", "/v1/catalog/services")
    res["catalog_services_read"] = {"status": st, "bytes": len(body),
                                    "ms": round((time.perf_counter() - t) * 1000, 1)}
    await asyncio.sleep(2)
    res["mem_after_settle"] = procs_sample(pids)
    res["du_after"] = [du_bytes(d) for d in dirs]
    res["finished_unix"] = time.time()
    return res


# ------------------------------------------------------------------ busy
def busy(args):
    """Machine busy % over a few seconds and who used it (for the idle check)."""
    a_sys, a_all = sys_cpu(), all_procs_cpu()
    time.sleep(args.seconds)
    b_sys, b_all = sys_cpu(), all_procs_cpu()
    dt, di = b_sys[0] - a_sys[0], b_sys[1] - a_sys[1]
    pct_busy = round(100.0 * (dt - di) / dt) if dt > 0 else 0
    ours = {int(x) for x in args.ours.split(",") if x.strip().isdigit()}
    top = top_others(a_all, b_all, set(), n=3, ours=ours)
    print(f"{pct_busy}\t{' '.join(top) if top else '-'}")


# ------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--ports", required=True, help="HTTP ports, comma separated")
    common.add_argument("--pids", required=True, help="server pids, same order")
    common.add_argument("--label", default="run")

    f = sub.add_parser("fanout", parents=[common])
    f.add_argument("--raft-addrs", required=True)
    f.add_argument("--waiters", type=int, default=10000)
    f.add_argument("--wait", default="60s")
    f.add_argument("--hold", type=float, default=2.0, help="seconds after the last send")
    f.add_argument("--quiet-max", type=float, default=20.0)
    f.add_argument("--connect-concurrency", type=int, default=256)
    f.add_argument("--write-server", type=int, default=0, help="0-based")
    f.add_argument("--new-id", required=True)
    f.add_argument("--new-node", required=True)
    f.add_argument("--new-addr", default="198.18.0.200")
    f.add_argument("--fanout-timeout", type=float, default=30.0)
    f.add_argument("--after-close", type=float, default=3.0)
    f.add_argument("--noise-writes", type=int, default=0)

    nz = sub.add_parser("noise", parents=[common])
    nz.add_argument("--write-server", type=int, default=0)
    nz.add_argument("--noise-writes", type=int, default=200)

    cm = sub.add_parser("connmem", parents=[common])
    cm.add_argument("--waiters", type=int, default=3000)
    cm.add_argument("--wait", default="60s")
    cm.add_argument("--hold", type=float, default=2.0)
    cm.add_argument("--passes", type=int, default=2)

    s = sub.add_parser("scale", parents=[common])
    s.add_argument("--data-dirs", required=True)
    s.add_argument("--services", type=int, default=10000)
    s.add_argument("--instances", type=int, default=5)
    s.add_argument("--nodes", type=int, default=1000)
    s.add_argument("--concurrency", type=int, default=64)
    s.add_argument("--max-s", type=float, default=300)
    s.add_argument("--converge-s", type=float, default=60)

    b = sub.add_parser("busy")
    b.add_argument("--seconds", type=float, default=2.0)
    b.add_argument("--ours", default="", help="pids to mark with * (this benchmark's servers)")

    args = ap.parse_args()
    if args.cmd == "busy":
        busy(args)
        return
    fn = {"fanout": fanout, "scale": scale, "noise": noise_only, "connmem": connmem}[args.cmd]
    result = asyncio.run(fn(args))
    result["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
