//! The OTLP trace receiver on the node: gRPC (4317) and HTTP/protobuf (4318).
//!
//! Agents point their OTLP exporter here, the way they would at a node-local
//! collector. Each span becomes a [`Span`] handed to `context` over a bounded
//! channel; with an upstream configured, each request also goes on, unchanged
//! but for what an [`Enricher`] adds, through a [`Forwarder`].
//!
//! Everything a client sends is hostile until decoded, so memory is bounded at
//! each step, and a bad request costs its sender a status code, never the
//! agent its life:
//! - a body over `max_request_bytes` is refused (HTTP 413, gRPC
//!   `ResourceExhausted`) before it is buffered;
//! - protobuf lets two bytes become a 264-byte span, so before decoding, the
//!   heap the decoded request would take is estimated from the wire format
//!   ([`wire`]) and a request that would take more than [`DECODE_FACTOR`] ×
//!   `max_request_bytes` is refused the same way;
//! - at most `max_concurrent_requests` requests are read and decoded at once,
//!   so requests in hand take at most about concurrent × max_request_bytes ×
//!   (1 + 2 × DECODE_FACTOR) (the 2 for `Vec` growth);
//! - malformed payloads get HTTP 400 / gRPC `InvalidArgument`; a span whose
//!   trace, span or parent id has the wrong length (or is all zeros) is
//!   skipped and reported in `partial_success`;
//! - each span's times are checked before it is taken ([`crate::intake`]:
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
//! Forwarding: [`serve`] hands each request it received, unchanged, to the
//! [`Forwarder`] it was given (a caller may [`Forwarder::forward`] its own
//! too). The forwarder's task holds each request [`ForwardOptions::delay`],
//! lets [`ForwardOptions::enrich`] add attributes (the cost of each span's
//! usage), then sends it, retrying transient failures with backoff. It never
//! delays a client's response; it connects lazily, so an upstream that is
//! down at start does not stop the agent; and it ends once every handle is
//! dropped and its queue is empty.
//!
//! Senders: every connection is bound to the process that sent it, as the
//! kernel says ([`crate::sender`]); spans that claim another process,
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
//! Not supported: OTLP/JSON and compressed payloads (HTTP answers 415, gRPC
//! `Unimplemented`); OTLP exporters send uncompressed protobuf by default.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    future::{Future, poll_fn},
    io,
    net::SocketAddr,
    pin::Pin,
    str::FromStr,
    sync::{
        Arc, LazyLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::{Body as AxumBody, HttpBody},
    extract::{ConnectInfo, State, connect_info::Connected as AxumConnected},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
    serve::IncomingStream,
};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_client::TraceServiceClient, trace_service_server::TraceService,
    },
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::ResourceSpans,
};
use prost::Message;
use serde::Deserialize;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OnceCell, OwnedSemaphorePermit, Semaphore, mpsc, watch},
};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{BoxFuture, Service, http, tokio_stream::Stream},
    metadata::{Ascii, MetadataKey, MetadataValue},
    server::UnaryService,
    transport::{
        Certificate, Channel, ClientTlsConfig, Endpoint, server::Connected as TonicConnected,
    },
};
use tracing::{debug, info, warn};

use crate::{
    export::OtlpConfig,
    intake::{SpanSink, TimeLimits, TimeRefusal, check_time},
    sender::{Binder, Sender},
    spans::{PidScope, RunContext, Span, SpanTokens},
};

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
    #[serde(with = "crate::clock::duration_str")]
    pub max_clock_skew: Duration,
    /// The longest span taken.
    #[serde(with = "crate::clock::duration_str")]
    pub max_span_duration: Duration,
    /// How long ago a span with tokens may have started (its token record's
    /// window starts there; it must be inside `raw_retention`).
    #[serde(with = "crate::clock::duration_str")]
    pub max_span_age: Duration,
    /// Requests read and decoded at once, both protocols together.
    pub max_concurrent_requests: usize,
    /// Forwarding queue bound, encoded bytes (requests in flight included).
    pub forward_queue_bytes: usize,
    /// Where received spans are forwarded; none: not forwarded.
    pub upstream: Option<OtlpConfig>,
    /// Senders whose `process.pid` / `container.id` / `k8s.pod.uid` claims
    /// are believed unchecked: `cgroup:/<path>` (a process in that cgroup v2
    /// path or below, identified by the kernel) or `addr:<ip>` (any
    /// connection from that address).
    pub trusted_forwarders: Vec<String>,
    /// How long a request's body may take to arrive.
    #[serde(with = "crate::clock::duration_str")]
    pub read_timeout: Duration,
    /// Request bodies read at once, all senders together.
    pub max_concurrent_reads: usize,
    /// Request bodies one sender (one cgroup) reads at once.
    pub max_reads_per_sender: usize,
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
            upstream: None,
            trusted_forwarders: Vec::new(),
            read_timeout: Duration::from_secs(10),
            max_concurrent_reads: 64,
            max_reads_per_sender: 8,
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

