//! `mentat-agent run`: the node daemon, and the one place the stages are
//! called in order.
//!
//! A collector thread closes a window every tick. Each window's records are
//! then priced, committed durably to the ledger (and queued for every
//! exporter), counted for `/metrics`, and only then offered to the
//! exporters, which read from the ledger's outbox. The query API reads the
//! ledger. A crash loses at most the window being collected: everything
//! committed is delivered after restart, and nothing is committed twice.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use rust_decimal::Decimal;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use crate::{
    api::{self, AppState},
    collect::Collector,
    collect::Window,
    config::Config,
    context::token_record,
    export::{self, OtlpExporter, Outbox},
    gpu::GpuMeter,
    intake::{InboxLimits, SpanInbox},
    ledger::Ledger,
    ledger::SpanRow,
    ledger::{Committed, SeriesId, SeriesState},
    output::Report,
    pods::PodDirectory,
    pricing::{PriceBook, PriceBookHandle, billed_party},
    probes::{ProbeError, Probes},
    prometheus::{AgentStats, Metrics},
    receiver::{self, Enricher, ForwardOptions, Forwarder, ReceiverStats},
    report::Span as Span_,
    storage::StorageMeter,
    usage::{UsageRecord, core_seconds, stable_id},
};

/// The price book shipped with the agent, used when no `pricing_path` is set.
pub const DEFAULT_PRICE_BOOK: &str = include_str!("../../deploy/pricing.toml");

/// The exporter name the OTLP outbox is kept under.
const OTLP: &str = "otlp";

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The probes could not be loaded or read.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The ledger could not be opened or written.
    #[error("ledger: {0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    /// The price book is not valid.
    #[error(transparent)]
    Pricing(#[from] crate::pricing::PricingError),
    /// The API could not start.
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// The exporter is misconfigured.
    #[error(transparent)]
    Export(#[from] export::ExportError),
    /// The OTLP receiver is misconfigured.
    #[error(transparent)]
    Receiver(#[from] receiver::ReceiverError),
    /// A thread of the daemon died.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// Logs a one-line node summary of a window.
fn log_window(r: &Report, committed: usize) {
    let s = &r.summary;
    let bucket = |name: &str| {
        r.buckets
            .iter()
            .find(|b| b.record_type == name)
            .map_or(0.0, |b| b.cpu_core_seconds)
    };
    info!(
        window_end = %s.window_end,
        processes = s.processes_on_node,
        committed,
        cpu_s = format!("{:.3}", core_seconds(s.accounted_cpu_ns)),
        idle_s = format!("{:.3}", bucket("idle")),
        unattributed_s = format!("{:.3}", bucket("unattributed")),
        drops = s.map_full_drops,
        conserved = s.accounted_cpu_ns == s.attributed_cpu_ns,
        "window closed"
    );
}

/// What one window sends from the collector to the committing stage.
struct ClosedWindow {
    report: Report,
    /// Writable-layer bytes per container, measured by the end of the window.
    storage: HashMap<String, u64>,
    /// Token usage of the spans received since the last window.
    tokens: Vec<UsageRecord>,
    /// Those spans, for per-run views.
    spans: Vec<SpanRow>,
    /// NVML errors at the window's GPU reading.
    gpu_errors: u64,
    /// The inbox slots of `spans`' spans, freed when the window is dropped
    /// (committed, or given up).
    _taken: TakenSpans,
}

/// Spans a window took from the inbox: they count against
/// `max_pending_spans` until the window is gone, so the records waiting to
/// be committed are bounded too.
struct TakenSpans(Arc<SpanInbox>, usize);

impl Drop for TakenSpans {
    fn drop(&mut self) {
        self.0.release(self.1);
    }
}

/// The first wait before a failed commit is tried again; it doubles up to
/// [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two tries of a failed commit.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(10);
/// Tries of a failing commit once the daemon is stopping.
const COMMIT_TRIES_AT_STOP: u32 = 3;

/// Counters of the commit path, for `/metrics`.
#[derive(Debug, Default)]
struct CommitCounters {
    /// Records set aside into the ledger's quarantine.
    quarantined: AtomicU64,
    /// Times the ledger's lock was found poisoned (a holder panicked) and recovered.
    poisoned: AtomicU64,
    /// Window commits that panicked (their records were quarantined).
    panicked: AtomicU64,
}

impl CommitCounters {
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "mentat_agent_quarantined_records_total",
                "Records the ledger refused for a reason retrying cannot fix (before the compaction watermark, a time outside 1677..2262, a count past 64 bits...): set aside in its quarantine table (GET /v1/quarantine) while the rest of their window was committed.",
                self.quarantined.load(Ordering::Relaxed),
            ),
            (
                "mentat_agent_ledger_lock_poisoned_total",
                "Times the ledger's lock was found poisoned by a panicked holder and taken over (the panicked transaction was rolled back).",
                self.poisoned.load(Ordering::Relaxed),
            ),
            (
                "mentat_agent_commit_panics_total",
                "Window commits that panicked; their records were set aside in the quarantine, and later windows went on.",
                self.panicked.load(Ordering::Relaxed),
            ),
        ]
    }
}

/// Locks the ledger; a lock poisoned by a panicked holder is taken over and
/// counted (SQLite rolled the holder's transaction back, and the ledger's
/// caches change only after a commit), rather than stopping billing for good.
fn lock_ledger<'a>(
    ledger: &'a Mutex<Ledger>,
    counters: &CommitCounters,
) -> std::sync::MutexGuard<'a, Ledger> {
    ledger.lock().unwrap_or_else(|poisoned| {
        counters.poisoned.fetch_add(1, Ordering::Relaxed);
        warn!("the ledger's lock was poisoned by a panic; taking it over");
        ledger.clear_poison();
        poisoned.into_inner()
    })
}

