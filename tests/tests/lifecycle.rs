//! Process lifecycle: many short-lived children, each recorded once, as exited, under
//! the right parent; and a reused pid never merges two processes.

use std::collections::{BTreeMap, HashMap};

use mentat_tests::truth::{ReusePid, SpawnMany};
use mentat_tests::{percent_off, record_truth, within};

#[test]
fn three_hundred_short_children_are_each_recorded() {
    const CHILDREN: usize = 300;
    let (recording, truth): (_, SpawnMany) =
        record_truth(&[], &["spawn-many", "--n", "300", "--ms", "3"]);
    assert_eq!(
        truth.children.len(),
        CHILDREN,
        "children the workload forked"
    );
    let records = &recording.records;

    // Gather every failure before asserting, so one run shows the whole picture.
    let mut missing = Vec::new();
    let mut not_exited = Vec::new();
    let mut wrong_ppid = Vec::new();
    for child in &truth.children {
        let of_child = records.of_pid(child.pid);
        if of_child.is_empty() {
            missing.push(child.pid);
            continue;
        }
        if !of_child.iter().any(|r| r.exited) {
            not_exited.push(child.pid);
        }
        wrong_ppid.extend(
            of_child
                .iter()
                .filter(|r| r.ppid != Some(truth.parent_pid))
                .map(|r| (r.pid, r.ppid)),
        );
    }
    assert!(
        missing.is_empty(),
        "{} of {CHILDREN} children have no record: {missing:?}",
        missing.len()
    );
    assert!(
        not_exited.is_empty(),
        "{} children have no record with exited: true: {not_exited:?}",
        not_exited.len()
    );
    assert!(
        wrong_ppid.is_empty(),
        "records whose ppid is not the workload's pid {}: (pid, ppid) {wrong_ppid:?}",
        truth.parent_pid
    );

    // 2 %, looser than the 1 % of a single long burn: each child runs only ~3 ms, so the
    // fixed per-process differences between the two clocks (fork to first switch-in,
    // the exit path after the parent was woken to reap, rusage's µs rounding, a few µs
    // each) weigh more against its CPU time; 2 % of 300 × 3 ms is 18 ms, ~60 µs a child.
    let cpu_ns = records.cpu_ns_of_all(truth.children.iter().map(|c| c.pid));
    assert!(
        within(cpu_ns, truth.total_rusage_cpu_ns, 0.02),
        "children's CPU: agent says {cpu_ns} ns, wait4 says {} ns ({:+.2} %); \
         hypervisor steal during the run: {} ns",
        truth.total_rusage_cpu_ns,
        percent_off(cpu_ns, truth.total_rusage_cpu_ns),
        recording.steal_ns
    );

    // A process instance is (pid, start time): within one cgroup (and window) no two
    // records may share it, or two processes were merged (or one split).
    let mut seen = HashMap::new();
    for record in &records.processes {
        let key = (
            record.window_start,
            record.cgroup_id,
            record.pid,
            record.process_start_time,
        );
        *seen.entry(key).or_insert(0usize) += 1;
    }
    let duplicated: Vec<_> = seen.into_iter().filter(|(_, n)| *n > 1).collect();
    assert!(
        duplicated.is_empty(),
        "(window_start, cgroup_id, pid, process_start_time) printed more than once: {duplicated:?}"
    );
}

#[test]
fn a_reused_pid_gets_a_record_per_process() {
    // Different amounts, so a merge (one record with both) or a swap shows.
    let (recording, truth): (_, ReusePid) = record_truth(
        &[],
        &["reuse-pid", "--first-ms", "40", "--second-ms", "120"],
    );

    let records = recording.records.of_pid(truth.pid);
    let mut by_start = BTreeMap::new();
    for record in &records {
        *by_start.entry(record.process_start_time).or_insert(0u64) += record.cpu_ns;
    }
    assert_eq!(
        by_start.len(),
        2,
        "pid {} was two processes, one after the other; its records should carry two start times: {records:#?}",
        truth.pid
    );
    // 5 %: a 40 ms process has the same few tens of µs of fixed per-process difference
    // between the clocks as above (< 0.2 %), and the rest is margin; a merge would put
    // 160 ms in one instance and nothing in the other.
    for ((start, cpu_ns), instance) in by_start.iter().zip(&truth.instances) {
        assert!(
            within(*cpu_ns, instance.rusage_cpu_ns, 0.05),
            "pid {} started at {start}: agent says {cpu_ns} ns, wait4 says {} ns ({:+.2} %); \
             hypervisor steal during the run: {} ns; records: {records:#?}",
            truth.pid,
            instance.rusage_cpu_ns,
            percent_off(*cpu_ns, instance.rusage_cpu_ns),
            recording.steal_ns
        );
    }
    assert!(
        records
            .iter()
            .all(|r| r.exited && r.ppid == Some(truth.parent_pid)),
        "both instances of pid {} exited, children of {}: {records:#?}",
        truth.pid,
        truth.parent_pid
    );
}
