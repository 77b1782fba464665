//! The ledger: every closed window's usage records, durable on the node
//! before any exporter sees them; an outbox per exporter; the queries the API
//! and CLI ask; and compaction of old windows into exact hourly rollups.
//!
//! # Why SQLite
//!
//! The API's questions are SQL: a time range, equality filters on identity
//! columns, grouping, paging by a cursor. SQLite in WAL mode gives atomic,
//! fsynced commits with a documented recovery story, in one well-understood
//! file an operator can copy or open with `sqlite3`. redb is a fine
//! key-value store, but every secondary access path (by time, by exporter,
//! by identity, rollups) would be an index we write and keep consistent by
//! hand. `rusqlite` is built with SQLite bundled, so the version is ours.
//!
//! # Layout
//!
//! See `schema.rs`. In short: identities (node, pid, container, pod, trace
//! context, ...) are stored once in `identities` and records point at them,
//! so a record costs about 270 bytes on disk (mostly its 14 decimals)
//! rather than kilobytes of repeated names; `records` is clustered by
//! (window start, record_id), so a window appends and a range is one scan.
//! Times are integer nanoseconds, returned in canonical RFC 3339 (UTC, `Z`,
//! fraction without trailing zeros: what `clock::rfc3339` writes, so the
//! agent's records round-trip byte for byte).
//!
//! # Exact totals
//!
//! Money and quantities are `Decimal`, never float. SQLite has no decimal
//! type: `SUM` over TEXT converts to REAL. So decimals are stored in a
//! compact exact binary form (`exact::DecBlob`) and summed in Rust with
//! [`exact::Exact`], a 28-fractional-digit fixed point on `i128` parts.
//! Integer sums make addition associative, so a total is the same whether it
//! is summed from raw records, from hourly rollups, or from a mix; it is
//! rounded to a `Decimal` (ties to even) once, at the end. Rollups store their
//! exact sums as decimal text (they may exceed a `Decimal`'s 28 digits).
//! (The alternative, fixed-point integers in several columns so SQLite's
//! integer `SUM` could add them, needs four columns per value to reach 28
//! digits without overflowing; summing in Rust is simpler and as exact.)
//!
//! # Durability
//!
//! The database runs in WAL mode with `synchronous = FULL`:
//! - [`Ledger::commit_window`] is one transaction. COMMIT appends the
//!   window's pages to the `-wal` file and fsyncs it before it returns, so
//!   once `commit_window` returns `Ok` the window survives a process crash
//!   and a power cut.
//! - A checkpoint (SQLite's automatic one at 1,000 WAL pages, inside some
//!   commit; and a TRUNCATE one after compaction) copies WAL pages into the
//!   main file: it fsyncs the WAL, writes the db, fsyncs the db, then resets
//!   the WAL. A crash at any point of it is recovered from the WAL on open.
//! - A new ledger file is checkpointed and its directory fsynced at creation,
//!   so the file's own directory entry is durable too (SQLite itself fsyncs
//!   the directory when it creates the `-wal`).
//!
//! What a power cut can lose: nothing that `commit_window` returned `Ok`
//! for. A commit in flight is either entirely there or entirely absent
//! (WAL frames are checksummed; a transaction without its commit frame is
//! ignored on recovery). The window being collected in memory, at most one
//! tick, is lost: after a restart the agent resumes from
//! [`Ledger::last_window_end`] and starts a new window from fresh counter
//! readings; it never re-derives usage from counters whose start it does
//! not know. A `mark_delivered` in flight may be lost, so a record can be
//! delivered twice: delivery is at least once, and `record_id` is the key
//! receivers deduplicate on. `commit_window` is idempotent, so retrying after
//! an ambiguous failure (error or crash after the fsync) never duplicates.
//! SIGKILL is tested; power loss relies on the fsyncs above and on storage
//! that honours them.
//!
//! # Use
//!
//! One `Ledger` writes (it is `Send`, not `Sync`: share it behind a mutex);
//! SQLite's WAL lets other connections read while it does. An exporter loops
//! `pending` → deliver → `mark_delivered`; a record it can never deliver
//! must still be marked (and logged), or it stays first in its queue and is
//! never compacted.
//!
//! # Ranges
//!
//! A record belongs to the range its window *starts* in: `from <= window_start
//! < to`, so adjacent ranges partition windows and nothing is counted twice.
//! A rollup row counts when its hour starts in `[from, to)`: over compacted
//! time, bounds are in effect rounded up to the hour.

pub mod alert_outbox;
pub mod alerts;
mod compact;
mod exact;
mod identity;
pub mod models;
mod row;
mod schema;
pub mod sim;
mod sum;
#[cfg(test)]
mod tests;
mod times;
mod windows;
pub mod writer;

pub use self::windows::WindowsAfter;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{
    Connection, OptionalExtension, Statement, Transaction, TransactionBehavior, params,
    params_from_iter,
    types::{Value, ValueRef},
};
use rust_decimal::Decimal;
use serde::Serialize;

use self::{
    exact::Exact,
    identity::{IdentityCache, resolve_identity},
    row::{INSERT_RECORD, insert_record, record_columns, record_from_row},
    sum::{Acc, Currencies, blob_exact, is_priced},
    times::{TimeCache, bad_ns, floor_hour, format_ns, month_bounds, now_ns, parse_time},
};
use crate::report::record::{Cost, SpanRow, UsageRecord};

/// The identity and trace-context columns: the names `records` and `totals` accept as filters and group-bys.
pub const FIELDS: [&str; 23] = [
    "node",
    "record_kind",
    "workload_kind",
    "pid",
    "ppid",
    "process_start_time",
    "comm",
    "exe",
    "cgroup_id",
    "cgroup_path",
    "container_id",
    "container_runtime",
    "pod_uid",
    "k8s_namespace",
    "k8s_pod_name",
    "wasm_module",
    "agent_id",
    "flow_id",
    "run_id",
    "user_id",
    "project_id",
    "customer_id",
    "trace_id",
];
const N_FIELDS: usize = FIELDS.len();
// Positions in FIELDS of the integer columns and of the billed party's.
const PID: usize = 3;
const PPID: usize = 4;
const CGROUP_ID: usize = 8;

/// Decimal columns, in `Acc::dec` order: the five quantities, then cost.
const DEC_COLS: [&str; 14] = [
    "cpu_core_seconds",
    "memory_gb_seconds",
    "gpu_seconds",
    "gpu_memory_gb_seconds",
    "gpu_energy_joules",
    "cost_cpu",
    "cost_memory",
    "cost_gpu",
    "cost_network",
    "cost_storage",
    "cost_token",
    "cost_subtotal",
    "cost_discount",
    "cost_total",
];

/// Integer columns summed, in `Acc::ints` order.
const INT_COLS: [&str; 10] = [
    "network_rx_bytes",
    "network_tx_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
    "storage_bytes",
    "syscalls",
    "tokens_input",
    "tokens_cache_read_input",
    "tokens_output",
    "tokens_reasoning_output",
];

const HOUR_NS: i64 = 3_600_000_000_000;
/// `meta` key: start of the oldest hour not yet compacted.
const COMPACTED_BEFORE: &str = "compacted_before";
/// WAL size kept after a checkpoint resets it.
const JOURNAL_SIZE_LIMIT: i64 = 64 << 20;

/// The writer's page cache, KiB (SQLite's default is 2,000).
const WRITER_CACHE_KIB: i64 = 32 << 10;
/// Identities kept in memory (a lookup miss costs one indexed query). Each
/// process instance is an identity of its own, so under process churn the
/// cache fills with exited ones: 100,000 held ~100 MiB after 200,000
/// short-lived processes (issue 13); 16,384 covers the processes of a busy
/// node's window several times over.
const IDENTITY_CACHE_MAX: usize = 16_384;
/// How often the identity cache turns a generation (an identity unused for
/// two turns leaves it) and the writer's page cache is given back.
const CACHE_TURN_NS: i64 = 120_000_000_000;

