use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, Stdio},
    str::FromStr,
};

use super::{
    identity::{identity_hash, identity_of},
    sim::*,
    times::{format_ns, now_ns, parse_time},
    *,
};
use crate::report::record::{Cost, TokenUsage, tests::full_record};

const DAY: Duration = Duration::from_secs(86_400);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "mentat-ledger-{name}-{}-{}",
            std::process::id(),
            now_ns()
        ));
        fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }

    fn db(&self) -> PathBuf {
        self.0.join("state").join("ledger.db")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A ledger keeping a day of raw records, in a fresh directory (removed when
/// the returned guard drops).
fn fresh(name: &str) -> (TempDir, Ledger) {
    let dir = TempDir::new(name);
    let ledger = Ledger::open(&dir.db(), DAY).expect("open");
    (dir, ledger)
}

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

fn t(s: i64) -> String {
    format_ns(s * 1_000_000_000).expect("time")
}

/// 2026-01-01T00:00:00Z, in seconds.
const T0: i64 = 1_767_225_600;

/// A plain record in window [ws, ws + 10 s).
fn rec(id: &str, ws: i64) -> UsageRecord {
    UsageRecord {
        record_id: id.into(),
        node: "n1".into(),
        window_start: t(ws),
        window_end: t(ws + 10),
        record_kind: "process".into(),
        ..UsageRecord::default()
    }
}

fn priced(mut r: UsageRecord, total: &str) -> UsageRecord {
    r.cost = Some(Cost {
        cpu: d(total),
        subtotal: d(total),
        total: d(total),
        currency: "USD".into(),
        pricing_version: "v1".into(),
        ..Cost::default()
    });
    r
}

fn all(ledger: &Ledger, from: i64, to: i64) -> Vec<UsageRecord> {
    let mut out = Vec::new();
    let mut after = None;
    loop {
        let page = ledger
            .records(&RecordQuery {
                from: t(from),
                to: t(to),
                filters: vec![],
                after: after.take(),
                limit: 500,
            })
            .expect("records");
        out.extend(page.records);
        match page.next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

fn total_of(ledger: &Ledger, from: i64, to: i64) -> Totals {
    let rows = ledger.totals(&t(from), &t(to), &[], &[]).expect("totals");
    assert!(rows.len() <= 1);
    rows.into_iter().next().map(|(_, t)| t).unwrap_or_default()
}

#[test]
fn round_trip_keeps_every_field_exactly() {
    let (_dir, mut ledger) = fresh("roundtrip");
    let full = full_record();
    let bare = UsageRecord {
        storage_bytes: None,
        cpu_core_seconds: d("0.10"),
        ..rec("bare", T0)
    };
    let n = ledger
        .commit_window(
            &full.window_start,
            &full.window_end,
            &[full.clone(), bare.clone()],
            &["otlp"],
        )
        .expect("commit");
    assert_eq!(n, 2);
    let got = all(&ledger, T0 - 10, T0 + 100);
    assert_eq!(got.len(), 2);
    let by_id = |id: &str| got.iter().find(|r| r.record_id == id).expect(id).clone();
    for (want, have) in [
        (full, by_id("0123456789abcdef0123456789abcdef")),
        (bare, by_id("bare")),
    ] {
        assert_eq!(have, want);
        // PartialEq on Decimal ignores scale; the serialised form does not.
        assert_eq!(
            serde_json::to_string(&have).expect("json"),
            serde_json::to_string(&want).expect("json")
        );
    }
    let pending = ledger.pending("otlp", 10).expect("pending");
    assert_eq!(pending.len(), 2);
    // Times are kept as instants and come back in canonical form.
    let shifted = UsageRecord {
        window_start: "2026-01-01T01:00:10.500+01:00".into(),
        window_end: "2026-01-01T00:00:20.000Z".into(),
        ..rec("shifted", 0)
    };
    ledger
        .commit_window(&t(T0 + 10), &t(T0 + 20), &[shifted], &[])
        .expect("commit");
    let back = ledger
        .records(&RecordQuery {
            from: t(T0 + 10),
            to: t(T0 + 11),
            filters: vec![],
            after: None,
            limit: 10,
        })
        .expect("records");
    assert_eq!(back.records[0].window_start, "2026-01-01T00:00:10.5Z");
    assert_eq!(back.records[0].window_end, "2026-01-01T00:00:20Z");
    assert_eq!(
        serde_json::to_string(&pending).expect("json"),
        serde_json::to_string(&got).expect("json")
    );
}

#[test]
fn recommitting_a_window_writes_and_enqueues_nothing_new() {
    let (_dir, mut ledger) = fresh("idem");
    let batch: Vec<_> = (0..50)
        .map(|i| priced(rec(&format!("r{i}"), T0), "0.1"))
        .collect();
    assert_eq!(
        ledger
            .commit_window(&t(T0), &t(T0 + 10), &batch, &["a"])
            .expect("1st"),
        50
    );
    assert_eq!(
        ledger
            .commit_window(&t(T0), &t(T0 + 10), &batch, &["a"])
            .expect("2nd"),
        0
    );
    assert_eq!(ledger.pending("a", 1000).expect("pending").len(), 50);
    // Delivered, then retried: still not enqueued again.
    let ids: Vec<String> = batch.iter().map(|r| r.record_id.clone()).collect();
    ledger.mark_delivered("a", &ids).expect("mark");
    assert_eq!(
        ledger
            .commit_window(&t(T0), &t(T0 + 10), &batch, &["a"])
            .expect("3rd"),
        0
    );
    assert!(ledger.pending("a", 1000).expect("pending").is_empty());
    // Duplicates within one call count once.
    let dup = vec![rec("x", T0 + 10), rec("x", T0 + 10)];
    assert_eq!(
        ledger
            .commit_window(&t(T0 + 10), &t(T0 + 20), &dup, &["a"])
            .expect("dup"),
        1
    );
    assert_eq!(all(&ledger, T0, T0 + 100).len(), 51);
    let totals = total_of(&ledger, T0, T0 + 100);
    assert_eq!(totals.records, 51);
    assert_eq!(totals.cost.total, d("5"));
    assert_eq!(
        ledger.month_to_date("x", &t(T0 + 100)).expect("mtd"),
        Decimal::ZERO
    );
}

#[test]
fn outboxes_are_independent_per_exporter() {
    let (_dir, mut ledger) = fresh("outbox");
    for w in 0..3 {
        let ws = T0 + 10 * w;
        let batch: Vec<_> = (0..4).map(|i| rec(&format!("w{w}-r{i}"), ws)).collect();
        ledger
            .commit_window(&t(ws), &t(ws + 10), &batch, &["otlp", "billing"])
            .expect("commit");
    }
    let ids = |v: Vec<UsageRecord>| v.into_iter().map(|r| r.record_id).collect::<Vec<_>>();
    let first = ids(ledger.pending("otlp", 5).expect("pending"));
    assert_eq!(
        first,
        ["w0-r0", "w0-r1", "w0-r2", "w0-r3", "w1-r0"],
        "oldest first"
    );
    ledger.mark_delivered("otlp", &first).expect("mark");
    assert_eq!(ledger.pending("otlp", 100).expect("pending").len(), 7);
    assert_eq!(ledger.pending("billing", 100).expect("pending").len(), 12);
    assert!(ledger.pending("nobody", 100).expect("pending").is_empty());
    // Marking for one exporter, or twice, or unknown ids, does not touch the other.
    ledger
        .mark_delivered("billing", &["w2-r3".into(), "nope".into()])
        .expect("mark");
    ledger
        .mark_delivered("billing", &["w2-r3".into()])
        .expect("again");
    assert_eq!(ledger.pending("billing", 100).expect("pending").len(), 11);
    assert_eq!(ledger.pending("otlp", 100).expect("pending").len(), 7);
    assert!(matches!(
        ledger.commit_window(&t(T0), &t(T0 + 10), &[], &[""]),
        Err(LedgerError::EmptyExporter)
    ));
    // Without exporters, records are stored and owed to no one.
    ledger
        .commit_window(&t(T0 + 30), &t(T0 + 40), &[rec("quiet", T0 + 30)], &[])
        .expect("commit");
    assert_eq!(ledger.pending("otlp", 100).expect("pending").len(), 7);
}

/// The child half of the crash test: commits windows until killed.
const CHILD_ENV: &str = "TEST_LEDGER_CRASH_CHILD";
const CHILD_RECORDS: usize = 50;

#[test]
fn crash_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let mut ledger = Ledger::open(Path::new(&path), DAY).expect("open");
    for w in 0.. {
        let ws = T0 + w;
        let batch: Vec<_> = (0..CHILD_RECORDS)
            .map(|i| priced(rec(&format!("w{w}-r{i}"), ws), "0.001"))
            .collect();
        ledger
            .commit_window(&t(ws), &t(ws + 1), &batch, &["otlp"])
            .expect("commit");
        println!("committed {}", t(ws + 1));
    }
}

#[test]
fn sigkill_right_after_commit_loses_nothing() {
    let dir = TempDir::new("crash");
    let db = dir.db();
    // This module's path without the crate: how the test harness names tests.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            &format!("{module}::crash_child"),
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let mut last_seen = None;
    let mut seen = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if let Some(end) = line.strip_prefix("committed ") {
            last_seen = Some(end.to_string());
            seen += 1;
            if seen == 20 {
                // SIGKILL, while the child is inside its next commit_window.
                child.kill().expect("kill");
                break;
            }
        }
    }
    child.wait().expect("wait");
    let last_seen = last_seen.expect("child committed");

    let ledger = Ledger::open(&db, DAY).expect("reopen");
    let end = ledger
        .last_window_end()
        .expect("last")
        .expect("some window");
    let end_ns = parse_time("end", &end).expect("time");
    assert!(end_ns >= parse_time("seen", &last_seen).expect("time"));
    // Every window there is whole: the one in flight is all or nothing.
    let windows = usize::try_from((end_ns / 1_000_000_000) - T0).expect("windows");
    assert!(windows >= 20);
    let records = all(&ledger, T0, T0 + 10_000);
    assert_eq!(records.len(), windows * CHILD_RECORDS);
    let ids: HashSet<_> = records.iter().map(|r| r.record_id.as_str()).collect();
    assert_eq!(ids.len(), records.len());
    assert_eq!(
        ledger.pending("otlp", 1_000_000).expect("pending").len(),
        records.len()
    );
    let mtd = ledger.month_to_date("", &t(T0 + 100_000)).expect("mtd");
    assert_eq!(mtd, Decimal::ZERO, "records have no party");
}

/// A second `Ledger::open` in a process that has the ledger open (the alert
/// engine's) must keep the first one's locks: otherwise another process's
/// connection, closing, takes itself for the last one and deletes the WAL
/// under the agent, and new readers fail with "disk I/O error".
#[test]
fn a_second_open_keeps_the_wal_when_another_process_closes_the_ledger() {
    let (dir, mut ledger) = fresh("locks");
    let db = dir.db();
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[rec("a", T0)], &[])
        .expect("commit");
    let _second = Ledger::open(&db, DAY).expect("a second connection in this process");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys\n\
             c = sqlite3.connect(sys.argv[1])\n\
             c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchall()\n\
             c.close()",
        ])
        .arg(&db)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    assert!(
        PathBuf::from(wal).exists(),
        "another process deleted the WAL: it took itself for the last connection"
    );
    ledger
        .commit_window(&t(T0 + 10), &t(T0 + 20), &[rec("b", T0 + 10)], &[])
        .expect("commit after");
    let reader = Ledger::open_read_only(&db).expect("a new reader");
    assert_eq!(all(&reader, T0, T0 + 20).len(), 2);
}

