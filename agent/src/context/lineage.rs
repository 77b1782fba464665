//! An LLM call's agent from the spans around it: a token span that names no
//! agent is the agent's whose span (of the same process) encloses it, as
//! GenAI-only instrumentations report it (the OpenAI Agents SDK puts the
//! agent on its `invoke_agent`/agent span, not on the model calls inside).
//!
//! In: the spans a window takes from the inbox (after the dedupe). Out: the
//! same spans, a token span's missing agent filled from its nearest
//! ancestor that names one; a token span whose ancestors have not arrived
//! yet waits for them. A call ends, and is exported, before the agent span
//! around it, often in an earlier export batch, so without the wait its
//! tokens would keep no agent.
//!
//! A span waits at most `max_wait` (the daemon's `span_lag`) and never past
//! `max_span_age` since its start (so its token record stays inside the hours
//! the ledger takes); it then goes on with what is known (no agent). A chain
//! ends at a root, at a span of another process, or after [`MAX_DEPTH`]
//! spans. Bounded: at most `max_waiting` spans wait and [`MAX_LINKS`] parent
//! links are kept (only for traces with a waiting span); what does not fit
//! goes on at once, counted.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::context::spans::Span;

/// Ancestors followed from a call.
pub const MAX_DEPTH: usize = 16;
/// Parent links kept for traces with waiting spans.
pub const MAX_LINKS: usize = 200_000;

/// What a span says about its place in a trace.
#[derive(Clone, Debug)]
struct Link {
    parent: Option<String>,
    pid: Option<u32>,
    agent: Option<String>,
}

/// How long and how many token spans may wait for their agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineageLimits {
    /// Longest wait for an ancestor.
    pub max_wait: Duration,
    /// A span is not held past this age (from its start).
    pub max_span_age: Duration,
    /// Spans waiting at once.
    pub max_waiting: usize,
}

impl Default for LineageLimits {
    fn default() -> Self {
        Self {
            max_wait: Duration::ZERO,
            max_span_age: Duration::from_secs(1800),
            max_waiting: 100_000,
        }
    }
}

/// Token spans waiting for the agent span around them, and the links to find it.
#[derive(Debug, Default)]
pub struct AgentLineage {
    limits: LineageLimits,
    links: HashMap<(String, String), Link>,
    waiting: Vec<(Span, Instant)>,
    /// Spans given their agent from an ancestor.
    resolved: u64,
    /// Spans that went on without an agent because their wait ran out.
    expired: u64,
    /// Spans that went on at once because `max_waiting` spans were waiting.
    overflow: u64,
    /// Links not kept because `MAX_LINKS` were.
    links_dropped: u64,
}

enum Found {
    Agent(String),
    /// A root, another process, or too deep: nothing more will come.
    None,
    /// An ancestor has not arrived yet.
    Missing,
}

impl AgentLineage {
    /// Empty, with these limits.
    pub fn new(limits: LineageLimits) -> Self {
        Self {
            limits,
            ..Default::default()
        }
    }

    /// Spans waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Fills the agents of `new`'s token spans, and of those waiting, from
    /// their ancestors; returns the spans to hand on now (those still
    /// waiting are kept). `now_unix_ns` bounds a span's age.
    pub fn apply(&mut self, new: Vec<Span>, now: Instant, now_unix_ns: u64) -> Vec<Span> {
        let candidate = |s: &Span| {
            s.tokens.is_some()
                && s.context.agent_id.is_none()
                && s.parent_span_id.is_some()
                && s.pid.is_some()
        };
        if self.waiting.is_empty() && !new.iter().any(candidate) {
            return new;
        }
        for s in &new {
            if self.links.len() >= MAX_LINKS {
                self.links_dropped += 1;
                continue;
            }
            self.links.insert(
                (s.trace_id.clone(), s.span_id.clone()),
                Link {
                    parent: s.parent_span_id.clone(),
                    pid: s.pid,
                    agent: s.context.agent_id.clone(),
                },
            );
        }
        let mut out = Vec::with_capacity(new.len());
        let mut still = Vec::new();
        let waited = std::mem::take(&mut self.waiting);
        let fresh = new.into_iter().map(|s| (s, now));
        for (mut s, since) in waited.into_iter().chain(fresh) {
            if !candidate(&s) {
                out.push(s);
                continue;
            }
            match self.find(&s) {
                Found::Agent(agent) => {
                    s.context.agent_id = Some(agent);
                    self.resolved += 1;
                    out.push(s);
                }
                Found::None => out.push(s),
                Found::Missing => {
                    let age = Duration::from_nanos(now_unix_ns.saturating_sub(s.start_unix_ns));
                    if now.duration_since(since) >= self.limits.max_wait
                        || age >= self.limits.max_span_age
                    {
                        self.expired += 1;
                        out.push(s);
                    } else if still.len() >= self.limits.max_waiting {
                        self.overflow += 1;
                        out.push(s);
                    } else {
                        still.push((s, since));
                    }
                }
            }
        }
        self.waiting = still;
        // Links matter only for traces a span still waits in.
        let traces: std::collections::HashSet<&str> = self
            .waiting
            .iter()
            .map(|(s, _)| s.trace_id.as_str())
            .collect();
        self.links.retain(|(t, _), _| traces.contains(t.as_str()));
        out
    }

