//! Per-agent tokens, token cost and CPU for a flow on a real agent framework,
//! instrumented only by its real OpenTelemetry instrumentation: the OpenAI Agents
//! SDK (`openai-agents`) with Arize's `openinference-instrumentation-openai-agents`
//! (tests/py/agent_flow.py). A `triage` agent calls its tool (burning a known CPU
//! time), then hands off to a `tutor` agent, which calls its tool (burning twice
//! as much) and answers; every model call goes to a local fake provider with a
//! distinct usage. No `flow.run_id` or `agent.id` anywhere.
//!
//! What the instrumentation emits (dumped from the workload, one trace):
//! `Agent workflow` (root) ⊃ `triage` (`agent.name` = `graph.node.id` = triage,
//! `openinference.span.kind` AGENT) ⊃ `turn` ⊃ `generation` (`llm.model_name`,
//! `llm.token_count.prompt/completion`, no agent) / `classify` (TOOL, `tool.name`)
//! / `handoff to tutor`; then `tutor` (`agent.name` tutor, `graph.node.parent_id`
//! triage) ⊃ `turn` ⊃ `generation` / `explain`. So only the agent spans name the
//! agent, in OpenInference's `agent.name`: the model calls and tools get theirs by
//! nesting (the CPU split) and from their nearest ancestor (tokens).
//!
//! The official `opentelemetry-instrumentation-openai-agents-v2` (0.1.0, pinned too;
//! `--instrument official`) is checked the same way: it stamps
//! `gen_ai.agent.id = "agent"` on every span and `gen_ai.agent.name = "OpenAI Agent"`
//! on every model call and tool (its defaults); only its `invoke_agent triage` /
//! `invoke_agent tutor` spans name the agents, by `gen_ai.agent.name`. The agent
//! reads an agent span's name before its id, and a model call's or tool's GenAI
//! agent attributes not at all (identity/run.rs `ContextAttributes`).
//!
//! The workload exports its spans as they end (a 200 ms batch delay), as a live
//! service does: the first model call of each agent reaches the daemon before its
//! agent's span, and waits in the inbox for it (context/lineage.rs, up to
//! `span_lag`). Before that wait, such calls kept the process's agent (none here):
//! 214 of 442 input tokens billed to no agent with this flow.
//! `span_lag` 10 s: the first window's spans arrive some 4 s after it closes.
//!
//! Ground truth, from the workload: the usage the fake provider answered with per
//! agent (by the system message of each request, the agent's instructions), the CPU
//! each tool burned (its thread's CPU clock), and the process's CPU (getrusage, all
//! threads) between each agent span's start and end.

use std::collections::BTreeMap;
use std::time::Duration;

use mentat_tests::daemon::{Daemon, DaemonOptions, LedgerDir, free_port, now_rfc3339};
use mentat_tests::exact::{Exact, exact_json};
use rust_decimal::Decimal;
use serde_json::Value;

/// CPU each agent's tool burns, ms: the tutor twice the triage, so a swap shows
/// far outside the tolerance.
const BURN_MS: [(&str, u64); 2] = [("triage", 800), ("tutor", 1600)];

/// How far an agent's CPU in the ledger may be from the process's CPU during its
/// agent span, ns. The split spreads each window's CPU evenly over its time, and
/// charges the running task up to a `cpu_tick` late; the workload burns without a
/// break across every agent span's edge (the pad before the first and after the
/// last, the tools and the framework in between, one busy thread), so only a
/// change of rate inside an edge's window misplaces CPU: at most that window's
/// CPU (tick 100 ms, one busy thread: 100 ms) plus one `cpu_tick` (20 ms), at
/// each of an agent's two edges.
const CPU_TOLERANCE_NS: i128 = 2 * (100 + 20) * 1_000_000;

/// The shipped book's prices per 1000 tokens for gpt-4o-mini (deploy/pricing.toml);
/// its dated name is priced as it.
fn prices(model: &str) -> (Decimal, Decimal) {
    let d = |s: &str| s.parse::<Decimal>().expect("price");
    match model {
        "gpt-4o-mini" | "gpt-4o-mini-2024-07-18" => (d("0.00015"), d("0.0006")),
        other => panic!("no price for {other}"),
    }
}

/// `cpu_core_seconds` (a decimal string of seconds, at most 9 places) in ns.
fn cpu_ns(s: &str) -> i128 {
    let e = exact_json(&Value::String(s.to_owned())).expect("cpu_core_seconds");
    e.0 / 10i128.pow(mentat_tests::exact::SCALE - 9)
}

#[test]
fn agents_sdk_flow_is_billed_per_agent_by_its_own_instrumentation() {
    agents_sdk_flow("openinference");
}

/// The official instrumentation stamps `gen_ai.agent.id = "agent"` on every span
/// and `gen_ai.agent.name = "OpenAI Agent"` on every model call and tool: only its
/// `invoke_agent` spans name the agents (by name; the id is the same for both).
#[test]
fn agents_sdk_flow_is_billed_per_agent_by_the_official_instrumentation() {
    agents_sdk_flow("official");
}

