//! `bench`: what mentat-agent's probes add to the events they hook, and what the agent costs.
//!
//! Two micro workloads run in this process under three configurations, interleaved round by
//! round (off, floor, metering, off, floor, metering, …) so that drift on a noisy machine
//! hits all three alike:
//!
//! - `off`: nothing attached;
//! - `floor`: `mentat-agent attach --mode floor`, empty programs on sys_enter and
//!   sched_switch: the least any design hooking those events pays;
//! - `metering`: `mentat-agent attach --mode metering`, the real programs.
//!
//! The workloads are a tight getppid loop (one sys_enter per call) and two processes
//! ping-ponging a byte over two pipes on one CPU (per switch: one sched_switch and two
//! syscalls). The figure that matters is what metering adds over `off`, against what the
//! floor adds.
//!
//! A third workload streams bytes over loopback TCP from a sender process to a receiver
//! process on two different CPUs, in 64 KiB writes and reads; every send and receive fires
//! the socket tracepoints metering hooks. Its figure is the throughput metering keeps
//! relative to `off` in the same round.
//!
//! Those timings run with `kernel.bpf_stats_enabled=0`: with it on, the kernel reads the
//! clock twice around every program run, which adds the same to floor and metering and
//! would pull their ratio toward 1. Each round then attaches both modes once more with the
//! stats on, for the kernel's own run time per event of every program.
//!
//! Then `mentat-agent run` runs for a while under the same workloads, for the daemon's own
//! CPU time and peak RSS.
//!
//! Last, stress-ng's `--switch`, `--null` and `--fork` run under off, floor and metering,
//! round by round (see `stress.rs`): idle switches and cross-CPU wakeups, which the pinned
//! ping-pong lacks. `--stress-only` runs just that section; `--stress-secs 0` skips it.
//!
//! Run as root through `cargo xtask bench [-- ARGS]`, which builds the agent and sets
//! `TEST_AGENT_BIN`.

use std::fs;
use std::mem;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;

use crate::bpf_stats::BpfStats;
use crate::configs::{Measurement, measure, measure_config, wait_until_alone};
use crate::footprint::footprint;
use crate::machine::Machine;
use crate::procs::{Cpus, bench_cpu, other_cpu};
use crate::report::{Report, show_gib_s};

mod agent;
mod bpf_stats;
mod configs;
mod footprint;
mod machine;
mod procs;
mod report;
mod stress;
mod workloads;

/// Measures the overhead of mentat-agent's probes against empty programs on the same hooks,
/// and the agent's own CPU time and memory. Needs root; run through `cargo xtask bench`.
#[derive(Parser, Debug)]
#[command(name = "bench")]
pub(crate) struct Args {
    /// Rounds of (off, floor, metering, floor+stats, metering+stats); figures are medians
    /// over rounds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) rounds: u32,
    /// getppid calls per measurement.
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
    pub(crate) iterations: u64,
    /// Ping-pong round trips (two context switches each) per measurement.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub(crate) pingpong: u64,
    /// Also write every figure, per round, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Bytes sent over loopback TCP per measurement, in 64 KiB writes; 0 skips the TCP
    /// throughput.
    #[arg(long, default_value_t = DEFAULT_TCP_BYTES, value_name = "BYTES")]
    pub(crate) tcp_bytes: u64,
    /// How long `mentat-agent run` is measured under load.
    /// At least span_lag (10 s) plus a few ticks, so committing windows (pricing,
    /// ledger writes) is part of what is measured.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    footprint_secs: u64,
    /// Seconds each stress-ng measurement runs (`--switch`, `--null`, `--fork`, two
    /// instances each, under off, floor and metering, `--rounds` rounds); 0 skips them.
    #[arg(long, default_value_t = stress::DEFAULT_SECS, value_name = "SECONDS")]
    stress_secs: u64,
    /// Run only the stress-ng section (`--json` then gets its report).
    #[arg(long)]
    stress_only: bool,
}

/// Loading and attaching takes well under a second; this only bounds a hung agent.
pub(crate) const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped agent may take to exit before it is killed.
pub(crate) const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
pub(crate) const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Metering may add at most this factor of what empty programs on the same hooks add.
pub(crate) const TARGET_RATIO: f64 = 1.2;
/// Metering must keep at least this fraction of the loopback TCP throughput of `off`.
pub(crate) const TCP_TARGET: f64 = 0.99;
/// 4 GiB: 0.7 to 3 s per transfer between the two CPUs of the shared VM the bench was
/// written on, depending on what else ran on its host.
const DEFAULT_TCP_BYTES: u64 = 4 << 30;
/// Size of each write and read of the TCP workload.
pub(crate) const TCP_IO: usize = 64 * 1024;
/// How long the TCP receiver waits for a connection or for data before giving up.
pub(crate) const TCP_TIMEOUT: Duration = Duration::from_secs(60);

/// One configuration the workloads run under.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub(crate) name: &'static str,
    /// `attach --mode` argument; `None` for nothing attached.
    pub(crate) mode: Option<&'static str>,
    /// Whether `kernel.bpf_stats_enabled` is on while it runs.
    pub(crate) stats: bool,
}

