//! Every map and global the programs share with userspace.
//!
//! Sizes here are defaults; the agent may resize `PROC_USAGE` at load
//! (`EbpfLoader::set_max_entries`). Overflow of each map is counted in
//! `CpuState`, never silent.

use agent_common::{
    Control, CpuState, EnvScratch, ProcKey, ProcUsage, ReceiverPorts, SYSCALL_TABLE_LEN, SenderKey,
    SenderValue, SockOffsets, TaskOffsets,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};

/// Default number of (process instance, cgroup, epoch) entries held at once.
///
/// Userspace deletes an epoch's entries as soon as it closes the window, so
/// this needs about twice the processes that run within one tick. Memory:
/// entries × possible CPUs × 80 bytes (plus per-entry hash overhead), about
/// 800 KiB per CPU at 10,240. When full, a fold's usage goes to the
/// unattributed bucket and `map_full_drops` counts it.
pub const PROC_USAGE_ENTRIES: u32 = 10_240;

/// Ring buffer size for lifecycle events (bytes, a power of two).
///
/// An event is 320 bytes; 1 MiB holds ~3,200 events between two userspace
/// reads. Reserve failures are counted in `CpuState::events_lost`; usage
/// never travels through this buffer, so a lost event loses metadata only.
pub const EVENTS_BYTES: u32 = 1 << 20;

/// Per-process usage, folded in at context switch.
#[map]
pub static PROC_USAGE: PerCpuHashMap<ProcKey, ProcUsage> =
    PerCpuHashMap::with_max_entries(PROC_USAGE_ENTRIES, 0);

/// One entry per CPU: pending counters of the running task and node buckets.
#[map]
pub static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// The current epoch, written by userspace.
#[map]
pub static CONTROL: Array<Control> = Array::with_max_entries(1, 0);

/// Process lifecycle events (fork, exec, exit).
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

/// Ring buffer size for environment copies at exec (bytes, a power of two).
///
/// A copy is its length plus 24 bytes, at most 16 KiB; typical environments
/// are 1–4 KiB, so 2 MiB holds some 500–2,000 execs between two userspace
/// reads. Reserve failures are counted in `CpuState::envs_lost`, and the agent
/// then falls back to reading /proc/<pid>/environ.
pub const ENV_EVENTS_BYTES: u32 = 1 << 21;

/// Environment blocks copied at exec, read by the agent for the run context.
#[map]
pub static ENV_EVENTS: RingBuf = RingBuf::with_byte_size(ENV_EVENTS_BYTES, 0);

/// Per-CPU scratch space for one environment copy (too big for the BPF stack).
#[map]
pub static ENV_SCRATCH: PerCpuArray<EnvScratch> = PerCpuArray::with_max_entries(1, 0);

/// Struct member offsets resolved from the running kernel's BTF by the agent.
#[unsafe(no_mangle)]
pub static TASK_OFFSETS: TaskOffsets = TaskOffsets::ZERO;

/// `struct sock` member offsets for sender binding, filled by the agent at load.
#[unsafe(no_mangle)]
pub static SOCK_OFFSETS: SockOffsets = SockOffsets::ZERO;

/// Client sockets (their own address and port) recorded at once for sender
/// binding. An entry is needed from a connection's first send until the
/// receiver looks it up for that connection's first request (then cached for
/// the connection's life), so this holds 8,192 connections opened to the
/// receiver within that moment; 8,192 × ~90 bytes ≈ 720 KiB. LRU: the oldest
/// give way, and a receiver lookup that misses is counted in userspace
/// (`mentat_agent_receiver_senders_unidentified_total`).
pub const SENDERS_ENTRIES: u32 = 8_192;

/// Client socket → the process that last sent on it to a receiver port.
#[map]
pub static SENDERS: LruHashMap<SenderKey, SenderValue> =
    LruHashMap::with_max_entries(SENDERS_ENTRIES, 0);

/// The receiver's ports, written by the agent once its listeners are bound.
#[map]
pub static RECEIVER_PORTS: Array<ReceiverPorts> = Array::with_max_entries(1, 0);

/// Sender binding counters, per CPU: \[0\] entries written, \[1\] writes that failed.
#[map]
pub static SENDER_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

/// Syscall number → class index, filled by the agent for the running architecture.
#[unsafe(no_mangle)]
pub static SYSCALL_CLASS: [u8; SYSCALL_TABLE_LEN] = [0; SYSCALL_TABLE_LEN];

/// One offset of [`TASK_OFFSETS`] (`off!(task_flags)`), read through a
/// volatile load so the compiler cannot fold in the zero placeholder the agent
/// replaces at load. One field at a time: a volatile read of the whole struct
/// would cost a load per field on every use, in the hottest programs.
macro_rules! off {
    ($field:ident) => {
        // SAFETY: a plain read of a static the loader initialised.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::TASK_OFFSETS.$field)) }
    };
}
pub(crate) use off;

/// One offset of [`SOCK_OFFSETS`], read as [`off!`] reads `TASK_OFFSETS`.
macro_rules! sock_off {
    ($field:ident) => {
        // SAFETY: a plain read of a static the loader initialised.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!($crate::maps::SOCK_OFFSETS.$field)) }
    };
}
pub(crate) use sock_off;

/// The class index of syscall `nr`, always below `SYSCALL_CLASSES`.
#[inline(always)]
pub fn syscall_class(nr: u64) -> usize {
    if nr >= SYSCALL_TABLE_LEN as u64 {
        return 0;
    }
    let idx = (nr as usize) & (SYSCALL_TABLE_LEN - 1);
    // SAFETY: idx is masked into the table's bounds; volatile for the same
    // reason as `offsets`.
    let class = unsafe { core::ptr::read_volatile(SYSCALL_CLASS.as_ptr().add(idx)) };
    (class as usize) & (agent_common::SYSCALL_CLASSES - 1)
}

/// The current accounting epoch (0 until userspace sets one).
#[inline(always)]
pub fn epoch() -> u32 {
    CONTROL.get(0).map_or(0, |c| c.epoch)
}
