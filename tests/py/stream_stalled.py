"""A /v1/stream WebSocket client that never reads (tests/tests/stream.rs).

Opens a TCP connection with a small receive buffer, sends the WebSocket
upgrade for PATH on 127.0.0.1:PORT, prints "upgraded" once the 101 arrived,
then reads nothing until a line comes on stdin. Then it drains the socket
(at most 60 s) and prints whether the agent closed it and whether the last
frames hold the `dropped` message.

    python3 stream_stalled.py PORT PATH
"""

import json
import socket
import sys
import time


def main():
    port, path = int(sys.argv[1]), sys.argv[2]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # A small window: the agent's socket fills after a few messages.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = s.recv(1)
        if not chunk:
            print(json.dumps({"error": "closed before the upgrade", "head": head.decode(errors="replace")}))
            return
        head += chunk
    status = head.split(b"\r\n", 1)[0].decode()
    if " 101 " not in status + " ":
        print(json.dumps({"error": status}))
        return
    print("upgraded", flush=True)
    sys.stdin.readline()
    s.settimeout(5)
    tail, total, eof = b"", 0, False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(1 << 16)
        except socket.timeout:
            break
        if not chunk:
            eof = True
            break
        total += len(chunk)
        tail = (tail + chunk)[-4096:]
    print(json.dumps({"eof": eof, "bytes": total, "saw_dropped": b'"dropped"' in tail}), flush=True)


if __name__ == "__main__":
    main()