/// Serves both protocols until `shutdown`; spans go to `sink`, refused in the response when it is full.
pub async fn serve(
    config: ReceiverConfig,
    tx: impl SpanSink + 'static,
    stats: Arc<ReceiverStats>,
    forwarder: Option<Forwarder>,
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
        forwarder: Option<Forwarder>,
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

// ---------------------------------------------------------------------------
// Handling a request, either protocol.

/// What both servers share.
struct Handler {
    sink: Box<dyn SpanSink>,
    max_pending: usize,
    max_indexed: usize,
    times: TimeLimits,
    max_request_bytes: usize,
    permits: Arc<Semaphore>,
    stats: Arc<ReceiverStats>,
    forwarder: Option<Forwarder>,
    binder: Arc<Binder>,
    /// Read slots, all senders together.
    reads: Arc<Semaphore>,
    /// Reads in progress per sender key.
    reading: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
    max_reads_per_sender: usize,
    read_timeout: Duration,
}

/// One request body being read: a global read slot and the sender's share.
struct ReadSlot {
    _slot: OwnedSemaphorePermit,
    key: Option<u64>,
    reading: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
}

impl Drop for ReadSlot {
    fn drop(&mut self) {
        if let (Some(key), Ok(mut r)) = (self.key, self.reading.lock())
            && let Some(n) = r.get_mut(&key)
        {
            *n -= 1;
            if *n == 0 {
                r.remove(&key);
            }
        }
    }
}

impl Handler {
    /// A slot to read one request body from `sender`, never waiting: a
    /// sender past its share, or a receiver with every slot taken, is told
    /// to retry later.
    fn read_slot(&self, sender: &Sender) -> Result<ReadSlot, Refusal> {
        if matches!(sender, Sender::Unidentified) {
            return Err(Refusal::unidentified(
                "the sender is not identified by the node's kernel and is not a trusted forwarder"
                    .into(),
            ));
        }
        let slot = self.reads.clone().try_acquire_owned().map_err(|_| {
            Refusal::throttled("every read slot of the receiver is taken; retry later".into())
        })?;
        let key = sender.quota_key();
        if let Some(key) = key {
            let Ok(mut r) = self.reading.lock() else {
                return Err(Refusal::throttled(
                    "the receiver's read accounting failed".into(),
                ));
            };
            let n = r.entry(key).or_insert(0);
            if *n >= self.max_reads_per_sender {
                return Err(Refusal::throttled(format!(
                    "this sender already has {} requests being read; retry later",
                    self.max_reads_per_sender
                )));
            }
            *n += 1;
        }
        Ok(ReadSlot {
            _slot: slot,
            key,
            reading: self.reading.clone(),
        })
    }

    /// Binds, checks and admits one decoded request, then forwards it; the
    /// response to send, or a retryable refusal when none of it fit.
    async fn accept(
        &self,
        request: ExportTraceServiceRequest,
        sender: &Sender,
    ) -> Result<ExportTraceServiceResponse, Refusal> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let total = span_count(&request);
        // Claims checked against the kernel's sender; refused spans are
        // neither queued nor forwarded.
        let bound = self.binder.bind_request(sender, request);
        let spans = bound.spans;
        let refused = bound.refused;
        let valid = spans.len() as u64;
        let invalid = total.saturating_sub(valid + refused.total());
        let (spans, bad_times) = self.check_times(spans);
        let admission = self.sink.admit(spans);
        let (full, over_quota) = (admission.full, admission.over_quota);
        self.stats.spans.fetch_add(valid, Ordering::Relaxed);
        if invalid > 0 {
            let n = self
                .stats
                .rejected_spans
                .fetch_add(invalid, Ordering::Relaxed)
                + invalid;
            if warn_allowed(Warn::InvalidIds) {
                warn!(
                    skipped = invalid,
                    total_skipped = n,
                    "OTLP receiver: spans with invalid trace, span or parent ids skipped"
                );
            }
        }
        if full > 0 {
            let n = self.stats.dropped_spans.fetch_add(full, Ordering::Relaxed) + full;
            if warn_allowed(Warn::PendingFull) {
                warn!(
                    refused = full,
                    total_refused = n,
                    max_pending_spans = self.max_pending,
                    max_indexed_spans = self.max_indexed,
                    "OTLP receiver: span inbox full, spans refused in the response"
                );
            }
        }
        if over_quota > 0 {
            self.stats
                .over_quota
                .fetch_add(over_quota, Ordering::Relaxed);
            if warn_allowed(Warn::OverQuota) {
                warn!(
                    refused = over_quota,
                    "OTLP receiver: a sender holds its quota of indexed spans (max_indexed_spans_per_process), spans refused in the response"
                );
            }
        }
        if admission.accepted == 0 && full + over_quota > 0 {
            // Nothing was taken: the whole request may be sent again, and
            // an SDK does so for this status after the advised wait.
            return Err(Refusal::busy(if full > 0 {
                format!(
                    "{} spans refused: the receiver's pending-span bound is full; retry later",
                    full + over_quota
                )
            } else {
                format!(
                    "{over_quota} spans refused: this sender holds its quota of spans waiting for their windows; retry later"
                )
            }));
        }
        if let (Some(forwarder), Some((request, host_pids))) = (&self.forwarder, bound.forward) {
            forwarder.forward_bound(request, host_pids);
        }
        let mut reasons = Vec::new();
        if invalid > 0 {
            reasons.push(format!(
                "{invalid} spans with invalid trace, span or parent ids"
            ));
        }
        let timed: u64 = bad_times.iter().sum();
        if timed > 0 {
            let why: Vec<String> = TimeRefusal::ALL
                .iter()
                .zip(bad_times)
                .filter(|(_, n)| *n > 0)
                .map(|(r, n)| format!("{n} with {r}"))
                .collect();
            reasons.push(format!(
                "{timed} spans refused for their times ({})",
                why.join(", ")
            ));
        }
        if full > 0 {
            reasons.push(format!(
                "{full} spans refused: the receiver's pending-span bound is full"
            ));
        }
        if over_quota > 0 {
            reasons.push(format!(
                "{over_quota} spans refused: this sender holds its quota of spans waiting for their windows"
            ));
        }
        reasons.extend(refused.message());
        let rejected = invalid + timed + full + over_quota + refused.total();
        let partial_success = (rejected > 0).then(|| ExportTracePartialSuccess {
            rejected_spans: i64::try_from(rejected).unwrap_or(i64::MAX),
            error_message: reasons.join("; "),
        });
        Ok(ExportTraceServiceResponse { partial_success })
    }

    /// Keeps the spans whose times pass [`check_time`]; the rest counted per
    /// reason (returned and on `/metrics`).
    fn check_times(&self, spans: Vec<Span>) -> (Vec<Span>, [u64; 5]) {
        let now = crate::clock::unix_ns(std::time::SystemTime::now());
        let mut refused = [0u64; 5];
        let kept: Vec<Span> = spans
            .into_iter()
            .filter(|s| {
                let mut limits = self.times;
                // Only a token record starts at its span's start: age
                // matters for spans with tokens alone.
                if s.tokens.is_none() {
                    limits.max_span_age = Duration::MAX;
                }
                match check_time(s.start_unix_ns, s.end_unix_ns, now, &limits) {
                    Ok(()) => true,
                    Err(r) => {
                        refused[r.index()] += 1;
                        false
                    }
                }
            })
            .collect();
        let n: u64 = refused.iter().sum();
        if n > 0 {
            for (r, k) in TimeRefusal::ALL.iter().zip(refused) {
                self.stats.bad_times[r.index()].fetch_add(k, Ordering::Relaxed);
            }
            if warn_allowed(Warn::BadTimes) {
                warn!(
                    refused = n,
                    max_clock_skew = ?self.times.max_clock_skew,
                    max_span_duration = ?self.times.max_span_duration,
                    max_span_age = ?self.times.max_span_age,
                    "OTLP receiver: spans refused for their start or end times"
                );
            }
        }
        (kept, refused)
    }

    /// Counts and logs a refused request.
    fn refused(&self, protocol: &str, refusal: &Refusal) {
        let n = self.stats.rejected_requests.fetch_add(1, Ordering::Relaxed) + 1;
        if warn_allowed(refusal.kind) {
            warn!(
                protocol,
                total_rejected = n,
                "OTLP receiver: request refused: {}",
                refusal.message
            );
        } else {
            debug!(
                protocol,
                "OTLP receiver: request refused: {}", refusal.message
            );
        }
    }
}

/// The number of spans in `request`.
fn span_count(request: &ExportTraceServiceRequest) -> u64 {
    request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len() as u64)
        .sum()
}

