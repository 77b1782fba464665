//! The usage record (DESIGN.md's data model) as far as it exists so far, and
//! its deterministic id.

use std::time::SystemTime;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::{
    collect::{
        gpu::Attribution,
        memory::gib_seconds,
        metered::{InstanceKey, Metered, SyscallsByClass, core_seconds},
    },
    identity::{
        run::RunContext,
        workload::{CgroupIdentity, QosClass, Runtime, WasmIdentity, WorkloadKind, workload_kind},
    },
    probes::clock::{rfc3339, unix_ns_of},
};

/// What a record's workload is, where known. Shared by process and group records.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Identity {
    /// process, container, pod or wasm (null on a group whose members differ).
    pub workload_kind: Option<WorkloadKind>,
    /// The container's id (64 hex), from the cgroup path.
    pub container_id: Option<String>,
    /// The container runtime, where the cgroup path's naming tells it.
    pub container_runtime: Option<Runtime>,
    /// The Kubernetes pod's UID.
    pub pod_uid: Option<String>,
    /// The pod's QoS class.
    pub qos_class: Option<QosClass>,
    /// The pod's namespace, when resolvable on the node.
    pub k8s_namespace: Option<String>,
    /// The pod's name, when resolvable on the node.
    pub k8s_pod_name: Option<String>,
    /// The WASM runtime (wasmtime, wasmedge, a runwasi shim, ...).
    pub wasm_runtime: Option<String>,
    /// The WASM module (or spin app) it runs.
    pub wasm_module: Option<String>,
}

impl Identity {
    /// The identity of a process in cgroup `cg`, running `wasm` if any.
    pub fn of(cg: &CgroupIdentity, wasm: Option<&WasmIdentity>) -> Self {
        Self {
            workload_kind: Some(workload_kind(cg, wasm)),
            container_id: cg.container_id.clone(),
            container_runtime: cg.container_runtime,
            pod_uid: cg.pod_uid.clone(),
            qos_class: cg.qos_class,
            k8s_namespace: None,
            k8s_pod_name: None,
            wasm_runtime: wasm.map(|w| w.runtime.clone()),
            wasm_module: wasm.and_then(|w| w.module.clone()),
        }
    }

    /// Keeps each field only where `other` agrees (a group's shared identity).
    pub fn intersect(&mut self, other: &Identity) {
        fn keep<T: PartialEq>(a: &mut Option<T>, b: &Option<T>) {
            if a != b {
                *a = None;
            }
        }
        keep(&mut self.workload_kind, &other.workload_kind);
        keep(&mut self.container_id, &other.container_id);
        keep(&mut self.container_runtime, &other.container_runtime);
        keep(&mut self.pod_uid, &other.pod_uid);
        keep(&mut self.qos_class, &other.qos_class);
        keep(&mut self.k8s_namespace, &other.k8s_namespace);
        keep(&mut self.k8s_pod_name, &other.k8s_pod_name);
        keep(&mut self.wasm_runtime, &other.wasm_runtime);
        keep(&mut self.wasm_module, &other.wasm_module);
    }
}

/// The metered quantities of a record, as they are serialised.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Metrics {
    /// Nanoseconds on CPU (exact, by the scheduler's clock).
    pub cpu_ns: u64,
    /// The same in core-seconds.
    pub cpu_core_seconds: f64,
    /// Syscalls entered.
    pub syscalls: u64,
    /// Syscalls by class.
    pub syscalls_by_class: SyscallsByClass,
    /// Socket payload bytes received (IPv4/IPv6, TCP and UDP).
    pub network_rx_bytes: u64,
    /// Socket payload bytes sent.
    pub network_tx_bytes: u64,
    /// Receive calls that moved data (the socket layer sees calls, not packets).
    pub network_rx_calls: u64,
    /// Send calls that moved data.
    pub network_tx_calls: u64,
    /// ∫ resident memory dt, in GiB-seconds.
    pub memory_gb_seconds: f64,
    /// Peak resident memory (VmHWM), bytes; on a group, the largest member's.
    pub peak_rss_bytes: u64,
    /// Bytes read from storage.
    pub disk_read_bytes: u64,
    /// Bytes written to storage (page-cache writeback included).
    pub disk_write_bytes: u64,
    /// GPU time (SM-busy), seconds.
    pub gpu_seconds: f64,
    /// ∫ GPU memory dt, GiB-seconds.
    pub gpu_memory_gb_seconds: f64,
    /// GPU energy, joules, where the device reports it.
    pub gpu_energy_joules: f64,
    /// `sampled` (per-process samples) or `estimated` (device utilization
    /// split by used memory); null without GPU use.
    pub gpu_attribution: Option<Attribution>,
}

