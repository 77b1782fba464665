//! An OTLP outage: the receiver is down for the first 30 s of the daemon's run while
//! workloads run, then comes up. Usage waits in the ledger's outbox; once the
//! receiver is back every window arrives, none twice (by record_id).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, free_port, now_rfc3339, rfc3339, run_workload, tcp_workload,
};
use mentat_tests::otlp::{Receiver, Resends, check_delivered_once, wait_until_delivered};
use time::OffsetDateTime;

/// The outage.
const OUTAGE: Duration = Duration::from_secs(30);

/// The exporter retries with a backoff doubling from 0.5 s: after a 30 s outage its
/// next try may be up to 16 s away (0.5 + 1 + … + 16 = 31.5 s), at most 30 s (its cap)
/// in any case; then a 1 s window of backlog at 200 records a request takes well under
/// a second. 60 s leaves room for a slow machine.
const CATCH_UP: Duration = Duration::from_secs(60);

#[test]
fn every_window_arrives_once_after_the_receiver_comes_back() {
    let t0 = Instant::now();
    let dir = LedgerDir::new().expect("ledger dir");
    let port = free_port().expect("port");
    let endpoint = format!("http://127.0.0.1:{port}");
    let from = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(5));
    let daemon = Daemon::start(&dir, &DaemonOptions::exporting_to(endpoint.clone()))
        .expect("starting the daemon with its receiver down");

    // Workloads through the outage: a short burn and 8 MiB over TCP every ~2 s.
    let outage_ends = Instant::now() + OUTAGE;
    let busy = AtomicBool::new(true);
    let workloads = thread::scope(|s| {
        let worker = s.spawn(|| {
            let mut runs = 0u32;
            while busy.load(Ordering::SeqCst) && Instant::now() < outage_ends {
                run_workload(&["burn", "--threads", "1", "--ms", "300"]).expect("burn");
                tcp_workload(8 << 20).expect("tcp");
                runs += 1;
                thread::sleep(Duration::from_millis(1500));
            }
            runs
        });
        let runs = worker.join().expect("workload thread");
        busy.store(false, Ordering::SeqCst);
        runs
    });
    thread::sleep(outage_ends.saturating_duration_since(Instant::now()));

    // Nothing could be delivered: the whole run so far waits in the ledger.
    let before = daemon
        .records(&from, &now_rfc3339())
        .expect("records during the outage");
    let windows_before: BTreeSet<&str> = before.iter().map(|r| r.window_start.as_str()).collect();
    // One window a second for 30 s; a few may be late on a loaded machine.
    assert!(
        windows_before.len() >= 25,
        "only {} windows committed during a {OUTAGE:?} outage",
        windows_before.len()
    );

    let receiver = Receiver::start(port, dir.path()).expect("starting the receiver");
    // Every record the ledger holds reaches the receiver (the ledger is read live, so
    // this holds only once the exporter has caught up with the newest window too).
    let caught_up = wait_until_delivered(&receiver, CATCH_UP, || {
        daemon.records(&from, &now_rfc3339())
    })
    .unwrap_or_else(|e| {
        panic!(
            "after the receiver came back: {e:#}; daemon log:\n{}",
            daemon.log()
        )
    });

    let stopped = daemon.stop().expect("stopping the daemon");
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.describe());
    let to = now_rfc3339();
    // Whatever a graceful stop leaves in the outbox is the next run's to deliver (the
    // stop's own last export is tests/otlp.rs's to check): a second daemon, exporting
    // to the same receiver, serves the final reading of the ledger.
    let next = Daemon::start(&dir, &DaemonOptions::exporting_to(endpoint))
        .expect("restarting on the ledger");
    let records = next.records(&from, &to).expect("the first run's records");
    wait_until_delivered(&receiver, Duration::from_secs(30), || Ok(records.clone()))
        .unwrap_or_else(|e| panic!("the first run's records never reached the receiver: {e:#}"));
    // The receiver stops first: every id it got was then committed before the
    // ledger is read below.
    let requests = receiver.requests().expect("the receiver's requests");
    receiver.stop();
    let everything = next
        .records(&from, &now_rfc3339())
        .expect("every record of both runs");
    next.stop().expect("stopping the second daemon");

    // No crash here, so not even a re-sent batch is excusable: each id in one request.
    let d = check_delivered_once(&requests, &records, &everything, Resends::Never)
        .unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "outage: {} workload rounds; {} windows ({} records) waited {OUTAGE:?}; caught up {caught_up:?} \
         after the receiver came back; {} records in {} requests; {:?}",
        workloads,
        windows_before.len(),
        before.len(),
        d.requests_of.len(),
        requests.len(),
        t0.elapsed()
    );
}