/// Why a request was refused, in both protocols' terms.
#[derive(Debug)]
struct Refusal {
    kind: Warn,
    http: StatusCode,
    grpc: tonic::Code,
    message: String,
}

impl Refusal {
    fn malformed(message: String) -> Self {
        Self {
            kind: Warn::Malformed,
            http: StatusCode::BAD_REQUEST,
            grpc: tonic::Code::InvalidArgument,
            message,
        }
    }

    fn too_large(message: String) -> Self {
        Self {
            kind: Warn::TooLarge,
            http: StatusCode::PAYLOAD_TOO_LARGE,
            grpc: tonic::Code::ResourceExhausted,
            message,
        }
    }

    fn unsupported(message: String) -> Self {
        Self {
            kind: Warn::Unsupported,
            http: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            grpc: tonic::Code::Unimplemented,
            message,
        }
    }

    /// No room now: a retryable status (OTLP SDKs retry gRPC `UNAVAILABLE`
    /// and HTTP 503, honouring `Retry-After`).
    fn busy(message: String) -> Self {
        Self {
            kind: Warn::PendingFull,
            http: StatusCode::SERVICE_UNAVAILABLE,
            grpc: tonic::Code::Unavailable,
            message,
        }
    }

    /// A sender past its share of read slots: retry later (HTTP 429, gRPC
    /// `UNAVAILABLE`, both retried by OTLP SDKs).
    fn throttled(message: String) -> Self {
        Self {
            kind: Warn::Busy,
            http: StatusCode::TOO_MANY_REQUESTS,
            grpc: tonic::Code::Unavailable,
            message,
        }
    }

    fn unidentified(message: String) -> Self {
        Self {
            kind: Warn::Unidentified,
            http: StatusCode::FORBIDDEN,
            grpc: tonic::Code::PermissionDenied,
            message,
        }
    }

    fn timeout(message: String) -> Self {
        Self {
            kind: Warn::Timeout,
            http: StatusCode::REQUEST_TIMEOUT,
            grpc: tonic::Code::DeadlineExceeded,
            message,
        }
    }
}

/// Decodes a request body, refusing it first if decoding would take more
/// than `max_decoded` bytes of heap.
fn decode_request(bytes: &[u8], max_decoded: usize) -> Result<ExportTraceServiceRequest, Refusal> {
    let estimate = wire::decoded_size(bytes)
        .ok_or_else(|| Refusal::malformed("not a well-formed protobuf message".into()))?;
    if estimate > max_decoded {
        return Err(Refusal::too_large(format!(
            "{} bytes would decode to about {estimate} bytes, over the limit of {max_decoded}",
            bytes.len()
        )));
    }
    ExportTraceServiceRequest::decode(bytes)
        .map_err(|e| Refusal::malformed(format!("not an ExportTraceServiceRequest: {e}")))
}

// ---------------------------------------------------------------------------
// gRPC.

#[tonic::async_trait]
impl TraceService for Handler {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        // Set by `GrpcService::call`; a request that reached here without
        // one is refused whole rather than believed.
        let sender = request
            .extensions()
            .get::<Sender>()
            .cloned()
            .unwrap_or(Sender::Unidentified);
        match self.accept(request.into_inner(), &sender).await {
            Ok(response) => Ok(tonic::Response::new(response)),
            Err(refusal) => Err(tonic::Status::new(refusal.grpc, refusal.message)),
        }
    }
}

/// The gRPC server: the generated `TraceServiceServer` with our codec, which
/// refuses over-dense payloads before decoding and answers malformed ones
/// with `InvalidArgument` (prost's codec says `Internal`), and with the
/// request-concurrency bound around reading and decoding.
#[derive(Clone)]
struct GrpcService {
    handler: Arc<Handler>,
}

impl Service<http::Request<tonic::body::Body>> for GrpcService {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let handler = self.handler.clone();
        Box::pin(async move {
            if request.uri().path() != EXPORT_PATH {
                return Ok(tonic::Status::unimplemented(format!(
                    "{} is not served here; OTLP traces go to {EXPORT_PATH}",
                    request.uri().path()
                ))
                .into_http());
            }
            let sender = match request.extensions().get::<Peer>() {
                Some(peer) => peer.sender(&handler.binder).await,
                None => Sender::Unidentified,
            };
            // The body is read before a decode permit is taken, in a read
            // slot of the sender's own share, under a deadline.
            let _slot = match handler.read_slot(&sender) {
                Ok(slot) => slot,
                Err(refusal) => {
                    handler.refused("gRPC", &refusal);
                    return Ok(tonic::Status::new(refusal.grpc, refusal.message).into_http());
                }
            };
            let (mut parts, body) = request.into_parts();
            // A unary message: its 5-byte gRPC prefix, then at most the limit
            // (tonic checks the exact size when it decodes).
            let limit = handler.max_request_bytes.saturating_add(5);
            let bytes =
                match tokio::time::timeout(handler.read_timeout, read_body(body, limit, 0)).await {
                    Ok(Ok(bytes)) => bytes,
                    Ok(Err(refusal)) => {
                        handler.refused("gRPC", &refusal);
                        return Ok(tonic::Status::new(refusal.grpc, refusal.message).into_http());
                    }
                    Err(_) => {
                        let refusal = Refusal::timeout(format!(
                            "the request took over {:?} to arrive",
                            handler.read_timeout
                        ));
                        handler.refused("gRPC", &refusal);
                        return Ok(tonic::Status::new(refusal.grpc, refusal.message).into_http());
                    }
                };
            parts.extensions.insert(sender);
            let request =
                http::Request::from_parts(parts, tonic::body::Body::new(AxumBody::from(bytes)));
            let Ok(_permit) = handler.permits.clone().acquire_owned().await else {
                return Ok(tonic::Status::unavailable("the receiver is stopping").into_http());
            };
            let codec = OtlpCodec {
                max_decoded: handler.max_request_bytes.saturating_mul(DECODE_FACTOR),
            };
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(handler.max_request_bytes), None);
            let mut response = grpc.unary(Export(handler.clone()), request).await;
            // `export` never fails, so an error status here is a refusal by
            // the codec or tonic's size and compression checks.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32);
            if code == Some(tonic::Code::OutOfRange) {
                // Tonic says OutOfRange for a message over the size limit,
                // which OTLP clients retry; ResourceExhausted without retry
                // info tells them not to.
                response = tonic::Status::resource_exhausted(format!(
                    "the request is over the limit of {} bytes",
                    handler.max_request_bytes
                ))
                .into_http();
                let refusal = Refusal::too_large(format!(
                    "a request over the limit of {} bytes",
                    handler.max_request_bytes
                ));
                handler.refused("gRPC", &refusal);
            } else if let Some(code) = code.filter(|c| *c != tonic::Code::Ok) {
                let message = response
                    .headers()
                    .get("grpc-message")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let refusal = match code {
                    tonic::Code::ResourceExhausted => Refusal::too_large(message),
                    tonic::Code::Unimplemented => Refusal::unsupported(message),
                    tonic::Code::Unavailable => Refusal::busy(message),
                    _ => Refusal::malformed(message),
                };
                handler.refused("gRPC", &refusal);
            }
            Ok(response)
        })
    }
}

