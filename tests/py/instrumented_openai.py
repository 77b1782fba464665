"""An OpenAI-SDK workload instrumented by real GenAI instrumentation packages.

A fake OpenAI-compatible provider (a local HTTP server in a thread of this process)
answers chat completions with a fixed, per-call usage and a unique `id`; the real
`openai` SDK calls it `--calls` times over the models in `--models`, instrumented by
the packages named in `--instrument` (any of `official` =
opentelemetry-instrumentation-openai-v2, `openllmetry` = traceloop's
opentelemetry-instrumentation-openai, `openinference` = Arize's
openinference-instrumentation-openai), all on one tracer provider that exports over
OTLP (`--protocol http` or `grpc`) to `--endpoint`.

The last stdout line is JSON: the usage the server itself answered with, per model
name as the server returned it (`{"models": {name: {"calls", "input", "output"}}}`),
the independent ground truth the agent's token records must sum to; `spans`: the
spans with token usage this process exported, by instrumentation scope; `all_spans`:
every span it exported.

Runs in the instrumentations virtualenv (`cargo xtask setup`).
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# The model the API answers with for each requested one, as OpenAI's does.
DATED = {"gpt-4o-mini": "gpt-4o-mini-2024-07-18", "gpt-4o": "gpt-4o-2024-08-06"}


class Provider:
    """What the fake provider answered, summed per returned model."""

    def __init__(self, fixed_usage):
        self.fixed_usage = fixed_usage
        self.lock = threading.Lock()
        self.calls = 0
        self.models = {}

    def answer(self, request):
        requested = request.get("model", "unknown")
        model = DATED.get(requested, requested)
        with self.lock:
            n = self.calls
            self.calls += 1
            # Distinct counts per call, so a duplicate or a lost call shows;
            # or the same for every call, as repeated prompts get.
            prompt, completion = (100, 20) if self.fixed_usage else (100 + 7 * n, 20 + 3 * n)
            m = self.models.setdefault(model, {"calls": 0, "input": 0, "output": 0})
            m["calls"] += 1
            m["input"] += prompt
            m["output"] += completion
        return {
            "id": f"chatcmpl-fake{n:06d}",
            "object": "chat.completion",
            "created": 1_800_000_000 + n,
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": f"answer {n}"},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def serve(provider):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            request = json.loads(self.rfile.read(length) or b"{}")
            if not self.path.endswith("/chat/completions"):
                self.send_error(404)
                return
            body = json.dumps(provider.answer(request)).encode()
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


def counting_processor():
    """A span processor counting ended spans with token usage, per scope."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Counting(SpanProcessor):
        def __init__(self):
            self.spans = {}
            self.all = 0

        def on_end(self, span):
            self.all += 1
            attrs = span.attributes or {}
            keys = ("gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens", "llm.token_count.prompt")
            if any(k in attrs for k in keys):
                scope = span.instrumentation_scope.name if span.instrumentation_scope else "?"
                self.spans[scope] = self.spans.get(scope, 0) + 1

    return Counting()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--endpoint", required=True, help="OTLP endpoint, e.g. http://127.0.0.1:4318")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--instrument", required=True, help="comma list: official,openllmetry,openinference")
    p.add_argument("--calls", type=int, default=7)
    p.add_argument("--models", default="gpt-4o-mini,gpt-4o")
    p.add_argument("--service", default="instrumented-openai", help="service.name")
    p.add_argument("--one-trace", action="store_true", help="every call in one trace (one agent run)")
    p.add_argument("--fixed-usage", action="store_true", help="the same usage for every call")
    a = p.parse_args()

    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if a.protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=a.endpoint.rstrip("/") + "/v1/traces")
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=a.endpoint, insecure=True)
    provider = TracerProvider(resource=Resource.create({"service.name": a.service}))
    counting = counting_processor()
    provider.add_span_processor(counting)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=200))
    trace.set_tracer_provider(provider)

    for name in a.instrument.split(","):
        if name == "official":
            from opentelemetry.instrumentation.openai_v2 import OpenAIInstrumentor
        elif name == "openllmetry":
            from opentelemetry.instrumentation.openai import OpenAIInstrumentor
        elif name == "openinference":
            from openinference.instrumentation.openai import OpenAIInstrumentor
        else:
            sys.exit(f"unknown instrumentation {name!r}")
        OpenAIInstrumentor().instrument(tracer_provider=provider)

    fake = Provider(a.fixed_usage)
    server = serve(fake)
    import openai

    client = openai.OpenAI(
        api_key="sk-fake",
        base_url=f"http://127.0.0.1:{server.server_address[1]}/v1",
        max_retries=0,
    )
    models = a.models.split(",")
    tracer = trace.get_tracer("instrumented-openai")
    import contextlib

    run = tracer.start_as_current_span("run") if a.one_trace else contextlib.nullcontext()
    with run:
        for i in range(a.calls):
            # One trace per call, as an agent's step would be, or all in the run's.
            with tracer.start_as_current_span(f"step {i}"):
                client.chat.completions.create(
                    model=models[i % len(models)],
                    messages=[{"role": "user", "content": f"question {i}"}],
                )
    if not provider.force_flush(30_000):
        sys.exit("the exporter did not flush within 30 s")
    provider.shutdown()
    server.shutdown()
    print(json.dumps({"models": fake.models, "spans": counting.spans, "all_spans": counting.all}))


if __name__ == "__main__":
    main()
