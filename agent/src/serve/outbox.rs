//! The ledger as an exporter's outbox: what is still to send, and the
//! acknowledged running totals, both kept durably so that an outage or a
//! restart delays usage but never loses or doubles it.

use std::collections::HashMap;

use crate::{
    ledger::{LedgerError, SeriesId, SeriesState, writer::SharedLedger},
    report::record::UsageRecord,
    serve::export::Outbox,
};

/// One exporter's queue in the shared ledger.
#[derive(Debug)]
pub struct LedgerOutbox {
    ledger: SharedLedger,
    exporter: &'static str,
}

impl LedgerOutbox {
    /// The outbox of `exporter` (the name its queue is kept under).
    pub fn new(ledger: SharedLedger, exporter: &'static str) -> Self {
        Self { ledger, exporter }
    }
}

impl Outbox for LedgerOutbox {
    fn pending(&mut self, limit: usize) -> Result<Vec<UsageRecord>, LedgerError> {
        self.ledger.lock().pending(self.exporter, limit)
    }

    fn series(&mut self, keys: &[SeriesId]) -> Result<HashMap<SeriesId, SeriesState>, LedgerError> {
        self.ledger.lock().export_series(self.exporter, keys)
    }

    fn delivered(
        &mut self,
        record_ids: &[String],
        series: &[(SeriesId, SeriesState)],
        rejected: Option<&str>,
    ) -> Result<(), LedgerError> {
        self.ledger
            .lock()
            .mark_delivered_with(self.exporter, record_ids, series, rejected)
    }

    fn dead_letter(&mut self, record_ids: &[String], reason: &str) -> Result<(), LedgerError> {
        self.ledger
            .lock()
            .dead_letter(self.exporter, record_ids, reason)
    }

    fn evict_series(&mut self, idle_before_ns: u64) -> Result<u64, LedgerError> {
        self.ledger
            .lock()
            .evict_export_series(self.exporter, idle_before_ns)
    }

    fn reset_series(&mut self) -> Result<u64, LedgerError> {
        self.ledger.lock().reset_export_series(self.exporter)
    }
}
