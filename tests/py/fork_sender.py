"""One OTLP/HTTP request whose resource names no process, sent by a forked
child on a connection its parent opened: the sender is the child. Prints one
JSON line: the parent's and the child's pids, the HTTP status and the
partial-success rejected count.

Usage: fork_sender.py URL_HOST PORT RUN_ID
"""

import json
import os
import socket
import sys
import time

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def kv(key, value):
    return common_pb2.KeyValue(key=key, value=common_pb2.AnyValue(string_value=value))


def main():
    host, port, run_id = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    now = time.time_ns()
    body = trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[
            trace_pb2.ResourceSpans(
                resource=resource_pb2.Resource(attributes=[kv("service.name", "fork-sender")]),
                scope_spans=[
                    trace_pb2.ScopeSpans(
                        spans=[
                            trace_pb2.Span(
                                trace_id=os.urandom(15) + b"\x01",
                                span_id=os.urandom(7) + b"\x01",
                                name="forked",
                                start_time_unix_nano=now - 500_000_000,
                                end_time_unix_nano=now,
                                attributes=[kv("flow.run_id", run_id)],
                            )
                        ]
                    )
                ],
            )
        ]
    ).SerializeToString()
    s = socket.create_connection((host, port))
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        head = (
            f"POST /v1/traces HTTP/1.1\r\nHost: agent\r\nContent-Type: application/x-protobuf\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        s.sendall(head + body)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        rejected = 0
        if status == 200:
            resp = trace_service_pb2.ExportTraceServiceResponse.FromString(payload)
            rejected = resp.partial_success.rejected_spans
        os.write(w, json.dumps({"status": status, "rejected": rejected}).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(child, 0)
    result = json.loads(os.read(r, 4096))
    print(json.dumps({"parent_pid": os.getpid(), "child_pid": child, **result}), flush=True)


if __name__ == "__main__":
    main()
