//! Turns closed windows into usage records: sums them over a span (one tick
//! for the daemon, a whole run for `record`), names what they belong to, and
//! groups them by container, pod, cgroup or workload on request.
//!
//! Stage 3. In: closed [`Window`]s from `collect` and spans from `context`.
//! Out: usage records (`record`), each process's usage split between the
//! runs it worked for (`split`).

pub mod pending;
pub mod record;
pub mod split;
pub mod window;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    collect::{
        Collector, Named, NodeBuckets, Window,
        memory::gib_seconds,
        metered::{InstanceKey, Metered},
    },
    context::index::{SCALE, Share, SpanIndex},
    identity::workload::WorkloadKind,
    probes::clock::rfc3339,
    report::{
        record::{
            BucketRecord, GroupRecord, Identity, Metrics, ProcessRecord, SummaryRecord,
            bucket_record_id, group_record_id, process_record_id,
        },
        split::{split_u64, split_u128},
    },
};

/// Everything one `record` run prints.
#[derive(Clone, Debug)]
pub struct Report {
    /// Process records, in the order to print.
    pub processes: Vec<ProcessRecord>,
    /// With `--group-by`: group records, printed instead of the process records.
    pub groups: Option<Vec<GroupRecord>>,
    /// Idle, irq_steal, kernel and unattributed.
    pub buckets: Vec<BucketRecord>,
    /// Node-level totals.
    pub summary: SummaryRecord,
}

/// What `--group-by` sums records by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum GroupBy {
    /// Each process instance (pid and start time).
    Process,
    /// `agent.id` of the run context.
    AgentId,
    /// `flow.id`.
    FlowId,
    /// `flow.run_id`.
    RunId,
    /// `user.id`.
    UserId,
    /// `project.id`.
    ProjectId,
    /// `customer.id`.
    CustomerId,
    /// Container id; processes in no container form the null group.
    Container,
    /// Kubernetes pod UID; processes in no pod form the null group.
    Pod,
    /// cgroup path.
    Cgroup,
    /// The most specific workload: container, else pod, else WASM process, else process.
    Workload,
}

impl GroupBy {
    /// The name used in records.
    pub fn name(self) -> &'static str {
        match self {
            GroupBy::Process => "process",
            GroupBy::AgentId => "agent_id",
            GroupBy::FlowId => "flow_id",
            GroupBy::RunId => "run_id",
            GroupBy::UserId => "user_id",
            GroupBy::ProjectId => "project_id",
            GroupBy::CustomerId => "customer_id",
            GroupBy::Container => "container",
            GroupBy::Pod => "pod",
            GroupBy::Cgroup => "cgroup",
            GroupBy::Workload => "workload",
        }
    }

    /// The group key of a process record (`None`: the record lacks the key).
    pub fn key_of(self, r: &ProcessRecord) -> Option<String> {
        let id = &r.identity;
        match self {
            GroupBy::Process => Some(format!("{}:{}", r.pid, r.key.start_ns)),
            GroupBy::AgentId => r.context.agent_id.clone(),
            GroupBy::FlowId => r.context.flow_id.clone(),
            GroupBy::RunId => r.context.run_id.clone(),
            GroupBy::UserId => r.context.user_id.clone(),
            GroupBy::ProjectId => r.context.project_id.clone(),
            GroupBy::CustomerId => r.context.customer_id.clone(),
            GroupBy::Container => id.container_id.clone(),
            GroupBy::Pod => id.pod_uid.clone(),
            GroupBy::Cgroup => Some(
                r.cgroup_path
                    .clone()
                    .unwrap_or_else(|| r.cgroup_id.to_string()),
            ),
            GroupBy::Workload => Some(match (&id.container_id, &id.pod_uid) {
                (Some(c), _) => format!("container:{c}"),
                (None, Some(p)) => format!("pod:{p}"),
                _ if id.workload_kind == Some(WorkloadKind::Wasm) => format!("wasm:{}", r.pid),
                _ => format!("process:{}", r.pid),
            }),
        }
    }
}

/// Usage summed over consecutive windows (one tick for the daemon, a whole
/// run for `record`).
#[derive(Clone, Debug, Default)]
pub struct WindowSum {
    start: Option<(u64, SystemTime)>,
    end: Option<(u64, SystemTime)>,
    processes: BTreeMap<InstanceKey, Metered>,
    /// Who each instance is, as of the latest window it was in.
    names: HashMap<InstanceKey, Named>,
    cgroup_memory: HashMap<PathBuf, u128>,
    cgroup_counters: HashMap<u64, PathBuf>,
    /// The latest writable-layer size of each container.
    storage: HashMap<String, u64>,
    buckets: NodeBuckets,
    events_lost: u64,
    late_windows: u64,
}

