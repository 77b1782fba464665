//! The agent as a node daemon: `mentat-agent run --config <tmp>/agent-N.toml`, with a
//! fresh ledger in a temporary directory, the query API on a free loopback port, an
//! optional OTLP endpoint and a 1 s tick; stopped with SIGINT (graceful: the last
//! window is closed, committed and offered to the exporter) or SIGKILL (a crash), and
//! restarted on the same ledger.
//!
//! The ledger is read back through the daemon's own query API (`/v1/records`,
//! `/v1/usage`); after the daemon stopped, a second daemon without OTLP started on the
//! same ledger serves the queries.

use std::fs::{self, File};
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;
use tempfile::TempDir;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::cgroup::ScratchCgroup;
use crate::exact::Exact;
use crate::http::{self, Response};
use crate::run::{agent_bin, workload_bin};
use crate::truth::Tcp;

/// The node name every test daemon puts in its records.
pub const NODE: &str = "mentat-test-node";

/// Loading and attaching the probes takes a second or two; a loaded 2-core VM more.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A graceful stop closes one window, commits it and makes one export attempt; an
/// exporter sleeping in its retry backoff (at most 30 s) finishes that sleep first.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(45);

/// A free TCP port on 127.0.0.1 (the kernel's pick; released before it is returned, so
/// it is free unless something else grabs it in the meantime).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr().context("local address")?.port())
}

/// RFC 3339 in UTC, as the agent's API takes it.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// Now, RFC 3339.
pub fn now_rfc3339() -> String {
    rfc3339(OffsetDateTime::now_utc())
}

/// Parses an RFC 3339 time from a record.
pub fn parse_time(s: &str) -> Result<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).with_context(|| format!("{s:?} is not RFC 3339"))
}

/// A temporary directory holding one ledger and the configs and logs of every daemon
/// started on it.
#[derive(Debug)]
pub struct LedgerDir {
    dir: TempDir,
    starts: AtomicU32,
}

impl LedgerDir {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mentat-daemon-")
            .tempdir()
            .context("creating a temporary directory for the ledger")?;
        Ok(LedgerDir {
            dir,
            starts: AtomicU32::new(0),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The ledger's database file.
    pub fn ledger(&self) -> PathBuf {
        self.dir.path().join("ledger.db")
    }
}

/// An unlabelled counter's value in a `/metrics` text.
pub fn counter_in(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What a daemon is started with, beyond the ledger and a free API port.
#[derive(Clone, Debug, Default)]
pub struct DaemonOptions {
    /// `[otlp] endpoint`, e.g. `http://127.0.0.1:4317`; `None`: export off.
    pub otlp_endpoint: Option<String>,
    /// A bearer token: written to a file named by `[api] token_file`.
    pub token: Option<String>,
    /// More top-level keys (`span_lag = "3s"\n`), written before the first table.
    pub extra_keys: Option<String>,
    /// More tables (`[receiver]\ngrpc_bind = ...\n`), written after the others.
    pub extra_tables: Option<String>,
    /// Environment variables for the daemon (e.g. `MENTAT_*` overrides).
    pub env: Vec<(String, String)>,
    /// A command that runs the agent (e.g. `setpriv ... --`): the agent's path and
    /// arguments follow it.
    pub wrapper: Vec<String>,
}

impl DaemonOptions {
    /// Export on to the OTLP receiver at `endpoint`, everything else default.
    pub fn exporting_to(endpoint: impl Into<String>) -> Self {
        DaemonOptions {
            otlp_endpoint: Some(endpoint.into()),
            ..Default::default()
        }
    }

    /// A daemon that receives spans: `span_lag`, and `[receiver]` on the loopback
    /// ports `grpc` and `http`, followed by `more` (more `[receiver]` keys such as
    /// `max_pending_spans = 100\n`, then any other tables).
    pub fn receiving(span_lag: &str, grpc: u16, http: u16, more: &str) -> Self {
        DaemonOptions {
            extra_keys: Some(format!("span_lag = \"{span_lag}\"\n")),
            extra_tables: Some(format!(
                "[receiver]\ngrpc_bind = \"127.0.0.1:{grpc}\"\nhttp_bind = \"127.0.0.1:{http}\"\n{more}"
            )),
            ..Default::default()
        }
    }
}

/// A running `mentat-agent run`; killed (SIGKILL) if dropped while running.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    port: u16,
    token: Option<String>,
    log: PathBuf,
    /// The config file it runs with.
    pub config: PathBuf,
    /// When the test started it (before its first window).
    pub started: OffsetDateTime,
}

/// How a daemon ended.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    /// From the signal to the exit.
    pub took: Duration,
    /// Its log (stdout and stderr).
    pub log: String,
}

impl Stopped {
    /// Status and the end of the log, for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "{} after {:?}; log ends with:\n{}",
            describe_status(self.status),
            self.took,
            tail(&self.log, 4000)
        )
    }
}

fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown exit status".into(),
    }
}

fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

impl Daemon {
    /// Starts a daemon on `dir`'s ledger and waits until `/readyz` answers 200.
    pub fn start(dir: &LedgerDir, options: &DaemonOptions) -> Result<Daemon> {
        let n = dir.starts.fetch_add(1, Ordering::SeqCst);
        let port = free_port()?;
        let extra_keys = options.extra_keys.as_deref().unwrap_or_default();
        // Unless the caller sets it: windows need not wait for late spans where no
        // test sends any (span_lag 0 commits each window as it closes).
        let span_lag = if extra_keys.contains("span_lag") {
            ""
        } else {
            "span_lag = \"0s\"\n"
        };
        // Likewise the 1 s tick, unless the caller sets its own `tick`.
        let tick = if extra_keys.lines().any(|l| {
            l.strip_prefix("tick")
                .is_some_and(|r| r.trim_start().starts_with('='))
        }) {
            ""
        } else {
            "tick = \"1s\"\n"
        };
        let mut config = format!(
            "node_name = \"{NODE}\"\n\
             {tick}\
             ledger_path = \"{}\"\n\
             raw_retention = \"1h\"\n\
             {span_lag}\
             {extra_keys}\
             \n[api]\nbind = \"127.0.0.1:{port}\"\n",
            dir.ledger().display(),
        );
        if let Some(token) = &options.token {
            let token_file = dir.path().join(format!("token-{n}"));
            fs::write(&token_file, format!("{token}\n"))
                .with_context(|| format!("writing {}", token_file.display()))?;
            config.push_str(&format!("token_file = \"{}\"\n", token_file.display()));
        }
        if let Some(endpoint) = &options.otlp_endpoint {
            config.push_str(&format!(
                "\n[otlp]\nendpoint = \"{endpoint}\"\ntimeout_ms = 5000\n"
            ));
        }
        if let Some(tables) = &options.extra_tables {
            config.push('\n');
            config.push_str(tables);
        }
        // Unless the caller sets it: the span receiver on ports of its own, not the
        // default 4317/4318 another agent on this machine may hold.
        if !options
            .extra_tables
            .as_deref()
            .is_some_and(|t| t.contains("[receiver]"))
        {
            config.push_str(&format!(
                "\n[receiver]\ngrpc_bind = \"127.0.0.1:{}\"\nhttp_bind = \"127.0.0.1:{}\"\n",
                free_port()?,
                free_port()?
            ));
        }
        let config_path = dir.path().join(format!("agent-{n}.toml"));
        fs::write(&config_path, &config)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let log = dir.path().join(format!("daemon-{n}.log"));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = match options.wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(agent_bin()?);
                c
            }
            None => Command::new(agent_bin()?),
        };
        command
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().context("duplicating the log file")?)
            .stderr(log_file)
            // Plain log lines, and nothing from the test's own environment steering
            // the exporter.
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .process_group(0);
        for var in [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
            "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE",
            "NODE_NAME",
        ] {
            command.env_remove(var);
        }
        for (var, _) in std::env::vars().filter(|(k, _)| k.starts_with("MENTAT_")) {
            command.env_remove(var);
        }
        command.envs(options.env.iter().map(|(k, v)| (k, v)));
        let started = OffsetDateTime::now_utc();
        let child = command.spawn().with_context(|| {
            format!(
                "starting mentat-agent run --config {}",
                config_path.display()
            )
        })?;
        let mut daemon = Daemon {
            child: Some(child),
            port,
            token: options.token.clone(),
            log,
            config: config_path,
            started,
        };
        daemon.wait_ready()?;
        Ok(daemon)
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().context("waiting for the daemon")?
            {
                self.child = None;
                bail!(
                    "the daemon exited before it was ready: {}; config:\n{}\nlog:\n{}",
                    describe_status(status),
                    fs::read_to_string(&self.config).unwrap_or_default(),
                    tail(&self.log(), 4000)
                );
            }
            if let Ok(r) = http::get(&format!("{}/readyz", self.url()), &[], None)
                && r.status == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the daemon was not ready after {READY_TIMEOUT:?}; log:\n{}",
                    tail(&self.log(), 4000)
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The API's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The API's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The daemon's pid while it runs (for `/proc/<pid>/status`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let mut bytes = Vec::new();
            let _ = f.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// `GET path?query` with the daemon's token (if it has one).
    pub fn get(&self, path: &str, query: &[(&str, &str)]) -> Result<Response> {
        self.get_as(path, query, self.token.as_deref())
    }

    /// `GET path?query` with `token` (or none).
    pub fn get_as(
        &self,
        path: &str,
        query: &[(&str, &str)],
        token: Option<&str>,
    ) -> Result<Response> {
        http::get(&format!("{}{path}", self.url()), query, token)
    }

    /// `GET path?query` that must answer 200 with JSON.
    pub fn get_json(&self, path: &str, query: &[(&str, &str)]) -> Result<Value> {
        let r = self.get(path, query)?;
        ensure!(
            r.status == 200,
            "GET {path} {query:?}: HTTP {}: {}",
            r.status,
            r.body
        );
        r.json()
    }

    /// Every record whose window starts in [from, to), paged through `/v1/records`
    /// (1,000 a page, following `next`), oldest first.
    pub fn records(&self, from: &str, to: &str) -> Result<Vec<LedgerRecord>> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for page in 0.. {
            ensure!(
                page < 10_000,
                "more than 10,000 pages of records: a cursor loop?"
            );
            let mut query = vec![("from", from), ("to", to), ("limit", "1000")];
            if let Some(a) = &after {
                query.push(("after", a));
            }
            let body = self.get_json("/v1/records", &query)?;
            let records = body["records"]
                .as_array()
                .with_context(|| format!("/v1/records: no `records` array: {body}"))?;
            for raw in records {
                out.push(LedgerRecord::from_json(raw)?);
            }
            match body["next"].as_str() {
                Some(next) => {
                    ensure!(
                        after.as_deref() != Some(next),
                        "/v1/records returned the same cursor {next:?} twice"
                    );
                    after = Some(next.to_string());
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// `mentat-agent usage --api <this daemon> ARGS...` (at most 30 s), which must
    /// exit 0.
    pub fn usage(&self, args: &[&str]) -> Result<crate::run::Output> {
        let api = self.url();
        let mut argv = vec!["usage", "--api", &api];
        argv.extend_from_slice(args);
        let out = crate::run::run_agent(&argv, Duration::from_secs(30))?;
        ensure!(
            out.exit_code == Some(0),
            "usage {}: {}",
            args.join(" "),
            out.describe()
        );
        Ok(out)
    }

    /// An unlabelled counter's value on `/metrics` (the agent's own, e.g.
    /// `mentat_agent_windows_total`).
    pub fn counter(&self, name: &str) -> Result<u64> {
        counter_in(&self.metrics()?, name)
            .with_context(|| format!("/metrics has no counter {name}"))
    }

    /// Polls `/metrics` (at most `timeout`) until counter `name` satisfies `ok`; a
    /// timeout's error says its last value and carries the daemon's log.
    pub fn wait_counter(
        &self,
        name: &str,
        timeout: Duration,
        ok: impl Fn(u64) -> bool,
    ) -> Result<Duration> {
        poll(timeout, || {
            let n = self.counter(name)?;
            Ok(if ok(n) {
                Ok(())
            } else {
                Err(format!("{name} is {n}"))
            })
        })
        .with_context(|| format!("daemon log:\n{}", self.log()))
    }

    /// Every record whose window starts at or after `from`, once a window
    /// starting after `t` is committed: windows commit in order, so every
    /// window that held something before `t` is then in (waits at most `timeout`).
    pub fn records_once_past(
        &self,
        from: &str,
        t: OffsetDateTime,
        timeout: Duration,
    ) -> Result<Vec<LedgerRecord>> {
        let mut records = Vec::new();
        poll(timeout, || {
            let to = rfc3339(OffsetDateTime::now_utc() + time::Duration::hours(1));
            records = self.records(from, &to)?;
            let past = records
                .iter()
                .any(|r| parse_time(&r.window_start).is_ok_and(|s| s > t));
            Ok(if past {
                Ok(())
            } else {
                Err(format!(
                    "no window starting after {} committed yet",
                    rfc3339(t)
                ))
            })
        })
        .with_context(|| format!("daemon log:\n{}", tail(&self.log(), 3000)))?;
        Ok(records)
    }

    /// The daemon's `/metrics` text.
    pub fn metrics(&self) -> Result<String> {
        let r = self.get("/metrics", &[])?;
        ensure!(
            r.status == 200,
            "GET /metrics: HTTP {}: {}",
            r.status,
            r.body
        );
        Ok(r.body)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGINT, then waits (at most [`STOP_TIMEOUT`]) for the exit.
    pub fn stop(mut self) -> Result<Stopped> {
        self.signal_and_wait(libc::SIGINT, STOP_TIMEOUT)
    }

    /// SIGKILL: a crash.
    pub fn kill(mut self) -> Result<Stopped> {
        self.signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
    }

    fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Result<Stopped> {
        let mut child = self.child.take().context("the daemon is not running")?;
        let pid = i32::try_from(child.id()).context("pid out of range")?;
        let t = Instant::now();
        // The child is not reaped yet, so its pid cannot have been reused.
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, signal) };
        let status = wait_until(&mut child, t + timeout)?;
        let took = t.elapsed();
        let log = self.log();
        match status {
            Some(status) => Ok(Stopped { status, took, log }),
            None => bail!(
                "the daemon did not exit within {timeout:?} of signal {signal}; killed; log:\n{}",
                tail(&log, 4000)
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Waits for `child`; past `deadline` SIGKILLs it and returns `None`.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for a child")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait().context("reaping a killed child")?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// One cost breakdown as the API returns it (decimal strings).
#[derive(Clone, Debug, Deserialize)]
pub struct LedgerCost {
    pub cpu: String,
    pub memory: String,
    pub gpu: String,
    pub network: String,
    pub storage: String,
    pub token: String,
    pub subtotal: String,
    pub discount: String,
    pub total: String,
    pub currency: String,
    pub pricing_version: String,
}

/// The CPU nanoseconds `records` bill to process `pid`, summed exactly
/// (`cpu_core_seconds` has nanosecond resolution).
pub fn cpu_ns_of(records: &[LedgerRecord], pid: u32) -> Result<u64> {
    let mut sum = crate::exact::Exact::ZERO;
    for r in records.iter().filter(|r| r.pid == Some(pid)) {
        sum = sum.add(r.exact("cpu_core_seconds")?)?;
    }
    let unit = 10i128.pow(crate::exact::SCALE - 9);
    ensure!(
        sum.0 % unit == 0,
        "pid {pid}: CPU {sum} s has more than nine decimals"
    );
    u64::try_from(sum.0 / unit).with_context(|| format!("pid {pid}: CPU {sum} s is negative"))
}

/// One record from `/v1/records`.
#[derive(Clone, Debug, Deserialize)]
pub struct LedgerRecord {
    pub record_id: String,
    pub node: String,
    pub window_start: String,
    pub window_end: String,
    pub record_kind: String,
    pub workload_kind: Option<String>,
    pub pid: Option<u32>,
    pub process_start_time: Option<String>,
    pub comm: Option<String>,
    pub cpu_core_seconds: String,
    pub memory_gb_seconds: String,
    pub gpu_seconds: String,
    pub gpu_memory_gb_seconds: String,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub disk_read_bytes: u64,
    pub disk_write_bytes: u64,
    pub storage_bytes: Option<u64>,
    pub syscalls: u64,
    pub cost: Option<LedgerCost>,
    /// The record as the API returned it.
    #[serde(skip)]
    pub raw: Value,
}

impl LedgerRecord {
    fn from_json(raw: &Value) -> Result<LedgerRecord> {
        let mut r: LedgerRecord = serde_json::from_value(raw.clone())
            .with_context(|| format!("a /v1/records record does not parse: {raw}"))?;
        r.raw = raw.clone();
        Ok(r)
    }

    /// A decimal quantity or cost component by name (`cpu_core_seconds`,
    /// `cost.total`, ...), exactly; an unpriced record's cost is zero.
    pub fn exact(&self, field: &str) -> Result<Exact> {
        let v = match field.strip_prefix("cost.") {
            Some(component) => &self.raw["cost"][component],
            None => &self.raw[field],
        };
        crate::exact::exact_json(v)
            .with_context(|| format!("record {} field {field}", self.record_id))
    }

    /// Σ `field` (as [`LedgerRecord::exact`] reads it) over `records`, exactly;
    /// panics on a field that is not a decimal, or on an overflow (for tests).
    pub fn sum(records: &[&LedgerRecord], field: &str) -> crate::exact::Exact {
        records.iter().fold(crate::exact::Exact::ZERO, |acc, r| {
            acc.add(r.exact(field).unwrap_or_else(|e| panic!("{e:#}")))
                .unwrap_or_else(|e| panic!("the sum of {field}: {e:#}"))
        })
    }
}

/// Runs `workload ARGS...` to completion (at most 120 s); it must exit 0. Returns its
/// stdout, whose last JSON line is the ground truth.
pub fn run_workload(args: &[&str]) -> Result<String> {
    let mut child = Command::new(workload_bin()?)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting workload {}", args.join(" ")))?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (tx, rx) = mpsc::channel();
    for (i, pipe) in [
        stdout.map(|p| Box::new(p) as Box<dyn Read + Send>),
        stderr.map(|p| Box::new(p) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .enumerate()
    {
        let tx = tx.clone();
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            let _ = tx.send((i, String::from_utf8_lossy(&bytes).into_owned()));
        });
    }
    drop(tx);
    let status = wait_until(&mut child, Instant::now() + Duration::from_secs(120))?;
    let mut out = [String::new(), String::new()];
    for (i, text) in rx.iter() {
        out[i] = text;
    }
    let [stdout, stderr] = out;
    match status {
        Some(s) if s.success() => Ok(stdout),
        Some(s) => bail!(
            "workload {} failed ({}): {stderr}",
            args.join(" "),
            describe_status(s)
        ),
        None => bail!(
            "workload {} ran over 120 s; killed: {stderr}",
            args.join(" ")
        ),
    }
}

/// The ground truth: the last JSON line of a workload's stdout.
pub fn truth_of<T: serde::de::DeserializeOwned>(stdout: &str) -> Result<T> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .with_context(|| format!("no JSON line in the workload's stdout: {stdout:?}"))?;
    serde_json::from_str(line).with_context(|| format!("ground truth {line:?}"))
}

/// `workload tcp`: BYTES over loopback TCP between a server and a client in two
/// scratch cgroups (removed afterwards).
pub fn tcp_workload(bytes: u64) -> Result<Tcp> {
    let server = ScratchCgroup::create().context("creating the server's cgroup")?;
    let client = ScratchCgroup::create().context("creating the client's cgroup")?;
    let dir = |c: &ScratchCgroup| c.path().to_string_lossy().into_owned();
    let (server_dir, client_dir) = (dir(&server), dir(&client));
    let bytes = bytes.to_string();
    let stdout = run_workload(&[
        "tcp",
        "--bytes",
        &bytes,
        "--family",
        "4",
        "--server-cgroup",
        &server_dir,
        "--client-cgroup",
        &client_dir,
    ])?;
    let truth = truth_of(&stdout)?;
    server.remove()?;
    client.remove()?;
    Ok(truth)
}

/// Polls `check` every 250 ms until it returns `Ok(true)` or `timeout` passes; the
/// last `Ok(false)` reason or error explains a timeout.
pub fn poll(
    timeout: Duration,
    mut check: impl FnMut() -> Result<std::result::Result<(), String>>,
) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let why = match check() {
            Ok(Ok(())) => return Ok(t.elapsed()),
            Ok(Err(why)) => why,
            Err(e) => format!("{e:#}"),
        };
        if t.elapsed() >= timeout {
            bail!("not so after {timeout:?}: {why}");
        }
        thread::sleep(Duration::from_millis(250));
    }
}
