//! One measurement of the three workloads under one configuration (`off`, `floor`,
//! `metering`, with or without `kernel.bpf_stats_enabled`): attaches `mentat-agent attach
//! --mode ...` for as long as the workloads run, reads the per-program run times it prints,
//! and measures again when another mentat-agent on the machine disturbed the figures.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde::{Deserialize, Serialize};

use crate::agent::{AgentProcess, Stream, describe_status};
use crate::procs::Cpus;
use crate::workloads::{GIB, getppid, pingpong, tcp_throughput};
use crate::{ATTACH_TIMEOUT, Args, Config, EXIT_TIMEOUT, check_interrupted};

/// One run of both workloads under one configuration.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Measurement {
    /// ns per call, median over the loop's chunks.
    pub(crate) getppid_ns: f64,
    /// ns per call over the whole loop, interruptions included.
    pub(crate) getppid_mean_ns: f64,
    /// Involuntary switches away from the getppid loop: other work took its CPU.
    pub(crate) getppid_preempted: u64,
    /// ns per switch, median over the ping-pong's chunks.
    pub(crate) switch_ns: f64,
    /// ns per switch over the whole ping-pong, interruptions included.
    pub(crate) switch_mean_ns: f64,
    /// Context switches the two processes counted per round trip (2 when nothing else ran).
    pub(crate) switches_per_round_trip: f64,
    /// Loopback TCP throughput in GiB/s, median over the transfer's chunks (`None` when
    /// skipped).
    pub(crate) tcp_gib_s: Option<f64>,
    /// The same over the whole transfer, first byte to EOF, interruptions included.
    pub(crate) tcp_whole_gib_s: Option<f64>,
    /// Involuntary switches away from the TCP sender and receiver.
    pub(crate) tcp_preempted: Option<u64>,
    /// Context switches of the TCP sender and receiver.
    pub(crate) tcp_switches: Option<u64>,
    /// read calls of the TCP receiver.
    pub(crate) tcp_reads: Option<u64>,
    /// CPU time of the TCP sender and receiver per GiB, ms.
    pub(crate) tcp_cpu_ms_per_gib: Option<f64>,
    /// False when the agent detached before the workloads ended (stats configurations only,
    /// whose timings are then left out).
    pub(crate) covered: bool,
    /// Whether another mentat-agent process was running at the start (its probes add to
    /// every configuration).
    pub(crate) foreign_agents: bool,
    /// Kernel run statistics of each program over the whole attach (stats configurations).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) programs: Vec<ProgramRun>,
}

/// One line of `mentat-agent attach` output.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub(crate) struct ProgramRun {
    pub(crate) program: String,
    pub(crate) run_count: u64,
    pub(crate) run_time_ns: u64,
}

/// Measurements of one configuration tried before keeping one another agent disturbed.
const ATTEMPTS: u32 = 3;

/// [`measure_config_once`], again when another mentat-agent ran meanwhile.
pub(crate) fn measure_config(
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
pub(crate) fn measure(args: &Args, cpus: Cpus) -> Result<Measurement> {
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
pub(crate) fn foreign_agents(own: Option<u32>) -> Vec<u32> {
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
pub(crate) fn wait_until_alone(own: Option<u32>) -> Result<()> {
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