impl WindowSum {
    /// Adds a window (windows must be added in order).
    pub fn add(&mut self, w: &Window) {
        if self.start.is_none() {
            self.start = Some((w.start_ns, w.start));
        }
        self.end = Some((w.end_ns, w.end));
        for (k, m) in &w.processes {
            self.processes.entry(*k).or_default().add(m);
        }
        for (k, n) in &w.names {
            // The latest names; the earliest start of the usage summed.
            let (since_ns, since) = match self.names.get(k) {
                Some(old) if old.since_ns < n.since_ns => (old.since_ns, old.since),
                _ => (n.since_ns, n.since),
            };
            self.names.insert(
                *k,
                Named {
                    since_ns,
                    since,
                    ..n.clone()
                },
            );
        }
        for (counter, byte_ns) in &w.cgroup_memory {
            *self.cgroup_memory.entry(counter.clone()).or_default() += byte_ns;
        }
        self.cgroup_counters
            .extend(w.cgroup_counters.iter().map(|(k, v)| (*k, v.clone())));
        self.storage
            .extend(w.storage.iter().map(|(k, v)| (k.clone(), *v)));
        self.buckets.add(&w.buckets);
        self.events_lost += w.events_lost;
        if !w.exact {
            self.late_windows += 1;
        }
    }

    /// Σ cgroup memory over the distinct memory counters of a group's members.
    fn cgroup_memory_of(&self, members: &[&ProcessRecord]) -> Option<f64> {
        let counters: HashSet<&PathBuf> = members
            .iter()
            .filter_map(|r| self.cgroup_counters.get(&r.cgroup_id))
            .collect();
        if counters.is_empty() {
            return None;
        }
        let byte_ns = counters
            .iter()
            .filter_map(|c| self.cgroup_memory.get(*c))
            .sum::<u128>();
        Some(gib_seconds(byte_ns))
    }

    /// Σ writable-layer bytes over the distinct containers of a group's members.
    fn storage_of(&self, members: &[&ProcessRecord]) -> Option<u64> {
        let containers: HashSet<&str> = members
            .iter()
            .filter_map(|r| r.identity.container_id.as_deref())
            .collect();
        let sizes: Vec<u64> = containers
            .iter()
            .filter_map(|c| self.storage.get(*c).copied())
            .collect();
        (!sizes.is_empty()).then(|| sizes.iter().sum())
    }

    /// The containers' writable-layer sizes last measured in the span.
    pub fn storage(&self) -> &HashMap<String, u64> {
        &self.storage
    }

    /// The instances with usage in the span.
    pub fn instances(&self) -> impl Iterator<Item = &InstanceKey> {
        self.processes.keys()
    }

