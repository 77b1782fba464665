//! OTLP export against an independent decoder: what the agent sends over OTLP/gRPC,
//! decoded by Python's `opentelemetry-proto` (tests/py/otlp_receiver.py), carries every
//! record of the ledger exactly once, and its cumulative series add up to the ledger's
//! totals.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::{Duration, Instant};

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, LedgerRecord, NODE, free_port, now_rfc3339, rfc3339,
    run_workload, tcp_workload, truth_of,
};
use mentat_tests::exact::{Exact, close};
use mentat_tests::otlp::{Receiver, Resends, check_delivered_once, last_points, sum_last};
use mentat_tests::truth::Burn;
use time::OffsetDateTime;

/// Doubles on the wire: each series' last value is the f64 nearest its exact
/// cumulative sum (error ≤ 2⁻⁵³ relative), and adding a few hundred of them in f64
/// adds at most a few hundred ulps more. 1e-9 is six orders above that and still far
/// below anything a lost or doubled record would move (the smallest record moves a
/// sum by ~1e-6 of itself here).
const REL: f64 = 1e-9;

fn int_sum(records: &[&LedgerRecord], f: impl Fn(&LedgerRecord) -> u64) -> i128 {
    records.iter().map(|r| i128::from(f(r))).sum()
}

#[test]
fn the_receiver_gets_every_ledger_record_once_and_its_sums_equal_the_ledgers() {
    let t0 = Instant::now();
    let dir = LedgerDir::new().expect("ledger dir");
    let receiver = Receiver::start(free_port().expect("port"), dir.path()).expect("receiver");
    let from = rfc3339(OffsetDateTime::now_utc() - time::Duration::seconds(5));
    let daemon = Daemon::start(&dir, &DaemonOptions::exporting_to(receiver.endpoint()))
        .expect("starting the daemon with OTLP export");

    // ~3 s of usage: a CPU burner and 64 MiB over loopback TCP, side by side.
    let (burn, tcp) = thread::scope(|s| {
        let burn = s.spawn(|| run_workload(&["burn", "--threads", "1", "--ms", "2500"]));
        let tcp = s.spawn(|| tcp_workload(64 << 20));
        (
            burn.join().expect("burn thread").expect("burn workload"),
            tcp.join().expect("tcp thread").expect("tcp workload"),
        )
    });
    let burn: Burn = truth_of(&burn).expect("burn's truth");
    thread::sleep(Duration::from_millis(1500));

    let stopped = daemon.stop().expect("stopping the daemon");
    assert_eq!(
        stopped.status.code(),
        Some(0),
        "SIGINT must stop the daemon cleanly: {}",
        stopped.describe()
    );
    let to = now_rfc3339();

    // The API went with the daemon: a second one, without OTLP, serves the ledger.
    let reader = Daemon::start(&dir, &DaemonOptions::default()).expect("restarting to query");
    let records = reader.records(&from, &to).expect("paging /v1/records");
    let usage = reader
        .get_json("/v1/usage", &[("from", &from), ("to", &to)])
        .expect("/v1/usage");
    reader.stop().expect("stopping the reader");
    let requests = receiver.requests().expect("the receiver's requests");
    receiver.stop();

    assert!(
        records.len() > 20,
        "only {} records in the ledger for a ~5 s run",
        records.len()
    );
    assert!(
        records.iter().all(|r| r.node == NODE),
        "records of another node"
    );

    // (a) Record ids: the receiver's set is the ledger's, each exactly once.
    // (Whether every ledger record arrived is checked last, with the stop's timing.)
    let d = check_delivered_once(&requests, &[], &records, Resends::Never)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let received: BTreeSet<&str> = d.requests_of.keys().map(String::as_str).collect();

    // Resource attributes, on every request.
    for r in &requests {
        for (k, v) in [
            ("service.name", "mentat-agent"),
            ("host.name", NODE),
            ("k8s.node.name", NODE),
        ] {
            assert_eq!(
                r.resource.get(k).and_then(|v| v.as_str()),
                Some(v),
                "request {}: resource {k}; resource: {:?}",
                r.seq,
                r.resource
            );
        }
        assert!(
            r.resource.contains_key("service.instance.id"),
            "request {}: no service.instance.id: {:?}",
            r.seq,
            r.resource
        );
    }

    // (b) Σ over series of each series' last cumulative value == the ledger's total.
    let last = last_points(&requests).unwrap_or_else(|e| panic!("{e:#}"));
    // Over the records the receiver got: equal to the whole ledger once the check at
    // the end (nothing missing) passes; apart, so that a missing window and a wrong
    // encoding fail with their own messages.
    let all: Vec<&LedgerRecord> = records
        .iter()
        .filter(|r| received.contains(r.record_id.as_str()))
        .collect();
    let processes: Vec<&LedgerRecord> = all
        .iter()
        .copied()
        .filter(|r| r.record_kind == "process")
        .collect();
    let others: Vec<&LedgerRecord> = all
        .iter()
        .copied()
        .filter(|r| r.record_kind != "process")
        .collect();
    let double = |metric: &str, split: Option<&str>| -> BTreeMap<String, f64> {
        sum_last(&last, metric, split)
            .into_iter()
            .map(|(k, s)| (k, s.double))
            .collect()
    };
    let int = |metric: &str, split: Option<&str>| -> BTreeMap<String, i128> {
        sum_last(&last, metric, split)
            .into_iter()
            .map(|(k, s)| (k, s.int))
            .collect()
    };
    let check_f64 = |what: &str, got: f64, want: Exact| {
        assert!(
            close(got, want.to_f64(), REL),
            "{what}: the receiver's series add up to {got:e}, the ledger's records to {want} \
             ({:+e} relative)",
            (got - want.to_f64()) / want.to_f64()
        );
    };

    let cpu_process = double("process.cpu.time", None).values().sum::<f64>();
    let cpu_node = double("mentat.node.cpu.time", None).values().sum::<f64>();
    check_f64(
        "process.cpu.time",
        cpu_process,
        LedgerRecord::sum(&processes, "cpu_core_seconds"),
    );
    check_f64(
        "mentat.node.cpu.time",
        cpu_node,
        LedgerRecord::sum(&others, "cpu_core_seconds"),
    );
    check_f64(
        "process.cpu.time + mentat.node.cpu.time",
        cpu_process + cpu_node,
        LedgerRecord::sum(&all, "cpu_core_seconds"),
    );
    check_f64(
        "mentat.usage.memory",
        double("mentat.usage.memory", None).values().sum(),
        LedgerRecord::sum(&all, "memory_gb_seconds"),
    );

    // Integers cross the wire as integers: exact.
    let net = int("process.network.io", Some("network.io.direction"));
    let disk = int("process.disk.io", Some("disk.io.direction"));
    for (what, got, want) in [
        (
            "process.network.io receive",
            net.get("receive").copied().unwrap_or(0),
            int_sum(&all, |r| r.network_rx_bytes),
        ),
        (
            "process.network.io transmit",
            net.get("transmit").copied().unwrap_or(0),
            int_sum(&all, |r| r.network_tx_bytes),
        ),
        (
            "process.disk.io read",
            disk.get("read").copied().unwrap_or(0),
            int_sum(&all, |r| r.disk_read_bytes),
        ),
        (
            "process.disk.io write",
            disk.get("write").copied().unwrap_or(0),
            int_sum(&all, |r| r.disk_write_bytes),
        ),
        (
            "mentat.usage.syscalls",
            int("mentat.usage.syscalls", None).values().sum(),
            int_sum(&all, |r| r.syscalls),
        ),
    ] {
        assert_eq!(
            got, want,
            "{what}: the receiver's series add up to {got}, the ledger's records to {want}"
        );
    }
    // The workload's own bytes are in there (both ends on this node: at least twice).
    let rx = net.get("receive").copied().unwrap_or(0);
    assert!(
        rx >= i128::from(tcp.bytes_received),
        "process.network.io receive = {rx} B < the {} B the tcp workload's server read",
        tcp.bytes_received
    );

    // Money: every component and the total.
    let cost = double("mentat.cost", Some("mentat.cost.component"));
    for component in [
        "cpu", "memory", "gpu", "network", "storage", "token", "discount",
    ] {
        check_f64(
            &format!("mentat.cost{{component={component}}}"),
            cost.get(component).copied().unwrap_or(0.0),
            LedgerRecord::sum(&all, &format!("cost.{component}")),
        );
    }
    let total = LedgerRecord::sum(&all, "cost.total");
    assert!(
        total > Exact::ZERO,
        "a run with a CPU burner cost nothing: {total}"
    );
    check_f64(
        "mentat.cost.total",
        double("mentat.cost.total", None).values().sum(),
        total,
    );

    // The API's own totals over the same range are the records' sums, exactly.
    let everything: Vec<&LedgerRecord> = records.iter().collect();
    let t = &usage["root"]["totals"];
    for (field, want) in [
        (
            "cpu_core_seconds",
            LedgerRecord::sum(&everything, "cpu_core_seconds"),
        ),
        (
            "memory_gb_seconds",
            LedgerRecord::sum(&everything, "memory_gb_seconds"),
        ),
    ] {
        let got = mentat_tests::exact::exact_json(&t[field]).expect("usage total");
        assert_eq!(got, want, "/v1/usage root {field} vs Σ records");
    }
    let got = mentat_tests::exact::exact_json(&t["cost"]["total"]).expect("cost total");
    assert_eq!(
        got,
        LedgerRecord::sum(&everything, "cost.total"),
        "/v1/usage root cost.total vs Σ records"
    );

    // The burner's CPU is in the export: its series carry its pid.
    let burner: f64 = last
        .iter()
        .filter(|((m, _, _), p)| {
            m == "process.cpu.time" && p.attr("process.pid") == burn.child_pid.to_string()
        })
        .map(|(_, p)| p.value())
        .sum();
    let rusage = burn.rusage_cpu_ns as f64 / 1e9;
    // 2 %: the agent meters the burner within 1 % of wait4 (tests/cpu.rs); the other
    // 1 % covers the exit path after the child's last window.
    assert!(
        (burner - rusage).abs() <= 0.02 * rusage,
        "process.cpu.time of the burner (pid {}) = {burner} s, wait4 says {rusage} s",
        burn.child_pid
    );
    let missing: Vec<&LedgerRecord> = records
        .iter()
        .filter(|r| !received.contains(r.record_id.as_str()))
        .collect();
    let windows_missing: BTreeSet<(&str, &str)> = missing
        .iter()
        .map(|r| (r.window_start.as_str(), r.window_end.as_str()))
        .collect();
    let last_window = records
        .iter()
        .map(|r| r.window_end.as_str())
        .max_by_key(|w| mentat_tests::daemon::parse_time(w).expect("window_end"));
    assert!(
        missing.is_empty(),
        "{} of {} ledger records never reached the receiver, from windows {windows_missing:?} \
         (the ledger's last window ends {last_window:?}; the daemon stopped in {:?})",
        missing.len(),
        records.len(),
        stopped.took
    );
    println!(
        "otlp: {} records in {} requests ({} series), cpu {:.3} s, rx {} B, cost {}; {:?}",
        records.len(),
        requests.len(),
        last.len(),
        cpu_process + cpu_node,
        rx,
        total,
        t0.elapsed()
    );
}