/// What went wrong, on which file, field or record.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// A file system operation on the ledger's files failed.
    #[error("ledger {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// An SQLite operation failed.
    #[error("ledger {path}: {what}: {source}")]
    Sqlite {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: Box<rusqlite::Error>,
    },
    /// An SQLite operation on one record failed.
    #[error("ledger {path}: record {record_id}: {what}: {source}")]
    Record {
        path: PathBuf,
        record_id: String,
        what: &'static str,
        #[source]
        source: Box<rusqlite::Error>,
    },
    /// SQLite refused WAL mode (e.g. a file system without shared memory).
    #[error("ledger {path}: journal mode is {mode:?}; the ledger needs WAL")]
    NotWal { path: PathBuf, mode: String },
    /// The file was written by a newer agent.
    #[error("ledger {path}: schema version {found} is newer than this agent's {supported}")]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// Stored data does not decode.
    #[error("ledger {path}: stored data is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    /// A time argument or a record's window is not RFC 3339.
    #[error("{what}: {value:?} is not an RFC 3339 time in 1677..2262: {reason}")]
    BadTime {
        what: String,
        value: String,
        reason: String,
    },
    /// A filter or group-by names no identity/trace-context column.
    #[error("unknown field {field:?}; known fields: {}", FIELDS.join(", "))]
    UnknownField { field: String },
    /// A filter value does not fit its (integer) column.
    #[error("field {field}: {value:?} is not a valid value (an unsigned integer)")]
    BadFieldValue { field: String, value: String },
    /// An exporter name is empty.
    #[error("exporter names must not be empty")]
    EmptyExporter,
    /// A page of zero records was asked for.
    #[error("limit must be at least 1")]
    ZeroLimit,
    /// A record's integer does not fit SQLite's signed 64 bits.
    #[error("record {record_id}: {field} = {value} does not fit the ledger's 64-bit integers")]
    OutOfRange {
        record_id: String,
        field: &'static str,
        value: u64,
    },
    /// A record's token usage could not be encoded.
    #[error("record {record_id}: cannot encode its tokens: {source}")]
    Encode {
        record_id: String,
        #[source]
        source: serde_json::Error,
    },
    /// A record lies in hours already rolled up; storing it could count it twice.
    #[error(
        "record {record_id}: window_start {window_start} lies before {compacted_before}, \
         which is already compacted into hourly rollups; storing it could count it twice"
    )]
    Compacted {
        record_id: String,
        window_start: String,
        compacted_before: String,
    },
    /// A sum left the exact range (±1.7·10^38, or a `Decimal`'s ±7.9·10^28, or u64).
    #[error("the sum of {what} overflowed")]
    Overflow { what: String },
    /// A group's records were priced in more than one currency.
    #[error("group {group:?} mixes currencies {currencies:?}; filter by currency before totalling")]
    MixedCurrency {
        group: Vec<Option<String>>,
        currencies: Vec<String>,
    },
}

/// Maps an SQLite error to one naming the file and the operation.
fn sql<'a>(path: &'a Path, what: &'static str) -> impl Fn(rusqlite::Error) -> LedgerError + 'a {
    move |source| LedgerError::Sqlite {
        path: path.to_path_buf(),
        what,
        source: Box::new(source),
    }
}

/// Maps an SQLite error to one naming the file, the record and the operation.
fn record_err<'a>(
    path: &'a Path,
    record_id: &'a str,
    what: &'static str,
) -> impl Fn(rusqlite::Error) -> LedgerError + 'a {
    move |source| LedgerError::Record {
        path: path.to_path_buf(),
        record_id: record_id.to_string(),
        what,
        source: Box::new(source),
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> LedgerError {
    LedgerError::Corrupt {
        path: path.to_path_buf(),
        what: what.into(),
    }
}

fn overflow(what: &str) -> LedgerError {
    LedgerError::Overflow {
        what: what.to_string(),
    }
}

/// A query for records: window start in [from, to), exact field matches,
/// after a (window_start, record_id) cursor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordQuery {
    /// Inclusive start (RFC 3339).
    pub from: String,
    /// Exclusive end (RFC 3339).
    pub to: String,
    /// `field = value` pairs, all of which must match.
    pub filters: Vec<(String, String)>,
    /// Return records after this (window_start, record_id): the previous page's `next`.
    pub after: Option<(String, String)>,
    /// Records per page (at least 1).
    pub limit: usize,
}

/// One page of records, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    /// The records.
    pub records: Vec<UsageRecord>,
    /// The cursor for the next page; None on the last page.
    pub next: Option<(String, String)>,
}

/// Which raw records a totals query sums.
#[derive(Clone, Copy, Debug)]
enum RawRange {
    /// Window start in [from, to), Unix ns (rollups too).
    Starts(i64, i64),
    /// Committed with the window [start, end): ending at `end`, starting in [min_start, start].
    CommittedWith {
        min_start: i64,
        start: i64,
        end: i64,
    },
}

/// One group's values of the group-by fields, in their order (None: the record has none).
pub type Group = Vec<Option<String>>;

/// Sums of every quantity and cost component over a set of records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    /// Records summed.
    pub records: u64,
    /// Of which priced (the cost sums cover these).
    pub priced_records: u64,
    /// Σ cpu_core_seconds.
    pub cpu_core_seconds: Decimal,
    /// Σ memory_gb_seconds.
    pub memory_gb_seconds: Decimal,
    /// Σ gpu_seconds.
    pub gpu_seconds: Decimal,
    /// Σ gpu_memory_gb_seconds.
    pub gpu_memory_gb_seconds: Decimal,
    /// Σ gpu_energy_joules.
    pub gpu_energy_joules: Decimal,
    /// Σ network_rx_bytes.
    pub network_rx_bytes: u64,
    /// Σ network_tx_bytes.
    pub network_tx_bytes: u64,
    /// Σ disk_read_bytes.
    pub disk_read_bytes: u64,
    /// Σ disk_write_bytes.
    pub disk_write_bytes: u64,
    /// Σ storage_bytes over the records that report it (a gauge: byte-windows).
    pub storage_bytes: u64,
    /// Σ syscalls.
    pub syscalls: u64,
    /// Σ input tokens over all models.
    pub tokens_input: u64,
    /// Σ cached input tokens over all models.
    pub tokens_cache_read_input: u64,
    /// Σ output tokens over all models.
    pub tokens_output: u64,
    /// Σ reasoning output tokens over all models.
    pub tokens_reasoning_output: u64,
    /// Σ of each cost component (currency and version empty: see `currency`).
    pub cost: Cost,
    /// The currency of the priced records (None when none is priced).
    pub currency: Option<String>,
    /// Σ of the token types kept per usage (cache creation, per modality);
    /// present only on queries grouped or filtered by `model`, which read them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_types: Option<models::TokenTypes>,
}

/// What one compaction did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactStats {
    /// Raw records folded into rollups and deleted.
    pub records_compacted: u64,
    /// Rollup rows written (inserted or updated).
    pub rollup_rows: u64,
    /// Records past retention kept because some exporter has not confirmed them.
    pub kept_undelivered: u64,
}

/// What one expiry deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ExpireStats {
    /// Hourly rollup rows older than the retention.
    pub hourly_rows: u64,
    /// Stored spans that ended before it.
    pub spans: u64,
    /// Identities no record or rollup refers to any more.
    pub identities: u64,
    /// Quarantined records set aside before it.
    pub quarantined: u64,
    /// Dead letters (exporters' refused records) set aside before it.
    pub dead_letters: u64,
    /// Alert notifications sent or refused before it.
    pub alert_notifications: u64,
}

/// What a window's commit did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Committed {
    /// Records written (not already there).
    pub new: usize,
    /// Records set aside instead, each with its reason.
    pub quarantined: Vec<QuarantinedRecord>,
}

/// A record the ledger could not take for a reason retrying will not fix, set aside whole.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct QuarantinedRecord {
    /// When it was set aside (RFC 3339).
    pub quarantined_at: String,
    /// The window being committed (RFC 3339, as the daemon gave it).
    pub window_start: String,
    /// Its end.
    pub window_end: String,
    /// The record's id.
    pub record_id: String,
    /// Its kind (process, token, a bucket...).
    pub record_kind: String,
    /// Its run, where it has one.
    pub run_id: Option<String>,
    /// Why the ledger refused it.
    pub reason: String,
    /// The whole record, as JSON.
    pub record: serde_json::Value,
}

