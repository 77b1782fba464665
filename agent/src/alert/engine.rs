//! The evaluation loop: after each committed window, every rule is
//! evaluated over the ledger and the state machine advanced; changed states
//! are persisted and the events handed to the notification sink.
//!
//! In: the end of each committed window (a `watch`: when evaluation is
//! slower than the ticks, windows in between are skipped, never queued, and
//! the commit loop never waits), the rules in force ([`RulesHandle`],
//! swapped by SIGHUP). Out: [`AlertEvent`]s to an [`AlertSink`] (the
//! ledger's alert outbox), states in the ledger, counters for `/metrics`.
//!
//! It reads on a read-only connection of its own and writes its states on
//! another, in one short transaction per evaluation that changed something.
//! Order: events are enqueued (idempotently) before the states that say they
//! were sent are saved, so a crash between the two re-decides the same
//! events, which the outbox takes once.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    AlertEvent,
    eval::Measurer,
    rules::{self, AlertingConfig, Rule, RuleConfig, RuleError},
    state::{AlertStatus, StateConfig, StateTable},
};
use crate::ledger::{Ledger, LedgerError, alerts::Parents};

/// Where notifications go: the ledger's durable alert outbox, per channel.
/// Must be idempotent on (channel, fingerprint, state, starts_at, repeat).
/// It is given the engine's own writable ledger connection, the one the
/// states are saved on right after (e.g. `Ledger::enqueue_alert_events`).
pub trait AlertSink: Send {
    /// Queues `items`; returns how many were new.
    fn enqueue(
        &mut self,
        ledger: &mut Ledger,
        items: &[(String, AlertEvent)],
    ) -> Result<usize, String>;
}

/// A sink that keeps nothing (no channel is configured).
#[derive(Debug, Default)]
pub struct NoChannels;

impl AlertSink for NoChannels {
    fn enqueue(
        &mut self,
        _ledger: &mut Ledger,
        _items: &[(String, AlertEvent)],
    ) -> Result<usize, String> {
        Ok(0)
    }
}

/// Why the engine could not run.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The ledger failed.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The sink refused the events.
    #[error("queueing alert notifications: {0}")]
    Sink(String),
}

/// The rules in force: the config's `[[alerts]]` and the rules file's,
/// swapped whole on reload (a bad file keeps the old rules).
#[derive(Clone, Debug)]
pub struct RulesHandle {
    config_rules: Arc<Vec<Rule>>,
    file: Option<PathBuf>,
    current: Arc<RwLock<Arc<Vec<Rule>>>>,
    stats: Arc<AlertStats>,
    /// The configured alert channels: a rule naming another is refused.
    channels: Arc<Vec<String>>,
}

impl RulesHandle {
    /// Compiles the config's rules and reads the rules file; a rule naming
    /// a channel not in `channels` is refused.
    pub fn load(
        config_rules: &[RuleConfig],
        file: Option<&Path>,
        channels: Vec<String>,
        stats: Arc<AlertStats>,
    ) -> Result<Self, RuleError> {
        let config_rules = compile_config(config_rules)?;
        let mut h = Self {
            config_rules: Arc::new(config_rules),
            file: file.map(Path::to_path_buf),
            current: Arc::new(RwLock::new(Arc::new(Vec::new()))),
            stats,
            channels: Arc::new(channels),
        };
        let all = h.read()?;
        h.set(all);
        Ok(h)
    }

    fn read(&mut self) -> Result<Vec<Rule>, RuleError> {
        let from_file = match &self.file {
            Some(f) => rules::load_file(f)?,
            None => Vec::new(),
        };
        let all = rules::merge(self.config_rules.to_vec(), from_file)?;
        rules::check_channels(&all, &self.channels)?;
        Ok(all)
    }

    fn set(&self, rules: Vec<Rule>) {
        self.stats
            .rules
            .store(rules.len() as u64, Ordering::Relaxed);
        if let Ok(mut c) = self.current.write() {
            *c = Arc::new(rules);
        }
    }

    /// The rules now.
    pub fn current(&self) -> Arc<Vec<Rule>> {
        self.current
            .read()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Reads the rules file again (SIGHUP). On error the old rules stay
    /// (logged and counted) and the error is returned.
    pub fn reload(&self) -> Result<usize, RuleError> {
        let mut me = self.clone();
        match me.read() {
            Ok(rules) => {
                let n = rules.len();
                self.set(rules);
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                info!(rules = n, "alert rules reloaded");
                Ok(n)
            }
            Err(e) => {
                self.stats.reload_failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "alert rules not reloaded; the old rules stay in force");
                Err(e)
            }
        }
    }
}

/// The config's own rules (its `[[alerts]]`), named by their position.
pub fn compile_config(raw: &[RuleConfig]) -> Result<Vec<Rule>, RuleError> {
    let mut out: Vec<Rule> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let origin = format!("config [[alerts]] #{}", i + 1);
        let invalid = |message: String| RuleError::Invalid {
            origin: "config".into(),
            line: i + 1,
            rule: r.name.clone(),
            message,
        };
        if out.iter().any(|x| x.name == r.name) {
            return Err(invalid("the name is used by an earlier rule".into()));
        }
        out.push(rules::compile(r, origin).map_err(invalid)?);
    }
    Ok(out)
}

