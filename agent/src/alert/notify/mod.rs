//! Alert notifications: the delivery of the ledger's alert outbox to
//! channels (Alertmanager, webhook, Slack, PagerDuty, SMTP).
//!
//! In: rows the rules engine queued in the ledger's alert outbox
//! ([`AlertOutbox::enqueue_alert_events`], one durable transaction), and a
//! wake-up ([`Notifier::wake`]) after it did. Out: requests to the channels'
//! receivers; rows marked sent once a receiver acknowledged them, deferred
//! with a backoff when it failed, dead-lettered when it refused them for good.
//!
//! One tokio task per channel, so a channel that is down never delays
//! another. Each wakes when pinged, when its oldest row's retry time comes,
//! and every `poll` regardless, and sends its due rows in batches: one
//! rule's events per batch (Alertmanager and mail take a list), at most one
//! event per alert in a batch, batches in queue order, so an alert's resolve
//! never overtakes its firing. A failed attempt defers the batch by an
//! exponential, jittered backoff (`min_backoff` doubling to `max_backoff`),
//! and the rows queued behind it wait for it. Delivery is at least once: a
//! request acknowledged whose mark did not reach the ledger (a crash, a
//! failed write) is sent again; receivers deduplicate on (fingerprint,
//! state, starts_at, repeat), PagerDuty on its dedup key, Alertmanager by
//! the alert's labels.
//!
//! Blocking work (SQLite, `ureq`, lettre) runs in `spawn_blocking`.

mod alertmanager;
pub mod config;
mod http;
pub mod outbox;
mod pagerduty;
mod slack;
mod smtp;
pub mod webhook;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

pub use self::{
    config::{ChannelConfig, ChannelKind, SmtpTls},
    outbox::AlertOutbox,
};
use crate::{
    alert::AlertEvent,
    ledger::{LedgerError, alert_outbox::AlertRow, writer::SharedLedger},
};

/// Why a channel could not be set up (the message names the channel and key).
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A file a key names could not be read.
    #[error("alert channel {channel:?}: {key}: reading {path}: {source}")]
    File {
        /// The channel.
        channel: String,
        /// The key naming the file.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A key's value cannot be used.
    #[error("alert channel {channel:?}: {key}: {message}")]
    Invalid {
        /// The channel.
        channel: String,
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// How an attempt to deliver a batch went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The receiver is down, slow or busy: try again later.
    Retry(String),
    /// The receiver refused this payload and would refuse it again.
    Reject(String),
}

/// A receiver of alert notifications.
pub(crate) trait Channel: Send + Sync {
    /// Events per request at most.
    fn max_batch(&self) -> usize;
    /// Delivers `batch` (blocking), all or nothing as far as the caller knows.
    fn send(&self, batch: &[AlertEvent]) -> Result<(), SendError>;
}

/// Builds the channel `c` describes, reading its secrets.
fn build(c: &ChannelConfig) -> Result<Arc<dyn Channel>, NotifyError> {
    Ok(match c.kind {
        ChannelKind::Alertmanager => Arc::new(alertmanager::Alertmanager::new(c)?),
        ChannelKind::Webhook => Arc::new(webhook::Webhook::new(c)?),
        ChannelKind::Slack => Arc::new(slack::Slack::new(c)?),
        ChannelKind::Pagerduty => Arc::new(pagerduty::PagerDuty::new(c)?),
        ChannelKind::Smtp => Arc::new(smtp::Smtp::new(c)?),
    })
}

/// When the delivery loops try again.
#[derive(Clone, Debug, PartialEq)]
pub struct DeliveryOptions {
    /// The backoff after a first failure; it doubles with each failure.
    pub min_backoff: Duration,
    /// The longest backoff.
    pub max_backoff: Duration,
    /// How often a loop looks at its queue without being woken.
    pub poll: Duration,
    /// Rows read from the queue at a time.
    pub fetch: usize,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            min_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            poll: Duration::from_secs(30),
            fetch: 256,
        }
    }
}

impl DeliveryOptions {
    /// The wait after the `attempts`-th failure in a row: `min_backoff ×
    /// 2^(attempts-1)` capped at `max_backoff`, then jittered into its upper
    /// half so that agents restarted together do not retry in step.
    pub fn backoff(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(30);
        let full = self
            .min_backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff);
        let half = full / 2;
        let jitter_ns = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(fastrand::u64(0..=jitter_ns))
    }
}

