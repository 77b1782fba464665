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
//! Last, `mentat-agent run` runs for a while under the same workloads, for the daemon's own
//! CPU time and peak RSS.
//!
//! Run as root through `cargo xtask bench [-- ARGS]`, which builds the agent and sets
//! `TEST_AGENT_BIN`.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::hint::black_box;
use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use serde::{Deserialize, Serialize};

/// Measures the overhead of mentat-agent's probes against empty programs on the same hooks,
/// and the agent's own CPU time and memory. Needs root; run through `cargo xtask bench`.
#[derive(Parser, Debug)]
#[command(name = "bench")]
struct Args {
    /// Rounds of (off, floor, metering, floor+stats, metering+stats); figures are medians
    /// over rounds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// getppid calls per measurement.
    #[arg(long, default_value_t = 2_000_000, value_parser = clap::value_parser!(u64).range(1000..))]
    iterations: u64,
    /// Ping-pong round trips (two context switches each) per measurement.
    #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(100..))]
    pingpong: u64,
    /// Also write every figure, per round, as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Bytes sent over loopback TCP per measurement, in 64 KiB writes; 0 skips the TCP
    /// throughput.
    #[arg(long, default_value_t = DEFAULT_TCP_BYTES, value_name = "BYTES")]
    tcp_bytes: u64,
    /// How long `mentat-agent run` is measured under load.
    /// At least span_lag (10 s) plus a few ticks, so committing windows (pricing,
    /// ledger writes) is part of what is measured.
    #[arg(long, default_value = "30", value_name = "SECONDS")]
    footprint_secs: u64,
}

/// Loading and attaching takes well under a second; this only bounds a hung agent.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped agent may take to exit before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// Metering may add at most this factor of what empty programs on the same hooks add.
const TARGET_RATIO: f64 = 1.2;
/// Metering must keep at least this fraction of the loopback TCP throughput of `off`.
const TCP_TARGET: f64 = 0.99;
/// 4 GiB: 0.7 to 3 s per transfer between the two CPUs of the shared VM the bench was
/// written on, depending on what else ran on its host.
const DEFAULT_TCP_BYTES: u64 = 4 << 30;
/// Size of each write and read of the TCP workload.
const TCP_IO: usize = 64 * 1024;
/// How long the TCP receiver waits for a connection or for data before giving up.
const TCP_TIMEOUT: Duration = Duration::from_secs(60);

/// One configuration the workloads run under.
#[derive(Clone, Copy, Debug)]
struct Config {
    name: &'static str,
    /// `attach --mode` argument; `None` for nothing attached.
    mode: Option<&'static str>,
    /// Whether `kernel.bpf_stats_enabled` is on while it runs.
    stats: bool,
}

const OFF: usize = 0;
const FLOOR: usize = 1;
const METERING: usize = 2;
const FLOOR_STATS: usize = 3;
const METERING_STATS: usize = 4;
/// In the order each round runs them; the indexes above point into it.
const CONFIGS: [Config; 5] = [
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
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupted() -> Result<()> {
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

fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "bench must run as root: it attaches eBPF programs and writes {BPF_STATS_SYSCTL} \
             (run `cargo xtask bench` as root)"
        );
    }
    let agent = mentat_tests::agent_bin()?;
    install_signal_handlers()?;
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
    report.print();
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).context("serializing the report")?;
        fs::write(path, text + "\n").with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
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

// ---------------------------------------------------------------------------------------
// Configurations

/// One run of both workloads under one configuration.
#[derive(Clone, Debug, Serialize)]
struct Measurement {
    /// ns per call, median over the loop's chunks.
    getppid_ns: f64,
    /// ns per call over the whole loop, interruptions included.
    getppid_mean_ns: f64,
    /// Involuntary switches away from the getppid loop: other work took its CPU.
    getppid_preempted: u64,
    /// ns per switch, median over the ping-pong's chunks.
    switch_ns: f64,
    /// ns per switch over the whole ping-pong, interruptions included.
    switch_mean_ns: f64,
    /// Context switches the two processes counted per round trip (2 when nothing else ran).
    switches_per_round_trip: f64,
    /// Loopback TCP throughput in GiB/s, median over the transfer's chunks (`None` when
    /// skipped).
    tcp_gib_s: Option<f64>,
    /// The same over the whole transfer, first byte to EOF, interruptions included.
    tcp_whole_gib_s: Option<f64>,
    /// Involuntary switches away from the TCP sender and receiver.
    tcp_preempted: Option<u64>,
    /// Context switches of the TCP sender and receiver.
    tcp_switches: Option<u64>,
    /// read calls of the TCP receiver.
    tcp_reads: Option<u64>,
    /// CPU time of the TCP sender and receiver per GiB, ms.
    tcp_cpu_ms_per_gib: Option<f64>,
    /// False when the agent detached before the workloads ended (stats configurations only,
    /// whose timings are then left out).
    covered: bool,
    /// Whether another mentat-agent process was running at the start (its probes add to
    /// every configuration).
    foreign_agents: bool,
    /// Kernel run statistics of each program over the whole attach (stats configurations).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    programs: Vec<ProgramRun>,
}

/// One line of `mentat-agent attach` output.
#[derive(Clone, Debug, Deserialize, Serialize)]
struct ProgramRun {
    program: String,
    run_count: u64,
    run_time_ns: u64,
}

/// Measurements of one configuration tried before keeping one another agent disturbed.
const ATTEMPTS: u32 = 3;

/// [`measure_config_once`], again when another mentat-agent ran meanwhile.
fn measure_config(
    agent: &Path,
    config: &Config,
    args: &Args,
    cpus: Cpus,
    one_measurement: Duration,
) -> Result<Measurement> {
    let mut attempt = 1;
    loop {
        wait_until_alone(None)?;
        let m = measure_config_once(agent, config, args, cpus, one_measurement)?;
        if !m.foreign_agents || attempt == ATTEMPTS {
            return Ok(m);
        }
        eprintln!(
            "bench: another mentat-agent ran during `{}`; measuring it again",
            config.name
        );
        attempt += 1;
    }
}

fn measure_config_once(
    agent: &Path,
    config: &Config,
    args: &Args,
    cpus: Cpus,
    one_measurement: Duration,
) -> Result<Measurement> {
    let Some(mode) = config.mode else {
        let mut m = measure(args, cpus)?;
        m.foreign_agents = !foreign_agents(None).is_empty();
        return Ok(m);
    };
    // Timing runs are stopped as soon as they are done, so their duration is only a bound;
    // stats runs must end on their own to print, so theirs is the measurement plus slack.
    let duration = if config.stats {
        one_measurement * 3 + Duration::from_secs(2)
    } else {
        (one_measurement * 10).max(Duration::from_secs(60))
    };
    let mut attach = AgentProcess::spawn(
        agent,
        [
            "attach",
            "--mode",
            mode,
            "--duration",
            &format!("{}ms", duration.as_millis()),
        ],
    )?;
    attach.wait_for_line(Stream::Stdout, "attached", ATTACH_TIMEOUT)?;
    let before = foreign_agents(Some(attach.pid()));
    let mut m = measure(args, cpus)?;
    m.foreign_agents = !before.is_empty() || !foreign_agents(Some(attach.pid())).is_empty();
    let still_attached = attach.running()?;
    if !config.stats {
        let ended = attach.stop()?;
        ensure!(
            still_attached,
            "`{}` detached before the measurement ended ({ended}); stderr:\n{}",
            attach.what,
            attach.drain(Stream::Stderr).join("\n")
        );
        return Ok(m);
    }
    m.covered = still_attached;
    let status = attach.wait(duration + EXIT_TIMEOUT)?;
    let stdout = attach.drain(Stream::Stdout);
    ensure!(
        status.success(),
        "`{}` failed ({}): {}",
        attach.what,
        describe_status(status),
        attach.drain(Stream::Stderr).join("\n")
    );
    for line in stdout.iter().filter(|l| l.starts_with('{')) {
        let run: ProgramRun = serde_json::from_str(line)
            .with_context(|| format!("`{}` printed an unexpected line: {line}", attach.what))?;
        m.programs.push(run);
    }
    ensure!(
        !m.programs.is_empty(),
        "`{}` printed no program statistics; its stdout was {stdout:?}",
        attach.what
    );
    Ok(m)
}