#[test]
fn dropping_without_close_keeps_the_window() {
    let (dir, mut ledger) = fresh("forget");
    assert_eq!(ledger.last_window_end().expect("last"), None);
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[rec("a", T0)], &["otlp"])
        .expect("commit");
    // No close, no checkpoint: the window lives only in the WAL.
    std::mem::forget(ledger);
    let ledger = Ledger::open(&dir.db(), DAY).expect("reopen");
    assert_eq!(ledger.last_window_end().expect("last"), Some(t(T0 + 10)));
    assert_eq!(ledger.pending("otlp", 10).expect("pending").len(), 1);
}

#[test]
fn paging_returns_each_record_exactly_once_in_time_order() {
    let (_dir, mut ledger) = fresh("paging");
    let mut expected = Vec::new();
    // Sub-second window starts: as text "…:00Z" sorts after "…:00.5Z".
    for w in 0..20i64 {
        let ws_ns = (T0 + w / 2) * 1_000_000_000 + (w % 2) * 500_000_000;
        let ws = format_ns(ws_ns).expect("time");
        let we = format_ns(ws_ns + 500_000_000).expect("time");
        let batch: Vec<_> = (0..50)
            .map(|i| UsageRecord {
                window_start: ws.clone(),
                window_end: we.clone(),
                context: crate::identity::run::RunContext {
                    user_id: (i % 3 != 0).then(|| format!("u{}", i % 2)),
                    ..Default::default()
                },
                ..rec(&format!("{:04}-{w}", 49 - i), 0)
            })
            .collect();
        expected.extend(batch.iter().map(|r| (ws_ns, r.record_id.clone())));
        ledger.commit_window(&ws, &we, &batch, &[]).expect("commit");
    }
    expected.sort();
    let mut got = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let page = ledger
            .records(&RecordQuery {
                from: t(T0),
                to: t(T0 + 10),
                filters: vec![],
                after: after.take(),
                limit: 37,
            })
            .expect("page");
        pages += 1;
        got.extend(page.records.iter().map(|r| {
            (
                parse_time("ws", &r.window_start).expect("t"),
                r.record_id.clone(),
            )
        }));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    assert_eq!(got.len(), 1000);
    assert_eq!(
        got, expected,
        "each once, ordered by (window_start, record_id)"
    );
    assert_eq!(pages, 1000usize.div_ceil(37));

    // With a filter, paging still covers exactly the matching records.
    let mut n = 0;
    let mut after = None;
    loop {
        let page = ledger
            .records(&RecordQuery {
                from: t(T0),
                to: t(T0 + 10),
                filters: vec![("user_id".into(), "u1".into())],
                after: after.take(),
                limit: 100,
            })
            .expect("page");
        assert!(
            page.records
                .iter()
                .all(|r| r.context.user_id.as_deref() == Some("u1"))
        );
        n += page.records.len();
        match page.next {
            Some(c) => after = Some(c),
            None => break,
        }
    }
    let u1 = (0..50).filter(|i| i % 3 != 0 && i % 2 == 1).count();
    assert_eq!(n, 20 * u1);
    // [from, to) is by window start: the half-open bound excludes T0 + 5.
    let half = ledger
        .records(&RecordQuery {
            from: t(T0),
            to: t(T0 + 5),
            filters: vec![],
            after: None,
            limit: 10_000,
        })
        .expect("page");
    assert_eq!(half.records.len(), 500);
    assert!(half.next.is_none());
}

#[test]
fn totals_group_with_nulls_and_stay_exact() {
    let (_dir, mut ledger) = fresh("totals");
    let mut batch = Vec::new();
    for i in 0..3000 {
        let mut r = priced(rec(&format!("r{i}"), T0), "0.1");
        r.cpu_core_seconds = d("0.1");
        r.network_rx_bytes = 3;
        r.tokens = vec![TokenUsage {
            model: "m".into(),
            input: 2,
            cache_read_input: 1,
            output: 1,
            reasoning_output: 0,
            ..TokenUsage::default()
        }];
        r.context.user_id = match i % 3 {
            0 => None,
            1 => Some("alice".into()),
            _ => Some("bob".into()),
        };
        r.context.project_id = (i % 2 == 0).then(|| "p1".into());
        batch.push(r);
    }
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &batch, &[])
        .expect("commit");
    let total = total_of(&ledger, T0, T0 + 10);
    assert_eq!(total.records, 3000);
    assert_eq!(total.priced_records, 3000);
    assert_eq!(total.cost.total, Decimal::from(300), "3000 × 0.1 exactly");
    assert_eq!(total.cpu_core_seconds, Decimal::from(300));
    assert_eq!(total.network_rx_bytes, 9000);
    assert_eq!(total.tokens_input, 6000);
    assert_eq!(total.tokens_cache_read_input, 3000);
    assert_eq!(total.currency.as_deref(), Some("USD"));

    let rows = ledger
        .totals(&t(T0), &t(T0 + 10), &["user_id", "project_id"], &[])
        .expect("grouped");
    let keys: Vec<_> = rows.iter().map(|(k, _)| k.clone()).collect();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        keys,
        vec![
            vec![None, None],
            vec![None, s("p1")],
            vec![s("alice"), None],
            vec![s("alice"), s("p1")],
            vec![s("bob"), None],
            vec![s("bob"), s("p1")],
        ]
    );
    for (_, t) in &rows {
        assert_eq!(t.records, 500);
        assert_eq!(t.cost.total, Decimal::from(50));
    }
    // Children sum to the parent exactly.
    let sum: Decimal = rows.iter().map(|(_, t)| t.cost.total).sum();
    assert_eq!(sum, total.cost.total);

    // Filters narrow; integer fields take integer values.
    let bob = ledger
        .totals(
            &t(T0),
            &t(T0 + 10),
            &[],
            &[("user_id".into(), "bob".into())],
        )
        .expect("filtered");
    assert_eq!(bob[0].1.records, 1000);
    let none = ledger
        .totals(&t(T0), &t(T0 + 10), &["pid"], &[("pid".into(), "7".into())])
        .expect("filtered");
    assert!(none.is_empty());
}

