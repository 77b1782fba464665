//! Forwarding received spans upstream: each request the receiver admitted
//! goes on unchanged but for what an [`Enricher`] adds (the cost of each
//! span's usage), after a delay that lets its windows commit.
//!
//! The queue is bounded in encoded bytes, requests in flight included; the
//! task connects lazily (an upstream that is down at start does not stop the
//! agent), retries transient failures with backoff, never delays a client's
//! response, and ends once every handle is dropped and its queue is empty.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, trace_service_client::TraceServiceClient,
};
use prost::Message;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use tracing::{debug, warn};

use crate::{
    context::receiver::{
        Onward, ReceiverConfig, ReceiverError, ReceiverStats,
        convert::span_count,
        warn::{Warn, warn_allowed},
    },
    serve::otlp::{OtlpChannel, OtlpConfig},
};

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
    /// Forward prompt and completion text as received; by default it is
    /// stripped ([`strip_message_content`]) before the request is queued.
    pub keep_message_content: bool,
}

impl Default for ForwardOptions {
    fn default() -> Self {
        Self {
            queue_bytes: ReceiverConfig::default().forward_queue_bytes,
            keep_message_content: false,
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
pub(super) struct Queued {
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
    keep_message_content: bool,
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
            keep_message_content: config.forward_message_content,
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
        let keep_message_content = options.keep_message_content;
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
            keep_message_content,
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
        let mut request = request;
        if !self.keep_message_content {
            let n = strip_message_content(&mut request);
            if n > 0 {
                self.stats
                    .forward_content_stripped
                    .fetch_add(n, Ordering::Relaxed);
            }
        }
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

pub(super) async fn forward_loop(
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
pub(super) struct Upstream {
    channel: OtlpChannel,
    client: TraceServiceClient<Channel>,
}

impl Upstream {
    fn new(config: &OtlpConfig) -> Result<Self, ReceiverError> {
        let channel = OtlpChannel::new(config).map_err(|e| ReceiverError::Upstream {
            endpoint: config.endpoint.clone(),
            message: e.to_string(),
        })?;
        Ok(Self {
            client: TraceServiceClient::new(channel.channel.clone()),
            channel,
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
            let call = self.channel.request(body);
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
                                endpoint = %self.channel.endpoint,
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
                    debug!(endpoint = %self.channel.endpoint, attempt, "OTLP forwarding: {}, retrying", status.code());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }
}

/// Whether OTLP says a failed export may be retried (ResourceExhausted
/// included: it is how receivers throttle).
pub(super) fn retryable(code: tonic::Code) -> bool {
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

/// Span and span-event attribute keys that carry prompt or completion text:
/// the GenAI conventions' `gen_ai.input.messages`, `gen_ai.output.messages`
/// and `gen_ai.system_instructions`, and OpenInference's message and value
/// attributes.
const CONTENT_KEYS: &[&str] = &[
    "gen_ai.input.messages",
    "gen_ai.output.messages",
    "gen_ai.system_instructions",
    "input.value",
    "output.value",
];

/// Key prefixes that carry prompt or completion text: OpenLLMetry's and the
/// older GenAI conventions' indexed `gen_ai.prompt.N.content` /
/// `gen_ai.completion.N.content` (and their event attributes `gen_ai.prompt`
/// / `gen_ai.completion`), and OpenInference's `llm.input_messages.*` /
/// `llm.output_messages.*`.
const CONTENT_PREFIXES: &[&str] = &[
    "gen_ai.prompt",
    "gen_ai.completion",
    "llm.input_messages",
    "llm.output_messages",
];

/// Whether an attribute named `key` carries message content.
fn is_content_key(key: &str) -> bool {
    CONTENT_KEYS.contains(&key)
        || CONTENT_PREFIXES.iter().any(|p| {
            key.strip_prefix(p)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
}

/// Removes prompt and completion text from every span and span event of
/// `request` (token counts, model names and everything else stay); returns
/// how many attributes were removed. The agent never stores message content
/// (its ledger keeps span ids, names, times and token counts only); this keeps
/// it from leaving the node through the forwarder unless configured to.
pub fn strip_message_content(request: &mut ExportTraceServiceRequest) -> u64 {
    let mut removed = 0u64;
    let mut strip = |attributes: &mut Vec<opentelemetry_proto::tonic::common::v1::KeyValue>| {
        let before = attributes.len();
        attributes.retain(|kv| !is_content_key(&kv.key));
        removed += (before - attributes.len()) as u64;
    };
    for span in request
        .resource_spans
        .iter_mut()
        .flat_map(|rs| &mut rs.scope_spans)
        .flat_map(|ss| &mut ss.spans)
    {
        strip(&mut span.attributes);
        for event in &mut span.events {
            strip(&mut event.attributes);
        }
    }
    removed
}

impl Onward for Forwarder {
    fn forward_bound(
        &self,
        request: ExportTraceServiceRequest,
        host_pids: Vec<Option<u32>>,
    ) -> bool {
        Forwarder::forward_bound(self, request, host_pids)
    }
}
