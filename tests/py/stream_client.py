"""A WebSocket client of the agent's /v1/stream (tests/tests/stream.rs).

Connects with the `websockets` library to URL, reads messages until COUNT
window messages arrived (or TIMEOUT seconds passed), then disconnects and
prints every message received, as one JSON array on stdout.

    python3 stream_client.py URL COUNT TIMEOUT [TOKEN]
"""

import json
import sys
import time

from websockets.sync.client import connect


def main():
    url, count, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    headers = {}
    if len(sys.argv) > 4:
        headers["Authorization"] = "Bearer " + sys.argv[4]
    deadline = time.monotonic() + timeout
    got, windows = [], 0
    with connect(url, additional_headers=headers, open_timeout=10) as ws:
        while windows < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                msg = json.loads(ws.recv(timeout=left))
            except TimeoutError:
                break
            got.append(msg)
            if msg.get("type") == "window":
                windows += 1
    json.dump(got, sys.stdout)


if __name__ == "__main__":
    main()