    fn find(&self, s: &Span) -> Found {
        let mut parent = s.parent_span_id.clone();
        for _ in 0..MAX_DEPTH {
            let Some(p) = parent else {
                return Found::None;
            };
            let Some(link) = self.links.get(&(s.trace_id.clone(), p)) else {
                return Found::Missing;
            };
            // Another process's span cannot name this one's agent.
            if link.pid != s.pid {
                return Found::None;
            }
            if let Some(agent) = &link.agent {
                return Found::Agent(agent.clone());
            }
            parent = link.parent.clone();
        }
        Found::None
    }

    /// Counters for /metrics: (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "mentat_agent_token_spans_agent_from_ancestor_total",
                "Token spans naming no agent that took the agent of the span around them (same process and trace).",
                self.resolved,
            ),
            (
                "mentat_agent_token_spans_agent_wait_expired_total",
                "Token spans that waited span_lag (or until max_span_age) for the spans around them and went on without an agent.",
                self.expired,
            ),
            (
                "mentat_agent_token_spans_agent_wait_overflow_total",
                "Token spans that could not wait for the spans around them (100,000 were waiting) and went on without an agent.",
                self.overflow + self.links_dropped,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::spans::SpanTokens;

    fn span(id: &str, parent: Option<&str>, pid: u32, agent: Option<&str>, tokens: bool) -> Span {
        let mut s = Span {
            trace_id: "t".into(),
            span_id: id.into(),
            parent_span_id: parent.map(str::to_string),
            pid: Some(pid),
            start_unix_ns: 1_000,
            end_unix_ns: 2_000,
            tokens: tokens.then(SpanTokens::default),
            ..Default::default()
        };
        s.context.agent_id = agent.map(str::to_string);
        s
    }

    fn limits() -> LineageLimits {
        LineageLimits {
            max_wait: Duration::from_secs(10),
            max_span_age: Duration::from_secs(1800),
            max_waiting: 100,
        }
    }

    fn agents(out: &[Span]) -> Vec<(String, Option<String>)> {
        out.iter()
            .map(|s| (s.span_id.clone(), s.context.agent_id.clone()))
            .collect()
    }

    #[test]
    fn a_call_takes_its_nearest_ancestors_agent_in_its_batch() {
        let mut l = AgentLineage::new(limits());
        let t0 = Instant::now();
        let out = l.apply(
            vec![
                span("chat", Some("tool"), 1, None, true),
                span("tool", Some("agent"), 1, None, false),
                span("agent", None, 1, Some("tutor"), false),
                span("own", Some("agent"), 1, Some("writer"), true),
                span("other", Some("agent"), 2, None, true),
            ],
            t0,
            3_000,
        );
        let got = agents(&out);
        assert!(
            got.contains(&("chat".into(), Some("tutor".into()))),
            "{got:?}"
        );
        assert!(
            got.contains(&("own".into(), Some("writer".into()))),
            "{got:?}"
        );
        assert!(
            got.contains(&("other".into(), None)),
            "another process's: {got:?}"
        );
        assert_eq!(l.waiting(), 0);
    }

    #[test]
    fn a_call_waits_for_an_agent_span_in_a_later_batch_then_goes_on() {
        let mut l = AgentLineage::new(limits());
        let t0 = Instant::now();
        // The call comes first; its agent span arrives a batch later.
        let out = l.apply(vec![span("chat", Some("agent"), 1, None, true)], t0, 3_000);
        assert!(out.is_empty(), "it waits: {out:?}");
        assert_eq!(l.waiting(), 1);
        let out = l.apply(
            vec![span("agent", None, 1, Some("triage"), false)],
            t0 + Duration::from_secs(1),
            3_000,
        );
        assert_eq!(
            agents(&out),
            vec![
                ("chat".into(), Some("triage".into())),
                ("agent".into(), Some("triage".into()))
            ]
        );
        // One whose ancestor never comes goes on after max_wait, counted.
        assert!(
            l.apply(vec![span("lost", Some("gone"), 1, None, true)], t0, 3_000)
                .is_empty()
        );
        let out = l.apply(vec![], t0 + Duration::from_secs(10), 3_000);
        assert_eq!(agents(&out), vec![("lost".into(), None)]);
        let expired = l.counters()[1].2;
        assert_eq!(expired, 1);
        assert!(
            l.links.is_empty(),
            "links of traces nobody waits in are dropped"
        );
    }

    #[test]
    fn waiting_is_bounded_by_count_and_by_the_spans_age() {
        let mut l = AgentLineage::new(LineageLimits {
            max_waiting: 1,
            ..limits()
        });
        let t0 = Instant::now();
        let out = l.apply(
            vec![
                span("a", Some("gone"), 1, None, true),
                span("b", Some("gone"), 1, None, true),
            ],
            t0,
            3_000,
        );
        assert_eq!(out.len(), 1, "one waits, one goes on");
        assert_eq!(l.counters()[2].2, 1);
        // A span at max_span_age does not wait at all.
        let mut l = AgentLineage::new(limits());
        let old = 1_000 + 1_800_000_000_000;
        assert_eq!(
            l.apply(vec![span("c", Some("gone"), 1, None, true)], t0, old)
                .len(),
            1
        );
    }
}
