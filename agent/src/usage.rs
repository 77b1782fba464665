//! The usage record (DESIGN.md's data model) as far as it exists so far, and
//! its deterministic id.

use std::time::SystemTime;

use agent_common::{
    NET_COUNTERS, NET_RX_BYTES, NET_RX_CALLS, NET_TX_BYTES, NET_TX_CALLS, ProcUsage,
    SYSCALL_CLASSES, SyscallClass,
};
use serde::Serialize;

use crate::{
    clock::rfc3339,
    memory::{MemDisk, gib_seconds},
    workload::{CgroupIdentity, QosClass, Runtime, WasmIdentity, WorkloadKind, workload_kind},
};

/// A process instance in one cgroup: the unit usage is attributed to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    /// Process id.
    pub tgid: u32,
    /// Process start: CLOCK_BOOTTIME ns cut to the clock tick (`identity::instance_start`).
    pub start_ns: u64,
    /// cgroup v2 id.
    pub cgroup_id: u64,
}

/// Syscall counts by class, serialised as `{"other": n, "file": n, ...}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallsByClass(pub [u64; SYSCALL_CLASSES]);

impl Serialize for SyscallsByClass {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(SYSCALL_CLASSES))?;
        for (class, n) in SyscallClass::ALL.iter().zip(self.0) {
            m.serialize_entry(class.name(), &n)?;
        }
        m.end()
    }
}

/// Socket payload traffic (IPv4 and IPv6; local IPC excluded).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Net {
    /// Payload bytes sent.
    pub tx_bytes: u64,
    /// Payload bytes received.
    pub rx_bytes: u64,
    /// Send calls that moved data.
    pub tx_calls: u64,
    /// Receive calls that moved data.
    pub rx_calls: u64,
}

impl Net {
    /// From the kernel's `NET_*`-indexed counters.
    pub fn from_counters(c: &[u64; NET_COUNTERS]) -> Self {
        Self {
            tx_bytes: c[NET_TX_BYTES],
            rx_bytes: c[NET_RX_BYTES],
            tx_calls: c[NET_TX_CALLS],
            rx_calls: c[NET_RX_CALLS],
        }
    }

    /// Adds another amount.
    pub fn add(&mut self, o: &Net) {
        self.tx_bytes += o.tx_bytes;
        self.rx_bytes += o.rx_bytes;
        self.tx_calls += o.tx_calls;
        self.rx_calls += o.rx_calls;
    }
}

/// Metered quantities of one workload over one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Metered {
    /// Nanoseconds on CPU.
    pub cpu_ns: u64,
    /// Syscalls entered.
    pub syscalls: u64,
    /// Syscalls by class.
    pub syscalls_by_class: SyscallsByClass,
    /// Socket traffic.
    pub net: Net,
    /// Memory and storage I/O.
    pub mem: MemDisk,
}

impl Metered {
    /// Adds another amount of usage.
    pub fn add(&mut self, other: &Metered) {
        self.cpu_ns += other.cpu_ns;
        self.syscalls += other.syscalls;
        for (a, b) in self
            .syscalls_by_class
            .0
            .iter_mut()
            .zip(other.syscalls_by_class.0)
        {
            *a += b;
        }
        self.net.add(&other.net);
        self.mem.add(&other.mem);
    }
}

impl From<&ProcUsage> for Metered {
    fn from(u: &ProcUsage) -> Self {
        Self {
            cpu_ns: u.cpu_ns,
            syscalls: u.syscalls,
            syscalls_by_class: SyscallsByClass(u.syscalls_by_class),
            net: Net::from_counters(&u.net),
            mem: MemDisk::default(),
        }
    }
}

/// `cpu_ns` as core-seconds.
pub fn core_seconds(cpu_ns: u64) -> f64 {
    cpu_ns as f64 / 1e9
}

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
    /// What the records were grouped by.
    pub group_by: &'static str,
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

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
    fn syscalls_by_class_serialises_by_name() {
        let mut c = [0; SYSCALL_CLASSES];
        c[SyscallClass::Process as usize] = 5;
        let json = serde_json::to_string(&SyscallsByClass(c)).expect("serialises");
        assert!(json.contains("\"process\":5"), "{json}");
        assert!(json.starts_with("{\"other\":0"), "{json}");
    }
}
