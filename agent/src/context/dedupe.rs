//! Token dedupe: one LLM call is billed once, however many instrumentations
//! report it.
//!
//! In: the spans new since the last window, as [`crate::context::inbox`]
//! hands them to `report` ([`TokenDedupe::apply`]). Out: the same spans, in
//! the same order; a span found to report a call already seen keeps
//! everything but its tokens (`tokens = None`): its run rows and index entry
//! stay, no token record is made for it.
//!
//! The rule (README "Tokens"): two token spans report the same call when they
//! come from the same process (the span's host pid, which the receiver bound
//! to the sender the kernel named) and the same trace, and either
//! - (a) both carry `gen_ai.response.id`, the ids are equal, and their
//!   providers (lowercased) are equal where both are known; or
//! - (b) a response id is missing on either, one span is a descendant of the
//!   other (parent links, at most [`MAX_DEPTH`] levels apart, through spans
//!   without usage too) and they report the same input and output counts.
//!
//! Invariants:
//! - **Never across processes.** Everything is keyed by (pid, trace id): a
//!   span can only lose its tokens to an earlier span bound to the same
//!   process, which could have billed those tokens itself; a tenant cannot
//!   cancel or shift another process's tokens, whatever ids it forges. A span
//!   without a pid, or whose ids are not hex, is never deduplicated.
//! - **First received wins.** A token record already handed on cannot be
//!   taken back, so the span received first (within a window, the first in
//!   the inbox's order) keeps its tokens; later reports of the call lose
//!   theirs, whatever detail they carry.
//! - **Bounded.** Calls are remembered for `window` after the window they were
//!   first seen in, at most `max_calls` of them; parent links are kept only
//!   for traces with a remembered call, for `window`, at most `max_links`.
//!   What the count bounds push out before its time is counted on `/metrics`
//!   and warned about (once a minute): a duplicate of a forgotten call is
//!   billed again. A window's links are all added before its token spans are
//!   judged, since a child usually ends (and is exported) before its parent,
//!   with the spans between them arriving in between.

use std::{
    collections::{HashMap, HashSet, VecDeque, hash_map::RandomState},
    hash::BuildHasher,
    time::Duration,
};

use tracing::warn;

use crate::context::spans::Span;

/// How many parent links apart two spans of one call may be.
pub const MAX_DEPTH: usize = 8;
/// Span ids kept per call (for the nesting rule); later duplicates are still
/// recognised by response id, and by nesting under the spans kept.
const MAX_SPANS_PER_CALL: usize = 4;
/// Response ids kept per call.
const MAX_IDS_PER_CALL: usize = 4;
/// Calls of one trace with the same counts checked for nesting, newest first.
const MAX_CANDIDATES: usize = 8;
/// One warning per this many ns of window time.
const WARN_EVERY_NS: u64 = 60_000_000_000;

/// The dedupe's bounds (`[receiver]` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeLimits {
    /// How long a call (and a parent link) is remembered.
    pub window: Duration,
    /// Calls remembered.
    pub max_calls: usize,
    /// Parent links remembered.
    pub max_links: usize,
}

impl Default for DedupeLimits {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(300),
            max_calls: 50_000,
            max_links: 200_000,
        }
    }
}

/// A process and trace: the scope a call is recognised in.
type Scope = (u32, u128);
type CallId = u64;

#[derive(Debug)]
struct Call {
    scope: Scope,
    /// Span ids reporting it.
    spans: Vec<u64>,
    /// Hashed response ids with their hashed provider, where known.
    ids: Vec<(u64, Option<u64>)>,
    input: u64,
    output: u64,
}

/// What one window's spans came to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deduped {
    /// Spans whose tokens were removed by rule (a).
    pub by_response_id: u64,
    /// Spans whose tokens were removed by rule (b).
    pub by_nesting: u64,
}

