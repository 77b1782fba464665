//! The ledger's schema, migrated by SQLite's `user_version`.
//!
//! `MIGRATIONS[i]` takes the schema from version `i` to `i + 1`. A migration
//! is never edited once released: a change is a new entry. Each runs in its
//! own transaction together with its `user_version` bump, so a crash leaves
//! the file at one version or the next, never between.

/// Every migration, in order.
///
/// Issue 15: the alert rules' state is V6 and the alert outbox V7; each is
/// self-contained (its own tables only).
pub(super) const MIGRATIONS: &[&str] = &[V1, V2, V3, V4, V5, V6, V7];

/// Version 1.
///
/// - `identities`: each distinct identity/trace-context tuple once. Records
///   and rollups point at it, so a long-lived workload's names are stored
///   once, not in every one-second record. `hash` is FNV-1a 64 of the tuple
///   (collisions only cost a comparison: lookups check every column).
/// - `records`: one row per record, clustered by (window start, record_id),
///   so a window appends at the end of the B-tree and a time range is one
///   contiguous scan. Times are integer ns since the epoch (RFC 3339 text
///   does not sort: `…:00Z` > `…:00.5Z`). Decimals are `DecBlob`s (NULL for
///   a plain zero); `currency` is NULL when the record is unpriced.
/// - `outbox`: (exporter, record) pairs not yet delivered; a row is deleted
///   on delivery. Both its B-trees are in time order, so a commit appends
///   to them even while an exporter is down and its backlog grows (an index
///   by the random-looking record_id cost 4× the write time there: each
///   window dirtied a page per record). `outbox_by_record` answers
///   compaction's "is this record still owed to anyone".
/// - `windows`: committed windows; the newest is the resume point.
/// - `hourly`: rollups per (hour, identity, currency; '' when unpriced), with
///   exact sums as decimal text and integer sums.
/// - `spend`: exact cost.total per (billed party, month start), kept at
///   commit, for month-to-date without scanning a month of records.
/// - `meta`: `compacted_before`, the start of the oldest hour not compacted.
const V1: &str = "
CREATE TABLE identities (
    id INTEGER PRIMARY KEY,
    hash INTEGER NOT NULL,
    node TEXT NOT NULL,
    record_kind TEXT NOT NULL,
    workload_kind TEXT,
    pid INTEGER,
    ppid INTEGER,
    process_start_time TEXT,
    comm TEXT,
    exe TEXT,
    cgroup_id INTEGER,
    cgroup_path TEXT,
    container_id TEXT,
    container_runtime TEXT,
    pod_uid TEXT,
    k8s_namespace TEXT,
    k8s_pod_name TEXT,
    wasm_module TEXT,
    agent_id TEXT,
    flow_id TEXT,
    run_id TEXT,
    user_id TEXT,
    project_id TEXT,
    customer_id TEXT,
    trace_id TEXT
);
CREATE INDEX identities_hash ON identities (hash);

CREATE TABLE records (
    ws_ns INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    we_ns INTEGER NOT NULL,
    ident INTEGER NOT NULL,
    cpu_core_seconds BLOB,
    memory_gb_seconds BLOB,
    gpu_seconds BLOB,
    gpu_memory_gb_seconds BLOB,
    network_rx_bytes INTEGER NOT NULL,
    network_tx_bytes INTEGER NOT NULL,
    disk_read_bytes INTEGER NOT NULL,
    disk_write_bytes INTEGER NOT NULL,
    storage_bytes INTEGER,
    syscalls INTEGER NOT NULL,
    tokens TEXT,
    tokens_input INTEGER NOT NULL,
    tokens_cache_read_input INTEGER NOT NULL,
    tokens_output INTEGER NOT NULL,
    tokens_reasoning_output INTEGER NOT NULL,
    currency TEXT,
    pricing_version TEXT,
    cost_cpu BLOB,
    cost_memory BLOB,
    cost_gpu BLOB,
    cost_network BLOB,
    cost_storage BLOB,
    cost_token BLOB,
    cost_subtotal BLOB,
    cost_discount BLOB,
    cost_total BLOB,
    PRIMARY KEY (ws_ns, record_id)
) WITHOUT ROWID;

CREATE TABLE outbox (
    exporter TEXT NOT NULL,
    ws_ns INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    PRIMARY KEY (exporter, ws_ns, record_id)
) WITHOUT ROWID;
CREATE INDEX outbox_by_record ON outbox (ws_ns, record_id);

CREATE TABLE windows (
    we_ns INTEGER NOT NULL,
    ws_ns INTEGER NOT NULL,
    committed_ns INTEGER NOT NULL,
    records INTEGER NOT NULL,
    PRIMARY KEY (we_ns, ws_ns)
) WITHOUT ROWID;

