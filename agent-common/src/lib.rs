//! Types shared by the eBPF programs (`agent-ebpf`) and the agent (`agent`).
//!
//! Every type here is `#[repr(C)]` with explicit padding, so the kernel and
//! userspace agree on its layout byte for byte and no padding can hide
//! uninitialised bytes from the verifier or from aya's `Pod` reads.
#![no_std]

/// Number of syscall classes in the per-process breakdown (see [`SyscallClass`]).
pub const SYSCALL_CLASSES: usize = 8;

/// Length of the syscall-number → class table; numbers at or above it count as `Other`.
///
/// Must stay a power of two: the kernel masks the syscall number with `LEN - 1`
/// so the verifier can prove the index in bounds.
pub const SYSCALL_TABLE_LEN: usize = 512;

/// `PF_KTHREAD` from `include/linux/sched.h`: the task is a kernel thread.
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Length of `task_struct::comm` (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;

/// Bytes of the exec'd file name carried by an exec event; longer names are cut.
pub const FILENAME_LEN: usize = 256;

/// Bounded per-syscall breakdown: each syscall number maps to one of these classes.
///
/// A per-syscall-number breakdown per process would multiply the process map by
/// hundreds; eight classes keep the per-process cost fixed while still telling
/// an operator whether a workload is doing file, network, memory or sync work.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyscallClass {
    /// Anything not listed below.
    Other = 0,
    /// Files and file descriptors: read, write, open, stat, ...
    File = 1,
    /// Sockets: socket, connect, sendmsg, recvfrom, ...
    Network = 2,
    /// Address space: mmap, munmap, brk, mprotect, madvise, ...
    Memory = 3,
    /// Processes and signals: clone, execve, exit, wait4, kill, getpid, ...
    Process = 4,
    /// Waiting and synchronisation: futex, poll, epoll, select, nanosleep, ...
    Sync = 5,
    /// Clocks and timers: clock_gettime, gettimeofday, timer_*, ...
    Time = 6,
    /// Inter-process communication: pipe, msg*, sem*, shm*, eventfd, ...
    Ipc = 7,
}

impl SyscallClass {
    /// All classes, in index order.
    pub const ALL: [SyscallClass; SYSCALL_CLASSES] = [
        SyscallClass::Other,
        SyscallClass::File,
        SyscallClass::Network,
        SyscallClass::Memory,
        SyscallClass::Process,
        SyscallClass::Sync,
        SyscallClass::Time,
        SyscallClass::Ipc,
    ];

    /// The name used in records and output formats.
    pub const fn name(self) -> &'static str {
        match self {
            SyscallClass::Other => "other",
            SyscallClass::File => "file",
            SyscallClass::Network => "network",
            SyscallClass::Memory => "memory",
            SyscallClass::Process => "process",
            SyscallClass::Sync => "sync",
            SyscallClass::Time => "time",
            SyscallClass::Ipc => "ipc",
        }
    }
}

/// Key of the per-process usage map: one process instance in one cgroup.
///
/// A process instance is (tgid, start time): a reused pid has another start
/// time and so another key. The cgroup is part of the key so a process that
/// moves between cgroups is billed to each for the time it spent there. The
/// epoch is part of the key so each window's usage is a separate entry that
/// userspace reads and deletes once the window is closed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcKey {
    /// `task_struct::start_boottime` of the thread-group leader (CLOCK_BOOTTIME ns).
    pub start_ns: u64,
    /// cgroup v2 id (the inode number of the cgroup's directory).
    pub cgroup_id: u64,
    /// Process id (thread-group id).
    pub tgid: u32,
    /// The accounting epoch the usage was charged in (see [`Control`]).
    pub epoch: u32,
}

/// Socket traffic counters, indexed by the `NET_*` constants.
pub const NET_COUNTERS: usize = 4;
/// Payload bytes sent (what `sendmsg` returned).
pub const NET_TX_BYTES: usize = 0;
/// Payload bytes received (what `recvmsg` returned, peeks excluded).
pub const NET_RX_BYTES: usize = 1;
/// Send calls that moved at least one byte.
pub const NET_TX_CALLS: usize = 2;
/// Receive calls that moved at least one byte.
pub const NET_RX_CALLS: usize = 3;

