//! Span intake: what a received span must satisfy before the receiver
//! acknowledges it, and the bounded inbox it then waits in for its windows.
//!
//! Invariants:
//! - **Admission before acknowledgement.** The receiver hands each request's
//!   spans to a [`SpanSink`] and learns how many were taken; what was not is
//!   reported to the sender in the same response (OTLP `partial_success`, or
//!   a retryable status when nothing fit). A span the sink took is kept: its
//!   token record and per-run row are written with the next window, and it
//!   is used to split every window it covers that is not yet split. Nothing
//!   after admission drops a span.
//! - **Times are checked at receipt** ([`check_time`]): a span's start and
//!   end are nonzero Unix ns within the range of an `i64` (years 1970–2262),
//!   end ≥ start, neither further ahead than `max_clock_skew`, the span no
//!   longer than `max_span_duration`, and it started no longer ago than
//!   `max_span_age`, which config validation keeps inside `raw_retention`
//!   minus `span_lag` and two ticks, so a token record (whose window starts
//!   at its span's start) never lands before the ledger's compaction
//!   watermark.
//! - **Bounds are the configured ones** ([`InboxLimits`]): at most
//!   `max_pending_spans` spans wait for their window, at most
//!   `max_indexed_spans` spans with a run are indexed for the split, and one
//!   sender (a bound process) holds at most `max_indexed_spans_per_process`
//!   of those. Indexed spans leave once every window they touch is split,
//!   which the time checks bound to `max_clock_skew + span_lag + tick` after
//!   receipt.
//! - **The split runs outside the lock.** [`SpanInbox::take_window`] copies
//!   the spans touching one window (one linear pass) and the spans new since
//!   the last window under the lock; the split itself reads the copy.

use std::{
    collections::HashMap,
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    context::binding::ProcessBindings,
    context::dedupe::{DedupeLimits, TokenDedupe},
    context::index::SpanIndex,
    context::lineage::{AgentLineage, LineageLimits},
    context::spans::{PidScope, Span},
};

/// How far a span's times may be from the agent's clock (`[receiver]` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeLimits {
    /// How far ahead of the agent's clock a start or end may be.
    pub max_clock_skew: Duration,
    /// The longest span taken.
    pub max_span_duration: Duration,
    /// How long ago a span may have started.
    pub max_span_age: Duration,
}

/// Why a span's times were refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeRefusal {
    /// A start or end of 0, or past year 2262 (`i64::MAX` ns).
    #[error("a start or end time of 0 or past year 2262")]
    OutOfRange,
    /// End before start.
    #[error("an end before its start")]
    EndBeforeStart,
    /// Start or end further ahead than `max_clock_skew`.
    #[error("a start or end further in the future than max_clock_skew")]
    Future,
    /// Longer than `max_span_duration`.
    #[error("a duration over max_span_duration")]
    TooLong,
    /// Started longer ago than `max_span_age`.
    #[error("a start longer ago than max_span_age")]
    TooOld,
}

impl TimeRefusal {
    /// Every reason, in the order counters are kept.
    pub const ALL: [TimeRefusal; 5] = [
        TimeRefusal::OutOfRange,
        TimeRefusal::EndBeforeStart,
        TimeRefusal::Future,
        TimeRefusal::TooLong,
        TimeRefusal::TooOld,
    ];

    /// This reason's slot in [`TimeRefusal::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether a span of `[start, end]` (Unix ns) received at `now` is taken.
pub fn check_time(start: u64, end: u64, now: u64, limits: &TimeLimits) -> Result<(), TimeRefusal> {
    let ns = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    let max = i64::MAX as u64;
    if start == 0 || end == 0 || start > max || end > max {
        return Err(TimeRefusal::OutOfRange);
    }
    if end < start {
        return Err(TimeRefusal::EndBeforeStart);
    }
    if end > now.saturating_add(ns(limits.max_clock_skew)) {
        return Err(TimeRefusal::Future);
    }
    if end - start > ns(limits.max_span_duration) {
        return Err(TimeRefusal::TooLong);
    }
    if start < now.saturating_sub(ns(limits.max_span_age)) {
        return Err(TimeRefusal::TooOld);
    }
    Ok(())
}

/// What a [`SpanSink`] did with a batch of spans.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Admission {
    /// Spans taken (and from now on kept).
    pub accepted: u64,
    /// Spans refused because a bound was reached.
    pub full: u64,
    /// Spans refused because their sender's quota was reached.
    pub over_quota: u64,
}

