//! The committed windows after a given one: what `/v1/stream` replays on a
//! resume (`?after=<id>`).
//!
//! In: the `windows` table (one row per committed window, pruned below the
//! compaction watermark) and the watermark itself. Out: the windows whose
//! raw records are still in the ledger, oldest first, and what cannot be
//! replayed: windows folded into hourly rollups (older than
//! `raw_retention`), or an `after` that is no window this ledger committed.

use rusqlite::{OptionalExtension, params};

use super::{COMPACTED_BEFORE, Ledger, LedgerError, meta_get, sql};

/// The committed windows after a window id (its start, Unix ns).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WindowsAfter {
    /// Whether `after` is the start of a window this ledger holds.
    pub known: bool,
    /// Raw records starting before this (Unix ns) are compacted: not replayable.
    pub compacted_before: Option<i64>,
    /// Windows after `after` not returned because of the limit (the oldest ones).
    pub skipped: u64,
    /// The start of the newest window skipped, when some were.
    pub skipped_until: Option<i64>,
    /// (window start, window end, earliest start of a record committed with
    /// it) in Unix ns, oldest first, at most `limit`.
    pub windows: Vec<(i64, i64, i64)>,
}

/// The longest a committed record may reach back before its window: an
/// idle process's record spans at most 1.5 idle_interval (≤ 1 h), so 2 h.
const MAX_RECORD_SPAN_NS: i64 = 2 * 3600 * 1_000_000_000;

