"""Slow OTLP/HTTP senders: opens N connections to HOST:PORT, sends each a
request head announcing a 100,000-byte body, then trickles one byte per
connection every 0.2 s, never finishing. Prints `ready` once every head is
sent; on a line from stdin (or after 600 s) prints one JSON line: its pid,
the status each connection was answered with (`HTTP` status code, `closed`
or `reset`), and how many are still unanswered.

Usage: slow_client.py HOST PORT N
"""

import json
import os
import select
import socket
import sys
import threading

HEAD = (
    b"POST /v1/traces HTTP/1.1\r\nHost: agent\r\n"
    b"Content-Type: application/x-protobuf\r\nContent-Length: 100000\r\n\r\n\x0a"
)


def main():
    host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, port))
        s.sendall(HEAD)
        socks.append(s)
    print("ready", flush=True)
    stop = threading.Event()

    def wait_stdin():
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=wait_stdin, daemon=True).start()
    answered = {}

    def poll():
        for i, s in enumerate(socks):
            if i in answered:
                continue
            readable, _, _ = select.select([s], [], [], 0)
            if readable:
                try:
                    data = s.recv(4096)
                except OSError:
                    answered[i] = "reset"
                    continue
                if data.startswith(b"HTTP/"):
                    answered[i] = data.split(b" ", 2)[1].decode()
                else:
                    answered[i] = "closed"
                continue
            try:
                s.send(b"\x00")
            except OSError:
                answered[i] = "reset"

    for _ in range(3000):
        poll()
        if stop.wait(0.2):
            break
    poll()
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "answered": sorted(answered.values()),
                "pending": n - len(answered),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
