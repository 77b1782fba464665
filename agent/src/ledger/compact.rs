//! Compaction: old hours of raw records into exact hourly rollups.
//!
//! 1. Raise the `compacted_before` watermark (and prune old `windows` rows,
//!    keeping the newest) in one commit, before any record moves: from then
//!    on nothing below it can be committed, so a record can never be counted
//!    both in a rollup and again as a re-committed raw record.
//! 2. Per hour below the cutoff, in batches of [`BATCH`] delivered records,
//!    each batch one transaction: sum into `hourly` (merging with the row
//!    already there) and delete the raw rows. A crash leaves every record
//!    either raw or rolled up, never both; batches bound the WAL however big
//!    an hour is.
//! 3. If more than a quarter of the file is free pages, give them back to
//!    the file system in steps (each its own commit, so the WAL stays small),
//!    then checkpoint and truncate the WAL. In steady state (retention much
//!    longer than the compaction interval) freed pages are simply reused by
//!    new windows, and nothing is moved.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
};

use rusqlite::{
    Connection, Transaction, TransactionBehavior, params, params_from_iter, types::Value,
};

use super::{
    COMPACTED_BEFORE, CompactStats, DEC_COLS, HOUR_NS, INT_COLS, LedgerError, checkpoint, corrupt,
    meta_get,
    models::{self, TYPE_COLS, TokenTypes},
    sql,
    sum::{Acc, Currencies, is_priced},
    times::floor_hour,
    u64_to_i64,
};

/// Records folded per transaction: about 5 MB of pages in the WAL.
const BATCH: i64 = 20_000;
/// Pages freed per incremental-vacuum step (8 MiB at 4 KiB pages).
const VACUUM_STEP: i64 = 2_048;
/// The db is shrunk only when free pages exceed this fraction of it.
const VACUUM_FREE_FRACTION: i64 = 4;

/// A record with no exporter still owing it.
const DELIVERED: &str = "NOT EXISTS (SELECT 1 FROM outbox o \
     WHERE o.ws_ns = records.ws_ns AND o.record_id = records.record_id)";

/// Compacts every raw record starting before `cutoff` (an hour boundary).
pub(super) fn run(
    conn: &mut Connection,
    path: &Path,
    cutoff: i64,
) -> Result<CompactStats, LedgerError> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sql(path, "beginning compaction"))?;
    if meta_get(&tx, path, COMPACTED_BEFORE)?.is_none_or(|old| old < cutoff) {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![COMPACTED_BEFORE, cutoff],
        )
        .map_err(sql(path, "raising the compaction watermark"))?;
    }
    tx.execute(
        "DELETE FROM windows WHERE we_ns < ?1 AND we_ns < (SELECT MAX(we_ns) FROM windows)",
        params![cutoff],
    )
    .map_err(sql(path, "pruning old windows"))?;
    tx.commit().map_err(sql(path, "committing the watermark"))?;

    let mut stats = CompactStats::default();
    let mut from = i64::MIN;
    loop {
        let first: Option<i64> = conn
            .query_row(
                "SELECT MIN(ws_ns) FROM records WHERE ws_ns >= ?1 AND ws_ns < ?2",
                params![from, cutoff],
                |r| r.get(0),
            )
            .map_err(sql(path, "finding the next hour to compact"))?;
        let Some(first) = first else { break };
        let hour = floor_hour(first);
        let end = hour.saturating_add(HOUR_NS);
        let mut after = (i64::MIN, String::new());
        let mut rows_written = HashSet::new();
        loop {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(sql(path, "beginning a compaction batch"))?;
            let last = compact_batch(
                &tx,
                path,
                (hour, end),
                &after,
                &mut rows_written,
                &mut stats,
            )?;
            tx.commit()
                .map_err(sql(path, "committing a compaction batch"))?;
            match last {
                Some(last) => after = last,
                None => break,
            }
        }
        let kept: i64 = conn
            .query_row(
                "SELECT COUNT(*) FROM records WHERE ws_ns >= ?1 AND ws_ns < ?2",
                params![hour, end],
                |r| r.get(0),
            )
            .map_err(sql(path, "counting undelivered records"))?;
        stats.kept_undelivered += u64::try_from(kept).unwrap_or(0);
        stats.rollup_rows += rows_written.len() as u64;
        from = end;
    }
    if stats.kept_undelivered > 0 {
        tracing::warn!(
            path = %path.display(),
            kept = stats.kept_undelivered,
            "ledger: records past retention kept because an exporter has not confirmed them"
        );
    }
    if stats.records_compacted > 0 {
        shrink(conn, path)?;
    }
    Ok(stats)
}

