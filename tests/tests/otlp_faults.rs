//! OTLP export when the receiver misbehaves, against the independent Python receiver
//! (tests/py/otlp_receiver.py) in its fault modes:
//!
//! - the ack of the first request is lost after the receiver applied it: the agent
//!   sends it again, and the receiver's cumulative series still add up to the
//!   ledger's totals (nothing added twice);
//! - the receiver answers a partial success (rejected data points) for the first
//!   batch and for every later request that carries any of its records: the agent
//!   does not retry it (OTLP forbids it), lists the batch's records as dead letters,
//!   counts the rejected points, and later windows keep flowing. (Before, the batch
//!   was retried forever and nothing behind it was ever exported.)

use std::collections::BTreeSet;
use std::time::Duration;

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, LedgerRecord, free_port, now_rfc3339, poll, rfc3339,
    run_workload,
};
use mentat_tests::exact::close;
use mentat_tests::otlp::{Receiver, last_points, sum_last};
use time::OffsetDateTime;

/// As in tests/otlp.rs: each series' last value is the f64 nearest an exact sum, and
/// a few hundred of them add at most a few hundred ulps; a doubled record would move
/// the sum by far more than 1e-9 of it.
const REL: f64 = 1e-9;

#[test]
fn an_ack_lost_after_receipt_is_resent_and_nothing_is_added_twice() {
    let dir = LedgerDir::new().expect("ledger dir");
    let receiver =
        Receiver::start_with(free_port().expect("port"), dir.path(), &["--fail-ack-once"])
            .expect("receiver");
    let from = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(5));
    let daemon =
        Daemon::start(&dir, &DaemonOptions::exporting_to(receiver.endpoint())).expect("daemon");
    run_workload(&["burn", "--threads", "1", "--ms", "1500"]).expect("burn");
    // The lost ack is retried after 0.5 s; wait until the receiver has more than the
    // first request (the re-send), then a little longer for the windows after it.
    poll(Duration::from_secs(60), || {
        let n = receiver.requests()?.len();
        Ok(if n >= 3 {
            Ok(())
        } else {
            Err(format!("{n} requests"))
        })
    })
    .expect("the re-send and later windows reach the receiver");
    let stopped = daemon.stop().expect("stopping the daemon");
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.describe());
    let to = now_rfc3339();

    let reader = Daemon::start(&dir, &DaemonOptions::default()).expect("reader");
    let records = reader.records(&from, &to).expect("records");
    reader.stop().expect("stopping the reader");
    let requests = receiver.requests().expect("requests");
    receiver.stop();

    // The first request was applied, answered UNAVAILABLE, and its records sent again.
    let first: BTreeSet<&str> = requests[0].record_ids.iter().map(String::as_str).collect();
    assert!(!first.is_empty());
    let again = requests[1..]
        .iter()
        .find(|r| first.iter().all(|id| r.record_ids.iter().any(|i| i == id)))
        .expect("the first batch is sent again");
    // Its points are the same cumulative values, not the batch added a second time.
    for p in &requests[0].points {
        let twin = again
            .points
            .iter()
            .find(|q| q.metric == p.metric && q.attributes == p.attributes)
            .unwrap_or_else(|| panic!("the re-send lacks {} {:?}", p.metric, p.attributes));
        if again.record_ids.len() == requests[0].record_ids.len() {
            assert_eq!(twin.value(), p.value(), "{} {:?}", p.metric, p.attributes);
        } else {
            // Later windows joined the batch: it can only have grown by them.
            assert!(twin.value() >= p.value());
        }
    }

    // Every ledger record reached the receiver, and the series' last values (over
    // every request the receiver applied, the re-send included) add up to the
    // ledger's: a batch counted twice would be over by its whole amount.
    let received: BTreeSet<&str> = requests
        .iter()
        .flat_map(|r| r.record_ids.iter().map(String::as_str))
        .collect();
    let ledger_ids: BTreeSet<&str> = records.iter().map(|r| r.record_id.as_str()).collect();
    let missing: Vec<&&str> = ledger_ids.difference(&received).collect();
    assert!(missing.is_empty(), "not exported: {missing:?}");
    let last = last_points(&requests).unwrap_or_else(|e| panic!("{e:#}"));
    let all: Vec<&LedgerRecord> = records.iter().collect();
    let got: f64 = ["process.cpu.time", "mentat.node.cpu.time"]
        .iter()
        .flat_map(|m| sum_last(&last, m, None).into_values())
        .map(|s| s.double)
        .sum();
    let want = LedgerRecord::sum(&all, "cpu_core_seconds").to_f64();
    assert!(
        close(got, want, REL),
        "CPU: the receiver's series add up to {got:e} s, the ledger's records to {want:e} s"
    );
    let syscalls: i128 = sum_last(&last, "mentat.usage.syscalls", None)
        .into_values()
        .map(|s| s.int)
        .sum();
    let want_syscalls: i128 = records.iter().map(|r| i128::from(r.syscalls)).sum();
    assert_eq!(
        syscalls, want_syscalls,
        "syscalls over the wire vs the ledger"
    );
}

