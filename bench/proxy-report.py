#!/usr/bin/env python3
"""Report of bench/proxy.sh (was inline in the script).

usage: proxy-report.py RESULTS_JSONL RESULTS_FILE IDLE_KB BIG_KB DURATION CONNS H2_CONNS H2_STREAMS
           writes the report to RESULTS_FILE; PIN, PROXY_CPU, LOAD_CPU from the environment
       proxy-report.py --h2load-log LOG DURATION
           one results.jsonl line (requests, errors, p50/p99/p99.9 and mean latency in
           µs) from h2load's --log-file of a DURATION-second run
       proxy-report.py --s-time RAW_DIR LABEL MODE CLIENTS WALL_S SERVER_CPU_S BUSY "RCS"
           one handshakes.jsonl line from RAW_DIR/s_time-LABEL-MODE-{1..CLIENTS}.txt
           (openssl s_time -www outputs run at once)
"""

import datetime
import json
import os
import re
import statistics
import subprocess
import sys

from benchlib import percentile_index, read_jsonl


def h2load_log(path, duration):
    lat = []
    bad = 0
    for line in open(path):
        f = line.split()
        if len(f) < 3:
            continue
        if not f[1].startswith("2"):
            bad += 1
        lat.append(int(f[2]))
    lat.sort()
    print(json.dumps({"requests": len(lat), "duration_us": int(float(duration) * 1e6), "errors": bad,
                      "non2xx": bad, "p50_us": percentile_index(lat, 50), "p99_us": percentile_index(lat, 99),
                      "p999_us": percentile_index(lat, 99.9), "mean_us": sum(lat) / max(1, len(lat))}))


# Every shape's label says whether its hops between proxies are plain or
# mutual TLS (the client side of every shape is plain HTTP from wrk/h2load).
LABELS = {
    "direct": "direct",
    "sidecar": "sidecar (plain)",
    "haproxy": "haproxy (plain)",
    "nginx": "nginx (plain)",
    "sidecar-chain-mtls": "sidecar chain (mTLS)",
    "haproxy-chain-mtls": "haproxy chain (mTLS)",
    "haproxy-chain": "haproxy chain (plain)",
    "nginx-chain": "nginx chain (plain)",
    # Rows of results.jsonl from before issue 23 (the chain was plain then).
    "sidecar-chain": "sidecar chain (plain)",
}

HS_LABELS = {
    "sidecar-inbound": "sidecar inbound listener (rustls)",
    "haproxy-tls-bind": "server HAProxy TLS bind (OpenSSL)",
}


def s_time(raw, label, mode, clients, wall_s, cpu_s, busy, rcs):
    conns = nbytes = resumed = full = 0
    for i in range(1, int(clients) + 1):
        text = open(os.path.join(raw, f"s_time-{label}-{mode}-{i}.txt"), errors="replace").read()
        m = re.search(r"^(\d+) connections in [\d.]+s;.*bytes read (\d+)", text, re.M)
        if m:
            conns += int(m.group(1))
            nbytes += int(m.group(2))
        for line in text.splitlines():
            if line and set(line) <= {"*", "r"}:
                resumed += line.count("r")
                full += line.count("*")
    wall_s, cpu_s = float(wall_s), float(cpu_s)
    print(json.dumps({"server": label, "mode": mode, "clients": int(clients), "connections": conns,
                      "bytes_per_conn": nbytes / max(1, conns), "resumed": resumed, "full": full,
                      "wall_s": wall_s, "server_cpu_s": cpu_s, "machine_busy_pct": int(busy),
                      "failed_clients": sum(1 for rc in rcs.split() if rc != "0"),
                      "hs_per_s": conns / wall_s if wall_s else 0,
                      "hs_per_cpu_s": conns / cpu_s if cpu_s else 0}))


