//! `mentat-agent run`: the node daemon. One thread closes a window every
//! tick; the async side hands each window's records to the sinks in order.
//! The ledger and exporters of later stages are sinks; for now, a log line.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    collect::Collector,
    config::Config,
    output::Report,
    pods::PodDirectory,
    probes::{ProbeError, Probes},
    report::Span,
    storage::StorageMeter,
    usage::core_seconds,
};

/// Receives every closed window's records, in order.
pub trait WindowSink: Send {
    /// Takes one window. An error is logged; the window is not retried here
    /// (durable delivery is the ledger's job).
    fn window(&mut self, report: &Report) -> Result<(), String>;
}

/// Logs a one-line node summary per window.
pub struct LogSink;

impl WindowSink for LogSink {
    fn window(&mut self, r: &Report) -> Result<(), String> {
        let s = &r.summary;
        let bucket = |name: &str| {
            r.buckets
                .iter()
                .find(|b| b.record_type == name)
                .map_or(0.0, |b| b.cpu_core_seconds)
        };
        let busiest = r
            .processes
            .iter()
            .max_by_key(|p| p.metrics.cpu_ns)
            .map(|p| format!("{}[{}] {:.3}s", p.comm, p.pid, p.metrics.cpu_core_seconds))
            .unwrap_or_default();
        info!(
            window_end = %s.window_end,
            processes = s.processes_on_node,
            cpu_s = format!("{:.3}", core_seconds(s.accounted_cpu_ns)),
            idle_s = format!("{:.3}", bucket("idle")),
            kernel_s = format!("{:.3}", bucket("kernel")),
            unattributed_s = format!("{:.3}", bucket("unattributed")),
            syscalls = s.attributed_syscalls,
            drops = s.map_full_drops,
            conserved = s.accounted_cpu_ns == s.attributed_cpu_ns,
            busiest,
            "window closed"
        );
        Ok(())
    }
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The probes could not be loaded or read.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The collector thread died.
    #[error("the collector thread panicked")]
    CollectorPanicked,
}

/// Runs until SIGINT or SIGTERM; the last partial window is closed and delivered.
pub async fn run(
    config: Config,
    node: String,
    mut sinks: Vec<Box<dyn WindowSink>>,
) -> Result<(), DaemonError> {
    let probes = Probes::load(&config.probe_config())?;
    info!(node, tick = ?config.tick, "probes attached; metering");
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, mut rx) = mpsc::channel::<Report>(16);

    let collector_stop = stop.clone();
    let tick = config.tick;
    let sample = config.sample_interval;
    let pods = PodDirectory::start(config.kubernetes.clone(), &node, config.pod_refresh);
    let handle = thread::Builder::new()
        .name("collector".into())
        .spawn(move || {
            collect_loop(
                Collector::new(probes, sample)
                    .with_pods(pods)
                    .with_storage(StorageMeter::start(Duration::from_secs(60))),
                &node,
                tick,
                &collector_stop,
                &tx,
            )
        })
        .map_err(|_| DaemonError::CollectorPanicked)?;

    let deliver = async {
        while let Some(report) = rx.recv().await {
            for sink in &mut sinks {
                if let Err(e) = sink.window(&report) {
                    error!(error = %e, "a sink failed to take a window");
                }
            }
        }
    };
    let signals = async {
        shutdown_signal().await;
        info!("stopping: closing the last window");
        stop.store(true, Ordering::SeqCst);
    };
    // Delivery ends when the collector drops its sender, after the last window.
    tokio::join!(deliver, signals);
    match handle.join() {
        Ok(r) => r,
        Err(_) => Err(DaemonError::CollectorPanicked),
    }
}

fn collect_loop(
    mut collector: Collector,
    node: &str,
    tick: Duration,
    stop: &AtomicBool,
    tx: &mpsc::Sender<Report>,
) -> Result<(), DaemonError> {
    let mut next = Instant::now() + tick;
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        if stopping || Instant::now() >= next {
            let window = collector.close_window()?;
            let mut span = Span::default();
            span.add(&window);
            let report = span.report(&mut collector, node, |_| true, None, None);
            collector.forget_exited_before(window.start_ns);
            if tx.blocking_send(report).is_err() {
                warn!("window receiver gone; stopping");
                return Ok(());
            }
            next += tick;
            // After a stall (suspend, overload) skip missed ticks rather than burst.
            if next < Instant::now() {
                next = Instant::now() + tick;
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

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}
