//! The trace-context join, end to end (issue 5): what did flow run X cost, per agent,
//! per span and per token.
//!
//! - A flow instrumented with the real OpenTelemetry Python SDK (`py/flow.py`): an
//!   orchestrator and two agent subprocesses under one `flow.run_id`, context passed
//!   to the subprocesses through `OTEL_RESOURCE_ATTRIBUTES` and `TRACEPARENT`. Each
//!   agent's CPU is compared with the `wait4` rusage its orchestrator reaped, tokens
//!   and their cost with a hand computation from `deploy/pricing.toml`, and the
//!   critical path with the flow's shape.
//! - A process with only `TRACEPARENT` and `OTEL_RESOURCE_ATTRIBUTES` in its
//!   environment (no SDK) and the child it forks: both in the run, in the daemon and in
//!   `mentat-agent record --group-by run_id`.
//! - Two runs interleaved in one process through overlapping spans (`py/interleave.py`):
//!   split by the rule in `agent/src/context/index.rs`, to the nanosecond, and the parts sum
//!   exactly to the process's total.
//! - A process whose SDK resource (set in code, not in its environment) names the run
//!   (`py/resource_run.py`): its whole life is the run's, start-up before its first span
//!   and work after its last one included.
//!
//! Each test starts its own daemon (fresh ledger, 1 s tick, free ports) and needs root.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mentat_tests::daemon::{Daemon, parse_time, rfc3339};
use mentat_tests::exact::{Exact, exact_json};
use mentat_tests::traced::{
    TracedDaemon, require_python_otel, run_python, run_reaped, trace_id, unique_run_id,
};
use mentat_tests::truth::Burn;
use mentat_tests::{Records, percent_off, record_raw, within, workload_bin};
use rust_decimal::Decimal;
use serde_json::Value;
use time::OffsetDateTime;

/// The allowance between the agent's CPU and `wait4`'s. Both read the
/// scheduler's clock (`sum_exec_runtime`, of which rusage's user + system is a split),
/// so they differ only at the edges of a process's life: its first slice after fork
/// and its last before exit.
const CPU_TOLERANCE: f64 = 0.02;

/// How long a closed window waits for late spans. The SDK flow exports its spans
/// when each process exits, and `py/interleave.py` when each span ends, at most 2 s
/// after the span's start: 4 s leaves the window that holds a span's start 2 s of
/// margin on this loaded 2-core machine.
const SPAN_LAG: &str = "4s";

/// From the last process's exit to its last window in the ledger: one tick to close
/// the window, `SPAN_LAG`, the commit; generous for a loaded machine.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);

const NS: i128 = 1_000_000_000;

/// `cpu_core_seconds` (a decimal string of seconds with at most 9 places) in ns.
fn cpu_ns(v: &Value) -> Result<i128> {
    let e = exact_json(v)?;
    let unit = 10i128.pow(mentat_tests::exact::SCALE - 9);
    ensure!(e.0 % unit == 0, "{v} has more than 9 decimal places");
    Ok(e.0 / unit)
}

/// Every record matching `filter` (`field=value`) whose window starts at or after
/// `from`, through `/v1/records`, all pages.
fn records_where(daemon: &Daemon, from: OffsetDateTime, filter: &str) -> Result<Vec<Value>> {
    let from = rfc3339(from);
    let to = rfc3339(OffsetDateTime::now_utc() + time::Duration::minutes(5));
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut query = vec![
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("where", filter),
            ("limit", "1000"),
        ];
        if let Some(a) = &after {
            query.push(("after", a));
        }
        let body = daemon.get_json("/v1/records", &query)?;
        out.extend(
            body["records"]
                .as_array()
                .with_context(|| format!("no records array: {body}"))?
                .iter()
                .cloned(),
        );
        match body["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(out),
        }
    }
}

// ---------------------------------------------------------------------------
// The price book, read by hand.

/// The prices the test needs, from `deploy/pricing.toml` (the agent's built-in book),
/// read line by line: `key = "decimal"` under `[section]` headers.
struct Prices {
    version: String,
    cpu_per_core_hour: Decimal,
    memory_per_gb_hour: Decimal,
    network_per_gb: Decimal,
    /// model → (input_per_1k, output_per_1k, cache_read_input_per_1k)
    models: BTreeMap<String, (Decimal, Decimal, Decimal)>,
}