impl From<&Metered> for Metrics {
    fn from(m: &Metered) -> Self {
        Self {
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
            gpu_seconds: core_seconds(m.gpu.gpu_ns),
            gpu_memory_gb_seconds: gib_seconds(m.gpu.memory_byte_ns),
            gpu_energy_joules: m.gpu.energy_mj as f64 / 1000.0,
            gpu_attribution: m.gpu.attribution,
        }
    }
}

/// One process instance's usage in one cgroup over one window.
#[derive(Clone, Debug, Serialize)]
pub struct ProcessRecord {
    /// Always "process".
    pub record_type: &'static str,
    /// hash(node, workload instance, window_start): the idempotency key.
    pub record_id: String,
    /// The node's name.
    pub node: String,
    /// Window start, RFC 3339 UTC.
    pub window_start: String,
    /// Window end, RFC 3339 UTC.
    pub window_end: String,
    /// What the workload is.
    #[serde(flatten)]
    pub identity: Identity,
    /// Process id.
    pub pid: u32,
    /// Process start, RFC 3339 UTC (clock-tick resolution, as the kernel keeps it for procfs).
    pub process_start_time: String,
    /// Parent process id, where known.
    pub ppid: Option<u32>,
    /// The kernel's short name for the process.
    pub comm: String,
    /// Executable path, where known.
    pub exe: Option<String>,
    /// cgroup v2 id.
    pub cgroup_id: u64,
    /// cgroup path under the v2 mount, where it still exists.
    pub cgroup_path: Option<String>,
    /// The AI-agent flow run this usage belongs to (agent_id, flow_id, run_id,
    /// user_id, project_id, customer_id, trace_id), where known.
    #[serde(flatten)]
    pub context: RunContext,
    /// What it used.
    #[serde(flatten)]
    pub metrics: Metrics,
    /// Whether the process had exited by the window's end.
    pub exited: bool,
    /// Instance key, for grouping (not serialised).
    #[serde(skip)]
    pub key: InstanceKey,
    /// Raw quantities, for grouping (not serialised).
    #[serde(skip)]
    pub metered: Metered,
}

/// Usage summed over the process records that share a grouping key.
#[derive(Clone, Debug, Serialize)]
pub struct GroupRecord {
    /// Always "group".
    pub record_type: &'static str,
    /// hash(node, group_by, group, window_start).
    pub record_id: String,
    /// The node's name.
    pub node: String,
    /// Window start, RFC 3339 UTC.
    pub window_start: String,
    /// Window end, RFC 3339 UTC.
    pub window_end: String,
    /// What the records were grouped by (comma-joined keys).
    pub group_by: String,
    /// The group's key; null for the members that lack one (e.g. not in any container).
    pub group: Option<String>,
    /// Process instances in the group.
    pub processes: usize,
    /// Identity the members share (null where they differ).
    #[serde(flatten)]
    pub identity: Identity,
    /// cgroup id, where all members share it.
    pub cgroup_id: Option<u64>,
    /// cgroup path, where all members share it.
    pub cgroup_path: Option<String>,
    /// What the group used.
    #[serde(flatten)]
    pub metrics: Metrics,
    /// ∫ memory dt of the members' cgroups by the cgroups' own counters
    /// (page cache and kernel memory included, each cgroup counted once),
    /// in GiB-seconds; null where no member's cgroup has a memory counter.
    pub cgroup_memory_gb_seconds: Option<f64>,
    /// Bytes the members' containers hold on their writable layers (overlay
    /// upper dirs), last measured; absent where none was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage_bytes: Option<u64>,
}

/// Node usage with no process: idle, kernel threads, or unattributed.
#[derive(Clone, Debug, Serialize)]
pub struct BucketRecord {
    /// "idle", "irq_steal" (time no task ran: interrupts, hypervisor steal), "kernel" or "unattributed".
    pub record_type: &'static str,
    /// hash(node, bucket, window_start).
    pub record_id: String,
    /// The node's name.
    pub node: String,
    /// Window start, RFC 3339 UTC.
    pub window_start: String,
    /// Window end, RFC 3339 UTC.
    pub window_end: String,
    /// Nanoseconds on CPU (exact).
    pub cpu_ns: u64,
    /// The same in core-seconds.
    pub cpu_core_seconds: f64,
    /// Syscalls with no process entry.
    pub syscalls: u64,
    /// Socket payload bytes received with no process entry.
    pub network_rx_bytes: u64,
    /// Socket payload bytes sent with no process entry.
    pub network_tx_bytes: u64,
    /// Unattributed only: folds that found the process map full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub map_full_drops: Option<u64>,
    /// Unattributed only: folds whose task could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_read_errors: Option<u64>,
}