pub(crate) const OFF: usize = 0;
pub(crate) const FLOOR: usize = 1;
pub(crate) const METERING: usize = 2;
pub(crate) const FLOOR_STATS: usize = 3;
pub(crate) const METERING_STATS: usize = 4;
/// In the order each round runs them; the indexes above point into it.
pub(crate) const CONFIGS: [Config; 5] = [
    Config {
        name: "off",
        mode: None,
        stats: false,
    },
    Config {
        name: "floor",
        mode: Some("floor"),
        stats: false,
    },
    Config {
        name: "metering",
        mode: Some("metering"),
        stats: false,
    },
    Config {
        name: "floor+stats",
        mode: Some("floor"),
        stats: true,
    },
    Config {
        name: "metering+stats",
        mode: Some("metering"),
        stats: true,
    },
];

// Set by SIGINT/SIGTERM so the benchmark stops between steps and still restores the sysctl
// and stops the agents it started; dying at once would leave probes attached.
pub(crate) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

pub(crate) fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bench must run as root: it attaches eBPF programs and writes {BPF_STATS_SYSCTL} \
             (run `cargo xtask bench` as root)"
        );
    }
    let agent = mentat_tests::agent_bin()?;
    install_signal_handlers()?;
    if args.stress_only {
        ensure!(
            args.stress_secs > 0,
            "--stress-only needs --stress-secs above 0"
        );
        let stress = stress::run(&agent, args.rounds, args.stress_secs)?;
        stress.print();
        if let Some(path) = &args.json {
            let text = serde_json::to_string_pretty(&stress).context("serializing the report")?;
            fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
            eprintln!("bench: wrote {}", path.display());
        }
        return Ok(());
    }
    let machine = Machine::read()?;
    let cpu = bench_cpu()?;
    let cpus = Cpus {
        bench: cpu,
        tcp_sender: if args.tcp_bytes == 0 {
            None
        } else {
            other_cpu(cpu)?
        },
    };
    eprintln!(
        "bench: {} CPU(s), kernel {}, {}; workloads pinned to CPU {cpu}; load average {}",
        machine.cpus, machine.kernel, machine.cpu_model, machine.load_before
    );
    match cpus.tcp_sender {
        Some(sender) => eprintln!(
            "bench: loopback TCP: {} bytes per measurement, sender on CPU {sender}, receiver on \
             CPU {cpu}",
            args.tcp_bytes
        ),
        None if args.tcp_bytes == 0 => eprintln!("bench: loopback TCP skipped (--tcp-bytes 0)"),
        None => eprintln!(
            "bench: WARNING: loopback TCP skipped: it needs two CPUs, and this process may only \
             run on CPU {cpu}"
        ),
    }
    // Restores the old value when dropped, whichever way this function returns.
    let stats = BpfStats::take()?;
    stats.set(false)?;

    // Warms caches and tells how long one measurement takes, to size the attach durations.
    wait_until_alone(None)?;
    let start = Instant::now();
    let warm = measure(args, cpus)?;
    let one_measurement = start.elapsed();
    eprintln!(
        "warm-up (not counted): getppid {:.1} ns/call, switch {:.1} ns, TCP {}, {:.1}s per \
         measurement",
        warm.getppid_ns,
        warm.switch_ns,
        show_gib_s(warm.tcp_gib_s),
        one_measurement.as_secs_f64()
    );

    let mut runs: Vec<Vec<Measurement>> = vec![Vec::new(); CONFIGS.len()];
    for round in 1..=args.rounds {
        for (i, config) in CONFIGS.iter().enumerate() {
            check_interrupted()?;
            stats.set(config.stats)?;
            let m = measure_config(&agent, config, args, cpus, one_measurement)
                .with_context(|| format!("round {round}/{}: {}", args.rounds, config.name))?;
            eprintln!(
                "round {round}/{}: {:<14} getppid {:7.1} ns/call  switch {:7.1} ns  TCP {}  ({:.2} switches/round trip{})",
                args.rounds,
                config.name,
                m.getppid_ns,
                m.switch_ns,
                show_gib_s(m.tcp_gib_s),
                m.switches_per_round_trip,
                if m.covered {
                    ""
                } else {
                    "; attach ended early"
                },
            );
            runs[i].push(m);
        }
    }
    stats.set(false)?;

    check_interrupted()?;
    eprintln!(
        "footprint: `mentat-agent run` for {}s under a getppid loop and a ping-pong",
        args.footprint_secs
    );
    let footprint = footprint(&agent, Duration::from_secs(args.footprint_secs), cpu)
        .context("measuring the footprint of `mentat-agent run`")?;
    drop(stats);

    let report = Report::new(args, machine, cpus, runs, footprint)?;
    let stress = if args.stress_secs == 0 {
        None
    } else if stress::available() {
        Some(stress::run(&agent, args.rounds, args.stress_secs)?)
    } else {
        eprintln!("bench: WARNING: stress-ng section skipped: stress-ng is not installed");
        None
    };
    report.print();
    if let Some(stress) = &stress {
        stress.print();
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
        if let Some(stress) = &stress {
            let path = path.with_extension("stress.json");
            let text = serde_json::to_string_pretty(&stress).context("serializing the report")?;
            fs::write(&path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
            eprintln!("bench: wrote {}", path.display());
        }
    }
    Ok(())
}

fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler only
        // stores to an atomic, which is async-signal-safe.
        let rc = unsafe {
            let mut action: libc::sigaction = mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // Restarted, so a signal mid-measurement does not fail a pipe read with EINTR.
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        ensure!(
            rc == 0,
            "installing a signal handler: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