    /// Builds the records. `include` picks which processes are reported (all
    /// of them still count in the summary's node totals); `group_by` sums
    /// the reported ones into groups.
    pub fn report(
        &self,
        node_name: &str,
        include: impl Fn(&InstanceKey) -> bool,
        group_by: &[GroupBy],
        spans: Option<&SpanIndex>,
        command_exit_code: Option<i32>,
    ) -> Report {
        let (start_ns, start) = self.start.unwrap_or((0, UNIX_EPOCH));
        let (end_ns, end) = self.end.unwrap_or((start_ns, start));
        let (ws, we) = (rfc3339(start), rfc3339(end));
        let mut processes = Vec::new();
        let mut total = Metered::default();
        for (key, m) in &self.processes {
            total.add(m);
            if !include(key) {
                continue;
            }
            let named = self.names.get(key).cloned().unwrap_or_default();
            // A record spans its instance's usage: from the sum's start, or
            // earlier for a process that did not run in the windows before
            // (its memory since then is in this record).
            let (start_ns, start) = if named.since_ns < start_ns && named.since > UNIX_EPOCH {
                (named.since_ns, named.since)
            } else {
                (start_ns, start)
            };
            let ws = rfc3339(start);
            let info = &*named.info;
            let cgroup_path = &named.cgroup.path;
            let mut identity = Identity::of(&named.cgroup.identity, info.wasm.as_ref());
            if let Some(pod) = named.pod {
                identity.k8s_namespace = Some(pod.namespace);
                identity.k8s_pod_name = Some(pod.name);
            }
            let shares = match spans {
                Some(index) => {
                    // Usage is spread over the part of the window the process
                    // was alive, not the whole window: a process that lived
                    // 300 ms, all under one span, is all that span's.
                    let hi = end_ns.max(start_ns);
                    let alive_from = key.start_ns.max(start_ns).min(hi);
                    let alive_to = info.exited_ns.unwrap_or(hi).min(hi).max(alive_from);
                    let (from, to) = if alive_to > alive_from {
                        (alive_from, alive_to)
                    } else {
                        (start_ns, hi)
                    };
                    let unix_start = crate::probes::clock::unix_ns(start);
                    let (from, to) = (unix_start + (from - start_ns), unix_start + (to - start_ns));
                    // Bound to a run by its resource: that is its own context.
                    let own = index.own_context(key.tgid, key.start_ns, to, &info.context);
                    index.shares(key.tgid, from, to, &own)
                }
                None => vec![Share {
                    context: info.context.clone(),
                    parts: SCALE,
                }],
            };
            let base_id = process_record_id(node_name, key, start);
            let parts = split_metered(m, &shares);
            for (share, part) in shares.iter().zip(parts) {
                // One record per run the window is split between; the id names the run.
                let record_id = if shares.len() == 1 {
                    base_id.clone()
                } else {
                    // The whole context names the part: two parts may differ
                    // in any of its fields, and equal ids would collide.
                    let c = &share.context;
                    let field =
                        |v: &Option<String>| v.as_deref().unwrap_or("\0").as_bytes().to_vec();
                    crate::report::record::stable_id(&[
                        base_id.as_bytes(),
                        &field(&c.agent_id),
                        &field(&c.flow_id),
                        &field(&c.run_id),
                        &field(&c.user_id),
                        &field(&c.project_id),
                        &field(&c.customer_id),
                        &field(&c.trace_id),
                    ])
                };
                processes.push(ProcessRecord {
                    record_type: "process",
                    record_id,
                    node: node_name.to_string(),
                    window_start: ws.clone(),
                    window_end: we.clone(),
                    identity: identity.clone(),
                    pid: key.tgid,
                    process_start_time: rfc3339(named.start),
                    ppid: info.ppid,
                    comm: info.comm.clone(),
                    exe: info.exe.clone(),
                    cgroup_id: key.cgroup_id,
                    cgroup_path: cgroup_path.clone(),
                    context: share.context.clone(),
                    metrics: Metrics::from(&part),
                    exited: info.exited_ns.is_some_and(|t| t <= end_ns),
                    key: *key,
                    metered: part,
                });
            }
        }
        let b = &self.buckets;
        let bucket = |name: &'static str, m: &Metered, unattributed: bool| BucketRecord {
            record_type: name,
            record_id: bucket_record_id(node_name, name, start),
            node: node_name.to_string(),
            window_start: ws.clone(),
            window_end: we.clone(),
            cpu_ns: m.cpu_ns,
            cpu_core_seconds: crate::collect::metered::core_seconds(m.cpu_ns),
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
        let totals = Metrics::from(&total);
        let summary = SummaryRecord {
            record_type: "summary",
            node: node_name.to_string(),
            window_start: ws.clone(),
            window_end: we.clone(),
            accounted_cpu_ns: b.charged_ns,
            attributed_cpu_ns: totals.cpu_ns,
            attributed_syscalls: totals.syscalls,
            network_rx_bytes: totals.network_rx_bytes,
            network_tx_bytes: totals.network_tx_bytes,
            memory_gb_seconds: totals.memory_gb_seconds,
            disk_read_bytes: totals.disk_read_bytes,
            disk_write_bytes: totals.disk_write_bytes,
            map_full_drops: b.map_full_drops,
            task_read_errors: b.task_read_errors,
            events_lost: self.events_lost,
            late_windows: self.late_windows,
            processes: processes.len(),
            processes_on_node: self.processes.len(),
            command_exit_code,
        };
        let groups = (!group_by.is_empty()).then(|| {
            let mut groups = group(&processes, group_by, node_name, start, &ws, &we);
            for gr in &mut groups {
                let members: Vec<&ProcessRecord> = processes
                    .iter()
                    .filter(|r| group_key(group_by, r) == gr.group)
                    .collect();
                gr.cgroup_memory_gb_seconds = self.cgroup_memory_of(&members);
                gr.storage_bytes = self.storage_of(&members);
            }
            groups
        });
        Report {
            processes,
            groups,
            buckets,
            summary,
        }
    }
}

