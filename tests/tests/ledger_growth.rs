//! Ledger growth: 24 h of one-minute windows for 1,000 workloads (1.44 M records),
//! committed through the ledger's own API (`ledger::sim`, the records a real node
//! would write: container identities, trace context on half the workloads, 28-digit
//! decimals), with one hour of raw retention and compaction every hour, stays within a
//! disk budget derived below; and the hourly rollups keep totals exact.
//!
//! No root or eBPF needed: this drives the library, not the daemon.

use std::time::{Duration, Instant};

use mentat_agent::ledger::Ledger;
use mentat_agent::ledger::sim::{GrowthConfig, simulate_growth, synthetic_window};
use mentat_tests::exact::Exact;
use rust_decimal::Decimal;

const WORKLOADS: u64 = 1_000;
const HOURS: u64 = 24;
const WINDOW_S: u64 = 60;
/// Trace context (run_id, trace_id) changes every 10 minutes on the half of the
/// workloads that are agents: each run is a new identity and its own rollup rows.
const RUN_S: u64 = 600;
/// 2026-01-01T00:00:00Z: windows and runs line up with hours.
const T0: i64 = 1_767_225_600;

/// Per-row sizes, from the ledger's module docs and its own unit tests
/// (agent/src/ledger/mod.rs, agent/src/ledger/tests.rs: measured values in brackets):
/// - a raw record ≤ 400 B [~270 B: 14 compact decimals, 10 integers, its keys, the
///   identity by reference];
/// - an hourly rollup row ≤ 512 B [~360 B: 14 exact sums as text, 10 integers, (hour,
///   identity, currency) and its unique-index entry]; a model rollup row
///   (`hourly_models`) the same plus 7 token-type integers and the model's name;
/// - an identity ≤ 768 B [~560 B: 23 columns, 511 B of ids and names in these
///   records, and its hash-index entry];
/// - 17 pages of fixed cost (header, schema, a root page per table and index).
const RAW_B: u64 = 400;
const ROLLUP_B: u64 = 512;
const IDENTITY_B: u64 = 768;
const FIXED_B: u64 = 17 * 4096;
/// The WAL: SQLite checkpoints it at 1,000 pages (4 MiB) and compaction folds 20,000
/// records (~5 MB of pages) per transaction, then truncates it; the -shm index is a
/// few pages. 16 MiB covers both with room.
const WAL_B: u64 = 16 << 20;

/// Live bytes → file bytes: compaction hands free pages back only once they exceed a
/// quarter of the file, so up to a quarter of it may be free pages (×4/3).
fn with_free_pages(live: u64) -> u64 {
    live * 4 / 3
}