/// Per-CPU usage counters of one [`ProcKey`]; userspace sums them over CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcUsage {
    /// Nanoseconds on CPU.
    pub cpu_ns: u64,
    /// Syscalls entered.
    pub syscalls: u64,
    /// Syscalls entered, by [`SyscallClass`] index.
    pub syscalls_by_class: [u64; SYSCALL_CLASSES],
    /// IPv4/IPv6 socket traffic, by `NET_*` index.
    pub net: [u64; NET_COUNTERS],
}

/// Node-level usage that has no process entry, per CPU and per epoch parity.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Buckets {
    /// Every nanosecond charged in this epoch on this CPU, wherever it went:
    /// the kernel-side total that process entries plus the buckets below must equal.
    pub charged_ns: u64,
    /// Wall time on this CPU that no task ran: interrupts and time the
    /// hypervisor stole, which the scheduler does not count as task run time.
    pub irq_steal_ns: u64,
    /// Time in the idle task (pid 0).
    pub idle_ns: u64,
    /// Time in kernel threads.
    pub kernel_ns: u64,
    /// Syscalls charged to kernel threads (e.g. io_uring workers).
    pub kernel_syscalls: u64,
    /// Time that could not be put in the process map (map full, task unreadable).
    pub unattributed_ns: u64,
    /// Syscalls that could not be put in the process map.
    pub unattributed_syscalls: u64,
    /// Folds that found the process map full (their usage went to `unattributed_*`).
    pub map_full_drops: u64,
    /// Folds whose task fields could not be read (their usage went to `unattributed_*`).
    pub task_read_errors: u64,
    /// Socket traffic of kernel threads, by `NET_*` index.
    pub kernel_net: [u64; NET_COUNTERS],
    /// Socket traffic with no process entry, by `NET_*` index.
    pub unattributed_net: [u64; NET_COUNTERS],
}

/// How many recently charged processes each CPU keeps in [`CpuState::slots`].
pub const SLOTS: usize = 4;

/// Per-CPU state, in a one-entry per-CPU array.
///
/// The syscall hot path touches only this struct: it counts into the
/// `pending_*` fields, which `sched_switch` folds into the outgoing process's
/// [`ProcUsage`]. That keeps a hash lookup off every syscall.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// When the last charge on this CPU happened; 0 before the first event.
    pub last_switch_ns: u64,
    /// The running task (`task_struct` address), set when it was switched in.
    pub cur_task: u64,
    /// Its `sum_exec_runtime` as far as it has been charged.
    pub cur_runtime_ns: u64,
    /// When it was switched in.
    pub interval_start_ns: u64,
    /// Its `sum_exec_runtime` when it was switched in.
    pub interval_start_runtime_ns: u64,
    /// The first event this CPU saw after attach: the start of its accounted time.
    pub first_switch_ns: u64,
    /// Syscalls entered by the running task since its last fold.
    pub pending_syscalls: u64,
    /// The same, by class.
    pub pending_by_class: [u64; SYSCALL_CLASSES],
    /// Socket traffic of the running task since its last fold, by `NET_*` index.
    pub pending_net: [u64; NET_COUNTERS],
    /// Lifecycle events that did not fit in the ring buffer (metadata lost, usage kept).
    pub events_lost: u64,
    /// Environment copies at exec that did not fit in their ring buffer (the
    /// agent then reads /proc/<pid>/environ, if the process is still there).
    pub envs_lost: u64,
    /// The epoch of the last fold that completed on this CPU. Once every CPU
    /// shows the new epoch here, no program still writes the old one.
    pub acked_epoch: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// Processes charged recently on this CPU: a switch between them updates
    /// a slot, not the hash map. Slots are folded into `PROC_USAGE` when
    /// evicted, and all of them before this CPU acknowledges a new epoch.
    /// The keys sit together (96 bytes) so the search on every switch reads
    /// two cache lines, not one per slot; `tgid == 0` marks an empty slot.
    pub slot_keys: [ProcKey; SLOTS],
    /// Each slot's usage not yet folded into `PROC_USAGE`.
    pub slot_usage: [ProcUsage; SLOTS],
    /// The epoch the slots' usage belongs to.
    pub slots_epoch: u32,
    /// The slot to evict next (round robin).
    pub next_victim: u32,
    /// Node buckets, indexed by `epoch & 1`: cumulative, never reset, so
    /// userspace reads a slot once the epoch has moved on and takes the difference.
    pub buckets: [Buckets; 2],
}

