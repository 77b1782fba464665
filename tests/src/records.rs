//! The agent's JSONL output, typed, with the structural parts of its contract checked
//! while parsing, so every test checks them on every run.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The classes a process's syscalls are broken down into (`syscalls_by_class` keys).
pub const SYSCALL_CLASSES: [&str; 8] = [
    "other", "file", "network", "memory", "process", "sync", "time", "ipc",
];

/// What a record can belong to (`workload_kind`).
pub const WORKLOAD_KINDS: [&str; 4] = ["process", "container", "pod", "wasm"];

/// Runtimes a container's cgroup can name (`container_runtime`).
pub const CONTAINER_RUNTIMES: [&str; 4] = ["docker", "containerd", "cri-o", "podman"];

/// Kubernetes QoS classes (`qos_class`).
pub const QOS_CLASSES: [&str; 3] = ["guaranteed", "burstable", "besteffort"];

/// Values of `record --group-by` (and of a group record's `group_by`): identity, then
/// the run context (`agent.id`, `flow.id`, `flow.run_id`, ... of the trace-context join).
pub const GROUP_BY: [&str; 11] = [
    "process",
    "container",
    "pod",
    "cgroup",
    "workload",
    "agent_id",
    "flow_id",
    "run_id",
    "user_id",
    "project_id",
    "customer_id",
];

/// One process instance (pid, start time) in one cgroup.
///
/// Nullable fields use `Option::deserialize` so that a *missing* key is an error while
/// an explicit `null` is `None`: the contract says the key is always there.
#[derive(Clone, Debug, Deserialize)]
pub struct ProcessRecord {
    pub record_id: String,
    pub workload_kind: String,
    pub node: String,
    #[serde(deserialize_with = "rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(deserialize_with = "rfc3339")]
    pub window_end: OffsetDateTime,
    pub pid: u32,
    #[serde(deserialize_with = "rfc3339")]
    pub process_start_time: OffsetDateTime,
    #[serde(deserialize_with = "Option::deserialize")]
    pub ppid: Option<u32>,
    pub comm: String,
    #[serde(deserialize_with = "Option::deserialize")]
    pub exe: Option<String>,
    pub cgroup_id: u64,
    #[serde(deserialize_with = "Option::deserialize")]
    pub cgroup_path: Option<String>,
    /// 64 lowercase hex.
    #[serde(deserialize_with = "Option::deserialize")]
    pub container_id: Option<String>,
    /// One of [`CONTAINER_RUNTIMES`].
    #[serde(deserialize_with = "Option::deserialize")]
    pub container_runtime: Option<String>,
    /// A UUID with dashes (or a static pod's 32-hex hash).
    #[serde(deserialize_with = "Option::deserialize")]
    pub pod_uid: Option<String>,
    /// One of [`QOS_CLASSES`].
    #[serde(deserialize_with = "Option::deserialize")]
    pub qos_class: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub k8s_namespace: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub k8s_pod_name: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub wasm_runtime: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub wasm_module: Option<String>,
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
    pub syscalls_by_class: BTreeMap<String, u64>,
    /// Socket payload bytes and calls (IPv4 and IPv6, TCP and UDP; no unix sockets).
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub network_rx_calls: u64,
    pub network_tx_calls: u64,
    /// ∫ RSS dt in GiB·s (1 GiB = 1024³ bytes).
    pub memory_gb_seconds: f64,
    pub peak_rss_bytes: u64,
    /// `/proc/<pid>/io` semantics: bytes caused to be read from / written to storage.
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    /// Absent unless known, and never `null`.
    #[serde(default, deserialize_with = "present")]
    pub storage_bytes: Option<u64>,
    pub exited: bool,
}

/// One `record --group-by` group: the processes sharing a key, summed.
///
/// Identity fields hold the group's value where every member shares it, else `null`.
#[derive(Clone, Debug, Deserialize)]
pub struct GroupRecord {
    /// The `--group-by` value.
    pub group_by: String,
    /// The key; `None` for the members that lack it (e.g. in no container).
    #[serde(deserialize_with = "Option::deserialize")]
    pub group: Option<String>,
    /// Process instances in the group.
    pub processes: u64,
    #[serde(deserialize_with = "Option::deserialize")]
    pub workload_kind: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub container_id: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub container_runtime: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub pod_uid: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub qos_class: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub cgroup_id: Option<u64>,
    #[serde(deserialize_with = "Option::deserialize")]
    pub cgroup_path: Option<String>,
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub network_rx_calls: u64,
    pub network_tx_calls: u64,
    pub memory_gb_seconds: f64,
    /// The largest member's peak.
    pub peak_rss_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    #[serde(default, deserialize_with = "present")]
    pub storage_bytes: Option<u64>,
}

