//! Closes usage windows: reads a closed epoch from the probes, joins it with
//! process lifecycle and procfs metadata and with sampled memory and disk
//! usage, and yields per-instance deltas plus the node buckets. One call to
//! [`Collector::close_window`] is one tick.
//!
//! Stage 2. In: epochs from `probes`, process identity from `identity`.
//! Out: a [`Window`] of [`metered::Metered`] usage per process instance.

pub mod gpu;
pub mod memory;
pub mod metered;
pub mod storage;

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use agent_common::{Buckets, NET_COUNTERS, PF_KTHREAD, ProcEvent, event_kind};
use tracing::{debug, warn};

use crate::{
    collect::{
        gpu::GpuMeter,
        memory::{CgroupIntegrator, Integrator},
        metered::{InstanceKey, Metered, Net},
        storage::StorageMeter,
    },
    identity::run::RunContext,
    identity::{
        env::{EnvContext, context_from_environ, read_env_context},
        pods::{PodDirectory, PodName},
        process::{self, Cgroups, ProcReader, instance_start},
        workload::{self, CgroupIdentity, WasmIdentity},
    },
    probes::{
        ProbeError, Probes,
        clock::{Clock, boottime_ns},
    },
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
    /// When it exited (CLOCK_BOOTTIME ns), if it has.
    pub exited_ns: Option<u64>,
    /// A kernel thread (its usage is in the kernel bucket; listed for completeness).
    pub kernel_thread: bool,
    /// The WASM runtime and module, when the process is one.
    pub wasm: Option<WasmIdentity>,
    /// The cgroup it exited in.
    pub exit_cgroup: Option<u64>,
    /// Its run context: from its environment at exec, else inherited from its parent.
    pub context: RunContext,
    /// Its pid inside its container's pid namespace (`None`: the host's), which
    /// is what an SDK in the container reports as `process.pid`.
    pub ns_pid: Option<u32>,
    /// Born after metering began (its FORK or EXEC event says so by the
    /// kernel's exact start): it had no memory and no I/O before its first
    /// reading. Not decidable from the instance key, whose start is cut to
    /// clock ticks, which can put a child of the first 10 ms before it.
    pub born_metered: bool,
}

/// A cgroup's path under the v2 mount and what it says about the workload.
#[derive(Clone, Debug, Default)]
pub struct CgroupName {
    /// The path relative to the v2 mount, when it resolved.
    pub path: Option<String>,
    /// Container, runtime, pod found in the path.
    pub identity: CgroupIdentity,
}

/// Who an instance was when its window closed: what its records are named
/// by. The collector attaches it to the window, so a report needs nothing
/// else from the collector.
#[derive(Clone, Debug)]
pub struct Named {
    /// The process's metadata at the close (shared with the collector until it changes).
    pub info: Arc<ProcessInfo>,
    /// Its cgroup.
    pub cgroup: Arc<CgroupName>,
    /// Its pod's namespace and name, when the pod list knows the pod.
    pub pod: Option<PodName>,
    /// Its start, wall clock.
    pub start: SystemTime,
    /// Where the usage handed over with it begins (CLOCK_BOOTTIME ns): the
    /// window's start, or for a process that did not run in the windows
    /// before, the end of the last window it was handed over in. Its
    /// records span from here to the window's end.
    pub since_ns: u64,
    /// `since_ns`, wall clock.
    pub since: SystemTime,
}

impl Default for Named {
    fn default() -> Self {
        Self {
            info: Arc::default(),
            cgroup: Arc::default(),
            pod: None,
            start: UNIX_EPOCH,
            since_ns: 0,
            since: UNIX_EPOCH,
        }
    }
}

/// The node buckets' deltas over one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeBuckets {
    /// All time charged in the window.
    pub charged_ns: u64,
    /// Idle.
    pub idle: Metered,
    /// Wall time no task ran: interrupts and hypervisor steal.
    pub irq_steal: Metered,
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
        self.irq_steal.add(&o.irq_steal);
        self.kernel.add(&o.kernel);
        self.unattributed.add(&o.unattributed);
        self.map_full_drops += o.map_full_drops;
        self.task_read_errors += o.task_read_errors;
    }
}

/// One closed window.
#[derive(Clone, Debug)]
pub struct Window {
    /// Start, CLOCK_BOOTTIME ns.
    pub start_ns: u64,
    /// End, CLOCK_BOOTTIME ns.
    pub end_ns: u64,
    /// Start, wall clock.
    pub start: SystemTime,
    /// End, wall clock.
    pub end: SystemTime,
    /// Usage per process instance and cgroup.
    pub processes: Vec<(InstanceKey, Metered)>,
    /// Who each instance in `processes` is, as of the close.
    pub names: HashMap<InstanceKey, Named>,
    /// ∫ cgroup memory dt (byte-ns) per memory counter file.
    pub cgroup_memory: HashMap<PathBuf, u128>,
    /// The memory counter file of each cgroup in the window that has one.
    pub cgroup_counters: HashMap<u64, PathBuf>,
    /// Bytes on the writable layer of each container seen in the window, where measured.
    pub storage: HashMap<String, u64>,
    /// The node buckets.
    pub buckets: NodeBuckets,
    /// Lifecycle events lost in the window.
    pub events_lost: u64,
    /// NVML errors at the window's GPU reading (0 or 1: its GPU data was skipped).
    pub gpu_errors: u64,
    /// False when a CPU was late to acknowledge the epoch (its late usage is in the next window).
    pub exact: bool,
}