impl Ledger {
    /// The newest `limit` committed windows starting after `after` (Unix ns),
    /// oldest first, and what lies before them that cannot be replayed.
    pub fn windows_after(&self, after: i64, limit: usize) -> Result<WindowsAfter, LedgerError> {
        let path = &self.path;
        let e = sql(path, "listing committed windows");
        let known: bool = self
            .conn
            .query_row(
                "SELECT EXISTS (SELECT 1 FROM windows WHERE ws_ns = ?1)",
                params![after],
                |r| r.get(0),
            )
            .map_err(&e)?;
        let compacted_before = meta_get(&self.conn, path, COMPACTED_BEFORE)?;
        let total: i64 = self
            .conn
            .query_row(
                "SELECT COUNT(*) FROM windows WHERE ws_ns > ?1",
                params![after],
                |r| r.get(0),
            )
            .map_err(&e)?;
        let limit_i = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT ws_ns, we_ns FROM windows WHERE ws_ns > ?1 \
                 ORDER BY ws_ns DESC LIMIT ?2",
            )
            .map_err(&e)?;
        let mut windows = stmt
            .query_map(params![after, limit_i], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(&e)?
            .collect::<Result<Vec<(i64, i64)>, _>>()
            .map_err(&e)?;
        windows.reverse();
        // A record committed with a window may start windows before it (an
        // idle process's spans up to 1.5 idle_interval, at most 1.5 h): one
        // pass finds each window's earliest, so each is then read exactly.
        let mut earliest = std::collections::HashMap::new();
        if let Some(&(first, _)) = windows.first() {
            let mut stmt = self
                .conn
                .prepare(
                    "SELECT we_ns, MIN(ws_ns) FROM records WHERE ws_ns >= ?1 AND we_ns > ?2 \
                     GROUP BY we_ns",
                )
                .map_err(&e)?;
            let rows = stmt
                .query_map(
                    params![first.saturating_sub(MAX_RECORD_SPAN_NS), first],
                    |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
                )
                .map_err(&e)?;
            for row in rows {
                let (we, ws) = row.map_err(&e)?;
                earliest.insert(we, ws);
            }
        }
        let windows: Vec<(i64, i64, i64)> = windows
            .into_iter()
            .map(|(ws, we)| (ws, we, earliest.get(&we).copied().unwrap_or(ws).min(ws)))
            .collect();
        let skipped = u64::try_from(total.saturating_sub(limit_i).max(0)).unwrap_or(0);
        let skipped_until = if skipped > 0 {
            self.conn
                .query_row(
                    "SELECT ws_ns FROM windows WHERE ws_ns > ?1 ORDER BY ws_ns LIMIT 1 OFFSET ?2",
                    params![after, total.saturating_sub(limit_i) - 1],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map_err(&e)?
        } else {
            None
        };
        Ok(WindowsAfter {
            known,
            compacted_before,
            skipped,
            skipped_until,
            windows,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{str::FromStr, time::Duration};

    use rust_decimal::Decimal;

    use super::*;
    use crate::{
        probes::clock::rfc3339_of_ns,
        report::record::{Cost, UsageRecord},
    };

    const S: i64 = 1_000_000_000;
    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600 * S;

    fn rec(id: &str, ws: i64, we: i64, total: &str) -> UsageRecord {
        let total = Decimal::from_str(total).expect("decimal");
        UsageRecord {
            record_id: id.into(),
            node: "n1".into(),
            window_start: rfc3339_of_ns(ws),
            window_end: rfc3339_of_ns(we),
            record_kind: "process".into(),
            cost: Some(Cost {
                cpu: total,
                subtotal: total,
                total,
                currency: "USD".into(),
                pricing_version: "v1".into(),
                ..Cost::default()
            }),
            ..UsageRecord::default()
        }
    }

    #[test]
    fn a_window_holds_the_idle_record_committed_with_it_and_resume_lists_it() {
        let dir = std::env::temp_dir().join(format!("mentat-windows-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut l = Ledger::open(&dir.join("l.db"), Duration::from_secs(86_400)).expect("open");
        let w = |k: i64| (T0 + k * 10 * S, T0 + (k + 1) * 10 * S);
        for (k, records) in [
            (0, vec![rec("a", w(0).0, w(0).1, "0.1")]),
            (1, vec![rec("b", w(1).0, w(1).1, "0.2")]),
            // An idle process's record: from the first window's start to the
            // third's end, committed with the third.
            (
                2,
                vec![
                    rec("c", w(2).0, w(2).1, "0.3"),
                    rec("idle", w(0).0, w(2).1, "0.04"),
                ],
            ),
        ] {
            let (ws, we) = w(k);
            l.commit_window(&rfc3339_of_ns(ws), &rfc3339_of_ns(we), &records, &[])
                .expect("commit");
        }
        let total = |rows: Vec<(super::super::Group, super::super::Totals)>| {
            rows.into_iter()
                .next()
                .map(|(_, t)| t.cost.total)
                .unwrap_or_default()
        };
        let third = l
            .totals_committed_with(w(2).0, w(2).1, w(0).0, &[], &[])
            .expect("totals");
        assert_eq!(total(third), Decimal::from_str("0.34").expect("d"));
        // By start alone the third window misses the idle record.
        let by_start = l
            .totals(&rfc3339_of_ns(w(2).0), &rfc3339_of_ns(w(2).0 + 1), &[], &[])
            .expect("totals");
        assert_eq!(total(by_start), Decimal::from_str("0.3").expect("d"));
        // Resume after the first window: the other two, the third reaching back.
        let after = l.windows_after(w(0).0, 10).expect("windows");
        assert!(after.known);
        assert_eq!(
            after.windows,
            vec![(w(1).0, w(1).1, w(1).0), (w(2).0, w(2).1, w(0).0)]
        );
        // The committed-with sums of every window are the whole ledger's.
        let mut sum = Decimal::ZERO;
        for (ws, we, min) in l.windows_after(0, 10).expect("windows").windows {
            sum += total(
                l.totals_committed_with(ws, we, min, &[], &[])
                    .expect("totals"),
            );
        }
        assert_eq!(sum, Decimal::from_str("0.64").expect("d"));
        // An id it never committed, and the limit.
        let unknown = l.windows_after(123, 1).expect("windows");
        assert!(!unknown.known);
        assert_eq!(unknown.skipped, 2);
        assert_eq!(unknown.skipped_until, Some(w(1).0));
        assert_eq!(unknown.windows.len(), 1);
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