impl QuarantinedRecord {
    fn of(r: &UsageRecord, window_start: &str, window_end: &str, reason: &str, now: i64) -> Self {
        Self {
            quarantined_at: format_ns(now).unwrap_or_else(|| now.to_string()),
            window_start: window_start.to_string(),
            window_end: window_end.to_string(),
            record_id: r.record_id.clone(),
            record_kind: r.record_kind.clone(),
            run_id: r.context.run_id.clone(),
            reason: reason.to_string(),
            record: serde_json::to_value(r).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// Stores one quarantined record (once per window and record id).
fn insert_quarantine(
    tx: &Transaction<'_>,
    path: &Path,
    q: &QuarantinedRecord,
) -> Result<(), LedgerError> {
    let at = parse_time("quarantined_at", &q.quarantined_at).unwrap_or_else(|_| now_ns());
    tx.prepare_cached(
        "INSERT INTO quarantine (quarantined_ns, window_start, window_end, record_id, \
         record_kind, run_id, reason, record) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
         ON CONFLICT (window_start, record_id) DO NOTHING",
    )
    .and_then(|mut s| {
        s.execute(params![
            at,
            q.window_start,
            q.window_end,
            q.record_id,
            q.record_kind,
            q.run_id,
            q.reason,
            q.record.to_string()
        ])
    })
    .map_err(record_err(path, &q.record_id, "quarantining it"))?;
    Ok(())
}

impl LedgerError {
    /// Whether trying the same operation again may succeed: I/O errors, a
    /// full disk, a busy or locked database. Everything else is a property
    /// of the input (a record before the compaction watermark, a time outside
    /// 1677..2262, a count past 64 bits, a constraint) and fails the same way
    /// every time, so it is set aside rather than retried.
    pub fn is_transient(&self) -> bool {
        match self {
            LedgerError::Io { .. } => true,
            LedgerError::Sqlite { source, .. } | LedgerError::Record { source, .. } => {
                sqlite_transient(source)
            }
            _ => false,
        }
    }
}

/// Whether an SQLite error is about the database's state (retry) rather than the values given.
fn sqlite_transient(e: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode;
    match e.sqlite_error_code() {
        Some(
            ErrorCode::ConstraintViolation
            | ErrorCode::TooBig
            | ErrorCode::TypeMismatch
            | ErrorCode::ParameterOutOfRange,
        ) => false,
        Some(_) => true,
        None => !matches!(
            e,
            rusqlite::Error::ToSqlConversionFailure(_)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidParameterCount(..)
                | rusqlite::Error::Utf8Error(_)
                | rusqlite::Error::NulError(_)
        ),
    }
}

/// Names a series in `export_series`: a 128-bit hash of its metric and attributes.
pub type SeriesId = (i64, i64);

/// An exporter's cumulative value of one series, as last acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeriesState {
    /// The series' start, Unix ns.
    pub start_ns: u64,
    /// Its cumulative value.
    pub value: Decimal,
    /// The newest window end added to it, Unix ns (for eviction).
    pub last_ns: u64,
}

/// A record an exporter's receiver refused for good.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The exporter.
    pub exporter: String,
    /// The record's window start (RFC 3339).
    pub window_start: String,
    /// The record.
    pub record_id: String,
    /// When it was set aside (RFC 3339).
    pub dead_at: String,
    /// What the receiver said.
    pub reason: String,
}

/// The durable local store of usage records.
pub struct Ledger {
    conn: Connection,
    path: PathBuf,
    retention: Duration,
    identities: IdentityCache,
    /// When the identity cache last turned a generation (unix ns).
    turned_ns: i64,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("path", &self.path)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens or creates the ledger at `path` (creating parent dirs), with WAL and synchronous=FULL; runs schema migrations.
    pub fn open(path: &Path, retention: Duration) -> Result<Ledger, LedgerError> {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir {
            // Usage, identities and trace context are the tenants' business:
            // directories the agent creates are its own (0700). One that
            // exists already (an operator's, or /tmp) is left as it is.
            use std::os::unix::fs::DirBuilderExt;
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|source| LedgerError::Io {
                    path: dir.to_path_buf(),
                    what: "creating the ledger's directory",
                    source,
                })?;
        }
        let created = !path.try_exists().map_err(|source| LedgerError::Io {
            path: path.to_path_buf(),
            what: "checking whether the ledger exists",
            source,
        })?;
        private_files(path)?;
        let mut conn = Connection::open(path).map_err(sql(path, "opening"))?;
        // The daemon writes and the API may read from another connection; a
        // writer waits for a checkpointing reader rather than failing.
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sql(path, "setting busy_timeout"))?;
        // Takes effect only before the first table exists, i.e. on a new file:
        // lets compaction hand freed pages back to the file system.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(sql(path, "setting auto_vacuum"))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(sql(path, "setting journal_mode"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(LedgerError::NotWal {
                path: path.to_path_buf(),
                mode,
            });
        }
        // FULL: every commit fsyncs the WAL (NORMAL would only at checkpoints,
        // and a power cut could then lose windows already handed to exporters).
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql(path, "setting synchronous"))?;
        conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
            .map_err(sql(path, "setting journal_size_limit"))?;
        // A window under span load writes ~50,000 token records and span
        // rows in one transaction: with SQLite's default 2 MiB page cache
        // their dirty pages spilled to the WAL mid-transaction and were
        // written again at commit (see BENCHMARKS.md "Span intake").
        conn.pragma_update(None, "cache_size", -WRITER_CACHE_KIB)
            .map_err(sql(path, "setting cache_size"))?;
        conn.set_prepared_statement_cache_capacity(64);
        migrate(&mut conn, path)?;
        if created {
            checkpoint(&conn, path)?;
            if let Some(dir) = dir {
                fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|source| LedgerError::Io {
                        path: dir.to_path_buf(),
                        what: "syncing the ledger's directory",
                        source,
                    })?;
            }
        }
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            retention,
            identities: IdentityCache::default(),
            turned_ns: now_ns(),
        })
    }

    /// Opens an existing ledger read-only, for queries (the API): its own
    /// connection, so a long read never waits for the writer's lock nor holds
    /// it (WAL lets readers and the writer proceed side by side).
    pub fn open_read_only(path: &Path) -> Result<Ledger, LedgerError> {
        use rusqlite::OpenFlags;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(sql(path, "opening read-only"))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(sql(path, "setting busy_timeout"))?;
        let found: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql(path, "reading the schema version"))?;
        let supported = i64::try_from(schema::MIGRATIONS.len()).unwrap_or(i64::MAX);
        if found > supported {
            return Err(LedgerError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported,
            });
        }
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Ledger {
            conn,
            path: path.to_path_buf(),
            retention: Duration::ZERO,
            identities: IdentityCache::default(),
            turned_ns: now_ns(),
        })
    }

    /// The ledger file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Commits one closed window's records atomically and durably, enqueuing each new one for every exporter; returns how many were new.
    ///
    /// One transaction, returning after the WAL fsync (see the module doc).
    /// Idempotent: a record already present (same window start and
    /// record_id) is neither written nor enqueued again. `window_end`
    /// becomes the resume point ([`Ledger::last_window_end`]). Strict: a
    /// record the ledger cannot take fails the whole window (the daemon uses
    /// [`Ledger::commit_window_or_quarantine`], which sets it aside instead).
    pub fn commit_window(
        &mut self,
        window_start: &str,
        window_end: &str,
        records: &[UsageRecord],
        exporters: &[&str],
    ) -> Result<usize, LedgerError> {
        self.commit(window_start, window_end, records, exporters, false)
            .map(|c| c.new)
    }

    /// As [`Ledger::commit_window`], but a record refused for a reason that
    /// retrying cannot fix (see [`LedgerError::is_transient`]) is moved, whole
    /// and with the reason, into the `quarantine` table in the same
    /// transaction, and the rest of the window is committed. Only transient
    /// failures (I/O, disk full, busy) fail the window, so one bad record can
    /// never block the windows behind it.
    ///
    /// The window is first committed strictly, without a savepoint per
    /// record (a savepoint per record journals every page it touches and
    /// cost about a fifth of the daemon's CPU at 50,000 token records/s);
    /// only if a record fails for good is that attempt rolled back and the
    /// window committed again record by record, setting the bad ones aside.
    pub fn commit_window_or_quarantine(
        &mut self,
        window_start: &str,
        window_end: &str,
        records: &[UsageRecord],
        exporters: &[&str],
    ) -> Result<Committed, LedgerError> {
        match self.commit(window_start, window_end, records, exporters, false) {
            Err(e) if !e.is_transient() => {
                self.commit(window_start, window_end, records, exporters, true)
            }
            done => done,
        }
    }

    fn commit(
        &mut self,
        window_start: &str,
        window_end: &str,
        records: &[UsageRecord],
        exporters: &[&str],
        quarantine: bool,
    ) -> Result<Committed, LedgerError> {
        if exporters.iter().any(|e| e.is_empty()) {
            return Err(LedgerError::EmptyExporter);
        }
        let window = parse_time("window_start", window_start)
            .and_then(|ws| Ok((ws, parse_time("window_end", window_end)?)));
        let (ws, we) = match window {
            Ok(w) => w,
            // A window with no valid bounds: every record is set aside.
            Err(e) if quarantine => {
                return self.quarantine_all(window_start, window_end, records, &e);
            }
            Err(e) => return Err(e),
        };
        let Ledger {
            conn,
            path,
            identities,
            turned_ns,
            ..
        } = self;
        let path = path.as_path();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning a window's commit"))?;
        let compacted_before = meta_get(&tx, path, COMPACTED_BEFORE)?;
        let mut new_identities = Vec::new();
        let mut spend: HashMap<(&str, i64), Exact> = HashMap::new();
        let (mut starts, mut ends) = (TimeCache::default(), TimeCache::default());
        let mut month: Option<(i64, i64)> = None;
        let mut committed = Committed::default();
        let now = now_ns();
        {
            let mut insert = tx
                .prepare_cached(INSERT_RECORD)
                .map_err(sql(path, "preparing the record insert"))?;
            let mut enqueue = tx
                .prepare_cached(
                    "INSERT INTO outbox (exporter, ws_ns, record_id) VALUES (?1, ?2, ?3) \
                     ON CONFLICT DO NOTHING",
                )
                .map_err(sql(path, "preparing the outbox insert"))?;
            for r in records {
                if quarantine {
                    tx.execute_batch("SAVEPOINT rec")
                        .map_err(sql(path, "beginning a record's savepoint"))?;
                }
                let identities_before = new_identities.len();
                // Ok(None): already stored; Ok(Some(spend)): new, with the
                // party's month spend after it, when priced.
                type Outcome<'r> = Option<Option<(&'r str, i64, Exact)>>;
                let mut one = || -> Result<Outcome<'_>, LedgerError> {
                    let rws = starts.parse(&r.window_start, || {
                        format!("record {} window_start", r.record_id)
                    })?;
                    let rwe = ends.parse(&r.window_end, || {
                        format!("record {} window_end", r.record_id)
                    })?;
                    if let Some(limit) = compacted_before.filter(|&c| rws < c) {
                        if record_exists(&tx, path, rws, &r.record_id)? {
                            return Ok(None);
                        }
                        return Err(LedgerError::Compacted {
                            record_id: r.record_id.clone(),
                            window_start: r.window_start.clone(),
                            compacted_before: format_ns(limit).unwrap_or_else(|| limit.to_string()),
                        });
                    }
                    let ident = resolve_identity(&tx, path, identities, &mut new_identities, r)?;
                    if insert_record(&mut insert, path, r, rws, rwe, ident)? == 0 {
                        return Ok(None);
                    }
                    for e in exporters {
                        enqueue
                            .execute(params![e, rws, r.record_id])
                            .map_err(record_err(path, &r.record_id, "enqueuing in the outbox"))?;
                    }
                    let mut add = None;
                    if let (Some(cost), Some(party)) = (&r.cost, r.billed_party()) {
                        let m = match month {
                            Some((start, next)) if (start..next).contains(&rws) => start,
                            _ => {
                                let b =
                                    month_bounds(rws).ok_or_else(|| bad_ns("window_start", rws))?;
                                month = Some(b);
                                b.0
                            }
                        };
                        let sum = spend
                            .get(&(party, m))
                            .copied()
                            .unwrap_or_default()
                            .checked_add(Exact::from_decimal(cost.total))
                            .ok_or_else(|| overflow("month-to-date spend"))?;
                        add = Some((party, m, sum));
                    }
                    Ok(Some(add))
                };
                match one() {
                    Ok(outcome) => {
                        if let Some(add) = outcome {
                            if let Some((party, m, sum)) = add {
                                spend.insert((party, m), sum);
                            }
                            committed.new += 1;
                        }
                        if quarantine {
                            tx.execute_batch("RELEASE rec")
                                .map_err(sql(path, "releasing a record's savepoint"))?;
                        }
                    }
                    Err(e) if quarantine && !e.is_transient() => {
                        // Undo whatever of the record was written (its new
                        // identity row too: it must not be cached).
                        tx.execute_batch("ROLLBACK TO rec; RELEASE rec")
                            .map_err(sql(path, "rolling back a record"))?;
                        new_identities.truncate(identities_before);
                        let q =
                            QuarantinedRecord::of(r, window_start, window_end, &e.to_string(), now);
                        insert_quarantine(&tx, path, &q)?;
                        committed.quarantined.push(q);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        for ((party, month_ns), add) in spend {
            add_spend(&tx, path, party, month_ns, add)?;
        }
        tx.execute(
            "INSERT INTO windows (we_ns, ws_ns, committed_ns, records) VALUES (?1, ?2, ?3, ?4) \
             ON CONFLICT DO NOTHING",
            params![
                we,
                ws,
                now,
                i64::try_from(records.len()).unwrap_or(i64::MAX)
            ],
        )
        .map_err(sql(path, "recording the window"))?;
        tx.commit().map_err(sql(path, "committing a window"))?;
        // Only now are the new identity rows durable, so only now cached.
        for (hash, key, id) in new_identities {
            identities.insert(hash, key, id);
        }
        if now.saturating_sub(*turned_ns) >= CACHE_TURN_NS {
            *turned_ns = now;
            identities.turn();
            // The writer's page cache fills to WRITER_CACHE_KIB under a burst
            // and SQLite keeps it; the pages are in the OS cache anyway, so
            // give the memory back now and then (issue 13's churn).
            if let Err(e) = conn.execute_batch("PRAGMA shrink_memory") {
                tracing::debug!(error = %e, "PRAGMA shrink_memory failed");
            }
        }
        Ok(committed)
    }

    /// Sets every record of a window aside (one transaction): the window
    /// itself cannot be stored (`why`), so none of its records can.
    fn quarantine_all(
        &mut self,
        window_start: &str,
        window_end: &str,
        records: &[UsageRecord],
        why: &LedgerError,
    ) -> Result<Committed, LedgerError> {
        self.quarantine_records(window_start, window_end, records, &why.to_string())
    }

    /// Sets records aside whole, with `reason` (one transaction): the
    /// daemon's last resort for a window whose commit failed for a reason
    /// retrying will not fix (or panicked), so it never blocks later ones.
    pub fn quarantine_records(
        &mut self,
        window_start: &str,
        window_end: &str,
        records: &[UsageRecord],
        reason: &str,
    ) -> Result<Committed, LedgerError> {
        let path = self.path.as_path();
        let now = now_ns();
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning a quarantine"))?;
        let mut committed = Committed::default();
        for r in records {
            let q = QuarantinedRecord::of(r, window_start, window_end, reason, now);
            insert_quarantine(&tx, path, &q)?;
            committed.quarantined.push(q);
        }
        tx.commit().map_err(sql(path, "committing a quarantine"))?;
        Ok(committed)
    }

    /// Quarantined records, newest first: at most `limit`, before the
    /// quarantine row id `before` (the previous page's `next`).
    pub fn quarantined(
        &self,
        limit: usize,
        before: Option<i64>,
    ) -> Result<(Vec<QuarantinedRecord>, Option<i64>), LedgerError> {
        if limit == 0 {
            return Err(LedgerError::ZeroLimit);
        }
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT id, quarantined_ns, window_start, window_end, record_id, record_kind, \
                 run_id, reason, record FROM quarantine WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(sql(path, "preparing the quarantine listing"))?;
        let mut rows = stmt
            .query(params![
                before.unwrap_or(i64::MAX),
                saturating_i64(limit.saturating_add(1))
            ])
            .map_err(sql(path, "reading the quarantine"))?;
        let mut out = Vec::new();
        let mut ids = Vec::new();
        while let Some(row) = rows.next().map_err(sql(path, "reading the quarantine"))? {
            let e = sql(path, "reading the quarantine");
            let at: i64 = row.get(1).map_err(&e)?;
            let record: String = row.get(8).map_err(&e)?;
            ids.push(row.get::<_, i64>(0).map_err(&e)?);
            out.push(QuarantinedRecord {
                quarantined_at: format_ns(at).unwrap_or_else(|| at.to_string()),
                window_start: row.get(2).map_err(&e)?,
                window_end: row.get(3).map_err(&e)?,
                record_id: row.get(4).map_err(&e)?,
                record_kind: row.get(5).map_err(&e)?,
                run_id: row.get(6).map_err(&e)?,
                reason: row.get(7).map_err(&e)?,
                record: serde_json::from_str(&record).unwrap_or(serde_json::Value::String(record)),
            });
        }
        let next = if out.len() > limit {
            out.truncate(limit);
            ids.get(limit - 1).copied()
        } else {
            None
        };
        Ok((out, next))
    }

    /// How many records are in quarantine.
    pub fn quarantine_count(&self) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row("SELECT count(*) FROM quarantine", [], |r| r.get(0))
            .map_err(sql(&self.path, "counting the quarantine"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// The end of the last committed window (None on a fresh ledger): after a crash, the agent resumes from here.
    pub fn last_window_end(&self) -> Result<Option<String>, LedgerError> {
        let path = &self.path;
        let end: Option<i64> = self
            .conn
            .query_row(
                "SELECT we_ns FROM windows ORDER BY we_ns DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(path, "reading the last window"))?;
        end.map(|ns| format_ns(ns).ok_or_else(|| corrupt(path, format!("window end {ns} ns"))))
            .transpose()
    }

    /// Up to `limit` records not yet delivered to `exporter`, oldest first.
    pub fn pending(&self, exporter: &str, limit: usize) -> Result<Vec<UsageRecord>, LedgerError> {
        let path = &self.path;
        let query = format!(
            "SELECT {} FROM outbox o CROSS JOIN records r CROSS JOIN identities i \
             WHERE o.exporter = ?1 AND r.ws_ns = o.ws_ns AND r.record_id = o.record_id \
             AND i.id = r.ident ORDER BY o.ws_ns, o.record_id LIMIT ?2",
            record_columns()
        );
        let mut stmt = self
            .conn
            .prepare_cached(&query)
            .map_err(sql(path, "preparing pending"))?;
        let mut rows = stmt
            .query(params![exporter, saturating_i64(limit)])
            .map_err(sql(path, "reading pending records"))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next().map_err(sql(path, "reading pending records"))? {
            out.push(record_from_row(row, path)?);
        }
        Ok(out)
    }

    /// Marks records delivered to `exporter` (only call after the exporter confirmed success); unknown or already delivered ids are ignored.
    ///
    /// The exporter's queue is walked oldest first until every id is found,
    /// so confirming what [`Ledger::pending`] returned costs about the batch
    /// size; an id not in the queue costs a walk of the whole queue.
    pub fn mark_delivered(
        &mut self,
        exporter: &str,
        record_ids: &[String],
    ) -> Result<(), LedgerError> {
        self.settle(exporter, record_ids, &[], None)
    }

    /// Marks records delivered and stores the exporter's cumulative series
    /// values after them, in one transaction: the running totals are then
    /// always exactly what the receiver acknowledged (a failure leaves both
    /// as they were, and the re-send carries the same values). With `rejected`,
    /// the receiver accepted the request but refused some points: the records
    /// are also listed in `dead_letter` with that reason.
    pub fn mark_delivered_with(
        &mut self,
        exporter: &str,
        record_ids: &[String],
        series: &[(SeriesId, SeriesState)],
        rejected: Option<&str>,
    ) -> Result<(), LedgerError> {
        self.settle(exporter, record_ids, series, rejected)
    }

    /// Takes records out of `exporter`'s queue without delivering them: its
    /// receiver refused them for good (`reason`). They are listed in
    /// `dead_letter` and counted by the caller; they no longer block the queue.
    pub fn dead_letter(
        &mut self,
        exporter: &str,
        record_ids: &[String],
        reason: &str,
    ) -> Result<(), LedgerError> {
        self.settle(exporter, record_ids, &[], Some(reason))
    }

    fn settle(
        &mut self,
        exporter: &str,
        record_ids: &[String],
        series: &[(SeriesId, SeriesState)],
        dead: Option<&str>,
    ) -> Result<(), LedgerError> {
        let path = self.path.as_path();
        let mut wanted: HashSet<&str> = record_ids.iter().map(String::as_str).collect();
        if wanted.is_empty() && series.is_empty() {
            return Ok(());
        }
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning mark_delivered"))?;
        let mut found: Vec<(i64, String)> = Vec::with_capacity(wanted.len());
        if !wanted.is_empty() {
            let mut scan = tx
                .prepare_cached(
                    "SELECT ws_ns, record_id FROM outbox WHERE exporter = ?1 \
                     ORDER BY ws_ns, record_id",
                )
                .map_err(sql(path, "preparing mark_delivered"))?;
            let mut rows = scan
                .query([exporter])
                .map_err(sql(path, "walking the outbox"))?;
            while let Some(row) = rows.next().map_err(sql(path, "walking the outbox"))? {
                let id = row
                    .get_ref(1)
                    .map_err(sql(path, "walking the outbox"))?
                    .as_str()
                    .map_err(|_| corrupt(path, "an outbox record_id is not text"))?;
                if wanted.remove(id) {
                    let ws: i64 = row.get(0).map_err(sql(path, "walking the outbox"))?;
                    found.push((ws, id.to_string()));
                    if wanted.is_empty() {
                        break;
                    }
                }
            }
        }
        {
            let mut delete = tx
                .prepare_cached(
                    "DELETE FROM outbox WHERE exporter = ?1 AND ws_ns = ?2 AND record_id = ?3",
                )
                .map_err(sql(path, "preparing mark_delivered"))?;
            for (ws, id) in &found {
                delete
                    .execute(params![exporter, ws, id])
                    .map_err(record_err(path, id, "marking delivered"))?;
            }
        }
        if let Some(reason) = dead {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO dead_letter (exporter, ws_ns, record_id, dead_ns, reason) \
                     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO UPDATE SET reason = excluded.reason",
                )
                .map_err(sql(path, "preparing the dead-letter insert"))?;
            let now = now_ns();
            for (ws, id) in &found {
                put.execute(params![exporter, ws, id, now, reason])
                    .map_err(record_err(path, id, "dead-lettering it"))?;
            }
        }
        if !series.is_empty() {
            let mut put = tx
                .prepare_cached(
                    "INSERT INTO export_series (exporter, series_hi, series_lo, start_ns, value, \
                     last_ns) VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO UPDATE SET \
                     start_ns = excluded.start_ns, value = excluded.value, last_ns = excluded.last_ns",
                )
                .map_err(sql(path, "preparing the series update"))?;
            for ((hi, lo), st) in series {
                put.execute(params![
                    exporter,
                    hi,
                    lo,
                    u64_bits(st.start_ns),
                    st.value.to_string(),
                    u64_bits(st.last_ns)
                ])
                .map_err(sql(path, "storing an export series"))?;
            }
        }
        tx.commit().map_err(sql(path, "committing mark_delivered"))
    }

    /// The cumulative values `exporter` last had acknowledged, for the series in `keys` that have one.
    pub fn export_series(
        &self,
        exporter: &str,
        keys: &[SeriesId],
    ) -> Result<HashMap<SeriesId, SeriesState>, LedgerError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT start_ns, value, last_ns FROM export_series \
                 WHERE exporter = ?1 AND series_hi = ?2 AND series_lo = ?3",
            )
            .map_err(sql(path, "preparing the series lookup"))?;
        let mut out = HashMap::new();
        for &(hi, lo) in keys {
            let row: Option<(i64, String, i64)> = stmt
                .query_row(params![exporter, hi, lo], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })
                .optional()
                .map_err(sql(path, "reading an export series"))?;
            if let Some((start, value, last)) = row {
                let value = Decimal::from_str_exact(&value)
                    .map_err(|_| corrupt(path, format!("export series value {value:?}")))?;
                out.insert(
                    (hi, lo),
                    SeriesState {
                        start_ns: bits_u64(start),
                        value,
                        last_ns: bits_u64(last),
                    },
                );
            }
        }
        Ok(out)
    }

    /// Forgets `exporter`'s series that no delivered record touched since
    /// `idle_before_ns` (their processes exited or went idle); returns how many.
    /// A series seen again later starts afresh, with a later start time.
    pub fn evict_export_series(
        &mut self,
        exporter: &str,
        idle_before_ns: u64,
    ) -> Result<u64, LedgerError> {
        let n = self
            .conn
            .execute(
                "DELETE FROM export_series WHERE exporter = ?1 AND last_ns < ?2",
                params![exporter, u64_bits(idle_before_ns)],
            )
            .map_err(sql(&self.path, "evicting export series"))?;
        Ok(n as u64)
    }

    /// Forgets every series of `exporter` (a new export stream starts from zero).
    pub fn reset_export_series(&mut self, exporter: &str) -> Result<u64, LedgerError> {
        self.evict_export_series(exporter, u64::MAX)
    }

    /// How many series `exporter` keeps running totals for.
    pub fn export_series_count(&self, exporter: &str) -> Result<u64, LedgerError> {
        let n: i64 = self
            .conn
            .query_row(
                "SELECT count(*) FROM export_series WHERE exporter = ?1",
                [exporter],
                |r| r.get(0),
            )
            .map_err(sql(&self.path, "counting export series"))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Records exporters' receivers refused for good, newest first (at most `limit`).
    pub fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, LedgerError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT exporter, ws_ns, record_id, dead_ns, reason FROM dead_letter \
                 ORDER BY dead_ns DESC, ws_ns DESC, record_id LIMIT ?1",
            )
            .map_err(sql(path, "preparing the dead-letter listing"))?;
        let rows = stmt
            .query_map([saturating_i64(limit)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, String>(4)?,
                ))
            })
            .map_err(sql(path, "reading dead letters"))?;
        let mut out = Vec::new();
        for row in rows {
            let (exporter, ws, record_id, at, reason) =
                row.map_err(sql(path, "reading dead letters"))?;
            out.push(DeadLetter {
                exporter,
                window_start: format_ns(ws).unwrap_or_else(|| ws.to_string()),
                record_id,
                dead_at: format_ns(at).unwrap_or_else(|| at.to_string()),
                reason,
            });
        }
        Ok(out)
    }

    /// Records whose window starts in [from, to), matching every filter, paged by (window_start, record_id) after `q.after`.
    pub fn records(&self, q: &RecordQuery) -> Result<Page, LedgerError> {
        if q.limit == 0 {
            return Err(LedgerError::ZeroLimit);
        }
        let path = &self.path;
        let from = parse_time("from", &q.from)?;
        let to = parse_time("to", &q.to)?;
        let mut query = format!(
            "SELECT {} FROM records r CROSS JOIN identities i \
             WHERE i.id = r.ident AND r.ws_ns >= ?1 AND r.ws_ns < ?2",
            record_columns()
        );
        let mut values = vec![Value::Integer(from), Value::Integer(to)];
        if let Some((ws, id)) = &q.after {
            let after = parse_time("after", ws)?;
            query.push_str(" AND (r.ws_ns, r.record_id) > (?3, ?4)");
            values.push(Value::Integer(after));
            values.push(Value::Text(id.clone()));
        }
        push_filters(&mut query, &mut values, &q.filters)?;
        query.push_str(&format!(
            " ORDER BY r.ws_ns, r.record_id LIMIT ?{}",
            values.len() + 1
        ));
        // One more than asked, to know whether a next page exists.
        values.push(Value::Integer(saturating_i64(q.limit.saturating_add(1))));
        let mut stmt = self
            .conn
            .prepare(&query)
            .map_err(sql(path, "preparing records"))?;
        let mut rows = stmt
            .query(params_from_iter(values))
            .map_err(sql(path, "reading records"))?;
        let mut records = Vec::new();
        while let Some(row) = rows.next().map_err(sql(path, "reading records"))? {
            records.push(record_from_row(row, path)?);
        }
        let next = if records.len() > q.limit {
            records.truncate(q.limit);
            records
                .last()
                .map(|r| (r.window_start.clone(), r.record_id.clone()))
        } else {
            None
        };
        Ok(Page { records, next })
    }

    /// Sums of every quantity and cost component over [from, to), raw records and hourly rollups, grouped by the named fields.
    ///
    /// Rows come sorted by group values (None first); a range with no
    /// records gives no rows. Filters are exact matches on [`FIELDS`] and
    /// [`models::MODEL`]; grouping or filtering by `model` splits records by
    /// their token usages' models (see [`models`]; an empty filter value
    /// matches what has no model) and adds `token_types` to the totals.
    pub fn totals(
        &self,
        from: &str,
        to: &str,
        group_by: &[&str],
        filters: &[(String, String)],
    ) -> Result<Vec<(Group, Totals)>, LedgerError> {
        self.totals_keyed(from, to, group_by, filters, &mut HashMap::new())
    }

    /// [`Ledger::totals`], remembering each identity's group key (for these
    /// `group_by` fields, model excluded) in `keys` across calls: identities
    /// never change, so a caller asking every window (alert rules) looks each up once.
    pub fn totals_keyed(
        &self,
        from: &str,
        to: &str,
        group_by: &[&str],
        filters: &[(String, String)],
        keys: &mut HashMap<i64, Vec<Option<String>>>,
    ) -> Result<Vec<(Group, Totals)>, LedgerError> {
        let from = parse_time("from", from)?;
        let to = parse_time("to", to)?;
        self.totals_in(RawRange::Starts(from, to), group_by, filters, keys)
    }

    /// The same sums over the records committed with one window: those
    /// ending at its end, `window_start_ns - min_start_ns` back at most
    /// (an idle process's record spans several windows and is committed
    /// with the last). No rollups: a compacted window has no raw records.
    pub fn totals_committed_with(
        &self,
        window_start_ns: i64,
        window_end_ns: i64,
        min_start_ns: i64,
        group_by: &[&str],
        filters: &[(String, String)],
    ) -> Result<Vec<(Group, Totals)>, LedgerError> {
        self.totals_in(
            RawRange::CommittedWith {
                min_start: min_start_ns.min(window_start_ns),
                start: window_start_ns,
                end: window_end_ns,
            },
            group_by,
            filters,
            &mut HashMap::new(),
        )
    }

    fn totals_in(
        &self,
        range: RawRange,
        group_by: &[&str],
        filters: &[(String, String)],
        keys: &mut HashMap<i64, Vec<Option<String>>>,
    ) -> Result<Vec<(Group, Totals)>, LedgerError> {
        let path = &self.path;
        // Rollups count only for a range of starts.
        let (from, to) = match range {
            RawRange::Starts(from, to) => (from, to),
            RawRange::CommittedWith { .. } => (0, 0),
        };
        let model_at = group_by.iter().position(|g| *g == models::MODEL);
        let groups = group_by
            .iter()
            .filter(|g| **g != models::MODEL)
            .map(|g| field_index(g))
            .collect::<Result<Vec<_>, _>>()?;
        // Every `model=` filter must match; two different ones match nothing.
        let model_filters: Vec<Option<&str>> = filters
            .iter()
            .filter(|(k, _)| k == models::MODEL)
            .map(|(_, v)| Some(v.as_str()).filter(|v| !v.is_empty()))
            .collect();
        let ident_filters: Vec<(String, String)> = filters
            .iter()
            .filter(|(k, _)| k != models::MODEL)
            .cloned()
            .collect();
        let by_model = model_at.is_some() || !model_filters.is_empty();
        let matching = if ident_filters.is_empty() {
            None
        } else {
            Some(self.matching_identities(&ident_filters)?)
        };
        let keep = |ident: i64| matching.as_ref().is_none_or(|m| m.contains(&ident));

        // Sum per (identity, currency, model) first: no strings per row
        // (the model is read only when asked for).
        type Slot = (Acc, models::TokenTypes);
        let mut currencies = Currencies::default();
        let mut by_ident: HashMap<(i64, Option<usize>, Option<String>), Slot> = HashMap::new();
        // The tokens' JSON is read only when the model is asked for.
        let (raw_where, raw_params) = match range {
            RawRange::Starts(from, to) => ("ws_ns >= ?1 AND ws_ns < ?2", vec![from, to]),
            RawRange::CommittedWith {
                min_start,
                start,
                end,
            } => (
                "ws_ns >= ?1 AND ws_ns <= ?2 AND we_ns = ?3",
                vec![min_start, start, end],
            ),
        };
        let raw = format!(
            "SELECT ident, currency, {}, {}{} FROM records WHERE {raw_where}",
            DEC_COLS.join(", "),
            INT_COLS.join(", "),
            if by_model { ", tokens" } else { "" }
        );
        let tokens_col = 2 + DEC_COLS.len() + INT_COLS.len();
        let mut stmt = self
            .conn
            .prepare_cached(&raw)
            .map_err(sql(path, "preparing totals"))?;
        let mut rows = stmt
            .query(params_from_iter(raw_params))
            .map_err(sql(path, "summing records"))?;
        while let Some(row) = rows.next().map_err(sql(path, "summing records"))? {
            let ident: i64 = row.get(0).map_err(sql(path, "summing records"))?;
            if !keep(ident) {
                continue;
            }
            let cur = currencies.index(row, 1, path)?;
            if !by_model {
                by_ident.entry((ident, cur, None)).or_default().0.add_raw(
                    row,
                    2,
                    is_priced(row, 1, path)?,
                    path,
                )?;
                continue;
            }
            let mut whole = Acc::default();
            whole.add_raw(row, 2, is_priced(row, 1, path)?, path)?;
            let tokens: Option<String> =
                row.get(tokens_col).map_err(sql(path, "summing records"))?;
            for part in models::split(whole, tokens.as_deref(), path)? {
                let slot = by_ident.entry((ident, cur, part.model)).or_default();
                slot.0.merge(&part.acc)?;
                slot.1 = slot.1.checked_add(part.types)?;
            }
        }
        let rollup = format!(
            "SELECT ident, currency, records, priced, {}, {} FROM hourly \
             WHERE hour_ns >= ?1 AND hour_ns < ?2",
            DEC_COLS.join(", "),
            INT_COLS.join(", ")
        );
        let mut stmt = self
            .conn
            .prepare_cached(&rollup)
            .map_err(sql(path, "preparing totals"))?;
        let mut rows = stmt
            .query(params![from, to])
            .map_err(sql(path, "summing rollups"))?;
        while let Some(row) = rows.next().map_err(sql(path, "summing rollups"))? {
            let ident: i64 = row.get(0).map_err(sql(path, "summing rollups"))?;
            if !keep(ident) {
                continue;
            }
            let cur = currencies.index(row, 1, path)?;
            by_ident
                .entry((ident, cur, None))
                .or_default()
                .0
                .add_rollup(row, 2, path)?;
        }
        if by_model {
            // An hour's model parts, moved out of its unattributed whole.
            let query = format!(
                "SELECT ident, currency, model, records, priced, {}, {}, {} FROM hourly_models \
                 WHERE hour_ns >= ?1 AND hour_ns < ?2",
                DEC_COLS.join(", "),
                INT_COLS.join(", "),
                models::TYPE_COLS.join(", ")
            );
            let types_col = 5 + DEC_COLS.len() + INT_COLS.len();
            let mut stmt = self
                .conn
                .prepare_cached(&query)
                .map_err(sql(path, "preparing totals"))?;
            let mut rows = stmt
                .query(params![from, to])
                .map_err(sql(path, "summing model rollups"))?;
            while let Some(row) = rows.next().map_err(sql(path, "summing model rollups"))? {
                let e = sql(path, "summing model rollups");
                let ident: i64 = row.get(0).map_err(&e)?;
                if !keep(ident) {
                    continue;
                }
                let cur = currencies.index(row, 1, path)?;
                let model: String = row.get(2).map_err(&e)?;
                let mut part = Acc::default();
                part.add_rollup(row, 3, path)?;
                let mut types = [0u64; 7];
                for (k, v) in types.iter_mut().enumerate() {
                    let n: i64 = row.get(types_col + k).map_err(&e)?;
                    *v = u64::try_from(n).map_err(|_| corrupt(path, "a negative token count"))?;
                }
                by_ident
                    .get_mut(&(ident, cur, None))
                    .ok_or_else(|| corrupt(path, "a model rollup without its hourly row"))?
                    .0
                    .sub(&part)?;
                let slot = by_ident.entry((ident, cur, Some(model))).or_default();
                slot.0.merge(&part)?;
                slot.1 = slot.1.checked_add(models::TokenTypes::from_array(types))?;
            }
        }

        // Then fold identities into their groups.
        let key_query = if groups.is_empty() {
            None
        } else {
            let cols: Vec<&str> = groups.iter().map(|&g| FIELDS[g]).collect();
            Some(format!(
                "SELECT {} FROM identities WHERE id = ?1",
                cols.join(", ")
            ))
        };
        let mut key_stmt = key_query
            .map(|q| self.conn.prepare(&q))
            .transpose()
            .map_err(sql(path, "preparing group keys"))?;
        type Folded = (Acc, models::TokenTypes, BTreeSet<usize>);
        let mut out: BTreeMap<Vec<Option<String>>, Folded> = BTreeMap::new();
        for ((ident, cur, model), (acc, types)) in by_ident {
            if model_filters.iter().any(|f| *f != model.as_deref()) {
                continue;
            }
            // A part that holds nothing (all of an hour went to its models).
            if by_model && acc.is_zero() && types.is_zero() {
                continue;
            }
            let mut key = match (keys.get(&ident), key_stmt.as_mut()) {
                (Some(k), _) => k.clone(),
                (None, None) => Vec::new(),
                (None, Some(stmt)) => {
                    let k = group_key(stmt, path, ident, &groups)?;
                    keys.insert(ident, k.clone());
                    k
                }
            };
            if let Some(at) = model_at {
                key.insert(at, model);
            }
            let slot = out.entry(key).or_default();
            slot.0.merge(&acc)?;
            slot.1 = slot.1.checked_add(types)?;
            slot.2.extend(cur);
        }
        out.into_iter()
            .map(|(key, (acc, types, curs))| {
                let names: Vec<String> = curs.iter().map(|&c| currencies.name(c)).collect();
                if names.len() > 1 {
                    return Err(LedgerError::MixedCurrency {
                        group: key,
                        currencies: names,
                    });
                }
                let mut totals = acc.totals(names.into_iter().next())?;
                if by_model {
                    totals.token_types = Some(types);
                }
                Ok((key, totals))
            })
            .collect()
    }

    /// Month-to-date spend (Σ cost.total) of a billed party ([`UsageRecord::billed_party`]) before `before`, rollups included.
    ///
    /// The month is `before`'s UTC calendar month. Kept as a running sum per
    /// party and month at commit, so this does not scan a month of records:
    /// it subtracts what lies at or after `before` (usually nothing).
    pub fn month_to_date(&self, party: &str, before: &str) -> Result<Decimal, LedgerError> {
        let path = &self.path;
        let before_ns = parse_time("before", before)?;
        let (start, next) = month_bounds(before_ns).ok_or_else(|| bad_ns("before", before_ns))?;
        let stored: Option<String> = self
            .conn
            .query_row(
                "SELECT total FROM spend WHERE party = ?1 AND month_ns = ?2",
                params![party, start],
                |r| r.get(0),
            )
            .optional()
            .map_err(sql(path, "reading month-to-date spend"))?;
        let mut sum = match stored {
            Some(s) => Exact::parse(&s)
                .ok_or_else(|| corrupt(path, format!("spend of {party:?}: {s:?}")))?,
            None => Exact::ZERO,
        };
        // Party match, as `UsageRecord::billed_party`: customer_id, or
        // user_id where no customer is named (null or empty).
        const PARTY: &str = "((i.customer_id = ?3 AND ?3 <> '') OR (COALESCE(i.customer_id, '') = '' AND i.user_id = ?3))";
        let later_raw = format!(
            "SELECT r.cost_total FROM records r CROSS JOIN identities i \
             WHERE r.ws_ns >= ?1 AND r.ws_ns < ?2 AND i.id = r.ident \
             AND r.currency IS NOT NULL AND {PARTY}"
        );
        let mut stmt = self
            .conn
            .prepare_cached(&later_raw)
            .map_err(sql(path, "preparing month-to-date"))?;
        let mut rows = stmt
            .query(params![before_ns, next, party])
            .map_err(sql(path, "reading month-to-date"))?;
        while let Some(row) = rows.next().map_err(sql(path, "reading month-to-date"))? {
            let v = row.get_ref(0).map_err(sql(path, "reading month-to-date"))?;
            let e = blob_exact(v).ok_or_else(|| corrupt(path, "a stored cost_total"))?;
            sum = sum
                .checked_sub(e)
                .ok_or_else(|| overflow("month-to-date spend"))?;
        }
        let later_rollups = format!(
            "SELECT h.cost_total FROM hourly h CROSS JOIN identities i \
             WHERE h.hour_ns >= ?1 AND h.hour_ns < ?2 AND i.id = h.ident AND {PARTY}"
        );
        let mut stmt = self
            .conn
            .prepare_cached(&later_rollups)
            .map_err(sql(path, "preparing month-to-date"))?;
        let mut rows = stmt
            .query(params![before_ns, next, party])
            .map_err(sql(path, "reading month-to-date"))?;
        while let Some(row) = rows.next().map_err(sql(path, "reading month-to-date"))? {
            let s: String = row.get(0).map_err(sql(path, "reading month-to-date"))?;
            let e = Exact::parse(&s)
                .ok_or_else(|| corrupt(path, format!("a rollup cost_total {s:?}")))?;
            sum = sum
                .checked_sub(e)
                .ok_or_else(|| overflow("month-to-date spend"))?;
        }
        sum.to_decimal()
            .ok_or_else(|| overflow("month-to-date spend"))
    }

    /// Compacts hours older than `now - retention` into exact hourly rollups, deleting raw records only once every exporter confirmed them.
    ///
    /// Undelivered records stay raw and are counted (a later run compacts
    /// them once delivered). From this call on, records starting before the
    /// cutoff can no longer be committed. See `compact.rs` for the steps.
    pub fn compact(&mut self, now: &str) -> Result<CompactStats, LedgerError> {
        let now_ns = parse_time("now", now)?;
        let retention = i64::try_from(self.retention.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = floor_hour(now_ns.saturating_sub(retention));
        compact::run(&mut self.conn, &self.path, cutoff)
    }

    /// Deletes usage older than `retention` before `now`: hourly rollups,
    /// stored spans, quarantined records and dead letters set aside before
    /// it, alert notifications sent or refused before it (pending ones stay),
    /// and the identities only they referred to. Raw records an
    /// exporter has not confirmed are never deleted here (compaction keeps and
    /// counts them); the month-to-date spend rows are a few per party and stay.
    pub fn expire(&mut self, now: &str, retention: Duration) -> Result<ExpireStats, LedgerError> {
        let now_ns = parse_time("now", now)?;
        let keep = i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX);
        let cutoff = floor_hour(now_ns.saturating_sub(keep));
        let path = &self.path;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning expiry"))?;
        let count = |n: usize| n as u64;
        let hourly_rows = tx
            .execute("DELETE FROM hourly WHERE hour_ns < ?1", params![cutoff])
            .map_err(sql(path, "deleting expired rollups"))?;
        tx.execute(
            "DELETE FROM hourly_models WHERE hour_ns < ?1",
            params![cutoff],
        )
        .map_err(sql(path, "deleting expired model rollups"))?;
        let spans = tx
            .execute("DELETE FROM spans WHERE end_ns < ?1", params![cutoff])
            .map_err(sql(path, "deleting expired spans"))?;
        // What was set aside is kept as long as the usage it belongs with.
        let quarantined = tx
            .execute(
                "DELETE FROM quarantine WHERE quarantined_ns < ?1",
                params![cutoff],
            )
            .map_err(sql(path, "deleting expired quarantined records"))?;
        let dead_letters = tx
            .execute(
                "DELETE FROM dead_letter WHERE dead_ns < ?1",
                params![cutoff],
            )
            .map_err(sql(path, "deleting expired dead letters"))?;
        let alert_notifications = Ledger::expire_alert_rows(&tx, path, cutoff)?;
        // NOT IN with a subquery is evaluated once, into a temporary index.
        let identities = tx
            .execute(
                "DELETE FROM identities WHERE id NOT IN (SELECT ident FROM hourly) \
                 AND id NOT IN (SELECT ident FROM records)",
                [],
            )
            .map_err(sql(path, "deleting unused identities"))?;
        tx.commit().map_err(sql(path, "committing expiry"))?;
        if identities > 0 {
            // Cached ids may name deleted rows: a later record with such an
            // identity gets a new row.
            self.identities = IdentityCache::default();
        }
        Ok(ExpireStats {
            hourly_rows: count(hourly_rows),
            spans: count(spans),
            identities: count(identities),
            quarantined: count(quarantined),
            dead_letters: count(dead_letters),
            alert_notifications,
        })
    }

    /// Disk used by the ledger's files (main db, WAL and its shared-memory index) in bytes.
    pub fn disk_bytes(&self) -> Result<u64, LedgerError> {
        let mut total = 0;
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let p = PathBuf::from(p);
            match fs::metadata(&p) {
                Ok(m) => total += m.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(LedgerError::Io {
                        path: p,
                        what: "reading the file's size",
                        source,
                    });
                }
            }
        }
        Ok(total)
    }

    /// Identity ids matching every filter.
    fn matching_identities(
        &self,
        filters: &[(String, String)],
    ) -> Result<HashSet<i64>, LedgerError> {
        let path = &self.path;
        let mut query = String::from("SELECT i.id FROM identities i WHERE 1");
        let mut values = Vec::new();
        push_filters(&mut query, &mut values, filters)?;
        let mut stmt = self
            .conn
            .prepare(&query)
            .map_err(sql(path, "preparing filters"))?;
        let mut rows = stmt
            .query(params_from_iter(values))
            .map_err(sql(path, "applying filters"))?;
        let mut out = HashSet::new();
        while let Some(row) = rows.next().map_err(sql(path, "applying filters"))? {
            out.insert(row.get(0).map_err(sql(path, "applying filters"))?);
        }
        Ok(out)
    }
}

