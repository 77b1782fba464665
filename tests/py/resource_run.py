#!/usr/bin/env python3
"""A process whose run context is set in code, on its OpenTelemetry resource
(not in its environment), for mentat-agent's resource-binding test
(tests/tests/runs.rs):

    resource_run.py --endpoint http://127.0.0.1:PORT --run-id RUN \
        --before-ms 300 --span-ms 200 --after-ms 300

It builds its TracerProvider with Resource({"flow.run_id": RUN, ...}), burns
BEFORE_MS ms of CPU (an SDK's start-up work, before any span), SPAN_MS ms in
one span, then AFTER_MS ms after it (export work, after the last span), and
flushes at shutdown: the only export is at the end of its life. The test
reaps it with wait4 for the ground truth.
"""

import argparse
import json
import os
import time

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def burn(ms):
    """Spins until this thread has had `ms` ms of CPU, by its own CPU clock."""
    target = time.thread_time_ns() + ms * 1_000_000
    while time.thread_time_ns() < target:
        for _ in range(2000):
            pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True)
    p.add_argument("--run-id", required=True)
    p.add_argument("--before-ms", type=int, default=300)
    p.add_argument("--span-ms", type=int, default=200)
    p.add_argument("--after-ms", type=int, default=300)
    a = p.parse_args()
    # Resource() does not read OTEL_RESOURCE_ATTRIBUTES: the run is in code only.
    resource = Resource({"service.name": "resource-run", "flow.run_id": a.run_id, "agent.id": "resource-agent"})
    tp = TracerProvider(resource=resource)
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=a.endpoint, insecure=True)))
    tracer = tp.get_tracer("mentat-tests.resource-run")
    burn(a.before_ms)
    with tracer.start_as_current_span("work") as span:
        burn(a.span_ms)
        c = span.get_span_context()
        ids = {"span_id": format(c.span_id, "016x"), "trace_id": format(c.trace_id, "032x")}
    burn(a.after_ms)
    tp.shutdown()
    print(json.dumps({"pid": os.getpid(), **ids}), flush=True)


if __name__ == "__main__":
    main()
