//! Loads the embedded eBPF object, attaches its programs, and reads its maps.
//!
//! Windows are cut in the kernel by epochs: every fold is keyed by the epoch
//! current when it ran. [`Probes::close_epoch`] starts a new epoch, waits until
//! every CPU has acknowledged it (so no program still writes the old one),
//! then takes the old epoch's entries out of the map. Each charged nanosecond
//! therefore lands in exactly one window.
//!
//! Stage 1 of the data flow. In: the kernel. Out: per-epoch usage maps
//! ([`EpochUsage`]), the kernel's sender table, and the facts about the kernel
//! (BTF offsets, capabilities, the clock) the later stages need.

pub mod btf;
pub mod caps;
pub mod clock;
pub mod syscalls;

use std::{
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use agent_common::{
    Control, CpuState, EnvHeader, NET_COUNTERS, ProcEvent, ProcKey, ProcUsage, ReceiverPorts,
    SYSCALL_CLASSES, SenderKey, SenderValue,
};
use aya::{
    Btf, Ebpf, EbpfError, EbpfLoader, Endianness, VerifierLogLevel,
    maps::{Array, HashMap as BpfHashMap, MapData, MapError, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, PerfEvent, ProgramError, RawTracePoint,
        perf_event::{PerfEventConfig, PerfEventScope, SamplePolicy, SoftwareEvent},
    },
    util::online_cpus,
};
use tracing::{debug, warn};

/// The compiled eBPF programs, embedded so the binary is all a node needs.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mentat-probes"));

/// Where the running kernel describes its types.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The BTF tracepoints (tp_btf) the metering programs attach to, by program name.
pub const BTF_TRACEPOINTS: &[(&str, &str)] = &[("sched_switch", "sched_switch")];

/// The raw tracepoints the metering programs attach to, by program name.
pub const TRACEPOINTS: &[(&str, &str)] = &[
    ("sys_enter", "sys_enter"),
    ("process_fork", "sched_process_fork"),
    ("process_exec", "sched_process_exec"),
    ("process_exit", "sched_process_exit"),
];

/// Socket traffic tracepoints (Linux ≥ 6.3). Without them the agent still
/// meters everything else and reports network metering as unavailable.
pub const NET_TRACEPOINTS: &[(&str, &str)] = &[
    ("sock_send", "sock_send_length"),
    ("sock_recv", "sock_recv_length"),
];

/// The empty programs the benchmark attaches instead, for its floor.
const FLOOR_TRACEPOINTS: &[(&str, &str)] = &[
    ("floor_sys_enter", "sys_enter"),
    ("floor_sched_switch", "sched_switch"),
    ("floor_process_fork", "sched_process_fork"),
    ("floor_process_exec", "sched_process_exec"),
    ("floor_process_exit", "sched_process_exit"),
];

/// How long to wait for every CPU to acknowledge a new epoch before reading
/// the old one anyway. Idle CPUs acknowledge at their next CPU tick (every
/// `cpu_tick`), so this is several ticks; anything written late is not lost,
/// it is read with the next window.
const EPOCH_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// Which programs to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeMode {
    /// The metering programs.
    Metering,
    /// Empty programs on the same hooks (benchmark floor only).
    Floor,
}

/// Settings for loading the probes.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// Entries in the per-process usage map (`None`: the object's default, 10,240).
    pub proc_map_entries: Option<u32>,
    /// Period of the per-CPU timer that charges running tasks between switches.
    pub cpu_tick: Duration,
    /// Where to read kernel BTF from.
    pub btf_path: PathBuf,
    /// Which programs to attach.
    pub mode: ProbeMode,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            proc_map_entries: None,
            cpu_tick: Duration::from_millis(100),
            btf_path: PathBuf::from(VMLINUX_BTF),
            mode: ProbeMode::Metering,
        }
    }
}

