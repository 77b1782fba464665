#!/usr/bin/env python3
"""A hand-driven OTLP trace client for mentat-agent's receiver tests
(tests/tests/receiver_hostile.rs), built from grpcio and opentelemetry-proto only.

    otlp_client.py grpc --target 127.0.0.1:PORT [options]
    otlp_client.py http --url http://127.0.0.1:PORT/v1/traces [options]

Options:
    --spans N          spans per request (default 1)
    --requests K       requests to send (default 1), over --threads T at once
    --pad BYTES        one extra string attribute of BYTES bytes on the first span
    --run-id R         flow.run_id on every span
    --span-ms MS       each span's length (default 1)
    --spread-ms MS     start each span a random 0..MS ms before now (default 0:
                       all at once)
    --raw-bytes N      send N bytes of malformed protobuf (a field claiming 1 GiB)
                       as the request body instead of a request
    --pid P            the resource's process.pid (default: this process's; -1: none)
    --resource K=V     one more resource attribute (repeatable)
    --start-ns T       every span starts at T (Unix ns) and ends at --end-ns
    --end-ns T
    --end-in-ms MS     each span ends MS ms from now (and starts --span-ms before)
    --tokens N         gen_ai.usage.input_tokens = N and output_tokens = 2N on every
                       span, with gen_ai.request.model = --model
    --attr KEY=N       with --tokens: one more integer attribute per span (repeatable)
    --model M          the model (default gpt-4o); "random": a fresh random name per span
    --pregen           build every request before sending any (benchmarks: the
                       client's own encoding then costs nothing while timed)
    --rate S           send at most S spans per second in all (0: as fast as
                       possible)
    --trace-per-request  one trace id for all the spans of a request (default:
                       one per span)

Spans are valid (random ids); the resource names this
process by `process.pid`. Prints one JSON line: how many requests were answered
with each status, the sum of partial_success.rejected_spans, the distinct
partial_success and error messages, the spans sent, the spans accepted (in
requests answered OK / 200, less their rejected spans), and the seconds the
sending took.
"""

import argparse
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


def kv(key, value):
    if isinstance(value, int):
        return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(int_value=value))
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def request_bytes(args):
    if args.raw_bytes:
        # Field 1 (resource_spans), length-delimited, claiming 1 GiB that never
        # comes: malformed whatever follows.
        head = b"\x0a\x80\x80\x80\x80\x04"
        return head + b"\xff" * max(0, args.raw_bytes - len(head))
    now = time.time_ns()
    spans = []
    shared_trace = os.urandom(15) + b"\x01" if args.trace_per_request else None
    for i in range(args.spans):
        start = now - random.randrange(args.spread_ms * 1_000_000 + 1)
        end = start + args.span_ms * 1_000_000
        if args.end_in_ms:
            end = now + args.end_in_ms * 1_000_000
            start = end - args.span_ms * 1_000_000
        if args.start_ns:
            start, end = args.start_ns, args.end_ns
        attrs = [kv("flow.run_id", args.run_id)] if args.run_id else []
        if args.tokens:
            model = f"m-{os.urandom(8).hex()}" if args.model == "random" else args.model
            attrs += [
                kv("gen_ai.request.model", model),
                kv("gen_ai.usage.input_tokens", args.tokens),
                kv("gen_ai.usage.output_tokens", 2 * args.tokens),
            ]
            # More integer attributes (other token types): KEY=N.
            for a in args.attr:
                k, _, n = a.partition("=")
                attrs.append(kv(k, int(n)))
        if i == 0 and args.pad:
            attrs.append(kv("padding", "x" * args.pad))
        spans.append(
            trace_pb2.Span(
                trace_id=shared_trace or os.urandom(15) + b"\x01",
                span_id=os.urandom(7) + b"\x01",
                name=f"flood {i}",
                start_time_unix_nano=start,
                end_time_unix_nano=end,
                attributes=attrs,
            )
        )
    req = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(
                    attributes=[
                        kv("service.name", "otlp-client"),
                    ]
                    # --pid -1: the resource names no process.
                    + ([kv("process.pid", args.pid if args.pid else os.getpid())] if args.pid >= 0 else [])
                    + [kv(*r.split("=", 1)) for r in args.resource]
                ),
                scope_spans=[trace_pb2.ScopeSpans(spans=spans)],
            )
        ]
    )
    return req.SerializeToString()


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.statuses = {}
        self.rejected = 0
        self.messages = set()
        self.accepted = 0

    def add(self, status, rejected=0, message="", spans=0):
        with self.lock:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            self.rejected += rejected
            if status in ("OK", "200"):
                self.accepted += spans - rejected
            if message:
                self.messages.add(message[:300])


