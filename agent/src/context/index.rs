//! Spans received, indexed by process, and the rule that shares a
//! process's time between the runs whose spans cover it.
//!
//! For a process's usage in one window: usage is taken as spread evenly over
//! the part of the window the process was alive (from its start or the
//! window's, to its exit or the window's end); each instant of that belongs
//! to the runs whose spans (of that process) cover it, shared equally when
//! several do; instants no span covers belong to the process's environment
//! context (or to no run). Within one trace only the innermost spans
//! covering an instant count, filled from the spans around them (a call
//! inside an agent's span is that agent's; see `nest_within_traces`). Each
//! run gets the fraction ([`Share`]) it owns, in
//! parts per [`SCALE`] that sum to it exactly; `report::split` divides the
//! quantities by them.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
};

use crate::{
    context::{binding::ProcessBindings, spans::Span},
    identity::run::RunContext,
};

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

/// What the split needs of a span: when, for which run, and whose it is
/// (the key its sender's quota is counted under).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Interval {
    start_unix_ns: u64,
    end_unix_ns: u64,
    context: Arc<RunContext>,
    owner: u64,
}

/// Spans received, indexed by process, kept until they can no longer matter.
///
/// Unbounded by itself: what may enter is decided before a span is
/// acknowledged (the daemon's span inbox, with `max_indexed_spans` and the
/// per-sender quota), so an acknowledged span is never dropped here.
#[derive(Clone, Debug, Default)]
pub struct SpanIndex {
    by_pid: HashMap<u32, Vec<Interval>>,
    len: usize,
    /// Spans per owner (a sender's quota key).
    per_owner: HashMap<u64, usize>,
    /// Each distinct run context once: a trace's spans share one (an
    /// indexed span then costs its 32-byte interval, not its context).
    contexts: HashSet<Arc<RunContext>>,
    /// Resource-level run contexts (set on a window's snapshot).
    bindings: ProcessBindings,
}

impl SpanIndex {
    /// Whether `span` is one the split uses: it names its process, carries a
    /// run or an agent (a flow instrumented only with the GenAI conventions
    /// names agents, not runs), and lasts some time.
    pub fn indexable(span: &Span) -> bool {
        span.pid.is_some()
            && (span.context.run_id.is_some() || span.context.agent_id.is_some())
            && span.end_unix_ns > span.start_unix_ns
    }

    /// Adds a span that names its process and carries a run, under owner 0;
    /// false when the span is not one the split uses.
    pub fn add(&mut self, span: &Span) -> bool {
        self.add_owned(span, 0)
    }

    /// Adds a span counted against `owner`'s quota; false when the span is
    /// not one the split uses (nothing is added).
    pub fn add_owned(&mut self, span: &Span, owner: u64) -> bool {
        let Some(pid) = span.pid.filter(|_| Self::indexable(span)) else {
            return false;
        };
        let context = match self.contexts.get(&span.context) {
            Some(c) => c.clone(),
            None => {
                let c = Arc::new(span.context.clone());
                self.contexts.insert(c.clone());
                c
            }
        };
        self.insert(
            pid,
            Interval {
                start_unix_ns: span.start_unix_ns,
                end_unix_ns: span.end_unix_ns,
                context,
                owner,
            },
        );
        true
    }

    fn insert(&mut self, pid: u32, interval: Interval) {
        self.len += 1;
        *self.per_owner.entry(interval.owner).or_default() += 1;
        self.by_pid.entry(pid).or_default().push(interval);
    }

    /// Spans in the index.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index holds no span.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Spans in the index counted against `owner`.
    pub fn owned_by(&self, owner: u64) -> usize {
        self.per_owner.get(&owner).copied().unwrap_or(0)
    }