impl Ledger {
    /// Stores spans (one durable transaction); a span already stored is kept as is.
    pub fn commit_spans(&mut self, spans: &[SpanRow]) -> Result<usize, LedgerError> {
        let path = self.path.clone();
        let tx = self
            .conn
            .transaction()
            .map_err(sql(&path, "beginning a span commit"))?;
        let mut n = 0;
        {
            let mut stmt = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO spans (trace_id, span_id, parent_span_id, run_id, agent_id, \
                     name, start_ns, end_ns, pid, service) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                )
                .map_err(sql(&path, "preparing a span insert"))?;
            for s in spans {
                n += stmt
                    .execute(rusqlite::params![
                        s.trace_id,
                        s.span_id,
                        s.parent_span_id,
                        s.run_id,
                        s.agent_id,
                        s.name,
                        s.start_ns,
                        s.end_ns,
                        s.pid,
                        s.service
                    ])
                    .map_err(sql(&path, "inserting a span"))?;
            }
        }
        tx.commit().map_err(sql(&path, "committing spans"))?;
        Ok(n)
    }

    /// Every stored span of run `run_id`, by start time.
    pub fn spans_of_run(&self, run_id: &str) -> Result<Vec<SpanRow>, LedgerError> {
        let path = &self.path;
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT trace_id, span_id, parent_span_id, run_id, agent_id, name, start_ns, end_ns, pid, service \
                 FROM spans WHERE run_id = ?1 ORDER BY start_ns, span_id",
            )
            .map_err(sql(path, "preparing a span query"))?;
        let rows = stmt
            .query_map([run_id], |r| {
                Ok(SpanRow {
                    trace_id: r.get(0)?,
                    span_id: r.get(1)?,
                    parent_span_id: r.get(2)?,
                    run_id: r.get(3)?,
                    agent_id: r.get(4)?,
                    name: r.get(5)?,
                    start_ns: r.get(6)?,
                    end_ns: r.get(7)?,
                    pid: r.get(8)?,
                    service: r.get(9)?,
                })
            })
            .map_err(sql(path, "querying spans"))?;
        rows.collect::<Result<Vec<_>, _>>()
            .map_err(sql(path, "reading spans"))
    }
}

