//! The OTLP trace receiver on the node: gRPC (4317) and HTTP/protobuf (4318).
//!
//! Agents point their OTLP exporter here, the way they would at a node-local
//! collector. Each request's spans are converted (`convert`), bound to their
//! sender (`peer`, `crate::context::sender`) and admitted (`admission`) into
//! a [`SpanSink`] before the answer, over gRPC (`grpc`) or HTTP
//! (`http_protobuf`); with an upstream configured, each admitted request also
//! goes on to the [`Onward`] it was given (`crate::serve::forward`).
//!
//! Everything a client sends is hostile until decoded, so memory is bounded at
//! each step, and a bad request costs its sender a status code, never the
//! agent its life:
//! - a body over `max_request_bytes` is refused (HTTP 413, gRPC
//!   `ResourceExhausted`) before it is buffered;
//! - protobuf lets two bytes become a 264-byte span, so before decoding, the
//!   heap the decoded request would take is estimated from the wire format
//!   (`wire`) and a request that would take more than [`DECODE_FACTOR`] ×
//!   `max_request_bytes` is refused the same way;
//! - at most `max_concurrent_requests` requests are read and decoded at once,
//!   so requests in hand take at most about concurrent × max_request_bytes ×
//!   (1 + 2 × DECODE_FACTOR) (the 2 for `Vec` growth);
//! - malformed payloads get HTTP 400 / gRPC `InvalidArgument`; a span whose
//!   trace, span or parent id has the wrong length (or is all zeros) is
//!   skipped and reported in `partial_success`;
//! - each span's times are checked before it is taken ([`crate::context::inbox`]:
//!   in range, end ≥ start, at most `max_clock_skew` ahead, at most
//!   `max_span_duration` long, a span with tokens at most `max_span_age`
//!   old); a span outside is refused in `partial_success` and counted by
//!   reason;
//! - spans are admitted into a [`SpanSink`] (the daemon's bounded span
//!   inbox) *before* the response: what does not fit (`max_pending_spans`,
//!   `max_indexed_spans`, the sender's `max_indexed_spans_per_process`) is
//!   reported in `partial_success`, and a request of which nothing fits is
//!   answered gRPC `UNAVAILABLE` / HTTP 503 with `Retry-After`, which OTLP
//!   SDKs retry; what was taken is never dropped later. The client is never
//!   made to wait for room;
//! - the forwarding queue is bounded in encoded bytes, requests in flight
//!   included.
//!
//! Warnings are rate limited to one per kind per minute: a flood of bad input
//! must not become a flood of log lines. Counters in [`ReceiverStats`] carry
//! the exact numbers.
//!
//! Forwarding: [`serve`] hands each request it admitted, with the host pid
//! each resource was bound to, to its [`Onward`] without waiting; the
//! forwarder (`crate::serve::forward`) delays, enriches and sends it.
//!
//! Senders: every connection is bound to the process that sent it, as the
//! kernel says ([`crate::context::sender`]); spans that claim another process,
//! container or pod are refused, and a connection nobody can identify is
//! refused before its body is read (HTTP 403, gRPC `PermissionDenied`).
//!
//! Slow clients: a body is read before a request takes one of the
//! `max_concurrent_requests` decode permits, under `read_timeout`, in one of
//! `max_concurrent_reads` read slots of which one sender (its cgroup) holds at
//! most `max_reads_per_sender`; a sender over its share is answered at once
//! (HTTP 429, gRPC `Unavailable`, both retried by OTLP SDKs). So clients that
//! trickle bytes hold read slots of their own, never the permits other
//! senders' spans need.
//!
//! Why these limits are not tower layers: the whole gRPC exchange is bounded
//! by tonic's timeout layer (`read_timeout` + 30 s), but the read slots are
//! keyed by sender, and the decode permits are taken only once a body has
//! been read, so that a slow client holds its own slot and never a permit;
//! tower's `ConcurrencyLimit` and `LoadShed` wrap a whole request per
//! service, before its body, and would let trickling clients starve every
//! other sender.
//!
//! Not supported: OTLP/JSON and compressed payloads (HTTP answers 415, gRPC
//! `Unimplemented`); OTLP exporters send uncompressed protobuf by default.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{Router, routing::post};
use serde::Deserialize;
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tracing::info;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::{
    context::{
        inbox::{SpanSink, TimeLimits, TimeRefusal},
        receiver::{
            admission::Handler,
            grpc::{GrpcService, Incoming},
            http_protobuf::export_http,
            peer::Peer,
        },
        sender::Binder,
    },
    serve::otlp::OtlpConfig,
};