    /// Drops spans that ended before `before_unix_ns` (windows up to it are closed).
    pub fn forget_before(&mut self, before_unix_ns: u64) {
        let mut len = 0;
        let per_owner = &mut self.per_owner;
        self.by_pid.retain(|_, spans| {
            spans.retain(|s| {
                let keep = s.end_unix_ns >= before_unix_ns;
                if !keep && let Some(n) = per_owner.get_mut(&s.owner) {
                    *n -= 1;
                }
                keep
            });
            len += spans.len();
            !spans.is_empty()
        });
        per_owner.retain(|_, n| *n > 0);
        // A context only this set still holds belongs to no span left (a
        // window's snapshot is dropped before the next window is taken).
        self.contexts.retain(|c| Arc::strong_count(c) > 1);
        self.len = len;
    }

    /// The spans that touch `[from, to]` (Unix ns): all that a split of
    /// that window reads, in one linear pass, so the split itself can run
    /// without the lock the index lives under.
    pub fn window(&self, from: u64, to: u64) -> SpanIndex {
        let mut out = SpanIndex::default();
        for (&pid, spans) in &self.by_pid {
            for s in spans {
                if s.start_unix_ns < to && s.end_unix_ns > from {
                    out.insert(pid, s.clone());
                }
            }
        }
        out
    }

    /// Attaches the processes' resource-level bindings to this snapshot.
    pub fn with_bindings(mut self, bindings: ProcessBindings) -> Self {
        self.bindings = bindings;
        self
    }

    /// The resource-level bindings on this snapshot (a window's split adds
    /// the bound processes' descendants to it).
    pub fn bindings_mut(&mut self) -> &mut ProcessBindings {
        &mut self.bindings
    }

    /// Instance (`pid`, `start_ns`)'s own context at `at_unix_ns`: the run
    /// its resource bound it to (`context::binding`), filled from its
    /// environment's `env`; else `env`.
    pub fn own_context<'a>(
        &self,
        pid: u32,
        start_ns: u64,
        at_unix_ns: u64,
        env: &'a RunContext,
    ) -> Cow<'a, RunContext> {
        match self.bindings.context_at(pid, start_ns, at_unix_ns) {
            Some(bound) => {
                let mut ctx = bound.clone();
                ctx.inherit(env);
                Cow::Owned(ctx)
            }
            None => Cow::Borrowed(env),
        }
    }

    /// How process `pid`'s usage in `[start, end)` (Unix ns) splits between
    /// runs, by the module's rule; `own` is the process's environment context.
    ///
    /// One sweep over the span boundaries: O(k log k) for the k spans of
    /// `pid` that touch the window. Every run covering a stretch gets the
    /// same amount of it, so a running sum of those amounts, read when a run
    /// starts and stops covering, gives each run its total without visiting
    /// the runs of every stretch.
    pub fn shares(&self, pid: u32, start: u64, end: u64, own: &RunContext) -> Vec<Share> {
        let whole = || {
            vec![Share {
                context: own.clone(),
                parts: SCALE,
            }]
        };
        let Some(spans) = self.by_pid.get(&pid) else {
            return whole();
        };
        if end <= start {
            return whole();
        }
        // Each span as the piece of the window it covers, its run context
        // (filled from the process's) numbered once per distinct value.
        let mut ids: BTreeMap<RunContext, usize> = BTreeMap::new();
        let mut events: Vec<(u64, bool, usize)> = Vec::new();
        let mut cuts: Vec<u64> = vec![start, end];
        let pieces: Vec<Piece> = spans
            .iter()
            .filter_map(|s| {
                let (a, b) = (s.start_unix_ns.max(start), s.end_unix_ns.min(end));
                (a < b).then_some(Piece {
                    from: a,
                    to: b,
                    span: (s.start_unix_ns, s.end_unix_ns),
                    context: Cow::Borrowed(&*s.context),
                })
            })
            .collect();
        for p in nest_within_traces(pieces) {
            let (a, b) = (p.from, p.to);
            let mut ctx = p.context.into_owned();
            ctx.inherit(own);
            let next = ids.len();
            let id = *ids.entry(ctx).or_insert(next);
            // Ends sort before starts at one instant: a run leaving and
            // re-entering there stays covered without a gap.
            events.push((a, true, id));
            events.push((b, false, id));
            cuts.extend([a, b]);
        }
        cuts.sort_unstable();
        cuts.dedup();
        events.sort_unstable_by_key(|&(t, starts, _)| (t, starts));
        let n = ids.len();
        let (mut covering, mut entered, mut total) =
            (vec![0u32; n], vec![0u128; n], vec![0u128; n]);
        let mut distinct = 0u128;
        let mut running = 0u128;
        let mut own_scaled: Option<u128> = None;
        let mut e = 0;
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            while let Some(&(t, starts, id)) = events.get(e).filter(|ev| ev.0 <= a) {
                debug_assert_eq!(t, a);
                if starts {
                    if covering[id] == 0 {
                        distinct += 1;
                        entered[id] = running;
                    }
                    covering[id] += 1;
                } else {
                    covering[id] -= 1;
                    if covering[id] == 0 {
                        distinct -= 1;
                        total[id] += running - entered[id];
                    }
                }
                e += 1;
            }
            let piece = u128::from(b - a) * u128::from(SCALE);
            match piece.checked_div(distinct) {
                Some(each) => running += each,
                None => *own_scaled.get_or_insert(0) += piece,
            }
        }
        // Every span ends at or before `end`, the last cut: close them.
        for &(_, starts, id) in &events[e..] {
            if !starts {
                covering[id] -= 1;
                if covering[id] == 0 {
                    total[id] += running - entered[id];
                }
            }
        }
        let mut ns_by_ctx: BTreeMap<RunContext, u128> = BTreeMap::new();
        if let Some(scaled) = own_scaled {
            *ns_by_ctx.entry(own.clone()).or_default() += scaled;
        }
        for (ctx, id) in ids {
            *ns_by_ctx.entry(ctx).or_default() += total[id];
        }
        largest_remainder(ns_by_ctx, u128::from(end - start))
    }
}

