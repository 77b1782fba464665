//! Closes usage windows: reads a closed epoch from the probes, joins it with
//! process lifecycle and procfs metadata, and yields per-instance deltas plus
//! the node buckets. One call to [`Collector::close_window`] is one tick.

use std::{collections::HashMap, path::PathBuf, time::SystemTime};

use agent_common::{Buckets, PF_KTHREAD, ProcEvent, event_kind};
use tracing::{debug, warn};

use crate::{
    clock::{Clock, monotonic_ns},
    identity::{self, Cgroups},
    probes::{ProbeError, Probes},
    usage::{InstanceKey, Metered},
};

/// What is known about a process instance (tgid, start).
#[derive(Clone, Debug, Default)]
pub struct ProcessInfo {
    /// The parent instance, when seen forking (or found in procfs).
    pub parent: Option<(u32, u64)>,
    /// Parent pid, where known.
    pub ppid: Option<u32>,
    /// Short name (`comm`).
    pub comm: String,
    /// Executable path, where known.
    pub exe: Option<String>,
    /// When it exited (CLOCK_MONOTONIC ns), if it has.
    pub exited_ns: Option<u64>,
    /// A kernel thread (its usage is in the kernel bucket; listed for completeness).
    pub kernel_thread: bool,
}

/// The node buckets' deltas over one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeBuckets {
    /// All time charged in the window.
    pub charged_ns: u64,
    /// Idle.
    pub idle: Metered,
    /// Kernel threads.
    pub kernel: Metered,
    /// No process entry (map full, unreadable task).
    pub unattributed: Metered,
    /// Folds that found the process map full.
    pub map_full_drops: u64,
    /// Folds whose task could not be read.
    pub task_read_errors: u64,
}

impl NodeBuckets {
    /// Adds another window's buckets.
    pub fn add(&mut self, o: &NodeBuckets) {
        self.charged_ns += o.charged_ns;
        self.idle.add(&o.idle);
        self.kernel.add(&o.kernel);
        self.unattributed.add(&o.unattributed);
        self.map_full_drops += o.map_full_drops;
        self.task_read_errors += o.task_read_errors;
    }
}

/// One closed window.
#[derive(Clone, Debug)]
pub struct Window {
    /// Start, CLOCK_MONOTONIC ns.
    pub start_ns: u64,
    /// End, CLOCK_MONOTONIC ns.
    pub end_ns: u64,
    /// Start, wall clock.
    pub start: SystemTime,
    /// End, wall clock.
    pub end: SystemTime,
    /// Usage per process instance and cgroup.
    pub processes: Vec<(InstanceKey, Metered)>,
    /// The node buckets.
    pub buckets: NodeBuckets,
    /// Lifecycle events lost in the window.
    pub events_lost: u64,
    /// False when a CPU was late to acknowledge the epoch (its late usage is in the next window).
    pub exact: bool,
}

impl Window {
    /// Σ cpu_ns of processes and buckets: equals `buckets.charged_ns` when nothing is lost.
    pub fn attributed_cpu_ns(&self) -> u64 {
        let b = &self.buckets;
        self.processes.iter().map(|(_, m)| m.cpu_ns).sum::<u64>()
            + b.idle.cpu_ns
            + b.kernel.cpu_ns
            + b.unattributed.cpu_ns
    }
}

/// Turns probe epochs into windows, and keeps process metadata.
pub struct Collector {
    probes: Probes,
    clock: Clock,
    cgroups: Cgroups,
    proc_root: PathBuf,
    infos: HashMap<(u32, u64), ProcessInfo>,
    /// tgid → start of the live instance with that pid, to resolve parents.
    live: HashMap<u32, u64>,
    /// Cumulative bucket values per epoch parity at the last close of that parity.
    prev_buckets: [Buckets; 2],
    prev_events_lost: u64,
    window_start_ns: u64,
}

impl Collector {
    /// A collector over loaded probes. The first window starts now.
    pub fn new(probes: Probes) -> Self {
        Self {
            probes,
            clock: Clock::new(),
            cgroups: Cgroups::discover(),
            proc_root: PathBuf::from("/proc"),
            infos: HashMap::new(),
            live: HashMap::new(),
            prev_buckets: [Buckets::default(); 2],
            prev_events_lost: 0,
            window_start_ns: monotonic_ns(),
        }
    }

    /// The probes, for statistics.
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// The wall/monotonic clock mapping.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Applies the lifecycle events waiting in the ring buffer. Call often
    /// (the buffer is finite); `close_window` calls it too.
    pub fn poll_events(&mut self) {
        let mut events = Vec::new();
        self.probes.drain_events(|ev| events.push(*ev));
        for ev in &events {
            self.apply_event(ev);
        }
    }

    fn apply_event(&mut self, ev: &ProcEvent) {
        let comm = identity::c_name(&ev.comm);
        match ev.kind {
            event_kind::FORK => {
                let parent = self.live.get(&ev.ppid).map(|&s| (ev.ppid, s));
                let inherited = parent.and_then(|p| self.infos.get(&p)).cloned();
                self.live.insert(ev.tgid, ev.start_ns);
                let info = self.infos.entry((ev.tgid, ev.start_ns)).or_default();
                info.parent = parent;
                info.ppid = Some(ev.ppid);
                info.comm = comm;
                // A forked child runs its parent's program until it execs.
                info.exe = inherited.and_then(|p| p.exe);
            }
            event_kind::EXEC => {
                self.live.insert(ev.tgid, ev.start_ns);
                let proc_root = self.proc_root.clone();
                let info = self.infos.entry((ev.tgid, ev.start_ns)).or_default();
                if info.ppid.is_none() {
                    info.ppid = Some(ev.ppid);
                }
                info.comm = comm;
                // /proc/<pid>/exe is absolute and resolved; the execve argument
                // may be relative. The process may already be gone, though.
                info.exe = identity::read_exe(&proc_root, ev.tgid)
                    .or_else(|| Some(identity::c_name(&ev.filename)).filter(|s| !s.is_empty()));
            }
            event_kind::EXIT => {
                if self.live.get(&ev.tgid) == Some(&ev.start_ns) {
                    self.live.remove(&ev.tgid);
                }
                let info = self.infos.entry((ev.tgid, ev.start_ns)).or_default();
                if info.comm.is_empty() {
                    info.comm = comm;
                }
                if info.ppid.is_none() {
                    info.ppid = Some(ev.ppid);
                }
                info.exited_ns = Some(ev.ts_ns);
            }
            other => debug!(kind = other, "unknown lifecycle event kind"),
        }
    }

