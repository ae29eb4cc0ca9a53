#!/usr/bin/env python3
"""The lab's demo service: HTTP/1.1 on 127.0.0.1:PORT inside its host.

GET /health -> "ok"; any other GET -> "hello from NAME" (what the tests
look for at the far end of app -> sidecar -> sidecar -> app). Quiet: no
line per request (the sidecar's health checks would fill the log).

usage: demo-app.py NAME PORT
"""
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    if len(sys.argv) != 3 or not sys.argv[2].isdigit():
        sys.exit("usage: demo-app.py NAME PORT")
    name, port = sys.argv[1], int(sys.argv[2])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar pools connections

        def do_GET(self) -> None:
            body = b"ok\n" if self.path == "/health" else f"hello from {name}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"demo app {name} on http://127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