/// Brings the schema up to date, one migration per transaction.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), LedgerError> {
    let supported = i64::try_from(schema::MIGRATIONS.len()).unwrap_or(i64::MAX);
    loop {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(sql(path, "beginning a migration"))?;
        // Read inside the write lock, so two agents opening at once do not
        // both apply the same migration.
        let found: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql(path, "reading the schema version"))?;
        if found > supported || found < 0 {
            return Err(LedgerError::SchemaTooNew {
                path: path.to_path_buf(),
                found,
                supported,
            });
        }
        let Some(migration) = usize::try_from(found)
            .ok()
            .and_then(|v| schema::MIGRATIONS.get(v))
        else {
            return Ok(());
        };
        tx.execute_batch(migration)
            .map_err(sql(path, "migrating the schema"))?;
        tx.pragma_update(None, "user_version", found + 1)
            .map_err(sql(path, "setting the schema version"))?;
        tx.commit().map_err(sql(path, "committing a migration"))?;
        tracing::info!(path = %path.display(), version = found + 1, "ledger schema migrated");
    }
}

/// Makes the ledger's files readable by their owner only (0600): the db is
/// created that way before SQLite opens it (SQLite gives its `-wal` and
/// `-shm` the db's mode), and existing files are tightened.
fn private_files(path: &Path) -> Result<(), LedgerError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |p: &Path, what: &'static str| {
        let p = p.to_path_buf();
        move |source| LedgerError::Io {
            path: p,
            what,
            source,
        }
    };
    // Only a missing file is created here. Opening an existing one would be
    // fatal: closing any descriptor of a file drops every POSIX lock this
    // process holds on it, SQLite's included, so a second `Ledger::open` in a
    // process that has the ledger open (the alert engine's) let another
    // process's sqlite3 take it for the last connection, checkpoint and delete
    // the WAL under the agent (readers then failed with "disk I/O error").
    if !path.exists() {
        match fs::OpenOptions::new()
            .create_new(true)
            .append(true)
            .mode(0o600)
            .open(path)
        {
            // Closed at once, before SQLite opens it.
            Ok(_) => {}
            // Another process created it in between.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io(path, "creating the ledger file")(e)),
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let p = PathBuf::from(p);
        match fs::metadata(&p) {
            Ok(m) if m.permissions().mode() & 0o077 != 0 => {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
                    .map_err(io(&p, "making the ledger file private (0600)"))?;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LedgerError::Io {
                    path: p,
                    what: "reading the ledger file's mode",
                    source,
                });
            }
        }
    }
    Ok(())
}