/// A window's (or a whole `record` run's) node-level figures.
#[derive(Clone, Debug, Serialize)]
pub struct SummaryRecord {
    /// Always "summary".
    pub record_type: &'static str,
    /// The node's name.
    pub node: String,
    /// Window start, RFC 3339 UTC.
    pub window_start: String,
    /// Window end, RFC 3339 UTC.
    pub window_end: String,
    /// All CPU time the kernel side charged in the window, wherever it went.
    pub accounted_cpu_ns: u64,
    /// Σ cpu_ns of every process on the node plus the three buckets; equals
    /// `accounted_cpu_ns` when nothing is lost or counted twice.
    pub attributed_cpu_ns: u64,
    /// Σ syscalls of every process on the node plus the buckets.
    pub attributed_syscalls: u64,
    /// Σ socket bytes received, every process plus the buckets.
    pub network_rx_bytes: u64,
    /// Σ socket bytes sent, every process plus the buckets.
    pub network_tx_bytes: u64,
    /// Σ memory GiB-seconds of every process.
    pub memory_gb_seconds: f64,
    /// Σ storage bytes read by every process.
    pub disk_read_bytes: u64,
    /// Σ storage bytes written by every process.
    pub disk_write_bytes: u64,
    /// Folds that found the process map full.
    pub map_full_drops: u64,
    /// Folds whose task could not be read.
    pub task_read_errors: u64,
    /// Lifecycle events lost (names may be missing; usage is not).
    pub events_lost: u64,
    /// Windows closed before every CPU acknowledged (late usage moved to the next one).
    pub late_windows: u64,
    /// Process records printed.
    pub processes: usize,
    /// Process records on the node in the window, printed or not.
    pub processes_on_node: usize,
    /// The metered command's exit code (`record -- CMD` only).
    pub command_exit_code: Option<i32>,
}

/// The cost of one record: the spec's CostCalculator breakdown, exact.
///
/// Every component is unrounded `Decimal`; rounding happens only where money
/// is shown. `pricing_version` names the price book that produced it, so a
/// record can be re-priced later from its raw quantities.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cost {
    /// CPU: core-seconds × cpu_per_core_hour / 3600.
    pub cpu: Decimal,
    /// Memory: GB-seconds × memory_per_gb_hour / 3600.
    pub memory: Decimal,
    /// GPU: GPU-seconds × gpu_per_hour / 3600.
    pub gpu: Decimal,
    /// Network: bytes × network_per_gb / 1024³ (per direction where the book splits it).
    pub network: Decimal,
    /// Storage: byte-seconds × storage_per_gb_month / (1024³ · 30 · 24 · 3600).
    pub storage: Decimal,
    /// LLM tokens, per model.
    pub token: Decimal,
    /// Sum of the above.
    pub subtotal: Decimal,
    /// Volume discount (subtracted).
    pub discount: Decimal,
    /// subtotal − discount.
    pub total: Decimal,
    /// ISO 4217 currency code (empty in a sum: the sum's currency is kept beside it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub currency: String,
    /// The price book's version (empty in a sum, which may span versions).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pricing_version: String,
}

/// Token usage of one model within a record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    /// The model (as `gen_ai.response.model` or `gen_ai.request.model` named it).
    pub model: String,
    /// Input tokens, cached ones included.
    pub input: u64,
    /// The part of `input` read from the provider's prompt cache.
    pub cache_read_input: u64,
    /// Output tokens, reasoning ones included.
    pub output: u64,
    /// The part of `output` spent on reasoning.
    pub reasoning_output: u64,
    /// The part of `input` written to the provider's prompt cache
    /// (`gen_ai.usage.cache_creation.input_tokens`); absent means 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub cache_creation_input: u64,
    /// The part of `input` that was text (`gen_ai.usage.text.input_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub text_input: u64,
    /// The part of `input` that was images (`gen_ai.usage.image.input_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub image_input: u64,
    /// The part of `input` that was audio (`gen_ai.usage.audio.input_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audio_input: u64,
    /// The part of `input` that was video (`gen_ai.usage.video.input_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub video_input: u64,
    /// The part of `output` that was text (`gen_ai.usage.text.output_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub text_output: u64,
    /// The part of `output` that was audio (`gen_ai.usage.audio.output_tokens`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub audio_output: u64,
    /// Set by pricing when the book in force (the cost's `pricing_version`)
    /// had no price for `model`, so these tokens were priced at 0.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unpriced: bool,
    /// What these tokens cost (the record's `cost.token` is the sum over its
    /// usages), set by pricing; absent on records priced before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Decimal>,
}

/// For `skip_serializing_if`: token types a usage did not report stay out of
/// the stored JSON (and read back as 0).
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The workload a stored record names, as text: the part of [`Identity`]
/// the ledger keeps (a pod's QoS class and the WASM runtime are not stored),
/// embedded flat in [`UsageRecord`], so the record's JSON keys are these.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// Container id.
    pub container_id: Option<String>,
    /// Container runtime.
    pub container_runtime: Option<String>,
    /// Pod UID.
    pub pod_uid: Option<String>,
    /// Pod namespace.
    pub k8s_namespace: Option<String>,
    /// Pod name.
    pub k8s_pod_name: Option<String>,
    /// WASM module.
    pub wasm_module: Option<String>,
}

