//! `cargo xtask`: sets up the toolchain, then builds, runs, tests, benchmarks and lints
//! mentat-agent.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Prints a progress line on stderr, prefixed so it stands out from cargo's own output.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!("xtask: {}", format_args!($($arg)*))
    };
}

mod agent;
mod cargo;
mod cmd;
mod lint;
mod setup;
mod test;

/// Command line of `cargo xtask`.
#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "Set up, build, run, test, benchmark and lint mentat-agent"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

/// The tasks `cargo xtask` runs.
#[derive(Subcommand)]
enum Task {
    /// Install what builds and tests need: nightly rust-src, bpf-linker, Debian and PyPI
    /// packages, and a bpffs mount; quick when everything is already there.
    Setup,
    /// Set up, then build the agent (release unless --debug) and print the binary's path.
    Build {
        /// Build the debug profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build the agent in release mode and run it in place of this process (through
    /// `sudo -E` when not root).
    Run {
        /// Arguments for `mentat-agent run`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, then run the unit tests, build the release binaries and run the privileged
    /// integration tests (needs root); ends with a line `N passed, N failed`.
    Test {
        /// Arguments for the integration tests' harness, e.g. a test name filter.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Set up, build the release binaries and run the `bench` binary of mentat-tests.
    Bench {
        /// Arguments for `bench`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Check formatting and run clippy on the userspace crates and on the eBPF crate.
    Lint,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = prepend_cargo_bin_to_path().and_then(|()| match cli.task {
        Task::Setup => setup::setup(),
        Task::Build { debug } => agent::build(debug).map(|bin| println!("{}", bin.display())),
        Task::Run { args } => agent::run(&args),
        Task::Test { args } => test::test(&args),
        Task::Bench { args } => test::bench(&args),
        Task::Lint => lint::lint(),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            say!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Puts cargo's bin directory first on PATH, so the bpf-linker that `setup` installs is the
/// one every child (and aya-build inside the agent's build script) finds, even in a shell
/// whose PATH lacks it or has another bpf-linker earlier.
fn prepend_cargo_bin_to_path() -> Result<()> {
    let cargo_home = match std::env::var_os("CARGO_HOME") {
        Some(home) => PathBuf::from(home),
        None => setup::home_dir()?.join(".cargo"),
    };
    let bin = cargo_home.join("bin");
    let old = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = std::env::split_paths(&old).collect();
    if paths.first() == Some(&bin) {
        return Ok(());
    }
    paths.insert(0, bin);
    let new = std::env::join_paths(paths).context("cannot put cargo's bin directory on PATH")?;
    // SAFETY: this runs first thing in main, before xtask starts any thread, so nothing can
    // read the environment concurrently.
    unsafe { std::env::set_var("PATH", new) };
    Ok(())
}