/// Why the probes could not be loaded or read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Kernel struct offsets could not be resolved.
    #[error("resolving kernel struct offsets from {path}: {source}")]
    Btf {
        /// The BTF file.
        path: PathBuf,
        /// What went wrong.
        source: btf::BtfError,
    },
    /// The kernel refused the object (maps or programs).
    #[error("loading the eBPF object into the kernel: {0}")]
    Load(#[from] EbpfError),
    /// A program failed to load or attach.
    #[error("eBPF program `{name}` (hook {hook}): {source}")]
    Program {
        /// Program name.
        name: &'static str,
        /// What it attaches to.
        hook: &'static str,
        /// What went wrong.
        source: ProgramError,
    },
    /// A map operation failed.
    #[error("eBPF map `{name}`: {source}")]
    Map {
        /// Map name.
        name: &'static str,
        /// What went wrong.
        source: MapError,
    },
    /// The object lacks something the agent expects: a build mismatch.
    #[error("the embedded eBPF object has no {0}")]
    Missing(&'static str),
    /// aya could not read the kernel's BTF (needed to attach BTF tracepoints).
    #[error("reading kernel BTF from {path}: {message}")]
    KernelBtf {
        /// The BTF file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The online CPU list could not be read.
    #[error("reading the online CPU list: {0}")]
    Cpus(std::io::Error),
}

/// The kernel's sender table and the receiver ports it watches.
pub struct SenderMaps {
    /// Client socket → its last sender.
    pub senders: BpfHashMap<MapData, SenderKey, SenderValue>,
    /// The receiver's ports, as clients address them.
    pub ports: Array<MapData, ReceiverPorts>,
    /// Per-CPU: entries written, writes failed.
    pub stats: PerCpuArray<MapData, u64>,
}

/// Loaded and attached probes, and the handles to read them.
pub struct Probes {
    // Keeps the programs loaded and attached for as long as `Probes` lives.
    ebpf: Ebpf,
    proc_usage: Option<PerCpuHashMap<MapData, ProcKey, ProcUsage>>,
    cpu_state: Option<PerCpuArray<MapData, CpuState>>,
    control: Option<Array<MapData, Control>>,
    events: Option<RingBuf<MapData>>,
    env_events: Option<RingBuf<MapData>>,
    online_cpus: Vec<u32>,
    epoch: u32,
    network: Result<(), String>,
    senders: Option<SenderMaps>,
}

/// One closed epoch's usage.
#[derive(Debug, Default)]
pub struct EpochUsage {
    /// Per (process instance, cgroup) usage, summed over CPUs.
    pub processes: Vec<(ProcKey, ProcUsage)>,
    /// The node buckets' values for this epoch's parity, summed over CPUs (cumulative).
    pub buckets: agent_common::Buckets,
    /// Lifecycle events lost so far (cumulative).
    pub events_lost: u64,
    /// False when some CPU did not acknowledge the epoch in time; its late
    /// writes land in a later window.
    pub all_cpus_acked: bool,
}

impl Probes {
    /// Loads the object and attaches the programs `config.mode` names.
    pub fn load(config: &ProbeConfig) -> Result<Self, ProbeError> {
        raise_memlock_limit();
        let offsets = btf::Btf::from_file(&config.btf_path)
            .and_then(|b| btf::task_offsets(&b))
            .map_err(|source| ProbeError::Btf {
                path: config.btf_path.clone(),
                source,
            })?;
        debug!(?offsets, "kernel struct offsets");
        // Sender binding is off (every sender unidentified) rather than the
        // agent down when these do not resolve.
        let sock_offsets = btf::Btf::from_file(&config.btf_path)
            .and_then(|b| btf::sock_offsets(&b))
            .unwrap_or_else(|e| {
                warn!(error = %e, "sender binding unavailable: struct sock offsets not resolved");
                agent_common::SockOffsets::ZERO
            });
        let classes = syscalls::class_table();

        let mut loader = EbpfLoader::new();
        loader
            .override_global("TASK_OFFSETS", &offsets, true)
            .override_global("SYSCALL_CLASS", &classes, true)
            .override_global("SOCK_OFFSETS", &sock_offsets, true)
            .verifier_log_level(verifier_log_level());
        if let Some(n) = config.proc_map_entries {
            loader.map_max_entries("PROC_USAGE", n.max(1));
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;

        let online_cpus = online_cpus().map_err(|(_, e)| ProbeError::Cpus(e))?;
        let hooks = match config.mode {
            ProbeMode::Metering => TRACEPOINTS,
            ProbeMode::Floor => FLOOR_TRACEPOINTS,
        };
        for &(name, hook) in hooks {
            attach_raw_tracepoint(&mut ebpf, name, hook)?;
        }
        let mut network = Err("not attached".to_string());
        if config.mode == ProbeMode::Metering {
            let kernel_btf =
                Btf::parse_file(&config.btf_path, Endianness::default()).map_err(|e| {
                    ProbeError::KernelBtf {
                        path: config.btf_path.clone(),
                        message: e.to_string(),
                    }
                })?;
            for &(name, func) in BTF_TRACEPOINTS {
                attach_btf_tracepoint(&mut ebpf, name, func, &kernel_btf)?;
            }
            attach_cpu_tick(&mut ebpf, &online_cpus, config.cpu_tick)?;
            network = NET_TRACEPOINTS
                .iter()
                .try_for_each(|&(name, hook)| {
                    attach_btf_tracepoint(&mut ebpf, name, hook, &kernel_btf)
                })
                .map_err(|e| e.to_string());
            if let Err(e) = &network {
                warn!(error = %e, "network metering unavailable (needs Linux ≥ 6.3 socket tracepoints)");
            }
        }

        let proc_usage = take_map(&mut ebpf, "PROC_USAGE")?;
        let cpu_state = take_map(&mut ebpf, "CPU_STATE")?;
        let control = take_map(&mut ebpf, "CONTROL")?;
        let events = take_map(&mut ebpf, "EVENTS")?;
        let env_events = take_map(&mut ebpf, "ENV_EVENTS")?;
        // Only where the send hook is attached and the offsets resolved.
        let senders = if network.is_ok() && sock_offsets.valid == 1 {
            Some(SenderMaps {
                senders: take_map(&mut ebpf, "SENDERS")?,
                ports: take_map(&mut ebpf, "RECEIVER_PORTS")?,
                stats: take_map(&mut ebpf, "SENDER_STATS")?,
            })
        } else {
            None
        };
        Ok(Self {
            senders,
            ebpf,
            proc_usage: Some(proc_usage),
            cpu_state: Some(cpu_state),
            control: Some(control),
            events: Some(events),
            env_events: Some(env_events),
            online_cpus,
            epoch: 0,
            network,
        })
    }

    /// The sender-binding maps, once (`None` when the kernel cannot record
    /// senders: Linux < 6.3 or unresolved `struct sock` offsets).
    pub fn take_senders(&mut self) -> Option<SenderMaps> {
        self.senders.take()
    }

    /// Whether the kernel records each OTLP client's process (sender binding).
    pub fn sender_binding(&self) -> bool {
        self.senders.is_some()
    }

    /// Whether socket traffic is metered, or why not.
    pub fn network(&self) -> Result<(), &str> {
        self.network.as_ref().map(|_| ()).map_err(String::as_str)
    }

    /// The loaded programs' names and kernel statistics (run count, run time),
    /// when `kernel.bpf_stats_enabled` is on.
    pub fn program_stats(&self) -> Vec<(String, u64, Duration)> {
        self.ebpf
            .programs()
            .filter_map(|(name, prog)| {
                let info = prog.info().ok()?;
                Some((name.to_string(), info.run_count(), info.run_time()))
            })
            .collect()
    }

    /// Calls `f` for each lifecycle event waiting in the ring buffer.
    pub fn drain_events(&mut self, mut f: impl FnMut(&ProcEvent)) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        while let Some(item) = events.next() {
            if item.len() < std::mem::size_of::<ProcEvent>() {
                warn!(len = item.len(), "short lifecycle event ignored");
                continue;
            }
            // SAFETY: the buffer holds at least one ProcEvent, written by the
            // kernel side with this exact layout; read_unaligned makes no
            // alignment assumption about the ring buffer slot.
            let ev = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<ProcEvent>()) };
            f(&ev);
        }
    }

    /// Calls `f` for each environment copy waiting in its ring buffer (drain
    /// the lifecycle events first: an EXEC seen there has its copy here).
    pub fn drain_env(&mut self, mut f: impl FnMut(&EnvHeader, &[u8])) {
        let Some(env) = self.env_events.as_mut() else {
            return;
        };
        let head = std::mem::size_of::<EnvHeader>();
        while let Some(item) = env.next() {
            if item.len() < head {
                warn!(len = item.len(), "short environment copy ignored");
                continue;
            }
            // SAFETY: the item starts with an EnvHeader written by the kernel
            // side with this layout; read_unaligned assumes no alignment.
            let h = unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<EnvHeader>()) };
            let end = head.saturating_add(h.copied as usize).min(item.len());
            f(&h, &item[head..end]);
        }
    }

    /// Starts a new epoch and returns everything charged in the previous one.
    pub fn close_epoch(&mut self) -> Result<EpochUsage, ProbeError> {
        let old = self.epoch;
        let new = old.wrapping_add(1);
        self.control()?
            .set(
                0,
                Control {
                    epoch: new,
                    _pad: 0,
                },
                0,
            )
            .map_err(|source| ProbeError::Map {
                name: "CONTROL",
                source,
            })?;
        self.epoch = new;
        let (states, all_cpus_acked) = self.wait_for_ack(new)?;
        if !all_cpus_acked {
            warn!(
                epoch = new,
                "not every CPU acknowledged the new epoch in time; late usage moves to the next window"
            );
        }

        let mut usage = EpochUsage {
            all_cpus_acked,
            ..Default::default()
        };
        let slot = (old & 1) as usize;
        for st in &states {
            // A lost environment copy is lost metadata too (the agent falls
            // back to /proc for it), counted with the lifecycle events.
            usage.events_lost += st.events_lost + st.envs_lost;
            if let Some(b) = st.buckets.get(slot) {
                add_buckets(&mut usage.buckets, b);
            }
        }
        usage.processes = self.take_closed_entries(new)?;
        Ok(usage)
    }

    /// The current epoch (the one being written).
    pub fn current_epoch(&self) -> u32 {
        self.epoch
    }

    fn wait_for_ack(&self, epoch: u32) -> Result<(Vec<CpuState>, bool), ProbeError> {
        let deadline = Instant::now() + EPOCH_ACK_TIMEOUT;
        loop {
            let states = self.cpu_states()?;
            let acked = self.online_cpus.iter().all(|&cpu| {
                states
                    .get(cpu as usize)
                    .is_some_and(|st| st.acked_epoch == epoch || st.first_switch_ns == 0)
            });
            if acked || Instant::now() >= deadline {
                return Ok((states, acked));
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes (reads and deletes) every entry not written in `current`.
    fn take_closed_entries(
        &mut self,
        current: u32,
    ) -> Result<Vec<(ProcKey, ProcUsage)>, ProbeError> {
        let map = self
            .proc_usage
            .as_mut()
            .ok_or(ProbeError::Missing("PROC_USAGE map"))?;
        let map_err = |source| ProbeError::Map {
            name: "PROC_USAGE",
            source,
        };
        let keys: Vec<ProcKey> = map
            .keys()
            .filter_map(|k| match k {
                Ok(k) => Some(k),
                Err(e) => {
                    // A key deleted while iterating makes the iterator restart or
                    // fail; it is picked up next window, so this is not a loss.
                    debug!(error = %e, "PROC_USAGE key iteration");
                    None
                }
            })
            .filter(|k| k.epoch != current)
            .collect();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let values = match map.get(&key, 0) {
                Ok(v) => v,
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(map_err(e)),
            };
            let mut sum = ProcUsage::default();
            for v in values.iter() {
                add_usage(&mut sum, v);
            }
            match map.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(e)),
            }
            out.push((key, sum));
        }
        Ok(out)
    }

    /// Every possible CPU's state.
    pub fn cpu_states(&self) -> Result<Vec<CpuState>, ProbeError> {
        let map = self
            .cpu_state
            .as_ref()
            .ok_or(ProbeError::Missing("CPU_STATE map"))?;
        let values = map.get(&0, 0).map_err(|source| ProbeError::Map {
            name: "CPU_STATE",
            source,
        })?;
        Ok(values.iter().copied().collect())
    }

    fn control(&mut self) -> Result<&mut Array<MapData, Control>, ProbeError> {
        self.control
            .as_mut()
            .ok_or(ProbeError::Missing("CONTROL map"))
    }
}

