#!/usr/bin/env python3
"""Writes bench/RESULTS-watch.md (to stdout) from the raw data of bench/watch.sh.

usage: watch-report.py RAW_DIR
       watch-report.py --line JSON          one-line summary of one round (for the log)
       watch-report.py --noisy JSON PCT     exit 0 if other processes used more than
                                            PCT % of the machine during the round's
                                            write/delivery window

Only numbers measured in that run are printed.
"""

import json
import re
import statistics
import sys

from benchlib import fenced, fmt, mib, read_jsonl, read_kv, read_text, read_tsv, reproduce, strip_ansi

SYSTEMS = ("meshwork", "etcd")
NAMES = {"meshwork": "Meshwork", "etcd": "etcd"}
MODE_NAMES = {"full": "full client", "light": "light client"}
SIDECAR_TARGET_KIB = 8 * 1024


def st(r, key="from_ack_ms"):
    return r.get(key) or {}


def mode(r):
    """The load tool's client mode of a run (runs from before the modes were full)."""
    return r.get("client") or r.get("meta", {}).get("client") or "full"


def rnd(r):
    return int(r.get("meta", {}).get("round", 0) or 0)


def seq(r):
    return int(r.get("meta", {}).get("seq", 0) or 0)


def med(v):
    return statistics.median(v) if v else None


def one_line(r):
    if r.get("kind") != "round":
        return f"  {r.get('label', '?')}: FAILED: {r.get('error', json.dumps(r)[:200])}"
    a, s = st(r), st(r, "from_send_ms")
    cpu = r["cpu"]["fanout"]
    return (f"  {r['label']} ({mode(r)} client): received {r['received']}/{r['n']} (subscribed {r['subscribed']}, "
            f"setup {r['setup_s']:.1f}s); from ack p50 {a.get('p50')} p99 {a.get('p99')} "
            f"max {a.get('max')} min {a.get('min')} ms; from send p99 {s.get('p99')} ms; "
            f"write RTT {r.get('write_rtt_ms')} ms; errors {r['errors']}; "
            f"RSS growth {per_1k(r)[0]:.0f} KiB/1k subs; other processes {cpu['foreign_pct']}%")


def noisy(r, limit):
    if r.get("kind") != "round":
        return False
    c = r["cpu"]["fanout"]
    return c.get("foreign_pct", 0) > limit


def per_1k(r):
    """(KiB of server RSS growth per 1,000 subscribers over all servers, per-server list)."""
    b = r["mem"]["before"]["rss_kb"]
    h = r["mem"]["held"]["rss_kb"]
    grow = [y - x for x, y in zip(b, h)]
    n = r["subscribed"] or r["n"]
    ns = len(grow)
    per = []
    for i, g in enumerate(grow):
        subs = len(range(i, n, ns))
        per.append(1000.0 * g / subs if subs else None)
    return (1000.0 * sum(grow) / n if n else 0.0, per, grow)


read = read_text
jsonl = read_jsonl


def log_lines(raw, prefix, m):
    """Warn/error/panic lines of a system's logs (Meshwork text logs, etcd zap JSON)
    after the clusters formed, and how many there were before."""
    out, before = [], 0
    for i in (1, 2, 3):
        base = int(m.get(f"{prefix}_log_base_{i}", "0") or 0)
        for k, line in enumerate(read(raw, f"{prefix}-{i}.log").splitlines()):
            clean = strip_ansi(line)
            if re.search(r"\b(WARN|ERROR)\b|\"level\":\"(warn|error|fatal|panic)\"|panic", clean):
                if k < base:
                    before += 1
                else:
                    out.append((i, clean))
    return out, before


def main():
    if len(sys.argv) >= 3 and sys.argv[1] == "--line":
        print(one_line(json.loads(sys.argv[2])))
        return
    if len(sys.argv) >= 4 and sys.argv[1] == "--noisy":
        sys.exit(0 if noisy(json.loads(sys.argv[2]), float(sys.argv[3])) else 1)
    raw = sys.argv[1]
    report(raw)


def cost_of(raw, c):
    """(server us per subscriber per change, tool us per message) from cpu.sh's output."""
    text = read(raw, f"cost-{c}.txt")
    srv = re.search(r"-> ([0-9.]+) us CPU per subscriber per change", text)
    tool = re.search(r"-> ([0-9.]+) us CPU per message received", text)
    return (float(srv.group(1)) if srv else None, float(tool.group(1)) if tool else None, text)