/// Folds up to [`BATCH`] delivered records of `hour` after `after` into
/// `hourly` and deletes them; returns the last one's key, or None when the
/// hour had no more. Adds the rollup rows it wrote to `written`, and the
/// records it moved to `stats`.
fn compact_batch(
    tx: &Transaction<'_>,
    path: &Path,
    (hour, end): (i64, i64),
    after: &(i64, String),
    written: &mut HashSet<(i64, Option<String>)>,
    stats: &mut CompactStats,
) -> Result<Option<(i64, String)>, LedgerError> {
    let mut currencies = Currencies::default();
    let mut accs: HashMap<(i64, Option<usize>), Acc> = HashMap::new();
    let mut by_model: HashMap<(i64, Option<usize>, String), (Acc, TokenTypes)> = HashMap::new();
    let mut read = 0u64;
    let mut last: Option<(i64, String)> = None;
    {
        let query = format!(
            "SELECT ws_ns, record_id, ident, currency, {}, {}, tokens FROM records \
             WHERE ws_ns >= ?1 AND ws_ns < ?2 AND (ws_ns, record_id) > (?3, ?4) AND {DELIVERED} \
             ORDER BY ws_ns, record_id LIMIT ?5",
            DEC_COLS.join(", "),
            INT_COLS.join(", ")
        );
        let mut stmt = tx
            .prepare_cached(&query)
            .map_err(sql(path, "preparing compaction"))?;
        let mut rows = stmt
            .query(params![hour, end, after.0, after.1, BATCH])
            .map_err(sql(path, "reading records to compact"))?;
        while let Some(row) = rows
            .next()
            .map_err(sql(path, "reading records to compact"))?
        {
            let e = sql(path, "reading records to compact");
            let ident: i64 = row.get(2).map_err(&e)?;
            let cur = currencies.index(row, 3, path)?;
            let mut whole = Acc::default();
            whole.add_raw(row, 4, is_priced(row, 3, path)?, path)?;
            accs.entry((ident, cur)).or_default().merge(&whole)?;
            let tokens: Option<String> =
                row.get(4 + DEC_COLS.len() + INT_COLS.len()).map_err(&e)?;
            if tokens.is_some() {
                for part in models::split(whole, tokens.as_deref(), path)? {
                    if let Some(model) = part.model {
                        let slot = by_model.entry((ident, cur, model)).or_default();
                        slot.0.merge(&part.acc)?;
                        slot.1 = slot.1.checked_add(part.types)?;
                    }
                }
            }
            read += 1;
            last = Some((row.get(0).map_err(&e)?, row.get(1).map_err(&e)?));
        }
    }
    let Some(last) = last else {
        return Ok(None);
    };
    let deleted = tx
        .execute(
            &format!(
                "DELETE FROM records WHERE ws_ns >= ?1 AND ws_ns < ?2 \
                 AND (ws_ns, record_id) > (?3, ?4) AND (ws_ns, record_id) <= (?5, ?6) \
                 AND {DELIVERED}"
            ),
            params![hour, end, after.0, after.1, last.0, last.1],
        )
        .map_err(sql(path, "deleting compacted records"))?;
    if u64::try_from(deleted).ok() != Some(read) {
        // Same predicate in the same transaction: cannot differ unless the file is damaged.
        return Err(corrupt(
            path,
            format!("compaction read {read} records but deleted {deleted}"),
        ));
    }

    let cols = format!(
        "records, priced, {}, {}",
        DEC_COLS.join(", "),
        INT_COLS.join(", ")
    );
    let mut existing = tx
        .prepare_cached(&format!(
            "SELECT {cols} FROM hourly WHERE hour_ns = ?1 AND ident = ?2 AND currency = ?3"
        ))
        .map_err(sql(path, "preparing rollup read"))?;
    let updates: Vec<String> = ["records", "priced"]
        .iter()
        .chain(DEC_COLS.iter())
        .chain(INT_COLS.iter())
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let placeholders: Vec<String> = (1..=5 + DEC_COLS.len() + INT_COLS.len())
        .map(|i| format!("?{i}"))
        .collect();
    let mut upsert = tx
        .prepare_cached(&format!(
            "INSERT INTO hourly (hour_ns, ident, currency, {cols}) VALUES ({}) \
             ON CONFLICT (hour_ns, ident, currency) DO UPDATE SET {}",
            placeholders.join(", "),
            updates.join(", ")
        ))
        .map_err(sql(path, "preparing rollup write"))?;
    for ((ident, cur), mut acc) in accs {
        // '' marks unpriced records: NULL cannot be part of a unique key.
        let currency = cur.map(|c| currencies.name(c)).unwrap_or_default();
        let mut rows = existing
            .query(params![hour, ident, currency])
            .map_err(sql(path, "reading a rollup"))?;
        if let Some(row) = rows.next().map_err(sql(path, "reading a rollup"))? {
            acc.add_rollup(row, 0, path)?;
        }
        drop(rows);
        let mut values: Vec<Value> = vec![
            Value::Integer(hour),
            Value::Integer(ident),
            Value::Text(currency),
            Value::Integer(u64_to_i64(acc.records, "records")?),
            Value::Integer(u64_to_i64(acc.priced, "priced records")?),
        ];
        values.extend(acc.dec.iter().map(|e| Value::Text(e.to_string())));
        for (v, name) in acc.ints.iter().zip(INT_COLS) {
            values.push(Value::Integer(u64_to_i64(*v, name)?));
        }
        upsert
            .execute(params_from_iter(values))
            .map_err(sql(path, "writing a rollup"))?;
        written.insert((ident, cur.map(|c| currencies.name(c))));
    }
    write_model_rollups(tx, path, hour, by_model, &currencies)?;
    stats.records_compacted += read;
    Ok(Some(last))
}