#[test]
fn totals_refuse_mixed_currencies_in_one_group() {
    let (_dir, mut ledger) = fresh("currency");
    let usd = priced(rec("a", T0), "1");
    let mut eur = priced(rec("b", T0), "1");
    if let Some(c) = eur.cost.as_mut() {
        c.currency = "EUR".into();
    }
    eur.context.user_id = Some("eu".into());
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[usd, eur], &[])
        .expect("commit");
    let err = ledger
        .totals(&t(T0), &t(T0 + 10), &[], &[])
        .expect_err("mixed");
    assert!(matches!(err, LedgerError::MixedCurrency { .. }), "{err}");
    let split = ledger
        .totals(&t(T0), &t(T0 + 10), &["user_id"], &[])
        .expect("per user is fine");
    assert_eq!(split.len(), 2);
}

#[test]
fn unknown_fields_are_refused_by_name() {
    let (_dir, ledger) = fresh("fields");
    let err = ledger
        .totals(&t(T0), &t(T0 + 1), &["user_id", "colour"], &[])
        .expect_err("group");
    assert!(err.to_string().contains("\"colour\""), "{err}");
    let err = ledger
        .totals(
            &t(T0),
            &t(T0 + 1),
            &[],
            &[("user_id; DROP TABLE records".into(), "x".into())],
        )
        .expect_err("filter");
    assert!(matches!(&err, LedgerError::UnknownField { field } if field.starts_with("user_id;")));
    let q = |filters: Vec<(String, String)>, limit| RecordQuery {
        from: t(T0),
        to: t(T0 + 1),
        filters,
        after: None,
        limit,
    };
    let err = ledger
        .records(&q(vec![("cost".into(), "1".into())], 10))
        .expect_err("records");
    assert!(matches!(&err, LedgerError::UnknownField { field } if field == "cost"));
    let err = ledger
        .records(&q(vec![("pid".into(), "-1".into())], 10))
        .expect_err("pid");
    assert!(matches!(&err, LedgerError::BadFieldValue { field, .. } if field == "pid"));
    assert!(matches!(
        ledger.records(&q(vec![], 0)),
        Err(LedgerError::ZeroLimit)
    ));
    let err = ledger
        .totals("yesterday", &t(T0), &[], &[])
        .expect_err("time");
    assert!(
        matches!(&err, LedgerError::BadTime { what, .. } if what == "from"),
        "{err}"
    );
}

#[test]
fn compaction_keeps_totals_exact_and_undelivered_records() {
    let dir = TempDir::new("compact");
    let mut ledger = Ledger::open(&dir.db(), Duration::from_secs(3600)).expect("open");
    // Three hours of 10 s windows, 12 workloads, 28-digit costs.
    let mut all_ids = Vec::new();
    for w in 0..(3 * 360) {
        let ws = T0 + 10 * w;
        let batch = synthetic_window(
            "n1",
            12,
            ws * 1_000_000_000,
            10_000_000_000,
            1_200_000_000_000,
        );
        all_ids.extend(batch.iter().map(|r| r.record_id.clone()));
        ledger
            .commit_window(&t(ws), &t(ws + 10), &batch, &["otlp"])
            .expect("commit");
    }
    // Deliver all but one record in the first hour.
    let (kept_id, delivered) = all_ids.split_first().expect("ids");
    ledger.mark_delivered("otlp", delivered).expect("mark");
    let groupings: [&[&str]; 4] = [
        &[],
        &["user_id", "project_id"],
        &["pid"],
        &["run_id", "customer_id"],
    ];
    let before: Vec<_> = groupings
        .iter()
        .map(|g| {
            ledger
                .totals(&t(T0), &t(T0 + 3 * 3600), g, &[])
                .expect("totals")
        })
        .collect();
    let filtered = ledger
        .totals(
            &t(T0),
            &t(T0 + 3 * 3600),
            &[],
            &[("customer_id".into(), "customer-2".into())],
        )
        .expect("totals");
    let per_hour: Vec<_> = (0..3)
        .map(|h| total_of(&ledger, T0 + h * 3600, T0 + (h + 1) * 3600))
        .collect();
    let raw_bytes = ledger.disk_bytes().expect("bytes");

    // now = T0 + 3h + 30 min, retention 1 h: hours 0 and 1 are compacted.
    let stats = ledger.compact(&t(T0 + 3 * 3600 + 1800)).expect("compact");
    assert_eq!(stats.records_compacted, 2 * 360 * 12 - 1);
    assert_eq!(stats.kept_undelivered, 1);
    assert!(stats.rollup_rows >= 24, "{stats:?}");
    for (g, want) in groupings.iter().zip(&before) {
        let got = ledger
            .totals(&t(T0), &t(T0 + 3 * 3600), g, &[])
            .expect("totals");
        assert_eq!(&got, want, "group by {g:?}");
    }
    let got = ledger
        .totals(
            &t(T0),
            &t(T0 + 3 * 3600),
            &[],
            &[("customer_id".into(), "customer-2".into())],
        )
        .expect("totals");
    assert_eq!(got, filtered);
    for h in 0..3 {
        assert_eq!(
            total_of(&ledger, T0 + h * 3600, T0 + (h + 1) * 3600),
            per_hour[h as usize]
        );
    }
    // Only the undelivered record and the last hour are still raw.
    let raw = all(&ledger, T0, T0 + 3 * 3600);
    assert_eq!(raw.len(), 1 + 360 * 12);
    assert_eq!(raw[0].record_id, *kept_id);
    assert_eq!(ledger.pending("otlp", 10).expect("pending").len(), 1);
    assert!(ledger.disk_bytes().expect("bytes") < raw_bytes);
    // The resume point survives pruning of old windows.
    assert_eq!(
        ledger.last_window_end().expect("last"),
        Some(t(T0 + 3 * 3600))
    );

    // Recommitting a compacted window is refused, not double counted.
    let old = synthetic_window(
        "n1",
        12,
        (T0 + 3000) * 1_000_000_000,
        10_000_000_000,
        1_200_000_000_000,
    );
    let err = ledger
        .commit_window(&t(T0 + 3000), &t(T0 + 3010), &old, &["otlp"])
        .expect_err("compacted");
    assert!(matches!(err, LedgerError::Compacted { .. }), "{err}");
    // …but the kept record is still there, so its retry is a no-op.
    let first = synthetic_window(
        "n1",
        1,
        T0 * 1_000_000_000,
        10_000_000_000,
        1_200_000_000_000,
    );
    assert_eq!(
        ledger
            .commit_window(&t(T0), &t(T0 + 10), &first, &["otlp"])
            .expect("retry"),
        0
    );

    // Once delivered, the straggler is folded into its existing rollup row.
    ledger
        .mark_delivered("otlp", std::slice::from_ref(kept_id))
        .expect("mark");
    let again = ledger.compact(&t(T0 + 3 * 3600 + 1800)).expect("compact");
    assert_eq!(
        (
            again.records_compacted,
            again.kept_undelivered,
            again.rollup_rows
        ),
        (1, 0, 1)
    );
    for (g, want) in groupings.iter().zip(&before) {
        let got = ledger
            .totals(&t(T0), &t(T0 + 3 * 3600), g, &[])
            .expect("totals");
        assert_eq!(&got, want, "group by {g:?}");
    }
    // Nothing left to do.
    let idle = ledger.compact(&t(T0 + 3 * 3600 + 1800)).expect("compact");
    assert_eq!(idle, CompactStats::default());
}

