//! Alerting: rules evaluated over the ledger after each committed window,
//! and the notifications their state changes send.
//!
//! In: the ledger (committed windows, read through its queries). Out: alert
//! states persisted in the ledger, and [`AlertEvent`]s queued in the ledger's
//! alert outbox, delivered to channels (Alertmanager, webhook, Slack,
//! PagerDuty, SMTP) by `notify`. This stage reads the ledger and never
//! writes usage; `serve` shows what it decided (`/v1/alerts`, `/v1/stream`).
//!
//! Per-run and per-customer cost cannot be Prometheus labels (cardinality),
//! so the agent evaluates these rules itself.

#[cfg(test)]
mod bench;
pub mod engine;
pub mod eval;
pub mod notify;
pub mod rules;
pub mod state;
#[cfg(test)]
pub(crate) mod testutil;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Where an alert is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertState {
    /// The condition holds, for less than the rule's `for`.
    Pending,
    /// The condition has held for the rule's `for`: notified.
    Firing,
    /// It fired and the condition no longer holds: notified once.
    Resolved,
}

/// One state change of one alert (a rule × a group), as notified to
/// channels and shown on the stream. Only `Firing` and `Resolved` are sent
/// to channels; a firing alert is sent again every repeat interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// The rule's name (also `labels["alertname"]`).
    pub rule: String,
    /// `threshold`, `budget`, `anomaly` or `waste`.
    pub kind: String,
    /// Stable hex hash of (rule, group key): one alert's identity across
    /// restarts; PagerDuty's dedup key, the outbox's idempotency key with
    /// `state` and `starts_at`.
    pub fingerprint: String,
    /// The state this event announces.
    pub state: AlertState,
    /// Alertmanager-style labels: `alertname`, the rule's labels, the
    /// group's field (e.g. `run_id`), `node`, `severity` where given.
    pub labels: BTreeMap<String, String>,
    /// Annotations with the rule's templates filled in (`summary`, ...).
    pub annotations: BTreeMap<String, String>,
    /// The measured value that decided the state, exact decimal text.
    pub value: String,
    /// The threshold or budget it was compared with, exact decimal text.
    pub threshold: String,
    /// When the condition began to hold (RFC 3339): firing and its resolve share it.
    pub starts_at: String,
    /// When it resolved (RFC 3339); None while firing.
    pub ends_at: Option<String>,
    /// When this event was decided (RFC 3339): the evaluated window's end.
    pub at: String,
    /// The node whose agent decided it.
    pub node: String,
    /// 0 for a state's first notification; n for the n-th repeat of a
    /// firing alert (every repeat interval). With (fingerprint, state,
    /// starts_at) the outbox's idempotency key: re-deciding the same event
    /// after a restart queues nothing new.
    #[serde(default)]
    pub repeat: u32,
    /// A firing alert holds at least until then (RFC 3339): the engine
    /// sends a repeat before it (Alertmanager's `endsAt` for a firing alert,
    /// so that it does not resolve on its own while the agent is up).
    #[serde(default)]
    pub valid_until: Option<String>,
}
