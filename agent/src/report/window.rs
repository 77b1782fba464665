//! One closed window as the daemon bills it: its process, bucket, token and
//! storage records, split between runs by the spans received so far.
//!
//! In: a [`Window`] from `collect` and the span inbox from `context`. Out: a
//! [`ReportedWindow`], whose [`ReportedWindow::records`] are what `pricing`
//! prices and the `ledger` stores, and whose span rows feed per-run views.
//! The window holds its spans' inbox slots until it is dropped, so records
//! waiting to be committed stay under `max_pending_spans`.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::SystemTime,
};

use crate::{
    collect::{Collector, Window},
    context::{
        inbox::{HeldSpans, SpanInbox},
        index::SpanIndex,
    },
    identity::run::RunContext,
    probes::clock::unix_ns,
    report::{
        Report, WindowSum,
        record::{SpanRow, UsageRecord, stable_id},
        split::token_record,
    },
};

/// What one window sends from the collector to the committing stage.
#[derive(Debug)]
pub struct ReportedWindow {
    /// The window's process and bucket records and node summary.
    pub report: Report,
    /// Writable-layer bytes per container, measured by the end of the window.
    pub storage: HashMap<String, u64>,
    /// Token usage of the spans received since the last window.
    pub tokens: Vec<UsageRecord>,
    /// Those spans, for per-run views.
    pub spans: Vec<SpanRow>,
    /// NVML errors at the window's GPU reading.
    pub gpu_errors: u64,
    /// The inbox slots of `spans`' spans, freed when the window is dropped.
    pub held: Option<HeldSpans>,
}

/// Ancestors looked at for a bound one: deeper trees are cut (a shell's
/// helpers are 3 or 4 deep).
const MAX_ANCESTRY: usize = 16;

/// Binds each process in `window` without a resource-level binding of its
/// own to its nearest bound ancestor's, on this window's snapshot (see
/// `context::binding`): a bound process's children are its run's.
fn bind_descendants(collector: &Collector, window: &Window, index: &mut SpanIndex, at: u64) {
    if index.bindings_mut().is_empty() {
        return;
    }
    for (key, _) in &window.processes {
        let (pid, start) = (key.tgid, key.start_ns);
        if index.bindings_mut().own_binding(pid, start, at).is_some() {
            continue;
        }
        let mut cur = collector.info(pid, start).and_then(|i| i.parent);
        for _ in 0..MAX_ANCESTRY {
            let Some((p, s)) = cur else { break };
            if let Some(ctx) = index.bindings_mut().own_binding(p, s, at) {
                index.bindings_mut().bind_descendant(pid, start, ctx);
                break;
            }
            cur = collector.info(p, s).and_then(|i| i.parent);
        }
    }
}

impl ReportedWindow {
    /// Reports one window, split between runs by the spans received so far,
    /// with the token records and span rows of the spans received since the last.
    pub fn split(
        collector: &mut Collector,
        node: &str,
        window: &Window,
        inbox: &Arc<SpanInbox>,
    ) -> Self {
        let mut sum = WindowSum::default();
        sum.add(window);
        // Under the inbox's lock only a copy of what this window needs is
        // taken (container pids mapped to host pids first, outside it); the
        // split reads the copy while the receiver keeps admitting spans.
        let from = unix_ns(window.start);
        let to = from + window.end_ns.saturating_sub(window.start_ns);
        let (mut index, new) = inbox.take_window(from, to, |pid, scope| {
            collector.host_pid(pid, scope.container_id.as_deref(), scope.pod_uid.as_deref())
        });
        inbox.set_bad_traceparents(collector.bad_traceparents());
        inbox.forget_gone_bindings(unix_ns(SystemTime::now()), from, |pid, start| {
            collector
                .live_instance(pid)
                .is_some_and(|live| start.is_none_or(|s| s == live))
        });
        bind_descendants(collector, window, &mut index, to);
        let report = sum.report(node, |_| true, &[], Some(&index), None);
        let taken = new.len();
        let mut tokens = Vec::with_capacity(taken);
        let mut rows = Vec::with_capacity(taken);
        // The spans are consumed: their ids, name and service move into the
        // rows rather than being copied (per span, at 50,000 spans/s).
        let no_context = RunContext::default();
        for s in new {
            let instance = s
                .pid
                .and_then(|pid| collector.live_instance(pid).map(|start| (pid, start)));
            let env = instance
                .and_then(|(pid, start)| collector.info(pid, start))
                .map(|i| &i.context)
                .unwrap_or(&no_context);
            let own = match instance {
                Some((pid, start)) => index.own_context(pid, start, s.end_unix_ns, env),
                None => std::borrow::Cow::Borrowed(env),
            };
            let own = own.as_ref();
            tokens.extend(token_record(node, &s, own));
            // The span's own context, else its process's (as `inherit` would).
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
        Self {
            report,
            storage: sum.storage().clone(),
            tokens,
            spans: rows,
            gpu_errors: window.gpu_errors,
            held: Some(inbox.hold(taken)),
        }
    }

    /// The records the ledger stores for this window: one per process, one
    /// per token span, one per bucket, and one storage record per container.
    pub fn records(&self) -> Vec<UsageRecord> {
        let r = &self.report;
        let mut out: Vec<UsageRecord> = r.processes.iter().map(UsageRecord::from_process).collect();
        out.extend(self.tokens.iter().cloned());
        out.extend(r.buckets.iter().map(UsageRecord::from_bucket));
        // One storage record per container: storage belongs to the container,
        // not to each of its processes.
        let mut seen = BTreeMap::new();
        for p in &r.processes {
            if let Some(c) = &p.identity.container_id
                && let Some(&bytes) = self.storage.get(c)
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
                // Who it is, and nothing the process record bills already: a
                // quantity copied from it (its GPU time once was) is billed twice.
                node: base.node,
                window_start: base.window_start,
                window_end: base.window_end,
                workload_kind: base.workload_kind,
                workload: base.workload,
                context: base.context,
                ..UsageRecord::default()
            });
        }
        out
    }

    /// The window's start, RFC 3339.
    pub fn start(&self) -> &str {
        &self.report.summary.window_start
    }

    /// The window's end, RFC 3339.
    pub fn end(&self) -> &str {
        &self.report.summary.window_end
    }
}