/// One channel's counters.
#[derive(Debug, Default)]
struct Stats {
    sent: AtomicU64,
    failures: AtomicU64,
    dead: AtomicU64,
    mark_failures: AtomicU64,
    pending: AtomicU64,
}

/// The `/metrics` names of one channel's counters (leaked once per channel
/// at start: a handful of strings for the daemon's life).
#[derive(Debug)]
struct Names {
    sent: &'static str,
    failures: &'static str,
    dead: &'static str,
    mark_failures: &'static str,
    pending: &'static str,
}

impl Names {
    fn of(channel: &str) -> Self {
        let leak = |base: &str| -> &'static str {
            Box::leak(format!("{base}{{channel=\"{channel}\"}}").into_boxed_str())
        };
        Self {
            sent: leak("mentat_agent_alert_notifications_sent_total"),
            failures: leak("mentat_agent_alert_notification_failures_total"),
            dead: leak("mentat_agent_alert_notifications_dead_letter_total"),
            mark_failures: leak("mentat_agent_alert_notification_mark_failures_total"),
            pending: leak("mentat_agent_alert_notifications_pending"),
        }
    }
}

struct ChannelHandle {
    name: String,
    stats: Arc<Stats>,
    names: Names,
}

/// The running delivery: wake it after enqueueing, read its counters.
#[derive(Clone)]
pub struct Notifier {
    wake: Arc<watch::Sender<u64>>,
    channels: Arc<Vec<ChannelHandle>>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier")
            .field("channels", &self.channel_names())
            .finish_non_exhaustive()
    }
}

impl Notifier {
    /// Wakes every channel's loop to look for due rows now (call after enqueueing).
    pub fn wake(&self) {
        self.wake.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// The channels' names, in config order.
    pub fn channel_names(&self) -> Vec<String> {
        self.channels.iter().map(|c| c.name.clone()).collect()
    }

    /// `(channel, event)` for every channel and event: what to enqueue when
    /// every event goes to every channel.
    pub fn fan_out(&self, events: &[AlertEvent]) -> Vec<(String, AlertEvent)> {
        self.channels
            .iter()
            .flat_map(|c| events.iter().map(|e| (c.name.clone(), e.clone())))
            .collect()
    }

    /// Each channel's counters as (name with its `channel` label, HELP, value), for `/metrics`.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = Vec::with_capacity(self.channels.len() * 5);
        for c in self.channels.iter() {
            let (n, s) = (&c.names, &c.stats);
            out.extend([
                (
                    n.sent,
                    "Alert notifications a channel's receiver acknowledged.",
                    get(&s.sent),
                ),
                (
                    n.failures,
                    "Failed attempts to deliver a batch of alert notifications (retried with backoff; nothing is dropped).",
                    get(&s.failures),
                ),
                (
                    n.dead,
                    "Alert notifications a channel's receiver refused for good (a 4xx other than 408/429, SMTP 550-554): kept in the ledger's alert outbox as dead letters.",
                    get(&s.dead),
                ),
                (
                    n.mark_failures,
                    "Acknowledged alert notifications whose delivery could not be written to the ledger (sent again later).",
                    get(&s.mark_failures),
                ),
                (
                    n.pending,
                    "Alert notifications queued for a channel and not yet delivered.",
                    get(&s.pending),
                ),
            ]);
        }
        out
    }
}

/// Builds every channel (reading their secrets) and starts one delivery
/// task per channel on the current tokio runtime; they stop when `stop`
/// turns true. The tasks resume whatever the outbox holds (a restart sends
/// what the last run queued and did not send).
pub fn start(
    ledger: SharedLedger,
    channels: &[ChannelConfig],
    options: DeliveryOptions,
    stop: watch::Receiver<bool>,
) -> Result<(Notifier, Vec<JoinHandle<()>>), NotifyError> {
    let built = channels
        .iter()
        .map(|c| Ok((c.name.clone(), build(c)?)))
        .collect::<Result<Vec<_>, NotifyError>>()?;
    let (wake, _) = watch::channel(0u64);
    let wake = Arc::new(wake);
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    for (name, channel) in built {
        let stats = Arc::new(Stats::default());
        handles.push(ChannelHandle {
            names: Names::of(&name),
            name: name.clone(),
            stats: stats.clone(),
        });
        let task = Task {
            ledger: ledger.clone(),
            name,
            channel,
            stats,
            options: options.clone(),
            last_warning: None,
        };
        tasks.push(tokio::spawn(task.run(wake.subscribe(), stop.clone())));
    }
    Ok((
        Notifier {
            wake,
            channels: Arc::new(handles),
        },
        tasks,
    ))
}

