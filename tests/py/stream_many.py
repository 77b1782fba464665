"""N WebSocket clients of /v1/stream for SECS seconds (tests/bench/stream_clients.sh).

Prints one JSON line: windows each client received (min, max), clients that
got a `dropped` message or lost the connection.

    python3 stream_many.py URL N SECS
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect


async def client(url, secs, out):
    got, dropped = 0, False
    try:
        async with connect(url, open_timeout=30, max_size=None) as ws:
            loop = asyncio.get_running_loop()
            end = loop.time() + secs
            while loop.time() < end:
                try:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), end - loop.time()))
                except asyncio.TimeoutError:
                    break
                if msg.get("type") == "window":
                    got += 1
                elif msg.get("type") == "dropped":
                    dropped = True
    except Exception:
        dropped = True
    out.append((got, dropped))


async def main():
    url, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    out = []
    await asyncio.gather(*(client(url, secs, out) for _ in range(n)))
    got = [g for g, _ in out]
    print(json.dumps({"clients": n, "windows_min": min(got), "windows_max": max(got),
                      "dropped_or_lost": sum(1 for _, d in out if d)}))


asyncio.run(main())
