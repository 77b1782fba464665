//! Writes records as a table, JSON lines or CSV.
//!
//! Names come from procfs and may contain anything: the table escapes
//! control characters, CSV quotes per RFC 4180, JSON escapes per JSON.

use std::io::{self, Write};

use agent_common::SyscallClass;
use serde::Serialize;

use crate::{
    collect::metered::{Metered, core_seconds},
    report::{
        Report,
        record::{GroupRecord, Identity, Metrics, ProcessRecord},
    },
};

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
    match &r.groups {
        Some(groups) => groups.iter().try_for_each(|g| json_line(out, g))?,
        None => r.processes.iter().try_for_each(|p| json_line(out, p))?,
    }
    r.buckets.iter().try_for_each(|b| json_line(out, b))?;
    json_line(out, &r.summary)
}

/// CSV columns shared by every row type: what, when, and the metrics.
const CSV_COMMON: &[&str] = &[
    "record_type",
    "record_id",
    "node",
    "window_start",
    "window_end",
];

const CSV_IDENTITY: &[&str] = &[
    "workload_kind",
    "container_id",
    "container_runtime",
    "pod_uid",
    "qos_class",
    "wasm_runtime",
    "wasm_module",
];

const CSV_PROCESS: &[&str] = &[
    "pid",
    "process_start_time",
    "ppid",
    "comm",
    "exe",
    "cgroup_id",
    "cgroup_path",
    "exited",
];

const CSV_GROUP: &[&str] = &["group_by", "group", "processes", "cgroup_id", "cgroup_path"];

const CSV_METRICS: &[&str] = &[
    "cpu_ns",
    "cpu_core_seconds",
    "syscalls",
    "network_rx_bytes",
    "network_tx_bytes",
    "network_rx_calls",
    "network_tx_calls",
    "memory_gb_seconds",
    "peak_rss_bytes",
    "disk_read_bytes",
    "disk_write_bytes",
];

fn metric_cells(m: &Metrics) -> Vec<String> {
    let mut cells = vec![
        m.cpu_ns.to_string(),
        format!("{:.9}", m.cpu_core_seconds),
        m.syscalls.to_string(),
        m.network_rx_bytes.to_string(),
        m.network_tx_bytes.to_string(),
        m.network_rx_calls.to_string(),
        m.network_tx_calls.to_string(),
        format!("{:.9}", m.memory_gb_seconds),
        m.peak_rss_bytes.to_string(),
        m.disk_read_bytes.to_string(),
        m.disk_write_bytes.to_string(),
    ];
    cells.extend(m.syscalls_by_class.0.iter().map(u64::to_string));
    cells
}

fn identity_cells(i: &Identity) -> Vec<String> {
    let name = |v: Option<String>| v.unwrap_or_default();
    vec![
        name(i.workload_kind.map(|k| enum_name(&k))),
        name(i.container_id.clone()),
        name(i.container_runtime.map(|k| enum_name(&k))),
        name(i.pod_uid.clone()),
        name(i.qos_class.map(|k| enum_name(&k))),
        name(i.wasm_runtime.clone()),
        name(i.wasm_module.clone()),
    ]
}

