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

use agent_common::{Buckets, NET_COUNTERS, ProcKey, ProcUsage, SYSCALL_CLASSES};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{perf_event, raw_tracepoint},
    programs::{PerfEventContext, RawTracePointContext},
};

use crate::{
    maps::{CPU_STATE, PROC_USAGE, epoch, offsets},
    task::{self, Who},
};

/// -EEXIST: another CPU inserted the same key between our lookup and insert.
const EEXIST: i32 = -17;

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next, ...)`.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    let next: *const u8 = ctx.arg(2);
    charge_current(Some(next));
    0
}

#[perf_event]
pub fn cpu_tick(_ctx: PerfEventContext) -> u32 {
    // Syscall and socket counts stay pending: `sys_enter` may be
    // mid-increment under this interrupt, and only `sched_switch` (IRQs off)
    // can take them safely.
    charge_current(None);
    0
}

/// The running task's `sum_exec_runtime`, if readable.
#[inline(always)]
fn runtime_of(task: *const u8) -> Option<u64> {
    let off = offsets();
    if off.valid == 0 {
        return None;
    }
    task::read(task, off.task_sum_exec_runtime).ok()
}

/// Charges the current task what it ran since its last charge; at a switch
/// (`next` given) also its pending syscalls and socket counts, and the
/// interval's time no task ran.
#[inline(always)]
fn charge_current(next: Option<*const u8>) {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(st) = CPU_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the pointer is this CPU's entry, valid for the program's run;
    // its writers (these programs, sys_enter, the socket probes) run on this CPU only.
    let st = unsafe { &mut *st };
    let last = st.last_switch_ns;
    st.last_switch_ns = now;
    let cur = task::current();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;

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
        && let Some(rt) = runtime_of(cur)
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
    if let Some(next) = next {
        usage.syscalls = st.pending_syscalls;
        usage.syscalls_by_class = st.pending_by_class;
        usage.net = st.pending_net;
        st.pending_syscalls = 0;
        st.pending_by_class = [0; SYSCALL_CLASSES];
        st.pending_net = [0; NET_COUNTERS];
        let rt = runtime_of(next).unwrap_or(0);
        st.cur_task = next as u64;
        st.cur_runtime_ns = rt;
        st.interval_start_ns = now;
        st.interval_start_runtime_ns = rt;
    }

    let epoch = epoch();
    let b = &mut st.buckets[(epoch & 1) as usize];
    b.irq_steal_ns += irq_steal;
    b.charged_ns += irq_steal;
    charge(b, &usage, epoch, tgid);
    st.acked_epoch = epoch;
}

/// Puts one interval's usage in the process map or in one of the node buckets.
#[inline(always)]
fn charge(b: &mut Buckets, usage: &ProcUsage, epoch: u32, tgid: u32) {
    b.charged_ns += usage.cpu_ns;
    if tgid == 0 {
        b.idle_ns += usage.cpu_ns;
        // The idle task makes no syscalls and sends nothing; anything pending has no owner left.
        b.unattributed_syscalls += usage.syscalls;
        add_net(&mut b.unattributed_net, &usage.net);
        return;
    }
    match task::who(task::current()) {
        Ok(Who::Kernel) => {
            b.kernel_ns += usage.cpu_ns;
            b.kernel_syscalls += usage.syscalls;
            add_net(&mut b.kernel_net, &usage.net);
        }
        Ok(Who::Process { start_ns }) => {
            let key = ProcKey {
                start_ns,
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                tgid,
                epoch,
            };
            if !fold(&key, usage) {
                b.map_full_drops += 1;
                unattributed(b, usage);
            }
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
