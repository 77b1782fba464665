//! Benchmark (ignored; run in release): rule evaluation per window with 100
//! rules over a ledger holding 10,000 runs.
//!
//! `cargo test --release -p mentat-agent --lib -- --ignored --nocapture alert_evaluation_cost`

use std::{sync::Arc, time::Instant};

use crate::{
    alert::{
        engine::{AlertStats, Engine, NoChannels, RulesHandle},
        eval::{GroupKeys, Measurer},
        rules::{AlertingConfig, parse_text},
        testutil::{S, T0, Temp},
    },
    probes::clock::rfc3339_of_ns,
    report::record::{Cost, UsageRecord},
};
use rust_decimal::Decimal;

const RUNS: i64 = 10_000;
/// Runs start 0.36 s apart over an hour and last 60 s, a record per 10 s window.
const SPACING_MS: i64 = 360;
const LIFE_S: i64 = 60;
const WINDOW_S: i64 = 10;

fn rules_text() -> String {
    let mut t = String::new();
    for i in 0..50 {
        t += &format!(
            "[[alerts]]\nname = \"run-cost-{i}\"\nvalue = \"0.0058{:02}\"\n",
            99 - i
        );
    }
    for i in 0..10 {
        t += &format!(
            "[[alerts]]\nname = \"agent-cpu-{i}\"\ngroup = \"agent\"\nmeasure = \"cpu_core_seconds\"\nwindow = \"1m\"\nas = \"per_second\"\nvalue = {}\nfor = \"5m\"\n",
            i + 1
        );
    }
    for i in 0..10 {
        t += &format!(
            "[[alerts]]\nname = \"cust-run-{i}\"\nwhere = {{ customer_id = \"c{i}\" }}\nvalue = \"0.002\"\n"
        );
    }
    for i in 0..10 {
        t += &format!(
            "[[alerts]]\nname = \"budget-{i}\"\nkind = \"budget\"\nbudget = \"{}\"\n",
            (i + 1) * 10
        );
    }
    for i in 0..10 {
        t += &format!(
            "[[alerts]]\nname = \"lifetime-{i}\"\nwindow = \"lifetime\"\nlookback = \"2h\"\nvalue = \"0.0058{:02}\"\n",
            99 - i
        );
    }
    for i in 0..5 {
        t += &format!(
            "[[alerts]]\nname = \"anomaly-{i}\"\nkind = \"anomaly\"\nz = \"{}\"\n",
            i + 3
        );
    }
    for i in 0..5 {
        t += &format!(
            "[[alerts]]\nname = \"waste-{i}\"\nkind = \"waste\"\nvalue = \"{}\"\n",
            i + 3
        );
    }
    t
}

#[test]
#[ignore = "benchmark: run in release with --ignored --nocapture"]
fn alert_evaluation_cost() {
    let tmp = Temp::new("bench");
    let mut l = tmp.ledger();
    let start = T0 - 3600 * S;
    let end = start + (RUNS * SPACING_MS) / 1000 * S + LIFE_S * S;
    let mut records = 0usize;
    let mut ws = start;
    let built = Instant::now();
    while ws < end {
        let we = ws + WINDOW_S * S;
        let mut recs = Vec::new();
        let first = ((ws - start - LIFE_S * S).max(0) / 1_000_000 / SPACING_MS).max(0);
        for i in first..RUNS {
            let began = start + i * SPACING_MS * 1_000_000;
            if began >= we {
                break;
            }
            if began + LIFE_S * S <= ws {
                continue;
            }
            let cost = Decimal::new(i % 100 + 1, 5);
            let mut u = UsageRecord {
                record_id: format!("{ws}-{i}"),
                node: "n1".into(),
                window_start: rfc3339_of_ns(ws),
                window_end: rfc3339_of_ns(we),
                record_kind: "process".into(),
                pid: Some(u32::try_from(i).unwrap_or(0)),
                cpu_core_seconds: Decimal::new(i % 7 + 1, 0),
                gpu_memory_gb_seconds: Decimal::new(i % 50, 0),
                ..UsageRecord::default()
            };
            u.context.run_id = Some(format!("run-{i}"));
            u.context.flow_id = Some(format!("flow-{}", i % 1000));
            u.context.agent_id = Some(format!("agent-{}", i % 50));
            u.context.customer_id = Some(format!("c{}", i % 100));
            u.workload.container_id = Some(format!("ctr-{}", i % 200));
            u.cost = Some(Cost {
                cpu: cost,
                subtotal: cost,
                total: cost,
                currency: "USD".into(),
                pricing_version: "v1".into(),
                ..Cost::default()
            });
            recs.push(u);
        }
        records += recs.len();
        l.commit_window(&rfc3339_of_ns(ws), &rfc3339_of_ns(we), &recs, &[])
            .expect("commit");
        ws = we;
    }
    println!(
        "ledger: {RUNS} runs, {records} records in {} windows of {WINDOW_S} s, built in {:?}",
        (end - start) / (WINDOW_S * S),
        built.elapsed()
    );
    let text = rules_text();
    let rules = parse_text(&text, "bench.toml").expect("rules");
    assert_eq!(rules.len(), 100);
    // Per kind, on a fresh measurer each time (as one evaluation).
    let reader = crate::ledger::Ledger::open_read_only(&tmp.db()).expect("reader");
    let at = end;
    for (label, range) in [
        ("50 threshold, run cost, 5m", 0..50),
        ("10 threshold, agent cpu rate, 1m", 50..60),
        ("10 threshold, 10 customers' runs, 5m", 60..70),
        ("10 budget, customers, month", 70..80),
        ("10 threshold, run lifetime (2h)", 80..90),
        ("5 anomaly, runs vs flow, 24h", 90..95),
        ("5 waste, containers, 5m", 95..100),
    ] {
        let mut times = Vec::new();
        let mut found = 0;
        let mut queries = 0;
        // Kept across evaluations, as the engine keeps it: the first fills it.
        let mut keys = GroupKeys::default();
        for _ in 0..5 {
            let t = Instant::now();
            let mut m = Measurer::with_keys(&reader, &mut keys);
            found = 0;
            for i in range.clone() {
                found += m.observe(i, &rules[i], at).expect("observe").len();
            }
            queries = m.queries;
            times.push(t.elapsed());
        }
        let first = times[0];
        times.sort();
        println!(
            "{label}: {:?} (median of 5; the first, filling the key cache: {first:?}), {queries} ledger queries, {found} holding",
            times[2]
        );
    }
    // The whole engine: measures, state machine, saving states.
    let file = tmp.0.join("rules.toml");
    std::fs::write(&file, &text).expect("rules file");
    let handle = RulesHandle::load(
        &[],
        Some(&file),
        Vec::new(),
        Arc::new(AlertStats::default()),
    )
    .expect("load");
    let mut e = Engine::open(
        &tmp.db(),
        handle,
        &AlertingConfig::default(),
        "n1",
        Vec::new(),
        Box::new(NoChannels),
    )
    .expect("engine");
    // One evaluation per 1 s window for 2 minutes: the slow rules are
    // evaluated at the first and again 60 s later (slow_interval).
    let mut times = Vec::new();
    for k in 0..120 {
        let t = Instant::now();
        e.evaluate(at + k * S).expect("evaluate");
        times.push(t.elapsed());
    }
    let first = times[0];
    let total: std::time::Duration = times[1..].iter().sum();
    times.sort();
    println!(
        "engine, 100 rules, 120 windows: first {first:?} (every alert new), then mean {:?}, median {:?}, max {:?}; {} alerts tracked",
        total / 119,
        times[60],
        times[119],
        e.alerts().count()
    );
}
