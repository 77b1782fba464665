//! Runs whose spans have been received but whose usage is not committed yet.
//!
//! In: the spans the receiver admits (a [`PendingSink`] sits in front of the
//! inbox and notes each admitted batch's runs), and the end of each window
//! the ledger commits. Out: [`PendingRuns::get`], what is known of a run so
//! far, for the run view (`serve::api`).
//!
//! Why: the daemon holds each closed window `span_lag` for late spans
//! before it splits and commits it, and spans wait in the inbox until then;
//! during that time the ledger knows nothing of a new run, and the run view
//! would answer 404. A run leaves once a committed window ends at or after
//! its last span's end: from then on the ledger holds everything its spans
//! covered.
//!
//! Invariants: nothing here is billed or exported (it only tells the API a
//! run exists and is pending); at most [`MAX_PENDING_RUNS`] runs are held,
//! further new runs are counted (`mentat_agent_pending_runs_untracked_total`)
//! and simply answer as the ledger does. Only spans that name their run
//! (`flow.run_id` on the span or its resource) are seen; a batch partly
//! refused by the inbox is noted whole (the receiver does not say which
//! spans it took), so a refused span's run may show as pending until the
//! next commit past its end.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use serde::Serialize;

use crate::context::{
    inbox::{Admission, SpanSink},
    spans::Span,
};

/// The most runs held as pending at once.
pub const MAX_PENDING_RUNS: usize = 100_000;
/// The most agent ids kept per pending run (the rest are counted in `spans`).
const MAX_AGENTS: usize = 64;

/// What is known of a pending run: its spans received so far.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PendingRun {
    /// Spans received for the run, not yet all committed.
    pub spans: u64,
    /// Of which carry token usage.
    pub token_spans: u64,
    /// The earliest span start, Unix ns.
    pub start_ns: i64,
    /// The latest span end, Unix ns.
    pub end_ns: i64,
    /// The spans' `agent.id`s (at most 64).
    pub agents: BTreeSet<String>,
}

/// The pending runs, shared by the receiver's sink, the commit loop and the API.
#[derive(Debug, Default)]
pub struct PendingRuns {
    runs: Mutex<HashMap<String, PendingRun>>,
    untracked: AtomicU64,
}

impl PendingRuns {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, PendingRun>> {
        // Every update is a whole insert or removal: a poisoned map is consistent.
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes admitted spans.
    pub fn note(&self, spans: &[Span]) {
        self.merge(summarise(spans));
    }

    fn merge(&self, batch: HashMap<String, PendingRun>) {
        if batch.is_empty() {
            return;
        }
        let mut runs = self.lock();
        for (id, b) in batch {
            let full = runs.len() >= MAX_PENDING_RUNS;
            match runs.get_mut(&id) {
                Some(r) => {
                    r.spans = r.spans.saturating_add(b.spans);
                    r.token_spans = r.token_spans.saturating_add(b.token_spans);
                    r.start_ns = r.start_ns.min(b.start_ns);
                    r.end_ns = r.end_ns.max(b.end_ns);
                    for a in b.agents {
                        if r.agents.len() >= MAX_AGENTS {
                            break;
                        }
                        r.agents.insert(a);
                    }
                }
                None if full => {
                    self.untracked.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    runs.insert(id, b);
                }
            }
        }
    }

    /// A window ending at `window_end_ns` is committed: runs whose spans all
    /// ended by then are no longer pending.
    pub fn committed_through(&self, window_end_ns: i64) {
        self.lock().retain(|_, r| r.end_ns > window_end_ns);
    }

    /// What is known of `run_id`, if it is pending.
    pub fn get(&self, run_id: &str) -> Option<PendingRun> {
        self.lock().get(run_id).cloned()
    }

    /// The counters as (name, help, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![(
            "mentat_agent_pending_runs_untracked_total",
            "New runs not noted as pending because 100,000 runs already were: their run view answers only from the ledger (404 until their first commit). Nothing is billed from this table.",
            self.untracked.load(Ordering::Relaxed),
        )]
    }
}

/// A span sink that notes admitted spans' runs in [`PendingRuns`], then
/// hands them to the sink it wraps (the daemon's inbox).
pub struct PendingSink<S> {
    inner: S,
    runs: std::sync::Arc<PendingRuns>,
}

