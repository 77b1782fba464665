//! Conservation: every nanosecond the kernel accounts for lands in a process record or
//! a bucket, also when the kernel's per-process map is full.

use mentat_tests::records::Records;
use mentat_tests::truth::{Burn, SpawnMany};
use mentat_tests::{Recording, record_truth};

/// The summary's `attributed_cpu_ns` equals `accounted_cpu_ns` exactly, and equals what
/// the printed lines add up to (with `--all` every process on the node is printed).
fn assert_conserved(recording: &Recording) {
    let Records { summary, .. } = &recording.records;
    assert_eq!(
        summary.attributed_cpu_ns,
        summary.accounted_cpu_ns,
        "{}: attributed_cpu_ns != accounted_cpu_ns (off by {} ns); summary: {summary:#?}",
        recording.invocation,
        summary.attributed_cpu_ns as i128 - summary.accounted_cpu_ns as i128
    );
    assert_eq!(
        recording.records.attributed_cpu_ns(),
        summary.attributed_cpu_ns,
        "{}: the process records and buckets printed do not add up to the summary's attributed_cpu_ns",
        recording.invocation
    );
}

#[test]
fn a_full_process_map_spills_into_unattributed() {
    let (recording, truth): (_, SpawnMany) = record_truth(
        &["--all", "--proc-map-entries", "4"],
        &["spawn-many", "--n", "50", "--ms", "5"],
    );
    let records = &recording.records;

    assert!(
        records.summary.map_full_drops > 0,
        "51 processes through a 4-entry map, yet no map_full_drops; summary: {:#?}",
        records.summary
    );

    // CPU of children that have no record (or only part of it in one) cannot be in any
    // process record, and is neither idle nor kernel-thread time, so it must be in the
    // unattributed bucket, which may hold more (other processes that did not fit). The
    // 10 % margin is for the two clocks disagreeing per short process (see lifecycle.rs),
    // on the side where the agent saw a little less than rusage.
    let recorded = records.cpu_ns_of_all(truth.children.iter().map(|c| c.pid));
    let must_be_unattributed = truth.total_rusage_cpu_ns.saturating_sub(recorded);
    assert!(
        records.unattributed.cpu_ns as f64 >= 0.9 * must_be_unattributed as f64,
        "unattributed holds {} ns, but the children had {} ns by wait4 of which only {recorded} ns are in records",
        records.unattributed.cpu_ns,
        truth.total_rusage_cpu_ns
    );

    assert_conserved(&recording);
}

#[test]
fn a_recording_without_overflow_conserves_cpu() {
    let (recording, truth): (_, Burn) =
        record_truth(&["--all"], &["burn", "--threads", "1", "--ms", "200"]);
    let summary = &recording.records.summary;
    assert_eq!(
        summary.map_full_drops, 0,
        "the default process map overflowed on an idle test node; summary: {summary:#?}"
    );

    assert_conserved(&recording);

    // The accounted total is real time on real CPUs: at least the burn, which ran inside
    // the window, and at most every CPU busy for the whole window (plus 1 % and 50 ms a
    // CPU for where the window's wall-clock edges and the first/last switch differ).
    assert!(
        summary.accounted_cpu_ns >= truth.rusage_cpu_ns,
        "accounted_cpu_ns {} is less than the {} ns the burn child alone used",
        summary.accounted_cpu_ns,
        truth.rusage_cpu_ns
    );
    let window_ns = (summary.window_end - summary.window_start).whole_nanoseconds();
    // SAFETY: sysconf has no memory-safety preconditions.
    let cpus = i128::from(unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) }.max(1));
    let ceiling = cpus * (window_ns + window_ns / 100 + 50_000_000);
    assert!(
        i128::from(summary.accounted_cpu_ns) <= ceiling,
        "accounted_cpu_ns {} exceeds {cpus} CPUs × the {window_ns} ns window",
        summary.accounted_cpu_ns
    );
}
