#!/usr/bin/env python3
"""An independent HTTP receiver for mentat-agent's alert channel tests.

Built only from Python's standard library (nothing of the agent's code). Every
POST is answered and appended to --out as one JSON line:

    {"path": "/hook", "headers": {lower-case name: value}, "body": <JSON or text>,
     "signature_ok": true|false|null, "timestamp_ok": true|false|null}

With --secret-file, `signature_ok` says whether `X-Mentat-Signature` is
`sha256=` + the hex HMAC-SHA256 of the exact body under the file's (trimmed)
content, checked with Python's `hmac` module; `timestamp_ok` whether
`X-Mentat-Timestamp` equals the body's `sent_at` and is within 300 s of now.

Answers: 200 "ok" (Slack's answer), 202 for paths under /v2/enqueue
(PagerDuty's), or --status for every request. Alertmanager's own webhook
posts come here too (path /am). When listening, "ready <port>" is printed on
stdout. --port 0 picks a free port; a fixed --port lets a test stop the
receiver and start it again on the same address (an outage).
"""

import argparse
import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--secret-file")
    ap.add_argument("--status", type=int, default=0)
    args = ap.parse_args()
    secret = None
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            secret = f.read().strip()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n)
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", "replace")
            sig_ok = ts_ok = None
            if secret is not None:
                want = "sha256=" + hmac.new(secret, raw, hashlib.sha256).hexdigest()
                got = self.headers.get("X-Mentat-Signature") or ""
                sig_ok = hmac.compare_digest(want, got)
                ts = self.headers.get("X-Mentat-Timestamp") or ""
                ts_ok = (
                    isinstance(body, dict)
                    and ts.isdigit()
                    and str(body.get("sent_at")) == ts
                    and abs(time.time() - int(ts)) < 300
                )
            line = {
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
                "signature_ok": sig_ok,
                "timestamp_ok": ts_ok,
            }
            status = args.status or (202 if self.path.startswith("/v2/enqueue") else 200)
            # Written before the answer: what was acknowledged is on file.
            with lock, open(args.out, "a") as f:
                f.write(json.dumps(line) + "\n")
            reply = b'{"status":"success"}' if status == 202 else b"ok"
            self.send_response(status)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, fmt, *a):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