/// The engine's counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertStats {
    evaluations: AtomicU64,
    failures: AtomicU64,
    micros_total: AtomicU64,
    last_micros: AtomicU64,
    rules: AtomicU64,
    pending: AtomicU64,
    firing: AtomicU64,
    inhibited: AtomicU64,
    untracked: AtomicU64,
    events: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl AlertStats {
    /// (name, HELP, value); names without `_total` are gauges.
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "mentat_agent_alert_evaluations_total",
                "Evaluations of the alert rules (one after each committed window; skipped windows are not queued).",
                g(&self.evaluations),
            ),
            (
                "mentat_agent_alert_evaluation_failures_total",
                "Evaluations that failed or panicked (logged; states reloaded from the ledger, retried at the next window).",
                g(&self.failures),
            ),
            (
                "mentat_agent_alert_evaluation_microseconds_total",
                "Time spent evaluating alert rules, in microseconds.",
                g(&self.micros_total),
            ),
            (
                "mentat_agent_alert_evaluation_last_microseconds",
                "How long the last evaluation of every rule took, in microseconds.",
                g(&self.last_micros),
            ),
            (
                "mentat_agent_alert_rules",
                "Alert rules in force.",
                g(&self.rules),
            ),
            (
                "mentat_agent_alerts_pending",
                "Alerts whose condition holds, for less than their rule's `for`.",
                g(&self.pending),
            ),
            (
                "mentat_agent_alerts_firing",
                "Alerts firing now (inhibited ones included).",
                g(&self.firing),
            ),
            (
                "mentat_agent_alerts_inhibited",
                "Pending or firing alerts silenced by a firing budget alert of their customer or project.",
                g(&self.inhibited),
            ),
            (
                "mentat_agent_alerts_untracked_total",
                "New alerts not tracked because [alerting] max_alerts were (their condition held; nothing was notified).",
                g(&self.untracked),
            ),
            (
                "mentat_agent_alert_events_total",
                "Alert notifications decided (firing, repeats and resolved), one per event before channels.",
                g(&self.events),
            ),
            (
                "mentat_agent_alert_rule_reloads_total",
                "Alert rules reloaded (SIGHUP).",
                g(&self.reloads),
            ),
            (
                "mentat_agent_alert_rule_reload_failures_total",
                "Alert rule reloads refused (a bad rules file; the old rules stay in force).",
                g(&self.reload_failures),
            ),
        ]
    }
}

/// Evaluates rules over a ledger and keeps the alert states.
pub struct Engine {
    reader: Ledger,
    writer: Ledger,
    rules: RulesHandle,
    table: StateTable,
    cfg: StateConfig,
    sink: Box<dyn AlertSink>,
    stats: Arc<AlertStats>,
    slow_interval: std::time::Duration,
    /// Slow rules' last observations: (the rule as evaluated, when, what held).
    slow: HashMap<String, (Rule, i64, Vec<super::eval::Observation>)>,
    keys: super::eval::GroupKeys,
    events: Option<tokio::sync::broadcast::Sender<AlertEvent>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens its two connections to the ledger at `path` and loads the persisted states.
    pub fn open(
        path: &Path,
        rules: RulesHandle,
        alerting: &AlertingConfig,
        node: &str,
        all_channels: Vec<String>,
        sink: Box<dyn AlertSink>,
    ) -> Result<Self, EngineError> {
        let writer = Ledger::open(path, std::time::Duration::ZERO)?;
        let reader = Ledger::open_read_only(path)?;
        let (table, bad) = StateTable::from_bodies(&writer.alert_bodies()?);
        if bad > 0 {
            warn!(bad, "alert states that do not decode were skipped");
        }
        let stats = rules.stats.clone();
        Ok(Self {
            reader,
            writer,
            rules,
            table,
            cfg: StateConfig {
                node: node.to_string(),
                repeat_interval: alerting.repeat_interval,
                keep_resolved: alerting.keep_resolved,
                max_alerts: alerting.max_alerts.max(1),
                all_channels,
            },
            sink,
            stats,
            slow_interval: alerting.slow_interval,
            slow: HashMap::new(),
            keys: super::eval::GroupKeys::default(),
            events: None,
        })
    }

    /// Also sends every event (after it is queued and saved) to `tx`, e.g.
    /// for `/v1/stream`; a lagging receiver misses events, never blocks this.
    pub fn with_events(mut self, tx: tokio::sync::broadcast::Sender<AlertEvent>) -> Self {
        self.events = Some(tx);
        self
    }

    /// The tracked alerts.
    pub fn alerts(&self) -> impl Iterator<Item = &AlertStatus> {
        self.table.alerts.values()
    }