#[test]
fn rollup_totals_equal_raw_totals_to_the_last_digit() {
    // Values whose Decimal sum depends on the order of addition.
    let dir = TempDir::new("digits");
    let mut ledger = Ledger::open(&dir.db(), Duration::ZERO).expect("open");
    let mut exact_sum = Exact::ZERO;
    for w in 0..40 {
        let ws = T0 + 90 * w;
        let batch: Vec<_> = (0..25)
            .map(|i| {
                let v = if (w + i) % 2 == 0 {
                    d("8.000000000000000000000000001")
                } else {
                    d("0.0000000000000000000000000004")
                };
                exact_sum = exact_sum.checked_add(Exact::from_decimal(v)).expect("sum");
                let mut r = priced(rec(&format!("{w}-{i}"), ws), "0");
                r.memory_gb_seconds = v;
                if let Some(c) = r.cost.as_mut() {
                    c.total = v;
                }
                r
            })
            .collect();
        ledger
            .commit_window(&t(ws), &t(ws + 90), &batch, &[])
            .expect("commit");
    }
    let raw = total_of(&ledger, T0, T0 + 3600);
    assert_eq!(Some(raw.memory_gb_seconds), exact_sum.to_decimal());
    let stats = ledger.compact(&t(T0 + 7200)).expect("compact");
    assert_eq!(stats.records_compacted, 1000);
    let rolled = total_of(&ledger, T0, T0 + 3600);
    assert_eq!(rolled, raw);
    assert_eq!(
        rolled.memory_gb_seconds.to_string(),
        raw.memory_gb_seconds.to_string()
    );
    assert_eq!(
        ledger.month_to_date("", &t(T0 + 7200)).expect("mtd"),
        Decimal::ZERO
    );
}

#[test]
fn month_to_date_spans_raw_records_and_rollups() {
    let dir = TempDir::new("mtd");
    let mut ledger = Ledger::open(&dir.db(), Duration::from_secs(3600)).expect("open");
    // Dec 31 23:00 (last month), then Jan 1 00:00 .. 05:00, one record per 10 min.
    let start = T0 - 3600;
    let mut oracle: Vec<(i64, &str, Decimal)> = Vec::new();
    for k in 0..36 {
        let ws = start + 600 * k;
        let mut customer = priced(rec(&format!("c{k}"), ws), "0.3333333333333333333333333333");
        customer.context.customer_id = Some("acme".into());
        customer.context.user_id = Some("ann".into());
        let user = UsageRecord {
            context: crate::identity::run::RunContext {
                user_id: Some("acme".into()),
                ..Default::default()
            },
            ..priced(rec(&format!("u{k}"), ws), "0.25")
        };
        let other = UsageRecord {
            context: crate::identity::run::RunContext {
                customer_id: Some("globex".into()),
                user_id: Some("acme".into()),
                ..Default::default()
            },
            ..priced(rec(&format!("o{k}"), ws), "7")
        };
        oracle.push((ws, "acme", d("0.3333333333333333333333333333")));
        oracle.push((ws, "acme", d("0.25")));
        oracle.push((ws, "globex", d("7")));
        ledger
            .commit_window(&t(ws), &t(ws + 600), &[customer, user, other], &[])
            .expect("commit");
    }
    // Raw records count by window start; rolled-up ones by their hour's
    // start (bounds inside a compacted hour round up to the hour).
    let expect = |party: &str, before: i64, compacted_before: i64| -> Decimal {
        let mut sum = Exact::ZERO;
        for (ws, p, v) in &oracle {
            let at = if *ws < compacted_before {
                ws - ws.rem_euclid(3600)
            } else {
                *ws
            };
            if *p == party && *ws >= T0 && at < before {
                sum = sum.checked_add(Exact::from_decimal(*v)).expect("sum");
            }
        }
        sum.to_decimal().expect("decimal")
    };
    let check = |ledger: &Ledger, compacted_before: i64| {
        for before in [
            T0,
            T0 + 1,
            T0 + 1800,
            T0 + 3600,
            T0 + 4 * 3600 + 600,
            T0 + 10 * 3600,
        ] {
            for party in ["acme", "globex", "ann"] {
                assert_eq!(
                    ledger.month_to_date(party, &t(before)).expect("mtd"),
                    expect(party, before, compacted_before),
                    "{party} before {}",
                    t(before)
                );
            }
        }
    };
    check(&ledger, i64::MIN);
    assert_eq!(
        ledger
            .month_to_date("acme", &t(T0 + 2 * 3600))
            .expect("mtd"),
        d("6.9999999999999999999999999996")
    );
    // Last month's spend stays in last month.
    assert_eq!(
        ledger.month_to_date("globex", &t(T0 - 1)).expect("mtd"),
        d("42")
    );
    // Compact the hours before 04:00 (retention 1 h, now 05:30).
    let stats = ledger.compact(&t(T0 + 5 * 3600 + 1800)).expect("compact");
    assert_eq!(stats.records_compacted, 3 * 6 * 5);
    check(&ledger, T0 + 4 * 3600);
    assert_eq!(
        ledger.month_to_date("globex", &t(T0 - 1)).expect("mtd"),
        d("42")
    );
}

#[test]
fn growth_one_hour_of_ten_second_windows_stays_in_budget() {
    let dir = TempDir::new("growth");
    let cfg = GrowthConfig {
        workloads: 100,
        window: Duration::from_secs(10),
        span: Duration::from_secs(3600),
        retention: Duration::ZERO,
        compact_every: Duration::from_secs(7200),
        run_length: Duration::from_secs(600),
        start_unix_s: T0,
    };
    let report = simulate_growth(&dir.db(), &cfg).expect("simulate");
    assert_eq!(report.records, 36_000);
    let raw_bytes = report.peak_disk_bytes;
    let mut ledger = Ledger::open(&dir.db(), Duration::ZERO).expect("open");
    let stats = ledger.compact(&t(T0 + 3600)).expect("compact");
    assert_eq!(stats.records_compacted, 36_000);
    let after = ledger.disk_bytes().expect("bytes");
    // Rollup rows: 50 workloads without trace context (1 row each) + 50
    // agent workloads × 6 runs of 10 minutes = 350 in the hour.
    assert_eq!(stats.rollup_rows, 350);
    // Budget, from what a row holds (measured in brackets):
    // - a rollup row ≤ 512 B [~360 B]: 14 exact sums as text (~21 chars
    //   each), 10 integers, (hour, identity, currency), its unique-index entry;
    // - an identity ≤ 768 B [~560 B]: 23 columns (511 B of ids and names
    //   here: 64-hex container id, cgroup path, pod uid, trace context), its
    //   hash-index entry;
    // - a model rollup row (the model parts of an hour's token-bearing
    //   records, per identity and model) ≤ 512 B: the same sums plus 7
    //   token-type integers and the model's name;
    // - 17 pages of fixed cost: header, schema, one root page per table and
    //   index, the pointer map.
    // The margins cover B-tree pages being ~80% full.
    let identities: u64 = ledger
        .conn
        .query_row("SELECT COUNT(*) FROM identities", [], |r| r.get(0))
        .expect("count");
    assert_eq!(identities, 350, "one per workload and run");
    let model_rows: u64 = ledger
        .conn
        .query_row("SELECT COUNT(*) FROM hourly_models", [], |r| r.get(0))
        .expect("count");
    let budget = (stats.rollup_rows + model_rows) * 512 + identities * 768 + 17 * 4096;
    println!(
        "growth: {} records, raw {} B ({} B/record), compacted {} B ({model_rows} model rows), budget {} B",
        report.records,
        raw_bytes,
        raw_bytes / report.records,
        after,
        budget
    );
    assert!(
        after <= budget,
        "{after} B after compaction > budget {budget} B"
    );
    // Raw: ~270 B/record in the db (numbers as compact decimals, identity
    // by reference), plus the WAL between checkpoints.
    assert!(
        raw_bytes / report.records < 400,
        "raw {} B/record",
        raw_bytes / report.records
    );
}