impl From<&Identity> for Workload {
    fn from(i: &Identity) -> Self {
        Self {
            container_id: i.container_id.clone(),
            container_runtime: i.container_runtime.map(|r| serde_name(&r)),
            pod_uid: i.pod_uid.clone(),
            k8s_namespace: i.k8s_namespace.clone(),
            k8s_pod_name: i.k8s_pod_name.clone(),
            wasm_module: i.wasm_module.clone(),
        }
    }
}

/// One usage record as the ledger stores it and exporters ship it: DESIGN.md's
/// usage record, raw quantities plus cost. Process records and the node
/// buckets (`record_kind` idle, irq_steal, kernel, unattributed) both become one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// hash(node, workload instance, window_start): the idempotency key.
    pub record_id: String,
    /// The node.
    pub node: String,
    /// RFC 3339 UTC.
    pub window_start: String,
    /// RFC 3339 UTC.
    pub window_end: String,
    /// "process", or the bucket: "idle", "irq_steal", "kernel", "unattributed".
    pub record_kind: String,
    /// process, container, pod or wasm (process records). Beside, not in,
    /// [`Workload`]: the record's JSON has it here, before `pid`.
    pub workload_kind: Option<String>,
    /// Process id.
    pub pid: Option<u32>,
    /// Process start, RFC 3339 UTC.
    pub process_start_time: Option<String>,
    /// Parent process id.
    pub ppid: Option<u32>,
    /// Short process name.
    pub comm: Option<String>,
    /// Executable path.
    pub exe: Option<String>,
    /// cgroup v2 id.
    pub cgroup_id: Option<u64>,
    /// cgroup path.
    pub cgroup_path: Option<String>,
    /// The container, pod and WASM module, as flat fields of the record.
    #[serde(flatten)]
    pub workload: Workload,
    /// The trace context: agent, flow, run, user, project, customer (who is
    /// billed) and trace ids, as flat fields of the record.
    #[serde(flatten)]
    pub context: RunContext,
    /// CPU, core-seconds (exact: ns / 10⁹).
    pub cpu_core_seconds: Decimal,
    /// Resident memory over time, GiB-seconds.
    pub memory_gb_seconds: Decimal,
    /// GPU time, seconds.
    pub gpu_seconds: Decimal,
    /// GPU memory over time, GiB-seconds.
    pub gpu_memory_gb_seconds: Decimal,
    /// GPU energy, joules (exact: mJ / 10³), where the device reports it.
    #[serde(default)]
    pub gpu_energy_joules: Decimal,
    /// How `gpu_seconds` was obtained: "sampled" or "estimated" (see the
    /// `gpu` module); absent without GPU use.
    #[serde(default)]
    pub gpu_attribution: Option<String>,
    /// Socket payload bytes received.
    pub network_rx_bytes: u64,
    /// Socket payload bytes sent.
    pub network_tx_bytes: u64,
    /// Storage bytes read.
    pub disk_read_bytes: u64,
    /// Storage bytes written.
    pub disk_write_bytes: u64,
    /// Bytes held on storage (absent where unknown).
    pub storage_bytes: Option<u64>,
    /// Syscalls.
    pub syscalls: u64,
    /// LLM token usage per model.
    pub tokens: Vec<TokenUsage>,
    /// The priced cost (absent until priced).
    pub cost: Option<Cost>,
}

/// Exact joules of `energy_mj`.
pub fn decimal_joules(energy_mj: u64) -> Decimal {
    Decimal::from(energy_mj) / Decimal::from(1000u64)
}

/// Exact core-seconds of `cpu_ns`.
pub fn decimal_seconds(ns: u64) -> Decimal {
    Decimal::from(ns) / Decimal::from(1_000_000_000u64)
}

/// Exact GiB-seconds of a byte-nanosecond integral (28 significant digits).
pub fn decimal_gib_seconds(byte_ns: u128) -> Decimal {
    // 1 GiB·s = 1024³ bytes × 10⁹ ns; dividing in two steps keeps the
    // intermediate within Decimal's 96-bit mantissa for any realistic integral.
    let byte_ns = Decimal::from_i128_with_scale(i128::try_from(byte_ns).unwrap_or(i128::MAX), 0);
    // Rounded to a fixed 18 places (10⁻¹⁸ GiB·s, far below a byte for a
    // nanosecond) so that records sum exactly in any order: a quotient with
    // 28 significant digits would round differently in every sum.
    (byte_ns / Decimal::from(1_000_000_000u64) / Decimal::from(1u64 << 30)).round_dp(18)
}

