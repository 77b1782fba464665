//! GPU metering through NVML (nvml-wrapper): per-process GPU time, GPU memory
//! and energy, one [`GpuWindow`] per tick.
//!
//! # Discovery
//!
//! Devices are enumerated (index, UUID, name, MIG mode) at [`GpuMeter::open`],
//! again every [`GpuConfig::discovery_interval`], and on the tick after any
//! NVML error (a GPU that fell off the bus then costs one skipped tick, not
//! one per tick until the next scheduled discovery). A device is known by its
//! UUID, not its index: indices are renumbered when a GPU appears or goes. A
//! device whose UUID persists keeps its baselines; a new one starts with
//! fresh baselines, so its first reading only sets them, as every device's
//! does on the meter's first tick; a vanished one is dropped with its
//! baselines. Between discoveries devices are read by UUID, so a renumbering
//! cannot make one device's counters look like another's. Enumeration failing
//! is an NVML error like any other (see below).
//!
//! # What one tick measures
//!
//! For every device known at the tick:
//!
//! * **GPU time, sampled.** `nvmlDeviceGetProcessUtilization` returns the
//!   driver's buffered per-process samples newer than the last timestamp seen.
//!   A sample's SM percentage covers the driver's sampling period that ends at
//!   its timestamp, so the distinct timestamps of a device's batch, sorted, are
//!   taken as period ends: the first period starts at the newest timestamp seen
//!   on the previous tick (unknown before any sample: it takes the length of the
//!   next period, or the tick if there is none), and no period is longer than
//!   the tick. `gpu_ns` = Σ sm% / 100 × period, per process.
//! * **GPU time, estimated.** Where per-process samples are `NOT_SUPPORTED`
//!   (older boards, vGPU, MIG), the device's busy time
//!   (`nvmlDeviceGetUtilizationRates().gpu` × tick) is split across the
//!   device's running processes in proportion to their used memory, or equally
//!   when none reports memory. That rule is a guess, and those records say so:
//!   [`Attribution::Estimated`].
//! * **Unattributed.** Device busy time (utilization × tick) that the per-process
//!   GPU time does not cover goes to `unattributed_gpu_ns`, so processes plus
//!   unattributed add up to what the device reports.
//! * **Memory.** Used memory of running compute and graphics processes × tick
//!   length (byte-nanoseconds). A pid listed in both lists is counted once, with
//!   the larger figure: NVML reports the same allocation under both contexts.
//! * **Energy.** The delta of `nvmlDeviceGetTotalEnergyConsumption` (mJ) is split
//!   like GPU time: in proportion to each process's `gpu_ns` over the device's
//!   busy time (or the processes' total, if larger). The share of idle and
//!   unattributed busy time goes to `unattributed_energy_mj`, so idle power is
//!   never billed to a process.
//!
//! All splits use the largest-remainder rule: integer parts that add up exactly
//! to the whole.
//!
//! The first [`GpuMeter::sample`] only sets baselines (newest sample timestamp,
//! energy counter, tick instant) and attributes nothing.
//!
//! # Errors during a tick
//!
//! Any NVML error other than `NOT_SUPPORTED` (a capability, handled as above) or
//! `NOT_FOUND` from the sample query (no new samples), in discovery or in a
//! device's reading, skips that tick's GPU data: the window comes back with
//! `skipped = true` and no usage, `errors` grows by one, and a warning is
//! logged at most once a minute. The devices already known are still read, and
//! the baselines that *were* read on that tick are advanced, so the skipped
//! interval is not billed to the next tick; a counter that could not be read at
//! all carries its delta into the next good tick rather than losing it.
//!
//! # MIG
//!
//! With MIG enabled ([`DeviceInfo::mig_enabled`]) NVML answers `NOT_SUPPORTED`
//! for both per-process utilization and device utilization on the parent GPU,
//! so it gives **no per-process or per-instance GPU time**: such processes get
//! `gpu_ns = 0`, `Estimated`. What NVML does give per process under MIG is used
//! memory and the GPU instance the process runs on ([`GpuUsage::gpu_instance_id`]),
//! so memory is attributed per GPU instance. Per-instance SM activity needs DCGM
//! profiling metrics, which this module does not read. Energy is per physical
//! GPU only; it is split by GPU time, so under MIG it all goes to
//! `unattributed_energy_mj`.
//!
//! # Limits
//!
//! Sampled GPU time is as fine as the driver's sampling period (about 1/6 s on
//! recent datacenter boards); processes with short kernels between samples are
//! undercounted. A GPU that appears is metered from its first reading after
//! the next discovery (up to `discovery_interval` late); a process's usage on
//! it before then is not billed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nvml_wrapper::Nvml;
use nvml_wrapper::enums::device::UsedGpuMemory;
use nvml_wrapper::error::NvmlError;
use serde::{Deserialize, Serialize};

