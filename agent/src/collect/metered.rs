//! What the kernel metered for one process instance over one window, before
//! it is named and priced: CPU, syscalls by class, socket traffic, memory and
//! disk, GPU.

use agent_common::{
    NET_COUNTERS, NET_RX_BYTES, NET_RX_CALLS, NET_TX_BYTES, NET_TX_CALLS, ProcUsage,
    SYSCALL_CLASSES, SyscallClass,
};
use serde::Serialize;

use crate::collect::{gpu::Attribution, memory::MemDisk};

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

/// GPU usage of one workload (from NVML).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuMetered {
    /// SM-busy nanoseconds attributed.
    pub gpu_ns: u64,
    /// ∫ used GPU memory dt, byte-nanoseconds.
    pub memory_byte_ns: u128,
    /// Energy, millijoules.
    pub energy_mj: u64,
    /// How the GPU time was obtained; `None`: no GPU seen.
    pub attribution: Option<Attribution>,
}

impl GpuMetered {
    /// Adds another amount. The sum is `Estimated` if any part is: a
    /// figure that is partly a guess is a guess.
    pub fn add(&mut self, o: &GpuMetered) {
        self.gpu_ns += o.gpu_ns;
        self.memory_byte_ns += o.memory_byte_ns;
        self.energy_mj += o.energy_mj;
        self.attribution = match (self.attribution, o.attribution) {
            (Some(Attribution::Estimated), _) | (_, Some(Attribution::Estimated)) => {
                Some(Attribution::Estimated)
            }
            (a, b) => a.or(b),
        };
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
    /// GPU time, memory and energy.
    pub gpu: GpuMetered,
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
        self.gpu.add(&other.gpu);
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
            gpu: GpuMetered::default(),
        }
    }
}

/// `cpu_ns` as core-seconds.
pub fn core_seconds(cpu_ns: u64) -> f64 {
    cpu_ns as f64 / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscalls_by_class_serialises_by_name() {
        let mut c = [0; SYSCALL_CLASSES];
        c[SyscallClass::Process as usize] = 5;
        let json = serde_json::to_string(&SyscallsByClass(c)).expect("serialises");
        assert!(json.contains("\"process\":5"), "{json}");
        assert!(json.starts_with("{\"other\":0"), "{json}");
    }
}