#[test]
fn a_partial_success_is_not_retried_and_later_windows_keep_flowing() {
    let dir = LedgerDir::new().expect("ledger dir");
    let receiver = Receiver::start_with(
        free_port().expect("port"),
        dir.path(),
        &["--reject-points", "2"],
    )
    .expect("receiver");
    let daemon =
        Daemon::start(&dir, &DaemonOptions::exporting_to(receiver.endpoint())).expect("daemon");
    // Wait for three requests after the rejected one that carry none of its records:
    // the outbox moved on.
    let first = poll(Duration::from_secs(60), || {
        let requests = receiver.requests()?;
        let Some(first) = requests.first() else {
            return Ok(Err("no request yet".into()));
        };
        let ids: BTreeSet<&String> = first.record_ids.iter().collect();
        let later = requests[1..]
            .iter()
            .filter(|r| !r.record_ids.iter().any(|i| ids.contains(i)))
            .count();
        Ok(if later >= 3 {
            Ok(())
        } else {
            Err(format!(
                "{later} requests after the rejected one ({} in all)",
                requests.len()
            ))
        })
    });
    let requests = receiver.requests().expect("requests");
    first.unwrap_or_else(|e| {
        panic!(
            "the outbox is blocked behind the partial success: {e:#}; first requests (seq, ids, rejected): {:?}",
            requests
                .iter()
                .take(10)
                .map(|r| (r.seq, r.record_ids.len(), r.rejected))
                .collect::<Vec<_>>()
        )
    });
    let rejected_ids: BTreeSet<&str> = requests[0].record_ids.iter().map(String::as_str).collect();
    assert_eq!(requests[0].rejected, 2);
    // Not retried: no other request carries the rejected batch's records.
    let resent: Vec<u64> = requests[1..]
        .iter()
        .filter(|r| {
            r.record_ids
                .iter()
                .any(|i| rejected_ids.contains(i.as_str()))
        })
        .map(|r| r.seq)
        .collect();
    assert!(
        resent.is_empty(),
        "the partial success was retried in requests {resent:?}"
    );

    // Counted, and listed as dead letters with the receiver's message.
    assert_eq!(
        daemon
            .counter("mentat_agent_otlp_rejected_points_total")
            .expect("counter"),
        2
    );
    assert_eq!(
        daemon
            .counter("mentat_agent_otlp_dead_letter_records_total")
            .expect("counter"),
        rejected_ids.len() as u64
    );
    let q = daemon
        .get_json("/v1/quarantine", &[("limit", "1000")])
        .expect("/v1/quarantine");
    let dead: BTreeSet<&str> = q["dead_letters"]
        .as_array()
        .expect("dead_letters")
        .iter()
        .filter_map(|d| d["record_id"].as_str())
        .collect();
    assert_eq!(dead, rejected_ids, "{q}");
    assert!(
        q["dead_letters"][0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("data points rejected")),
        "{q}"
    );
    let stopped = daemon.stop().expect("stopping the daemon");
    assert_eq!(stopped.status.code(), Some(0), "{}", stopped.describe());
    receiver.stop();
}
