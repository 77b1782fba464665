//! The trust model, attacked with real processes against a real daemon: a
//! span is bound to the process the kernel says sent it, not to what it
//! claims. A client that claims another process's pid, or another
//! container's namespace pid, is refused and counted, and the victim's run
//! keeps all of its usage; the same claim from a configured trusted
//! forwarder is believed; a client that names no process binds the process
//! that sent the request (not whichever process holds the socket). Slow
//! senders hold read slots of their own, never what other clients need.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mentat_tests::daemon::poll;
use mentat_tests::traced::{
    TracedDaemon, py_script, require_python_otel, run_python, run_reaped, unique_run_id,
};
use mentat_tests::truth::CgroupMove;
use mentat_tests::{ScratchCgroup, random_container_id, workload_bin};
use serde_json::Value;
use time::OffsetDateTime;

/// Spans each attacker sends: enough that, believed, they would take about
/// 98 % of the victim's usage (1 − 1/(N+1)).
const FORGED: u32 = 50;

/// CPU nanoseconds of a usage total.
fn cpu_ns(v: &Value) -> Result<i128> {
    let e = mentat_tests::exact::exact_json(v)?;
    Ok(e.0 / 10i128.pow(mentat_tests::exact::SCALE - 9))
}

/// CPU of run `run`, 0 when it has no records.
fn run_cpu(d: &TracedDaemon, run: &str) -> Result<i128> {
    let r = d.daemon.get(&format!("/v1/runs/{run}"), &[])?;
    if r.status != 200 {
        return Ok(0);
    }
    cpu_ns(&r.json()?["totals"]["cpu_core_seconds"])
}

/// `otlp_client.py grpc` arguments for `spans` spans of `run` over [start, end]
/// naming `pid` (-1: none) with `resource` attributes.
fn client_args(
    d: &TracedDaemon,
    spans: u32,
    pid: i64,
    resource: &[String],
    (start, end): (OffsetDateTime, OffsetDateTime),
    run: &str,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "grpc".to_string(),
        "--target".into(),
        format!("127.0.0.1:{}", d.grpc),
        "--spans".into(),
        spans.to_string(),
        "--pid".into(),
        pid.to_string(),
        "--run-id".into(),
        run.into(),
        "--start-ns".into(),
        start.unix_timestamp_nanos().to_string(),
        "--end-ns".into(),
        end.unix_timestamp_nanos().to_string(),
    ]
    .into();
    for r in resource {
        args.extend(["--resource".to_string(), r.clone()]);
    }
    args
}

/// Runs `otlp_client.py` with `args` in this test's cgroup; its summary.
fn send(args: &[String]) -> Result<Value> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_python("otlp_client.py", &args, &[], Duration::from_secs(60))?
        .ok("otlp_client.py")?
        .truth()
}

/// Runs `otlp_client.py` with `args` as a process of the cgroup `dir`; its summary.
fn send_from(dir: &Path, args: &[String]) -> Result<Value> {
    let mut argv = vec![
        "-c".to_string(),
        "echo $$ > \"$0/cgroup.procs\" && exec python3 \"$@\"".into(),
        dir.display().to_string(),
        py_script("otlp_client.py").display().to_string(),
    ];
    argv.extend(args.iter().cloned());
    run_reaped("sh", &argv, &[], Duration::from_secs(60))?
        .ok("otlp_client.py in a cgroup")?
        .truth()
}

/// Runs `workload cgroup --path dir --ms ms` (behind `prefix`, e.g. unshare)
/// with its run context in the environment; its ground truth and life.
fn victim(
    prefix: &[&str],
    dir: &Path,
    ms: u32,
    run: &str,
) -> Result<(CgroupMove, (OffsetDateTime, OffsetDateTime))> {
    let (program, rest) = match prefix.split_first() {
        Some((p, rest)) => (p.to_string(), rest.iter().map(|s| s.to_string()).collect()),
        None => (workload_bin()?.display().to_string(), Vec::new()),
    };
    let mut args: Vec<String> = rest;
    if !prefix.is_empty() {
        args.push(workload_bin()?.display().to_string());
    }
    args.extend([
        "cgroup".into(),
        "--path".into(),
        dir.display().to_string(),
        "--ms".into(),
        ms.to_string(),
    ]);
    let attrs = format!("flow.run_id={run}");
    // 20 ms early: the kernel keeps a process's start at clock-tick
    // resolution (10 ms), rounded down; the forged spans must cover all of it.
    let started = OffsetDateTime::now_utc() - time::Duration::milliseconds(20);
    let reaped = run_reaped(
        &program,
        &args,
        &[("OTEL_RESOURCE_ATTRIBUTES", &attrs)],
        Duration::from_secs(60),
    )?
    .ok("the victim workload")?;
    let ended = OffsetDateTime::now_utc() + time::Duration::milliseconds(20);
    let truth: CgroupMove = serde_json::from_value(reaped.truth()?)?;
    Ok((truth, (started, ended)))
}