/// Copies the WAL into the db (fsyncing both) and truncates it.
fn checkpoint(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
        .map_err(sql(path, "checkpointing"))?;
    if busy != 0 {
        // A reader held an old snapshot; the next checkpoint finishes the job.
        tracing::debug!(path = %path.display(), "ledger checkpoint incomplete: a reader is active");
    }
    Ok(())
}

fn meta_get(conn: &Connection, path: &Path, key: &str) -> Result<Option<i64>, LedgerError> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
        .map_err(sql(path, "reading ledger metadata"))
}

fn record_exists(conn: &Connection, path: &Path, ws: i64, id: &str) -> Result<bool, LedgerError> {
    conn.prepare_cached("SELECT 1 FROM records WHERE ws_ns = ?1 AND record_id = ?2")
        .and_then(|mut s| s.exists(params![ws, id]))
        .map_err(sql(path, "looking up a record"))
}

/// Adds to a party's month spend.
fn add_spend(
    tx: &Transaction<'_>,
    path: &Path,
    party: &str,
    month_ns: i64,
    add: Exact,
) -> Result<(), LedgerError> {
    let stored: Option<String> = tx
        .query_row(
            "SELECT total FROM spend WHERE party = ?1 AND month_ns = ?2",
            params![party, month_ns],
            |r| r.get(0),
        )
        .optional()
        .map_err(sql(path, "reading month spend"))?;
    let old = match stored {
        Some(s) => {
            Exact::parse(&s).ok_or_else(|| corrupt(path, format!("spend of {party:?}: {s:?}")))?
        }
        None => Exact::ZERO,
    };
    let total = old
        .checked_add(add)
        .ok_or_else(|| overflow("month-to-date spend"))?;
    tx.execute(
        "INSERT INTO spend (party, month_ns, total) VALUES (?1, ?2, ?3) \
         ON CONFLICT (party, month_ns) DO UPDATE SET total = excluded.total",
        params![party, month_ns, total.to_string()],
    )
    .map_err(sql(path, "updating month spend"))?;
    Ok(())
}