/// Where the receiver puts the spans of a request before it answers.
pub trait SpanSink: Send + Sync {
    /// Takes what fits of `spans`, never waiting for room.
    fn admit(&self, spans: Vec<Span>) -> Admission;
}

/// A channel as a sink (the receiver's own tests, and callers that consume
/// spans themselves): a span is taken when the channel has room.
impl SpanSink for mpsc::Sender<Span> {
    fn admit(&self, spans: Vec<Span>) -> Admission {
        let mut a = Admission::default();
        for span in spans {
            if self.try_send(span).is_ok() {
                a.accepted += 1;
            } else {
                a.full += 1;
            }
        }
        a
    }
}

/// A shared sink (the daemon keeps the inbox the receiver fills).
impl<T: SpanSink + ?Sized> SpanSink for std::sync::Arc<T> {
    fn admit(&self, spans: Vec<Span>) -> Admission {
        (**self).admit(spans)
    }
}

/// The inbox's bounds (`[receiver]` keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InboxLimits {
    /// Spans waiting for their window (their token records and rows).
    pub max_pending: usize,
    /// Spans with a run indexed for the split.
    pub max_indexed: usize,
    /// Indexed spans of one sender.
    pub max_indexed_per_sender: usize,
}

/// Spans received and not yet handed to a window, behind one lock.
#[derive(Debug)]
pub struct SpanInbox {
    limits: InboxLimits,
    state: Mutex<Inbox>,
}

#[derive(Debug, Default)]
struct Inbox {
    index: SpanIndex,
    /// Processes bound to a run by their resource (`context::binding`).
    bindings: ProcessBindings,
    /// Spans since the last window: their token records and per-run rows.
    new: Vec<Span>,
    /// Spans whose pid is a container's, waiting for the collector to map it
    /// to the host's (it knows each process's container and namespace pid),
    /// with the owner their quota is counted under.
    unmapped: Vec<(Span, u64)>,
    /// Unmapped spans out for mapping: their slots stay taken.
    mapping: usize,
    /// Spans handed to windows not yet committed (their token records and
    /// rows are in memory until then): they count against `max_pending`.
    in_flight: usize,
    /// Index slots held for unmapped spans with a run, in all and per owner.
    reserved: usize,
    reserved_by_owner: HashMap<u64, usize>,
    /// Unix ns up to which windows have been split.
    split_through: u64,
    /// Spans received after a window they cover was split.
    late: u64,
    /// Spans whose container pid matched no process, or several.
    unmapped_pids: u64,
    /// Malformed `TRACEPARENT` values seen in environments so far.
    bad_traceparents: u64,
    /// Times the lock was found poisoned (a panic while it was held).
    poisoned: u64,
    /// One LLM call's tokens once: applied to the spans a window takes.
    dedupe: TokenDedupe,
    /// Token spans waiting for the agent span around them.
    lineage: AgentLineage,
}

impl Inbox {
    /// Spans held for their window: new, unmapped, and taken but not committed.
    fn waiting(&self) -> usize {
        self.new.len()
            + self.unmapped.len()
            + self.mapping
            + self.in_flight
            + self.lineage.waiting()
    }
}

/// The quota key of a span: the process the kernel says sent it, so one
/// sender cannot take the index however many pids it names; for a trusted
/// forwarder, which sends for many processes, the process the span binds
/// (the claimed pid within its container or pod, for a span that names one).
fn owner_of(span: &Span) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match span.sender.filter(|s| !s.trusted) {
        Some(sender) => (sender.pid, sender.start_ns).hash(&mut h),
        None => {
            span.pid.hash(&mut h);
            span.pid_scope.hash(&mut h);
        }
    }
    h.finish()
}

impl SpanInbox {
    /// An empty inbox with these bounds.
    pub fn new(limits: InboxLimits) -> Self {
        Self {
            limits,
            state: Mutex::new(Inbox::default()),
        }
    }

