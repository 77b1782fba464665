//! OTLP spans to the agent's [`Span`]: ids, times, run context, tokens and
//! attributes, with the resource's claims (pid, container, pod).

use std::{collections::BTreeMap, sync::Arc};

use opentelemetry_proto::tonic::{
    collector::trace::v1::ExportTraceServiceRequest,
    common::v1::{AnyValue, KeyValue, any_value::Value},
    trace::v1::ResourceSpans,
};

use crate::{
    context::spans::{PidScope, Span, SpanTokens},
    identity::run::{ContextAttributes, invoke_agent_name},
};

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
        let mut res = ContextAttributes::default();
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
                    if ContextAttributes::is_key(key)
                        && let Some(v) = scalar(value)
                    {
                        res.set(key, &v);
                    }
                }
            }
        }
        let base = res.context();
        let resource_context = base.run_id.is_some().then(|| Arc::new(base.clone()));
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
            // The span's own attributes win over its resource's; an
            // `agent.id` anywhere wins over the GenAI agent attributes.
            let mut own = ContextAttributes::default();
            let mut attributes = BTreeMap::new();
            for kv in &span.attributes {
                let value = kv.value.as_ref();
                if ContextAttributes::is_key(&kv.key)
                    && let Some(v) = value.and_then(scalar)
                {
                    own.set(&kv.key, &v);
                }
                if with_attributes {
                    attributes.insert(kv.key.clone(), value.map(render).unwrap_or_default());
                }
            }
            let mut context = own.explicit.clone();
            context.inherit(&res.explicit);
            if context.agent_id.is_none() {
                // Only an agent span names its agent; a call or tool inside
                // takes it from the span around it (see ContextAttributes).
                let from_span = own.is_agent_span(&span.name).then(|| {
                    own.genai_agent()
                        .map(String::as_str)
                        .or_else(|| invoke_agent_name(&span.name))
                });
                context.agent_id = from_span
                    .flatten()
                    .or(res.genai_agent().map(String::as_str))
                    .map(str::to_string);
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
                resource_context: resource_context.clone(),
                tokens: tokens_of(&span.attributes),
                attributes,
                sender: None,
            });
        }
    }
}

/// The resource's `process.pid` (int, or a decimal string).
pub(super) fn resource_pid(resource: &[KeyValue]) -> Option<u32> {
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
pub(super) fn scalar(value: &AnyValue) -> Option<String> {
    match &value.value {
        Some(Value::StringValue(s)) => Some(s.clone()),
        Some(Value::IntValue(i)) => Some(i.to_string()),
        _ => None,
    }
}

/// A token count: a non-negative int, a decimal string, or an integral double
/// (some SDKs only have doubles).
pub(super) fn count(value: &AnyValue) -> Option<u64> {
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

/// The `gen_ai.usage.*` token counts a span reports, if any: every token type
/// of the GenAI semantic conventions (input, cache read and creation, output,
/// reasoning, per-modality input and output). The older
/// `gen_ai.usage.cache_read_input_tokens`, `cache_creation_input_tokens`,
/// `prompt_tokens` and `completion_tokens`, then OpenInference's
/// `llm.token_count.*` (Arize), are read where the current names are absent.
/// Also the call's `gen_ai.response.id` and provider, which dedupe reads.
pub(super) fn tokens_of(attributes: &[KeyValue]) -> Option<SpanTokens> {
    // The last occurrence wins, as it does in `Span::attributes`.
    let get = |key: &str| {
        attributes
            .iter()
            .rev()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
    };
    let first = |keys: &[&str]| keys.iter().find_map(|k| get(k).and_then(count));
    let input = first(&[
        "gen_ai.usage.input_tokens",
        "gen_ai.usage.prompt_tokens",
        "llm.token_count.prompt",
    ]);
    let output = first(&[
        "gen_ai.usage.output_tokens",
        "gen_ai.usage.completion_tokens",
        "llm.token_count.completion",
    ]);
    let cache_read = first(&[
        "gen_ai.usage.cache_read.input_tokens",
        "gen_ai.usage.cache_read_input_tokens",
        "llm.token_count.prompt_details.cache_read",
    ]);
    let reasoning = first(&[
        "gen_ai.usage.reasoning.output_tokens",
        "llm.token_count.completion_details.reasoning",
    ]);
    let cache_creation = first(&[
        "gen_ai.usage.cache_creation.input_tokens",
        "gen_ai.usage.cache_creation_input_tokens",
        "llm.token_count.prompt_details.cache_write",
    ]);
    let [text_in, image_in, video_in] =
        ["text", "image", "video"].map(|m| first(&[&format!("gen_ai.usage.{m}.input_tokens")]));
    let audio_in = first(&[
        "gen_ai.usage.audio.input_tokens",
        "llm.token_count.prompt_details.audio",
    ]);
    let text_out = first(&["gen_ai.usage.text.output_tokens"]);
    let audio_out = first(&[
        "gen_ai.usage.audio.output_tokens",
        "llm.token_count.completion_details.audio",
    ]);
    let all = [
        input,
        output,
        cache_read,
        reasoning,
        cache_creation,
        text_in,
        image_in,
        audio_in,
        video_in,
        text_out,
        audio_out,
    ];
    if all.iter().all(Option::is_none) {
        return None;
    }
    let text = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| get(k).and_then(scalar).filter(|v| !v.is_empty()))
    };
    let model = text(&[
        "gen_ai.response.model",
        "gen_ai.request.model",
        "llm.model_name",
    ])
    .unwrap_or_else(|| "unknown".into());
    Some(SpanTokens {
        model,
        input: input.unwrap_or(0),
        cache_read_input: cache_read.unwrap_or(0),
        output: output.unwrap_or(0),
        reasoning_output: reasoning.unwrap_or(0),
        cache_creation_input: cache_creation.unwrap_or(0),
        text_input: text_in.unwrap_or(0),
        image_input: image_in.unwrap_or(0),
        audio_input: audio_in.unwrap_or(0),
        video_input: video_in.unwrap_or(0),
        text_output: text_out.unwrap_or(0),
        audio_output: audio_out.unwrap_or(0),
        response_id: text(&["gen_ai.response.id"]),
        provider: text(&[
            "gen_ai.provider.name",
            "gen_ai.system",
            "llm.provider",
            "llm.system",
        ])
        .map(|p| p.to_ascii_lowercase()),
    })
}

/// Lowercase hex of an id of `len` bytes; None if its length differs or it is
/// all zeros (W3C's invalid id).
pub(super) fn hex_id(bytes: &[u8], len: usize) -> Option<String> {
    (bytes.len() == len && bytes.iter().any(|b| *b != 0)).then(|| hex(bytes))
}

pub(super) fn hex(bytes: &[u8]) -> String {
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
pub(super) fn render(value: &AnyValue) -> String {
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

pub(super) fn json(value: &AnyValue) -> serde_json::Value {
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

// Forwarding.

/// The number of spans in `request`.
pub fn span_count(request: &ExportTraceServiceRequest) -> u64 {
    request
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len() as u64)
        .sum()
}
