//! Which AI-agent flow run each process's usage belongs to.
//!
//! Two sources, no code change in the workloads:
//! - **the environment at exec**: only `TRACEPARENT`, `OTEL_RESOURCE_ATTRIBUTES`
//!   and `OTEL_SERVICE_NAME` are kept, from the kernel's copy of the
//!   environment block taken at exec (so a process that exits at once keeps
//!   its own context), or from `/proc/<pid>/environ` where the copy was cut
//!   or lost; nothing else from the environment is kept or logged (it holds
//!   secrets). A process without its own context inherits its parent's, so a
//!   run's subprocesses stay in the run.
//! - **spans** received over OTLP (module `receiver`): a span carrying
//!   `flow.run_id` binds its process's usage during `[start, end]` to that run.
//!
//! The split rule, for a process's usage in one window: usage is taken as
//! spread evenly over the part of the window the process was alive (from its
//! start or the window's, to its exit or the window's end); each instant of
//! that belongs to the runs whose spans (of that process) cover it, shared
//! equally when several do; instants no span covers belong to the process's
//! environment context (or to no run). Each run gets the fraction it owns; integer
//! quantities are split by largest remainder so the parts sum exactly to the
//! whole.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    io::Read,
    path::Path,
};

use crate::{
    spans::{RunContext, Span},
    usage::{TokenUsage, UsageRecord, stable_id},
};

/// What a process's environment says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvContext {
    /// The run context (from `OTEL_RESOURCE_ATTRIBUTES`, and `TRACEPARENT`'s trace id).
    pub context: RunContext,
    /// `OTEL_SERVICE_NAME`, or `service.name` from the resource attributes.
    pub service: Option<String>,
    /// `TRACEPARENT` was set but malformed (ignored, counted).
    pub bad_traceparent: bool,
}

/// Why a `TRACEPARENT` value was ignored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TraceparentError {
    /// Not four dash-separated fields of the right lengths.
    #[error("traceparent {0:?} is not version-traceid-spanid-flags")]
    Shape(String),
    /// A field is not lowercase hex, or an id is all zeros, or the version is ff.
    #[error("traceparent {0:?} has an invalid field")]
    Field(String),
}

/// Parses a W3C `traceparent` into (trace id, parent span id).
pub fn parse_traceparent(v: &str) -> Result<(String, String), TraceparentError> {
    let v = v.trim();
    let parts: Vec<&str> = v.split('-').collect();
    let (version, trace, span, flags) = match parts.as_slice() {
        [a, b, c, d, ..] => (*a, *b, *c, *d),
        _ => return Err(TraceparentError::Shape(v.to_string())),
    };
    // Version 00 has exactly four fields; later versions may append more.
    if version.len() != 2
        || trace.len() != 32
        || span.len() != 16
        || flags.len() != 2
        || (version == "00" && parts.len() != 4)
    {
        return Err(TraceparentError::Shape(v.to_string()));
    }
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if !hex(version)
        || !hex(trace)
        || !hex(span)
        || !hex(flags)
        || version == "ff"
        || zero(trace)
        || zero(span)
    {
        return Err(TraceparentError::Field(v.to_string()));
    }
    Ok((trace.to_string(), span.to_string()))
}

/// Parses `OTEL_RESOURCE_ATTRIBUTES` (`k=v,k2=v2`, values percent-encoded)
/// into the run context and the service name.
pub fn parse_resource_attributes(v: &str) -> (RunContext, Option<String>) {
    let mut ctx = RunContext::default();
    let mut service = None;
    for pair in v.split(',') {
        let Some((k, val)) = pair.split_once('=') else {
            continue;
        };
        let (k, val) = (k.trim(), percent_decode(val.trim()));
        if k == "service.name" {
            service = Some(val);
        } else {
            ctx.set_attribute(k, &val);
        }
    }
    (ctx, service)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(h) = b.get(i + 1..i + 3)
            && let Some(v) = std::str::from_utf8(h)
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The context in raw `/proc/<pid>/environ` bytes, reading only the allowlist.
pub fn context_from_environ(environ: &[u8]) -> EnvContext {
    let mut env = EnvContext::default();
    let mut trace_id = None;
    for entry in environ.split(|&b| b == 0) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (name, value) = (&entry[..eq], &entry[eq + 1..]);
        match name {
            b"TRACEPARENT" => match std::str::from_utf8(value).map(parse_traceparent) {
                Ok(Ok((trace, _))) => trace_id = Some(trace),
                _ => env.bad_traceparent = true,
            },
            b"OTEL_RESOURCE_ATTRIBUTES" => {
                let (ctx, service) = parse_resource_attributes(&String::from_utf8_lossy(value));
                env.context = ctx;
                if env.service.is_none() {
                    env.service = service;
                }
            }
            b"OTEL_SERVICE_NAME" => env.service = Some(String::from_utf8_lossy(value).into_owned()),
            _ => {}
        }
    }
    env.context.trace_id = trace_id;
    env
}

