//! An independent OTLP/gRPC receiver: `py/otlp_receiver.py`, built from Python's
//! `grpcio` and `opentelemetry-proto` only, so nothing of the agent's own encoding is
//! trusted. It appends every request as one JSON line to a file; this module starts and
//! stops it and reads the file back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;

use crate::daemon::{LedgerRecord, poll};

/// The receiver script, beside this crate's sources.
pub fn receiver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py/otlp_receiver.py")
}

/// A running receiver; killed when dropped.
#[derive(Debug)]
pub struct Receiver {
    child: Option<Child>,
    pub port: u16,
    out: PathBuf,
    log: PathBuf,
}

impl Receiver {
    /// Starts the receiver on 127.0.0.1:`port`, appending to `<dir>/otlp-<port>.jsonl`,
    /// and waits until it listens.
    pub fn start(port: u16, dir: &Path) -> Result<Receiver> {
        Self::start_with(port, dir, &[])
    }

    /// As [`Receiver::start`], with the script's fault flags (`--fail-ack-once`,
    /// `--reject-points N`).
    pub fn start_with(port: u16, dir: &Path, faults: &[&str]) -> Result<Receiver> {
        let out = dir.join(format!("otlp-{port}.jsonl"));
        let stdout = dir.join(format!("otlp-{port}.stdout"));
        let log = dir.join(format!("otlp-{port}.log"));
        let child = Command::new("python3")
            .arg(receiver_script())
            .arg("--port")
            .arg(port.to_string())
            .arg("--out")
            .arg(&out)
            .args(faults)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).context("creating the receiver's stdout file")?)
            .stderr(File::create(&log).context("creating the receiver's log")?)
            .spawn()
            .context("starting python3 py/otlp_receiver.py (needs the PyPI packages grpcio and opentelemetry-proto: cargo xtask setup)")?;
        let mut receiver = Receiver {
            child: Some(child),
            port,
            out,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if fs::read_to_string(&stdout).is_ok_and(|s| s.starts_with("ready")) {
                return Ok(receiver);
            }
            if let Some(child) = receiver.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for the receiver")?
            {
                bail!(
                    "the OTLP receiver exited ({status}) before it listened: {}",
                    receiver.log()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "the OTLP receiver did not listen within 30 s: {}",
                    receiver.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The endpoint for the agent's config.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The receiver's stderr (it logs re-sent batches there).
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Result<Vec<Request>> {
        let text = match fs::read_to_string(&self.out) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.out.display())),
        };
        // The receiver writes whole lines and flushes; a line still being written
        // would lack its newline: only complete lines count.
        let complete = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        complete
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("receiver line {l:?}")))
            .collect()
    }

    /// Stops the receiver (SIGKILL: every line it wrote is already flushed).
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One ExportMetricsServiceRequest as the receiver decoded it.
#[derive(Clone, Debug, Deserialize)]
pub struct Request {
    pub seq: u64,
    /// From the scope attribute `mentat.record_ids`.
    pub record_ids: Vec<String>,
    /// Every id had been received before: a re-sent batch the receiver ignores.
    pub duplicate: bool,
    pub resource: BTreeMap<String, Value>,
    pub points: Vec<Point>,
    /// Data points the receiver said it rejected (a partial success; 0 when none).
    #[serde(default)]
    pub rejected: i64,
}

/// One data point.
#[derive(Clone, Debug, Deserialize)]
pub struct Point {
    pub metric: String,
    pub unit: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub temporality: Option<i32>,
    #[serde(default)]
    pub monotonic: Option<bool>,
    #[serde(default)]
    pub attributes: BTreeMap<String, Value>,
    #[serde(default)]
    pub start: u64,
    #[serde(default)]
    pub time: u64,
    #[serde(default)]
    pub int: Option<i64>,
    #[serde(default)]
    pub double: Option<f64>,
    /// Set when the metric was of a type the receiver does not decode.
    #[serde(default)]
    pub unsupported: Option<String>,
}