/// Why a window's commit failed.
#[derive(Debug)]
struct CommitFailure {
    /// Retrying may succeed (I/O, disk full, busy).
    transient: bool,
    message: String,
}

impl From<crate::ledger::LedgerError> for CommitFailure {
    fn from(e: crate::ledger::LedgerError) -> Self {
        Self {
            transient: e.is_transient(),
            message: e.to_string(),
        }
    }
}

/// Prices one window and writes it, with its spans, to the ledger; records
/// the ledger cannot take for good are quarantined, the rest committed.
///
/// The window's token records (~50,000 a window under span load) move into
/// the records committed rather than being copied; if the attempt fails or
/// panics they move back into `w`, for the retry or the quarantine.
fn commit_one(
    ledger: &Arc<Mutex<Ledger>>,
    book: &PriceBook,
    exporters: &[&'static str],
    w: &mut ClosedWindow,
    counters: &CommitCounters,
) -> Result<(Vec<UsageRecord>, Committed), CommitFailure> {
    let tokens = std::mem::take(&mut w.tokens);
    let at = w.report.processes.len();
    let range = at..at + tokens.len();
    let mut taken = TokensTaken {
        records: usage_records_with(w, tokens),
        tokens: &mut w.tokens,
        range,
        kept: false,
    };
    let window_start = &w.report.summary.window_start;
    price_all(ledger, book, &mut taken.records, window_start, counters)?;
    let mut l = lock_ledger(ledger, counters);
    l.commit_spans(&w.spans)?;
    let committed = l.commit_window_or_quarantine(
        window_start,
        &w.report.summary.window_end,
        &taken.records,
        exporters,
    )?;
    taken.kept = true;
    let mut records = std::mem::take(&mut taken.records);
    // What was set aside is not billed, so not counted on /metrics either.
    if !committed.quarantined.is_empty() {
        let aside: std::collections::HashSet<&str> = committed
            .quarantined
            .iter()
            .map(|q| q.record_id.as_str())
            .collect();
        records.retain(|r| !aside.contains(r.record_id.as_str()));
    }
    Ok((records, committed))
}

/// A window's token records lent to its records for one commit attempt:
/// unless the attempt succeeded, they go back to the window when this is
/// dropped (an error returned, or a panic unwinding).
struct TokensTaken<'w> {
    records: Vec<UsageRecord>,
    tokens: &'w mut Vec<UsageRecord>,
    range: std::ops::Range<usize>,
    kept: bool,
}

impl Drop for TokensTaken<'_> {
    fn drop(&mut self) {
        if !self.kept && self.range.end <= self.records.len() {
            // As they came: the attempt's prices are not theirs to keep.
            *self.tokens = self
                .records
                .drain(self.range.clone())
                .map(|r| UsageRecord { cost: None, ..r })
                .collect();
        }
    }
}

/// The last resort for a window whose commit failed for a reason retrying
/// will not fix, or panicked: its records go to the quarantine whole, with
/// the reason, so the windows behind it can go on.
fn quarantine_window(
    ledger: &Arc<Mutex<Ledger>>,
    w: &ClosedWindow,
    reason: &str,
    counters: &CommitCounters,
) -> Result<Committed, CommitFailure> {
    let records = usage_records(w);
    let mut l = lock_ledger(ledger, counters);
    Ok(l.quarantine_records(
        &w.report.summary.window_start,
        &w.report.summary.window_end,
        &records,
        reason,
    )?)
}

/// Counts and logs what a commit set aside: one WARN per record naming it,
/// at most [`QUARANTINE_LOGS_PER_WINDOW`] per window, then one line with the rest.
fn report_quarantined(committed: &Committed, counters: &CommitCounters) {
    let n = committed.quarantined.len();
    if n == 0 {
        return;
    }
    counters.quarantined.fetch_add(n as u64, Ordering::Relaxed);
    for q in committed
        .quarantined
        .iter()
        .take(QUARANTINE_LOGS_PER_WINDOW)
    {
        warn!(
            record_id = %q.record_id,
            kind = %q.record_kind,
            run_id = q.run_id.as_deref().unwrap_or(""),
            window_start = %q.window_start,
            reason = %q.reason,
            "record quarantined: the ledger cannot take it; the rest of its window was committed (see GET /v1/quarantine)"
        );
    }
    if n > QUARANTINE_LOGS_PER_WINDOW {
        warn!(
            more = n - QUARANTINE_LOGS_PER_WINDOW,
            window_start = %committed.quarantined[0].window_start,
            "more records of this window quarantined (see GET /v1/quarantine)"
        );
    }
}

/// Quarantined records logged one by one per window (the rest in one line).
const QUARANTINE_LOGS_PER_WINDOW: usize = 10;

/// Turns a window's report into the records the ledger stores.
fn usage_records(w: &ClosedWindow) -> Vec<UsageRecord> {
    usage_records_with(w, w.tokens.clone())
}

/// As [`usage_records`], with the window's token records given (moved).
fn usage_records_with(w: &ClosedWindow, tokens: Vec<UsageRecord>) -> Vec<UsageRecord> {
    let r = &w.report;
    let mut out: Vec<UsageRecord> =
        Vec::with_capacity(r.processes.len() * 2 + tokens.len() + r.buckets.len());
    out.extend(r.processes.iter().map(UsageRecord::from_process));
    out.extend(tokens);
    out.extend(r.buckets.iter().map(UsageRecord::from_bucket));
    // One storage record per container: storage belongs to the container,
    // not to each of its processes.
    let mut seen = BTreeMap::new();
    for p in &r.processes {
        if let Some(c) = &p.identity.container_id
            && let Some(&bytes) = w.storage.get(c)
        {
            seen.entry(c.clone()).or_insert((p, bytes));
        }
    }
    for (container, (p, bytes)) in seen {
        let base = UsageRecord::from_process(p);
        out.push(UsageRecord {
            record_id: stable_id(&[
                r.summary.node.as_bytes(),
                b"storage",
                container.as_bytes(),
                r.summary.window_start.as_bytes(),
            ]),
            record_kind: "storage".into(),
            pid: None,
            ppid: None,
            comm: None,
            exe: None,
            process_start_time: None,
            cgroup_id: None,
            cgroup_path: None,
            storage_bytes: Some(bytes),
            ..UsageRecord {
                cpu_core_seconds: Decimal::ZERO,
                memory_gb_seconds: Decimal::ZERO,
                network_rx_bytes: 0,
                network_tx_bytes: 0,
                disk_read_bytes: 0,
                disk_write_bytes: 0,
                syscalls: 0,
                ..base
            }
        });
    }
    out
}

