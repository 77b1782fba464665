//! `test` and `bench`: the unit tests, the privileged integration tests of mentat-tests and
//! its benchmark binary.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cargo::{TestTally, cargo, release_bin, run_step, target_dir};
use crate::cmd::{self, elapsed, is_root, run_tee};
use crate::setup;

/// Sets up, then runs the test stages in order, stopping at the first that fails, and
/// prints `N passed, N failed` over all of them.
pub fn test(args: &[OsString]) -> Result<()> {
    setup::setup()?;
    let mut tally = TestTally::default();
    let result = run_stages(args, &mut tally);
    // Printed whatever happened, since CI reads this line even from a failed run.
    println!("{} passed, {} failed", tally.passed, tally.failed);
    result
}

fn run_stages(args: &[OsString], tally: &mut TestTally) -> Result<()> {
    stage("a", "unit tests", || {
        run_tee(
            &mut cargo([
                "test",
                "--no-fail-fast",
                "--workspace",
                "--exclude",
                "agent-ebpf",
                "--exclude",
                "mentat-tests",
            ]),
            |line| tally.add_line(line),
        )
    })?;
    stage(
        "b",
        "release build of the agent and test binaries",
        build_release_bins,
    )?;
    stage("c", "privileged integration tests", || {
        if !is_root() {
            bail!("the privileged tests need root (CI runs as root): rerun as root");
        }
        let mut tests = cargo([
            "test",
            "--no-fail-fast",
            "--release",
            "-p",
            "mentat-tests",
            "--",
        ]);
        tests.arg("--test-threads=1").args(args);
        set_bin_env(&mut tests, &target_dir()?);
        run_tee(&mut tests, |line| tally.add_line(line))
    })
}

fn stage(id: &str, what: &str, body: impl FnOnce() -> Result<()>) -> Result<()> {
    let start = Instant::now();
    say!("test stage {id}: {what}");
    body().with_context(|| format!("test stage {id} ({what}) failed"))?;
    say!("test stage {id}: {what}: passed in {}", elapsed(start));
    Ok(())
}

fn build_release_bins() -> Result<()> {
    // The container image's build stage runs this very script (deploy/Dockerfile),
    // so every test run proves it still builds the agent from a checkout.
    let mut image_build = Command::new("sh");
    image_build
        .arg("deploy/build-agent.sh")
        .current_dir(crate::cargo::workspace_root());
    run_step(
        "building the agent with deploy/build-agent.sh (the image's build stage)",
        image_build,
    )?;
    run_step(
        "building the release binaries of mentat-agent and mentat-tests",
        cargo([
            "build",
            "--release",
            "-p",
            "mentat-agent",
            "-p",
            "mentat-tests",
            "--bins",
        ]),
    )
}

// The integration tests and the benchmark drive the real binaries; absolute paths keep
// them independent of the directory cargo runs them from.
fn set_bin_env(cmd: &mut Command, target_dir: &Path) {
    cmd.env("TEST_AGENT_BIN", release_bin(target_dir, "mentat-agent"))
        .env("TEST_WORKLOAD_BIN", release_bin(target_dir, "workload"));
    if let Ok(python) = setup::instrumentations_python() {
        cmd.env("TEST_INSTRUMENTATIONS_PYTHON", python);
    }
}

/// Sets up, builds the release binaries and runs mentat-tests' `bench` with `args`.
pub fn bench(args: &[OsString]) -> Result<()> {
    setup::setup()?;
    build_release_bins()?;
    let target_dir = target_dir()?;
    let bench = release_bin(&target_dir, "bench");
    if !bench.is_file() {
        bail!(
            "{} was not built: mentat-tests has no `bench` binary (tests/src/bin/bench/main.rs)",
            bench.display()
        );
    }
    let start = Instant::now();
    let mut run = Command::new(&bench);
    run.args(args);
    set_bin_env(&mut run, &target_dir);
    cmd::run(&mut run)?;
    say!("bench finished in {}", elapsed(start));
    Ok(())
}
