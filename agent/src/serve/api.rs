//! The read-only HTTP query API: usage trees, records, health, Prometheus.
//!
//! `GET /v1/usage` returns the spec's hierarchical aggregation: the root is
//! everything in the range, each level splits its parent by the next
//! `group_by` field, and records lacking that field form an explicit
//! `unattributed` child, so at every level the children sum to the parent
//! exactly (the ledger sums in exact decimal). Bound to loopback by default;
//! bound anywhere else it requires a bearer token read from a file, compared
//! in constant time.
//!
//! Reads never touch the daemon's writer: each request reads on its own
//! read-only SQLite connection (from a small pool), which WAL lets run beside
//! the commits, so a heavy query cannot delay billing. Requests are bounded:
//! a range of at most [`MAX_RANGE_DAYS`] days up to now (an open end far in
//! the future holds no usage and costs nothing), at most [`MAX_GROUPS`] groups
//! per usage tree, [`MAX_RUN_RECORDS`] records and [`MAX_RUN_SPANS`] spans per
//! run view, 1,000 records per page, and [`MAX_CONCURRENT_READS`] reads at a
//! time; a request over a bound gets a 400 naming it.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, Query, Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use time::{Duration as TimeDuration, OffsetDateTime, format_description::well_known::Rfc3339};
use tracing::info;

use crate::{
    ledger::{self, Ledger, RecordQuery, Totals, models::MODEL},
    report::{
        pending::{PendingRun, PendingRuns},
        record::UsageRecord,
    },
    serve::prometheus::Exposition,
};

/// Where the API listens and who may call it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Listen address (default 127.0.0.1:9464).
    pub bind: String,
    /// A file holding the bearer token; required when `bind` is not loopback.
    pub token_file: Option<PathBuf>,
    /// `/v1/stream`: messages queued per client before it counts as fallen behind and is dropped (at least 1).
    pub stream_client_buffer: usize,
    /// `/v1/stream`: clients connected at once; more get a 503.
    pub stream_max_clients: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            bind: "127.0.0.1:9464".into(),
            token_file: None,
            stream_client_buffer: crate::serve::stream::DEFAULT_CLIENT_BUFFER,
            stream_max_clients: crate::serve::stream::DEFAULT_MAX_CLIENTS,
        }
    }
}

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The bind address is not an address.
    #[error("api.bind {bind:?} is not a socket address: {message}")]
    Bind {
        /// The configured value.
        bind: String,
        /// What went wrong.
        message: String,
    },
    /// Bound off loopback without a token.
    #[error(
        "api.bind {0} is not loopback: set api.token_file so the API is not open to the network"
    )]
    NeedsToken(String),
    /// The token file could not be read or is empty.
    #[error("api.token_file {path}: {message}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The listener failed.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
}

/// The longest range one request may ask for, in days.
pub const MAX_RANGE_DAYS: i64 = 31;
/// The most groups a usage tree may have at its deepest level.
pub const MAX_GROUPS: usize = 10_000;
/// The most records a run view reads.
pub const MAX_RUN_RECORDS: usize = 100_000;
/// The most spans a run view reads.
pub const MAX_RUN_SPANS: usize = 10_000;
/// Reads running at once (more wait their turn).
pub const MAX_CONCURRENT_READS: usize = 4;
/// The longest value a `where` clause may compare with.
pub const MAX_VALUE_LEN: usize = 1024;
/// Most records or dead letters per quarantine page.
const MAX_QUARANTINE_PAGE: usize = 1000;

/// Shared state of the API.
#[derive(Clone)]
pub struct AppState {
    /// Read-only connections to the ledger (the daemon writes it on its own).
    readers: Readers,
    /// Prometheus counters.
    pub metrics: Exposition,
    /// Set once probes are attached and the ledger is open.
    pub ready: Arc<AtomicBool>,
    token: Option<Arc<str>>,
    /// Runs with spans received but windows not yet committed (the daemon's).
    pending: Option<Arc<PendingRuns>>,
    /// The live stream's hub (`/v1/stream`), where the daemon feeds one.
    pub(crate) stream: Option<crate::serve::stream::StreamHub>,
}

impl AppState {
    /// State for an API over the ledger at `ledger_path` and `metrics`.
    pub fn new(ledger_path: PathBuf, metrics: Exposition, ready: Arc<AtomicBool>) -> Self {
        Self {
            readers: Readers {
                path: ledger_path,
                idle: Arc::new(Mutex::new(Vec::new())),
                permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_READS)),
            },
            metrics,
            ready,
            token: None,
            pending: None,
            stream: None,
        }
    }

    /// The same, also answering for runs still inside `span_lag` from `pending`.
    pub fn with_pending(mut self, pending: Arc<PendingRuns>) -> Self {
        self.pending = Some(pending);
        self
    }

    /// The same, serving `/v1/stream` from `hub`.
    pub fn with_stream(mut self, hub: crate::serve::stream::StreamHub) -> Self {
        self.stream = Some(hub);
        self
    }
}

/// A pool of read-only connections to the ledger file.
#[derive(Clone)]
struct Readers {
    path: PathBuf,
    idle: Arc<Mutex<Vec<Ledger>>>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Readers {
    fn take(&self) -> Result<Ledger, ledger::LedgerError> {
        let pooled = self.idle.lock().ok().and_then(|mut v| v.pop());
        match pooled {
            Some(l) => Ok(l),
            None => Ledger::open_read_only(&self.path),
        }
    }

    fn give_back(&self, l: Ledger) {
        if let Ok(mut v) = self.idle.lock()
            && v.len() < MAX_CONCURRENT_READS
        {
            v.push(l);
        }
    }
}

/// Compares a presented token with the configured one in time that depends
/// only on the configured token's length, never on where they differ.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != expected.len());
    for (i, e) in expected.iter().enumerate() {
        // Out of range reads wrap, so every byte of `expected` is compared.
        let g = given
            .get(i)
            .or_else(|| given.get(i % given.len().max(1)))
            .copied()
            .unwrap_or(0);
        diff |= std::hint::black_box(g ^ e);
    }
    std::hint::black_box(diff) == 0
}

