//! Cgroup attribution: a process that moves itself into a fresh cgroup is recorded
//! there, under the right id and path.

use mentat_tests::truth::{CgroupHop, CgroupMove};
use mentat_tests::{ScratchCgroup, percent_off, record_truth};

#[test]
fn a_process_moved_into_a_new_cgroup_is_recorded_there() {
    let (cgroup, path, expected_id) = scratch_cgroup();

    let (recording, truth): (_, CgroupMove) =
        record_truth(&[], &["cgroup", "--path", &path, "--ms", "300"]);
    assert_eq!(
        truth.cgroup_id, expected_id,
        "the workload and the test disagree on {path}'s inode"
    );

    let records = recording.records.of_pid(truth.pid);
    let in_cgroup: Vec<_> = records
        .iter()
        .filter(|r| r.cgroup_id == expected_id)
        .collect();
    assert!(
        !in_cgroup.is_empty(),
        "no record of pid {} with cgroup_id {expected_id} ({path}); its records: {records:#?}",
        truth.pid
    );
    for record in &in_cgroup {
        assert_eq!(
            record.cgroup_path.as_deref(),
            Some(cgroup.relative_path().as_str()),
            "cgroup_path of pid {} in cgroup {expected_id}",
            truth.pid
        );
    }

    // At least 90 %: the process ran in the agent's cgroup from exec until it wrote
    // cgroup.procs (loading, argument parsing: a few ms) and burned the 300 ms after
    // that, so all but a few percent of its rusage belongs to the new cgroup.
    let cpu_ns: u64 = in_cgroup.iter().map(|r| r.cpu_ns).sum();
    assert!(
        cpu_ns as f64 >= 0.9 * truth.rusage_cpu_ns as f64,
        "pid {} in {path}: {cpu_ns} ns recorded, {:+.1} % off its getrusage of {} ns; records: {records:#?}",
        truth.pid,
        percent_off(cpu_ns, truth.rusage_cpu_ns),
        truth.rusage_cpu_ns
    );

    // The agent has reaped the workload by now, so the cgroup is empty.
    cgroup.remove().expect("removing the scratch cgroup");
}

/// A process that was charged in one cgroup, moves, and is then charged almost only at
/// switch-outs (it blocks often) must have that time billed to its new cgroup: whatever the
/// kernel side keeps per CPU between switches must not carry the old cgroup across a move.
#[test]
fn a_process_that_blocks_often_is_billed_to_its_new_cgroup_after_a_move() {
    let (cgroup, path, expected_id) = scratch_cgroup();

    let args = ["cgroup-hop", "--path", &path, "--pre", "50", "--ms", "300"];
    let (recording, truth): (_, CgroupHop) = record_truth(&[], &args);
    assert_eq!(truth.cgroup_id, expected_id);

    let records = recording.records.of_pid(truth.pid);
    let in_new: u64 = records
        .iter()
        .filter(|r| r.cgroup_id == expected_id)
        .map(|r| r.cpu_ns)
        .sum();
    let elsewhere: u64 = records
        .iter()
        .filter(|r| r.cgroup_id != expected_id)
        .map(|r| r.cpu_ns)
        .sum();
    let after_move = truth.rusage_cpu_ns.saturating_sub(truth.rusage_at_move_ns);
    // 90 % / 10 %: the move itself (the cgroup.procs write, a few hundred µs) and the
    // exit path after the last getrusage sit on either side of the line; everything else
    // after the move is 1,500 bursts that each end in a switch-out in the new cgroup.
    // A cache that kept charging the old cgroup's slot puts nearly all of it elsewhere.
    assert!(
        in_new as f64 >= 0.9 * after_move as f64,
        "pid {}: {in_new} ns recorded in {path}, {after_move} ns of CPU after the move by \
         getrusage ({} ns before); {elsewhere} ns recorded elsewhere; records: {records:#?}",
        truth.pid,
        truth.rusage_at_move_ns
    );
    assert!(
        elsewhere as f64 <= truth.rusage_at_move_ns as f64 + 0.1 * after_move as f64,
        "pid {}: {elsewhere} ns recorded outside {path}, only {} ns ran before the move; \
         records: {records:#?}",
        truth.pid,
        truth.rusage_at_move_ns
    );
    cgroup.remove().expect("removing the scratch cgroup");
}

/// A fresh scratch cgroup, its path as the workload takes it, and its id.
fn scratch_cgroup() -> (ScratchCgroup, String, u64) {
    let cgroup = ScratchCgroup::create().expect("creating a scratch cgroup under the v2 mount");
    let path = cgroup
        .path()
        .to_str()
        .expect("cgroup path is UTF-8")
        .to_owned();
    let id = cgroup.id().expect("the scratch cgroup's inode number");
    (cgroup, path, id)
}
