//! Admission of one request: a read slot per sender, a decode permit, the
//! decoded-size check, sender binding, time checks, and admission into the
//! span sink before the answer; what was refused and why ([`Refusal`]).

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::context::{
    inbox::{SpanSink, TimeLimits, TimeRefusal, check_time},
    receiver::{
        Onward, ReceiverStats,
        convert::span_count,
        warn::{Warn, warn_allowed},
        wire,
    },
    sender::{Binder, Sender},
    spans::Span,
};

/// What both servers share.
pub(super) struct Handler {
    pub(super) sink: Box<dyn SpanSink>,
    pub(super) max_pending: usize,
    pub(super) max_indexed: usize,
    pub(super) times: TimeLimits,
    pub(super) max_request_bytes: usize,
    pub(super) permits: Arc<Semaphore>,
    pub(super) stats: Arc<ReceiverStats>,
    pub(super) forwarder: Option<Arc<dyn Onward>>,
    pub(super) binder: Arc<Binder>,
    /// Read slots, all senders together.
    pub(super) reads: Arc<Semaphore>,
    /// Reads in progress per sender key.
    pub(super) reading: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
    pub(super) max_reads_per_sender: usize,
    pub(super) read_timeout: Duration,
}

/// One request body being read: a global read slot and the sender's share.
pub(super) struct ReadSlot {
    pub(super) _slot: OwnedSemaphorePermit,
    pub(super) key: Option<u64>,
    pub(super) reading: Arc<std::sync::Mutex<HashMap<u64, usize>>>,
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
    pub(super) fn read_slot(&self, sender: &Sender) -> Result<ReadSlot, Refusal> {
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
    pub(super) async fn accept(
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
    pub(super) fn check_times(&self, spans: Vec<Span>) -> (Vec<Span>, [u64; 5]) {
        let now = crate::probes::clock::unix_ns(std::time::SystemTime::now());
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
    pub(super) fn refused(&self, protocol: &str, refusal: &Refusal) {
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

/// Why a request was refused, in both protocols' terms.
#[derive(Debug)]
pub(super) struct Refusal {
    pub(super) kind: Warn,
    pub(super) http: StatusCode,
    pub(super) grpc: tonic::Code,
    pub(super) message: String,
}

impl Refusal {
    pub(super) fn malformed(message: String) -> Self {
        Self {
            kind: Warn::Malformed,
            http: StatusCode::BAD_REQUEST,
            grpc: tonic::Code::InvalidArgument,
            message,
        }
    }

    pub(super) fn too_large(message: String) -> Self {
        Self {
            kind: Warn::TooLarge,
            http: StatusCode::PAYLOAD_TOO_LARGE,
            grpc: tonic::Code::ResourceExhausted,
            message,
        }
    }

    pub(super) fn unsupported(message: String) -> Self {
        Self {
            kind: Warn::Unsupported,
            http: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            grpc: tonic::Code::Unimplemented,
            message,
        }
    }

    /// No room now: a retryable status (OTLP SDKs retry gRPC `UNAVAILABLE`
    /// and HTTP 503, honouring `Retry-After`).
    pub(super) fn busy(message: String) -> Self {
        Self {
            kind: Warn::PendingFull,
            http: StatusCode::SERVICE_UNAVAILABLE,
            grpc: tonic::Code::Unavailable,
            message,
        }
    }

    /// A sender past its share of read slots: retry later (HTTP 429, gRPC
    /// `UNAVAILABLE`, both retried by OTLP SDKs).
    pub(super) fn throttled(message: String) -> Self {
        Self {
            kind: Warn::Busy,
            http: StatusCode::TOO_MANY_REQUESTS,
            grpc: tonic::Code::Unavailable,
            message,
        }
    }

    pub(super) fn unidentified(message: String) -> Self {
        Self {
            kind: Warn::Unidentified,
            http: StatusCode::FORBIDDEN,
            grpc: tonic::Code::PermissionDenied,
            message,
        }
    }

    pub(super) fn timeout(message: String) -> Self {
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
pub(super) fn decode_request(
    bytes: &[u8],
    max_decoded: usize,
) -> Result<ExportTraceServiceRequest, Refusal> {
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

// gRPC.
