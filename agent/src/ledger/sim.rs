//! Synthetic load for the ledger: the growth and write-cost measurements
//! (tests here, `xtask bench` later) drive the real API with realistic
//! records: container identities, trace context on half the workloads,
//! 28-digit decimals as real pricing produces, tokens now and then.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use rust_decimal::Decimal;

use super::{CompactStats, Ledger, LedgerError, times::format_ns};
use crate::report::record::{Cost, TokenUsage, UsageRecord};

/// What [`simulate_growth`] simulates.
#[derive(Clone, Debug)]
pub struct GrowthConfig {
    /// Workloads reporting in every window.
    pub workloads: usize,
    /// Window length (the agent's tick).
    pub window: Duration,
    /// Simulated time covered.
    pub span: Duration,
    /// The ledger's retention.
    pub retention: Duration,
    /// How often (in simulated time) compaction runs.
    pub compact_every: Duration,
    /// How long one agent run (run_id, trace_id) lasts.
    pub run_length: Duration,
    /// Simulated start, seconds since the epoch.
    pub start_unix_s: i64,
}

/// What [`simulate_growth`] measured.
#[derive(Clone, Debug, Default)]
pub struct GrowthReport {
    /// Windows committed.
    pub windows: u64,
    /// Records committed.
    pub records: u64,
    /// Wall time spent in `commit_window`.
    pub commit_time: Duration,
    /// Largest `disk_bytes` seen (just before a compaction, or at the end).
    pub peak_disk_bytes: u64,
    /// `disk_bytes` at the end, after the last compaction.
    pub final_disk_bytes: u64,
    /// Compactions run.
    pub compactions: u64,
    /// Their stats, summed.
    pub compacted: CompactStats,
}

/// Commits `span / window` windows of `workloads` records, the exporter
/// confirming each at once, compacting every `compact_every`; reports disk use.
pub fn simulate_growth(path: &Path, cfg: &GrowthConfig) -> Result<GrowthReport, LedgerError> {
    let mut ledger = Ledger::open(path, cfg.retention)?;
    let window_ns = nanos(cfg.window).max(1);
    let windows = nanos(cfg.span) / window_ns;
    let compact_ns = nanos(cfg.compact_every).max(window_ns);
    let run_ns = nanos(cfg.run_length).max(window_ns);
    let start = cfg.start_unix_s.saturating_mul(1_000_000_000);
    let mut report = GrowthReport::default();
    let mut last_compaction = start;
    for k in 0..windows {
        let ws = start + k * window_ns;
        let we = ws + window_ns;
        let records = synthetic_window("node-1", cfg.workloads, ws, window_ns, run_ns);
        let (ws_s, we_s) = (time(ws)?, time(we)?);
        let t = Instant::now();
        ledger.commit_window(&ws_s, &we_s, &records, &["sim"])?;
        report.commit_time += t.elapsed();
        let ids: Vec<String> = records.iter().map(|r| r.record_id.clone()).collect();
        ledger.mark_delivered("sim", &ids)?;
        report.windows += 1;
        report.records += records.len() as u64;
        if we - last_compaction >= compact_ns {
            report.peak_disk_bytes = report.peak_disk_bytes.max(ledger.disk_bytes()?);
            let s = ledger.compact(&we_s)?;
            report.compactions += 1;
            report.compacted.records_compacted += s.records_compacted;
            report.compacted.rollup_rows += s.rollup_rows;
            report.compacted.kept_undelivered += s.kept_undelivered;
            last_compaction = we;
        }
    }
    report.final_disk_bytes = ledger.disk_bytes()?;
    report.peak_disk_bytes = report.peak_disk_bytes.max(report.final_disk_bytes);
    Ok(report)
}

/// What [`commit_cost`] measured.
#[derive(Clone, Debug, Default)]
pub struct CommitCost {
    /// Records committed.
    pub records: u64,
    /// Wall time in `commit_window`, all windows.
    pub total: Duration,
    /// Mean µs per record.
    pub per_record_us: f64,
    /// Median window commit.
    pub p50_window: Duration,
    /// 99th percentile window commit.
    pub p99_window: Duration,
    /// Slowest window commit.
    pub max_window: Duration,
    /// Mean µs per record of `mark_delivered` (0 when not delivering).
    pub deliver_per_record_us: f64,
}