#[test]
fn disk_use_levels_off_under_retention() {
    let dir = TempDir::new("plateau");
    let cfg = |span_h: u64, retention_h: u64| GrowthConfig {
        workloads: 20,
        window: Duration::from_secs(10),
        span: Duration::from_secs(span_h * 3600),
        retention: Duration::from_secs(retention_h * 3600),
        compact_every: Duration::from_secs(3600),
        run_length: Duration::from_secs(600),
        start_unix_s: T0,
    };
    // Two hours raw: what the ledger holds just before each compaction.
    let two_hours = simulate_growth(&dir.0.join("a.db"), &cfg(2, 24)).expect("simulate");
    let six_hours = simulate_growth(&dir.0.join("b.db"), &cfg(6, 1)).expect("simulate");
    assert_eq!(six_hours.compactions, 6);
    assert_eq!(six_hours.compacted.kept_undelivered, 0);
    assert!(
        six_hours.peak_disk_bytes < two_hours.peak_disk_bytes * 5 / 4,
        "peak {} B after 6 h vs {} B for 2 h raw",
        six_hours.peak_disk_bytes,
        two_hours.peak_disk_bytes
    );
}

#[test]
fn expiry_deletes_rollups_spans_and_identities_past_retention_only() {
    let dir = TempDir::new("expire");
    let mut ledger = Ledger::open(&dir.db(), Duration::from_secs(3600)).expect("open");
    let hour = 3600;
    // Hour 0 and hour 24, each one window of a workload of its own, plus a
    // workload in both; all delivered, so compaction rolls them up.
    let old_only = rec("old-only", T0);
    let mut both_old = rec("both-old", T0);
    both_old.pid = Some(4242);
    let mut new_only = rec("new-only", T0 + 24 * hour);
    new_only.pid = Some(7);
    let mut both_new = rec("both-new", T0 + 24 * hour);
    both_new.pid = Some(4242);
    both_new.process_start_time = both_old.process_start_time.clone();
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[old_only, both_old], &["otlp"])
        .expect("commit");
    ledger
        .commit_window(
            &t(T0 + 24 * hour),
            &t(T0 + 24 * hour + 10),
            &[new_only, both_new],
            &["otlp"],
        )
        .expect("commit");
    let span = |id: &str, end: i64| SpanRow {
        trace_id: "0af7651916cd43dd8448eb211c80319c".into(),
        span_id: id.into(),
        run_id: "r".into(),
        name: "s".into(),
        start_ns: (end - 1) * 1_000_000_000,
        end_ns: end * 1_000_000_000,
        ..SpanRow::default()
    };
    ledger
        .commit_spans(&[
            span("00f067aa0ba902b7", T0 + 10),
            span("00f067aa0ba902b8", T0 + 24 * hour + 10),
        ])
        .expect("spans");
    ledger
        .mark_delivered(
            "otlp",
            &[
                "old-only".into(),
                "both-old".into(),
                "new-only".into(),
                "both-new".into(),
            ],
        )
        .expect("mark");
    ledger.compact(&t(T0 + 26 * hour)).expect("compact");
    let old_total = total_of(&ledger, T0, T0 + hour);
    assert_eq!(
        old_total.records, 2,
        "both old records are in the rollup: {old_total:?}"
    );

    // Retention of 12 h at hour 26: hour 0 goes, hour 24 stays.
    let stats = ledger
        .expire(&t(T0 + 26 * hour), Duration::from_secs(12 * 3600))
        .expect("expire");
    assert_eq!(stats.spans, 1, "{stats:?}");
    assert!(stats.hourly_rows >= 2, "{stats:?}");
    // The old-only workload's identity goes; the one also seen at hour 24 stays.
    assert_eq!(stats.identities, 1, "{stats:?}");
    assert_eq!(total_of(&ledger, T0, T0 + hour).records, 0);
    let kept = total_of(&ledger, T0 + 24 * hour, T0 + 25 * hour);
    assert_eq!(kept.records, 2, "hour 24 is inside retention: {kept:?}");

    // The deleted identity comes back as a new row when it is seen again, and
    // a second expiry with nothing old deletes nothing.
    ledger
        .commit_window(
            &t(T0 + 25 * hour),
            &t(T0 + 25 * hour + 10),
            &[rec("old-only-again", T0 + 25 * hour)],
            &[],
        )
        .expect("commit after expiry");
    assert_eq!(
        all(&ledger, T0 + 25 * hour, T0 + 26 * hour).len(),
        1,
        "the record with a re-created identity is readable"
    );
    let again = ledger
        .expire(&t(T0 + 26 * hour), Duration::from_secs(12 * 3600))
        .expect("expire again");
    assert_eq!(again, ExpireStats::default());
}

#[test]
fn schema_constants_match_the_tables() {
    let (dir, ledger) = fresh("schema");
    let cols = |table: &str| -> Vec<String> {
        let mut stmt = ledger
            .conn
            .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))
            .expect("prepare");
        stmt.query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    let identities = cols("identities");
    assert_eq!(&identities[2..], FIELDS.as_slice());
    let records = cols("records");
    let hourly = cols("hourly");
    for c in DEC_COLS.iter().chain(INT_COLS.iter()) {
        assert!(records.iter().any(|r| r == c), "records lacks {c}");
        assert!(hourly.iter().any(|r| r == c), "hourly lacks {c}");
    }
    assert_eq!(
        (FIELDS[PID], FIELDS[PPID], FIELDS[CGROUP_ID]),
        ("pid", "ppid", "cgroup_id")
    );
    let pragma = |p: &str| -> String {
        ledger
            .conn
            .query_row(&format!("PRAGMA {p}"), [], |r| {
                r.get::<_, rusqlite::types::Value>(0)
            })
            .map(|v| format!("{v:?}"))
            .expect("pragma")
    };
    assert_eq!(pragma("journal_mode"), "Text(\"wal\")");
    assert_eq!(pragma("synchronous"), "Integer(2)", "FULL");
    assert_eq!(pragma("auto_vacuum"), "Integer(2)", "INCREMENTAL");
    assert_eq!(
        pragma("user_version"),
        format!("Integer({})", schema::MIGRATIONS.len())
    );
    drop(ledger);
    // Reopening migrates nothing; a newer file is refused.
    let ledger = Ledger::open(&dir.db(), DAY).expect("reopen");
    ledger
        .conn
        .pragma_update(None, "user_version", 99)
        .expect("bump");
    drop(ledger);
    let err = Ledger::open(&dir.db(), DAY).expect_err("newer");
    assert!(
        matches!(err, LedgerError::SchemaTooNew { found: 99, .. }),
        "{err}"
    );
}

#[test]
fn errors_name_the_path() {
    let dir = TempDir::new("errors");
    let file = dir.0.join("not-a-dir");
    fs::write(&file, b"x").expect("write");
    let err = Ledger::open(&file.join("ledger.db"), DAY).expect_err("parent is a file");
    assert!(err.to_string().contains("not-a-dir"), "{err}");
    let mut ledger = Ledger::open(&dir.db(), DAY).expect("open");
    let mut bad = rec("bad", T0);
    bad.window_start = "2026-13-01T00:00:00Z".into();
    let err = ledger
        .commit_window(&t(T0), &t(T0 + 10), &[bad], &[])
        .expect_err("bad time");
    assert!(err.to_string().contains("record bad window_start"), "{err}");
    let mut huge = rec("huge", T0);
    huge.syscalls = u64::MAX;
    let err = ledger
        .commit_window(&t(T0), &t(T0 + 10), &[huge], &[])
        .expect_err("out of range");
    assert!(
        matches!(&err, LedgerError::OutOfRange { record_id, field: "syscalls", .. } if record_id == "huge"),
        "{err}"
    );
    // Nothing of a failed commit remains.
    assert_eq!(ledger.last_window_end().expect("last"), None);
}