fn prices() -> Result<Prices> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pricing.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut section = String::new();
    let mut values: BTreeMap<(String, String), String> = BTreeMap::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').trim().replace('"', "");
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            values.insert(
                (section.clone(), k.trim().to_string()),
                v.trim().trim_matches('"').to_string(),
            );
        }
    }
    let get = |section: &str, key: &str| -> Result<Decimal> {
        let v = values
            .get(&(section.to_string(), key.to_string()))
            .with_context(|| format!("pricing.toml has no [{section}] {key}"))?;
        v.parse()
            .with_context(|| format!("[{section}] {key} = {v:?} is not a decimal"))
    };
    let mut models = BTreeMap::new();
    for (s, _) in values.keys() {
        if let Some(model) = s.strip_prefix("models.") {
            let input = get(s, "input_per_1k")?;
            let cache = get(s, "cache_read_input_per_1k").unwrap_or(input);
            models.insert(model.to_string(), (input, get(s, "output_per_1k")?, cache));
        }
    }
    Ok(Prices {
        version: values
            .get(&(String::new(), "version".into()))
            .cloned()
            .context("pricing.toml has no version")?,
        cpu_per_core_hour: get("", "cpu_per_core_hour")?,
        memory_per_gb_hour: get("", "memory_per_gb_hour")?,
        network_per_gb: get("network", "per_gb")?,
        models,
    })
}

impl Prices {
    /// The book's token formula for one model's counts.
    fn tokens(&self, model: &str, input: u64, cache: u64, output: u64) -> Result<Decimal> {
        let (pin, pout, pcache) = self
            .models
            .get(model)
            .with_context(|| format!("no price for model {model}"))?;
        let k = Decimal::from(1000);
        Ok(Decimal::from(input - cache) * pin / k
            + Decimal::from(cache) * pcache / k
            + Decimal::from(output) * pout / k)
    }
}

fn dec(v: &Value) -> Result<Decimal> {
    match v {
        Value::String(s) => s.parse().with_context(|| format!("{s:?} is not a decimal")),
        Value::Number(n) => n
            .to_string()
            .parse()
            .with_context(|| format!("{n} is not a decimal")),
        Value::Null => Ok(Decimal::ZERO),
        other => bail!("{other} is not a decimal"),
    }
}

