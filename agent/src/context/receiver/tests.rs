#![allow(clippy::unwrap_used)]

use std::{
    io::{Read, Write},
    sync::Mutex,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::trace_service_server::TraceServiceServer,
    common::v1::{ArrayValue, KeyValueList},
    resource::v1::Resource,
    trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan},
};
use tokio::sync::oneshot;

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use axum::http::StatusCode;
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_client::TraceServiceClient, trace_service_server::TraceService,
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
};
use prost::Message;
use tokio::{net::TcpListener, sync::mpsc};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http,
    transport::Channel,
};

use crate::{
    context::{
        inbox::TimeRefusal,
        receiver::{
            admission::decode_request,
            convert::{render, spans_of},
            http_protobuf::RpcStatus,
        },
        sender::{Binder, Sender},
        spans::{Span, SpanTokens},
    },
    serve::{
        forward::{Enricher, ForwardOptions, Forwarder},
        otlp::OtlpConfig,
    },
};

use super::*;

fn kv(key: &str, value: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(v: &str) -> Value {
    Value::StringValue(v.into())
}

fn span(n: u8, attributes: Vec<KeyValue>) -> OtlpSpan {
    OtlpSpan {
        trace_id: vec![0xab; 16],
        span_id: vec![n.max(1); 8],
        parent_span_id: vec![],
        name: format!("span-{n}"),
        start_time_unix_nano: 1_000,
        end_time_unix_nano: 2_000,
        attributes,
        ..Default::default()
    }
}

fn request(resource: Vec<KeyValue>, spans: Vec<OtlpSpan>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[test]
fn maps_ids_times_resource_and_context() {
    let mut sp = span(
        7,
        vec![
            kv("flow.run_id", s("run-span")),
            kv("agent.id", Value::IntValue(42)),
            kv("http.status_code", Value::IntValue(200)),
            kv("ratio", Value::DoubleValue(0.5)),
            kv("ok", Value::BoolValue(true)),
        ],
    );
    sp.parent_span_id = vec![0x0f; 8];
    let req = request(
        vec![
            kv("process.pid", Value::IntValue(4321)),
            kv("host.name", s("node-a")),
            kv("service.name", s("planner")),
            kv("flow.run_id", s("run-resource")),
            kv("flow.id", s("flow-1")),
            kv("user.id", s("u-9")),
        ],
        vec![sp],
    );
    let spans = spans_of(&req, Some(999));
    assert_eq!(spans.len(), 1);
    let got = &spans[0];
    assert_eq!(got.trace_id, "ab".repeat(16));
    assert_eq!(got.span_id, "07".repeat(8));
    assert_eq!(got.parent_span_id.as_deref(), Some("0f0f0f0f0f0f0f0f"));
    assert_eq!(got.name, "span-7");
    assert_eq!((got.start_unix_ns, got.end_unix_ns), (1_000, 2_000));
    // The resource's pid wins over the peer's.
    assert_eq!(got.pid, Some(4321));
    assert_eq!(got.host.as_deref(), Some("node-a"));
    assert_eq!(got.service.as_deref(), Some("planner"));
    // Span attributes win over resource ones; the rest is inherited.
    assert_eq!(got.context.run_id.as_deref(), Some("run-span"));
    assert_eq!(got.context.flow_id.as_deref(), Some("flow-1"));
    assert_eq!(got.context.user_id.as_deref(), Some("u-9"));
    assert_eq!(got.context.agent_id.as_deref(), Some("42"));
    assert_eq!(got.context.trace_id.as_deref(), Some(got.trace_id.as_str()));
    assert_eq!(got.context.project_id, None);
    assert_eq!(got.tokens, None);
    assert_eq!(got.attributes["http.status_code"], "200");
    assert_eq!(got.attributes["ratio"], "0.5");
    assert_eq!(got.attributes["ok"], "true");
    assert_eq!(got.attributes["flow.run_id"], "run-span");
}

#[test]
fn genai_agent_identity_where_no_agent_id_is_set() {
    let invoke = |n: u8, attrs: Vec<KeyValue>| {
        let mut a = vec![kv("gen_ai.operation.name", s("invoke_agent"))];
        a.extend(attrs);
        span(n, a)
    };
    let mut named_by_name = span(1, vec![]);
    named_by_name.name = "invoke_agent Math Tutor".into();
    let spans = vec![
        named_by_name,
        invoke(2, vec![kv("gen_ai.agent.name", s("writer"))]),
        invoke(
            3,
            vec![
                kv("gen_ai.agent.id", s("agent")),
                kv("gen_ai.agent.name", s("critic")),
            ],
        ),
        invoke(
            4,
            vec![
                kv("agent.id", s("planner")),
                kv("gen_ai.agent.name", s("writer")),
            ],
        ),
        span(5, vec![]),
        // A model call stamped with an instrumentation's default agent: not an
        // agent span, so it takes its agent from around it, not from the stamp.
        span(
            6,
            vec![
                kv("gen_ai.operation.name", s("chat")),
                kv("gen_ai.agent.name", s("OpenAI Agent")),
            ],
        ),
        span(
            7,
            vec![
                kv("openinference.span.kind", s("AGENT")),
                kv("agent.name", s("tutor")),
            ],
        ),
    ];
    let agents = |resource: Vec<KeyValue>| -> Vec<Option<String>> {
        spans_of(&request(resource, spans.clone()), Some(1))
            .into_iter()
            .map(|sp| sp.context.agent_id)
            .collect()
    };
    let some = |v: &str| Some(v.to_string());
    // The span's name, gen_ai.agent.name over gen_ai.agent.id, agent.id over both;
    // a span naming none, or not an agent span, takes the resource's.
    assert_eq!(
        agents(vec![kv("gen_ai.agent.name", s("support"))]),
        vec![
            some("Math Tutor"),
            some("writer"),
            some("critic"),
            some("planner"),
            some("support"),
            some("support"),
            some("tutor"),
        ]
    );
    assert_eq!(agents(vec![])[5], None);
    // A resource's agent.id wins over every GenAI attribute.
    assert_eq!(
        agents(vec![kv("agent.id", s("res"))]),
        vec![
            some("res"),
            some("res"),
            some("res"),
            some("planner"),
            some("res"),
            some("res"),
            some("res"),
        ]
    );
}

#[test]
fn pid_from_string_resource_else_peer() {
    let req = request(vec![kv("process.pid", s("77"))], vec![span(1, vec![])]);
    assert_eq!(spans_of(&req, Some(5))[0].pid, Some(77));
    let req = request(vec![], vec![span(1, vec![])]);
    assert_eq!(spans_of(&req, Some(5))[0].pid, Some(5));
    assert_eq!(spans_of(&req, None)[0].pid, None);
    let req = request(
        vec![kv("process.pid", s("not a pid"))],
        vec![span(1, vec![])],
    );
    assert_eq!(spans_of(&req, Some(5))[0].pid, Some(5));
}

#[test]
fn a_claimed_pid_with_a_container_or_pod_is_scoped_to_it() {
    let id = "ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef0123456789";
    let req = request(
        vec![kv("process.pid", s("1")), kv("container.id", s(id))],
        vec![span(1, vec![])],
    );
    let scope = spans_of(&req, Some(5))[0].pid_scope.clone();
    assert_eq!(
        scope.and_then(|s| s.container_id),
        Some(id.to_ascii_lowercase())
    );
    let req = request(
        vec![kv("process.pid", s("1")), kv("k8s.pod.uid", s("U-1"))],
        vec![span(1, vec![])],
    );
    assert_eq!(
        spans_of(&req, None)[0]
            .pid_scope
            .clone()
            .and_then(|s| s.pod_uid),
        Some("u-1".into())
    );
    // The peer's pid is the host's: a container named beside no claimed pid scopes nothing.
    let req = request(vec![kv("container.id", s(id))], vec![span(1, vec![])]);
    let got = &spans_of(&req, Some(5))[0];
    assert_eq!((got.pid, got.pid_scope.is_none()), (Some(5), true));
}

#[test]
fn token_fields_and_model() {
    let req = request(
        vec![],
        vec![
            span(
                1,
                vec![
                    kv("gen_ai.usage.input_tokens", Value::IntValue(1200)),
                    kv("gen_ai.usage.output_tokens", Value::IntValue(300)),
                    kv("gen_ai.usage.cache_read.input_tokens", Value::IntValue(200)),
                    kv("gen_ai.usage.reasoning.output_tokens", Value::IntValue(50)),
                    kv("gen_ai.request.model", s("gpt-4o")),
                    kv("gen_ai.response.model", s("gpt-4o-2024-08-06")),
                ],
            ),
            span(
                2,
                vec![
                    kv("gen_ai.usage.input_tokens", s("10")),
                    kv("gen_ai.usage.output_tokens", Value::DoubleValue(4.0)),
                    kv("gen_ai.usage.cache_read_input_tokens", Value::IntValue(3)),
                    kv("gen_ai.request.model", s("claude-sonnet")),
                ],
            ),
            span(
                3,
                vec![kv("gen_ai.usage.output_tokens", Value::IntValue(9))],
            ),
            span(4, vec![kv("gen_ai.request.model", s("gpt-4o"))]),
            span(
                5,
                vec![kv("gen_ai.usage.input_tokens", Value::IntValue(-1))],
            ),
        ],
    );
    let spans = spans_of(&req, None);
    assert_eq!(
        spans[0].tokens,
        Some(SpanTokens {
            model: "gpt-4o-2024-08-06".into(),
            input: 1200,
            cache_read_input: 200,
            output: 300,
            reasoning_output: 50,
            ..SpanTokens::default()
        })
    );
    assert_eq!(
        spans[1].tokens,
        Some(SpanTokens {
            model: "claude-sonnet".into(),
            input: 10,
            cache_read_input: 3,
            output: 4,
            reasoning_output: 0,
            ..SpanTokens::default()
        })
    );
    let third = spans[2].tokens.as_ref().unwrap();
    assert_eq!((third.model.as_str(), third.output), ("unknown", 9));
    // A model without usage is not token usage; a negative count is none.
    assert_eq!(spans[3].tokens, None);
    assert_eq!(spans[4].tokens, None);
}

/// The attributes the three instrumentations the e2e test runs put on one
/// call (tests/py/instrumented_openai.py, as they printed them).
#[test]
fn openinference_counts_response_ids_and_providers_are_read() {
    let req = request(
        vec![],
        vec![
            // Arize OpenInference: no gen_ai.* at all.
            span(
                1,
                vec![
                    kv("llm.system", s("openai")),
                    kv("llm.model_name", s("gpt-4o-mini-2024-07-18")),
                    kv("llm.token_count.prompt", Value::IntValue(100)),
                    kv("llm.token_count.completion", Value::IntValue(20)),
                    kv("llm.token_count.total", Value::IntValue(120)),
                    kv(
                        "llm.token_count.prompt_details.cache_read",
                        Value::IntValue(30),
                    ),
                ],
            ),
            // The official openai-v2: the deprecated gen_ai.system.
            span(
                2,
                vec![
                    kv("gen_ai.system", s("OpenAI")),
                    kv("gen_ai.response.id", s("chatcmpl-1")),
                    kv("gen_ai.usage.input_tokens", Value::IntValue(100)),
                ],
            ),
            // OpenLLMetry: gen_ai.provider.name wins over gen_ai.system.
            span(
                3,
                vec![
                    kv("gen_ai.system", s("other")),
                    kv("gen_ai.provider.name", s("openai")),
                    kv("gen_ai.response.id", s("chatcmpl-1")),
                    kv("gen_ai.usage.output_tokens", Value::IntValue(20)),
                ],
            ),
        ],
    );
    let spans = spans_of(&req, None);
    assert_eq!(
        spans[0].tokens,
        Some(SpanTokens {
            model: "gpt-4o-mini-2024-07-18".into(),
            input: 100,
            output: 20,
            cache_read_input: 30,
            provider: Some("openai".into()),
            ..SpanTokens::default()
        })
    );
    let t = spans[1].tokens.as_ref().unwrap();
    assert_eq!(
        (t.response_id.as_deref(), t.provider.as_deref()),
        (Some("chatcmpl-1"), Some("openai"))
    );
    let t = spans[2].tokens.as_ref().unwrap();
    assert_eq!(t.provider.as_deref(), Some("openai"));
}

#[test]
fn every_semconv_token_type_is_read() {
    let counts = [
        ("gen_ai.usage.input_tokens", 1000),
        ("gen_ai.usage.cache_read.input_tokens", 100),
        ("gen_ai.usage.cache_creation.input_tokens", 200),
        ("gen_ai.usage.text.input_tokens", 300),
        ("gen_ai.usage.image.input_tokens", 150),
        ("gen_ai.usage.audio.input_tokens", 120),
        ("gen_ai.usage.video.input_tokens", 130),
        ("gen_ai.usage.output_tokens", 500),
        ("gen_ai.usage.reasoning.output_tokens", 50),
        ("gen_ai.usage.text.output_tokens", 400),
        ("gen_ai.usage.audio.output_tokens", 50),
    ];
    let mut attrs: Vec<KeyValue> = counts
        .iter()
        .map(|(k, n)| kv(k, Value::IntValue(*n)))
        .collect();
    attrs.push(kv("gen_ai.response.model", s("gpt-4o-mini-2024-07-18")));
    let req = request(vec![], vec![span(1, attrs)]);
    assert_eq!(
        spans_of(&req, None)[0].tokens,
        Some(SpanTokens {
            model: "gpt-4o-mini-2024-07-18".into(),
            input: 1000,
            cache_read_input: 100,
            cache_creation_input: 200,
            text_input: 300,
            image_input: 150,
            audio_input: 120,
            video_input: 130,
            output: 500,
            reasoning_output: 50,
            text_output: 400,
            audio_output: 50,
            ..SpanTokens::default()
        })
    );
    // A span reporting only a cache write is token usage too (the older name).
    let req = request(
        vec![],
        vec![span(
            1,
            vec![kv(
                "gen_ai.usage.cache_creation_input_tokens",
                Value::IntValue(7),
            )],
        )],
    );
    let t = spans_of(&req, None)[0].tokens.clone().expect("usage");
    assert_eq!((t.cache_creation_input, t.input), (7, 0));
}

#[test]
fn invalid_ids_are_skipped() {
    let mut short_trace = span(1, vec![]);
    short_trace.trace_id = vec![1; 15];
    let mut long_span = span(2, vec![]);
    long_span.span_id = vec![1; 9];
    let mut zero_trace = span(3, vec![]);
    zero_trace.trace_id = vec![0; 16];
    let mut bad_parent = span(4, vec![]);
    bad_parent.parent_span_id = vec![1; 4];
    let req = request(
        vec![],
        vec![
            short_trace,
            long_span,
            zero_trace,
            bad_parent,
            span(5, vec![]),
        ],
    );
    let spans = spans_of(&req, None);
    assert_eq!(spans.len(), 1);
    assert_eq!(spans[0].name, "span-5");
    assert_eq!(spans[0].parent_span_id, None);
}

#[test]
fn renders_arrays_and_maps_as_json() {
    let array = Value::ArrayValue(ArrayValue {
        values: vec![
            AnyValue {
                value: Some(s("a")),
            },
            AnyValue {
                value: Some(Value::IntValue(2)),
            },
            AnyValue {
                value: Some(Value::DoubleValue(f64::NAN)),
            },
            AnyValue { value: None },
        ],
    });
    let map = Value::KvlistValue(KeyValueList {
        values: vec![
            kv("k", Value::BoolValue(false)),
            kv("b", Value::BytesValue(vec![0xde, 0xad])),
        ],
    });
    assert_eq!(
        render(&AnyValue { value: Some(array) }),
        r#"["a",2,null,null]"#
    );
    assert_eq!(
        render(&AnyValue { value: Some(map) }),
        r#"{"b":"dead","k":false}"#
    );
    assert_eq!(render(&AnyValue { value: None }), "");
}

#[test]
fn config_defaults_and_unknown_fields() {
    let c: ReceiverConfig = serde_json::from_str(r#"{"grpc_bind": "0.0.0.0:4317"}"#).unwrap();
    assert_eq!(c.grpc_bind, "0.0.0.0:4317");
    assert_eq!(c.http_bind, "127.0.0.1:4318");
    assert_eq!(c.max_request_bytes, 4 << 20);
    assert_eq!(c.max_pending_spans, 200_000);
    assert_eq!(c.max_clock_skew, Duration::from_secs(60));
    assert_eq!(c.upstream, None);
    assert!(serde_json::from_str::<ReceiverConfig>(r#"{"grcp_bind": "x"}"#).is_err());
}

/// A request as an SDK sends it: ids, names, times, a few attributes.
fn realistic(n: usize) -> ExportTraceServiceRequest {
    let spans = (0..n)
        .map(|i| {
            let mut sp = span(
                (i % 250) as u8 + 1,
                vec![
                    kv("flow.run_id", s("run-0001")),
                    kv("gen_ai.usage.input_tokens", Value::IntValue(1234)),
                    kv("gen_ai.request.model", s("gpt-4o")),
                    kv("http.status_code", Value::IntValue(200)),
                ],
            );
            sp.parent_span_id = vec![9; 8];
            sp.kind = 1;
            sp
        })
        .collect();
    request(
        vec![
            kv("service.name", s("agent")),
            kv("process.pid", Value::IntValue(1)),
        ],
        spans,
    )
}

#[test]
fn decoded_size_estimate_passes_real_spans_and_refuses_dense_ones() {
    let bytes = realistic(1000).encode_to_vec();
    let estimate = wire::decoded_size(&bytes).unwrap();
    let ratio = estimate as f64 / bytes.len() as f64;
    assert!(ratio < DECODE_FACTOR as f64 / 2.0, "ratio {ratio}");
    assert!(decode_request(&bytes, bytes.len() * DECODE_FACTOR).is_ok());

    // 2-byte empty spans: each decodes to a whole `Span`.
    let dense = request(vec![], vec![OtlpSpan::default(); 10_000]).encode_to_vec();
    assert!(dense.len() < 30_000);
    let refusal = decode_request(&dense, dense.len() * DECODE_FACTOR).unwrap_err();
    assert_eq!(refusal.http, StatusCode::PAYLOAD_TOO_LARGE);

    for garbage in [&[0xffu8; 12][..], &[0x0a, 0x05, 0x01], &[0x0b, 0x00]] {
        let refusal = decode_request(garbage, 1 << 20).unwrap_err();
        assert_eq!(refusal.grpc, tonic::Code::InvalidArgument);
    }
}

// --- End to end -----------------------------------------------------

struct Running {
    grpc: SocketAddr,
    http: SocketAddr,
    rx: mpsc::Receiver<Span>,
    stats: Arc<ReceiverStats>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ReceiverError>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let done = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        assert!(matches!(done, Ok(Ok(Ok(())))), "{done:?}");
    }
}

async fn start(config: ReceiverConfig, forwarder: Option<Forwarder>) -> Running {
    start_as(config, forwarder, Binder::off()).await
}

/// This process as a kernel-identified sender in cgroup 7.
fn me() -> Sender {
    Sender::Bound(crate::context::sender::Identified {
        sender: crate::context::spans::SpanSender {
            pid: std::process::id(),
            start_ns: 1,
            cgroup_id: 7,
            trusted: false,
        },
        ..Default::default()
    })
}

async fn start_as(config: ReceiverConfig, forwarder: Option<Forwarder>, binder: Binder) -> Running {
    let config = ReceiverConfig {
        grpc_bind: "127.0.0.1:0".into(),
        http_bind: "127.0.0.1:0".into(),
        ..config
    };
    // A channel as the sink: the tests read what the receiver admitted.
    let (tx, rx) = mpsc::channel::<Span>(config.max_pending_spans.max(1));
    let stats = Arc::new(ReceiverStats::default());
    let receiver = Receiver::bind(config)
        .await
        .unwrap()
        .with_binder(Arc::new(binder));
    let (grpc, http) = (receiver.grpc_addr().unwrap(), receiver.http_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let onward = forwarder.map(|f| Arc::new(f) as Arc<dyn Onward>);
    let task = tokio::spawn(receiver.run(tx, stats.clone(), onward, async move {
        let _ = stopped.await;
    }));
    Running {
        grpc,
        http,
        rx,
        stats,
        stop: Some(stop),
        task,
    }
}

async fn grpc_client(addr: SocketAddr) -> TraceServiceClient<Channel> {
    TraceServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A raw HTTP/1.1 exchange; the status code and the body.
fn http_exchange(addr: SocketAddr, head: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(response.len());
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.get(split + 4..).unwrap_or_default().to_vec();
    (status, body)
}

fn post(addr: SocketAddr, content_type: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    http_exchange(addr, &head, body)
}

async fn post_async(addr: SocketAddr, content_type: &'static str, body: Vec<u8>) -> (u16, Vec<u8>) {
    tokio::task::spawn_blocking(move || post(addr, content_type, &body))
        .await
        .unwrap()
}

async fn next_span(rx: &mut mpsc::Receiver<Span>) -> Span {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn claims_outside_the_sender_are_refused_and_reported() {
    let mut running = start_as(ReceiverConfig::default(), None, Binder::fixed(me())).await;
    let mut client = grpc_client(running.grpc).await;
    // pid 1 is init, not this process: refused; the second resource names
    // no process and binds to this one.
    let mut req = request(
        vec![kv("process.pid", Value::IntValue(1))],
        vec![span(1, vec![])],
    );
    req.resource_spans
        .extend(request(vec![], vec![span(2, vec![])]).resource_spans);
    let response = client.export(req).await.unwrap().into_inner();
    let partial = response.partial_success.expect("a partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.contains("not the sender's"),
        "{partial:?}"
    );
    let got = next_span(&mut running.rx).await;
    assert_eq!(got.span_id, "02".repeat(8));
    assert_eq!(got.pid, Some(std::process::id()));
    assert_eq!(got.sender.map(|s| s.cgroup_id), Some(7));
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn unidentified_senders_are_refused_before_the_body_is_read() {
    let running = start_as(
        ReceiverConfig::default(),
        None,
        Binder::fixed(Sender::Unidentified),
    )
    .await;
    let req = request(vec![], vec![span(1, vec![])]);
    let (status, body) =
        post_async(running.http, "application/x-protobuf", req.encode_to_vec()).await;
    assert_eq!(status, 403);
    assert_eq!(
        RpcStatus::decode(body.as_slice()).unwrap().code,
        tonic::Code::PermissionDenied as i32
    );
    let mut client = grpc_client(running.grpc).await;
    let err = client.export(req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert_eq!(running.stats.spans.load(Ordering::Relaxed), 0);
    assert_eq!(running.stats.rejected_requests.load(Ordering::Relaxed), 2);
    drop(client);
    running.stop().await;
}

/// Opens an HTTP request that announces `len` body bytes and sends one.
fn trickle(addr: SocketAddr, len: usize) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: {len}\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&[0x0a]).unwrap();
    stream
}

#[tokio::test]
async fn slow_bodies_hold_no_decode_permit_and_one_sender_holds_its_share_only() {
    let config = ReceiverConfig {
        max_concurrent_requests: 1,
        max_reads_per_sender: 4,
        read_timeout: Duration::from_secs(300),
        ..ReceiverConfig::default()
    };
    let mut running = start_as(config, None, Binder::fixed(me())).await;
    let http = running.http;
    // Four slow bodies take this sender's whole share.
    let slow: Vec<_> = (0..4).map(|_| trickle(http, 1000)).collect();
    let stats = running.stats.clone();
    // Each is being read once a fifth is refused; until then, retry.
    let req = request(vec![], vec![span(9, vec![])]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let (status, _) = post_async(http, "application/x-protobuf", req.encode_to_vec()).await;
        if status != 200 || Instant::now() > deadline {
            break status;
        }
        // Accepted: a slow one was not yet being read; drain it and retry.
        next_span(&mut running.rx).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 429, "a fifth read of the same sender is refused");
    let mut client = grpc_client(running.grpc).await;
    // The gRPC connection is this same sender: its share is full, so it
    // is told to retry, not made to wait.
    let err = client.export(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    drop(slow);
    // Once the slow bodies are gone, the sender is served again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.export(req.clone()).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                assert_eq!(e.code(), tonic::Code::Unavailable);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("still refused: {e}"),
        }
    }
    assert!(stats.rejected_requests.load(Ordering::Relaxed) >= 2);
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn slow_bodies_do_not_stall_other_requests() {
    // One decode permit, and four clients trickling bodies: on the old
    // receiver each held a permit while its body arrived.
    let config = ReceiverConfig {
        max_concurrent_requests: 1,
        read_timeout: Duration::from_secs(300),
        ..ReceiverConfig::default()
    };
    let mut running = start_as(config, None, Binder::fixed(Sender::Unchecked)).await;
    let slow: Vec<_> = (0..4).map(|_| trickle(running.http, 1000)).collect();
    // Not a synchronisation: the request below must succeed either way;
    // the pause only lets the slow bodies be in hand first, as in life.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut client = grpc_client(running.grpc).await;
    let req = request(vec![], vec![span(5, vec![])]);
    // Generous: on the old receiver this waited for the slow bodies forever.
    let response = tokio::time::timeout(Duration::from_secs(60), client.export(req))
        .await
        .expect("a normal request is served while slow bodies arrive")
        .unwrap();
    assert_eq!(response.into_inner().partial_success, None);
    assert_eq!(next_span(&mut running.rx).await.span_id, "05".repeat(8));
    drop(slow);
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn grpc_end_to_end_with_peer_pid() {
    let mut running = start_as(ReceiverConfig::default(), None, Binder::fixed(me())).await;
    let mut client = grpc_client(running.grpc).await;
    let req = request(
        vec![
            kv("service.name", s("planner")),
            kv("flow.run_id", s("run-7")),
        ],
        vec![OtlpSpan {
            // A span with tokens must be recent (max_span_age).
            start_time_unix_nano: crate::probes::clock::unix_ns(std::time::SystemTime::now())
                - 1000,
            end_time_unix_nano: crate::probes::clock::unix_ns(std::time::SystemTime::now()),
            ..span(
                3,
                vec![kv("gen_ai.usage.input_tokens", Value::IntValue(11))],
            )
        }],
    );
    let response = client.export(req).await.unwrap().into_inner();
    assert_eq!(response.partial_success, None);
    let got = next_span(&mut running.rx).await;
    assert_eq!(got.span_id, "03".repeat(8));
    assert_eq!(got.service.as_deref(), Some("planner"));
    assert_eq!(got.context.run_id.as_deref(), Some("run-7"));
    assert_eq!(got.tokens.as_ref().map(|t| t.input), Some(11));
    assert_eq!(got.pid, Some(std::process::id()));
    assert_eq!(running.stats.requests.load(Ordering::Relaxed), 1);
    assert_eq!(running.stats.spans.load(Ordering::Relaxed), 1);
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn http_end_to_end_and_routes() {
    let mut running = start_as(ReceiverConfig::default(), None, Binder::fixed(me())).await;
    let req = request(vec![kv("flow.id", s("f"))], vec![span(4, vec![])]);
    let (status, body) =
        post_async(running.http, "application/x-protobuf", req.encode_to_vec()).await;
    assert_eq!(status, 200);
    let response = ExportTraceServiceResponse::decode(body.as_slice()).unwrap();
    assert_eq!(response.partial_success, None);
    let got = next_span(&mut running.rx).await;
    assert_eq!(got.span_id, "04".repeat(8));
    assert_eq!(got.context.flow_id.as_deref(), Some("f"));
    assert_eq!(got.pid, Some(std::process::id()));

    // A parameter on the media type is fine; JSON and gzip are not served.
    let (status, _) = post_async(
        running.http,
        "application/x-protobuf; charset=binary",
        req.encode_to_vec(),
    )
    .await;
    assert_eq!(status, 200);
    let (status, body) = post_async(running.http, "application/json", b"{}".to_vec()).await;
    assert_eq!(status, 415);
    assert_eq!(
        RpcStatus::decode(body.as_slice()).unwrap().code,
        tonic::Code::Unimplemented as i32
    );

    let http = running.http;
    let (status, _) = tokio::task::spawn_blocking(move || {
        http_exchange(
            http,
            "GET /v1/traces HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 405);
    let (status, _) = tokio::task::spawn_blocking(move || {
        http_exchange(http, "POST /v1/metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", b"")
    })
    .await
    .unwrap();
    assert_eq!(status, 404);
    running.stop().await;
}

#[tokio::test]
async fn oversized_and_garbage_are_refused_and_the_server_stays_up() {
    let config = ReceiverConfig {
        max_request_bytes: 64 << 10,
        ..ReceiverConfig::default()
    };
    let mut running = start(config, None).await;
    let http = running.http;

    // HTTP: a declared length over the limit is refused before reading.
    let (status, body) = tokio::task::spawn_blocking(move || {
        http_exchange(
            http,
            "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nContent-Length: 10000000\r\nConnection: close\r\n\r\n",
            b"",
        )
    })
    .await
    .unwrap();
    assert_eq!(status, 413);
    assert_eq!(
        RpcStatus::decode(body.as_slice()).unwrap().code,
        tonic::Code::ResourceExhausted as i32
    );
    // HTTP: a chunked body is cut off at the limit.
    let (status, _) = tokio::task::spawn_blocking(move || {
        let chunk = vec![0x0au8; 70 << 10];
        let mut body = format!("{:X}\r\n", chunk.len()).into_bytes();
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n0\r\n\r\n");
        http_exchange(
            http,
            "POST /v1/traces HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-protobuf\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
            &body,
        )
    })
    .await
    .unwrap();
    assert!(status == 413 || status == 0, "status {status}");
    // HTTP: dense payloads, garbage bodies, and not HTTP at all.
    let dense = request(vec![], vec![OtlpSpan::default(); 20_000]).encode_to_vec();
    assert!(dense.len() < 64 << 10);
    assert_eq!(
        post_async(http, "application/x-protobuf", dense.clone())
            .await
            .0,
        413
    );
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    assert_eq!(
        post_async(http, "application/x-protobuf", garbage.clone())
            .await
            .0,
        400
    );
    let junk = garbage.clone();
    let (status, _) = tokio::task::spawn_blocking(move || http_exchange(http, "", &junk))
        .await
        .unwrap();
    assert!(status == 400 || status == 0, "status {status}");

    // gRPC: over the limit, over-dense, malformed, and raw bytes.
    let mut client = grpc_client(running.grpc).await;
    let big = request(
        vec![],
        vec![span(1, vec![kv("blob", s(&"x".repeat(100 << 10)))])],
    );
    let status = client.export(big).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let status = raw_grpc(running.grpc, dense).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    let status = raw_grpc(running.grpc, garbage.clone()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    let grpc = running.grpc;
    tokio::task::spawn_blocking(move || {
        let mut stream = std::net::TcpStream::connect(grpc).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let _ = stream.write_all(&garbage);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    })
    .await
    .unwrap();
    // HTTP: declared too large, cut off, dense, garbage (the non-HTTP
    // bytes never reach the handler); gRPC: too large, dense, garbage.
    assert_eq!(running.stats.rejected_requests.load(Ordering::Relaxed), 7);

    // Both still serve.
    let ok = request(vec![], vec![span(9, vec![])]);
    client.export(ok.clone()).await.unwrap();
    assert_eq!(
        post_async(http, "application/x-protobuf", ok.encode_to_vec())
            .await
            .0,
        200
    );
    assert_eq!(next_span(&mut running.rx).await.span_id, "09".repeat(8));
    assert_eq!(next_span(&mut running.rx).await.span_id, "09".repeat(8));
    drop(client);
    running.stop().await;
}

/// Sends `bytes` as the Export request body, as a broken client would.
async fn raw_grpc(
    addr: SocketAddr,
    bytes: Vec<u8>,
) -> Result<ExportTraceServiceResponse, tonic::Status> {
    #[derive(Clone, Copy, Default)]
    struct Raw;
    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = ExportTraceServiceResponse;
        type Encoder = Raw;
        type Decoder = Raw;
        fn encoder(&mut self) -> Raw {
            Raw
        }
        fn decoder(&mut self) -> Raw {
            Raw
        }
    }
    impl Encoder for Raw {
        type Item = Vec<u8>;
        type Error = tonic::Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
            use prost::bytes::BufMut;
            dst.put_slice(&item);
            Ok(())
        }
    }
    impl Decoder for Raw {
        type Item = ExportTraceServiceResponse;
        type Error = tonic::Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, tonic::Status> {
            Message::decode(src)
                .map(Some)
                .map_err(|e| tonic::Status::internal(e.to_string()))
        }
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    grpc.unary(
        tonic::Request::new(bytes),
        http::uri::PathAndQuery::from_static(EXPORT_PATH),
        Raw,
    )
    .await
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn flood_past_the_pending_bound_is_dropped_and_reported() {
    let config = ReceiverConfig {
        max_pending_spans: 10,
        ..ReceiverConfig::default()
    };
    let mut running = start(config, None).await;
    let spans: Vec<OtlpSpan> = (1..=100).map(|i| span(i, vec![])).collect();
    let mut client = grpc_client(running.grpc).await;
    let response = client
        .export(request(vec![], spans.clone()))
        .await
        .unwrap()
        .into_inner();
    let partial = response.partial_success.unwrap();
    assert_eq!(partial.rejected_spans, 90);
    assert!(
        partial.error_message.contains("90"),
        "{}",
        partial.error_message
    );
    assert_eq!(running.stats.spans.load(Ordering::Relaxed), 100);
    assert_eq!(running.stats.dropped_spans.load(Ordering::Relaxed), 90);

    // Nothing more fits while nobody drains: the whole request is
    // refused with a status SDKs retry (HTTP 503 with Retry-After, gRPC
    // UNAVAILABLE), so nothing is acknowledged that was not taken.
    let (status, body) = post_async(
        running.http,
        "application/x-protobuf",
        request(vec![], spans.clone()).encode_to_vec(),
    )
    .await;
    assert_eq!(status, 503);
    let refused = RpcStatus::decode(body.as_slice()).unwrap();
    assert_eq!(refused.code, tonic::Code::Unavailable as i32);
    assert!(refused.message.contains("retry"), "{}", refused.message);
    assert_eq!(running.stats.dropped_spans.load(Ordering::Relaxed), 190);
    let status = client
        .export(request(vec![], spans))
        .await
        .expect_err("nothing fits");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(running.stats.dropped_spans.load(Ordering::Relaxed), 290);

    let mut got = Vec::new();
    while let Ok(span) = running.rx.try_recv() {
        got.push(span);
    }
    assert_eq!(got.len(), 10);
    assert_eq!(got[0].span_id, "01".repeat(8));
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn spans_with_bad_times_are_refused_in_the_response_and_counted() {
    let mut running = start(ReceiverConfig::default(), None).await;
    let now = crate::probes::clock::unix_ns(std::time::SystemTime::now());
    let hour = 3_600_000_000_000u64;
    let tokens = || vec![kv("gen_ai.usage.input_tokens", Value::IntValue(10))];
    let timed = |n: u8, start: u64, end: u64, attributes| OtlpSpan {
        start_time_unix_nano: start,
        end_time_unix_nano: end,
        ..span(n, attributes)
    };
    let spans = vec![
        // Good: a second ago, with tokens.
        timed(1, now - 1_000_000_000, now, tokens()),
        // The issue's span: tokens, started three hours ago.
        timed(2, now - 3 * hour, now - 3 * hour + 1_000_000_000, tokens()),
        // Ends two hours from now.
        timed(3, now, now + 2 * hour, vec![]),
        // Ends before it starts; a zero start.
        timed(4, now, now - 1, vec![]),
        timed(5, 0, now, vec![]),
        // Two days long, without tokens: too long.
        timed(6, now - 48 * hour, now, vec![]),
        // Three hours old without tokens: no record starts there, taken.
        timed(7, now - 3 * hour, now - 3 * hour + 1, vec![]),
    ];
    let mut client = grpc_client(running.grpc).await;
    let response = client
        .export(request(vec![], spans))
        .await
        .unwrap()
        .into_inner();
    let partial = response.partial_success.unwrap();
    assert_eq!(partial.rejected_spans, 5, "{}", partial.error_message);
    assert!(
        partial.error_message.contains("max_span_age")
            && partial.error_message.contains("max_clock_skew"),
        "{}",
        partial.error_message
    );
    let got: Vec<String> = [
        next_span(&mut running.rx).await,
        next_span(&mut running.rx).await,
    ]
    .into_iter()
    .map(|s| s.span_id)
    .collect();
    assert_eq!(got, ["01".repeat(8), "07".repeat(8)]);
    let n = |r: TimeRefusal| running.stats.bad_times[r.index()].load(Ordering::Relaxed);
    assert_eq!(
        TimeRefusal::ALL.map(n),
        [1, 1, 1, 1, 1],
        "one of each reason"
    );
    let names: Vec<&str> = running.stats.counters().iter().map(|c| c.0).collect();
    assert!(names.contains(&"mentat_agent_receiver_spans_too_old_total"));
    drop(client);
    running.stop().await;
}

#[tokio::test]
async fn invalid_ids_are_reported_as_rejected() {
    let mut running = start(ReceiverConfig::default(), None).await;
    let mut bad = span(1, vec![]);
    bad.span_id = vec![1; 3];
    let mut client = grpc_client(running.grpc).await;
    let response = client
        .export(request(vec![], vec![bad, span(2, vec![])]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.partial_success.unwrap().rejected_spans, 1);
    assert_eq!(running.stats.rejected_spans.load(Ordering::Relaxed), 1);
    assert_eq!(next_span(&mut running.rx).await.span_id, "02".repeat(8));
    drop(client);
    running.stop().await;
}

/// An upstream collector that keeps what it receives.
#[derive(Clone, Default)]
struct Collector {
    got: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.got.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn upstream() -> (Collector, SocketAddr, oneshot::Sender<()>) {
    let upstream = Collector::default();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let service = TraceServiceServer::new(upstream.clone());
    tokio::spawn(
        tonic::transport::Server::builder().serve_with_incoming_shutdown(
            service,
            tonic::transport::server::TcpIncoming::from(listener),
            async move {
                let _ = stopped.await;
            },
        ),
    );
    (upstream, addr, stop)
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn forwards_requests_unchanged() {
    let (upstream, addr, stop_upstream) = upstream().await;
    let stats = Arc::new(ReceiverStats::default());
    let config = ReceiverConfig {
        upstream: Some(OtlpConfig {
            endpoint: format!("http://{addr}"),
            ..OtlpConfig::default()
        }),
        ..ReceiverConfig::default()
    };
    let forwarder = Forwarder::from_config(&config, stats.clone())
        .unwrap()
        .unwrap();
    let mut running = start(config, Some(forwarder)).await;
    let mut bad = span(2, vec![]);
    bad.trace_id = vec![1];
    let req = request(
        vec![kv("service.name", s("svc"))],
        vec![span(1, vec![kv("a", s("b"))]), bad],
    );
    let mut client = grpc_client(running.grpc).await;
    client.export(req.clone()).await.unwrap();
    next_span(&mut running.rx).await;
    wait_for("the upstream", || !upstream.got.lock().unwrap().is_empty()).await;
    // Unchanged: the invalid span too, which is upstream's to judge.
    assert_eq!(upstream.got.lock().unwrap().as_slice(), &[req]);
    wait_for("the counter", || {
        stats.forwarded.load(Ordering::Relaxed) == 2
    })
    .await;
    drop(client);
    running.stop().await;
    let _ = stop_upstream.send(());
}

#[tokio::test]
async fn forwarder_enriches_before_sending() {
    let (upstream, addr, stop_upstream) = upstream().await;
    let stats = Arc::new(ReceiverStats::default());
    let enrich: Enricher = Arc::new(|req: &mut ExportTraceServiceRequest, _: &[Option<u32>]| {
        for span in req
            .resource_spans
            .iter_mut()
            .flat_map(|rs| &mut rs.scope_spans)
            .flat_map(|ss| &mut ss.spans)
        {
            span.attributes
                .push(kv("mentat.cost.total", Value::DoubleValue(0.25)));
        }
    });
    let options = ForwardOptions {
        delay: Duration::from_millis(50),
        enrich: Some(enrich),
        ..ForwardOptions::default()
    };
    let upstream_config = OtlpConfig {
        endpoint: format!("http://{addr}"),
        headers: [("x-api-key".to_string(), "k".to_string())].into(),
        ..OtlpConfig::default()
    };
    let forwarder = Forwarder::start(&upstream_config, options, stats.clone()).unwrap();
    let started = Instant::now();
    assert!(forwarder.forward(request(vec![], vec![span(1, vec![])])));
    wait_for("the upstream", || !upstream.got.lock().unwrap().is_empty()).await;
    assert!(started.elapsed() >= Duration::from_millis(50));
    let got = upstream.got.lock().unwrap()[0].clone();
    let attrs = &got.resource_spans[0].scope_spans[0].spans[0].attributes;
    assert_eq!(
        attrs.last().map(|kv| kv.key.as_str()),
        Some("mentat.cost.total")
    );
    wait_for("the queue to empty", || forwarder.queued_bytes() == 0).await;
    let _ = stop_upstream.send(());
}

/// OpenLLMetry and OpenInference record prompts and completions on spans by
/// default; the forwarder strips them unless `forward_message_content` is set,
/// and keeps everything else (token counts, model, ids).
#[tokio::test]
async fn prompt_and_completion_text_is_not_forwarded_unless_configured() {
    use opentelemetry_proto::tonic::trace::v1::span::Event;
    let content_span = || {
        let mut sp = span(
            1,
            vec![
                kv("gen_ai.request.model", s("gpt-4o")),
                kv("gen_ai.usage.input_tokens", Value::IntValue(12)),
                kv(
                    "gen_ai.input.messages",
                    s("[{\"role\":\"user\",\"content\":\"secret\"}]"),
                ),
                kv(
                    "gen_ai.output.messages",
                    s("[{\"content\":\"secret answer\"}]"),
                ),
                kv("gen_ai.prompt.0.content", s("secret")),
                kv("gen_ai.completion.0.content", s("secret answer")),
                kv("llm.input_messages.0.message.content", s("secret")),
                kv("input.value", s("secret")),
                // Not content, though it shares a prefix's first letters.
                kv("gen_ai.prompt_tokens_hint", Value::IntValue(3)),
            ],
        );
        sp.events.push(Event {
            name: "gen_ai.content.prompt".into(),
            attributes: vec![
                kv("gen_ai.prompt", s("secret")),
                kv("n", Value::IntValue(1)),
            ],
            ..Default::default()
        });
        sp
    };
    for keep in [false, true] {
        let (upstream, addr, stop_upstream) = upstream().await;
        let stats = Arc::new(ReceiverStats::default());
        let options = ForwardOptions {
            delay: Duration::from_millis(10),
            keep_message_content: keep,
            ..ForwardOptions::default()
        };
        let upstream_config = OtlpConfig {
            endpoint: format!("http://{addr}"),
            ..OtlpConfig::default()
        };
        let forwarder = Forwarder::start(&upstream_config, options, stats.clone()).unwrap();
        assert!(forwarder.forward(request(vec![], vec![content_span()])));
        wait_for("the upstream", || !upstream.got.lock().unwrap().is_empty()).await;
        let got = upstream.got.lock().unwrap()[0].clone();
        let span = &got.resource_spans[0].scope_spans[0].spans[0];
        let keys: Vec<&str> = span.attributes.iter().map(|kv| kv.key.as_str()).collect();
        let event_keys: Vec<&str> = span.events[0]
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        let text = format!("{:?}", got);
        if keep {
            assert!(text.contains("secret answer"), "{keys:?}");
            assert_eq!(keys.len(), 9, "{keys:?}");
            assert_eq!(stats.forward_content_stripped.load(Ordering::Relaxed), 0);
        } else {
            assert!(
                !text.contains("secret"),
                "content forwarded: {keys:?} {event_keys:?}"
            );
            assert_eq!(
                keys,
                [
                    "gen_ai.request.model",
                    "gen_ai.usage.input_tokens",
                    "gen_ai.prompt_tokens_hint"
                ]
            );
            assert_eq!(event_keys, ["n"]);
            assert_eq!(stats.forward_content_stripped.load(Ordering::Relaxed), 7);
        }
        wait_for("the queue to empty", || forwarder.queued_bytes() == 0).await;
        let _ = stop_upstream.send(());
    }
}

#[tokio::test]
async fn forwarding_failures_are_retried_then_counted_and_the_queue_is_bounded() {
    // Nothing listens on the port a dropped listener had.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let stats = Arc::new(ReceiverStats::default());
    let upstream_config = OtlpConfig {
        endpoint: format!("http://{dead}"),
        timeout_ms: 500,
        ..OtlpConfig::default()
    };
    let options = ForwardOptions {
        max_attempts: 2,
        ..ForwardOptions::default()
    };
    let forwarder = Forwarder::start(&upstream_config, options, stats.clone()).unwrap();
    assert!(forwarder.forward(request(vec![], vec![span(1, vec![]), span(2, vec![])])));
    wait_for("the retries", || {
        stats.forward_dropped.load(Ordering::Relaxed) == 2
    })
    .await;
    assert_eq!(stats.forward_errors.load(Ordering::Relaxed), 2);
    assert_eq!(stats.forwarded.load(Ordering::Relaxed), 0);

    let tiny = ForwardOptions {
        queue_bytes: 10,
        ..ForwardOptions::default()
    };
    let full = Forwarder::start(&upstream_config, tiny, stats.clone()).unwrap();
    assert!(!full.forward(request(vec![], vec![span(1, vec![])])));
    assert_eq!(stats.forward_dropped.load(Ordering::Relaxed), 3);
    assert_eq!(full.queued_bytes(), 0);
    assert!(matches!(
        Forwarder::start(
            &OtlpConfig {
                endpoint: "not a url".into(),
                ..OtlpConfig::default()
            },
            ForwardOptions::default(),
            stats
        ),
        Err(ReceiverError::Upstream { .. })
    ));
}

#[tokio::test]
async fn bind_errors_name_the_address() {
    let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let config = ReceiverConfig {
        grpc_bind: "127.0.0.1:0".into(),
        http_bind: addr.clone(),
        ..ReceiverConfig::default()
    };
    let error = Receiver::bind(config).await.unwrap_err();
    assert!(matches!(
        &error,
        ReceiverError::Bind {
            protocol: "HTTP",
            ..
        }
    ));
    assert!(error.to_string().contains(&addr), "{error}");
}