mod admission;
pub mod convert;
mod grpc;
mod http_protobuf;
mod peer;
#[cfg(test)]
mod tests;
pub(crate) mod warn;
mod wire;

/// Heap a decoded request may take, as a multiple of `max_request_bytes`.
// Real spans decode to 2–5 × their wire size; runs of empty messages, which
// only an attacker sends, to over 100 ×.
pub const DECODE_FACTOR: usize = 8;

/// How long one gRPC request may take to be handled once its body arrived
/// (the body itself has `read_timeout`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The gRPC method OTLP exporters call.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The OTLP/HTTP media type for protobuf.
const PROTOBUF: &str = "application/x-protobuf";

/// The receiver's settings (`[receiver]` in the agent's config).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReceiverConfig {
    /// OTLP/gRPC listen address.
    pub grpc_bind: String,
    /// OTLP/HTTP listen address.
    pub http_bind: String,
    /// Largest request body accepted, bytes.
    pub max_request_bytes: usize,
    /// Spans waiting for their window (token records, per-run rows) beyond
    /// which new ones are refused in the response. Each costs about 4 KiB of
    /// memory until its window is committed (200,000 peaked at 799 MiB RSS,
    /// BENCHMARKS.md "Span intake"): size the agent's memory limit from it.
    pub max_pending_spans: usize,
    /// Spans with a run held for splitting windows beyond which new ones
    /// are refused in the response.
    pub max_indexed_spans: usize,
    /// Of those, the most one sender (a bound process) may hold.
    pub max_indexed_spans_per_process: usize,
    /// How far ahead of the agent's clock a span's start or end may be.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub max_clock_skew: Duration,
    /// The longest span taken.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub max_span_duration: Duration,
    /// How long ago a span with tokens may have started (its token record's
    /// window starts there; it must be inside `raw_retention`).
    #[serde(with = "crate::probes::clock::duration_str")]
    pub max_span_age: Duration,
    /// Requests read and decoded at once, both protocols together.
    pub max_concurrent_requests: usize,
    /// Forwarding queue bound, encoded bytes (requests in flight included).
    pub forward_queue_bytes: usize,
    /// Forward prompt and completion text (`gen_ai.input.messages`, …) as
    /// received; default false: stripped before the request leaves the node.
    pub forward_message_content: bool,
    /// Where received spans are forwarded; none: not forwarded.
    pub upstream: Option<OtlpConfig>,
    /// Senders whose `process.pid` / `container.id` / `k8s.pod.uid` claims
    /// are believed unchecked: `cgroup:/<path>` (a process in that cgroup v2
    /// path or below, identified by the kernel) or `addr:<ip>` (any
    /// connection from that address).
    pub trusted_forwarders: Vec<String>,
    /// How long a request's body may take to arrive.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub read_timeout: Duration,
    /// Request bodies read at once, all senders together.
    pub max_concurrent_reads: usize,
    /// Request bodies one sender (one cgroup) reads at once.
    pub max_reads_per_sender: usize,
    /// How long an LLM call's token span is remembered to recognise another
    /// report of the same call (`context::dedupe`).
    #[serde(with = "crate::probes::clock::duration_str")]
    pub token_dedupe_window: Duration,
    /// LLM calls remembered for the dedupe; past it, the oldest are forgotten (counted).
    pub max_token_dedupe_calls: usize,
    /// Parent links remembered for the dedupe's nesting rule; past it, the oldest (counted).
    pub max_token_dedupe_links: usize,
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            grpc_bind: "127.0.0.1:4317".into(),
            http_bind: "127.0.0.1:4318".into(),
            max_request_bytes: 4 << 20,
            max_pending_spans: 200_000,
            max_indexed_spans: 1_000_000,
            max_indexed_spans_per_process: 250_000,
            max_clock_skew: Duration::from_secs(60),
            max_span_duration: Duration::from_secs(24 * 3600),
            max_span_age: Duration::from_secs(30 * 60),
            max_concurrent_requests: 4,
            forward_queue_bytes: 32 << 20,
            forward_message_content: false,
            upstream: None,
            trusted_forwarders: Vec::new(),
            read_timeout: Duration::from_secs(10),
            max_concurrent_reads: 64,
            max_reads_per_sender: 8,
            token_dedupe_window: Duration::from_secs(300),
            max_token_dedupe_calls: 50_000,
            max_token_dedupe_links: 200_000,
        }
    }
}