impl Window {
    /// Σ cpu_ns of processes and buckets: equals `buckets.charged_ns` when nothing is lost.
    pub fn attributed_cpu_ns(&self) -> u64 {
        let b = &self.buckets;
        self.processes.iter().map(|(_, m)| m.cpu_ns).sum::<u64>()
            + b.idle.cpu_ns
            + b.irq_steal.cpu_ns
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
    infos: HashMap<(u32, u64), Arc<ProcessInfo>>,
    /// tgid → start of the live instance with that pid, to resolve parents.
    live: HashMap<u32, u64>,
    /// The cgroup each instance was last seen in (memory and disk go there).
    cgroup_of: HashMap<(u32, u64), u64>,
    /// What each cgroup's path says about its workload.
    cgroup_identity: HashMap<u64, Arc<CgroupName>>,
    mem: Integrator,
    cgroup_mem: CgroupIntegrator,
    v1_memory_root: Option<PathBuf>,
    /// Each cgroup's memory counter file, once resolved (`None`: it has none).
    cgroup_counter: HashMap<u64, Option<PathBuf>>,
    pods: PodDirectory,
    gpu: Option<GpuMeter>,
    bad_traceparents: u64,
    storage: Option<StorageMeter>,
    /// Containers seen running since the last window closed.
    containers_seen: HashMap<String, u32>,
    sample_every: Duration,
    last_sample_ns: u64,
    /// How often processes that did not run are read again, and `/proc` swept for
    /// processes the agent has no event of.
    idle_every: Duration,
    /// When the current sweep of `/proc` began (0: none yet; the first close
    /// sweeps all at once).
    last_sweep_ns: u64,
    /// The pids listed at the sweep's start, read a slice per close over the
    /// first half of `idle_every`, so that no tick reads them all (issue 13).
    sweep_pids: Vec<u32>,
    /// How many of `sweep_pids` were read.
    sweep_done: usize,
    /// Instances found gone at the sweep's start (their exit event was lost):
    /// handed over at the next close, carried to it.
    gone_due: Vec<(u32, u64)>,
    /// One live member per cgroup (the oldest), to read the cgroup's memory
    /// counter and find its container's layer; rebuilt from `live` only when
    /// a member exited or moved or a cgroup appeared, so an idle tick does
    /// not walk every process.
    cgroup_member: HashMap<u64, (u32, u64)>,
    /// `cgroup_member` needs a rebuild.
    members_dirty: bool,
    /// Instances with an exit time, until forgotten: what
    /// [`Collector::forget_exited_before`] looks at, instead of every instance.
    exited: Vec<(u32, u64)>,
    /// Instances read at every sample: those that ran in the last window or were
    /// born or exec'd since. The others are carried at their last reading.
    active: HashSet<(u32, u64)>,
    /// Reads procfs files into one reused buffer.
    reader: ProcReader,
    /// Where each tracked instance's usage not yet handed over begins.
    span_start: HashMap<(u32, u64), u64>,
    /// Hand every instance over at the next close (the last window).
    flush_all: bool,
    page_size: u64,
    /// When metering began: usage of older processes before it is not ours.
    metered_since_ns: u64,
    /// Cumulative bucket values per epoch parity at the last close of that parity.
    prev_buckets: [Buckets; 2],
    prev_events_lost: u64,
    window_start_ns: u64,
    /// Environments copied by the kernel at exec, by process instance, until
    /// their EXEC event is applied.
    exec_env: HashMap<(u32, u64), ExecEnv>,
    /// Calls of `poll` so far.
    polls: u64,
}

/// What a process's environment said at exec, from the kernel's copy.
#[derive(Debug)]
struct ExecEnv {
    env: EnvContext,
    /// The copy holds only the first `ENV_COPY_MAX` bytes.
    truncated: bool,
    /// The `poll` that drained it.
    seen: u64,
}

impl Collector {
    /// A collector over loaded probes, sampling memory and disk every
    /// `sample_every`. The first window starts now.
    pub fn new(probes: Probes, sample_every: Duration) -> Self {
        let now = boottime_ns();
        Self {
            probes,
            clock: Clock::new(),
            cgroups: Cgroups::discover(),
            proc_root: PathBuf::from("/proc"),
            infos: HashMap::new(),
            live: HashMap::new(),
            cgroup_of: HashMap::new(),
            cgroup_identity: HashMap::new(),
            mem: Integrator::default(),
            cgroup_mem: CgroupIntegrator::default(),
            v1_memory_root: fs::read_to_string("/proc/self/mountinfo")
                .ok()
                .and_then(|m| memory::find_v1_memory_mount(&m)),
            cgroup_counter: HashMap::new(),
            pods: PodDirectory::default(),
            gpu: None,
            bad_traceparents: 0,
            storage: None,
            containers_seen: HashMap::new(),
            sample_every,
            last_sample_ns: 0,
            idle_every: DEFAULT_IDLE_EVERY,
            last_sweep_ns: 0,
            sweep_pids: Vec::new(),
            sweep_done: 0,
            gone_due: Vec::new(),
            cgroup_member: HashMap::new(),
            members_dirty: true,
            exited: Vec::new(),
            active: HashSet::new(),
            span_start: HashMap::new(),
            flush_all: false,
            reader: ProcReader::new(std::path::Path::new("/proc")),
            page_size: memory::page_size(),
            metered_since_ns: now,
            prev_buckets: [Buckets::default(); 2],
            prev_events_lost: 0,
            exec_env: HashMap::new(),
            polls: 0,
            window_start_ns: now,
        }
    }

    /// Reads processes that did not run again every `idle_every` (and sweeps
    /// `/proc` for processes seen by no event as often); the default is 60 s.
    pub fn with_idle_interval(mut self, idle_every: Duration) -> Self {
        self.idle_every = idle_every;
        self
    }

    /// Meters GPUs with `gpu` (by default there is no GPU metering).
    pub fn with_gpu(mut self, gpu: GpuMeter) -> Self {
        self.gpu = Some(gpu);
        self
    }

    /// Measures containers' writable layers with `storage` (by default storage is absent).
    pub fn with_storage(mut self, storage: StorageMeter) -> Self {
        self.storage = Some(storage);
        self
    }

