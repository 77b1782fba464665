//! Shared helpers for mentat-agent's privileged end-to-end tests.
//!
//! Each test runs a real workload (this crate's `workload` binary) under the real agent
//! (`mentat-agent record -- workload ...`) and compares what the agent recorded with
//! ground truth the workload measured on its own: the pids it forked, the rusage
//! `wait4` returned for them, the cgroup it moved itself into. Neither side's numbers
//! come from the other, so a wrong agent cannot agree with the workload by accident.
//!
//! The daemon tests (otlp, outage, crash, prometheus, api) run `mentat-agent run` as a
//! node daemon ([`daemon`]) and check its ledger, read back through its query API,
//! against independent consumers of what it exports: an OTLP/gRPC receiver in Python
//! ([`otlp`], `py/otlp_receiver.py`) and Debian's Prometheus. Sums of the ledger's
//! decimal strings are exact ([`exact`]).
//!
//! Paths to both binaries come from the environment (`TEST_AGENT_BIN`,
//! `TEST_WORKLOAD_BIN`), set by `cargo xtask test`.

pub mod alerts;
pub mod cgroup;
pub mod daemon;
pub mod exact;
pub mod http;
pub mod nvml_stub;
pub mod otlp;
pub mod records;
pub mod run;
pub mod storage;
pub mod traced;
pub mod truth;

pub use cgroup::{ScratchCgroup, cgroup2_mount, random_container_id, random_pod_uid, unshare_bin};
pub use records::{
    Bucket, GroupRecord, ProcessRecord, Records, Summary, Totals, UnattributedBucket,
};
pub use run::{
    Output, RawRecording, Recording, agent_bin, node_steal_ns, record, record_command, record_raw,
    record_truth, record_workload, run_agent, run_agent_env, workload_bin, workload_command,
};
pub use storage::storage_dir;

/// Whether `actual` lies within `tolerance` (a fraction, 0.01 = 1 %) of `expected`.
pub fn within(actual: u64, expected: u64, tolerance: f64) -> bool {
    (actual as f64 - expected as f64).abs() <= tolerance * expected as f64
}

/// `actual` relative to `expected`, as a signed percentage, for failure messages.
pub fn percent_off(actual: u64, expected: u64) -> f64 {
    if expected == 0 {
        return f64::INFINITY;
    }
    (actual as f64 - expected as f64) / expected as f64 * 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn within_is_symmetric_around_expected() {
        assert!(within(101, 100, 0.01));
        assert!(within(99, 100, 0.01));
        assert!(!within(102, 100, 0.01));
        assert!(!within(98, 100, 0.01));
        assert!(within(0, 0, 0.01));
    }
}