/// The `idle`, `irq_steal` and `kernel` buckets.
#[derive(Clone, Debug, Deserialize)]
pub struct Bucket {
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
}

/// The `unattributed` bucket: usage the agent could not give to a process.
#[derive(Clone, Debug, Deserialize)]
pub struct UnattributedBucket {
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub map_full_drops: u64,
    pub task_read_errors: u64,
}

/// The last line of every recording.
#[derive(Clone, Debug, Deserialize)]
pub struct Summary {
    #[serde(deserialize_with = "rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(deserialize_with = "rfc3339")]
    pub window_end: OffsetDateTime,
    /// Kernel side: per CPU, first to last observed context switch, summed.
    pub accounted_cpu_ns: u64,
    /// Every process on the node plus the four buckets.
    pub attributed_cpu_ns: u64,
    /// Σ syscalls, every process on the node plus the buckets.
    pub attributed_syscalls: u64,
    /// The node totals of the other metrics, every process plus the buckets (which
    /// carry no memory or disk).
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub memory_gb_seconds: f64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub map_full_drops: u64,
    pub events_lost: u64,
    #[serde(deserialize_with = "Option::deserialize")]
    pub command_exit_code: Option<i32>,
    /// Process records printed (without `--group-by`), or process records summed into
    /// the groups printed (with it).
    pub processes: u64,
}

/// The metrics that are conserved: what every process on the node and the buckets add up
/// to is the summary's node total.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Totals {
    pub cpu_ns: u64,
    pub syscalls: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub memory_gb_seconds: f64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
}

impl Totals {
    fn add(&mut self, other: &Totals) {
        self.cpu_ns += other.cpu_ns;
        self.syscalls += other.syscalls;
        self.network_rx_bytes += other.network_rx_bytes;
        self.network_tx_bytes += other.network_tx_bytes;
        self.memory_gb_seconds += other.memory_gb_seconds;
        self.disk_read_bytes += other.disk_read_bytes;
        self.disk_write_bytes += other.disk_write_bytes;
    }

    /// Where `self` differs from `expected`: integer metrics must match exactly (they are
    /// sums of integers), `memory_gb_seconds` within 1e-9 relative (f64 sums in another
    /// order round differently, by far less than that).
    pub fn differences(&self, expected: &Totals) -> Vec<String> {
        let mut out = Vec::new();
        for (name, got, want) in [
            ("cpu_ns", self.cpu_ns, expected.cpu_ns),
            ("syscalls", self.syscalls, expected.syscalls),
            (
                "network_rx_bytes",
                self.network_rx_bytes,
                expected.network_rx_bytes,
            ),
            (
                "network_tx_bytes",
                self.network_tx_bytes,
                expected.network_tx_bytes,
            ),
            (
                "disk_read_bytes",
                self.disk_read_bytes,
                expected.disk_read_bytes,
            ),
            (
                "disk_write_bytes",
                self.disk_write_bytes,
                expected.disk_write_bytes,
            ),
        ] {
            if got != want {
                out.push(format!(
                    "{name}: {got} printed, {want} in the summary (off by {})",
                    i128::from(got) - i128::from(want)
                ));
            }
        }
        let (got, want) = (self.memory_gb_seconds, expected.memory_gb_seconds);
        if (got - want).abs() > 1e-9 * want.abs().max(got.abs()) || !got.is_finite() {
            out.push(format!(
                "memory_gb_seconds: {got} printed, {want} in the summary (off by {:e})",
                got - want
            ));
        }
        out
    }
}

#[derive(Deserialize)]
#[serde(tag = "record_type", rename_all = "snake_case")]
enum Line {
    Process(Box<ProcessRecord>),
    Group(Box<GroupRecord>),
    Idle(Bucket),
    IrqSteal(Bucket),
    Kernel(Bucket),
    Unattributed(UnattributedBucket),
    Summary(Summary),
}

/// Everything one `record` run wrote.
#[derive(Clone, Debug)]
pub struct Records {
    /// Without `--group-by`.
    pub processes: Vec<ProcessRecord>,
    /// With `--group-by`, instead of process records.
    pub groups: Vec<GroupRecord>,
    pub idle: Bucket,
    /// Wall time no task ran (interrupts, hypervisor steal).
    pub irq_steal: Bucket,
    pub kernel: Bucket,
    pub unattributed: UnattributedBucket,
    pub summary: Summary,
}