    /// `TRACEPARENT` values found malformed in environments (ignored).
    pub fn bad_traceparents(&self) -> u64 {
        self.bad_traceparents
    }

    /// Names pods from `pods` (by default no pod has a name).
    pub fn with_pods(mut self, pods: PodDirectory) -> Self {
        self.pods = pods;
        self
    }

    /// The namespace and name of pod `uid`, if the pod list knows it.
    pub fn pod_name(&self, uid: &str) -> Option<PodName> {
        self.pods.lookup(uid)
    }

    /// The probes, for statistics.
    pub fn probes(&self) -> &Probes {
        &self.probes
    }

    /// The wall/monotonic clock mapping.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// Applies the lifecycle events waiting in the ring buffer, and samples
    /// the memory and disk of the active processes when a sample is due. Call
    /// often (the ring buffer is finite).
    pub fn poll(&mut self) {
        self.drain();
        let now = boottime_ns();
        if now.saturating_sub(self.last_sample_ns) >= duration_ns(self.sample_every) {
            self.last_sample_ns = now;
            let active = std::mem::take(&mut self.active);
            for &(pid, start) in &active {
                self.sample_one(pid, start, now, false);
            }
            self.active = active;
        }
    }

    /// Applies the lifecycle events waiting in the ring buffer.
    fn drain(&mut self) {
        let mut events = Vec::new();
        self.probes.drain_events(|ev| events.push(*ev));
        // After the events: the kernel writes a copy before its EXEC event.
        let polls = self.polls;
        self.polls += 1;
        let exec_env = &mut self.exec_env;
        self.probes.drain_env(|h, bytes| {
            let truncated = h.total > u64::from(h.copied);
            // A cut copy may end inside a variable: only whole entries count.
            let whole = if truncated {
                &bytes[..bytes.iter().rposition(|&b| b == 0).map_or(0, |i| i + 1)]
            } else {
                bytes
            };
            exec_env.insert(
                (h.tgid, instance_start(h.start_ns)),
                ExecEnv {
                    env: context_from_environ(whole),
                    truncated,
                    seen: polls,
                },
            );
        });
        for ev in &events {
            self.apply_event(ev);
        }
        // A copy whose EXEC event was not in this poll or the next was lost
        // with that event.
        self.exec_env.retain(|_, e| e.seen == polls);
    }

    fn apply_event(&mut self, ev: &ProcEvent) {
        let comm = process::c_name(&ev.comm);
        let born_metered = ev.start_ns >= self.metered_since_ns;
        let ev = &ProcEvent {
            start_ns: instance_start(ev.start_ns),
            ..*ev
        };
        match ev.kind {
            event_kind::FORK => {
                let parent = self.live.get(&ev.ppid).map(|&s| (ev.ppid, s));
                let inherited = parent.and_then(|p| self.infos.get(&p)).cloned();
                self.live.insert(ev.tgid, ev.start_ns);
                self.active.insert((ev.tgid, ev.start_ns));
                let info = Arc::make_mut(self.infos.entry((ev.tgid, ev.start_ns)).or_default());
                info.parent = parent;
                info.ppid = Some(ev.ppid);
                info.comm = comm;
                info.born_metered = born_metered;
                info.ns_pid = process::read_ns_pid(&self.proc_root, ev.tgid);
                // A forked child runs its parent's program until it execs.
                if let Some(p) = inherited {
                    info.exe.clone_from(&p.exe);
                    info.wasm.clone_from(&p.wasm);
                    info.context.clone_from(&p.context);
                }
            }
            event_kind::EXEC => {
                self.live.insert(ev.tgid, ev.start_ns);
                self.active.insert((ev.tgid, ev.start_ns));
                let proc_root = self.proc_root.clone();
                let info = Arc::make_mut(self.infos.entry((ev.tgid, ev.start_ns)).or_default());
                if info.ppid.is_none() {
                    info.ppid = Some(ev.ppid);
                }
                info.comm = comm;
                info.born_metered |= born_metered;
                // /proc/<pid>/exe is absolute and resolved; the execve argument
                // may be relative. The process may already be gone, though.
                info.exe = process::read_exe(&proc_root, ev.tgid)
                    .or_else(|| Some(process::c_name(&ev.filename)).filter(|s| !s.is_empty()));
                info.wasm = detect_wasm(&proc_root, ev.tgid, &info.comm, info.exe.as_deref());
                info.ns_pid = process::read_ns_pid(&proc_root, ev.tgid);
                let parent_ctx = self
                    .live
                    .get(&ev.ppid)
                    .and_then(|&s| self.infos.get(&(ev.ppid, s)))
                    .map(|p| p.context.clone())
                    .unwrap_or_default();
                // The kernel's copy at exec is there even when the process has
                // already exited; a cut one is completed from /proc if it can be.
                let env = match self.exec_env.remove(&(ev.tgid, ev.start_ns)) {
                    Some(copy) if !copy.truncated => copy.env,
                    Some(copy) => read_env_context(&proc_root, ev.tgid).unwrap_or(copy.env),
                    None => read_env_context(&proc_root, ev.tgid).unwrap_or_default(),
                };
                if env.bad_traceparent {
                    self.bad_traceparents += 1;
                }
                let info = Arc::make_mut(self.infos.entry((ev.tgid, ev.start_ns)).or_default());
                // Exec'd with its own context: that wins, the rest is inherited.
                let mut ctx = env.context;
                ctx.inherit(if ctx.is_empty() {
                    &info.context
                } else {
                    &parent_ctx
                });
                ctx.inherit(&parent_ctx);
                info.context = ctx;
            }
            event_kind::EXIT => {
                if self.live.get(&ev.tgid) == Some(&ev.start_ns) {
                    self.live.remove(&ev.tgid);
                }
                self.active.remove(&(ev.tgid, ev.start_ns));
                let info = Arc::make_mut(self.infos.entry((ev.tgid, ev.start_ns)).or_default());
                // The name at exit is the latest: a process may rename itself
                // (prctl PR_SET_NAME) after exec.
                info.comm = comm;
                if info.ppid.is_none() {
                    info.ppid = Some(ev.ppid);
                }
                if info.exited_ns.is_none() {
                    self.exited.push((ev.tgid, ev.start_ns));
                }
                info.exited_ns = Some(ev.ts_ns);
                info.exit_cgroup = Some(ev.cgroup_id);
                self.mem.exit(
                    ev.tgid,
                    ev.start_ns,
                    ev.ts_ns,
                    ev.io_read_bytes,
                    ev.io_write_bytes,
                    born_metered,
                );
                // Its parent's I/O counters will include this process's at reap.
                if let Some(&parent_start) = self.live.get(&ev.ppid) {
                    self.mem.child_exited(
                        (ev.ppid, parent_start),
                        ev.io_read_bytes,
                        ev.io_write_bytes,
                    );
                }
                self.cgroup_of.insert((ev.tgid, ev.start_ns), ev.cgroup_id);
            }
            other => debug!(kind = other, "unknown lifecycle event kind"),
        }
    }