/// Counters of what the receiver accepted, refused and dropped.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    /// Export requests decoded and handled, both protocols.
    pub requests: AtomicU64,
    /// Spans received with valid ids.
    pub spans: AtomicU64,
    /// Requests refused: malformed, too large, unsupported encoding, too slow.
    pub rejected_requests: AtomicU64,
    /// Spans skipped for an invalid trace, span or parent id.
    pub rejected_spans: AtomicU64,
    /// Valid spans dropped because `max_pending_spans` were already waiting.
    pub dropped_spans: AtomicU64,
    /// Spans the upstream endpoint accepted.
    pub forwarded: AtomicU64,
    /// Failed sends upstream, each attempt counted.
    pub forward_errors: AtomicU64,
    /// Spans never delivered upstream: queue full, retries spent, or refused.
    pub forward_dropped: AtomicU64,
    /// Prompt/completion attributes stripped from forwarded spans.
    pub forward_content_stripped: AtomicU64,
    /// Spans refused for their times, per [`TimeRefusal::ALL`] reason.
    pub bad_times: [AtomicU64; 5],
    /// Spans refused because their sender held its quota of indexed spans.
    pub over_quota: AtomicU64,
}

impl ReceiverStats {
    /// The counters as (name, help, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "mentat_agent_receiver_requests_total",
                "OTLP export requests decoded and handled (gRPC and HTTP).",
                v(&self.requests),
            ),
            (
                "mentat_agent_receiver_spans_total",
                "Spans received with valid ids.",
                v(&self.spans),
            ),
            (
                "mentat_agent_receiver_rejected_requests_total",
                "OTLP requests refused: malformed, too large, unsupported encoding or too slow.",
                v(&self.rejected_requests),
            ),
            (
                "mentat_agent_receiver_rejected_spans_total",
                "Spans skipped for an invalid trace, span or parent id.",
                v(&self.rejected_spans),
            ),
            (
                "mentat_agent_receiver_dropped_spans_total",
                "Valid spans refused in the response (partial_success, or UNAVAILABLE / HTTP 503 when none fit) because max_pending_spans or max_indexed_spans were reached.",
                v(&self.dropped_spans),
            ),
            (
                "mentat_agent_receiver_spans_over_quota_total",
                "Spans refused in the response because their sender held max_indexed_spans_per_process indexed spans.",
                v(&self.over_quota),
            ),
            (
                "mentat_agent_receiver_spans_time_out_of_range_total",
                "Spans refused in the response for a start or end time of 0 or past year 2262.",
                v(&self.bad_times[TimeRefusal::OutOfRange.index()]),
            ),
            (
                "mentat_agent_receiver_spans_end_before_start_total",
                "Spans refused in the response for ending before they start.",
                v(&self.bad_times[TimeRefusal::EndBeforeStart.index()]),
            ),
            (
                "mentat_agent_receiver_spans_future_total",
                "Spans refused in the response for a start or end further ahead of the agent's clock than max_clock_skew.",
                v(&self.bad_times[TimeRefusal::Future.index()]),
            ),
            (
                "mentat_agent_receiver_spans_too_long_total",
                "Spans refused in the response for lasting longer than max_span_duration.",
                v(&self.bad_times[TimeRefusal::TooLong.index()]),
            ),
            (
                "mentat_agent_receiver_spans_too_old_total",
                "Spans with tokens refused in the response for starting longer ago than max_span_age (their token record would fall in hours the ledger has compacted).",
                v(&self.bad_times[TimeRefusal::TooOld.index()]),
            ),
            (
                "mentat_agent_forwarded_spans_total",
                "Spans the upstream endpoint accepted.",
                v(&self.forwarded),
            ),
            (
                "mentat_agent_forward_errors_total",
                "Failed sends to the upstream endpoint, each attempt counted.",
                v(&self.forward_errors),
            ),
            (
                "mentat_agent_forward_dropped_spans_total",
                "Spans never delivered upstream: queue full, retries spent, or refused.",
                v(&self.forward_dropped),
            ),
            (
                "mentat_agent_forward_content_stripped_total",
                "Prompt and completion attributes (gen_ai.input.messages, gen_ai.prompt.*, ...) removed from forwarded spans ([receiver] forward_message_content = false).",
                v(&self.forward_content_stripped),
            ),
        ]
    }
}

