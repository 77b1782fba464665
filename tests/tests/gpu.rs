//! GPU metering against the stand-in NVML of `tests/nvml-stub/` (no GPU, no
//! root needed). Each test builds its own copy of the stub into a temp dir and
//! writes its script beside it, so tests running in parallel never share a
//! loaded library or a script; the tick the stub answers for is the number in
//! `nvml-stub.script.tick`, written before each `GpuMeter::sample`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mentat_agent::collect::gpu::{Attribution, GpuConfig, GpuError, GpuMeter, GpuUsage, GpuWindow};
use mentat_tests::nvml_stub::NvmlStub;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;
const GIB: u128 = 1 << 30;
const MIB: u128 = 1 << 20;

const DEV0: &str = "GPU-00000000-aaaa-0000-0000-000000000000";
const DEV1: &str = "GPU-11111111-bbbb-0000-0000-000000000000";

struct Stub(NvmlStub);

impl Stub {
    fn build(script: &str) -> Stub {
        Stub(NvmlStub::build(script).unwrap_or_else(|e| panic!("{e:#}")))
    }

    fn library(&self) -> PathBuf {
        self.0.library()
    }

    fn set_tick(&self, tick: u32) {
        self.0.set_tick(tick).unwrap_or_else(|e| panic!("{e:#}"));
    }

    fn config(&self) -> GpuConfig {
        GpuConfig {
            library_path: Some(self.library()),
            ..GpuConfig::default()
        }
    }

    fn open(&self) -> GpuMeter {
        GpuMeter::open(&self.config()).expect("open the stub NVML")
    }
}

/// (pid, device, gpu_ns, memory_byte_ns, energy_mj, attribution) per usage,
/// in the window's order.
fn rows(window: &GpuWindow) -> Vec<(u32, &str, u64, u128, u64, Attribution)> {
    window
        .per_process
        .iter()
        .map(|u: &GpuUsage| {
            (
                u.pid,
                u.device_uuid.as_str(),
                u.gpu_ns,
                u.memory_byte_ns,
                u.energy_mj,
                u.attribution,
            )
        })
        .collect()
}

/// Two GPUs. Device 0 has per-process samples; device 1 answers NOT_SUPPORTED
/// for them, so its busy time is split by used memory. Tick 2 fails.
const SCRIPT: &str = "\
device 0 GPU-00000000-aaaa-0000-0000-000000000000 Stub-H100 0 ok
device 1 GPU-11111111-bbbb-0000-0000-000000000000 Stub-T4 0 unsupported

# tick 0: baselines only (this sample and these counters are never billed)
util   0 0 10 0
energy 0 0 1000000
proc   0 0 100 compute 1073741824
sample 0 0 100 1000000 10 0
util   0 1 5 0
energy 0 1 500000
proc   0 1 200 compute 1073741824

# tick 1: periods 250, 250, 500 ms after the baseline timestamp 1000000 us
#   pid 100: 40%*250 + 60%*250 + 50%*500 = 500 ms; pid 101: 20%*250 + 10%*500 = 100 ms
#   busy 70% of 1 s = 700 ms -> 100 ms unattributed; energy 350000 mJ split 5:1:(1)
util   1 0 70 0
energy 1 0 1350000
proc   1 0 100 compute 2147483648
proc   1 0 101 compute 1073741824
proc   1 0 102 graphics 536870912
sample 1 0 100 1250000 40 0
sample 1 0 101 1250000 20 0
sample 1 0 100 1500000 60 0
sample 1 0 100 2000000 50 0
sample 1 0 101 2000000 10 0
#   device 1: busy 60% = 600 ms split 3 GiB : 1 GiB; energy 100000 mJ likewise
util   1 1 60 0
energy 1 1 600000
proc   1 1 200 compute 3221225472
proc   1 1 201 compute 1073741824

# tick 2: utilization fails; samples and energy are still read, so the
# baselines move past this tick and none of it reaches tick 3
error  2 nvmlDeviceGetUtilizationRates 999
energy 2 0 1700000
proc   2 0 100 compute 2147483648
sample 2 0 100 2500000 100 0
sample 2 0 100 3000000 100 0
energy 2 1 650000
proc   2 1 200 compute 1073741824

# tick 3: pid 101 80% for 2 x 500 ms = 800 ms of 900 ms busy; energy 90000 mJ
# pid 100 is listed as compute and graphics: its memory counts once (the larger)
util   3 0 90 0
energy 3 0 1790000
proc   3 0 100 compute 2147483648
proc   3 0 100 graphics 1048576
proc   3 0 101 compute 1073741824
sample 3 0 101 3500000 80 0
sample 3 0 101 4000000 80 0
#   device 1: busy 40% = 400 ms, equal memory -> 200 ms each; 40000 mJ
util   3 1 40 0
energy 3 1 690000
proc   3 1 200 compute 1073741824
proc   3 1 201 compute 1073741824
";