    /// Reads instance (pid, start) from procfs at `now` (with `peak`, its
    /// `status` for VmHWM, else the cheaper `statm`); false when it is not the
    /// live instance with that pid, a kernel thread, or unreadable.
    fn sample_one(&mut self, pid: u32, start: u64, now: u64, peak: bool) -> bool {
        // A process that started after `now` (a window's end, when a sweep
        // runs late on a loaded node) is first sampled in the next window:
        // its memory and disk bytes cannot belong to one that closed before
        // it existed.
        if start > now
            || self.live.get(&pid) != Some(&start)
            || self
                .infos
                .get(&(pid, start))
                .is_some_and(|i| i.kernel_thread)
        {
            return false;
        }
        let Some(sample) = memory::sample_with(&mut self.reader, pid, peak, self.page_size) else {
            return false;
        };
        let born_metered = self
            .infos
            .get(&(pid, start))
            .is_some_and(|i| i.born_metered);
        self.span_start
            .entry((pid, start))
            .or_insert(self.window_start_ns);
        self.mem.sample(pid, start, now, sample, born_metered);
        true
    }

    /// Samples memory and disk at a window's close, reading only what can
    /// have changed: the instances that ran in the window (`ran`) or were
    /// born since the last close. Every other process is carried at its last
    /// reading (a process that did not run holds what it held). Every
    /// `idle_every` a sweep of `/proc` begins: over the first half of the
    /// interval every process is read again, a slice per close (its RSS,
    /// I/O, cgroup, and its peak where it ran since the last), and processes
    /// no event named are found. The first sweep reads all at once.
    fn sample_window(&mut self, now: u64, ran: &HashMap<(u32, u64), Vec<u64>>) {
        self.last_sample_ns = now;
        let first = self.last_sweep_ns == 0;
        if first || now.saturating_sub(self.last_sweep_ns) >= duration_ns(self.idle_every) {
            self.start_sweep(now);
        }
        let active = std::mem::take(&mut self.active);
        let ran_only = ran.keys().filter(|k| !active.contains(k));
        for &(pid, start) in active.iter().chain(ran_only) {
            self.sample_one(pid, start, now, false);
        }
        self.sweep_slice(now, first);
        // Who ran is likely to run again: read at every sample until a window
        // passes without it running.
        self.active = ran
            .keys()
            .filter(|(pid, start)| self.live.get(pid) == Some(start))
            .copied()
            .collect();

        let stale_member = self.cgroup_member.iter().any(|(cg, (pid, start))| {
            self.live.get(pid) != Some(start) || self.cgroup_of.get(&(*pid, *start)) != Some(cg)
        });
        if self.members_dirty || stale_member {
            self.rebuild_members();
        }
        let members: Vec<(u64, u32)> = self
            .cgroup_member
            .iter()
            .map(|(&cg, &(pid, _))| (cg, pid))
            .collect();
        for (cg, pid) in members {
            if let Some(counter) = self.memory_counter(cg, pid) {
                self.cgroup_mem.sample(&counter, now);
            }
            if self.storage.is_some()
                && let Some(container) = self.cgroup_name(cg).identity.container_id.clone()
            {
                if let Some(storage) = &self.storage {
                    storage.note(&container, pid, &self.proc_root);
                }
                self.containers_seen.insert(container, pid);
            }
        }
        let stale = now.saturating_sub(duration_ns(self.sample_every) * 4);
        self.cgroup_mem.forget_stale(stale);
        // The files of processes that keep running stay open to the next tick.
        self.reader.close_unused();
    }

    /// One live member per cgroup, the oldest (a stable choice: a churn of
    /// short-lived processes does not move it), from what is known: no
    /// procfs read per process.
    fn rebuild_members(&mut self) {
        self.cgroup_member.clear();
        for (&pid, &start) in &self.live {
            if let Some(&cg) = self.cgroup_of.get(&(pid, start)) {
                let m = self.cgroup_member.entry(cg).or_insert((pid, start));
                if start < m.1 {
                    *m = (pid, start);
                }
            }
        }
        self.members_dirty = false;
    }

    /// Notes that live instance `key` is in cgroup `cg`.
    fn note_cgroup(&mut self, key: (u32, u64), cg: u64) {
        if self.cgroup_of.insert(key, cg) != Some(cg) && !self.cgroup_member.contains_key(&cg) {
            self.members_dirty = true;
        }
    }

