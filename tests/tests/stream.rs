//! `GET /v1/stream` end to end (issue 15): a real daemon metering a real
//! CPU-burning workload in a run, read by a real WebSocket client (Python
//! `websockets`, `py/stream_client.py`) and by `curl -N` (Server-Sent Events).
//!
//! - Consecutive window messages sum exactly to the ledger's records
//!   committed with those windows (`/v1/records`, summed here), node totals
//!   and per-run groups (exact decimals, no tolerance: the same records).
//!   Not to `/v1/usage` over [first start, last start]: that counts records by
//!   their start, and an idle process's record, committed with a later
//!   window, starts windows earlier.
//! - A client filtered by `run` sees only that run, and its totals equal the
//!   unfiltered client's group for that run in the same window.
//! - A client that disconnects and resumes with `after` gets the very next
//!   window (nothing lost) and no window twice; a replayed window is the same
//!   message, byte for byte, as it was live.
//! - SSE carries the same messages, with `id:` lines.
//! - A client that never reads (`py/stream_stalled.py`) is dropped and counted
//!   while windows keep committing.
//!
//! Each test starts its own daemon (fresh ledger, free ports) and needs root.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mentat_tests::daemon::{Daemon, DaemonOptions, LedgerDir};
use mentat_tests::exact::{Exact, exact_json};
use mentat_tests::traced::{py_script, trace_id, unique_run_id};
use mentat_tests::workload_bin;
use serde_json::Value;

const TOKEN: &str = "stream-test-token";

/// Long enough for several windows to commit on a loaded 2-core machine.
const CLIENT_TIMEOUT: &str = "90";

/// The summed fields compared exactly between the stream and the ledger's records.
const FIELDS: [&str; 10] = [
    "records",
    "cpu_core_seconds",
    "memory_gb_seconds",
    "gpu_seconds",
    "network_rx_bytes",
    "network_tx_bytes",
    "tokens_input",
    "cost.cpu",
    "cost.memory",
    "cost.total",
];

fn field<'a>(totals: &'a Value, name: &str) -> &'a Value {
    match name.split_once('.') {
        Some((a, b)) => &totals[a][b],
        None => &totals[name],
    }
}

/// A summed value (an unpriced record's null cost is 0).
fn num(v: &Value) -> Result<Exact> {
    if v.is_null() {
        Ok(Exact::ZERO)
    } else {
        exact_json(v)
    }
}