/// Runs `py/agent_flow.py` instrumented by `instrument` against a daemon and
/// checks tokens, token cost and CPU per agent against the workload's truth.
fn agents_sdk_flow(instrument: &str) {
    let python = mentat_tests::traced::instrumentations_python();
    let dir = LedgerDir::new().expect("ledger dir");
    let http = free_port().expect("port");
    let grpc = free_port().expect("port");
    let daemon = Daemon::start(
        &dir,
        &DaemonOptions {
            extra_keys: Some("tick = \"100ms\"\nsample_interval = \"100ms\"\ncpu_tick = \"20ms\"\nspan_lag = \"10s\"\n".into()),
            extra_tables: Some(format!(
                "[receiver]\ngrpc_bind = \"127.0.0.1:{grpc}\"\nhttp_bind = \"127.0.0.1:{http}\"\n"
            )),
            ..Default::default()
        },
    )
    .expect("daemon");
    let from = now_rfc3339();
    let script = mentat_tests::traced::py_script("agent_flow.py");
    let endpoint = format!("http://127.0.0.1:{http}");
    let (triage_ms, tutor_ms) = (BURN_MS[0].1.to_string(), BURN_MS[1].1.to_string());
    let args = [
        script.to_str().expect("path"),
        "--endpoint",
        &endpoint,
        "--instrument",
        instrument,
        "--triage-ms",
        &triage_ms,
        "--tutor-ms",
        &tutor_ms,
        "--pad-ms",
        "1000",
    ];
    let out = mentat_tests::traced::run_reaped(&python, &args, &[], Duration::from_secs(120))
        .and_then(|r| r.ok("py/agent_flow.py"))
        .expect("the agent flow");
    let truth: Value =
        serde_json::from_str(out.stdout.lines().last().unwrap_or("{}")).expect("its summary");
    let pid = out.pid;
    let records = daemon
        .records_once_past(&from, out.ended, Duration::from_secs(60))
        .expect("records");
    let ours: Vec<_> = records.iter().filter(|r| r.pid == Some(pid)).collect();
    let agent_of = |r: &Value| r["agent_id"].as_str().unwrap_or("").to_owned();

    // Tokens and token cost per agent: exactly what the provider answered, each
    // call billed once and to the agent that made it.
    let mut billed: BTreeMap<String, (u64, u64, Exact)> = BTreeMap::new();
    for r in ours.iter().filter(|r| r.record_kind == "tokens") {
        let e = billed
            .entry(agent_of(&r.raw))
            .or_insert((0, 0, Exact::ZERO));
        for t in r.raw["tokens"].as_array().expect("tokens") {
            e.0 += t["input"].as_u64().expect("input");
            e.1 += t["output"].as_u64().expect("output");
            let _ = prices(t["model"].as_str().expect("model"));
        }
        e.2 =
            e.2.add(exact_json(&r.raw["cost"]["token"]).expect("token cost"))
                .expect("sum");
    }
    let mut want: BTreeMap<String, (u64, u64, Exact)> = BTreeMap::new();
    for (agent, _) in BURN_MS {
        let t = &truth["agents"][agent];
        let (input, output) = (
            t["input"].as_u64().expect("input"),
            t["output"].as_u64().expect("output"),
        );
        assert_eq!(t["calls"].as_u64(), Some(2), "{agent}: {t}");
        let (pi, po) = prices(t["model"].as_str().expect("model"));
        let cost = (Decimal::from(input) * pi + Decimal::from(output) * po) / Decimal::from(1000);
        want.insert(
            agent.to_owned(),
            (input, output, Exact::from_decimal(cost).expect("exact")),
        );
    }
    assert_eq!(
        billed,
        want,
        "tokens per agent (billed, provider); daemon log:\n{}",
        daemon.log()
    );

    // CPU per agent: the process's CPU during its agent span, within the
    // tolerance; at least what its tool burned; the two not swapped.
    let mut cpu: BTreeMap<String, i128> = BTreeMap::new();
    for r in ours.iter().filter(|r| r.record_kind == "process") {
        *cpu.entry(agent_of(&r.raw)).or_default() += cpu_ns(&r.cpu_core_seconds);
    }
    let mut report = Vec::new();
    for (agent, _) in BURN_MS {
        let t = &truth["agents"][agent];
        let span_cpu = i128::from(t["span_cpu_ns"].as_u64().expect("span_cpu_ns"));
        let burn = i128::from(t["burn_ns"].as_u64().expect("burn_ns"));
        let got = cpu.get(agent).copied().unwrap_or(0);
        report.push(format!(
            "{agent}: ledger {got} ns, span {span_cpu} ns ({:+} ms), tool burn {burn} ns",
            (got - span_cpu) / 1_000_000
        ));
        assert!(
            (got - span_cpu).abs() <= CPU_TOLERANCE_NS && got >= burn,
            "{}\nby agent: {cpu:?}",
            report.join("\n")
        );
    }
    eprintln!("{}", report.join("\n"));
    // Time outside both agents (start-up, the pads, the export) is the process's
    // own, with no agent.
    assert!(
        cpu.keys().all(|k| k.is_empty() || want.contains_key(k)),
        "an agent the flow does not have: {cpu:?}"
    );
}