CREATE TABLE hourly (
    id INTEGER PRIMARY KEY,
    hour_ns INTEGER NOT NULL,
    ident INTEGER NOT NULL,
    currency TEXT NOT NULL,
    records INTEGER NOT NULL,
    priced INTEGER NOT NULL,
    cpu_core_seconds TEXT NOT NULL,
    memory_gb_seconds TEXT NOT NULL,
    gpu_seconds TEXT NOT NULL,
    gpu_memory_gb_seconds TEXT NOT NULL,
    cost_cpu TEXT NOT NULL,
    cost_memory TEXT NOT NULL,
    cost_gpu TEXT NOT NULL,
    cost_network TEXT NOT NULL,
    cost_storage TEXT NOT NULL,
    cost_token TEXT NOT NULL,
    cost_subtotal TEXT NOT NULL,
    cost_discount TEXT NOT NULL,
    cost_total TEXT NOT NULL,
    network_rx_bytes INTEGER NOT NULL,
    network_tx_bytes INTEGER NOT NULL,
    disk_read_bytes INTEGER NOT NULL,
    disk_write_bytes INTEGER NOT NULL,
    storage_bytes INTEGER NOT NULL,
    syscalls INTEGER NOT NULL,
    tokens_input INTEGER NOT NULL,
    tokens_cache_read_input INTEGER NOT NULL,
    tokens_output INTEGER NOT NULL,
    tokens_reasoning_output INTEGER NOT NULL,
    UNIQUE (hour_ns, ident, currency)
);

CREATE TABLE spend (
    party TEXT NOT NULL,
    month_ns INTEGER NOT NULL,
    total TEXT NOT NULL,
    PRIMARY KEY (party, month_ns)
) WITHOUT ROWID;

CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// Version 2: spans received over OTLP that carry a run, for per-run views
/// (cost by span, critical path). Keyed by (trace, span): a re-sent span is
/// stored once.
const V2: &str = "
CREATE TABLE spans (
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_span_id TEXT,
    run_id TEXT NOT NULL,
    agent_id TEXT,
    name TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    pid INTEGER,
    service TEXT,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE INDEX spans_by_run ON spans (run_id, start_ns);
";

/// Version 3: GPU energy (a `DecBlob`, NULL for zero, as the other
/// quantities) and how each record's GPU time was obtained ("sampled",
/// "estimated"; NULL without GPU use). Rollups sum the energy; they do not
/// keep the attribution, which describes one record's figure.
const V3: &str = "
ALTER TABLE records ADD COLUMN gpu_energy_joules BLOB;
ALTER TABLE records ADD COLUMN gpu_attribution TEXT;
ALTER TABLE hourly ADD COLUMN gpu_energy_joules TEXT NOT NULL DEFAULT '0';
";

/// Version 4: what was set aside rather than allowed to block.
///
/// - `quarantine`: records a window's commit could not store for a reason
///   retrying will not fix (a window before the compaction watermark, a time
///   outside 1677..2262, a count past 64 bits...). The rest of the window is
///   committed in the same transaction; the whole record is kept as JSON with
///   the reason, so nothing is lost silently and an operator can re-bill it.
///   Unique by (window, record): a re-committed window quarantines it once.
/// - `export_series`: each exporter's cumulative value per series, written in
///   the same transaction that marks a batch delivered, so the running totals
///   are exactly what the receiver acknowledged: a failed mark leaves both
///   unchanged and the re-send carries the same values, never doubled.
///   A series is named by a 128-bit hash of its metric and attributes (two
///   integers: rows of ~60 bytes, so a batch's updates dirty few pages; the
///   attributes themselves run to hundreds of bytes). `last_ns` (the newest
///   window end added) lets idle series be evicted, by a scan every few
///   minutes rather than an index every update would have to keep.
/// - `dead_letter`: records an exporter's receiver refused for good
///   (InvalidArgument, or points rejected in a partial success), with the
///   reason: out of the outbox, so they no longer block it, and listed.
const V4: &str = "
CREATE TABLE quarantine (
    id INTEGER PRIMARY KEY,
    quarantined_ns INTEGER NOT NULL,
    window_start TEXT NOT NULL,
    window_end TEXT NOT NULL,
    record_id TEXT NOT NULL,
    record_kind TEXT NOT NULL,
    run_id TEXT,
    reason TEXT NOT NULL,
    record TEXT NOT NULL,
    UNIQUE (window_start, record_id)
);

CREATE TABLE export_series (
    exporter TEXT NOT NULL,
    series_hi INTEGER NOT NULL,
    series_lo INTEGER NOT NULL,
    start_ns INTEGER NOT NULL,
    value TEXT NOT NULL,
    last_ns INTEGER NOT NULL,
    PRIMARY KEY (exporter, series_hi, series_lo)
) WITHOUT ROWID;

CREATE TABLE dead_letter (
    exporter TEXT NOT NULL,
    ws_ns INTEGER NOT NULL,
    record_id TEXT NOT NULL,
    dead_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (exporter, ws_ns, record_id)
) WITHOUT ROWID;
";

/// Version 5: the model parts of hourly rollups (see `models`): per (hour,
/// identity, currency, model), the sums the records of that hour moved to
/// that model, with the token types records keep only in their JSON. The
/// `hourly` row stays the whole; its part with no model is the row minus
/// these. Hours compacted before this version have none.
const V5: &str = "
CREATE TABLE hourly_models (
    hour_ns INTEGER NOT NULL,
    ident INTEGER NOT NULL,
    currency TEXT NOT NULL,
    model TEXT NOT NULL,
    records INTEGER NOT NULL,
    priced INTEGER NOT NULL,
    cpu_core_seconds TEXT NOT NULL,
    memory_gb_seconds TEXT NOT NULL,
    gpu_seconds TEXT NOT NULL,
    gpu_memory_gb_seconds TEXT NOT NULL,
    gpu_energy_joules TEXT NOT NULL,
    cost_cpu TEXT NOT NULL,
    cost_memory TEXT NOT NULL,
    cost_gpu TEXT NOT NULL,
    cost_network TEXT NOT NULL,
    cost_storage TEXT NOT NULL,
    cost_token TEXT NOT NULL,
    cost_subtotal TEXT NOT NULL,
    cost_discount TEXT NOT NULL,
    cost_total TEXT NOT NULL,
    network_rx_bytes INTEGER NOT NULL,
    network_tx_bytes INTEGER NOT NULL,
    disk_read_bytes INTEGER NOT NULL,
    disk_write_bytes INTEGER NOT NULL,
    storage_bytes INTEGER NOT NULL,
    syscalls INTEGER NOT NULL,
    tokens_input INTEGER NOT NULL,
    tokens_cache_read_input INTEGER NOT NULL,
    tokens_output INTEGER NOT NULL,
    tokens_reasoning_output INTEGER NOT NULL,
    tokens_cache_creation_input INTEGER NOT NULL,
    tokens_text_input INTEGER NOT NULL,
    tokens_image_input INTEGER NOT NULL,
    tokens_audio_input INTEGER NOT NULL,
    tokens_video_input INTEGER NOT NULL,
    tokens_text_output INTEGER NOT NULL,
    tokens_audio_output INTEGER NOT NULL,
    PRIMARY KEY (hour_ns, ident, currency, model)
) WITHOUT ROWID;
";

/// Version 6: alert states (`alert::state`), one row per alert (a rule × a
/// group), keyed by its fingerprint (a stable hash of the rule and the group
/// key). `body` is the whole state as JSON (labels, annotations, value,
/// when it was last notified and its repeat count), so a restart resumes
/// every pending and firing alert and re-announces none; `rule`, `state` and
/// `updated_ns` are columns for `/v1/alerts`' filters and for forgetting
/// resolved alerts after `keep_resolved`.
const V6: &str = "
CREATE TABLE alert_states (
    fingerprint TEXT PRIMARY KEY,
    rule TEXT NOT NULL,
    state TEXT NOT NULL,
    updated_ns INTEGER NOT NULL,
    body TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX alert_states_by_rule ON alert_states (rule, state);
";

/// Version 7: the alert outbox (issue 15), one row per (channel, alert
/// event) — see `alert_outbox.rs`.
///
/// Unique by (channel, fingerprint, state, starts_at, repeat): the rules
/// engine re-deciding an event after a restart queues nothing new. A row is
/// pending while `sent_ns` and `dead_ns` are NULL; it is never deleted before
/// it is sent or dead-lettered, and then only past the retention (expiry).
/// `next_ns` is when it may be tried again (its enqueue time at first);
/// `attempts` and `last_error` say how its delivery went so far. The partial
/// index keeps each channel's queue in enqueue order (`id`), so finding the
/// due head costs the queue's pending rows, not the table's history.
const V7: &str = "
CREATE TABLE alert_outbox (
    id INTEGER PRIMARY KEY,
    channel TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    repeat INTEGER NOT NULL,
    rule TEXT NOT NULL,
    event TEXT NOT NULL,
    queued_ns INTEGER NOT NULL,
    next_ns INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_ns INTEGER,
    dead_ns INTEGER,
    UNIQUE (channel, fingerprint, state, starts_at, repeat)
);
CREATE INDEX alert_outbox_pending ON alert_outbox (channel, id)
    WHERE sent_ns IS NULL AND dead_ns IS NULL;
";
