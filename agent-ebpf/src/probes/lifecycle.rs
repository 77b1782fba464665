//! Process lifecycle: fork, exec and exit events through the ring buffer.
//!
//! These carry metadata only (who, parent, name, start time). Usage stays in
//! the maps, so a lost event costs a name, never a nanosecond.

use agent_common::{ENV_COPY_MAX, EnvHeader, ProcEvent, event_kind};
use aya_ebpf::{
    cty::c_void,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_boot_ns, bpf_probe_read_kernel_str_bytes, generated::bpf_probe_read_user,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};

use crate::{
    maps::{CPU_STATE, ENV_EVENTS, ENV_SCRATCH, EVENTS, off},
    task,
};

/// `sched_process_fork(struct task_struct *parent, struct task_struct *child)`.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn process_fork(ctx: RawTracePointContext) -> i32 {
    let _ = try_fork(&ctx);
    0
}

fn try_fork(ctx: &RawTracePointContext) -> Result<(), i64> {
    if off!(valid) == 0 {
        return Err(-1);
    }
    let child: *const u8 = ctx.arg(1);
    let pid: u32 = task::read(child, off!(task_pid))?;
    let tgid: u32 = task::read(child, off!(task_tgid))?;
    if pid != tgid {
        // A new thread, not a new process.
        return Ok(());
    }
    let start_ns: u64 = task::read(child, off!(task_start_boottime))?;
    let ppid = (bpf_get_current_pid_tgid() >> 32) as u32;
    emit(event_kind::FORK, tgid, ppid, start_ns, None, [0; 3])
}

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn process_exec(ctx: RawTracePointContext) -> i32 {
    let _ = try_exec(&ctx);
    0
}

fn try_exec(ctx: &RawTracePointContext) -> Result<(), i64> {
    if off!(valid) == 0 {
        return Err(-1);
    }
    let cur = task::current();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let parent: *const u8 = task::read(cur, off!(task_real_parent))?;
    let ppid: u32 = task::read(parent, off!(task_tgid))?;
    let start_ns = task::leader_start_ns(cur)?;
    let bprm: *const u8 = ctx.arg(2);
    let filename: *const u8 = task::read(bprm, off!(binprm_filename))?;
    // Before the EXEC event: userspace drains EVENTS first, so an EXEC it
    // sees always has its environment copy already in ENV_EVENTS.
    copy_env(cur, tgid, start_ns);
    emit(
        event_kind::EXEC,
        tgid,
        ppid,
        start_ns,
        Some(filename),
        [0; 3],
    )
}

/// `sched_process_exit(struct task_struct *p)`; reported once the last thread exits.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn process_exit(_ctx: RawTracePointContext) -> i32 {
    let _ = try_exit();
    0
}

fn try_exit() -> Result<(), i64> {
    if off!(valid) == 0 {
        return Err(-1);
    }
    let cur = task::current();
    // do_exit decrements signal->live before this tracepoint: zero means
    // this is the process's last thread.
    let signal: *const u8 = task::read(cur, off!(task_signal))?;
    let live: i32 = task::read(signal, off!(signal_live))?;
    if live != 0 {
        return Ok(());
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let parent: *const u8 = task::read(cur, off!(task_real_parent))?;
    let ppid: u32 = task::read(parent, off!(task_tgid)).unwrap_or(0);
    let start_ns = task::leader_start_ns(cur)?;
    // The process's storage I/O: threads already gone are summed in
    // signal->ioac; this last thread's own is not folded in until release.
    let io = [
        off!(ioac_read_bytes),
        off!(ioac_write_bytes),
        off!(ioac_cancelled_write_bytes),
    ];
    let mut totals = [0u64; 3];
    let mut i = 0;
    while i < 3 {
        let mine: u64 = task::read(cur, off!(task_ioac) + io[i]).unwrap_or(0);
        let gone: u64 = task::read(signal, off!(signal_ioac) + io[i]).unwrap_or(0);
        totals[i] = mine + gone;
        i += 1;
    }
    emit(event_kind::EXIT, tgid, ppid, start_ns, None, totals)
}

/// Copies the new program's environment block (the first `ENV_COPY_MAX`
/// bytes) to `ENV_EVENTS`. No parsing here: the agent keeps only the
/// allowlisted variables and drops the rest. A process that exits before
/// the agent could read /proc/<pid>/environ keeps its own run context this way.
#[inline(always)]
fn copy_env(cur: *const u8, tgid: u32, start_ns: u64) {
    let Ok(mm) = task::read::<*const u8>(cur, off!(task_mm)) else {
        return;
    };
    let (Ok(start), Ok(end)) = (
        task::read::<u64>(mm, off!(mm_env_start)),
        task::read::<u64>(mm, off!(mm_env_end)),
    ) else {
        return;
    };
    let total = end.saturating_sub(start);
    let Some(scratch) = ENV_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let copied = if total > ENV_COPY_MAX as u64 {
        ENV_COPY_MAX as u32
    } else {
        total as u32
    };
    // SAFETY: `scratch` is this CPU's entry, used by this program only and
    // never across a sleep; `copied` ≤ ENV_COPY_MAX bounds both the read
    // into `bytes` and the output of header + bytes.
    unsafe {
        (*scratch).header = EnvHeader {
            tgid,
            copied: 0,
            start_ns,
            total,
        };
        let bytes = (*scratch).bytes.as_mut_ptr();
        let n = copied & (ENV_COPY_MAX as u32 * 2 - 1);
        if n > ENV_COPY_MAX as u32 {
            return;
        }
        if bpf_probe_read_user(bytes.cast::<c_void>(), n, start as *const c_void) != 0 {
            return;
        }
        (*scratch).header.copied = n;
        let size = core::mem::size_of::<EnvHeader>() + n as usize;
        let copy = core::slice::from_raw_parts(scratch.cast::<u8>().cast_const(), size);
        if ENV_EVENTS.output::<[u8]>(copy, 0).is_err()
            && let Some(st) = CPU_STATE.get_ptr_mut(0)
        {
            (*st).envs_lost += 1;
        }
    }
}

#[inline(always)]
fn emit(
    kind: u32,
    tgid: u32,
    ppid: u32,
    start_ns: u64,
    filename: Option<*const u8>,
    io: [u64; 3],
) -> Result<(), i64> {
    let Some(mut entry) = EVENTS.reserve::<ProcEvent>(0) else {
        if let Some(st) = CPU_STATE.get_ptr_mut(0) {
            // SAFETY: this CPU's entry; a plain counter bump.
            unsafe { (*st).events_lost += 1 };
        }
        return Err(-1);
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable ProcEvent in the ring buffer;
    // every field is written before submit.
    unsafe {
        (*ev).kind = kind;
        (*ev).tgid = tgid;
        (*ev).ppid = ppid;
        (*ev)._pad = 0;
        (*ev).start_ns = start_ns;
        (*ev).ts_ns = bpf_ktime_get_boot_ns();
        (*ev).cgroup_id = bpf_get_current_cgroup_id();
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).io_read_bytes = io[0];
        (*ev).io_write_bytes = io[1];
        (*ev).io_cancelled_write_bytes = io[2];
        (*ev).filename[0] = 0;
        if let Some(src) = filename {
            let _ = bpf_probe_read_kernel_str_bytes(src, &mut (*ev).filename);
        }
    }
    entry.submit(0);
    Ok(())
}
