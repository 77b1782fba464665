//! Reads of kernel task fields at offsets resolved from BTF.

use agent_common::PF_KTHREAD;
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::offsets;

/// Reads a `T` at `base + off` in kernel memory.
#[inline(always)]
pub fn read<T>(base: *const u8, off: u32) -> Result<T, i64> {
    if base.is_null() {
        return Err(-1);
    }
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(off as usize) as *const T) }
        .map_err(|e| e as i64)
}

/// The current task's `task_struct`.
#[inline(always)]
pub fn current() -> *const u8 {
    // SAFETY: the helper has no preconditions in tracing programs.
    unsafe { bpf_get_current_task() as *const u8 }
}

/// What a fold needs to know about the running task.
pub enum Who {
    /// A kernel thread: billed to the node's kernel bucket.
    Kernel,
    /// A user process, identified by its group leader's start time.
    Process { start_ns: u64 },
}

/// Classifies `task` and finds its process's start time.
#[inline(always)]
pub fn who(task: *const u8) -> Result<Who, i64> {
    let off = offsets();
    if off.valid == 0 {
        return Err(-1);
    }
    let flags: u32 = read(task, off.task_flags)?;
    if flags & PF_KTHREAD != 0 {
        return Ok(Who::Kernel);
    }
    let start_ns = leader_start_ns(task)?;
    Ok(Who::Process { start_ns })
}

/// `task->group_leader->start_boottime`: the process instance's start.
#[inline(always)]
pub fn leader_start_ns(task: *const u8) -> Result<u64, i64> {
    let off = offsets();
    let leader: *const u8 = read(task, off.task_group_leader)?;
    read(leader, off.task_start_boottime)
}