/// The ledger as the OTLP exporter's outbox.
struct LedgerOutbox(Arc<Mutex<Ledger>>, Arc<CommitCounters>);

impl LedgerOutbox {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        lock_ledger(&self.0, &self.1)
    }
}

impl Outbox for LedgerOutbox {
    fn pending(&mut self, limit: usize) -> Result<Vec<UsageRecord>, String> {
        self.ledger()
            .pending(OTLP, limit)
            .map_err(|e| e.to_string())
    }

    fn series(&mut self, keys: &[SeriesId]) -> Result<HashMap<SeriesId, SeriesState>, String> {
        self.ledger()
            .export_series(OTLP, keys)
            .map_err(|e| e.to_string())
    }

    fn delivered(
        &mut self,
        record_ids: &[String],
        series: &[(SeriesId, SeriesState)],
        rejected: Option<&str>,
    ) -> Result<(), String> {
        self.ledger()
            .mark_delivered_with(OTLP, record_ids, series, rejected)
            .map_err(|e| e.to_string())
    }

    fn dead_letter(&mut self, record_ids: &[String], reason: &str) -> Result<(), String> {
        self.ledger()
            .dead_letter(OTLP, record_ids, reason)
            .map_err(|e| e.to_string())
    }

    fn evict_series(&mut self, idle_before_ns: u64) -> Result<u64, String> {
        self.ledger()
            .evict_export_series(OTLP, idle_before_ns)
            .map_err(|e| e.to_string())
    }

    fn reset_series(&mut self) -> Result<u64, String> {
        self.ledger()
            .reset_export_series(OTLP)
            .map_err(|e| e.to_string())
    }
}