def send_grpc(args, body, tally):
    channel = grpc.insecure_channel(
        args.target,
        options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
    )
    # Raw bytes both ways: the body goes out exactly as built.
    call = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
    try:
        raw = call(body, timeout=30)
        resp = trace_service_pb2.ExportTraceServiceResponse.FromString(raw)
        ps = resp.partial_success
        tally.add("OK", ps.rejected_spans, ps.error_message, args.spans)
    except grpc.RpcError as e:
        tally.add(e.code().name, 0, e.details() or "")
    finally:
        channel.close()


def send_http(args, body, tally):
    req = urllib.request.Request(
        args.url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            resp = trace_service_pb2.ExportTraceServiceResponse.FromString(r.read())
            ps = resp.partial_success
            tally.add(str(r.status), ps.rejected_spans, ps.error_message, args.spans)
    except urllib.error.HTTPError as e:
        tally.add(str(e.code), 0, e.read()[:300].decode("utf-8", "replace"))
    except OSError as e:
        tally.add("connection-error", 0, str(e))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("proto", choices=["grpc", "http"])
    p.add_argument("--target")
    p.add_argument("--url")
    p.add_argument("--spans", type=int, default=1)
    p.add_argument("--requests", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pad", type=int, default=0)
    p.add_argument("--run-id", default="")
    p.add_argument("--raw-bytes", type=int, default=0)
    p.add_argument("--span-ms", type=int, default=1)
    p.add_argument("--spread-ms", type=int, default=0)
    p.add_argument("--pid", type=int, default=0)
    p.add_argument("--resource", action="append", default=[])
    p.add_argument("--start-ns", type=int, default=0)
    p.add_argument("--end-ns", type=int, default=0)
    p.add_argument("--end-in-ms", type=int, default=0)
    p.add_argument("--tokens", type=int, default=0)
    p.add_argument("--model", default="gpt-4o")
    p.add_argument("--attr", action="append", default=[])
    p.add_argument("--pregen", action="store_true")
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--trace-per-request", action="store_true")
    args = p.parse_args()

    send = send_grpc if args.proto == "grpc" else send_http
    tally = Tally()
    todo = [request_bytes(args) for _ in range(args.requests)] if args.pregen else list(
        range(args.requests)
    )
    todo.reverse()
    todo_lock = threading.Lock()
    began = time.monotonic()
    sent = [0]

    def worker():
        while True:
            with todo_lock:
                if not todo:
                    return
                item = todo.pop()
                due = began + sent[0] * args.spans / args.rate if args.rate else 0
                sent[0] += 1
            if due:
                time.sleep(max(0.0, due - time.monotonic()))
            send(args, item if args.pregen else request_bytes(args), tally)

    threads = [threading.Thread(target=worker) for _ in range(max(1, args.threads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - began
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "statuses": tally.statuses,
                "rejected_spans": tally.rejected,
                "messages": sorted(tally.messages),
                "spans_sent": 0 if args.raw_bytes else args.spans * args.requests,
                "accepted": tally.accepted,
                "seconds": round(took, 3),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