/// The library loaded when the config names none: the driver's versioned
/// soname, which every driver install ships (the unversioned name comes only
/// with the development package).
pub const DEFAULT_LIBRARY: &str = "libnvidia-ml.so.1";

/// At most one warning per this long about failing NVML ticks: a GPU that has
/// fallen off the bus would otherwise log on every tick.
pub const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// How often devices are enumerated again unless the config says otherwise.
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(60);

/// `[gpu]` in the agent's config.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct GpuConfig {
    /// Path (or soname) of libnvidia-ml; `None`: [`DEFAULT_LIBRARY`]. The
    /// DaemonSet points it at the host driver it mounts.
    pub library_path: Option<PathBuf>,
    /// How often devices are enumerated again, so that a GPU added (or
    /// removed) after start is metered (or dropped) without a restart. `0s`:
    /// on every tick.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub discovery_interval: Duration,
}

impl Default for GpuConfig {
    fn default() -> Self {
        Self {
            library_path: None,
            discovery_interval: DEFAULT_DISCOVERY_INTERVAL,
        }
    }
}

impl GpuConfig {
    /// The library that will be loaded.
    pub fn library(&self) -> &Path {
        self.library_path
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_LIBRARY))
    }
}

/// How a process's GPU time was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Attribution {
    /// From the driver's per-process SM samples.
    Sampled,
    /// Device utilization split by the used-memory rule (see the module doc).
    Estimated,
}

/// One process's use of one GPU during one tick.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GpuUsage {
    pub pid: u32,
    pub device_uuid: String,
    /// The MIG GPU instance the process runs in; `None` without MIG.
    pub gpu_instance_id: Option<u32>,
    /// SM-busy nanoseconds attributed to the process.
    pub gpu_ns: u64,
    /// Used GPU memory (bytes) × tick length (ns).
    pub memory_byte_ns: u128,
    /// Share of the device's energy counter delta, millijoules.
    pub energy_mj: u64,
    pub attribution: Attribution,
}

/// What one tick measured on all devices.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GpuWindow {
    /// Sorted by device index, then pid.
    pub per_process: Vec<GpuUsage>,
    /// Device busy time that no process accounts for, summed over devices.
    pub unattributed_gpu_ns: u64,
    /// Energy not attributed to a process (idle, unattributed busy time).
    pub unattributed_energy_mj: u64,
    pub devices: Vec<DeviceInfo>,
    /// NVML errors since open (a counter; a tick adds at most one).
    pub errors: u64,
    /// True when this tick's GPU data was dropped because of an NVML error.
    pub skipped: bool,
}

/// A GPU as NVML enumerates it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DeviceInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub mig_enabled: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("NVML library {} could not be loaded (no NVIDIA driver on this node?): {source}", path.display())]
    Load { path: PathBuf, source: NvmlError },
    #[error("NVML library {} loaded but nvmlInit failed: {source}", path.display())]
    Init { path: PathBuf, source: NvmlError },
    #[error("NVML ({}) reports no GPU devices", path.display())]
    NoDevices { path: PathBuf },
    #[error("NVML {call} failed: {source}")]
    Call {
        call: &'static str,
        source: NvmlError,
    },
    #[error("NVML {call} failed while enumerating GPU {index}: {source}")]
    Discover {
        index: u32,
        call: &'static str,
        source: NvmlError,
    },
    #[error("NVML {call} failed for GPU {index} ({uuid}): {source}")]
    Device {
        index: u32,
        uuid: String,
        call: &'static str,
        source: NvmlError,
    },
}

/// Baselines carried from one tick to the next, per device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DeviceState {
    /// Newest per-process sample timestamp seen (µs, the driver's clock).
    last_seen_us: Option<u64>,
    /// Energy counter at the last reading, mJ.
    last_energy_mj: Option<u64>,
}

/// What the meter keeps about one device between ticks, keyed by its UUID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tracked {
    state: DeviceState,
    /// Whether the device has been read since it was found: its first
    /// reading only sets baselines (the interval before it was known is not
    /// the device's to bill).
    read_once: bool,
}