/// Times `commit_window` for `windows` one-second windows of `workloads` records each (records built beforehand, not timed); with `deliver`, every exporter confirms each window at once (timed apart), as when exporters keep up.
pub fn commit_cost(
    path: &Path,
    workloads: usize,
    windows: usize,
    exporters: &[&str],
    deliver: bool,
) -> Result<CommitCost, LedgerError> {
    let mut ledger = Ledger::open(path, Duration::from_secs(7 * 86_400))?;
    let start: i64 = 1_767_225_600 * 1_000_000_000; // 2026-01-01T00:00:00Z
    let window_ns = 1_000_000_000;
    let mut times = Vec::with_capacity(windows);
    let mut records = 0u64;
    let mut delivering = Duration::ZERO;
    for k in 0..windows as i64 {
        let ws = start + k * window_ns;
        let batch = synthetic_window("node-1", workloads, ws, window_ns, 600 * window_ns);
        let (ws_s, we_s) = (time(ws)?, time(ws + window_ns)?);
        let t = Instant::now();
        ledger.commit_window(&ws_s, &we_s, &batch, exporters)?;
        times.push(t.elapsed());
        records += batch.len() as u64;
        if deliver {
            let ids: Vec<String> = batch.iter().map(|r| r.record_id.clone()).collect();
            let t = Instant::now();
            for e in exporters {
                ledger.mark_delivered(e, &ids)?;
            }
            delivering += t.elapsed();
        }
    }
    let total: Duration = times.iter().sum();
    times.sort();
    let pick = |q: f64| {
        times
            .get(((times.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    Ok(CommitCost {
        records,
        total,
        per_record_us: total.as_secs_f64() * 1e6 / records.max(1) as f64,
        p50_window: pick(0.5),
        p99_window: pick(0.99),
        max_window: times.last().copied().unwrap_or_default(),
        deliver_per_record_us: delivering.as_secs_f64() * 1e6 / records.max(1) as f64,
    })
}

/// One window's records for `workloads` workloads, deterministic in (workload, window start).
pub fn synthetic_window(
    node: &str,
    workloads: usize,
    window_start_ns: i64,
    window_ns: i64,
    run_length_ns: i64,
) -> Vec<UsageRecord> {
    let ws = format_ns(window_start_ns).unwrap_or_default();
    let we = format_ns(window_start_ns + window_ns).unwrap_or_default();
    (0..workloads)
        .map(|w| synthetic_record(node, w, &ws, &we, window_start_ns, window_ns, run_length_ns))
        .collect()
}

fn synthetic_record(
    node: &str,
    w: usize,
    ws: &str,
    we: &str,
    ws_ns: i64,
    window_ns: i64,
    run_length_ns: i64,
) -> UsageRecord {
    let mut rng = SplitMix(fnv(&[node.as_bytes(), &w.to_le_bytes(), &ws_ns.to_le_bytes()]) as u64);
    let pod_uid = uuid_like(fnv(&[b"pod", &w.to_le_bytes()]));
    let container_id = format!(
        "{:032x}{:032x}",
        fnv(&[b"c1", &w.to_le_bytes()]),
        fnv(&[b"c2", &w.to_le_bytes()])
    );
    let agent = w.is_multiple_of(2);
    let run = ws_ns.div_euclid(run_length_ns.max(1));
    let run_key = fnv(&[b"run", &w.to_le_bytes(), &run.to_le_bytes()]);
    let window_s = Decimal::new(window_ns, 9);

    let cpu_ns = rng.below(2 * window_ns as u64);
    let cpu_core_seconds = Decimal::new(cpu_ns as i64, 9);
    let rss = (64 << 20) + rng.below(4 << 30);
    // ∫ rss dt in GiB-seconds, divided as usage::decimal_gib_seconds does: 28 digits.
    let memory_gb_seconds = Decimal::from(rss)
        .checked_mul(window_s)
        .and_then(|v| v.checked_div(Decimal::from(1u64 << 30)))
        .unwrap_or_default();
    let gpu = w.is_multiple_of(10);
    let gpu_seconds = if gpu {
        Decimal::new(rng.below(window_ns as u64) as i64, 9)
    } else {
        Decimal::ZERO
    };
    let gpu_memory_gb_seconds = if gpu {
        Decimal::from(rng.below(40 << 30))
            .checked_mul(window_s)
            .and_then(|v| v.checked_div(Decimal::from(1u64 << 30)))
            .unwrap_or_default()
    } else {
        Decimal::ZERO
    };
    // A 300 W board, busy for gpu_seconds; derived, not drawn, so the random
    // sequence (and every other figure) stays what it was before energy.
    let gpu_energy_joules = gpu_seconds * Decimal::from(300);
    let network_rx_bytes = rng.below(10 << 20);
    let network_tx_bytes = rng.below(10 << 20);
    let storage_held = rng.below(20 << 30);
    let tokens = if agent && rng.below(5) == 0 {
        let input = rng.below(8_000);
        let output = rng.below(2_000);
        vec![TokenUsage {
            model: if w.is_multiple_of(4) {
                "claude-sonnet-4"
            } else {
                "gpt-4o"
            }
            .into(),
            input,
            cache_read_input: input / 2,
            output,
            reasoning_output: output / 3,
            ..TokenUsage::default()
        }]
    } else {
        Vec::new()
    };

    // Prices per unit of the book (USD): the divisions give 28-digit costs, as real ones do.
    let per = |q: Decimal, price: Decimal, unit: Decimal| {
        q.checked_mul(price)
            .and_then(|v| v.checked_div(unit))
            .unwrap_or_default()
    };
    let gib = Decimal::from(1u64 << 30);
    let cpu = per(cpu_core_seconds, Decimal::new(48, 3), Decimal::from(3600));
    let memory = per(memory_gb_seconds, Decimal::new(53, 4), Decimal::from(3600));
    let gpu_cost = per(gpu_seconds, Decimal::new(25, 1), Decimal::from(3600));
    let network = per(
        Decimal::from(network_rx_bytes + network_tx_bytes),
        Decimal::new(9, 2),
        gib,
    );
    let storage = per(
        Decimal::from(storage_held) * window_s,
        Decimal::new(10, 2),
        gib * Decimal::from(30 * 24 * 3600),
    );
    let token = tokens
        .iter()
        .map(|t| {
            per(
                Decimal::from(t.input),
                Decimal::new(3, 3),
                Decimal::from(1000),
            ) + per(
                Decimal::from(t.output),
                Decimal::new(15, 3),
                Decimal::from(1000),
            )
        })
        .sum::<Decimal>();
    let subtotal = cpu + memory + gpu_cost + network + storage + token;
    let discount = if w.is_multiple_of(5) {
        per(subtotal, Decimal::new(3, 0), Decimal::from(100))
    } else {
        Decimal::ZERO
    };

    UsageRecord {
        record_id: format!(
            "{:032x}",
            fnv(&[node.as_bytes(), b"process", &w.to_le_bytes(), ws.as_bytes()])
        ),
        node: node.into(),
        window_start: ws.into(),
        window_end: we.into(),
        record_kind: "process".into(),
        workload_kind: Some("container".into()),
        pid: Some(10_000 + w as u32),
        process_start_time: Some("2026-01-01T00:00:00.12Z".into()),
        ppid: Some(1),
        comm: Some(format!("worker-{w}")),
        exe: Some("/usr/local/bin/python3.12".into()),
        cgroup_id: Some(100_000 + w as u64),
        cgroup_path: Some(format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope",
            pod_uid.replace('-', "_")
        )),
        workload: crate::report::record::Workload {
            container_id: Some(container_id),
            container_runtime: Some("containerd".into()),
            pod_uid: Some(pod_uid),
            k8s_namespace: Some(format!("team-{}", w % 10)),
            k8s_pod_name: Some(format!("agent-{w}-7d9f8b6c5-x2x4k")),
            wasm_module: None,
        },
        context: crate::identity::run::RunContext {
            agent_id: agent.then(|| format!("agent-{}", w % 20)),
            flow_id: agent.then(|| format!("flow-{}", w % 50)),
            run_id: agent.then(|| uuid_like(run_key)),
            user_id: agent.then(|| format!("user-{}", w % 37)),
            project_id: agent.then(|| format!("project-{}", w % 11)),
            customer_id: (agent && !w.is_multiple_of(3)).then(|| format!("customer-{}", w % 5)),
            trace_id: agent.then(|| format!("{:032x}", fnv(&[b"trace", &run_key.to_le_bytes()]))),
        },
        cpu_core_seconds,
        memory_gb_seconds,
        gpu_seconds,
        gpu_memory_gb_seconds,
        gpu_energy_joules,
        gpu_attribution: gpu.then(|| "sampled".to_string()),
        network_rx_bytes,
        network_tx_bytes,
        disk_read_bytes: rng.below(50 << 20),
        disk_write_bytes: rng.below(50 << 20),
        storage_bytes: Some(storage_held),
        syscalls: rng.below(200_000),
        tokens,
        cost: Some(Cost {
            cpu,
            memory,
            gpu: gpu_cost,
            network,
            storage,
            token,
            subtotal,
            discount,
            total: subtotal - discount,
            currency: "USD".into(),
            pricing_version: "2026-01".into(),
        }),
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn time(ns: i64) -> Result<String, LedgerError> {
    format_ns(ns).ok_or_else(|| LedgerError::BadTime {
        what: "simulated time".into(),
        value: ns.to_string(),
        reason: "out of range".into(),
    })
}

/// 128-bit FNV-1a, as `usage::stable_id` builds record ids.
fn fnv(parts: &[&[u8]]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for part in parts {
        for &b in *part {
            h ^= u128::from(b);
            h = h.wrapping_mul(0x0000000001000000000000000000013B);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000000001000000000000000000013B);
    }
    h
}

fn uuid_like(h: u128) -> String {
    let s = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &s[..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..]
    )
}

/// SplitMix64: small, fast, deterministic.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}
