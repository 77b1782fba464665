//! Writes records as a table, JSON lines or CSV.
//!
//! Names come from procfs and may contain anything: the table escapes
//! control characters, CSV quotes per RFC 4180, JSON escapes per JSON.

use std::io::{self, Write};

use agent_common::SyscallClass;
use serde::Serialize;

use crate::usage::{BucketRecord, ProcessRecord, SummaryRecord, core_seconds};

/// An output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for a person, sorted by CPU, with totals.
    Table,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// Everything one `record` run prints.
#[derive(Clone, Debug)]
pub struct Report {
    /// Process records, in the order to print.
    pub processes: Vec<ProcessRecord>,
    /// Idle, kernel and unattributed.
    pub buckets: Vec<BucketRecord>,
    /// Node-level totals.
    pub summary: SummaryRecord,
}

/// Writes `report` in `format`.
pub fn write_report(out: &mut dyn Write, format: Format, report: &Report) -> io::Result<()> {
    match format {
        Format::Jsonl => write_jsonl(out, report),
        Format::Csv => write_csv(out, report),
        Format::Table => write_table(out, report),
    }
}

fn json_line<T: Serialize>(out: &mut dyn Write, v: &T) -> io::Result<()> {
    serde_json::to_writer(&mut *out, v).map_err(io::Error::other)?;
    out.write_all(b"\n")
}

fn write_jsonl(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    for p in &r.processes {
        json_line(out, p)?;
    }
    for b in &r.buckets {
        json_line(out, b)?;
    }
    json_line(out, &r.summary)
}

const CSV_HEADER: &[&str] = &[
    "record_type",
    "record_id",
    "node",
    "window_start",
    "window_end",
    "workload_kind",
    "pid",
    "process_start_time",
    "ppid",
    "comm",
    "exe",
    "cgroup_id",
    "cgroup_path",
    "cpu_ns",
    "cpu_core_seconds",
    "syscalls",
];

fn write_csv(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let mut header: Vec<String> = CSV_HEADER.iter().map(|s| s.to_string()).collect();
    header.extend(
        SyscallClass::ALL
            .iter()
            .map(|c| format!("syscalls_{}", c.name())),
    );
    header.push("exited".into());
    csv_row(out, &header)?;
    for p in &r.processes {
        let mut row = vec![
            p.record_type.to_string(),
            p.record_id.clone(),
            p.node.clone(),
            p.window_start.clone(),
            p.window_end.clone(),
            p.workload_kind.to_string(),
            p.pid.to_string(),
            p.process_start_time.clone(),
            opt(p.ppid),
            p.comm.clone(),
            p.exe.clone().unwrap_or_default(),
            p.cgroup_id.to_string(),
            p.cgroup_path.clone().unwrap_or_default(),
            p.cpu_ns.to_string(),
            format!("{:.9}", p.cpu_core_seconds),
            p.syscalls.to_string(),
        ];
        row.extend(p.syscalls_by_class.0.iter().map(u64::to_string));
        row.push(p.exited.to_string());
        csv_row(out, &row)?;
    }
    for b in &r.buckets {
        let mut row = vec![
            b.record_type.to_string(),
            b.record_id.clone(),
            b.node.clone(),
            b.window_start.clone(),
            b.window_end.clone(),
        ];
        row.resize(13, String::new());
        row.extend([
            b.cpu_ns.to_string(),
            format!("{:.9}", b.cpu_core_seconds),
            b.syscalls.to_string(),
        ]);
        row.resize(header.len(), String::new());
        csv_row(out, &row)?;
    }
    Ok(())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn csv_row(out: &mut dyn Write, fields: &[String]) -> io::Result<()> {
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    writeln!(out, "{}", line.join(","))
}

/// RFC 4180 quoting: fields with a comma, quote, CR or LF are quoted, quotes doubled.
pub fn csv_field(f: &str) -> String {
    if f.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", f.replace('"', "\"\""))
    } else {
        f.to_string()
    }
}

/// Escapes control characters so a name cannot break a table row.
pub fn printable(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn write_table(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let s = &r.summary;
    writeln!(
        out,
        "node {}  window {} → {}",
        s.node, s.window_start, s.window_end
    )?;
    writeln!(
        out,
        "{:>8} {:>8} {:<16} {:>12} {:>12} {:<6} CGROUP",
        "PID", "PPID", "COMM", "CPU_SECONDS", "SYSCALLS", "EXITED"
    )?;
    let mut rows: Vec<&ProcessRecord> = r.processes.iter().collect();
    rows.sort_by(|a, b| b.cpu_ns.cmp(&a.cpu_ns).then(a.pid.cmp(&b.pid)));
    let (mut cpu, mut sys) = (0u64, 0u64);
    for p in rows {
        cpu += p.cpu_ns;
        sys += p.syscalls;
        writeln!(
            out,
            "{:>8} {:>8} {:<16} {:>12.6} {:>12} {:<6} {}",
            p.pid,
            opt(p.ppid),
            cut(&printable(&p.comm), 16),
            p.cpu_core_seconds,
            p.syscalls,
            if p.exited { "yes" } else { "no" },
            printable(p.cgroup_path.as_deref().unwrap_or("?")),
        )?;
    }
    writeln!(
        out,
        "{:>8} {:>8} {:<16} {:>12.6} {:>12}",
        "TOTAL",
        "",
        format!("{} processes", r.processes.len()),
        core_seconds(cpu),
        sys
    )?;
    writeln!(out)?;
    for b in &r.buckets {
        writeln!(
            out,
            "{:>8} {:>8} {:<16} {:>12.6} {:>12}",
            "", "", b.record_type, b.cpu_core_seconds, b.syscalls
        )?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "node CPU accounted {:.6} s, attributed {:.6} s ({}); {} processes on the node",
        core_seconds(s.accounted_cpu_ns),
        core_seconds(s.attributed_cpu_ns),
        if s.accounted_cpu_ns == s.attributed_cpu_ns {
            "conserved"
        } else {
            "MISMATCH"
        },
        s.processes_on_node
    )?;
    if s.map_full_drops > 0 || s.task_read_errors > 0 || s.events_lost > 0 || s.late_windows > 0 {
        writeln!(
            out,
            "drops: process map full {}, unreadable tasks {}, lifecycle events lost {}, late windows {}",
            s.map_full_drops, s.task_read_errors, s.events_lost, s.late_windows
        )?;
    }
    if let Some(code) = s.command_exit_code {
        writeln!(out, "command exit code {code}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_hostile_fields() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
    }

    #[test]
    fn table_names_cannot_break_rows() {
        assert_eq!(printable("a\nb\tc"), "a\\nb\\tc");
        assert_eq!(printable("ok-name_1"), "ok-name_1");
        assert!(!printable("\u{7}bell").contains('\u{7}'));
    }
}
