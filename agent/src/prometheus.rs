//! Prometheus exposition of the usage the daemon has committed since it started.
//!
//! Counters only, in base units with `_total`, and labels of bounded
//! cardinality: namespace, pod, container, workload kind and bucket, plus the
//! model for tokens and the currency for money. Process ids, run, user and
//! trace ids are never labels (they would explode the series count); per-run
//! usage is the query API's and the OTLP export's job. Sums are exact
//! `Decimal`s, printed in full.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
};

use rust_decimal::Decimal;

use crate::usage::UsageRecord;

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

/// Counters for `/metrics`, shared between the daemon and the API.
#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<State>>,
    sources: Arc<Mutex<Vec<Source>>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    families: BTreeMap<&'static str, Family>,
    agent: AgentStats,
    /// Failed attempts to write a window to the ledger (each retried).
    commit_failures: u64,
}

impl State {
    fn add(&mut self, name: &'static str, help: &'static str, labels: Labels, v: Decimal) {
        if v.is_zero() {
            return;
        }
        let f = self.families.entry(name).or_default();
        f.help = help;
        *f.series.entry(labels).or_default() += v;
    }
}

impl Metrics {
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
        let Ok(mut s) = self.inner.lock() else {
            return;
        };
        for r in records {
            let base = labels(r);
            s.add(
                "mentat_cpu_seconds_total",
                "CPU time by the scheduler's clock, seconds.",
                base.clone(),
                r.cpu_core_seconds,
            );
            let dir = |d: &str| {
                let mut l = base.clone();
                l.push(("direction", d.to_string()));
                l
            };
            s.add(
                "mentat_network_bytes_total",
                "Socket payload bytes.",
                dir("receive"),
                Decimal::from(r.network_rx_bytes),
            );
            s.add(
                "mentat_network_bytes_total",
                "Socket payload bytes.",
                dir("transmit"),
                Decimal::from(r.network_tx_bytes),
            );
            s.add(
                "mentat_disk_bytes_total",
                "Storage bytes read and written.",
                dir("read"),
                Decimal::from(r.disk_read_bytes),
            );
            s.add(
                "mentat_disk_bytes_total",
                "Storage bytes read and written.",
                dir("write"),
                Decimal::from(r.disk_write_bytes),
            );
            // GiB-seconds to byte-seconds: Prometheus wants base units.
            s.add(
                "mentat_memory_byte_seconds_total",
                "Resident memory integrated over time, byte-seconds.",
                base.clone(),
                r.memory_gb_seconds * Decimal::from(1u64 << 30),
            );
            s.add(
                "mentat_gpu_seconds_total",
                "GPU time, seconds.",
                base.clone(),
                r.gpu_seconds,
            );
            // GiB-seconds to byte-seconds, as for memory.
            s.add(
                "mentat_gpu_memory_byte_seconds_total",
                "Used GPU memory integrated over time, byte-seconds.",
                base.clone(),
                r.gpu_memory_gb_seconds * Decimal::from(1u64 << 30),
            );
            s.add(
                "mentat_gpu_energy_joules_total",
                "GPU energy, joules, where the device reports it.",
                base.clone(),
                r.gpu_energy_joules,
            );
            s.add(
                "mentat_syscalls_total",
                "Syscalls entered.",
                base.clone(),
                Decimal::from(r.syscalls),
            );
            for t in &r.tokens {
                for (kind, n) in [("input", t.input), ("output", t.output)] {
                    let mut l = base.clone();
                    l.push(("model", t.model.clone()));
                    l.push(("type", kind.to_string()));
                    s.add("mentat_tokens_total", "LLM tokens.", l, Decimal::from(n));
                }
            }
            if let Some(c) = &r.cost {
                let mut l = base.clone();
                l.push(("currency", c.currency.clone()));
                s.add(
                    "mentat_cost_total",
                    "Cost after discount, in the currency's major unit.",
                    l,
                    c.total,
                );
            }
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
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        drop(s);
        if let Ok(sources) = self.sources.lock() {
            for (name, help, v) in sources.iter().flat_map(|f| f()) {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
                );
            }
        }
        out
    }
}

/// The bounded labels of a record.
fn labels(r: &UsageRecord) -> Labels {
    let v = |o: &Option<String>| o.clone().unwrap_or_default();
    vec![
        (
            "kind",
            r.workload_kind
                .clone()
                .unwrap_or_else(|| r.record_kind.clone()),
        ),
        ("namespace", v(&r.k8s_namespace)),
        ("pod", v(&r.k8s_pod_name)),
        ("container", v(&r.container_id)),
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
    use crate::usage::Cost;

    #[test]
    fn counters_accumulate_with_bounded_labels() {
        let m = Metrics::default();
        let r = UsageRecord {
            record_kind: "process".into(),
            workload_kind: Some("container".into()),
            container_id: Some("abc".into()),
            k8s_namespace: Some("ns".into()),
            k8s_pod_name: Some("p\"o\nd".into()),
            run_id: Some("run-1".into()),
            user_id: Some("u".into()),
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
}