/// Why the receiver could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReceiverError {
    /// A listen address could not be bound.
    #[error("binding the OTLP/{protocol} receiver to {addr}: {source}")]
    Bind {
        /// `gRPC` or `HTTP`.
        protocol: &'static str,
        /// The address as configured.
        addr: String,
        /// The bind error.
        #[source]
        source: io::Error,
    },
    /// A server failed while running.
    #[error("the OTLP/{protocol} receiver on {addr} failed: {message}")]
    Serve {
        /// `gRPC` or `HTTP`.
        protocol: &'static str,
        /// The bound address.
        addr: SocketAddr,
        /// What went wrong.
        message: String,
    },
    /// A `trusted_forwarders` entry is not valid.
    #[error("[receiver] {0}")]
    TrustedForwarder(String),
    /// The upstream endpoint, a header or the CA file is not valid.
    #[error("forwarding to {endpoint:?}: {message}")]
    Upstream {
        /// The endpoint as configured.
        endpoint: String,
        /// What is wrong.
        message: String,
    },
}

/// Where an admitted request goes next (the span forwarder in `serve`): the
/// receiver knows only this, like an OpenTelemetry Collector receiver knows
/// only its next consumer.
pub trait Onward: Send + Sync {
    /// Takes `request`, whose resources' spans are bound to `host_pids` (one
    /// per `resource_spans` entry), without waiting; false if it was dropped.
    fn forward_bound(
        &self,
        request: ExportTraceServiceRequest,
        host_pids: Vec<Option<u32>>,
    ) -> bool;
}

