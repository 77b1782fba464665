//! Spans from a container: an SDK there reports its pid inside the container's
//! pid namespace (`process.pid` = 1 for a container's main process). With the
//! resource's `container.id`, the agent maps that pid to the host's and binds
//! the right process's usage to the span's run; a pid it cannot place binds
//! nothing and is counted, rather than billing the host's pid 1.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use mentat_tests::ScratchCgroup;
use mentat_tests::random_container_id;
use mentat_tests::traced::{TracedDaemon, require_python_otel, run_python, unique_run_id};
use mentat_tests::truth::CgroupMove;
use mentat_tests::workload_bin;
use serde_json::Value;
use time::OffsetDateTime;

/// Sends one span over gRPC with `resource` attributes, for `pid`, covering
/// [`start`, `end`], in run `run_id`.
fn send_span(
    d: &TracedDaemon,
    pid: u32,
    resource: &[String],
    start: OffsetDateTime,
    end: OffsetDateTime,
    run_id: &str,
) -> Result<Value> {
    let target = format!("127.0.0.1:{}", d.grpc);
    let (start, end) = (
        start.unix_timestamp_nanos().to_string(),
        end.unix_timestamp_nanos().to_string(),
    );
    let pid = pid.to_string();
    let mut args = vec![
        "grpc",
        "--target",
        &target,
        "--pid",
        &pid,
        "--run-id",
        run_id,
        "--start-ns",
        &start,
        "--end-ns",
        &end,
    ];
    for r in resource {
        args.extend(["--resource", r.as_str()]);
    }
    let summary: Value = serde_json::from_str(
        run_python("otlp_client.py", &args, &[], Duration::from_secs(60))?
            .ok("py/otlp_client.py")?
            .stdout
            .lines()
            .last()
            .context("no summary from otlp_client.py")?,
    )?;
    ensure!(
        summary["rejected_spans"] == 0,
        "the span was rejected: {summary}"
    );
    Ok(summary)
}

fn cpu_ns(v: &Value) -> Result<i128> {
    let e = mentat_tests::exact::exact_json(v)?;
    Ok(e.0 / 10i128.pow(mentat_tests::exact::SCALE - 9))
}

#[test]
fn a_containers_namespace_pid_binds_the_right_process() -> Result<()> {
    require_python_otel()?;
    // Windows wait 5 s for late spans: the spans below go out after the
    // workload ends.
    // The spans come from this test's process, not from the container: as
    // from a node-local collector forwarding them, trusted by its address.
    let d = TracedDaemon::start("5s", "trusted_forwarders = [\"addr:127.0.0.1\"]\n")?;
    let root = ScratchCgroup::create()?;
    let id = random_container_id()?;
    let cgroup = root.create_child(&format!("system.slice/docker-{id}.scope"))?;

    // The workload is pid 1 of its own pid namespace, moves itself into the
    // container's cgroup and burns there.
    // 20 ms early: the kernel keeps a process's start time at clock-tick
    // resolution (10 ms), rounded down, and the span must cover all of it.
    let started = OffsetDateTime::now_utc() - time::Duration::milliseconds(20);
    let out = Command::new(mentat_tests::unshare_bin())
        .args(["--fork", "--pid", "--mount-proc"])
        .arg(workload_bin()?)
        .args(["cgroup", "--path"])
        .arg(&cgroup)
        .args(["--ms", "600"])
        .stdin(Stdio::null())
        .output()
        .context("unshare workload")?;
    ensure!(
        out.status.success(),
        "the namespaced workload failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ended = OffsetDateTime::now_utc();
    let truth: CgroupMove = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .context("no ground truth")?,
    )?;
    ensure!(
        truth.pid == 1,
        "the workload saw itself as pid {}",
        truth.pid
    );

    // Its SDK would say process.pid = 1 and container.id = the container. The
    // span covers the process's life, which is shorter than the windows it ran
    // in: the split spreads usage over the part of a window the process was
    // alive, so the run owns all of its CPU.
    let run = unique_run_id("container");
    send_span(&d, 1, &[format!("container.id={id}")], started, ended, &run)?;
    // A pid the container does not have: bound to nothing, counted.
    let stray = unique_run_id("stray");
    send_span(
        &d,
        4242,
        &[format!("container.id={id}")],
        started,
        ended,
        &stray,
    )?;
    d.wait_committed(ended + time::Duration::seconds(1), Duration::from_secs(40))?;

    let view = d.run_view(&run)?;
    let metered = cpu_ns(&view["totals"]["cpu_core_seconds"])?;
    // 2 %: the agent meters a burner within 1 % of rusage (tests/cpu.rs); the
    // rest covers the exec and the cgroup move, which rusage counts too.
    let truth_ns = i128::from(truth.rusage_cpu_ns);
    ensure!(
        (metered - truth_ns).abs() * 50 <= truth_ns,
        "run {run}: {metered} ns of CPU; the container's pid 1 used {truth_ns} ns ({view})"
    );
    let stray_view = d.daemon.get(&format!("/v1/runs/{stray}"), &[])?;
    let stray_cpu = if stray_view.status == 200 {
        cpu_ns(&stray_view.json()?["totals"]["cpu_core_seconds"])?
    } else {
        0
    };
    ensure!(
        stray_cpu == 0,
        "a span naming a pid the container does not have billed {stray_cpu} ns"
    );
    let unmapped = d.daemon.counter("mentat_agent_span_pids_unmapped_total")?;
    ensure!(unmapped == 1, "unmapped span pids counted: {unmapped}");
    root.remove()?;
    Ok(())
}
