//! Footprint of `mentat-agent run`: the daemon's own CPU time (exact, from its CPU-time
//! clock, and from /proc/<pid>/stat) and peak RSS (VmHWM) while it meters the getppid and
//! ping-pong load for a set period.

use std::fs;
use std::mem;
use std::net::TcpListener;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::agent::{AgentProcess, Stream, describe_status};
use crate::configs::wait_until_alone;
use crate::workloads::Load;
use crate::{ATTACH_TIMEOUT, check_interrupted};

#[derive(Debug, Serialize)]
pub(crate) struct Footprint {
    /// How long the CPU time was measured, under load.
    pub(crate) wall_ns: u64,
    /// CPU time of the daemon (all threads) over that time, from its CPU-time clock (ns).
    pub(crate) cpu_ns: u64,
    /// The same from utime + stime in /proc/<pid>/stat, which counts whole clock ticks.
    pub(crate) cpu_ns_from_stat: u64,
    pub(crate) cpu_percent_of_one_core: f64,
    /// CPU time from start until the probes were attached.
    pub(crate) startup_cpu_ns: u64,
    pub(crate) peak_rss_mib: f64,
    /// Windows the daemon logged while measured (one per second expected).
    pub(crate) windows: usize,
}

pub(crate) fn footprint(agent: &Path, period: Duration, cpu: usize) -> Result<Footprint> {
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
        // The per-window summary line (counted below) is logged at DEBUG.
        ("RUST_LOG", "info,mentat_agent::daemon=debug".to_string()),
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
