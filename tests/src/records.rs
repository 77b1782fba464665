//! The agent's JSONL output, typed, with the structural parts of its contract checked
//! while parsing, so every test checks them on every run.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Deserializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// The classes a process's syscalls are broken down into (`syscalls_by_class` keys).
pub const SYSCALL_CLASSES: [&str; 8] = [
    "other", "file", "network", "memory", "process", "sync", "time", "ipc",
];

/// One process instance (pid, start time) in one cgroup.
///
/// Nullable fields use `Option::deserialize` so that a *missing* key is an error while
/// an explicit `null` is `None`: the contract says the key is always there.
#[derive(Clone, Debug, Deserialize)]
pub struct ProcessRecord {
    pub record_id: String,
    pub workload_kind: String,
    pub node: String,
    #[serde(deserialize_with = "rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(deserialize_with = "rfc3339")]
    pub window_end: OffsetDateTime,
    pub pid: u32,
    #[serde(deserialize_with = "rfc3339")]
    pub process_start_time: OffsetDateTime,
    #[serde(deserialize_with = "Option::deserialize")]
    pub ppid: Option<u32>,
    pub comm: String,
    #[serde(deserialize_with = "Option::deserialize")]
    pub exe: Option<String>,
    pub cgroup_id: u64,
    #[serde(deserialize_with = "Option::deserialize")]
    pub cgroup_path: Option<String>,
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
    pub syscalls_by_class: BTreeMap<String, u64>,
    pub exited: bool,
}

/// The `idle` and `kernel` buckets.
#[derive(Clone, Debug, Deserialize)]
pub struct Bucket {
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
}

/// The `unattributed` bucket: CPU and syscalls the agent could not give to a process.
#[derive(Clone, Debug, Deserialize)]
pub struct UnattributedBucket {
    pub cpu_ns: u64,
    pub cpu_core_seconds: f64,
    pub syscalls: u64,
    pub map_full_drops: u64,
    pub task_read_errors: u64,
}

/// The last line of every recording.
#[derive(Clone, Debug, Deserialize)]
pub struct Summary {
    #[serde(deserialize_with = "rfc3339")]
    pub window_start: OffsetDateTime,
    #[serde(deserialize_with = "rfc3339")]
    pub window_end: OffsetDateTime,
    /// Kernel side: per CPU, first to last observed context switch, summed.
    pub accounted_cpu_ns: u64,
    /// Every process record printed plus the four buckets.
    pub attributed_cpu_ns: u64,
    pub map_full_drops: u64,
    pub events_lost: u64,
    #[serde(deserialize_with = "Option::deserialize")]
    pub command_exit_code: Option<i32>,
    /// Number of process records printed.
    pub processes: u64,
}

#[derive(Deserialize)]
#[serde(tag = "record_type", rename_all = "snake_case")]
enum Line {
    Process(ProcessRecord),
    Idle(Bucket),
    IrqSteal(Bucket),
    Kernel(Bucket),
    Unattributed(UnattributedBucket),
    Summary(Summary),
}

/// Everything one `record` run wrote.
#[derive(Clone, Debug)]
pub struct Records {
    pub processes: Vec<ProcessRecord>,
    pub idle: Bucket,
    /// Wall time no task ran (interrupts, hypervisor steal).
    pub irq_steal: Bucket,
    pub kernel: Bucket,
    pub unattributed: UnattributedBucket,
    pub summary: Summary,
}

