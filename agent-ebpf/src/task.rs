//! Reads of kernel task fields at offsets resolved from BTF.

use agent_common::PF_KTHREAD;
use aya_ebpf::helpers::{bpf_get_current_task, bpf_probe_read_kernel};

use crate::maps::off;

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
    /// A user process: its group leader's start time, and the cgroup it runs in.
    Process { start_ns: u64, cgroup_id: u64 },
}

/// Classifies the current task `task` and finds its process's start time and cgroup.
#[inline(always)]
pub fn who(task: *const u8) -> Result<Who, i64> {
    if off!(valid) == 0 {
        return Err(-1);
    }
    let flags: u32 = read(task, off!(task_flags))?;
    if flags & PF_KTHREAD != 0 {
        return Ok(Who::Kernel);
    }
    let start_ns = leader_start_ns(task)?;
    // SAFETY: no preconditions in tracing programs; `task` is current here.
    let cgroup_id = unsafe { aya_ebpf::helpers::bpf_get_current_cgroup_id() };
    Ok(Who::Process {
        start_ns,
        cgroup_id,
    })
}

/// `task->group_leader->start_boottime`: the process instance's start.
#[inline(always)]
pub fn leader_start_ns(task: *const u8) -> Result<u64, i64> {
    let leader: *const u8 = read(task, off!(task_group_leader))?;
    read(leader, off!(task_start_boottime))
}

/// Reads a `T` at `base + off` where `base` is a BTF-typed kernel pointer
/// (a `tp_btf` argument): the verifier turns the load into a fault-safe
/// direct load, ~1 ns instead of a helper call. `off` must come from the
/// frozen `.rodata` offsets, so the verifier sees a constant it can check
/// against the kernel's type.
#[inline(always)]
pub fn load<T: Copy>(base: *const u8, off: u32) -> T {
    // SAFETY: see above; the kernel catches a faulting BTF load and yields 0.
    unsafe { core::ptr::read_volatile(base.add(off as usize) as *const T) }
}

/// Classifies a BTF-typed task pointer with direct loads (see [`load`]).
#[inline(always)]
pub fn who_btf(task: *const u8) -> Who {
    if load::<u32>(task, off!(task_flags)) & PF_KTHREAD != 0 {
        return Who::Kernel;
    }
    let leader: *const u8 = load(task, off!(task_group_leader));
    // task->cgroups->dfl_cgrp->kn->id: what bpf_get_current_cgroup_id returns.
    let css_set: *const u8 = load(task, off!(task_cgroups));
    let cgroup: *const u8 = load(css_set, off!(css_set_dfl_cgrp));
    let kn: *const u8 = load(cgroup, off!(cgroup_kn));
    Who::Process {
        start_ns: load(leader, off!(task_start_boottime)),
        cgroup_id: load(kn, off!(kernfs_node_id)),
    }
}