/// Remembered calls and parent links (see the module doc).
#[derive(Debug)]
pub struct TokenDedupe {
    limits: DedupeLimits,
    /// Hashes response ids and providers: a sender cannot aim collisions.
    hasher: RandomState,
    next_id: CallId,
    calls: HashMap<CallId, Call>,
    /// Calls in the order they were first seen, with that window's time.
    call_order: VecDeque<(u64, CallId)>,
    by_response: HashMap<(Scope, u64), Vec<CallId>>,
    by_counts: HashMap<(Scope, u64, u64), Vec<CallId>>,
    /// Remembered calls per scope: links are kept for these scopes only.
    scopes: HashMap<Scope, usize>,
    /// (scope, span id) → parent span id.
    links: HashMap<(Scope, u64), u64>,
    link_order: VecDeque<(u64, Scope, u64)>,
    total: Deduped,
    calls_evicted: u64,
    links_evicted: u64,
    last_warn_ns: u64,
}

impl Default for TokenDedupe {
    fn default() -> Self {
        Self::new(DedupeLimits::default())
    }
}

/// A token span's scope and span id, where it has what dedupe needs.
fn key_of(span: &Span) -> Option<(Scope, u64)> {
    let pid = span.pid?;
    let trace = u128::from_str_radix(&span.trace_id, 16).ok()?;
    let id = u64::from_str_radix(&span.span_id, 16).ok()?;
    Some(((pid, trace), id))
}

impl TokenDedupe {
    /// Nothing remembered yet.
    pub fn new(limits: DedupeLimits) -> Self {
        Self {
            limits,
            hasher: RandomState::new(),
            next_id: 0,
            calls: HashMap::new(),
            call_order: VecDeque::new(),
            by_response: HashMap::new(),
            by_counts: HashMap::new(),
            scopes: HashMap::new(),
            links: HashMap::new(),
            link_order: VecDeque::new(),
            total: Deduped::default(),
            calls_evicted: 0,
            links_evicted: 0,
            last_warn_ns: 0,
        }
    }

    /// Removes the tokens of the spans in `spans` that report a call already
    /// seen; `now` is the window's end (Unix ns), the clock remembered calls
    /// and links expire by.
    pub fn apply(&mut self, spans: &mut [Span], now: u64) -> Deduped {
        self.expire(now);
        // The scopes of this window's token spans: their links are kept too.
        let fresh: HashSet<Scope> = spans
            .iter()
            .filter(|s| s.tokens.is_some())
            .filter_map(|s| key_of(s).map(|k| k.0))
            .collect();
        for span in spans.iter() {
            let Some((scope, id)) = key_of(span) else {
                continue;
            };
            let Some(parent) = span
                .parent_span_id
                .as_deref()
                .and_then(|p| u64::from_str_radix(p, 16).ok())
            else {
                continue;
            };
            if self.scopes.contains_key(&scope) || fresh.contains(&scope) {
                self.links.insert((scope, id), parent);
                self.link_order.push_back((now, scope, id));
            }
        }
        let mut done = Deduped::default();
        for span in spans.iter_mut() {
            let Some((scope, id)) = key_of(span) else {
                continue;
            };
            let Some(tokens) = &span.tokens else { continue };
            let response = tokens.response_id.as_deref().map(|r| self.hash(r));
            let provider = tokens.provider.as_deref().map(|p| self.hash(p));
            let (input, output) = (tokens.input, tokens.output);
            if let Some(call) = response.and_then(|r| self.by_response_id(scope, r, provider)) {
                done.by_response_id += 1;
                self.merge(call, id, None);
                span.tokens = None;
            } else if let Some(call) = self.by_nesting(scope, id, input, output, response) {
                done.by_nesting += 1;
                self.merge(call, id, response.map(|r| (r, provider)));
                span.tokens = None;
            } else {
                self.remember(
                    scope,
                    id,
                    response.map(|r| (r, provider)),
                    input,
                    output,
                    now,
                );
            }
        }
        self.bound(now);
        self.total.by_response_id += done.by_response_id;
        self.total.by_nesting += done.by_nesting;
        done
    }

    fn hash(&self, s: &str) -> u64 {
        self.hasher.hash_one(s)
    }

