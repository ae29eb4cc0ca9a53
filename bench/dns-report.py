#!/usr/bin/env python3
"""Writes bench/RESULTS-dns.md (to stdout) from the raw data of bench/dns.sh.

    dns-report.py RAW_DIR > RESULTS-dns.md

Inputs in RAW_DIR: machine.txt, free.txt, runs.tsv (one line per measured
dnsperf run: system, kind, setting, file, server CPU s, dnsperf CPU s, wall
s, machine busy %, other processes %, busy % before, RSS kB, round, pinned),
checks.tsv, attempts.tsv, rss.tsv, strace-*.txt and the dnsperf outputs
(tp-*, lat-*, fixed-*). Latency percentiles come from dnsperf -v (one line
per query: '> RCODE name type seconds').
"""

import os
import re
import statistics
import sys

from benchlib import fenced, md_header, md_row, percentile as pct, ratio, read_kv, read_text, read_tsv, reproduce

SYSTEMS = ("meshwork", "bind")
LABEL = {"meshwork": "Meshwork", "bind": "BIND 9"}


def parse_summary(path):
    """dnsperf's closing statistics."""
    s = {}
    text = open(path, errors="replace").read()

    def num(pattern, cast=float):
        m = re.search(pattern, text, re.M)
        return cast(m.group(1)) if m else None

    s["sent"] = num(r"^\s*Queries sent:\s+(\d+)", int)
    s["completed"] = num(r"^\s*Queries completed:\s+(\d+)", int)
    s["lost"] = num(r"^\s*Queries lost:\s+(\d+)", int)
    s["qps"] = num(r"^\s*Queries per second:\s+([\d.]+)")
    s["runtime"] = num(r"^\s*Run time \(s\):\s+([\d.]+)")
    m = re.search(r"^\s*Average Latency \(s\):\s+([\d.]+) \(min ([\d.]+), max ([\d.]+)\)", text, re.M)
    s["avg"], s["min"], s["max"] = (float(x) * 1000 for x in m.groups()) if m else (None, None, None)
    sd = num(r"^\s*Latency StdDev \(s\):\s+([\d.]+)")
    s["stddev"] = sd * 1000 if sd is not None else None
    m = re.search(r"^\s*Response codes:\s+(.*)$", text, re.M)
    s["rcodes"] = dict((k, int(v)) for k, v in re.findall(r"([A-Z]+) (\d+) \(", m.group(1))) if m else {}
    m = re.search(r"^\s*Average packet size:\s+request (\d+), response (\d+)", text, re.M)
    s["req_size"], s["resp_size"] = (int(m.group(1)), int(m.group(2))) if m else (None, None)
    m = re.search(r"Command line: (.*)$", text, re.M)
    s["command"] = m.group(1).strip() if m else ""
    return s


def parse_verbose(path):
    """Per-query lines of dnsperf -v."""
    lat, by_type, timeouts = [], {}, 0
    for line in open(path, errors="replace"):
        if not line.startswith("> "):
            continue
        parts = line.split()
        if len(parts) < 4:
            continue
        if parts[1] == "T":
            timeouts += 1
            continue
        if parts[1] == "I":
            continue
        try:
            ms = float(parts[-1]) * 1000
        except ValueError:
            continue
        lat.append(ms)
        by_type.setdefault(parts[-2], []).append(ms)
    lat.sort()
    for v in by_type.values():
        v.sort()
    return {"lat": lat, "by_type": by_type, "timeouts": timeouts}


def fmt(v, digits=3):
    return "–" if v is None else f"{v:,.{digits}f}"


def rcodes_text(d):
    total = sum(d.values())
    return ", ".join(f"{k} {v:,} ({100 * v / total:.2f}%)" for k, v in sorted(d.items())) if total else "–"