/// Adds a batch's model parts to `hourly_models`, merging with the rows already there.
fn write_model_rollups(
    tx: &Transaction<'_>,
    path: &Path,
    hour: i64,
    by_model: HashMap<(i64, Option<usize>, String), (Acc, TokenTypes)>,
    currencies: &Currencies,
) -> Result<(), LedgerError> {
    if by_model.is_empty() {
        return Ok(());
    }
    let cols = format!(
        "records, priced, {}, {}, {}",
        DEC_COLS.join(", "),
        INT_COLS.join(", "),
        TYPE_COLS.join(", ")
    );
    let mut existing = tx
        .prepare_cached(&format!(
            "SELECT {cols} FROM hourly_models \
             WHERE hour_ns = ?1 AND ident = ?2 AND currency = ?3 AND model = ?4"
        ))
        .map_err(sql(path, "preparing model rollup read"))?;
    let n = 2 + DEC_COLS.len() + INT_COLS.len() + TYPE_COLS.len();
    let updates: Vec<String> = ["records", "priced"]
        .iter()
        .chain(DEC_COLS.iter())
        .chain(INT_COLS.iter())
        .chain(TYPE_COLS.iter())
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let placeholders: Vec<String> = (1..=4 + n).map(|i| format!("?{i}")).collect();
    let mut upsert = tx
        .prepare_cached(&format!(
            "INSERT INTO hourly_models (hour_ns, ident, currency, model, {cols}) VALUES ({}) \
             ON CONFLICT (hour_ns, ident, currency, model) DO UPDATE SET {}",
            placeholders.join(", "),
            updates.join(", ")
        ))
        .map_err(sql(path, "preparing model rollup write"))?;
    for ((ident, cur, model), (mut acc, mut types)) in by_model {
        let currency = cur.map(|c| currencies.name(c)).unwrap_or_default();
        let mut rows = existing
            .query(params![hour, ident, currency, model])
            .map_err(sql(path, "reading a model rollup"))?;
        if let Some(row) = rows.next().map_err(sql(path, "reading a model rollup"))? {
            acc.add_rollup(row, 0, path)?;
            let first = 2 + DEC_COLS.len() + INT_COLS.len();
            let mut had = [0u64; 7];
            for (k, v) in had.iter_mut().enumerate() {
                let x: i64 = row
                    .get(first + k)
                    .map_err(sql(path, "reading a model rollup"))?;
                *v = u64::try_from(x).map_err(|_| corrupt(path, "a negative token count"))?;
            }
            types = types.checked_add(TokenTypes::from_array(had))?;
        }
        drop(rows);
        let mut values: Vec<Value> = vec![
            Value::Integer(hour),
            Value::Integer(ident),
            Value::Text(currency),
            Value::Text(model),
            Value::Integer(u64_to_i64(acc.records, "records")?),
            Value::Integer(u64_to_i64(acc.priced, "priced records")?),
        ];
        values.extend(acc.dec.iter().map(|e| Value::Text(e.to_string())));
        for (v, name) in acc.ints.iter().zip(INT_COLS) {
            values.push(Value::Integer(u64_to_i64(*v, name)?));
        }
        for (v, name) in types.to_array().iter().zip(TYPE_COLS) {
            values.push(Value::Integer(u64_to_i64(*v, name)?));
        }
        upsert
            .execute(params_from_iter(values))
            .map_err(sql(path, "writing a model rollup"))?;
    }
    Ok(())
}

/// Returns free pages to the file system when they are a large part of the
/// file, then truncates the WAL.
fn shrink(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let pragma = |name: &str| -> Result<i64, LedgerError> {
        conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
            .map_err(sql(path, "reading page counts"))
    };
    let (pages, mut free) = (pragma("page_count")?, pragma("freelist_count")?);
    // auto_vacuum is INCREMENTAL (2) on every file this agent created; on
    // another, incremental_vacuum would do nothing.
    if pragma("auto_vacuum")? == 2 && free * VACUUM_FREE_FRACTION > pages {
        let mut stmt = conn
            .prepare(&format!("PRAGMA incremental_vacuum({VACUUM_STEP})"))
            .map_err(sql(path, "preparing incremental_vacuum"))?;
        while free > 0 {
            // Each step of the statement frees one page; run it to the end.
            let mut rows = stmt
                .query([])
                .map_err(sql(path, "running incremental_vacuum"))?;
            while rows
                .next()
                .map_err(sql(path, "running incremental_vacuum"))?
                .is_some()
            {}
            let left = pragma("freelist_count")?;
            if left >= free {
                break;
            }
            free = left;
        }
    }
    checkpoint(conn, path)
}