/// One process in a device's running lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ProcessMemory {
    used_bytes: u64,
    gpu_instance_id: Option<u32>,
}

/// One per-process utilization sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    pid: u32,
    timestamp_us: u64,
    sm_percent: u32,
}

/// What NVML said about one device on one tick. `None` fields are
/// capabilities the device lacks (`NOT_SUPPORTED`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct DeviceReading {
    processes: BTreeMap<u32, ProcessMemory>,
    samples: Option<Vec<Sample>>,
    busy_percent: Option<u32>,
    energy_mj: Option<u64>,
}

/// One device's share of a window.
#[derive(Debug, Default, PartialEq, Eq)]
struct DeviceResult {
    usages: Vec<GpuUsage>,
    unattributed_gpu_ns: u64,
    unattributed_energy_mj: u64,
}

/// An open NVML session and the baselines between ticks.
pub struct GpuMeter {
    nvml: Nvml,
    discovery_interval: Duration,
    /// The devices known now, sorted by index.
    devices: Vec<DeviceInfo>,
    /// Baselines by device UUID; exactly the UUIDs of `devices`.
    tracked: BTreeMap<String, Tracked>,
    /// The last successful enumeration; `None` until the first tick (open
    /// has just enumerated).
    last_discovery: Option<Instant>,
    /// Enumerate on the next tick whatever the interval (set by an error).
    rediscover: bool,
    last_tick: Option<Instant>,
    errors: u64,
    last_error_log: Option<Instant>,
}

impl std::fmt::Debug for GpuMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `Nvml` is not Debug; the devices say what matters.
        f.debug_struct("GpuMeter")
            .field("devices", &self.devices)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl GpuMeter {
    /// Loads NVML and enumerates the devices. An `Err` means "no GPU metering on
    /// this node": the caller logs it once and carries on without it.
    pub fn open(config: &GpuConfig) -> Result<GpuMeter, GpuError> {
        let path = config.library().to_path_buf();
        let nvml = Nvml::builder()
            .lib_path(path.as_os_str())
            .init()
            .map_err(|source| init_error(&path, source))?;
        let devices = enumerate(&nvml)?;
        if devices.is_empty() {
            return Err(GpuError::NoDevices { path });
        }
        let tracked = devices
            .iter()
            .map(|d| (d.uuid.clone(), Tracked::default()))
            .collect();
        Ok(GpuMeter {
            nvml,
            discovery_interval: config.discovery_interval,
            devices,
            tracked,
            last_discovery: None,
            rediscover: false,
            last_tick: None,
            errors: 0,
            last_error_log: None,
        })
    }

    /// The devices known now (found at open or by the last discovery).
    pub fn devices(&self) -> &[DeviceInfo] {
        &self.devices
    }

    /// Enumerates the devices if a discovery is due at `now`, and adopts what
    /// it found; an error leaves the known devices as they were (and the
    /// discovery due, so the next tick tries again).
    fn discover_if_due(&mut self, now: Instant) -> Result<(), GpuError> {
        let due = match self.last_discovery {
            // Open has just enumerated: the interval starts at the first tick.
            None => {
                self.last_discovery = Some(now);
                false
            }
            Some(last) => {
                self.rediscover || now.saturating_duration_since(last) >= self.discovery_interval
            }
        };
        if !due {
            return Ok(());
        }
        let found = enumerate(&self.nvml)?;
        let mut tracked = BTreeMap::new();
        for device in &found {
            let kept = self.tracked.remove(&device.uuid);
            if kept.is_none() {
                tracing::info!(
                    index = device.index,
                    uuid = %device.uuid,
                    name = %device.name,
                    "GPU found; metered from its next reading"
                );
            }
            tracked.insert(device.uuid.clone(), kept.unwrap_or_default());
        }
        for uuid in self.tracked.keys() {
            tracing::info!(uuid = %uuid, "GPU gone; no longer metered");
        }
        self.tracked = tracked;
        self.devices = found;
        self.last_discovery = Some(now);
        self.rediscover = false;
        Ok(())
    }

    /// NVML errors since open.
    pub fn errors(&self) -> u64 {
        self.errors
    }

    /// One tick ending at `now`; see the module doc for what is measured. Never
    /// panics and never fails: an NVML error gives a `skipped` window.
    pub fn sample(&mut self, now: Instant) -> GpuWindow {
        let tick_ns = self
            .last_tick
            .map(|last| duration_ns(now.saturating_duration_since(last)));
        self.last_tick = Some(now);

        // A failed discovery still lets the known devices be read below, so
        // their baselines move past this tick.
        let mut failure = self.discover_if_due(now).err();
        let mut readings = Vec::with_capacity(self.devices.len());
        for info in &self.devices {
            let tracked = self.tracked.entry(info.uuid.clone()).or_default();
            let (reading, error) = read_device(&self.nvml, info, tracked.state.last_seen_us);
            // Advance whatever baselines were read, even on a failed tick, so
            // the skipped interval is not billed to the next one.
            let previous = tracked.state;
            if let Some(samples) = &reading.samples {
                tracked.state.last_seen_us = newest(previous.last_seen_us, samples);
            }
            if let Some(energy) = reading.energy_mj {
                tracked.state.last_energy_mj = Some(energy);
            }
            let first = !tracked.read_once;
            tracked.read_once = true;
            if failure.is_none() {
                failure = error;
            }
            readings.push((previous, reading, first));
        }

        let mut window = GpuWindow {
            devices: self.devices.clone(),
            ..GpuWindow::default()
        };
        if let Some(error) = failure {
            self.errors += 1;
            self.rediscover = true;
            window.errors = self.errors;
            window.skipped = true;
            if should_log(self.last_error_log, now) {
                self.last_error_log = Some(now);
                tracing::warn!(
                    error = %error,
                    errors = self.errors,
                    "GPU data skipped for this tick (further NVML errors within a minute are counted, not logged)"
                );
            }
            return window;
        }
        window.errors = self.errors;
        let Some(tick_ns) = tick_ns else {
            // First tick: baselines only.
            return window;
        };
        for (info, (previous, reading, first)) in self.devices.iter().zip(&readings) {
            if *first {
                // Found since the last tick: baselines only.
                continue;
            }
            let result = attribute_device(&info.uuid, previous, reading, tick_ns);
            window.per_process.extend(result.usages);
            window.unattributed_gpu_ns = window
                .unattributed_gpu_ns
                .saturating_add(result.unattributed_gpu_ns);
            window.unattributed_energy_mj = window
                .unattributed_energy_mj
                .saturating_add(result.unattributed_energy_mj);
        }
        window
    }
}