    /// The state; a panic elsewhere while it was held leaves it consistent
    /// (every update is a push or a counter), so it is used on, and counted.
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        match self.state.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                g.poisoned += 1;
                self.state.clear_poison();
                g
            }
        }
    }

    /// This inbox, its token spans waiting for their agent spans within `limits`.
    pub fn with_lineage(self, limits: LineageLimits) -> Self {
        self.lock().lineage = AgentLineage::new(limits);
        self
    }

    /// This inbox, its token dedupe bounded by `limits`.
    pub fn with_dedupe(self, limits: DedupeLimits) -> Self {
        self.lock().dedupe = TokenDedupe::new(limits);
        self
    }

    /// Maps the held container pids to host pids with `host_pid` (outside
    /// the lock), then takes what one window `[from, to]` (Unix ns) needs:
    /// the indexed spans touching it and the spans new since the last
    /// window, the tokens of an LLM call reported before removed
    /// (`dedupe`). Spans that ended before `from` leave the index (windows go
    /// out in order, so they touch no later window).
    pub fn take_window(
        &self,
        from: u64,
        to: u64,
        mut host_pid: impl FnMut(u32, &PidScope) -> Option<u32>,
    ) -> (SpanIndex, Vec<Span>) {
        let held = {
            let mut st = self.lock();
            let held = std::mem::take(&mut st.unmapped);
            st.mapping = held.len();
            held
        };
        // Spans of one process come in batches: map each (pid, scope) once.
        let mut mapped: HashMap<(u32, PidScope), Option<u32>> = HashMap::new();
        let held: Vec<(Span, u64, bool)> = held
            .into_iter()
            .map(|(mut s, owner)| {
                let reserved = SpanIndex::indexable(&s);
                let scope = s.pid_scope.take().unwrap_or_default();
                s.pid = s.pid.and_then(|p| {
                    *mapped
                        .entry((p, scope.clone()))
                        .or_insert_with(|| host_pid(p, &scope))
                });
                (s, owner, reserved)
            })
            .collect();
        let mut st = self.lock();
        st.mapping = 0;
        for (mut s, owner, reserved) in held {
            if reserved {
                st.reserved -= 1;
                if let Some(n) = st.reserved_by_owner.get_mut(&owner) {
                    *n -= 1;
                    if *n == 0 {
                        st.reserved_by_owner.remove(&owner);
                    }
                }
            }
            if s.pid.is_none() {
                st.unmapped_pids += 1;
                // A claim the collector could not map binds the sender's own process.
                s.pid = crate::context::sender::unmapped_fallback(&s);
            }
            if s.pid.is_some() && reserved {
                // Its slot was held since admission: it always fits.
                st.index.add_owned(&s, owner);
            }
            st.bindings.bind(&s);
            st.new.push(s);
        }
        let snapshot = st.index.window(from, to).with_bindings(st.bindings.clone());
        st.index.forget_before(from);
        st.split_through = st.split_through.max(to);
        let mut new = std::mem::take(&mut st.new);
        st.dedupe.apply(&mut new, to);
        let now_unix = crate::probes::clock::unix_ns(std::time::SystemTime::now());
        let new = st.lineage.apply(new, std::time::Instant::now(), now_unix);
        st.in_flight += new.len();
        (snapshot, new)
    }

    /// Drops the resource-level bindings of processes gone (`alive` says
    /// whether (pid, start) still runs) that no window from `split_from` on
    /// can hold; see [`ProcessBindings::forget_gone`].
    pub fn forget_gone_bindings(
        &self,
        now_unix_ns: u64,
        split_from: u64,
        alive: impl Fn(u32, Option<u64>) -> bool,
    ) {
        self.lock()
            .bindings
            .forget_gone(now_unix_ns, split_from, alive);
    }

    /// `n` spans taken by [`SpanInbox::take_window`] are committed (or their
    /// window is given up): their slots are free.
    pub fn release(&self, n: usize) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(n);
    }

    /// Holds the slots of `n` spans taken by [`SpanInbox::take_window`] until
    /// the returned guard is dropped (their window committed, or given up),
    /// so records waiting to be committed count against `max_pending_spans`.
    pub fn hold(self: &Arc<Self>, n: usize) -> HeldSpans {
        HeldSpans(self.clone(), n)
    }

    /// Records the count of malformed `TRACEPARENT`s the collector saw.
    pub fn set_bad_traceparents(&self, n: u64) {
        self.lock().bad_traceparents = n;
    }

    /// Spans waiting for their window, and spans indexed (with held slots).
    pub fn held(&self) -> (usize, usize) {
        let st = self.lock();
        (st.waiting(), st.index.len() + st.reserved)
    }

    /// The counters as (name, help, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let st = self.lock();
        let mut c = vec![
            (
                "mentat_agent_span_pids_unmapped_total",
                "Spans naming a pid in a container (container.id or k8s.pod.uid) that matched no process there, or several: they bind no process's usage.",
                st.unmapped_pids,
            ),
            (
                "mentat_agent_bad_traceparents_total",
                "Malformed TRACEPARENT values in process environments (ignored).",
                st.bad_traceparents,
            ),
            (
                "mentat_agent_spans_late_total",
                "Spans with a run received after a window they cover was split (span_lag had passed): that window's usage stayed with the process's own context; the span's tokens and row are kept.",
                st.late,
            ),
            (
                "mentat_agent_process_bindings_refused_total",
                "Resource-level run contexts not bound to their process: 65,536 processes or 16 contexts per process were bound already (that process's time outside its spans stays with its environment's context).",
                st.bindings.refused(),
            ),
            (
                "mentat_agent_span_inbox_poisoned_total",
                "Times the span inbox's lock was found poisoned by a panic; the inbox was used on.",
                st.poisoned,
            ),
        ];
        c.extend(st.dedupe.counters());
        c.extend(st.lineage.counters());
        c
    }
}