def handshake_section(w, hs, hs_duration, hs_clients):
    """The handshake table and the rows it was made of, by (server, mode)."""
    rows = {}
    for key in dict.fromkeys((r["server"], r["mode"]) for r in hs):
        runs = [r for r in hs if (r["server"], r["mode"]) == key]
        m = {f: statistics.median(r[f] for r in runs)
             for f in ("hs_per_s", "hs_per_cpu_s", "server_cpu_s", "wall_s", "bytes_per_conn", "machine_busy_pct")}
        m["range"] = (min(r["hs_per_s"] for r in runs), max(r["hs_per_s"] for r in runs))
        m["cpu_range"] = (min(r["hs_per_cpu_s"] for r in runs), max(r["hs_per_cpu_s"] for r in runs))
        m["resumed_pct"] = 100 * sum(r["resumed"] for r in runs) / max(1, sum(r["resumed"] + r["full"] for r in runs))
        m["failed_clients"] = sum(r["failed_clients"] for r in runs)
        m["rounds"] = len(runs)
        m["zero_byte"] = sum(1 for r in runs if r["bytes_per_conn"] < 1)
        rows[key] = m
    w("\n## New-connection TLS handshakes on the mTLS chains' server side\n")
    w(f"`openssl s_time -new` (full handshakes) and `-reuse` (resumed) with `-www /` (one HTTP/1.0 request "
      f"per connection, answered through to nginx), {hs_clients} s_time processes at once, {hs_duration} s per run, "
      "a client certificate of the server's CA (a mesh leaf from the registry for the sidecar, the test CA's for "
      "HAProxy); both negotiate TLS 1.3. \"Per core\" is handshakes per CPU second of the server process "
      "(`/proc` utime+stime), the measure that does not depend on how much CPU the clients left it.\n")
    w("| server | mode | handshakes/s (median) | range | server CPU busy (of one core) | handshakes per server CPU second (per core) | range | µs server CPU per handshake | resumed | bytes read per connection | failed s_time | machine busy |")
    w("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (server, mode), m in rows.items():
        w(f"| {HS_LABELS.get(server, server)} | {'full' if mode == 'new' else 'resumed'} | {m['hs_per_s']:,.0f} | "
          f"{m['range'][0]:,.0f}–{m['range'][1]:,.0f} | {100 * m['server_cpu_s'] / m['wall_s']:.0f}% | "
          f"{m['hs_per_cpu_s']:,.0f} | {m['cpu_range'][0]:,.0f}–{m['cpu_range'][1]:,.0f} | "
          f"{1e6 / m['hs_per_cpu_s']:.0f} | {m['resumed_pct']:.0f}% | {m['bytes_per_conn']:.0f} | "
          f"{m['failed_clients']} | {m['machine_busy_pct']:.0f}% |")
    return rows


def report():
    raw = read_jsonl(os.path.dirname(sys.argv[1]) or ".", os.path.basename(sys.argv[1]), strict=True)
    for r in raw:
        r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
        r["cpu100k"] = r["proxy_cpu_s"] / max(1, r["requests"]) * 1e5
    # One row per (shape, proto): the median of each measure over the rounds.
    rows = []
    for key in dict.fromkeys((r["shape"], r["proto"]) for r in raw):
        runs = [r for r in raw if (r["shape"], r["proto"]) == key]
        m = dict(runs[0])
        for f in ("rps", "p50_us", "p99_us", "p999_us", "cpu100k", "proxy_rss_kb", "machine_busy_pct"):
            m[f] = statistics.median(r[f] for r in runs)
        m["errors"] = sum(r["errors"] for r in runs)
        m["rounds"] = len(runs)
        m["rps_range"] = (min(r["rps"] for r in runs), max(r["rps"] for r in runs))
        rows.append(m)
    idle_kb, big_kb = int(sys.argv[3]), int(sys.argv[4])
    duration, conns, h2c, h2m = sys.argv[5:9]
    def get(shape, proto):
        return next((r for r in rows if r["shape"] == shape and r["proto"] == proto), None)
    out = []
    w = out.append
    # BUILD_REV: the commit the binaries were built from when it is not HEAD
    # (SKIP_BUILD=1 with binaries of an earlier build).
    commit = os.environ.get("BUILD_REV") or \
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    w("# Sidecar proxy benchmark\n")
    w(f"Generated by `bash bench/proxy.sh` on {datetime.date.today()} at commit {commit}, "
      f"{subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores. "
      f"Backend: nginx returning a 12-byte body. HTTP/1.1: wrk, 1 thread, {conns} connections, {duration} s; "
      f"HTTP/2: h2load, {h2c} connections x {h2m} streams, {duration} s. Every proxy has one worker thread. "
      f"Each shape measured {max(r['rounds'] for r in rows)} times, interleaved; medians shown. "
      + (f"Pinned (PIN=1): the proxies under test on CPU {os.environ['PROXY_CPU']}, backend, registry and load tools on CPU {os.environ['LOAD_CPU']}; a chain's two proxies share their core. "
         if os.environ.get("PIN") == "1" else
         "Load tool, backend and proxies share the same cores, so absolute numbers are low; compare rows.") + "\n")
    w("Hops between two proxies: the sidecar chain's is the mesh's mutual TLS (ECDSA P-256 leaves of the registry's CA, "
      "client certificate required, rustls, resumption on); the HAProxy chain (mTLS) does the same with OpenSSL (ECDSA "
      "P-256 leaves of a test CA made by the script, `verify required` both ways plus `verifyhost`, HAProxy's default "
      "resumption, ALPN http/1.1); the plain chains are plain HTTP. All kept alive and pooled, so the HTTP/1.1 rows "
      "measure TLS record costs, not handshakes (those are in their own section).\n")
    w(("Reproduce: `PIN=1 bash bench/proxy.sh`" if os.environ.get("PIN") == "1" else "Reproduce: `bash bench/proxy.sh`")
      + " (knobs at the top of the script; raw data in `bench/out/proxy/`).\n")
    for proto, title in (("h1", "HTTP/1.1 (wrk)"), ("h2", "HTTP/2 prior knowledge (h2load)")):
        base = get("direct", proto)
        w(f"\n## {title}\n")
        w("| shape | req/s (median) | req/s range | p50 ms | p99 ms | p99.9 ms | added p50 / p99 / p99.9 ms | proxy CPU s per 100k req | proxy RSS MiB | errors | machine busy |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["proto"] != proto: continue
            rps = r["rps"]
            lo, hi = r["rps_range"]
            ms = lambda us: us / 1000
            added = "—" if r["shape"] == "direct" or not base else \
                f"{ms(r['p50_us'] - base['p50_us']):+.2f} / {ms(r['p99_us'] - base['p99_us']):+.2f} / {ms(r['p999_us'] - base['p999_us']):+.2f}"
            cpu = "—" if not r["proxies"] else f"{r['cpu100k']:.2f}"
            rss = "—" if not r["proxies"] else f"{r['proxy_rss_kb'] / 1024:.1f}"
            w(f"| {LABELS.get(r['shape'], r['shape'])} | {rps:,.0f} | {lo:,.0f}–{hi:,.0f} | {ms(r['p50_us']):.2f} | {ms(r['p99_us']):.2f} | {ms(r['p999_us']):.2f} | {added} | {cpu} | {rss} | {r['errors']} | {r['machine_busy_pct']}% |")
    w("\n## Targets from issue 6\n")
    def ratio(a, b):
        ra, rb = get(a, "h1"), get(b, "h1")
        if not ra or not rb: return None
        return ra["rps"] / rb["rps"]
    r = ratio("sidecar", "haproxy")
    sc, ha = get("sidecar", "h1"), get("haproxy", "h1")
    w("| target | result | met |")
    w("|---|---|---|")
    if r is not None:
        w(f"| single-hop throughput at least HAProxy's (one thread each) | sidecar / HAProxy = {r:.2f} | {'yes' if r >= 1 else 'NO'} |")
    if sc and ha:
        w(f"| p99 added latency no worse than HAProxy's | sidecar p99 {sc['p99_us']/1000:.2f} ms vs HAProxy {ha['p99_us']/1000:.2f} ms | {'yes' if sc['p99_us'] <= ha['p99_us'] else 'NO'} |")
        w(f"| (CPU per request, the measure least moved by other load) | sidecar {sc['cpu100k']:.2f} vs HAProxy {ha['cpu100k']:.2f} CPU s per 100k | {'yes' if sc['cpu100k'] <= ha['cpu100k'] else 'NO'} |")
    w(f"| sidecar RSS under 15 MiB idle | {idle_kb / 1024:.1f} MiB | {'yes' if idle_kb < 15 * 1024 else 'NO'} |")
    w(f"| sidecar RSS under 40 MiB with 1,000 endpoints across 100 upstreams | {big_kb / 1024:.1f} MiB | {'yes' if big_kb < 40 * 1024 else 'NO'} |")

    hs_path = os.path.join(os.path.dirname(sys.argv[1]) or ".", "handshakes.jsonl")
    hs = read_jsonl(os.path.dirname(hs_path), os.path.basename(hs_path)) if os.path.exists(hs_path) else []
    hs_rows = handshake_section(w, hs, os.environ.get("HS_DURATION", duration), os.environ.get("HS_CLIENTS", "?")) if hs else {}

    w("\n## Targets from issue 23 (mutual TLS between sidecars vs HAProxy doing the same)\n")
    w("| target | result | met |")
    w("|---|---|---|")
    scm, ham, hap = get("sidecar-chain-mtls", "h1"), get("haproxy-chain-mtls", "h1"), get("haproxy-chain", "h1")
    if scm and ham:
        r = scm["rps"] / ham["rps"]
        w(f"| sidecar chain (mTLS) req/s at least HAProxy chain (mTLS)'s, HTTP/1.1 kept alive | {scm['rps']:,.0f} vs {ham['rps']:,.0f} req/s = {r:.2f}x | {'yes' if r >= 1 else 'NO'} |")
        w(f"| sidecar chain (mTLS) p99 no worse than HAProxy chain (mTLS)'s | {scm['p99_us']/1000:.2f} vs {ham['p99_us']/1000:.2f} ms | {'yes' if scm['p99_us'] <= ham['p99_us'] else 'NO'} |")
        w(f"| (CPU per request of the two proxies together) | {scm['cpu100k']:.2f} vs {ham['cpu100k']:.2f} CPU s per 100k = {scm['cpu100k'] / ham['cpu100k']:.2f}x | {'yes' if scm['cpu100k'] <= ham['cpu100k'] else 'NO'} |")
    for mode, what in (("new", "full"), ("reuse", "resumed")):
        sc, ha = hs_rows.get(("sidecar-inbound", mode)), hs_rows.get(("haproxy-tls-bind", mode))
        if sc and ha:
            r = sc["hs_per_cpu_s"] / ha["hs_per_cpu_s"]
            w(f"| {what} handshakes per core on the server side at least 0.8x HAProxy's | {sc['hs_per_cpu_s']:,.0f} vs {ha['hs_per_cpu_s']:,.0f} per server CPU second = {r:.2f}x (handshakes/s as driven: {sc['hs_per_s']:,.0f} vs {ha['hs_per_s']:,.0f}) | {'yes' if r >= 0.8 else 'NO'} |")
    if ham and hap:
        w(f"\nWhat TLS costs HAProxy's chain here: {ham['rps']:,.0f} vs {hap['rps']:,.0f} req/s plain "
          f"({ham['rps'] / hap['rps']:.2f}x), {ham['cpu100k']:.2f} vs {hap['cpu100k']:.2f} CPU s per 100k.")
    open(sys.argv[2], "w").write("\n".join(out) + "\n")


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "--h2load-log":
        h2load_log(sys.argv[2], sys.argv[3])
        return
    if len(sys.argv) == 10 and sys.argv[1] == "--s-time":
        s_time(*sys.argv[2:])
        return
    report()


if __name__ == "__main__":
    main()