/// The three workloads: getppid and the ping-pong pinned to `cpus.bench`, TCP from
/// `cpus.tcp_sender` (when there is one) to `cpus.bench`.
fn measure(args: &Args, cpus: Cpus) -> Result<Measurement> {
    let (getppid, getppid_preempted) = getppid(args.iterations, cpus.bench)?;
    let (switch, switches_per_round_trip) = pingpong(args.pingpong, cpus.bench)?;
    let tcp = match cpus.tcp_sender {
        Some(sender) => Some(tcp_throughput(args.tcp_bytes, sender, cpus.bench)?),
        None => None,
    };
    Ok(Measurement {
        getppid_ns: getppid.median,
        getppid_mean_ns: getppid.mean,
        getppid_preempted,
        switch_ns: switch.median,
        switch_mean_ns: switch.mean,
        switches_per_round_trip,
        tcp_gib_s: tcp.map(|t| t.median),
        tcp_whole_gib_s: tcp.map(|t| t.whole),
        tcp_preempted: tcp.map(|t| t.preempted),
        tcp_switches: tcp.map(|t| t.switches),
        tcp_reads: tcp.map(|t| t.reads),
        tcp_cpu_ms_per_gib: tcp.map(|t| t.cpu_ns as f64 / 1e6 / (args.tcp_bytes as f64 / GIB)),
        covered: true,
        foreign_agents: false,
        programs: Vec::new(),
    })
}

/// How long to wait for other mentat-agent processes to go before measuring anyway.
const FOREIGN_WAIT: Duration = Duration::from_secs(120);

/// Other mentat-agent processes than `own`. Another engineer's tests or a daemon attach
/// their own programs, which add to every configuration and make "off" not off.
fn foreign_agents(own: Option<u32>) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| Some(pid) != own)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim_end() == "mentat-agent")
        })
        // A zombie has exited and detached its probes; only its parent has yet to reap it.
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state != "Z")
            })
        })
        .collect()
}

/// Waits up to [`FOREIGN_WAIT`] for other mentat-agent processes to exit, saying so; past
/// that goes on with a warning (the measurements then say they were disturbed).
fn wait_until_alone(own: Option<u32>) -> Result<()> {
    let start = Instant::now();
    let mut said = false;
    loop {
        let foreign = foreign_agents(own);
        if foreign.is_empty() {
            return Ok(());
        }
        if start.elapsed() >= FOREIGN_WAIT {
            eprintln!(
                "bench: WARNING: other mentat-agent processes still run (pids {foreign:?}) \
                 after {FOREIGN_WAIT:?}; measuring anyway, their probes add to every \
                 configuration"
            );
            return Ok(());
        }
        if !said {
            eprintln!(
                "bench: waiting for other mentat-agent processes (pids {foreign:?}) to exit: \
                 their probes would add to every configuration"
            );
            said = true;
        }
        check_interrupted()?;
        thread::sleep(Duration::from_millis(200));
    }
}

// ---------------------------------------------------------------------------------------
// Workloads

/// Each loop is timed in this many equal chunks. On a shared machine another task taking
/// the CPU for a few ms inflates the chunks it hits; the median chunk is what the loop costs
/// when it runs, the whole-loop mean what it cost with the interruptions.
const CHUNKS: u64 = 20;

/// Nanoseconds per operation: the median over chunks, and the whole-loop mean.
#[derive(Clone, Copy, Debug)]
struct Timing {
    median: f64,
    mean: f64,
}

impl Timing {
    /// From each chunk's elapsed time, `ops` operations per chunk.
    fn of(chunks: &[Duration], ops: u64) -> Self {
        let per_op: Vec<f64> = chunks
            .iter()
            .map(|d| d.as_nanos() as f64 / ops as f64)
            .collect();
        let total: Duration = chunks.iter().sum();
        Self {
            median: Spread::of(&per_op).map_or(f64::NAN, |s| s.median),
            mean: total.as_nanos() as f64 / (ops * chunks.len() as u64) as f64,
        }
    }
}

/// Nanoseconds per getppid call, and how often the loop was preempted.
fn getppid(iterations: u64, cpu: usize) -> Result<(Timing, u64)> {
    let _pin = Pinned::to(cpu)?;
    let per_chunk = iterations / CHUNKS;
    for _ in 0..per_chunk {
        // SAFETY: getppid takes no arguments and cannot fail.
        black_box(unsafe { libc::syscall(libc::SYS_getppid) });
    }
    let before = thread_rusage()?;
    let mut chunks = Vec::with_capacity(CHUNKS as usize);
    for _ in 0..CHUNKS {
        let start = Instant::now();
        for _ in 0..per_chunk {
            // SAFETY: as above. A raw syscall, as glibc may serve getppid without one.
            black_box(unsafe { libc::syscall(libc::SYS_getppid) });
        }
        chunks.push(start.elapsed());
    }
    let after = thread_rusage()?;
    let preempted = u64::try_from(after.ru_nivcsw - before.ru_nivcsw).unwrap_or(0);
    Ok((Timing::of(&chunks, per_chunk), preempted))
}

/// Round trips before the clock starts, so both processes are running in steady state.
const PINGPONG_WARMUP: u64 = 1000;

/// Nanoseconds per context switch over `round_trips` round trips between this process and a
/// child on the same CPU (elapsed / 2 × round trips), and the switches per round trip the
/// two counted.
///
/// On one CPU each side blocks in read until the other has written, so a round trip is two
/// switches and no switch to idle; both sides' counters check that.
fn pingpong(round_trips: u64, cpu: usize) -> Result<(Timing, f64)> {
    let _pin = Pinned::to(cpu)?;
    let per_chunk = round_trips / CHUNKS;
    let round_trips = per_chunk * CHUNKS;
    let (to_child_rx, to_child_tx) = pipe()?;
    let (to_parent_rx, to_parent_tx) = pipe()?;
    let child = fork_child(|| {
        bounce(
            to_child_rx.as_raw_fd(),
            to_parent_tx.as_raw_fd(),
            Some(round_trips + PINGPONG_WARMUP),
            false,
        )
    })?;
    drop((to_child_rx, to_parent_tx));
    let (tx, rx) = (to_child_tx.as_raw_fd(), to_parent_rx.as_raw_fd());

    ensure!(
        bounce_checked(tx, rx, PINGPONG_WARMUP),
        "the ping-pong child stopped answering during warm-up"
    );
    let before = thread_rusage()?;
    let mut chunks = Vec::with_capacity(CHUNKS as usize);
    for _ in 0..CHUNKS {
        let start = Instant::now();
        let ok = bounce_checked(tx, rx, per_chunk);
        chunks.push(start.elapsed());
        ensure!(ok, "the ping-pong child stopped answering");
    }
    let after = thread_rusage()?;
    let child_usage = child.reap()?;

    let ours = (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw);
    // The child's counters cover its warm-up too; scale to per round trip.
    let theirs = (child_usage.ru_nvcsw + child_usage.ru_nivcsw) as f64
        / (round_trips + PINGPONG_WARMUP) as f64;
    Ok((
        Timing::of(&chunks, 2 * per_chunk),
        ours as f64 / round_trips as f64 + theirs,
    ))
}