impl UsageRecord {
    /// Who is billed for this record, for discount tiers and month-to-date
    /// spend: its customer, else its user, else nobody. An empty id is no id
    /// (the one rule: pricing, the ledger's spend and the billing export all
    /// use it).
    pub fn billed_party(&self) -> Option<&str> {
        fn named(v: &Option<String>) -> Option<&str> {
            v.as_deref().filter(|s| !s.is_empty())
        }
        named(&self.context.customer_id).or_else(|| named(&self.context.user_id))
    }

    /// The stored form of a process record.
    pub fn from_process(p: &ProcessRecord) -> Self {
        Self {
            record_id: p.record_id.clone(),
            node: p.node.clone(),
            window_start: p.window_start.clone(),
            window_end: p.window_end.clone(),
            record_kind: "process".into(),
            workload_kind: p.identity.workload_kind.map(|k| serde_name(&k)),
            pid: Some(p.pid),
            process_start_time: Some(p.process_start_time.clone()),
            ppid: p.ppid,
            comm: Some(p.comm.clone()),
            exe: p.exe.clone(),
            cgroup_id: Some(p.cgroup_id),
            cgroup_path: p.cgroup_path.clone(),
            workload: Workload::from(&p.identity),
            context: p.context.clone(),
            cpu_core_seconds: decimal_seconds(p.metered.cpu_ns),
            memory_gb_seconds: decimal_gib_seconds(p.metered.mem.rss_byte_ns),
            gpu_seconds: decimal_seconds(p.metered.gpu.gpu_ns),
            gpu_memory_gb_seconds: decimal_gib_seconds(p.metered.gpu.memory_byte_ns),
            gpu_energy_joules: decimal_joules(p.metered.gpu.energy_mj),
            gpu_attribution: p.metered.gpu.attribution.map(|a| serde_name(&a)),
            network_rx_bytes: p.metered.net.rx_bytes,
            network_tx_bytes: p.metered.net.tx_bytes,
            disk_read_bytes: p.metered.mem.disk_read_bytes,
            disk_write_bytes: p.metered.mem.disk_write_bytes,
            syscalls: p.metered.syscalls,
            ..Self::default()
        }
    }

    /// The stored form of a node bucket record.
    pub fn from_bucket(b: &BucketRecord) -> Self {
        Self {
            record_id: b.record_id.clone(),
            node: b.node.clone(),
            window_start: b.window_start.clone(),
            window_end: b.window_end.clone(),
            record_kind: b.record_type.to_string(),
            cpu_core_seconds: decimal_seconds(b.cpu_ns),
            network_rx_bytes: b.network_rx_bytes,
            network_tx_bytes: b.network_tx_bytes,
            syscalls: b.syscalls,
            ..Self::default()
        }
    }
}

/// What process `pid` used during `[start, end]` (Unix ns), by its records:
/// each record's cost and CPU prorated by how much of its window overlaps.
/// Returns (cost, CPU core-seconds).
pub fn usage_during(records: &[UsageRecord], pid: u32, start: i64, end: i64) -> (Decimal, Decimal) {
    let mut cost = Decimal::ZERO;
    let mut cpu = Decimal::ZERO;
    for r in records.iter().filter(|r| r.pid == Some(pid)) {
        let (Some(ws), Some(we)) = (unix_ns_of(&r.window_start), unix_ns_of(&r.window_end)) else {
            continue;
        };
        let overlap = end.min(we) - start.max(ws);
        if overlap <= 0 {
            continue;
        }
        let share = Decimal::from(overlap) / Decimal::from((we - ws).max(1));
        if let Some(c) = &r.cost {
            cost += c.total * share;
        }
        cpu += r.cpu_core_seconds * share;
    }
    (cost, cpu)
}