#[test]
fn stub_script_is_attributed_exactly() {
    use Attribution::{Estimated, Sampled};

    let stub = Stub::build(SCRIPT);
    let mut meter = stub.open();
    let devices = meter.devices();
    assert_eq!(devices.len(), 2);
    assert_eq!(
        (
            devices[0].index,
            devices[0].uuid.as_str(),
            devices[0].name.as_str()
        ),
        (0, DEV0, "Stub-H100")
    );
    assert_eq!((devices[1].index, devices[1].uuid.as_str()), (1, DEV1));
    assert!(!devices[0].mig_enabled && !devices[1].mig_enabled);

    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);

    let baseline = meter.sample(at(0));
    assert!(baseline.per_process.is_empty(), "{baseline:?}");
    assert_eq!((baseline.errors, baseline.skipped), (0, false));
    assert_eq!(baseline.devices.len(), 2);

    stub.set_tick(1);
    let w1 = meter.sample(at(1));
    let s = u128::from(SEC);
    assert_eq!(
        rows(&w1),
        vec![
            (100, DEV0, 500 * MS, 2 * GIB * s, 250_000, Sampled),
            (101, DEV0, 100 * MS, GIB * s, 50_000, Sampled),
            (102, DEV0, 0, 512 * MIB * s, 0, Sampled),
            (200, DEV1, 450 * MS, 3 * GIB * s, 75_000, Estimated),
            (201, DEV1, 150 * MS, GIB * s, 25_000, Estimated),
        ]
    );
    assert_eq!(w1.unattributed_gpu_ns, 100 * MS);
    assert_eq!(w1.unattributed_energy_mj, 50_000);
    assert_eq!((w1.errors, w1.skipped), (0, false));
    // Conservation: processes + unattributed = device busy time (700 + 600 ms)
    // and = the energy counters' deltas (350000 + 100000 mJ).
    let gpu: u64 = w1.per_process.iter().map(|u| u.gpu_ns).sum();
    assert_eq!(gpu + w1.unattributed_gpu_ns, 1300 * MS);
    let energy: u64 = w1.per_process.iter().map(|u| u.energy_mj).sum();
    assert_eq!(energy + w1.unattributed_energy_mj, 450_000);

    stub.set_tick(2);
    let w2 = meter.sample(at(2));
    assert!(w2.skipped);
    assert_eq!(w2.errors, 1);
    assert!(w2.per_process.is_empty());
    assert_eq!((w2.unattributed_gpu_ns, w2.unattributed_energy_mj), (0, 0));
    assert_eq!(meter.errors(), 1);

    stub.set_tick(3);
    let w3 = meter.sample(at(3));
    assert_eq!((w3.errors, w3.skipped), (1, false));
    assert_eq!(
        rows(&w3),
        vec![
            (100, DEV0, 0, 2 * GIB * s, 0, Sampled),
            (101, DEV0, 800 * MS, GIB * s, 80_000, Sampled),
            (200, DEV1, 200 * MS, GIB * s, 20_000, Estimated),
            (201, DEV1, 200 * MS, GIB * s, 20_000, Estimated),
        ]
    );
    assert_eq!(w3.unattributed_gpu_ns, 100 * MS);
    assert_eq!(w3.unattributed_energy_mj, 10_000);
}

#[test]
fn tick_length_scales_memory_and_estimated_time() {
    // One NOT_SUPPORTED device, ticks of 250 ms: memory and busy time follow
    // the tick actually elapsed, not a nominal one.
    let stub = Stub::build(
        "device 0 GPU-x Stub-K80 0 unsupported
         proc 1 0 42 compute 1000
         util 1 0 100 0
        ",
    );
    let mut meter = stub.open();
    let t0 = Instant::now();
    meter.sample(t0);
    stub.set_tick(1);
    let w = meter.sample(t0 + Duration::from_millis(250));
    assert_eq!(
        rows(&w),
        vec![(
            42,
            "GPU-x",
            250 * MS,
            1000 * u128::from(250 * MS),
            0,
            Attribution::Estimated
        )]
    );
    // No energy counter on this board: nothing to split, nothing invented.
    assert_eq!(w.unattributed_energy_mj, 0);
}