/// Runs until SIGINT or SIGTERM; the last partial window is closed,
/// committed and offered to the exporters before exit. SIGHUP reloads the
/// price book (a bad book keeps the old one).
pub async fn run(config: Config, node: String) -> Result<(), DaemonError> {
    let book = match &config.pricing_path {
        Some(path) => PriceBook::load(path)?,
        None => PriceBook::parse(DEFAULT_PRICE_BOOK, "built-in deploy/pricing.toml")?,
    };
    info!(
        version = book.version(),
        currency = book.currency(),
        "price book in force"
    );
    let prices = PriceBookHandle::new(book);

    let ledger = Ledger::open(&config.ledger_path, config.raw_retention)?;
    match ledger.last_window_end()? {
        Some(end) => info!(
            resumes_after = %end,
            "ledger opened; the time between its last window and now was not metered (the agent was down)"
        ),
        None => info!(path = %config.ledger_path.display(), "new ledger"),
    }
    let ledger = Arc::new(Mutex::new(ledger));
    let metrics = {
        let prices = prices.clone();
        Metrics::new(config.metrics.clone(), move |m| {
            prices.current().has_model(m)
        })
    };
    let commit_counters = Arc::new(CommitCounters::default());
    {
        let c = commit_counters.clone();
        metrics.add_source(move || c.counters());
    }
    let ready = Arc::new(AtomicBool::new(false));

    let mut probes = Probes::load(&config.probe_config())?;
    // The kernel's sender table goes to the receiver: spans are bound to
    // the process that sent them, not to what they claim.
    let binder = Arc::new(crate::sender::Binder::kernel(
        probes.take_senders(),
        crate::sender::parse_rules(&config.receiver.trusted_forwarders)
            .map_err(receiver::ReceiverError::TrustedForwarder)?,
    ));
    info!(node, tick = ?config.tick, "probes attached; metering");

    let (stop_tx, stop_rx) = watch::channel(false);
    let (wake_tx, wake_rx) = watch::channel(0u64);
    let otlp = config.otlp.clone();
    let exporters: Vec<&'static str> = if otlp.endpoint.is_empty() {
        info!("OTLP export off (no endpoint configured)");
        Vec::new()
    } else {
        vec![OTLP]
    };
    let exporter_task = if otlp.endpoint.is_empty() {
        None
    } else {
        let mut exporter = OtlpExporter::new(&otlp, &node)?;
        info!(endpoint = %otlp.endpoint, "OTLP export on");
        let mut outbox = LedgerOutbox(ledger.clone(), commit_counters.clone());
        let stop = stop_rx.clone();
        let stats = Arc::new(export::ExportStats::default());
        {
            let stats = stats.clone();
            metrics.add_source(move || stats.counters());
        }
        Some(tokio::spawn(async move {
            export::drain(&mut exporter, &mut outbox, &stats, wake_rx, stop).await;
        }))
    };

    let api_state = AppState::new(config.ledger_path.clone(), metrics.clone(), ready.clone());
    let mut api_stop = stop_rx.clone();
    let api_config = config.api.clone();
    let api_task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = api_stop.wait_for(|s| *s).await;
        };
        api::serve(&api_config, api_state, shutdown).await
    });

    // Spans from the agents on this node: the receiver admits them into the
    // inbox before it answers; the collector reads it when it splits windows.
    let inbox = Arc::new(SpanInbox::new(InboxLimits {
        max_pending: config.receiver.max_pending_spans,
        max_indexed: config.receiver.max_indexed_spans,
        max_indexed_per_sender: config.receiver.max_indexed_spans_per_process,
    }));
    let receiver_stats = Arc::new(ReceiverStats::default());
    {
        let (inbox, stats, binder) = (inbox.clone(), receiver_stats.clone(), binder.clone());
        metrics.add_source(move || {
            let mut c = stats.counters();
            c.extend(binder.counters());
            c.extend(inbox.counters());
            c
        });
    }
    let forwarder = match config
        .receiver
        .upstream
        .as_ref()
        .filter(|u| !u.endpoint.is_empty())
    {
        Some(upstream) => Some(Forwarder::start(
            upstream,
            ForwardOptions {
                queue_bytes: config.receiver.forward_queue_bytes,
                // A span's usage is committed once its windows have waited
                // span_lag and closed; enrich after that.
                delay: config.span_lag + config.tick * 2 + Duration::from_secs(2),
                enrich: Some(cost_enricher(config.ledger_path.clone())),
                ..ForwardOptions::default()
            },
            receiver_stats.clone(),
        )?),
        None => None,
    };
    // Bound before anything runs: a port in use stops start-up with its name.
    let bound = receiver::Receiver::bind(config.receiver.clone())
        .await?
        .with_binder(binder.clone());
    let receiver_task = {
        let mut stop = stop_rx.clone();
        let stats = receiver_stats.clone();
        let inbox = inbox.clone();
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            bound.run(inbox, stats, forwarder, shutdown).await
        })
    };

    let stop_flag = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<ClosedWindow>(16);
    let collector = {
        let stop = stop_flag.clone();
        let node = node.clone();
        let pods = PodDirectory::start(config.kubernetes.clone(), &node, config.pod_refresh);
        let storage = StorageMeter::start(Duration::from_secs(60));
        let (tick, sample, lag) = (config.tick, config.sample_interval, config.span_lag);
        let inbox = inbox.clone();
        let gpu_config = config.gpu.clone();
        thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                let mut collector = Collector::new(probes, sample)
                    .with_pods(pods)
                    .with_storage(storage);
                match GpuMeter::open(&gpu_config) {
                    Ok(gpu) => {
                        info!(devices = gpu.devices().len(), "GPU metering on (NVML)");
                        collector = collector.with_gpu(gpu);
                    }
                    Err(e) => info!(reason = %e, "GPU metering off"),
                }
                collect_loop(collector, &node, tick, lag, &inbox, &stop, &tx)
            })
            .map_err(|_| DaemonError::Panicked("collector"))?
    };
    ready.store(true, Ordering::SeqCst);

    let commit = {
        let ledger = ledger.clone();
        let metrics = metrics.clone();
        let prices = prices.clone();
        let stop_flag = stop_flag.clone();
        let counters = commit_counters.clone();
        async move {
            let mut committed_windows = 0u64;
            while let Some(mut w) = rx.recv().await {
                // A window that cannot be written (disk full, I/O error) is
                // kept and retried, never dropped: later windows queue behind
                // it (the channel, then the collector), so billing resumes
                // where it stopped once the ledger can be written again.
                // Records the ledger refuses for good are quarantined inside
                // the commit; a window that fails for good as a whole (or
                // panics) is quarantined whole: neither is ever retried, so
                // neither can block the node's billing.
                let mut backoff = COMMIT_RETRY_FIRST;
                let mut failures = 0u32;
                loop {
                    let ledger = ledger.clone();
                    let book = prices.current();
                    let exporters = exporters.clone();
                    let task_counters = counters.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        let counters = task_counters;
                        let attempt =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                commit_one(&ledger, &book, &exporters, &mut w, &counters)
                            }));
                        let failure = match attempt {
                            Ok(Ok((records, c))) => return Ok((w, records, c)),
                            Ok(Err(f)) if f.transient => return Err((Box::new(w), f)),
                            Ok(Err(f)) => f.message,
                            Err(panic) => {
                                counters.panicked.fetch_add(1, Ordering::Relaxed);
                                let what = panic
                                    .downcast_ref::<&str>()
                                    .map(|s| s.to_string())
                                    .or_else(|| panic.downcast_ref::<String>().cloned())
                                    .unwrap_or_default();
                                error!(
                                    window_start = %w.report.summary.window_start,
                                    panic = %what,
                                    "committing a window panicked; its records are quarantined"
                                );
                                format!("committing the window panicked: {what}")
                            }
                        };
                        let set_aside =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                quarantine_window(&ledger, &w, &failure, &counters)
                            }));
                        match set_aside {
                            Ok(Ok(c)) => Ok((w, Vec::new(), c)),
                            Ok(Err(f)) => Err((Box::new(w), f)),
                            Err(_) => {
                                counters.panicked.fetch_add(1, Ordering::Relaxed);
                                Err((
                                    Box::new(w),
                                    CommitFailure {
                                        transient: true,
                                        message: format!(
                                            "{failure}; quarantining the window panicked too"
                                        ),
                                    },
                                ))
                            }
                        }
                    })
                    .await;
                    match result {
                        Ok(Ok((w, records, committed))) => {
                            let s = &w.report.summary;
                            report_quarantined(&committed, &counters);
                            metrics.observe(
                                &records,
                                AgentStats {
                                    windows: 1,
                                    map_full_drops: s.map_full_drops,
                                    events_lost: s.events_lost,
                                    late_windows: s.late_windows,
                                    gpu_errors: w.gpu_errors,
                                },
                            );
                            if failures > 0 {
                                info!(
                                    window_start = %s.window_start,
                                    failures,
                                    "window committed after failed attempts"
                                );
                            }
                            log_window(&w.report, committed.new);
                            committed_windows += 1;
                            let _ = wake_tx.send(committed_windows);
                            break;
                        }
                        Ok(Err((back, e))) => {
                            failures += 1;
                            metrics.commit_failed();
                            let s = &back.report.summary;
                            // At stop there is no later: a few more tries, then say
                            // exactly which window is lost.
                            if stop_flag.load(Ordering::SeqCst) && failures >= COMMIT_TRIES_AT_STOP
                            {
                                error!(
                                    window_start = %s.window_start,
                                    window_end = %s.window_end,
                                    error = %e.message,
                                    "stopping with a window the ledger cannot take: it is lost"
                                );
                                break;
                            }
                            if failures == 1 || failures.is_multiple_of(10) {
                                warn!(
                                    window_start = %s.window_start,
                                    error = %e.message,
                                    failures,
                                    retry_in = ?backoff,
                                    "committing a window failed; it is kept and retried, later windows wait"
                                );
                            }
                            w = *back;
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(COMMIT_RETRY_MAX);
                        }
                        Err(e) => {
                            // Panics are caught inside; this is the runtime going away.
                            counters.panicked.fetch_add(1, Ordering::Relaxed);
                            error!(error = %e, "the commit task failed; its window is lost");
                            break;
                        }
                    }
                }
            }
        }
    };
    let signals = async {
        shutdown_signal(&prices, config.pricing_path.clone()).await;
        info!("stopping: closing the last window");
        stop_flag.store(true, Ordering::SeqCst);
    };
    let compaction = compact_periodically(
        ledger.clone(),
        config.retention,
        commit_counters.clone(),
        stop_rx.clone(),
    );
    // The commit loop ends when the collector drops its sender after the last window.
    tokio::join!(commit, signals);
    let _ = stop_tx.send(true);
    let collected = collector
        .join()
        .map_err(|_| DaemonError::Panicked("collector"));
    compaction.abort();
    if let Some(t) = exporter_task {
        // `drain` sends what is still pending (the last window included) before it returns.
        let _ = t.await;
    }
    match receiver_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "the OTLP receiver failed"),
        Err(_) => error!("the OTLP receiver task panicked"),
    }
    match api_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => return Err(DaemonError::Panicked("api")),
    }
    collected?
}