fn bounce_checked(tx: RawFd, rx: RawFd, round_trips: u64) -> bool {
    let mut byte = 0u8;
    for _ in 0..round_trips {
        // SAFETY: one byte to and from a valid local; the fds are open pipe ends we own.
        let ok = unsafe {
            libc::write(tx, (&raw const byte).cast(), 1) == 1
                && libc::read(rx, (&raw mut byte).cast(), 1) == 1
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The forked side of a ping-pong: reads then writes (or writes then reads when `lead`),
/// `round_trips` times or until the pipe breaks, then exits. Only syscalls, as befits a
/// child forked from a multi-threaded process.
fn bounce(rx: RawFd, tx: RawFd, round_trips: Option<u64>, lead: bool) -> ! {
    let mut byte = 0u8;
    let mut done = 0u64;
    // SAFETY: one byte to and from a valid local; the fds are open pipe ends.
    unsafe {
        if lead && libc::write(tx, (&raw const byte).cast(), 1) != 1 {
            libc::_exit(1);
        }
        while round_trips != Some(done) {
            if libc::read(rx, (&raw mut byte).cast(), 1) != 1
                || libc::write(tx, (&raw const byte).cast(), 1) != 1
            {
                libc::_exit(1);
            }
            done += 1;
        }
        libc::_exit(0)
    }
}

/// Loopback TCP throughput in GiB/s: the median over chunks, and over the whole transfer.
#[derive(Clone, Copy, Debug)]
struct Throughput {
    median: f64,
    whole: f64,
    /// Involuntary switches away from the sender and the receiver: other work took their
    /// CPUs.
    preempted: u64,
    /// Context switches of the sender and the receiver, voluntary and involuntary.
    switches: u64,
    /// read calls the receiver made, the one that saw EOF included.
    reads: u64,
    /// CPU time of the sender (its whole life) and the receiver (from accept to EOF), ns.
    cpu_ns: u64,
}

const GIB: f64 = (1u64 << 30) as f64;

/// Streams `bytes` over a loopback TCP connection from a forked sender pinned to
/// `sender_cpu` to this process, the receiver, pinned to `receiver_cpu`, both in
/// [`TCP_IO`]-sized writes and reads.
///
/// Timed in the receiver, from the first byte received to EOF: that leaves out the fork, the
/// connection's setup and the sender's exit, which do not scale with the bytes, and counts
/// only bytes that arrived. The transfer after the first read is split into [`CHUNKS`] equal
/// byte ranges (to the nearest read), each timed; the median chunk is what the path carries
/// when nothing else takes the CPUs, as with the other workloads.
fn tcp_throughput(bytes: u64, sender_cpu: usize, receiver_cpu: usize) -> Result<Throughput> {
    let _pin = Pinned::to(receiver_cpu)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding a TCP listener on 127.0.0.1")?;
    // accept honours SO_RCVTIMEO: a sender that never connects fails the measurement
    // instead of hanging it.
    set_receive_timeout(listener.as_raw_fd(), TCP_TIMEOUT)?;
    let SocketAddr::V4(addr) = listener
        .local_addr()
        .context("reading the listener's port")?
    else {
        bail!("the 127.0.0.1 listener has a non-IPv4 address");
    };
    // Built before the fork: the sender only makes syscalls.
    let target = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let mut sender_set: libc::cpu_set_t = unsafe { mem::zeroed() };
    unsafe { libc::CPU_SET(sender_cpu, &mut sender_set) };
    let payload = vec![0x5au8; TCP_IO];
    let sender = fork_child(|| tcp_send(&target, bytes, &payload, &sender_set))?;

    let before = thread_rusage()?;
    let (mut stream, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == ErrorKind::Interrupted => check_interrupted()?,
            Err(e) => return Err(e).context("accepting the TCP sender's connection"),
        }
    };
    drop(listener);
    stream
        .set_read_timeout(Some(TCP_TIMEOUT))
        .context("setting the TCP read timeout")?;
    let mut buf = vec![0u8; TCP_IO];
    let mut got = 0u64;
    // (when, bytes received by then) at the first read and at each chunk boundary.
    let mut marks: Vec<(Instant, u64)> = Vec::with_capacity(CHUNKS as usize + 2);
    let mut step = 0;
    let mut next = 0;
    let mut reads = 0u64;
    loop {
        reads += 1;
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                check_interrupted()?;
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the loopback TCP stream after {got} of {bytes} bytes")
                });
            }
        };
        got += n;
        if marks.is_empty() {
            marks.push((Instant::now(), got));
            step = (bytes.saturating_sub(got) / CHUNKS).max(1);
            next = got + step;
        } else if got >= next {
            marks.push((Instant::now(), got));
            while next <= got {
                next += step;
            }
        }
    }
    let end = Instant::now();
    let after = thread_rusage()?;
    let sender = Usage::of(&sender.reap().context("the TCP sender failed")?);
    let receiver = Usage::of(&after).minus(Usage::of(&before));
    ensure!(
        got == bytes,
        "the TCP receiver got {got} bytes, the sender sent {bytes}"
    );
    if marks.last().is_some_and(|&(_, at)| at < got) {
        marks.push((end, got));
    }
    let rate = |(t0, b0): (Instant, u64), (t1, b1): (Instant, u64)| {
        (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64().max(1e-9) / GIB
    };
    let chunks: Vec<f64> = marks.windows(2).map(|w| rate(w[0], w[1])).collect();
    let (Some(&first), Some(&last)) = (marks.first(), marks.last()) else {
        bail!("the TCP receiver got no bytes");
    };
    ensure!(
        !chunks.is_empty(),
        "the TCP transfer was too short to time ({bytes} bytes)"
    );
    Ok(Throughput {
        median: Spread::of(&chunks).map_or(f64::NAN, |s| s.median),
        whole: rate(first, last),
        preempted: receiver.involuntary + sender.involuntary,
        switches: receiver.voluntary + receiver.involuntary + sender.voluntary + sender.involuntary,
        reads,
        cpu_ns: receiver.cpu_ns + sender.cpu_ns,
    })
}

/// CPU time and context switches from a `rusage`.
#[derive(Clone, Copy, Debug)]
struct Usage {
    cpu_ns: u64,
    voluntary: u64,
    involuntary: u64,
}

impl Usage {
    fn of(u: &libc::rusage) -> Self {
        let ns = |t: libc::timeval| {
            u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_usec).unwrap_or(0) * 1000
        };
        Self {
            cpu_ns: ns(u.ru_utime) + ns(u.ru_stime),
            voluntary: u64::try_from(u.ru_nvcsw).unwrap_or(0),
            involuntary: u64::try_from(u.ru_nivcsw).unwrap_or(0),
        }
    }

    fn minus(self, earlier: Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }
}

