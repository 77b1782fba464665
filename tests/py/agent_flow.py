"""A two-agent flow on a real agent framework, instrumented only by its real
GenAI OpenTelemetry instrumentation: the OpenAI Agents SDK (`openai-agents`)
with the official `opentelemetry-instrumentation-openai-agents-v2`.

A `triage` agent calls its tool `classify`, then hands off to a `tutor` agent,
which calls its tool `explain` and answers. Each tool burns a known amount of CPU
(`--triage-ms`, `--tutor-ms`, by the thread's own CPU clock). The model is a fake
OpenAI-compatible provider (a local HTTP server in a thread of this process, chat
completions) that answers by script: the agent a request is for is read from its
system message (the agent's instructions), and each call gets a distinct usage.

No flow.run_id or agent.id anywhere: whatever names the agents comes from the
framework and its instrumentation (GenAI conventions). Before the first agent starts
and after the last ends the process burns `--pad-ms` outside every agent, so the
process's CPU rate is steady across each agent span's edges (the agent spreads a
window's CPU evenly over its time).

The last stdout line is JSON, the ground truth: per agent, the usage the provider
answered with (`calls`, `input`, `output`, by returned model), the CPU its tool
burned (`burn_ns`, thread CPU clock), and the process's CPU during its agent span
(`span_cpu_ns`, user + system of every thread, read at the span's start and end by a
trace processor of the SDK); `spans`: every span exported, name and attributes.

Runs in the instrumentations virtualenv (`cargo xtask setup`).
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "gpt-4o-mini"
DATED = "gpt-4o-mini-2024-07-18"
INSTRUCTIONS = {
    "triage": "You are triage. Classify the question, then hand off to the tutor.",
    "tutor": "You are tutor. Explain the answer.",
}


def burn(ms):
    """Spins until this thread has had `ms` ms of CPU, by its own CPU clock; returns ns."""
    start = time.thread_time_ns()
    target = start + ms * 1_000_000
    while time.thread_time_ns() < target:
        for _ in range(2000):
            pass
    return time.thread_time_ns() - start


def process_cpu_ns():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return int((r.ru_utime + r.ru_stime) * 1e9)


class Provider:
    """Answers chat completions by script, summing the usage per agent."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls = 0
        self.agents = {}

    def answer(self, request):
        messages = request.get("messages", [])
        system = next((m.get("content") for m in messages if m.get("role") == "system"), "")
        agent = next((a for a, text in INSTRUCTIONS.items() if text == system), None)
        if agent is None:
            raise ValueError(f"no agent has the system message {system!r}")
        tools = [t["function"]["name"] for t in request.get("tools", [])]
        # The tool results this agent has had since its system message.
        done = {m.get("tool_call_id") for m in messages if m.get("role") == "tool"}
        with self.lock:
            n = self.calls
            self.calls += 1
            prompt, completion = 100 + 7 * n, 20 + 3 * n
            a = self.agents.setdefault(agent, {"calls": 0, "input": 0, "output": 0, "model": DATED})
            a["calls"] += 1
            a["input"] += prompt
            a["output"] += completion
        message = {"role": "assistant", "content": None}
        if agent == "triage" and "call_classify" not in done:
            message["tool_calls"] = [call("call_classify", "classify")]
        elif agent == "triage":
            handoff = next(t for t in tools if t.startswith("transfer_to_"))
            message["tool_calls"] = [call("call_handoff", handoff)]
        elif "call_explain" not in done:
            message["tool_calls"] = [call("call_explain", "explain")]
        else:
            message["content"] = "The answer is 42."
        return {
            "id": f"chatcmpl-agent{n:06d}",
            "object": "chat.completion",
            "created": 1_800_000_000 + n,
            "model": DATED,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def call(call_id, name):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def serve(provider):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.endswith("/chat/completions"):
                self.send_error(404)
                return
            try:
                body = json.dumps(provider.answer(request)).encode()
            except Exception as e:  # the workload fails loudly, not the SDK's retries
                print(f"provider: {e!r}", file=sys.stderr)
                self.send_error(400)
                return
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def recording_processor():
    """A span processor keeping every ended span's name and attributes."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Recording(SpanProcessor):
        def __init__(self):
            self.spans = []

        def on_end(self, span):
            attrs = {k: v if isinstance(v, (str, int, float, bool)) else list(v) for k, v in (span.attributes or {}).items()}
            self.spans.append({"name": span.name, "attributes": attrs})

    return Recording()


def agent_cpu_processor(truth):
    """An Agents-SDK trace processor reading the process's CPU at each agent span's edges."""
    from agents.tracing import TracingProcessor
    from agents.tracing.span_data import AgentSpanData

    class AgentCpu(TracingProcessor):
        def __init__(self):
            self.started = {}

        def on_trace_start(self, trace):
            pass

        def on_trace_end(self, trace):
            pass

        def on_span_start(self, span):
            if isinstance(span.span_data, AgentSpanData):
                self.started[span.span_id] = process_cpu_ns()

        def on_span_end(self, span):
            if isinstance(span.span_data, AgentSpanData):
                used = process_cpu_ns() - self.started.pop(span.span_id)
                a = truth.setdefault(span.span_data.name, {})
                a["span_cpu_ns"] = a.get("span_cpu_ns", 0) + used

        def shutdown(self):
            pass

        def force_flush(self):
            pass

    return AgentCpu()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True, help="OTLP/HTTP endpoint, e.g. http://127.0.0.1:4318")
    p.add_argument("--service", default="agent-flow", help="service.name")
    p.add_argument("--triage-ms", type=int, default=600)
    p.add_argument("--tutor-ms", type=int, default=1200)
    p.add_argument("--pad-ms", type=int, default=1000)
    p.add_argument("--export-delay-ms", type=int, default=200, help="the batch span processor's delay")
    p.add_argument("--instrument", choices=["official", "openinference"], default="openinference")
    a = p.parse_args()

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": a.service}))
    recording = recording_processor()
    provider.add_span_processor(recording)
    exporter = OTLPSpanExporter(endpoint=a.endpoint.rstrip("/") + "/v1/traces")
    # Spans go out as they end (every 200 ms), as a live service's do: a model
    # call reaches the daemon before the agent span around it.
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=a.export_delay_ms)
    )

    import agents
    from agents import Agent, Runner, function_tool

    truth = {}
    # Only local processors: the SDK's default one exports to OpenAI's servers.
    agents.set_trace_processors([agent_cpu_processor(truth)])
    if a.instrument == "official":
        from opentelemetry.instrumentation.openai_agents import OpenAIAgentsInstrumentor

        OpenAIAgentsInstrumentor().instrument(tracer_provider=provider)
    else:
        from openinference.instrumentation.openai_agents import OpenAIAgentsInstrumentor

        OpenAIAgentsInstrumentor().instrument(tracer_provider=provider, exclusive_processor=False)

    fake = Provider()
    server = serve(fake)
    import openai

    client = openai.AsyncOpenAI(
        api_key="sk-fake",
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
        max_retries=0,
    )
    agents.set_default_openai_client(client, use_for_tracing=False)
    agents.set_default_openai_api("chat_completions")

    @function_tool
    def classify() -> str:
        """Classifies the question."""
        truth.setdefault("triage", {})["burn_ns"] = burn(a.triage_ms)
        return "maths"

    @function_tool
    def explain() -> str:
        """Explains the answer."""
        truth.setdefault("tutor", {})["burn_ns"] = burn(a.tutor_ms)
        return "because"

    tutor = Agent(name="tutor", instructions=INSTRUCTIONS["tutor"], model=MODEL, tools=[explain])
    triage = Agent(
        name="triage",
        instructions=INSTRUCTIONS["triage"],
        model=MODEL,
        tools=[classify],
        handoffs=[tutor],
    )

    burn(a.pad_ms)
    result = asyncio.run(Runner.run(triage, "What is six times seven?"))
    burn(a.pad_ms)
    if result.final_output != "The answer is 42." or result.last_agent.name != "tutor":
        sys.exit(f"the flow did not end at the tutor's answer: {result.final_output!r}")

    if not provider.force_flush(30_000):
        sys.exit("the exporter did not flush within 30 s")
    provider.shutdown()
    server.shutdown()
    for name, usage in fake.agents.items():
        truth.setdefault(name, {}).update(usage)
    print(json.dumps({"pid": os.getpid(), "agents": truth, "spans": recording.spans}))


if __name__ == "__main__":
    main()
