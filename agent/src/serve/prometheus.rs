//! Prometheus exposition of the usage the daemon has committed since it started.
//!
//! Counters only, in base units with `_total`, and labels of bounded
//! cardinality: namespace, pod, container, workload kind and bucket, plus the
//! model for tokens and the currency for money. Process ids, run, user and
//! trace ids are never labels (they would explode the series count); per-run
//! usage is the query API's and the OTLP export's job. Sums are exact
//! `Decimal`s, printed in full.
//!
//! # Bounded series
//!
//! - **Models**: the `model` label comes from client spans, so a model the
//!   price book does not list is exposed as `model="unpriced"` (its tokens are
//!   counted in `mentat_agent_unpriced_tokens_total`); the label's values are
//!   the book's models plus that one.
//! - **Workloads end**: a workload (its kind, namespace, pod, container) with
//!   no record for `series_grace` has all its series removed, and counted in
//!   `mentat_agent_metric_series_ended_total`. Prometheus has scraped their
//!   last values by then (the grace is many scrape intervals) and marks the
//!   series stale. Should the same label set come back (a container idle for
//!   longer than the grace, a pod re-created under its name), its counter
//!   continues from its last value, remembered for the last `max_series`
//!   ended series: Prometheus sees one monotonic counter across the gap, and
//!   `rate()`/`increase()` count only what is new. A series whose value was
//!   forgotten starts again from 0, which Prometheus reads as a counter
//!   reset, as after an exporter restart. An ended value is never moved into
//!   another series, which would count it a second time.
//! - **A cap**: at most `max_series` usage series. A series that would be
//!   created past it is folded into the family's series whose namespace, pod,
//!   container and kind are all `other` (one per family, direction, type,
//!   model and currency, so the fold itself is bounded), and each folded
//!   increment is counted in `mentat_agent_metric_series_folded_total`. Only
//!   new increments are folded: a value already exposed under its own labels
//!   stays there.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::report::record::UsageRecord;

/// The label value of models the price book does not list.
pub const UNPRICED_MODEL: &str = "unpriced";

/// The label value series past `max_series` are folded into.
pub const OTHER: &str = "other";

/// Bounds on `/metrics`' usage series (`[metrics]` in the config).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Most usage series; new ones past it are folded into `other`.
    pub max_series: usize,
    /// How long a workload's series stay after its last record.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub series_grace: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_series: 10_000,
            series_grace: Duration::from_secs(300),
        }
    }
}

/// A label set, in a fixed order.
type Labels = Vec<(&'static str, String)>;

/// One counter family.
#[derive(Debug, Default)]
struct Family {
    help: &'static str,
    series: BTreeMap<Labels, Decimal>,
}

/// The agent's own operational counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentStats {
    /// Windows committed to the ledger.
    pub windows: u64,
    /// Process-map overflows (usage went to the unattributed bucket).
    pub map_full_drops: u64,
    /// Lifecycle events lost (metadata only).
    pub events_lost: u64,
    /// Windows closed before every CPU acknowledged.
    pub late_windows: u64,
    /// Windows whose GPU data an NVML error skipped.
    pub gpu_errors: u64,
}

/// One counter a module keeps itself: (name, help, value).
pub type Counter = (&'static str, &'static str, u64);

/// Reads a module's own counters when `/metrics` is rendered.
type Source = Box<dyn Fn() -> Vec<Counter> + Send + Sync>;

/// Tells whether the price book in force lists a model.
/// A model name → the price book's name for it (`None`: the book does not price it).
type ModelFilter = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The `/metrics` exposition: usage counters and every stage's own counters, shared between the daemon and the API.
#[derive(Clone, Default)]
pub struct Exposition {
    inner: Arc<Mutex<State>>,
    sources: Arc<Mutex<Vec<Source>>>,
}

