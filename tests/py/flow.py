#!/usr/bin/env python3
"""An AI-agent flow instrumented with the real OpenTelemetry Python SDK, for
mentat-agent's trace-context tests (tests/tests/runs.rs).

    flow.py orchestrator --endpoint http://127.0.0.1:PORT \
        --agent planner:gpt-4o:150:250:1200:400:300 \
        --agent coder:gpt-4o-mini:400:800:5000:0:800

The orchestrator runs inside a `flow` span and starts one subprocess per
--agent (ROLE:MODEL:PLAN_MS:LLM_MS:INPUT:CACHE_READ:OUTPUT) at once, each
under its own `run ROLE` span. It passes the run context the way OpenTelemetry
users do for subprocesses: OTEL_RESOURCE_ATTRIBUTES (its own flow.id and
flow.run_id, the agent's agent.id) and TRACEPARENT (the `run ROLE` span), in
the child's environment. Each agent, inside `ROLE work`, burns PLAN_MS ms of
CPU in a `plan` span, then LLM_MS ms in an `llm call` span that reports
gen_ai.request.model and the gen_ai.usage.* token counts.

Ground truth, printed by the orchestrator as one JSON line: each agent's pid and
the CPU time `os.wait4` returned for it (user + system, the same scheduler clock
the kernel charges), the span ids of every span, and the trace id. Spans go to
--endpoint over OTLP/gRPC (BatchSpanProcessor, flushed at exit).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from urllib.parse import quote, unquote

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()


def provider(endpoint, service):
    # Resource.create merges OTEL_RESOURCE_ATTRIBUTES from the environment:
    # that is where flow.run_id and agent.id come from.
    tp = TracerProvider(resource=Resource.create({"service.name": service}))
    tp.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True)))
    return tp


def burn(ms):
    """Spins until this thread has had `ms` ms of CPU, by its own CPU clock."""
    target = time.thread_time_ns() + ms * 1_000_000
    while time.thread_time_ns() < target:
        for _ in range(2000):
            pass


def ids(span):
    c = span.get_span_context()
    return {"span_id": format(c.span_id, "016x"), "trace_id": format(c.trace_id, "032x")}


def resource_attributes(pairs):
    # Values are percent-encoded in OTEL_RESOURCE_ATTRIBUTES (W3C baggage octets).
    return ",".join(f"{k}={quote(v, safe='')}" for k, v in pairs)


def orchestrator(args):
    env_attrs = dict(
        (k.strip(), unquote(v.strip()))
        for k, v in (kv.split("=", 1) for kv in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",") if "=" in kv)
    )
    tp = provider(args.endpoint, "orchestrator")
    tracer = tp.get_tracer("mentat-tests.flow")
    agents = [a.split(":") for a in args.agent]
    truth = {"orchestrator_pid": os.getpid(), "agents": {}, "spans": {}}
    with tracer.start_as_current_span("flow") as flow:
        truth["spans"]["flow"] = ids(flow)
        truth["trace_id"] = ids(flow)["trace_id"]
        running = {}
        for role, model, plan_ms, llm_ms, tin, tcache, tout in agents:
            span = tracer.start_span("run " + role)
            truth["spans"]["run " + role] = ids(span)
            carrier = {}
            PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
            env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_") and k != "TRACEPARENT"}
            env["TRACEPARENT"] = carrier["traceparent"]
            env["OTEL_RESOURCE_ATTRIBUTES"] = resource_attributes(
                [(k, env_attrs[k]) for k in ("flow.id", "flow.run_id") if k in env_attrs] + [("agent.id", role)]
            )
            child = subprocess.Popen(
                [sys.executable, __file__, "agent", "--endpoint", args.endpoint, "--role", role,
                 "--model", model, "--plan-ms", plan_ms, "--llm-ms", llm_ms,
                 "--input", tin, "--cache-read", tcache, "--output", tout],
                env=env,
                stdout=subprocess.PIPE,
            )
            running[child.pid] = (role, span, child)
        # Reap in exit order: each `run ROLE` span ends when its agent does.
        while running:
            pid, status, ru = os.wait4(-1, 0)
            if pid not in running:
                continue
            role, span, child = running.pop(pid)
            span.end()
            # ru_utime/ru_stime are floats of whole microseconds.
            cpu_ns = (round(ru.ru_utime * 1e6) + round(ru.ru_stime * 1e6)) * 1000
            out = child.stdout.read().decode()
            child.stdout.close()
            # Popen must not wait for a pid already reaped.
            child.returncode = os.waitstatus_to_exitcode(status)
            agent_truth = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
            truth["agents"][role] = {
                "pid": pid,
                "exit_code": child.returncode,
                "rusage_cpu_ns": cpu_ns,
                **agent_truth,
            }
            for name, span_ids in agent_truth.get("spans", {}).items():
                truth["spans"][f"{role}/{name}"] = span_ids
    tp.shutdown()
    print(json.dumps(truth), flush=True)


def agent(args):
    tp = provider(args.endpoint, args.role)
    tracer = tp.get_tracer("mentat-tests.flow")
    parent = PROPAGATOR.extract({"traceparent": os.environ.get("TRACEPARENT", "")})
    spans = {}
    with tracer.start_as_current_span(args.role + " work", context=parent) as work:
        spans[args.role + " work"] = ids(work)
        with tracer.start_as_current_span("plan") as plan:
            spans["plan"] = ids(plan)
            burn(args.plan_ms)
        with tracer.start_as_current_span("llm call") as llm:
            spans["llm call"] = ids(llm)
            llm.set_attribute("gen_ai.request.model", args.model)
            llm.set_attribute("gen_ai.usage.input_tokens", args.input)
            llm.set_attribute("gen_ai.usage.output_tokens", args.output)
            if args.cache_read:
                llm.set_attribute("gen_ai.usage.cache_read.input_tokens", args.cache_read)
            burn(args.llm_ms)
    tp.shutdown()
    print(json.dumps({"spans": spans}), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("orchestrator")
    o.add_argument("--endpoint", required=True)
    o.add_argument("--agent", action="append", required=True)
    a = sub.add_parser("agent")
    a.add_argument("--endpoint", required=True)
    a.add_argument("--role", required=True)
    a.add_argument("--model", required=True)
    a.add_argument("--plan-ms", type=int, required=True)
    a.add_argument("--llm-ms", type=int, required=True)
    a.add_argument("--input", type=int, required=True)
    a.add_argument("--cache-read", type=int, required=True)
    a.add_argument("--output", type=int, required=True)
    args = p.parse_args()
    if args.cmd == "orchestrator":
        orchestrator(args)
    else:
        agent(args)


if __name__ == "__main__":
    main()