/// Sums process records into one group record per key.
fn group(
    processes: &[ProcessRecord],
    by: &[GroupBy],
    node_name: &str,
    start: SystemTime,
    ws: &str,
    we: &str,
) -> Vec<GroupRecord> {
    struct Acc {
        /// Distinct process instances: a process that changed cgroups has a record per cgroup.
        instances: HashSet<(u32, u64)>,
        metered: Metered,
        identity: Identity,
        cgroup: Option<(u64, Option<String>)>,
    }
    let mut groups: BTreeMap<Option<String>, Acc> = BTreeMap::new();
    for r in processes {
        let cg = (r.cgroup_id, r.cgroup_path.clone());
        let acc = groups.entry(group_key(by, r)).or_insert_with(|| Acc {
            instances: HashSet::new(),
            metered: Metered::default(),
            identity: r.identity.clone(),
            cgroup: Some(cg.clone()),
        });
        acc.instances.insert((r.key.tgid, r.key.start_ns));
        acc.metered.add(&r.metered);
        acc.identity.intersect(&r.identity);
        if acc.cgroup.as_ref() != Some(&cg) {
            acc.cgroup = None;
        }
    }
    let by_name = group_by_name(by);
    groups
        .into_iter()
        .map(|(key, acc)| GroupRecord {
            record_type: "group",
            record_id: group_record_id(node_name, &by_name, key.as_deref(), start),
            node: node_name.to_string(),
            window_start: ws.to_string(),
            window_end: we.to_string(),
            group_by: by_name.clone(),
            group: key,
            processes: acc.instances.len(),
            identity: acc.identity,
            cgroup_id: acc.cgroup.as_ref().map(|c| c.0),
            cgroup_path: acc.cgroup.and_then(|c| c.1),
            metrics: Metrics::from(&acc.metered),
            cgroup_memory_gb_seconds: None,
            storage_bytes: None,
        })
        .collect()
}

/// The comma-joined names of the keys, as records show them.
pub fn group_by_name(by: &[GroupBy]) -> String {
    by.iter().map(|g| g.name()).collect::<Vec<_>>().join(",")
}

/// The group key of a record under several keys: the values joined with
/// commas (missing ones empty); `None` when the record has none of them.
pub fn group_key(by: &[GroupBy], r: &ProcessRecord) -> Option<String> {
    let values: Vec<Option<String>> = by.iter().map(|g| g.key_of(r)).collect();
    if values.iter().all(Option::is_none) {
        return None;
    }
    Some(
        values
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect::<Vec<_>>()
            .join(","),
    )
}

