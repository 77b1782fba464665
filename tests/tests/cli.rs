//! The command line: usage errors, exit-code and output pass-through, whole-node
//! recording, and `check`.

use std::time::Duration;

use mentat_tests::records::SYSCALL_CLASSES;
use mentat_tests::{record, run_agent};

/// A usage error fails at once; if the agent wrongly accepted the arguments it would
/// record the whole node without end, so do not wait long for it.
const USAGE_TIMEOUT: Duration = Duration::from_secs(30);

fn assert_usage_error(args: &[&str], named: &str) {
    let output = run_agent(args, USAGE_TIMEOUT)
        .unwrap_or_else(|e| panic!("running mentat-agent {args:?}: {e:#}"));
    assert_eq!(
        output.exit_code,
        Some(2),
        "mentat-agent {args:?} is a usage error; {}",
        output.describe()
    );
    assert!(
        output.stderr.contains(named),
        "mentat-agent {args:?}: stderr does not name {named:?}: {}",
        output.stderr
    );
}

#[test]
fn an_unknown_flag_is_a_usage_error() {
    assert_usage_error(&["record", "--bogus-flag"], "--bogus-flag");
}

#[test]
fn a_bad_duration_is_a_usage_error() {
    assert_usage_error(&["record", "--duration", "10q"], "10q");
}

#[test]
fn an_unknown_format_is_a_usage_error() {
    assert_usage_error(&["record", "--format", "yaml"], "yaml");
}

#[test]
fn the_commands_exit_code_and_output_pass_through() {
    let recording = record(&[], Some(&["exit-code", "--code", "7"]))
        .expect("recording `workload exit-code --code 7`");
    let output = &recording.output;
    assert_eq!(
        output.exit_code,
        Some(7),
        "{} must exit with the command's code; {}",
        recording.invocation,
        output.describe()
    );
    assert!(
        output.stdout.contains("hello from workload"),
        "the command's stdout does not pass through: {:?}",
        output.stdout
    );
    assert!(
        output.stderr.contains("err from workload"),
        "the command's stderr does not pass through: {:?}",
        output.stderr
    );
    assert_eq!(
        recording.records.summary.command_exit_code,
        Some(7),
        "summary.command_exit_code"
    );
}

#[test]
fn recording_the_whole_node_for_a_second() {
    let recording = record(&["--duration", "1s"], None).expect("recording the node for 1 s");
    recording
        .output
        .ensure_success(&recording.invocation)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let records = &recording.records;
    assert_eq!(
        records.summary.command_exit_code, None,
        "no command, so no command exit code"
    );
    // The test process itself polls for the agent's exit all along, so a whole-node
    // recording (not just some command's descendants) must include it.
    let me = std::process::id();
    assert!(
        !records.of_pid(me).is_empty(),
        "no record of the test process (pid {me}) among {} process records of the whole node",
        records.processes.len()
    );
    let window = records.summary.window_end - records.summary.window_start;
    assert!(
        window >= time::Duration::milliseconds(900) && window <= time::Duration::seconds(10),
        "a 1 s recording has a {window} window"
    );

    // Every line is consistent with itself.
    for record in &records.processes {
        assert!(
            seconds_match_ns(record.cpu_core_seconds, record.cpu_ns),
            "cpu_core_seconds != cpu_ns / 1e9: {record:#?}"
        );
        assert_eq!(
            record.syscalls_in_classes(),
            record.syscalls,
            "syscalls_by_class (over {SYSCALL_CLASSES:?}) does not add up to syscalls: {record:#?}"
        );
    }
    for (name, seconds, ns) in [
        ("idle", records.idle.cpu_core_seconds, records.idle.cpu_ns),
        (
            "kernel",
            records.kernel.cpu_core_seconds,
            records.kernel.cpu_ns,
        ),
        (
            "unattributed",
            records.unattributed.cpu_core_seconds,
            records.unattributed.cpu_ns,
        ),
    ] {
        assert!(
            seconds_match_ns(seconds, ns),
            "{name} bucket: cpu_core_seconds {seconds} != cpu_ns {ns} / 1e9"
        );
    }
}

/// Equal up to f64 rounding (and a formatter printing fewer digits): 1 ns or 1e-9 relative.
fn seconds_match_ns(seconds: f64, ns: u64) -> bool {
    let expected = ns as f64 / 1e9;
    (seconds - expected).abs() <= 1e-9 + expected * 1e-9
}

#[test]
fn check_reports_btf_and_sched_switch() {
    let output = run_agent(["check"], Duration::from_secs(60)).expect("running mentat-agent check");
    assert_eq!(
        output.exit_code,
        Some(0),
        "mentat-agent check fails as root on this kernel; {}",
        output.describe()
    );
    for needle in ["BTF", "sched_switch"] {
        assert!(
            output.stdout.contains(needle),
            "mentat-agent check does not mention {needle} on stdout: {:?}",
            output.stdout
        );
    }
    // This kernel (≥ 6.3, BTF) has the socket tracepoints, so the receiver can
    // bind spans to their senders; `check` must say so, since without it every
    // sender but a trusted forwarder is refused.
    assert!(
        output
            .stdout
            .lines()
            .any(|l| l.starts_with("ok") && l.contains("span sender binding")),
        "mentat-agent check does not report span sender binding as on: {:?}",
        output.stdout
    );
}

#[test]
fn a_gpu_library_that_does_not_load_is_named_and_cpu_is_still_metered() {
    let missing = "/nonexistent/libnvidia-ml.so.1";
    let recording = record(
        &["--gpu-library", missing],
        Some(&["burn", "--threads", "1", "--ms", "1000"]),
    )
    .expect("recording with a missing NVML library");
    let output = &recording.output;
    assert_eq!(output.exit_code, Some(0), "{}", output.describe());
    assert!(
        output.stderr.contains("GPU metering off") && output.stderr.contains(missing),
        "an NVML library asked for by name and not loaded is named: {}",
        output.stderr
    );
    // A log read from a pipe (a pod's log, a file) carries no colour codes.
    assert!(
        !output.stderr.contains('\x1b'),
        "ANSI escapes in a log that is not a terminal: {:?}",
        output.stderr
    );
    let burn: mentat_tests::truth::Burn = recording.ground_truth().expect("ground truth");
    let child = recording
        .records
        .processes
        .iter()
        .filter(|p| p.pid == burn.child_pid)
        .map(|p| p.cpu_ns)
        .sum::<u64>();
    // 1 %: the tolerance tests/cpu.rs justifies for a burner against wait4, over
    // as long a burn (a second): the per-process differences are a few ms at most.
    assert!(
        child.abs_diff(burn.rusage_cpu_ns) * 100 <= burn.rusage_cpu_ns,
        "the burner without GPU metering: {child} ns, wait4 {} ns",
        burn.rusage_cpu_ns
    );
}