impl SpanSink for SpanInbox {
    fn admit(&self, spans: Vec<Span>) -> Admission {
        let limits = self.limits;
        let mut a = Admission::default();
        let mut st = self.lock();
        for span in spans {
            if st.waiting() >= limits.max_pending {
                a.full += 1;
                continue;
            }
            let indexed = SpanIndex::indexable(&span);
            let owner = owner_of(&span);
            if indexed {
                if st.index.len() + st.reserved >= limits.max_indexed {
                    a.full += 1;
                    continue;
                }
                let held = st.index.owned_by(owner)
                    + st.reserved_by_owner.get(&owner).copied().unwrap_or(0);
                if held >= limits.max_indexed_per_sender {
                    a.over_quota += 1;
                    continue;
                }
                if span.start_unix_ns < st.split_through {
                    st.late += 1;
                }
            }
            // Tokens and per-run rows need ids, times, context and tokens
            // only: the attribute map is most of a span's size.
            let span = Span {
                attributes: Default::default(),
                ..span
            };
            if span.pid_scope.is_some() {
                if indexed {
                    st.reserved += 1;
                    *st.reserved_by_owner.entry(owner).or_default() += 1;
                }
                st.unmapped.push((span, owner));
            } else {
                if indexed {
                    st.index.add_owned(&span, owner);
                }
                st.bindings.bind(&span);
                st.new.push(span);
            }
            a.accepted += 1;
        }
        a
    }
}

/// Inbox slots of spans taken for a window; freed on drop.
#[derive(Debug)]
pub struct HeldSpans(Arc<SpanInbox>, usize);

impl Drop for HeldSpans {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::run::RunContext;

    const S: u64 = 1_000_000_000;
    const NOW: u64 = 1_800_000_000 * S;

    fn limits() -> TimeLimits {
        TimeLimits {
            max_clock_skew: Duration::from_secs(60),
            max_span_duration: Duration::from_secs(1800),
            max_span_age: Duration::from_secs(1800),
        }
    }