/// The Export method, as tonic's unary dispatch wants it.
struct Export(Arc<Handler>);

impl UnaryService<ExportTraceServiceRequest> for Export {
    type Response = ExportTraceServiceResponse;
    type Future = BoxFuture<tonic::Response<Self::Response>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<ExportTraceServiceRequest>) -> Self::Future {
        let handler = self.0.clone();
        Box::pin(async move { handler.export(request).await })
    }
}

/// Prost encoding of responses; requests decoded through [`decode_request`].
#[derive(Clone, Copy)]
struct OtlpCodec {
    max_decoded: usize,
}

impl Codec for OtlpCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = ExportTraceServiceRequest;
    type Encoder = Self;
    type Decoder = Self;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl Encoder for OtlpCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| tonic::Status::internal(format!("encoding the response: {e}")))
    }
}

impl Decoder for OtlpCodec {
    type Item = ExportTraceServiceRequest;
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        use prost::bytes::Buf;
        // Zero-copy: the buffer is one contiguous `BytesMut`.
        let bytes = src.copy_to_bytes(src.remaining());
        decode_request(&bytes, self.max_decoded)
            .map(Some)
            .map_err(|r| tonic::Status::new(r.grpc, r.message))
    }
}

/// Accepted gRPC connections, each tagged with its [`Peer`].
struct Incoming {
    listener: TcpListener,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<PeerStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(pause) = this.pause.as_mut() {
            ready!(pause.as_mut().poll(cx));
            this.pause = None;
        }
        match ready!(this.listener.poll_accept(cx)) {
            Ok((io, remote)) => {
                // Responses are small and latency matters more than packets.
                let _ = io.set_nodelay(true);
                let peer = Peer::new(remote);
                Poll::Ready(Some(Ok(PeerStream { io, peer })))
            }
            Err(e) => {
                // A connection that died before accept is its own problem;
                // anything else (out of descriptors) lasts a while, and
                // retrying at once would spin.
                if !matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionRefused
                ) {
                    if warn_allowed(Warn::Accept) {
                        warn!("OTLP receiver: accepting a gRPC connection: {e}");
                    }
                    this.pause = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Ready(Some(Err(e)))
            }
        }
    }
}

/// A TCP connection with its peer, so the handler can find the peer's pid.
struct PeerStream {
    io: TcpStream,
    peer: Peer,
}

impl TonicConnected for PeerStream {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------
// HTTP/protobuf.

/// `google.rpc.Status`, the body OTLP/HTTP puts in error responses.
#[derive(Clone, PartialEq, Message)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

/// `POST /v1/traces`.
async fn export_http(
    State(handler): State<Arc<Handler>>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    headers: HeaderMap,
    body: AxumBody,
) -> Response {
    match handle_http(&handler, &peer, &headers, body).await {
        Ok(response) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, PROTOBUF)],
            response.encode_to_vec(),
        )
            .into_response(),
        Err(refusal) => {
            handler.refused("HTTP", &refusal);
            let status = RpcStatus {
                code: refusal.grpc as i32,
                message: refusal.message,
            };
            let mut response = (
                refusal.http,
                [(header::CONTENT_TYPE, PROTOBUF)],
                status.encode_to_vec(),
            )
                .into_response();
            if matches!(
                refusal.http,
                StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS
            ) {
                // The inbox empties every tick (1 s by default), and a read
                // slot frees when its body has arrived.
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            response
        }
    }
}

async fn handle_http(
    handler: &Handler,
    peer: &Peer,
    headers: &HeaderMap,
    body: AxumBody,
) -> Result<ExportTraceServiceResponse, Refusal> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let media = header(header::CONTENT_TYPE)
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or_default();
    if !media.eq_ignore_ascii_case(PROTOBUF) {
        return Err(Refusal::unsupported(format!(
            "content type {media:?} is not supported; send {PROTOBUF}"
        )));
    }
    if let Some(encoding) = header(header::CONTENT_ENCODING)
        && !encoding.trim().eq_ignore_ascii_case("identity")
    {
        return Err(Refusal::unsupported(format!(
            "content encoding {encoding:?} is not supported; send uncompressed"
        )));
    }
    let limit = handler.max_request_bytes;
    let length = header(header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = length
        && length > limit as u64
    {
        return Err(Refusal::too_large(format!(
            "a {length}-byte body is over the limit of {limit}"
        )));
    }
    let sender = peer.sender(&handler.binder).await;
    // Read before a decode permit is taken, in a read slot of the sender's
    // own share, under a deadline: slow senders hold only their own slots.
    let _slot = handler.read_slot(&sender)?;
    let capacity = length.map_or(0, |l| l as usize);
    let timeout = handler.read_timeout;
    let bytes = tokio::time::timeout(timeout, read_body(body, limit, capacity))
        .await
        .map_err(|_| Refusal::timeout(format!("the body took over {timeout:?}")))??;
    let Ok(_permit) = handler.permits.clone().acquire_owned().await else {
        return Err(Refusal::timeout("the receiver is stopping".into()));
    };
    let request = decode_request(&bytes, limit.saturating_mul(DECODE_FACTOR))?;
    drop(bytes);
    handler.accept(request, &sender).await
}

/// Reads a body of at most `limit` bytes.
async fn read_body<B>(mut body: B, limit: usize, capacity: usize) -> Result<Vec<u8>, Refusal>
where
    B: HttpBody<Data = axum::body::Bytes> + Unpin,
    B::Error: fmt::Display,
{
    let mut bytes = Vec::with_capacity(capacity.min(limit));
    while let Some(frame) = poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| Refusal::malformed(format!("reading the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if bytes.len() + data.len() > limit {
                return Err(Refusal::too_large(format!(
                    "the body is over the limit of {limit} bytes"
                )));
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(bytes)
}

// ---------------------------------------------------------------------------
// The client's process.

/// The client end of one connection, and its sender once identified: cached
/// for the connection's life (a later connection from the same port may be
/// another process).
#[derive(Clone, Debug)]
struct Peer {
    remote: SocketAddr,
    sender: Arc<OnceCell<Sender>>,
}

/// Waits before asking the kernel again about a peer it did not know: the
/// connection's first send may still be in its sender's hands (the probe
/// records it just after the data is queued).
const IDENTIFY_RETRIES: [Duration; 3] = [
    Duration::from_millis(5),
    Duration::from_millis(20),
    Duration::from_millis(50),
];

impl Peer {
    fn new(remote: SocketAddr) -> Self {
        Self {
            remote,
            sender: Arc::new(OnceCell::new()),
        }
    }

    /// Who sent this connection, as the kernel says (one map lookup).
    async fn sender(&self, binder: &Binder) -> Sender {
        self.sender
            .get_or_init(|| async {
                let mut sender = binder.identify(self.remote);
                for wait in IDENTIFY_RETRIES {
                    if sender != Sender::Unidentified {
                        break;
                    }
                    tokio::time::sleep(wait).await;
                    sender = binder.identify(self.remote);
                }
                binder.count_connection(&sender);
                sender
            })
            .await
            .clone()
    }
}

impl AxumConnected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        Peer::new(*stream.remote_addr())
    }
}

