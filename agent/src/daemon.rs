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
        atomic::{AtomicBool, Ordering},
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
    context::{SpanIndex, token_record},
    export::{self, OtlpExporter, Outbox},
    gpu::GpuMeter,
    ledger::Ledger,
    ledger::SpanRow,
    output::Report,
    pods::PodDirectory,
    pricing::{PriceBook, PriceBookHandle, billed_party},
    probes::{ProbeError, Probes},
    prometheus::{AgentStats, Metrics},
    receiver::{self, Enricher, ForwardOptions, Forwarder, ReceiverStats},
    report::Span as Span_,
    spans::{PidScope, Span},
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
}

/// Spans received and not yet handed to a window.
#[derive(Default)]
struct SpanInbox {
    index: SpanIndex,
    new: Vec<Span>,
    /// Spans not stored because `new` was full.
    new_dropped: u64,
    /// Malformed `TRACEPARENT` values seen in environments so far.
    bad_traceparents: u64,
    /// Spans whose pid is a container's, waiting for the collector to map it
    /// to the host's (it knows each process's container and namespace pid).
    unmapped: Vec<Span>,
    /// Spans whose container pid matched no process, or several.
    unmapped_pids: u64,
}

impl SpanInbox {
    /// Takes a received span: indexed and queued for the next window, or, when
    /// its pid is a container's, held until the collector maps it.
    fn receive(&mut self, span: Span) {
        // Tokens and per-run rows need ids, times, context and tokens only:
        // the attribute map is most of a span's size.
        let span = Span {
            attributes: Default::default(),
            ..span
        };
        if span.pid_scope.is_some() {
            // Bounded like `new`, which these join once mapped.
            if self.unmapped.len() < MAX_NEW_SPANS {
                self.unmapped.push(span);
            } else {
                self.new_dropped += 1;
            }
            return;
        }
        self.index.add(&span);
        // Bounded like the index: a flood cannot grow the agent.
        if self.new.len() < MAX_NEW_SPANS {
            self.new.push(span);
        } else {
            self.new_dropped += 1;
        }
    }

    /// Maps the held spans' container pids to host pids with `collector`, then
    /// takes them as received spans (a pid no process fits is counted and dropped).
    fn map_pids(&mut self, collector: &mut Collector) {
        // Spans of one process come in batches: map each (pid, scope) once.
        let mut mapped: HashMap<(u32, PidScope), Option<u32>> = HashMap::new();
        for mut s in std::mem::take(&mut self.unmapped) {
            let scope = s.pid_scope.take().unwrap_or_default();
            s.pid = s.pid.and_then(|p| {
                *mapped.entry((p, scope.clone())).or_insert_with(|| {
                    collector.host_pid(p, scope.container_id.as_deref(), scope.pod_uid.as_deref())
                })
            });
            if s.pid.is_none() {
                self.unmapped_pids += 1;
                s.pid = crate::sender::unmapped_fallback(&s);
            }
            self.receive(s);
        }
    }

    /// The counters as (name, help, value), for `/metrics`.
    fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "mentat_agent_spans_unindexed_total",
                "Received spans not used to split usage between runs because the span index was full.",
                self.index.dropped(),
            ),
            (
                "mentat_agent_spans_unrecorded_total",
                "Received spans whose tokens and per-run rows were dropped because too many waited for the next window.",
                self.new_dropped,
            ),
            (
                "mentat_agent_span_pids_unmapped_total",
                "Spans naming a pid in a container (container.id or k8s.pod.uid) that matched no process there, or several: they bind no process's usage.",
                self.unmapped_pids,
            ),
            (
                "mentat_agent_bad_traceparents_total",
                "Malformed TRACEPARENT values in process environments (ignored).",
                self.bad_traceparents,
            ),
        ]
    }
}

/// At most this many received spans wait for the next window (their tokens
/// and per-run rows); beyond it they are dropped and counted.
const MAX_NEW_SPANS: usize = 10_000;

/// The first wait before a failed commit is tried again; it doubles up to
/// [`COMMIT_RETRY_MAX`].
const COMMIT_RETRY_FIRST: Duration = Duration::from_millis(500);
/// The longest wait between two tries of a failed commit.
const COMMIT_RETRY_MAX: Duration = Duration::from_secs(10);
/// Tries of a failing commit once the daemon is stopping.
const COMMIT_TRIES_AT_STOP: u32 = 3;