/// Prices every record of a window; month-to-date spend comes from the
/// ledger (before this window) plus what this window already priced.
fn price_all(
    ledger: &Arc<Mutex<Ledger>>,
    book: &PriceBook,
    records: &mut [UsageRecord],
    window_start: &str,
    counters: &CommitCounters,
) -> Result<(), CommitFailure> {
    let l = lock_ledger(ledger, counters);
    let mut spend: HashMap<String, Decimal> = HashMap::new();
    for r in records.iter_mut() {
        let party = billed_party(r).map(str::to_string);
        let mtd = match &party {
            Some(p) => match spend.get(p) {
                Some(d) => *d,
                None => l.month_to_date(p, window_start)?,
            },
            None => Decimal::ZERO,
        };
        let cost = book.price(r, mtd);
        if let Some(p) = party {
            spend.insert(p, mtd + cost.total);
        }
        r.cost = Some(cost);
    }
    Ok(())
}

fn compact_periodically(
    ledger: Arc<Mutex<Ledger>>,
    retention: Duration,
    counters: Arc<CommitCounters>,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Soon after start, then hourly: a daemon restarted more often than
        // hourly still compacts and expires.
        let mut wait = Duration::from_secs(60);
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            wait = Duration::from_secs(3600);
            let ledger = ledger.clone();
            let counters = counters.clone();
            let now = crate::clock::rfc3339(std::time::SystemTime::now());
            let result = tokio::task::spawn_blocking(move || {
                let mut l = lock_ledger(&ledger, &counters);
                let compacted = l.compact(&now).map_err(|e| e.to_string())?;
                let expired = l.expire(&now, retention).map_err(|e| e.to_string())?;
                Ok::<_, String>((compacted, expired))
            })
            .await;
            match result {
                Ok(Ok((stats, expired))) => info!(?stats, ?expired, "ledger compacted"),
                Ok(Err(e)) => warn!(error = %e, "ledger compaction failed"),
                Err(e) => warn!(error = %e, "ledger compaction task failed"),
            }
        }
    })
}

/// Closes a window every tick, holds it `lag` for late spans, then splits it
/// between runs and sends it on. At stop, every held window goes out.
fn collect_loop(
    mut collector: Collector,
    node: &str,
    tick: Duration,
    lag: Duration,
    inbox: &Arc<SpanInbox>,
    stop: &AtomicBool,
    tx: &mpsc::Sender<ClosedWindow>,
) -> Result<(), DaemonError> {
    let mut next = Instant::now() + tick;
    let mut held: VecDeque<(Window, Instant)> = VecDeque::new();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping || Instant::now() >= next {
            held.push_back((collector.close_window()?, Instant::now()));
            next += tick;
            // After a stall (suspend, overload) skip missed ticks rather than burst.
            if next < Instant::now() {
                next = Instant::now() + tick;
            }
        }
        while held
            .front()
            .is_some_and(|(_, closed)| stopping || closed.elapsed() >= lag)
        {
            let Some((window, _)) = held.pop_front() else {
                break;
            };
            let closed = split_window(&mut collector, node, &window, inbox);
            collector.forget_exited_before(window.start_ns);
            if tx.blocking_send(closed).is_err() {
                warn!("window receiver gone; stopping");
                return Ok(());
            }
        }
        if stopping {
            return Ok(());
        }
        thread::sleep(
            Duration::from_millis(50).min(next.saturating_duration_since(Instant::now())),
        );
        collector.poll();
    }
}