fn add_usage(sum: &mut ProcUsage, v: &ProcUsage) {
    sum.cpu_ns += v.cpu_ns;
    sum.syscalls += v.syscalls;
    for i in 0..SYSCALL_CLASSES {
        sum.syscalls_by_class[i] += v.syscalls_by_class[i];
    }
    add_net(&mut sum.net, &v.net);
}

fn add_net(sum: &mut [u64; NET_COUNTERS], v: &[u64; NET_COUNTERS]) {
    for (s, v) in sum.iter_mut().zip(v) {
        *s += v;
    }
}

/// Adds `b` into `sum`, field by field.
pub fn add_buckets(sum: &mut agent_common::Buckets, b: &agent_common::Buckets) {
    sum.charged_ns += b.charged_ns;
    sum.irq_steal_ns += b.irq_steal_ns;
    sum.idle_ns += b.idle_ns;
    sum.kernel_ns += b.kernel_ns;
    sum.kernel_syscalls += b.kernel_syscalls;
    sum.unattributed_ns += b.unattributed_ns;
    sum.unattributed_syscalls += b.unattributed_syscalls;
    sum.map_full_drops += b.map_full_drops;
    sum.task_read_errors += b.task_read_errors;
    add_net(&mut sum.kernel_net, &b.kernel_net);
    add_net(&mut sum.unattributed_net, &b.unattributed_net);
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, ProbeError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(ProbeError::Missing(name))?;
    T::try_from(map).map_err(|source| ProbeError::Map { name, source })
}

