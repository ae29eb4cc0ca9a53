#!/usr/bin/env python3
"""Writes bench/RESULTS-catalog.md (to stdout) from the raw data of bench/catalog.sh.

usage: catalog-report.py RAW_DIR
"""

import datetime
import json
import os
import re
import sys

from benchlib import fenced, fmt, mib, read_jsonl, read_kv, reproduce, strip_ansi

TARGET_MS = 1000.0
TARGET_KIB_PER_WAITER = 16.0


def load(raw):
    """The run's files; all four must exist (the script always writes them)."""
    results = read_jsonl(raw, "results.jsonl", strict=True)
    meta = read_kv(raw, "meta.txt", required=True)
    with open(os.path.join(raw, "free.txt")) as f:
        free = f.read().rstrip()
    quiet = []
    with open(os.path.join(raw, "quiet.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            quiet.append(parts + [""] * (4 - len(parts)))
    return results, meta, free, quiet


def rss_growth(r, a="mem_before", b="mem_held"):
    """Per server (KiB delta, waiters) and KiB per 1,000 waiters."""
    out = []
    for i, (x, y) in enumerate(zip(r[a], r[b])):
        d = y.get("VmRSS", 0) - x.get("VmRSS", 0)
        w = r["waiters_per_server"][i]
        out.append((d, w, 1000.0 * d / w if w else None))
    return out


def log_groups(raw, meta, results):
    """WARN/ERROR lines after startup, grouped, each with the measurement it fell in."""
    windows = []
    for r in results:
        if "started_unix" in r:
            windows.append((r["started_unix"], r.get("finished_unix", r["started_unix"]), r))
    groups = {}
    for i in (1, 2, 3):
        path = os.path.join(raw, f"meshwork-{i}.log")
        if not os.path.exists(path):
            continue
        base = int(meta.get(f"server{i}_log_base", "0") or 0)
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()[base:]
        for line in lines:
            line = strip_ansi(line)
            m = re.match(r"(\S+)\s+(WARN|ERROR)\s+(.*)", line)
            if not m:
                if re.search(r"panic", line, re.I):
                    m = None
                    key = (i, "PANIC", line[:200])
                    groups.setdefault(key, [0, set(), line[:200]])[0] += 1
                continue
            ts, lvl, msg = m.groups()
            try:
                t = datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
            except ValueError:
                t = None
            when = "between measurements"
            for a, b, r in windows:
                if t is not None and a - 0.5 <= t <= b + 0.5:
                    when = r.get("label", r.get("kind"))
                    if "write_unix" in r:
                        when += f" (write{t - r['write_unix']:+.1f}s)"
                    break
            norm = re.sub(r"\d+", "N", msg)
            g = groups.setdefault((i, lvl, norm), [0, set(), msg])
            g[0] += 1
            g[1].add(when)
    return sorted(((k[0], k[1], v[2]), (v[0], v[1])) for k, v in groups.items())


def one_line(r):
    """A one-line progress summary of one result (for the script's log)."""
    if r["kind"] == "fanout":
        l = r.get("lat_kernel_vs_ack") or {}
        return (f"  {r['label']}: ok {r['answered_ok']}/{r['waiters']}, from ack p50 {l.get('p50_ms')} ms, "
                f"p99 {l.get('p99_ms')} ms, max {l.get('max_ms')} ms, within 1 s {l.get('within_1s')}; "
                f"write RTT {r.get('write_rtt_ms')} ms; early {r['early_responses']}, bad {r['answered_bad']}, "
                f"missing {r['not_answered']}; fan-out CPU {r['fanout_cpu']['server_cpu_total_s']} s")
    if r["kind"] == "scale":
        return (f"  scale: {r['ok']}/{r['registrations']} ok, {r['rate_per_s']}/s, "
                f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, errors {r['errors']}")
    if r["kind"] == "connmem":
        out = []
        for p in r["passes"]:
            f, i, b = p["fresh"]["VmRSS"], p["idle_conns"]["VmRSS"], p["blocking"]["VmRSS"]
            n = r["connections"]
            out.append(f"  connmem: {n} conns: idle +{(i - f) / n:.1f} KiB/conn, blocking "
                       f"+{(b - i) / n:.1f} KiB/req, after close {p['closed']['VmRSS'] // 1024} MiB")
        return "\n".join(out)
    if r["kind"] == "noise":
        n = r["noise"]
        return (f"  {r['label']}: {n['writes']} writes, {n['server_cpu_ms_per_write']} ms server CPU "
                f"per write, p50 {n['p50_ms']} ms, waiters answered {n['waiters_answered_by_noise']}")
    return "  " + json.dumps(r)[:200]


def main():
    if sys.argv[1] == "--line":
        print(one_line(json.loads(sys.argv[2])))
        return
    if sys.argv[1] == "--noisy":
        # Exit 0 if other processes used more than PCT % of the machine during
        # the fan-out (and at least 50 ms of CPU: the window can be tiny).
        r, limit = json.loads(sys.argv[2]), float(sys.argv[3])
        c = r.get("fanout_cpu") or {}
        other, cap = c.get("other_cpu_s", 0), c.get("wall_cpu_s", 0)
        sys.exit(0 if other >= 0.05 and cap > 0 and 100.0 * other / cap > limit else 1)
    raw = sys.argv[1]
    results, meta, free, quiet = load(raw)
    fan = [r for r in results if r.get("kind") == "fanout"]
    scale = [r for r in results if r.get("kind") == "scale"]
    noise = [r for r in results if r.get("kind") == "noise"]
    failed = [r for r in results if r.get("kind") in ("failed", "crash")]
    quiet_by = {q[0]: q for q in quiet}
    big = int(meta.get("params", "WAITERS=10000").split("WAITERS=")[1].split()[0])

    p = print
    p("# Catalog benchmark: blocking-query fan-out and catalog scale")
    p()
    p(f"Generated by `bench/catalog.sh` on {meta.get('date')} (Meshwork {meta.get('version', '?')}, "
      f"git {meta.get('git')}" + (f" + {meta.get('git_dirty')} uncommitted changes in the work tree"
                                   if meta.get("git_dirty", "0") not in ("", "0") else "") +
      f"; binary built {meta.get('binary_mtime')}). Every number below was measured in that one run "
      f"({meta.get('total_s', '?')} s in all).")
    p()
    for line in reproduce("Reproduce (as root, from the repository root; needs only `python3` and `curl`):",
                          "bash bench/catalog.sh"):
        p(line)
    p(f"Parameters: `{meta.get('params')}`. Raw JSON per measurement, `/proc` samples and the "
      "server logs are kept in `/var/tmp/meshwork-bench-catalog/` (or `RAW_DIR`).")
    p()
    p("## Machine and setup")
    p()
    p(f"- `nproc` = {meta.get('nproc')} ({meta.get('cpu')}), kernel {meta.get('kernel')}, "
      f"{meta.get('python')}; data dirs on {meta.get('fs')}; open-file limit {meta.get('nofile')}; "
      f"load average at start {meta.get('loadavg')}")
    p("- `free -h` at start:")
    p()
    for line in fenced(free):
        p(line)
    p()
    p("- Three `meshwork-registry` servers (release build, default settings, `--log-level warn`) on "
      "127.0.0.1, the load client (`bench/catalog-waiters.py`, one Python asyncio process) on the "
      "same 2-core machine. The machine is shared with other work: before each measurement the "
      "script waits (bounded) for it to be idle and records how busy it was; CPU of other "
      "processes during each fan-out is listed too.")
    p("- Fan-out: the waiters connect round-robin to the three HTTP ports; each sends "
      "`GET /v1/health/service/web?index=N&wait=60s` (N = the `X-Consul-Index` of a plain GET on "
      "that server; default consistency). After the last send the client waits "
      "2 s and then until the servers use no CPU, samples `/proc/PID/status` (VmRSS) and "
      "`/proc/PID/stat` (utime+stime), then sends ONE `PUT /v1/catalog/register` of a new `web` "
      "instance through one server (rotating between rounds). A waiter counts as answered "
      "correctly only if its response is a 200 whose `X-Consul-Index` is above N and whose body "
      "contains the new instance's ID.")
    p("- Latency = kernel receive time (SO_TIMESTAMPNS) of the segment that completed a waiter's "
      "response − kernel receive time of the write's response (its acknowledgement). Using kernel "
      "timestamps keeps the single-threaded client's own backlog out of the numbers; the "
      "user-space view is shown as \"client lag\". A waiter on the server that applied the write "
      "before answering it can be answered slightly *before* the acknowledgement arrives "
      "(negative minimum).")
    p("- Memory per waiter = growth of the server's VmRSS from before the waiters connected to "
      "while they are held, divided by the waiters it holds. Kernel socket buffers are not in "
      "VmRSS (they are kernel memory, not the server's).")
    p()

    discarded = []
    if os.path.exists(os.path.join(raw, "discarded.jsonl")):
        discarded = read_jsonl(raw, "discarded.jsonl", strict=True)
    if discarded:
        p("Fan-out rounds repeated because other processes used more than the allowed share of "
          "the machine during the fan-out (only the last try of each round is in the tables):")
        p()
        p("| round | other processes s (top) | servers CPU s | p99 / max ms from ack | answered OK |")
        p("|---|---|---:|---|---:|")
        for r in discarded:
            c = r["fanout_cpu"]
            lat = r.get("lat_kernel_vs_ack") or {}
            p(f"| {r['label']} | {c['other_cpu_s']} ({', '.join(c.get('top_others', []))}) | "
              f"{c['server_cpu_total_s']} | {fmt(lat.get('p99_ms'))} / {fmt(lat.get('max_ms'))} | "
              f"{r['answered_ok']}/{r['waiters']} |")
        p()

    if meta.get("skipped"):
        p(f"**Skipped because the time budget (`TIME_BUDGET_S`) ran out:** {meta['skipped']}.")
        p()

    if failed:
        p("**Failed or crashed measurements:** " + ", ".join(json.dumps(f) for f in failed))
        p()

    # ------------------------------------------------------------ fan-out latency
    p("## Fan-out: time from the write's acknowledgement to each waiter's response")
    p()
    p("| round | waiters | write via | answered OK | within 1 s of ack | p50 ms | p99 ms | max ms | "
      "min ms | from the write's send: p50 / p99 / max ms, within 1 s | write RTT ms | "
      "early / bad / errors / missing | client lag max ms | new index | machine busy before |")
    p("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---|---:|")
    for r in fan:
        lat = r.get("lat_kernel_vs_ack") or {}
        q = quiet_by.get(r["label"], ["", "?"])
        errs = sum(r["errors_after_write"].values()) if r.get("errors_after_write") else 0
        ws = f"server {r['write_server']}" + (" (leader)" if r.get("write_via_leader") else " (follower)")
        ls = r.get("lat_kernel_vs_send") or {}
        p(f"| {r['label']} | {r['waiters']} | {ws} | {r['answered_ok']} | {lat.get('within_1s', 0)} | "
          f"{fmt(lat.get('p50_ms'))} | {fmt(lat.get('p99_ms'))} | {fmt(lat.get('max_ms'))} | "
          f"{fmt(lat.get('min_ms'))} | {fmt(ls.get('p50_ms'))} / {fmt(ls.get('p99_ms'))} / "
          f"{fmt(ls.get('max_ms'))}, {ls.get('within_1s', 0)} | {fmt(r.get('write_rtt_ms'))} | "
          f"{r['early_responses']} / {r['answered_bad']} / {errs} / {r['not_answered']} | "
          f"{fmt(r.get('client_lag_max_ms'))} | "
          f"{', '.join(map(str, r.get('new_indexes', [])))} | {q[1]}% |")
    p()
    p("Per server (p50 / p99 / max ms from the acknowledgement, waiters on that server):")
    p()
    p("| round | server 1 | server 2 | server 3 |")
    p("|---|---|---|---|")
    for r in fan:
        cells = []
        for s in r.get("lat_kernel_vs_ack_per_server", []):
            cells.append("–" if not s else f"{fmt(s['p50_ms'])} / {fmt(s['p99_ms'])} / {fmt(s['max_ms'])} (n={s['n']})")
        p(f"| {r['label']} | " + " | ".join(cells) + " |")
    p()

    # ------------------------------------------------------------ CPU
    p("## Fan-out: CPU")
    p()
    p("CPU seconds from just before the write until the last waiter's response was read "
      "(window length in the last column; it includes the client's time to read every socket).")
    p()
    p("| round | waiters | servers CPU s (1 / 2 / 3) | servers total s | per 1,000 waiters ms | "
      "client CPU s | other processes s (top) | machine busy % | window s | setup: open s, servers CPU s |")
    p("|---|---:|---|---:|---:|---:|---|---:|---:|---|")
    for r in fan:
        c = r["fanout_cpu"]
        per_k = 1000.0 * 1000.0 * c["server_cpu_total_s"] / r["waiters"]
        p(f"| {r['label']} | {r['waiters']} | {' / '.join(fmt(x, 2) for x in c['server_cpu_s'])} | "
          f"{fmt(c['server_cpu_total_s'], 2)} | {per_k:.0f} | {fmt(c['client_cpu_s'], 2)} | "
          f"{fmt(c['other_cpu_s'], 2)} {('(' + ', '.join(c['top_others']) + ')') if c.get('top_others') else ''} | "
          f"{fmt(c['busy_pct'])} | {fmt(r['fanout_window_s'], 2)} | "
          f"{r['open_s']}, {fmt(r['setup_cpu']['server_cpu_total_s'], 2)} |")
    p()

    # ------------------------------------------------------------ memory
    p("## Fan-out: server memory per waiter")
    p()
    p("VmRSS (MiB) before the waiters connected → while held → after the fan-out → 3 s after "
      "the client closed them; growth per 1,000 waiters held.")
    p()
    p("The last column (rounds with the full number of waiters only) compares the RSS while the "
      "waiters are held with the RSS of the freshly started server before the first round. "
      "After a round the allocator keeps the memory it took (RSS does not go back down when the "
      "connections close) and reuses it, so the growth *within* a later round understates what "
      "its waiters occupy; the small rounds run first, on fresh servers, for that reason.")
    p()
    p("| round | server | waiters held | RSS before | held | after fan-out | after close | "
      "growth KiB per 1,000 waiters | KiB per waiter | fds held | (held − fresh server) KiB per waiter |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    worst_kib = {}
    fresh = fan[0]["mem_before"] if fan else []
    fresh_kib = {}
    for r in fan:
        g = rss_growth(r)
        tot_d = sum(x[0] for x in g)
        tot_w = sum(x[1] for x in g)
        for i, (d, w, per_k) in enumerate(g):
            b, h = r["mem_before"][i], r["mem_held"][i]
            a, c = r["mem_after_fanout"][i], r["mem_after_close"][i]
            p(f"| {r['label']} | {i + 1} | {w} | {mib(b.get('VmRSS', 0))} | {mib(h.get('VmRSS', 0))} | "
              f"{mib(a.get('VmRSS', 0))} | {mib(c.get('VmRSS', 0))} | {fmt(per_k, 0)} | "
              f"{fmt(per_k / 1000 if per_k is not None else None, 2)} | "
              f"{h.get('fds', 0) - b.get('fds', 0)} | "
              + (f"{(h.get('VmRSS', 0) - fresh[i].get('VmRSS', 0)) / w:.2f} |" if w and r["waiters"] == big
                 else "– |"))
        per_w = tot_d / tot_w if tot_w else 0
        worst_kib[r["label"]] = per_w
        fresh_kib[r["label"]] = (sum(x.get("VmRSS", 0) for x in r["mem_held"])
                                 - sum(x.get("VmRSS", 0) for x in fresh)) / tot_w if tot_w else 0
        p(f"| {r['label']} | **all** | {tot_w} | {mib(sum(x.get('VmRSS', 0) for x in r['mem_before']))} | "
          f"{mib(sum(x.get('VmRSS', 0) for x in r['mem_held']))} | "
          f"{mib(sum(x.get('VmRSS', 0) for x in r['mem_after_fanout']))} | "
          f"{mib(sum(x.get('VmRSS', 0) for x in r['mem_after_close']))} | "
          f"**{1000 * per_w:.0f}** | **{per_w:.2f}** | | "
          + (f"{fresh_kib[r['label']]:.2f} |" if r["waiters"] == big else "– |"))
    p()
    cms = [r for r in results if r.get("kind") == "connmem"]
    for cm in cms:
        n = cm["connections"]
        p(f"### Per-connection memory on a fresh server ({n} connections, one-server cluster)")
        p()
        p("A separate, freshly started one-server cluster: RSS after opening the connections "
          "without sending anything, after sending the blocking query on each, and after closing "
          "them; then the same again on the now warmed-up server.")
        p()
        p("| pass | RSS fresh MiB | + idle connections MiB | KiB per idle connection | "
          "+ blocking query on each MiB | extra KiB per blocking query | total KiB per waiter | "
          "after close MiB |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, ps in enumerate(cm["passes"]):
            f, i, b, c = (ps[x]["VmRSS"] for x in ("fresh", "idle_conns", "blocking", "closed"))
            p(f"| {k + 1} | {mib(f)} | {mib(i)} | {(i - f) / n:.1f} | {mib(b)} | {(b - i) / n:.1f} | "
              f"{(b - f) / n:.1f} | {mib(c)} |")
        p()

    # ------------------------------------------------------------ noise
    if noise or any(r.get("noise") for r in fan):
        p("## Unrelated writes while waiters are held")
        p()
        p("Sequential KV writes (`PUT /v1/kv/catalog-bench/noise/...`, nothing to do with `web`) "
          "through server 1, without waiters and with the waiters held. No waiter may answer "
          "(the `web` result does not change); the server CPU per write shows what each write "
          "costs the servers that hold the waiters.")
        p()
        p("| run | waiters held | writes | server CPU ms per write (all 3) | per server s (1 / 2 / 3) | "
          "write p50 ms | p99 ms | max ms | waiters answered by these writes |")
        p("|---|---:|---:|---:|---|---:|---:|---:|---:|")
        for r in noise + [r for r in fan if r.get("noise")]:
            n = r["noise"]
            p(f"| {r['label']} | {r['waiters']} | {n['writes']} | {n['server_cpu_ms_per_write']} | "
              f"{' / '.join(fmt(x, 2) for x in n['server_cpu_per_server_s'])} | {n['p50_ms']} | "
              f"{n['p99_ms']} | {n['max_ms']} | {n['waiters_answered_by_noise']} |")
        p()

    # ------------------------------------------------------------ scale
    if scale:
        s = scale[0]
        p("## Catalog scale: 10,000 services × 5 instances" if (s["services"], s["instances"]) == (10000, 5)
          else f"## Catalog scale: {s['services']} services × {s['instances']} instances")
        p()
        p(f"`PUT /v1/catalog/register` of {s['registrations']} instances ({s['services']} services × "
          f"{s['instances']}, spread over {s['nodes']} nodes, one service instance per request) "
          f"over {s['concurrency']} keep-alive connections, a third to each server's HTTP port; "
          "closed loop. Machine busy before: " + quiet_by.get("scale", ["", "?"])[1] + "%.")
        p()
        p("| | |")
        p("|---|---:|")
        p(f"| registrations OK / attempted | {s['ok']} / {s['completed']} (of {s['registrations']}) |")
        p(f"| elapsed | {s['elapsed_s']} s |")
        p(f"| **registrations/s** | **{s['rate_per_s']}** |")
        p(f"| latency p50 / p90 / p99 / max | {s['p50_ms']} / {s['p90_ms']} / {s['p99_ms']} / {s['max_ms']} ms |")
        p(f"| errors | {json.dumps(s['errors']) if s['errors'] else 'none'} |")
        p(f"| hit the time cap | {'yes' if s['hit_time_cap'] else 'no'} |")
        c = s["cpu"]
        p(f"| server CPU s (1 / 2 / 3) | {' / '.join(fmt(x, 1) for x in c['server_cpu_s'])} "
          f"(total {c['server_cpu_total_s']:.1f}; {1000 * c['server_cpu_total_s'] / max(1, s['ok']):.2f} ms per registration) |")
        p(f"| client CPU s / other processes s / machine busy | {c['client_cpu_s']:.1f} / {c['other_cpu_s']:.1f} / {c['busy_pct']}% |")
        if c.get("top_others"):
            p(f"| other processes that used CPU meanwhile (s) | {', '.join(c['top_others'])} |")
        p(f"| all servers agree after | {s['converge_s']} s (catalog index per server {s['catalog_index_per_server']}) |")
        p(f"| services seen per server | {s['services_seen_per_server']} |")
        wrong = sum(x["wrong"] for x in s["instance_checks"])
        p(f"| sampled services with ≠ {s['instances']} instances (20 per server, `?stale`) | {wrong} |")
        p(f"| `GET /v1/catalog/services` afterwards | {s['catalog_services_read']['bytes']} bytes in {s['catalog_services_read']['ms']} ms |")
        p()
        p("| server | RSS before MiB | after MiB | 2 s later MiB | peak sampled MiB | VmHWM MiB | "
          "growth bytes per instance | data dir before MiB | after MiB |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for i in range(3):
            b, a, st = s["mem_before"][i], s["mem_after"][i], s["mem_after_settle"][i]
            pk = s["mem_peak_sampled"][i]
            grow = (st.get("VmRSS", 0) - b.get("VmRSS", 0)) * 1024 / max(1, s["ok"])
            p(f"| {i + 1} | {mib(b.get('VmRSS', 0))} | {mib(a.get('VmRSS', 0))} | {mib(st.get('VmRSS', 0))} | "
              f"{mib(max(pk.get('VmRSS', 0), a.get('VmRSS', 0)))} | {mib(st.get('VmHWM', 0))} | {grow:.0f} | "
              f"{s['du_before'][i] / 2**20:.1f} | {s['du_after'][i] / 2**20:.1f} |")
        p()

    # ------------------------------------------------------------ idleness
    p("## Machine idleness before each measurement")
    p()
    p("`/proc/stat` busy % of both cores over 2 s just before the measurement started (the script "
      "waits up to `QUIET_WAIT_S` for it to drop below 15%), seconds it waited, and the processes "
      "that used the most CPU in that last 2-s sample (CPU seconds; `*` = this benchmark's own "
      "servers).")
    p()
    p("| measurement | busy % | waited s | top processes |")
    p("|---|---:|---:|---|")
    for q in quiet:
        p(f"| {q[0]} | {q[1]} | {q[2]} | {q[3].strip()} |")
    p()

    # ------------------------------------------------------------ targets
    p("## Targets")
    p()
    bigs = [r for r in fan if r["waiters"] == big and not r["label"].startswith("noise")]
    if bigs:
        rows = []
        all_ok = True
        for r in bigs:
            lat = r.get("lat_kernel_vs_ack") or {}
            within = lat.get("within_1s", 0)
            ok = within == r["waiters"] and r["answered_ok"] == r["waiters"]
            all_ok &= ok
            rows.append(f"{r['label']}: {within}/{r['waiters']} within 1 s, max {fmt(lat.get('max_ms'))} ms")
        p(f"- **All {big:,} waiters answered within 1 s of the change: "
          f"{'MET' if all_ok else 'NOT MET'}** in {sum(1 for r in bigs if (r.get('lat_kernel_vs_ack') or {}).get('within_1s') == r['waiters'] and r['answered_ok'] == r['waiters'])} "
          f"of {len(bigs)} rounds ({'; '.join(rows)}).")
        sends = []
        for r in bigs:
            ls = r.get("lat_kernel_vs_send") or {}
            sends.append(f"{r['label']}: {ls.get('within_1s', 0)}/{r['waiters']}, max {fmt(ls.get('max_ms'))} ms")
        p(f"  Counted from when the write was *sent* instead (stricter; includes the write's own "
          f"commit and the time the acknowledgement waited behind the fan-out): {'; '.join(sends)}.")
        pre = [r for r in bigs if not r["label"].startswith("postscale")] or bigs
        fresh_vals = [fresh_kib[r["label"]] for r in pre]
        first = pre[0]
        first_growth = worst_kib[first["label"]]
        worst_fresh = max(fresh_vals)
        cm_text, cm_total = "", None
        cms = [r for r in results if r.get("kind") == "connmem"]
        if cms:
            ps = cms[0]["passes"][0]
            n = cms[0]["connections"]
            f, i, b = (ps[x]["VmRSS"] for x in ("fresh", "idle_conns", "blocking"))
            cm_total = (b - f) / n
            cm_text = (f" On a separate fresh one-server cluster: {(i - f) / n:.1f} KiB per idle "
                       f"connection + {(b - i) / n:.1f} KiB per blocking query = {cm_total:.1f} KiB "
                       "per waiter.")
        met = worst_fresh < TARGET_KIB_PER_WAITER and first_growth < TARGET_KIB_PER_WAITER and (
            cm_total is None or cm_total < TARGET_KIB_PER_WAITER)
        p(f"- **Under {TARGET_KIB_PER_WAITER:.0f} KiB of server memory per waiter: "
          f"{'MET' if met else 'NOT MET'}** — with {big:,} waiters held, the servers' RSS stood "
          f"{', '.join(f'{v:.1f}' for v in fresh_vals)} KiB per waiter above their freshly started "
          f"RSS ({', '.join(r['label'] for r in pre)}); the first of those rounds grew the RSS by "
          f"{first_growth:.1f} KiB per waiter while its waiters were held (later rounds grow less "
          f"because the allocator reuses what earlier rounds left behind).{cm_text} "
          "Kernel socket memory is not included in any of these.")
    p()

    # ------------------------------------------------------------ anomalies (automatic)
    p("## Automatic checks")
    p()
    notes = []
    for r in fan:
        if r["early_responses"]:
            notes.append(f"{r['label']}: {r['early_responses']} waiters answered before the write: {r['early_detail']}")
        if r["answered_bad"]:
            notes.append(f"{r['label']}: {r['answered_bad']} responses after the write were wrong: {r['bad_detail']}")
        if r["not_answered"]:
            notes.append(f"{r['label']}: {r['not_answered']} waiters had no response within the time cap")
        if r.get("errors_after_write"):
            notes.append(f"{r['label']}: errors {r['errors_after_write']}")
        if r.get("connect_errors"):
            notes.append(f"{r['label']}: {r['connect_errors']} connect errors")
        if len(set(r["start_index_per_server"])) != 1:
            notes.append(f"{r['label']}: servers reported different start indexes {r['start_index_per_server']}")
        if len(r.get("new_indexes", [])) > 1:
            notes.append(f"{r['label']}: waiters saw different new indexes {r['new_indexes']}")
        if r.get("write_status") != 200:
            notes.append(f"{r['label']}: write answered {r.get('write_status')} {r.get('write_body')}")
        if not r.get("servers_quiet"):
            notes.append(f"{r['label']}: servers were still using CPU {r['servers_quiet_after_s']} s after the last send")
        if r.get("bad_kernel_timestamps"):
            notes.append(f"{r['label']}: {r['bad_kernel_timestamps']} reads had no usable kernel timestamp (user time used)")
    for r in fan:
        if r.get("noise") and r["noise"]["waiters_answered_by_noise"]:
            notes.append(f"{r['label']}: {r['noise']['waiters_answered_by_noise']} waiters answered by unrelated writes")
    for s in scale:
        if s["errors"]:
            notes.append(f"scale: errors {s['errors']}")
    for i in (1, 2, 3):
        n = meta.get(f"server{i}_log_warn_error", "0")
        if n not in ("", "0"):
            notes.append(f"server {i} logged {n} warn/error lines after the cluster formed (grouped below)")
    for f in failed:
        notes.append(f"failed/crashed: {json.dumps(f)}")
    if notes:
        for n in notes:
            p(f"- {n}")
    else:
        p("- No early, wrong or missing responses, no errors, no crashes, no warn/error lines in the server logs.")
    p()
    groups = log_groups(raw, meta, results)
    if groups:
        p("### Warnings and errors in the server logs after the cluster formed")
        p()
        p("Grouped by server, level and message (lines that differ only in numbers count as one; "
          "the first is shown), with the measurement during which they were logged "
          "(`write+Xs` = X s after that round's write was sent).")
        p()
        p("| server | level | count | during | message (first 160 characters) |")
        p("|---|---|---:|---|---|")
        for (srv, lvl, msg), (cnt, when) in groups:
            p(f"| {srv} | {lvl} | {cnt} | {', '.join(sorted(when))} | `{msg[:160]}` |")
        p()


if __name__ == "__main__":
    main()
