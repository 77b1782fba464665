//! Alert events into the ledger's alert outbox, and back.
//!
//! In: `(channel, AlertEvent)` pairs the rules engine decided. Out: rows in
//! the ledger's `alert_outbox` (the ledger keeps the event as JSON beside the
//! fields of its idempotency key), and those rows decoded for delivery.
//! Pending alerts are not sent to channels (only firing and resolved are):
//! they are skipped here, not queued.

use crate::{
    alert::{AlertEvent, AlertState},
    ledger::{
        Ledger, LedgerError,
        alert_outbox::{AlertRow, NewAlertRow},
    },
};

/// The typed face of the ledger's alert outbox.
pub trait AlertOutbox {
    /// Queues each (channel name, event) in one durable transaction,
    /// idempotent on (channel, fingerprint, state, starts_at, repeat);
    /// `Pending` events are skipped. Returns how many were new.
    fn enqueue_alert_events(
        &mut self,
        items: &[(String, AlertEvent)],
    ) -> Result<usize, LedgerError>;
}

/// The state's name as stored (and as the events' JSON spells it).
pub fn state_name(s: AlertState) -> &'static str {
    match s {
        AlertState::Pending => "pending",
        AlertState::Firing => "firing",
        AlertState::Resolved => "resolved",
    }
}

impl AlertOutbox for Ledger {
    fn enqueue_alert_events(
        &mut self,
        items: &[(String, AlertEvent)],
    ) -> Result<usize, LedgerError> {
        let mut json = Vec::with_capacity(items.len());
        for (channel, e) in items {
            if e.state == AlertState::Pending {
                continue;
            }
            let text = serde_json::to_string(e).map_err(|source| LedgerError::Encode {
                record_id: format!("alert {} for channel {channel}", e.fingerprint),
                source,
            })?;
            json.push((channel.as_str(), e, text));
        }
        let rows: Vec<NewAlertRow<'_>> = json
            .iter()
            .map(|(channel, e, text)| NewAlertRow {
                channel,
                rule: &e.rule,
                fingerprint: &e.fingerprint,
                state: state_name(e.state),
                starts_at: &e.starts_at,
                repeat: e.repeat,
                event: text,
            })
            .collect();
        self.enqueue_alert_rows(&rows)
    }
}

/// A row's event, or why it does not decode (then it is dead-lettered).
pub fn decode(row: &AlertRow) -> Result<AlertEvent, String> {
    serde_json::from_str(&row.event)
        .map_err(|e| format!("stored alert event {} does not decode: {e}", row.id))
}