fn attach_raw_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    hook: &'static str,
) -> Result<(), ProbeError> {
    let err = |source| ProbeError::Program { name, hook, source };
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    prog.attach(hook).map_err(err)?;
    Ok(())
}

fn attach_btf_tracepoint(
    ebpf: &mut Ebpf,
    name: &'static str,
    func: &'static str,
    btf: &Btf,
) -> Result<(), ProbeError> {
    let err = |source| ProbeError::Program {
        name,
        hook: func,
        source,
    };
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(name)
        .ok_or(ProbeError::Missing(name))?
        .try_into()
        .map_err(err)?;
    prog.load(func, btf).map_err(err)?;
    prog.attach().map_err(err)?;
    Ok(())
}

fn attach_cpu_tick(ebpf: &mut Ebpf, cpus: &[u32], period: Duration) -> Result<(), ProbeError> {
    const NAME: &str = "cpu_tick";
    let err = |source| ProbeError::Program {
        name: NAME,
        hook: "perf cpu-clock",
        source,
    };
    let prog: &mut PerfEvent = ebpf
        .program_mut(NAME)
        .ok_or(ProbeError::Missing(NAME))?
        .try_into()
        .map_err(err)?;
    prog.load().map_err(err)?;
    let period_ns = u64::try_from(period.as_nanos())
        .unwrap_or(u64::MAX)
        .max(1_000_000);
    for &cpu in cpus {
        prog.attach(
            PerfEventConfig::Software(SoftwareEvent::CpuClock),
            PerfEventScope::AllProcessesOneCpu { cpu },
            SamplePolicy::Period(period_ns),
            false,
        )
        .map_err(err)?;
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so map
/// creation does not fail there. Newer kernels ignore it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "could not raise RLIMIT_MEMLOCK (only matters before Linux 5.11)"
        );
    }
}

/// `VERIFIER_LOG_LEVEL` (debug, verbose, stats, or a number) for debugging rejections.
fn verifier_log_level() -> VerifierLogLevel {
    match std::env::var("VERIFIER_LOG_LEVEL").as_deref() {
        Ok("debug") => VerifierLogLevel::DEBUG,
        Ok("verbose") => VerifierLogLevel::VERBOSE,
        Ok("stats") => VerifierLogLevel::STATS,
        Ok(n) => n
            .parse::<u32>()
            .map(VerifierLogLevel::from_bits_truncate)
            .unwrap_or_default(),
        Err(_) => VerifierLogLevel::default(),
    }
}
