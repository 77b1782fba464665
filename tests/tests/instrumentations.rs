//! One LLM call is billed once, whatever instruments it: an OpenAI-SDK workload
//! (the real `openai` package) against a local fake provider, instrumented by the
//! real GenAI instrumentation packages, alone and together, exporting over OTLP
//! to the daemon. Ground truth is the usage the fake provider answered with
//! (tests/py/instrumented_openai.py); the agent's token records must sum to it
//! exactly, per model, and their cost to the book's prices times it exactly.
//!
//! The packages (pinned in tests/py/instrumentations.txt) live in their own
//! virtualenv, which `cargo xtask setup` builds.

use std::collections::BTreeMap;
use std::time::Duration;

use mentat_tests::daemon::{Daemon, DaemonOptions, LedgerDir, free_port, now_rfc3339};
use mentat_tests::exact::{Exact, exact_json};
use rust_decimal::Decimal;
use serde_json::Value;
use time::OffsetDateTime;

/// One workload: its service name, the instrumentations, the protocol, and
/// more arguments.
struct Case {
    service: &'static str,
    instrument: &'static str,
    protocol: &'static str,
    extra: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        service: "official",
        instrument: "official",
        protocol: "http",
        extra: &[],
    },
    Case {
        service: "openllmetry",
        instrument: "openllmetry",
        protocol: "http",
        extra: &[],
    },
    Case {
        service: "openinference",
        instrument: "openinference",
        protocol: "http",
        extra: &[],
    },
    // The case: both OpenTelemetry instrumentations, over gRPC.
    Case {
        service: "official-openllmetry",
        instrument: "official,openllmetry",
        protocol: "grpc",
        extra: &[],
    },
    Case {
        service: "all-three",
        instrument: "official,openllmetry,openinference",
        protocol: "http",
        extra: &[],
    },
    // Distinct calls that look alike: one trace (an agent run), every call with
    // the same usage; siblings must not be taken for one call.
    Case {
        service: "one-trace-alike",
        instrument: "official,openllmetry,openinference",
        protocol: "http",
        extra: &["--one-trace", "--fixed-usage"],
    },
];

/// Calls per workload, over two models.
const CALLS: u64 = 7;

/// The shipped book's prices per 1000 tokens (deploy/pricing.toml), for the
/// models the fake provider answers with (dated names priced as their base).
fn prices(model: &str) -> (Decimal, Decimal) {
    let d = |s: &str| s.parse::<Decimal>().expect("price");
    match model {
        "gpt-4o-mini-2024-07-18" => (d("0.00015"), d("0.0006")),
        "gpt-4o-2024-08-06" => (d("0.0025"), d("0.0100")),
        other => panic!("no price for {other}"),
    }
}

#[test]
fn one_llm_call_is_billed_once_whatever_instruments_it() {
    let python = mentat_tests::traced::instrumentations_python();
    let dir = LedgerDir::new().expect("ledger dir");
    let (grpc, http) = (free_port().expect("port"), free_port().expect("port"));
    let daemon =
        Daemon::start(&dir, &DaemonOptions::receiving("2s", grpc, http, "")).expect("daemon");
    let from = now_rfc3339();
    let script = mentat_tests::traced::py_script("instrumented_openai.py");
    let mut truths = BTreeMap::new();
    let mut spans_sent = 0;
    let mut duplicates_sent = 0;
    for case in CASES {
        let endpoint = match case.protocol {
            "grpc" => format!("http://127.0.0.1:{grpc}"),
            _ => format!("http://127.0.0.1:{http}"),
        };
        let calls = CALLS.to_string();
        let mut args = vec![
            script.to_str().expect("path"),
            "--endpoint",
            &endpoint,
            "--protocol",
            case.protocol,
            "--instrument",
            case.instrument,
            "--calls",
            &calls,
            "--service",
            case.service,
        ];
        args.extend(case.extra);
        let out = mentat_tests::traced::run_reaped(&python, &args, &[], Duration::from_secs(120))
            .and_then(|r| r.ok("py/instrumented_openai.py"))
            .expect("the instrumented workload");
        let truth: Value =
            serde_json::from_str(out.stdout.lines().last().unwrap_or("{}")).expect("its summary");
        // Each instrumentation reported every call: the workload really sends
        // one token span per instrumentation per call.
        let per_scope = truth["spans"].as_object().expect("spans by scope");
        let n = case.instrument.split(',').count() as u64;
        assert_eq!(per_scope.len() as u64, n, "{}: {truth}", case.service);
        for (scope, count) in per_scope {
            assert_eq!(count.as_u64(), Some(CALLS), "{}: {scope}", case.service);
        }
        spans_sent += truth["all_spans"].as_u64().expect("all_spans");
        duplicates_sent += (n - 1) * CALLS;
        truths.insert(case.service, truth);
    }
    let exited = OffsetDateTime::now_utc();

    // Every span was received (the exporters had their answers before the
    // workloads exited; polled, as the counter need not be updated before the
    // answer goes out); then a window starting after that is committed, and with
    // it every token record (span_lag 2 s).
    daemon
        .wait_counter(
            "mentat_agent_receiver_spans_total",
            Duration::from_secs(30),
            |got| got == spans_sent,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    for refused in [
        "mentat_agent_receiver_rejected_spans_total",
        "mentat_agent_receiver_dropped_spans_total",
    ] {
        assert_eq!(daemon.counter(refused).expect("counter"), 0, "{refused}");
    }
    let records = daemon
        .records_once_past(&from, exited, Duration::from_secs(60))
        .expect("records");

    let mut failures = Vec::new();
    for case in CASES {
        let truth = &truths[case.service];
        // Billed tokens and token cost per model, from the ledger.
        let mut billed: BTreeMap<String, (u64, u64, Exact)> = BTreeMap::new();
        for r in records
            .iter()
            .filter(|r| r.record_kind == "tokens" && r.comm.as_deref() == Some(case.service))
        {
            for t in r.raw["tokens"].as_array().expect("tokens") {
                let e = billed
                    .entry(t["model"].as_str().expect("model").to_owned())
                    .or_insert((0, 0, Exact::ZERO));
                e.0 += t["input"].as_u64().expect("input");
                e.1 += t["output"].as_u64().expect("output");
            }
            let e = billed
                .get_mut(r.raw["tokens"][0]["model"].as_str().expect("model"))
                .expect("entry");
            e.2 =
                e.2.add(exact_json(&r.raw["cost"]["token"]).expect("token cost"))
                    .expect("sum");
        }
        // What the provider answered, priced exactly by the book.
        let mut want: BTreeMap<String, (u64, u64, Exact)> = BTreeMap::new();
        for (model, m) in truth["models"].as_object().expect("models") {
            let (input, output) = (
                m["input"].as_u64().expect("input"),
                m["output"].as_u64().expect("output"),
            );
            let (pi, po) = prices(model);
            let cost =
                (Decimal::from(input) * pi + Decimal::from(output) * po) / Decimal::from(1000);
            want.insert(
                model.clone(),
                (input, output, Exact::from_decimal(cost).expect("exact")),
            );
        }
        assert_eq!(want.len(), 2, "two models: {truth}");
        if billed != want {
            failures.push(format!(
                "{} ({}): billed {billed:?}, the provider answered {want:?}",
                case.service, case.instrument
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\ndaemon log:\n{}",
        failures.join("\n"),
        daemon.log()
    );
    // Every duplicate was recognised and counted: no more, no fewer.
    assert_eq!(
        daemon
            .counter("mentat_agent_duplicate_token_spans_total")
            .expect("counter"),
        duplicates_sent
    );
}