#[test]
fn identities_are_stored_once() {
    let (dir, mut ledger) = fresh("idents");
    for w in 0..10 {
        let ws = T0 + 10 * w;
        let batch = synthetic_window("n1", 20, ws * 1_000_000_000, 10_000_000_000, 60_000_000_000);
        ledger
            .commit_window(&t(ws), &t(ws + 10), &batch, &[])
            .expect("commit");
    }
    drop(ledger);
    // A reopened ledger (cold cache) finds them in the table.
    let mut ledger = Ledger::open(&dir.db(), DAY).expect("reopen");
    let ws = T0 + 100;
    let batch = synthetic_window("n1", 20, ws * 1_000_000_000, 10_000_000_000, 60_000_000_000);
    ledger
        .commit_window(&t(ws), &t(ws + 10), &batch, &[])
        .expect("commit");
    let n: i64 = ledger
        .conn
        .query_row("SELECT COUNT(*) FROM identities", [], |r| r.get(0))
        .expect("count");
    // 10 plain workloads + 10 agent workloads × 2 runs (runs last 60 s).
    assert_eq!(n, 10 + 10 * 2);
    let mut a = rec("a", T0);
    a.comm = Some("ab".into());
    a.exe = Some("c".into());
    let mut b = rec("b", T0);
    b.comm = Some("a".into());
    b.exe = Some("bc".into());
    assert_ne!(
        identity_hash(&identity_of(&a)),
        identity_hash(&identity_of(&b))
    );
}

#[test]
fn identities_of_exited_processes_leave_the_cache_within_two_turns() {
    let (_dir, mut ledger) = fresh("turns");
    let proc_rec = |pid: u32, ws: i64| {
        let mut r = rec(&format!("p{pid}-{ws}"), ws);
        r.pid = Some(pid);
        r
    };
    // A burst of 500 processes, then only pid 1 keeps running.
    let burst: Vec<UsageRecord> = (1..=500).map(|p| proc_rec(p, T0)).collect();
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &burst, &[])
        .expect("commit");
    assert_eq!(ledger.identities.len(), 500);
    ledger.identities.turn();
    let ws = T0 + 10;
    ledger
        .commit_window(&t(ws), &t(ws + 10), &[proc_rec(1, ws)], &[])
        .expect("commit");
    // Still cached, from the previous generation; pid 1 is in both.
    assert_eq!(ledger.identities.len(), 501);
    ledger.identities.turn();
    assert_eq!(ledger.identities.len(), 1, "only the running process stays");
    // pid 2 again: looked up in the table, not stored twice.
    let ws = T0 + 20;
    ledger
        .commit_window(&t(ws), &t(ws + 10), &[proc_rec(2, ws)], &[])
        .expect("commit");
    let n: i64 = ledger
        .conn
        .query_row("SELECT COUNT(*) FROM identities", [], |r| r.get(0))
        .expect("count");
    assert_eq!(n, 500, "one identity row per process, however often cached");
}

/// Release-mode write cost: `cargo test --release -- --ignored --nocapture commit_cost`.
#[test]
#[ignore = "benchmark"]
fn commit_cost_benchmark() {
    let dir = TempDir::new("bench");
    let cases: [(&str, &[&str], bool); 4] = [
        ("no exporter", &[], false),
        ("1 exporter keeping up", &["otlp"], true),
        ("2 exporters keeping up", &["otlp", "billing"], true),
        ("1 exporter down (backlog grows)", &["otlp"], false),
    ];
    for (i, (name, exporters, deliver)) in cases.into_iter().enumerate() {
        let c = commit_cost(
            &dir.0.join(format!("b{i}.db")),
            1000,
            300,
            exporters,
            deliver,
        )
        .expect("bench");
        println!(
            "commit_window, 300 windows × 1000 records, {name}: {:.2} µs/record \
             (window p50 {:?}, p99 {:?}, max {:?}); mark_delivered {:.2} µs/record",
            c.per_record_us, c.p50_window, c.p99_window, c.max_window, c.deliver_per_record_us
        );
    }
}

/// A record before the compaction watermark (a replayed backlog, a span
/// that started hours ago) used to fail its whole window, and the daemon
/// retried that window forever: billing stopped for the node. Now it is set
/// aside with its reason and the rest of the window, and the next, commit.
#[test]
fn a_record_before_the_watermark_is_quarantined_and_the_window_still_commits() {
    let dir = TempDir::new("quarantine");
    let mut ledger = Ledger::open(&dir.db(), Duration::from_secs(3600)).expect("open");
    // Three hours ago a window was committed and delivered; compacting at
    // T0 + 3 h raises the watermark to T0 + 2 h.
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[rec("old", T0)], &["otlp"])
        .expect("old window");
    ledger
        .mark_delivered("otlp", &["old".to_string()])
        .expect("deliver");
    let now = T0 + 3 * 3600;
    let stats = ledger.compact(&t(now)).expect("compact");
    assert_eq!(stats.records_compacted, 1);

    // A window now, whose token record claims a window three hours back.
    let ws = now;
    let good: Vec<UsageRecord> = (0..3)
        .map(|i| {
            let mut r = priced(
                rec(&format!("good{i}"), ws),
                &format!("0.00000000000000000000000{}", i + 1),
            );
            r.cpu_core_seconds = d(&format!("1.00000000{i}"));
            r.syscalls = 10 + i;
            r.context.customer_id = Some("c1".into());
            r
        })
        .collect();
    let mut bad = priced(rec("token-backlog", T0 + 60), "5");
    bad.record_kind = "token".into();
    bad.context.run_id = Some("run-7".into());
    bad.context.customer_id = Some("c1".into());
    bad.tokens = vec![TokenUsage {
        model: "m".into(),
        input: 1_000,
        ..TokenUsage::default()
    }];
    let mut window = good.clone();
    window.insert(1, bad.clone());
    // The strict commit refuses the window (what the daemon did before).
    let strict = ledger
        .commit_window(&t(ws), &t(ws + 10), &window, &["otlp"])
        .expect_err("strict commit");
    assert!(matches!(strict, LedgerError::Compacted { .. }), "{strict}");
    assert!(!strict.is_transient());

    let committed = ledger
        .commit_window_or_quarantine(&t(ws), &t(ws + 10), &window, &["otlp"])
        .expect("the window commits");
    assert_eq!(committed.new, 3);
    assert_eq!(committed.quarantined.len(), 1);
    assert_eq!(ledger.last_window_end().expect("last"), Some(t(ws + 10)));

    // The good records' totals are exactly theirs (nothing of the bad one).
    let totals = total_of(&ledger, ws, ws + 10);
    assert_eq!(totals.records, 3);
    assert_eq!(totals.cpu_core_seconds, d("3.000000003"));
    assert_eq!(totals.syscalls, 33);
    assert_eq!(totals.tokens_input, 0);
    assert_eq!(totals.cost.total, d("0.000000000000000000000006"));
    // Month-to-date spend has only the good ones.
    assert_eq!(
        ledger.month_to_date("c1", &t(ws + 10)).expect("mtd"),
        d("0.000000000000000000000006")
    );
    // The bad one is listed whole, with its reason, window and kind.
    let (listed, next) = ledger.quarantined(10, None).expect("list");
    assert_eq!(next, None);
    assert_eq!(listed.len(), 1);
    let q = &listed[0];
    assert_eq!(q.record_id, "token-backlog");
    assert_eq!(q.record_kind, "token");
    assert_eq!(q.run_id.as_deref(), Some("run-7"));
    assert_eq!(q.window_start, t(ws));
    assert!(q.reason.contains("compacted"), "{}", q.reason);
    let back: UsageRecord = serde_json::from_value(q.record.clone()).expect("whole record");
    assert_eq!(back, bad);
    assert_eq!(ledger.quarantine_count().expect("count"), 1);
    // Only the good ones wait for the exporter.
    let pending: Vec<String> = ledger
        .pending("otlp", 10)
        .expect("pending")
        .into_iter()
        .map(|r| r.record_id)
        .collect();
    assert_eq!(pending, ["good0", "good1", "good2"]);

    // Retrying the same window changes nothing; the next window commits.
    let again = ledger
        .commit_window_or_quarantine(&t(ws), &t(ws + 10), &window, &["otlp"])
        .expect("retry");
    assert_eq!(again.new, 0);
    assert_eq!(ledger.quarantine_count().expect("count"), 1);
    let next_window = [rec("next", ws + 10)];
    let c = ledger
        .commit_window_or_quarantine(&t(ws + 10), &t(ws + 20), &next_window, &["otlp"])
        .expect("next window");
    assert_eq!((c.new, c.quarantined.len()), (1, 0));
    assert_eq!(ledger.last_window_end().expect("last"), Some(t(ws + 20)));
}

