//! stress-ng throughput under `off`, `floor` and `metering`, in one run, as ratios.
//!
//! The micro workloads of this bench pin a ping-pong to one CPU, so they never see what a
//! loaded node has: idle switches and wakeups across CPUs. `stress-ng --switch 2` (two
//! pipe ping-pong pairs free to roam), `--null 2` (writes to /dev/null: syscall bound) and
//! `--fork 2` (fork and exit: the lifecycle hooks) do. Each round runs every stressor under
//! the three configurations back to back (off, floor, metering), so drift on a noisy
//! machine hits all three alike; figures are medians over rounds of stress-ng's own
//! "bogo ops/s (real time)".
//!
//! What metering adds per operation is `1/metering − 1/off` seconds; what the empty
//! programs add, `1/floor − 1/off`. The target is that the first is at most
//! [`TARGET_RATIO`] times the second.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::agent::{AgentProcess, Stream};
use crate::configs::{foreign_agents, wait_until_alone};
use crate::machine::{Machine, load_average};
use crate::report::Spread;
use crate::{ATTACH_TIMEOUT, TARGET_RATIO, check_interrupted};

/// The stressors, each run with two instances (one per CPU of the 2-CPU machine the
/// targets were set on).
pub(crate) const STRESSORS: [&str; 3] = ["switch", "null", "fork"];
/// Instances of each stressor.
const INSTANCES: u32 = 2;
/// The configurations, in the order each round runs them.
const MODES: [(&str, Option<&str>); 3] = [
    ("off", None),
    ("floor", Some("floor")),
    ("metering", Some("metering")),
];

/// One stressor's bogo ops/s per configuration, one value per round.
#[derive(Debug, Serialize)]
pub(crate) struct StressorRuns {
    pub(crate) stressor: String,
    /// Indexed like [`MODES`].
    pub(crate) ops_per_s: [Vec<f64>; 3],
    /// Rounds in which another mentat-agent process ran (its probes add to every
    /// configuration).
    pub(crate) disturbed_rounds: u32,
}

/// The stress-ng section of the report.
#[derive(Debug, Serialize)]
pub(crate) struct StressReport {
    pub(crate) machine: Machine,
    pub(crate) command: String,
    pub(crate) seconds: u64,
    pub(crate) rounds: u32,
    pub(crate) stressors: Vec<StressorRuns>,
    pub(crate) summary: Vec<StressSummary>,
}

/// Medians and ratios of one stressor.
#[derive(Debug, Serialize)]
pub(crate) struct StressSummary {
    pub(crate) stressor: String,
    pub(crate) off: Option<Spread>,
    pub(crate) floor: Option<Spread>,
    pub(crate) metering: Option<Spread>,
    /// Throughput floor keeps of off, median of per-round ratios.
    pub(crate) floor_kept: Option<Spread>,
    /// Throughput metering keeps of off, median of per-round ratios.
    pub(crate) metering_kept: Option<Spread>,
    /// (1/metering − 1/off) / (1/floor − 1/off) from the medians; `None` when the floor
    /// added nothing measurable.
    pub(crate) added_ratio: Option<f64>,
    /// The same per round, median and range (rounds where the floor added nothing left out).
    pub(crate) added_ratio_rounds: Option<Spread>,
    pub(crate) meets: Option<bool>,
}