/// Tells "the library is not there" (no driver on this node) apart from "the
/// library is there but the driver refused" (version mismatch, permissions).
fn init_error(path: &Path, source: NvmlError) -> GpuError {
    let path = path.to_path_buf();
    match source {
        NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => {
            GpuError::Load { path, source }
        }
        source => GpuError::Init { path, source },
    }
}

/// Every device NVML sees now, in index order.
fn enumerate(nvml: &Nvml) -> Result<Vec<DeviceInfo>, GpuError> {
    let count = nvml.device_count().map_err(|source| GpuError::Call {
        call: "nvmlDeviceGetCount",
        source,
    })?;
    (0..count).map(|index| discover(nvml, index)).collect()
}

fn discover(nvml: &Nvml, index: u32) -> Result<DeviceInfo, GpuError> {
    let err = |call| {
        move |source| GpuError::Discover {
            index,
            call,
            source,
        }
    };
    let device = nvml
        .device_by_index(index)
        .map_err(err("nvmlDeviceGetHandleByIndex"))?;
    let uuid = device.uuid().map_err(err("nvmlDeviceGetUUID"))?;
    let name = device.name().map_err(err("nvmlDeviceGetName"))?;
    let mig_enabled = match device.mig_mode() {
        // NVML_DEVICE_MIG_ENABLE is 1.
        Ok(mode) => mode.current == 1,
        // Boards without MIG answer NOT_SUPPORTED: that is "off", not an error.
        Err(NvmlError::NotSupported) => false,
        Err(source) => return Err(err("nvmlDeviceGetMigMode")(source)),
    };
    Ok(DeviceInfo {
        index,
        uuid,
        name,
        mig_enabled,
    })
}