/// A failed warning is logged at most this often per channel.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// How long a loop waits after its ledger failed it.
const LEDGER_RETRY: Duration = Duration::from_secs(1);

struct Task {
    ledger: SharedLedger,
    name: String,
    channel: Arc<dyn Channel>,
    stats: Arc<Stats>,
    options: DeliveryOptions,
    last_warning: Option<Instant>,
}

fn now_ns() -> i64 {
    i64::try_from(crate::probes::clock::unix_ns(SystemTime::now())).unwrap_or(i64::MAX)
}

fn ns_of(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

impl Task {
    async fn run(mut self, mut wake: watch::Receiver<u64>, mut stop: watch::Receiver<bool>) {
        let mut woken = true;
        loop {
            if *stop.borrow() {
                return;
            }
            let next_ns = self.drain().await;
            self.count_pending().await;
            let until_next = next_ns.map(|ns| {
                Duration::from_nanos(u64::try_from(ns.saturating_sub(now_ns())).unwrap_or(0))
            });
            let sleep = until_next.map_or(self.options.poll, |d| d.min(self.options.poll));
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                changed = wake.changed(), if woken => {
                    // The notifier is gone: only the timer wakes this loop now.
                    woken = changed.is_ok();
                }
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// Runs `f` on the ledger in a blocking thread.
    async fn ledger<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut crate::ledger::Ledger) -> Result<T, LedgerError> + Send + 'static,
    ) -> Result<T, String> {
        let ledger = self.ledger.clone();
        match tokio::task::spawn_blocking(move || f(&mut ledger.lock())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("the ledger task failed: {e}")),
        }
    }

    fn warn_limited(&mut self, what: &str, error: &str) {
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            self.last_warning = Some(now);
            warn!(channel = %self.name, %error, "{what} (logged at most once a minute per channel)");
        }
    }

    /// Sends every due row; returns when to look again (None: nothing pending).
    async fn drain(&mut self) -> Option<i64> {
        loop {
            let name = self.name.clone();
            let fetch = self.options.fetch;
            let now = now_ns();
            let rows = match self
                .ledger(move |l| l.due_alert_rows(&name, now, fetch))
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    self.warn_limited("reading the alert outbox failed", &e);
                    return Some(now_ns().saturating_add(ns_of(LEDGER_RETRY)));
                }
            };
            if rows.is_empty() {
                let name = self.name.clone();
                return match self.ledger(move |l| l.next_alert_due(&name)).await {
                    Ok(next) => next,
                    Err(e) => {
                        self.warn_limited("reading the alert outbox failed", &e);
                        Some(now_ns().saturating_add(ns_of(LEDGER_RETRY)))
                    }
                };
            }
            let full = rows.len() >= self.options.fetch;
            let (batches, undecodable) = batches(rows, self.channel.max_batch());
            for (row, reason) in undecodable {
                self.refused(vec![row.id], reason).await;
            }
            for batch in batches {
                if let Some(next) = self.deliver(batch).await {
                    return Some(next);
                }
            }
            if !full {
                // Look again at once: rows may have been queued meanwhile;
                // the next pass finds none due and sleeps.
                continue;
            }
        }
    }

    /// Refreshes the pending gauge (through the queue's index: cheap).
    async fn count_pending(&mut self) {
        let name = self.name.clone();
        match self.ledger(move |l| l.pending_alert_count(&name)).await {
            Ok(n) => self.stats.pending.store(n, Ordering::Relaxed),
            Err(e) => self.warn_limited("counting the alert outbox failed", &e),
        }
    }

    /// Sends one batch; Some(when to look again) when the loop must stop here.
    async fn deliver(&mut self, batch: Batch) -> Option<i64> {
        let ids: Vec<i64> = batch.iter().map(|(r, _)| r.id).collect();
        let attempts = batch.iter().map(|(r, _)| r.attempts).max().unwrap_or(0);
        let events: Vec<AlertEvent> = batch.into_iter().map(|(_, e)| e).collect();
        let n = events.len() as u64;
        let channel = self.channel.clone();
        let result = tokio::task::spawn_blocking(move || channel.send(&events))
            .await
            .unwrap_or_else(|e| Err(SendError::Retry(format!("the sending task failed: {e}"))));
        match result {
            Ok(()) => {
                let marked_ids = ids.clone();
                match self
                    .ledger(move |l| l.mark_alert_rows_sent(&marked_ids))
                    .await
                {
                    Ok(()) => {
                        self.stats.sent.fetch_add(n, Ordering::Relaxed);
                        if attempts > 0 {
                            info!(channel = %self.name, attempts, "alert channel delivers again");
                        }
                        None
                    }
                    Err(e) => {
                        self.stats.mark_failures.fetch_add(n, Ordering::Relaxed);
                        self.warn_limited(
                            "alert notifications were delivered but could not be marked sent; they will be sent again",
                            &e,
                        );
                        Some(now_ns().saturating_add(ns_of(LEDGER_RETRY)))
                    }
                }
            }
            Err(SendError::Retry(error)) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                let wait = self.options.backoff(attempts.saturating_add(1));
                let next = now_ns().saturating_add(ns_of(wait));
                self.warn_limited(
                    &format!("alert channel failed; retrying in {wait:?}, nothing is dropped"),
                    &error,
                );
                if let Err(e) = self
                    .ledger(move |l| l.defer_alert_rows(&ids, next, &error))
                    .await
                {
                    self.warn_limited("deferring alert notifications failed", &e);
                }
                Some(next)
            }
            Err(SendError::Reject(reason)) => {
                self.refused(ids, reason).await;
                None
            }
        }
    }

    async fn refused(&mut self, ids: Vec<i64>, reason: String) {
        let n = ids.len() as u64;
        self.warn_limited(
            &format!(
                "alert channel refused {n} notification(s) for good; kept as dead letters in the ledger"
            ),
            &reason,
        );
        match self
            .ledger(move |l| l.dead_letter_alert_rows(&ids, &reason))
            .await
        {
            Ok(()) => {
                self.stats.dead.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => self.warn_limited("dead-lettering alert notifications failed", &e),
        }
    }
}