impl Records {
    /// Parses JSONL and checks the contract's structure: every line a known record
    /// type with every field present and well typed, one of each bucket, exactly one
    /// summary and it last, and the summary's process count matching the records.
    pub fn parse(text: &str) -> Result<Self> {
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(index, line)| (index + 1, line))
            .collect();
        let mut processes = Vec::new();
        let (mut idle, mut irq_steal, mut kernel, mut unattributed, mut summary) =
            (None, None, None, None, None);
        for (position, &(number, line)) in lines.iter().enumerate() {
            let parsed: Line = serde_json::from_str(line)
                .with_context(|| format!("line {number} is not a valid record: {}", clip(line)))?;
            match parsed {
                Line::Process(record) => {
                    record
                        .check()
                        .with_context(|| format!("line {number}: {}", clip(line)))?;
                    processes.push(record);
                }
                Line::Idle(bucket) => set_once(&mut idle, bucket, "idle", number)?,
                Line::IrqSteal(bucket) => set_once(&mut irq_steal, bucket, "irq_steal", number)?,
                Line::Kernel(bucket) => set_once(&mut kernel, bucket, "kernel", number)?,
                Line::Unattributed(bucket) => {
                    set_once(&mut unattributed, bucket, "unattributed", number)?;
                }
                Line::Summary(record) => {
                    ensure!(
                        position + 1 == lines.len(),
                        "line {number}: the summary must be the last line, but {} more follow",
                        lines.len() - position - 1
                    );
                    set_once(&mut summary, record, "summary", number)?;
                }
            }
        }
        let summary = summary.context("no summary record")?;
        ensure!(
            summary.processes == processes.len() as u64,
            "the summary counts {} process records but {} were printed",
            summary.processes,
            processes.len()
        );
        ensure!(
            summary.window_start <= summary.window_end,
            "the summary's window ends ({}) before it starts ({})",
            summary.window_end,
            summary.window_start
        );
        Ok(Records {
            processes,
            idle: idle.context("no idle bucket record")?,
            irq_steal: irq_steal.context("no irq_steal bucket record")?,
            kernel: kernel.context("no kernel bucket record")?,
            unattributed: unattributed.context("no unattributed bucket record")?,
            summary,
        })
    }

    /// All records of processes with this pid (one per cgroup the process was in,
    /// more if pids were reused during the recording).
    pub fn of_pid(&self, pid: u32) -> Vec<&ProcessRecord> {
        self.processes.iter().filter(|r| r.pid == pid).collect()
    }

    /// CPU time of every record with this pid, summed.
    pub fn cpu_ns_of(&self, pid: u32) -> u64 {
        self.of_pid(pid).iter().map(|r| r.cpu_ns).sum()
    }

    /// Σ cpu_ns over every process record and the four buckets: what the summary's
    /// `attributed_cpu_ns` must say, recomputed from the lines themselves.
    pub fn attributed_cpu_ns(&self) -> u64 {
        self.processes.iter().map(|r| r.cpu_ns).sum::<u64>()
            + self.idle.cpu_ns
            + self.irq_steal.cpu_ns
            + self.kernel.cpu_ns
            + self.unattributed.cpu_ns
    }
}

impl ProcessRecord {
    /// Parts of the contract that serde's types cannot say.
    fn check(&self) -> Result<()> {
        ensure!(
            self.workload_kind == "process",
            "a process record has workload_kind {:?}",
            self.workload_kind
        );
        if let Some(path) = &self.cgroup_path {
            ensure!(
                path.starts_with('/'),
                "cgroup_path {path:?} is not relative to the cgroup v2 mount (no leading '/')"
            );
        }
        if let Some(class) = self
            .syscalls_by_class
            .keys()
            .find(|class| !SYSCALL_CLASSES.contains(&class.as_str()))
        {
            bail!("unknown syscall class {class:?}; known: {SYSCALL_CLASSES:?}");
        }
        ensure!(
            self.window_start <= self.window_end,
            "the record's window ends before it starts"
        );
        Ok(())
    }

    /// Sum of `syscalls_by_class`.
    pub fn syscalls_in_classes(&self) -> u64 {
        self.syscalls_by_class.values().sum()
    }

    /// `syscalls_by_class[class]`, 0 when absent.
    pub fn syscalls_of_class(&self, class: &str) -> u64 {
        self.syscalls_by_class.get(class).copied().unwrap_or(0)
    }
}

