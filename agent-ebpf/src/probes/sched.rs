//! CPU time: charge each on-CPU interval to the task that ran it.
//!
//! `sched_switch` fires in the context of the outgoing task (`current` is
//! still `prev`), so the interval since the last switch on this CPU belongs
//! to `current`: no need to read `prev` from the tracepoint's arguments.
//! A per-CPU timer (`cpu_tick`, a perf event) charges the running task's
//! interval so far, so a task that never blocks still shows up in every
//! window, not only when it is finally switched out.

use agent_common::{Buckets, NET_COUNTERS, ProcKey, ProcUsage, SYSCALL_CLASSES};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{perf_event, raw_tracepoint},
    programs::{PerfEventContext, RawTracePointContext},
};

use crate::{
    maps::{CPU_STATE, PROC_USAGE, epoch},
    task::{self, Who},
};

/// -EEXIST: another CPU inserted the same key between our lookup and insert.
const EEXIST: i32 = -17;

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(_ctx: RawTracePointContext) -> i32 {
    charge_current(true);
    0
}

#[perf_event]
pub fn cpu_tick(_ctx: PerfEventContext) -> u32 {
    // Syscall counts stay pending: `sys_enter` may be mid-increment under
    // this interrupt, and only `sched_switch` (IRQs off) can take them safely.
    charge_current(false);
    0
}

/// Charges the time since the last charge on this CPU (and, at a switch,
/// the pending syscalls) to the current task.
#[inline(always)]
fn charge_current(take_syscalls: bool) {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(st) = CPU_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the pointer is this CPU's entry, valid for the program's run;
    // both writers (this and sys_enter) run on this CPU only.
    let st = unsafe { &mut *st };
    let last = st.last_switch_ns;
    st.last_switch_ns = now;
    // Before the first event on this CPU we do not know when the running
    // task started: accounted time begins here.
    let cpu_ns = if last == 0 {
        st.first_switch_ns = now;
        0
    } else {
        now.saturating_sub(last)
    };
    let mut usage = ProcUsage {
        cpu_ns,
        syscalls: 0,
        syscalls_by_class: [0; SYSCALL_CLASSES],
        net: [0; NET_COUNTERS],
    };
    if take_syscalls {
        usage.syscalls = st.pending_syscalls;
        usage.syscalls_by_class = st.pending_by_class;
        usage.net = st.pending_net;
        st.pending_syscalls = 0;
        st.pending_by_class = [0; SYSCALL_CLASSES];
        st.pending_net = [0; NET_COUNTERS];
    }

    let epoch = epoch();
    charge(&mut st.buckets[(epoch & 1) as usize], &usage, epoch);
    st.acked_epoch = epoch;
}

/// Puts one interval's usage in the process map or in one of the node buckets.
#[inline(always)]
fn charge(b: &mut Buckets, usage: &ProcUsage, epoch: u32) {
    b.charged_ns += usage.cpu_ns;

    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
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
