//! A crash: the daemon is SIGKILLed mid-run, with a workload running across the
//! crash, and restarted on the same ledger. No window is lost or duplicated, in the
//! ledger or at the OTLP receiver, and usage from before the crash is not counted again
//! after it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, LedgerRecord, free_port, now_rfc3339, parse_time, rfc3339,
    truth_of, wait_until,
};
use mentat_tests::otlp::{Receiver, Resends, check_delivered_once, wait_until_delivered};
use mentat_tests::truth::Burn;
use mentat_tests::workload_bin;
use time::OffsetDateTime;

fn ns(rfc3339: &str) -> i128 {
    parse_time(rfc3339)
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unix_timestamp_nanos()
}

/// The ledger's `windows` table (start ns, end ns, records committed), read with
/// Python's sqlite3: the API has no view of it, and it is what says how many records
/// each committed window had.
fn committed_windows(ledger: &std::path::Path) -> Vec<(i128, i128, u64)> {
    let script = "import json, sqlite3, sys\n\
                  c = sqlite3.connect(sys.argv[1])\n\
                  print(json.dumps(c.execute('SELECT ws_ns, we_ns, records FROM windows ORDER BY ws_ns').fetchall()))\n";
    let out = Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(ledger)
        .output()
        .expect("running python3's sqlite3");
    assert!(
        out.status.success(),
        "reading the windows table: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("windows as JSON")
}

/// Sorted `[start, end)` spans (ns) do not overlap.
fn assert_disjoint(spans: &[(i128, i128)], what: &str) {
    for pair in spans.windows(2) {
        let ((s0, e0), (s1, e1)) = (pair[0], pair[1]);
        assert!(e0 <= s1, "{what} [{s0}, {e0}) and [{s1}, {e1}) ns overlap");
    }
}

#[test]
fn a_sigkill_loses_and_duplicates_nothing() {
    let t0 = Instant::now();
    let dir = LedgerDir::new().expect("ledger dir");
    let receiver = Receiver::start(free_port().expect("port"), dir.path()).expect("receiver");
    let otlp = DaemonOptions::exporting_to(receiver.endpoint());
    let from = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(5));
    let first = Daemon::start(&dir, &otlp).expect("starting the first daemon");

    // A burner that runs across the crash: 7 s of CPU on one thread.
    let mut burner = Command::new(workload_bin().expect("workload"))
        .args(["burn", "--threads", "1", "--ms", "7000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the burner");

    // A few windows, then the crash, 400 ms into a window.
    thread::sleep(Duration::from_millis(3400));
    let killed_at = OffsetDateTime::now_utc();
    let killed = first.kill().expect("SIGKILL");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed.status),
        Some(libc::SIGKILL),
        "{}",
        killed.describe()
    );
    let second = Daemon::start(&dir, &otlp).expect("restarting after the crash");
    let status = wait_until(&mut burner, Instant::now() + Duration::from_secs(60))
        .expect("waiting for the burner")
        .expect("the burner ran over 60 s");
    assert!(status.success(), "the burner failed: {status}");
    let mut stdout = String::new();
    std::io::Read::read_to_string(burner.stdout.as_mut().expect("burner stdout"), &mut stdout)
        .expect("reading the burner's truth");
    let burn: Burn = truth_of(&stdout).expect("burn's truth");
    thread::sleep(Duration::from_millis(1500));
    let stopped = second.stop().expect("stopping the second daemon");
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.describe());
    assert!(
        stopped.log.contains("resumes_after"),
        "the restarted daemon did not resume from the ledger's last window: {}",
        stopped.describe()
    );
    let to = now_rfc3339();

    // A third run, exporting too, delivers whatever the second left in the outbox
    // (a graceful stop's own last export is tests/otlp.rs's to check) and serves the
    // final reading of the ledger.
    let third = Daemon::start(&dir, &otlp).expect("starting the reader");
    let records = third.records(&from, &to).expect("records of both runs");
    wait_until_delivered(&receiver, Duration::from_secs(30), || Ok(records.clone()))
        .unwrap_or_else(|e| panic!("the ledger's records never reached the receiver: {e:#}"));
    // The receiver stops first: every id it got was then committed before the
    // ledger is read below.
    let requests = receiver.requests().expect("the receiver's requests");
    let receiver_log = receiver.log();
    receiver.stop();
    let everything = third.records(&from, &now_rfc3339()).expect("every record");
    third.stop().expect("stopping the reader");

    // The ledger holds every record id once; the receiver got every record of both runs
    // and, after dropping re-sent batches, each once.
    let d = check_delivered_once(&requests, &records, &everything, Resends::IgnoredBatches)
        .unwrap_or_else(|e| panic!("{e:#}"));

    // Windows: each record ends with one of the committed windows, every committed
    // window has exactly the records it was committed with, and no two overlap. A
    // record spans its window, or more for a process that did not run in the windows
    // before (its memory since its last record is in it, issue 13): per process
    // instance, no two records overlap, so no usage lies in two records.
    let mut windows: BTreeMap<i128, Vec<&LedgerRecord>> = BTreeMap::new();
    for r in &records {
        windows.entry(ns(&r.window_end)).or_default().push(r);
    }
    let committed = committed_windows(&dir.ledger());
    let (lo, hi) = (ns(&from), ns(&to));
    let committed: Vec<_> = committed
        .into_iter()
        .filter(|(ws, _, _)| (lo..hi).contains(ws))
        .collect();
    assert_eq!(
        committed.iter().map(|w| w.1).collect::<Vec<_>>(),
        windows.keys().copied().collect::<Vec<_>>(),
        "the ends of the windows the ledger committed (left) vs those its records end with (right)"
    );
    type Instance = (Option<u32>, Option<String>);
    let mut spans_of: BTreeMap<Instance, Vec<(i128, i128)>> = BTreeMap::new();
    for (ws, we, n) in &committed {
        let rs = &windows[we];
        assert_eq!(
            rs.len() as u64,
            *n,
            "window starting {ws} ns was committed with {n} records; the ledger has {}",
            rs.len()
        );
        for r in rs {
            assert!(
                ns(&r.window_start) <= *ws,
                "record {} of the window [{ws}, {we}) ns starts inside it, at {}",
                r.record_id,
                r.window_start
            );
        }
        for kind in ["idle", "kernel", "unattributed"] {
            let b: Vec<_> = rs.iter().filter(|r| r.record_kind == kind).collect();
            assert_eq!(
                b.len(),
                1,
                "window starting {ws} ns: one `{kind}` bucket expected"
            );
            assert_eq!(ns(&b[0].window_start), *ws, "a bucket spans its window");
        }
        let mut instances = BTreeSet::new();
        for r in rs.iter().filter(|r| r.record_kind == "process") {
            assert!(
                instances.insert((r.pid, r.process_start_time.clone())),
                "window starting {ws} ns: process {:?} (started {:?}) has two records",
                r.pid,
                r.process_start_time
            );
            spans_of
                .entry((r.pid, r.process_start_time.clone()))
                .or_default()
                .push((ns(&r.window_start), ns(&r.window_end)));
        }
    }
    for (instance, mut s) in spans_of {
        s.sort();
        assert_disjoint(&s, &format!("process {instance:?}: records"));
    }
    let spans: Vec<(i128, i128)> = committed.iter().map(|(ws, we, _)| (*ws, *we)).collect();
    assert_disjoint(&spans, "windows");
    // Both runs are there: windows before the crash and after the restart.
    let killed_ns = killed_at.unix_timestamp_nanos();
    let before = spans.iter().filter(|w| w.1 <= killed_ns).count();
    let after = spans.iter().filter(|w| w.0 >= killed_ns).count();
    assert!(
        before >= 2 && after >= 2,
        "{before} windows before the crash, {after} after the restart"
    );

    // The burner ran across the crash. What was metered of it is at most what it
    // used: a restarted agent that re-read counters it had already charged (or whose
    // start it does not know) would charge it twice. 1 %: the agent's CPU agrees with
    // wait4 within 1 % (tests/cpu.rs).
    let burner: Vec<&LedgerRecord> = records
        .iter()
        .filter(|r| r.pid == Some(burn.child_pid) && r.record_kind == "process")
        .collect();
    let metered = LedgerRecord::sum(&burner, "cpu_core_seconds").to_f64();
    let rusage = burn.rusage_cpu_ns as f64 / 1e9;
    assert!(
        metered <= rusage * 1.01,
        "the burner (pid {}) used {rusage} s of CPU by wait4 but the ledger charges {metered} s",
        burn.child_pid
    );
    assert!(
        burner.iter().any(|r| ns(&r.window_end) <= killed_ns)
            && burner.iter().any(|r| ns(&r.window_start) >= killed_ns),
        "the burner should have records before the crash and after the restart: {:?}",
        burner
            .iter()
            .map(|r| (&r.window_start, &r.cpu_core_seconds))
            .collect::<Vec<_>>()
    );

    println!(
        "crash: {} windows ({before} before the crash, {after} after), {} records; burner \
         metered {metered:.3} s of {rusage:.3} s; {} requests, {} re-sent batches ignored{}; {:?}",
        spans.len(),
        records.len(),
        requests.len(),
        d.ignored_batches.len(),
        if receiver_log.is_empty() {
            String::new()
        } else {
            format!(" ({})", receiver_log.trim())
        },
        t0.elapsed()
    );
}