/// Checks one record's cost against the book by hand: the token part exactly, CPU,
/// memory and network to 10⁻²⁴ (Decimal keeps 28 significant digits, so dividing by
/// 3600 or 1024³ in another order can differ in the last places), the sums exactly.
fn check_record_cost(r: &Value, book: &Prices) -> Result<()> {
    let id = r["record_id"].as_str().unwrap_or("?");
    let cost = &r["cost"];
    ensure!(cost.is_object(), "record {id} is not priced: {r}");
    ensure!(
        cost["currency"] == "USD" && cost["pricing_version"] == book.version.as_str(),
        "record {id}: priced with {} {} instead of the built-in book {}",
        cost["currency"],
        cost["pricing_version"],
        book.version
    );
    let mut tokens = Decimal::ZERO;
    for t in r["tokens"].as_array().into_iter().flatten() {
        let n = |k: &str| t[k].as_u64().unwrap_or(0);
        tokens += book.tokens(
            t["model"].as_str().unwrap_or(""),
            n("input"),
            n("cache_read_input"),
            n("output"),
        )?;
    }
    let hour = Decimal::from(3600);
    let gib = Decimal::from(1u64 << 30);
    let net = Decimal::from(
        r["network_rx_bytes"].as_u64().unwrap_or(0) + r["network_tx_bytes"].as_u64().unwrap_or(0),
    );
    let hand = [
        (
            "cpu",
            dec(&r["cpu_core_seconds"])? * book.cpu_per_core_hour / hour,
        ),
        (
            "memory",
            dec(&r["memory_gb_seconds"])? * book.memory_per_gb_hour / hour,
        ),
        ("network", net * book.network_per_gb / gib),
    ];
    let tolerance = Decimal::new(1, 24);
    for (part, want) in hand {
        let got = dec(&cost[part])?;
        ensure!(
            (got - want).abs() <= tolerance,
            "record {id}: cost.{part} {got}, by hand {want}"
        );
    }
    ensure!(
        dec(&cost["token"])? == tokens,
        "record {id}: cost.token {}, by hand {tokens}",
        cost["token"]
    );
    let parts = ["cpu", "memory", "gpu", "network", "storage", "token"]
        .iter()
        .map(|p| exact_json(&cost[*p]))
        .try_fold(Exact::ZERO, |acc, p| acc.add(p?))?;
    ensure!(
        exact_json(&cost["subtotal"])? == parts,
        "record {id}: subtotal {} is not the sum of its parts {parts}",
        cost["subtotal"]
    );
    // No customer_id or user_id: no billed party, so no volume discount.
    ensure!(
        dec(&cost["discount"])?.is_zero() && cost["total"] == cost["subtotal"],
        "record {id}: discount {} / total {} on a record with no billed party",
        cost["discount"],
        cost["total"]
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. A real SDK flow.

/// ROLE:MODEL:PLAN_MS:LLM_MS:INPUT_TOKENS:CACHE_READ_TOKENS:OUTPUT_TOKENS. The coder
/// burns three times the planner's CPU, so with both started at once it ends last:
/// its chain is the critical path.
const PLANNER: &str = "planner:gpt-4o:150:250:1200:400:300";
const CODER: &str = "coder:gpt-4o-mini:400:800:5000:0:800";

/// What the SDK flow test checks the run view against.
struct Flow<'a> {
    d: &'a TracedDaemon,
    run_id: &'a str,
    /// The orchestrator, reaped here: its wait4 covers both agents it reaped.
    reaped: &'a mentat_tests::traced::Reaped,
    /// What `py/flow.py` printed.
    truth: &'a Value,
    view: &'a Value,
    book: &'a Prices,
}

impl Flow<'_> {
    fn agent(&self, role: &str) -> Result<&Value> {
        self.view["by_agent"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["agent_id"] == role)
            .map(|a| &a["totals"])
            .with_context(|| format!("no agent {role} in the run view: {:#}", self.view))
    }

    fn rusage(&self, role: &str) -> Result<u64> {
        self.truth["agents"][role]["rusage_cpu_ns"]
            .as_u64()
            .with_context(|| format!("no rusage for {role}: {}", self.truth))
    }

    /// (a) Each agent's CPU against the rusage its orchestrator reaped.
    fn agents_cpu(&self) -> Result<()> {
        for role in ["planner", "coder"] {
            let want = self.rusage(role)?;
            let got = u64::try_from(cpu_ns(&self.agent(role)?["cpu_core_seconds"])?)?;
            ensure!(
                within(got, want, CPU_TOLERANCE),
                "agent {role}: the run view says {got} ns of CPU, wait4 {want} ns ({:+.2} %)",
                percent_off(got, want)
            );
        }
        let agents: BTreeSet<&str> = self.view["by_agent"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a["agent_id"].as_str())
            .collect();
        ensure!(
            agents == BTreeSet::from(["coder", "orchestrator", "planner"]),
            "agents of the run: {agents:?}"
        );
        Ok(())
    }

    /// (a) The whole run against the orchestrator's wait4 (its own CPU and both
    /// agents', which it reaped): the orchestrator is in the run through its
    /// environment, and its `flow` span binds part of its time to the run's trace.
    fn run_cpu(&self) -> Result<()> {
        let total = u64::try_from(cpu_ns(&self.view["totals"]["cpu_core_seconds"])?)?;
        let want = self.reaped.rusage_cpu_ns;
        let own_want = want
            .saturating_sub(self.rusage("planner")?)
            .saturating_sub(self.rusage("coder")?);
        let own_got = cpu_ns(&self.agent("orchestrator")?["cpu_core_seconds"])?;
        ensure!(
            within(total, want, CPU_TOLERANCE),
            "the run: {total} ns of CPU, the orchestrator's wait4 (with both agents) {want} ns \
             ({:+.2} %); the orchestrator's own: {own_got} ns in the run, {own_want} ns by wait4",
            percent_off(total, want)
        );
        Ok(())
    }

    /// (b) Tokens exactly, per agent and for the run, and (c) their cost by hand.
    fn tokens(&self) -> Result<Decimal> {
        let mut want_cost = Decimal::ZERO;
        let (mut sum_in, mut sum_cache, mut sum_out) = (0, 0, 0);
        for spec in [PLANNER, CODER] {
            let f: Vec<&str> = spec.split(':').collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap_or(u64::MAX);
            let (role, model, tin, tcache, tout) = (f[0], f[1], n(4), n(5), n(6));
            let t = self.agent(role)?;
            let got = (
                t["tokens_input"].as_u64(),
                t["tokens_cache_read_input"].as_u64(),
                t["tokens_output"].as_u64(),
            );
            ensure!(
                got == (Some(tin), Some(tcache), Some(tout)),
                "agent {role}: tokens (input, cache read, output) {got:?}, sent ({tin}, {tcache}, {tout})"
            );
            let hand = self.book.tokens(model, tin, tcache, tout)?;
            ensure!(
                dec(&t["cost"]["token"])? == hand,
                "agent {role}: token cost {}, by hand {hand}",
                t["cost"]["token"]
            );
            want_cost += hand;
            (sum_in, sum_cache, sum_out) = (sum_in + tin, sum_cache + tcache, sum_out + tout);
        }
        let t = &self.view["totals"];
        ensure!(
            (
                t["tokens_input"].as_u64(),
                t["tokens_cache_read_input"].as_u64(),
                t["tokens_output"].as_u64()
            ) == (Some(sum_in), Some(sum_cache), Some(sum_out)),
            "run tokens {t}"
        );
        ensure!(
            dec(&t["cost"]["token"])? == want_cost,
            "run token cost {}, by hand {want_cost}",
            t["cost"]["token"]
        );
        Ok(want_cost)
    }

    /// (c) Every record of the run priced by hand; the run's total is their exact sum,
    /// and so is the sum over its agents.
    fn cost(&self) -> Result<()> {
        let records = records_where(
            &self.d.daemon,
            self.reaped.started - time::Duration::seconds(60),
            &format!("run_id={}", self.run_id),
        )?;
        let mut sum = Exact::ZERO;
        for r in &records {
            check_record_cost(r, self.book)?;
            sum = sum.add(exact_json(&r["cost"]["total"])?)?;
        }
        let t = &self.view["totals"];
        ensure!(
            exact_json(&t["cost"]["total"])? == sum,
            "run cost {} != Σ of its {} records' cost.total {sum}",
            t["cost"]["total"],
            records.len()
        );
        let by_agent = self.view["by_agent"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|a| exact_json(&a["totals"]["cost"]["total"]))
            .try_fold(Exact::ZERO, |acc, c| acc.add(c?))?;
        ensure!(
            by_agent == sum,
            "Σ by_agent cost {by_agent} != run cost {sum}"
        );
        let kinds: BTreeSet<&str> = records
            .iter()
            .filter_map(|r| r["record_kind"].as_str())
            .collect();
        ensure!(
            kinds.contains("tokens") && kinds.contains("process"),
            "record kinds of the run: {kinds:?}"
        );
        Ok(())
    }

    /// (d) All nine spans, each with the pid of the process that sent it (the
    /// agents' resources do not name it: the receiver found it from the socket), and
    /// the critical path: the root, then at each level the child that ended last.
    fn spans(&self, token_cost: Decimal) -> Result<()> {
        let (view, truth) = (self.view, self.truth);
        let spans = view["spans"].as_array().context("no spans")?;
        let pid_of = |role: &str| truth["agents"][role]["pid"].as_u64();
        for (key, ids) in truth["spans"].as_object().context("no spans in truth")? {
            let (role, pid) = match key.split_once('/') {
                Some((role, _)) => (role, pid_of(role)),
                None => ("orchestrator", truth["orchestrator_pid"].as_u64()),
            };
            let s = spans
                .iter()
                .find(|s| s["span_id"] == ids["span_id"])
                .with_context(|| {
                    format!("span {key} ({}) missing from the run view", ids["span_id"])
                })?;
            ensure!(
                s["agent_id"] == role
                    && s["pid"].as_u64() == pid
                    && s["trace_id"] == truth["trace_id"],
                "span {key}: agent {} pid {} trace {}, expected {role} {pid:?} {}",
                s["agent_id"],
                s["pid"],
                s["trace_id"],
                truth["trace_id"]
            );
        }
        ensure!(spans.len() == 9, "{} spans in the run view", spans.len());
        let path: Vec<(&str, &str)> = view["critical_path"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|s| {
                (
                    s["span_id"].as_str().unwrap_or(""),
                    s["agent_id"].as_str().unwrap_or(""),
                )
            })
            .collect();
        let want: Vec<(&str, &str)> = [
            ("flow", "orchestrator"),
            ("run coder", "orchestrator"),
            ("coder/coder work", "coder"),
            ("coder/llm call", "coder"),
        ]
        .iter()
        .map(|(k, a)| (truth["spans"][*k]["span_id"].as_str().unwrap_or("?"), *a))
        .collect();
        ensure!(
            path == want,
            "critical path {:#}, expected {want:?}",
            view["critical_path"]
        );
        // The root's inclusive cost covers every LLM call (each inside its agent's
        // spans) and no more than the run.
        let root = dec(&view["critical_path_cost"])?;
        let total = dec(&view["totals"]["cost"]["total"])?;
        ensure!(
            root >= token_cost && root <= total,
            "the flow span's inclusive cost {root} is outside [tokens {token_cost}, run {total}]"
        );
        Ok(())
    }

    /// `mentat-agent usage --run` prints the same view.
    fn cli(&self) -> Result<()> {
        let out = self.d.daemon.usage(&["--run", self.run_id])?;
        ensure!(
            out.stdout
                .contains("critical path: flow → run coder → coder work → llm call"),
            "usage --run printed no critical path line:\n{}",
            out.stdout
        );
        ensure!(
            out.stdout.contains(self.run_id) && out.stdout.contains("planner"),
            "usage --run:\n{}",
            out.stdout
        );
        Ok(())
    }
}