/// Reads one device, found by UUID: its index may have changed since the
/// last discovery. Every query is attempted even after one fails, so the
/// caller can still advance the baselines that were read; the first failure
/// is returned beside the reading.
fn read_device(
    nvml: &Nvml,
    info: &DeviceInfo,
    last_seen_us: Option<u64>,
) -> (DeviceReading, Option<GpuError>) {
    let mut reading = DeviceReading::default();
    let mut failure = None;
    let mut fail = |call: &'static str, source: NvmlError| {
        if failure.is_none() {
            failure = Some(GpuError::Device {
                index: info.index,
                uuid: info.uuid.clone(),
                call,
                source,
            });
        }
    };
    let device = match nvml.device_by_uuid(info.uuid.as_str()) {
        Ok(device) => device,
        Err(source) => {
            fail("nvmlDeviceGetHandleByUUID", source);
            return (reading, failure);
        }
    };

    for (call, list) in [
        (
            "nvmlDeviceGetComputeRunningProcesses",
            device.running_compute_processes(),
        ),
        (
            "nvmlDeviceGetGraphicsRunningProcesses",
            device.running_graphics_processes(),
        ),
    ] {
        match list {
            Ok(processes) => {
                for process in processes {
                    let used_bytes = match process.used_gpu_memory {
                        UsedGpuMemory::Used(bytes) => bytes,
                        UsedGpuMemory::Unavailable => 0,
                    };
                    let entry = reading
                        .processes
                        .entry(process.pid)
                        .or_insert(ProcessMemory {
                            used_bytes: 0,
                            gpu_instance_id: process.gpu_instance_id,
                        });
                    entry.used_bytes = entry.used_bytes.max(used_bytes);
                }
            }
            Err(NvmlError::NotSupported) => {}
            Err(source) => fail(call, source),
        }
    }

    // Only samples newer than the baseline: the driver's buffer can hold
    // seconds of them, all already billed.
    reading.samples = match device.process_utilization_stats(last_seen_us) {
        Ok(samples) => Some(
            samples
                .into_iter()
                .map(|s| Sample {
                    pid: s.pid,
                    timestamp_us: s.timestamp,
                    sm_percent: s.sm_util,
                })
                .collect(),
        ),
        // NOT_FOUND: the driver holds no sample newer than the timestamp.
        Err(NvmlError::NotFound) => Some(Vec::new()),
        Err(NvmlError::NotSupported) => None,
        Err(source) => {
            fail("nvmlDeviceGetProcessUtilization", source);
            Some(Vec::new())
        }
    };

    reading.busy_percent = match device.utilization_rates() {
        Ok(utilization) => Some(utilization.gpu.min(100)),
        Err(NvmlError::NotSupported) => None,
        Err(source) => {
            fail("nvmlDeviceGetUtilizationRates", source);
            None
        }
    };

    reading.energy_mj = match device.total_energy_consumption() {
        Ok(total) => Some(total),
        Err(NvmlError::NotSupported) => None,
        Err(source) => {
            fail("nvmlDeviceGetTotalEnergyConsumption", source);
            None
        }
    };
    (reading, failure)
}

fn newest(previous: Option<u64>, samples: &[Sample]) -> Option<u64> {
    samples.iter().map(|s| s.timestamp_us).chain(previous).max()
}

fn should_log(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|last| now.saturating_duration_since(last) >= ERROR_LOG_INTERVAL)
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Attributes one device's tick of length `tick_ns`, given the baselines
/// before the tick and what NVML said. Pure, so the rules are unit-tested.
fn attribute_device(
    uuid: &str,
    previous: &DeviceState,
    reading: &DeviceReading,
    tick_ns: u64,
) -> DeviceResult {
    let busy_ns = reading
        .busy_percent
        .map(|percent| percent_of(tick_ns, u64::from(percent)));

    // pid → GPU ns, over every pid that has memory or samples.
    let mut gpu: BTreeMap<u32, u64> = reading.processes.keys().map(|&pid| (pid, 0)).collect();
    let attribution;
    let mut unattributed_gpu_ns = 0;
    match &reading.samples {
        Some(samples) => {
            attribution = Attribution::Sampled;
            for (pid, ns) in sampled_gpu_ns(previous.last_seen_us, samples, tick_ns) {
                gpu.insert(pid, ns);
            }
            let covered = gpu.values().fold(0u64, |sum, &ns| sum.saturating_add(ns));
            unattributed_gpu_ns = busy_ns.unwrap_or(0).saturating_sub(covered);
        }
        None => {
            attribution = Attribution::Estimated;
            let busy = busy_ns.unwrap_or(0);
            if reading.processes.is_empty() {
                unattributed_gpu_ns = busy;
            } else {
                let memory: Vec<u64> = reading.processes.values().map(|p| p.used_bytes).collect();
                let weights = if memory.iter().all(|&bytes| bytes == 0) {
                    vec![1; memory.len()]
                } else {
                    memory
                };
                for ((_, ns), part) in gpu.iter_mut().zip(split_proportional(busy, &weights)) {
                    *ns = part;
                }
            }
        }
    }

    // Energy: the counter's delta split by GPU time over the device's busy
    // time; the remainder (idle, unattributed) is the last weight.
    let covered = gpu.values().fold(0u64, |sum, &ns| sum.saturating_add(ns));
    let energy_delta = match (previous.last_energy_mj, reading.energy_mj) {
        // A counter that went backwards (driver reload) gives no delta.
        (Some(before), Some(after)) => after.saturating_sub(before),
        _ => 0,
    };
    let denominator = busy_ns.unwrap_or(0).max(covered);
    let mut weights: Vec<u64> = gpu.values().copied().collect();
    weights.push(denominator - covered);
    let mut energy = split_proportional(energy_delta, &weights);
    let unattributed_energy_mj = if denominator == 0 {
        energy_delta
    } else {
        energy.pop().unwrap_or(0)
    };

    let usages = gpu
        .iter()
        .zip(energy)
        .map(|((&pid, &gpu_ns), energy_mj)| {
            let process = reading.processes.get(&pid);
            GpuUsage {
                pid,
                device_uuid: uuid.to_string(),
                gpu_instance_id: process.and_then(|p| p.gpu_instance_id),
                gpu_ns,
                memory_byte_ns: process
                    .map_or(0, |p| u128::from(p.used_bytes) * u128::from(tick_ns)),
                energy_mj,
                attribution,
            }
        })
        .collect();
    DeviceResult {
        usages,
        unattributed_gpu_ns,
        unattributed_energy_mj,
    }
}

