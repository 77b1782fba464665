//! The live stream's hub: each committed window and each alert state change,
//! offered to every `/v1/stream` client (the HTTP side is `stream_http`).
//!
//! In: a note per committed window from the daemon's commit loop
//! ([`StreamHub::publish_committed`], after the window is durable in the
//! ledger) and each [`AlertEvent`] from the rules engine
//! ([`StreamHub::publish_alert`]). Out: per client, a bounded queue of notes;
//! the client's own task turns a window note into its message by reading the
//! ledger (the same exact sums as `/v1/usage`), so a message's totals equal
//! `/v1/usage` over that window by construction.
//!
//! Invariants:
//! - Publishing never waits: it `try_send`s to each client's queue (at most
//!   `[api] stream_client_buffer` notes). A client whose queue is full has
//!   fallen behind: it is dropped (its task closes the connection with a
//!   reason), counted in `mentat_agent_stream_clients_dropped_total`, and
//!   logged at most once a minute. The commit loop is never slowed by a client.
//! - Clients asking the same (window, group_by, filters) share one ledger
//!   read: the newest messages are kept by that key.
//! - A window's `id` is its start in Unix nanoseconds (decimal text, as
//!   JavaScript numbers cannot hold it): unique per node and increasing.
//! - Resume (`?after=<id>`): the client subscribes first, then replays the
//!   committed windows after `id` from the ledger, then forwards live notes
//!   whose id is above the last one sent. A window committed before the
//!   subscription is in the ledger; one committed after it is in the queue;
//!   one in both is sent once. So nothing is missed or repeated.

use std::{
    collections::BTreeMap,
    future::Future,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::{Notify, OnceCell, Semaphore, mpsc};
use tracing::warn;

use crate::{
    alert::AlertEvent,
    ledger::{self, Ledger, LedgerError, Totals, WindowsAfter, writer::CommittedWindow},
    probes::clock::{rfc3339_of_ns, unix_ns_of},
    serve::prometheus::Counter,
};

/// Default per-client queue, in messages (`[api] stream_client_buffer`).
pub const DEFAULT_CLIENT_BUFFER: usize = 256;
/// Default most clients at once (`[api] stream_max_clients`).
pub const DEFAULT_MAX_CLIENTS: usize = 64;
/// The most windows one resume replays (an hour of 1 s windows); older
/// ones get a `gap` message.
pub const MAX_REPLAY_WINDOWS: usize = 3600;
/// The most groups in one window message (more are counted in `groups_truncated`).
pub const MAX_STREAM_GROUPS: usize = 1000;
/// Window messages being read from the ledger at once, all clients together.
const MAX_CONCURRENT_RENDERS: usize = 4;
/// At most one "client dropped" log line per this.
const DROP_LOG_EVERY: Duration = Duration::from_secs(60);

/// The hub's bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamLimits {
    /// Notes queued per client before it counts as fallen behind (at least 1).
    pub client_buffer: usize,
    /// Clients connected at once; more get a 503.
    pub max_clients: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self {
            client_buffer: DEFAULT_CLIENT_BUFFER,
            max_clients: DEFAULT_MAX_CLIENTS,
        }
    }
}

/// What the hub queues for a client.
#[derive(Clone, Debug)]
pub enum Note {
    /// A committed window: its start and end, Unix ns.
    Window {
        /// Start (the window's id).
        start_ns: i64,
        /// End.
        end_ns: i64,
        /// The earliest start of a record committed with it (an idle
        /// process's record spans several windows).
        min_start_ns: i64,
    },
    /// An alert state change.
    Alert(Arc<AlertEvent>),
}

struct Slot {
    tx: mpsc::Sender<Note>,
    dropped: Arc<Notify>,
}

struct Inner {
    node: String,
    ledger_path: PathBuf,
    limits: StreamLimits,
    slots: Mutex<Vec<Slot>>,
    /// Connections open (a dropped SSE client counts until its socket goes).
    live: AtomicUsize,
    dropped: AtomicU64,
    refused: AtomicU64,
    windows: AtomicU64,
    last_drop_log: Mutex<Option<Instant>>,
    renders: Semaphore,
    /// Recent window messages by (window, query): clients asking the same
    /// read the ledger once between them.
    rendered: Mutex<BTreeMap<RenderKey, Arc<OnceCell<Value>>>>,
}

/// (window start, end, earliest record start, group_by, filters).
type RenderKey = (i64, i64, i64, Option<String>, Vec<(String, String)>);

/// Window messages kept for clients asking the same (the newest windows).
const RENDER_CACHE: usize = 256;

/// The stream's hub; cheap to clone.
#[derive(Clone)]
pub struct StreamHub(Arc<Inner>);