/// A 400/500 with a JSON body naming what was wrong.
pub(crate) struct Problem(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(crate) fn bad(param: &str, why: impl std::fmt::Display) -> Problem {
    Problem(
        StatusCode::BAD_REQUEST,
        format!("parameter `{param}`: {why}"),
    )
}

/// Binds and serves until `shutdown` resolves.
pub async fn serve(
    config: &ApiConfig,
    mut state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let addr: SocketAddr =
        config
            .bind
            .parse()
            .map_err(|e: std::net::AddrParseError| ApiError::Bind {
                bind: config.bind.clone(),
                message: e.to_string(),
            })?;
    if let Some(path) = &config.token_file {
        let token = std::fs::read_to_string(path).map_err(|e| ApiError::Token {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(ApiError::Token {
                path: path.clone(),
                message: "the file is empty".into(),
            });
        }
        state.token = Some(token.into());
    } else if !addr.ip().is_loopback() {
        return Err(ApiError::NeedsToken(config.bind.clone()));
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ApiError::Listen { addr, source })?;
    info!(%addr, "query API listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|source| ApiError::Listen { addr, source })
}

/// The routes.
pub fn router(state: AppState) -> Router {
    let guarded = Router::new()
        .route("/v1/usage", get(usage))
        .route("/v1/records", get(records))
        .route("/v1/runs/{run_id}", get(run_view))
        .route("/v1/quarantine", get(quarantine))
        .route("/v1/alerts", get(alerts))
        .route("/v1/stream", get(crate::serve::stream_http::stream))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .with_state(state)
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| token_matches(g.as_bytes(), token.as_bytes())) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "a valid bearer token is required" })),
            )
                .into_response();
        }
    }
    next.run(req).await
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        "ready".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Query parameters shared by the usage and records endpoints.
#[derive(Debug, Default, Deserialize)]
pub struct RangeParams {
    /// RFC 3339; default one hour before `to`.
    pub from: Option<String>,
    /// RFC 3339; default now.
    pub to: Option<String>,
    /// Comma-separated `field=value` exact matches.
    #[serde(rename = "where")]
    pub filter: Option<String>,
    /// Comma-separated fields (usage only).
    pub group_by: Option<String>,
    /// Page size (records only; 1–1000, default 100).
    pub limit: Option<usize>,
    /// Cursor from a previous page (records only).
    pub after: Option<String>,
}

/// A validated range and filter.
#[derive(Debug)]
pub struct Range {
    /// RFC 3339.
    pub from: String,
    /// RFC 3339.
    pub to: String,
    /// Exact matches.
    pub filters: Vec<(String, String)>,
}

pub(crate) fn field_ok(param: &str, name: &str) -> Result<(), Problem> {
    if ledger::FIELDS.contains(&name) || name == MODEL {
        Ok(())
    } else {
        Err(bad(
            param,
            format!(
                "unknown field `{name}`; known: {}, {MODEL}",
                ledger::FIELDS.join(", ")
            ),
        ))
    }
}

fn range(p: &RangeParams) -> Result<Range, Problem> {
    let parse = |name: &str, v: &str| {
        let t = OffsetDateTime::parse(v, &Rfc3339)
            .map_err(|e| bad(name, format!("{v:?} is not RFC 3339 ({e})")))?;
        // The ledger keeps times as i64 nanoseconds since the epoch.
        if i64::try_from(t.unix_timestamp_nanos()).is_err() {
            return Err(bad(name, format!("{v:?} is outside 1677..2262")));
        }
        Ok(t)
    };
    let to = match &p.to {
        Some(v) => parse("to", v)?,
        None => OffsetDateTime::now_utc(),
    };
    let from = match &p.from {
        Some(v) => parse("from", v)?,
        None => to - TimeDuration::hours(1),
    };
    if from >= to {
        return Err(bad("from", "must be before `to`"));
    }
    // What a range costs is the usage in it, and there is none past now: an
    // open end (`to` far ahead) is not a long range.
    let data_end = to.min(OffsetDateTime::now_utc() + TimeDuration::days(1));
    if data_end - from > TimeDuration::days(MAX_RANGE_DAYS) {
        return Err(bad(
            "from",
            format!(
                "the range from `from` to `to` is longer than the limit of {MAX_RANGE_DAYS} days per request: ask for it in parts"
            ),
        ));
    }
    let fmt = |t: OffsetDateTime| t.format(&Rfc3339).map_err(|e| bad("to", e));
    let filters = parse_where(p)?;
    Ok(Range {
        from: fmt(from)?,
        to: fmt(to)?,
        filters,
    })
}

/// The `where` clauses of `p`: `field=value` exact matches, each checked.
pub(crate) fn parse_where(p: &RangeParams) -> Result<Vec<(String, String)>, Problem> {
    let mut filters = Vec::new();
    for clause in p
        .filter
        .iter()
        .flat_map(|w| w.split(','))
        .filter(|c| !c.trim().is_empty())
    {
        let (k, v) = clause
            .split_once('=')
            .ok_or_else(|| bad("where", format!("{clause:?} is not field=value")))?;
        let (k, v) = (k.trim(), v.trim());
        field_ok("where", k)?;
        if v.len() > MAX_VALUE_LEN {
            return Err(bad(
                "where",
                format!(
                    "the value of {k} is {} bytes, over the limit of {MAX_VALUE_LEN}",
                    v.len()
                ),
            ));
        }
        // An empty model matches what has no model.
        if k == MODEL && !v.is_empty() && !ledger::models::valid_model_name(v) {
            return Err(bad(
                "where",
                format!(
                    "model={v:?} is not a model name (1 to {} characters of letters, digits and . _ - : / @ +)",
                    ledger::models::MAX_MODEL_LEN
                ),
            ));
        }
        // Integer fields are checked here, so a bad value is the caller's 400,
        // not a ledger error.
        if matches!(k, "pid" | "ppid" | "cgroup_id") && v.parse::<u64>().is_err() {
            return Err(bad(
                "where",
                format!("{k}={v:?}: {k} is an unsigned integer"),
            ));
        }
        filters.push((k.to_string(), v.to_string()));
    }
    Ok(filters)
}

