//! Turns closed windows into usage records: sums them over a span (one tick
//! for the daemon, a whole run for `record`) and names what they belong to.

use std::collections::{BTreeMap, HashSet};

use crate::{
    clock::rfc3339,
    collect::{Collector, NodeBuckets, Window},
    memory::gib_seconds,
    output::Report,
    usage::{
        BucketRecord, InstanceKey, Metered, ProcessRecord, SummaryRecord, bucket_record_id,
        core_seconds, process_record_id,
    },
};

/// Usage summed over consecutive windows.
#[derive(Clone, Debug, Default)]
pub struct Span {
    start: Option<(u64, std::time::SystemTime)>,
    end: Option<(u64, std::time::SystemTime)>,
    processes: BTreeMap<InstanceKey, Metered>,
    buckets: NodeBuckets,
    events_lost: u64,
    late_windows: u64,
}

impl Span {
    /// Adds a window (windows must be added in order).
    pub fn add(&mut self, w: &Window) {
        if self.start.is_none() {
            self.start = Some((w.start_ns, w.start));
        }
        self.end = Some((w.end_ns, w.end));
        for (k, m) in &w.processes {
            self.processes.entry(*k).or_default().add(m);
        }
        self.buckets.add(&w.buckets);
        self.events_lost += w.events_lost;
        if !w.exact {
            self.late_windows += 1;
        }
    }

    /// The instances with usage in the span.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceKey> {
        self.processes.keys()
    }

    /// Builds the records; `include` picks which process records are printed
    /// (all of them still count in the summary's node totals).
    pub fn report(
        &self,
        collector: &mut Collector,
        node_name: &str,
        include: impl Fn(&InstanceKey) -> bool,
        command_exit_code: Option<i32>,
    ) -> Report {
        let (start_ns, start) = self.start.unwrap_or((0, std::time::UNIX_EPOCH));
        let (end_ns, end) = self.end.unwrap_or((start_ns, start));
        let (ws, we) = (rfc3339(start), rfc3339(end));
        let mut processes = Vec::new();
        let mut total = Metered::default();
        for (key, m) in &self.processes {
            total.add(m);
            if !include(key) {
                continue;
            }
            let info = collector
                .info(key.tgid, key.start_ns)
                .cloned()
                .unwrap_or_default();
            processes.push(ProcessRecord {
                record_type: "process",
                record_id: process_record_id(node_name, key, start),
                node: node_name.to_string(),
                window_start: ws.clone(),
                window_end: we.clone(),
                workload_kind: "process",
                pid: key.tgid,
                process_start_time: rfc3339(collector.clock().to_wall(key.start_ns)),
                ppid: info.ppid,
                comm: info.comm,
                exe: info.exe,
                cgroup_id: key.cgroup_id,
                cgroup_path: collector.cgroup_path(key.cgroup_id),
                cpu_ns: m.cpu_ns,
                cpu_core_seconds: core_seconds(m.cpu_ns),
                syscalls: m.syscalls,
                syscalls_by_class: m.syscalls_by_class,
                network_rx_bytes: m.net.rx_bytes,
                network_tx_bytes: m.net.tx_bytes,
                network_rx_calls: m.net.rx_calls,
                network_tx_calls: m.net.tx_calls,
                memory_gb_seconds: gib_seconds(m.mem.rss_byte_ns),
                peak_rss_bytes: m.mem.peak_rss_bytes,
                disk_read_bytes: m.mem.disk_read_bytes,
                disk_write_bytes: m.mem.disk_write_bytes,
                exited: info.exited_ns.is_some_and(|t| t <= end_ns),
            });
        }
        let b = &self.buckets;
        let bucket = |name: &'static str, m: &Metered, unattributed: bool| BucketRecord {
            record_type: name,
            record_id: bucket_record_id(node_name, name, start),
            node: node_name.to_string(),
            window_start: ws.clone(),
            window_end: we.clone(),
            cpu_ns: m.cpu_ns,
            cpu_core_seconds: core_seconds(m.cpu_ns),
            syscalls: m.syscalls,
            network_rx_bytes: m.net.rx_bytes,
            network_tx_bytes: m.net.tx_bytes,
            map_full_drops: unattributed.then_some(b.map_full_drops),
            task_read_errors: unattributed.then_some(b.task_read_errors),
        };
        let buckets = vec![
            bucket("idle", &b.idle, false),
            bucket("irq_steal", &b.irq_steal, false),
            bucket("kernel", &b.kernel, false),
            bucket("unattributed", &b.unattributed, true),
        ];
        for m in [&b.idle, &b.irq_steal, &b.kernel, &b.unattributed] {
            total.add(m);
        }
        let summary = SummaryRecord {
            record_type: "summary",
            node: node_name.to_string(),
            window_start: ws,
            window_end: we,
            accounted_cpu_ns: b.charged_ns,
            attributed_cpu_ns: total.cpu_ns,
            attributed_syscalls: total.syscalls,
            network_rx_bytes: total.net.rx_bytes,
            network_tx_bytes: total.net.tx_bytes,
            map_full_drops: b.map_full_drops,
            task_read_errors: b.task_read_errors,
            events_lost: self.events_lost,
            late_windows: self.late_windows,
            processes: processes.len(),
            processes_on_node: self.processes.len(),
            command_exit_code,
        };
        Report {
            processes,
            buckets,
            summary,
        }
    }
}

/// The instances in `candidates` that descend from (or are) `root`, following
/// the parent links the collector learned from fork events and procfs.
pub fn descendants<'a>(
    collector: &Collector,
    root: (u32, u64),
    candidates: impl Iterator<Item = &'a InstanceKey>,
) -> HashSet<(u32, u64)> {
    let mut inside = HashSet::from([root]);
    let mut outside = HashSet::new();
    for key in candidates {
        let mut chain = Vec::new();
        let mut cur = (key.tgid, key.start_ns);
        // Bounded: a parent chain longer than this is a cycle in bad data.
        let verdict = loop {
            if inside.contains(&cur) {
                break true;
            }
            if outside.contains(&cur) || chain.len() > 4096 {
                break false;
            }
            chain.push(cur);
            match collector.info(cur.0, cur.1).and_then(|i| i.parent) {
                Some(p) => cur = p,
                None => break false,
            }
        };
        let set = if verdict { &mut inside } else { &mut outside };
        set.extend(chain);
    }
    inside
}