#[test]
fn sdk_flow_run_costs_per_agent_span_and_token() -> Result<()> {
    require_python_otel()?;
    let book = prices()?;
    let d = TracedDaemon::start(SPAN_LAG, "")?;
    let run_id = unique_run_id("sdk-flow");
    let attrs = format!("flow.id=e2e-flow,flow.run_id={run_id},agent.id=orchestrator");
    let endpoint = d.grpc_endpoint();
    let reaped = run_python(
        "flow.py",
        &[
            "orchestrator",
            "--endpoint",
            &endpoint,
            "--agent",
            PLANNER,
            "--agent",
            CODER,
        ],
        &[("OTEL_RESOURCE_ATTRIBUTES", &attrs)],
        Duration::from_secs(120),
    )?
    .ok("py/flow.py")?;
    let truth = reaped.truth()?;
    d.wait_committed(reaped.ended, COMMIT_TIMEOUT)?;
    let view = d.run_view(&run_id)?;
    let flow = Flow {
        d: &d,
        run_id: &run_id,
        reaped: &reaped,
        truth: &truth,
        view: &view,
        book: &book,
    };
    // Every check runs, so one failure does not hide another.
    let mut failures = Vec::new();
    let mut note = |what: &str, r: Result<()>| {
        if let Err(e) = r {
            failures.push(format!("{what}: {e:#}"));
        }
    };
    note("(a) agents' CPU", flow.agents_cpu());
    note("(a) the run's CPU", flow.run_cpu());
    let token_cost = flow.tokens();
    let token_cost = match token_cost {
        Ok(c) => c,
        Err(e) => {
            note("(b) tokens", Err(e));
            Decimal::ZERO
        }
    };
    note("(c) cost", flow.cost());
    note("(d) spans", flow.spans(token_cost));
    note("usage --run", flow.cli());
    ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
    Ok(())
}