fn exact(d: Decimal) -> Exact {
    Exact::from_decimal(d).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `got` (rounded once to a Decimal by the ledger) against the exact sum `want`:
/// equal to within half a unit in `got`'s last place.
fn assert_exact(what: &str, got: Decimal, want: Exact) {
    let diff = (exact(got).0 - want.0).abs();
    let half_ulp = 5 * 10i128.pow(28 - got.scale()) / 10;
    assert!(
        diff <= half_ulp,
        "{what}: the ledger says {got}, the records add up to {want} (off by {diff} × 10⁻²⁸)"
    );
}

#[test]
fn a_day_of_a_thousand_workloads_stays_within_its_disk_budget() {
    let dir = tempfile::Builder::new()
        .prefix("mentat-growth-")
        .tempdir()
        .expect("temp dir");
    let path = dir.path().join("ledger.db");
    let cfg = GrowthConfig {
        workloads: WORKLOADS as usize,
        window: Duration::from_secs(WINDOW_S),
        span: Duration::from_secs(HOURS * 3600),
        retention: Duration::from_secs(3600),
        compact_every: Duration::from_secs(3600),
        run_length: Duration::from_secs(RUN_S),
        start_unix_s: T0,
    };
    let t = Instant::now();
    let report = simulate_growth(&path, &cfg).expect("simulating 24 h");
    let took = t.elapsed();

    let windows_per_hour = 3600 / WINDOW_S;
    let records = HOURS * windows_per_hour * WORKLOADS;
    assert_eq!(report.records, records, "records committed");
    assert_eq!(
        report.compactions, HOURS,
        "one compaction per simulated hour"
    );
    assert_eq!(report.compacted.kept_undelivered, 0, "all were delivered");
    // Compaction at hour h rolls up what started before h − 1 h (raw retention): the
    // last, at 24 h, leaves hour 23 raw; hours 0..=22 are rolled up.
    let compacted_hours = HOURS - 1;
    assert_eq!(
        report.compacted.records_compacted,
        compacted_hours * windows_per_hour * WORKLOADS,
        "records folded into rollups"
    );

    // Rows, counted from the simulation's shape: 500 workloads without trace
    // context (one identity each, one rollup row an hour) and 500 agents with a new
    // run, so a new identity, every RUN_S.
    let plain = WORKLOADS / 2;
    let agents = WORKLOADS - plain;
    let runs_per_hour = 3600 / RUN_S;
    let identities = plain + agents * runs_per_hour * HOURS;
    let rollups_per_hour = plain + agents * runs_per_hour;
    // Plus, per agent identity and hour with tokens (each workload's are of one
    // model), one `hourly_models` row of the same size: the `model` group-by's parts.
    let final_rollups = compacted_hours * (rollups_per_hour + agents * runs_per_hour);
    // Peak: just before a compaction, two hours raw (the retained one and the one
    // since), the rollups and identities so far (at most the final counts).
    let peak_budget = with_free_pages(
        2 * windows_per_hour * WORKLOADS * RAW_B
            + final_rollups * ROLLUP_B
            + identities * IDENTITY_B
            + FIXED_B,
    ) + WAL_B;
    let final_budget = with_free_pages(
        windows_per_hour * WORKLOADS * RAW_B
            + final_rollups * ROLLUP_B
            + identities * IDENTITY_B
            + FIXED_B,
    ) + WAL_B;
    // For scale: the same records kept raw, at the measured ~270 B each.
    let uncompacted = records * 270;
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "ledger growth: {} records in {} windows, {took:?} ({:.1} µs/record committing); \
         peak {:.1} MB (budget {:.1} MB), final {:.1} MB (budget {:.1} MB); \
         {identities} identities, {final_rollups} rollup rows; raw it would be ~{:.0} MB",
        report.records,
        report.windows,
        report.commit_time.as_secs_f64() * 1e6 / report.records as f64,
        mb(report.peak_disk_bytes),
        mb(peak_budget),
        mb(report.final_disk_bytes),
        mb(final_budget),
        mb(uncompacted)
    );
    assert!(
        report.peak_disk_bytes <= peak_budget,
        "peak disk {} B > budget {peak_budget} B",
        report.peak_disk_bytes
    );
    assert!(
        report.final_disk_bytes <= final_budget,
        "final disk {} B > budget {final_budget} B",
        report.final_disk_bytes
    );

    // The rollups keep totals exact: a compacted hour (hour 5) summed by the ledger
    // equals the same records regenerated and summed exactly here.
    let ledger = Ledger::open(&path, Duration::from_secs(3600)).expect("reopening");
    let hour = 5;
    let from_ns = (T0 + hour * 3600) * 1_000_000_000;
    let rfc = |ns: i64| {
        time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
            .expect("time")
            .format(&time::format_description::well_known::Rfc3339)
            .expect("format")
    };
    let window_ns = (WINDOW_S * 1_000_000_000) as i64;
    let mut want = [Exact::ZERO; 4];
    let (mut rx, mut tokens_in) = (0u64, 0u64);
    for k in 0..windows_per_hour as i64 {
        for r in synthetic_window(
            "node-1",
            WORKLOADS as usize,
            from_ns + k * window_ns,
            window_ns,
            (RUN_S * 1_000_000_000) as i64,
        ) {
            let cost = r.cost.as_ref().map(|c| c.total).unwrap_or_default();
            for (slot, v) in want.iter_mut().zip([
                r.cpu_core_seconds,
                r.memory_gb_seconds,
                r.gpu_memory_gb_seconds,
                cost,
            ]) {
                *slot = slot.add(exact(v)).expect("sum");
            }
            rx += r.network_rx_bytes;
            tokens_in += r.tokens.iter().map(|t| t.input).sum::<u64>();
        }
    }
    let totals = ledger
        .totals(&rfc(from_ns), &rfc(from_ns + 3_600_000_000_000), &[], &[])
        .expect("totals of hour 5");
    let (_, t) = totals.first().expect("one row");
    assert_eq!(t.records, windows_per_hour * WORKLOADS, "records in hour 5");
    assert_exact("cpu_core_seconds", t.cpu_core_seconds, want[0]);
    assert_exact("memory_gb_seconds", t.memory_gb_seconds, want[1]);
    assert_exact("gpu_memory_gb_seconds", t.gpu_memory_gb_seconds, want[2]);
    assert_exact("cost.total", t.cost.total, want[3]);
    assert_eq!(t.network_rx_bytes, rx, "network_rx_bytes of hour 5");
    assert_eq!(t.tokens_input, tokens_in, "tokens_input of hour 5");

    // And the whole day, rollups and the raw hour together, still counts every record.
    let day = ledger
        .totals(
            &rfc(T0 * 1_000_000_000),
            &rfc((T0 + (HOURS * 3600) as i64) * 1_000_000_000),
            &[],
            &[],
        )
        .expect("totals of the day");
    assert_eq!(
        day.first().map(|(_, t)| t.records),
        Some(records),
        "records over the day"
    );
}