    /// Begins a sweep of `/proc`: lists the pids, forgets instances gone
    /// without an exit event (lost events) and what only they held; the
    /// pids are read by [`Collector::sweep_slice`].
    fn start_sweep(&mut self, now: u64) {
        // What the last sweep left unread (closes far apart) is read first.
        self.sweep_slice(now, true);
        self.last_sweep_ns = now;
        let pids = process::proc_pids(&self.proc_root);
        self.forget_gone(&pids, now);
        self.sweep_pids = pids;
        self.sweep_done = 0;
        // Processes gone without an exit event stop integrating after two sweeps.
        let stale = now.saturating_sub(duration_ns(self.idle_every).saturating_mul(2) + 1);
        self.mem.forget_stale(stale);
        let mem = &self.mem;
        // Exited but not yet handed over: its span still starts where it did.
        self.span_start.retain(|k, _| mem.knows(*k));
        self.span_start.shrink_to_fit();
        self.infos.shrink_to_fit();
        self.live.shrink_to_fit();
        self.cgroup_of.shrink_to_fit();
        self.members_dirty = true;
        debug!(
            pids = self.sweep_pids.len(),
            tracked = self.mem.tracked(),
            "sweep of /proc begins"
        );
        // Give freed heap back to the system once a sweep: after a burst of
        // processes glibc keeps the pages of every arena otherwise (issue 13).
        // SAFETY: malloc_trim has no preconditions; it only releases free memory.
        unsafe { libc::malloc_trim(0) };
    }

    /// Reads the sweep's pids due by `now` (with `all`, every one left): by
    /// then the share of them that the time since the sweep began, plus one
    /// sample interval, is of half of `idle_every`.
    fn sweep_slice(&mut self, now: u64, all: bool) {
        let total = self.sweep_pids.len();
        let spread = (duration_ns(self.idle_every) / 2).max(1);
        let elapsed = now
            .saturating_sub(self.last_sweep_ns)
            .saturating_add(duration_ns(self.sample_every));
        let target = if all || elapsed >= spread {
            total
        } else {
            usize::try_from(u128::from(elapsed) * total as u128 / u128::from(spread))
                .unwrap_or(total)
                .min(total)
        };
        while self.sweep_done < target {
            let Some(&pid) = self.sweep_pids.get(self.sweep_done) else {
                break;
            };
            self.sweep_done += 1;
            self.sweep_one(pid, now);
        }
        if self.sweep_done >= total && total > 0 {
            self.sweep_pids = Vec::new();
            self.sweep_done = 0;
        }
    }

    /// Reads one process of the sweep: registers it when no event named it,
    /// reads its RSS and I/O (and its peak, from `status`, only when it ran
    /// since the last one: the peak of a process that did not run cannot
    /// have grown), and its cgroup (a sleeping process may have been moved).
    fn sweep_one(&mut self, pid: u32, now: u64) {
        let start = match self.live.get(&pid) {
            Some(&s) => s,
            None => {
                let Some(stat) = process::read_stat(&self.proc_root, pid) else {
                    return;
                };
                let start = stat.start_since_boot_ns;
                self.register_from_stat(pid, start, stat);
                start
            }
        };
        let key = (pid, start);
        let peak = !self.mem.peak_fresh(key);
        // Read at this close already (it ran): only its peak is missing.
        let read_now = self.mem.read_at(key) == Some(now);
        if (!read_now || peak) && !self.sample_one(pid, start, now, peak) {
            return;
        }
        let known = self.cgroup_of.get(&key).copied();
        if let Some(cg) = self.cgroup_id_from_proc_known(pid, known) {
            self.note_cgroup(key, cg);
        }
    }

    /// Bounds what is kept per process by the processes alive now: an
    /// instance whose pid is not in `/proc` (`pids`, read after the events
    /// were drained) is gone, though its exit event was lost; it is no longer
    /// live and counts as exited now (a late exit event still sets the exact
    /// time), so its metadata goes once its last window is out. The cgroup
    /// caches keep only the cgroups of live processes.
    fn forget_gone(&mut self, pids: &[u32], now: u64) {
        if pids.is_empty() {
            return;
        }
        let present: HashSet<u32> = pids.iter().copied().collect();
        let gone: Vec<(u32, u64)> = self
            .live
            .iter()
            .filter(|(pid, _)| !present.contains(pid))
            .map(|(&pid, &start)| (pid, start))
            .collect();
        for (pid, start) in &gone {
            self.live.remove(pid);
            self.active.remove(&(*pid, *start));
            if let Some(info) = self.infos.get_mut(&(*pid, *start))
                && info.exited_ns.is_none()
            {
                Arc::make_mut(info).exited_ns = Some(now);
                self.exited.push((*pid, *start));
            }
        }
        self.gone_due.extend_from_slice(&gone);
        if !gone.is_empty() {
            debug!(
                gone = gone.len(),
                "processes gone without an exit event (lost events)"
            );
        }
        let cgroups: HashSet<u64> = self
            .live
            .iter()
            .filter_map(|(&pid, &start)| self.cgroup_of.get(&(pid, start)).copied())
            .collect();
        self.cgroup_identity.retain(|id, _| cgroups.contains(id));
        self.cgroup_counter.retain(|id, _| cgroups.contains(id));
    }

    /// The measured writable layers of the containers seen since the last call.
    fn take_storage(&mut self) -> HashMap<String, u64> {
        let seen = std::mem::take(&mut self.containers_seen);
        let Some(storage) = &self.storage else {
            return HashMap::new();
        };
        seen.into_keys()
            .filter_map(|c| storage.bytes(&c).map(|b| (c, b)))
            .collect()
    }

