//! Syscall counting: a child that makes a known number of syscalls and nothing else.

use mentat_tests::record_truth;
use mentat_tests::records::SYSCALL_CLASSES;
use mentat_tests::truth::Getppid;

#[test]
fn a_million_getppid_calls_are_counted_exactly() {
    const COUNT: u64 = 1_000_000;
    // What the forked child does besides getppid: glibc's post-fork set_robust_list and
    // the final exit_group (`strace -f -c` shows exactly those two). 50 leaves room for
    // a libc that does a little more around fork, but not for double counting or for
    // charging another process's syscalls to the child.
    const SLACK: u64 = 50;

    let args = ["getppid", "--count", &COUNT.to_string()];
    let (recording, truth): (_, Getppid) = record_truth(&[], &args);
    assert_eq!(truth.count, COUNT, "the workload ran a different count");

    let records = recording
        .records
        .expect_pid(truth.child_pid, "the getppid child");
    let syscalls: u64 = records.iter().map(|r| r.syscalls).sum();
    let process_class: u64 = records.iter().map(|r| r.syscalls_of_class("process")).sum();
    let in_classes: u64 = records.iter().map(|r| r.syscalls_in_classes()).sum();

    assert!(
        (COUNT..=COUNT + SLACK).contains(&syscalls),
        "getppid child (pid {}): {syscalls} syscalls recorded, expected {COUNT}..={}; records: {records:#?}",
        truth.child_pid,
        COUNT + SLACK
    );
    assert!(
        process_class >= COUNT,
        "getppid child (pid {}): only {process_class} syscalls in class \"process\", expected at least {COUNT}; records: {records:#?}",
        truth.child_pid
    );
    // Each syscall belongs to exactly one of the classes ("other" catches the rest).
    assert_eq!(
        in_classes, syscalls,
        "getppid child (pid {}): syscalls_by_class (over {SYSCALL_CLASSES:?}) does not add up to syscalls; records: {records:#?}",
        truth.child_pid
    );
}