/// Per-pid GPU ns from samples newer than `last_seen_us`: Σ sm% × period,
/// periods as described in the module doc.
fn sampled_gpu_ns(
    last_seen_us: Option<u64>,
    samples: &[Sample],
    tick_ns: u64,
) -> BTreeMap<u32, u64> {
    let fresh: Vec<&Sample> = samples
        .iter()
        .filter(|s| last_seen_us.is_none_or(|seen| s.timestamp_us > seen))
        .collect();
    let mut ends: Vec<u64> = fresh.iter().map(|s| s.timestamp_us).collect();
    ends.sort_unstable();
    ends.dedup();
    let periods = sample_periods_ns(last_seen_us, &ends, tick_ns);

    // Σ sm% × period in u128, divided once at the end so rounding happens once.
    let mut scaled: BTreeMap<u32, u128> = BTreeMap::new();
    for sample in fresh {
        let Ok(at) = ends.binary_search(&sample.timestamp_us) else {
            continue;
        };
        let period = periods.get(at).copied().unwrap_or(0);
        *scaled.entry(sample.pid).or_default() +=
            u128::from(sample.sm_percent.min(100)) * u128::from(period);
    }
    scaled
        .into_iter()
        .map(|(pid, v)| (pid, u64::try_from(v / 100).unwrap_or(u64::MAX)))
        .collect()
}

/// Lengths (ns) of the sampling periods ending at `ends_us` (sorted, distinct,
/// µs). The first starts at `start_us`; with no start it is as long as the
/// next period, or the tick if there is only one. None exceeds `cap_ns`.
fn sample_periods_ns(start_us: Option<u64>, ends_us: &[u64], cap_ns: u64) -> Vec<u64> {
    let gaps: Vec<Option<u64>> = ends_us
        .iter()
        .enumerate()
        .map(|(i, &end)| {
            let start = if i == 0 {
                start_us
            } else {
                ends_us.get(i - 1).copied()
            };
            start.map(|s| end.saturating_sub(s).saturating_mul(1_000))
        })
        .collect();
    let first_known = gaps.get(1).copied().flatten().unwrap_or(cap_ns);
    gaps.iter()
        .map(|gap| gap.unwrap_or(first_known).min(cap_ns))
        .collect()
}

/// `percent`% of `whole`, rounded down.
fn percent_of(whole: u64, percent: u64) -> u64 {
    u64::try_from(u128::from(whole) * u128::from(percent) / 100).unwrap_or(u64::MAX)
}

