//! The daemon's one writer of the ledger: prices each reported window and
//! commits it, retrying what may succeed later and setting aside what never
//! will, so that no window is lost and no bad record stops billing.
//!
//! In: [`ReportedWindow`]s in order, and the price book in force. Out:
//! committed windows (with the records that were billed, for `/metrics`), the
//! quarantine, and the counters of this path. Windows are committed strictly
//! in order: a window that cannot be written for a transient reason (I/O,
//! disk full, busy) is retried with backoff and the later ones wait behind it.

use std::{
    collections::HashSet,
    panic::{AssertUnwindSafe, catch_unwind},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    ledger::{Committed, Ledger, LedgerError},
    pricing::PriceBook,
    probes::clock::rfc3339,
    report::{record::UsageRecord, window::ReportedWindow},
};

/// The first wait before a failed commit is tried again; it doubles up to
/// [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two tries of a failed commit.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(10);
/// Tries of a failing commit once the daemon is stopping.
const COMMIT_TRIES_AT_STOP: u32 = 3;
/// Quarantined records logged one by one per window (the rest in one line).
const QUARANTINE_LOGS_PER_WINDOW: usize = 10;

/// Why a window's commit failed.
#[derive(Debug, thiserror::Error)]
pub enum CommitError {
    /// The ledger refused the write (transient or not: see [`LedgerError::is_transient`]).
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// Committing panicked; the window goes to the quarantine whole.
    #[error("committing the window panicked: {0}")]
    Panicked(String),
    /// Setting a failed window aside panicked as well; it is kept and retried.
    #[error("{0}; quarantining the window panicked too")]
    QuarantinePanicked(String),
}

impl CommitError {
    /// Whether trying the same window again may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            CommitError::Ledger(e) => e.is_transient(),
            CommitError::Panicked(_) => false,
            CommitError::QuarantinePanicked(_) => true,
        }
    }
}

/// Counters of the commit path, for `/metrics`.
#[derive(Debug, Default)]
struct WriterCounters {
    /// Records set aside into the ledger's quarantine.
    quarantined: AtomicU64,
    /// Times the ledger's lock was found poisoned (a holder panicked) and recovered.
    poisoned: AtomicU64,
    /// Window commits that panicked (their records were quarantined).
    panicked: AtomicU64,
}

/// A window that was committed.
#[derive(Debug)]
pub struct CommittedWindow {
    /// The window.
    pub window: ReportedWindow,
    /// Its records as billed (priced; without what was quarantined).
    pub records: Vec<UsageRecord>,
    /// What the ledger did with them.
    pub committed: Committed,
    /// Failed attempts before this one.
    pub failures: u32,
}

/// The ledger shared by the commit path, the exporter's outbox and
/// compaction, behind one lock that a panicked holder cannot wedge.
#[derive(Clone, Debug)]
pub struct SharedLedger {
    ledger: Arc<Mutex<Ledger>>,
    counters: Arc<WriterCounters>,
}

impl SharedLedger {
    /// Shares `ledger`.
    pub fn new(ledger: Ledger) -> Self {
        Self {
            ledger: Arc::new(Mutex::new(ledger)),
            counters: Arc::default(),
        }
    }

