#!/usr/bin/env python3
"""An independent OTLP/gRPC metrics receiver for mentat-agent's end-to-end tests.

Built only from Python's `grpcio` and `opentelemetry-proto` (nothing of the agent's
Rust code), it decodes every ExportMetricsServiceRequest the agent sends and appends
it to --out as one JSON line:

    {"seq": 1, "record_ids": [...], "duplicate": false, "resource": {...},
     "points": [{"metric": ..., "unit": ..., "temporality": 2, "monotonic": true,
                 "attributes": {...}, "start": ns, "time": ns, "int": v | "double": v}]}

`record_ids` come from the InstrumentationScope attribute `mentat.record_ids`. A batch
whose ids were all seen before is a re-send (delivery is at least once): it is still
written, with "duplicate": true, and logged on stderr, so that a consumer applying
only non-duplicate lines counts each record once. Every request is acknowledged.

When the server is listening, "ready <port>" is printed on stdout.

Faults, for the exporter's failure handling:

  --fail-ack-once     the first request is decoded and written (applied), then
                      answered UNAVAILABLE, as if the ack were lost on the way back:
                      the agent must send it again without adding it twice.
  --reject-points N   the first request, and every later one carrying any of its
                      record ids, is answered with an OTLP partial success that
                      rejects N data points (written with "rejected": N): the agent
                      must not retry it, and must not let it block what follows.
"""

import argparse
import json
import sys
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

RECORD_IDS = "mentat.record_ids"


def any_value(v):
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "int_value":
        return v.int_value
    if kind == "double_value":
        return v.double_value
    if kind == "bool_value":
        return v.bool_value
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return None


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def points_of(metric):
    kind = metric.WhichOneof("data")
    if kind == "sum":
        data = metric.sum
        temporality, monotonic = data.aggregation_temporality, data.is_monotonic
    elif kind == "gauge":
        data = metric.gauge
        temporality, monotonic = 0, False
    else:
        # Histograms and the like: the agent sends none; record that one came.
        return [{"metric": metric.name, "unit": metric.unit, "unsupported": kind}]
    out = []
    for p in data.data_points:
        point = {
            "metric": metric.name,
            "unit": metric.unit,
            "kind": kind,
            "temporality": temporality,
            "monotonic": monotonic,
            "attributes": attributes(p.attributes),
            "start": p.start_time_unix_nano,
            "time": p.time_unix_nano,
        }
        if p.WhichOneof("value") == "as_int":
            point["int"] = p.as_int
        else:
            point["double"] = p.as_double
        out.append(point)
    return out


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, out_path, fail_ack_once=False, reject_points=0):
        self.lock = threading.Lock()
        self.seen = set()
        self.seq = 0
        self.out = open(out_path, "a", encoding="utf-8")
        self.fail_ack_once = fail_ack_once
        self.reject_points = reject_points
        self.rejected_ids = None

    def Export(self, request, context):
        ids, points, resource = [], [], {}
        for rm in request.resource_metrics:
            resource.update(attributes(rm.resource.attributes))
            for sm in rm.scope_metrics:
                scope = attributes(sm.scope.attributes)
                ids.extend(scope.get(RECORD_IDS) or [])
                for m in sm.metrics:
                    points.extend(points_of(m))
        with self.lock:
            self.seq += 1
            duplicate = bool(ids) and all(i in self.seen for i in ids)
            if duplicate:
                print(
                    f"otlp_receiver: request {self.seq}: all {len(ids)} record ids "
                    "already seen; ignoring the re-sent batch",
                    file=sys.stderr,
                    flush=True,
                )
            self.seen.update(ids)
            rejected = 0
            if self.reject_points > 0:
                if self.rejected_ids is None:
                    self.rejected_ids = set(ids)
                if self.rejected_ids.intersection(ids):
                    rejected = self.reject_points
            line = {
                "seq": self.seq,
                "record_ids": ids,
                "duplicate": duplicate,
                "resource": resource,
                "points": points,
                "rejected": rejected,
            }
            self.out.write(json.dumps(line) + "\n")
            self.out.flush()
            fail = self.fail_ack_once and self.seq == 1
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "test: the ack is lost after receipt")
        response = metrics_service_pb2.ExportMetricsServiceResponse()
        if rejected:
            response.partial_success.rejected_data_points = rejected
            response.partial_success.error_message = f"test: {rejected} data points rejected"
        return response


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--fail-ack-once", action="store_true")
    ap.add_argument("--reject-points", type=int, default=0)
    args = ap.parse_args()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(
        Receiver(args.out, args.fail_ack_once, args.reject_points), server
    )
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    if port == 0:
        sys.exit(f"otlp_receiver: cannot listen on 127.0.0.1:{args.port}")
    server.start()
    print(f"ready {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
