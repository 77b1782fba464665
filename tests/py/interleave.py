#!/usr/bin/env python3
"""One process, two flow runs: mentat-agent's span-overlap split test
(tests/tests/runs.rs).

    interleave.py --endpoint http://127.0.0.1:PORT --run-a A --run-b B \
        --lead-ms 1500 --tail-ms 1500

The process burns CPU without a break from start to exit. With T0 = start +
LEAD_MS, it emits, with the real OpenTelemetry SDK, span `task A` of run A over
[T0, T0 + 2 s] and span `task B` of run B over [T0 + 1 s, T0 + 3 s] (run ids as
span attributes; the resource names the process by `process.pid`). Each span is
exported over OTLP/gRPC when it ends (SimpleSpanProcessor), as an SDK does; the
burn goes on until T0 + 3 s + TAIL_MS, so every usage window that the spans touch
sees the same steady burn.

Ground truth, one JSON line: the pid, the spans' [start, end] (Unix ns), when
each export returned, and samples (wall ns, process CPU ns from
CLOCK_PROCESS_CPUTIME_ID) every ~10 ms.
"""

import argparse
import json
import os
import time

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

SECOND = 1_000_000_000


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--run-a", required=True)
    p.add_argument("--run-b", required=True)
    p.add_argument("--lead-ms", type=int, default=1500)
    p.add_argument("--tail-ms", type=int, default=1500)
    args = p.parse_args()

    pid = os.getpid()
    tp = TracerProvider(resource=Resource.create({"service.name": "interleave", "process.pid": pid}))
    tp.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=args.endpoint, insecure=True)))
    tracer = tp.get_tracer("mentat-tests.interleave")

    t0 = time.time_ns() + args.lead_ms * 1_000_000
    spans = {
        "A": {"run_id": args.run_a, "start": t0, "end": t0 + 2 * SECOND},
        "B": {"run_id": args.run_b, "start": t0 + SECOND, "end": t0 + 3 * SECOND},
    }
    stop = t0 + 3 * SECOND + args.tail_ms * 1_000_000
    samples = []
    last = 0
    while True:
        now = time.time_ns()
        if now - last >= 10_000_000:
            samples.append((now, time.clock_gettime_ns(time.CLOCK_PROCESS_CPUTIME_ID)))
            last = now
        for name, s in spans.items():
            if "exported" not in s and now >= s["end"]:
                span = tracer.start_span(
                    "task " + name,
                    start_time=s["start"],
                    attributes={"flow.run_id": s["run_id"], "agent.id": "agent-" + name},
                )
                span.end(end_time=s["end"])
                s["exported"] = time.time_ns()
        if now >= stop:
            break
        for _ in range(2000):
            pass
    print(json.dumps({"pid": pid, "t0": t0, "spans": spans, "samples": samples}), flush=True)
    tp.shutdown()


if __name__ == "__main__":
    main()