/// Serves both protocols until `shutdown`; spans go to `sink`, refused in the response when it is full.
pub async fn serve(
    config: ReceiverConfig,
    tx: impl SpanSink + 'static,
    stats: Arc<ReceiverStats>,
    forwarder: Option<Arc<dyn Onward>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ReceiverError> {
    Receiver::bind(config)
        .await?
        .run(tx, stats, forwarder, shutdown)
        .await
}

/// Both listeners, bound: bind errors surface before anything runs, and port 0 works.
#[derive(Debug)]
pub struct Receiver {
    config: ReceiverConfig,
    grpc: TcpListener,
    http: TcpListener,
    binder: Arc<Binder>,
}

impl Receiver {
    /// Binds both addresses of `config`.
    pub async fn bind(config: ReceiverConfig) -> Result<Self, ReceiverError> {
        let bind = |protocol: &'static str, addr: String| async move {
            TcpListener::bind(addr.as_str())
                .await
                .map_err(|source| ReceiverError::Bind {
                    protocol,
                    addr,
                    source,
                })
        };
        let grpc = bind("gRPC", config.grpc_bind.clone()).await?;
        let http = bind("HTTP", config.http_bind.clone()).await?;
        Ok(Self {
            config,
            grpc,
            http,
            binder: Arc::new(Binder::off()),
        })
    }

    /// Binds every connection's spans to its sender through `binder` (the
    /// default, [`Binder::off`], believes every claim: for receivers that
    /// meter no one).
    pub fn with_binder(mut self, binder: Arc<Binder>) -> Self {
        self.binder = binder;
        self
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> io::Result<SocketAddr> {
        self.grpc.local_addr()
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> io::Result<SocketAddr> {
        self.http.local_addr()
    }

    /// Serves until `shutdown` completes; see [`serve`].
    pub async fn run(
        self,
        tx: impl SpanSink + 'static,
        stats: Arc<ReceiverStats>,
        forwarder: Option<Arc<dyn Onward>>,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ReceiverError> {
        let grpc_addr = self.grpc_addr().map_err(|e| ReceiverError::Bind {
            protocol: "gRPC",
            addr: self.config.grpc_bind.clone(),
            source: e,
        })?;
        let http_addr = self.http_addr().map_err(|e| ReceiverError::Bind {
            protocol: "HTTP",
            addr: self.config.http_bind.clone(),
            source: e,
        })?;
        // Clients address the ports as bound (a hostPort equals its containerPort).
        self.binder
            .watch_ports(&[grpc_addr.port(), http_addr.port()]);
        let handler = Arc::new(Handler {
            sink: Box::new(tx),
            max_pending: self.config.max_pending_spans,
            max_indexed: self.config.max_indexed_spans,
            times: TimeLimits {
                max_clock_skew: self.config.max_clock_skew,
                max_span_duration: self.config.max_span_duration,
                max_span_age: self.config.max_span_age,
            },
            max_request_bytes: self.config.max_request_bytes,
            permits: Arc::new(Semaphore::new(self.config.max_concurrent_requests.max(1))),
            stats,
            forwarder,
            binder: self.binder.clone(),
            reads: Arc::new(Semaphore::new(self.config.max_concurrent_reads.max(1))),
            reading: Arc::new(std::sync::Mutex::new(HashMap::new())),
            max_reads_per_sender: self.config.max_reads_per_sender.max(1),
            read_timeout: self.config.read_timeout,
        });

        // One shutdown future, two servers: a watch channel fans it out.
        let (stop_tx, stop_rx) = watch::channel(false);
        let watcher = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };

        info!(grpc = %grpc_addr, http = %http_addr, "OTLP receiver listening");
        let grpc = tonic::transport::Server::builder()
            // The body's own deadline (`read_timeout`) comes first; this
            // bounds the whole exchange.
            .timeout(self.config.read_timeout.saturating_add(REQUEST_TIMEOUT))
            .serve_with_incoming_shutdown(
                GrpcService {
                    handler: handler.clone(),
                },
                Incoming {
                    listener: self.grpc,
                    pause: None,
                },
                stopped(stop_rx.clone()),
            );
        let grpc = async {
            grpc.await.map_err(|e| ReceiverError::Serve {
                protocol: "gRPC",
                addr: grpc_addr,
                message: e.to_string(),
            })
        };
        let router = Router::new()
            .route("/v1/traces", post(export_http))
            .with_state(handler);
        let http = axum::serve(
            self.http,
            router.into_make_service_with_connect_info::<Peer>(),
        )
        .with_graceful_shutdown(stopped(stop_rx));
        let http = async {
            http.await.map_err(|e| ReceiverError::Serve {
                protocol: "HTTP",
                addr: http_addr,
                message: e.to_string(),
            })
        };
        // If one server fails, the other is dropped with it: the agent
        // reports the failure instead of running half a receiver.
        let result = tokio::try_join!(grpc, http).map(|_| ());
        watcher.abort();
        result
    }
}

// Handling a request, either protocol.