/// A record's value of a summed field, as its window message counts it.
fn record_value(r: &Value, f: &str) -> Result<Exact> {
    match f {
        "records" => Ok(Exact::from_u64(1)),
        "tokens_input" => sum(r["tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| num(&t["input"]))),
        _ => num(field(r, f)),
    }
}

/// Every record in the ledger, through `/v1/records` (all pages).
fn all_records(d: &Daemon) -> Result<Vec<Value>> {
    let from = mentat_tests::daemon::rfc3339(d.started - time::Duration::minutes(5));
    let to =
        mentat_tests::daemon::rfc3339(time::OffsetDateTime::now_utc() + time::Duration::hours(1));
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut q = vec![
            ("from", from.as_str()),
            ("to", to.as_str()),
            ("limit", "1000"),
        ];
        if let Some(a) = &after {
            q.push(("after", a));
        }
        let page = d.get_json("/v1/records", &q)?;
        out.extend(page["records"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Ok(out),
        }
    }
}

/// Σ of each field over the windows' `totals`, and per `run_id` group,
/// equals the sum of the ledger's records committed with those windows (the
/// records ending at their ends: an idle process's record spans several
/// windows and is committed with the last), exactly.
fn check_totals_equal_records(
    d: &Daemon,
    ws: &[&Value],
    run: Option<&str>,
    what: &str,
) -> Result<()> {
    let ends: Vec<&Value> = ws.iter().map(|w| &w["window_end"]).collect();
    let records: Vec<Value> = all_records(d)?
        .into_iter()
        .filter(|r| ends.contains(&&r["window_end"]))
        .filter(|r| run.is_none_or(|id| r["run_id"] == id))
        .collect();
    for f in FIELDS {
        let streamed = sum(ws.iter().map(|w| num(field(&w["totals"], f))))?;
        let ledger = sum(records.iter().map(|r| record_value(r, f)))?;
        ensure!(
            streamed == ledger,
            "{what}: Σ {f} over {} windows is {streamed} on the stream, {ledger} in the ledger's records",
            ws.len()
        );
        let mut keys: Vec<String> = records
            .iter()
            .map(|r| r["run_id"].as_str().unwrap_or("unattributed").to_string())
            .collect();
        keys.sort();
        keys.dedup();
        for key in keys {
            let streamed = sum(ws.iter().flat_map(|w| {
                w["groups"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|g| g["key"] == key.as_str())
                    .map(|g| num(field(&g["totals"], f)))
            }))?;
            let ledger = sum(records
                .iter()
                .filter(|r| r["run_id"].as_str().unwrap_or("unattributed") == key)
                .map(|r| record_value(r, f)))?;
            ensure!(
                streamed == ledger,
                "{what}: run {key}: Σ {f} is {streamed} on the stream, {ledger} in the ledger's records"
            );
        }
    }
    Ok(())
}

/// Starts `py/stream_client.py` on `query`, reading `count` windows.
fn spawn_client(d: &Daemon, query: &str, count: usize) -> Result<Child> {
    let url = format!("ws://127.0.0.1:{}/v1/stream?{query}", d.port());
    Command::new("python3")
        .arg(py_script("stream_client.py"))
        .args([url.as_str(), &count.to_string(), CLIENT_TIMEOUT, TOKEN])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3 py/stream_client.py (run `cargo xtask setup` for websockets)")
}

/// The messages a client printed.
fn messages(child: Child, what: &str) -> Result<Vec<Value>> {
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{what}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("{what}: {}", String::from_utf8_lossy(&out.stdout)))?;
    Ok(v)
}

fn windows(msgs: &[Value]) -> Vec<&Value> {
    msgs.iter().filter(|m| m["type"] == "window").collect()
}

/// Ids increase, each is its window's start in ns, and each window ends where the next starts.
fn check_consecutive(ws: &[&Value], what: &str) -> Result<()> {
    for w in ws {
        let start = mentat_tests::daemon::parse_time(w["window_start"].as_str().unwrap_or(""))?;
        ensure!(
            w["id"].as_str() == Some(start.unix_timestamp_nanos().to_string().as_str()),
            "{what}: id {} is not window_start {} in ns",
            w["id"],
            w["window_start"]
        );
    }
    for pair in ws.windows(2) {
        ensure!(
            pair[0]["window_end"] == pair[1]["window_start"],
            "{what}: a window is missing between {} (ending {}) and {}",
            pair[0]["id"],
            pair[0]["window_end"],
            pair[1]["id"]
        );
    }
    Ok(())
}

fn sum(mut values: impl Iterator<Item = Result<Exact>>) -> Result<Exact> {
    values.try_fold(Exact::ZERO, |acc, v| acc.add(v?))
}

#[test]
fn windows_sum_to_the_ledger_filter_resume_and_sse_lose_nothing() -> Result<()> {
    let dir = LedgerDir::new()?;
    let d = Daemon::start(
        &dir,
        &DaemonOptions {
            token: Some(TOKEN.into()),
            ..Default::default()
        },
    )?;
    // A run that burns CPU across the windows read below.
    let run_id = unique_run_id("stream");
    let trace = trace_id();
    let mut burn = Command::new(workload_bin()?)
        .args(["burn", "--threads", "1", "--ms", "8000"])
        .env("TRACEPARENT", format!("00-{trace}-00f067aa0ba902b7-01"))
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("flow.id=stream-flow,flow.run_id={run_id},agent.id=stream-agent"),
        )
        .stdout(Stdio::null())
        .spawn()?;
    let all = spawn_client(&d, "group_by=run", 5)?;
    let only_run = spawn_client(&d, &format!("run={run_id}&group_by=run"), 5)?;
    let a = messages(all, "client group_by=run")?;
    let r = messages(only_run, "client run=")?;
    let _ = burn.wait();
    let aw = windows(&a);
    ensure!(aw.len() == 5, "5 windows expected, got {}: {a:?}", aw.len());
    check_consecutive(&aw, "group_by=run")?;
    check_totals_equal_records(&d, &aw, None, "group_by=run")?;

    // The run filter: only that run, equal to its group in the unfiltered stream.
    let rw = windows(&r);
    ensure!(rw.len() == 5, "run filter: 5 windows expected: {r:?}");
    check_consecutive(&rw, "run=")?;
    check_totals_equal_records(&d, &rw, Some(&run_id), "run=")?;
    let mut burned = Exact::ZERO;
    for w in &rw {
        for g in w["groups"].as_array().context("groups")? {
            ensure!(
                g["key"] == run_id.as_str(),
                "run filter let another group in: {g}"
            );
        }
        burned = burned.add(num(&w["totals"]["cpu_core_seconds"])?)?;
        if let Some(same) = aw.iter().find(|x| x["id"] == w["id"]) {
            let group = same["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["key"] == run_id.as_str());
            match group {
                Some(g) => ensure!(
                    g["totals"] == w["totals"],
                    "window {}: the run's totals differ between the filtered and the grouped stream",
                    w["id"]
                ),
                None => ensure!(
                    w["totals"]["records"] == 0,
                    "window {}: the filtered stream has the run, the grouped one not",
                    w["id"]
                ),
            }
        }
    }
    ensure!(burned > Exact::ZERO, "the run's windows show no CPU: {r:?}");

    // Disconnect and resume after the last window seen: the next one is the
    // window right after it, with no gap and nothing twice.
    let last = aw.last().context("last")?;
    let last_id = last["id"].as_str().context("id")?.to_string();
    let b = messages(
        spawn_client(&d, &format!("group_by=run&after={last_id}"), 3)?,
        "resumed client",
    )?;
    ensure!(
        b.iter().all(|m| m["type"] != "gap"),
        "a resume after a known window got a gap: {b:?}"
    );
    let bw = windows(&b);
    ensure!(bw.len() == 3, "resumed: 3 windows expected: {b:?}");
    ensure!(
        bw[0]["window_start"] == last["window_end"],
        "resumed after {last_id} (ending {}), got {} first: a window was lost",
        last["window_end"],
        bw[0]["window_start"]
    );
    check_consecutive(&bw, "resumed")?;

    // Resume further back: the replayed windows are the live messages, exactly.
    let first_id = aw[1]["id"].as_str().context("id")?.to_string();
    let c = messages(
        spawn_client(&d, &format!("group_by=run&after={first_id}"), 3)?,
        "replaying client",
    )?;
    let cw = windows(&c);
    ensure!(
        cw.len() == 3 && cw.iter().zip(&aw[2..5]).all(|(x, y)| x == y),
        "the windows replayed after {first_id} differ from the live ones:\nreplayed {cw:?}\nlive {:?}",
        &aw[2..5]
    );

    // SSE (no upgrade asked): the same messages, each window with its id.
    let sse = Command::new("curl")
        .args(["-sN", "--max-time", "8", "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .arg(format!(
            "http://127.0.0.1:{}/v1/stream?group_by=run&after={}",
            d.port(),
            aw[0]["id"].as_str().unwrap_or("")
        ))
        .output()
        .context("curl")?;
    let text = String::from_utf8_lossy(&sse.stdout);
    let data: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .collect();
    let sw = windows(&data);
    ensure!(
        sw.len() >= 4 && sw.iter().zip(&aw[1..5]).all(|(x, y)| x == y),
        "SSE after {} differs from the WebSocket's windows:\n{text}",
        aw[0]["id"]
    );
    ensure!(
        ids.iter().zip(&sw).all(|(i, w)| w["id"] == *i),
        "SSE ids do not match the windows: {ids:?}"
    );

    // An id the ledger never committed: an explicit gap first.
    let g = messages(spawn_client(&d, "after=123", 1)?, "unknown id")?;
    ensure!(
        g.first()
            .is_some_and(|m| m["type"] == "gap" && m["after"] == "123"),
        "after=123 did not start with a gap: {g:?}"
    );

    // Bad parameters are 400s naming them; no token is a 401.
    for (q, name) in [
        ("group_by", "bogus"),
        ("after", "yesterday"),
        ("where", "nonsense"),
    ] {
        let resp = d.get("/v1/stream", &[(q, name)])?;
        ensure!(
            resp.status == 400 && resp.body.contains(&format!("`{q}`")),
            "{q}={name}: HTTP {} {}",
            resp.status,
            resp.body
        );
    }
    let resp = d.get_as("/v1/stream", &[], None)?;
    ensure!(resp.status == 401, "no token: HTTP {}", resp.status);
    Ok(())
}

#[test]
fn a_client_that_never_reads_is_dropped_and_counted_while_windows_commit() -> Result<()> {
    let dir = LedgerDir::new()?;
    let d = Daemon::start(
        &dir,
        &DaemonOptions {
            // Short windows and a 4-message queue: the kernel's socket
            // buffers on loopback hold megabytes (about 130 s of 500 ms
            // windows grouped by pid here), so 250 ms windows fill them in
            // about a minute.
            extra_keys: Some("tick = \"250ms\"\nsample_interval = \"100ms\"\n".into()),
            env: vec![("MENTAT_API__STREAM_CLIENT_BUFFER".into(), "4".into())],
            ..Default::default()
        },
    )?;
    // Grouped by pid: each message holds every process of the node, so the
    // socket's buffers fill after a few dozen windows at most.
    let mut stalled = Command::new("python3")
        .arg(py_script("stream_stalled.py"))
        .args([&d.port().to_string(), "/v1/stream?group_by=pid"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("python3 py/stream_stalled.py")?;
    let mut out = BufReader::new(stalled.stdout.take().context("stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    if line.trim() != "upgraded" {
        let _ = stalled.kill();
        bail!("the stalled client did not upgrade: {line}");
    }
    d.wait_counter(
        "mentat_agent_stream_clients_dropped_total",
        Duration::from_secs(400),
        |n| n >= 1,
    )?;
    // The commit loop went on: windows keep being committed.
    let w0 = d.counter("mentat_agent_windows_total")?;
    d.wait_counter("mentat_agent_windows_total", Duration::from_secs(30), |n| {
        n >= w0 + 3
    })?;
    // The agent closed the stalled connection: draining it ends in EOF.
    stalled
        .stdin
        .take()
        .context("stdin")?
        .write_all(b"drain\n")?;
    line.clear();
    out.read_line(&mut line)?;
    let _ = stalled.wait();
    let report: Value = serde_json::from_str(line.trim()).with_context(|| line.clone())?;
    ensure!(
        report["eof"] == true,
        "the stalled connection was not closed: {report}"
    );
    // A client that reads still gets windows.
    let url = format!("ws://127.0.0.1:{}/v1/stream", d.port());
    let ok = Command::new("python3")
        .arg(py_script("stream_client.py"))
        .args([url.as_str(), "2", CLIENT_TIMEOUT])
        .output()?;
    let msgs: Vec<Value> = serde_json::from_slice(&ok.stdout)
        .with_context(|| String::from_utf8_lossy(&ok.stderr).to_string())?;
    ensure!(
        windows(&msgs).len() == 2,
        "a reading client after the drop: {msgs:?}"
    );
    Ok(())
}