/// The serde name of a unit enum variant ("container", "cri-o", ...).
pub fn serde_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| j.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// 128-bit FNV-1a: stable across versions and platforms, which a record id
/// must be (it is the idempotency key downstream).
pub fn stable_id(parts: &[&[u8]]) -> String {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    let mut h = OFFSET;
    for part in parts {
        for &b in *part {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
        // A separator, so ("ab","c") and ("a","bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(PRIME);
    }
    format!("{h:032x}")
}

/// The id of a process record.
pub fn process_record_id(node: &str, key: &InstanceKey, window_start: SystemTime) -> String {
    stable_id(&[
        node.as_bytes(),
        b"process",
        &key.tgid.to_le_bytes(),
        &key.start_ns.to_le_bytes(),
        &key.cgroup_id.to_le_bytes(),
        rfc3339(window_start).as_bytes(),
    ])
}

/// The id of a bucket record.
pub fn bucket_record_id(node: &str, bucket: &str, window_start: SystemTime) -> String {
    stable_id(&[
        node.as_bytes(),
        bucket.as_bytes(),
        rfc3339(window_start).as_bytes(),
    ])
}

/// The id of a group record.
pub fn group_record_id(
    node: &str,
    group_by: &str,
    group: Option<&str>,
    window_start: SystemTime,
) -> String {
    stable_id(&[
        node.as_bytes(),
        b"group",
        group_by.as_bytes(),
        group.map_or(b"\0null".as_slice(), str::as_bytes),
        rfc3339(window_start).as_bytes(),
    ])
}

/// A span of a run, as the ledger stores it for per-run views.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SpanRow {
    /// 32 hex.
    pub trace_id: String,
    /// 16 hex.
    pub span_id: String,
    /// 16 hex, if any.
    pub parent_span_id: Option<String>,
    /// The run the span belongs to.
    pub run_id: String,
    /// `agent.id`, if any.
    pub agent_id: Option<String>,
    /// The span's name.
    pub name: String,
    /// Start, Unix ns.
    pub start_ns: i64,
    /// End, Unix ns.
    pub end_ns: i64,
    /// The emitting process.
    pub pid: Option<u32>,
    /// `service.name`.
    pub service: Option<String>,
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        str::FromStr,
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("decimal")
    }

    /// A record with every field set, to odd values (shared with the ledger's
    /// round-trip tests).
    pub(crate) fn full_record() -> UsageRecord {
        UsageRecord {
            record_id: "0123456789abcdef0123456789abcdef".into(),
            node: "node-a".into(),
            window_start: "2026-01-01T00:00:00.5Z".into(),
            window_end: "2026-01-01T00:00:01.500000001Z".into(),
            record_kind: "process".into(),
            workload_kind: Some("wasm".into()),
            pid: Some(u32::MAX),
            process_start_time: Some("2025-12-31T23:59:59.99Z".into()),
            ppid: Some(1),
            comm: Some("python3".into()),
            exe: Some("/usr/bin/python3 ünïcode".into()),
            cgroup_id: Some(u64::MAX - 1),
            cgroup_path: Some("/kubepods.slice/pod-x.slice/cri-containerd-abc.scope".into()),
            workload: Workload {
                container_id: Some("c".repeat(64)),
                container_runtime: Some("containerd".into()),
                pod_uid: Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427".into()),
                k8s_namespace: Some("team-a".into()),
                k8s_pod_name: Some("agent-0".into()),
                wasm_module: Some("spin-app".into()),
            },
            context: RunContext {
                agent_id: Some("agent-1".into()),
                flow_id: Some("flow-1".into()),
                run_id: Some("run-1".into()),
                user_id: Some("user-1".into()),
                project_id: Some("project-1".into()),
                customer_id: Some("customer-1".into()),
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            },
            cpu_core_seconds: d("1.500000001"),
            memory_gb_seconds: d("0.4656612873077392578125000000"),
            gpu_seconds: d("0.000"),
            gpu_memory_gb_seconds: d("12.5"),
            gpu_energy_joules: d("31.415"),
            gpu_attribution: Some("estimated".into()),
            network_rx_bytes: i64::MAX as u64,
            network_tx_bytes: 2,
            disk_read_bytes: 3,
            disk_write_bytes: 4,
            storage_bytes: Some(5),
            syscalls: 6,
            tokens: vec![
                TokenUsage {
                    model: "gpt-4o".into(),
                    input: 1000,
                    cache_read_input: 400,
                    output: 300,
                    reasoning_output: 100,
                    ..TokenUsage::default()
                },
                TokenUsage {
                    model: "claude-sonnet-4".into(),
                    input: 7,
                    cache_read_input: 0,
                    output: 9,
                    reasoning_output: 0,
                    ..TokenUsage::default()
                },
            ],
            cost: Some(Cost {
                cpu: d("0.0000277777777777777777777778"),
                memory: d("0.0000000006853852"),
                gpu: Decimal::ZERO,
                network: d("0.10"),
                storage: d("0.0000000000385802469135802469"),
                token: d("0.0075"),
                subtotal: d("0.1075277784631630"),
                discount: d("-0.01"),
                total: d("0.1175277784631630"),
                currency: "EUR".into(),
                pricing_version: "2026-01-b".into(),
            }),
        }
    }

    #[test]
    fn record_ids_are_deterministic_and_distinct() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let k = InstanceKey {
            tgid: 1,
            start_ns: 2,
            cgroup_id: 3,
        };
        let a = process_record_id("n1", &k, t);
        assert_eq!(a, process_record_id("n1", &k, t));
        assert_eq!(a.len(), 32);
        assert_ne!(a, process_record_id("n2", &k, t));
        assert_ne!(
            a,
            process_record_id("n1", &InstanceKey { start_ns: 9, ..k }, t)
        );
        assert_ne!(a, process_record_id("n1", &k, t + Duration::from_secs(1)));
        assert_ne!(stable_id(&[b"ab", b"c"]), stable_id(&[b"a", b"bc"]));
    }

    #[test]
    fn decimal_quantities_are_exact() {
        assert_eq!(decimal_seconds(1_500_000_001).to_string(), "1.500000001");
        let one_gib_hour = u128::from(1u64 << 30) * 3_600 * 1_000_000_000;
        assert_eq!(decimal_gib_seconds(one_gib_hour), Decimal::from(3600));
        let half = u128::from(1u64 << 29) * 1_000_000_000;
        assert_eq!(decimal_gib_seconds(half), Decimal::new(5, 1));
    }

    #[test]
    fn the_run_context_stays_flat_in_the_record_json() {
        let r = UsageRecord {
            record_id: "r".into(),
            context: RunContext {
                run_id: Some("run-1".into()),
                customer_id: Some("acme".into()),
                ..RunContext::default()
            },
            ..UsageRecord::default()
        };
        let json = serde_json::to_value(&r).expect("serialises");
        assert_eq!(json["run_id"], "run-1");
        assert_eq!(json["customer_id"], "acme");
        assert!(
            json["agent_id"].is_null() && json.get("context").is_none(),
            "{json}"
        );
        let back: UsageRecord = serde_json::from_value(json).expect("deserialises");
        assert_eq!(back, r);
    }

    /// A process record with every field set (a container in a pod, running WASM).
    fn full_process() -> ProcessRecord {
        let metered = Metered {
            cpu_ns: 1_500_000_001,
            syscalls: 7,
            syscalls_by_class: SyscallsByClass([1; agent_common::SYSCALL_CLASSES]),
            net: crate::collect::metered::Net {
                tx_bytes: 1,
                rx_bytes: 2,
                tx_calls: 3,
                rx_calls: 4,
            },
            mem: crate::collect::memory::MemDisk {
                rss_byte_ns: u128::from(1u64 << 29) * 1_000_000_000,
                peak_rss_bytes: 4096,
                disk_read_bytes: 5,
                disk_write_bytes: 6,
            },
            gpu: crate::collect::metered::GpuMetered {
                gpu_ns: 250_000_000,
                memory_byte_ns: u128::from(1u64 << 30) * 2_000_000_000,
                energy_mj: 31_415,
                attribution: Some(Attribution::Sampled),
            },
        };
        ProcessRecord {
            record_type: "process",
            record_id: "0123456789abcdef0123456789abcdef".into(),
            node: "node-a".into(),
            window_start: "2026-01-01T00:00:00Z".into(),
            window_end: "2026-01-01T00:00:01Z".into(),
            identity: Identity {
                workload_kind: Some(WorkloadKind::Wasm),
                container_id: Some("c".repeat(64)),
                container_runtime: Some(Runtime::CriO),
                pod_uid: Some("1b4e28ba-2fa1-11d2-883f-0016d3cca427".into()),
                qos_class: Some(QosClass::Burstable),
                k8s_namespace: Some("team-a".into()),
                k8s_pod_name: Some("agent-0".into()),
                wasm_runtime: Some("wasmtime".into()),
                wasm_module: Some("spin-app".into()),
            },
            pid: 42,
            process_start_time: "2025-12-31T23:59:59.99Z".into(),
            ppid: Some(1),
            comm: "python3".into(),
            exe: Some("/usr/bin/python3".into()),
            cgroup_id: 7,
            cgroup_path: Some("/kubepods.slice/pod-x.slice/cri-o-abc.scope".into()),
            context: RunContext {
                agent_id: Some("agent-1".into()),
                flow_id: Some("flow-1".into()),
                run_id: Some("run-1".into()),
                user_id: Some("user-1".into()),
                project_id: Some("project-1".into()),
                customer_id: Some("customer-1".into()),
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            },
            metrics: Metrics::from(&metered),
            exited: true,
            key: InstanceKey {
                tgid: 42,
                start_ns: 2,
                cgroup_id: 7,
            },
            metered,
        }
    }

    /// The stored record's JSON as it was before its identity fields moved
    /// into [`Workload`]: the format of `/v1/records`, the ledger's
    /// exports and the CLI, which must not change by a byte.
    const FULL_RECORD_JSON: &str = r#"{"record_id":"0123456789abcdef0123456789abcdef","node":"node-a","window_start":"2026-01-01T00:00:00.5Z","window_end":"2026-01-01T00:00:01.500000001Z","record_kind":"process","workload_kind":"wasm","pid":4294967295,"process_start_time":"2025-12-31T23:59:59.99Z","ppid":1,"comm":"python3","exe":"/usr/bin/python3 ünïcode","cgroup_id":18446744073709551614,"cgroup_path":"/kubepods.slice/pod-x.slice/cri-containerd-abc.scope","container_id":"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","container_runtime":"containerd","pod_uid":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","k8s_namespace":"team-a","k8s_pod_name":"agent-0","wasm_module":"spin-app","agent_id":"agent-1","flow_id":"flow-1","run_id":"run-1","user_id":"user-1","project_id":"project-1","customer_id":"customer-1","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","cpu_core_seconds":"1.500000001","memory_gb_seconds":"0.4656612873077392578125000000","gpu_seconds":"0.000","gpu_memory_gb_seconds":"12.5","gpu_energy_joules":"31.415","gpu_attribution":"estimated","network_rx_bytes":9223372036854775807,"network_tx_bytes":2,"disk_read_bytes":3,"disk_write_bytes":4,"storage_bytes":5,"syscalls":6,"tokens":[{"model":"gpt-4o","input":1000,"cache_read_input":400,"output":300,"reasoning_output":100},{"model":"claude-sonnet-4","input":7,"cache_read_input":0,"output":9,"reasoning_output":0}],"cost":{"cpu":"0.0000277777777777777777777778","memory":"0.0000000006853852","gpu":"0","network":"0.10","storage":"0.0000000000385802469135802469","token":"0.0075","subtotal":"0.1075277784631630","discount":"-0.01","total":"0.1175277784631630","currency":"EUR","pricing_version":"2026-01-b"}}"#;

    /// `from_process` of [`full_process`], as it serialised before.
    const STORED_PROCESS_JSON: &str = r#"{"record_id":"0123456789abcdef0123456789abcdef","node":"node-a","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-01T00:00:01Z","record_kind":"process","workload_kind":"wasm","pid":42,"process_start_time":"2025-12-31T23:59:59.99Z","ppid":1,"comm":"python3","exe":"/usr/bin/python3","cgroup_id":7,"cgroup_path":"/kubepods.slice/pod-x.slice/cri-o-abc.scope","container_id":"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","container_runtime":"cri-o","pod_uid":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","k8s_namespace":"team-a","k8s_pod_name":"agent-0","wasm_module":"spin-app","agent_id":"agent-1","flow_id":"flow-1","run_id":"run-1","user_id":"user-1","project_id":"project-1","customer_id":"customer-1","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","cpu_core_seconds":"1.500000001","memory_gb_seconds":"0.50","gpu_seconds":"0.25","gpu_memory_gb_seconds":"2","gpu_energy_joules":"31.415","gpu_attribution":"sampled","network_rx_bytes":2,"network_tx_bytes":1,"disk_read_bytes":5,"disk_write_bytes":6,"storage_bytes":null,"syscalls":7,"tokens":[],"cost":null}"#;

    /// The process record's own JSON (`record` prints it).
    const PROCESS_JSON: &str = r#"{"record_type":"process","record_id":"0123456789abcdef0123456789abcdef","node":"node-a","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-01T00:00:01Z","workload_kind":"wasm","container_id":"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","container_runtime":"cri-o","pod_uid":"1b4e28ba-2fa1-11d2-883f-0016d3cca427","qos_class":"burstable","k8s_namespace":"team-a","k8s_pod_name":"agent-0","wasm_runtime":"wasmtime","wasm_module":"spin-app","pid":42,"process_start_time":"2025-12-31T23:59:59.99Z","ppid":1,"comm":"python3","exe":"/usr/bin/python3","cgroup_id":7,"cgroup_path":"/kubepods.slice/pod-x.slice/cri-o-abc.scope","agent_id":"agent-1","flow_id":"flow-1","run_id":"run-1","user_id":"user-1","project_id":"project-1","customer_id":"customer-1","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","cpu_ns":1500000001,"cpu_core_seconds":1.500000001,"syscalls":7,"syscalls_by_class":{"other":1,"file":1,"network":1,"memory":1,"process":1,"sync":1,"time":1,"ipc":1},"network_rx_bytes":2,"network_tx_bytes":1,"network_rx_calls":4,"network_tx_calls":3,"memory_gb_seconds":0.5,"peak_rss_bytes":4096,"disk_read_bytes":5,"disk_write_bytes":6,"gpu_seconds":0.25,"gpu_memory_gb_seconds":2.0,"gpu_energy_joules":31.415,"gpu_attribution":"sampled","exited":true}"#;

    #[test]
    fn record_json_is_unchanged_byte_for_byte() {
        let full = full_record();
        let json = serde_json::to_string(&full).expect("serialises");
        assert_eq!(json, FULL_RECORD_JSON);
        let back: UsageRecord = serde_json::from_str(&json).expect("deserialises");
        assert_eq!(back, full);
        assert_eq!(serde_json::to_string(&back).expect("serialises"), json);

        let process = full_process();
        let stored = UsageRecord::from_process(&process);
        assert_eq!(
            serde_json::to_string(&stored).expect("serialises"),
            STORED_PROCESS_JSON
        );
        assert_eq!(
            serde_json::to_string(&process).expect("serialises"),
            PROCESS_JSON
        );
    }
}