    /// Evaluates every rule at `at` (ns, a committed window's end); returns the events notified.
    pub fn evaluate(&mut self, at: i64) -> Result<Vec<AlertEvent>, EngineError> {
        let started = Instant::now();
        let out = self.evaluate_inner(at);
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.evaluations.fetch_add(1, Ordering::Relaxed);
        self.stats.micros_total.fetch_add(us, Ordering::Relaxed);
        self.stats.last_micros.store(us, Ordering::Relaxed);
        if out.is_err() {
            self.recover();
        }
        let (p, f, i) = self.table.counts();
        self.stats.pending.store(p, Ordering::Relaxed);
        self.stats.firing.store(f, Ordering::Relaxed);
        self.stats.inhibited.store(i, Ordering::Relaxed);
        self.stats
            .untracked
            .store(self.table.untracked, Ordering::Relaxed);
        out
    }

    /// After a failed or panicked evaluation: counted, and the states taken
    /// from the ledger (memory may be ahead of what was saved and queued).
    fn recover(&mut self) {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(bodies) = self.writer.alert_bodies() {
            let untracked = self.table.untracked;
            self.table = StateTable::from_bodies(&bodies).0;
            self.table.untracked = untracked;
        }
        self.slow.clear();
    }

    fn evaluate_inner(&mut self, at: i64) -> Result<Vec<AlertEvent>, EngineError> {
        let rules = self.rules.current();
        let mut m = Measurer::with_keys(&self.reader, &mut self.keys);
        let mut obs = Vec::new();
        let interval = super::eval::ns(self.slow_interval);
        self.slow
            .retain(|name, _| rules.iter().any(|r| r.name == *name));
        for (i, r) in rules.iter().enumerate() {
            if r.is_slow() {
                if let Some((rule, t, last)) = self.slow.get(&r.name)
                    && rule == r
                    && at >= *t
                    && at - *t < interval
                {
                    obs.extend(last.iter().cloned().map(|mut o| {
                        o.rule = i;
                        o
                    }));
                    continue;
                }
                let seen = m.observe(i, r, at)?;
                self.slow
                    .insert(r.name.clone(), (r.clone(), at, seen.clone()));
                obs.extend(seen);
                continue;
            }
            obs.extend(m.observe(i, r, at)?);
        }
        let reader = &self.reader;
        let mut parents_of: HashMap<(String, String), Vec<Parents>> = HashMap::new();
        let mut inhibited = |a: &AlertStatus, firing: &[(String, String)]| {
            if firing
                .iter()
                .any(|(f, v)| *f == a.group_field && *v == a.group)
            {
                return true;
            }
            let key = (a.group_field.clone(), a.group.clone());
            let parents = parents_of.entry(key).or_insert_with(|| {
                // `model` is no identity column: its alerts are not inhibited.
                reader
                    .group_parents(&a.group_field, &a.group, 64)
                    .unwrap_or_default()
            });
            parents.iter().any(|(customer, project)| {
                firing.iter().any(|(f, v)| {
                    (f == "customer_id" && customer.as_deref() == Some(v.as_str()))
                        || (f == "project_id" && project.as_deref() == Some(v.as_str()))
                })
            })
        };
        let decided = self.table.step(&rules, &obs, at, &self.cfg, &mut inhibited);
        let items: Vec<(String, AlertEvent)> = decided
            .iter()
            .flat_map(|(chans, e)| chans.iter().map(move |c| (c.clone(), e.clone())))
            .collect();
        if !items.is_empty() {
            self.sink
                .enqueue(&mut self.writer, &items)
                .map_err(EngineError::Sink)?;
        }
        let (rows, deletes) = self.table.take_changes();
        self.writer.save_alert_states(&rows, &deletes)?;
        let events: Vec<AlertEvent> = decided.into_iter().map(|(_, e)| e).collect();
        self.stats
            .events
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        for e in &events {
            if let Some(tx) = &self.events {
                let _ = tx.send(e.clone());
            }
            info!(rule = %e.rule, state = ?e.state, fingerprint = %e.fingerprint, value = %e.value, repeat = e.repeat, "alert");
        }
        Ok(events)
    }
}

/// Evaluates after each committed window until `stop`: `windows` carries
/// the newest committed window's end (ns; 0 before the first).
pub async fn run(
    engine: Engine,
    mut windows: watch::Receiver<i64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut engine = Some(engine);
    loop {
        tokio::select! {
            changed = windows.changed() => if changed.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let at = *windows.borrow_and_update();
        let Some(mut e) = engine.take() else { return };
        // SQLite reads block: off the async threads.
        let joined = tokio::task::spawn_blocking(move || {
            // A panic (a bug) must not end alerting: counted, logged, and the
            // states taken again from the ledger, as after a failed evaluation.
            let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.evaluate(at)));
            match run {
                Ok(Ok(_)) => {}
                Ok(Err(err)) => {
                    warn!(error = %err, "alert evaluation failed; retried at the next window");
                }
                Err(_) => {
                    warn!("alert evaluation panicked; states reloaded, retried at the next window");
                    e.recover();
                }
            }
            e
        })
        .await;
        match joined {
            Ok(e) => engine = Some(e),
            Err(_) => {
                warn!("the alert evaluation task was cancelled; alerting stops");
                return;
            }
        }
    }
}
