//! The alert outbox: alert notifications queued per channel, durable before
//! anything is sent, so that a channel that is down delays notifications and
//! loses none, and a restart neither loses nor repeats one.
//!
//! In: rows the alert stage builds from its `AlertEvent`s (this stage does
//! not know that type: it keeps the event as JSON with the fields of its
//! idempotency key beside it). Out: each channel's due rows, oldest first.
//!
//! Invariants:
//! - Enqueueing is one fsynced transaction and idempotent on (channel,
//!   fingerprint, state, starts_at, repeat).
//! - A row leaves a channel's queue only as sent (after the receiver
//!   acknowledged it) or dead-lettered (the receiver refused it for good,
//!   with the reason; listed by [`Ledger::dead_alert_rows`]). Both are kept
//!   until the retention passes ([`Ledger::expire`]), never dropped unseen.
//! - A channel's queue is delivered in order: the rows due are a prefix of
//!   its pending rows, so a row being retried later holds back the rows
//!   queued after it (a resolve never overtakes its firing).

use rusqlite::{TransactionBehavior, params};
use serde::Serialize;

use super::{Ledger, LedgerError, corrupt, saturating_i64, sql, times::format_ns};

/// One alert notification to queue for one channel.
#[derive(Clone, Copy, Debug)]
pub struct NewAlertRow<'a> {
    /// The channel's name (`[[alert_channels]] name`).
    pub channel: &'a str,
    /// The rule that decided it.
    pub rule: &'a str,
    /// The alert's identity (rule × group).
    pub fingerprint: &'a str,
    /// `firing` or `resolved`.
    pub state: &'a str,
    /// When the alert began (RFC 3339).
    pub starts_at: &'a str,
    /// The repeat number of a firing alert (0: first).
    pub repeat: u32,
    /// The whole event as JSON.
    pub event: &'a str,
}

/// A queued alert notification, as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AlertRow {
    /// The row's id: enqueue order.
    pub id: i64,
    /// The channel.
    pub channel: String,
    /// The rule.
    pub rule: String,
    /// The alert's identity.
    pub fingerprint: String,
    /// `firing` or `resolved`.
    pub state: String,
    /// When the alert began (RFC 3339).
    pub starts_at: String,
    /// The repeat number.
    pub repeat: u32,
    /// The event as JSON.
    pub event: String,
    /// When it was queued (RFC 3339).
    pub queued_at: String,
    /// Delivery attempts that failed so far.
    pub attempts: u32,
    /// What the last failed attempt (or the refusal) said.
    pub last_error: Option<String>,
}

/// How many rows one channel has in each state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AlertOutboxCounts {
    /// Not yet sent nor refused.
    pub pending: u64,
    /// Sent and acknowledged (kept until the retention passes).
    pub sent: u64,
    /// Refused for good by the receiver.
    pub dead: u64,
}

const ROW_COLUMNS: &str = "id, channel, rule, fingerprint, state, starts_at, repeat, event, \
                           queued_ns, attempts, last_error";

fn row_from(path: &std::path::Path, r: &rusqlite::Row<'_>) -> Result<AlertRow, LedgerError> {
    let e = sql(path, "reading an alert outbox row");
    let queued_ns: i64 = r.get(8).map_err(&e)?;
    let repeat: i64 = r.get(6).map_err(&e)?;
    let attempts: i64 = r.get(9).map_err(&e)?;
    Ok(AlertRow {
        id: r.get(0).map_err(&e)?,
        channel: r.get(1).map_err(&e)?,
        rule: r.get(2).map_err(&e)?,
        fingerprint: r.get(3).map_err(&e)?,
        state: r.get(4).map_err(&e)?,
        starts_at: r.get(5).map_err(&e)?,
        repeat: u32::try_from(repeat)
            .map_err(|_| corrupt(path, format!("alert outbox repeat {repeat}")))?,
        event: r.get(7).map_err(&e)?,
        queued_at: format_ns(queued_ns)
            .ok_or_else(|| corrupt(path, format!("alert outbox queued_ns {queued_ns}")))?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        last_error: r.get(10).map_err(&e)?,
    })
}