/// A record refused after its new identity row was written must take that
/// row with it: a cached id of a rolled-back row would point later records
/// at nothing (or at someone else's identity).
#[test]
fn a_quarantined_record_leaves_no_identity_behind() {
    let (_dir, mut ledger) = fresh("quarantine-ident");
    let mut huge = rec("huge", T0);
    huge.pid = Some(4242);
    huge.comm = Some("only-me".into());
    huge.syscalls = u64::MAX;
    let fine = rec("fine", T0);
    let c = ledger
        .commit_window_or_quarantine(&t(T0), &t(T0 + 10), &[huge.clone(), fine], &[])
        .expect("commit");
    assert_eq!((c.new, c.quarantined.len()), (1, 1));
    assert!(
        c.quarantined[0].reason.contains("syscalls"),
        "{:?}",
        c.quarantined[0]
    );
    // The same identity, now with sane values, resolves to a real row.
    let mut sane = huge.clone();
    sane.record_id = "sane".into();
    sane.window_start = t(T0 + 10);
    sane.window_end = t(T0 + 20);
    sane.syscalls = 7;
    ledger
        .commit_window_or_quarantine(&t(T0 + 10), &t(T0 + 20), &[sane.clone()], &[])
        .expect("second window");
    let stored = all(&ledger, T0 + 10, T0 + 20);
    assert_eq!(stored, vec![sane]);
    let n: i64 = ledger
        .conn
        .query_row(
            "SELECT count(*) FROM identities WHERE comm = 'only-me'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(n, 1);
}

/// A window whose own bounds are not times cannot be stored at all: every
/// record is set aside, and nothing is retried.
#[test]
fn a_window_with_bad_bounds_is_quarantined_whole() {
    let (_dir, mut ledger) = fresh("quarantine-window");
    let c = ledger
        .commit_window_or_quarantine(
            "2262-05-01T00:00:00Z",
            &t(T0),
            &[rec("a", T0), rec("b", T0)],
            &[],
        )
        .expect("quarantined");
    assert_eq!((c.new, c.quarantined.len()), (0, 2));
    assert!(
        c.quarantined[0].reason.contains("1677..2262"),
        "{}",
        c.quarantined[0].reason
    );
    assert_eq!(ledger.quarantine_count().expect("count"), 2);
    assert_eq!(ledger.last_window_end().expect("last"), None);
}

#[test]
fn transient_and_permanent_errors_are_told_apart() {
    let full = LedgerError::Sqlite {
        path: "x".into(),
        what: "committing",
        source: Box::new(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        )),
    };
    assert!(full.is_transient());
    let io = LedgerError::Io {
        path: "x".into(),
        what: "syncing",
        source: io::Error::other("EIO"),
    };
    assert!(io.is_transient());
    let constraint = LedgerError::Record {
        path: "x".into(),
        record_id: "r".into(),
        what: "storing it",
        source: Box::new(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CONSTRAINT),
            None,
        )),
    };
    assert!(!constraint.is_transient());
    assert!(!overflow("x").is_transient());
}

/// The API reads on its own read-only connection: a write transaction in
/// progress does not block it, and a long read does not block a commit.
#[test]
fn read_only_connections_and_the_writer_do_not_wait_for_each_other() {
    let (dir, mut ledger) = fresh("readers");
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[rec("a", T0)], &[])
        .expect("commit");
    let reader = Ledger::open_read_only(&dir.db()).expect("reader");
    // A reader in the middle of a read (an open statement holds its snapshot).
    let mut stmt = reader
        .conn
        .prepare("SELECT record_id FROM records")
        .expect("prepare");
    let mut rows = stmt.query([]).expect("query");
    assert!(rows.next().expect("row").is_some());
    // The writer commits meanwhile, without waiting.
    ledger
        .commit_window(&t(T0 + 10), &t(T0 + 20), &[rec("b", T0 + 10)], &[])
        .expect("commit beside a reader");
    drop(rows);
    drop(stmt);
    // A writer holding its write lock does not stop a read.
    ledger
        .conn
        .execute_batch("BEGIN IMMEDIATE")
        .expect("take the write lock");
    assert_eq!(all(&reader, T0, T0 + 20).len(), 2);
    ledger.conn.execute_batch("ROLLBACK").expect("release");
    // It cannot write.
    let err = reader
        .conn
        .execute("DELETE FROM records", [])
        .expect_err("read-only");
    assert_eq!(err.sqlite_error_code(), Some(rusqlite::ErrorCode::ReadOnly));
}

#[test]
fn the_ledger_directory_and_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, mut ledger) = fresh("perms");
    ledger
        .commit_window(&t(T0), &t(T0 + 10), &[rec("a", T0)], &[])
        .expect("commit");
    let mode = |p: &std::path::Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    let parent = dir.db().parent().map(PathBuf::from).expect("parent");
    assert_eq!(mode(&parent), 0o700, "the directory the ledger created");
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", dir.db().display()));
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    drop(ledger);
    // A file left world-readable (an older agent) is tightened at open.
    fs::set_permissions(dir.db(), fs::Permissions::from_mode(0o644)).expect("chmod");
    let _ledger = Ledger::open(&dir.db(), DAY).expect("reopen");
    assert_eq!(mode(&dir.db()), 0o600);
}

/// Delivery and the exporter's running totals are one transaction: a
/// delivery that fails leaves the totals where they were.
#[test]
fn export_series_move_only_with_delivery() {
    let (_dir, mut ledger) = fresh("series");
    ledger
        .commit_window(
            &t(T0),
            &t(T0 + 10),
            &[rec("a", T0), rec("b", T0)],
            &["otlp"],
        )
        .expect("commit");
    let st = |v: &str, last: i64| SeriesState {
        start_ns: 5,
        value: d(v),
        last_ns: u64::try_from(last).expect("last"),
    };
    ledger
        .mark_delivered_with("otlp", &["a".to_string()], &[((1, 1), st("1.5", T0))], None)
        .expect("deliver a");
    let got = ledger
        .export_series("otlp", &[(1, 1), (1, 2)])
        .expect("series");
    assert_eq!(got.len(), 1);
    assert_eq!(got[&(1, 1)], st("1.5", T0));
    // A partial success: delivered, values kept, and listed as rejected.
    ledger
        .mark_delivered_with(
            "otlp",
            &["b".to_string()],
            &[((1, 1), st("2.5", T0 + 100))],
            Some("1 data point rejected: bad"),
        )
        .expect("deliver b");
    assert!(ledger.pending("otlp", 10).expect("pending").is_empty());
    let dead = ledger.dead_letters(10).expect("dead");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].record_id, "b");
    assert!(dead[0].reason.contains("rejected"));
    // Idle series are evicted; the rest stay.
    ledger
        .mark_delivered_with("otlp", &[], &[((1, 2), st("1", T0 + 500))], None)
        .expect("s2");
    let evicted = ledger
        .evict_export_series("otlp", u64::try_from(T0 + 200).expect("ns"))
        .expect("evict");
    assert_eq!(evicted, 1);
    assert_eq!(ledger.export_series_count("otlp").expect("count"), 1);
}

/// The quarantine and the dead letters are kept as long as the usage they
/// belong with, then expire: neither grows without bound.
#[test]
fn quarantined_records_and_dead_letters_expire_with_retention() {
    let (_dir, mut ledger) = fresh("quarantine-expiry");
    let mut huge = rec("huge", T0);
    huge.syscalls = u64::MAX;
    ledger
        .commit_window_or_quarantine(&t(T0), &t(T0 + 10), &[huge, rec("ok", T0)], &["otlp"])
        .expect("commit");
    ledger
        .dead_letter("otlp", &["ok".to_string()], "refused")
        .expect("dead letter");
    let now = now_ns() / 1_000_000_000;
    // Within retention: kept.
    let kept = ledger.expire(&t(now), 7 * DAY).expect("expire");
    assert_eq!((kept.quarantined, kept.dead_letters), (0, 0));
    assert_eq!(ledger.quarantine_count().expect("count"), 1);
    // A week later: gone.
    let gone = ledger
        .expire(&t(now + 8 * 86_400), 7 * DAY)
        .expect("expire");
    assert_eq!((gone.quarantined, gone.dead_letters), (1, 1));
    assert_eq!(ledger.quarantine_count().expect("count"), 0);
    assert!(ledger.dead_letters(10).expect("dead").is_empty());
}