impl Records {
    /// Parses JSONL and checks the contract's structure: every line a known record
    /// type with every field present and well typed, one of each bucket, exactly one
    /// summary and it last, process records or group records (of one `group_by`, each
    /// key once) but not both, and the summary's process count matching the records.
    pub fn parse(text: &str) -> Result<Self> {
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| (index + 1, line))
            .collect();
        let mut processes = Vec::new();
        let mut groups: Vec<GroupRecord> = Vec::new();
        let (mut idle, mut irq_steal, mut kernel, mut unattributed, mut summary) =
            (None, None, None, None, None);
        for (position, &(number, line)) in lines.iter().enumerate() {
            let parsed: Line = serde_json::from_str(line)
                .with_context(|| format!("line {number} is not a valid record: {}", clip(line)))?;
            match parsed {
                Line::Process(record) => {
                    record
                        .check()
                        .with_context(|| format!("line {number}: {}", clip(line)))?;
                    processes.push(*record);
                }
                Line::Group(group) => {
                    group
                        .check()
                        .with_context(|| format!("line {number}: {}", clip(line)))?;
                    if let Some(first) = groups.first() {
                        ensure!(
                            group.group_by == first.group_by,
                            "line {number}: a group by {:?} after groups by {:?}",
                            group.group_by,
                            first.group_by
                        );
                        ensure!(
                            groups.iter().all(|g| g.group != group.group),
                            "line {number}: a second group {:?}",
                            group.group
                        );
                    }
                    groups.push(*group);
                }
                Line::Idle(bucket) => set_once(&mut idle, bucket, "idle", number)?,
                Line::IrqSteal(bucket) => set_once(&mut irq_steal, bucket, "irq_steal", number)?,
                Line::Kernel(bucket) => set_once(&mut kernel, bucket, "kernel", number)?,
                Line::Unattributed(bucket) => {
                    set_once(&mut unattributed, bucket, "unattributed", number)?;
                }
                Line::Summary(record) => {
                    ensure!(
                        position + 1 == lines.len(),
                        "line {number}: the summary must be the last line, but {} more follow",
                        lines.len() - position - 1
                    );
                    set_once(&mut summary, record, "summary", number)?;
                }
            }
        }
        let summary = summary.context("no summary record")?;
        ensure!(
            processes.is_empty() || groups.is_empty(),
            "{} process records and {} group records in one recording",
            processes.len(),
            groups.len()
        );
        if groups.is_empty() {
            ensure!(
                summary.processes == processes.len() as u64,
                "the summary counts {} process records but {} were printed",
                summary.processes,
                processes.len()
            );
        } else {
            // A group counts each instance once; an instance has a record per cgroup it
            // was in, which may fall into one group or several.
            let in_groups: u64 = groups.iter().map(|g| g.processes).sum();
            ensure!(
                in_groups <= summary.processes,
                "the groups hold {in_groups} processes, more than the {} process records the summary counts",
                summary.processes
            );
        }
        ensure!(
            summary.window_start <= summary.window_end,
            "the summary's window ends ({}) before it starts ({})",
            summary.window_end,
            summary.window_start
        );
        Ok(Records {
            processes,
            groups,
            idle: idle.context("no idle bucket record")?,
            irq_steal: irq_steal.context("no irq_steal bucket record")?,
            kernel: kernel.context("no kernel bucket record")?,
            unattributed: unattributed.context("no unattributed bucket record")?,
            summary,
        })
    }

    /// The process records of cgroup `cgroup_id` (a v2 cgroup's inode).
    pub fn in_cgroup(&self, cgroup_id: u64) -> Vec<&ProcessRecord> {
        self.processes
            .iter()
            .filter(|r| r.cgroup_id == cgroup_id)
            .collect()
    }

    /// All records of processes with this pid (one per cgroup the process was in,
    /// more if pids were reused during the recording).
    pub fn of_pid(&self, pid: u32) -> Vec<&ProcessRecord> {
        self.processes.iter().filter(|r| r.pid == pid).collect()
    }

    /// CPU time of every record of these pids, summed.
    pub fn cpu_ns_of_all(&self, pids: impl IntoIterator<Item = u32>) -> u64 {
        pids.into_iter().map(|pid| self.cpu_ns_of(pid)).sum()
    }

    /// [`Records::of_pid`], for a test: panics naming `what` and listing every
    /// process record when there is none.
    pub fn expect_pid(&self, pid: u32, what: &str) -> Vec<&ProcessRecord> {
        let found = self.of_pid(pid);
        assert!(
            !found.is_empty(),
            "no process record of {what} (pid {pid}) among {:#?}",
            self.processes
        );
        found
    }

    /// CPU time of every record with this pid, summed.
    pub fn cpu_ns_of(&self, pid: u32) -> u64 {
        self.of_pid(pid).iter().map(|r| r.cpu_ns).sum()
    }

    /// Σ cpu_ns over every process (or group) record and the four buckets: what the
    /// summary's `attributed_cpu_ns` must say, recomputed from the lines themselves.
    pub fn attributed_cpu_ns(&self) -> u64 {
        self.printed_totals().cpu_ns
    }

    /// The group with this key (`None`: the group of processes lacking the key).
    pub fn group(&self, key: Option<&str>) -> Option<&GroupRecord> {
        self.groups.iter().find(|g| g.group.as_deref() == key)
    }

    /// Every conserved metric summed over the process (or group) records and the four
    /// buckets. With `--all` that is every process on the node, so it must equal
    /// [`Summary::totals`].
    pub fn printed_totals(&self) -> Totals {
        let mut totals = Totals::default();
        for record in &self.processes {
            totals.add(&record.totals());
        }
        for group in &self.groups {
            totals.add(&group.totals());
        }
        for bucket in [&self.idle, &self.irq_steal, &self.kernel] {
            totals.add(&bucket.totals());
        }
        totals.add(&self.unattributed.totals());
        totals
    }

    /// Where the printed lines (which must be the whole node: `--all`) and the summary's
    /// node totals disagree, one line per metric; empty when everything is conserved.
    pub fn conservation_errors(&self) -> Vec<String> {
        self.printed_totals().differences(&self.summary.totals())
    }
}

