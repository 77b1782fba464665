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

/// `workload cgroup-hop --path DIR --pre P --ms M`: the workload ran in short bursts with
/// a sleep after each, P ms of CPU in its first cgroup, then moved into DIR and did the same
/// for M ms.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupHop {
    pub pid: u32,
    /// Inode number of DIR, which is the cgroup's id on cgroup v2.
    pub cgroup_id: u64,
    /// `getrusage(RUSAGE_SELF)` just before the move.
    pub rusage_at_move_ns: u64,
    /// `getrusage(RUSAGE_SELF)` at the end.
    pub rusage_cpu_ns: u64,
}

/// `workload gated --path DIR --ms M`: the workload moved itself into DIR, waited for a
/// line on stdin, burned M ms of CPU, and exited when stdin closed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gated {
    /// As the process sees itself: 1 when it is pid 1 of a pid namespace.
    pub pid: u32,
    /// Inode number of DIR, which is the cgroup's id on cgroup v2.
    pub cgroup_id: u64,
    /// `getrusage(RUSAGE_SELF)` when the gate line arrived: start-up and the move,
    /// before the test let the workload run.
    pub rusage_at_gate_ns: u64,
    /// `getrusage(RUSAGE_SELF)` just before exit.
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

/// `workload tcp`: a server and a client process, each in its own cgroup; the client
/// sent BYTES over loopback TCP and the server read to EOF. Counts are the sums of what
/// each process's own `write`/`read` calls returned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcp {
    /// The workload itself: forked both and stayed where it was.
    pub parent_pid: u32,
    pub server_pid: u32,
    pub client_pid: u32,
    /// Payload bytes the client's `write` calls accepted.
    pub bytes_sent: u64,
    /// Payload bytes the server's `read` calls returned.
    pub bytes_received: u64,
}

/// `workload udp`: the client sent datagrams to the server over loopback UDP; loopback
/// may drop some when the receive buffer overflows, so both sides report their counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Udp {
    /// The workload itself: forked both and stayed where it was.
    pub parent_pid: u32,
    /// The receiver.
    pub server_pid: u32,
    /// The sender.
    pub client_pid: u32,
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_received: u64,
    pub bytes_received: u64,
}

/// One worker of `workload prefork`, as it counted itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreforkWorker {
    pub pid: u32,
    /// The cgroup directory the worker moved itself into (as given on the command line).
    pub cgroup: String,
    /// Connections it accepted (exactly `--requests-per-worker`).
    pub connections: u64,
    pub bytes_received: u64,
    pub bytes_sent: u64,
}

/// One client process of `workload prefork`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreforkClient {
    pub pid: u32,
    /// Connections that got a full reply.
    pub connections: u64,
    /// Over those connections only: a connection still queued when the last worker
    /// left is reset, and what the client sent on it is not here.
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// `workload prefork`: workers sharing the parent's listening socket, and the clients
/// that kept them busy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefork {
    /// Opened the listener, then forked the workers and the clients.
    pub parent_pid: u32,
    pub workers: Vec<PreforkWorker>,
    pub clients: Vec<PreforkClient>,
}

/// `workload hold-memory --mib M --ms T`: the workload itself touched M MiB and held it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldMemory {
    pub pid: u32,
    pub mib: u64,
    /// VmRSS before the allocation: the binary, stack and heap resident all along.
    pub base_rss_bytes: u64,
    /// From the first page touched to the last: RSS climbed from the base to the base
    /// plus MIB MiB, about linearly, over this time.
    pub touch_ns: u64,
    /// From just after the last page was touched to just before exit (monotonic clock).
    pub hold_ns: u64,
    /// VmHWM from `/proc/self/status` just before exit, for failure messages.
    pub vm_hwm_bytes: u64,
}

impl HoldMemory {
    /// Seconds it touched its pages, and seconds it held them.
    pub fn touch_and_hold_s(&self) -> (f64, f64) {
        (self.touch_ns as f64 / 1e9, self.hold_ns as f64 / 1e9)
    }

    /// ∫ RSS dt the process had by its own clock, in GiB·s: its MiB for the whole
    /// hold, half of them on average while it touched the pages one by one (RSS
    /// climbs linearly), and its base RSS (binary, stack, heap) throughout. Faulting
    /// in 256 MiB takes 100-300 ms on this VM, so leaving the ramp out (0.25 × hold
    /// alone) would be 3-10 % short of the true integral: an agent matching a 1 ms
    /// /proc poller read +5..+16 % above it. Not counted: the few ms from exec to the
    /// base reading and from the print to exit (< 1 %).
    pub fn expected_gib_seconds(&self) -> f64 {
        const GIB: f64 = (1u64 << 30) as f64;
        let held_gib = (self.mib << 20) as f64 / GIB;
        let base_gib = self.base_rss_bytes as f64 / GIB;
        let (touch_s, hold_s) = self.touch_and_hold_s();
        held_gib * (hold_s + touch_s / 2.0) + base_gib * (touch_s + hold_s)
    }
}

/// `workload write-file --mib M --path P`: the workload itself wrote and fsynced P.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteFile {
    pub pid: u32,
    pub path: String,
    /// What the `write` calls accepted; all of it was fsynced.
    pub bytes_written: u64,
    /// `write_bytes` of `/proc/self/io` after the fsync: what the kernel charged the
    /// process for, the same source the agent reads, so only for failure messages.
    pub proc_io_write_bytes: u64,
}

/// `workload hostile`: a parent and a re-executed child, both with a comm holding a
/// newline, a comma, a double quote and an invalid UTF-8 byte; the child had ~1 MiB of argv.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hostile {
    pub parent_pid: u32,
    pub child_pid: u32,
}

/// `workload wrap -- CMD ARGS...`: CMD ran as the workload's child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wrap {
    /// The workload itself, which reaped the child.
    pub parent_pid: u32,
    pub child_pid: u32,
    /// From `wait4`: the child and every descendant it reaped.
    pub rusage_cpu_ns: u64,
    /// `None` when a signal ended it.
    pub exit_code: Option<i32>,
}

/// The comm `workload hostile` gives itself and its child (`PR_SET_NAME`): a newline, a
/// comma, a double quote and a byte that is not UTF-8, in 8 of the 15 bytes allowed.
pub const HOSTILE_COMM: &[u8] = b"ev\nil,\"\xff";