    /// Rule (a): a call of this scope with this response id and a provider
    /// that does not differ.
    fn by_response_id(&self, scope: Scope, response: u64, provider: Option<u64>) -> Option<CallId> {
        self.by_response
            .get(&(scope, response))?
            .iter()
            .copied()
            .find(|c| {
                self.calls.get(c).is_some_and(|call| {
                    call.ids.iter().any(|(r, p)| {
                        *r == response && (p.is_none() || provider.is_none() || *p == provider)
                    })
                })
            })
    }

    /// Rule (b): a call of this scope with these counts, one of whose spans
    /// is an ancestor or a descendant of `id`, where either lacks a response id.
    fn by_nesting(
        &self,
        scope: Scope,
        id: u64,
        input: u64,
        output: u64,
        response: Option<u64>,
    ) -> Option<CallId> {
        let candidates = self.by_counts.get(&(scope, input, output))?;
        let above = self.ancestors(scope, id);
        candidates
            .iter()
            .rev()
            .take(MAX_CANDIDATES)
            .copied()
            .find(|c| {
                let Some(call) = self.calls.get(c) else {
                    return false;
                };
                (response.is_none() || call.ids.is_empty())
                    && call
                        .spans
                        .iter()
                        .any(|s| above.contains(s) || self.ancestors(scope, *s).contains(&id))
            })
    }

    /// Up to [`MAX_DEPTH`] known ancestors of `id`, nearest first.
    fn ancestors(&self, scope: Scope, mut id: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while out.len() < MAX_DEPTH {
            match self.links.get(&(scope, id)) {
                Some(parent) => {
                    out.push(*parent);
                    id = *parent;
                }
                None => break,
            }
        }
        out
    }

    /// Adds a duplicate's span (and response id) to its call, so later
    /// reports of the call are recognised through it too.
    fn merge(&mut self, call: CallId, span: u64, response: Option<(u64, Option<u64>)>) {
        let Some(c) = self.calls.get_mut(&call) else {
            return;
        };
        if c.spans.len() < MAX_SPANS_PER_CALL && !c.spans.contains(&span) {
            c.spans.push(span);
        }
        if let Some((r, p)) = response
            && c.ids.len() < MAX_IDS_PER_CALL
            && !c.ids.contains(&(r, p))
        {
            c.ids.push((r, p));
            let scope = c.scope;
            let ids = self.by_response.entry((scope, r)).or_default();
            if !ids.contains(&call) {
                ids.push(call);
            }
        }
    }

    fn remember(
        &mut self,
        scope: Scope,
        span: u64,
        response: Option<(u64, Option<u64>)>,
        input: u64,
        output: u64,
        now: u64,
    ) {
        let id = self.next_id;
        self.next_id += 1;
        if let Some((r, _)) = response {
            self.by_response.entry((scope, r)).or_default().push(id);
        }
        self.by_counts
            .entry((scope, input, output))
            .or_default()
            .push(id);
        *self.scopes.entry(scope).or_default() += 1;
        self.calls.insert(
            id,
            Call {
                scope,
                spans: vec![span],
                ids: response.into_iter().collect(),
                input,
                output,
            },
        );
        self.call_order.push_back((now, id));
    }

    /// Forgets calls and links older than `window`.
    fn expire(&mut self, now: u64) {
        let window = u64::try_from(self.limits.window.as_nanos()).unwrap_or(u64::MAX);
        let cutoff = now.saturating_sub(window);
        while let Some(&(seen, call)) = self.call_order.front() {
            if seen > cutoff {
                break;
            }
            self.call_order.pop_front();
            self.forget(call);
        }
        while let Some(&(seen, scope, id)) = self.link_order.front() {
            if seen > cutoff {
                break;
            }
            self.link_order.pop_front();
            self.links.remove(&(scope, id));
        }
    }