impl Summary {
    /// The node totals of the conserved metrics.
    pub fn totals(&self) -> Totals {
        Totals {
            cpu_ns: self.attributed_cpu_ns,
            syscalls: self.attributed_syscalls,
            network_rx_bytes: self.network_rx_bytes,
            network_tx_bytes: self.network_tx_bytes,
            memory_gb_seconds: self.memory_gb_seconds,
            disk_read_bytes: self.disk_read_bytes,
            disk_write_bytes: self.disk_write_bytes,
        }
    }
}

impl Bucket {
    fn totals(&self) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns,
            syscalls: self.syscalls,
            network_rx_bytes: self.network_rx_bytes,
            network_tx_bytes: self.network_tx_bytes,
            ..Totals::default()
        }
    }
}

impl UnattributedBucket {
    fn totals(&self) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns,
            syscalls: self.syscalls,
            network_rx_bytes: self.network_rx_bytes,
            network_tx_bytes: self.network_tx_bytes,
            ..Totals::default()
        }
    }
}

impl ProcessRecord {
    /// Parts of the contract that serde's types cannot say.
    fn check(&self) -> Result<()> {
        check_identity(&Identity {
            workload_kind: Some(&self.workload_kind),
            container_id: self.container_id.as_deref(),
            container_runtime: self.container_runtime.as_deref(),
            pod_uid: self.pod_uid.as_deref(),
            qos_class: self.qos_class.as_deref(),
            cgroup_path: self.cgroup_path.as_deref(),
        })?;
        // What each kind means, in the agent's precedence (a WASM runtime, else a
        // container, else a pod-level process, else a plain process).
        match self.workload_kind.as_str() {
            "wasm" => ensure!(
                self.wasm_runtime.is_some(),
                "workload_kind \"wasm\" without a wasm_runtime"
            ),
            "container" => ensure!(
                self.container_id.is_some(),
                "workload_kind \"container\" without a container_id"
            ),
            "pod" => ensure!(
                self.pod_uid.is_some() && self.container_id.is_none(),
                "workload_kind \"pod\" needs a pod_uid and no container_id"
            ),
            _ => ensure!(
                self.container_id.is_none()
                    && self.pod_uid.is_none()
                    && self.wasm_runtime.is_none(),
                "workload_kind \"process\" with a container, pod or WASM runtime"
            ),
        }
        ensure!(
            self.wasm_runtime.is_some() || self.wasm_module.is_none(),
            "a wasm_module without a wasm_runtime"
        );
        ensure!(
            self.pod_uid.is_some() || (self.k8s_namespace.is_none() && self.k8s_pod_name.is_none()),
            "k8s_namespace / k8s_pod_name without a pod_uid"
        );
        check_quantities(self.memory_gb_seconds, self.cpu_core_seconds)?;
        if let Some(class) = self
            .syscalls_by_class
            .keys()
            .find(|class| !SYSCALL_CLASSES.contains(&class.as_str()))
        {
            bail!("unknown syscall class {class:?}; known: {SYSCALL_CLASSES:?}");
        }
        ensure!(
            self.window_start <= self.window_end,
            "the record's window ends before it starts"
        );
        Ok(())
    }