/// Runs a ledger read off the async threads, on a read-only connection of
/// its own (never the daemon's writer), at most [`MAX_CONCURRENT_READS`] at once.
async fn with_ledger<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Ledger) -> Result<T, Problem> + Send + 'static,
) -> Result<T, Problem> {
    let readers = state.readers.clone();
    let _permit = readers
        .permits
        .clone()
        .acquire_owned()
        .await
        .map_err(|e| Problem(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    tokio::task::spawn_blocking(move || {
        let l = readers.take().map_err(ledger_problem)?;
        let out = f(&l);
        readers.give_back(l);
        out
    })
    .await
    .map_err(|e| Problem(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

/// A ledger error as an HTTP problem: the caller's fault for bad arguments.
fn ledger_problem(e: ledger::LedgerError) -> Problem {
    let status = match e {
        ledger::LedgerError::BadTime { .. }
        | ledger::LedgerError::UnknownField { .. }
        | ledger::LedgerError::BadFieldValue { .. }
        | ledger::LedgerError::ZeroLimit => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    Problem(status, e.to_string())
}

/// One node of the aggregation tree.
#[derive(Debug, Serialize)]
pub struct UsageNode {
    /// The field this node's value is of (absent at the root).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The value, or "unattributed" for records lacking the field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Whether this is the explicit unattributed node.
    pub unattributed: bool,
    /// Sums over the node's records.
    pub totals: Totals,
    /// The next level (empty at the last).
    pub children: Vec<UsageNode>,
}

async fn usage(
    State(state): State<AppState>,
    Query(p): Query<RangeParams>,
) -> Result<Json<serde_json::Value>, Problem> {
    let r = range(&p)?;
    let fields: Vec<String> = p
        .group_by
        .iter()
        .flat_map(|g| g.split(','))
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_string)
        .collect();
    for f in &fields {
        field_ok("group_by", f)?;
    }
    if fields.len() > 6 {
        return Err(bad("group_by", "at most 6 fields"));
    }
    let (from, to, filters) = (r.from.clone(), r.to.clone(), r.filters.clone());
    let levels_fields = fields.clone();
    let levels = with_ledger(&state, move |l| {
        let mut levels = Vec::with_capacity(levels_fields.len() + 1);
        for depth in 0..=levels_fields.len() {
            let names: Vec<&str> = levels_fields[..depth].iter().map(String::as_str).collect();
            let rows = l
                .totals(&from, &to, &names, &filters)
                .map_err(ledger_problem)?;
            if rows.len() > MAX_GROUPS {
                return Err(bad(
                    "group_by",
                    format!(
                        "{} groups at depth {depth}, over the limit of {MAX_GROUPS}: group by fewer fields, filter with `where`, or ask for a shorter range",
                        rows.len()
                    ),
                ));
            }
            levels.push(rows);
        }
        Ok(levels)
    })
    .await?;
    let root = build_tree(&fields, &levels);
    Ok(Json(json!({
        "from": r.from,
        "to": r.to,
        "group_by": fields,
        "where": r.filters.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "root": root,
    })))
}

/// Assembles the tree from one totals query per depth (depth d grouped by
/// the first d fields).
pub fn build_tree(fields: &[String], levels: &[Vec<(ledger::Group, Totals)>]) -> UsageNode {
    let root_totals = levels
        .first()
        .and_then(|rows| rows.first())
        .map(|(_, t)| t.clone())
        .unwrap_or_default();
    let mut root = UsageNode {
        field: None,
        key: None,
        unattributed: false,
        totals: root_totals,
        children: Vec::new(),
    };
    attach(&mut root, &[], fields, levels, 1);
    root
}

fn attach(
    node: &mut UsageNode,
    prefix: &[Option<String>],
    fields: &[String],
    levels: &[Vec<(ledger::Group, Totals)>],
    depth: usize,
) {
    let (Some(rows), Some(field)) = (levels.get(depth), fields.get(depth - 1)) else {
        return;
    };
    let mut children: BTreeMap<(bool, String), UsageNode> = BTreeMap::new();
    for (group, totals) in rows.iter().filter(|(g, _)| g.starts_with(prefix)) {
        let value = group.get(depth - 1).cloned().flatten();
        let mut child = UsageNode {
            field: Some(field.clone()),
            key: Some(value.clone().unwrap_or_else(|| "unattributed".into())),
            unattributed: value.is_none(),
            totals: totals.clone(),
            children: Vec::new(),
        };
        let mut next_prefix = prefix.to_vec();
        next_prefix.push(value.clone());
        attach(&mut child, &next_prefix, fields, levels, depth + 1);
        // The unattributed node sorts last.
        children.insert((value.is_none(), value.unwrap_or_default()), child);
    }
    node.children = children.into_values().collect();
}

async fn records(
    State(state): State<AppState>,
    Query(p): Query<RangeParams>,
) -> Result<Json<serde_json::Value>, Problem> {
    let r = range(&p)?;
    let limit = p.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(bad("limit", format!("{limit} is outside 1..=1000")));
    }
    let after = match &p.after {
        Some(c) => {
            let not_cursor = || {
                bad(
                    "after",
                    format!("{c:?} is not a cursor from a previous page"),
                )
            };
            let (time, id) = c.split_once('|').ok_or_else(not_cursor)?;
            if OffsetDateTime::parse(time, &Rfc3339).is_err() || id.is_empty() {
                return Err(not_cursor());
            }
            Some((time.to_string(), id.to_string()))
        }
        None => None,
    };
    if r.filters.iter().any(|(k, _)| k == MODEL) {
        return Err(bad(
            "where",
            "`model` splits records by their token usages: filter by it on /v1/usage or a run view; /v1/records lists whole records",
        ));
    }
    let q = RecordQuery {
        from: r.from,
        to: r.to,
        filters: r.filters,
        after,
        limit,
    };
    let page = with_ledger(&state, move |l| l.records(&q).map_err(ledger_problem)).await?;
    let next = page.next.map(|(a, b)| format!("{a}|{b}"));
    let records: Vec<&UsageRecord> = page.records.iter().collect();
    Ok(Json(json!({ "records": records, "next": next })))
}

/// One span of a run, with the cost of what its process used while it ran.
#[derive(Debug, Serialize)]
struct SpanView {
    trace_id: String,
    span_id: String,
    parent_span_id: Option<String>,
    name: String,
    agent_id: Option<String>,
    pid: Option<u32>,
    start: String,
    end: String,
    duration_ns: i64,
    /// Inclusive: the run's usage of this span's process during the span
    /// (records prorated by overlap), tokens included; a parent includes its
    /// children's.
    cost: rust_decimal::Decimal,
    on_critical_path: bool,
}

/// `GET /v1/runs/{run_id}`: what run X cost, by agent and span, and its critical path.
async fn run_view(
    State(state): State<AppState>,
    UrlPath(run_id): UrlPath<String>,
) -> Result<Json<serde_json::Value>, Problem> {
    use rust_decimal::Decimal;
    if run_id.is_empty() || run_id.len() > 256 {
        return Err(bad("run_id", "must be 1 to 256 characters"));
    }
    let id = run_id.clone();
    let (spans, records, by_agent, total, models, committed) = with_ledger(&state, move |l| {
        let too_big = |what: &str, limit: usize| {
            bad(
                "run_id",
                format!("run `{id}` has more than {limit} {what}, the limit of one run view: query /v1/records?where=run_id={id} page by page instead"),
            )
        };
        let spans = l.spans_of_run(&id).map_err(ledger_problem)?;
        if spans.len() > MAX_RUN_SPANS {
            return Err(too_big("spans", MAX_RUN_SPANS));
        }
        let filters = vec![("run_id".to_string(), id.clone())];
        // The run's records: everything since its first span (or the last
        // day), and at most the longest range one request may cover.
        let now = now_ns();
        let earliest = now - MAX_RANGE_DAYS * 86_400_000_000_000;
        let start = spans.iter().map(|s| s.start_ns).min();
        let from = match start {
            Some(ns) => ns.saturating_sub(60_000_000_000).max(earliest),
            None => now - 86_400_000_000_000,
        };
        let from = crate::probes::clock::rfc3339_of_ns(from);
        let to = crate::probes::clock::rfc3339_of_ns(now.saturating_add(1));
        let mut records = Vec::new();
        let mut after = None;
        loop {
            let page = l
                .records(&RecordQuery {
                    from: from.clone(),
                    to: to.clone(),
                    filters: filters.clone(),
                    after: after.clone(),
                    limit: 1000,
                })
                .map_err(ledger_problem)?;
            records.extend(page.records);
            if records.len() > MAX_RUN_RECORDS {
                return Err(too_big("records", MAX_RUN_RECORDS));
            }
            match page.next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let by_agent = l
            .totals(&from, &to, &["agent_id"], &filters)
            .map_err(ledger_problem)?;
        let total = l.totals(&from, &to, &[], &filters).map_err(ledger_problem)?;
        let models = RunModels {
            by_model: l
                .totals(&from, &to, &[MODEL], &filters)
                .map_err(ledger_problem)?,
            by_agent_model: l
                .totals(&from, &to, &["agent_id", MODEL], &filters)
                .map_err(ledger_problem)?,
        };
        let committed = l.last_window_end().map_err(ledger_problem)?;
        Ok((spans, records, by_agent, total, models, committed))
    })
    .await?;
    let received = state.pending.as_ref().and_then(|p| p.get(&run_id));
    // Pending: spans are in that the ledger has not committed every window
    // of yet (the daemon holds closed windows `span_lag` for late spans).
    let committed_ns = committed
        .as_deref()
        .and_then(crate::probes::clock::unix_ns_of);
    let last_span_end = spans.iter().map(|s| s.end_ns).max();
    let pending =
        received.is_some() || last_span_end.is_some_and(|end| committed_ns.is_none_or(|c| c < end));
    if spans.is_empty() && records.is_empty() {
        let Some(received) = received else {
            return Err(Problem(
                StatusCode::NOT_FOUND,
                format!(
                    "no usage or spans for run `{run_id}`: no span naming it has been received, and nothing of it is committed"
                ),
            ));
        };
        return Ok(Json(json!({
            "run_id": run_id,
            "pending": true,
            "message": pending_message(&received),
            "received": received_json(&received),
            "committed_through": committed,
            "totals": Totals::default(),
            "by_agent": [],
            "by_model": [],
            "by_agent_model": [],
            "spans": [],
            "critical_path": [],
        })));
    }
    let path = crate::report::split::critical_path(
        &spans
            .iter()
            .map(|s| crate::report::split::PathSpan {
                span_id: s.span_id.clone(),
                parent: s.parent_span_id.clone(),
                start: s.start_ns,
                end: s.end_ns,
            })
            .collect::<Vec<_>>(),
    );
    let cost_during = |pid: Option<u32>, start: i64, end: i64| -> Decimal {
        pid.map_or(Decimal::ZERO, |pid| {
            crate::report::record::usage_during(&records, pid, start, end).0
        })
    };
    // Inclusive cost: the span's own process's usage while it ran, plus what
    // its child spans in other processes cost (children in the same process
    // are already inside the parent's interval).
    let own: HashMap<&str, Decimal> = spans
        .iter()
        .map(|s| (s.span_id.as_str(), cost_during(s.pid, s.start_ns, s.end_ns)))
        .collect();
    let mut children: HashMap<&str, Vec<&crate::report::record::SpanRow>> = HashMap::new();
    for s in &spans {
        if let Some(p) = s.parent_span_id.as_deref() {
            children.entry(p).or_default().push(s);
        }
    }
    fn inclusive<'a>(
        s: &'a crate::report::record::SpanRow,
        own: &HashMap<&str, Decimal>,
        children: &HashMap<&str, Vec<&'a crate::report::record::SpanRow>>,
        depth: usize,
    ) -> Decimal {
        let mine = own.get(s.span_id.as_str()).copied().unwrap_or_default();
        if depth > 64 {
            return mine;
        }
        let from_children: Decimal = children
            .get(s.span_id.as_str())
            .into_iter()
            .flatten()
            .map(|c| {
                let whole = inclusive(c, own, children, depth + 1);
                if c.pid == s.pid {
                    whole - own.get(c.span_id.as_str()).copied().unwrap_or_default()
                } else {
                    whole
                }
            })
            .sum();
        mine + from_children
    }
    let views: Vec<SpanView> = spans
        .iter()
        .map(|s| SpanView {
            trace_id: s.trace_id.clone(),
            span_id: s.span_id.clone(),
            parent_span_id: s.parent_span_id.clone(),
            name: s.name.clone(),
            agent_id: s.agent_id.clone(),
            pid: s.pid,
            start: crate::probes::clock::rfc3339_of_ns(s.start_ns),
            end: crate::probes::clock::rfc3339_of_ns(s.end_ns),
            duration_ns: s.end_ns - s.start_ns,
            cost: inclusive(s, &own, &children, 0),
            on_critical_path: path.contains(&s.span_id),
        })
        .collect();
    let critical: Vec<&SpanView> = path
        .iter()
        .filter_map(|id| views.iter().find(|v| &v.span_id == id))
        .collect();
    let duration_ns = match (
        spans.iter().map(|s| s.start_ns).min(),
        spans.iter().map(|s| s.end_ns).max(),
    ) {
        (Some(a), Some(b)) => b - a,
        _ => 0,
    };
    Ok(Json(json!({
        "run_id": run_id,
        "pending": pending,
        "message": if pending {
            Some(received.as_ref().map_or_else(
                || "windows of this run are still held for late spans (span_lag): its usage so far is shown, more is coming".to_string(),
                pending_message,
            ))
        } else {
            None
        },
        "received": received.as_ref().map(received_json),
        "committed_through": committed,
        "totals": total.first().map(|(_, t)| t.clone()).unwrap_or_default(),
        "by_model": models.by_model.iter().map(|(g, t)| json!({
            "model": g.first().cloned().flatten(),
            "tokens": tokens_json(t),
            "token_cost": t.cost.token,
            "totals": t,
        })).collect::<Vec<_>>(),
        "by_agent_model": models.by_agent_model.iter().map(|(g, t)| json!({
            "agent_id": g.first().cloned().flatten(),
            "model": g.get(1).cloned().flatten(),
            "tokens": tokens_json(t),
            "token_cost": t.cost.token,
        })).collect::<Vec<_>>(),
        "by_agent": by_agent.iter().map(|(g, t)| json!({
            "agent_id": g.first().cloned().flatten(),
            "totals": t,
        })).collect::<Vec<_>>(),
        "duration_ns": duration_ns,
        "spans": views,
        "critical_path": critical.iter().map(|v| json!({
            "span_id": v.span_id,
            "name": v.name,
            "agent_id": v.agent_id,
            "duration_ns": v.duration_ns,
            "cost": v.cost,
        })).collect::<Vec<_>>(),
        // The path's root includes everything under it.
        "critical_path_cost": critical.first().map(|v| v.cost).unwrap_or_default(),
    })))
}

/// A run's totals split by model, and by agent and model.
struct RunModels {
    by_model: Vec<(ledger::Group, Totals)>,
    by_agent_model: Vec<(ledger::Group, Totals)>,
}

/// Every token type of a model group.
fn tokens_json(t: &Totals) -> serde_json::Value {
    let types = t.token_types.unwrap_or_default();
    json!({
        "input": t.tokens_input,
        "cache_read_input": t.tokens_cache_read_input,
        "cache_creation_input": types.cache_creation_input,
        "text_input": types.text_input,
        "image_input": types.image_input,
        "audio_input": types.audio_input,
        "video_input": types.video_input,
        "output": t.tokens_output,
        "reasoning_output": t.tokens_reasoning_output,
        "text_output": types.text_output,
        "audio_output": types.audio_output,
    })
}

/// What the daemon has received of a pending run.
fn received_json(r: &PendingRun) -> serde_json::Value {
    json!({
        "spans": r.spans,
        "token_spans": r.token_spans,
        "start": crate::probes::clock::rfc3339_of_ns(r.start_ns),
        "end": crate::probes::clock::rfc3339_of_ns(r.end_ns),
        "agents": r.agents,
    })
}

fn pending_message(r: &PendingRun) -> String {
    format!(
        "pending: {} span(s) received ({} with tokens) from {} to {}; their windows are held for late spans (span_lag) before they are committed, so usage and cost are not final yet",
        r.spans,
        r.token_spans,
        crate::probes::clock::rfc3339_of_ns(r.start_ns),
        crate::probes::clock::rfc3339_of_ns(r.end_ns),
    )
}

fn now_ns() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos()).unwrap_or(i64::MAX)
}

/// Query parameters of `/v1/quarantine`.
#[derive(Debug, Default, Deserialize)]
pub struct QuarantineParams {
    /// Records per page (1–1000, default 100); also the most dead letters shown.
    pub limit: Option<usize>,
    /// Cursor from a previous page's `next`.
    pub before: Option<i64>,
}

/// `GET /v1/quarantine`: records the ledger set aside (newest first, paged),
/// and records exporters' receivers refused for good (dead letters).
async fn quarantine(
    State(state): State<AppState>,
    Query(p): Query<QuarantineParams>,
) -> Result<Json<serde_json::Value>, Problem> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_QUARANTINE_PAGE).contains(&limit) {
        return Err(bad(
            "limit",
            format!("{limit} is outside 1..={MAX_QUARANTINE_PAGE}"),
        ));
    }
    let before = p.before;
    let (records, next, total, dead) = with_ledger(&state, move |l| {
        let (records, next) = l.quarantined(limit, before).map_err(ledger_problem)?;
        let total = l.quarantine_count().map_err(ledger_problem)?;
        let dead = l.dead_letters(limit).map_err(ledger_problem)?;
        Ok((records, next, total, dead))
    })
    .await?;
    Ok(Json(json!({
        "quarantined": total,
        "records": records,
        "next": next,
        "dead_letters": dead,
    })))
}