impl Point {
    /// The value as f64 (integers convert exactly below 2⁵³).
    pub fn value(&self) -> f64 {
        match (self.int, self.double) {
            (Some(i), _) => i as f64,
            (None, Some(d)) => d,
            (None, None) => f64::NAN,
        }
    }

    /// An attribute as a string ("" when absent).
    pub fn attr(&self, key: &str) -> String {
        match self.attributes.get(key) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => String::new(),
        }
    }
}

/// OTLP's AGGREGATION_TEMPORALITY_CUMULATIVE.
pub const CUMULATIVE: i32 = 2;

/// A series: metric, attributes, start time. A restarted agent starts new series
/// (same attributes, a later start), which a backend reads as a reset.
pub type SeriesKey = (String, String, u64);

/// How each record id arrived.
#[derive(Debug, Default)]
pub struct Deliveries {
    /// Requests (by seq) that carried each id, duplicates included.
    pub requests_of: HashMap<String, Vec<u64>>,
    /// Ids in requests the receiver applied (not re-sends), with how often.
    pub applied: HashMap<String, u32>,
    /// Re-sent batches the receiver ignored.
    pub ignored_batches: Vec<u64>,
}

impl Deliveries {
    /// The records of `records` that no request carried.
    pub fn missing<'a>(&self, records: &'a [LedgerRecord]) -> Vec<&'a LedgerRecord> {
        records
            .iter()
            .filter(|r| !self.requests_of.contains_key(&r.record_id))
            .collect()
    }
}

/// Tallies which requests carried which record ids.
pub fn deliveries(requests: &[Request]) -> Deliveries {
    let mut d = Deliveries::default();
    for r in requests {
        for id in &r.record_ids {
            d.requests_of.entry(id.clone()).or_default().push(r.seq);
            if !r.duplicate {
                *d.applied.entry(id.clone()).or_default() += 1;
            }
        }
        if r.duplicate {
            d.ignored_batches.push(r.seq);
        }
    }
    d
}

/// How often one record id may reach the receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resends {
    /// Each id in exactly one request: nothing crashed, so nothing was re-sent.
    Never,
    /// Also again in whole re-sent batches, which the receiver ignores (a crash between
    /// its ack and the ledger's mark_delivered); each id is still applied once.
    IgnoredBatches,
}

/// Checks the receiver's `requests` against the ledger: every record of `delivered`
/// reached it, `ledger` (the whole ledger read after the receiver stopped) holds each id
/// once, no id arrived more often than `resends` allows, and no id arrived that `ledger`
/// lacks. Returns the tallies for further checks.
pub fn check_delivered_once(
    requests: &[Request],
    delivered: &[LedgerRecord],
    ledger: &[LedgerRecord],
    resends: Resends,
) -> Result<Deliveries> {
    let ids: BTreeSet<&str> = ledger.iter().map(|r| r.record_id.as_str()).collect();
    let mut seen = BTreeSet::new();
    let dups: Vec<&str> = ledger
        .iter()
        .map(|r| r.record_id.as_str())
        .filter(|id| !seen.insert(*id))
        .take(5)
        .collect();
    ensure!(
        dups.is_empty(),
        "duplicate record ids in the ledger: {dups:?}"
    );
    let d = deliveries(requests);
    if let Some(r) = d.missing(delivered).first() {
        bail!(
            "{} of {} records never reached the receiver, e.g. {} (window {})",
            d.missing(delivered).len(),
            delivered.len(),
            r.record_id,
            r.window_start
        );
    }
    let twice: Vec<(&String, &Vec<u64>)> = match resends {
        Resends::Never => d.requests_of.iter().filter(|(_, s)| s.len() > 1).collect(),
        Resends::IgnoredBatches => d
            .applied
            .iter()
            .filter(|(_, n)| **n > 1)
            .filter_map(|(id, _)| d.requests_of.get_key_value(id))
            .collect(),
    };
    ensure!(
        twice.is_empty(),
        "{} record ids reached the receiver more than {} (id, request seqs), first: {:?}; \
         {} re-sent batches ignored",
        twice.len(),
        match resends {
            Resends::Never => "once",
            Resends::IgnoredBatches => "once outside re-sent batches",
        },
        twice.iter().take(5).collect::<Vec<_>>(),
        d.ignored_batches.len()
    );
    let unknown: Vec<&String> = d
        .requests_of
        .keys()
        .filter(|id| !ids.contains(id.as_str()))
        .take(5)
        .collect();
    ensure!(
        unknown.is_empty(),
        "the receiver got record ids the ledger does not have: {unknown:?}"
    );
    Ok(d)
}