fn u64_to_i64(v: u64, what: &str) -> Result<i64, LedgerError> {
    i64::try_from(v).map_err(|_| overflow(what))
}

fn saturating_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The index of a field name in [`FIELDS`], or an error naming it.
fn field_index(name: &str) -> Result<usize, LedgerError> {
    FIELDS
        .iter()
        .position(|f| *f == name)
        .ok_or_else(|| LedgerError::UnknownField {
            field: name.to_string(),
        })
}

/// Appends ` AND i.<field> = ?n` for each filter (names validated, values bound).
fn push_filters(
    query: &mut String,
    values: &mut Vec<Value>,
    filters: &[(String, String)],
) -> Result<(), LedgerError> {
    for (field, value) in filters {
        let idx = field_index(field)?;
        let bad = || LedgerError::BadFieldValue {
            field: field.clone(),
            value: value.clone(),
        };
        let v = match idx {
            PID | PPID => Value::Integer(i64::from(value.parse::<u32>().map_err(|_| bad())?)),
            CGROUP_ID => Value::Integer(u64_bits(value.parse::<u64>().map_err(|_| bad())?)),
            _ => Value::Text(value.clone()),
        };
        values.push(v);
        query.push_str(&format!(" AND i.{} = ?{}", FIELDS[idx], values.len()));
    }
    Ok(())
}