/// One window's records, split between runs by the spans received so far,
/// plus the token records and span rows of the spans received since the last.
fn split_window(
    collector: &mut Collector,
    node: &str,
    window: &Window,
    inbox: &Arc<SpanInbox>,
) -> ClosedWindow {
    let mut span = Span_::default();
    span.add(window);
    // Under the inbox's lock only a copy of what this window needs is
    // taken (container pids mapped to host pids first, outside it); the
    // split reads the copy while the receiver keeps admitting spans.
    let from = crate::clock::unix_ns(window.start);
    let to = from + window.end_ns.saturating_sub(window.start_ns);
    let (index, new) = inbox.take_window(from, to, |pid, scope| {
        collector.host_pid(pid, scope.container_id.as_deref(), scope.pod_uid.as_deref())
    });
    inbox.set_bad_traceparents(collector.bad_traceparents());
    let report = span.report(collector, node, |_| true, &[], Some(&index), None);
    let taken = new.len();
    let mut tokens = Vec::with_capacity(taken);
    let mut rows = Vec::with_capacity(taken);
    // The spans are consumed: their ids, name and service move into the
    // rows rather than being copied (per span, at 50,000 spans/s).
    let no_context = crate::spans::RunContext::default();
    for s in new {
        let own = s
            .pid
            .and_then(|pid| collector.live_instance(pid).map(|start| (pid, start)))
            .and_then(|(pid, start)| collector.info(pid, start))
            .map(|i| &i.context);
        let own = own.unwrap_or(&no_context);
        tokens.extend(token_record(node, &s, own));
        let (run_id, agent_id) = (
            s.context.run_id.as_ref().or(own.run_id.as_ref()),
            s.context.agent_id.as_ref().or(own.agent_id.as_ref()),
        );
        if let Some(run_id) = run_id {
            let (run_id, agent_id) = (run_id.clone(), agent_id.cloned());
            rows.push(SpanRow {
                start_ns: i64::try_from(s.start_unix_ns).unwrap_or(i64::MAX),
                end_ns: i64::try_from(s.end_unix_ns).unwrap_or(i64::MAX),
                pid: s.pid,
                trace_id: s.trace_id,
                span_id: s.span_id,
                parent_span_id: s.parent_span_id,
                run_id,
                agent_id,
                name: s.name,
                service: s.service,
            });
        }
    }
    ClosedWindow {
        report,
        storage: span.storage().clone(),
        tokens,
        spans: rows,
        gpu_errors: window.gpu_errors,
        _taken: TakenSpans(inbox.clone(), taken),
    }
}

/// Adds to each forwarded span the cost of what its process used while it
/// ran (from the ledger): `mentat.cost.total`, `mentat.cost.currency`,
/// `mentat.pricing.version` and `mentat.usage.cpu.time`. The process is the
/// host pid the receiver bound the span's resource to (never a pid as the
/// client claimed it: that may be another tenant's, or a container's
/// namespace pid); spans bound to none go upstream unchanged. One ledger
/// query per bound process per request, on the enricher's own read-only connection.
fn cost_enricher(ledger_path: PathBuf) -> Enricher {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    /// Usage windows around a span that can overlap it: a window is one tick.
    const MARGIN_NS: i64 = 60_000_000_000;
    // Its own read-only connection, opened at first use: a query here never
    // holds, nor waits for, the lock the window commits take.
    let reader: Mutex<Option<Ledger>> = Mutex::new(None);
    Arc::new(move |req, host_pids| {
        let ns = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        // Each bound process's span range over the whole request.
        let mut ranges: HashMap<u32, (i64, i64)> = HashMap::new();
        for (rs, pid) in req.resource_spans.iter().zip(host_pids) {
            let Some(pid) = pid else { continue };
            for span in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                let (start, end) = (ns(span.start_time_unix_nano), ns(span.end_time_unix_nano));
                let r = ranges.entry(*pid).or_insert((start, end));
                r.0 = r.0.min(start);
                r.1 = r.1.max(end);
            }
        }
        let mut records = HashMap::new();
        for (pid, (start, end)) in ranges {
            let query = crate::ledger::RecordQuery {
                from: crate::clock::rfc3339_of_ns(start.saturating_sub(MARGIN_NS)),
                to: crate::clock::rfc3339_of_ns(end.saturating_add(MARGIN_NS)),
                filters: vec![("pid".into(), pid.to_string())],
                after: None,
                limit: 10_000,
            };
            let Ok(mut reader) = reader.lock() else {
                return;
            };
            if reader.is_none() {
                match Ledger::open_read_only(&ledger_path) {
                    Ok(l) => *reader = Some(l),
                    Err(e) => {
                        warn!(error = %e, "span cost enrichment: the ledger cannot be read; spans go upstream as received");
                        return;
                    }
                }
            }
            let Some(l) = reader.as_ref() else { return };
            let page = l.records(&query);
            if let Ok(page) = page {
                records.insert(pid, page.records);
            }
        }
        for (rs, pid) in req.resource_spans.iter_mut().zip(host_pids) {
            let Some(pid) = pid else { continue };
            let Some(records) = records.get(pid) else {
                continue;
            };
            let Some(priced) = records.iter().find_map(|r| r.cost.as_ref()) else {
                continue;
            };
            for span in rs.scope_spans.iter_mut().flat_map(|ss| &mut ss.spans) {
                let (start, end) = (ns(span.start_time_unix_nano), ns(span.end_time_unix_nano));
                let (cost, cpu) = crate::usage::usage_during(records, *pid, start, end);
                let kv = |k: &str, v: Value| KeyValue {
                    key: k.into(),
                    value: Some(AnyValue { value: Some(v) }),
                    ..Default::default()
                };
                use rust_decimal::prelude::ToPrimitive;
                span.attributes.extend([
                    kv(
                        "mentat.cost.total",
                        Value::DoubleValue(cost.to_f64().unwrap_or(0.0)),
                    ),
                    kv(
                        "mentat.cost.currency",
                        Value::StringValue(priced.currency.clone()),
                    ),
                    kv(
                        "mentat.pricing.version",
                        Value::StringValue(priced.pricing_version.clone()),
                    ),
                    kv(
                        "mentat.usage.cpu.time",
                        Value::DoubleValue(cpu.to_f64().unwrap_or(0.0)),
                    ),
                ]);
            }
        }
    })
}