/// The serde name of a unit enum variant ("container", "cri-o", ...).
fn enum_name<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|j| j.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn write_csv(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let grouped = r.groups.is_some();
    let mut header: Vec<String> = CSV_COMMON.iter().map(|s| s.to_string()).collect();
    let middle: Vec<&str> = if grouped {
        CSV_GROUP.iter().chain(CSV_IDENTITY).copied().collect()
    } else {
        CSV_IDENTITY.iter().chain(CSV_PROCESS).copied().collect()
    };
    header.extend(middle.iter().map(|s| s.to_string()));
    header.extend(CSV_METRICS.iter().map(|s| s.to_string()));
    header.extend(
        SyscallClass::ALL
            .iter()
            .map(|c| format!("syscalls_{}", c.name())),
    );
    csv_row(out, &header)?;
    let common = |t: &str, id: &str, node: &str, ws: &str, we: &str| {
        vec![
            t.to_string(),
            id.to_string(),
            node.to_string(),
            ws.to_string(),
            we.to_string(),
        ]
    };
    if let Some(groups) = &r.groups {
        for g in groups {
            let mut row = common(
                g.record_type,
                &g.record_id,
                &g.node,
                &g.window_start,
                &g.window_end,
            );
            row.extend([
                g.group_by.to_string(),
                g.group.clone().unwrap_or_default(),
                g.processes.to_string(),
                opt(g.cgroup_id),
                g.cgroup_path.clone().unwrap_or_default(),
            ]);
            row.extend(identity_cells(&g.identity));
            row.extend(metric_cells(&g.metrics));
            csv_row(out, &row)?;
        }
    } else {
        for p in &r.processes {
            let mut row = common(
                p.record_type,
                &p.record_id,
                &p.node,
                &p.window_start,
                &p.window_end,
            );
            row.extend(identity_cells(&p.identity));
            row.extend([
                p.pid.to_string(),
                p.process_start_time.clone(),
                opt(p.ppid),
                p.comm.clone(),
                p.exe.clone().unwrap_or_default(),
                p.cgroup_id.to_string(),
                p.cgroup_path.clone().unwrap_or_default(),
                p.exited.to_string(),
            ]);
            row.extend(metric_cells(&p.metrics));
            csv_row(out, &row)?;
        }
    }
    for b in &r.buckets {
        let mut row = common(
            b.record_type,
            &b.record_id,
            &b.node,
            &b.window_start,
            &b.window_end,
        );
        row.resize(CSV_COMMON.len() + middle.len(), String::new());
        let m = Metrics {
            cpu_ns: b.cpu_ns,
            cpu_core_seconds: b.cpu_core_seconds,
            syscalls: b.syscalls,
            network_rx_bytes: b.network_rx_bytes,
            network_tx_bytes: b.network_tx_bytes,
            ..Metrics::default()
        };
        row.extend(metric_cells(&m));
        csv_row(out, &row)?;
    }
    Ok(())
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

fn csv_row(out: &mut dyn Write, fields: &[String]) -> io::Result<()> {
    writeln!(out, "{}", csv_line(fields))
}

/// `fields` as one CSV line (each quoted by [`csv_field`]), without the newline.
pub fn csv_line<S: AsRef<str>>(fields: &[S]) -> String {
    let quoted: Vec<String> = fields.iter().map(|f| csv_field(f.as_ref())).collect();
    quoted.join(",")
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

/// Bytes as a short human figure (KiB, MiB, GiB).
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

fn metric_columns(m: &Metrics) -> String {
    format!(
        "{:>11.6} {:>10} {:>9} {:>9} {:>9.4} {:>9}",
        m.cpu_core_seconds,
        m.syscalls,
        human_bytes(m.network_rx_bytes),
        human_bytes(m.network_tx_bytes),
        m.memory_gb_seconds,
        human_bytes(m.disk_write_bytes),
    )
}

const METRIC_HEADER: &str = "    CPU_SEC   SYSCALLS    NET_RX    NET_TX   MEM_GBS    DISK_W";

fn write_table(out: &mut dyn Write, r: &Report) -> io::Result<()> {
    let s = &r.summary;
    writeln!(
        out,
        "node {}  window {} → {}",
        s.node, s.window_start, s.window_end
    )?;
    let mut total = Metered::default();
    match &r.groups {
        Some(groups) => {
            let by = groups.first().map_or("group", |g| g.group_by.as_str());
            writeln!(
                out,
                "{:<28} {:<9} {:>5} {METRIC_HEADER}",
                by.to_uppercase(),
                "KIND",
                "PROCS"
            )?;
            let mut rows: Vec<&GroupRecord> = groups.iter().collect();
            rows.sort_by_key(|g| std::cmp::Reverse(g.metrics.cpu_ns));
            for g in rows {
                writeln!(
                    out,
                    "{:<28} {:<9} {:>5} {}",
                    cut(&printable(g.group.as_deref().unwrap_or("(none)")), 28),
                    g.identity
                        .workload_kind
                        .map(|k| enum_name(&k))
                        .unwrap_or_else(|| "mixed".into()),
                    g.processes,
                    metric_columns(&g.metrics)
                )?;
            }
            for p in &r.processes {
                total.add(&p.metered);
            }
            writeln!(
                out,
                "{:<28} {:<9} {:>5} {}",
                "TOTAL",
                "",
                r.processes.len(),
                metric_columns(&Metrics::from(&total))
            )?;
        }
        None => {
            writeln!(
                out,
                "{:>8} {:>8} {:<16} {METRIC_HEADER} {:<9} CGROUP",
                "PID", "PPID", "COMM", "KIND"
            )?;
            let mut rows: Vec<&ProcessRecord> = r.processes.iter().collect();
            rows.sort_by(|a, b| {
                b.metrics
                    .cpu_ns
                    .cmp(&a.metrics.cpu_ns)
                    .then(a.pid.cmp(&b.pid))
            });
            for p in rows {
                total.add(&p.metered);
                writeln!(
                    out,
                    "{:>8} {:>8} {:<16} {} {:<9} {}",
                    p.pid,
                    opt(p.ppid),
                    cut(&printable(&p.comm), 16),
                    metric_columns(&p.metrics),
                    p.identity
                        .workload_kind
                        .map(|k| enum_name(&k))
                        .unwrap_or_default(),
                    printable(p.cgroup_path.as_deref().unwrap_or("?")),
                )?;
            }
            writeln!(
                out,
                "{:>8} {:>8} {:<16} {}",
                "TOTAL",
                "",
                format!("{} processes", r.processes.len()),
                metric_columns(&Metrics::from(&total))
            )?;
        }
    }
    writeln!(out)?;
    for b in &r.buckets {
        writeln!(
            out,
            "{:>8} {:>8} {:<16} {:>11.6} {:>10} {:>9} {:>9}",
            "",
            "",
            b.record_type,
            b.cpu_core_seconds,
            b.syscalls,
            human_bytes(b.network_rx_bytes),
            human_bytes(b.network_tx_bytes),
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
