//! Cgroup attribution: a process that moves itself into a fresh cgroup is recorded
//! there, under the right id and path.

use mentat_tests::truth::CgroupMove;
use mentat_tests::{ScratchCgroup, percent_off, record_workload};

#[test]
fn a_process_moved_into_a_new_cgroup_is_recorded_there() {
    let cgroup = ScratchCgroup::create().expect("creating a scratch cgroup under the v2 mount");
    let path = cgroup
        .path()
        .to_str()
        .expect("cgroup path is UTF-8")
        .to_owned();
    let expected_id = cgroup.id().expect("the scratch cgroup's inode number");

    let recording = record_workload(&[], &["cgroup", "--path", &path, "--ms", "300"])
        .unwrap_or_else(|e| panic!("recording `workload cgroup --path {path} --ms 300`: {e:#}"));
    let truth: CgroupMove = recording.ground_truth().expect("cgroup's ground truth");
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