/// Prices one window and writes it, with its spans, to the ledger.
fn commit_one(
    ledger: &Arc<Mutex<Ledger>>,
    book: &PriceBook,
    exporters: &[&'static str],
    w: &ClosedWindow,
) -> Result<(Vec<UsageRecord>, usize), String> {
    let mut records = usage_records(w);
    price_all(ledger, book, &mut records, w)?;
    let mut l = ledger
        .lock()
        .map_err(|_| "ledger lock poisoned".to_string())?;
    l.commit_spans(&w.spans).map_err(|e| e.to_string())?;
    let n = l
        .commit_window(
            &w.report.summary.window_start,
            &w.report.summary.window_end,
            &records,
            exporters,
        )
        .map_err(|e| e.to_string())?;
    Ok((records, n))
}

/// Turns a window's report into the records the ledger stores.
fn usage_records(w: &ClosedWindow) -> Vec<UsageRecord> {
    let r = &w.report;
    let mut out: Vec<UsageRecord> = r.processes.iter().map(UsageRecord::from_process).collect();
    out.extend(w.tokens.iter().cloned());
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
struct LedgerOutbox(Arc<Mutex<Ledger>>);

impl Outbox for LedgerOutbox {
    fn pending(&mut self, limit: usize) -> Result<Vec<UsageRecord>, String> {
        let l = self
            .0
            .lock()
            .map_err(|_| "ledger lock poisoned".to_string())?;
        l.pending(OTLP, limit).map_err(|e| e.to_string())
    }

    fn delivered(&mut self, ids: &[String]) -> Result<(), String> {
        let mut l = self
            .0
            .lock()
            .map_err(|_| "ledger lock poisoned".to_string())?;
        l.mark_delivered(OTLP, ids).map_err(|e| e.to_string())
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
    let metrics = Metrics::default();
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
        let mut outbox = LedgerOutbox(ledger.clone());
        let stop = stop_rx.clone();
        Some(tokio::spawn(async move {
            export::drain(&mut exporter, &mut outbox, wake_rx, stop).await;
        }))
    };

    let api_state = AppState::new(ledger.clone(), metrics.clone(), ready.clone());
    let mut api_stop = stop_rx.clone();
    let api_config = config.api.clone();
    let api_task = tokio::spawn(async move {
        let shutdown = async move {
            let _ = api_stop.wait_for(|s| *s).await;
        };
        api::serve(&api_config, api_state, shutdown).await
    });

    // Spans from the agents on this node: the receiver feeds the inbox the
    // collector reads when it splits windows between runs.
    let inbox = Arc::new(Mutex::new(SpanInbox::default()));
    let receiver_stats = Arc::new(ReceiverStats::default());
    {
        let (inbox, stats, binder) = (inbox.clone(), receiver_stats.clone(), binder.clone());
        metrics.add_source(move || {
            let mut c = stats.counters();
            c.extend(binder.counters());
            if let Ok(i) = inbox.lock() {
                c.extend(i.counters());
            }
            c
        });
    }
    let (span_tx, mut span_rx) = receiver::span_channel(&config.receiver);
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
                enrich: Some(cost_enricher(ledger.clone())),
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
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            bound.run(span_tx, stats, forwarder, shutdown).await
        })
    };
    {
        let inbox = inbox.clone();
        tokio::spawn(async move {
            while let Some(span) = span_rx.recv().await {
                if let Ok(mut i) = inbox.lock() {
                    i.receive(span);
                }
            }
        });
    }

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
        async move {
            let mut committed_windows = 0u64;
            while let Some(mut w) = rx.recv().await {
                // A window that cannot be written (disk full, I/O error) is
                // kept and retried, never dropped: later windows queue behind
                // it (the channel, then the collector), so billing resumes
                // where it stopped once the ledger can be written again.
                let mut backoff = COMMIT_RETRY_FIRST;
                let mut failures = 0u32;
                loop {
                    let ledger = ledger.clone();
                    let book = prices.current();
                    let exporters = exporters.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        match commit_one(&ledger, &book, &exporters, &w) {
                            Ok((records, n)) => Ok((w, records, n)),
                            Err(e) => Err((Box::new(w), e)),
                        }
                    })
                    .await;
                    match result {
                        Ok(Ok((w, records, n))) => {
                            let s = &w.report.summary;
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
                            log_window(&w.report, n);
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
                                    error = %e,
                                    "stopping with a window the ledger cannot take: it is lost"
                                );
                                break;
                            }
                            if failures == 1 || failures.is_multiple_of(10) {
                                warn!(
                                    window_start = %s.window_start,
                                    error = %e,
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
                            error!(error = %e, "the commit task panicked; its window is lost");
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
    let compaction = compact_periodically(ledger.clone(), config.retention, stop_rx.clone());
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
    w: &ClosedWindow,
) -> Result<(), String> {
    let l = ledger
        .lock()
        .map_err(|_| "ledger lock poisoned".to_string())?;
    let mut spend: HashMap<String, Decimal> = HashMap::new();
    for r in records.iter_mut() {
        let party = billed_party(r).map(str::to_string);
        let mtd = match &party {
            Some(p) => match spend.get(p) {
                Some(d) => *d,
                None => l
                    .month_to_date(p, &w.report.summary.window_start)
                    .map_err(|e| e.to_string())?,
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
            let now = crate::clock::rfc3339(std::time::SystemTime::now());
            let result = tokio::task::spawn_blocking(move || {
                let mut l = ledger
                    .lock()
                    .map_err(|_| "ledger lock poisoned".to_string())?;
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
    inbox: &Mutex<SpanInbox>,
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
    inbox: &Mutex<SpanInbox>,
) -> ClosedWindow {
    let mut span = Span_::default();
    span.add(window);
    let (report, new) = match inbox.lock() {
        Ok(mut i) => {
            // Container pids to host pids, before the spans are used.
            i.map_pids(collector);
            let report = span.report(collector, node, |_| true, &[], Some(&i.index), None);
            // Windows go out in order: a span that ended before this one
            // started cannot touch any later window.
            i.index.forget_before(crate::clock::unix_ns(window.start));
            i.bad_traceparents = collector.bad_traceparents();
            (report, std::mem::take(&mut i.new))
        }
        Err(_) => (
            span.report(collector, node, |_| true, &[], None, None),
            Vec::new(),
        ),
    };
    let mut tokens = Vec::new();
    let mut rows = Vec::new();
    for s in &new {
        let own = s
            .pid
            .and_then(|pid| collector.live_instance(pid).map(|start| (pid, start)))
            .and_then(|(pid, start)| collector.info(pid, start))
            .map(|i| i.context.clone())
            .unwrap_or_default();
        tokens.extend(token_record(node, s, &own));
        let mut ctx = s.context.clone();
        ctx.inherit(&own);
        if let Some(run_id) = ctx.run_id.clone() {
            rows.push(SpanRow {
                trace_id: s.trace_id.clone(),
                span_id: s.span_id.clone(),
                parent_span_id: s.parent_span_id.clone(),
                run_id,
                agent_id: ctx.agent_id.clone(),
                name: s.name.clone(),
                start_ns: i64::try_from(s.start_unix_ns).unwrap_or(i64::MAX),
                end_ns: i64::try_from(s.end_unix_ns).unwrap_or(i64::MAX),
                pid: s.pid,
                service: s.service.clone(),
            });
        }
    }
    ClosedWindow {
        report,
        storage: span.storage().clone(),
        tokens,
        spans: rows,
        gpu_errors: window.gpu_errors,
    }
}

/// Adds to each forwarded span the cost of what its process used while it
/// ran (from the ledger): `mentat.cost.total`, `mentat.cost.currency`,
/// `mentat.pricing.version` and `mentat.usage.cpu.time`. The process is the
/// host pid the receiver bound the span's resource to (never a pid as the
/// client claimed it: that may be another tenant's, or a container's
/// namespace pid); spans bound to none go upstream unchanged. One ledger
/// query per bound process per request, the lock held for that query only.
fn cost_enricher(ledger: Arc<Mutex<Ledger>>) -> Enricher {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    /// Usage windows around a span that can overlap it: a window is one tick.
    const MARGIN_NS: i64 = 60_000_000_000;
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
            let page = match ledger.lock() {
                Ok(l) => l.records(&query),
                Err(_) => return,
            };
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
#[allow(clippy::unwrap_used)]
mod tests {
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
        let enrich = cost_enricher(Arc::new(Mutex::new(ledger)));
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