/// An environment can be large; the allowlisted variables are what matter,
/// and a cap keeps a hostile environment from costing the agent memory.
const ENVIRON_LIMIT: u64 = 1 << 20;

/// Reads and parses `/proc/<pid>/environ` (needs ptrace-read access).
pub fn read_env_context(proc_root: &Path, pid: u32) -> Option<EnvContext> {
    let f = fs::File::open(proc_root.join(pid.to_string()).join("environ")).ok()?;
    let mut buf = Vec::new();
    f.take(ENVIRON_LIMIT).read_to_end(&mut buf).ok()?;
    Some(context_from_environ(&buf))
}

/// One process's usage in one window, split between runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Share {
    /// The run context this share belongs to (the process's own where no span covers).
    pub context: RunContext,
    /// The fraction of the window, in parts per `SCALE`.
    pub parts: u64,
}

/// Fractions are integers out of this, so splits are exact.
pub const SCALE: u64 = 1_000_000_000;

/// What the split needs of a span: when, and for which run.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Interval {
    start_unix_ns: u64,
    end_unix_ns: u64,
    context: RunContext,
}

/// At most this many spans wait in the index for their windows. A span is
/// ~200 bytes here, so the index stays under a few MiB whatever clients send;
/// beyond it, spans are not used for splitting (counted as dropped) and
/// their usage stays with the process's own context.
pub const MAX_INDEXED_SPANS: usize = 20_000;

/// Spans received, indexed by process, kept until they can no longer matter.
#[derive(Debug, Default)]
pub struct SpanIndex {
    by_pid: HashMap<u32, Vec<Interval>>,
    len: usize,
    dropped: u64,
}

impl SpanIndex {
    /// Adds a span that names its process and carries a run; false when the
    /// index is full and the span was dropped.
    pub fn add(&mut self, span: &Span) -> bool {
        let (Some(pid), Some(_)) = (span.pid, span.context.run_id.as_ref()) else {
            return true;
        };
        if span.end_unix_ns <= span.start_unix_ns {
            return true;
        }
        if self.len >= MAX_INDEXED_SPANS {
            self.dropped += 1;
            return false;
        }
        self.len += 1;
        self.by_pid.entry(pid).or_default().push(Interval {
            start_unix_ns: span.start_unix_ns,
            end_unix_ns: span.end_unix_ns,
            context: span.context.clone(),
        });
        true
    }

    /// Spans dropped because the index was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Drops spans that ended before `before_unix_ns` (windows up to it are closed).
    pub fn forget_before(&mut self, before_unix_ns: u64) {
        let mut len = 0;
        self.by_pid.retain(|_, spans| {
            spans.retain(|s| s.end_unix_ns >= before_unix_ns);
            len += spans.len();
            !spans.is_empty()
        });
        self.len = len;
    }