/// `GET /v1/alerts` parameters.
#[derive(Debug, Deserialize)]
pub struct AlertParams {
    /// `pending`, `firing` or `resolved`.
    pub state: Option<String>,
    /// A rule's name.
    pub rule: Option<String>,
    /// At most this many (default 1,000).
    pub limit: Option<usize>,
}

/// `GET /v1/alerts`: active and recently resolved alerts, most recently changed first.
async fn alerts(
    State(state): State<AppState>,
    Query(p): Query<AlertParams>,
) -> Result<Json<serde_json::Value>, Problem> {
    if let Some(s) = p.state.as_deref()
        && !matches!(s, "pending" | "firing" | "resolved")
    {
        return Err(bad(
            "state",
            format!("{s:?} is not pending, firing or resolved"),
        ));
    }
    if p.rule.as_ref().is_some_and(|r| r.len() > MAX_VALUE_LEN) {
        return Err(bad("rule", format!("over {MAX_VALUE_LEN} bytes")));
    }
    let limit = p.limit.unwrap_or(MAX_QUARANTINE_PAGE);
    if !(1..=MAX_QUARANTINE_PAGE).contains(&limit) {
        return Err(bad(
            "limit",
            format!("{limit} is outside 1..={MAX_QUARANTINE_PAGE}"),
        ));
    }
    let bodies = with_ledger(&state, move |l| {
        l.alert_list(p.state.as_deref(), p.rule.as_deref(), limit)
            .map_err(ledger_problem)
    })
    .await?;
    let alerts: Vec<serde_json::Value> = bodies
        .iter()
        .filter_map(|b| serde_json::from_str(b).ok())
        .collect();
    Ok(Json(json!({ "alerts": alerts })))
}

