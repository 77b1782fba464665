//! Empty programs on the same hooks, for the benchmark's floor: the cost any
//! program on these hooks pays before doing anything. Never attached by the agent.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};

#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn floor_sys_enter(_ctx: RawTracePointContext) -> i32 {
    0
}

#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn floor_sched_switch(_ctx: RawTracePointContext) -> i32 {
    0
}