/// Polls `receiver` every 250 ms for up to `timeout` until every record `ledger` returns
/// has reached it; `ledger` is called on every poll, so it may read a live ledger. Returns
/// how long that took; the error names the windows of the records still missing.
pub fn wait_until_delivered(
    receiver: &Receiver,
    timeout: Duration,
    mut ledger: impl FnMut() -> Result<Vec<LedgerRecord>>,
) -> Result<Duration> {
    poll(timeout, || {
        let ledger = ledger()?;
        let d = deliveries(&receiver.requests()?);
        let missing = d.missing(&ledger);
        Ok(if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} ledger records not at the receiver, from windows {:?}",
                missing.len(),
                ledger.len(),
                missing
                    .iter()
                    .map(|r| r.window_start.as_str())
                    .collect::<BTreeSet<_>>()
            ))
        })
    })
}

/// The last point of each series over the applied (non-duplicate) requests, in
/// arrival order; checks on the way that every point is a cumulative monotonic Sum
/// whose value never falls within its series and whose start precedes its time.
pub fn last_points(requests: &[Request]) -> Result<BTreeMap<SeriesKey, Point>> {
    let mut last: BTreeMap<SeriesKey, Point> = BTreeMap::new();
    for r in requests.iter().filter(|r| !r.duplicate) {
        for p in &r.points {
            ensure!(
                p.unsupported.is_none(),
                "request {}: metric {} is a {:?}, not a Sum",
                r.seq,
                p.metric,
                p.unsupported
            );
            ensure!(
                p.kind.as_deref() == Some("sum")
                    && p.temporality == Some(CUMULATIVE)
                    && p.monotonic == Some(true),
                "request {}: {} is not a cumulative monotonic Sum: {p:?}",
                r.seq,
                p.metric
            );
            ensure!(
                p.start > 0 && p.start <= p.time,
                "request {}: {} starts at {} ns, after its time {} ns: {p:?}",
                r.seq,
                p.metric,
                p.start,
                p.time
            );
            let attrs = serde_json::to_string(&p.attributes).context("attributes")?;
            let key = (p.metric.clone(), attrs, p.start);
            if let Some(prev) = last.get(&key) {
                ensure!(
                    p.value() >= prev.value() && p.time >= prev.time,
                    "request {}: series {key:?} went from {} at {} ns back to {} at {} ns",
                    r.seq,
                    prev.value(),
                    prev.time,
                    p.value(),
                    p.time
                );
            }
            last.insert(key, p.clone());
        }
    }
    Ok(last)
}

/// Σ over series of their last value, per metric and `split` attribute value
/// (e.g. `network.io.direction`; "" where the point lacks it). Integer points are
/// summed as integers, doubles as f64.
pub fn sum_last(
    last: &BTreeMap<SeriesKey, Point>,
    metric: &str,
    split: Option<&str>,
) -> BTreeMap<String, SumOf> {
    let mut out: BTreeMap<String, SumOf> = BTreeMap::new();
    for ((name, _, _), p) in last {
        if name != metric {
            continue;
        }
        let key = split.map(|s| p.attr(s)).unwrap_or_default();
        let slot = out.entry(key).or_default();
        slot.series += 1;
        match (p.int, p.double) {
            (Some(i), _) => slot.int += i128::from(i),
            (None, Some(d)) => slot.double += d,
            (None, None) => {}
        }
    }
    out
}

/// A sum of last values.
#[derive(Clone, Copy, Debug, Default)]
pub struct SumOf {
    pub series: u64,
    pub int: i128,
    pub double: f64,
}