#[cfg(test)]
pub(crate) mod tests {
    use rust_decimal::Decimal;

    use super::*;

    fn t(cpu: i64) -> Totals {
        Totals {
            cpu_core_seconds: Decimal::from(cpu),
            records: 1,
            ..Default::default()
        }
    }

    #[test]
    fn tree_levels_nest_with_unattributed_last() {
        let fields = vec!["user_id".to_string()];
        let levels = vec![
            vec![(vec![], t(6))],
            vec![
                (vec![None], t(1)),
                (vec![Some("alice".into())], t(2)),
                (vec![Some("bob".into())], t(3)),
            ],
        ];
        let root = build_tree(&fields, &levels);
        let keys: Vec<_> = root
            .children
            .iter()
            .map(|c| c.key.clone().unwrap_or_default())
            .collect();
        assert_eq!(keys, ["alice", "bob", "unattributed"]);
        assert!(root.children[2].unattributed);
        let sum: Decimal = root
            .children
            .iter()
            .map(|c| c.totals.cpu_core_seconds)
            .sum();
        assert_eq!(sum, root.totals.cpu_core_seconds);
    }

    /// A ledger on disk with `n` records (distinct pids) in one window.
    fn ledger_with(dir: &std::path::Path, n: u32) -> Ledger {
        let mut l = Ledger::open(&dir.join("ledger.db"), std::time::Duration::from_secs(3600))
            .expect("open");
        let ws = crate::probes::clock::rfc3339_of_ns(now_ns() - 60_000_000_000);
        let we = crate::probes::clock::rfc3339_of_ns(now_ns() - 59_000_000_000);
        let records: Vec<UsageRecord> = (0..n)
            .map(|i| UsageRecord {
                record_id: format!("r{i}"),
                node: "n".into(),
                window_start: ws.clone(),
                window_end: we.clone(),
                record_kind: "process".into(),
                pid: Some(i + 1),
                ..Default::default()
            })
            .collect();
        l.commit_window(&ws, &we, &records, &[]).expect("commit");
        l
    }