async fn shutdown_signal(prices: &PriceBookHandle, pricing_path: Option<PathBuf>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        warn!("cannot listen for SIGTERM/SIGHUP; stop with SIGINT");
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => {
                match &pricing_path {
                    // On failure reload() has logged why; the old book stays in force.
                    Some(path) => {
                        if prices.reload(path).is_ok() {
                            info!(path = %path.display(), version = prices.current().version(), "price book reloaded");
                        }
                    }
                    None => info!("SIGHUP: no pricing_path configured; the built-in book stays"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(ws: &str, we: &str) -> crate::usage::SummaryRecord {
        crate::usage::SummaryRecord {
            record_type: "summary",
            node: "n".into(),
            window_start: ws.into(),
            window_end: we.into(),
            accounted_cpu_ns: 0,
            attributed_cpu_ns: 0,
            attributed_syscalls: 0,
            network_rx_bytes: 0,
            network_tx_bytes: 0,
            memory_gb_seconds: 0.0,
            disk_read_bytes: 0,
            disk_write_bytes: 0,
            map_full_drops: 0,
            task_read_errors: 0,
            events_lost: 0,
            late_windows: 0,
            processes: 0,
            processes_on_node: 0,
            command_exit_code: None,
        }
    }

    fn token(id: &str, ws: &str, we: &str, input: u64) -> UsageRecord {
        UsageRecord {
            record_id: id.into(),
            node: "n".into(),
            window_start: ws.into(),
            window_end: we.into(),
            record_kind: "token".into(),
            run_id: Some("run-1".into()),
            tokens: vec![crate::usage::TokenUsage {
                model: "gpt-4o".into(),
                input,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn window(ws: &str, we: &str, tokens: Vec<UsageRecord>) -> ClosedWindow {
        ClosedWindow {
            report: Report {
                processes: Vec::new(),
                groups: None,
                buckets: Vec::new(),
                summary: summary(ws, we),
            },
            storage: HashMap::new(),
            tokens,
            spans: Vec::new(),
            gpu_errors: 0,
            _taken: TakenSpans(
                Arc::new(SpanInbox::new(InboxLimits {
                    max_pending: 1,
                    max_indexed: 1,
                    max_indexed_per_sender: 1,
                })),
                0,
            ),
        }
    }

    fn temp_ledger(name: &str) -> (PathBuf, Arc<Mutex<Ledger>>) {
        let dir = std::env::temp_dir().join(format!(
            "mentat-daemon-{name}-{}-{}",
            std::process::id(),
            crate::clock::unix_ns(std::time::SystemTime::now())
        ));
        let ledger = Ledger::open(&dir.join("ledger.db"), Duration::from_secs(3600)).expect("open");
        (dir, Arc::new(Mutex::new(ledger)))
    }

    fn ns_ago(secs: i64) -> String {
        let now =
            i64::try_from(crate::clock::unix_ns(std::time::SystemTime::now())).expect("now fits");
        crate::clock::rfc3339_of_ns(now - secs * 1_000_000_000)
    }

    /// The finding, at the daemon's commit: a token record whose
    /// window is three hours old (a span that started then), after the
    /// first compaction. The commit used to fail for good, and the loop
    /// retried that window forever: no window was committed after it.
    #[test]
    fn a_record_before_the_watermark_does_not_stop_the_commit() {
        let (dir, ledger) = temp_ledger("watermark");
        let book = PriceBook::parse(DEFAULT_PRICE_BOOK, "built-in").expect("book");
        let counters = CommitCounters::default();
        {
            let mut l = ledger.lock().expect("lock");
            let (ws, we) = (ns_ago(3 * 3600), ns_ago(3 * 3600 - 1));
            l.commit_window(&ws, &we, &[token("old", &ws, &we, 1)], &[OTLP])
                .expect("old window");
            l.mark_delivered(OTLP, &["old".to_string()])
                .expect("deliver");
            let stats = l.compact(&ns_ago(0)).expect("compact");
            assert_eq!(stats.records_compacted, 1);
        }
        let (ws, we) = (ns_ago(10), ns_ago(9));
        let (old_ws, old_we) = (ns_ago(3 * 3600 - 60), ns_ago(3 * 3600 - 59));
        let mut w = window(
            &ws,
            &we,
            vec![
                token("fresh", &ws, &we, 1000),
                token("backlog", &old_ws, &old_we, 5000),
            ],
        );
        let (records, committed) =
            commit_one(&ledger, &book, &[OTLP], &mut w, &counters).expect("the window commits");
        // Only the committed record is counted on /metrics.
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].record_id, "fresh");
        assert_eq!(committed.new, 1);
        assert_eq!(committed.quarantined.len(), 1);
        assert_eq!(committed.quarantined[0].record_id, "backlog");
        report_quarantined(&committed, &counters);
        assert_eq!(counters.quarantined.load(Ordering::Relaxed), 1);
        let counted = counters
            .counters()
            .into_iter()
            .find(|c| c.0 == "mentat_agent_quarantined_records_total")
            .map(|c| c.2);
        assert_eq!(counted, Some(1));
        // The next window commits.
        let (ws2, we2) = (ns_ago(9), ns_ago(8));
        let mut next = window(&ws2, &we2, vec![token("next", &ws2, &we2, 1)]);
        let (_, c) = commit_one(&ledger, &book, &[OTLP], &mut next, &counters).expect("next");
        assert_eq!((c.new, c.quarantined.len()), (1, 0));
        let l = ledger.lock().expect("lock");
        assert_eq!(l.last_window_end().expect("last"), Some(we2));
        let pending: Vec<String> = l
            .pending(OTLP, 10)
            .expect("pending")
            .into_iter()
            .map(|r| r.record_id)
            .collect();
        assert_eq!(pending, ["fresh", "next"]);
        drop(l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The token records move into a commit attempt: one that fails (here
    /// for good: an empty exporter name) or panics must give them back, or
    /// the retry, or the quarantine of the window, would bill none of them.
    #[test]
    fn a_failed_or_panicked_attempt_gives_the_token_records_back() {
        let (dir, ledger) = temp_ledger("give-back");
        let book = PriceBook::parse(DEFAULT_PRICE_BOOK, "built-in").expect("book");
        let counters = CommitCounters::default();
        let (ws, we) = (ns_ago(2), ns_ago(1));
        let tokens = vec![token("a", &ws, &we, 10), token("b", &ws, &we, 20)];
        let mut w = window(&ws, &we, tokens.clone());
        assert!(commit_one(&ledger, &book, &[""], &mut w, &counters).is_err());
        assert_eq!(w.tokens, tokens);
        // A panic inside an attempt unwinds through the same hand-back.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let lent = std::mem::take(&mut w.tokens);
            let _taken = TokensTaken {
                range: 0..lent.len(),
                records: lent,
                tokens: &mut w.tokens,
                kept: false,
            };
            panic!("an attempt panics");
        }));
        assert!(panicked.is_err());
        assert_eq!(w.tokens, tokens);
        // The retry commits both, and the window's records are handed on.
        let (records, c) = commit_one(&ledger, &book, &[OTLP], &mut w, &counters).expect("commits");
        assert_eq!(c.new, 2);
        let ids: Vec<&str> = records.iter().map(|r| r.record_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A panic while the ledger's lock was held used to leave it poisoned,
    /// and every later commit failed with "ledger lock poisoned", forever.
    #[test]
    fn a_poisoned_ledger_lock_is_taken_over_and_counted() {
        let (dir, ledger) = temp_ledger("poison");
        let book = PriceBook::parse(DEFAULT_PRICE_BOOK, "built-in").expect("book");
        let counters = CommitCounters::default();
        let l2 = ledger.clone();
        let panicked = std::thread::spawn(move || {
            let _guard = l2.lock();
            panic!("a holder of the ledger panics");
        })
        .join();
        assert!(panicked.is_err());
        assert!(ledger.is_poisoned());
        let (ws, we) = (ns_ago(2), ns_ago(1));
        let mut w = window(&ws, &we, vec![token("t", &ws, &we, 10)]);
        let (_, c) = commit_one(&ledger, &book, &[], &mut w, &counters).expect("commits");
        assert_eq!(c.new, 1);
        assert_eq!(counters.poisoned.load(Ordering::Relaxed), 1);
        assert!(!ledger.is_poisoned());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod enricher_tests {
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{AnyValue, KeyValue, any_value::Value},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span as OtlpSpan},
    };
    use rust_decimal::Decimal;

    use super::*;
    use crate::usage::Cost;

    /// One resource claiming `claimed` as its process.pid, one span over [start, end].
    fn resource(claimed: i64, start: u64, end: u64) -> ResourceSpans {
        ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "process.pid".into(),
                    value: Some(AnyValue {
                        value: Some(Value::IntValue(claimed)),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![OtlpSpan {
                    trace_id: vec![1; 16],
                    span_id: vec![1; 8],
                    start_time_unix_nano: start,
                    end_time_unix_nano: end,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn cost_of(rs: &ResourceSpans) -> Option<f64> {
        rs.scope_spans[0].spans[0]
            .attributes
            .iter()
            .find(|kv| kv.key == "mentat.cost.total")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::DoubleValue(d) => Some(*d),
                _ => None,
            })
    }

    #[test]
    fn cost_enrichment_looks_up_the_bound_pid_never_the_claimed_one_and_saturates() {
        let dir = std::env::temp_dir().join(format!("enrich-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut ledger = Ledger::open(&dir.join("l.db"), Duration::from_secs(3600)).unwrap();
        // One window of pid 4242 costing 1 USD; t0 is a whole second.
        let t0: u64 = 1_800_000_000_000_000_000;
        let (ws, we) = (
            crate::clock::rfc3339_of_ns(t0 as i64),
            crate::clock::rfc3339_of_ns((t0 + 1_000_000_000) as i64),
        );
        let record = UsageRecord {
            record_id: "r1".into(),
            node: "n".into(),
            window_start: ws.clone(),
            window_end: we.clone(),
            record_kind: "process".into(),
            pid: Some(4242),
            cost: Some(Cost {
                total: Decimal::ONE,
                subtotal: Decimal::ONE,
                currency: "USD".into(),
                pricing_version: "v".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        ledger.commit_window(&ws, &we, &[record], &[]).unwrap();
        let enrich = cost_enricher(dir.join("l.db"));
        let mut req = ExportTraceServiceRequest {
            resource_spans: vec![
                // Claims pid 1, bound by the sender check to 4242: 4242's cost.
                resource(1, t0, t0 + 1_000_000_000),
                // Claims 4242, bound to no host pid (a namespace pid): nothing.
                resource(4242, t0, t0 + 1_000_000_000),
                // An end past i64: no overflow, and the whole window.
                resource(4242, t0, u64::MAX),
            ],
        };
        enrich(&mut req, &[Some(4242), None, Some(4242)]);
        assert_eq!(cost_of(&req.resource_spans[0]), Some(1.0));
        assert_eq!(cost_of(&req.resource_spans[1]), None);
        assert_eq!(cost_of(&req.resource_spans[2]), Some(1.0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