/// Written by userspace, read by the fold: one entry in an array map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Control {
    /// The current accounting epoch. Userspace increments it to close a window,
    /// waits for in-flight programs to finish, then reads the old epoch.
    pub epoch: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// Byte offsets into kernel structs, read from the kernel's BTF by the agent at load.
///
/// There is no CO-RE in Rust eBPF, so the agent resolves these itself and sets
/// them as a read-only global before the programs are loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TaskOffsets {
    /// `task_struct::pid`.
    pub task_pid: u32,
    /// `task_struct::tgid`.
    pub task_tgid: u32,
    /// `task_struct::flags`.
    pub task_flags: u32,
    /// `task_struct::start_boottime` (what /proc/<pid>/stat shows, in ns).
    pub task_start_boottime: u32,
    /// `task_struct::group_leader`.
    pub task_group_leader: u32,
    /// `task_struct::real_parent`.
    pub task_real_parent: u32,
    /// `task_struct::signal`.
    pub task_signal: u32,
    /// `signal_struct::live` (an `atomic_t`).
    pub signal_live: u32,
    /// `linux_binprm::filename`.
    pub binprm_filename: u32,
    /// `sock::__sk_common.skc_family`.
    pub sock_family: u32,
    /// `task_struct::se.sum_exec_runtime`: the scheduler's own count of the
    /// thread's run time (steal and, where configured, IRQ time excluded).
    pub task_sum_exec_runtime: u32,
    /// `task_struct::cgroups` (the task's `css_set`).
    pub task_cgroups: u32,
    /// `css_set::dfl_cgrp` (its cgroup v2 cgroup).
    pub css_set_dfl_cgrp: u32,
    /// `cgroup::kn` (the cgroup's kernfs node).
    pub cgroup_kn: u32,
    /// `kernfs_node::id` (the cgroup id `bpf_get_current_cgroup_id` returns).
    pub kernfs_node_id: u32,
    /// `task_struct::ioac` (this thread's I/O accounting).
    pub task_ioac: u32,
    /// `signal_struct::ioac` (I/O of the process's threads that are gone).
    pub signal_ioac: u32,
    /// `task_io_accounting::read_bytes`.
    pub ioac_read_bytes: u32,
    /// `task_io_accounting::write_bytes`.
    pub ioac_write_bytes: u32,
    /// `task_io_accounting::cancelled_write_bytes`.
    pub ioac_cancelled_write_bytes: u32,
    /// `task_struct::mm`.
    pub task_mm: u32,
    /// `mm_struct::env_start` (user address of the environment block).
    pub mm_env_start: u32,
    /// `mm_struct::env_end`.
    pub mm_env_end: u32,
    /// Set to 1 by the agent once the offsets above are filled in.
    pub valid: u32,
}

impl TaskOffsets {
    /// All zero, not valid: the placeholder the eBPF object is built with.
    pub const ZERO: TaskOffsets = TaskOffsets {
        task_pid: 0,
        task_tgid: 0,
        task_flags: 0,
        task_start_boottime: 0,
        task_group_leader: 0,
        task_real_parent: 0,
        task_signal: 0,
        signal_live: 0,
        binprm_filename: 0,
        sock_family: 0,
        task_sum_exec_runtime: 0,
        task_cgroups: 0,
        css_set_dfl_cgrp: 0,
        cgroup_kn: 0,
        kernfs_node_id: 0,
        task_ioac: 0,
        signal_ioac: 0,
        ioac_read_bytes: 0,
        ioac_write_bytes: 0,
        ioac_cancelled_write_bytes: 0,
        task_mm: 0,
        mm_env_start: 0,
        mm_env_end: 0,
        valid: 0,
    };
}

