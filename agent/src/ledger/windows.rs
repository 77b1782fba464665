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