/// Whether stress-ng is installed (`cargo xtask setup` installs it).
pub(crate) fn available() -> bool {
    Command::new("stress-ng")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `rounds` rounds of every stressor under every configuration, `seconds` each.
pub(crate) fn run(agent: &Path, rounds: u32, seconds: u64) -> Result<StressReport> {
    if !available() {
        bail!("stress-ng is not installed: run `cargo xtask setup` (or apt-get install stress-ng)");
    }
    let mut machine = Machine::read()?;
    let mut stressors: Vec<StressorRuns> = STRESSORS
        .iter()
        .map(|s| StressorRuns {
            stressor: (*s).to_owned(),
            ops_per_s: Default::default(),
            disturbed_rounds: 0,
        })
        .collect();
    for round in 1..=rounds {
        for runs in &mut stressors {
            let mut disturbed = false;
            for (i, (name, mode)) in MODES.iter().enumerate() {
                check_interrupted()?;
                wait_until_alone(None)?;
                let (ops, foreign) =
                    measure(agent, &runs.stressor, *mode, seconds).with_context(|| {
                        format!(
                            "round {round}/{rounds}: stress-ng --{} {name}",
                            runs.stressor
                        )
                    })?;
                disturbed |= foreign;
                eprintln!(
                    "stress round {round}/{rounds}: --{:<6} {name:<8} {ops:>12.1} bogo ops/s{}",
                    runs.stressor,
                    if foreign {
                        "  (another mentat-agent ran)"
                    } else {
                        ""
                    }
                );
                runs.ops_per_s[i].push(ops);
            }
            runs.disturbed_rounds += u32::from(disturbed);
        }
    }
    machine.load_after = load_average();
    let summary = stressors.iter().map(summarize).collect();
    Ok(StressReport {
        machine,
        command: format!("stress-ng --<stressor> {INSTANCES} -t {seconds} --metrics-brief"),
        seconds,
        rounds,
        stressors,
        summary,
    })
}

/// One stress-ng run under `mode` (`None`: nothing attached); its bogo ops/s (real time)
/// and whether another mentat-agent ran meanwhile.
fn measure(agent: &Path, stressor: &str, mode: Option<&str>, seconds: u64) -> Result<(f64, bool)> {
    let mut attach = match mode {
        None => None,
        Some(mode) => {
            // Stopped as soon as stress-ng is done; the duration only bounds a lost agent.
            let duration = format!("{}s", seconds * 4 + 30);
            let mut a = AgentProcess::spawn(
                agent,
                ["attach", "--mode", mode, "--duration", duration.as_str()],
            )?;
            a.wait_for_line(Stream::Stdout, "attached", ATTACH_TIMEOUT)?;
            Some(a)
        }
    };
    let own = attach.as_ref().map(AgentProcess::pid);
    let mut foreign = !foreign_agents(own).is_empty();
    let out = Command::new("stress-ng")
        .arg(format!("--{stressor}"))
        .arg(INSTANCES.to_string())
        .args(["-t", &seconds.to_string(), "--metrics-brief"])
        .output()
        .context("running stress-ng")?;
    foreign |= !foreign_agents(own).is_empty();
    if let Some(a) = attach.as_mut() {
        let still = a.running()?;
        let ended = a.stop()?;
        ensure!(
            still,
            "`{}` detached before stress-ng ended ({ended})",
            a.what
        );
    }
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "stress-ng --{stressor} failed ({}): {text}",
        out.status
    );
    let ops = parse_ops_per_s(&text, stressor)
        .with_context(|| format!("no bogo ops/s for {stressor} in stress-ng's output:\n{text}"))?;
    Ok((ops, foreign))
}

/// The "bogo ops/s (real time)" of `stressor` in `--metrics-brief` output: the line
/// `stress-ng: metrc: [pid] <stressor> <ops> <real s> <usr s> <sys s> <ops/s real> <ops/s cpu>`
/// (stress-ng 0.15 says `metrc:`, older ones `info:`).
pub(crate) fn parse_ops_per_s(text: &str, stressor: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (_, rest) = line.split_once("] ")?;
        let mut words = rest.split_whitespace();
        if words.next()? != stressor {
            return None;
        }
        let numbers: Vec<f64> = words.map(str::parse).collect::<Result<_, _>>().ok()?;
        (numbers.len() == 6).then(|| numbers[4])
    })
}

/// Seconds per operation that `mode` adds over `off`.
fn added(off: f64, mode: f64) -> f64 {
    1.0 / mode - 1.0 / off
}

