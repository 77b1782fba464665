//! Token types and model names end to end: spans from a real OTLP client (the
//! Python protobuf classes over gRPC) carrying the GenAI conventions' token
//! types, priced by the shipped book, read back from the ledger, /metrics and
//! `usage --unpriced`.

use std::time::Duration;

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, counter_in, free_port, now_rfc3339, poll,
};
use mentat_tests::exact::{Exact, exact_json};
use serde_json::Value;

/// Sends `spans` spans of `tokens` input and 2×`tokens` output tokens for `model`.
fn send(grpc: u16, spans: u32, tokens: u64, model: &str, attrs: &[&str]) {
    let target = format!("127.0.0.1:{grpc}");
    let (spans, tokens) = (spans.to_string(), tokens.to_string());
    let mut args = vec![
        "grpc", "--target", &target, "--spans", &spans, "--tokens", &tokens, "--model", model,
    ];
    for a in attrs {
        args.extend(["--attr", a]);
    }
    mentat_tests::traced::send_spans(&args, Duration::from_secs(60)).expect("py/otlp_client.py");
}

/// A dated model name is priced as the book's model, every token type at its
/// price, once; a model no book lists is counted on /metrics and listed by
/// `usage --unpriced`.
#[test]
fn dated_names_are_priced_and_unpriced_tokens_are_listed() {
    mentat_tests::traced::require_python_otel().expect("python OpenTelemetry packages");
    let dir = LedgerDir::new().expect("ledger dir");
    let grpc = free_port().expect("port");
    let http = free_port().expect("port");
    let daemon =
        Daemon::start(&dir, &DaemonOptions::receiving("2s", grpc, http, "")).expect("daemon");
    let from = now_rfc3339();
    // 4 calls of 1000 input (400 cache reads, 100 cache writes) and 2000 output
    // (500 reasoning) under the name the API answers with.
    send(
        grpc,
        4,
        1000,
        "gpt-4o-mini-2024-07-18",
        &[
            "gen_ai.usage.cache_read.input_tokens=400",
            "gen_ai.usage.cache_creation.input_tokens=100",
            "gen_ai.usage.reasoning.output_tokens=500",
        ],
    );
    // 3 calls of a model no book lists: 3 × (10 + 20) tokens priced at 0.
    send(grpc, 3, 10, "no-such-model", &[]);

    poll(Duration::from_secs(60), || {
        let text = daemon.metrics()?;
        let unpriced = counter_in(&text, "mentat_agent_unpriced_tokens_total");
        let mini = text
            .lines()
            .filter(|l| {
                l.starts_with("mentat_tokens_total{")
                    && l.contains("model=\"gpt-4o-mini\"")
                    && l.contains("type=\"input\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
        Ok(if unpriced == Some(90) && mini == 4000 {
            Ok(())
        } else {
            Err(format!(
                "unpriced {unpriced:?} (want 90), gpt-4o-mini input {mini} (want 4000)"
            ))
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}; daemon log:\n{}", daemon.log()));
    assert!(
        !daemon.metrics().expect("/metrics").contains("2024-07-18"),
        "a dated name became a label value"
    );

    // The ledger: the shipped book's gpt-4o-mini (input 0.00015, cache read
    // 0.000075, output 0.0006 per 1k; cache writes and reasoning at the input and
    // output prices) per call: 400 × 0.000075 + 100 × 0.00015 + 500 × 0.00015
    // + 2000 × 0.0006 = 0.03 + 0.015 + 0.075 + 1.2 = 1.32 per 1k → 0.00132.
    let to = now_rfc3339();
    let records = daemon.records(&from, &to).expect("records");
    let mut mini = (0, Exact::ZERO);
    let mut unknown = 0;
    for r in records.iter().filter(|r| r.record_kind == "tokens") {
        let t = &r.raw["tokens"][0];
        match t["model"].as_str() {
            Some("gpt-4o-mini-2024-07-18") => {
                assert_eq!(t["cache_creation_input"], 100, "{t}");
                assert_eq!(t["unpriced"], Value::Null, "{t}");
                mini.0 += 1;
                mini.1 = mini
                    .1
                    .add(exact_json(&r.raw["cost"]["token"]).expect("token cost"))
                    .expect("sum");
            }
            Some("no-such-model") => {
                assert_eq!(t["unpriced"], true, "{t}");
                unknown += 1;
            }
            _ => {}
        }
    }
    assert_eq!(mini.0, 4);
    assert_eq!(
        mini.1,
        Exact::parse("0.00528").expect("decimal"),
        "4 × 0.00132"
    );
    assert_eq!(unknown, 3);

    // `usage --unpriced`: the model, its usages and tokens.
    let out = daemon
        .usage(&[
            "--from",
            &from,
            "--to",
            &to,
            "--unpriced",
            "--format",
            "json",
        ])
        .expect("usage --unpriced");
    let listed: Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed[0]["model"], "no-such-model", "{listed}");
    assert_eq!(listed[0]["usages"], 3, "{listed}");
    assert_eq!(listed[0]["tokens_input"], 30, "{listed}");
    assert_eq!(listed[0]["tokens_output"], 60, "{listed}");
}
