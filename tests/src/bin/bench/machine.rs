//! The machine the figures were taken on: CPU count and model, kernel, load average before
//! and after, and the UTC time, printed with the report and kept in its JSON.

use std::fs;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub(crate) struct Machine {
    pub(crate) cpus: usize,
    pub(crate) kernel: String,
    pub(crate) cpu_model: String,
    pub(crate) memory_mib: u64,
    pub(crate) load_before: String,
    pub(crate) load_after: String,
    pub(crate) date_utc: String,
}

impl Machine {
    pub(crate) fn read() -> Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("reading /proc/cpuinfo")?;
        let meminfo = fs::read_to_string("/proc/meminfo").context("reading /proc/meminfo")?;
        let field = |text: &str, key: &str| {
            text.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        };
        let memory_kib: u64 = field(&meminfo, "MemTotal")
            .and_then(|v| v.trim_end_matches("kB").trim().parse().ok())
            .context("/proc/meminfo has no readable MemTotal")?;
        Ok(Self {
            cpus: usize::try_from(cpus).unwrap_or(0),
            kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
                .context("reading /proc/sys/kernel/osrelease")?
                .trim()
                .to_owned(),
            cpu_model: field(&cpuinfo, "model name").unwrap_or_else(|| "unknown CPU".to_owned()),
            memory_mib: memory_kib / 1024,
            load_before: load_average(),
            load_after: String::new(),
            date_utc: utc_now(),
        })
    }
}

pub(crate) fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Now as `YYYY-MM-DD HH:MM UTC`, without a date library for one line.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}
