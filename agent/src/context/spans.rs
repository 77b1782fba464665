//! Spans as the agent uses them: what the OTLP receiver hands to `context`.
//!
//! Every span carries its [`SpanSender`]: the process the kernel says sent
//! it (see `sender`). Its `pid` and `pid_scope` have been checked against
//! that sender before the span leaves the receiver.

use std::{collections::BTreeMap, sync::Arc};

use crate::identity::run::RunContext;

/// LLM token usage a span reported (`gen_ai.usage.*`, or OpenInference's
/// `llm.token_count.*`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpanTokens {
    /// `gen_ai.response.model`, else `gen_ai.request.model`.
    pub model: String,
    /// `gen_ai.usage.input_tokens` (cached ones included).
    pub input: u64,
    /// `gen_ai.usage.cache_read.input_tokens` (a part of `input`).
    pub cache_read_input: u64,
    /// `gen_ai.usage.output_tokens` (reasoning ones included).
    pub output: u64,
    /// `gen_ai.usage.reasoning.output_tokens` (a part of `output`), where reported.
    pub reasoning_output: u64,
    /// `gen_ai.usage.cache_creation.input_tokens` (a part of `input`).
    pub cache_creation_input: u64,
    /// `gen_ai.usage.{text,image,audio,video}.input_tokens` (parts of `input`).
    pub text_input: u64,
    /// See `text_input`.
    pub image_input: u64,
    /// See `text_input`.
    pub audio_input: u64,
    /// See `text_input`.
    pub video_input: u64,
    /// `gen_ai.usage.{text,audio}.output_tokens` (parts of `output`).
    pub text_output: u64,
    /// See `text_output`.
    pub audio_output: u64,
    /// `gen_ai.response.id`: the provider's id of the call, where reported
    /// (what `context::dedupe` recognises one call by).
    pub response_id: Option<String>,
    /// The provider, lowercased: `gen_ai.provider.name`, else the deprecated
    /// `gen_ai.system`, else OpenInference's `llm.provider` / `llm.system`.
    pub provider: Option<String>,
}

/// Where a span's `process.pid` lives: a container's or pod's pid namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct PidScope {
    /// `container.id` (64 hex).
    pub container_id: Option<String>,
    /// `k8s.pod.uid`.
    pub pod_uid: Option<String>,
}

/// The process that sent a span, as the kernel identified it (never as the
/// client claims).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SpanSender {
    /// The sending process (host pid).
    pub pid: u32,
    /// Its start (CLOCK_BOOTTIME ns, as `ProcKey::start_ns`).
    pub start_ns: u64,
    /// Its cgroup v2 id: the key per-sender bounds count by.
    pub cgroup_id: u64,
    /// A configured trusted forwarder: its claims were believed unchecked.
    pub trusted: bool,
}

/// One finished span, as received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// 32 lowercase hex.
    pub trace_id: String,
    /// 16 lowercase hex.
    pub span_id: String,
    /// 16 lowercase hex, if the span has a parent.
    pub parent_span_id: Option<String>,
    /// The span's name.
    pub name: String,
    /// Start, Unix ns.
    pub start_unix_ns: u64,
    /// End, Unix ns.
    pub end_unix_ns: u64,
    /// The emitting process: the resource's `process.pid` where the sender
    /// may claim it (see `sender`), else the sender's own pid.
    pub pid: Option<u32>,
    /// The resource's `container.id` and `k8s.pod.uid` when it names a
    /// `process.pid`: that pid is then the one inside the container's pid
    /// namespace, to be mapped to the host's before the span is used.
    pub pid_scope: Option<PidScope>,
    /// The resource's `host.name`.
    pub host: Option<String>,
    /// `service.name`.
    pub service: Option<String>,
    /// Run context from the span's attributes, then its resource's (the
    /// span's own win); `trace_id` is the span's.
    pub context: RunContext,
    /// The resource's run context, when the resource (not only the span)
    /// names `flow.run_id`: it binds the emitting process to that run for its
    /// whole life, as the environment's does (one per resource, shared).
    pub resource_context: Option<Arc<RunContext>>,
    /// Token usage, if the span reported any.
    pub tokens: Option<SpanTokens>,
    /// Every span attribute, as strings (including those mapped above);
    /// empty on spans the receiver hands to the inbox, which does not keep them.
    pub attributes: BTreeMap<String, String>,
    /// Who sent it, when the receiver binds senders (see `sender`).
    pub sender: Option<SpanSender>,
}