// ---------------------------------------------------------------------------
// Span mapping.

/// Converts one request into spans, skipping invalid ids; `peer_pid` stands in for a missing `process.pid`.
pub fn spans_of(request: &ExportTraceServiceRequest, peer_pid: Option<u32>) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        spans_of_resource(rs, peer_pid, &mut out);
    }
    out
}

/// The resource's claimed `process.pid` and the container or pod it is scoped to.
pub fn resource_claim(rs: &ResourceSpans) -> (Option<u32>, Option<PidScope>) {
    let resource: &[KeyValue] = rs.resource.as_ref().map_or(&[], |r| &r.attributes);
    let claimed = resource_pid(resource);
    let mut scope = PidScope::default();
    for kv in resource {
        let Some(value) = &kv.value else { continue };
        match kv.key.as_str() {
            "container.id" => scope.container_id = scalar(value).map(|v| v.to_ascii_lowercase()),
            "k8s.pod.uid" => scope.pod_uid = scalar(value).map(|v| v.to_ascii_lowercase()),
            _ => {}
        }
    }
    let scoped = (claimed.is_some() && (scope.container_id.is_some() || scope.pod_uid.is_some()))
        .then_some(scope);
    (claimed, scoped)
}

/// Appends the spans of one resource to `out`, as [`spans_of`] does.
pub fn spans_of_resource(rs: &ResourceSpans, peer_pid: Option<u32>, out: &mut Vec<Span>) {
    spans_of_resource_as(rs, peer_pid, out, true);
}

/// As [`spans_of_resource`], without [`Span::attributes`]: what the receiver
/// hands to the inbox, which keeps ids, times, context and tokens only (the
/// attribute map, built per span and dropped at admission, was a tenth of
/// the receiver's allocations at 50,000 spans/s).
pub fn spans_of_resource_for_inbox(rs: &ResourceSpans, peer_pid: Option<u32>, out: &mut Vec<Span>) {
    spans_of_resource_as(rs, peer_pid, out, false);
}

fn spans_of_resource_as(
    rs: &ResourceSpans,
    peer_pid: Option<u32>,
    out: &mut Vec<Span>,
    with_attributes: bool,
) {
    {
        let resource: &[KeyValue] = rs.resource.as_ref().map_or(&[], |r| &r.attributes);
        let claimed = resource_pid(resource);
        let pid = claimed.or(peer_pid);
        let mut scope = PidScope::default();
        let mut host = None;
        let mut service = None;
        let mut base = RunContext::default();
        for kv in resource {
            let Some(value) = &kv.value else { continue };
            match kv.key.as_str() {
                "host.name" => host = scalar(value),
                "service.name" => service = scalar(value),
                "container.id" => {
                    scope.container_id = scalar(value).map(|v| v.to_ascii_lowercase())
                }
                "k8s.pod.uid" => scope.pod_uid = scalar(value).map(|v| v.to_ascii_lowercase()),
                key => {
                    if let Some(v) = scalar(value) {
                        base.set_attribute(key, &v);
                    }
                }
            }
        }
        // A peer's pid is the host's; only a claimed pid can be a container's.
        let pid_scope = (claimed.is_some()
            && (scope.container_id.is_some() || scope.pod_uid.is_some()))
        .then_some(scope);
        for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
            let (Some(trace_id), Some(span_id)) =
                (hex_id(&span.trace_id, 16), hex_id(&span.span_id, 8))
            else {
                continue;
            };
            let parent_span_id = if span.parent_span_id.is_empty() {
                None
            } else {
                match hex_id(&span.parent_span_id, 8) {
                    Some(id) => Some(id),
                    None => continue,
                }
            };
            // The span's own attributes win over its resource's.
            let mut context = base.clone();
            let mut attributes = BTreeMap::new();
            for kv in &span.attributes {
                let value = kv.value.as_ref();
                if RunContext::is_context_key(&kv.key)
                    && let Some(v) = value.and_then(scalar)
                {
                    context.set_attribute(&kv.key, &v);
                }
                if with_attributes {
                    attributes.insert(kv.key.clone(), value.map(render).unwrap_or_default());
                }
            }
            context.trace_id = Some(trace_id.clone());
            out.push(Span {
                trace_id,
                span_id,
                parent_span_id,
                name: span.name.clone(),
                start_unix_ns: span.start_time_unix_nano,
                end_unix_ns: span.end_time_unix_nano,
                pid,
                pid_scope: pid_scope.clone(),
                host: host.clone(),
                service: service.clone(),
                context,
                tokens: tokens_of(&span.attributes),
                attributes,
                sender: None,
            });
        }
    }
}