/// A client's subscription: its queue, the signal that it was dropped, and
/// its place among the connected clients (given back when dropped).
pub struct Subscription {
    /// The notes, in publishing order.
    pub rx: mpsc::Receiver<Note>,
    /// Notified once if the client fell behind and was dropped.
    pub dropped: Arc<Notify>,
    /// Held while the connection is open.
    pub guard: LiveGuard,
}

/// Counts a connection as open until dropped.
pub struct LiveGuard(Arc<Inner>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Too many clients are connected.
#[derive(Debug, thiserror::Error)]
#[error("{0} stream clients are connected, the limit ([api] stream_max_clients)")]
pub struct TooManyClients(pub usize);

impl StreamHub {
    /// A hub for the node `node` whose windows are read from the ledger at `ledger_path`.
    pub fn new(node: impl Into<String>, ledger_path: PathBuf, limits: StreamLimits) -> Self {
        Self(Arc::new(Inner {
            node: node.into(),
            ledger_path,
            limits: StreamLimits {
                client_buffer: limits.client_buffer.max(1),
                max_clients: limits.max_clients,
            },
            slots: Mutex::new(Vec::new()),
            live: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            windows: AtomicU64::new(0),
            last_drop_log: Mutex::new(None),
            renders: Semaphore::new(MAX_CONCURRENT_RENDERS),
            rendered: Mutex::new(BTreeMap::new()),
        }))
    }

    /// Offers a committed window (after its commit returned) to every client.
    pub fn publish_committed(&self, done: &CommittedWindow) {
        let s = &done.window.report.summary;
        if let (Some(start_ns), Some(end_ns)) =
            (unix_ns_of(&s.window_start), unix_ns_of(&s.window_end))
        {
            let min_start_ns = done
                .records
                .iter()
                .filter_map(|r| unix_ns_of(&r.window_start))
                .fold(start_ns, i64::min);
            self.publish_window(start_ns, end_ns, min_start_ns);
        }
    }

    /// Offers the committed window [start_ns, end_ns) to every client; its
    /// records start at `min_start_ns` or later (idle processes' records
    /// reach back).
    pub fn publish_window(&self, start_ns: i64, end_ns: i64, min_start_ns: i64) {
        self.0.windows.fetch_add(1, Ordering::Relaxed);
        self.publish(Note::Window {
            start_ns,
            end_ns,
            min_start_ns,
        });
    }

    /// Offers an alert state change to every client (whose filters it matches).
    pub fn publish_alert(&self, event: &AlertEvent) {
        self.publish(Note::Alert(Arc::new(event.clone())));
    }

    /// Never waits: a full queue drops its client.
    fn publish(&self, note: Note) {
        let Ok(mut slots) = self.0.slots.lock() else {
            return;
        };
        let mut dropped = 0u64;
        slots.retain(|s| match s.tx.try_send(note.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                dropped += 1;
                s.dropped.notify_one();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        drop(slots);
        if dropped > 0 {
            self.0.dropped.fetch_add(dropped, Ordering::Relaxed);
            let log = self.0.last_drop_log.lock().is_ok_and(|mut last| {
                let due = last.is_none_or(|t| t.elapsed() >= DROP_LOG_EVERY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            });
            if log {
                warn!(
                    dropped,
                    buffer = self.0.limits.client_buffer,
                    "stream clients fell behind (queue full) and were disconnected; \
                     see mentat_agent_stream_clients_dropped_total"
                );
            }
        }
    }

    /// Registers a client; its queue receives every note from now on.
    pub fn subscribe(&self) -> Result<Subscription, TooManyClients> {
        let max = self.0.limits.max_clients;
        if self
            .0
            .live
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_err()
        {
            self.0.refused.fetch_add(1, Ordering::Relaxed);
            return Err(TooManyClients(max));
        }
        let guard = LiveGuard(self.0.clone());
        let (tx, rx) = mpsc::channel(self.0.limits.client_buffer);
        let dropped = Arc::new(Notify::new());
        if let Ok(mut slots) = self.0.slots.lock() {
            slots.push(Slot {
                tx,
                dropped: dropped.clone(),
            });
        }
        Ok(Subscription { rx, dropped, guard })
    }

    /// The node whose windows these are.
    pub fn node(&self) -> &str {
        &self.0.node
    }

    /// The ledger the windows are read from.
    pub fn ledger_path(&self) -> &PathBuf {
        &self.0.ledger_path
    }

    /// The per-client queue length in force.
    pub fn client_buffer(&self) -> usize {
        self.0.limits.client_buffer
    }

    /// The message for `window` and `q`: rendered by `render` once for all
    /// clients asking the same while it is among the newest [`RENDER_CACHE`].
    pub async fn window_message<F: Future<Output = Value>>(
        &self,
        window: (i64, i64, i64),
        q: &StreamQuery,
        render: F,
    ) -> Value {
        let key: RenderKey = (
            window.0,
            window.1,
            window.2,
            q.group_by.clone(),
            q.filters.clone(),
        );
        let cell = match self.0.rendered.lock() {
            Ok(mut cache) => {
                let cell = cache.entry(key).or_default().clone();
                while cache.len() > RENDER_CACHE {
                    cache.pop_first();
                }
                cell
            }
            Err(_) => Arc::new(OnceCell::new()),
        };
        cell.get_or_init(|| render).await.clone()
    }

    /// Waits for a turn to read the ledger (bounded across clients).
    pub async fn render_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.0.renders.acquire().await.ok()
    }

    /// The hub's counters for `/metrics`.
    pub fn counters(&self) -> Vec<Counter> {
        vec![
            (
                "mentat_agent_stream_clients_dropped_total",
                "Stream clients disconnected because they fell behind (their queue of [api] stream_client_buffer messages was full).",
                self.0.dropped.load(Ordering::Relaxed),
            ),
            (
                "mentat_agent_stream_clients_refused_total",
                "Stream connections refused because [api] stream_max_clients were connected.",
                self.0.refused.load(Ordering::Relaxed),
            ),
            (
                "mentat_agent_stream_windows_published_total",
                "Committed windows offered to the stream's clients.",
                self.0.windows.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// What a client asked to see.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamQuery {
    /// A ledger field (or `model`) to split each window by.
    pub group_by: Option<String>,
    /// Exact matches, as `where` on `/v1/usage`.
    pub filters: Vec<(String, String)>,
    /// Resume after this window id (start, Unix ns).
    pub after: Option<i64>,
}

/// A window's message: the totals (filtered) of the records committed with
/// it and, when asked, per group.
pub fn render_window(
    l: &Ledger,
    node: &str,
    (start_ns, end_ns, min_start_ns): (i64, i64, i64),
    q: &StreamQuery,
) -> Result<Value, LedgerError> {
    let from = rfc3339_of_ns(start_ns);
    let totals = l
        .totals_committed_with(start_ns, end_ns, min_start_ns, &[], &q.filters)?
        .into_iter()
        .next()
        .map(|(_, t)| t)
        .unwrap_or_default();
    let mut msg = json!({
        "type": "window",
        "id": start_ns.to_string(),
        "node": node,
        "window_start": from,
        "window_end": rfc3339_of_ns(end_ns),
        "totals": totals,
    });
    if !q.filters.is_empty() {
        msg["where"] = q.filters.iter().map(|(k, v)| format!("{k}={v}")).collect();
    }
    if let Some(field) = &q.group_by {
        let rows = l.totals_committed_with(
            start_ns,
            end_ns,
            min_start_ns,
            &[field.as_str()],
            &q.filters,
        )?;
        let truncated = rows.len().saturating_sub(MAX_STREAM_GROUPS);
        let groups: Vec<Value> = rows
            .into_iter()
            .take(MAX_STREAM_GROUPS)
            .map(|(g, t)| group_json(g.into_iter().next().flatten(), &t))
            .collect();
        msg["group_by"] = json!(field);
        msg["groups"] = json!(groups);
        if truncated > 0 {
            msg["groups_truncated"] = json!(truncated);
        }
    }
    Ok(msg)
}

fn group_json(key: Option<String>, t: &Totals) -> Value {
    json!({
        "key": key.clone().unwrap_or_else(|| "unattributed".into()),
        "unattributed": key.is_none(),
        "totals": t,
    })
}

/// The `gap` messages for a resume after `after`: what the ledger cannot replay.
pub fn gaps(after: i64, w: &WindowsAfter) -> Vec<Value> {
    let first = w.windows.first().map(|(s, _, _)| s.to_string());
    let mut out = Vec::new();
    if !w.known {
        let reason = match w.compacted_before {
            Some(c) if after < c => format!(
                "windows after {after} that started before {} ({c}) are older than raw_retention and were compacted into hourly rollups: they cannot be replayed one by one (/v1/usage still sums them)",
                rfc3339_of_ns(c)
            ),
            _ => format!(
                "{after} is not the id of a window this agent's ledger holds (another node's, or not a window start): the windows after it are replayed, but what came between cannot be told"
            ),
        };
        out.push(json!({
            "type": "gap",
            "after": after.to_string(),
            "until": first,
            "reason": reason,
        }));
    }
    if w.skipped > 0 {
        out.push(json!({
            "type": "gap",
            "after": after.to_string(),
            "until": first,
            "skipped_windows": w.skipped,
            "reason": format!(
                "{} windows after {after} (up to {}) are more than one resume replays ({MAX_REPLAY_WINDOWS}): query /v1/usage for them",
                w.skipped,
                w.skipped_until.map(|s| s.to_string()).unwrap_or_default()
            ),
        }));
    }
    out
}

/// An alert's message, or None when the client's filters exclude it: every
/// filter must match the alert's label of that name.
pub fn render_alert(e: &AlertEvent, q: &StreamQuery) -> Option<Value> {
    let matches = q
        .filters
        .iter()
        .all(|(k, v)| e.labels.get(k).is_some_and(|l| l == v));
    matches.then(|| json!({ "type": "alert", "alert": e }))
}

/// Opens the read-only connection a client's messages are read on.
pub fn open_reader(hub: &StreamHub) -> Result<Ledger, LedgerError> {
    ledger::Ledger::open_read_only(hub.ledger_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hub(buffer: usize) -> StreamHub {
        StreamHub::new(
            "n",
            PathBuf::from("/nonexistent"),
            StreamLimits {
                client_buffer: buffer,
                max_clients: 2,
            },
        )
    }

    #[test]
    fn a_full_queue_drops_its_client_and_counts_it_without_waiting() {
        let h = hub(2);
        let mut slow = h.subscribe().expect("slow");
        let mut fast = h.subscribe().expect("fast");
        for k in 0..5 {
            h.publish_window(k, k + 1, k);
            // The fast client keeps up.
            assert!(
                matches!(fast.rx.try_recv(), Ok(Note::Window { start_ns, .. }) if start_ns == k)
            );
        }
        assert_eq!(h.0.dropped.load(Ordering::Relaxed), 1);
        // The slow one got what fit, then its queue was closed.
        assert!(matches!(
            slow.rx.try_recv(),
            Ok(Note::Window { start_ns: 0, .. })
        ));
        assert!(matches!(
            slow.rx.try_recv(),
            Ok(Note::Window { start_ns: 1, .. })
        ));
        assert!(slow.rx.try_recv().is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("rt");
        // Its drop signal is waiting for it.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), slow.dropped.notified())
                .await
                .expect("dropped is notified");
        });
    }

    #[test]
    fn clients_over_the_limit_are_refused_and_a_leaver_frees_its_place() {
        let h = hub(4);
        let a = h.subscribe().expect("a");
        let _b = h.subscribe().expect("b");
        assert!(h.subscribe().is_err());
        assert_eq!(h.0.refused.load(Ordering::Relaxed), 1);
        drop(a);
        assert!(h.subscribe().is_ok());
    }

    #[test]
    fn gaps_name_what_cannot_be_replayed() {
        let w = WindowsAfter {
            known: false,
            compacted_before: Some(100),
            skipped: 0,
            skipped_until: None,
            windows: vec![(150, 160, 150)],
        };
        let g = gaps(50, &w);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0]["type"], "gap");
        assert_eq!(g[0]["until"], "150");
        assert!(
            g[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("raw_retention"))
        );
        // A known id with nothing skipped has no gap.
        let known = WindowsAfter {
            known: true,
            ..w.clone()
        };
        assert!(gaps(50, &known).is_empty());
        // An unknown id above the watermark is named as unknown.
        let g = gaps(120, &w);
        assert!(
            g[0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not the id"))
        );
        let many = WindowsAfter {
            known: true,
            skipped: 7,
            skipped_until: Some(140),
            ..w
        };
        assert_eq!(gaps(50, &many)[0]["skipped_windows"], 7);
    }

    #[test]
    fn alerts_pass_only_filters_their_labels_match() {
        let mut e = AlertEvent {
            rule: "r".into(),
            kind: "threshold".into(),
            fingerprint: "f".into(),
            state: crate::alert::AlertState::Firing,
            labels: Default::default(),
            annotations: Default::default(),
            value: "6".into(),
            threshold: "5".into(),
            starts_at: "2026-01-01T00:00:00Z".into(),
            ends_at: None,
            at: "2026-01-01T00:00:00Z".into(),
            node: "n".into(),
            repeat: 0,
            valid_until: None,
        };
        e.labels.insert("run_id".into(), "a".into());
        let by = |v: &str| StreamQuery {
            filters: vec![("run_id".into(), v.into())],
            ..StreamQuery::default()
        };
        assert!(render_alert(&e, &StreamQuery::default()).is_some());
        assert!(render_alert(&e, &by("a")).is_some());
        assert!(render_alert(&e, &by("b")).is_none());
    }
}
