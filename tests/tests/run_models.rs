//! The run view per model, end to end: token spans of two agents and two
//! models in one run, sent by a real OTLP client (the Python protobuf classes
//! over gRPC) to a daemon, priced by the shipped book; `/v1/runs/{id}`,
//! `/v1/usage?group_by=model` and `usage --run` read back exactly. And a run
//! whose windows are still held for late spans (`span_lag`) answers pending,
//! not 404.

use std::time::Duration;

use mentat_tests::daemon::poll;
use mentat_tests::exact::{Exact, exact_json};
use mentat_tests::traced::{TracedDaemon, unique_run_id};
use serde_json::Value;

/// Sends `spans` token spans of run `run` and agent `agent`: `tokens` input
/// and 2×`tokens` output each, for `model`, with more token attributes `attrs`.
fn send(grpc: u16, run: &str, agent: &str, model: &str, spans: u32, tokens: u64, attrs: &[&str]) {
    let target = format!("127.0.0.1:{grpc}");
    let (spans, tokens) = (spans.to_string(), tokens.to_string());
    let agent = format!("agent.id={agent}");
    let mut args = vec![
        "grpc",
        "--target",
        &target,
        "--spans",
        &spans,
        "--tokens",
        &tokens,
        "--model",
        model,
        "--run-id",
        run,
        "--resource",
        &agent,
    ];
    for a in attrs {
        args.extend(["--attr", a]);
    }
    mentat_tests::traced::send_spans(&args, Duration::from_secs(60)).expect("py/otlp_client.py");
}

/// A daemon that takes spans, with `span_lag` `lag`.
fn daemon_with_lag(lag: &str) -> TracedDaemon {
    mentat_tests::traced::require_python_otel().expect("python OpenTelemetry packages");
    TracedDaemon::start(lag, "").expect("daemon")
}

fn x(s: &str) -> Exact {
    Exact::parse(s).expect("decimal")
}

fn sum(values: impl IntoIterator<Item = Exact>) -> Exact {
    values
        .into_iter()
        .fold(Exact::ZERO, |a, b| a.add(b).expect("sum"))
}

/// The group of `key` (model, or agent and model) in a run view's list.
fn group<'a>(list: &'a Value, agent: Option<&str>, model: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|g| {
        g["model"].as_str() == Some(model)
            && agent.is_none_or(|a| g["agent_id"].as_str() == Some(a))
    })
}