/// The resource's `process.pid` (int, or a decimal string).
fn resource_pid(resource: &[KeyValue]) -> Option<u32> {
    let value = resource
        .iter()
        .rev()
        .find(|kv| kv.key == "process.pid")?
        .value
        .as_ref()?;
    match &value.value {
        Some(Value::IntValue(i)) => u32::try_from(*i).ok(),
        Some(Value::StringValue(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|pid| *pid != 0)
}

/// A string or int attribute as a string; the only kinds ids come in.
fn scalar(value: &AnyValue) -> Option<String> {
    match &value.value {
        Some(Value::StringValue(s)) => Some(s.clone()),
        Some(Value::IntValue(i)) => Some(i.to_string()),
        _ => None,
    }
}

/// A token count: a non-negative int, a decimal string, or an integral double
/// (some SDKs only have doubles).
fn count(value: &AnyValue) -> Option<u64> {
    match &value.value {
        Some(Value::IntValue(i)) => u64::try_from(*i).ok(),
        Some(Value::StringValue(s)) => s.trim().parse().ok(),
        Some(Value::DoubleValue(d))
            if d.is_finite() && *d >= 0.0 && d.fract() == 0.0 && *d < 9.0e15 =>
        {
            Some(*d as u64)
        }
        _ => None,
    }
}

/// The `gen_ai.usage.*` token counts a span reports, if any. The older
/// `gen_ai.usage.cache_read_input_tokens`, `prompt_tokens` and
/// `completion_tokens` are read where the current names are absent.
fn tokens_of(attributes: &[KeyValue]) -> Option<SpanTokens> {
    // The last occurrence wins, as it does in `Span::attributes`.
    let get = |key: &str| {
        attributes
            .iter()
            .rev()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
    };
    let first = |keys: &[&str]| keys.iter().find_map(|k| get(k).and_then(count));
    let input = first(&["gen_ai.usage.input_tokens", "gen_ai.usage.prompt_tokens"]);
    let output = first(&[
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.completion_tokens",
    ]);
    let cache_read = first(&[
        "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.cache_read_input_tokens",
    ]);
    let reasoning = first(&["gen_ai.usage.reasoning.output_tokens"]);
    if input.is_none() && output.is_none() && cache_read.is_none() && reasoning.is_none() {
        return None;
    }
    let model = ["gen_ai.response.model", "gen_ai.request.model"]
        .iter()
        .find_map(|k| get(k).and_then(scalar).filter(|m| !m.is_empty()))
        .unwrap_or_else(|| "unknown".into());
    Some(SpanTokens {
        model,
        input: input.unwrap_or(0),
        cache_read_input: cache_read.unwrap_or(0),
        output: output.unwrap_or(0),
        reasoning_output: reasoning.unwrap_or(0),
    })
}

/// Lowercase hex of an id of `len` bytes; None if its length differs or it is
/// all zeros (W3C's invalid id).
fn hex_id(bytes: &[u8], len: usize) -> Option<String> {
    (bytes.len() == len && bytes.iter().any(|b| *b != 0)).then(|| hex(bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// An attribute value as a string: strings as they are, numbers and bools
/// printed, bytes as hex, arrays and maps as compact JSON.
fn render(value: &AnyValue) -> String {
    match &value.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BytesValue(b)) => hex(b),
        Some(Value::ArrayValue(_) | Value::KvlistValue(_)) => json(value).to_string(),
        // A string-table index is meaningless without its table (profiles).
        Some(Value::StringValueStrindex(_)) | None => String::new(),
    }
}

fn json(value: &AnyValue) -> serde_json::Value {
    use serde_json::Value as J;
    match &value.value {
        Some(Value::StringValue(s)) => J::String(s.clone()),
        Some(Value::BoolValue(b)) => J::Bool(*b),
        Some(Value::IntValue(i)) => J::from(*i),
        Some(Value::DoubleValue(d)) => serde_json::Number::from_f64(*d).map_or(J::Null, J::Number),
        Some(Value::BytesValue(b)) => J::String(hex(b)),
        Some(Value::ArrayValue(a)) => J::Array(a.values.iter().map(json).collect()),
        Some(Value::KvlistValue(kvs)) => J::Object(
            kvs.values
                .iter()
                .map(|kv| (kv.key.clone(), kv.value.as_ref().map_or(J::Null, json)))
                .collect(),
        ),
        Some(Value::StringValueStrindex(_)) | None => J::Null,
    }
}

// ---------------------------------------------------------------------------
// Forwarding.

/// Mutates each request just before it is first sent upstream: where cost
/// attributes go. The slice holds, per `resource_spans` entry, the host pid
/// its spans were bound to by the sender check (`None`: not known as a host
/// pid, so nothing may be looked up for it).
pub type Enricher = Arc<dyn Fn(&mut ExportTraceServiceRequest, &[Option<u32>]) + Send + Sync>;

/// How a [`Forwarder`] queues, delays, enriches and retries.
#[derive(Clone)]
pub struct ForwardOptions {
    /// Queue bound in encoded bytes, in-flight included; beyond it requests are dropped.
    pub queue_bytes: usize,
    /// Requests in flight upstream at once.
    pub concurrency: usize,
    /// How long a request waits before enrichment: time for its spans' usage windows to close.
    pub delay: Duration,
    /// Sends per request, the first included, before it is given up.
    pub max_attempts: u32,
    /// Mutates each request before it is sent.
    pub enrich: Option<Enricher>,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            queue_bytes: ReceiverConfig::default().forward_queue_bytes,
            concurrency: 4,
            delay: Duration::ZERO,
            max_attempts: 5,
            enrich: None,
        }
    }
}

impl fmt::Debug for ForwardOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForwardOptions")
            .field("queue_bytes", &self.queue_bytes)
            .field("concurrency", &self.concurrency)
            .field("delay", &self.delay)
            .field("max_attempts", &self.max_attempts)
            .field("enrich", &self.enrich.is_some())
            .finish()
    }
}

/// One request waiting to go upstream.
struct Queued {
    request: ExportTraceServiceRequest,
    /// Per resource, the host pid its spans are bound to.
    host_pids: Vec<Option<u32>>,
    spans: u64,
    bytes: usize,
    at: Instant,
}

/// A handle on the background task that sends requests to the upstream OTLP/gRPC endpoint.
#[derive(Clone)]
pub struct Forwarder {
    tx: mpsc::UnboundedSender<Queued>,
    queued: Arc<AtomicUsize>,
    limit: usize,
    stats: Arc<ReceiverStats>,
}

impl fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forwarder")
            .field("queued_bytes", &self.queued_bytes())
            .field("limit", &self.limit)
            .finish()
    }
}

impl Forwarder {
    /// The forwarder `config.upstream` asks for (None if unset); call inside a tokio runtime.
    pub fn from_config(
        config: &ReceiverConfig,
        stats: Arc<ReceiverStats>,
    ) -> Result<Option<Self>, ReceiverError> {
        let Some(upstream) = config.upstream.as_ref().filter(|u| !u.endpoint.is_empty()) else {
            return Ok(None);
        };
        let options = ForwardOptions {
            queue_bytes: config.forward_queue_bytes,
            ..ForwardOptions::default()
        };
        Self::start(upstream, options, stats).map(Some)
    }

    /// Starts forwarding to `upstream`, connecting lazily; call inside a tokio runtime.
    pub fn start(
        upstream: &OtlpConfig,
        options: ForwardOptions,
        stats: Arc<ReceiverStats>,
    ) -> Result<Self, ReceiverError> {
        let upstream = Upstream::new(upstream)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let limit = options.queue_bytes;
        tokio::spawn(forward_loop(
            rx,
            upstream,
            options,
            stats.clone(),
            queued.clone(),
        ));
        Ok(Self {
            tx,
            queued,
            limit,
            stats,
        })
    }

    /// Queues `request` without waiting; false if the queue was full and it
    /// was dropped. Its processes are not known: it is not enriched with
    /// any process's cost.
    pub fn forward(&self, request: ExportTraceServiceRequest) -> bool {
        self.forward_bound(request, Vec::new())
    }