fn summarize(runs: &StressorRuns) -> StressSummary {
    let [off, floor, metering] = &runs.ops_per_s;
    let kept = |v: &[f64]| -> Vec<f64> { v.iter().zip(off).map(|(m, o)| m / o).collect() };
    let per_round: Vec<f64> = off
        .iter()
        .zip(floor)
        .zip(metering)
        .filter_map(|((&o, &f), &m)| {
            let fa = added(o, f);
            (fa > 0.0).then(|| added(o, m) / fa)
        })
        .collect();
    let (so, sf, sm) = (Spread::of(off), Spread::of(floor), Spread::of(metering));
    let added_ratio = match (so, sf, sm) {
        (Some(o), Some(f), Some(m)) if added(o.median, f.median) > 0.0 => {
            Some(added(o.median, m.median) / added(o.median, f.median))
        }
        _ => None,
    };
    StressSummary {
        stressor: runs.stressor.clone(),
        off: so,
        floor: sf,
        metering: sm,
        floor_kept: Spread::of(&kept(floor)),
        metering_kept: Spread::of(&kept(metering)),
        added_ratio,
        added_ratio_rounds: Spread::of(&per_round),
        // A negative ratio means metering measured faster than off: noise, no verdict.
        meets: added_ratio.filter(|r| *r >= 0.0).map(|r| r <= TARGET_RATIO),
    }
}

impl StressReport {
    /// Prints the section as Markdown tables, ready for BENCHMARKS.md.
    pub(crate) fn print(&self) {
        let m = &self.machine;
        println!();
        println!("## stress-ng: off / floor (empty programs) / metering");
        println!();
        println!(
            "Machine: {} CPU(s), kernel {}, {}, {} MiB; {}; load average {} before, {} after.",
            m.cpus, m.kernel, m.cpu_model, m.memory_mib, m.date_utc, m.load_before, m.load_after
        );
        println!(
            "Command per measurement: `{}`; {} rounds, medians [min–max].",
            self.command, self.rounds
        );
        println!();
        println!(
            "| stressor | off, bogo ops/s | floor, bogo ops/s | metering, bogo ops/s | floor keeps | metering keeps | metering added / floor added | target ≤ {TARGET_RATIO}× |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let show = |s: Option<Spread>, d: usize| {
            s.map_or_else(
                || "n/a".to_owned(),
                |s| format!("{:.d$} [{:.d$}–{:.d$}]", s.median, s.min, s.max),
            )
        };
        for (s, runs) in self.summary.iter().zip(&self.stressors) {
            let verdict = match s.meets {
                Some(true) => "meets".to_owned(),
                Some(false) => "**misses**".to_owned(),
                None => "n/a (an added cost measured ≤ 0: noise)".to_owned(),
            };
            println!(
                "| `--{}`{} | {} | {} | {} | {} | {} | {} (rounds {}) | {verdict} |",
                s.stressor,
                if runs.disturbed_rounds > 0 {
                    format!(" ({} rounds disturbed)", runs.disturbed_rounds)
                } else {
                    String::new()
                },
                show(s.off, 0),
                show(s.floor, 0),
                show(s.metering, 0),
                show(s.floor_kept, 3),
                show(s.metering_kept, 3),
                s.added_ratio
                    .map_or_else(|| "n/a".to_owned(), |r| format!("{r:.2}×")),
                show(s.added_ratio_rounds, 2),
            );
        }
    }
}

/// How long each stressor runs per measurement by default.
pub(crate) const DEFAULT_SECS: u64 = 5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_real_time_rate_of_the_named_stressor() {
        let text = "stress-ng: info:  [1] dispatching hogs: 2 switch\n\
            stress-ng: metrc: [12108] stressor       bogo ops real time  usr time  sys time   bogo ops/s     bogo ops/s\n\
            stress-ng: metrc: [12108] switch          1273626      3.00      0.53      5.12    424439.89      225668.45\n\
            stress-ng: metrc: [12108] switch              4711.00 nanosecs per context switch (pipe method)\n";
        assert_eq!(parse_ops_per_s(text, "switch"), Some(424439.89));
        assert_eq!(parse_ops_per_s(text, "null"), None);
    }

    #[test]
    fn added_ratio_compares_time_per_operation() {
        // off 100 ops/s (10 ms/op), floor 80 (12.5 ms/op: +2.5), metering 50 (20: +10).
        let runs = StressorRuns {
            stressor: "switch".into(),
            ops_per_s: [vec![100.0], vec![80.0], vec![50.0]],
            disturbed_rounds: 0,
        };
        let s = summarize(&runs);
        let r = s.added_ratio.expect("floor added time");
        assert!((r - 4.0).abs() < 1e-9, "{r}");
        assert_eq!(s.meets, Some(false));
    }
}