/// Two agents × two models in one run: tokens and token cost per model and
/// per agent × model match the shipped book's prices exactly, and the parts
/// add up to the run's totals exactly.
#[test]
fn the_run_view_splits_tokens_and_cost_by_model_and_agent() {
    let traced = daemon_with_lag("2s");
    let (daemon, grpc) = (&traced.daemon, traced.grpc);
    let run = unique_run_id("models");
    // The shipped book: gpt-4o input 0.0025, cache read 0.00125, output 0.01
    // per 1k; gpt-4o-mini input 0.00015, output 0.0006 per 1k, reasoning at
    // the output price.
    // planner × gpt-4o: 2 calls of 1000 in (200 cached), 2000 out:
    //   (800 × 0.0025 + 200 × 0.00125 + 2000 × 0.01) / 1000 = 0.02225 each.
    send(
        grpc,
        &run,
        "planner",
        "gpt-4o",
        2,
        1000,
        &["gen_ai.usage.cache_read.input_tokens=200"],
    );
    // planner × gpt-4o-mini: 3 calls of 500 in, 1000 out: 0.000675 each.
    send(grpc, &run, "planner", "gpt-4o-mini", 3, 500, &[]);
    // coder × gpt-4o: 1 call of 300 in, 600 out: 0.00675.
    send(grpc, &run, "coder", "gpt-4o", 1, 300, &[]);
    // coder × gpt-4o-mini: 4 calls of 100 in, 200 out (50 reasoning): 0.000135 each.
    send(
        grpc,
        &run,
        "coder",
        "gpt-4o-mini",
        4,
        100,
        &["gen_ai.usage.reasoning.output_tokens=50"],
    );
    let expect = [
        ("planner", "gpt-4o", "0.0445", 2000, 4000),
        ("planner", "gpt-4o-mini", "0.002025", 1500, 3000),
        ("coder", "gpt-4o", "0.00675", 300, 600),
        ("coder", "gpt-4o-mini", "0.00054", 400, 800),
    ];

    // Committed once a window past the spans has waited span_lag.
    let mut view = Value::Null;
    poll(Duration::from_secs(60), || {
        view = daemon.get_json(&format!("/v1/runs/{run}"), &[])?;
        let tokens =
            |m: &str| group(&view["by_model"], None, m).and_then(|g| g["tokens"]["input"].as_u64());
        Ok(
            if view["pending"] == false
                && tokens("gpt-4o") == Some(2300)
                && tokens("gpt-4o-mini") == Some(1900)
            {
                Ok(())
            } else {
                Err(format!("run view not final yet: {view}"))
            },
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}; daemon log:\n{}", daemon.log()));

    for (agent, model, cost, input, output) in expect {
        let g = group(&view["by_agent_model"], Some(agent), model)
            .unwrap_or_else(|| panic!("no {agent} × {model} in {view}"));
        assert_eq!(
            exact_json(&g["token_cost"]).expect("cost"),
            x(cost),
            "{agent} × {model}: {g}"
        );
        assert_eq!(g["tokens"]["input"], input, "{g}");
        assert_eq!(g["tokens"]["output"], output, "{g}");
    }
    let m4o = group(&view["by_model"], None, "gpt-4o").expect("gpt-4o");
    assert_eq!(exact_json(&m4o["token_cost"]).expect("cost"), x("0.05125"));
    assert_eq!(m4o["tokens"]["cache_read_input"], 400, "{m4o}");
    assert_eq!(
        m4o["totals"]["records"], 3,
        "one token record per call: {m4o}"
    );
    let mini = group(&view["by_model"], None, "gpt-4o-mini").expect("gpt-4o-mini");
    assert_eq!(
        exact_json(&mini["token_cost"]).expect("cost"),
        x("0.002565")
    );
    assert_eq!(mini["tokens"]["reasoning_output"], 200, "{mini}");

    // The parts add up to the run's totals exactly (the model-less group
    // holds the client process's CPU, with no tokens).
    let total_token = exact_json(&view["totals"]["cost"]["token"]).expect("total");
    let total_cost = exact_json(&view["totals"]["cost"]["total"]).expect("total");
    let list = |k: &str| view[k].as_array().cloned().unwrap_or_default();
    assert_eq!(
        sum(list("by_model")
            .iter()
            .map(|g| exact_json(&g["token_cost"]).expect("cost"))),
        total_token
    );
    assert_eq!(total_token, x("0.053815"), "0.05125 + 0.002565");
    assert_eq!(
        sum(list("by_agent_model")
            .iter()
            .map(|g| exact_json(&g["token_cost"]).expect("cost"))),
        total_token
    );
    assert_eq!(
        sum(list("by_model")
            .iter()
            .map(|g| exact_json(&g["totals"]["cost"]["total"]).expect("cost"))),
        total_cost
    );
    let inputs: u64 = list("by_model")
        .iter()
        .filter_map(|g| g["tokens"]["input"].as_u64())
        .sum();
    assert_eq!(Some(inputs), view["totals"]["tokens_input"].as_u64());

    // `model` as /v1/usage's group_by and where.
    let from =
        mentat_tests::daemon::rfc3339(time::OffsetDateTime::now_utc() - time::Duration::hours(1));
    let usage = daemon
        .get_json(
            "/v1/usage",
            &[
                ("from", &from),
                ("group_by", "model,agent_id"),
                ("where", &format!("run_id={run},model=gpt-4o-mini")),
            ],
        )
        .expect("usage by model");
    let root = &usage["root"];
    assert_eq!(
        exact_json(&root["totals"]["cost"]["token"]).expect("cost"),
        x("0.002565")
    );
    assert_eq!(root["children"][0]["key"], "gpt-4o-mini", "{usage}");
    let agents: Vec<&str> = root["children"][0]["children"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["key"].as_str())
        .collect();
    assert_eq!(agents, ["coder", "planner"], "{usage}");

    // `usage --run` prints the models.
    let out = daemon.usage(&["--run", &run]).expect("usage --run");
    assert!(
        out.stdout.contains("by model") && out.stdout.contains("planner / gpt-4o-mini"),
        "{}",
        out.stdout
    );
    assert!(!out.stdout.contains("PENDING"), "{}", out.stdout);
    println!("{}", out.stdout);
}

/// Inside span_lag the run view says pending, with the spans received, rather
/// than 404; a run nobody sent is still a 404; once the windows are committed
/// the same run is final.
#[test]
fn a_run_inside_span_lag_is_pending_then_final() {
    let traced = daemon_with_lag("20s");
    let (daemon, grpc) = (&traced.daemon, traced.grpc);
    let run = unique_run_id("pending");
    send(grpc, &run, "solo", "gpt-4o", 2, 1000, &[]);
    // The receiver admitted the spans before it answered the client.
    let view = daemon
        .get_json(&format!("/v1/runs/{run}"), &[])
        .unwrap_or_else(|e| panic!("{e:#}; daemon log:\n{}", daemon.log()));
    assert_eq!(view["pending"], true, "{view}");
    assert_eq!(view["received"]["spans"], 2, "{view}");
    assert_eq!(view["received"]["token_spans"], 2, "{view}");
    assert_eq!(
        view["received"]["agents"],
        serde_json::json!(["solo"]),
        "{view}"
    );
    let out = daemon.usage(&["--run", &run]).expect("usage --run");
    assert!(
        out.stdout.contains("PENDING") && out.stdout.contains("span_lag"),
        "{}",
        out.stdout
    );
    let nobody = daemon.get("/v1/runs/nobody-sent-this", &[]).expect("GET");
    assert_eq!(nobody.status, 404, "{}", nobody.body);

    // span_lag (20 s) and a tick or two later, the same run is final:
    // 2 × (1000 × 0.0025 + 2000 × 0.01) / 1000 = 0.045.
    poll(Duration::from_secs(90), || {
        let view = daemon.get_json(&format!("/v1/runs/{run}"), &[])?;
        let cost = group(&view["by_model"], None, "gpt-4o").map(|g| g["token_cost"].clone());
        Ok(
            if view["pending"] == false
                && cost.as_ref().and_then(|c| exact_json(c).ok()) == Some(x("0.045"))
            {
                Ok(())
            } else {
                Err(format!("not final yet: {view}"))
            },
        )
    })
    .unwrap_or_else(|e| panic!("{e:#}; daemon log:\n{}", daemon.log()));
}
