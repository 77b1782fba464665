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
    collections::VecDeque,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::{
    alert,
    collect::{Collector, Window, gpu::GpuMeter, metered::core_seconds, storage::StorageMeter},
    config::Config,
    context::{
        dedupe::DedupeLimits,
        inbox::{InboxLimits, SpanInbox},
        lineage::LineageLimits,
        receiver::{self, Onward, ReceiverStats},
        sender::{Binder, parse_rules},
    },
    identity::pods::PodDirectory,
    ledger::{Ledger, writer::SharedLedger},
    pricing::{DEFAULT_BOOK, PriceBook, PriceBookHandle},
    probes::{ProbeError, Probes},
    report::{
        Report,
        pending::{PendingRuns, PendingSink},
        window::ReportedWindow,
    },
    serve::{
        api::{self, AppState},
        enrich,
        export::{self, OtlpExporter},
        forward::{ForwardOptions, Forwarder},
        outbox::LedgerOutbox,
        prometheus::{AgentStats, Exposition},
        stream::{StreamHub, StreamLimits},
    },
};

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
    /// An alert channel cannot be set up (a secret file unreadable, ...).
    #[error(transparent)]
    Notify(#[from] crate::alert::notify::NotifyError),
    /// The OTLP receiver is misconfigured.
    #[error(transparent)]
    Receiver(#[from] receiver::ReceiverError),
    /// The alert rules are not valid.
    #[error(transparent)]
    Rules(#[from] alert::rules::RuleError),
    /// The alert engine could not start.
    #[error(transparent)]
    Alerts(#[from] alert::engine::EngineError),
    /// A thread of the daemon died.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
}

/// Logs a one-line node summary of a window, at DEBUG: INFO is for state
/// changes and problems, and a line a second would drown them.
fn log_window(r: &Report, committed: usize) {
    let s = &r.summary;
    let bucket = |name: &str| {
        r.buckets
            .iter()
            .find(|b| b.record_type == name)
            .map_or(0.0, |b| b.cpu_core_seconds)
    };
    debug!(
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

/// Runs until SIGINT or SIGTERM; the last partial window is closed,
/// committed and offered to the exporters before exit. SIGHUP reloads the
/// price book (a bad book keeps the old one).
pub async fn run(config: Config, node: String) -> Result<(), DaemonError> {
    // No transparent huge pages for the agent's heap: the allocator asks for
    // them where the host allows, and then memory is resident 2 MiB at a time
    // and comes back only when a whole 2 MiB is free (+20 MiB RSS at 10,000
    // idle processes, BENCHMARKS.md issue 13). Best effort: the agent runs
    // the same without it.
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        debug!("PR_SET_THP_DISABLE failed; the heap may use transparent huge pages");
    }
    let book = match &config.pricing_path {
        Some(path) => PriceBook::load(path)?,
        None => PriceBook::parse(DEFAULT_BOOK, "built-in deploy/pricing.toml")?,
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
    let ledger = SharedLedger::new(ledger);
    let metrics = {
        let prices = prices.clone();
        Exposition::with_model_names(config.metrics.clone(), move |m| {
            prices.current().resolve_model(m).map(str::to_string)
        })
    };
    {
        let l = ledger.clone();
        metrics.add_source(move || l.counters());
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    // Alert notifications: one delivery task per `[[alert_channels]]` entry,
    // resuming whatever the ledger's alert outbox holds. Whoever queues
    // events (`AlertOutbox::enqueue_alert_events`) then calls `notifier.wake()`.
    let (notifier, notify_tasks) = crate::alert::notify::start(
        ledger.clone(),
        &config.alert_channels,
        crate::alert::notify::DeliveryOptions::default(),
        stop_rx.clone(),
    )?;
    {
        let notifier = notifier.clone();
        metrics.add_source(move || notifier.counters());
    }

    // Alert rules: checked before anything runs; evaluated after each committed window, off the commit path.
    let alert_stats = Arc::new(alert::engine::AlertStats::default());
    {
        let stats = alert_stats.clone();
        metrics.add_source(move || stats.counters());
    }
    let alert_rules = alert::engine::RulesHandle::load(
        &config.alerts,
        config.alerting.rules_file.as_deref(),
        notifier.channel_names(),
        alert_stats,
    )?;
    // The engine queues its events in the ledger's alert outbox and wakes the channels.
    let alert_engine = alert::engine::Engine::open(
        &config.ledger_path,
        alert_rules.clone(),
        &config.alerting,
        &node,
        notifier.channel_names(),
        Box::new(notifier.clone()),
    )?;
    info!(rules = alert_rules.current().len(), "alert rules in force");
    let ready = Arc::new(AtomicBool::new(false));

    let mut probes = Probes::load(&config.probe_config())?;
    // The kernel's sender table goes to the receiver: spans are bound to
    // the process that sent them, not to what they claim.
    let binder = Arc::new(Binder::kernel(
        probes.take_senders(),
        parse_rules(&config.receiver.trusted_forwarders)
            .map_err(receiver::ReceiverError::TrustedForwarder)?,
    ));
    info!(node, tick = ?config.tick, "probes attached; metering");

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
        let mut outbox = LedgerOutbox::new(ledger.clone(), OTLP);
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

    // Runs whose spans are in but whose windows are not committed yet (the run view says so).
    let pending = Arc::new(PendingRuns::default());
    {
        let pending = pending.clone();
        metrics.add_source(move || pending.counters());
    }
    // `/v1/stream`: fed after each commit below; never waits on a client.
    let stream = StreamHub::new(
        node.clone(),
        config.ledger_path.clone(),
        StreamLimits {
            client_buffer: config.api.stream_client_buffer,
            max_clients: config.api.stream_max_clients,
        },
    );
    {
        let stream = stream.clone();
        metrics.add_source(move || stream.counters());
    }
    let api_state = AppState::new(config.ledger_path.clone(), metrics.clone(), ready.clone())
        .with_pending(pending.clone())
        .with_stream(stream.clone());
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
    let inbox = Arc::new(
        SpanInbox::new(InboxLimits {
            max_pending: config.receiver.max_pending_spans,
            max_indexed: config.receiver.max_indexed_spans,
            max_indexed_per_sender: config.receiver.max_indexed_spans_per_process,
        })
        .with_dedupe(DedupeLimits {
            window: config.receiver.token_dedupe_window,
            max_calls: config.receiver.max_token_dedupe_calls,
            max_links: config.receiver.max_token_dedupe_links,
        })
        .with_lineage(LineageLimits {
            max_wait: config.span_lag,
            max_span_age: config.receiver.max_span_age,
            max_waiting: config.receiver.max_pending_spans,
        }),
    );
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
                keep_message_content: config.receiver.forward_message_content,
                // A span's usage is committed once its windows have waited
                // span_lag and closed; enrich after that.
                delay: config.span_lag + config.tick * 2 + Duration::from_secs(2),
                enrich: Some(enrich::cost_enricher(config.ledger_path.clone())),
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
        let inbox = PendingSink::new(inbox.clone(), pending.clone());
        tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            bound
                .run(
                    inbox,
                    stats,
                    forwarder.map(|f| Arc::new(f) as Arc<dyn Onward>),
                    shutdown,
                )
                .await
        })
    };

    let stop_flag = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<ReportedWindow>(16);
    let collector = {
        let stop = stop_flag.clone();
        let node = node.clone();
        let pods = PodDirectory::start(config.kubernetes.clone(), &node, config.pod_refresh);
        let storage = StorageMeter::start(Duration::from_secs(60));
        let (tick, sample, lag) = (config.tick, config.sample_interval, config.span_lag);
        let idle = config.idle_interval;
        let inbox = inbox.clone();
        let gpu_config = config.gpu.clone();
        thread::Builder::new()
            .name("collector".into())
            .spawn(move || {
                let mut collector = Collector::new(probes, sample)
                    .with_idle_interval(idle)
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

    let (alert_tx, alert_rx) = watch::channel(0i64);
    // Alert state changes go to `/v1/stream` too (as they are decided; the
    // channels get them from the outbox).
    let (events_tx, mut events_rx) = tokio::sync::broadcast::channel(1024);
    let alert_engine = alert_engine.with_events(events_tx);
    {
        let stream = stream.clone();
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                match events_rx.recv().await {
                    Ok(event) => stream.publish_alert(&event),
                    Err(RecvError::Lagged(n)) => {
                        warn!(
                            missed = n,
                            "alert events not shown on /v1/stream (they are notified and listed as usual)"
                        );
                    }
                    Err(RecvError::Closed) => break,
                }
            }
        });
    }
    let alert_task = tokio::spawn(alert::engine::run(alert_engine, alert_rx, stop_rx.clone()));

    let commit = {
        let ledger = ledger.clone();
        let metrics = metrics.clone();
        let prices = prices.clone();
        let stop_flag = stop_flag.clone();
        async move {
            let mut committed_windows = 0u64;
            while let Some(w) = rx.recv().await {
                let done = ledger
                    .commit_until_done(
                        w,
                        || prices.current(),
                        &exporters,
                        &stop_flag,
                        || metrics.commit_failed(),
                    )
                    .await;
                let Some(done) = done else { continue };
                let s = &done.window.report.summary;
                if let Some(end) = crate::probes::clock::unix_ns_of(&s.window_end) {
                    pending.committed_through(end);
                    let _ = alert_tx.send(end);
                }
                metrics.observe(
                    &done.records,
                    AgentStats {
                        windows: 1,
                        map_full_drops: s.map_full_drops,
                        events_lost: s.events_lost,
                        late_windows: s.late_windows,
                        gpu_errors: done.window.gpu_errors,
                    },
                );
                log_window(&done.window.report, done.committed.new);
                stream.publish_committed(&done);
                committed_windows += 1;
                let _ = wake_tx.send(committed_windows);
            }
        }
    };
    let signals = async {
        shutdown_signal(&prices, config.pricing_path.clone(), &alert_rules).await;
        info!("stopping: closing the last window");
        stop_flag.store(true, Ordering::SeqCst);
    };
    let compaction = ledger.compact_periodically(config.retention, stop_rx.clone());
    // The commit loop ends when the collector drops its sender after the last window.
    tokio::join!(commit, signals);
    let _ = stop_tx.send(true);
    let collected = collector
        .join()
        .map_err(|_| DaemonError::Panicked("collector"));
    compaction.abort();
    let _ = alert_task.await;
    // A send cut short here is acknowledged or not: either way the row is
    // still queued and goes out after the restart (at least once).
    for t in notify_tasks {
        t.abort();
    }
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

/// Closes a window every tick, holds it `lag` for late spans, then splits it
/// between runs and sends it on. At stop, every held window goes out.
fn collect_loop(
    mut collector: Collector,
    node: &str,
    tick: Duration,
    lag: Duration,
    inbox: &Arc<SpanInbox>,
    stop: &AtomicBool,
    tx: &mpsc::Sender<ReportedWindow>,
) -> Result<(), DaemonError> {
    let mut next = Instant::now() + tick;
    let mut held: VecDeque<(Window, Instant)> = VecDeque::new();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping || Instant::now() >= next {
            let window = if stopping {
                collector.close_last_window()?
            } else {
                collector.close_window()?
            };
            held.push_back((window, Instant::now()));
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
            let closed = ReportedWindow::split(&mut collector, node, &window, inbox);
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

async fn shutdown_signal(
    prices: &PriceBookHandle,
    pricing_path: Option<PathBuf>,
    alert_rules: &alert::engine::RulesHandle,
) {
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
                // On failure reload() has logged and counted why; the old rules stay in force.
                let _ = alert_rules.reload();
            }
        }
    }
}
