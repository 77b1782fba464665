//! Ground truth the `workload` helper prints as one JSON line on stdout.
//!
//! The workload serialises these types and the tests deserialise them, so the two
//! cannot drift apart. All CPU times are user + system time in nanoseconds, as the
//! kernel reported them through `wait4` or `getrusage` (microsecond resolution).

use serde::{Deserialize, Serialize};

/// One child the workload forked and reaped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Child {
    pub pid: u32,
    /// From the rusage `wait4` returned when reaping this child.
    pub rusage_cpu_ns: u64,
}

/// `workload burn --threads N --ms M`: one child whose N threads each burned M ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Burn {
    /// The workload process itself: the child's parent.
    pub parent_pid: u32,
    pub child_pid: u32,
    pub rusage_cpu_ns: u64,
}

/// `workload getppid --count N`: one child that made exactly N `getppid` syscalls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Getppid {
    pub parent_pid: u32,
    pub child_pid: u32,
    pub count: u64,
}

/// `workload spawn-many --n N --ms M`: N children, one after another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnMany {
    pub parent_pid: u32,
    /// In fork order.
    pub children: Vec<Child>,
    /// Sum of the children's `rusage_cpu_ns`.
    pub total_rusage_cpu_ns: u64,
}

/// `workload cgroup --path DIR --ms M`: the workload moved itself into DIR, then burned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupMove {
    pub pid: u32,
    /// Inode number of DIR, which is the cgroup's id on cgroup v2.
    pub cgroup_id: u64,
    /// `getrusage(RUSAGE_SELF)` after the burn: includes the CPU spent before the move.
    pub rusage_cpu_ns: u64,
}

/// `workload reuse-pid --first-ms A --second-ms B`: two children with the same pid,
/// the second forked (with `clone3`'s `set_tid`) after the first was reaped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReusePid {
    pub parent_pid: u32,
    pub pid: u32,
    /// The two instances, first then second; both have `pid`.
    pub instances: Vec<Child>,
}
