//! CPU time: charge each task the run time the scheduler itself counts.
//!
//! `sched_switch` fires in the context of the outgoing task (`current` is
//! still `prev`), so what ran since the last charge on this CPU belongs to
//! `current`. The amount is the growth of its `se.sum_exec_runtime`, the
//! scheduler's clock, which leaves out time the hypervisor stole and (with
//! IRQ time accounting) interrupts: a tenant is not billed for time its task
//! did not run. The rest of the wall-clock interval goes to the `irq_steal`
//! bucket, so per CPU, tasks + idle + irq_steal is all of the time.
//!
//! A per-CPU timer (`cpu_tick`, a perf event) charges the running task's run
//! time so far, so a task that never blocks still shows up in every window.

use agent_common::{Buckets, CpuState, NET_COUNTERS, ProcKey, ProcUsage, SLOTS, SYSCALL_CLASSES};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{btf_tracepoint, perf_event},
    programs::{BtfTracePointContext, PerfEventContext},
};

use crate::{
    maps::{CPU_STATE, PROC_USAGE, epoch, off},
    task::{self, Who},
};

/// -EEXIST: another CPU inserted the same key between our lookup and insert.
const EEXIST: i32 = -17;

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)`.
///
/// A BTF tracepoint: `prev` and `next` are typed kernel pointers, so their
/// fields are read with direct loads rather than helper calls; this is the
/// agent's hottest program after `sys_enter`.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    if off!(valid) == 0 {
        return 0;
    }
    let who = Ok(task::who_btf(prev));
    // A direct load: cheaper than the bpf_get_current_pid_tgid helper.
    let tgid = task::load::<u32>(prev, off!(task_tgid));
    let prev_runtime = task::load::<u64>(prev, off!(task_sum_exec_runtime));
    let next_runtime = task::load::<u64>(next, off!(task_sum_exec_runtime));
    charge_current(
        prev,
        tgid,
        Some(prev_runtime),
        who,
        Some((next, next_runtime)),
    );
    0
}

#[perf_event]
pub fn cpu_tick(_ctx: PerfEventContext) -> u32 {
    // Syscall and socket counts stay pending: `sys_enter` may be
    // mid-increment under this interrupt, and only `sched_switch` (IRQs off)
    // can take them safely.
    let cur = task::current();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    charge_current(cur, tgid, runtime_of(cur), task::who(cur), None);
    0
}

/// The running task's `sum_exec_runtime`, if readable.
#[inline(always)]
fn runtime_of(task: *const u8) -> Option<u64> {
    if off!(valid) == 0 {
        return None;
    }
    task::read(task, off!(task_sum_exec_runtime)).ok()
}

/// Charges the current task `cur` (its process: `tgid`, 0 for idle; who it is: `who`; its run time so far:
/// `runtime`) what it ran since its last charge; at a switch (`next` given,
/// with its run time) also its pending syscalls and socket counts, and the
/// interval's time no task ran.
#[inline(always)]
fn charge_current(
    cur: *const u8,
    tgid: u32,
    runtime: Option<u64>,
    who: Result<Who, i64>,
    next: Option<(*const u8, u64)>,
) {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(st) = CPU_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the pointer is this CPU's entry, valid for the program's run;
    // its writers (these programs, sys_enter, the socket probes) run on this CPU only.
    let st = unsafe { &mut *st };
    let last = st.last_switch_ns;
    st.last_switch_ns = now;

    let mut usage = ProcUsage {
        cpu_ns: 0,
        syscalls: 0,
        syscalls_by_class: [0; SYSCALL_CLASSES],
        net: [0; NET_COUNTERS],
    };
    let mut irq_steal = 0;
    if last == 0 {
        // Before the first event on this CPU we do not know what ran: accounted time begins here.
        st.first_switch_ns = now;
    } else if tgid == 0 {
        // The idle task has no run time of its own; its wall time is idle.
        usage.cpu_ns = now.saturating_sub(last);
    } else if st.cur_task == cur as u64
        && let Some(rt) = runtime
    {
        usage.cpu_ns = rt.saturating_sub(st.cur_runtime_ns);
        st.cur_runtime_ns = rt.max(st.cur_runtime_ns);
        if next.is_some() {
            // The scheduler updated prev's run time just before this
            // tracepoint, so the interval's run time is exact here.
            let ran = rt.saturating_sub(st.interval_start_runtime_ns);
            irq_steal = now.saturating_sub(st.interval_start_ns).saturating_sub(ran);
        }
    } else {
        // No baseline for this task (attach happened while it ran): wall time.
        usage.cpu_ns = now.saturating_sub(last);
    }
    if let Some((next, rt)) = next {
        usage.syscalls = st.pending_syscalls;
        usage.syscalls_by_class = st.pending_by_class;
        usage.net = st.pending_net;
        st.pending_syscalls = 0;
        zero(&mut st.pending_by_class);
        zero(&mut st.pending_net);
        st.cur_task = next as u64;
        st.cur_runtime_ns = rt;
        st.interval_start_ns = now;
        st.interval_start_runtime_ns = rt;
    }

    let epoch = epoch();
    if st.slots_epoch != epoch {
        // The window moved on: everything this CPU holds for the old one goes
        // to the map before the new epoch is acknowledged below.
        flush_slots(st);
        st.slots_epoch = epoch;
    }
    let b = &mut st.buckets[(epoch & 1) as usize];
    b.irq_steal_ns += irq_steal;
    b.charged_ns += irq_steal;
    charge(st, &usage, epoch, tgid, who);
    st.acked_epoch = epoch;
}

/// Zeroes `a` with one 8-byte store per element. `[0; N]` or a plain loop
/// becomes a call to compiler_builtins' memset, which the BPF target runs a
/// byte at a time: ~500 instructions for the pending counters on every switch.
#[inline(always)]
fn zero<const N: usize>(a: &mut [u64; N]) {
    let mut i = 0;
    while i < N {
        // SAFETY: i < N; volatile only so LLVM keeps the stores as stores.
        unsafe { core::ptr::write_volatile(a.as_mut_ptr().add(i), 0) };
        i += 1;
    }
}

/// Folds every slot into the map and empties it.
#[inline(always)]
fn flush_slots(st: &mut CpuState) {
    let mut i = 0;
    while i < SLOTS {
        let key = st.slot_keys[i];
        if key.tgid != 0 {
            let usage = st.slot_usage[i];
            spill(st, &key, &usage);
            st.slot_keys[i].tgid = 0;
        }
        i += 1;
    }
}

/// Folds one slot's usage into the map; if the map is full, into the
/// unattributed bucket of the slot's epoch, counted as a drop.
#[inline(always)]
fn spill(st: &mut CpuState, key: &ProcKey, usage: &ProcUsage) {
    if !fold(key, usage) {
        let b = &mut st.buckets[(key.epoch & 1) as usize];
        b.map_full_drops += 1;
        unattributed(b, usage);
    }
}

/// Adds `usage` to the slot of `key`, taking over the next victim slot
/// (after spilling it) when `key` has none.
#[inline(always)]
fn add_to_slot(st: &mut CpuState, key: &ProcKey, usage: &ProcUsage) {
    let mut found = SLOTS;
    let mut i = 0;
    while i < SLOTS {
        if st.slot_keys[i] == *key {
            found = i;
            break;
        }
        i += 1;
    }
    if found == SLOTS {
        let victim = (st.next_victim as usize) & (SLOTS - 1);
        st.next_victim = st.next_victim.wrapping_add(1);
        let old = st.slot_keys[victim];
        if old.tgid != 0 {
            let old_usage = st.slot_usage[victim];
            spill(st, &old, &old_usage);
        }
        // The new slot starts as this usage: nothing to zero, then add.
        st.slot_keys[victim] = *key;
        st.slot_usage[victim] = *usage;
        return;
    }
    let v = &mut st.slot_usage[found & (SLOTS - 1)];
    v.cpu_ns += usage.cpu_ns;
    v.syscalls += usage.syscalls;
    let mut c = 0;
    while c < SYSCALL_CLASSES {
        v.syscalls_by_class[c] += usage.syscalls_by_class[c];
        c += 1;
    }
    add_net(&mut v.net, &usage.net);
}

/// Puts one interval's usage in the process map or in one of the node buckets.
#[inline(always)]
fn charge(st: &mut CpuState, usage: &ProcUsage, epoch: u32, tgid: u32, who: Result<Who, i64>) {
    let b = &mut st.buckets[(epoch & 1) as usize];
    b.charged_ns += usage.cpu_ns;
    if tgid == 0 {
        b.idle_ns += usage.cpu_ns;
        // The idle task makes no syscalls and sends nothing; anything pending has no owner left.
        b.unattributed_syscalls += usage.syscalls;
        add_net(&mut b.unattributed_net, &usage.net);
        return;
    }
    match who {
        Ok(Who::Kernel) => {
            b.kernel_ns += usage.cpu_ns;
            b.kernel_syscalls += usage.syscalls;
            add_net(&mut b.kernel_net, &usage.net);
        }
        Ok(Who::Process {
            start_ns,
            cgroup_id,
        }) => {
            let key = ProcKey {
                start_ns,
                cgroup_id,
                tgid,
                epoch,
            };
            add_to_slot(st, &key, usage);
        }
        Err(_) => {
            b.task_read_errors += 1;
            unattributed(b, usage);
        }
    }
}

#[inline(always)]
fn unattributed(b: &mut Buckets, usage: &ProcUsage) {
    b.unattributed_ns += usage.cpu_ns;
    b.unattributed_syscalls += usage.syscalls;
    add_net(&mut b.unattributed_net, &usage.net);
}

#[inline(always)]
fn add_net(sum: &mut [u64; NET_COUNTERS], v: &[u64; NET_COUNTERS]) {
    let mut i = 0;
    while i < NET_COUNTERS {
        sum[i] += v[i];
        i += 1;
    }
}

/// Adds `usage` to `key`'s per-CPU entry, creating it if needed; false if the map is full.
#[inline(always)]
fn fold(key: &ProcKey, usage: &ProcUsage) -> bool {
    // Two attempts: the insert can lose a race with another CPU creating the
    // same key, and then the entry exists for the second lookup.
    for _ in 0..2 {
        if let Some(v) = PROC_USAGE.get_ptr_mut(key) {
            // SAFETY: per-CPU value of this CPU; no other writer runs here now.
            let v = unsafe { &mut *v };
            v.cpu_ns += usage.cpu_ns;
            v.syscalls += usage.syscalls;
            let mut i = 0;
            while i < SYSCALL_CLASSES {
                v.syscalls_by_class[i] += usage.syscalls_by_class[i];
                i += 1;
            }
            add_net(&mut v.net, &usage.net);
            return true;
        }
        match PROC_USAGE.insert(key, usage, BPF_NOEXIST as u64) {
            Ok(()) => return true,
            Err(e) if e == EEXIST => continue,
            Err(_) => return false,
        }
    }
    false
}
