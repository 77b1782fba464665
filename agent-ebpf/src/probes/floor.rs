//! Empty programs on the same hooks, for the benchmark's floor: the cost any
//! program on these hooks pays before doing anything. Never attached by the
//! agent; `mentat-agent attach --mode floor` attaches them instead of the
//! metering programs, one for each hook a workload can fire often.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn floor_sys_enter(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn floor_sched_switch(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn floor_process_fork(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn floor_process_exec(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn floor_process_exit(_ctx: RawTracePointContext) -> i32 {
    0
}