    /// Forgets the oldest calls and links past the count bounds, counted.
    fn bound(&mut self, now: u64) {
        let (calls, links) = (self.calls_evicted, self.links_evicted);
        while self.calls.len() > self.limits.max_calls {
            let Some((_, call)) = self.call_order.pop_front() else {
                break;
            };
            self.forget(call);
            self.calls_evicted += 1;
        }
        while self.link_order.len() > self.limits.max_links {
            let Some((_, scope, id)) = self.link_order.pop_front() else {
                break;
            };
            self.links.remove(&(scope, id));
            self.links_evicted += 1;
        }
        if (self.calls_evicted > calls || self.links_evicted > links)
            && (self.last_warn_ns == 0 || now >= self.last_warn_ns.saturating_add(WARN_EVERY_NS))
        {
            self.last_warn_ns = now;
            warn!(
                calls_evicted = self.calls_evicted,
                links_evicted = self.links_evicted,
                max_calls = self.limits.max_calls,
                max_links = self.limits.max_links,
                "token dedupe full: calls or parent links forgotten before token_dedupe_window; \
                 a later duplicate of a forgotten call is billed again"
            );
        }
    }

    fn forget(&mut self, id: CallId) {
        let Some(call) = self.calls.remove(&id) else {
            return;
        };
        for (r, _) in &call.ids {
            if let Some(ids) = self.by_response.get_mut(&(call.scope, *r)) {
                ids.retain(|c| *c != id);
                if ids.is_empty() {
                    self.by_response.remove(&(call.scope, *r));
                }
            }
        }
        let key = (call.scope, call.input, call.output);
        if let Some(ids) = self.by_counts.get_mut(&key) {
            ids.retain(|c| *c != id);
            if ids.is_empty() {
                self.by_counts.remove(&key);
            }
        }
        if let Some(n) = self.scopes.get_mut(&call.scope) {
            *n -= 1;
            if *n == 0 {
                self.scopes.remove(&call.scope);
            }
        }
    }

    /// Calls and parent links remembered now.
    pub fn held(&self) -> (usize, usize) {
        (self.calls.len(), self.links.len())
    }