/// Pricing picks the discount tier by `UsageRecord::billed_party`, which
/// takes an empty customer id as none; the ledger's spend must follow the
/// same rule, or the user behind an empty customer id never accrues spend
/// (and a shared "" party would pool every such tenant's spend).
#[test]
fn spend_is_kept_under_the_party_that_pricing_bills() {
    let dir = TempDir::new("party");
    let mut ledger = Ledger::open(&dir.db(), Duration::from_secs(3600)).expect("open");
    let empty_customer = UsageRecord {
        context: crate::identity::run::RunContext {
            customer_id: Some(String::new()),
            user_id: Some("alice".into()),
            ..Default::default()
        },
        ..priced(rec("r1", T0), "3")
    };
    let named = UsageRecord {
        context: crate::identity::run::RunContext {
            customer_id: Some("acme".into()),
            user_id: Some("bob".into()),
            ..Default::default()
        },
        ..priced(rec("r2", T0 + 10), "5")
    };
    assert_eq!(empty_customer.billed_party(), Some("alice"));
    ledger
        .commit_window(&t(T0), &t(T0 + 20), &[empty_customer, named], &[])
        .expect("commit");
    // Both the running sum and the part subtracted for windows at or after
    // `before` (here T0 + 10: the acme record) follow the one rule.
    for (party, before, want) in [
        ("alice", T0 + 20, "3"),
        ("acme", T0 + 20, "5"),
        ("", T0 + 20, "0"),
        ("bob", T0 + 20, "0"),
        ("alice", T0 + 10, "3"),
        ("acme", T0 + 10, "0"),
        ("alice", T0, "0"),
    ] {
        assert_eq!(
            ledger.month_to_date(party, &t(before)).expect("mtd"),
            d(want),
            "{party:?} before {}",
            t(before)
        );
    }
}

/// A token record of `agent` for `usages` (model, input, output, cost).
fn token_rec(id: &str, ws: i64, agent: &str, usages: &[(&str, u64, u64, &str)]) -> UsageRecord {
    let mut r = priced(rec(id, ws), "0");
    r.record_kind = "tokens".into();
    r.context.agent_id = Some(agent.into());
    r.tokens = usages
        .iter()
        .map(|&(model, input, output, cost)| TokenUsage {
            model: model.into(),
            input,
            cache_read_input: input / 4,
            output,
            reasoning_output: output / 2,
            cache_creation_input: 3,
            image_input: 1,
            cost: Some(d(cost)),
            ..TokenUsage::default()
        })
        .collect();
    let token: Decimal = usages.iter().map(|u| d(u.3)).sum();
    if let Some(c) = r.cost.as_mut() {
        c.cpu = Decimal::ZERO;
        c.token = token;
        c.subtotal = token;
        // A 10 % discount, so the split of a discount is exercised too.
        c.discount = token / Decimal::from(10);
        c.total = token - c.discount;
    }
    r
}

fn sum_totals(rows: &[(Group, Totals)]) -> Totals {
    let mut s = Totals::default();
    for (_, t) in rows {
        s.records += t.records;
        s.priced_records += t.priced_records;
        s.cpu_core_seconds += t.cpu_core_seconds;
        s.tokens_input += t.tokens_input;
        s.tokens_cache_read_input += t.tokens_cache_read_input;
        s.tokens_output += t.tokens_output;
        s.tokens_reasoning_output += t.tokens_reasoning_output;
        s.cost.token += t.cost.token;
        s.cost.subtotal += t.cost.subtotal;
        s.cost.discount += t.cost.discount;
        s.cost.total += t.cost.total;
    }
    s
}

/// `model` splits totals by the models of the records' token usages: the
/// groups add up to the whole exactly, a record without tokens is
/// unattributed, a filter on model equals its group, and rollups answer the
/// same to the last digit.
#[test]
fn totals_group_and_filter_by_model_exactly_raw_and_rolled_up() {
    let dir = TempDir::new("models");
    let mut ledger = Ledger::open(&dir.db(), Duration::ZERO).expect("open");
    let batch = vec![
        priced(rec("cpu", T0), "0.125"),
        token_rec("t1", T0, "a1", &[("m1", 1000, 200, "0.0125")]),
        token_rec(
            "t2",
            T0,
            "a2",
            &[("m1", 10, 20, "0.0000000000000000000000001")],
        ),
        token_rec("t3", T0, "a2", &[("m2", 300, 40, "0.3")]),
        // Two models in one record: m2's usage moves to m2's group.
        token_rec(
            "t4",
            T0 + 10,
            "a1",
            &[("m1", 7, 9, "0.007"), ("m2", 11, 13, "0.000000011")],
        ),
    ];
    ledger
        .commit_window(&t(T0), &t(T0 + 20), &batch, &[])
        .expect("commit");
    let query = |l: &Ledger, g: &[&str], f: &[(&str, &str)]| {
        let f: Vec<(String, String)> = f
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        l.totals(&t(T0), &t(T0 + 3600), g, &f).expect("totals")
    };
    let check = |l: &Ledger| {
        let whole = total_of(l, T0, T0 + 3600);
        let by_model = query(l, &["model"], &[]);
        let keys: Vec<Option<&str>> = by_model.iter().map(|(k, _)| k[0].as_deref()).collect();
        assert_eq!(keys, [None, Some("m1"), Some("m2")]);
        let s = sum_totals(&by_model);
        assert_eq!(s.records, whole.records);
        assert_eq!(s.cpu_core_seconds, whole.cpu_core_seconds);
        assert_eq!(s.tokens_input, whole.tokens_input);
        assert_eq!(s.tokens_output, whole.tokens_output);
        assert_eq!(s.tokens_reasoning_output, whole.tokens_reasoning_output);
        assert_eq!(s.tokens_cache_read_input, whole.tokens_cache_read_input);
        assert_eq!(s.cost.token, whole.cost.token);
        assert_eq!(s.cost.subtotal, whole.cost.subtotal);
        assert_eq!(s.cost.discount, whole.cost.discount);
        assert_eq!(s.cost.total, whole.cost.total);
        let (none, m1, m2) = (&by_model[0].1, &by_model[1].1, &by_model[2].1);
        // The CPU record has no model; its tokens are none.
        assert_eq!((none.records, none.tokens_input), (1, 0));
        assert_eq!(none.cost.total, d("0.125"));
        assert_eq!(m1.tokens_input, 1000 + 10 + 7);
        assert_eq!(m1.tokens_output, 200 + 20 + 9);
        assert_eq!(m1.cost.token, d("0.0195000000000000000000001"));
        assert_eq!(m2.tokens_input, 300 + 11);
        assert_eq!(m2.cost.token, d("0.300000011"));
        // Each record counts once, under its first model.
        assert_eq!((m1.records, m2.records), (3, 1));
        let types = m1.token_types.expect("token types");
        assert_eq!((types.cache_creation_input, types.image_input), (9, 3));
        assert_eq!(m2.token_types.map(|t| t.image_input), Some(2));
        assert_eq!(whole.token_types, None);
        // A filter on model is its group; an empty one is "no model".
        let only = query(l, &[], &[("model", "m2")]);
        assert_eq!(only.len(), 1);
        assert_eq!(&only[0].1, m2);
        let unmodelled = query(l, &[], &[("model", "")]);
        assert_eq!(&unmodelled[0].1, none);
        assert!(query(l, &[], &[("model", "m1"), ("model", "m2")]).is_empty());
        // Agent × model: a2 used m1 and m2, a1 m1 and (through t4) m2.
        let am = query(l, &["agent_id", "model"], &[("model", "m2")]);
        let keys: Vec<(Option<&str>, Option<&str>)> = am
            .iter()
            .map(|(k, _)| (k[0].as_deref(), k[1].as_deref()))
            .collect();
        assert_eq!(keys, [(Some("a1"), Some("m2")), (Some("a2"), Some("m2"))]);
        assert_eq!(am[0].1.cost.token, d("0.000000011"));
        assert_eq!(am[1].1.cost.token, d("0.3"));
        by_model
    };
    let raw = check(&ledger);
    let stats = ledger.compact(&t(T0 + 7200)).expect("compact");
    assert_eq!(stats.records_compacted, 5);
    let rolled = check(&ledger);
    assert_eq!(rolled, raw, "rollups answer per model as raw records do");
}