/// Byte offsets into `struct sock` for sender binding, resolved from BTF by
/// the agent at load (`valid` = 0: binding off, the program records nothing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOffsets {
    /// `sock::__sk_common.skc_daddr` (IPv4 peer, network order).
    pub daddr: u32,
    /// `sock::__sk_common.skc_rcv_saddr` (IPv4 local address, network order).
    pub rcv_saddr: u32,
    /// `sock::__sk_common.skc_dport` (peer port, network order).
    pub dport: u32,
    /// `sock::__sk_common.skc_num` (local port, host order).
    pub num: u32,
    /// `sock::__sk_common.skc_state` (a `u8`: `TCP_ESTABLISHED` = 1).
    pub state: u32,
    /// `sock::__sk_common.skc_v6_rcv_saddr` (IPv6 local address).
    pub v6_rcv_saddr: u32,
    /// `sock::__sk_common.skc_net` (a `possible_net_t`: the `struct net *`).
    pub net: u32,
    /// `net::ns.inum` (the network namespace's inode number).
    pub net_inum: u32,
    /// `sock::sk_protocol` (a `u16`: `IPPROTO_TCP` = 6).
    pub protocol: u32,
    /// Set to 1 by the agent once the offsets above are filled in.
    pub valid: u32,
}

impl SockOffsets {
    /// All zero, not valid: the placeholder the eBPF object is built with.
    pub const ZERO: SockOffsets = SockOffsets {
        daddr: 0,
        rcv_saddr: 0,
        dport: 0,
        num: 0,
        state: 0,
        v6_rcv_saddr: 0,
        net: 0,
        net_inum: 0,
        protocol: 0,
        valid: 0,
    };
}

/// Ports the agent's OTLP receiver listens on, as clients see them (host
/// order; 0 = unused): a TCP send to one of these records its sender.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReceiverPorts {
    /// Up to four ports.
    pub ports: [u16; 4],
}

/// A client socket's own end as the receiver sees it as the peer: the local
/// address (IPv4 as `::ffff:a.b.c.d`) and port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SenderKey {
    /// IPv6 address bytes (network order).
    pub addr: [u8; 16],
    /// Local port, host order.
    pub port: u16,
    /// Explicit padding; always zero.
    pub _pad: [u8; 6],
}

/// The process that last sent on a client socket to the receiver.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SenderValue {
    /// The sending thread's process (tgid).
    pub tgid: u32,
    /// The socket's network namespace inode number.
    pub netns: u32,
    /// `start_boottime` of the thread-group leader (CLOCK_BOOTTIME ns).
    pub start_ns: u64,
    /// The sender's cgroup v2 id.
    pub cgroup_id: u64,
}

/// Kind of a [`ProcEvent`].
pub mod event_kind {
    /// A new process (not a thread) was forked.
    pub const FORK: u32 = 1;
    /// A process called execve successfully.
    pub const EXEC: u32 = 2;
    /// The last thread of a process exited.
    pub const EXIT: u32 = 3;
}

/// Bytes of a process's environment copied at exec: enough for most
/// environments; a longer one is cut here and marked truncated. A power of two,
/// so the kernel side can bound a length with a mask.
pub const ENV_COPY_MAX: usize = 16384;

/// The head of an environment copy in the `ENV_EVENTS` ring buffer, followed
/// by `copied` bytes of the environment block (NUL-separated `KEY=value`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnvHeader {
    /// The process that exec'd.
    pub tgid: u32,
    /// Bytes that follow this header.
    pub copied: u32,
    /// The process's start time, as in [`ProcEvent::start_ns`].
    pub start_ns: u64,
    /// The environment block's whole length (more than `copied`: truncated).
    pub total: u64,
}