impl Ledger {
    /// Queues alert notifications (one transaction, fsynced like a window's
    /// commit); a row already queued (same channel, fingerprint, state,
    /// starts_at, repeat), sent or not, is not queued again. Returns how many were new.
    pub fn enqueue_alert_rows(&mut self, rows: &[NewAlertRow<'_>]) -> Result<usize, LedgerError> {
        if rows.is_empty() {
            return Ok(0);
        }
        let path = self.path.as_path();
        let now = super::times::now_ns();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning an alert enqueue"))?;
        let mut new = 0;
        {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO alert_outbox (channel, fingerprint, state, starts_at, repeat, \
                     rule, event, queued_ns, next_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(sql(path, "preparing the alert enqueue"))?;
            for r in rows {
                new += put
                    .execute(params![
                        r.channel,
                        r.fingerprint,
                        r.state,
                        r.starts_at,
                        i64::from(r.repeat),
                        r.rule,
                        r.event,
                        now
                    ])
                    .map_err(sql(path, "queueing an alert notification"))?;
            }
        }
        tx.commit()
            .map_err(sql(path, "committing the alert enqueue"))?;
        Ok(new)
    }

    /// Up to `limit` of `channel`'s pending rows that are due at `now_ns`,
    /// oldest first: the longest prefix of its queue whose rows are due (a
    /// row waiting for its retry holds back those queued after it).
    pub fn due_alert_rows(
        &self,
        channel: &str,
        now_ns: i64,
        limit: usize,
    ) -> Result<Vec<AlertRow>, LedgerError> {
        let path = self.path.as_path();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS}, next_ns FROM alert_outbox INDEXED BY alert_outbox_pending \
                 WHERE channel = ?1 AND sent_ns IS NULL AND dead_ns IS NULL ORDER BY id LIMIT ?2"
            ))
            .map_err(sql(path, "preparing the due alerts"))?;
        let mut rows = stmt
            .query(params![channel, saturating_i64(limit)])
            .map_err(sql(path, "reading the due alerts"))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(sql(path, "reading the due alerts"))? {
            let next: i64 = r.get(11).map_err(sql(path, "reading the due alerts"))?;
            if next > now_ns {
                break;
            }
            out.push(row_from(path, r)?);
        }
        Ok(out)
    }

    /// When `channel`'s oldest pending row may be tried (Unix ns); None when nothing is pending.
    pub fn next_alert_due(&self, channel: &str) -> Result<Option<i64>, LedgerError> {
        let path = self.path.as_path();
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT next_ns FROM alert_outbox INDEXED BY alert_outbox_pending \
                 WHERE channel = ?1 AND sent_ns IS NULL AND dead_ns IS NULL ORDER BY id LIMIT 1",
            )
            .map_err(sql(path, "preparing the next alert due"))?;
        let mut rows = stmt
            .query([channel])
            .map_err(sql(path, "reading the next alert due"))?;
        match rows
            .next()
            .map_err(sql(path, "reading the next alert due"))?
        {
            Some(r) => Ok(Some(
                r.get(0).map_err(sql(path, "reading the next alert due"))?,
            )),
            None => Ok(None),
        }
    }

    /// How many of `channel`'s rows are pending (through the queue's index:
    /// cheap however long the sent history is).
    pub fn pending_alert_count(&self, channel: &str) -> Result<u64, LedgerError> {
        let path = self.path.as_path();
        let n: i64 = self
            .conn
            .prepare_cached(
                "SELECT COUNT(*) FROM alert_outbox INDEXED BY alert_outbox_pending \
                 WHERE channel = ?1 AND sent_ns IS NULL AND dead_ns IS NULL",
            )
            .and_then(|mut s| s.query_row([channel], |r| r.get(0)))
            .map_err(sql(path, "counting the pending alerts"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Marks rows sent (only after the receiver acknowledged them); rows already sent keep their first time.
    pub fn mark_alert_rows_sent(&mut self, ids: &[i64]) -> Result<(), LedgerError> {
        self.update_alert_rows(
            ids,
            "UPDATE alert_outbox SET sent_ns = ?2 WHERE id = ?1 AND sent_ns IS NULL",
            None,
            super::times::now_ns(),
        )
    }

    /// Records a failed attempt: each row's `attempts` goes up by one and it
    /// is not due again before `next_ns`.
    pub fn defer_alert_rows(
        &mut self,
        ids: &[i64],
        next_ns: i64,
        error: &str,
    ) -> Result<(), LedgerError> {
        self.update_alert_rows(
            ids,
            "UPDATE alert_outbox SET attempts = attempts + 1, next_ns = ?2, last_error = ?3 \
             WHERE id = ?1 AND sent_ns IS NULL AND dead_ns IS NULL",
            Some(error),
            next_ns,
        )
    }

    /// Takes rows out of their queue, refused for good by the receiver
    /// (`reason`): kept, listed by [`Ledger::dead_alert_rows`], counted by the caller.
    pub fn dead_letter_alert_rows(&mut self, ids: &[i64], reason: &str) -> Result<(), LedgerError> {
        self.update_alert_rows(
            ids,
            "UPDATE alert_outbox SET attempts = attempts + 1, dead_ns = ?2, last_error = ?3 \
             WHERE id = ?1 AND sent_ns IS NULL AND dead_ns IS NULL",
            Some(reason),
            super::times::now_ns(),
        )
    }

    fn update_alert_rows(
        &mut self,
        ids: &[i64],
        statement: &str,
        text: Option<&str>,
        ns: i64,
    ) -> Result<(), LedgerError> {
        if ids.is_empty() {
            return Ok(());
        }
        let path = self.path.as_path();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning an alert outbox update"))?;
        {
            let mut stmt = tx
                .prepare_cached(statement)
                .map_err(sql(path, "preparing an alert outbox update"))?;
            for id in ids {
                match text {
                    Some(t) => stmt.execute(params![id, ns, t]),
                    None => stmt.execute(params![id, ns]),
                }
                .map_err(sql(path, "updating an alert outbox row"))?;
            }
        }
        tx.commit()
            .map_err(sql(path, "committing an alert outbox update"))
    }

    /// How many of `channel`'s rows are pending, sent and dead-lettered.
    pub fn alert_outbox_counts(&self, channel: &str) -> Result<AlertOutboxCounts, LedgerError> {
        let path = self.path.as_path();
        let e = sql(path, "counting the alert outbox");
        let (pending, sent, dead): (i64, i64, i64) = self
            .conn
            .query_row(
                "SELECT \
                   COALESCE(SUM(sent_ns IS NULL AND dead_ns IS NULL), 0), \
                   COALESCE(SUM(sent_ns IS NOT NULL), 0), \
                   COALESCE(SUM(dead_ns IS NOT NULL), 0) \
                 FROM alert_outbox WHERE channel = ?1",
                [channel],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(&e)?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(AlertOutboxCounts {
            pending: n(pending),
            sent: n(sent),
            dead: n(dead),
        })
    }

    /// Up to `limit` dead-lettered alert notifications, newest first
    /// (`channel`: only that channel's).
    pub fn dead_alert_rows(
        &self,
        channel: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AlertRow>, LedgerError> {
        let path = self.path.as_path();
        let mut stmt = self
            .conn
            .prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM alert_outbox WHERE dead_ns IS NOT NULL \
                 AND (?1 IS NULL OR channel = ?1) ORDER BY dead_ns DESC, id DESC LIMIT ?2"
            ))
            .map_err(sql(path, "preparing the dead alerts"))?;
        let mut rows = stmt
            .query(params![channel, saturating_i64(limit)])
            .map_err(sql(path, "reading the dead alerts"))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next().map_err(sql(path, "reading the dead alerts"))? {
            out.push(row_from(path, r)?);
        }
        Ok(out)
    }

    /// Deletes rows sent or dead-lettered before `cutoff_ns` (never a pending
    /// one); returns how many. Called by [`Ledger::expire`].
    pub(super) fn expire_alert_rows(
        tx: &rusqlite::Transaction<'_>,
        path: &std::path::Path,
        cutoff_ns: i64,
    ) -> Result<u64, LedgerError> {
        let n = tx
            .execute(
                "DELETE FROM alert_outbox WHERE sent_ns < ?1 OR dead_ns < ?1",
                params![cutoff_ns],
            )
            .map_err(sql(path, "deleting expired alert notifications"))?;
        Ok(n as u64)
    }
}