    /// How process `pid`'s usage in `[start, end)` (Unix ns) splits between
    /// runs, by the module's rule; `own` is the process's environment context.
    pub fn shares(&self, pid: u32, start: u64, end: u64, own: &RunContext) -> Vec<Share> {
        let Some(spans) = self.by_pid.get(&pid) else {
            return vec![Share {
                context: own.clone(),
                parts: SCALE,
            }];
        };
        if end <= start {
            return vec![Share {
                context: own.clone(),
                parts: SCALE,
            }];
        }
        // Sweep the window's instants: at each boundary, the set of runs covering it changes.
        let mut cuts: Vec<u64> = vec![start, end];
        for s in spans {
            for t in [s.start_unix_ns, s.end_unix_ns] {
                if t > start && t < end {
                    cuts.push(t);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut ns_by_ctx: BTreeMap<RunContext, u128> = BTreeMap::new();
        let len = u128::from(end - start);
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let covering: Vec<RunContext> = {
                let mut c: Vec<RunContext> = spans
                    .iter()
                    .filter(|s| s.start_unix_ns <= a && s.end_unix_ns >= b)
                    .map(|s| {
                        let mut ctx = s.context.clone();
                        ctx.inherit(own);
                        ctx
                    })
                    .collect();
                c.sort();
                c.dedup();
                c
            };
            let piece = u128::from(b - a);
            if covering.is_empty() {
                *ns_by_ctx.entry(own.clone()).or_default() += piece * u128::from(SCALE);
            } else {
                let n = covering.len() as u128;
                for ctx in covering {
                    *ns_by_ctx.entry(ctx).or_default() += piece * u128::from(SCALE) / n;
                }
            }
        }
        // To parts per SCALE, by largest remainder so they sum to SCALE exactly.
        let mut shares: Vec<(RunContext, u64, u128)> = ns_by_ctx
            .into_iter()
            .map(|(ctx, scaled)| {
                let parts = (scaled / len) as u64;
                (ctx, parts, scaled % len)
            })
            .collect();
        let assigned: u64 = shares.iter().map(|s| s.1).sum();
        let mut missing = SCALE.saturating_sub(assigned);
        let mut order: Vec<usize> = (0..shares.len()).collect();
        order.sort_by(|&i, &j| shares[j].2.cmp(&shares[i].2));
        for i in order {
            if missing == 0 {
                break;
            }
            shares[i].1 += 1;
            missing -= 1;
        }
        shares
            .into_iter()
            .filter(|s| s.1 > 0)
            .map(|(context, parts, _)| Share { context, parts })
            .collect()
    }
}

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
        crate::clock::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns))
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
        agent_id: ctx.agent_id,
        flow_id: ctx.flow_id,
        run_id: ctx.run_id,
        user_id: ctx.user_id,
        project_id: ctx.project_id,
        customer_id: ctx.customer_id,
        trace_id: Some(span.trace_id.clone()),
        tokens: vec![TokenUsage {
            model: tokens.model.clone(),
            input: tokens.input,
            cache_read_input: tokens.cache_read_input.min(tokens.input),
            output: tokens.output,
            reasoning_output: tokens.reasoning_output.min(tokens.output),
        }],
        ..UsageRecord::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_parses_and_rejects() {
        assert_eq!(
            parse_traceparent(TP),
            Ok((
                "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into()
            ))
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn only_the_allowlist_is_read_from_the_environment() {
        let env = format!(
            "PATH=/bin\0AWS_SECRET_ACCESS_KEY=hunter2\0TRACEPARENT={TP}\0OTEL_RESOURCE_ATTRIBUTES=flow.id=f1,flow.run_id=r%2C1,agent.id=a,user.id=u,project.id=p,customer.id=c,service.name=svc\0\0garbage\0"
        );
        let e = context_from_environ(env.as_bytes());
        assert_eq!(e.context.run_id.as_deref(), Some("r,1"));
        assert_eq!(e.context.flow_id.as_deref(), Some("f1"));
        assert_eq!(e.context.customer_id.as_deref(), Some("c"));
        assert_eq!(
            e.context.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(e.service.as_deref(), Some("svc"));
        assert!(!e.bad_traceparent);
        assert!(!format!("{e:?}").contains("hunter2"));
        let bad = context_from_environ(b"TRACEPARENT=nonsense\0");
        assert!(bad.bad_traceparent && bad.context.trace_id.is_none());
    }

    fn span(pid: u32, run: &str, start: u64, end: u64) -> Span {
        let mut s = Span {
            pid: Some(pid),
            start_unix_ns: start,
            end_unix_ns: end,
            ..Default::default()
        };
        s.context.run_id = Some(run.into());
        s
    }

    #[test]
    fn overlapping_runs_share_equally_and_sum_to_the_whole() {
        let mut idx = SpanIndex::default();
        // Window [0, 100): run A covers [0, 60), run B covers [40, 100).
        idx.add(&span(7, "A", 0, 60));
        idx.add(&span(7, "B", 40, 100));
        let shares = idx.shares(7, 0, 100, &RunContext::default());
        let of = |run: &str| {
            shares
                .iter()
                .find(|s| s.context.run_id.as_deref() == Some(run))
                .map_or(0, |s| s.parts)
        };
        // A: 40 alone + 20/2 shared = 50 %; B: 40 alone + 10 = 50 %.
        assert_eq!(of("A"), SCALE / 2);
        assert_eq!(of("B"), SCALE / 2);
        assert_eq!(shares.iter().map(|s| s.parts).sum::<u64>(), SCALE);
        let parts = split_u64(1_000_001, &shares);
        assert_eq!(parts.iter().sum::<u64>(), 1_000_001);
    }

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
        s.tokens = Some(crate::spans::SpanTokens {
            model: "gpt-4o".into(),
            input: 1000,
            cache_read_input: 200,
            output: 50,
            reasoning_output: 10,
        });
        let own = RunContext {
            customer_id: Some("acme".into()),
            ..Default::default()
        };
        let r = token_record("n", &s, &own).expect("a token record");
        assert_eq!(r.run_id.as_deref(), Some("run-1"));
        assert_eq!(r.customer_id.as_deref(), Some("acme"));
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

    #[test]
    fn uncovered_time_keeps_the_process_context() {
        let mut idx = SpanIndex::default();
        idx.add(&span(7, "A", 0, 25));
        let own = RunContext {
            run_id: Some("env-run".into()),
            ..Default::default()
        };
        let shares = idx.shares(7, 0, 100, &own);
        let env = shares
            .iter()
            .find(|s| s.context.run_id.as_deref() == Some("env-run"));
        assert_eq!(env.map(|s| s.parts), Some(SCALE * 3 / 4));
        // Spans inherit what they do not set from the process's context.
        assert_eq!(
            idx.shares(8, 0, 100, &own),
            vec![Share {
                context: own,
                parts: SCALE
            }]
        );
    }
}