#[test]
fn mig_device_reports_memory_per_gpu_instance() {
    // Under MIG, NVML gives no per-process or device utilization (no `util`
    // line: NOT_SUPPORTED), only memory and the GPU instance of each process.
    let stub = Stub::build(
        "device 0 GPU-mig Stub-A100 1 unsupported
         proc 1 0 7 compute 4096 3
         proc 1 0 8 compute 4096 5
         energy 0 0 10
         energy 1 0 30
        ",
    );
    let mut meter = stub.open();
    assert!(meter.devices()[0].mig_enabled);
    let t0 = Instant::now();
    meter.sample(t0);
    stub.set_tick(1);
    let w = meter.sample(t0 + Duration::from_secs(1));
    let got: Vec<(u32, Option<u32>, u64, u128)> = w
        .per_process
        .iter()
        .map(|u| (u.pid, u.gpu_instance_id, u.gpu_ns, u.memory_byte_ns))
        .collect();
    let s = u128::from(SEC);
    assert_eq!(
        got,
        vec![(7, Some(3), 0, 4096 * s), (8, Some(5), 0, 4096 * s)]
    );
    assert_eq!(w.unattributed_gpu_ns, 0);
    assert_eq!(w.unattributed_energy_mj, 20);
}

#[test]
fn absent_library_is_an_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("no-such/libnvidia-ml.so.1");
    let err = GpuMeter::open(&GpuConfig {
        library_path: Some(missing.clone()),
        ..GpuConfig::default()
    })
    .expect_err("no library, no meter");
    assert!(matches!(err, GpuError::Load { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains(&missing.display().to_string()),
        "message does not name the path: {message}"
    );
}

#[test]
fn no_devices_is_an_error() {
    let stub = Stub::build("# a node whose driver sees no GPU\n");
    let err = GpuMeter::open(&stub.config()).expect_err("no devices, no meter");
    assert!(matches!(err, GpuError::NoDevices { .. }), "{err:?}");
    assert!(err.to_string().contains("no GPU devices"), "{err}");
}

#[test]
fn failed_init_is_an_error() {
    // A script the stub cannot parse makes nvmlInit_v2 fail, as a driver
    // mismatch would.
    let stub = Stub::build("bogus line\n");
    let err = GpuMeter::open(&stub.config()).expect_err("init fails");
    assert!(matches!(err, GpuError::Init { .. }), "{err:?}");
}

/// Devices come and go between ticks. Discovery every 10 s; the meter's ticks
/// are 10 s apart, then 5 s, then 1 s, so discovery runs on some ticks and not
/// others.
const DISCOVERY_SCRIPT: &str = "\
device 0 GPU-keep Stub-A 0 ok
device 1 GPU-gone Stub-B 0 unsupported 0 2
device 2 GPU-new  Stub-C 0 unsupported 1
device 3 GPU-late Stub-D 0 ok 3

# keep: one process, no device utilization, so all its energy follows its samples
proc   0 0 100 compute 1073741824
proc   1 0 100 compute 1073741824
proc   2 0 100 compute 1073741824
proc   3 0 100 compute 1073741824
proc   4 0 100 compute 1073741824
proc   5 0 100 compute 1073741824
sample 0 0 100 1000000 50 0
sample 1 0 100 1500000 50 0
sample 2 0 100 2000000 40 0
sample 3 0 100 2500000 20 0
sample 4 0 100 3000000 100 0
sample 5 0 100 3100000 100 0
energy 0 0 1000
energy 1 0 1100
energy 2 0 1300
energy 3 0 1400
energy 4 0 2400
energy 5 0 2450

# gone: present at ticks 0 and 1 only
proc   0 1 200 compute 1073741824
proc   1 1 200 compute 1073741824
util   0 1 50 0
util   1 1 50 0
energy 0 1 9000
energy 1 1 9500

# new: appears at tick 1, as index 2; index 1 once gone has gone. Its energy
# counter is below gone's last reading: baselines taken by index would bill
# it nothing.
proc   1 2 300 compute 2147483648
proc   2 2 300 compute 2147483648
proc   3 2 300 compute 2147483648
proc   4 2 300 compute 2147483648
proc   5 2 300 compute 2147483648
util   1 2 100 0
util   2 2 100 0
util   3 2 100 0
util   4 2 100 0
util   5 2 100 0
energy 1 2 5000
energy 2 2 5600
energy 3 2 5700
energy 4 2 6700
energy 5 2 6800

# late: appears at tick 3, between two discoveries
proc   3 3 400 compute 1048576
proc   4 3 400 compute 1048576
proc   5 3 400 compute 1048576
sample 3 3 400 7000000 90 0
energy 3 3 100
energy 4 3 200
energy 5 3 300

# tick 4: the discovery that is due fails
error  4 nvmlDeviceGetCount_v2 999
";

#[test]
fn devices_are_rediscovered_by_uuid() {
    use Attribution::{Estimated, Sampled};

    let stub = Stub::build(DISCOVERY_SCRIPT);
    let mut meter = GpuMeter::open(&GpuConfig {
        discovery_interval: Duration::from_secs(10),
        ..stub.config()
    })
    .expect("open the stub NVML");
    let uuids = |w: &GpuWindow| -> Vec<(u32, String)> {
        w.devices
            .iter()
            .map(|d| (d.index, d.uuid.clone()))
            .collect()
    };
    let device = |pairs: &[(u32, &str)]| -> Vec<(u32, String)> {
        pairs.iter().map(|&(i, u)| (i, u.to_string())).collect()
    };
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let s = u128::from(SEC);
    const GIB: u128 = 1 << 30;

    let w0 = meter.sample(at(0));
    assert!(w0.per_process.is_empty(), "{w0:?}");
    assert_eq!(uuids(&w0), device(&[(0, "GPU-keep"), (1, "GPU-gone")]));

    // Discovery finds GPU-new (index 2): its first reading is a baseline.
    stub.set_tick(1);
    let w1 = meter.sample(at(10));
    assert_eq!(
        uuids(&w1),
        device(&[(0, "GPU-keep"), (1, "GPU-gone"), (2, "GPU-new")])
    );
    assert_eq!(
        rows(&w1),
        vec![
            (100, "GPU-keep", 250 * MS, GIB * 10 * s, 100, Sampled),
            (200, "GPU-gone", 5 * SEC, GIB * 10 * s, 500, Estimated),
        ]
    );

    // GPU-gone has gone and GPU-new is index 1 now; GPU-new's baselines are
    // its own (energy 5000 -> 5600, not gone's 9500 -> 5600).
    stub.set_tick(2);
    let w2 = meter.sample(at(20));
    assert_eq!(uuids(&w2), device(&[(0, "GPU-keep"), (1, "GPU-new")]));
    assert_eq!(
        rows(&w2),
        vec![
            (100, "GPU-keep", 200 * MS, GIB * 10 * s, 200, Sampled),
            (300, "GPU-new", 10 * SEC, 2 * GIB * 10 * s, 600, Estimated),
        ]
    );
    assert_eq!(meter.devices().len(), 2);

    // 5 s after the last discovery: none runs, GPU-late is not seen yet.
    stub.set_tick(3);
    let w3 = meter.sample(at(25));
    assert_eq!(uuids(&w3), device(&[(0, "GPU-keep"), (1, "GPU-new")]));
    assert_eq!(
        rows(&w3),
        vec![
            (100, "GPU-keep", 100 * MS, GIB * 5 * s, 100, Sampled),
            (300, "GPU-new", 5 * SEC, 2 * GIB * 5 * s, 100, Estimated),
        ]
    );

    // The discovery due now fails: the tick is skipped and counted, the known
    // devices stay, and what they were read for this tick is not billed later.
    stub.set_tick(4);
    let w4 = meter.sample(at(30));
    assert!(w4.skipped, "{w4:?}");
    assert_eq!((w4.errors, meter.errors()), (1, 1));
    assert!(w4.per_process.is_empty());
    assert_eq!(uuids(&w4), device(&[(0, "GPU-keep"), (1, "GPU-new")]));

    // The failed discovery is still due: the next tick runs it and finds
    // GPU-late, whose first reading is a baseline.
    stub.set_tick(5);
    let w5 = meter.sample(at(31));
    assert!(!w5.skipped, "{w5:?}");
    assert_eq!(
        uuids(&w5),
        device(&[(0, "GPU-keep"), (1, "GPU-new"), (2, "GPU-late")])
    );
    assert_eq!(
        rows(&w5),
        vec![
            (100, "GPU-keep", 100 * MS, GIB * s, 50, Sampled),
            (300, "GPU-new", SEC, 2 * GIB * s, 100, Estimated),
        ]
    );
    assert_eq!(w5.errors, 1);
}

#[test]
fn a_device_that_goes_between_discoveries_costs_one_tick() {
    // GPU-b goes at tick 1 while the next discovery is an hour away: reading
    // it by UUID fails (the tick is skipped), and the error makes the next
    // tick enumerate again, which drops it.
    let stub = Stub::build(
        "device 0 GPU-a Stub-A 0 unsupported
         device 1 GPU-b Stub-B 0 unsupported 0 1
         util 0 0 50 0
         util 1 0 50 0
         util 2 0 50 0
         proc 2 0 1 compute 0
        ",
    );
    let mut meter = GpuMeter::open(&GpuConfig {
        discovery_interval: Duration::from_secs(3600),
        ..stub.config()
    })
    .expect("open the stub NVML");
    let t0 = Instant::now();
    meter.sample(t0);
    stub.set_tick(1);
    let w1 = meter.sample(t0 + Duration::from_secs(1));
    assert!(w1.skipped && w1.errors == 1, "{w1:?}");
    stub.set_tick(2);
    let w2 = meter.sample(t0 + Duration::from_secs(2));
    assert!(!w2.skipped, "{w2:?}");
    assert_eq!(w2.devices.len(), 1);
    assert_eq!(
        rows(&w2),
        vec![(1, "GPU-a", 500 * MS, 0, 0, Attribution::Estimated)]
    );
}