    /// Its conserved metrics.
    pub fn totals(&self) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns,
            syscalls: self.syscalls,
            network_rx_bytes: self.network_rx_bytes,
            network_tx_bytes: self.network_tx_bytes,
            memory_gb_seconds: self.memory_gb_seconds,
            disk_read_bytes: self.disk_read_bytes,
            disk_write_bytes: self.disk_write_bytes,
        }
    }

    /// Sum of `syscalls_by_class`.
    pub fn syscalls_in_classes(&self) -> u64 {
        self.syscalls_by_class.values().sum()
    }

    /// `syscalls_by_class[class]`, 0 when absent.
    pub fn syscalls_of_class(&self, class: &str) -> u64 {
        self.syscalls_by_class.get(class).copied().unwrap_or(0)
    }
}

impl GroupRecord {
    /// Parts of the contract that serde's types cannot say.
    fn check(&self) -> Result<()> {
        ensure!(
            GROUP_BY.contains(&self.group_by.as_str()),
            "group_by {:?} is not one of {GROUP_BY:?}",
            self.group_by
        );
        ensure!(self.processes > 0, "an empty group");
        check_identity(&Identity {
            workload_kind: self.workload_kind.as_deref(),
            container_id: self.container_id.as_deref(),
            container_runtime: self.container_runtime.as_deref(),
            pod_uid: self.pod_uid.as_deref(),
            qos_class: self.qos_class.as_deref(),
            cgroup_path: self.cgroup_path.as_deref(),
        })?;
        check_quantities(self.memory_gb_seconds, self.cpu_core_seconds)?;
        let Some(key) = self.group.as_deref() else {
            ensure!(
                self.group_by != "workload" && self.group_by != "process",
                "a null group by {}: every process has one",
                self.group_by
            );
            return Ok(());
        };
        // The key is what the members share, so the group's own field must say it.
        let shared = |field: Option<&str>, value: &str, name: &str| {
            ensure!(
                field == Some(value),
                "group {key:?} by {} has {name} {field:?}",
                self.group_by
            );
            Ok(())
        };
        match self.group_by.as_str() {
            "container" => shared(self.container_id.as_deref(), key, "container_id"),
            "pod" => shared(self.pod_uid.as_deref(), key, "pod_uid"),
            "cgroup" if self.cgroup_path.is_some() => {
                shared(self.cgroup_path.as_deref(), key, "cgroup_path")
            }
            "cgroup" => {
                ensure!(
                    key.parse::<u64>().ok() == self.cgroup_id,
                    "group {key:?} by cgroup has no cgroup_path, so its key should be its cgroup_id {:?}",
                    self.cgroup_id
                );
                Ok(())
            }
            "workload" => {
                let (kind, id) = key
                    .split_once(':')
                    .with_context(|| format!("workload group {key:?} is not <kind>:<id>"))?;
                match kind {
                    "container" => shared(self.container_id.as_deref(), id, "container_id")?,
                    "pod" => shared(self.pod_uid.as_deref(), id, "pod_uid")?,
                    "wasm" | "process" => ensure!(
                        id.parse::<u32>().is_ok(),
                        "group {key:?}: {id:?} is not a pid"
                    ),
                    _ => bail!("workload group {key:?} is not container:, pod:, wasm: or process:"),
                }
                ensure!(
                    self.workload_kind.is_none() || self.workload_kind.as_deref() == Some(kind),
                    "group {key:?} has workload_kind {:?}",
                    self.workload_kind
                );
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Its conserved metrics.
    pub fn totals(&self) -> Totals {
        Totals {
            cpu_ns: self.cpu_ns,
            syscalls: self.syscalls,
            network_rx_bytes: self.network_rx_bytes,
            network_tx_bytes: self.network_tx_bytes,
            memory_gb_seconds: self.memory_gb_seconds,
            disk_read_bytes: self.disk_read_bytes,
            disk_write_bytes: self.disk_write_bytes,
        }
    }
}

/// The identity fields process and group records share.
struct Identity<'a> {
    workload_kind: Option<&'a str>,
    container_id: Option<&'a str>,
    container_runtime: Option<&'a str>,
    pod_uid: Option<&'a str>,
    qos_class: Option<&'a str>,
    cgroup_path: Option<&'a str>,
}

fn check_identity(identity: &Identity) -> Result<()> {
    if let Some(kind) = identity.workload_kind {
        ensure!(
            WORKLOAD_KINDS.contains(&kind),
            "workload_kind {kind:?} is not one of {WORKLOAD_KINDS:?}"
        );
    }
    if let Some(id) = identity.container_id {
        ensure!(
            is_container_id(id),
            "container_id {id:?} is not 64 lowercase hex digits"
        );
    }
    if let Some(runtime) = identity.container_runtime {
        ensure!(
            CONTAINER_RUNTIMES.contains(&runtime),
            "container_runtime {runtime:?} is not one of {CONTAINER_RUNTIMES:?}"
        );
        ensure!(
            identity.container_id.is_some(),
            "container_runtime {runtime:?} without a container_id"
        );
    }
    if let Some(uid) = identity.pod_uid {
        ensure!(
            is_pod_uid(uid),
            "pod_uid {uid:?} is neither a lowercase UUID with dashes nor a static pod's 32-hex hash"
        );
    }
    if let Some(qos) = identity.qos_class {
        ensure!(
            QOS_CLASSES.contains(&qos),
            "qos_class {qos:?} is not one of {QOS_CLASSES:?}"
        );
    }
    // kubelet puts every pod under its QoS class's cgroup, so one comes with the other.
    ensure!(
        identity.pod_uid.is_some() == identity.qos_class.is_some(),
        "pod_uid {:?} with qos_class {:?}: a pod has a QoS class and only a pod has one",
        identity.pod_uid,
        identity.qos_class
    );
    if let Some(path) = identity.cgroup_path {
        ensure!(
            path.starts_with('/'),
            "cgroup_path {path:?} is not relative to the cgroup v2 mount (no leading '/')"
        );
    }
    Ok(())
}

fn check_quantities(memory_gb_seconds: f64, cpu_core_seconds: f64) -> Result<()> {
    ensure!(
        memory_gb_seconds.is_finite() && memory_gb_seconds >= 0.0,
        "memory_gb_seconds {memory_gb_seconds} is not a finite, non-negative number"
    );
    ensure!(
        cpu_core_seconds.is_finite() && cpu_core_seconds >= 0.0,
        "cpu_core_seconds {cpu_core_seconds} is not a finite, non-negative number"
    );
    Ok(())
}

/// Exactly 64 lowercase hex digits.
pub fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A lowercase 8-4-4-4-12 UUID, or a static pod's UID: kubelet's 32-hex config hash,
/// which it uses verbatim as the pod's UID and cgroup name.
pub fn is_pod_uid(uid: &str) -> bool {
    let hex = |b: u8| matches!(b, b'0'..=b'9' | b'a'..=b'f');
    let bytes = uid.as_bytes();
    let uuid = bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => hex(b),
        });
    uuid || (bytes.len() == 32 && bytes.iter().all(|&b| hex(b)))
}