/// Splits one window's usage between run shares, every integer exactly.
fn split_metered(m: &Metered, shares: &[Share]) -> Vec<Metered> {
    let mut out = vec![Metered::default(); shares.len()];
    let mut each = |total: u64, set: &mut dyn FnMut(&mut Metered, u64)| {
        for (o, v) in out.iter_mut().zip(split_u64(total, shares)) {
            set(o, v);
        }
    };
    each(m.cpu_ns, &mut |o, v| o.cpu_ns = v);
    each(m.syscalls, &mut |o, v| o.syscalls = v);
    for c in 0..m.syscalls_by_class.0.len() {
        each(m.syscalls_by_class.0[c], &mut |o, v| {
            o.syscalls_by_class.0[c] = v
        });
    }
    each(m.net.rx_bytes, &mut |o, v| o.net.rx_bytes = v);
    each(m.net.tx_bytes, &mut |o, v| o.net.tx_bytes = v);
    each(m.net.rx_calls, &mut |o, v| o.net.rx_calls = v);
    each(m.net.tx_calls, &mut |o, v| o.net.tx_calls = v);
    each(m.mem.disk_read_bytes, &mut |o, v| o.mem.disk_read_bytes = v);
    each(m.mem.disk_write_bytes, &mut |o, v| {
        o.mem.disk_write_bytes = v
    });
    each(m.gpu.gpu_ns, &mut |o, v| o.gpu.gpu_ns = v);
    each(m.gpu.energy_mj, &mut |o, v| o.gpu.energy_mj = v);
    for (o, v) in out.iter_mut().zip(split_u128(m.gpu.memory_byte_ns, shares)) {
        o.gpu.memory_byte_ns = v;
        // How the GPU time was obtained holds for every part of it.
        o.gpu.attribution = m.gpu.attribution;
    }
    for (o, v) in out.iter_mut().zip(split_u128(m.mem.rss_byte_ns, shares)) {
        o.mem.rss_byte_ns = v;
        // A peak is not divisible: every part of the process reports it.
        o.mem.peak_rss_bytes = m.mem.peak_rss_bytes;
    }
    out
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

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use super::*;
    use crate::{
        collect::{CgroupName, ProcessInfo},
        identity::{pods::PodName, workload::CgroupIdentity},
    };

    const S: u64 = 1_000_000_000;

    fn wall(ns: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + Duration::from_nanos(ns)
    }

    /// A window [start, end) s with one instance (pid 7) whose usage since `since` s is in it.
    fn window(start: u64, end: u64, since: u64, comm: &str) -> Window {
        let key = InstanceKey {
            tgid: 7,
            start_ns: S,
            cgroup_id: 42,
        };
        let named = Named {
            info: Arc::new(ProcessInfo {
                comm: comm.into(),
                ..ProcessInfo::default()
            }),
            cgroup: Arc::new(CgroupName {
                path: Some("/kubepods/podx/abc".into()),
                identity: CgroupIdentity {
                    pod_uid: Some("u-1".into()),
                    ..CgroupIdentity::default()
                },
            }),
            pod: Some(PodName {
                namespace: "ns".into(),
                name: "web".into(),
            }),
            start: wall(S),
            since_ns: since * S,
            since: wall(since * S),
        };
        let mut m = Metered::default();
        m.mem.rss_byte_ns = u128::from((end - since) * S) * 1024;
        Window {
            start_ns: start * S,
            end_ns: end * S,
            start: wall(start * S),
            end: wall(end * S),
            processes: vec![(key, m)],
            names: HashMap::from([(key, named)]),
            cgroup_memory: HashMap::new(),
            cgroup_counters: HashMap::new(),
            storage: HashMap::new(),
            buckets: NodeBuckets::default(),
            events_lost: 0,
            gpu_errors: 0,
            exact: true,
        }
    }

    /// The report of `windows` summed, every process in it, ungrouped.
    fn report_of(windows: &[Window]) -> Report {
        let mut sum = WindowSum::default();
        for w in windows {
            sum.add(w);
        }
        sum.report("n", |_| true, &[], None, None)
    }

    #[test]
    fn records_are_named_by_what_the_window_carries() {
        let r = report_of(&[window(10, 11, 10, "web")]);
        let p = &r.processes[0];
        assert_eq!(p.comm, "web");
        assert_eq!(p.cgroup_path.as_deref(), Some("/kubepods/podx/abc"));
        assert_eq!(p.identity.k8s_pod_name.as_deref(), Some("web"));
        assert_eq!(p.identity.k8s_namespace.as_deref(), Some("ns"));
        assert_eq!(p.process_start_time, rfc3339(wall(S)));
        assert_eq!(p.window_start, rfc3339(wall(10 * S)));
        assert_eq!(p.record_id, process_record_id("n", &p.key, wall(10 * S)));
    }

    #[test]
    fn a_process_that_slept_has_one_record_spanning_its_usage() {
        // Last handed over at 10 s; slept until the window [59, 60) s.
        let r = report_of(&[window(59, 60, 10, "web")]);
        let p = &r.processes[0];
        assert_eq!(p.window_start, rfc3339(wall(10 * S)));
        assert_eq!(p.window_end, rfc3339(wall(60 * S)));
        // Its own id: distinct from a record of the window alone.
        assert_eq!(p.record_id, process_record_id("n", &p.key, wall(10 * S)));
        assert_ne!(p.record_id, process_record_id("n", &p.key, wall(59 * S)));
        // Buckets and the summary span the window.
        assert_eq!(r.summary.window_start, rfc3339(wall(59 * S)));
        // Summed over several windows (`record`), a record spans the sum, and the
        // latest name wins.
        let r = report_of(&[window(10, 11, 10, "old"), window(11, 12, 11, "new")]);
        assert_eq!(r.processes[0].window_start, rfc3339(wall(10 * S)));
        assert_eq!(r.processes[0].comm, "new");
    }
}