/// The forked sender of [`tcp_throughput`]: pins itself, connects, writes `bytes` from
/// `payload` and closes, or leaves with exit code 1. Only syscalls, as befits a child forked
/// from a multi-threaded process.
fn tcp_send(target: &libc::sockaddr_in, bytes: u64, payload: &[u8], cpu: &libc::cpu_set_t) {
    // SAFETY: every pointer is to a local or to `payload` with its own length; the fd is
    // the socket made here. Leaving through _exit, as a forked child must.
    unsafe {
        if libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), cpu) != 0 {
            libc::_exit(1);
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0
            || libc::connect(
                fd,
                std::ptr::from_ref(target).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
        {
            libc::_exit(1);
        }
        let mut left = bytes;
        while left > 0 {
            let n = payload
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let written = libc::write(fd, payload.as_ptr().cast(), n);
            if written > 0 {
                left -= written as u64;
            } else if written == 0 || *libc::__errno_location() != libc::EINTR {
                libc::_exit(1);
            }
        }
        if libc::close(fd) != 0 {
            libc::_exit(1);
        }
    }
}

fn set_receive_timeout(fd: RawFd, timeout: Duration) -> Result<()> {
    let value = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).context("timeout out of range")?,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads the timeval we pass, of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&value).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setting SO_RCVTIMEO: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A getppid loop and a pinned ping-pong pair running until dropped, as background load.
struct Load {
    pids: Vec<libc::pid_t>,
}