    /// The cgroup an instance is in now, for its memory and disk: where it
    /// exited; else the one cgroup it ran in this window; else, when it ran in
    /// several (it moved), what procfs says now; else (it slept: a task that
    /// does not run is not moved by itself, and the sweep reads every
    /// process's cgroup again) the last known; else what procfs says. 0 if
    /// none is known: usage is never dropped for want of a cgroup.
    fn current_cgroup(&mut self, tgid: u32, start_ns: u64, ran_in: Option<&Vec<u64>>) -> u64 {
        if let Some(cg) = self
            .infos
            .get(&(tgid, start_ns))
            .and_then(|i| i.exit_cgroup)
        {
            return cg;
        }
        match ran_in.map(Vec::as_slice) {
            Some([only]) => return *only,
            Some(_) => {}
            None => {
                if let Some(&cg) = self.cgroup_of.get(&(tgid, start_ns)) {
                    return cg;
                }
            }
        }
        if let Some(cg) = self.cgroup_id_from_proc(tgid) {
            self.note_cgroup((tgid, start_ns), cg);
            return cg;
        }
        self.cgroup_of.get(&(tgid, start_ns)).copied().unwrap_or(0)
    }

    /// The memory counter file of cgroup `cg`, found through member `pid`.
    fn memory_counter(&mut self, cg: u64, pid: u32) -> Option<PathBuf> {
        if let Some(known) = self.cgroup_counter.get(&cg) {
            return known.clone();
        }
        let (path, _) = self.cgroup(cg);
        let root = self.cgroups.root()?.to_path_buf();
        let counter = memory::cgroup_memory_counter(
            &root,
            path.as_deref()?,
            self.v1_memory_root.as_deref(),
            &self.proc_root,
            pid,
        );
        self.cgroup_counter.insert(cg, counter.clone());
        counter
    }

    /// The v2 cgroup id of a process that has not run since metering began,
    /// from /proc/<pid>/cgroup ("0::/path") and the directory's inode.
    fn cgroup_id_from_proc(&mut self, pid: u32) -> Option<u64> {
        self.cgroup_id_from_proc_known(pid, None)
    }

    /// As [`Collector::cgroup_id_from_proc`]; when the path is that of cgroup
    /// `known` (resolved before), it is `known`, without a `stat` (a cgroup
    /// with a process in it cannot be removed, so its path is still its own).
    fn cgroup_id_from_proc_known(&mut self, pid: u32, known: Option<u64>) -> Option<u64> {
        let text = self.reader.read_str(pid, "cgroup")?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        if let Some(cg) = known
            && self
                .cgroup_identity
                .get(&cg)
                .and_then(|n| n.path.as_deref())
                == Some(rel)
        {
            return Some(cg);
        }
        let root = self.cgroups.root()?;
        let path = root.join(rel.trim_start_matches('/'));
        Some(fs::metadata(path).ok()?.ino())
    }

    /// Closes the current window and returns its usage.
    pub fn close_window(&mut self) -> Result<Window, ProbeError> {
        self.drain();
        let old_epoch = self.probes.current_epoch();
        let epoch = self.probes.close_epoch()?;
        let end_ns = boottime_ns();
        // Read beside end_ns, so the GPU meter's tick is the window's length:
        // GPU memory and estimated GPU time are then used × window, not × the
        // time between two later points of this function.
        let gpu_now = std::time::Instant::now();
        // Events emitted up to the epoch switch name the processes in it.
        self.drain();

        let slot = (old_epoch & 1) as usize;
        let prev = self.prev_buckets.get(slot).copied().unwrap_or_default();
        let mut buckets = bucket_delta(&epoch.buckets, &prev);
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

        let mut merged: HashMap<InstanceKey, Metered> = HashMap::new();
        // The cgroups each instance ran in during this window.
        let mut ran_in: HashMap<(u32, u64), Vec<u64>> = HashMap::new();
        for (k, u) in &epoch.processes {
            let key = InstanceKey {
                tgid: k.tgid,
                start_ns: instance_start(k.start_ns),
                cgroup_id: k.cgroup_id,
            };
            ran_in
                .entry((key.tgid, key.start_ns))
                .or_default()
                .push(key.cgroup_id);
            merged.entry(key).or_default().add(&Metered::from(u));
        }
        for (instance, cgroups) in &ran_in {
            if let [only] = cgroups.as_slice() {
                self.note_cgroup(*instance, *only);
            }
        }
        self.sample_window(end_ns, &ran_in);
        // What is handed over: the instances that ran, were read (by the
        // sweep too) or exited in the window, or were found gone; at the last
        // window every instance. So a process that sleeps is billed once per
        // idle_interval, when the sweep reads it, by one record covering
        // exactly that span.
        let all = std::mem::take(&mut self.flush_all);
        let gone_due = std::mem::take(&mut self.gone_due);
        let due = self
            .mem
            .take_due(end_ns, ran_in.keys().chain(&gone_due), all);
        for ((tgid, start_ns), md) in due {
            let cgroup_id = self.current_cgroup(tgid, start_ns, ran_in.get(&(tgid, start_ns)));
            let key = InstanceKey {
                tgid,
                start_ns,
                cgroup_id,
            };
            merged.entry(key).or_default().mem.add(&md);
        }
        // GPU usage per process, on the cgroup the process is in now. NVML
        // reports host pids; a pid the agent has not seen is looked up in procfs.
        let mut gpu_unattributed = crate::collect::metered::GpuMetered::default();
        let mut gpu_errors = 0;
        if let Some(gpu) = self.gpu.as_mut() {
            let w = gpu.sample(gpu_now);
            gpu_errors = u64::from(w.skipped);
            gpu_unattributed.gpu_ns = w.unattributed_gpu_ns;
            gpu_unattributed.energy_mj = w.unattributed_energy_mj;
            for u in &w.per_process {
                let start = match self.live.get(&u.pid) {
                    Some(&s) => s,
                    None => match process::read_stat(&self.proc_root, u.pid) {
                        Some(stat) => {
                            let s = stat.start_since_boot_ns;
                            self.register_from_stat(u.pid, s, stat);
                            s
                        }
                        None => {
                            // Gone already: its GPU time has no owner left.
                            gpu_unattributed.gpu_ns += u.gpu_ns;
                            gpu_unattributed.energy_mj += u.energy_mj;
                            continue;
                        }
                    },
                };
                let cgroup_id = self.current_cgroup(u.pid, start, ran_in.get(&(u.pid, start)));
                let key = InstanceKey {
                    tgid: u.pid,
                    start_ns: start,
                    cgroup_id,
                };
                let g = &mut merged.entry(key).or_default().gpu;
                g.add(&crate::collect::metered::GpuMetered {
                    gpu_ns: u.gpu_ns,
                    memory_byte_ns: u.memory_byte_ns,
                    energy_mj: u.energy_mj,
                    attribution: Some(u.attribution),
                });
            }
        }
        let cgroup_counters = merged
            .keys()
            .filter_map(|k| {
                let counter = self.cgroup_counter.get(&k.cgroup_id)?.clone()?;
                Some((k.cgroup_id, counter))
            })
            .collect();
        let mut processes: Vec<(InstanceKey, Metered)> = merged.into_iter().collect();
        processes.sort_by_key(|(k, _)| *k);
        let mut names = HashMap::with_capacity(processes.len());
        let mut pods: HashMap<String, Option<PodName>> = HashMap::new();
        let window_start_ns = self.window_start_ns;
        let mut handed: Vec<(u32, u64)> = Vec::with_capacity(processes.len());
        for (k, _) in &processes {
            let since_ns = self
                .span_start
                .get(&(k.tgid, k.start_ns))
                .map_or(window_start_ns, |&s| s.min(window_start_ns));
            handed.push((k.tgid, k.start_ns));
            self.ensure_info(k.tgid, k.start_ns);
            let cgroup = self.cgroup_name(k.cgroup_id);
            let pod = cgroup.identity.pod_uid.as_deref().and_then(|uid| {
                pods.entry(uid.to_string())
                    .or_insert_with(|| self.pods.lookup(uid))
                    .clone()
            });
            names.insert(
                *k,
                Named {
                    info: self
                        .infos
                        .get(&(k.tgid, k.start_ns))
                        .cloned()
                        .unwrap_or_default(),
                    cgroup,
                    pod,
                    start: self.clock.to_wall(k.start_ns),
                    since_ns,
                    since: self.clock.to_wall(since_ns),
                },
            );
        }
        // The next span of each instance handed over starts here, while it is tracked.
        for k in handed {
            if self.mem.read_at(k).is_some() {
                self.span_start.insert(k, end_ns);
            } else {
                self.span_start.remove(&k);
            }
        }

        let start_ns = self.window_start_ns;
        self.window_start_ns = end_ns;
        Ok(Window {
            start_ns,
            end_ns,
            start: self.clock.to_wall(start_ns),
            end: self.clock.to_wall(end_ns),
            processes,
            names,
            cgroup_memory: {
                buckets.unattributed.gpu.add(&gpu_unattributed);
                self.cgroup_mem.take()
            },
            storage: self.take_storage(),
            cgroup_counters,
            buckets,
            events_lost,
            gpu_errors,
            exact: epoch.all_cpus_acked,
        })
    }