/// A span's part of a window, with its whole extent (what nesting is judged by).
struct Piece<'a> {
    from: u64,
    to: u64,
    span: (u64, u64),
    context: Cow<'a, RunContext>,
}

/// Spans of one trace (and one process) more than this in a window are
/// taken as they are, unnested: the nesting below is quadratic in them.
const MAX_NESTED: usize = 64;

/// Within one trace, at each instant only the innermost spans count (those
/// whose extent contains no other covering span of the trace), each filled
/// from the spans around it, innermost first: an LLM call or a tool inside
/// an `invoke_agent` span is that agent's, a sub-agent's span is the
/// sub-agent's, not shared with its parent's, and parallel siblings share.
/// Across traces (and for a trace whose spans carry one context) the rule
/// of the module holds unchanged.
fn nest_within_traces(pieces: Vec<Piece<'_>>) -> Vec<Piece<'_>> {
    let mut by_trace: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    let mut keep = vec![false; pieces.len()];
    for (i, p) in pieces.iter().enumerate() {
        match p.context.trace_id.as_deref() {
            Some(t) => by_trace.entry(t).or_default().push(i),
            None => keep[i] = true,
        }
    }
    let mut nested: Vec<Piece<'_>> = Vec::new();
    for idx in by_trace.values() {
        let first = &pieces[idx[0]].context;
        if idx.len() > MAX_NESTED || idx.iter().all(|&i| pieces[i].context == *first) {
            idx.iter().for_each(|&i| keep[i] = true);
            continue;
        }
        let mut cuts: Vec<u64> = idx
            .iter()
            .flat_map(|&i| [pieces[i].from, pieces[i].to])
            .collect();
        cuts.sort_unstable();
        cuts.dedup();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let active: Vec<&Piece<'_>> = idx
                .iter()
                .map(|&i| &pieces[i])
                .filter(|p| p.from <= a && p.to >= b)
                .collect();
            let within =
                |inner: (u64, u64), outer: (u64, u64)| inner.0 >= outer.0 && inner.1 <= outer.1;
            for (li, leaf) in active.iter().enumerate() {
                let inner = active
                    .iter()
                    .enumerate()
                    .any(|(j, p)| j != li && p.span != leaf.span && within(p.span, leaf.span));
                if inner {
                    continue;
                }
                let mut around: Vec<&&Piece<'_>> = active
                    .iter()
                    .enumerate()
                    .filter(|&(j, p)| j != li && within(leaf.span, p.span))
                    .map(|(_, p)| p)
                    .collect();
                // Innermost first: the latest start, then the earliest end.
                around.sort_by_key(|p| (std::cmp::Reverse(p.span.0), p.span.1));
                let mut ctx = leaf.context.clone().into_owned();
                for p in around {
                    ctx.inherit(&p.context);
                }
                nested.push(Piece {
                    from: a,
                    to: b,
                    span: leaf.span,
                    context: Cow::Owned(ctx),
                });
            }
        }
    }
    let mut out: Vec<Piece<'_>> = pieces
        .into_iter()
        .zip(keep)
        .filter_map(|(p, k)| k.then_some(p))
        .collect();
    out.extend(nested);
    out
}