class Report:
    def __init__(self, raw):
        self.raw = raw
        self.m = read_kv(raw, "machine.txt")
        self.runs = []
        for r in read_tsv(raw, "runs.tsv"):
            run = {
                "sys": r[0], "kind": r[1], "setting": r[2], "file": os.path.join(raw, r[3]),
                "srv_cpu": float(r[4]), "client_cpu": float(r[5]), "wall": float(r[6]),
                "busy": int(r[7]), "foreign": int(r[8]), "busy_before": r[9], "rss": r[10],
                "round": int(r[11]) if len(r) > 11 else 1, "pinned": r[12] == "1" if len(r) > 12 else False,
                "steal": r[13] if len(r) > 13 else "?",
            }
            run["s"] = parse_summary(run["file"])
            if run["kind"] in ("lat", "fixed"):
                run["v"] = parse_verbose(run["file"])
            self.runs.append(run)
        self.out = []
        self.verdicts = []

    def w(self, line=""):
        self.out.append(line)

    def select(self, sysname, kind, setting, pinned=False):
        return sorted((r for r in self.runs if r["sys"] == sysname and r["kind"] == kind
                       and r["setting"] == setting and r["pinned"] == pinned), key=lambda r: r["round"])

    def table_row(self, label, vals, digits=3, with_ratio=True):
        cells = [v if isinstance(v, str) else fmt(v, digits) for v in vals]
        r = ""
        if with_ratio and all(isinstance(v, (int, float)) for v in vals):
            r = ratio(vals[0], vals[1], suffix="", zero="")
        self.w(md_row([label, cells[0], cells[1], r]))

    def throughput_rows(self, setting, pinned):
        data = {s: self.select(s, "tp", setting, pinned) for s in SYSTEMS}
        if not all(data.values()):
            return None

        def agg(runs):
            s = [r["s"] for r in runs]
            completed = sum(x["completed"] for x in s)
            runtime = sum(x["runtime"] for x in s)
            rc = {}
            for x in s:
                for k, v in x["rcodes"].items():
                    rc[k] = rc.get(k, 0) + v
            return {
                "qps_list": [x["qps"] for x in s],
                "qps_median": statistics.median(x["qps"] for x in s),
                "avg": sum(x["avg"] * x["completed"] for x in s) / completed if completed else None,
                "stddev_max": max(x["stddev"] for x in s),
                "min": min(x["min"] for x in s), "max": max(x["max"] for x in s),
                "completed": completed, "sent": sum(x["sent"] for x in s),
                "lost": sum(x["lost"] for x in s), "rcodes": rc,
                "resp": sum(x["resp_size"] * x["completed"] for x in s) / completed if completed else None,
                "srv_cpu": sum(r["srv_cpu"] for r in runs), "runtime": runtime,
                "client_cpu": sum(r["client_cpu"] for r in runs),
                "noise": [f"{r['busy_before']}/{r['foreign']}/{r['steal']}" for r in runs],
            }

        a = {k: agg(v) for k, v in data.items()}
        mw, bd = a["meshwork"], a["bind"]
        n = len(data["meshwork"])
        self.out += md_header(["", "Meshwork", "BIND 9", "Meshwork / BIND"], "lrrr")
        self.table_row(f"**QPS**, median of {n} runs", [mw["qps_median"], bd["qps_median"]], 0)
        self.table_row("QPS of each run (round 1, 2, …)",
                       [", ".join(f"{q:,.0f}" for q in mw["qps_list"]), ", ".join(f"{q:,.0f}" for q in bd["qps_list"])])
        self.table_row("avg latency, ms (dnsperf, all runs)", [mw["avg"], bd["avg"]])
        self.table_row("min / max latency, ms", [f"{mw['min']:.3f} / {mw['max']:.3f}", f"{bd['min']:.3f} / {bd['max']:.3f}"])
        self.table_row("queries completed / sent", [f"{mw['completed']:,} / {mw['sent']:,}", f"{bd['completed']:,} / {bd['sent']:,}"])
        self.table_row("lost (no answer within 5 s)", [f"{mw['lost']:,}", f"{bd['lost']:,}"])
        self.table_row("response codes", [rcodes_text(mw["rcodes"]), rcodes_text(bd["rcodes"])])
        self.table_row("avg response size, bytes", [mw["resp"], bd["resp"]], 1)
        self.table_row("server CPU, cores busy (CPU s / run s)",
                       [mw["srv_cpu"] / mw["runtime"], bd["srv_cpu"] / bd["runtime"]], 2)
        self.table_row("queries per server CPU-second",
                       [mw["completed"] / mw["srv_cpu"], bd["completed"] / bd["srv_cpu"]], 0)
        self.table_row("dnsperf CPU, µs per query",
                       [1e6 * mw["client_cpu"] / mw["completed"], 1e6 * bd["client_cpu"] / bd["completed"]], 1)
        self.table_row("busy % before / other processes % / steal % (each run)",
                       [", ".join(mw["noise"]), ", ".join(bd["noise"])])
        every = all(x >= y for x, y in zip(mw["qps_list"], bd["qps_list"]))
        none = all(x < y for x, y in zip(mw["qps_list"], bd["qps_list"]))
        return mw["qps_median"], bd["qps_median"], "every round" if every else ("no round" if none else "some rounds")

    def latency_rows(self, kind, setting):
        data = {s: self.select(s, kind, setting) for s in SYSTEMS}
        if not all(data.values()):
            return None
        d = {k: v[0] for k, v in data.items()}
        mw, bd = d["meshwork"], d["bind"]
        title = "latency run (`-v`)" if kind == "lat" else "fixed-rate run (`-v`)"
        self.table_row(f"QPS, {title}", [mw["s"]["qps"], bd["s"]["qps"]], 0)
        self.table_row("queries measured", [f"{len(mw['v']['lat']):,}", f"{len(bd['v']['lat']):,}"])
        self.table_row("avg latency, ms", [mw["s"]["avg"], bd["s"]["avg"]])
        res = {}
        for p, bold in ((50, True), (90, False), (99, True), (99.9, False)):
            vals = [pct(mw["v"]["lat"], p), pct(bd["v"]["lat"], p)]
            res[p] = vals
            self.table_row(("**p%s**" if bold else "p%s") % (f"{p:g}") + ", ms", vals)
        self.table_row("max, ms", [mw["v"]["lat"][-1] if mw["v"]["lat"] else None,
                                   bd["v"]["lat"][-1] if bd["v"]["lat"] else None])
        for t in ("A", "SRV"):
            vals = []
            for x in (mw, bd):
                lt = x["v"]["by_type"].get(t, [])
                vals.append(f"{pct(lt, 50):.3f} / {pct(lt, 99):.3f}" if lt else "–")
            self.table_row(f"p50 / p99 {t} only, ms", vals)
        self.table_row("lost / response codes", [f"{x['s']['lost']} / {rcodes_text(x['s']['rcodes'])}" for x in (mw, bd)])
        self.table_row("server CPU, cores busy", [x["srv_cpu"] / x["s"]["runtime"] for x in (mw, bd)], 2)
        self.table_row("busy % before / other processes % / steal %",
                       [f"{x['busy_before']} / {x['foreign']} / {x['steal']}" for x in (mw, bd)])
        return res[99]

    def commands(self, setting, kinds, pinned=False):
        for kind in kinds:
            runs = self.select("meshwork", kind, setting, pinned)
            if runs and runs[0]["s"]["command"]:
                pre = "taskset -c 0 " if pinned else ""
                self.w(f"- {kind}: `{pre}{runs[0]['s']['command']}`")
        self.w("")

    def render(self):
        m, w = self.m, self.w
        noise = m.get("noise_pct", "10")
        if m.get("acl") == "1":
            w("# DNS benchmark: Meshwork with ACLs vs BIND 9")
            w()
            w("Meshwork runs with ACLs on (default deny) and answers DNS as its configured DNS "
              "token (`[acl.tokens] dns`), whose policy reads every service and node: each query "
              "resolves that token and checks the service and every instance's node. "
              "`ACL=1 bash bench/dns.sh`; the run without ACLs is `RESULTS-dns.md`.")
        else:
            w("# DNS benchmark: Meshwork vs BIND 9")
        w()
        w("Generated by `bench/dns.sh` (tables by `bench/dns-report.py` from the raw data); "
          "the section \"What this run says\" at the end is written by hand for the run it "
          "describes and has to be rewritten after a new run.")
        w()
        self.out += reproduce("## Reproduce", ("sudo ACL=1 bash bench/dns.sh  " if m.get("acl") == "1" else "sudo bash bench/dns.sh        ") + "# from the repository root; ~7 minutes plus the build")
        w(f"This run: {m.get('date_utc', '?')}, {m.get('elapsed_s', '?')} s including the build; "
          f"git `{m.get('git_rev', '?')}` ({m.get('git_dirty_files', '?')} files changed outside "
          f"bench/ in the work tree). Knobs: DURATION={m.get('duration')} ROUNDS={m.get('rounds')} "
          f"LAT_DURATION={m.get('lat_duration')} WARMUP={m.get('warmup')} "
          f"SETTINGS=\"{m.get('settings')}\" PINNED_SETTINGS=\"{m.get('pinned_settings')}\" "
          f"FIXED_QPS={m.get('fixed_qps')} FIXED_SETTING={m.get('fixed_setting')} EDNS={m.get('edns')}. "
          "Raw dnsperf output (with per-query latencies), server logs, BIND's config and zone: "
          "`RAW_DIR` (default `/tmp/meshwork-bench-dns`, outside the repository).")
        w()
        w("## Machine")
        w()
        w(f"- `nproc`: {m.get('nproc')}; CPU: {m.get('cpu_model')}; kernel {m.get('kernel')}; "
          f"load average before the run {m.get('loadavg_before')}")
        w(f"- dnsperf {m.get('dnsperf_version')}; {m.get('bind_version')}; "
          f"meshwork-registry {m.get('meshwork_version')} (release build)")
        w(f"- threads: Meshwork {m.get('meshwork_threads', '?')} OS threads in all (tokio runtime, "
          f"Raft, HTTP, …); named {m.get('bind_threads_running', '?')} OS threads (default: one worker per CPU)")
        w()
        w("`free -h`:")
        w()
        self.out += fenced(read_text(self.raw, "free.txt", "?").rstrip())
        w()
        w("The machine is shared with other engineers' builds and test runs. Before every "
          "measured run the script waits (up to QUIET_WAIT_S) for two 2-second samples of "
          "`/proc/stat` below 15% busy. Each table gives the machine's busy % just before the "
          "run and the share of the machine's CPU used during the run by processes other than "
          f"the measured server and dnsperf (CPU time stolen by the hypervisor counts here too, "
          f"and is also given alone as \"steal\"); a run with more than {noise}% of \"other "
          f"processes\" is repeated (at most {self.m.get('max_attempts', '3')} tries) and the "
          "quietest try is kept. (`/proc/stat` is tick-sampled, so at low load the estimate "
          "under-counts and is clamped at 0.)")
        w()
        w("## Setup")
        w()
        w("- Both servers on 127.0.0.1, UDP, started and stopped by the script. **Meshwork**: one "
          "`--dev` server; 10 instances of `web` registered with `PUT /v1/catalog/register` "
          "(node hostN at 198.18.1.N, port 800N, a passing check). **BIND**: `named -g` "
          "(foreground), authoritative for `mesh.` with the same records — 10 A and 10 SRV "
          "`1 1 800N hostN.node.dc1.mesh.` at `web.service.mesh.`, an A record for each target — "
          "`recursion no`, `minimal-responses no-auth` (no NS records in the authority section "
          "but additional A records for SRV targets, as Meshwork answers), `rrset-order random` "
          "(Meshwork shuffles each answer too), TTL 0 everywhere (Meshwork's default).")
        w("- Query file: `web.service.mesh A` and `web.service.mesh SRV`, alternating (50/50). "
          + ("dnsperf `-e` (EDNS0): both servers return the full SRV answer with 10 additional "
             "A records (596 bytes) and the A answer with 10 records (205 bytes); both byte-for-byte "
             "the same size." if m.get("edns") == "1" else "No EDNS: answers are limited to 512 bytes."))
        w("- **Throughput runs**: `dnsperf -l DURATION -c CLIENTS -q OUTSTANDING -t 5`, a closed "
          "loop (at most OUTSTANDING queries in flight over CLIENTS sockets), ROUNDS runs per system "
          "with the order of the systems alternating, after a warm-up. dnsperf 2.10 reports QPS, "
          "average/min/max/stddev latency, no percentiles. dnsperf runs on the same 2 CPUs as the "
          "server, so client and server compete for CPU; the **pinned** setting avoids that by "
          "putting the server (all threads) on CPU 1 and dnsperf on CPU 0 with `taskset`.")
        w("- **Latency runs**: the same closed loop with `-v`: dnsperf prints every query's rcode and "
          "latency, from which p50/p90/p99/p99.9 are computed. `-v` costs dnsperf a write() per "
          "query, so QPS differs from the throughput runs; both systems get the same client.")
        w("- **Fixed-rate run**: `-Q FIXED_QPS -v`, an offered load far below both servers' capacity: "
          "the latency of one query without queueing.")
        w("- CPU: utime+stime of the server process (all threads) from `/proc/PID/stat`; "
          "dnsperf's from `time`. *Queries per server CPU-second* is less sensitive to the "
          "machine being shared than QPS.")
        w()
        w("## Results")
        w()
        for setting in [s for s in m.get("settings", "").split() if s]:
            c, q = setting.split(":")
            w(f"### `-c {c} -q {q}`: closed loop, {q} queries in flight over {c} socket{'s' if c != '1' else ''}")
            w()
            tp = self.throughput_rows(setting, False)
            p99 = self.latency_rows("lat", setting)
            w()
            self.commands(setting, ("tp", "lat"))
            self.verdicts.append((f"`-c {c} -q {q}`", tp, p99))
        for setting in [s for s in m.get("pinned_settings", "").split() if s]:
            c, q = setting.split(":")
            if not self.select("meshwork", "tp", setting, True):
                continue
            w(f"### `-c {c} -q {q}`, pinned: server on CPU 1, dnsperf on CPU 0")
            w()
            tp = self.throughput_rows(setting, True)
            w()
            self.commands(setting, ("tp",), True)
            self.verdicts.append((f"`-c {c} -q {q}` pinned", tp, None))
        fs = m.get("fixed_setting", "4:100")
        if m.get("fixed_qps", "0") != "0" and self.select("meshwork", "fixed", fs):
            c, q = fs.split(":")
            w(f"### Fixed rate: `-Q {m.get('fixed_qps')} -c {c} -q {q}`")
            w()
            self.out += md_header(["", "Meshwork", "BIND 9", "Meshwork / BIND"], "lrrr")
            p99 = self.latency_rows("fixed", fs)
            w()
            self.commands(fs, ("fixed",))
            self.verdicts.append((f"`-Q {m.get('fixed_qps')}`", None, p99))

        w("### Targets: QPS ≥ BIND's, p99 ≤ BIND's")
        w()
        w("| setting | QPS Meshwork / BIND (median) | QPS ≥ BIND | p99 Meshwork / BIND, ms | p99 ≤ BIND |")
        w("|---|---:|---|---:|---|")
        for label, tp, p99 in self.verdicts:
            if tp:
                qcell = f"{tp[0]:,.0f} / {tp[1]:,.0f} ({tp[0] / tp[1]:.2f}x)"
                qv = ("met" if tp[0] >= tp[1] else "**not met**") + f" ({tp[2]})"
            else:
                qcell, qv = "–", "–"
            if p99 and None not in p99:
                pcell = f"{p99[0]:.3f} / {p99[1]:.3f} ({p99[0] / p99[1]:.2f}x)"
                pv = "met" if p99[0] <= p99[1] else "**not met**"
            else:
                pcell, pv = "–", "–"
            w(f"| {label} | {qcell} | {qv} | {pcell} | {pv} |")
        w()
        self.strace_section()
        self.checks_section()
        w("## What this run says")
        w()
        w("_(hand-written after the run)_")
        return "\n".join(self.out)

    def strace_section(self):
        rows = []
        for sysname in SYSTEMS:
            path = os.path.join(self.raw, f"strace-{sysname}.txt")
            dp = os.path.join(self.raw, f"strace-dnsperf-{sysname}.txt")
            if not (os.path.exists(path) and os.path.exists(dp)):
                continue
            done = parse_summary(dp).get("completed") or 0
            calls = {}
            for line in open(path):
                parts = line.split()
                if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] not in ("total",):
                    try:
                        n = int(parts[3])
                        errors = int(parts[4]) if len(parts) == 6 else 0
                    except ValueError:
                        continue
                    calls[parts[-1]] = (n, errors)
            if done and calls:
                top = [kv for kv in sorted(calls.items(), key=lambda kv: -kv[1][0]) if kv[1][0] / done >= 0.01]
                rows.append((sysname, done, sum(v[0] for v in calls.values()), top))
        if not rows:
            return
        self.w("### Diagnostic: system calls per query")
        self.w()
        self.w(f"`strace -c -f` attached to each server during a separate {self.m.get('fixed_qps')} qps "
               "run (strace slows the server down; only the counts matter). Calls per answered "
               "query; in brackets, those that failed (EAGAIN: a receive that found no packet).")
        self.w()
        for sysname, done, total, top in rows:
            self.w(f"- {LABEL[sysname]}: {done:,} queries, {total / done:.1f} syscalls per query: "
                   + ", ".join(f"{name} {n / done:.2f}" + (f" ({e / done:.2f} failed)" if e else "")
                               for name, (n, e) in top))
        self.w()

    def checks_section(self):
        w = self.w
        checks = read_tsv(self.raw, "checks.tsv")
        w("## Answer checks")
        w()
        fails = [c for c in checks if len(c) >= 5 and c[3] == "FAIL"]
        w(f"`bench/dns-check.py` (its own DNS client, not dnsperf) before and after the load, and "
          f"25 A + 25 SRV queries in the middle of every throughput run: **{len(fails)} failed "
          "checks**. `info` marks behaviour that differs between the servers without being wrong "
          "in itself.")
        w()
        before_after = [c for c in checks if len(c) >= 5 and c[0] in ("before", "after")]
        during = [c for c in checks if len(c) >= 5 and c[0].startswith("during")]
        w("| when | system | check | result | detail |")
        w("|---|---|---|---|---|")
        for c in before_after:
            if c[0] == "after" and c[3] == "ok":
                continue
            w(f"| {c[0]} | {LABEL.get(c[1], c[1])} | {c[2]} | {c[3]} | {c[4]} |")
        w()
        after = [c for c in before_after if c[0] == "after"]
        if after:
            w(f"After the load: {sum(1 for c in after if c[3] == 'ok')} checks ok "
              f"(not repeated above), {sum(1 for c in after if c[3] == 'FAIL')} failed, "
              f"{sum(1 for c in after if c[3] == 'info')} info (shown above).")
            w()
        if during:
            for sysname in SYSTEMS:
                mine = [c for c in during if c[1] == sysname]
                bad = [c for c in mine if c[3] != "ok"]
                w(f"- During the load, {LABEL[sysname]}: {len(mine) - len(bad)} of {len(mine)} mid-run "
                  "checks fully correct" + (": " + "; ".join(f"{c[0]}: {c[4]}" for c in bad) if bad else "")
                  + ".")
            w()
        rss = {r[0]: (r[1], r[2]) for r in read_tsv(self.raw, "rss.tsv")}
        if rss:
            w("Memory at the end (VmRSS / VmHWM): " + "; ".join(
                f"{LABEL[s]} {int(a) / 1024:.1f} / {int(b) / 1024:.1f} MiB" for s, (a, b) in rss.items()) + ".")
            w()
        attempts = read_tsv(self.raw, "attempts.tsv")
        rep = [f"{LABEL.get(a[0], a[0])} {a[1]} {a[2]}{' pinned' if a[3] == '1' else ''}"
               + (f" round {a[4]}" if a[1] == "tp" else "") + f" ({a[5]} tries, kept try {a[6]})"
               for a in attempts if len(a) >= 7 and a[5] != "1"]
        w("Runs repeated because other processes were busy: " + ("; ".join(rep) if rep else "none") + ".")
        w()


def main():
    print(Report(sys.argv[1]).render())


if __name__ == "__main__":
    main()