    /// Closes the last window: as [`Collector::close_window`], and every
    /// instance's usage not yet handed over is in it (nothing waits for a
    /// later window that will not come).
    pub fn close_last_window(&mut self) -> Result<Window, ProbeError> {
        self.flush_all = true;
        self.close_window()
    }

    /// Metadata of an instance, read from procfs the first time it is seen
    /// without lifecycle events (it predates the agent, or its events were lost).
    fn ensure_info(&mut self, tgid: u32, start_ns: u64) {
        if self.infos.contains_key(&(tgid, start_ns)) {
            return;
        }
        match process::read_stat(&self.proc_root, tgid) {
            Some(stat) if stat.start_since_boot_ns == start_ns => {
                self.register_from_stat(tgid, start_ns, stat);
            }
            // Gone, or the pid already belongs to another instance: it has
            // exited (its exit event was lost), so its empty entry is
            // forgotten with the exited ones instead of kept for ever.
            _ => {
                let info = ProcessInfo {
                    exited_ns: Some(boottime_ns()),
                    ..ProcessInfo::default()
                };
                self.infos.insert((tgid, start_ns), Arc::new(info));
                self.exited.push((tgid, start_ns));
            }
        }
    }

    fn register_from_stat(&mut self, tgid: u32, start_ns: u64, stat: process::ProcStat) {
        let kernel_thread = stat.flags & PF_KTHREAD != 0;
        let exe = process::read_exe(&self.proc_root, tgid);
        let wasm = if kernel_thread {
            None
        } else {
            detect_wasm(&self.proc_root, tgid, &stat.comm, exe.as_deref())
        };
        let info = ProcessInfo {
            ppid: Some(stat.ppid),
            parent: self.live.get(&stat.ppid).map(|&s| (stat.ppid, s)),
            comm: stat.comm,
            kernel_thread,
            exe,
            exited_ns: None,
            wasm,
            exit_cgroup: None,
            // Found without an event (one was lost): a start cut to ticks at or
            // after metering began is surely after it.
            born_metered: start_ns >= self.metered_since_ns,
            ns_pid: if kernel_thread {
                None
            } else {
                process::read_ns_pid(&self.proc_root, tgid)
            },
            context: {
                let mut ctx = read_env_context(&self.proc_root, tgid)
                    .map(|e| e.context)
                    .unwrap_or_default();
                if let Some(p) = self
                    .live
                    .get(&stat.ppid)
                    .and_then(|&s| self.infos.get(&(stat.ppid, s)))
                {
                    ctx.inherit(&p.context);
                }
                ctx
            },
        };
        self.infos.entry((tgid, start_ns)).or_insert(Arc::new(info));
        self.live.entry(tgid).or_insert(start_ns);
    }