// ---------------------------------------------------------------------------
// 2. Environment only.

fn env_context(run_id: &str, trace: &str) -> [(&'static str, String); 2] {
    [
        ("TRACEPARENT", format!("00-{trace}-00f067aa0ba902b7-01")),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("flow.id=env-flow,flow.run_id={run_id},agent.id=env-agent"),
        ),
    ]
}

#[test]
fn env_only_process_and_its_child_are_in_the_run() -> Result<()> {
    let d = TracedDaemon::start(SPAN_LAG, "")?;
    let (run_id, trace) = (unique_run_id("env-only"), trace_id());
    let env = env_context(&run_id, &trace);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let workload = workload_bin()?;
    let reaped = run_reaped(
        &workload,
        &["burn", "--threads", "1", "--ms", "800"],
        &env,
        Duration::from_secs(60),
    )?
    .ok("workload burn")?;
    let burn: Burn = serde_json::from_value(reaped.truth()?)?;
    d.wait_committed(reaped.ended, COMMIT_TIMEOUT)?;
    let view = d.run_view(&run_id)?;

    // The run's CPU is the workload's and its forked child's: wait4 on the workload
    // returns both (it reaped the child).
    let total = u64::try_from(cpu_ns(&view["totals"]["cpu_core_seconds"])?)?;
    ensure!(
        within(total, reaped.rusage_cpu_ns, CPU_TOLERANCE),
        "run {run_id}: {total} ns of CPU, wait4 of the workload and its child {} ns ({:+.2} %)",
        reaped.rusage_cpu_ns,
        percent_off(total, reaped.rusage_cpu_ns)
    );
    let records = records_where(
        &d.daemon,
        reaped.started - time::Duration::seconds(10),
        &format!("run_id={run_id}"),
    )?;
    let mut cpu_by_pid: BTreeMap<u64, i128> = BTreeMap::new();
    for r in &records {
        ensure!(
            r["trace_id"] == trace.as_str()
                && r["agent_id"] == "env-agent"
                && r["flow_id"] == "env-flow",
            "a record of the run lacks the environment's context: {r}"
        );
        *cpu_by_pid
            .entry(r["pid"].as_u64().unwrap_or(0))
            .or_default() += cpu_ns(&r["cpu_core_seconds"])?;
    }
    let pids: BTreeSet<u64> = cpu_by_pid.keys().copied().collect();
    ensure!(
        pids == BTreeSet::from([u64::from(burn.parent_pid), u64::from(burn.child_pid)]),
        "pids in run {run_id}: {pids:?}; the workload was {} and its child {}",
        burn.parent_pid,
        burn.child_pid
    );
    // The child inherited the run: its own CPU is there, not only its parent's.
    let child = u64::try_from(cpu_by_pid[&u64::from(burn.child_pid)])?;
    ensure!(
        within(child, burn.rusage_cpu_ns, CPU_TOLERANCE),
        "the forked child: {child} ns in the run, wait4 {} ns ({:+.2} %)",
        burn.rusage_cpu_ns,
        percent_off(child, burn.rusage_cpu_ns)
    );
    ensure!(
        view["spans"].as_array().is_some_and(Vec::is_empty)
            && view["critical_path"].as_array().is_some_and(Vec::is_empty),
        "a run without spans has spans or a path: {view:#}"
    );
    Ok(())
}

