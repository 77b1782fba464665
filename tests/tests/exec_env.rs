//! The run context in a process's environment is taken at exec by the kernel
//! side (a copy of the environment block in a ring buffer), so a process that
//! exits before the agent could read `/proc/<pid>/environ` still carries its
//! own context, not its parent's. An environment longer than the copy falls
//! back to `/proc`, which works while the process lives.

use std::ffi::OsString;

use anyhow::{Context, Result, ensure};
use mentat_tests::record_raw;
use serde_json::Value;

/// Short-lived children, each exec'd with a context different from its parent's.
const CHILDREN: usize = 40;

/// More than the kernel side copies (`ENV_COPY_MAX`, 16 KiB), so the context
/// variable placed after it is not in the copy.
const BIG_ENV_BYTES: usize = 20_000;

#[test]
fn short_lived_processes_keep_the_context_they_were_execed_with() -> Result<()> {
    // The parent shell runs in run `parent-run`; each `true` is exec'd with
    // `child-run` and is gone within a millisecond or so, long before the
    // agent's next poll. The last child's environment is longer than the
    // copy, and it lives 0.5 s, so /proc completes it.
    let script = format!(
        "i=0; while [ $i -lt {CHILDREN} ]; do \
           OTEL_RESOURCE_ATTRIBUTES=flow.run_id=child-run,agent.id=tool /bin/true; \
           i=$((i+1)); \
         done; \
         env BIG=$(head -c {BIG_ENV_BYTES} /dev/zero | tr '\\0' x) \
           OTEL_RESOURCE_ATTRIBUTES=flow.run_id=big-env-run sleep 0.5"
    );
    let command: Vec<OsString> = [
        "env",
        "OTEL_RESOURCE_ATTRIBUTES=flow.run_id=parent-run,agent.id=orchestrator",
        "sh",
        "-c",
        &script,
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let raw = record_raw("jsonl", &[], Some(&command))?;
    raw.output.ensure_success(&raw.invocation)?;
    let records: Vec<Value> = raw
        .text
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("records are JSON lines")?;
    let processes = |comm: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["record_type"] == "process" && r["comm"] == comm)
            .collect()
    };

    let children = processes("true");
    let pids: std::collections::BTreeSet<u64> =
        children.iter().filter_map(|r| r["pid"].as_u64()).collect();
    ensure!(
        pids.len() == CHILDREN,
        "{} distinct `true` processes recorded, {CHILDREN} ran",
        pids.len()
    );
    let wrong: Vec<String> = children
        .iter()
        .filter(|r| r["run_id"] != "child-run" || r["agent_id"] != "tool")
        .map(|r| {
            format!(
                "pid {}: run {} agent {}",
                r["pid"], r["run_id"], r["agent_id"]
            )
        })
        .collect();
    ensure!(
        wrong.is_empty(),
        "{} of {CHILDREN} short-lived children lost the context they were exec'd with: {wrong:?}",
        wrong.len()
    );

    let shells = processes("sh");
    ensure!(
        !shells.is_empty() && shells.iter().all(|r| r["run_id"] == "parent-run"),
        "the parent shell keeps its own run: {shells:?}"
    );

    let big = processes("sleep");
    ensure!(
        !big.is_empty() && big.iter().all(|r| r["run_id"] == "big-env-run"),
        "a process whose environment is longer than the kernel's copy gets its context \
         from /proc: {big:?}"
    );
    Ok(())
}
