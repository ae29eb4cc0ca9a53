#!/usr/bin/env python3
"""New-connection HTTPS load for bench/gateway-https.sh: one TLS handshake
and one request per connection, with SNI.

usage: tls-handshakes.py HOST PORT SNI CA_FILE MODE SECONDS PROCESSES [SESSIONS]

MODE new: every connection is a full handshake (no session offered).
MODE reuse: every connection offers the session (ticket) its process got
last, so a server that resumes does an abbreviated handshake; with
SESSIONS > 1 each process cycles through that many sessions (one per
imagined client), which shows how many returning clients the server can
remember.

Why not `openssl s_time` (proxy.sh's tool): it sends no SNI, and the
gateway, by design, refuses a handshake without a name it has a
certificate for. Each connection sends `GET / HTTP/1.1` with
`Connection: close` and reads the answer to the end: that makes the server
finish the handshake (in TLS 1.3 the client's Finished is only checked
then) and hands the client its session tickets. The request is proxied to
the backend by every server, so each handshake also costs one proxied
request.

Prints one JSON object: connections completed, how many were resumed,
how many offered a session (in reuse mode all but each
slot's first), failures (with the first error), 200 answers, bytes per answer, wall
seconds, the negotiated TLS version, cipher and ALPN of the first
connection.
"""

import json
import multiprocessing
import socket
import ssl
import sys
import time


def worker(args):
    host, port, sni, ca, mode, seconds, sessions = args
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.set_alpn_protocols(["http/1.1"])
    req = f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode()
    saved = [None] * max(1, sessions)
    out = {"done": 0, "offered": 0, "resumed": 0, "failed": 0, "ok200": 0, "bytes": 0, "error": "",
           "version": "", "cipher": "", "alpn": ""}
    deadline = time.monotonic() + seconds
    i = 0
    while time.monotonic() < deadline:
        slot = i % len(saved)
        i += 1
        try:
            with socket.create_connection((host, port), timeout=5) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                offer = saved[slot] if mode == "reuse" else None
                with ctx.wrap_socket(raw, server_hostname=sni, session=offer) as s:
                    s.sendall(req)
                    data = b""
                    while True:
                        chunk = s.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    if mode == "reuse":
                        saved[slot] = s.session
                    out["done"] += 1
                    out["offered"] += 1 if offer is not None else 0
                    out["resumed"] += 1 if s.session_reused else 0
                    out["bytes"] += len(data)
                    if data.startswith(b"HTTP/1.1 200"):
                        out["ok200"] += 1
                    if not out["version"]:
                        out["version"] = s.version() or ""
                        out["cipher"] = (s.cipher() or ("",))[0]
                        out["alpn"] = s.selected_alpn_protocol() or ""
        except (OSError, ssl.SSLError) as e:
            out["failed"] += 1
            if not out["error"]:
                out["error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def main():
    if len(sys.argv) not in (8, 9):
        sys.exit(__doc__)
    host, port, sni, ca, mode, seconds, procs = sys.argv[1:8]
    sessions = int(sys.argv[8]) if len(sys.argv) == 9 else 1
    if mode not in ("new", "reuse"):
        sys.exit("MODE is new or reuse")
    args = (host, int(port), sni, ca, mode, float(seconds), sessions)
    t0 = time.monotonic()
    with multiprocessing.Pool(int(procs)) as pool:
        parts = pool.map(worker, [args] * int(procs))
    wall = time.monotonic() - t0
    total = {"mode": mode, "processes": int(procs), "sessions_per_process": sessions, "wall_s": round(wall, 3)}
    for k in ("done", "offered", "resumed", "failed", "ok200", "bytes"):
        total[k] = sum(p[k] for p in parts)
    for k in ("error", "version", "cipher", "alpn"):
        total[k] = next((p[k] for p in parts if p[k]), "")
    total["bytes_per_conn"] = round(total["bytes"] / total["done"], 1) if total["done"] else 0
    print(json.dumps(total))


if __name__ == "__main__":
    main()
