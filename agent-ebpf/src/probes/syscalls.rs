//! Syscall counts: the hot path. One per-CPU array lookup and two increments;
//! the counts are folded into the process's entry at its next context switch.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

use crate::maps::{CPU_STATE, syscall_class};

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    // sys_enter's TP_PROTO is (struct pt_regs *regs, long id).
    let nr: u64 = ctx.arg(1);
    let class = syscall_class(nr);
    if let Some(st) = CPU_STATE.get_ptr_mut(0) {
        // SAFETY: this CPU's entry; sched_switch, the only other writer of
        // these fields, runs on this CPU with IRQs off, never concurrently.
        unsafe {
            (*st).pending_syscalls += 1;
            if let Some(c) = (*st).pending_by_class.get_mut(class) {
                *c += 1;
            }
        }
    }
    0
}