#[cfg(test)]
pub(crate) mod tests {

    use super::*;
    use crate::{
        collect::metered::{InstanceKey, Metered},
        identity::run::RunContext,
        report::record::{BucketRecord, Identity, Metrics, ProcessRecord, SummaryRecord},
    };

    fn process(pid: u32, container: Option<&str>, cpu_ns: u64) -> ProcessRecord {
        ProcessRecord {
            record_type: "process",
            record_id: format!("p{pid}"),
            node: "n".into(),
            window_start: "2026-01-01T00:00:00Z".into(),
            window_end: "2026-01-01T00:00:01Z".into(),
            identity: Identity {
                container_id: container.map(String::from),
                ..Identity::default()
            },
            pid,
            process_start_time: "2026-01-01T00:00:00Z".into(),
            ppid: None,
            comm: "w".into(),
            exe: None,
            cgroup_id: 7,
            cgroup_path: None,
            context: RunContext::default(),
            metrics: Metrics::default(),
            exited: false,
            key: InstanceKey::default(),
            metered: Metered {
                cpu_ns,
                ..Metered::default()
            },
        }
    }

    /// A window over [ws, we) holding `processes`, `tokens` and the measured
    /// container sizes `storage`.
    pub(crate) fn window(
        ws: &str,
        we: &str,
        processes: Vec<ProcessRecord>,
        tokens: Vec<UsageRecord>,
        storage: &[(&str, u64)],
    ) -> ReportedWindow {
        ReportedWindow {
            report: Report {
                processes,
                groups: None,
                buckets: Vec::new(),
                summary: SummaryRecord {
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
                },
            },
            storage: storage.iter().map(|(c, b)| (c.to_string(), *b)).collect(),
            tokens,
            spans: Vec::new(),
            gpu_errors: 0,
            held: None,
        }
    }

    #[test]
    fn storage_is_one_record_per_measured_container_and_bills_nothing_else() {
        let token = UsageRecord {
            record_id: "t1".into(),
            record_kind: "token".into(),
            ..UsageRecord::default()
        };
        let w = window(
            "2026-01-01T00:00:00Z",
            "2026-01-01T00:00:01Z",
            vec![
                ProcessRecord {
                    metered: Metered {
                        cpu_ns: 500_000_000,
                        gpu: crate::collect::metered::GpuMetered {
                            gpu_ns: 2_000_000_000,
                            memory_byte_ns: 1 << 40,
                            energy_mj: 7_000,
                            attribution: None,
                        },
                        ..Metered::default()
                    },
                    ..process(1, Some("c1"), 500_000_000)
                },
                process(2, Some("c1"), 250_000_000),
                process(3, Some("c2"), 1_000_000_000),
                process(4, None, 2_000_000_000),
            ],
            vec![token],
            // c2 was not measured; c3 has no process this window.
            &[("c1", 4096), ("c3", 1)],
        );
        let mut w = w;
        w.report.buckets.push(BucketRecord {
            record_type: "idle",
            record_id: "b".into(),
            node: "n".into(),
            window_start: "2026-01-01T00:00:00Z".into(),
            window_end: "2026-01-01T00:00:01Z".into(),
            cpu_ns: 0,
            cpu_core_seconds: 0.0,
            syscalls: 0,
            network_rx_bytes: 0,
            network_tx_bytes: 0,
            map_full_drops: None,
            task_read_errors: None,
        });
        let records = w.records();
        let kinds: Vec<&str> = records.iter().map(|r| r.record_kind.as_str()).collect();
        assert_eq!(
            kinds,
            [
                "process", "process", "process", "process", "token", "idle", "storage"
            ]
        );
        let storage = &records[6];
        assert_eq!(storage.storage_bytes, Some(4096));
        assert_eq!(storage.workload.container_id.as_deref(), Some("c1"));
        // The CPU stays with the processes: nothing is billed twice.
        assert!(storage.cpu_core_seconds.is_zero() && storage.pid.is_none());
        let cpu: rust_decimal::Decimal = records.iter().map(|r| r.cpu_core_seconds).sum();
        assert_eq!(cpu, "3.75".parse().expect("number"));
        // Nor the GPU of the process it names the container by.
        assert!(
            storage.gpu_seconds.is_zero()
                && storage.gpu_memory_gb_seconds.is_zero()
                && storage.gpu_energy_joules.is_zero()
                && storage.gpu_attribution.is_none(),
            "{storage:?}"
        );
        let gpu: rust_decimal::Decimal = records.iter().map(|r| r.gpu_seconds).sum();
        assert_eq!(gpu, "2".parse().expect("number"));
        // Ids are deterministic (a retried window writes the same records)
        // and distinct from every process record's.
        assert_eq!(w.records()[6].record_id, storage.record_id);
        assert!(
            records[..6]
                .iter()
                .all(|r| r.record_id != storage.record_id)
        );
    }
}