impl std::fmt::Debug for Exposition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exposition").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    families: BTreeMap<&'static str, Family>,
    agent: AgentStats,
    /// Failed attempts to write a window to the ledger (each retried).
    commit_failures: u64,
    config: MetricsConfig,
    /// `None`: every model keeps its name (no book to check against).
    known_models: Option<ModelFilter>,
    /// Workloads (the base labels) that have series, and when a record last named them.
    workloads: HashMap<Labels, Instant>,
    /// Usage series, not counting the `other` ones.
    series: usize,
    folded: u64,
    ended: u64,
    unpriced_tokens: u64,
    /// Last values of ended series (family, labels) → (value, order), so one
    /// that comes back continues from there: at most `max_series`, the
    /// oldest forgotten first.
    tombstones: HashMap<(&'static str, Labels), (Decimal, u64)>,
    /// Tombstones by age, oldest first.
    tombstone_order: BTreeMap<u64, (&'static str, Labels)>,
    tombstone_seq: u64,
}

/// Kind, namespace, pod and container: the first labels of every usage series.
const BASE_LABELS: usize = 4;

impl State {
    /// Adds `v`, the sum of `increments` increments, to the series (`base` +
    /// `extra`), creating it if the cap allows, else folding it.
    fn add(
        &mut self,
        name: &'static str,
        help: &'static str,
        base: &Labels,
        extra: &[(&'static str, String)],
        (v, increments): (Decimal, u64),
        now: Instant,
    ) {
        if increments == 0 {
            return;
        }
        let mut labels = base.clone();
        labels.extend_from_slice(extra);
        // The common case, a series that exists: one lookup (this runs for
        // every record of every window, 50,000 token records/s under load).
        if let Some(e) = self
            .families
            .get_mut(name)
            .and_then(|f| f.series.get_mut(&labels))
        {
            *e = e.checked_add(v).unwrap_or(Decimal::MAX);
            return;
        }
        let exists = |s: &Self, l: &Labels| {
            s.families
                .get(name)
                .is_some_and(|f| f.series.contains_key(l))
        };
        let labels = if exists(self, &labels) {
            labels
        } else if self.series < self.config.max_series {
            self.series += 1;
            self.workloads.entry(base.clone()).or_insert(now);
            labels
        } else {
            self.folded += increments;
            let other = other_base();
            self.workloads.insert(other.clone(), now);
            let mut l = other;
            l.extend_from_slice(extra);
            l
        };
        // A series created again continues from its last exposed value where
        // that is remembered: Prometheus then sees one monotonic counter.
        let start = if exists(self, &labels) {
            None
        } else {
            self.revive(name, &labels)
        };
        let f = self.families.entry(name).or_default();
        f.help = help;
        let e = f.series.entry(labels).or_insert(start.unwrap_or_default());
        // Saturating: only a cost that overflowed in pricing (counted there) gets near it.
        *e = e.checked_add(v).unwrap_or(Decimal::MAX);
    }

    /// The remembered last value of an ended series, forgetting it.
    fn revive(&mut self, name: &'static str, labels: &Labels) -> Option<Decimal> {
        let (v, seq) = self.tombstones.remove(&(name, labels.clone()))?;
        self.tombstone_order.remove(&seq);
        Some(v)
    }

    /// Remembers an ended series' last value, forgetting the oldest past `max_series`.
    fn bury(&mut self, name: &'static str, labels: Labels, v: Decimal) {
        self.tombstone_seq += 1;
        let seq = self.tombstone_seq;
        self.tombstone_order.insert(seq, (name, labels.clone()));
        self.tombstones.insert((name, labels), (v, seq));
        while self.tombstones.len() > self.config.max_series {
            let Some((_, key)) = self.tombstone_order.pop_first() else {
                break;
            };
            self.tombstones.remove(&key);
        }
    }

    /// Ends the series of workloads with no record since `now - series_grace`.
    fn end_idle(&mut self, now: Instant) {
        let grace = self.config.series_grace;
        let before = self.workloads.len();
        self.workloads
            .retain(|_, last| now.saturating_duration_since(*last) <= grace);
        if self.workloads.len() == before {
            return;
        }
        let other = other_base();
        let (workloads, mut removed, mut ended) = (&self.workloads, 0usize, Vec::new());
        for (name, f) in &mut self.families {
            f.series.retain(|labels, v| {
                let base = labels.get(..BASE_LABELS).unwrap_or_default();
                let keep = workloads.contains_key(base);
                if !keep {
                    if base != other.as_slice() {
                        removed += 1;
                    }
                    ended.push((*name, labels.clone(), *v));
                }
                keep
            });
        }
        self.families.retain(|_, f| !f.series.is_empty());
        self.series = self.series.saturating_sub(removed);
        self.ended += ended.len() as u64;
        for (name, labels, v) in ended {
            self.bury(name, labels, v);
        }
    }

    /// `model` as a label value: the book's name for it (so dated names and
    /// aliases add no series), else `unpriced`.
    fn model_label(&self, model: &str) -> String {
        match &self.known_models {
            Some(known) => known(model).unwrap_or_else(|| UNPRICED_MODEL.to_string()),
            None => model.to_string(),
        }
    }
}

/// The base labels of folded series.
fn other_base() -> Labels {
    ["kind", "namespace", "pod", "container"]
        .into_iter()
        .map(|k| (k, OTHER.to_string()))
        .collect()
}

/// `v` GiB in bytes, saturating (a measured quantity never gets near it).
fn gib_to_bytes(v: Decimal) -> Decimal {
    v.checked_mul(Decimal::from(1u64 << 30))
        .unwrap_or(Decimal::MAX)
}

impl Exposition {
    /// An exposition bounded by `config`, with models the book does not list
    /// (`known_models` false) under `model="unpriced"`.
    pub fn new(
        config: MetricsConfig,
        known_models: impl Fn(&str) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self::with_model_names(config, move |m| known_models(m).then(|| m.to_string()))
    }

    /// As [`new`](Self::new), with each model labelled by the price book's
    /// name for it (`gpt-4o-mini` for `gpt-4o-mini-2024-07-18`), `None` for unpriced.
    pub fn with_model_names(
        config: MetricsConfig,
        book_name: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        let m = Self::default();
        if let Ok(mut s) = m.inner.lock() {
            s.config = config;
            s.known_models = Some(Arc::new(book_name));
        }
        m
    }

    /// Adds counters that `source` reads live (a receiver's, an index's) to
    /// every rendering.
    pub fn add_source(&self, source: impl Fn() -> Vec<Counter> + Send + Sync + 'static) {
        if let Ok(mut s) = self.sources.lock() {
            s.push(Box::new(source));
        }
    }

    /// Counts one failed attempt to write a window (as it happens: the
    /// window itself is observed once it is written).
    pub fn commit_failed(&self) {
        if let Ok(mut s) = self.inner.lock() {
            s.commit_failures += 1;
        }
    }

    /// Adds one committed window's records.
    pub fn observe(&self, records: &[UsageRecord], stats: AgentStats) {
        self.observe_at(records, stats, Instant::now());
    }

    /// As [`observe`](Self::observe), at `now`: series of workloads last seen
    /// more than `series_grace` before it end.
    pub fn observe_at(&self, records: &[UsageRecord], stats: AgentStats, now: Instant) {
        let Ok(mut guard) = self.inner.lock() else {
            return;
        };
        let s = &mut *guard;
        // Ended workloads first: their places under the cap are free for this window.
        s.end_idle(now);
        // A window's increments are summed per series first, then added
        // once per series: under span load a window holds ~50,000 token
        // records of a few series, and a label set built and looked up per
        // record was about a tenth of the daemon's CPU. The series are
        // created (or folded) in the order of their first increment, and
        // `folded` counts increments, as if each were added alone.
        // The label of each model named in this window, asked once per model
        // (the book's name for it, or `unpriced`); the keys below borrow them.
        let mut model_labels: HashMap<&str, String> = HashMap::new();
        for t in records.iter().flat_map(|r| &r.tokens) {
            if !model_labels.contains_key(t.model.as_str()) {
                model_labels.insert(t.model.as_str(), s.model_label(&t.model));
            }
        }
        type Extra<'a> = Option<(&'static str, &'a str)>;
        type Key<'a> = (&'static str, usize, Extra<'a>, Extra<'a>);
        let mut bases: Vec<[&str; BASE_LABELS]> = Vec::new();
        let mut base_index: HashMap<[&str; BASE_LABELS], usize> = HashMap::new();
        let mut pending: Vec<(Key<'_>, &'static str, Decimal, u64)> = Vec::new();
        let mut series_index: HashMap<Key<'_>, usize> = HashMap::new();
        let mut inc = |key, help: &'static str, v: Decimal| {
            if v.is_zero() {
                return;
            }
            match series_index.get(&key) {
                Some(&i) => {
                    let p = &mut pending[i];
                    // Saturating, as `State::add`.
                    p.2 = p.2.checked_add(v).unwrap_or(Decimal::MAX);
                    p.3 += 1;
                }
                None => {
                    series_index.insert(key, pending.len());
                    pending.push((key, help, v, 1));
                }
            }
        };
        for r in records {
            let base_key = label_values(r);
            let base = *base_index.entry(base_key).or_insert_with(|| {
                bases.push(base_key);
                bases.len() - 1
            });
            let dir = |d: &'static str| Some(("direction", d));
            inc(
                ("mentat_cpu_seconds_total", base, None, None),
                "CPU time by the scheduler's clock, seconds.",
                r.cpu_core_seconds,
            );
            for (d, v) in [
                ("receive", r.network_rx_bytes),
                ("transmit", r.network_tx_bytes),
            ] {
                inc(
                    ("mentat_network_bytes_total", base, dir(d), None),
                    "Socket payload bytes.",
                    Decimal::from(v),
                );
            }
            for (d, v) in [("read", r.disk_read_bytes), ("write", r.disk_write_bytes)] {
                inc(
                    ("mentat_disk_bytes_total", base, dir(d), None),
                    "Storage bytes read and written.",
                    Decimal::from(v),
                );
            }
            // GiB-seconds to byte-seconds: Prometheus wants base units.
            for (name, help, v) in [
                (
                    "mentat_memory_byte_seconds_total",
                    "Resident memory integrated over time, byte-seconds.",
                    gib_to_bytes(r.memory_gb_seconds),
                ),
                (
                    "mentat_gpu_seconds_total",
                    "GPU time, seconds.",
                    r.gpu_seconds,
                ),
                (
                    "mentat_gpu_memory_byte_seconds_total",
                    "Used GPU memory integrated over time, byte-seconds.",
                    gib_to_bytes(r.gpu_memory_gb_seconds),
                ),
                (
                    "mentat_gpu_energy_joules_total",
                    "GPU energy, joules, where the device reports it.",
                    r.gpu_energy_joules,
                ),
                (
                    "mentat_syscalls_total",
                    "Syscalls entered.",
                    Decimal::from(r.syscalls),
                ),
            ] {
                inc((name, base, None, None), help, v);
            }
            for t in &r.tokens {
                let model = model_labels
                    .get(t.model.as_str())
                    .map_or(UNPRICED_MODEL, String::as_str);
                if model == UNPRICED_MODEL {
                    s.unpriced_tokens = s
                        .unpriced_tokens
                        .saturating_add(t.input)
                        .saturating_add(t.output);
                }
                for (kind, n) in [("input", t.input), ("output", t.output)] {
                    inc(
                        (
                            "mentat_tokens_total",
                            base,
                            Some(("model", model)),
                            Some(("type", kind)),
                        ),
                        "LLM tokens (models the price book does not list: model=\"unpriced\").",
                        Decimal::from(n),
                    );
                }
            }
            if let Some(c) = &r.cost {
                inc(
                    (
                        "mentat_cost_total",
                        base,
                        Some(("currency", c.currency.as_str())),
                        None,
                    ),
                    "Cost after discount, in the currency's major unit.",
                    c.total,
                );
            }
        }
        let bases: Vec<Labels> = bases
            .iter()
            .map(|values| {
                BASE_NAMES
                    .iter()
                    .zip(values)
                    .map(|(k, v)| (*k, v.to_string()))
                    .collect()
            })
            .collect();
        for base in &bases {
            if let Some(last) = s.workloads.get_mut(base) {
                *last = now;
            }
        }
        for ((name, base, e1, e2), help, v, n) in pending {
            let extra: Vec<(&'static str, String)> = [e1, e2]
                .into_iter()
                .flatten()
                .map(|(k, v)| (k, v.to_string()))
                .collect();
            s.add(name, help, &bases[base], &extra, (v, n), now);
        }
        s.agent.windows += stats.windows;
        s.agent.map_full_drops += stats.map_full_drops;
        s.agent.events_lost += stats.events_lost;
        s.agent.late_windows += stats.late_windows;
        s.agent.gpu_errors += stats.gpu_errors;
    }

    /// The exposition text (format 0.0.4).
    pub fn render(&self) -> String {
        let Ok(s) = self.inner.lock() else {
            return String::new();
        };
        let mut out = String::new();
        for (name, f) in &s.families {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} counter");
            for (labels, v) in &f.series {
                let _ = writeln!(out, "{name}{} {}", render_labels(labels), v.normalize());
            }
        }
        for (name, help, v) in [
            (
                "mentat_agent_windows_total",
                "Usage windows committed to the ledger.",
                s.agent.windows,
            ),
            (
                "mentat_agent_map_full_drops_total",
                "Charges that found the kernel process map full (their usage is in the unattributed bucket).",
                s.agent.map_full_drops,
            ),
            (
                "mentat_agent_events_lost_total",
                "Process lifecycle events lost (names may be missing; usage is not).",
                s.agent.events_lost,
            ),
            (
                "mentat_agent_late_windows_total",
                "Windows closed before every CPU acknowledged (their late usage is in the next window).",
                s.agent.late_windows,
            ),
            (
                "mentat_agent_commit_failures_total",
                "Failed attempts to write a window to the ledger (the window is kept and retried).",
                s.commit_failures,
            ),
            (
                "mentat_agent_gpu_errors_total",
                "Windows whose GPU data an NVML error skipped (CPU and the rest are metered as usual).",
                s.agent.gpu_errors,
            ),
            (
                "mentat_agent_metric_series_folded_total",
                "Increments that found /metrics at max_series and were added to the series labelled \"other\" instead.",
                s.folded,
            ),
            (
                "mentat_agent_metric_series_ended_total",
                "Usage series removed because their workload had no record for series_grace (one that returns continues from its last value while that is remembered).",
                s.ended,
            ),
            (
                "mentat_agent_unpriced_tokens_total",
                "Tokens of models the price book does not list: priced at 0 (kept in the records; re-price after adding the model).",
                s.unpriced_tokens,
            ),
            (
                "mentat_agent_cost_overflows_total",
                "Cost components too large for Decimal: priced at 0 (or a sum saturated); the raw quantities are kept.",
                crate::pricing::cost_overflows(),
            ),
            (
                "mentat_agent_storage_walks_truncated_total",
                "Writable-layer walks stopped at 2,000,000 entries: that container's storage_bytes is an undercount.",
                crate::collect::storage::walks_truncated(),
            ),
            (
                "mentat_agent_pod_list_failures_total",
                "Pod-list fetches that failed (pod names and namespaces stay as last fetched; usage is not affected).",
                crate::identity::pods::list_failures(),
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP mentat_agent_metric_series Usage series on /metrics now, not counting the \"other\" ones (at most max_series).\n\
             # TYPE mentat_agent_metric_series gauge\nmentat_agent_metric_series {}",
            s.series
        );
        drop(s);
        if let Ok(sources) = self.sources.lock() {
            for (name, help, v) in sources.iter().flat_map(|f| f()) {
                // A source's names without `_total` are gauges (alert counts).
                let kind = if name.ends_with("_total") {
                    "counter"
                } else {
                    "gauge"
                };
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        }
        out
    }
}

/// The bounded labels of a record.
/// The names of the base labels, in order.
const BASE_NAMES: [&str; BASE_LABELS] = ["kind", "namespace", "pod", "container"];

/// A record's base label values (see [`BASE_NAMES`]), borrowed.
fn label_values(r: &UsageRecord) -> [&str; BASE_LABELS] {
    [
        r.workload_kind.as_deref().unwrap_or(&r.record_kind),
        r.workload.k8s_namespace.as_deref().unwrap_or_default(),
        r.workload.k8s_pod_name.as_deref().unwrap_or_default(),
        r.workload.container_id.as_deref().unwrap_or_default(),
    ]
}

fn render_labels(labels: &Labels) -> String {
    let parts: Vec<String> = labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", parts.join(","))
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::report::record::{Cost, Workload};

    #[test]
    fn counters_accumulate_with_bounded_labels() {
        let m = Exposition::default();
        let r = UsageRecord {
            record_kind: "process".into(),
            workload_kind: Some("container".into()),
            workload: Workload {
                container_id: Some("abc".into()),
                k8s_namespace: Some("ns".into()),
                k8s_pod_name: Some("p\"o\nd".into()),
                ..Workload::default()
            },
            context: crate::identity::run::RunContext {
                run_id: Some("run-1".into()),
                user_id: Some("u".into()),
                ..Default::default()
            },
            cpu_core_seconds: Decimal::from_str("0.1").unwrap_or_default(),
            network_rx_bytes: 10,
            gpu_energy_joules: Decimal::from_str("1.25").unwrap_or_default(),
            gpu_memory_gb_seconds: Decimal::from_str("0.5").unwrap_or_default(),
            cost: Some(Cost {
                total: Decimal::from_str("0.000001").unwrap_or_default(),
                currency: "USD".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        m.observe(
            &[r.clone(), r],
            AgentStats {
                windows: 1,
                gpu_errors: 3,
                ..Default::default()
            },
        );
        let text = m.render();
        assert!(
            text.contains(r#"mentat_cpu_seconds_total{kind="container",namespace="ns",pod="p\"o\nd",container="abc"} 0.2"#),
            "{text}"
        );
        assert!(text.contains(r#"direction="receive"} 20"#), "{text}");
        assert!(text.contains(r#"currency="USD"} 0.000002"#), "{text}");
        assert!(text.contains("mentat_agent_windows_total 1"), "{text}");
        assert!(text.contains("mentat_agent_gpu_errors_total 3"), "{text}");
        assert!(
            text.contains(r#"mentat_gpu_energy_joules_total{kind="container",namespace="ns",pod="p\"o\nd",container="abc"} 2.5"#),
            "{text}"
        );
        // 2 × 0.5 GiB·s, in byte-seconds.
        assert!(
            text.lines()
                .any(|l| l.starts_with("mentat_gpu_memory_byte_seconds_total{")
                    && l.ends_with("} 1073741824")),
            "{text}"
        );
        assert!(
            !text.contains("run-1") && !text.contains("user"),
            "no run or user labels: {text}"
        );
    }

    fn container(id: usize) -> UsageRecord {
        UsageRecord {
            record_kind: "process".into(),
            workload_kind: Some("container".into()),
            workload: Workload {
                container_id: Some(format!("c{id}")),
                ..Workload::default()
            },
            cpu_core_seconds: Decimal::ONE,
            ..Default::default()
        }
    }

    /// The sample of the series whose labels contain all of `with`, summed.
    fn total(text: &str, family: &str, with: &[&str]) -> Decimal {
        text.lines()
            .filter(|l| l.starts_with(&format!("{family}{{")) && with.iter().all(|w| l.contains(w)))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<Decimal>().ok())
            .sum()
    }

    fn series_lines(text: &str) -> usize {
        text.lines()
            .filter(|l| l.starts_with("mentat_") && l.contains('{'))
            .count()
    }

    #[test]
    fn a_series_that_comes_back_continues_from_its_last_value() {
        let m = Exposition::new(
            MetricsConfig {
                series_grace: Duration::from_secs(10),
                max_series: 10,
            },
            |_| true,
        );
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        m.observe_at(&[container(1), container(1)], AgentStats::default(), at(0));
        m.observe_at(&[container(2)], AgentStats::default(), at(20));
        assert!(!m.render().contains(r#"container="c1""#));
        m.observe_at(&[container(1)], AgentStats::default(), at(21));
        // 2 before it ended, 1 since: Prometheus sees 2 then 3 across the gap, an
        // increase of 1 (a restart from 0 would show 1 < 2, a reset, also right;
        // but 1 after, say, 0.5 would hide 0.5 of usage).
        assert_eq!(
            total(
                &m.render(),
                "mentat_cpu_seconds_total",
                &[r#"container="c1""#]
            ),
            Decimal::from(3)
        );
    }

    #[test]
    fn dated_names_of_a_priced_model_are_labelled_with_the_book_name() {
        let book = crate::pricing::PriceBook::parse(crate::pricing::DEFAULT_BOOK, "shipped")
            .expect("valid");
        let m = Exposition::with_model_names(MetricsConfig::default(), move |model| {
            book.resolve_model(model).map(str::to_string)
        });
        let mut r = container(1);
        // 300 distinct dated names the provider could answer with, all gpt-4o-mini.
        r.tokens = (0..300)
            .map(|i| crate::report::record::TokenUsage {
                model: format!("gpt-4o-mini-2024-{:02}-{:02}", 1 + i % 12, 1 + i % 28),
                input: 2,
                output: 1,
                ..Default::default()
            })
            .collect();
        m.observe(&[r], AgentStats::default());
        let text = m.render();
        // cpu + gpt-4o-mini × 2 types: no series per dated name, nothing unpriced.
        assert_eq!(series_lines(&text), 3, "{text}");
        assert_eq!(
            total(
                &text,
                "mentat_tokens_total",
                &[r#"model="gpt-4o-mini""#, r#"type="input""#]
            ),
            Decimal::from(600)
        );
        assert!(
            text.contains("mentat_agent_unpriced_tokens_total 0\n"),
            "{text}"
        );
    }

    #[test]
    fn models_the_book_does_not_list_are_one_label_value_and_counted() {
        let m = Exposition::new(MetricsConfig::default(), |model| model == "gpt-4o");
        let mut r = container(1);
        r.tokens = (0..2_000)
            .map(|i| crate::report::record::TokenUsage {
                model: format!("random-{i}"),
                input: 3,
                output: 4,
                ..Default::default()
            })
            .chain([crate::report::record::TokenUsage {
                model: "gpt-4o".into(),
                input: 10,
                output: 20,
                ..Default::default()
            }])
            .collect();
        m.observe(&[r], AgentStats::default());
        let text = m.render();
        // cpu, 2 types × (gpt-4o, unpriced): nothing per random name.
        assert_eq!(series_lines(&text), 5, "{text}");
        assert!(!text.contains("random-"), "{text}");
        assert_eq!(
            total(
                &text,
                "mentat_tokens_total",
                &[r#"model="unpriced""#, r#"type="input""#]
            ),
            Decimal::from(6_000)
        );
        assert_eq!(
            total(
                &text,
                "mentat_tokens_total",
                &[r#"model="gpt-4o""#, r#"type="output""#]
            ),
            Decimal::from(20)
        );
        assert!(
            text.contains("mentat_agent_unpriced_tokens_total 14000\n"),
            "{text}"
        );
    }

    #[test]
    fn series_past_the_cap_fold_into_other_and_lose_nothing() {
        let m = Exposition::new(
            MetricsConfig {
                max_series: 5,
                ..MetricsConfig::default()
            },
            |_| true,
        );
        let records: Vec<UsageRecord> = (0..100).map(container).collect();
        m.observe(&records, AgentStats::default());
        m.observe(&records, AgentStats::default());
        let text = m.render();
        // Five containers' own series and one `other`.
        assert_eq!(series_lines(&text), 6, "{text}");
        assert_eq!(
            total(&text, "mentat_cpu_seconds_total", &[]),
            Decimal::from(200)
        );
        assert_eq!(
            total(&text, "mentat_cpu_seconds_total", &[r#"container="other""#]),
            Decimal::from(190)
        );
        assert!(text.contains("mentat_agent_metric_series 5\n"), "{text}");
        assert!(
            text.contains("mentat_agent_metric_series_folded_total 190\n"),
            "{text}"
        );
    }

    #[test]
    fn series_of_a_workload_gone_for_the_grace_end_and_restart_from_zero() {
        let grace = Duration::from_secs(10);
        let m = Exposition::new(
            MetricsConfig {
                series_grace: grace,
                max_series: 2,
            },
            |_| true,
        );
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        m.observe_at(&[container(1), container(2)], AgentStats::default(), at(0));
        m.observe_at(&[container(2)], AgentStats::default(), at(10));
        // c1 is still within its grace.
        assert!(m.render().contains(r#"container="c1""#));
        m.observe_at(&[container(2)], AgentStats::default(), at(11));
        let text = m.render();
        assert!(!text.contains(r#"container="c1""#), "{text}");
        assert_eq!(
            total(&text, "mentat_cpu_seconds_total", &[r#"container="c2""#]),
            Decimal::from(3)
        );
        assert!(
            text.contains("mentat_agent_metric_series_ended_total 1\n"),
            "{text}"
        );
        // Its place under the cap is free again: a new container gets its own series.
        m.observe_at(&[container(3), container(1)], AgentStats::default(), at(12));
        let text = m.render();
        assert!(text.contains(r#"container="c3""#), "{text}");
        // c1 came back while the cap was full again: folded, not added to its old value.
        assert_eq!(
            total(&text, "mentat_cpu_seconds_total", &[r#"container="other""#]),
            Decimal::ONE
        );
        m.observe_at(&[container(1)], AgentStats::default(), at(30));
        let text = m.render();
        // c2, c3 and other ended, and with them more series than max_series ended
        // since c1 did: its last value is forgotten, and it starts again from 0 (a
        // counter reset to Prometheus), never from a value it did not have.
        assert_eq!(
            total(&text, "mentat_cpu_seconds_total", &[r#"container="c1""#]),
            Decimal::ONE,
            "{text}"
        );
        assert!(!text.contains(r#"container="other""#), "{text}");
    }
}