    /// Locks the ledger; a lock poisoned by a panicked holder is taken over
    /// and counted (SQLite rolled the holder's transaction back, and the
    /// ledger's caches change only after a commit), rather than stopping
    /// billing for good.
    pub fn lock(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|poisoned| {
            self.counters.poisoned.fetch_add(1, Ordering::Relaxed);
            warn!("the ledger's lock was poisoned by a panic; taking it over");
            self.ledger.clear_poison();
            poisoned.into_inner()
        })
    }

    /// The commit path's counters as (name, help, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let c = &self.counters;
        vec![
            (
                "mentat_agent_quarantined_records_total",
                "Records the ledger refused for a reason retrying cannot fix (before the compaction watermark, a time outside 1677..2262, a count past 64 bits...): set aside in its quarantine table (GET /v1/quarantine) while the rest of their window was committed.",
                c.quarantined.load(Ordering::Relaxed),
            ),
            (
                "mentat_agent_ledger_lock_poisoned_total",
                "Times the ledger's lock was found poisoned by a panicked holder and taken over (the panicked transaction was rolled back).",
                c.poisoned.load(Ordering::Relaxed),
            ),
            (
                "mentat_agent_commit_panics_total",
                "Window commits that panicked; their records were set aside in the quarantine, and later windows went on.",
                c.panicked.load(Ordering::Relaxed),
            ),
        ]
    }

    /// Prices one window (month-to-date spend from the ledger, before this
    /// window) and writes it, with its spans; records the ledger cannot take
    /// for good are quarantined, the rest committed. Returns the records as
    /// billed (without the quarantined ones).
    pub fn commit(
        &self,
        book: &PriceBook,
        exporters: &[&'static str],
        w: &ReportedWindow,
    ) -> Result<(Vec<UsageRecord>, Committed), CommitError> {
        let mut records = w.records();
        let mut l = self.lock();
        book.price_window(&mut records, |party| l.month_to_date(party, w.start()))?;
        l.commit_spans(&w.spans)?;
        let committed = l.commit_window_or_quarantine(w.start(), w.end(), &records, exporters)?;
        drop(l);
        // What was set aside is not billed, so not counted on /metrics either.
        if !committed.quarantined.is_empty() {
            let aside: HashSet<&str> = committed
                .quarantined
                .iter()
                .map(|q| q.record_id.as_str())
                .collect();
            records.retain(|r| !aside.contains(r.record_id.as_str()));
        }
        self.report_quarantined(&committed);
        Ok((records, committed))
    }

    /// The last resort for a window whose commit failed for a reason
    /// retrying will not fix, or panicked: its records go to the quarantine
    /// whole, with the reason, so the windows behind it can go on.
    fn quarantine(&self, w: &ReportedWindow, reason: &str) -> Result<Committed, CommitError> {
        let records = w.records();
        let committed = self
            .lock()
            .quarantine_records(w.start(), w.end(), &records, reason)?;
        self.report_quarantined(&committed);
        Ok(committed)
    }

    /// [`commit`](Self::commit), catching panics; a window that fails for
    /// good (or panics) is quarantined whole. `Err` only for what retrying
    /// may fix.
    pub fn commit_or_quarantine(
        &self,
        book: &PriceBook,
        exporters: &[&'static str],
        w: &ReportedWindow,
    ) -> Result<(Vec<UsageRecord>, Committed), CommitError> {
        let failure = match catch_unwind(AssertUnwindSafe(|| self.commit(book, exporters, w))) {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(e)) if e.is_transient() => return Err(e),
            Ok(Err(e)) => e.to_string(),
            Err(panic) => {
                self.counters.panicked.fetch_add(1, Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                error!(
                    window_start = %w.start(),
                    panic = %what,
                    "committing a window panicked; its records are quarantined"
                );
                CommitError::Panicked(what).to_string()
            }
        };
        match catch_unwind(AssertUnwindSafe(|| self.quarantine(w, &failure))) {
            Ok(Ok(c)) => Ok((Vec::new(), c)),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                self.counters.panicked.fetch_add(1, Ordering::Relaxed);
                Err(CommitError::QuarantinePanicked(failure))
            }
        }
    }

    /// Commits `w`, retrying transient failures with backoff (calling
    /// `failed` at each): a window that cannot be written (disk full, I/O
    /// error) is kept, never dropped, and billing resumes where it stopped
    /// once the ledger can be written again. Once `stopping` is set a few
    /// more tries are made, then the window is reported lost by name
    /// (`None`).
    pub async fn commit_until_done(
        &self,
        mut w: ReportedWindow,
        book: impl Fn() -> Arc<PriceBook>,
        exporters: &[&'static str],
        stopping: &AtomicBool,
        failed: impl Fn(),
    ) -> Option<CommittedWindow> {
        let mut backoff = COMMIT_RETRY_FIRST;
        let mut failures = 0u32;
        loop {
            let this = self.clone();
            let book = book();
            let exporters = exporters.to_vec();
            let result = tokio::task::spawn_blocking(move || {
                match this.commit_or_quarantine(&book, &exporters, &w) {
                    Ok((records, committed)) => Ok((w, records, committed)),
                    Err(e) => Err((Box::new(w), e)),
                }
            })
            .await;
            match result {
                Ok(Ok((window, records, committed))) => {
                    if failures > 0 {
                        info!(
                            window_start = %window.start(),
                            failures,
                            "window committed after failed attempts"
                        );
                    }
                    return Some(CommittedWindow {
                        window,
                        records,
                        committed,
                        failures,
                    });
                }
                Ok(Err((back, e))) => {
                    failures += 1;
                    failed();
                    // At stop there is no later: a few more tries, then say
                    // exactly which window is lost.
                    if stopping.load(Ordering::SeqCst) && failures >= COMMIT_TRIES_AT_STOP {
                        error!(
                            window_start = %back.start(),
                            window_end = %back.end(),
                            error = %e,
                            "stopping with a window the ledger cannot take: it is lost"
                        );
                        return None;
                    }
                    if failures == 1 || failures.is_multiple_of(10) {
                        warn!(
                            window_start = %back.start(),
                            error = %e,
                            failures,
                            retry_in = ?backoff,
                            "committing a window failed; it is kept and retried, later windows wait"
                        );
                    }
                    w = *back;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(COMMIT_RETRY_MAX);
                }
                Err(e) => {
                    // Panics are caught inside; this is the runtime going away.
                    self.counters.panicked.fetch_add(1, Ordering::Relaxed);
                    error!(error = %e, "the commit task failed; its window is lost");
                    return None;
                }
            }
        }
    }

    /// Counts and logs what a commit set aside: one WARN per record naming
    /// it, at most [`QUARANTINE_LOGS_PER_WINDOW`] per window, then one line
    /// with the rest.
    fn report_quarantined(&self, committed: &Committed) {
        let n = committed.quarantined.len();
        if n == 0 {
            return;
        }
        self.counters
            .quarantined
            .fetch_add(n as u64, Ordering::Relaxed);
        for q in committed
            .quarantined
            .iter()
            .take(QUARANTINE_LOGS_PER_WINDOW)
        {
            warn!(
                record_id = %q.record_id,
                kind = %q.record_kind,
                run_id = q.run_id.as_deref().unwrap_or(""),
                window_start = %q.window_start,
                reason = %q.reason,
                "record quarantined: the ledger cannot take it; the rest of its window was committed (see GET /v1/quarantine)"
            );
        }
        if n > QUARANTINE_LOGS_PER_WINDOW {
            warn!(
                more = n - QUARANTINE_LOGS_PER_WINDOW,
                window_start = %committed.quarantined[0].window_start,
                "more records of this window quarantined (see GET /v1/quarantine)"
            );
        }
    }

    /// Compacts and expires the ledger soon after start, then hourly, until `stop`.
    pub fn compact_periodically(
        &self,
        retention: Duration,
        mut stop: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            // Soon after start, then hourly: a daemon restarted more often
            // than hourly still compacts and expires.
            let mut wait = Duration::from_secs(60);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                wait = Duration::from_secs(3600);
                let this = this.clone();
                let now = rfc3339(SystemTime::now());
                let result = tokio::task::spawn_blocking(move || {
                    let mut l = this.lock();
                    let compacted = l.compact(&now)?;
                    let expired = l.expire(&now, retention)?;
                    Ok::<_, LedgerError>((compacted, expired))
                })
                .await;
                match result {
                    Ok(Ok((stats, expired))) => info!(?stats, ?expired, "ledger compacted"),
                    Ok(Err(e)) => warn!(error = %e, "ledger compaction failed"),
                    Err(e) => warn!(error = %e, "ledger compaction task failed"),
                }
            }
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::{pricing::DEFAULT_BOOK, report::record::TokenUsage};

    const OTLP: &str = "otlp";

    fn token(id: &str, ws: &str, we: &str, input: u64) -> UsageRecord {
        UsageRecord {
            record_id: id.into(),
            node: "n".into(),
            window_start: ws.into(),
            window_end: we.into(),
            record_kind: "token".into(),
            context: crate::identity::run::RunContext {
                run_id: Some("run-1".into()),
                ..Default::default()
            },
            tokens: vec![TokenUsage {
                model: "gpt-4o".into(),
                input,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn window(ws: &str, we: &str, tokens: Vec<UsageRecord>) -> ReportedWindow {
        crate::report::window::tests::window(ws, we, Vec::new(), tokens, &[])
    }

    fn temp_ledger(name: &str) -> (PathBuf, SharedLedger) {
        let dir = std::env::temp_dir().join(format!(
            "mentat-writer-{name}-{}-{}",
            std::process::id(),
            crate::probes::clock::unix_ns(SystemTime::now())
        ));
        let ledger = Ledger::open(&dir.join("ledger.db"), Duration::from_secs(3600)).unwrap();
        (dir, SharedLedger::new(ledger))
    }

    fn ns_ago(secs: i64) -> String {
        let now = i64::try_from(crate::probes::clock::unix_ns(SystemTime::now())).unwrap();
        crate::probes::clock::rfc3339_of_ns(now - secs * 1_000_000_000)
    }

    fn counter(l: &SharedLedger, name: &str) -> Option<u64> {
        l.counters().into_iter().find(|c| c.0 == name).map(|c| c.2)
    }

    /// The finding, at the daemon's commit: a token record whose
    /// window is three hours old (a span that started then), after the
    /// first compaction. The commit used to fail for good, and the loop
    /// retried that window forever: no window was committed after it.
    #[test]
    fn a_record_before_the_watermark_does_not_stop_the_commit() {
        let (dir, ledger) = temp_ledger("watermark");
        let book = PriceBook::parse(DEFAULT_BOOK, "built-in").unwrap();
        {
            let mut l = ledger.lock();
            let (ws, we) = (ns_ago(3 * 3600), ns_ago(3 * 3600 - 1));
            l.commit_window(&ws, &we, &[token("old", &ws, &we, 1)], &[OTLP])
                .unwrap();
            l.mark_delivered(OTLP, &["old".to_string()]).unwrap();
            let stats = l.compact(&ns_ago(0)).unwrap();
            assert_eq!(stats.records_compacted, 1);
        }
        let (ws, we) = (ns_ago(10), ns_ago(9));
        let (old_ws, old_we) = (ns_ago(3 * 3600 - 60), ns_ago(3 * 3600 - 59));
        let w = window(
            &ws,
            &we,
            vec![
                token("fresh", &ws, &we, 1000),
                token("backlog", &old_ws, &old_we, 5000),
            ],
        );
        let (records, committed) = ledger
            .commit(&book, &[OTLP], &w)
            .expect("the window commits");
        // Only the committed record is counted on /metrics.
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].record_id, "fresh");
        assert_eq!(committed.new, 1);
        assert_eq!(committed.quarantined.len(), 1);
        assert_eq!(committed.quarantined[0].record_id, "backlog");
        assert_eq!(
            counter(&ledger, "mentat_agent_quarantined_records_total"),
            Some(1)
        );
        // The next window commits.
        let (ws2, we2) = (ns_ago(9), ns_ago(8));
        let next = window(&ws2, &we2, vec![token("next", &ws2, &we2, 1)]);
        let (_, c) = ledger.commit(&book, &[OTLP], &next).unwrap();
        assert_eq!((c.new, c.quarantined.len()), (1, 0));
        let l = ledger.lock();
        assert_eq!(l.last_window_end().unwrap(), Some(we2));
        let pending: Vec<String> = l
            .pending(OTLP, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.record_id)
            .collect();
        assert_eq!(pending, ["fresh", "next"]);
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A panic while the ledger's lock was held used to leave it poisoned,
    /// and every later commit failed with "ledger lock poisoned", forever.
    #[test]
    fn a_poisoned_ledger_lock_is_taken_over_and_counted() {
        let (dir, ledger) = temp_ledger("poison");
        let book = PriceBook::parse(DEFAULT_BOOK, "built-in").unwrap();
        let l2 = ledger.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = l2.ledger.lock();
            panic!("a holder of the ledger panics");
        })
        .join();
        assert!(panicked.is_err());
        assert!(ledger.ledger.is_poisoned());
        let (ws, we) = (ns_ago(2), ns_ago(1));
        let w = window(&ws, &we, vec![token("t", &ws, &we, 10)]);
        let (_, c) = ledger.commit(&book, &[], &w).unwrap();
        assert_eq!(c.new, 1);
        assert_eq!(
            counter(&ledger, "mentat_agent_ledger_lock_poisoned_total"),
            Some(1)
        );
        assert!(!ledger.ledger.is_poisoned());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A window that fails for good as a whole is set aside, never retried:
    /// the commit returns Ok with every record in the quarantine.
    #[test]
    fn a_window_failing_for_good_is_quarantined_whole() {
        let (dir, ledger) = temp_ledger("whole");
        let book = PriceBook::parse(DEFAULT_BOOK, "built-in").unwrap();
        // A window whose start is not a time: the commit fails for good.
        let w = window(
            "not a time",
            &ns_ago(1),
            vec![token("t", &ns_ago(2), &ns_ago(1), 1)],
        );
        let done = ledger.commit_or_quarantine(&book, &[OTLP], &w);
        match done {
            Ok((records, c)) => {
                assert!(records.is_empty(), "nothing billed: {records:?}");
                assert_eq!(c.quarantined.len(), 1, "{c:?}");
            }
            Err(e) => panic!("retried a window that can never commit: {e}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
