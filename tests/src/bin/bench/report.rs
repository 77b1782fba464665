//! The report: per-configuration medians and ranges over rounds, what metering adds over
//! `off` against what the floor adds (the ratio and its target), the TCP throughput kept,
//! per-program BPF run times and the footprint; printed as text and written as JSON.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::configs::Measurement;
use crate::footprint::Footprint;
use crate::machine::{Machine, load_average};
use crate::procs::Cpus;
use crate::workloads::{CHUNKS, GIB};
use crate::{
    Args, CONFIGS, FLOOR, FLOOR_STATS, METERING, METERING_STATS, OFF, TARGET_RATIO, TCP_IO,
    TCP_TARGET,
};

/// Median and range of one figure over rounds.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Spread {
    pub(crate) median: f64,
    pub(crate) min: f64,
    pub(crate) max: f64,
}

impl Spread {
    pub(crate) fn of(values: &[f64]) -> Option<Self> {
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

pub(crate) fn show_gib_s(gib_s: Option<f64>) -> String {
    gib_s.map_or_else(|| "skipped".to_owned(), |g| format!("{g:.3} GiB/s"))
}

#[derive(Debug, Serialize)]
pub(crate) struct ConfigSummary {
    pub(crate) config: &'static str,
    pub(crate) getppid_ns: Option<Spread>,
    pub(crate) getppid_mean_ns: Option<Spread>,
    pub(crate) switch_ns: Option<Spread>,
    pub(crate) switch_mean_ns: Option<Spread>,
    pub(crate) switches_per_round_trip: Option<Spread>,
    pub(crate) getppid_preempted: Option<Spread>,
    /// Loopback TCP throughput, GiB/s (chunk medians).
    pub(crate) tcp_gib_s: Option<Spread>,
    /// The same from whole transfers.
    pub(crate) tcp_whole_gib_s: Option<Spread>,
    pub(crate) tcp_preempted: Option<Spread>,
    /// CPU time of the TCP sender and receiver per GiB, ms.
    pub(crate) tcp_cpu_ms_per_gib: Option<Spread>,
    pub(crate) tcp_switches: Option<Spread>,
    pub(crate) tcp_reads: Option<Spread>,
    pub(crate) rounds: Vec<Measurement>,
}

/// What one mode adds over `off`, from per-round differences (drift cancels within a round).
#[derive(Debug, Serialize)]
struct Added {
    pub(crate) config: &'static str,
    pub(crate) getppid_ns: Option<Spread>,
    pub(crate) switch_ns: Option<Spread>,
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
    pub(crate) target: f64,
    met: Option<bool>,
}

/// The loopback TCP throughput one configuration keeps relative to `off`.
#[derive(Debug, Serialize)]
struct TcpKept {
    pub(crate) config: &'static str,
    /// Each round's throughput over the same round's `off` (chunk medians).
    per_round: Option<Spread>,
    /// The same from whole transfers.
    per_round_whole: Option<Spread>,
    /// Median throughput over median `off` throughput.
    of_medians: Option<f64>,
    /// Each round's CPU time per GiB over the same round's `off` (above 1: costs more).
    cpu_per_round: Option<Spread>,
    pub(crate) target: f64,
    /// Whether the median per-round ratio reaches the target (`None` for the floor, which
    /// hooks no socket event and has no target).
    met: Option<bool>,
}

/// The BPF run time one metering transfer triggers, from the per-program figures of the
/// `metering+stats` rounds and the calls and switches the `metering` transfers made.
#[derive(Debug, Serialize)]
struct TcpProbeEstimate {
    writes: u64,
    pub(crate) reads: f64,
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
    pub(crate) fn new(
        args: &Args,
        configs: &[ConfigSummary],
        programs: &[ProgramSummary],
    ) -> Option<Self> {
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
    pub(crate) mode: &'static str,
    pub(crate) program: String,
    /// run_time_ns / run_count per round.
    ns_per_event: Option<Spread>,
    events_per_round: Option<Spread>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    command: String,
    pub(crate) rounds: u32,
    pub(crate) iterations: u64,
    pingpong_round_trips: u64,
    pub(crate) cpu: usize,
    /// Bytes per TCP transfer (0: skipped).
    pub(crate) tcp_bytes: u64,
    tcp_write_bytes: usize,
    /// The TCP sender's CPU (the receiver's is `cpu`); `None` when skipped.
    tcp_sender_cpu: Option<usize>,
    pub(crate) configs: Vec<ConfigSummary>,
    added: Vec<Added>,
    ratios: Vec<Ratio>,
    tcp_kept: Vec<TcpKept>,
    tcp_probe_estimate: Option<TcpProbeEstimate>,
    bpf_programs: Vec<ProgramSummary>,
    pub(crate) footprint: Footprint,
}

impl Report {
    pub(crate) fn new(
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

    pub(crate) fn print(&self) {
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