#[test]
fn record_groups_an_env_only_run_with_its_child() -> Result<()> {
    let (run_id, trace) = (unique_run_id("env-record"), trace_id());
    // `env` sets the context and execs the workload, which forks the burning child.
    let mut command: Vec<OsString> = vec!["env".into()];
    command.extend(
        env_context(&run_id, &trace)
            .iter()
            .map(|(k, v)| OsString::from(format!("{k}={v}"))),
    );
    command.push(workload_bin()?.into_os_string());
    command.extend(["burn", "--threads", "1", "--ms", "500"].map(OsString::from));
    let raw = record_raw("jsonl", &["--group-by", "run_id"], Some(&command))?;
    raw.output.ensure_success(&raw.invocation)?;
    let records = Records::parse(&raw.text).context("the records")?;
    let burn: Burn = raw
        .output
        .stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("no ground truth from the workload")
        .and_then(|l| Ok(serde_json::from_str(l)?))?;
    let group = records
        .groups
        .iter()
        .find(|g| g.group.as_deref() == Some(run_id.as_str()))
        .with_context(|| {
            format!(
                "no group for run {run_id}; groups: {:?}",
                records.groups.iter().map(|g| &g.group).collect::<Vec<_>>()
            )
        })?;
    ensure!(
        group.group_by == "run_id" && group.processes == 2,
        "run {run_id}'s group: {group:?} (expected the workload and its child)"
    );
    // The group holds the child's burn and the parent's fork-and-wait (about a
    // millisecond, inside the tolerance): at least the child, at most 2 % above it.
    ensure!(
        group.cpu_ns >= burn.rusage_cpu_ns * 99 / 100
            && within(group.cpu_ns, burn.rusage_cpu_ns, CPU_TOLERANCE),
        "run {run_id}'s group: {} ns of CPU; the child's wait4 {} ns ({:+.2} %)",
        group.cpu_ns,
        burn.rusage_cpu_ns,
        percent_off(group.cpu_ns, burn.rusage_cpu_ns)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// 3. Two runs interleaved in one process.

/// The part of `[ws, we)` covered by span `a` alone, by `b` alone, and by both (ns).
fn coverage(ws: i128, we: i128, a: (i128, i128), b: (i128, i128)) -> (i128, i128, i128) {
    let overlap = |(s, e): (i128, i128)| (e.min(we) - s.max(ws)).max(0);
    let both = overlap((a.0.max(b.0), a.1.min(b.1)));
    (overlap(a) - both, overlap(b) - both, both)
}

/// The process's CPU over [from, to] by its own clock, interpolating its samples.
fn cpu_between(samples: &[(i128, i128)], from: i128, to: i128) -> Result<i128> {
    let at = |t: i128| -> Result<i128> {
        let i = samples
            .windows(2)
            .position(|w| w[0].0 <= t && t <= w[1].0)
            .with_context(|| format!("no samples around {t}"))?;
        let ((t0, c0), (t1, c1)) = (samples[i], samples[i + 1]);
        Ok(if t1 == t0 {
            c0
        } else {
            c0 + (c1 - c0) * (t - t0) / (t1 - t0)
        })
    };
    Ok(at(to)? - at(from)?)
}

#[test]
fn interleaved_runs_in_one_process_split_as_documented() -> Result<()> {
    require_python_otel()?;
    let d = TracedDaemon::start(SPAN_LAG, "")?;
    let (run_a, run_b) = (unique_run_id("run-a"), unique_run_id("run-b"));
    let endpoint = d.grpc_endpoint();
    let p = run_python(
        "interleave.py",
        &[
            "--endpoint",
            &endpoint,
            "--run-a",
            &run_a,
            "--run-b",
            &run_b,
            "--lead-ms",
            "1500",
            "--tail-ms",
            "1500",
        ],
        &[],
        Duration::from_secs(60),
    )?
    .ok("py/interleave.py")?;
    let truth = p.truth()?;
    ensure!(
        truth["pid"].as_u64() == Some(u64::from(p.pid)),
        "the script's pid {} is not the one started, {}",
        truth["pid"],
        p.pid
    );
    let span = |k: &str| -> Result<(i128, i128)> {
        let s = &truth["spans"][k];
        Ok((
            i128::from(s["start"].as_u64().context("span start")?),
            i128::from(s["end"].as_u64().context("span end")?),
        ))
    };
    let (a, b) = (span("A")?, span("B")?);
    d.wait_committed(p.ended, COMMIT_TIMEOUT)?;

    // The process's records, window by window: (A, B, neither) parts.
    let records = records_where(
        &d.daemon,
        p.started - time::Duration::seconds(5),
        &format!("pid={}", p.pid),
    )?;
    let mut windows: BTreeMap<(i128, i128), [i128; 3]> = BTreeMap::new();
    for r in records.iter().filter(|r| r["record_kind"] == "process") {
        let t = |k: &str| -> Result<i128> {
            Ok(parse_time(r[k].as_str().context("window bound")?)?.unix_timestamp_nanos())
        };
        let slot = match r["run_id"].as_str() {
            Some(id) if id == run_a => 0,
            Some(id) if id == run_b => 1,
            None => 2,
            Some(other) => bail!("pid {} has a record of run {other}: {r}", p.pid),
        };
        windows
            .entry((t("window_start")?, t("window_end")?))
            .or_default()[slot] += cpu_ns(&r["cpu_core_seconds"])?;
    }
    ensure!(!windows.is_empty(), "no records for pid {}", p.pid);

    // The documented rule, window by window: the window's CPU spread evenly over it;
    // each instant to the runs whose spans cover it, shared equally; uncovered time to
    // the process's own context (here none). Parts are rounded to 10⁻⁹ of the window,
    // then to whole ns by largest remainder: 2 ns per part at most.
    let mut sums = [0i128; 3];
    for (&(ws, we), parts) in &windows {
        let whole: i128 = parts.iter().sum();
        let len = we - ws;
        ensure!(len > 0, "an empty window [{ws}, {we})");
        let (a_only, b_only, both) = coverage(ws, we, a, b);
        let want_a = whole * (2 * a_only + both) / (2 * len);
        let want_b = whole * (2 * b_only + both) / (2 * len);
        for (name, got, want) in [("A", parts[0], want_a), ("B", parts[1], want_b)] {
            ensure!(
                (got - want).abs() <= 2,
                "window [{ws}, {we}): run {name} got {got} ns of the process's {whole} ns, \
                 the rule gives {want} ns (A alone {a_only} ns, B alone {b_only} ns, both {both} ns)"
            );
        }
        for i in 0..3 {
            sums[i] += parts[i];
        }
    }
    let [cpu_a, cpu_b, cpu_none] = sums;

    // Together they are the process's total in the ledger, exactly; and each run's
    // view holds exactly its part.
    let usage = d.daemon.get_json(
        "/v1/usage",
        &[
            ("from", &rfc3339(p.started - time::Duration::seconds(5))),
            ("where", &format!("pid={}", p.pid)),
        ],
    )?;
    let ledger_total = cpu_ns(&usage["root"]["totals"]["cpu_core_seconds"])?;
    ensure!(
        cpu_a + cpu_b + cpu_none == ledger_total,
        "A {cpu_a} + B {cpu_b} + no run {cpu_none} != the process's {ledger_total} ns in the ledger"
    );
    for (run, part) in [(&run_a, cpu_a), (&run_b, cpu_b)] {
        let view = d.run_view(run)?;
        let got = cpu_ns(&view["totals"]["cpu_core_seconds"])?;
        ensure!(
            got == part,
            "run {run}: the view says {got} ns, the process's records {part} ns"
        );
    }
    // And the total is the process's own, by wait4.
    let total = u64::try_from(ledger_total)?;
    ensure!(
        within(total, p.rusage_cpu_ns, CPU_TOLERANCE),
        "pid {}: {total} ns in the ledger, wait4 {} ns ({:+.2} %)",
        p.pid,
        p.rusage_cpu_ns,
        percent_off(total, p.rusage_cpu_ns)
    );

    // Against the process's own clock: A owns [0, 1 s] and half of [1 s, 2 s], B half
    // of [1 s, 2 s] and [2 s, 3 s]: each about half of the process's CPU over those
    // 3 s (exactly half at a steady rate; each is compared with its own share, since
    // on a shared machine the burner's rate follows the load).
    //
    // The tolerance, from the rule: it spreads each window's CPU evenly, so a window
    // holding a span boundary gives each side of the boundary its share of the
    // window's time, not of the CPU actually used on that side. The burn runs without
    // a break from 1.5 s before the first span to 1.5 s after the last, so only rate
    // changes inside such a window (another process taking the core for a moment, an
    // export) make the two differ; that difference is measured here, from the
    // process's samples: the rule applied to its own per-window CPU, against its own
    // per-instant truth. On top of it, 5 % (75 ms of 1.5 s) for where the agent puts
    // a window's edge: each CPU charges the running task at most a `cpu_tick` (100 ms)
    // late, so CPU burned just before a window closes can land in the next one.
    let samples: Vec<(i128, i128)> = truth["samples"]
        .as_array()
        .context("no samples")?
        .iter()
        .filter_map(|s| Some((i128::from(s[0].as_u64()?), i128::from(s[1].as_u64()?))))
        .collect();
    let (first, last) = (
        samples.first().map_or(0, |s| s.0),
        samples.last().map_or(0, |s| s.0),
    );
    let t0 = a.0;
    let third = |k: i128| cpu_between(&samples, t0 + k * NS, t0 + (k + 1) * NS);
    let (c0, c1, c2) = (third(0)?, third(1)?, third(2)?);
    let (true_a, true_b) = (c0 + c1 / 2, c1 / 2 + c2);
    let (mut rule_a, mut rule_b) = (0i128, 0i128);
    let mut table = Vec::new();
    for (&(ws, we), parts) in &windows {
        let (a_only, b_only, both) = coverage(ws, we, a, b);
        if a_only + b_only + both == 0 {
            continue;
        }
        ensure!(
            ws >= first && we <= last,
            "window [{ws}, {we}) touches a span but lies outside the samples [{first}, {last}]"
        );
        let used = cpu_between(&samples, ws, we)?;
        table.push(format!(
            "  window [T0{:+} ms, T0{:+} ms): {} ns in the ledger, {used} ns by the process's clock",
            (ws - t0) / 1_000_000,
            (we - t0) / 1_000_000,
            parts.iter().sum::<i128>()
        ));
        rule_a += used * (2 * a_only + both) / (2 * (we - ws));
        rule_b += used * (2 * b_only + both) / (2 * (we - ws));
    }
    for (name, got, want, rule) in [("A", cpu_a, true_a, rule_a), ("B", cpu_b, true_b, rule_b)] {
        let unevenness = (rule - want).abs();
        ensure!(
            (got - want).abs() <= unevenness + want * 5 / 100,
            "run {name}: {got} ns, by the process's clock {want} ns ({:+.2} %); the rule \
             applied to the process's own per-window CPU gives {rule} ns\n{}",
            (got - want) as f64 / want as f64 * 100.0,
            table.join("\n")
        );
    }
    eprintln!(
        "interleaved: A {cpu_a} ns (process clock {true_a}, rule on its samples {rule_a}), \
         B {cpu_b} ns ({true_b}, {rule_b}), no run {cpu_none} ns; wait4 {} ns",
        p.rusage_cpu_ns
    );
    eprintln!("{}", table.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------
// 4. A run named by the SDK's resource, in code.

/// A process's resource names its run: all its CPU, and its children's, is the
/// run's, by `wait4`, though its one span covers a sixth of it and its only export
/// comes at its end (the windows before were held `span_lag` for it).
#[test]
fn a_resource_level_run_binds_the_whole_process() -> Result<()> {
    require_python_otel()?;
    // The script's only export comes at its exit, about 1-2 s (more on a loaded
    // machine: Python's start-up) after the window holding its start closed: 8 s
    // holds that window until then.
    let d = TracedDaemon::start("8s", "")?;
    let run_id = unique_run_id("resource");
    let endpoint = d.grpc_endpoint();
    let reaped = run_python(
        "resource_run.py",
        &[
            "--endpoint",
            &endpoint,
            "--run-id",
            &run_id,
            "--before-ms",
            "400",
            "--span-ms",
            "200",
            "--after-ms",
            "400",
        ],
        &[],
        Duration::from_secs(60),
    )?
    .ok("py/resource_run.py")?;
    let truth = reaped.truth()?;
    d.wait_committed(reaped.ended, COMMIT_TIMEOUT)?;
    let records = records_where(
        &d.daemon,
        reaped.started - time::Duration::seconds(10),
        &format!("run_id={run_id}"),
    )?;
    let mut cpu: i128 = 0;
    let mut pids = BTreeSet::new();
    for r in &records {
        ensure!(
            r["agent_id"] == "resource-agent",
            "a record of run {run_id} lacks its resource's agent: {r}"
        );
        pids.insert(r["pid"].as_u64().unwrap_or(0));
        cpu += cpu_ns(&r["cpu_core_seconds"])?;
    }
    ensure!(
        pids.contains(&u64::from(reaped.pid)),
        "run {run_id} has no record of the script (pid {}): pids {pids:?}",
        reaped.pid
    );
    let cpu = u64::try_from(cpu)?;
    // wait4 counts the script and the children it reaped (where `python3` is a
    // version manager's shell shim, its helpers before it execs Python): the run has
    // them all, as a bound process's children inherit its binding. Without the
    // binding only the span's 200 ms of some 1,100 ms (the interpreter's start-up,
    // 400 ms before the span, 400 ms after it, the export) is the run's.
    ensure!(
        within(cpu, reaped.rusage_cpu_ns, CPU_TOLERANCE),
        "run {run_id}: {cpu} ns of CPU in pids {pids:?}; the script (pid {}, {truth}) and its children used {} ns by wait4 ({:+.2} %)",
        reaped.pid,
        reaped.rusage_cpu_ns,
        percent_off(cpu, reaped.rusage_cpu_ns)
    );
    Ok(())
}