fn set_once<T>(slot: &mut Option<T>, value: T, what: &str, line: usize) -> Result<()> {
    ensure!(slot.is_none(), "line {line}: a second {what} record");
    *slot = Some(value);
    Ok(())
}

fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<OffsetDateTime, D::Error> {
    let text = String::deserialize(deserializer)?;
    OffsetDateTime::parse(&text, &Rfc3339)
        .map_err(|e| serde::de::Error::custom(format!("{text:?} is not an RFC 3339 time: {e}")))
}

/// A line short enough for an error message.
fn clip(line: &str) -> String {
    const MAX: usize = 400;
    match line.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &line[..end]),
        None => line.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESS: &str = r#"{"record_type":"process","workload_kind":"process","record_id":"a1","node":"n","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-01T00:00:01.5Z","pid":42,"process_start_time":"2026-01-01T00:00:00.25Z","ppid":1,"comm":"sh","exe":null,"cgroup_id":7,"cgroup_path":"/x","cpu_ns":1000,"cpu_core_seconds":0.000001,"syscalls":3,"syscalls_by_class":{"process":2,"file":1},"exited":true}"#;
    const BUCKETS: &str = r#"{"record_type":"idle","cpu_ns":10,"cpu_core_seconds":0.00000001,"syscalls":0}
{"record_type":"irq_steal","cpu_ns":0,"cpu_core_seconds":0.0,"syscalls":0}
{"record_type":"kernel","cpu_ns":20,"cpu_core_seconds":0.00000002,"syscalls":0}
{"record_type":"unattributed","cpu_ns":30,"cpu_core_seconds":0.00000003,"syscalls":4,"map_full_drops":0,"task_read_errors":0}"#;
    const SUMMARY: &str = r#"{"record_type":"summary","window_start":"2026-01-01T00:00:00Z","window_end":"2026-01-01T00:00:01.5Z","accounted_cpu_ns":1060,"attributed_cpu_ns":1060,"map_full_drops":0,"events_lost":0,"command_exit_code":null,"processes":1}"#;

    fn jsonl(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    #[test]
    fn parses_a_well_formed_recording() {
        let records = Records::parse(&jsonl(&[PROCESS, BUCKETS, SUMMARY])).expect("parse");
        assert_eq!(records.processes.len(), 1);
        assert_eq!(records.cpu_ns_of(42), 1000);
        assert_eq!(records.attributed_cpu_ns(), 1060);
        assert_eq!(records.processes[0].syscalls_in_classes(), 3);
        assert_eq!(records.processes[0].syscalls_of_class("process"), 2);
        assert_eq!(records.summary.command_exit_code, None);
    }

    #[test]
    fn rejects_a_missing_nullable_key() {
        let without_ppid = PROCESS.replace(r#""ppid":1,"#, "");
        let err = Records::parse(&jsonl(&[&without_ppid, BUCKETS, SUMMARY]))
            .expect_err("a record without ppid must be rejected");
        assert!(format!("{err:#}").contains("ppid"), "{err:#}");
    }

    #[test]
    fn rejects_a_summary_that_is_not_last() {
        assert!(Records::parse(&jsonl(&[SUMMARY, PROCESS, BUCKETS])).is_err());
    }

    #[test]
    fn rejects_a_wrong_process_count() {
        assert!(Records::parse(&jsonl(&[BUCKETS, SUMMARY])).is_err());
    }

    #[test]
    fn rejects_a_bad_timestamp_and_an_unknown_class() {
        let bad_time = PROCESS.replace("00:00:00.25Z", "yesterday");
        assert!(Records::parse(&jsonl(&[&bad_time, BUCKETS, SUMMARY])).is_err());
        let bad_class = PROCESS.replace(r#""file":1"#, r#""disk":1"#);
        assert!(Records::parse(&jsonl(&[&bad_class, BUCKETS, SUMMARY])).is_err());
    }
}