def cost_section(p, raw, m, modes, by, summary, n):
    """What one message costs the server and the load tool, and the p99 floor that sets."""
    p("## What one message costs, and the floor that sets")
    p()
    if int(m.get("cost_w", "0") or 0) <= 0:
        p("Not measured (`COST_W=0`).")
        p()
        return
    cores = int(m.get("nproc", "2") or 2)
    p(f"Steady state, measured after the rounds with `bench/watch-fanout/cpu.sh {m.get('cost_n')} "
      f"{m.get('cost_w')}` in each client mode: one `meshwork-registry --dev` holding "
      f"{int(m.get('cost_n', 0)):,} streams of the load tool over {m.get('conns')} connections (one server's "
      f"share in the rounds), {m.get('cost_w')} topic changes 200 ms apart; CPU from `/proc/PID/stat` of the "
      "server and of the load tool around the changes, less the same writes with no subscribers (server) and "
      "an idle hold as long as the writes took (both). Beside it, the same per message in the rounds "
      "themselves: the load tool's and the three servers' CPU over the write+fan-out window (which also "
      "holds 1 s of idle streams, and is read in 10 ms ticks) divided by the messages delivered, median of "
      "the rounds; a burst of 10,000 messages at once costs more per message than the steady state.")
    p()
    p(f"A model, not a proof: the change cannot reach a subscriber before the write is sent, and the load "
      f"tool has to take in 99 % of the {n:,} messages on at most {cores} cores. At its steady-state cost "
      f"(the lower of the two) that alone takes 0.99 × {n:,} × (tool µs per message) / {cores} after the "
      "send, whatever the servers cost: the *floor*; less the write's round trip, the floor from the "
      "acknowledgement. Adding the servers' cost on the same cores gives the CPU-bound *estimate*. The "
      "measured p99 exceeds the estimate when the cores are not kept busy the whole time: each server's "
      "fan-out runs on one thread, and its connection tasks, woken by the first stream's frame, run only "
      "after every stream task the change woke before them (tokio runs woken tasks in order), so the "
      "load tool waits at the start while the servers wait at the end.")
    p()
    p("| client | server µs per subscriber per change, steady / in the rounds | load tool µs per message, "
      "steady / in the rounds | floor from send ms | Meshwork write RTT, median ms | floor from ack ms "
      "| estimate from send ms | measured Meshwork p99 from send / from ack, median ms | etcd p99 from ack, "
      "median ms |")
    p("|---|---|---|---:|---:|---:|---:|---|---:|")
    findings = []
    for c in modes:
        srv, tool, text = cost_of(raw, c)
        mw, et = summary.get((c, "meshwork")), summary.get((c, "etcd"))
        runs = by.get((c, "meshwork"), [])
        rtts = [x.get("write_rtt_ms") for x in runs if x.get("write_rtt_ms") is not None]
        got = [x for x in runs if st(x) and st(x).get("n")]
        tool_round = med([x["cpu"]["fanout"]["client_s"] * 1e6 / st(x)["n"] for x in got])
        srv_round = med([sum(x["cpu"]["fanout"]["servers_s"]) * 1e6 / st(x)["n"] for x in got])
        if srv is None or tool is None or not (mw and et) or not rtts or et["p99_med"] is None:
            p(f"| {c} | {fmt(srv, 2)} / {fmt(srv_round, 2)} | {fmt(tool, 2)} / {fmt(tool_round, 2)} "
              "| – | – | – | – | – | – |")
            if srv is None or tool is None:
                last = text.strip().splitlines()[-1][:200] if text.strip() else "empty"
                findings.append(f"- {MODE_NAMES.get(c, c)}: the steady-state measurement failed "
                                f"(`cost-{c}.txt`: {last}).")
            continue
        rtt = med(rtts)
        floor_send = 0.99 * n * tool / cores / 1000
        floor_ack = floor_send - rtt
        est = 0.99 * n * (srv + tool) / cores / 1000
        p(f"| {c} | {srv:.2f} / {fmt(srv_round, 2)} | {tool:.2f} / {fmt(tool_round, 2)} | {floor_send:.1f} | "
          f"{fmt(rtt)} | {floor_ack:.1f} | {est:.1f} | {fmt(mw['s99_med'])} / {fmt(mw['p99_med'])} | "
          f"{fmt(et['p99_med'])} |")
        target = et["p99_med"]
        eruns = by.get((c, "etcd"), [])
        ertt = med([x.get("write_rtt_ms") for x in eruns if x.get("write_rtt_ms") is not None])
        early = sum(int(x.get("received_before_ack") or 0) for x in eruns)
        total = sum(int(st(x).get("n") or 0) for x in eruns if st(x))
        etcd_ack = (f"etcd acknowledged its write after a median {fmt(ertt)} ms, and {early:,} of its "
                    f"{total:,} subscriber-rounds had the change before that acknowledgement arrived")
        if floor_ack > target:
            findings.append(
                f"- **{MODE_NAMES.get(c, c)}: out of reach on this machine, by the model.** The load tool "
                f"alone needs at least {tool:.2f} µs of CPU per message, so even servers that cost nothing "
                f"would leave Meshwork's p99 ≥ {floor_send:.1f} ms after the send and ≥ {floor_ack:.1f} ms "
                f"after its acknowledgement (median round trip {fmt(rtt)} ms), against etcd's {fmt(target)} ms; "
                f"{etcd_ack}.")
        else:
            budget = (target + rtt) * cores * 1000 / (0.99 * n) - tool
            optimistic = (f"the model is optimistic here: the measured p99 from the send was "
                          f"{fmt(mw['s99_med'])} ms against its estimate of {est:.1f} ms")
            if budget >= srv:
                servers = (f"The model's budget for the servers, {budget:.2f} µs per subscriber per change, is "
                           f"above their steady-state cost ({srv:.2f}), but {optimistic}.")
            else:
                servers = (f"Even by the model the servers would have to cost at most {max(budget, 0):.2f} µs "
                           f"per subscriber per change, against {srv:.2f} now, and {optimistic}.")
            findings.append(
                f"- {MODE_NAMES.get(c, c)}: not excluded by the load tool's cost alone (floor {floor_ack:.1f} ms "
                f"from the acknowledgement vs etcd's {fmt(target)} ms); {etcd_ack}. {servers}")
    p()
    for f in findings:
        p(f)
    p()