    /// Forgets instances that exited before `before_ns`: nothing can be charged
    /// to them any more. The daemon calls this once a window's records are out.
    /// Looks only at the instances that exited, not at every one.
    pub fn forget_exited_before(&mut self, before_ns: u64) {
        let infos = &mut self.infos;
        let cgroup_of = &mut self.cgroup_of;
        self.exited
            .retain(|k| match infos.get(k).and_then(|i| i.exited_ns) {
                Some(t) if t < before_ns => {
                    infos.remove(k);
                    cgroup_of.remove(k);
                    false
                }
                Some(_) => true,
                None => false,
            });
    }

    /// What is known about instance (tgid, start).
    pub fn info(&self, tgid: u32, start_ns: u64) -> Option<&ProcessInfo> {
        self.infos.get(&(tgid, start_ns)).map(|i| &**i)
    }

    /// The path of cgroup `id` under the v2 mount, and what it says about
    /// the workload.
    pub fn cgroup(&mut self, id: u64) -> (Option<String>, CgroupIdentity) {
        let name = self.cgroup_name(id);
        (name.path.clone(), name.identity.clone())
    }

    /// As [`Collector::cgroup`], shared (cached: a cgroup's path never
    /// changes while it exists).
    fn cgroup_name(&mut self, id: u64) -> Arc<CgroupName> {
        if let Some(known) = self.cgroup_identity.get(&id) {
            return known.clone();
        }
        let path = self.cgroups.path_of(id);
        let identity = path
            .as_deref()
            .map(workload::parse_cgroup_path)
            .unwrap_or_default();
        let resolved = path.is_some();
        let name = Arc::new(CgroupName { path, identity });
        // An unknown path may appear at the next walk; only cache what resolved.
        if resolved {
            self.cgroup_identity.insert(id, name.clone());
        }
        name
    }

    /// The host pid of the process that is `ns_pid` inside the container
    /// `container_id` or the pod `pod_uid` (at least one given), among the
    /// processes live now or exited in windows not yet closed; `None` when no
    /// process, or more than one, fits.
    pub fn host_pid(
        &mut self,
        ns_pid: u32,
        container_id: Option<&str>,
        pod_uid: Option<&str>,
    ) -> Option<u32> {
        if container_id.is_none() && pod_uid.is_none() {
            return None;
        }
        let candidates: Vec<((u32, u64), Option<u64>)> = self
            .infos
            .iter()
            .filter(|(_, i)| i.ns_pid == Some(ns_pid))
            .map(|(k, i)| (*k, i.exit_cgroup))
            .collect();
        let mut found = None;
        for ((pid, start), exit_cgroup) in candidates {
            // Where it is now (or ended): a process moved into its container
            // after exec must be matched by that container.
            let cg = exit_cgroup
                .or_else(|| self.cgroup_id_from_proc(pid))
                .or_else(|| self.cgroup_of.get(&(pid, start)).copied());
            let Some(cg) = cg else { continue };
            let name = self.cgroup_name(cg);
            let ident = &name.identity;
            let fits = container_id.is_none_or(|c| ident.container_id.as_deref() == Some(c))
                && pod_uid.is_none_or(|u| ident.pod_uid.as_deref() == Some(u));
            if fits {
                if found.is_some_and(|f| f != pid) {
                    return None;
                }
                found = Some(pid);
            }
        }
        found
    }

    /// The live instance with pid `tgid`, if known.
    pub fn live_instance(&self, tgid: u32) -> Option<u64> {
        self.live.get(&tgid).copied()
    }
}

/// How often processes that did not run are read again by default.
pub const DEFAULT_IDLE_EVERY: Duration = Duration::from_secs(60);

fn bucket_delta(now: &Buckets, prev: &Buckets) -> NodeBuckets {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    NodeBuckets {
        charged_ns: d(now.charged_ns, prev.charged_ns),
        idle: Metered {
            cpu_ns: d(now.idle_ns, prev.idle_ns),
            ..Default::default()
        },
        irq_steal: Metered {
            cpu_ns: d(now.irq_steal_ns, prev.irq_steal_ns),
            ..Default::default()
        },
        kernel: Metered {
            cpu_ns: d(now.kernel_ns, prev.kernel_ns),
            syscalls: d(now.kernel_syscalls, prev.kernel_syscalls),
            net: net_delta(&now.kernel_net, &prev.kernel_net),
            ..Default::default()
        },
        unattributed: Metered {
            cpu_ns: d(now.unattributed_ns, prev.unattributed_ns),
            syscalls: d(now.unattributed_syscalls, prev.unattributed_syscalls),
            net: net_delta(&now.unattributed_net, &prev.unattributed_net),
            ..Default::default()
        },
        map_full_drops: d(now.map_full_drops, prev.map_full_drops),
        task_read_errors: d(now.task_read_errors, prev.task_read_errors),
    }
}

fn net_delta(now: &[u64; NET_COUNTERS], prev: &[u64; NET_COUNTERS]) -> Net {
    let mut d = [0u64; NET_COUNTERS];
    for ((d, n), p) in d.iter_mut().zip(now).zip(prev) {
        *d = n.saturating_sub(*p);
    }
    Net::from_counters(&d)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// How much of a command line WASM detection reads: the module argument is
/// near the front, and command lines can be megabytes.
const CMDLINE_LIMIT: usize = 64 * 1024;

fn detect_wasm(
    proc_root: &std::path::Path,
    pid: u32,
    comm: &str,
    exe: Option<&str>,
) -> Option<WasmIdentity> {
    let cmdline = process::read_cmdline(proc_root, pid, CMDLINE_LIMIT).unwrap_or_default();
    workload::detect_wasm(comm, exe, &cmdline)
}