/// Whether a run's CPU is the victim's own, within 2 %: the agent meters a
/// burner within 1 % of rusage (tests/cpu.rs); the rest covers the exec and
/// the cgroup move, which rusage counts too. A believed forgery would leave it
/// about 1/(FORGED+1) of that.
fn is_all_of(metered: i128, truth: &CgroupMove) -> bool {
    let truth_ns = i128::from(truth.rusage_cpu_ns);
    (metered - truth_ns).abs() * 50 <= truth_ns
}

#[test]
fn forged_pid_and_container_claims_are_refused_and_the_victims_keep_their_usage() -> Result<()> {
    require_python_otel()?;
    // Windows wait 5 s for late spans: the forged spans go out after the
    // victims end, as they would have to for a whole-life dilution.
    let d = TracedDaemon::start("5s", "")?;
    let root = ScratchCgroup::create()?;

    // A host process with its own run, and a container whose pid 1 has its own.
    let host_dir = root.create_child("victim.slice/victim.scope")?;
    let host_run = unique_run_id("victim-host");
    let (host, host_life) = victim(&[], &host_dir, 600, &host_run)?;
    let id = random_container_id()?;
    let container_dir = root.create_child(&format!("system.slice/docker-{id}.scope"))?;
    let container_run = unique_run_id("victim-container");
    let unshare = mentat_tests::unshare_bin().display().to_string();
    let (contained, container_life) = victim(
        &[&unshare, "--fork", "--pid", "--mount-proc"],
        &container_dir,
        600,
        &container_run,
    )?;
    ensure!(
        contained.pid == 1,
        "the container's workload saw pid {}",
        contained.pid
    );

    // The attacker: a host process that is neither, claiming each victim's
    // process for its own run.
    let attack = unique_run_id("attacker");
    let by_pid = send(&client_args(
        &d,
        FORGED,
        i64::from(host.pid),
        &[],
        host_life,
        &attack,
    ))?;
    let by_container = send(&client_args(
        &d,
        FORGED,
        1,
        &[format!("container.id={id}")],
        container_life,
        &attack,
    ))?;
    let ended = host_life.1.max(container_life.1);
    d.wait_committed(ended + time::Duration::seconds(1), Duration::from_secs(60))?;

    for (run, truth) in [(&host_run, &host), (&container_run, &contained)] {
        let metered = run_cpu(&d, run)?;
        ensure!(
            is_all_of(metered, truth),
            "run {run}: {metered} ns of CPU; its process used {} ns: diluted",
            truth.rusage_cpu_ns
        );
    }
    let stolen = run_cpu(&d, &attack)?;
    ensure!(
        stolen == 0,
        "the attacker's run was billed {stolen} ns of CPU"
    );
    for (what, summary) in [("pid", &by_pid), ("container", &by_container)] {
        ensure!(
            summary["statuses"]["OK"] == 1 && summary["rejected_spans"] == FORGED,
            "the forged {what} claim was not refused in the response: {summary}"
        );
    }
    let refused = d
        .daemon
        .counter("mentat_agent_receiver_spans_refused_claims_total")?;
    ensure!(
        refused == u64::from(2 * FORGED),
        "refused claims counted: {refused}, sent {}",
        2 * FORGED
    );
    root.remove()?;
    Ok(())
}

#[test]
fn a_trusted_forwarders_claims_are_believed_and_no_one_elses() -> Result<()> {
    require_python_otel()?;
    let root = ScratchCgroup::create()?;
    let forwarder_dir = root.create_child("collector.slice/otelcol.service")?;
    let rule = root.relative_path_of("collector.slice/otelcol.service");
    let d = TracedDaemon::start("5s", &format!("trusted_forwarders = [\"cgroup:{rule}\"]\n"))?;
    // A process with no run of its own: the forwarder's span gives it one.
    let dir = root.create_child("app.slice/app.scope")?;
    let (app, life) = victim(&[], &dir, 600, "")?;
    let forwarded = unique_run_id("forwarded");
    let summary = send_from(
        &forwarder_dir,
        &client_args(&d, 1, i64::from(app.pid), &[], life, &forwarded),
    )?;
    ensure!(
        summary["statuses"]["OK"] == 1 && summary["rejected_spans"] == 0,
        "the trusted forwarder was refused: {summary}"
    );
    // The same claim from outside the forwarder's cgroup is refused.
    let other = unique_run_id("not-forwarded");
    let summary = send(&client_args(&d, 1, i64::from(app.pid), &[], life, &other))?;
    ensure!(
        summary["rejected_spans"] == 1,
        "an untrusted sender's claim was believed: {summary}"
    );
    d.wait_committed(life.1 + time::Duration::seconds(1), Duration::from_secs(60))?;
    let metered = run_cpu(&d, &forwarded)?;
    ensure!(
        is_all_of(metered, &app),
        "run {forwarded}: {metered} ns of CPU; the process it names used {} ns",
        app.rusage_cpu_ns
    );
    ensure!(run_cpu(&d, &other)? == 0, "the untrusted claim billed CPU");
    let trusted = d
        .daemon
        .counter("mentat_agent_receiver_spans_trusted_total")?;
    ensure!(trusted == 1, "trusted spans counted: {trusted}");
    root.remove()?;
    Ok(())
}