/// A u64 stored in SQLite's i64, bit for bit (cgroup ids use all 64 bits in principle).
fn u64_bits(v: u64) -> i64 {
    i64::from_ne_bytes(v.to_ne_bytes())
}

fn bits_u64(v: i64) -> u64 {
    u64::from_ne_bytes(v.to_ne_bytes())
}

/// One identity's values of the group-by fields, as text.
fn group_key(
    stmt: &mut Statement<'_>,
    path: &Path,
    ident: i64,
    groups: &[usize],
) -> Result<Vec<Option<String>>, LedgerError> {
    let mut rows = stmt
        .query([ident])
        .map_err(sql(path, "reading group keys"))?;
    let row = rows
        .next()
        .map_err(sql(path, "reading group keys"))?
        .ok_or_else(|| corrupt(path, format!("identity {ident} is missing")))?;
    groups
        .iter()
        .enumerate()
        .map(|(col, &field)| {
            let v = row.get_ref(col).map_err(sql(path, "reading group keys"))?;
            Ok(match v {
                ValueRef::Null => None,
                ValueRef::Integer(i) if field == CGROUP_ID => Some(bits_u64(i).to_string()),
                ValueRef::Integer(i) => Some(i.to_string()),
                ValueRef::Real(f) => Some(f.to_string()),
                ValueRef::Text(t) | ValueRef::Blob(t) => {
                    Some(String::from_utf8_lossy(t).into_owned())
                }
            })
        })
        .collect()
}
