//! A process that sleeps is billed for its memory by one record per
//! `idle_interval`, not one per tick (issue 13), and those records add up to
//! its resident set × its lifetime.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, LedgerRecord, parse_time, rfc3339, truth_of, wait_until,
};
use mentat_tests::truth::HoldMemory;
use mentat_tests::workload_bin;
use time::OffsetDateTime;

const MIB: u64 = 1 << 20;

fn ns(t: &str) -> i128 {
    parse_time(t)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unix_timestamp_nanos()
}

#[test]
fn an_idle_process_is_billed_once_per_idle_interval_for_rss_times_lifetime() {
    const HELD_MIB: u64 = 128;
    const HOLD_MS: u64 = 8000;
    const IDLE_S: i128 = 2;
    const TICK_MS: i128 = 500;
    let dir = LedgerDir::new().expect("ledger dir");
    let options = DaemonOptions {
        extra_keys: Some("sample_interval = \"100ms\"\nidle_interval = \"2s\"\n".into()),
        env: vec![("MENTAT_TICK".into(), "500ms".into())],
        ..Default::default()
    };
    let daemon = Daemon::start(&dir, &options).expect("starting the daemon");
    let from = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(5));
    let mut child = Command::new(workload_bin().expect("workload"))
        .args([
            "hold-memory",
            "--mib",
            &HELD_MIB.to_string(),
            "--ms",
            &HOLD_MS.to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting hold-memory");
    let status = wait_until(&mut child, Instant::now() + Duration::from_secs(60))
        .expect("waiting for hold-memory")
        .expect("hold-memory ran over 60 s");
    assert!(status.success(), "hold-memory failed: {status}");
    let exited = OffsetDateTime::now_utc();
    let mut stdout = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().expect("stdout"), &mut stdout)
        .expect("reading hold-memory's truth");
    let truth: HoldMemory = truth_of(&stdout).expect("hold-memory's truth");
    let records = daemon
        .records_once_past(&from, exited, Duration::from_secs(30))
        .expect("records past the exit");
    let stopped = daemon.stop().expect("stopping the daemon");
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.describe());

    let mut mine: Vec<_> = records
        .iter()
        .filter(|r| r.record_kind == "process" && r.pid == Some(truth.pid))
        .collect();
    mine.sort_by_key(|r| ns(&r.window_start));
    let spans: Vec<(i128, i128)> = mine
        .iter()
        .map(|r| (ns(&r.window_start), ns(&r.window_end)))
        .collect();
    // Its records cover its life without a gap or an overlap.
    for pair in spans.windows(2) {
        assert_eq!(
            pair[0].1, pair[1].0,
            "records of pid {} not contiguous: {spans:?}",
            truth.pid
        );
    }
    // One record per tick would be ≥ 16 over the 8 s sleep; one per idle_interval
    // (2 s, a sweep at the first tick past it: 2–2.5 s) is ≤ 4 there, plus the
    // windows around its runs (start and touch, the window after, wake and exit:
    // about 5 on a loaded machine). At most two thirds of its ticks have a record,
    // and at least two records span a whole idle interval.
    let ticks = (spans.last().expect("a record").1 - spans[0].0) / (TICK_MS * 1_000_000);
    assert!(
        (mine.len() as i128) * 3 <= ticks * 2,
        "pid {} slept {HOLD_MS} ms over {ticks} ticks of {TICK_MS} ms and has {} records: {spans:?}",
        truth.pid,
        mine.len()
    );
    // A sweep reads this pid at the first close past its place in the sweep's
    // slices, so two reads are idle_interval apart give or take one tick (CI
    // once saw 1.99994 s): a record of at least idle_interval less one tick is
    // an idle interval's, and still three ticks long, which per-tick records
    // never are.
    let long = spans
        .iter()
        .filter(|(s, e)| e - s >= IDLE_S * 1_000_000_000 - TICK_MS * 1_000_000)
        .count();
    assert!(long >= 2, "no record spans an idle interval: {spans:?}");

    let gib_seconds = LedgerRecord::sum(&mine, "memory_gb_seconds").to_f64();
    assert_eq!(truth.mib, HELD_MIB, "MiB the workload held");
    let (touch_s, hold_s) = truth.touch_and_hold_s();
    let expected = truth.expected_gib_seconds();
    // 5 %: over an 8 s hold the 100 ms sampling of the touch and of the exit (at most
    // one interval each, 0.1 s × 0.125 GiB = 0.0125 GiB·s, 1.2 % of ~1 GiB·s each) is
    // small; what is left catches a lost or doubled idle interval (2 s: 25 %), an
    // interval carried at the wrong RSS, or a gap between records.
    assert!(
        (gib_seconds - expected).abs() <= 0.05 * expected,
        "pid {} held {HELD_MIB} MiB for {hold_s:.3} s (touch {touch_s:.3} s, base {:.1} MiB): \
         {expected:.4} GiB·s; the records say {gib_seconds:.4} ({:+.1} %): {spans:?}",
        truth.pid,
        truth.base_rss_bytes as f64 / MIB as f64,
        (gib_seconds - expected) / expected * 100.0
    );
    println!(
        "idle memory: {} records over {ticks} ticks, {gib_seconds:.4} GiB·s of {expected:.4} expected",
        mine.len()
    );
}