    /// Queues `request`, whose resources' spans are bound to `host_pids`
    /// (one per `resource_spans` entry), without waiting; false if the queue
    /// was full and it was dropped.
    pub fn forward_bound(
        &self,
        request: ExportTraceServiceRequest,
        host_pids: Vec<Option<u32>>,
    ) -> bool {
        let spans = span_count(&request);
        let bytes = request.encoded_len();
        // Reserve first, so concurrent callers cannot all pass the check.
        let before = self.queued.fetch_add(bytes, Ordering::AcqRel);
        let item = Queued {
            request,
            host_pids,
            spans,
            bytes,
            at: Instant::now(),
        };
        if before.saturating_add(bytes) <= self.limit && self.tx.send(item).is_ok() {
            return true;
        }
        self.queued.fetch_sub(bytes, Ordering::AcqRel);
        let n = self
            .stats
            .forward_dropped
            .fetch_add(spans, Ordering::Relaxed)
            + spans;
        if warn_allowed(Warn::ForwardQueueFull) {
            warn!(
                spans,
                total_dropped = n,
                queue_bytes = self.limit,
                "OTLP forwarding: queue full, spans dropped"
            );
        }
        false
    }

    /// Encoded bytes queued or in flight.
    pub fn queued_bytes(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

async fn forward_loop(
    mut rx: mpsc::UnboundedReceiver<Queued>,
    upstream: Upstream,
    options: ForwardOptions,
    stats: Arc<ReceiverStats>,
    queued: Arc<AtomicUsize>,
) {
    let permits = Arc::new(Semaphore::new(options.concurrency.max(1)));
    while let Some(item) = rx.recv().await {
        // Requests arrive in order, so waiting out each one's delay here
        // delays none of them more than `delay`.
        if !options.delay.is_zero() {
            tokio::time::sleep_until((item.at + options.delay).into()).await;
        }
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let upstream = upstream.clone();
        let stats = stats.clone();
        let queued = queued.clone();
        let enrich = options.enrich.clone();
        let max_attempts = options.max_attempts.max(1);
        tokio::spawn(async move {
            let Queued {
                mut request,
                host_pids,
                spans,
                bytes,
                ..
            } = item;
            if let Some(enrich) = &enrich {
                enrich(&mut request, &host_pids);
            }
            upstream.send(request, spans, max_attempts, &stats).await;
            queued.fetch_sub(bytes, Ordering::AcqRel);
            drop(permit);
        });
    }
}

/// The upstream endpoint: a lazily connected client and the headers to send.
#[derive(Clone)]
struct Upstream {
    endpoint: String,
    client: TraceServiceClient<Channel>,
    headers: Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>,
}

impl Upstream {
    fn new(config: &OtlpConfig) -> Result<Self, ReceiverError> {
        let error = |message: String| ReceiverError::Upstream {
            endpoint: config.endpoint.clone(),
            message,
        };
        let timeout = if config.timeout_ms == 0 {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(config.timeout_ms)
        };
        let mut endpoint = Endpoint::from_str(&config.endpoint)
            .map_err(|e| error(format!("endpoint: {e}")))?
            .timeout(timeout)
            .connect_timeout(timeout);
        if config.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| error(format!("CA file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| error(format!("TLS: {e}")))?;
        }
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| {
                let key = MetadataKey::from_str(k)
                    .map_err(|e| error(format!("header name {k:?}: {e}")))?;
                let value = MetadataValue::from_str(v)
                    .map_err(|e| error(format!("header {k:?} value: {e}")))?;
                Ok((key, value))
            })
            .collect::<Result<_, ReceiverError>>()?;
        Ok(Self {
            endpoint: config.endpoint.clone(),
            client: TraceServiceClient::new(endpoint.connect_lazy()),
            headers,
        })
    }

    /// Sends `request`, retrying transient failures with backoff.
    async fn send(
        &self,
        request: ExportTraceServiceRequest,
        spans: u64,
        max_attempts: u32,
        stats: &ReceiverStats,
    ) {
        let mut backoff = Duration::from_millis(200);
        let mut request = Some(request);
        for attempt in 1..=max_attempts {
            // Clone for all but the last attempt, which may take it.
            let body = if attempt == max_attempts {
                request.take()
            } else {
                request.clone()
            };
            let Some(body) = body else { return };
            let mut call = tonic::Request::new(body);
            for (k, v) in &self.headers {
                call.metadata_mut().insert(k.clone(), v.clone());
            }
            match self.client.clone().export(call).await {
                Ok(response) => {
                    let rejected = response
                        .into_inner()
                        .partial_success
                        .map_or(0, |p| u64::try_from(p.rejected_spans).unwrap_or(0))
                        .min(spans);
                    stats
                        .forwarded
                        .fetch_add(spans - rejected, Ordering::Relaxed);
                    if rejected > 0 {
                        stats.forward_dropped.fetch_add(rejected, Ordering::Relaxed);
                    }
                    return;
                }
                Err(status) => {
                    stats.forward_errors.fetch_add(1, Ordering::Relaxed);
                    if !retryable(status.code()) || attempt == max_attempts {
                        let n = stats.forward_dropped.fetch_add(spans, Ordering::Relaxed) + spans;
                        if warn_allowed(Warn::ForwardFailed) {
                            warn!(
                                endpoint = %self.endpoint,
                                attempts = attempt,
                                spans,
                                total_dropped = n,
                                "OTLP forwarding failed, spans dropped: {}: {}",
                                status.code(),
                                status.message()
                            );
                        }
                        return;
                    }
                    debug!(endpoint = %self.endpoint, attempt, "OTLP forwarding: {}, retrying", status.code());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Whether OTLP says a failed export may be retried (ResourceExhausted
/// included: it is how receivers throttle).
fn retryable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::ResourceExhausted
            | tonic::Code::Aborted
            | tonic::Code::OutOfRange
            | tonic::Code::Unavailable
            | tonic::Code::DataLoss
    )
}

// ---------------------------------------------------------------------------
// Rate-limited warnings.

/// The kinds of trouble a warning is rate limited by (`Unidentified` stays
/// last: [`WARN_KINDS`] counts from it).
#[derive(Clone, Copy, Debug)]
enum Warn {
    Malformed,
    TooLarge,
    Unsupported,
    Timeout,
    InvalidIds,
    PendingFull,
    Accept,
    ForwardQueueFull,
    ForwardFailed,
    BadTimes,
    OverQuota,
    Busy,
    Unidentified,
}

/// One slot per [`Warn`] kind: the last variant's index plus one, so a kind
/// added to the enum always has its slot.
const WARN_KINDS: usize = Warn::Unidentified as usize + 1;
const WARN_EVERY_S: u64 = 60;

static WARN_EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Per kind, seconds since `WARN_EPOCH` (plus one; 0: never) of the last warning.
static LAST_WARN: [AtomicU64; WARN_KINDS] = [const { AtomicU64::new(0) }; WARN_KINDS];

/// Whether a warning of `kind` may be logged now (one per kind per minute).
fn warn_allowed(kind: Warn) -> bool {
    let now = WARN_EPOCH.elapsed().as_secs() + 1;
    let Some(slot) = LAST_WARN.get(kind as usize) else {
        return true;
    };
    let last = slot.load(Ordering::Relaxed);
    (last == 0 || now >= last + WARN_EVERY_S)
        && slot
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

// ---------------------------------------------------------------------------
// Decoded-size estimate.

/// Walks the protobuf wire format of an ExportTraceServiceRequest without
/// allocating, to price its decoding before committing memory to it.
mod wire {
    use std::mem::size_of;

    use opentelemetry_proto::tonic::{common::v1 as common, trace::v1 as trace};

    /// Nesting deeper than this is refused (arrays in arrays in attributes);
    /// prost's own limit is 100, and a real request nests under 10.
    const MAX_DEPTH: u32 = 32;

    /// The messages whose fields the walk knows.
    #[derive(Clone, Copy)]
    enum Kind {
        Request,
        ResourceSpans,
        Resource,
        EntityRef,
        ScopeSpans,
        Scope,
        Span,
        Event,
        Link,
        Status,
        KeyValue,
        AnyValue,
        ArrayValue,
        KeyValueList,
    }

    /// What a length-delimited field holds.
    enum Field {
        /// A message of this kind; a repeated one costs a `Vec` element.
        Message(Kind, usize),
        /// Bytes copied to the heap, plus a fixed cost per occurrence.
        Bytes(usize),
    }

    impl Kind {
        fn field(self, number: u64) -> Field {
            use Kind::*;
            match (self, number) {
                (Request, 1) => Field::Message(ResourceSpans, size_of::<trace::ResourceSpans>()),
                (ResourceSpans, 1) => Field::Message(Resource, 0),
                (ResourceSpans, 2) => Field::Message(ScopeSpans, size_of::<trace::ScopeSpans>()),
                (Resource, 1)
                | (Scope, 3)
                | (Span, 9)
                | (Event, 3)
                | (Link, 4)
                | (KeyValueList, 1) => Field::Message(KeyValue, size_of::<common::KeyValue>()),
                (Resource, 3) => Field::Message(EntityRef, size_of::<common::EntityRef>()),
                (EntityRef, 3 | 4) => Field::Bytes(size_of::<String>()),
                (ScopeSpans, 1) => Field::Message(Scope, 0),
                (ScopeSpans, 2) => Field::Message(Span, size_of::<trace::Span>()),
                (Span, 11) => Field::Message(Event, size_of::<trace::span::Event>()),
                (Span, 13) => Field::Message(Link, size_of::<trace::span::Link>()),
                (Span, 15) => Field::Message(Status, 0),
                (KeyValue, 2) => Field::Message(AnyValue, 0),
                (AnyValue, 5) => Field::Message(ArrayValue, 0),
                (AnyValue, 6) => Field::Message(KeyValueList, 0),
                (ArrayValue, 1) => Field::Message(AnyValue, size_of::<common::AnyValue>()),
                // Strings, bytes, and unknown fields (which prost skips).
                _ => Field::Bytes(0),
            }
        }
    }

    /// The heap a decoded request takes, before `Vec` growth (at most twice
    /// this), or None if `buf` is not well-formed protobuf.
    pub(super) fn decoded_size(buf: &[u8]) -> Option<usize> {
        walk(buf, Kind::Request, 0)
    }

    fn walk(mut buf: &[u8], kind: Kind, depth: u32) -> Option<usize> {
        if depth > MAX_DEPTH {
            return None;
        }
        let mut total = 0usize;
        while !buf.is_empty() {
            let key = varint(&mut buf)?;
            let number = key >> 3;
            if number == 0 || number > (1 << 29) - 1 {
                return None;
            }
            match key & 7 {
                0 => {
                    varint(&mut buf)?;
                }
                1 => buf = buf.get(8..)?,
                5 => buf = buf.get(4..)?,
                2 => {
                    let len = usize::try_from(varint(&mut buf)?).ok()?;
                    let (body, rest) = buf.split_at_checked(len)?;
                    buf = rest;
                    let cost = match kind.field(number) {
                        Field::Message(child, element) => {
                            element.checked_add(walk(body, child, depth + 1)?)?
                        }
                        Field::Bytes(fixed) => fixed + body.len(),
                    };
                    total = total.checked_add(cost)?;
                }
                // Groups (3, 4) are proto2; OTLP never sends them.
                _ => return None,
            }
        }
        Some(total)
    }

    fn varint(buf: &mut &[u8]) -> Option<u64> {
        let mut value = 0u64;
        for i in 0..10 {
            let (&byte, rest) = buf.split_first()?;
            *buf = rest;
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
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
            })
        );
        let third = spans[2].tokens.as_ref().unwrap();
        assert_eq!((third.model.as_str(), third.output), ("unknown", 9));
        // A model without usage is not token usage; a negative count is none.
        assert_eq!(spans[3].tokens, None);
        assert_eq!(spans[4].tokens, None);
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
        Sender::Bound(crate::sender::Identified {
            sender: crate::spans::SpanSender {
                pid: std::process::id(),
                start_ns: 1,
                cgroup_id: 7,
                trusted: false,
            },
            ..Default::default()
        })
    }

    async fn start_as(
        config: ReceiverConfig,
        forwarder: Option<Forwarder>,
        binder: Binder,
    ) -> Running {
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
        let task = tokio::spawn(receiver.run(tx, stats.clone(), forwarder, async move {
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

    async fn post_async(
        addr: SocketAddr,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> (u16, Vec<u8>) {
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
                start_time_unix_nano: crate::clock::unix_ns(std::time::SystemTime::now()) - 1000,
                end_time_unix_nano: crate::clock::unix_ns(std::time::SystemTime::now()),
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
            fn encode(
                &mut self,
                item: Vec<u8>,
                dst: &mut EncodeBuf<'_>,
            ) -> Result<(), tonic::Status> {
                use prost::bytes::BufMut;
                dst.put_slice(&item);
                Ok(())
            }
        }
        impl Decoder for Raw {
            type Item = ExportTraceServiceResponse;
            type Error = tonic::Status;
            fn decode(
                &mut self,
                src: &mut DecodeBuf<'_>,
            ) -> Result<Option<Self::Item>, tonic::Status> {
                Message::decode(src)
                    .map(Some)
                    .map_err(|e| tonic::Status::internal(e.to_string()))
            }
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
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
        let now = crate::clock::unix_ns(std::time::SystemTime::now());
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
        let enrich: Enricher =
            Arc::new(|req: &mut ExportTraceServiceRequest, _: &[Option<u32>]| {
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
}