    /// Closes the current window and returns its usage.
    pub fn close_window(&mut self) -> Result<Window, ProbeError> {
        self.poll_events();
        let old_epoch = self.probes.current_epoch();
        let epoch = self.probes.close_epoch()?;
        let end_ns = monotonic_ns();
        // Events emitted up to the epoch switch name the processes in it.
        self.poll_events();

        let slot = (old_epoch & 1) as usize;
        let prev = self.prev_buckets.get(slot).copied().unwrap_or_default();
        let buckets = bucket_delta(&epoch.buckets, &prev);
        if let Some(p) = self.prev_buckets.get_mut(slot) {
            *p = epoch.buckets;
        }
        let events_lost = epoch.events_lost.saturating_sub(self.prev_events_lost);
        self.prev_events_lost = epoch.events_lost;
        if events_lost > 0 {
            warn!(
                events_lost,
                "lifecycle ring buffer overflowed: some process names are missing (usage is kept)"
            );
        }
        if buckets.map_full_drops > 0 {
            warn!(
                drops = buckets.map_full_drops,
                unattributed_ns = buckets.unattributed.cpu_ns,
                "process map full: usage went to the unattributed bucket (raise proc_map_entries)"
            );
        }

        let mut processes: Vec<(InstanceKey, Metered)> = epoch
            .processes
            .iter()
            .map(|(k, u)| {
                (
                    InstanceKey {
                        tgid: k.tgid,
                        start_ns: k.start_ns,
                        cgroup_id: k.cgroup_id,
                    },
                    Metered::from(u),
                )
            })
            .collect();
        processes.sort_by_key(|(k, _)| *k);
        for (k, _) in &processes {
            self.ensure_info(k.tgid, k.start_ns);
        }

        let start_ns = self.window_start_ns;
        self.window_start_ns = end_ns;
        Ok(Window {
            start_ns,
            end_ns,
            start: self.clock.to_wall(start_ns),
            end: self.clock.to_wall(end_ns),
            processes,
            buckets,
            events_lost,
            exact: epoch.all_cpus_acked,
        })
    }

    /// Metadata of an instance, read from procfs the first time it is seen
    /// without lifecycle events (it predates the agent, or its events were lost).
    fn ensure_info(&mut self, tgid: u32, start_ns: u64) {
        if self.infos.contains_key(&(tgid, start_ns)) {
            return;
        }
        let mut info = ProcessInfo::default();
        if let Some(stat) = identity::read_stat(&self.proc_root, tgid)
            && identity::same_instance(&stat, start_ns)
        {
            info.ppid = Some(stat.ppid);
            info.parent = self.live.get(&stat.ppid).map(|&s| (stat.ppid, s));
            info.comm = stat.comm;
            info.kernel_thread = stat.flags & PF_KTHREAD != 0;
            info.exe = identity::read_exe(&self.proc_root, tgid);
            self.live.entry(tgid).or_insert(start_ns);
        }
        self.infos.insert((tgid, start_ns), info);
    }

    /// Forgets instances that exited before `before_ns`: nothing can be charged
    /// to them any more. The daemon calls this once a window's records are out.
    pub fn forget_exited_before(&mut self, before_ns: u64) {
        self.infos
            .retain(|_, i| i.exited_ns.is_none_or(|t| t >= before_ns));
    }

    /// What is known about instance (tgid, start).
    pub fn info(&self, tgid: u32, start_ns: u64) -> Option<&ProcessInfo> {
        self.infos.get(&(tgid, start_ns))
    }

    /// The path of cgroup `id` under the v2 mount.
    pub fn cgroup_path(&mut self, id: u64) -> Option<String> {
        self.cgroups.path_of(id)
    }

    /// The live instance with pid `tgid`, if known.
    pub fn live_instance(&self, tgid: u32) -> Option<u64> {
        self.live.get(&tgid).copied()
    }
}

fn bucket_delta(now: &Buckets, prev: &Buckets) -> NodeBuckets {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    NodeBuckets {
        charged_ns: d(now.charged_ns, prev.charged_ns),
        idle: Metered {
            cpu_ns: d(now.idle_ns, prev.idle_ns),
            ..Default::default()
        },
        kernel: Metered {
            cpu_ns: d(now.kernel_ns, prev.kernel_ns),
            syscalls: d(now.kernel_syscalls, prev.kernel_syscalls),
            ..Default::default()
        },
        unattributed: Metered {
            cpu_ns: d(now.unattributed_ns, prev.unattributed_ns),
            syscalls: d(now.unattributed_syscalls, prev.unattributed_syscalls),
            ..Default::default()
        },
        map_full_drops: d(now.map_full_drops, prev.map_full_drops),
        task_read_errors: d(now.task_read_errors, prev.task_read_errors),
    }
}