/// A batch: rows with their decoded events.
type Batch = Vec<(AlertRow, AlertEvent)>;

/// Groups due rows into batches of one rule's events, at most `max` each and
/// at most one event per alert, in queue order (a batch's place is its
/// first row's); rows whose event does not decode come back apart.
fn batches(rows: Vec<AlertRow>, max: usize) -> (Vec<Batch>, Vec<(AlertRow, String)>) {
    let max = max.max(1);
    let mut out: Vec<Batch> = Vec::new();
    let mut open: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut bad = Vec::new();
    for row in rows {
        let event = match outbox::decode(&row) {
            Ok(e) => e,
            Err(reason) => {
                bad.push((row, reason));
                continue;
            }
        };
        let fits = open.get(&row.rule).and_then(|&i| {
            let b = &out[i];
            (b.len() < max && !b.iter().any(|(r, _)| r.fingerprint == row.fingerprint)).then_some(i)
        });
        match fits {
            Some(i) => out[i].push((row, event)),
            None => {
                open.insert(row.rule.clone(), out.len());
                out.push(vec![(row, event)]);
            }
        }
    }
    (out, bad)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

/// The rules engine queues its events here: into the ledger's alert outbox
/// (on the engine's own connection, before it saves the states), then the
/// channels' delivery tasks are woken.
impl crate::alert::engine::AlertSink for Notifier {
    fn enqueue(
        &mut self,
        ledger: &mut crate::ledger::Ledger,
        items: &[(String, AlertEvent)],
    ) -> Result<usize, String> {
        let n = ledger
            .enqueue_alert_events(items)
            .map_err(|e| e.to_string())?;
        if n > 0 {
            self.wake();
        }
        Ok(n)
    }
}
