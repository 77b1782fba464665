//! Test helpers: a ledger in a temp dir with priced records of runs.

use std::{path::PathBuf, str::FromStr, time::Duration};

use rust_decimal::Decimal;

use crate::{
    ledger::Ledger,
    probes::clock::rfc3339_of_ns,
    report::record::{Cost, UsageRecord},
};

/// 2026-01-10T00:00:00Z in ns (a month's 10th day, for budgets).
pub const T0: i64 = 1_768_003_200_000_000_000;
/// One second in ns.
pub const S: i64 = 1_000_000_000;

/// A temp dir removed on drop, with a ledger path in it.
pub struct Temp(pub PathBuf);

impl Temp {
    pub fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "mentat-alert-{name}-{}-{}",
            std::process::id(),
            crate::probes::clock::unix_ns(std::time::SystemTime::now())
        ));
        std::fs::create_dir_all(&p).expect("temp dir");
        Temp(p)
    }
    pub fn db(&self) -> PathBuf {
        self.0.join("ledger.db")
    }
    pub fn ledger(&self) -> Ledger {
        Ledger::open(&self.db(), Duration::from_secs(40 * 86_400)).expect("open ledger")
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn d(s: &str) -> Decimal {
    Decimal::from_str(s).expect("decimal")
}

/// What a test record carries.
#[derive(Clone, Default)]
pub struct R<'a> {
    pub run: Option<&'a str>,
    pub flow: Option<&'a str>,
    pub customer: Option<&'a str>,
    pub container: Option<&'a str>,
    pub cost: &'a str,
    pub cpu: &'a str,
    pub gpu_s: &'a str,
    pub gpu_mem: &'a str,
}

/// Commits one 1 s window at `ws` (ns) holding `recs`.
pub fn commit(l: &mut Ledger, ws: i64, recs: &[R<'_>]) {
    let records: Vec<UsageRecord> = recs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut u = UsageRecord {
                record_id: format!("{ws}-{i}"),
                node: "n1".into(),
                window_start: rfc3339_of_ns(ws),
                window_end: rfc3339_of_ns(ws + S),
                record_kind: "process".into(),
                pid: Some(100 + u32::try_from(i).unwrap_or(0)),
                cpu_core_seconds: d(if r.cpu.is_empty() { "0" } else { r.cpu }),
                gpu_seconds: d(if r.gpu_s.is_empty() { "0" } else { r.gpu_s }),
                gpu_memory_gb_seconds: d(if r.gpu_mem.is_empty() { "0" } else { r.gpu_mem }),
                ..UsageRecord::default()
            };
            u.context.run_id = r.run.map(str::to_string);
            u.context.flow_id = r.flow.map(str::to_string);
            u.context.customer_id = r.customer.map(str::to_string);
            u.workload.container_id = r.container.map(str::to_string);
            let c = d(if r.cost.is_empty() { "0" } else { r.cost });
            u.cost = Some(Cost {
                cpu: c,
                subtotal: c,
                total: c,
                currency: "USD".into(),
                pricing_version: "v1".into(),
                ..Cost::default()
            });
            u
        })
        .collect();
    l.commit_window(&rfc3339_of_ns(ws), &rfc3339_of_ns(ws + S), &records, &[])
        .expect("commit");
}