/// Per-CPU scratch space an environment copy is assembled in.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvScratch {
    /// Written first.
    pub header: EnvHeader,
    /// The environment block's first bytes.
    pub bytes: [u8; ENV_COPY_MAX],
}

/// A process lifecycle event, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    /// One of [`event_kind`].
    pub kind: u32,
    /// The process the event is about.
    pub tgid: u32,
    /// Its parent process (for FORK: the forking process).
    pub ppid: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// The process's start time (CLOCK_BOOTTIME ns), as in [`ProcKey::start_ns`].
    pub start_ns: u64,
    /// When the event happened (CLOCK_BOOTTIME ns).
    pub ts_ns: u64,
    /// cgroup v2 id of the process at the event.
    pub cgroup_id: u64,
    /// `task_struct::comm` at the event, NUL-padded.
    pub comm: [u8; COMM_LEN],
    /// EXIT only: storage bytes read by the whole process (`task_io_accounting`).
    pub io_read_bytes: u64,
    /// EXIT only: storage bytes written by the whole process.
    pub io_write_bytes: u64,
    /// EXIT only: written bytes cancelled before reaching storage (truncated dirty pages).
    pub io_cancelled_write_bytes: u64,
    /// EXEC only: the file name passed to execve, NUL-terminated, cut at [`FILENAME_LEN`].
    pub filename: [u8; FILENAME_LEN],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and integer
    // arrays, and have no implicit padding (checked by the size tests below).
    unsafe impl aya::Pod for super::ProcKey {}
    unsafe impl aya::Pod for super::ProcUsage {}
    unsafe impl aya::Pod for super::CpuState {}
    unsafe impl aya::Pod for super::Buckets {}
    unsafe impl aya::Pod for super::Control {}
    unsafe impl aya::Pod for super::TaskOffsets {}
    unsafe impl aya::Pod for super::EnvHeader {}
    unsafe impl aya::Pod for super::SockOffsets {}
    unsafe impl aya::Pod for super::ReceiverPorts {}
    unsafe impl aya::Pod for super::SenderKey {}
    unsafe impl aya::Pod for super::SenderValue {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    // Sizes equal to the sum of the fields prove there is no implicit padding.
    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<ProcKey>(), 8 + 8 + 4 + 4);
        assert_eq!(
            size_of::<ProcUsage>(),
            8 + 8 + 8 * SYSCALL_CLASSES + 8 * NET_COUNTERS
        );
        assert_eq!(size_of::<Buckets>(), 8 * 9 + 2 * 8 * NET_COUNTERS);
        assert_eq!(
            size_of::<CpuState>(),
            8 * (10 + SYSCALL_CLASSES + NET_COUNTERS)
                + SLOTS * (size_of::<ProcKey>() + size_of::<ProcUsage>())
                + 8
                + 2 * size_of::<Buckets>()
        );
        assert_eq!(size_of::<Control>(), 8);
        assert_eq!(size_of::<TaskOffsets>(), 4 * 24);
        assert_eq!(size_of::<EnvHeader>(), 4 + 4 + 8 + 8);
        assert_eq!(size_of::<SockOffsets>(), 4 * 10);
        assert_eq!(size_of::<ReceiverPorts>(), 2 * 4);
        assert_eq!(size_of::<SenderKey>(), 16 + 2 + 6);
        assert_eq!(size_of::<SenderValue>(), 4 + 4 + 8 + 8);
        assert_eq!(
            size_of::<EnvScratch>(),
            size_of::<EnvHeader>() + ENV_COPY_MAX
        );
        assert_eq!(
            size_of::<ProcEvent>(),
            4 * 4 + 8 * 6 + COMM_LEN + FILENAME_LEN
        );
    }

    #[test]
    fn env_copy_max_is_a_power_of_two() {
        assert!(ENV_COPY_MAX.is_power_of_two());
    }

    #[test]
    fn class_table_length_is_a_power_of_two() {
        assert!(SYSCALL_TABLE_LEN.is_power_of_two());
    }
}