/// For fields that may be absent but never `null`: with `#[serde(default)]`, absence
/// is `None`, and a present value must be a number.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    u64::deserialize(deserializer).map(Some)
}

fn set_once<T>(slot: &mut Option<T>, value: T, what: &str, line: usize) -> Result<()> {
    ensure!(slot.is_none(), "line {line}: a second {what} record");
    *slot = Some(value);
    Ok(())
}

fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<OffsetDateTime, D::Error> {
    let text = String::deserialize(deserializer)?;
    OffsetDateTime::parse(&text, &Rfc3339)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
}

/// A line short enough for an error message.
fn clip(line: &str) -> String {
    const MAX: usize = 400;
    match line.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESS: &str = r#"{"record_type":"process","workload_kind":"process","record_id":"a1","node":"n","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-01T00:00:01.5Z","pid":42,"process_start_time":"2026-01-01T00:00:00.25Z","ppid":1,"comm":"sh","exe":null,"cgroup_id":7,"cgroup_path":"/x","container_id":null,"container_runtime":null,"pod_uid":null,"qos_class":null,"k8s_namespace":null,"k8s_pod_name":null,"wasm_runtime":null,"wasm_module":null,"cpu_ns":1000,"cpu_core_seconds":0.000001,"syscalls":3,"syscalls_by_class":{"process":2,"file":1},"network_rx_bytes":5,"network_tx_bytes":6,"network_rx_calls":1,"network_tx_calls":1,"memory_gb_seconds":0.5,"peak_rss_bytes":4096,"disk_read_bytes":0,"disk_write_bytes":8192,"exited":true}"#;
    const BUCKETS: &str = r#"{"record_type":"idle","cpu_ns":10,"cpu_core_seconds":0.00000001,"syscalls":0,"network_rx_bytes":0,"network_tx_bytes":0}
{"record_type":"irq_steal","cpu_ns":0,"cpu_core_seconds":0.0,"syscalls":0,"network_rx_bytes":0,"network_tx_bytes":0}
{"record_type":"kernel","cpu_ns":20,"cpu_core_seconds":0.00000002,"syscalls":0,"network_rx_bytes":0,"network_tx_bytes":0}
{"record_type":"unattributed","cpu_ns":30,"cpu_core_seconds":0.00000003,"syscalls":4,"network_rx_bytes":1,"network_tx_bytes":0,"map_full_drops":0,"task_read_errors":0}"#;
    const SUMMARY: &str = r#"{"record_type":"summary","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-01T00:00:01.5Z","accounted_cpu_ns":1060,"attributed_cpu_ns":1060,"attributed_syscalls":7,"network_rx_bytes":6,"network_tx_bytes":6,"memory_gb_seconds":0.5,"disk_read_bytes":0,"disk_write_bytes":8192,"map_full_drops":0,"events_lost":0,"command_exit_code":null,"processes":1}"#;
    const C1: &str = "cd5162f0ebd4699504d9b6a0a135584c1222e9e291ad39d931b50fb4821d6cca";

    fn jsonl(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    /// PROCESS as a group record by container, with key `group`.
    fn group(group: &str) -> String {
        PROCESS
            .replace(
                r#""record_type":"process""#,
                r#""record_type":"group","group_by":"container","processes":1"#,
            )
            .replace(
                r#""container_id":null"#,
                &format!(r#""container_id":{group}"#),
            )
            .replace(r#""workload_kind":"process""#, r#""workload_kind":null"#)
            .replace(r#""pid":42,"#, &format!(r#""group":{group},"#))
    }

    #[test]
    fn parses_a_well_formed_recording() {
        let records = Records::parse(&jsonl(&[PROCESS, BUCKETS, SUMMARY])).expect("parse");
        assert_eq!(records.processes.len(), 1);
        assert_eq!(records.cpu_ns_of(42), 1000);
        assert_eq!(records.attributed_cpu_ns(), 1060);
        assert_eq!(records.processes[0].syscalls_in_classes(), 3);
        assert_eq!(records.processes[0].syscalls_of_class("process"), 2);
        assert_eq!(records.summary.command_exit_code, None);
        assert_eq!(records.processes[0].storage_bytes, None);
        assert_eq!(records.conservation_errors(), Vec::<String>::new());
    }

    #[test]
    fn reports_each_metric_that_is_not_conserved() {
        let off = SUMMARY
            .replace(r#""network_rx_bytes":6"#, r#""network_rx_bytes":9"#)
            .replace(
                r#""memory_gb_seconds":0.5"#,
                r#""memory_gb_seconds":0.5000001"#,
            );
        let records = Records::parse(&jsonl(&[PROCESS, BUCKETS, &off])).expect("parse");
        let errors = records.conservation_errors();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors[0].contains("network_rx_bytes: 6 printed, 9"),
            "{errors:?}"
        );
        assert!(errors[1].contains("memory_gb_seconds"), "{errors:?}");
    }

    #[test]
    fn rejects_a_missing_nullable_key() {
        let without_ppid = PROCESS.replace(r#""ppid":1,"#, "");
        let err = Records::parse(&jsonl(&[&without_ppid, BUCKETS, SUMMARY]))
            .expect_err("a record without ppid must be rejected");
        assert!(format!("{err:#}").contains("ppid"), "{err:#}");
        let without_pod = PROCESS.replace(r#""pod_uid":null,"#, "");
        assert!(Records::parse(&jsonl(&[&without_pod, BUCKETS, SUMMARY])).is_err());
        let without_disk = SUMMARY.replace(r#""disk_read_bytes":0,"#, "");
        assert!(Records::parse(&jsonl(&[PROCESS, BUCKETS, &without_disk])).is_err());
    }

    #[test]
    fn storage_bytes_may_be_absent_but_not_null() {
        let known = PROCESS.replace(r#""exited":true"#, r#""storage_bytes":10,"exited":true"#);
        let records = Records::parse(&jsonl(&[&known, BUCKETS, SUMMARY])).expect("parse");
        assert_eq!(records.processes[0].storage_bytes, Some(10));
        let null = PROCESS.replace(r#""exited":true"#, r#""storage_bytes":null,"exited":true"#);
        assert!(Records::parse(&jsonl(&[&null, BUCKETS, SUMMARY])).is_err());
    }

    #[test]
    fn checks_identity_values() {
        let container = PROCESS
            .replace(
                r#""workload_kind":"process""#,
                r#""workload_kind":"container""#,
            )
            .replace(
                r#""container_id":null"#,
                &format!(r#""container_id":"{C1}""#),
            )
            .replace(
                r#""container_runtime":null"#,
                r#""container_runtime":"cri-o""#,
            );
        Records::parse(&jsonl(&[&container, BUCKETS, SUMMARY])).expect("a container record");
        for (what, from, to) in [
            ("short id", C1, &C1[1..]),
            ("upper-case id", C1, &C1.to_uppercase()),
            ("unknown runtime", "cri-o", "lxc"),
            (
                "unknown kind",
                r#""workload_kind":"container""#,
                r#""workload_kind":"vm""#,
            ),
            (
                "a container as process",
                r#""workload_kind":"container""#,
                r#""workload_kind":"process""#,
            ),
            (
                "a pod without a QoS class",
                r#""pod_uid":null"#,
                r#""pod_uid":"841f8573-0ac9-47da-ae34-2f44cdf587fb""#,
            ),
        ] {
            let bad = container.replace(from, to);
            assert!(
                Records::parse(&jsonl(&[&bad, BUCKETS, SUMMARY])).is_err(),
                "{what} accepted: {bad}"
            );
        }
        assert!(is_pod_uid("841f8573-0ac9-47da-ae34-2f44cdf587fb"));
        assert!(is_pod_uid("4ccdee77a78649fcf3808c6405ee62c8"));
        assert!(!is_pod_uid("841f8573_0ac9_47da_ae34_2f44cdf587fb"));
    }

    #[test]
    fn parses_groups_and_rejects_a_mix_or_a_repeated_key() {
        let c1 = group(&format!("\"{C1}\""));
        let none = group("null");
        let records = Records::parse(&jsonl(&[&c1, BUCKETS, SUMMARY])).expect("one group");
        assert_eq!(records.groups.len(), 1);
        assert!(records.group(Some(C1)).is_some());
        assert_eq!(records.conservation_errors(), Vec::<String>::new());
        let two = SUMMARY.replace(r#""processes":1"#, r#""processes":2"#);
        Records::parse(&jsonl(&[&c1, &none, BUCKETS, &two]))
            .expect("a container and the null group");
        assert!(Records::parse(&jsonl(&[&c1, &c1, BUCKETS, &two])).is_err());
        assert!(Records::parse(&jsonl(&[&c1, PROCESS, BUCKETS, &two])).is_err());
        // The key must be the shared container_id.
        let wrong = c1.replacen(C1, &C1.replace('c', "d"), 1);
        assert!(Records::parse(&jsonl(&[&wrong, BUCKETS, SUMMARY])).is_err());
    }

    #[test]
    fn rejects_a_summary_that_is_not_last() {
        assert!(Records::parse(&jsonl(&[SUMMARY, PROCESS, BUCKETS])).is_err());
    }

    #[test]
    fn rejects_a_wrong_process_count() {
        assert!(Records::parse(&jsonl(&[BUCKETS, SUMMARY])).is_err());
    }

    #[test]
    fn rejects_a_bad_timestamp_and_an_unknown_class() {
        let bad_time = PROCESS.replace("00:00:00.25Z", "yesterday");
        assert!(Records::parse(&jsonl(&[&bad_time, BUCKETS, SUMMARY])).is_err());
        let bad_class = PROCESS.replace(r#""file":1"#, r#""disk":1"#);
        assert!(Records::parse(&jsonl(&[&bad_class, BUCKETS, SUMMARY])).is_err());
    }
}