impl Load {
    fn start(cpu: usize) -> Result<Self> {
        let mut load = Load { pids: Vec::new() };
        load.pids.push(
            fork_child(|| {
                loop {
                    // SAFETY: getppid takes no arguments and cannot fail.
                    black_box(unsafe { libc::syscall(libc::SYS_getppid) });
                }
            })?
            .into_pid(),
        );
        let pinned = Pinned::to(cpu)?;
        let (a_rx, b_tx) = pipe()?;
        let (b_rx, a_tx) = pipe()?;
        // The leader forks the follower itself, so the follower dies with it. A bare fork:
        // fork_child's error path allocates, which a forked child must not.
        let leader = fork_child(|| {
            // SAFETY: getpid has no preconditions.
            let leader = unsafe { libc::getpid() };
            // SAFETY: the follower only makes syscalls and leaves through _exit.
            match unsafe { libc::fork() } {
                // SAFETY: leaving without the parent's destructors, as a forked child must.
                -1 => unsafe { libc::_exit(1) },
                0 => {
                    die_with_parent(leader);
                    bounce(b_rx.as_raw_fd(), b_tx.as_raw_fd(), None, false)
                }
                _ => bounce(a_rx.as_raw_fd(), a_tx.as_raw_fd(), None, true),
            }
        })?;
        load.pids.push(leader.into_pid());
        drop(pinned);
        Ok(load)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: our own unreaped children, so the pids cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Processes, pipes, CPUs

/// A forked child, killed and reaped when dropped unless reaped first.
struct Forked {
    pid: libc::pid_t,
}

impl Forked {
    /// Waits for a clean exit and returns the child's resource usage.
    fn reap(mut self) -> Result<libc::rusage> {
        let pid = mem::replace(&mut self.pid, 0);
        let mut status = 0;
        // SAFETY: zeroed rusage is valid; wait4 writes status and rusage we own.
        let mut usage: libc::rusage = unsafe { mem::zeroed() };
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        ensure!(
            rc == pid,
            "waiting for child {pid}: {}",
            std::io::Error::last_os_error()
        );
        ensure!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {pid} failed (wait status {status:#x})"
        );
        Ok(usage)
    }

    fn into_pid(mut self) -> libc::pid_t {
        mem::replace(&mut self.pid, 0)
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own unreaped child, so the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Forks a child that runs `body`, then exits; it is SIGKILLed if this process dies. `body`
/// must only make syscalls: this process has threads, whose locks the child inherits held or
/// not.
fn fork_child(body: impl FnOnce()) -> Result<Forked> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child only makes syscalls (see above) and leaves through _exit.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            die_with_parent(parent);
            body();
            // SAFETY: leaving without the parent's destructors, as a forked child must.
            unsafe { libc::_exit(0) }
        }
        pid => Ok(Forked { pid }),
    }
}

/// In a forked child: have the kernel SIGKILL it when `parent` dies, so no workload outlives
/// the benchmark.
fn die_with_parent(parent: libc::pid_t) {
    // SAFETY: prctl, getppid and _exit have no memory-safety preconditions. The getppid
    // check closes the race where the parent died before prctl ran.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

/// A pipe as (read end, write end), closed on exec so agents spawned later do not inherit it.
fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn thread_rusage() -> Result<libc::rusage> {
    // SAFETY: zeroed rusage is valid; getrusage writes into it.
    let mut usage: libc::rusage = unsafe { mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    Ok(usage)
}

/// Pins the calling thread to one CPU until dropped, then restores its old affinity.
struct Pinned {
    old: libc::cpu_set_t,
}

impl Pinned {
    fn to(cpu: usize) -> Result<Self> {
        let old = affinity()?;
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
        let mut one: libc::cpu_set_t = unsafe { mem::zeroed() };
        unsafe { libc::CPU_SET(cpu, &mut one) };
        set_affinity(&one).with_context(|| format!("pinning to CPU {cpu}"))?;
        Ok(Self { old })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Err(e) = set_affinity(&self.old) {
            eprintln!("bench: WARNING: could not restore the CPU affinity: {e:#}");
        }
    }
}

fn affinity() -> Result<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(set)
}

fn set_affinity(set: &libc::cpu_set_t) -> Result<()> {
    // SAFETY: sched_setaffinity reads the set we pass.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where the workloads run.
#[derive(Clone, Copy, Debug, Serialize)]
struct Cpus {
    /// The getppid loop, both sides of the ping-pong, and the TCP receiver.
    bench: usize,
    /// The TCP sender; `None` when the TCP workload is skipped.
    tcp_sender: Option<usize>,
}

/// The last CPU other than `cpu` this process may run on, if any.
fn other_cpu(cpu: usize) -> Result<Option<usize>> {
    let set = affinity()?;
    Ok((0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: CPU_ISSET reads within the set for indexes below CPU_SETSIZE.
        .find(|&c| c != cpu && unsafe { libc::CPU_ISSET(c, &set) }))
}

/// The last CPU this process may run on: CPU 0 usually takes more of the interrupts.
fn bench_cpu() -> Result<usize> {
    let set = affinity()?;
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: CPU_ISSET reads within the set for indexes below CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .context("this process may run on no CPU at all")
}

// ---------------------------------------------------------------------------------------
// The agent as a child process

#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// A running `mentat-agent`, its output read line by line; killed when dropped.
struct AgentProcess {
    child: Child,
    what: String,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    exited: Option<ExitStatus>,
}

impl AgentProcess {
    fn spawn<const N: usize>(agent: &Path, args: [&str; N]) -> Result<Self> {
        Self::spawn_env(agent, args, &[])
    }

    fn spawn_env<const N: usize>(
        agent: &Path,
        args: [&str; N],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let mut command = Command::new(agent);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a Ctrl-C reaches only this benchmark, which then
            // stops the agent itself.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it makes the kernel stop the agent (and
        // detach its probes) if this benchmark dies without stopping it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let what = std::iter::once(agent.as_os_str())
            .chain(args.iter().map(OsStr::new))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{what}`"))?;
        let stdout = lines(child.stdout.take());
        let stderr = lines(child.stderr.take());
        Ok(Self {
            child,
            what,
            stdout,
            stderr,
            exited: None,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn receiver(&self, stream: Stream) -> &Receiver<String> {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    /// Waits for a line containing `needle`; fails naming the agent's exit and stderr if it
    /// exits first.
    fn wait_for_line(&mut self, stream: Stream, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .receiver(stream)
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("`{}` printed no `{needle}` within {timeout:?}", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait(EXIT_TIMEOUT)?;
                    bail!(
                        "`{}` exited ({}) before printing `{needle}`; stderr:\n{}",
                        self.what,
                        describe_status(status),
                        self.drain(Stream::Stderr).join("\n")
                    );
                }
            }
        }
    }

    fn running(&mut self) -> Result<bool> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("checking on `{}`", self.what))?;
        }
        Ok(self.exited.is_none())
    }

    /// Waits up to `timeout` for it to exit; past that kills it and fails.
    fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.running()? {
            if Instant::now() >= deadline {
                self.kill();
                bail!("`{}` did not exit within {timeout:?}; killed", self.what);
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.kill();
                bail!("interrupted");
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.exited
            .context("the agent's exit status vanished after it exited")
    }

    /// Sends `signal` and waits for the exit; returns a description of how it ended.
    fn signal_and_wait(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        if self.running()? {
            let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
            // SAFETY: our own unreaped child, so the pid cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
        self.wait(EXIT_TIMEOUT)
    }

    /// Stops an `attach` early (it prints no statistics then).
    fn stop(&mut self) -> Result<String> {
        let status = self.signal_and_wait(libc::SIGTERM)?;
        Ok(describe_status(status))
    }

    fn kill(&mut self) {
        if self.exited.is_none() {
            // Errors only mean it is already gone.
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Every line received so far on `stream`, waiting briefly for the reader to catch up
    /// once the agent has exited.
    fn drain(&self, stream: Stream) -> Vec<String> {
        let rx = self.receiver(stream);
        if self.exited.is_some() {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut out = Vec::new();
            while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                out.push(line);
            }
            out
        } else {
            rx.try_iter().collect()
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines of a child's pipe, read on a thread so the child never blocks on a full pipe.
fn lines(pipe: Option<impl Read + Send + 'static>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = pipe {
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown exit status".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// kernel.bpf_stats_enabled

/// Switches `kernel.bpf_stats_enabled`, restoring the value it found when dropped.
struct BpfStats {
    old: String,
}

impl BpfStats {
    fn take() -> Result<Self> {
        let old = fs::read_to_string(BPF_STATS_SYSCTL).with_context(|| {
            format!("reading {BPF_STATS_SYSCTL} (BPF run statistics need Linux ≥ 5.1)")
        })?;
        Ok(Self {
            old: old.trim().to_owned(),
        })
    }

    fn set(&self, on: bool) -> Result<()> {
        fs::write(BPF_STATS_SYSCTL, if on { "1" } else { "0" })
            .with_context(|| format!("writing {BPF_STATS_SYSCTL}"))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = fs::write(BPF_STATS_SYSCTL, &self.old) {
            eprintln!(
                "bench: WARNING: could not restore {BPF_STATS_SYSCTL} to {}: {e}",
                self.old
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Footprint of `mentat-agent run`

#[derive(Debug, Serialize)]
struct Footprint {
    /// How long the CPU time was measured, under load.
    wall_ns: u64,
    /// CPU time of the daemon (all threads) over that time, from its CPU-time clock (ns).
    cpu_ns: u64,
    /// The same from utime + stime in /proc/<pid>/stat, which counts whole clock ticks.
    cpu_ns_from_stat: u64,
    cpu_percent_of_one_core: f64,
    /// CPU time from start until the probes were attached.
    startup_cpu_ns: u64,
    peak_rss_mib: f64,
    /// Windows the daemon logged while measured (one per second expected).
    windows: usize,
}

fn footprint(agent: &Path, period: Duration, cpu: usize) -> Result<Footprint> {
    wait_until_alone(None)?;
    // Its own ledger and ports: the daemon's defaults belong to an installed agent.
    let scratch = std::env::temp_dir().join(format!("mentat-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let ledger = scratch.join("ledger.db");
    let free = |what: &str| -> Result<String> {
        let l = TcpListener::bind("127.0.0.1:0").with_context(|| format!("a port for {what}"))?;
        Ok(l.local_addr()?.to_string())
    };
    let env = [
        ("MENTAT_LEDGER_PATH", ledger.display().to_string()),
        ("MENTAT_API__BIND", free("the API")?),
        ("MENTAT_RECEIVER__GRPC_BIND", free("OTLP gRPC")?),
        ("MENTAT_RECEIVER__HTTP_BIND", free("OTLP HTTP")?),
    ];
    let mut daemon = AgentProcess::spawn_env(agent, ["run"], &env)?;
    daemon.wait_for_line(Stream::Stderr, "probes attached", ATTACH_TIMEOUT)?;
    let pid = daemon.pid();
    let startup_cpu_ns = process_cpu_clock_ns(pid)?;

    let load = Load::start(cpu)?;
    daemon.drain(Stream::Stderr);
    let stat_before = process_stat_cpu_ns(pid)?;
    let cpu_before = process_cpu_clock_ns(pid)?;
    let start = Instant::now();
    while start.elapsed() < period {
        check_interrupted()?;
        ensure!(
            daemon.running()?,
            "`{}` exited under load: {}",
            daemon.what,
            daemon.drain(Stream::Stderr).join("\n")
        );
        thread::sleep(Duration::from_millis(100).min(period.saturating_sub(start.elapsed())));
    }
    let cpu_after = process_cpu_clock_ns(pid)?;
    let wall = start.elapsed();
    let stat_after = process_stat_cpu_ns(pid)?;
    let peak_rss_kib = vm_hwm_kib(pid)?;
    let windows = daemon
        .drain(Stream::Stderr)
        .iter()
        .filter(|l| l.contains("window closed"))
        .count();
    drop(load);

    let status = daemon.signal_and_wait(libc::SIGINT)?;
    // Best effort: a leftover scratch ledger in /tmp harms nothing.
    let _ = fs::remove_dir_all(&scratch);
    if !status.success() {
        bail!(
            "`{}` did not stop cleanly on SIGINT ({}): {}",
            daemon.what,
            describe_status(status),
            daemon.drain(Stream::Stderr).join("\n")
        );
    }
    let cpu_ns = cpu_after.saturating_sub(cpu_before);
    let wall_ns = u64::try_from(wall.as_nanos()).context("measurement period overflows")?;
    Ok(Footprint {
        wall_ns,
        cpu_ns,
        cpu_ns_from_stat: stat_after.saturating_sub(stat_before),
        cpu_percent_of_one_core: cpu_ns as f64 / wall_ns as f64 * 100.0,
        startup_cpu_ns,
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        windows,
    })
}

/// CPU time of a whole process (all its threads) in ns, from its CPU-time clock: exact,
/// where /proc/<pid>/stat only counts clock ticks (10 ms at 100 Hz, too coarse for a daemon
/// that should use a few ms per second).
fn process_cpu_clock_ns(pid: u32) -> Result<u64> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    let mut clock: libc::clockid_t = 0;
    // SAFETY: clock_getcpuclockid writes the clock id into the local we pass.
    let rc = unsafe { libc::clock_getcpuclockid(pid, &mut clock) };
    ensure!(
        rc == 0,
        "clock_getcpuclockid({pid}): {}",
        std::io::Error::from_raw_os_error(rc)
    );
    // SAFETY: a zeroed timespec is valid; clock_gettime writes into it.
    let mut now: libc::timespec = unsafe { mem::zeroed() };
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        bail!(
            "reading the CPU-time clock of {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    let secs = u64::try_from(now.tv_sec).context("negative CPU time")?;
    let nanos = u64::try_from(now.tv_nsec).context("negative CPU time")?;
    Ok(secs * 1_000_000_000 + nanos)
}

/// utime + stime of a whole process (all its threads), in ns.
fn process_stat_cpu_ns(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // The command name (field 2) may hold spaces; fields after it are plain numbers.
    let rest = stat
        .rsplit_once(')')
        .with_context(|| format!("{path} has no `)`: {stat}"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0], so utime (14) and stime (15) are fields[11] and [12].
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} is too short: {stat}"))?
            .parse::<u64>()
            .with_context(|| format!("{path} field {} is not a number", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(total * 1_000_000_000 / hz as u64)
}

fn vm_hwm_kib(pid: u32) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no readable VmHWM line"))
}

// ---------------------------------------------------------------------------------------
// Machine

#[derive(Debug, Serialize)]
struct Machine {
    cpus: usize,
    kernel: String,
    cpu_model: String,
    memory_mib: u64,
    load_before: String,
    load_after: String,
    date_utc: String,
}

impl Machine {
    fn read() -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let field = |text: &str, key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let memory_kib: u64 = field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .context("/proc/meminfo has no readable MemTotal")?;
        Ok(Self {
            cpus: usize::try_from(cpus).unwrap_or(0),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .context("reading /proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".to_owned()),
            memory_mib: memory_kib / 1024,
            load_before: load_average(),
            load_after: String::new(),
            date_utc: utc_now(),
        })
    }
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Now as `YYYY-MM-DD HH:MM UTC`, without a date library for one line.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

// ---------------------------------------------------------------------------------------
// Report

/// Median and range of one figure over rounds.
#[derive(Clone, Copy, Debug, Serialize)]
struct Spread {
    median: f64,
    min: f64,
    max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Self {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }

    fn show(s: Option<Self>) -> String {
        Self::show_with(s, 1)
    }

    fn show_with(s: Option<Self>, decimals: usize) -> String {
        s.map_or_else(
            || "n/a".to_owned(),
            |s| {
                format!(
                    "{:.decimals$} [{:.decimals$}–{:.decimals$}]",
                    s.median, s.min, s.max
                )
            },
        )
    }
}

fn show_gib_s(gib_s: Option<f64>) -> String {
    gib_s.map_or_else(|| "skipped".to_owned(), |g| format!("{g:.3} GiB/s"))
}

#[derive(Debug, Serialize)]
struct ConfigSummary {
    config: &'static str,
    getppid_ns: Option<Spread>,
    getppid_mean_ns: Option<Spread>,
    switch_ns: Option<Spread>,
    switch_mean_ns: Option<Spread>,
    switches_per_round_trip: Option<Spread>,
    getppid_preempted: Option<Spread>,
    /// Loopback TCP throughput, GiB/s (chunk medians).
    tcp_gib_s: Option<Spread>,
    /// The same from whole transfers.
    tcp_whole_gib_s: Option<Spread>,
    tcp_preempted: Option<Spread>,
    /// CPU time of the TCP sender and receiver per GiB, ms.
    tcp_cpu_ms_per_gib: Option<Spread>,
    tcp_switches: Option<Spread>,
    tcp_reads: Option<Spread>,
    rounds: Vec<Measurement>,
}

/// What one mode adds over `off`, from per-round differences (drift cancels within a round).
#[derive(Debug, Serialize)]
struct Added {
    config: &'static str,
    getppid_ns: Option<Spread>,
    switch_ns: Option<Spread>,
    /// Per switch minus two syscalls' worth (the ping-pong makes two per switch): an
    /// estimate of the sched_switch hook's share.
    sched_switch_share_ns: Option<Spread>,
}

#[derive(Debug, Serialize)]
struct Ratio {
    workload: &'static str,
    floor_added_ns: f64,
    metering_added_ns: f64,
    /// metering_added / floor_added, from the medians; `None` when the floor adds nothing
    /// measurable.
    ratio: Option<f64>,
    /// The same from whole-loop means instead of chunk medians.
    ratio_from_means: Option<f64>,
    target: f64,
    met: Option<bool>,
}

/// The loopback TCP throughput one configuration keeps relative to `off`.
#[derive(Debug, Serialize)]
struct TcpKept {
    config: &'static str,
    /// Each round's throughput over the same round's `off` (chunk medians).
    per_round: Option<Spread>,
    /// The same from whole transfers.
    per_round_whole: Option<Spread>,
    /// Median throughput over median `off` throughput.
    of_medians: Option<f64>,
    /// Each round's CPU time per GiB over the same round's `off` (above 1: costs more).
    cpu_per_round: Option<Spread>,
    target: f64,
    /// Whether the median per-round ratio reaches the target (`None` for the floor, which
    /// hooks no socket event and has no target).
    met: Option<bool>,
}

/// The BPF run time one metering transfer triggers, from the per-program figures of the
/// `metering+stats` rounds and the calls and switches the `metering` transfers made.
#[derive(Debug, Serialize)]
struct TcpProbeEstimate {
    writes: u64,
    reads: f64,
    /// Two sched_switch runs per switch of the sender or receiver: away, and back.
    sched_switch_runs: f64,
    sys_enter_ns: f64,
    sock_send_ns: f64,
    sock_recv_ns: f64,
    sched_switch_ns: f64,
    /// The sum, per GiB, ms.
    probe_ms_per_gib: f64,
    /// The median `off` CPU time of sender and receiver per GiB, ms.
    off_cpu_ms_per_gib: f64,
    /// probe_ms_per_gib / off_cpu_ms_per_gib.
    fraction_of_off_cpu: f64,
}

impl TcpProbeEstimate {
    fn new(args: &Args, configs: &[ConfigSummary], programs: &[ProgramSummary]) -> Option<Self> {
        let ns = |program: &str| {
            programs
                .iter()
                .find(|p| p.mode == "metering" && p.program == program)
                .and_then(|p| p.ns_per_event)
                .map(|s| s.median)
        };
        let metering = &configs[METERING];
        let writes = args.tcp_bytes.div_ceil(TCP_IO as u64);
        let reads = metering.tcp_reads?.median;
        let sched_switch_runs = 2.0 * metering.tcp_switches?.median;
        let (sys_enter_ns, sock_send_ns, sock_recv_ns, sched_switch_ns) = (
            ns("sys_enter")?,
            ns("sock_send")?,
            ns("sock_recv")?,
            ns("sched_switch")?,
        );
        let probe_ns = writes as f64 * (sys_enter_ns + sock_send_ns)
            + reads * (sys_enter_ns + sock_recv_ns)
            + sched_switch_runs * sched_switch_ns;
        let probe_ms_per_gib = probe_ns / 1e6 / (args.tcp_bytes as f64 / GIB);
        let off_cpu_ms_per_gib = configs[OFF].tcp_cpu_ms_per_gib?.median;
        Some(Self {
            writes,
            reads,
            sched_switch_runs,
            sys_enter_ns,
            sock_send_ns,
            sock_recv_ns,
            sched_switch_ns,
            probe_ms_per_gib,
            off_cpu_ms_per_gib,
            fraction_of_off_cpu: probe_ms_per_gib / off_cpu_ms_per_gib,
        })
    }
}

#[derive(Debug, Serialize)]
struct ProgramSummary {
    mode: &'static str,
    program: String,
    /// run_time_ns / run_count per round.
    ns_per_event: Option<Spread>,
    events_per_round: Option<Spread>,
}

#[derive(Debug, Serialize)]
struct Report {
    machine: Machine,
    command: String,
    rounds: u32,
    iterations: u64,
    pingpong_round_trips: u64,
    cpu: usize,
    /// Bytes per TCP transfer (0: skipped).
    tcp_bytes: u64,
    tcp_write_bytes: usize,
    /// The TCP sender's CPU (the receiver's is `cpu`); `None` when skipped.
    tcp_sender_cpu: Option<usize>,
    configs: Vec<ConfigSummary>,
    added: Vec<Added>,
    ratios: Vec<Ratio>,
    tcp_kept: Vec<TcpKept>,
    tcp_probe_estimate: Option<TcpProbeEstimate>,
    bpf_programs: Vec<ProgramSummary>,
    footprint: Footprint,
}

impl Report {
    fn new(
        args: &Args,
        mut machine: Machine,
        cpus: Cpus,
        runs: Vec<Vec<Measurement>>,
        footprint: Footprint,
    ) -> Result<Self> {
        machine.load_after = load_average();
        let spread = |ms: &[Measurement], f: fn(&Measurement) -> f64| {
            Spread::of(&ms.iter().filter(|m| m.covered).map(f).collect::<Vec<_>>())
        };
        let added_by_round = |config: usize, f: fn(&Measurement) -> f64| -> Vec<f64> {
            runs[OFF]
                .iter()
                .zip(&runs[config])
                .map(|(off, on)| f(on) - f(off))
                .collect()
        };
        let added: Vec<Added> = [FLOOR, METERING]
            .into_iter()
            .map(|c| {
                let getppid = added_by_round(c, |m| m.getppid_ns);
                let switch = added_by_round(c, |m| m.switch_ns);
                let share: Vec<f64> = switch
                    .iter()
                    .zip(&getppid)
                    .map(|(s, g)| s - 2.0 * g)
                    .collect();
                Added {
                    config: CONFIGS[c].name,
                    getppid_ns: Spread::of(&getppid),
                    switch_ns: Spread::of(&switch),
                    sched_switch_share_ns: Spread::of(&share),
                }
            })
            .collect();
        let ratio = |workload, median: fn(&Measurement) -> f64, mean: fn(&Measurement) -> f64| {
            let added = |config, f| Spread::of(&added_by_round(config, f)).map(|s| s.median);
            let floor = added(FLOOR, median).context("no floor rounds")?;
            let metering = added(METERING, median).context("no metering rounds")?;
            let ratio = (floor > 0.0).then(|| metering / floor);
            let ratio_from_means = match (added(FLOOR, mean), added(METERING, mean)) {
                (Some(floor), Some(metering)) if floor > 0.0 => Some(metering / floor),
                _ => None,
            };
            anyhow::Ok(Ratio {
                workload,
                floor_added_ns: floor,
                metering_added_ns: metering,
                ratio,
                ratio_from_means,
                target: TARGET_RATIO,
                met: ratio.map(|r| r <= TARGET_RATIO),
            })
        };
        let ratios = vec![
            ratio("getppid", |m| m.getppid_ns, |m| m.getppid_mean_ns)?,
            ratio("context switch", |m| m.switch_ns, |m| m.switch_mean_ns)?,
        ];

        let tcp_kept = if cpus.tcp_sender.is_some() {
            [FLOOR, METERING]
                .into_iter()
                .map(|c| {
                    let kept = |f: fn(&Measurement) -> Option<f64>| -> Vec<f64> {
                        runs[OFF]
                            .iter()
                            .zip(&runs[c])
                            .filter_map(|(off, on)| Some(f(on)? / f(off)?))
                            .collect()
                    };
                    let median = |config: usize| {
                        let v: Vec<f64> = runs[config].iter().filter_map(|m| m.tcp_gib_s).collect();
                        Spread::of(&v).map(|s| s.median)
                    };
                    let per_round = Spread::of(&kept(|m| m.tcp_gib_s));
                    TcpKept {
                        config: CONFIGS[c].name,
                        per_round,
                        per_round_whole: Spread::of(&kept(|m| m.tcp_whole_gib_s)),
                        cpu_per_round: Spread::of(&kept(|m| m.tcp_cpu_ms_per_gib)),
                        of_medians: median(OFF).zip(median(c)).map(|(off, on)| on / off),
                        target: TCP_TARGET,
                        met: (c == METERING)
                            .then(|| per_round.map(|s| s.median >= TCP_TARGET))
                            .flatten(),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };

        let mut bpf_programs = Vec::new();
        for config in [FLOOR_STATS, METERING_STATS] {
            let mut per_program: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            for m in &runs[config] {
                for p in &m.programs {
                    let entry = per_program.entry(p.program.as_str()).or_default();
                    if p.run_count > 0 {
                        entry.0.push(p.run_time_ns as f64 / p.run_count as f64);
                    }
                    entry.1.push(p.run_count as f64);
                }
            }
            for (program, (ns, counts)) in per_program {
                bpf_programs.push(ProgramSummary {
                    mode: CONFIGS[config].mode.unwrap_or("none"),
                    program: program.to_owned(),
                    ns_per_event: Spread::of(&ns),
                    events_per_round: Spread::of(&counts),
                });
            }
        }

        let configs = CONFIGS
            .iter()
            .zip(runs)
            .map(|(config, rounds)| ConfigSummary {
                config: config.name,
                getppid_ns: spread(&rounds, |m| m.getppid_ns),
                getppid_mean_ns: spread(&rounds, |m| m.getppid_mean_ns),
                switch_ns: spread(&rounds, |m| m.switch_ns),
                switch_mean_ns: spread(&rounds, |m| m.switch_mean_ns),
                switches_per_round_trip: spread(&rounds, |m| m.switches_per_round_trip),
                getppid_preempted: spread(&rounds, |m| m.getppid_preempted as f64),
                tcp_gib_s: spread(&rounds, |m| m.tcp_gib_s.unwrap_or(f64::NAN)),
                tcp_whole_gib_s: spread(&rounds, |m| m.tcp_whole_gib_s.unwrap_or(f64::NAN)),
                tcp_preempted: spread(&rounds, |m| m.tcp_preempted.map_or(f64::NAN, |p| p as f64)),
                tcp_cpu_ms_per_gib: spread(&rounds, |m| m.tcp_cpu_ms_per_gib.unwrap_or(f64::NAN)),
                tcp_switches: spread(&rounds, |m| m.tcp_switches.map_or(f64::NAN, |p| p as f64)),
                tcp_reads: spread(&rounds, |m| m.tcp_reads.map_or(f64::NAN, |p| p as f64)),
                rounds,
            })
            .collect::<Vec<_>>();
        let tcp_probe_estimate = cpus
            .tcp_sender
            .and_then(|_| TcpProbeEstimate::new(args, &configs, &bpf_programs));
        Ok(Self {
            machine,
            command: std::iter::once("cargo xtask bench --".to_owned())
                .chain(std::env::args().skip(1))
                .collect::<Vec<_>>()
                .join(" "),
            rounds: args.rounds,
            iterations: args.iterations,
            pingpong_round_trips: args.pingpong,
            cpu: cpus.bench,
            tcp_bytes: args.tcp_bytes,
            tcp_write_bytes: TCP_IO,
            tcp_sender_cpu: cpus.tcp_sender,
            configs,
            added,
            ratios,
            tcp_kept,
            tcp_probe_estimate,
            bpf_programs,
            footprint,
        })
    }

    fn print(&self) {
        let m = &self.machine;
        println!();
        println!(
            "mentat-agent overhead, {} — {} CPU(s) {}, {} MiB, kernel {}",
            m.date_utc, m.cpus, m.cpu_model, m.memory_mib, m.kernel
        );
        println!(
            "{} rounds; {} getppid calls and {} ping-pong round trips per measurement, on CPU {}; \
             load average {} before, {} after",
            self.rounds,
            self.iterations,
            self.pingpong_round_trips,
            self.cpu,
            m.load_before,
            m.load_after
        );
        println!("command: {}", self.command);
        let tainted: usize = self
            .configs
            .iter()
            .map(|c| c.rounds.iter().filter(|m| m.foreign_agents).count())
            .sum();
        if tainted > 0 {
            println!(
                "WARNING: another mentat-agent was running during {tainted} measurement(s); \
                 its probes inflate every configuration"
            );
        }
        println!(
            "figures: median [min–max] over rounds, in ns; each round's figure is the median \
             of {CHUNKS} equal chunks of its loop"
        );
        println!();
        println!(
            "{:<16} {:>26} {:>26} {:>10}",
            "configuration", "getppid ns/call", "context switch ns", "sw/trip"
        );
        for c in &self.configs {
            println!(
                "{:<16} {:>26} {:>26} {:>10}",
                c.config,
                Spread::show(c.getppid_ns),
                Spread::show(c.switch_ns),
                c.switches_per_round_trip
                    .map_or_else(|| "n/a".to_owned(), |s| format!("{:.2}", s.median)),
            );
        }
        println!();
        println!(
            "{:<16} {:>26} {:>26} {:>26}",
            "added over off", "per getppid", "per context switch", "sched_switch share (est.)"
        );
        for a in &self.added {
            println!(
                "{:<16} {:>26} {:>26} {:>26}",
                a.config,
                Spread::show(a.getppid_ns),
                Spread::show(a.switch_ns),
                Spread::show(a.sched_switch_share_ns),
            );
        }
        println!();
        for r in &self.ratios {
            let verdict = match (r.ratio, r.met) {
                (Some(ratio), Some(true)) => format!("{ratio:.2}× — meets ≤ {:.1}×", r.target),
                (Some(ratio), _) => format!(
                    "{ratio:.2}× — MISSES ≤ {:.1}× (metering adds {:.1} ns, the target allows {:.1} ns)",
                    r.target,
                    r.metering_added_ns,
                    r.floor_added_ns * r.target
                ),
                (None, _) => "n/a — the floor added nothing measurable".to_owned(),
            };
            println!(
                "metering/floor added, {:<15} {:.1} / {:.1} ns = {verdict}",
                format!("{}:", r.workload),
                r.metering_added_ns,
                r.floor_added_ns
            );
            if let Some(from_means) = r.ratio_from_means {
                println!(
                    "{:37}(from whole-loop means instead of chunk medians: {from_means:.2}×)",
                    ""
                );
            }
        }
        if let Some(sender) = self.tcp_sender_cpu {
            println!();
            println!(
                "loopback TCP: {} bytes per transfer ({:.2} GiB) in {} KiB writes and reads, \
                 sender on CPU {sender}, receiver on CPU {}; GiB/s timed in the receiver from \
                 the first byte to EOF",
                self.tcp_bytes,
                self.tcp_bytes as f64 / GIB,
                self.tcp_write_bytes / 1024,
                self.cpu
            );
            println!(
                "{:<16} {:>26} {:>26} {:>26} {:>18}",
                "configuration",
                "GiB/s (median chunk)",
                "GiB/s (whole transfer)",
                "CPU ms/GiB (both sides)",
                "preempted"
            );
            for c in &self.configs {
                println!(
                    "{:<16} {:>26} {:>26} {:>26} {:>18}",
                    c.config,
                    Spread::show_with(c.tcp_gib_s, 3),
                    Spread::show_with(c.tcp_whole_gib_s, 3),
                    Spread::show_with(c.tcp_cpu_ms_per_gib, 1),
                    Spread::show_with(c.tcp_preempted, 0),
                );
            }
            println!();
            println!(
                "{:<16} {:>26} {:>26} {:>12} {:>26}",
                "vs off",
                "kept (median chunk)",
                "kept (whole transfer)",
                "of medians",
                "CPU per GiB"
            );
            for k in &self.tcp_kept {
                println!(
                    "{:<16} {:>26} {:>26} {:>12} {:>26}",
                    k.config,
                    Spread::show_with(k.per_round, 4),
                    Spread::show_with(k.per_round_whole, 4),
                    k.of_medians
                        .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.4}")),
                    Spread::show_with(k.cpu_per_round, 4),
                );
            }
            for k in &self.tcp_kept {
                if let (Some(met), Some(kept)) = (k.met, k.per_round) {
                    let mut verdict = if met {
                        format!("meets ≥ {:.2}", k.target)
                    } else {
                        format!(
                            "MISSES ≥ {:.2} by {:.2} percentage points",
                            k.target,
                            (k.target - kept.median) * 100.0
                        )
                    };
                    if kept.min < k.target && kept.max > k.target {
                        verdict += &format!(
                            ", but the rounds ranged {:.4}–{:.4}: the noise is wider than the \
                             margin",
                            kept.min, kept.max
                        );
                    }
                    println!(
                        "{} keeps {:.2}% of off's TCP throughput (median per-round ratio of \
                         median chunks; {} from whole transfers) — {verdict}",
                        k.config,
                        kept.median * 100.0,
                        k.per_round_whole.map_or_else(
                            || "n/a".to_owned(),
                            |w| format!("{:.2}%", w.median * 100.0)
                        ),
                    );
                }
            }
        }
        if let Some(e) = &self.tcp_probe_estimate {
            println!(
                "metering's probes per transfer, from the run times below: {} writes × ({:.1} \
                 sys_enter + {:.1} sock_send) + {:.0} reads × ({:.1} + {:.1} sock_recv) + {:.0} \
                 sched_switch runs × {:.1} ns = {:.2} ms per GiB, {:.2}% of off's {:.1} ms CPU per \
                 GiB",
                e.writes,
                e.sys_enter_ns,
                e.sock_send_ns,
                e.reads,
                e.sys_enter_ns,
                e.sock_recv_ns,
                e.sched_switch_runs,
                e.sched_switch_ns,
                e.probe_ms_per_gib,
                e.fraction_of_off_cpu * 100.0,
                e.off_cpu_ms_per_gib
            );
        }
        println!();
        println!("BPF run time per event (kernel.bpf_stats_enabled=1, whole attach):");
        println!(
            "{:<10} {:<20} {:>26} {:>18}",
            "mode", "program", "ns/event", "events (median)"
        );
        for p in &self.bpf_programs {
            println!(
                "{:<10} {:<20} {:>26} {:>18}",
                p.mode,
                p.program,
                Spread::show(p.ns_per_event),
                p.events_per_round
                    .map_or_else(|| "n/a".to_owned(), |s| format!("{:.0}", s.median)),
            );
        }
        let f = &self.footprint;
        println!();
        println!(
            "mentat-agent run under load for {:.1}s: CPU {:.1} ms = {:.2}% of one core \
             (/proc stat ticks: {:.0} ms), peak RSS {:.1} MiB, {} windows; \
             {:.1} ms CPU to start and attach",
            f.wall_ns as f64 / 1e9,
            f.cpu_ns as f64 / 1e6,
            f.cpu_percent_of_one_core,
            f.cpu_ns_from_stat as f64 / 1e6,
            f.peak_rss_mib,
            f.windows,
            f.startup_cpu_ns as f64 / 1e6
        );
    }
}