    /// Serves `state` on a free loopback port from its own thread; returns the base URL.
    pub(crate) fn serve_in_background(state: AppState) -> String {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let _ = tx.send(listener.local_addr().expect("addr"));
                let _ = axum::serve(listener, router(state)).await;
            });
        });
        let addr = rx.recv().expect("address");
        format!("http://{addr}")
    }

    /// GET with a deadline far above any real answer (a hang is a failure, not a wait).
    fn get(url: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(std::time::Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        let mut req = agent.get(url);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let mut resp = req.call().expect("the API answers within 30 s");
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_json()
            .unwrap_or(serde_json::Value::Null);
        (status, body)
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!(
            "mentat-api-{name}-{}-{}",
            std::process::id(),
            now_ns()
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        p
    }

    /// The API used to read through the daemon's own ledger behind its
    /// commit mutex: a heavy query held billing up, and a held commit held
    /// the API up. Now it reads on its own connections.
    #[test]
    fn the_api_reads_while_the_writer_holds_the_ledger() {
        let dir = temp_dir("writer");
        let writer = Arc::new(Mutex::new(ledger_with(&dir, 3)));
        let base = serve_in_background(AppState::new(
            dir.join("ledger.db"),
            Exposition::default(),
            Arc::new(AtomicBool::new(true)),
        ));
        // The commit path holds the writer (as during a long commit).
        let held = writer.lock().expect("lock");
        let (status, body) = get(&format!("{base}/v1/records"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["records"].as_array().map(Vec::len), Some(3));
        drop(held);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requests_over_a_bound_get_a_400_naming_it() {
        let dir = temp_dir("bounds");
        let n = u32::try_from(MAX_GROUPS).expect("fits") + 1;
        drop(ledger_with(&dir, n));
        let base = serve_in_background(AppState::new(
            dir.join("ledger.db"),
            Exposition::default(),
            Arc::new(AtomicBool::new(true)),
        ));
        let (status, body) = get(
            &format!("{base}/v1/usage?from=2026-01-01T00:00:00Z&to=2026-03-01T00:00:00Z"),
            None,
        );
        assert_eq!(status, 400);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("31 days")),
            "{body}"
        );
        // An open end is not a long range: there is no usage past now.
        let from = crate::probes::clock::rfc3339_of_ns(now_ns() - 3_600_000_000_000);
        let (status, body) = get(
            &format!("{base}/v1/records?from={from}&to=2200-01-01T00:00:00Z"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        let (status, body) = get(&format!("{base}/v1/records?limit=5000"), None);
        assert_eq!(status, 400);
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("1..=1000")),
            "{body}"
        );
        let (status, body) = get(&format!("{base}/v1/usage?group_by=pid"), None);
        assert_eq!(status, 400, "{body}");
        assert!(
            body["error"].as_str().is_some_and(|e| e.contains("10000")),
            "{body}"
        );
        // Under the bound it answers.
        let (status, body) = get(&format!("{base}/v1/usage?group_by=record_kind"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["root"]["totals"]["records"].as_u64(),
            Some(u64::from(n))
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_token_is_compared_whole() {
        assert!(token_matches(b"s3cret-token", b"s3cret-token"));
        assert!(!token_matches(b"s3cret-tokeN", b"s3cret-token"));
        assert!(!token_matches(b"s3cret", b"s3cret-token"));
        assert!(!token_matches(b"s3cret-token-and-more", b"s3cret-token"));
        assert!(!token_matches(b"", b"s3cret-token"));
        let dir = temp_dir("token");
        drop(ledger_with(&dir, 1));
        let mut state = AppState::new(
            dir.join("ledger.db"),
            Exposition::default(),
            Arc::new(AtomicBool::new(true)),
        );
        state.token = Some("s3cret-token".into());
        let base = serve_in_background(state);
        assert_eq!(get(&format!("{base}/v1/records"), None).0, 401);
        assert_eq!(
            get(&format!("{base}/v1/records"), Some("s3cret-tokeX")).0,
            401
        );
        assert_eq!(
            get(&format!("{base}/v1/records"), Some("s3cret-token")).0,
            200
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quarantined_records_are_listed() {
        let dir = temp_dir("quarantine");
        let mut l = ledger_with(&dir, 1);
        let mut bad = UsageRecord {
            record_id: "bad".into(),
            record_kind: "token".into(),
            context: crate::identity::run::RunContext {
                run_id: Some("run-1".into()),
                ..Default::default()
            },
            window_start: "2026-01-01T00:00:00Z".into(),
            window_end: "2026-01-01T00:00:01Z".into(),
            ..Default::default()
        };
        bad.syscalls = u64::MAX;
        let c = l
            .commit_window_or_quarantine(
                "2026-01-01T00:00:00Z",
                "2026-01-01T00:00:01Z",
                &[bad],
                &[],
            )
            .expect("commit");
        assert_eq!(c.quarantined.len(), 1);
        let base = serve_in_background(AppState::new(
            dir.join("ledger.db"),
            Exposition::default(),
            Arc::new(AtomicBool::new(true)),
        ));
        let (status, body) = get(&format!("{base}/v1/quarantine"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["quarantined"].as_u64(), Some(1));
        let r = &body["records"][0];
        assert_eq!(r["record_id"], "bad");
        assert_eq!(r["run_id"], "run-1");
        assert!(
            r["reason"].as_str().is_some_and(|s| s.contains("syscalls")),
            "{r}"
        );
        assert_eq!(r["record"]["record_kind"], "token");
        assert_eq!(get(&format!("{base}/v1/quarantine?limit=0"), None).0, 400);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A ledger holding run-1: a CPU record of agent a1, and token records of
    /// agents a1 and a2 for models m1 and m2, priced; its spans end at `span_end`.
    fn run_ledger(dir: &std::path::Path, span_end: i64) -> Ledger {
        use crate::{
            identity::run::RunContext,
            report::record::{Cost, SpanRow, TokenUsage},
        };
        let mut l = Ledger::open(&dir.join("ledger.db"), std::time::Duration::from_secs(3600))
            .expect("open");
        let ws_ns = now_ns() - 60_000_000_000;
        let ws = crate::probes::clock::rfc3339_of_ns(ws_ns);
        let we = crate::probes::clock::rfc3339_of_ns(ws_ns + 1_000_000_000);
        let dec = |s: &str| s.parse::<Decimal>().expect("decimal");
        let ctx = |agent: &str| RunContext {
            run_id: Some("run-1".into()),
            agent_id: Some(agent.into()),
            ..RunContext::default()
        };
        let cost = |token: &str, cpu: &str| Cost {
            cpu: dec(cpu),
            token: dec(token),
            subtotal: dec(token) + dec(cpu),
            total: dec(token) + dec(cpu),
            currency: "USD".into(),
            pricing_version: "v".into(),
            ..Cost::default()
        };
        let tok = |id: &str, agent: &str, model: &str, input: u64, c: &str| UsageRecord {
            record_id: id.into(),
            node: "n".into(),
            window_start: ws.clone(),
            window_end: we.clone(),
            record_kind: "tokens".into(),
            context: ctx(agent),
            tokens: vec![TokenUsage {
                model: model.into(),
                input,
                cache_read_input: 1,
                cache_creation_input: 2,
                output: input / 2,
                reasoning_output: 1,
                audio_input: 3,
                cost: Some(dec(c)),
                ..TokenUsage::default()
            }],
            cost: Some(cost(c, "0")),
            ..Default::default()
        };
        let records = vec![
            UsageRecord {
                record_id: "cpu".into(),
                node: "n".into(),
                window_start: ws.clone(),
                window_end: we.clone(),
                record_kind: "process".into(),
                pid: Some(7),
                context: ctx("a1"),
                cpu_core_seconds: dec("0.5"),
                cost: Some(cost("0", "0.0001")),
                ..Default::default()
            },
            tok("t1", "a1", "m1", 1000, "0.0025"),
            tok("t2", "a2", "m1", 10, "0.000025"),
            tok("t3", "a2", "m2", 300, "0.00003"),
        ];
        l.commit_window(&ws, &we, &records, &[]).expect("commit");
        l.commit_spans(&[SpanRow {
            trace_id: "0".repeat(32),
            span_id: "1".repeat(16),
            run_id: "run-1".into(),
            agent_id: Some("a1".into()),
            name: "chat".into(),
            start_ns: ws_ns,
            end_ns: span_end,
            pid: Some(7),
            ..SpanRow::default()
        }])
        .expect("spans");
        l
    }

    #[test]
    fn the_run_view_answers_per_model_and_per_agent_and_model_exactly() {
        let dir = temp_dir("run-models");
        drop(run_ledger(&dir, now_ns() - 59_500_000_000));
        let base = serve_in_background(AppState::new(
            dir.join("ledger.db"),
            Exposition::default(),
            Arc::new(AtomicBool::new(true)),
        ));
        let (status, body) = get(&format!("{base}/v1/runs/run-1"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["pending"], false, "{body}");
        let dec = |v: &serde_json::Value| -> Decimal {
            v.as_str()
                .map(str::to_string)
                .unwrap_or_else(|| v.to_string())
                .parse()
                .expect("decimal")
        };
        let models: Vec<(serde_json::Value, Decimal, u64)> = body["by_model"]
            .as_array()
            .expect("by_model")
            .iter()
            .map(|m| {
                (
                    m["model"].clone(),
                    dec(&m["token_cost"]),
                    m["tokens"]["input"].as_u64().expect("input"),
                )
            })
            .collect();
        assert_eq!(
            models,
            [
                (serde_json::Value::Null, Decimal::ZERO, 0),
                (json!("m1"), dec(&json!("0.002525")), 1010),
                (json!("m2"), dec(&json!("0.00003")), 300),
            ]
        );
        let m1 = &body["by_model"][1]["tokens"];
        assert_eq!(m1["cache_creation_input"], 4);
        assert_eq!(m1["audio_input"], 6);
        assert_eq!(m1["output"], 505);
        // The parts add up to the run's totals exactly.
        let total_token = dec(&body["totals"]["cost"]["token"]);
        let sum: Decimal = models.iter().map(|m| m.1).sum();
        assert_eq!(sum, total_token);
        let am: Vec<(String, String, Decimal)> = body["by_agent_model"]
            .as_array()
            .expect("by_agent_model")
            .iter()
            .map(|m| {
                (
                    m["agent_id"].as_str().unwrap_or("").to_string(),
                    m["model"].as_str().unwrap_or("").to_string(),
                    dec(&m["token_cost"]),
                )
            })
            .collect();
        let find = |a: &str, m: &str| {
            am.iter()
                .find(|x| x.0 == a && x.1 == m)
                .map(|x| x.2)
                .expect("group")
        };
        assert_eq!(find("a1", "m1"), dec(&json!("0.0025")));
        assert_eq!(find("a2", "m1"), dec(&json!("0.000025")));
        assert_eq!(find("a2", "m2"), dec(&json!("0.00003")));
        assert_eq!(am.iter().map(|x| x.2).sum::<Decimal>(), total_token);
        // `model` is a group_by and where field of /v1/usage.
        let (status, body) = get(
            &format!("{base}/v1/usage?group_by=model&where=model=m2"),
            None,
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["root"]["totals"]["tokens_input"], 300);
        assert_eq!(body["root"]["children"][0]["key"], "m2");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_run_still_inside_span_lag_is_pending_not_404() {
        let dir = temp_dir("pending");
        // Spans committed that end after the last committed window.
        drop(run_ledger(&dir, now_ns() + 5_000_000_000));
        let pending = Arc::new(PendingRuns::default());
        pending.note(&[crate::context::spans::Span {
            start_unix_ns: 1_800_000_000_000_000_000,
            end_unix_ns: 1_800_000_001_000_000_000,
            context: crate::identity::run::RunContext {
                run_id: Some("run-new".into()),
                agent_id: Some("a9".into()),
                ..Default::default()
            },
            ..Default::default()
        }]);
        let base = serve_in_background(
            AppState::new(
                dir.join("ledger.db"),
                Exposition::default(),
                Arc::new(AtomicBool::new(true)),
            )
            .with_pending(pending),
        );
        // Received, nothing committed: 200, pending, what is known.
        let (status, body) = get(&format!("{base}/v1/runs/run-new"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["pending"], true);
        assert_eq!(body["received"]["spans"], 1);
        assert_eq!(body["received"]["agents"], json!(["a9"]));
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("span_lag")),
            "{body}"
        );
        // Committed in part: its spans end after the last committed window.
        let (status, body) = get(&format!("{base}/v1/runs/run-1"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["pending"], true, "{body}");
        // Nobody's run is still a 404.
        let (status, body) = get(&format!("{base}/v1/runs/run-nobody"), None);
        assert_eq!(status, 404, "{body}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_model_queries_get_a_400_naming_what_was_wrong() {
        let dir = temp_dir("bad-model");
        drop(ledger_with(&dir, 1));
        let base = serve_in_background(AppState::new(
            dir.join("ledger.db"),
            Exposition::default(),
            Arc::new(AtomicBool::new(true)),
        ));
        let error = |url: &str| {
            let (status, body) = get(&format!("{base}{url}"), None);
            assert_eq!(status, 400, "{url}: {body}");
            body["error"].as_str().unwrap_or_default().to_string()
        };
        assert!(error("/v1/usage?group_by=colour").contains("colour"));
        assert!(error("/v1/usage?group_by=model,colour").contains("colour"));
        assert!(error("/v1/usage?where=model=gpt%204o%27%3B").contains("not a model name"));
        let huge = "x".repeat(MAX_VALUE_LEN + 1);
        assert!(error(&format!("/v1/usage?where=run_id={huge}")).contains("over the limit"));
        assert!(error("/v1/records?where=model=m1").contains("/v1/usage"));
        assert!(error(&format!("/v1/runs/{}", "r".repeat(300))).contains("run_id"));
        // A good model query answers (nothing matches: an empty tree).
        let (status, body) = get(&format!("{base}/v1/usage?group_by=model"), None);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["root"]["children"][0]["key"], "unattributed");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn bad_parameters_name_themselves() {
        let p = RangeParams {
            from: Some("yesterday".into()),
            ..Default::default()
        };
        let Err(Problem(code, msg)) = range(&p) else {
            panic!("accepted a bad `from`");
        };
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(msg.contains("`from`") && msg.contains("yesterday"), "{msg}");
        let p = RangeParams {
            filter: Some("colour=red".into()),
            ..Default::default()
        };
        let Err(Problem(_, msg)) = range(&p) else {
            panic!("accepted an unknown field");
        };
        assert!(msg.contains("`where`") && msg.contains("colour"), "{msg}");
    }
}