def report(raw):
    lines = []
    p = lambda s="": lines.append(s)  # noqa: E731

    m = read_kv(raw, "machine.txt")
    results = jsonl(raw, "results.jsonl")
    discarded = jsonl(raw, "discarded.jsonl")
    rounds = [r for r in results if r.get("kind") == "round"]
    failed = [r for r in results if r.get("kind") != "round"]
    quiet = read_tsv(raw, "quiet.tsv")
    rss = read_tsv(raw, "rss.tsv")
    side = {}
    side_samples = []
    for l in read(raw, "sidecar.tsv").splitlines():
        f = l.split("\t")
        if f[0] == "sample":
            side_samples.append((int(f[1]), int(f[2] or 0), int(f[3] or 0)))
        elif len(f) >= 2:
            side[f[0]] = f[1]
    modes = [x for x in m.get("client_modes", "").split() if x]
    for r in rounds:
        if mode(r) not in modes:
            modes.append(mode(r))
    # Runs in the order they were made (round, then place in the round).
    rounds.sort(key=lambda r: (rnd(r), seq(r), modes.index(mode(r)), r["system"] != "meshwork"))
    by = {(c, s): [r for r in rounds if r["system"] == s and mode(r) == c] for c in modes for s in SYSTEMS}
    n = int(m.get("subscribers", "10000"))
    conns = m.get("conns", "32")

    p("# Watch fan-out: Meshwork vs etcd 3.4")
    p()
    p(f"Generated by `bench/watch.sh` on {m.get('date_utc', '?')} (Meshwork {m.get('meshwork_version', '?')}, "
      f"git {m.get('git_rev', '?')}{' + ' + m['git_dirty'] + ' uncommitted changes outside bench/' if m.get('git_dirty', '0') not in ('', '0') else ''}; "
      f"registry binary built {m.get('meshwork_binary_mtime', '?')}). Every number below was measured "
      f"in that one run ({m.get('total_s', '?')} s in all, builds included).")
    p()
    lines += reproduce("Reproduce (as root, from the repository root; installs `etcd-server`, `etcd-client`, "
                       "and for the load tool's etcd client `protobuf-compiler` + `libprotobuf-dev`, with "
                       "apt-get if missing):", "bash bench/watch.sh")
    p(f"Parameters: `SUBSCRIBERS={n} CONNS={conns} ROUNDS={m.get('rounds')} "
      f"CLIENT_MODES=\"{m.get('client_modes', 'full')}\" TIMEOUT_S={m.get('timeout_s')} "
      f"SETUP_TIMEOUT_S={m.get('setup_timeout_s')} OPEN_CONCURRENCY={m.get('open_concurrency')} "
      f"SETTLE_MS={m.get('settle_ms')} HOLD_MS={m.get('hold_ms')} SIDECAR_IDLE_S={m.get('sidecar_idle_s')} "
      f"NOISE_PCT={m.get('noise_pct')}`{(' MW_EXTRA_ARGS=`' + m['mw_extra_args'] + '`') if m.get('mw_extra_args') else ''}. "
      "Raw JSON per round, `/proc` samples, configs and server logs: `bench/out/watch/` (git-ignored; or `RAW_DIR`).")
    p()

    # ------------------------------------------------------------ setup
    p("## Machine and setup")
    p()
    p(f"- {m.get('nproc')} cores ({m.get('cpu_model')}), {int(m.get('mem_total', '0 kB').split()[0]) // 1024} MiB RAM, "
      f"{m.get('os')}, kernel {m.get('kernel')}; data dirs on {m.get('fs')}; open-file limit {m.get('nofile')}; "
      f"load average at start {m.get('loadavg_before')}, at the end {m.get('loadavg_after', '?')}.")
    p(f"- etcd {m.get('etcd_version')} (Debian `etcd-server`, {m.get('etcd_go')}), three members, default settings "
      f"except `--logger zap --log-level warn`. Meshwork: three `meshwork-registry` servers, release build, "
      f"default settings, `--log-level warn`. Both clusters run at the same time on 127.0.0.1 (the idle one "
      f"uses next to no CPU; its CPU is not counted as \"other processes\").")
    p(f"- Load tool `bench/watch-fanout` (Rust, {m.get('rustc', '').split(' (')[0]}, tokio multi-threaded runtime "
      f"on both cores; {m.get('tool_deps', '').strip()}), one process per run, on the same machine. "
      f"Subscriber i goes to server i mod 3 and uses connection (i / 3) mod {conns} of that server: "
      f"{n:,} streams multiplexed over {conns} HTTP/2 connections per server, for both systems and both client "
      "modes.")
    p("- The topic and the write, the same in both client modes:")
    p("  - Meshwork: one `meshwork.v1.Watch/Subscribe` stream per subscriber, topic `service { name: \"web\", "
      "passing_only: false }`, `since_index` 0. The topic holds 3 `web` instances. The write: "
      "`PUT /v1/catalog/register` of a new `web` instance over HTTP/1.1. The instance is deregistered after "
      "the run.")
    p("  - etcd: one `Watch` gRPC stream per watcher on the key `/bench/web` (a `WatchRequest` with one "
      "`create_request` for the key). The write: a KV `Put` of the key over gRPC with the `etcd-client` crate "
      "(the value is the same JSON as Meshwork's registration body).")
    p("  - The write goes through member ((round − 1) mod 3) + 1 in both systems and modes, over a connection "
      "opened before the subscribers and used once (a read) just before the write. Every run opens fresh "
      "streams and closes them at the end.")
    p("- Two client modes for the subscribers (`--client` of the load tool); every round runs each mode for "
      "both systems:")
    p("  - **full client**: each system's usual Rust client. Meshwork: tonic's `WatchClient` generated from "
      "`proto/meshwork/v1/watch.proto` (protox + tonic-prost-build); subscribed = END_OF_SNAPSHOT received; "
      "received = a CHANGE carrying an endpoint with the new service ID. etcd: the `etcd-client` crate's "
      "`watch` (one gRPC stream per call) over `Client`s that each hold one connection to one member; "
      "subscribed = the `created` response; received = an event for the key with the written value. Every "
      "message is decoded with prost; the two clients are different code (tonic `Streaming` vs etcd-client's "
      "stream wrapper and request channel).")
    p("  - **light client**: the SAME code for both systems (`bench/watch-fanout/src/light.rs`): gRPC over raw "
      "HTTP/2 with the `h2` crate (hyper's default HTTP/2 settings, as tonic uses), one stream per subscriber "
      "with `content-type: application/grpc` and `te: trailers`, the request message encoded once up front "
      "(prost, the generated `SubscribeRequest` / etcd-client's `WatchRequest`) and sent as the only DATA; then "
      "it reads DATA frames, releases their flow-control capacity as it reads, splits them into messages by "
      "the 5-byte gRPC length prefixes (messages split across frames are reassembled) and decodes nothing: "
      "subscribed = the first message whose top-level varint field `kind` = END_OF_SNAPSHOT (Meshwork) / "
      "`created` = true (etcd); received = the first later message containing the new instance's service ID "
      "(Meshwork) / the written value (etcd). The only differences between the systems are the method path, "
      "the request bytes and these byte markers. It does not classify the other messages it skips (snapshot, "
      "heartbeats), so unlike the full client it counts no \"unexpected events\".")
    p("  - Order within a round: the modes alternate which goes first from round to round, and the system "
      "order inside a mode alternates too, so neither a system nor a mode always runs first (`run` column).")
    p("- Latency = the instant the subscriber's task got the change from its stream (`Instant::now()` right "
      "after the message is decoded (full) / right after the DATA frame is read (light)) − the instant the "
      "write's response arrived (acknowledgement); also shown from the instant the write was sent. These are "
      "user-space timestamps of the load tool, so they include the tool's own work on "
      f"{n:,} messages on 2 cores shared with the servers: the full clients spend much more CPU per message "
      "than the light one (see CPU), so the light client's numbers show more of the servers. A subscriber can "
      "get the change before the acknowledgement arrives (negative values).")
    p(f"- Memory: each server's VmRSS (`/proc/PID/status`) just before the subscribers connect and "
      f"{m.get('settle_ms')} ms after the last one is subscribed (all held); RSS per 1,000 subscribers = "
      "growth of the three servers together × 1,000 / subscribers. Kernel socket memory is not in VmRSS.")
    p("- `free -h` at start:")
    p()
    lines += fenced(read(raw, "free.txt").rstrip())
    p()

    # ------------------------------------------------------------ latency
    p("## Fan-out latency, per run")
    p()
    p("Milliseconds from the write's acknowledgement to each subscriber receiving the change "
      "(p50 / p99 / max over the subscribers that received it; min may be negative). Runs in the order they "
      "were made.")
    p()
    p("| round | run | client | system | write via | received / N | p50 ms | p99 ms | max ms | min ms | "
      "got it before the ack | write RTT ms | from send: p50 / p99 / max ms | subscribe all s | errors | "
      "other processes % |")
    p("|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rounds:
        a, s = st(r), st(r, "from_send_ms")
        ws = r["write_server"]
        role = "leader" if str(ws) == r["meta"].get("leader") else "follower"
        p(f"| {rnd(r)} | {seq(r) or '–'} | {mode(r)} | {NAMES[r['system']]} | member {ws} ({role}) | "
          f"{r['received']:,} / {r['n']:,} | {fmt(a.get('p50'))} | {fmt(a.get('p99'))} | {fmt(a.get('max'))} | "
          f"{fmt(a.get('min'))} | {r.get('received_before_ack', '–')} | {fmt(r.get('write_rtt_ms'))} | "
          f"{fmt(s.get('p50'))} / {fmt(s.get('p99'))} / {fmt(s.get('max'))} | {r['setup_s']:.2f} | "
          f"{r['errors']} | {r['cpu']['fanout']['foreign_pct']} |")
    p()
    p("Per server (p50 / p99 / max ms from the acknowledgement; subscriber i is on server i mod 3):")
    p()
    p("| round | client | system | server 1 | server 2 | server 3 |")
    p("|---|---|---|---|---|---|")
    for r in rounds:
        cells = []
        for x in r.get("from_ack_ms_per_server") or []:
            cells.append("–" if not x else f"{fmt(x['p50'])} / {fmt(x['p99'])} / {fmt(x['max'])} (n={x['n']})")
        p(f"| {rnd(r)} | {mode(r)} | {NAMES[r['system']]} | " + " | ".join(cells) + " |")
    p()

    summary = {}
    p("### Summary over the rounds, per client mode")
    p()
    p("| client | system | rounds | received (all rounds) | p50 ms, median of rounds | p99 ms, median of rounds | "
      "p99 ms, worst round | max ms, worst round | from send: p50 median ms | from send: p99 median / worst ms | "
      "write RTT ms, median |")
    p("|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for c in modes:
        for s in SYSTEMS:
            rs = by[(c, s)]
            if not rs:
                p(f"| {c} | {NAMES[s]} | 0 | – | – | – | – | – | – | – | – |")
                continue
            ok = [r for r in rs if st(r)]
            p50 = [st(r)["p50"] for r in ok]
            p99 = [st(r)["p99"] for r in ok]
            mx = [st(r)["max"] for r in ok]
            s50 = [st(r, "from_send_ms")["p50"] for r in ok]
            s99 = [st(r, "from_send_ms")["p99"] for r in ok]
            rtt = [r["write_rtt_ms"] for r in ok if r.get("write_rtt_ms") is not None]
            rec = sum(r["received"] for r in rs)
            tot = sum(r["n"] for r in rs)
            summary[(c, s)] = dict(p50_med=med(p50), p99_med=med(p99), p99_worst=max(p99) if p99 else None,
                                   s50_med=med(s50), s99_med=med(s99),
                                   all_received=rec == tot and len(ok) == len(rs), rec=rec, tot=tot,
                                   p99s=p99, rtt_med=med(rtt))
            p(f"| {c} | {NAMES[s]} | {len(rs)} | {rec:,} / {tot:,} | {fmt(med(p50))} | "
              f"{fmt(med(p99))} | {fmt(max(p99) if p99 else None)} | {fmt(max(mx) if mx else None)} | "
              f"{fmt(med(s50))} | {fmt(med(s99))} / {fmt(max(s99) if s99 else None)} | {fmt(med(rtt))} |")
    p()
    if len(modes) > 1:
        p("Side by side (medians over the rounds, ms; from the acknowledgement / from the send):")
        p()
        p("| client | Meshwork p50 | etcd p50 | Meshwork p99 | etcd p99 | Meshwork p99 from send | "
          "etcd p99 from send | Meshwork p99 no worse than etcd's (from the ack) |")
        p("|---|---:|---:|---:|---:|---:|---:|---|")
        for c in modes:
            mw, et = summary.get((c, "meshwork")), summary.get((c, "etcd"))
            if not mw or not et:
                continue
            ok = (mw["p99_med"] is not None and et["p99_med"] is not None and mw["p99_med"] <= et["p99_med"]
                  and mw["all_received"])
            p(f"| {c} | {fmt(mw['p50_med'])} | {fmt(et['p50_med'])} | {fmt(mw['p99_med'])} | "
              f"{fmt(et['p99_med'])} | {fmt(mw['s99_med'])} | {fmt(et['s99_med'])} | {'yes' if ok else 'no'} |")
        p()

    # ------------------------------------------------------------ memory
    p("## Server memory per 1,000 subscribers")
    p()
    p("VmRSS of the three servers (MiB, servers 1 / 2 / 3) before the subscribers connected and while they "
      "were held; growth per 1,000 subscribers over the three servers together, and per server (each holds a "
      "third of the subscribers).")
    p()
    idle = {s: sum(int(f[4]) for f in rss if f[0] == "idle" and f[1] == s) for s in SYSTEMS}
    p("| round | client | system | RSS before MiB | RSS held MiB | growth MiB (sum) | KiB per 1,000 subscribers | "
      "per server KiB / 1,000 | held above idle RSS at start, KiB per 1,000 | RSS after the write MiB |")
    p("|---|---|---|---|---|---:|---:|---|---:|---|")
    mem = {s: [] for s in SYSTEMS}
    for r in rounds:
        k1, per, grow = per_1k(r)
        b = r["mem"]["before"]["rss_kb"]
        h = r["mem"]["held"]["rss_kb"]
        a = r["mem"]["after"]["rss_kb"]
        subs = r["subscribed"] or r["n"]
        above = 1000.0 * (sum(h) - idle[r["system"]]) / subs if idle[r["system"]] and subs else None
        mem[r["system"]].append(((rnd(r), seq(r)), k1, above, mode(r)))
        p(f"| {rnd(r)} | {mode(r)} | {NAMES[r['system']]} | {' / '.join(mib(x) for x in b)} | "
          f"{' / '.join(mib(x) for x in h)} | {sum(grow) / 1024:.1f} | {k1:,.0f} | "
          f"{' / '.join(fmt(x, 0) for x in per)} | {fmt(above, 0) if above is None else f'{above:,.0f}'} | "
          f"{' / '.join(mib(x) for x in a)} |")
    p()
    p("The later runs grow less than the first because the allocator (Meshwork: jemalloc) and the Go heap "
      "(etcd) keep memory that the previous run's closed streams freed and reuse it, so their \"before\" "
      "RSS is already higher. The clean per-subscriber figure is each system's first run (fresh servers; the "
      "client mode of that run is named); \"held above idle RSS at start\" compares every run with the "
      "servers' RSS before any run (3 seed instances / one key, no subscribers).")
    p()
    p("| system | KiB per 1,000 subscribers, first run (fresh servers) | KiB per subscriber, first run | "
      "held above idle RSS at start, KiB per 1,000, worst run | growth in later runs, KiB per 1,000 |")
    p("|---|---:|---:|---:|---|")
    mem_sum = {}
    for s in SYSTEMS:
        if not mem[s]:
            continue
        ms = sorted(mem[s], key=lambda x: x[0])
        first = ms[0][1]
        worst = max((x[2] for x in ms if x[2] is not None), default=None)
        mem_sum[s] = (first, worst, ms[0][3])
        p(f"| {NAMES[s]} | {first:,.0f} ({ms[0][3]} client) | {first / 1000:.1f} | "
          f"{'–' if worst is None else f'{worst:,.0f}'} | "
          f"{', '.join(f'{x[1]:,.0f}' for x in ms[1:]) or '–'} |")
    p()
    p("Server RSS at fixed points of the run (MiB; VmHWM = peak):")
    p()
    p("| when | Meshwork 1 / 2 / 3 | Meshwork VmHWM | etcd 1 / 2 / 3 | etcd VmHWM |")
    p("|---|---|---|---|---|")
    labels = []
    for f in rss:
        if f[0] not in labels:
            labels.append(f[0])
    for lb in labels:
        row = {s: [f for f in rss if f[0] == lb and f[1] == s] for s in SYSTEMS}
        p(f"| {lb} | {' / '.join(mib(int(f[4])) for f in row['meshwork'])} | "
          f"{' / '.join(mib(int(f[5])) for f in row['meshwork'])} | "
          f"{' / '.join(mib(int(f[4])) for f in row['etcd'])} | {' / '.join(mib(int(f[5])) for f in row['etcd'])} |")
    p()

    # ------------------------------------------------------------ CPU
    p("## CPU")
    p()
    p("Server CPU seconds (servers 1 / 2 / 3) while the subscriptions were opened, and in the window from "
      f"{m.get('hold_ms')} ms before the write until the last subscriber had the change (window includes that "
      "idle hold); the load tool's own CPU; machine busy % and the share used by processes outside the "
      "benchmark in that window.")
    p()
    p("| round | client | system | subscribe: servers CPU s | subscribe: tool CPU s | write+fan-out: servers CPU s | "
      "write+fan-out: tool CPU s | write+fan-out: servers + tool CPU s | send → last receipt ms | "
      "window: machine busy % | other processes % |")
    p("|---|---|---|---|---:|---|---:|---:|---:|---:|---:|")
    cpu_by = {}
    for r in rounds:
        c1, c3 = r["cpu"]["setup"], r["cpu"]["fanout"]
        tot = sum(c3["servers_s"]) + c3["client_s"]
        cpu_by.setdefault((mode(r), r["system"]), []).append(
            (sum(c1["servers_s"]), c1["client_s"], sum(c3["servers_s"]), c3["client_s"],
             st(r, "from_send_ms").get("max")))
        p(f"| {rnd(r)} | {mode(r)} | {NAMES[r['system']]} | {' / '.join(fmt(x, 2) for x in c1['servers_s'])} | "
          f"{fmt(c1['client_s'], 2)} | {' / '.join(fmt(x, 2) for x in c3['servers_s'])} | {fmt(c3['client_s'], 2)} | "
          f"{tot:.2f} | {fmt(st(r, 'from_send_ms').get('max'))} | {c3['machine_busy_pct']} | {c3['foreign_pct']} |")
    p()
    p(f"With {m.get('nproc')} cores, N CPU-seconds spent between the write's send and the last receipt take at "
      "least N / cores seconds of wall time: when \"servers + tool CPU s\" (nearly all of it spent after the "
      "send; the servers are idle during the hold) is close to cores × \"send → last receipt\", the fan-out "
      "was CPU-bound on this machine, for that system and the load tool together.")
    p()
    p("Medians over the rounds, per client mode (CPU seconds; the write+fan-out window includes the idle "
      "hold before the write):")
    p()
    p("| client | system | subscribe: servers (sum) | subscribe: tool | write+fan-out: servers (sum) | "
      "write+fan-out: tool | send → last receipt ms |")
    p("|---|---|---:|---:|---:|---:|---:|")
    for c in modes:
        for s in SYSTEMS:
            v = cpu_by.get((c, s))
            if not v:
                continue
            p(f"| {c} | {NAMES[s]} | " + " | ".join(
                fmt(med([x[k] for x in v if x[k] is not None]), 2 if k < 4 else 1) for k in range(5)) + " |")
    p()

    # ------------------------------------------------------------ sidecar
    p("## Sidecar agent: idle RSS")
    p()
    if side:
        vm = int(side.get("VmRSS", "0") or 0)
        p("`meshwork-sidecar` (release build) with `bench/out/watch/sidecar.toml`: the three registry servers' "
          "gRPC addresses, service `bench` (port 1), one TCP check against 127.0.0.1:18501 every 10 s, admin "
          "on 127.0.0.1:19090. RSS read "
          f"{m.get('sidecar_idle_s')} s after `/ready` first answered 200 (ready "
          f"{side.get('ready_after_s', '?')} s after start).")
        p()
        p("| VmRSS | VmHWM | RssAnon | RssFile | threads | binary size | exit status after SIGTERM |")
        p("|---:|---:|---:|---:|---:|---:|---:|")
        p(f"| {mib(vm)} MiB ({vm:,} KiB) | {mib(int(side.get('VmHWM', 0) or 0))} MiB | "
          f"{mib(int(side.get('RssAnon', 0) or 0))} MiB | {mib(int(side.get('RssFile', 0) or 0))} MiB | "
          f"{side.get('Threads', '?')} | {int(side.get('binary_bytes', 0) or 0) / 2**20:.1f} MiB | "
          f"{side.get('exit_status', '?')} |")
        p()
        if side_samples:
            p("VmRSS each second after ready (KiB): " + ", ".join(f"{t} s: {v:,}" for t, v, _ in side_samples) + ".")
            p()
    else:
        p("Not measured (no `sidecar.tsv`).")
        p()

    # ------------------------------------------------------------ targets
    p("## Targets")
    p()
    p("Target: Meshwork's p99 from the write's acknowledgement to the subscribers no worse than etcd's "
      "(median over the rounds), judged separately for each client mode of the load tool. The light client "
      "is the same code for both systems and spends far less CPU per message; the full clients are each "
      "system's usual Rust client. Both are shown; neither replaces the other.")
    p()
    p("| client | Meshwork p99 from ack, median ms | etcd p99 from ack, median ms | target met? | "
      "Meshwork worse in (rounds) | p99 from send, median: Meshwork / etcd ms | delivered: Meshwork / etcd |")
    p("|---|---:|---:|---|---|---|---|")
    verdict = {}
    detail = {}
    for c in modes:
        mw, et = summary.get((c, "meshwork")), summary.get((c, "etcd"))
        if not (mw and et and mw["p99_med"] is not None and et["p99_med"] is not None):
            verdict[c] = None
            p(f"| {c} | – | – | NOT MET (no complete measurement of both systems) | – | – | – |")
            continue
        met = mw["p99_med"] <= et["p99_med"] and mw["all_received"]
        verdict[c] = met
        pairs, spairs, worse = [], [], 0
        for r in by[(c, "meshwork")]:
            e = [x for x in by[(c, "etcd")] if rnd(x) == rnd(r)]
            if e and st(r) and st(e[0]):
                pairs.append(f"round {rnd(r)}: {fmt(st(r)['p99'])} vs {fmt(st(e[0])['p99'])}")
                spairs.append(f"round {rnd(r)}: {fmt(st(r, 'from_send_ms').get('p99'))} vs "
                              f"{fmt(st(e[0], 'from_send_ms').get('p99'))}")
                worse += st(r)["p99"] > st(e[0])["p99"]
        detail[c] = (mw, et, pairs, spairs, worse)
        p(f"| {c} | {fmt(mw['p99_med'])} | {fmt(et['p99_med'])} | **{'MET' if met else 'NOT MET'}** | "
          f"{worse} of {len(pairs)} | {fmt(mw['s99_med'])} / {fmt(et['s99_med'])} | "
          f"{mw['rec']:,} / {mw['tot']:,}; {et['rec']:,} / {et['tot']:,} |")
    p()
    for c in modes:
        if c not in detail:
            p(f"- **{MODE_NAMES.get(c, c)}: p99 no worse than etcd's: NOT MET** — no complete measurement of both "
              "systems (see the checks below).")
            continue
        mw, et, pairs, spairs, worse = detail[c]
        rtts = {s: [x.get("write_rtt_ms") for x in by[(c, s)] if x.get("write_rtt_ms") is not None]
                for s in SYSTEMS}
        p(f"- **{MODE_NAMES.get(c, c)}: p99 (from the write's acknowledgement to the last percentile of "
          f"subscribers) no worse than etcd's: {'MET' if verdict[c] else 'NOT MET'}** — median over "
          f"{len(by[(c, 'meshwork')])} rounds: Meshwork {fmt(mw['p99_med'])} ms vs etcd {fmt(et['p99_med'])} ms "
          f"(per round, same write member: {'; '.join(pairs)}; Meshwork worse in {worse} of {len(pairs)}). "
          f"Meshwork delivered to {mw['rec']:,} of {mw['tot']:,} subscriber-rounds, etcd to {et['rec']:,} of "
          f"{et['tot']:,}. Counted from the write's *send* instead: p99 median Meshwork {fmt(mw['s99_med'])} ms "
          f"vs etcd {fmt(et['s99_med'])} ms (per round: {'; '.join(spairs)}). The write's acknowledgement took "
          + ", ".join(f"{NAMES[s]} {fmt(min(v))}–{fmt(max(v))} ms" for s, v in rtts.items() if v)
          + " after the send; a later acknowledgement makes the from-acknowledgement figure smaller, so both "
          "views are shown.")
    if side:
        vm = int(side.get("VmRSS", "0") or 0)
        p(f"- **Sidecar agent alone: idle RSS under 8 MiB: {'MET' if 0 < vm < SIDECAR_TARGET_KIB else 'NOT MET'}** — "
          f"VmRSS {vm:,} KiB ({mib(vm)} MiB) {m.get('sidecar_idle_s')} s after it was ready; peak (VmHWM) "
          f"{int(side.get('VmHWM', 0) or 0):,} KiB.")
    else:
        p("- **Sidecar agent alone: idle RSS under 8 MiB: NOT MET** — not measured.")
    if mem_sum:
        p("- Server RSS per 1,000 subscribers (no target, reported side by side): " + "; ".join(
            f"{NAMES[s]} {v[0]:,.0f} KiB ({v[0] / 1024:.1f} MiB) of growth in its first run on fresh servers "
            f"({v[2]} client)"
            + ("" if v[1] is None else f", {v[1]:,.0f} KiB above the idle RSS at start in the worst run")
            for s, v in mem_sum.items()) + ".")
    p()

    # ------------------------------------------------------------ cost floor
    cost_section(p, raw, m, modes, by, summary, n)

    # ------------------------------------------------------------ checks
    p("## Automatic checks")
    p()
    notes, startup = [], []
    for r in rounds:
        lb = r["label"]
        if r["received"] != r["n"]:
            notes.append(f"{lb}: only {r['received']:,} of {r['n']:,} subscribers received the change "
                         f"(subscribed {r['subscribed']:,}, setup failures {r['setup_failed']}, streams lost after "
                         f"subscribing {r['lost_after_subscribe']}, delivery timed out: {r['delivery_timed_out']})")
        if r["setup_timed_out"]:
            notes.append(f"{lb}: not every subscription was set up within the setup timeout")
        if r.get("write_error"):
            notes.append(f"{lb}: write failed: {r['write_error']}")
        if r["errors"]:
            notes.append(f"{lb}: {r['errors']} errors: " + "; ".join(f"{k} (×{v})" for k, v in r["error_samples"].items()))
        if r["unexpected_events"]:
            notes.append(f"{lb}: {r['unexpected_events']} unexpected events (changes that were not the write)")
        if not r["closed_cleanly"]:
            notes.append(f"{lb}: the subscriber tasks did not all end within 20 s of the round's end")
    for f in failed:
        notes.append(f"failed round: {json.dumps(f)[:300]}")
    for d in discarded:
        if d.get("kind") == "round":
            notes.append(f"{d['label']}: repeated because other processes used {d['cpu']['fanout']['foreign_pct']}% "
                         f"of the machine during its write/delivery window (its numbers: p99 {fmt(st(d).get('p99'))} ms)")
        else:
            notes.append(f"discarded: {json.dumps(d)[:200]}")
    if side.get("exit_status") not in (None, "0"):
        notes.append(f"sidecar exit status after SIGTERM: {side.get('exit_status')}")
    for prefix, name in (("meshwork", "Meshwork"), ("etcd", "etcd")):
        ll, before = log_lines(raw, prefix, m)
        if before:
            startup.append(f"{name} {before}")
        if ll:
            uniq = []
            for i, l in ll:
                key = re.sub(r"\d+", "N", l)[-160:]
                if key not in [u[0] for u in uniq]:
                    uniq.append((key, i, l))
            notes.append(f"{name} logs: {len(ll)} warn/error lines; first distinct ones: " + " / ".join(
                f"server {i}: `{l[:200].replace('|', '/')}`" for _, i, l in uniq[:4]))
    sl = [l for l in read(raw, "sidecar.log").splitlines() if re.search(r"WARN|ERROR|panic", l)]
    if sl:
        notes.append(f"sidecar log: {len(sl)} warn/error lines, first: `{sl[0][:200]}`")
    if notes:
        for x in notes:
            p(f"- {x}")
    else:
        p("- Every subscriber of every round received the change; no errors, no unexpected events, no repeated "
          "rounds, no warn/error lines in the server logs after the clusters formed.")
    if startup:
        p(f"- Warn/error lines logged while the clusters formed (elections, peer connections; not counted above): "
          f"{', '.join(startup)}.")
    p()

    # ------------------------------------------------------------ idleness
    p("## Machine idleness before each round")
    p()
    p("`/proc/stat` busy % of both cores over 2 s just before the round (the script waits up to `QUIET_WAIT_S` "
      "for it to drop to 15% or less) and how long it waited.")
    p()
    p("| round | busy % | waited s |")
    p("|---|---:|---:|")
    for q in quiet:
        q = q + [""] * (3 - len(q))
        p(f"| {q[0]} | {q[1]} | {q[2]} |")
    p()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