/// Time per context (ns × SCALE) to parts per SCALE, by largest remainder so
/// they sum to SCALE exactly; contexts left with no part are dropped.
fn largest_remainder(ns_by_ctx: BTreeMap<RunContext, u128>, len: u128) -> Vec<Share> {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::report::split::split_u64;

    /// A span of `pid` for run `run` over [start, end].
    pub(crate) fn span(pid: u32, run: &str, start: u64, end: u64) -> Span {
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
    fn within_a_trace_the_innermost_spans_count_filled_from_those_around() {
        let traced = |run: &str, agent: Option<&str>, start: u64, end: u64| {
            let mut s = span(7, run, start, end);
            s.context.trace_id = Some("t1".into());
            s.context.agent_id = agent.map(str::to_string);
            s
        };
        let mut idx = SpanIndex::default();
        // [0, 100): invoke_agent tutor over [0, 100); inside it an LLM call
        // [10, 40) naming no agent, and sub-agent `critic` over [50, 90), with
        // two parallel tool calls [60, 80) and [70, 85) inside it.
        idx.add(&traced("R", Some("tutor"), 0, 100));
        idx.add(&traced("R", None, 10, 40));
        idx.add(&traced("R", Some("critic"), 50, 90));
        idx.add(&traced("R", None, 60, 80));
        idx.add(&traced("R", None, 70, 85));
        let shares = idx.shares(7, 0, 100, &RunContext::default());
        let of = |agent: &str| {
            shares
                .iter()
                .filter(|s| s.context.agent_id.as_deref() == Some(agent))
                .map(|s| s.parts)
                .sum::<u64>()
        };
        // tutor: all but the sub-agent's 40; critic: its 40, the tools in it included.
        assert_eq!(of("tutor"), SCALE / 100 * 60, "{shares:?}");
        assert_eq!(of("critic"), SCALE / 100 * 40, "{shares:?}");
        assert_eq!(shares.len(), 2, "no share without an agent: {shares:?}");
        // Another trace's span in the same process still shares equally.
        let mut other = span(7, "S", 0, 100);
        other.context.trace_id = Some("t2".into());
        idx.add(&other);
        let shares = idx.shares(7, 0, 100, &RunContext::default());
        let s_parts: u64 = shares
            .iter()
            .filter(|s| s.context.run_id.as_deref() == Some("S"))
            .map(|s| s.parts)
            .sum();
        assert_eq!(s_parts, SCALE / 2, "{shares:?}");
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

    /// The split as first written: for each stretch between two boundaries,
    /// every span tested for cover (cuts × spans). The reference the sweep
    /// in `SpanIndex::shares` must equal exactly.
    fn shares_by_scan(
        spans: &[(u64, u64, RunContext)],
        start: u64,
        end: u64,
        own: &RunContext,
    ) -> Vec<Share> {
        if end <= start {
            return vec![Share {
                context: own.clone(),
                parts: SCALE,
            }];
        }
        let mut cuts: Vec<u64> = vec![start, end];
        for (s, e, _) in spans {
            for t in [*s, *e] {
                if t > start && t < end {
                    cuts.push(t);
                }
            }
        }
        cuts.sort_unstable();
        cuts.dedup();
        let mut ns_by_ctx: BTreeMap<RunContext, u128> = BTreeMap::new();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let mut covering: Vec<RunContext> = spans
                .iter()
                .filter(|(s, e, _)| *s <= a && *e >= b)
                .map(|(_, _, c)| {
                    let mut ctx = c.clone();
                    ctx.inherit(own);
                    ctx
                })
                .collect();
            covering.sort();
            covering.dedup();
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
        largest_remainder(ns_by_ctx, u128::from(end - start))
    }

    #[test]
    fn the_sweep_splits_exactly_as_the_scan_on_random_spans() {
        // xorshift: reproducible, and no dependency for one test.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let runs = ["A", "B", "C", "D", "env"];
        for case in 0..3000 {
            // Small coordinates so boundaries coincide often; some cases wide.
            let scale = if case % 5 == 0 { 1_000_000_007 } else { 40 };
            let (start, end) = (next(scale), next(scale));
            let own = RunContext {
                run_id: (next(2) == 0).then(|| "env".into()),
                customer_id: (next(3) == 0).then(|| "acme".into()),
                ..Default::default()
            };
            let mut idx = SpanIndex::default();
            let mut plain = Vec::new();
            for _ in 0..next(12) {
                let (a, b) = (next(scale + 10), next(scale + 10));
                let (a, b) = (a.min(b), a.max(b));
                let mut s = span(7, runs[next(5) as usize], a, b);
                if next(4) == 0 {
                    s.context.customer_id = Some("other".into());
                }
                if idx.add(&s) {
                    plain.push((a, b, s.context.clone()));
                }
                // Another process's spans never count.
                idx.add(&span(8, "B", 0, scale + 10));
            }
            let want = shares_by_scan(&plain, start, end, &own);
            let got = idx.shares(7, start, end, &own);
            assert_eq!(
                got, want,
                "case {case}: window [{start}, {end}), spans {plain:?}"
            );
            // The window's snapshot splits the same, without the index.
            let lo = start.min(end);
            let snap = idx.window(lo, end.max(lo));
            assert_eq!(
                snap.shares(7, start, end, &own),
                want,
                "case {case}: snapshot"
            );
        }
    }

    #[test]
    fn many_overlapping_spans_split_forget_and_share_contexts() {
        // 20,000 overlapping spans of one process in one window, 50 runs.
        let mut idx = SpanIndex::default();
        for i in 0..20_000u64 {
            idx.add(&span(7, &format!("r{}", i % 50), i, i + 10_000));
        }
        assert_eq!(idx.contexts.len(), 50, "one context per distinct run");
        let shares = idx.shares(7, 0, 30_000, &RunContext::default());
        assert_eq!(shares.iter().map(|s| s.parts).sum::<u64>(), SCALE);
        // 50 runs, and the process's own context for the last 1 ns no span covers.
        assert_eq!(shares.len(), 51);
        assert_eq!(idx.len(), 20_000);
        idx.forget_before(29_995);
        assert_eq!(idx.len(), 5);
        assert_eq!(idx.owned_by(0), 5);
        assert_eq!(idx.contexts.len(), 5, "contexts of forgotten spans go");
    }
}
