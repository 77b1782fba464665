//! `build` and `run`: the agent binary itself.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::cargo::{cargo, run_step, target_dir};
use crate::cmd::{exec, find_program, is_root};
use crate::setup;

/// Sets up, builds mentat-agent (release unless `debug`) and returns the binary's path.
pub fn build(debug: bool) -> Result<PathBuf> {
    setup::setup()?;
    let (profile, args): (&str, &[&str]) = if debug {
        ("debug", &["build", "-p", "mentat-agent"])
    } else {
        ("release", &["build", "--release", "-p", "mentat-agent"])
    };
    run_step(&format!("building mentat-agent ({profile})"), cargo(args))?;
    Ok(target_dir()?.join(profile).join("mentat-agent"))
}

/// Builds the agent in release mode and becomes `mentat-agent run ARGS`.
pub fn run(args: &[OsString]) -> Result<()> {
    let bin = build(false)?;
    say!("agent binary: {}", bin.display());
    let mut agent = if is_root() {
        Command::new(&bin)
    } else if find_program("sudo").is_some() {
        // -E keeps RUST_LOG and the like; loading eBPF programs needs root (or
        // CAP_BPF+CAP_PERFMON, which a freshly built binary does not carry).
        say!("not root: running the agent through sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg("-E").arg(&bin);
        sudo
    } else {
        bail!(
            "mentat-agent needs root or CAP_BPF+CAP_PERFMON to load its eBPF programs, \
             and there is no sudo here: run `cargo xtask run` as root"
        );
    };
    agent.arg("run").args(args);
    Err(exec(&mut agent))
}