impl<S> PendingSink<S> {
    /// Wraps `inner`, noting into `runs`.
    pub fn new(inner: S, runs: std::sync::Arc<PendingRuns>) -> Self {
        Self { inner, runs }
    }
}

impl<S: SpanSink> SpanSink for PendingSink<S> {
    fn admit(&self, spans: Vec<Span>) -> Admission {
        // Summarised before the spans move into the inbox; noted only if
        // the inbox took some of them.
        let batch = summarise(&spans);
        let a = self.inner.admit(spans);
        if a.accepted > 0 {
            self.runs.merge(batch);
        }
        a
    }
}

/// The runs of a batch of spans.
fn summarise(spans: &[Span]) -> HashMap<String, PendingRun> {
    let mut batch: HashMap<String, PendingRun> = HashMap::new();
    for s in spans {
        let Some(run) = s.context.run_id.as_deref().filter(|r| !r.is_empty()) else {
            continue;
        };
        let start = i64::try_from(s.start_unix_ns).unwrap_or(i64::MAX);
        let end = i64::try_from(s.end_unix_ns).unwrap_or(i64::MAX);
        if !batch.contains_key(run) {
            batch.insert(
                run.to_string(),
                PendingRun {
                    start_ns: start,
                    end_ns: end,
                    ..PendingRun::default()
                },
            );
        }
        let Some(r) = batch.get_mut(run) else {
            continue;
        };
        r.spans += 1;
        r.token_spans += u64::from(s.tokens.is_some());
        r.start_ns = r.start_ns.min(start);
        r.end_ns = r.end_ns.max(end);
        if let Some(a) = &s.context.agent_id
            && r.agents.len() < MAX_AGENTS
        {
            r.agents.insert(a.clone());
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::identity::run::RunContext;

    fn span(run: Option<&str>, agent: &str, start: u64, end: u64) -> Span {
        Span {
            start_unix_ns: start,
            end_unix_ns: end,
            context: RunContext {
                run_id: run.map(String::from),
                agent_id: Some(agent.into()),
                ..RunContext::default()
            },
            ..Span::default()
        }
    }

    /// Takes everything, or nothing.
    struct Fixed(bool);

    impl SpanSink for Fixed {
        fn admit(&self, spans: Vec<Span>) -> Admission {
            let n = spans.len() as u64;
            if self.0 {
                Admission {
                    accepted: n,
                    ..Admission::default()
                }
            } else {
                Admission {
                    full: n,
                    ..Admission::default()
                }
            }
        }
    }

    #[test]
    fn a_run_is_pending_from_admission_until_a_window_past_its_spans_commits() {
        let runs = Arc::new(PendingRuns::default());
        let sink = PendingSink::new(Fixed(true), runs.clone());
        sink.admit(vec![
            span(Some("r1"), "a1", 100, 200),
            span(Some("r1"), "a2", 50, 300),
            span(None, "a3", 1, 2),
        ]);
        let r = runs.get("r1").expect("pending");
        assert_eq!((r.spans, r.start_ns, r.end_ns), (2, 50, 300));
        assert_eq!(r.agents.iter().collect::<Vec<_>>(), ["a1", "a2"]);
        assert_eq!(runs.get("nobody"), None);
        runs.committed_through(299);
        assert!(
            runs.get("r1").is_some(),
            "a span still ends after the commit"
        );
        runs.committed_through(300);
        assert_eq!(runs.get("r1"), None);
        // A batch the inbox refused whole is not a run.
        let refusing = PendingSink::new(Fixed(false), runs.clone());
        refusing.admit(vec![span(Some("r2"), "a1", 1, 2)]);
        assert_eq!(runs.get("r2"), None);
    }

    #[test]
    fn runs_past_the_bound_are_counted_not_held() {
        let runs = PendingRuns::default();
        let spans: Vec<Span> = (0..MAX_PENDING_RUNS + 3)
            .map(|i| span(Some(&format!("r{i}")), "a", 1, 2))
            .collect();
        runs.note(&spans);
        assert_eq!(runs.lock().len(), MAX_PENDING_RUNS);
        assert_eq!(runs.counters()[0].2, 3);
    }
}
