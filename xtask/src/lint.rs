//! `lint`: rustfmt and clippy over the userspace crates and the eBPF crate.

use anyhow::{Result, bail};

use crate::cargo::{cargo, run_step};
use crate::setup;

/// Runs every check, then fails if any of them did, so one run shows all problems.
pub fn lint() -> Result<()> {
    // The agent's build script builds the eBPF object even for clippy, which needs
    // bpf-linker and the nightly's rust-src.
    setup::setup()?;
    let mut failed = Vec::new();
    let mut check = |what: &str, result: Result<()>| {
        if let Err(err) = result {
            say!("{what} failed: {err:#}");
            failed.push(what.to_owned());
        }
    };

    check(
        "rustfmt",
        run_step(
            "checking formatting",
            cargo(["fmt", "--all", "--", "--check"]),
        ),
    );
    check(
        "clippy",
        run_step(
            "clippy on the workspace",
            cargo([
                "clippy",
                "--workspace",
                "--exclude",
                "agent-ebpf",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        ),
    );
    check(
        "clippy (eBPF)",
        run_step(
            "clippy on agent-ebpf for the BPF target",
            cargo([
                "+nightly",
                "clippy",
                "-p",
                "agent-ebpf",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
                "-C",
                "panic=abort",
            ]),
        ),
    );

    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    say!("lint: all checks passed");
    Ok(())
}