/// Splits `total` in proportion to `weights` with the largest-remainder rule,
/// so the parts add up to exactly `total` (ties go to the earlier weight).
/// All weights zero (or none): every part is zero.
pub fn split_proportional(total: u64, weights: &[u64]) -> Vec<u64> {
    let sum: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    if sum == 0 {
        return vec![0; weights.len()];
    }
    let mut parts = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    let mut given: u128 = 0;
    for (i, &w) in weights.iter().enumerate() {
        let exact = u128::from(total) * u128::from(w);
        let part = exact / sum;
        given += part;
        parts.push(u64::try_from(part).unwrap_or(u64::MAX));
        remainders.push((exact % sum, i));
    }
    // Largest remainder first; the earlier index wins a tie.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let left = u128::from(total).saturating_sub(given);
    for &(_, i) in remainders
        .iter()
        .take(usize::try_from(left).unwrap_or(usize::MAX))
    {
        if let Some(part) = parts.get_mut(i) {
            *part += 1;
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const SEC: u64 = 1_000_000_000;

    fn proc_mem(used_bytes: u64) -> ProcessMemory {
        ProcessMemory {
            used_bytes,
            gpu_instance_id: None,
        }
    }

    fn sample(pid: u32, timestamp_us: u64, sm_percent: u32) -> Sample {
        Sample {
            pid,
            timestamp_us,
            sm_percent,
        }
    }

    #[test]
    fn split_is_exact_and_proportional() {
        assert_eq!(split_proportional(100, &[3, 1]), vec![75, 25]);
        assert_eq!(split_proportional(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(split_proportional(2, &[1, 1, 1]), vec![1, 1, 0]);
        assert_eq!(split_proportional(7, &[0, 0]), vec![0, 0]);
        assert_eq!(split_proportional(7, &[]), Vec::<u64>::new());
        assert_eq!(split_proportional(0, &[5, 5]), vec![0, 0]);
        let parts = split_proportional(u64::MAX, &[u64::MAX, 1, 7]);
        assert_eq!(
            parts.iter().map(|&p| u128::from(p)).sum::<u128>(),
            u128::from(u64::MAX)
        );
    }

    #[test]
    fn periods_start_at_last_seen_and_are_capped() {
        assert_eq!(
            sample_periods_ns(Some(1_000_000), &[1_250_000, 1_500_000, 2_000_000], SEC),
            vec![250 * MS, 250 * MS, 500 * MS]
        );
        // No previous sample: the first period is as long as the next one.
        assert_eq!(
            sample_periods_ns(None, &[10, 20_010], SEC),
            vec![20 * MS, 20 * MS]
        );
        // … or the whole (capped) tick when it is alone.
        assert_eq!(sample_periods_ns(None, &[10], 300 * MS), vec![300 * MS]);
        // A long gap (nothing ran) is not billed beyond the tick.
        assert_eq!(sample_periods_ns(Some(0), &[5_000_000], SEC), vec![SEC]);
    }

    #[test]
    fn sampled_device_sums_sm_fraction_times_period() {
        let reading = DeviceReading {
            processes: [
                (100, proc_mem(2 << 30)),
                (101, proc_mem(1 << 30)),
                (102, proc_mem(0)),
            ]
            .into_iter()
            .collect(),
            samples: Some(vec![
                sample(100, 1_000_000, 99), // already seen: ignored
                sample(100, 1_250_000, 40),
                sample(101, 1_250_000, 20),
                sample(100, 1_500_000, 60),
                sample(100, 2_000_000, 50),
                sample(101, 2_000_000, 10),
            ]),
            busy_percent: Some(70),
            energy_mj: Some(1_350_000),
        };
        let previous = DeviceState {
            last_seen_us: Some(1_000_000),
            last_energy_mj: Some(1_000_000),
        };
        let result = attribute_device("GPU-0", &previous, &reading, SEC);
        let got: Vec<(u32, u64, u128, u64, Attribution)> = result
            .usages
            .iter()
            .map(|u| {
                (
                    u.pid,
                    u.gpu_ns,
                    u.memory_byte_ns,
                    u.energy_mj,
                    u.attribution,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    100,
                    500 * MS,
                    (2u128 << 30) * u128::from(SEC),
                    250_000,
                    Attribution::Sampled
                ),
                (
                    101,
                    100 * MS,
                    (1u128 << 30) * u128::from(SEC),
                    50_000,
                    Attribution::Sampled
                ),
                (102, 0, 0, 0, Attribution::Sampled),
            ]
        );
        // 70 % of 1 s busy, 600 ms covered by processes.
        assert_eq!(result.unattributed_gpu_ns, 100 * MS);
        assert_eq!(result.unattributed_energy_mj, 50_000);
    }

    #[test]
    fn unsupported_device_splits_busy_time_by_used_memory() {
        let reading = DeviceReading {
            processes: [(200, proc_mem(3 << 30)), (201, proc_mem(1 << 30))]
                .into_iter()
                .collect(),
            samples: None,
            busy_percent: Some(60),
            energy_mj: Some(600_000),
        };
        let previous = DeviceState {
            last_seen_us: None,
            last_energy_mj: Some(500_000),
        };
        let result = attribute_device("GPU-1", &previous, &reading, SEC);
        let got: Vec<(u32, u64, u64, Attribution)> = result
            .usages
            .iter()
            .map(|u| (u.pid, u.gpu_ns, u.energy_mj, u.attribution))
            .collect();
        assert_eq!(
            got,
            vec![
                (200, 450 * MS, 75_000, Attribution::Estimated),
                (201, 150 * MS, 25_000, Attribution::Estimated),
            ]
        );
        assert_eq!(result.unattributed_gpu_ns, 0);
        assert_eq!(result.unattributed_energy_mj, 0);
    }

    #[test]
    fn estimated_split_is_equal_without_memory_and_unattributed_without_processes() {
        let mut reading = DeviceReading {
            processes: [(1, proc_mem(0)), (2, proc_mem(0)), (3, proc_mem(0))]
                .into_iter()
                .collect(),
            samples: None,
            busy_percent: Some(100),
            energy_mj: None,
        };
        let result = attribute_device("G", &DeviceState::default(), &reading, 10);
        let gpu: Vec<u64> = result.usages.iter().map(|u| u.gpu_ns).collect();
        assert_eq!(gpu, vec![4, 3, 3]);

        reading.processes.clear();
        reading.energy_mj = Some(10);
        let previous = DeviceState {
            last_seen_us: None,
            last_energy_mj: Some(4),
        };
        let result = attribute_device("G", &previous, &reading, SEC);
        assert!(result.usages.is_empty());
        assert_eq!(result.unattributed_gpu_ns, SEC);
        assert_eq!(result.unattributed_energy_mj, 6);
    }

    #[test]
    fn mig_device_gets_memory_per_instance_and_no_gpu_time() {
        let reading = DeviceReading {
            processes: [(
                7,
                ProcessMemory {
                    used_bytes: 100,
                    gpu_instance_id: Some(3),
                },
            )]
            .into_iter()
            .collect(),
            samples: None,
            busy_percent: None,
            energy_mj: Some(50),
        };
        let previous = DeviceState {
            last_seen_us: None,
            last_energy_mj: Some(20),
        };
        let result = attribute_device("MIG", &previous, &reading, 2 * SEC);
        assert_eq!(result.usages.len(), 1);
        let usage = &result.usages[0];
        assert_eq!(usage.gpu_instance_id, Some(3));
        assert_eq!(usage.gpu_ns, 0);
        assert_eq!(usage.memory_byte_ns, 200 * u128::from(SEC));
        assert_eq!(usage.energy_mj, 0);
        assert_eq!(result.unattributed_energy_mj, 30);
    }

    #[test]
    fn errors_are_logged_at_most_once_a_minute() {
        let t0 = Instant::now();
        assert!(should_log(None, t0));
        assert!(!should_log(Some(t0), t0 + Duration::from_secs(59)));
        assert!(should_log(Some(t0), t0 + ERROR_LOG_INTERVAL));
    }

    #[test]
    fn config_defaults_to_the_system_library_and_rejects_unknown_keys() {
        let config: GpuConfig = toml::from_str("").expect("empty config");
        assert_eq!(config.library(), Path::new(DEFAULT_LIBRARY));
        assert_eq!(config.discovery_interval, Duration::from_secs(60));
        assert_eq!(config, GpuConfig::default());
        let config: GpuConfig = toml::from_str(
            "library_path = \"/host/lib/libnvidia-ml.so.1\"\ndiscovery_interval = \"10s\"",
        )
        .expect("path and interval");
        assert_eq!(config.library(), Path::new("/host/lib/libnvidia-ml.so.1"));
        assert_eq!(config.discovery_interval, Duration::from_secs(10));
        assert!(toml::from_str::<GpuConfig>("libary_path = \"x\"").is_err());
        let e = toml::from_str::<GpuConfig>("discovery_interval = \"often\"")
            .expect_err("not a duration");
        assert!(e.to_string().contains("often"), "{e}");
        assert_eq!(
            serde_json::to_string(&Attribution::Estimated).expect("json"),
            "\"estimated\""
        );
    }
}
