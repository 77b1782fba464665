#!/usr/bin/env python3
"""An independent SMTP server for mentat-agent's mail channel tests (aiosmtpd).

Every message received is appended to --out as one JSON line:
    {"mail_from": ..., "rcpt_tos": [...], "subject": ..., "body": ..., "tls": bool}

With --cert/--key the server offers STARTTLS and requires it before any mail
(aiosmtpd's require_starttls); without them it speaks plain SMTP only (no
STARTTLS in its EHLO answer), which an agent configured with
tls = "starttls" must refuse to use. "ready <port>" is printed when listening.
"""

import argparse
import email
import email.policy
import json
import socket
import ssl
import sys
import time

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, out):
        self.out = out

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = msg.get_body(preferencelist=("plain",))
        line = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "subject": str(msg["subject"]),
            "body": body.get_content() if body is not None else "",
            "tls": session.ssl is not None,
        }
        with open(self.out, "a") as f:
            f.write(json.dumps(line) + "\n")
        return "250 Message accepted for delivery"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cert")
    ap.add_argument("--key")
    args = ap.parse_args()
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    kw = {}
    if args.cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.cert, args.key)
        kw = {"tls_context": ctx, "require_starttls": True}
    c = Controller(Handler(args.out), hostname="127.0.0.1", port=port, **kw)
    c.start()
    print(f"ready {port}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()


if __name__ == "__main__":
    sys.exit(main())