    #[test]
    fn span_times_are_checked_against_the_clock() {
        let l = limits();
        let ok = |a, b| check_time(a, b, NOW, &l);
        assert_eq!(ok(NOW - S, NOW), Ok(()));
        assert_eq!(ok(NOW, NOW), Ok(()), "a zero-length span is a span");
        assert_eq!(ok(NOW + 59 * S, NOW + 60 * S), Ok(()), "within the skew");
        assert_eq!(
            ok(NOW - 1800 * S, NOW),
            Ok(()),
            "exactly the age and length"
        );
        assert_eq!(ok(0, NOW), Err(TimeRefusal::OutOfRange));
        assert_eq!(ok(NOW, 0), Err(TimeRefusal::OutOfRange));
        assert_eq!(ok(NOW, u64::MAX), Err(TimeRefusal::OutOfRange));
        assert_eq!(ok(NOW, NOW - 1), Err(TimeRefusal::EndBeforeStart));
        assert_eq!(ok(NOW, NOW + 61 * S), Err(TimeRefusal::Future));
        // Year 2554, as in the issue: past any i64 time.
        assert_eq!(ok(NOW, 18_000_000_000 * S), Err(TimeRefusal::OutOfRange));
        assert_eq!(ok(NOW, NOW + 3600 * S), Err(TimeRefusal::Future));
        assert_eq!(ok(NOW - 1801 * S, NOW), Err(TimeRefusal::TooLong));
        let short = TimeLimits {
            max_span_duration: Duration::from_secs(3600 * 4),
            ..l
        };
        // The issue's span: started 3 hours ago.
        assert_eq!(
            check_time(NOW - 3 * 3600 * S, NOW - 3 * 3600 * S + S, NOW, &short),
            Err(TimeRefusal::TooOld)
        );
    }

    fn run_span(pid: u32, run: &str, start: u64, end: u64) -> Span {
        Span {
            pid: Some(pid),
            start_unix_ns: start,
            end_unix_ns: end,
            context: RunContext {
                run_id: Some(run.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn the_inbox_refuses_past_its_bounds_and_keeps_what_it_took() {
        let inbox = SpanInbox::new(InboxLimits {
            max_pending: 10,
            max_indexed: 8,
            max_indexed_per_sender: 3,
        });
        // One sender: its quota, then refused.
        let a = inbox.admit((0..5).map(|i| run_span(1, "r", i, i + 100)).collect());
        assert_eq!((a.accepted, a.over_quota, a.full), (3, 2, 0));
        // Spans without a run do not use the index: only the pending bound.
        let plain: Vec<Span> = (0..4).map(|_| Span::default()).collect();
        assert_eq!(inbox.admit(plain).accepted, 4);
        // Other senders fill the index (8), then the pending bound (10).
        let a = inbox.admit((2..9).map(|p| run_span(p, "r", 0, 100)).collect());
        assert_eq!((a.accepted, a.full), (3, 4));
        assert_eq!(inbox.held(), (10, 6));
        // A window takes every new span: none is lost, and the index keeps
        // those that may touch later windows.
        let (snap, new) = inbox.take_window(50, 60, |_, _| None);
        assert_eq!(new.len(), 10);
        assert_eq!(snap.len(), 6);
        // Until their window is committed, taken spans still hold their slots.
        assert_eq!(inbox.held(), (10, 6));
        assert_eq!(inbox.admit(vec![Span::default()]).full, 1);
        inbox.release(10);
        assert_eq!(inbox.held(), (0, 6));
        let (_, new) = inbox.take_window(200, 210, |_, _| None);
        assert!(new.is_empty());
        assert_eq!(inbox.held(), (0, 0), "spans that ended leave the index");
        // The sender's quota is free again.
        assert_eq!(inbox.admit(vec![run_span(1, "r", 150, 400)]).accepted, 1);
        // A span reaching back into a split window is late, and counted.
        let late = inbox
            .counters()
            .into_iter()
            .find(|c| c.0 == "mentat_agent_spans_late_total")
            .map(|c| c.2);
        assert_eq!(late, Some(1));
    }

    #[test]
    fn container_spans_hold_their_slots_until_mapped() {
        let inbox = SpanInbox::new(InboxLimits {
            max_pending: 4,
            max_indexed: 2,
            max_indexed_per_sender: 2,
        });
        let scoped = |pid| Span {
            pid_scope: Some(PidScope {
                container_id: Some("c".into()),
                pod_uid: None,
            }),
            ..run_span(pid, "r", 0, 100)
        };
        let a = inbox.admit(vec![scoped(1), scoped(2), scoped(3)]);
        assert_eq!((a.accepted, a.full), (2, 1), "two index slots held");
        let (snap, new) = inbox.take_window(0, 10, |pid, _| (pid == 1).then_some(4242));
        assert_eq!(new.len(), 2, "mapped or not, every span is recorded");
        inbox.release(new.len());
        assert_eq!(
            snap.len(),
            1,
            "the mapped one is indexed under the host pid"
        );
        assert_eq!(new.iter().filter(|s| s.pid == Some(4242)).count(), 1);
        assert_eq!(inbox.held(), (0, 1));
    }
}
