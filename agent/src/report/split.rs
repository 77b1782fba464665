//! Which AI-agent flow run each process's usage belongs to, window by window.
//!
//! Two sources, no code change in the workloads: the environment at exec
//! (`identity::env`), and spans received over OTLP (`context`): a span
//! carrying `flow.run_id` binds its process's usage during `[start, end]` to
//! that run.
//!
//! The share of its time each run owns comes from the span index
//! (`crate::context::index`, which states the rule); here integer quantities
//! are split by those shares by largest remainder, so the parts sum exactly to
//! the whole. Also here: a token span's own record, and a run's critical path.

use std::collections::HashMap;

use crate::{
    context::{
        index::{SCALE, Share},
        spans::Span,
    },
    identity::run::RunContext,
    report::record::{TokenUsage, UsageRecord, stable_id},
};

/// Splits `total` by `shares` exactly (largest remainder): the parts sum to `total`.
pub fn split_u64(total: u64, shares: &[Share]) -> Vec<u64> {
    let scaled: Vec<(u64, u128)> = shares
        .iter()
        .map(|s| {
            let x = u128::from(total) * u128::from(s.parts);
            ((x / u128::from(SCALE)) as u64, x % u128::from(SCALE))
        })
        .collect();
    let mut out: Vec<u64> = scaled.iter().map(|s| s.0).collect();
    let mut missing = total.saturating_sub(out.iter().sum());
    let mut order: Vec<usize> = (0..out.len()).collect();
    order.sort_by(|&i, &j| scaled[j].1.cmp(&scaled[i].1));
    for i in order {
        if missing == 0 {
            break;
        }
        out[i] += 1;
        missing -= 1;
    }
    out
}

/// Splits a byte-nanosecond integral the same way.
pub fn split_u128(total: u128, shares: &[Share]) -> Vec<u128> {
    let mut out: Vec<u128> = shares
        .iter()
        .map(|s| total / u128::from(SCALE) * u128::from(s.parts))
        .collect();
    let rest = total - out.iter().sum::<u128>();
    if let Some(first) = out.first_mut() {
        *first += rest;
    }
    out
}

/// A span as the run view needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathSpan {
    /// Span id.
    pub span_id: String,
    /// Parent span id.
    pub parent: Option<String>,
    /// Start, Unix ns.
    pub start: i64,
    /// End, Unix ns.
    pub end: i64,
}

/// The critical path of a run: the chain of spans that determined its
/// duration. It starts at the root that ends last (spans whose parent is not
/// in the run are roots), and from each span descends into the child that
/// ends last, since the parent could not end before it. Returns span ids,
/// root first.
pub fn critical_path(spans: &[PathSpan]) -> Vec<String> {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&PathSpan>> = HashMap::new();
    let mut roots = Vec::new();
    for s in spans {
        match s
            .parent
            .as_deref()
            .filter(|p| ids.contains(p) && *p != s.span_id)
        {
            Some(p) => children.entry(p).or_default().push(s),
            None => roots.push(s),
        }
    }
    fn latest<'a>(v: &[&'a PathSpan]) -> Option<&'a PathSpan> {
        v.iter()
            .copied()
            .max_by(|a, b| a.end.cmp(&b.end).then(b.start.cmp(&a.start)))
    }
    let mut path = Vec::new();
    let mut cur = latest(&roots);
    // Bounded: a cycle in bad data cannot loop forever.
    while let Some(s) = cur {
        if path.len() > spans.len() {
            break;
        }
        path.push(s.span_id.clone());
        cur = children.get(s.span_id.as_str()).and_then(|c| latest(c));
    }
    path
}

/// The usage record of a span's LLM tokens: one per span that reported
/// any, over the span's interval, carrying the span's run context (with
/// what it lacks taken from its process's context, `own`). Its id is the
/// span's, so a span received twice is one record.
pub fn token_record(node: &str, span: &Span, own: &RunContext) -> Option<UsageRecord> {
    let tokens = span.tokens.as_ref()?;
    let mut ctx = span.context.clone();
    ctx.inherit(own);
    let time = |ns: u64| {
        crate::probes::clock::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
    };
    Some(UsageRecord {
        record_id: stable_id(&[
            node.as_bytes(),
            b"tokens",
            span.trace_id.as_bytes(),
            span.span_id.as_bytes(),
        ]),
        node: node.to_string(),
        window_start: time(span.start_unix_ns),
        window_end: time(span.end_unix_ns.max(span.start_unix_ns)),
        record_kind: "tokens".into(),
        pid: span.pid,
        comm: span.service.clone(),
        context: RunContext {
            agent_id: ctx.agent_id,
            flow_id: ctx.flow_id,
            run_id: ctx.run_id,
            user_id: ctx.user_id,
            project_id: ctx.project_id,
            customer_id: ctx.customer_id,
            trace_id: Some(span.trace_id.clone()),
        },
        tokens: vec![TokenUsage {
            model: tokens.model.clone(),
            input: tokens.input,
            cache_read_input: tokens.cache_read_input.min(tokens.input),
            output: tokens.output,
            reasoning_output: tokens.reasoning_output.min(tokens.output),
            // Parts of input and output as reported; pricing clamps them so
            // no token is priced twice.
            cache_creation_input: tokens.cache_creation_input,
            text_input: tokens.text_input,
            image_input: tokens.image_input,
            audio_input: tokens.audio_input,
            video_input: tokens.video_input,
            text_output: tokens.text_output,
            audio_output: tokens.audio_output,
            unpriced: false,
            cost: None,
        }],
        ..UsageRecord::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::index::tests::span;

    #[test]
    fn critical_path_follows_the_last_finishing_child() {
        let sp = |id: &str, parent: Option<&str>, start, end| PathSpan {
            span_id: id.into(),
            parent: parent.map(String::from),
            start,
            end,
        };
        // flow → {plan [0,30], code [30,90] → {llm [35,80], test [80,88]}}, plus a stray root ending early.
        let spans = vec![
            sp("flow", None, 0, 100),
            sp("plan", Some("flow"), 0, 30),
            sp("code", Some("flow"), 30, 90),
            sp("llm", Some("code"), 35, 80),
            sp("test", Some("code"), 80, 88),
            sp("stray", Some("not-in-run"), 0, 10),
        ];
        assert_eq!(critical_path(&spans), ["flow", "code", "test"]);
        assert!(critical_path(&[]).is_empty());
    }

    #[test]
    fn token_records_carry_the_span_run_and_are_idempotent() {
        let mut s = span(7, "run-1", 1_000_000_000, 3_000_000_000);
        s.trace_id = "t".repeat(32);
        s.span_id = "s".repeat(16);
        s.tokens = Some(crate::context::spans::SpanTokens {
            model: "gpt-4o".into(),
            input: 1000,
            cache_read_input: 200,
            output: 50,
            reasoning_output: 10,
            ..Default::default()
        });
        let own = RunContext {
            customer_id: Some("acme".into()),
            ..Default::default()
        };
        let r = token_record("n", &s, &own).expect("a token record");
        assert_eq!(r.context.run_id.as_deref(), Some("run-1"));
        assert_eq!(r.context.customer_id.as_deref(), Some("acme"));
        assert_eq!(r.tokens[0].input, 1000);
        assert_eq!(r.window_start, "1970-01-01T00:00:01Z");
        assert_eq!(
            r.record_id,
            token_record("n", &s, &own)
                .map(|r| r.record_id)
                .unwrap_or_default()
        );
        assert!(token_record("n", &span(7, "r", 0, 1), &own).is_none());
    }
}