    /// The counters as (name, help, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "mentat_agent_duplicate_token_spans_total",
                "Token spans reporting an LLM call another span of the same process and trace reported first (two instrumentations of one call): their tokens were not billed again (README Tokens).",
                self.total.by_response_id + self.total.by_nesting,
            ),
            (
                "mentat_agent_duplicate_token_spans_response_id_total",
                "Of mentat_agent_duplicate_token_spans_total, those recognised by an equal gen_ai.response.id (and provider).",
                self.total.by_response_id,
            ),
            (
                "mentat_agent_duplicate_token_spans_nesting_total",
                "Of mentat_agent_duplicate_token_spans_total, those recognised by nesting: a descendant or ancestor span reporting the same input and output tokens, one of them without a response id.",
                self.total.by_nesting,
            ),
            (
                "mentat_agent_token_dedupe_calls_evicted_total",
                "LLM calls the token dedupe forgot before token_dedupe_window because max_token_dedupe_calls was reached: a later duplicate of one is billed again.",
                self.calls_evicted,
            ),
            (
                "mentat_agent_token_dedupe_links_evicted_total",
                "Parent links the token dedupe forgot before token_dedupe_window because max_token_dedupe_links was reached: a later duplicate nested through one is billed again.",
                self.links_evicted,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::spans::SpanTokens;

    const S: u64 = 1_000_000_000;
    const T0: u64 = 1_800_000_000 * S;
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";

    /// A span of `pid` in `TRACE`; ids are small numbers written as hex.
    fn span(pid: u32, id: u64, parent: Option<u64>) -> Span {
        Span {
            trace_id: TRACE.into(),
            span_id: format!("{id:016x}"),
            parent_span_id: parent.map(|p| format!("{p:016x}")),
            pid: Some(pid),
            ..Default::default()
        }
    }

    fn usage(mut s: Span, input: u64, output: u64, response: Option<&str>) -> Span {
        s.tokens = Some(SpanTokens {
            model: "gpt-4o-mini".into(),
            input,
            output,
            response_id: response.map(Into::into),
            provider: Some("openai".into()),
            ..Default::default()
        });
        s
    }

    /// The span ids that kept their tokens.
    fn billed(spans: &[Span]) -> Vec<String> {
        spans
            .iter()
            .filter(|s| s.tokens.is_some())
            .map(|s| s.span_id.trim_start_matches('0').to_string())
            .collect()
    }

    fn counter(d: &TokenDedupe, name: &str) -> u64 {
        d.counters()
            .into_iter()
            .find(|c| c.0 == name)
            .map(|c| c.2)
            .expect("counter")
    }

    #[test]
    fn one_response_id_is_billed_once_across_windows() {
        let mut d = TokenDedupe::default();
        // The official instrumentation's span (child, ends first) in one window,
        // OpenLLMetry's (its parent) in the next, with a total the other lacks.
        let mut w1 = vec![usage(span(7, 2, Some(1)), 100, 20, Some("chatcmpl-1"))];
        assert_eq!(d.apply(&mut w1, T0), Deduped::default());
        let mut w2 = vec![
            usage(span(7, 1, Some(9)), 100, 20, Some("chatcmpl-1")),
            // Another call of the same trace: its own id, billed.
            usage(span(7, 3, Some(9)), 100, 20, Some("chatcmpl-2")),
        ];
        let done = d.apply(&mut w2, T0 + S);
        assert_eq!(done.by_response_id, 1);
        assert_eq!(billed(&w1), ["2"]);
        assert_eq!(billed(&w2), ["3"]);
        assert_eq!(
            w2.len(),
            2,
            "a duplicate keeps its span, only its tokens go"
        );
        assert_eq!(counter(&d, "mentat_agent_duplicate_token_spans_total"), 1);
        // The same response id from another provider is another call.
        let mut other = usage(span(7, 4, None), 5, 5, Some("chatcmpl-1"));
        if let Some(t) = other.tokens.as_mut() {
            t.provider = Some("anthropic".into());
        }
        let mut w3 = vec![other];
        d.apply(&mut w3, T0 + 2 * S);
        assert_eq!(billed(&w3), ["4"]);
    }

    #[test]
    fn nesting_through_an_intermediate_span_is_one_call() {
        let mut d = TokenDedupe::default();
        // OpenInference's span 3 (no response id) under an intermediate span 2
        // (no usage) under the official span 1: the child first, the
        // intermediate and the parent in the next window, in that order.
        let mut w1 = vec![usage(span(7, 3, Some(2)), 100, 20, None)];
        d.apply(&mut w1, T0);
        let mut w2 = vec![
            usage(span(7, 1, Some(0xa)), 100, 20, Some("chatcmpl-1")),
            span(7, 2, Some(1)),
        ];
        let done = d.apply(&mut w2, T0 + S);
        assert_eq!(done.by_nesting, 1);
        assert_eq!(billed(&w1), ["3"]);
        assert!(billed(&w2).is_empty());
        // A third report (OpenLLMetry, above span 1, same response id) is
        // recognised through the id span 1 brought to the call.
        let mut w3 = vec![usage(span(7, 0xa, None), 100, 20, Some("chatcmpl-1"))];
        assert_eq!(d.apply(&mut w3, T0 + 2 * S).by_response_id, 1);
        assert!(billed(&w3).is_empty());
        assert_eq!(
            counter(&d, "mentat_agent_duplicate_token_spans_nesting_total"),
            1
        );
        assert_eq!(
            counter(&d, "mentat_agent_duplicate_token_spans_response_id_total"),
            1
        );
    }

    #[test]
    fn different_counts_siblings_and_two_response_ids_are_not_deduplicated() {
        let mut d = TokenDedupe::default();
        let mut w = vec![
            // A parent and child with other counts (an agent step summing two calls).
            usage(span(7, 1, None), 200, 40, None),
            usage(span(7, 2, Some(1)), 100, 20, None),
            usage(span(7, 3, Some(1)), 100, 20, None),
            // Nested, same counts, but two different response ids: two calls.
            usage(span(7, 4, None), 50, 5, Some("a")),
            usage(span(7, 5, Some(4)), 50, 5, Some("b")),
        ];
        d.apply(&mut w, T0);
        assert_eq!(billed(&w), ["1", "2", "3", "4", "5"]);
        assert_eq!(counter(&d, "mentat_agent_duplicate_token_spans_total"), 0);
    }

    #[test]
    fn different_processes_are_never_deduplicated() {
        let mut d = TokenDedupe::default();
        // Two processes with the same trace (one propagated it to the other)
        // and, improbably, the same response id and nesting.
        let mut w = vec![
            usage(span(7, 1, None), 100, 20, Some("chatcmpl-1")),
            usage(span(8, 2, Some(1)), 100, 20, Some("chatcmpl-1")),
            usage(span(8, 3, Some(2)), 100, 20, None),
        ];
        d.apply(&mut w, T0);
        assert_eq!(
            billed(&w),
            ["1", "2"],
            "span 3 is process 8's duplicate of 2"
        );
        // No pid: never deduplicated, never remembered.
        let mut none = vec![
            usage(span(7, 5, None), 1, 1, Some("x")),
            usage(span(7, 6, None), 1, 1, Some("x")),
        ];
        for s in &mut none {
            s.pid = None;
        }
        d.apply(&mut none, T0);
        assert_eq!(billed(&none), ["5", "6"]);
    }

    #[test]
    fn a_forged_trace_and_response_id_cannot_remove_another_process_tokens() {
        let mut d = TokenDedupe::default();
        // A hostile process (pid 66) learns a victim's (pid 7) trace id and the
        // response ids it will get, and sends spans naming them first, as
        // descendants and ancestors of the victim's span ids too.
        let mut w1 = vec![
            usage(span(66, 1, Some(2)), 100, 20, Some("chatcmpl-1")),
            usage(span(66, 2, None), 100, 20, None),
            usage(span(66, 0xb, Some(1)), 100, 20, None),
        ];
        d.apply(&mut w1, T0);
        let mut w2 = vec![
            usage(span(7, 1, Some(2)), 100, 20, Some("chatcmpl-1")),
            usage(span(7, 3, None), 100, 20, None),
        ];
        d.apply(&mut w2, T0 + S);
        assert_eq!(
            billed(&w2),
            ["1", "3"],
            "the victim's tokens are all billed"
        );
    }

    #[test]
    fn calls_are_forgotten_after_the_window_and_past_the_bound_counted() {
        let mut d = TokenDedupe::new(DedupeLimits {
            window: Duration::from_secs(60),
            max_calls: 3,
            max_links: 2,
        });
        let mut w = vec![usage(span(7, 1, None), 1, 1, Some("r1"))];
        d.apply(&mut w, T0);
        // Inside the window: recognised.
        let mut w = vec![usage(span(7, 2, None), 1, 1, Some("r1"))];
        d.apply(&mut w, T0 + 59 * S);
        assert!(billed(&w).is_empty());
        // After it: forgotten (not an eviction), billed again.
        let mut w = vec![usage(span(7, 3, None), 1, 1, Some("r1"))];
        d.apply(&mut w, T0 + 60 * S);
        assert_eq!(billed(&w), ["3"]);
        assert_eq!(
            counter(&d, "mentat_agent_token_dedupe_calls_evicted_total"),
            0
        );
        // Five new calls with links: two calls and three links over the bounds.
        let mut w: Vec<Span> = (0x10..0x15)
            .map(|i| usage(span(7, i, Some(i + 0x100)), 1, 1, Some(&format!("n{i}"))))
            .collect();
        d.apply(&mut w, T0 + 61 * S);
        assert_eq!(d.held(), (3, 2));
        assert_eq!(
            counter(&d, "mentat_agent_token_dedupe_calls_evicted_total"),
            3
        );
        assert_eq!(
            counter(&d, "mentat_agent_token_dedupe_links_evicted_total"),
            3
        );
        // The oldest were forgotten, the newest are still recognised.
        let mut w = vec![
            usage(span(7, 0x20, None), 1, 1, Some("n16")),
            usage(span(7, 0x21, None), 1, 1, Some("n20")),
        ];
        d.apply(&mut w, T0 + 62 * S);
        assert_eq!(billed(&w), ["20"]);
    }
}