#[test]
fn a_span_that_names_no_process_binds_the_process_that_sent_it() -> Result<()> {
    require_python_otel()?;
    let d = TracedDaemon::start("1s", "")?;
    // The parent opens the connection, a forked child sends on it: both hold
    // the socket, only the child sent. The old fd scan took the first holder.
    let run = unique_run_id("forked");
    let port = d.http.to_string();
    let truth = run_python(
        "fork_sender.py",
        &["127.0.0.1", &port, &run],
        &[],
        Duration::from_secs(60),
    )?
    .ok("fork_sender.py")?
    .truth()?;
    ensure!(
        truth["status"] == 200 && truth["rejected"] == 0,
        "the span was refused: {truth}"
    );
    let child = truth["child_pid"].as_u64().context("no child pid")?;
    let mut view = Value::Null;
    poll(Duration::from_secs(60), || {
        let r = d.daemon.get(&format!("/v1/runs/{run}"), &[])?;
        if r.status != 200 {
            return Ok(Err(format!("run {run}: status {}", r.status)));
        }
        view = r.json()?;
        Ok(if view["spans"].as_array().is_some_and(|s| !s.is_empty()) {
            Ok(())
        } else {
            Err("no spans in the run yet".into())
        })
    })?;
    let pids: Vec<Option<u64>> = view["spans"]
        .as_array()
        .context("no spans")?
        .iter()
        .map(|s| s["pid"].as_u64())
        .collect();
    ensure!(
        pids == [Some(child)],
        "span pids {pids:?}; the sender was the child {child} (parent {})",
        truth["parent_pid"]
    );
    let bound = d
        .daemon
        .counter("mentat_agent_receiver_spans_bound_to_sender_total")?;
    ensure!(bound == 1, "spans bound to their sender: {bound}");
    Ok(())
}

#[test]
fn slow_senders_hold_their_own_read_slots_and_never_stall_other_clients() -> Result<()> {
    require_python_otel()?;
    // The read deadline far beyond the test: slow bodies are still arriving
    // when the other client's spans are answered, whatever the machine's speed.
    let d = TracedDaemon::start("0s", "read_timeout = \"600s\"\n")?;
    let root = ScratchCgroup::create()?;
    let slow_dir = root.create_child("slow.scope")?;
    // Twelve connections from one sender (one cgroup): eight (its share) are
    // read, four are told at once to retry later.
    let mut slow = Command::new("sh")
        .args(["-c", "echo $$ > \"$0/cgroup.procs\" && exec python3 \"$@\""])
        .arg(&slow_dir)
        .arg(py_script("slow_client.py"))
        .args(["127.0.0.1", &d.http.to_string(), "12"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting slow_client.py")?;
    let mut lines = BufReader::new(slow.stdout.take().context("no stdout")?).lines();
    let ready = lines.next().context("slow_client.py said nothing")??;
    ensure!(ready == "ready", "slow_client.py: {ready}");
    // The 4 slow senders past the share are refused.
    d.daemon.wait_counter(
        "mentat_agent_receiver_rejected_requests_total",
        Duration::from_secs(60),
        |n| n >= 4,
    )?;
    // Another sender's spans go through while eight bodies trickle in.
    let run = unique_run_id("prompt");
    let now = OffsetDateTime::now_utc();
    let summary = send(&client_args(
        &d,
        20,
        -1,
        &[],
        (now - time::Duration::milliseconds(100), now),
        &run,
    ))?;
    ensure!(
        summary["statuses"]["OK"] == 1 && summary["rejected_spans"] == 0,
        "a normal client was not served beside slow ones: {summary}"
    );
    let mut stdin = slow.stdin.take().context("no stdin")?;
    writeln!(stdin)?;
    let report: Value = serde_json::from_str(&lines.next().context("no report")??)?;
    let _ = slow.wait();
    let answered: Vec<&str> = report["answered"]
        .as_array()
        .context("no answers")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    ensure!(
        answered == ["429"; 4] && report["pending"] == 8,
        "the slow sender's connections: {report}"
    );
    root.remove()?;
    Ok(())
}
