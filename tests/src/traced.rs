//! The trace-context join's tests: a daemon whose OTLP receiver listens on free
//! loopback ports, Python scripts that use the real OpenTelemetry SDK (`py/`), and
//! commands started with a chosen environment and reaped here with `wait4`, so their
//! rusage (the process and every descendant it reaped) is ground truth the agent never
//! sees.

use std::ffi::OsStr;
use std::io::Read;
use std::mem;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use time::OffsetDateTime;

use crate::daemon::{Daemon, DaemonOptions, LedgerDir, free_port, poll, rfc3339};

/// The run-context variables the agent reads from an environment, plus every
/// `OTEL_*` one the SDK reads: removed from every command a test starts, so nothing
/// of the test runner's own environment leaks into a run.
pub fn clear_trace_env(command: &mut Command) -> &mut Command {
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("OTEL_") || name == "TRACEPARENT" || name == "TRACESTATE" {
            command.env_remove(&k);
        }
    }
    command
}

/// A script in this crate's `py/` directory.
pub fn py_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Fails with the install hint unless python3 has the OpenTelemetry SDK, its OTLP gRPC
/// exporter, grpcio and the OTLP protos (`cargo xtask setup` installs them).
pub fn require_python_otel() -> Result<()> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import grpc, opentelemetry.sdk.trace, opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc, \
             opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        ])
        .output()
        .context("running python3")?;
    ensure!(
        out.status.success(),
        "python3 lacks the OpenTelemetry SDK (PyPI opentelemetry-sdk, opentelemetry-exporter-otlp-proto-grpc, \
         grpcio, opentelemetry-proto; `cargo xtask setup` installs them): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A daemon with its receiver on free loopback ports.
#[derive(Debug)]
pub struct TracedDaemon {
    pub daemon: Daemon,
    /// `[receiver] grpc_bind`'s port.
    pub grpc: u16,
    /// `[receiver] http_bind`'s port.
    pub http: u16,
    /// Holds the ledger, configs and logs; removed when dropped.
    pub dir: LedgerDir,
}

impl TracedDaemon {
    /// Starts `mentat-agent run` with a fresh ledger, a 1 s tick, `span_lag`, and a
    /// `[receiver]` table with free ports plus `receiver_keys` (e.g.
    /// `max_pending_spans = 100\n`); waits until both receiver ports accept.
    pub fn start(span_lag: &str, receiver_keys: &str) -> Result<TracedDaemon> {
        let dir = LedgerDir::new()?;
        let (grpc, http) = (free_port()?, free_port()?);
        ensure!(grpc != http, "the kernel picked one free port twice");
        let daemon = Daemon::start(
            &dir,
            &DaemonOptions::receiving(span_lag, grpc, http, receiver_keys),
        )?;
        // A receiver that failed to bind does not stop the daemon: check it listens.
        for port in [grpc, http] {
            poll(Duration::from_secs(10), || {
                Ok(TcpStream::connect(("127.0.0.1", port))
                    .map(drop)
                    .map_err(|e| format!("the receiver on port {port} does not accept: {e}")))
            })
            .with_context(|| format!("daemon log:\n{}", daemon.log()))?;
        }
        Ok(TracedDaemon {
            daemon,
            grpc,
            http,
            dir,
        })
    }

    /// The OTLP/gRPC endpoint as an SDK takes it.
    pub fn grpc_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc)
    }

    /// Waits until the windows up to `t` are committed: windows are committed in
    /// order, and each has its bucket records, so a committed record whose window
    /// starts after `t` means every window up to `t` is in the ledger (split between
    /// runs with the spans received by then).
    pub fn wait_committed(&self, t: OffsetDateTime, timeout: Duration) -> Result<Duration> {
        let from = rfc3339(t);
        poll(timeout, || {
            let body = self
                .daemon
                .get_json("/v1/records", &[("from", &from), ("limit", "1")])?;
            Ok(
                if body["records"].as_array().is_some_and(|r| !r.is_empty()) {
                    Ok(())
                } else {
                    Err(format!("no window starting after {from} committed yet"))
                },
            )
        })
        .with_context(|| format!("daemon log:\n{}", tail(&self.daemon.log(), 3000)))
    }

    /// `GET /v1/runs/{run_id}` (must answer 200).
    pub fn run_view(&self, run_id: &str) -> Result<Value> {
        self.daemon.get_json(&format!("/v1/runs/{run_id}"), &[])
    }
}

/// The end of `text`, at most `max` bytes, on a char boundary.
pub fn tail(text: &str, max: usize) -> &str {
    let start = text.len().saturating_sub(max);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    &text[start..]
}

/// A command this test started and reaped with `wait4`.
#[derive(Clone, Debug)]
pub struct Reaped {
    pub pid: u32,
    /// `None` when a signal ended it.
    pub exit_code: Option<i32>,
    /// User + system CPU from `wait4`: the process and every descendant it reaped.
    pub rusage_cpu_ns: u64,
    pub stdout: String,
    pub stderr: String,
    /// When it was started and when it was reaped (wall clock).
    pub started: OffsetDateTime,
    pub ended: OffsetDateTime,
}

impl Reaped {
    /// Fails with its stderr unless it exited 0.
    pub fn ok(self, what: &str) -> Result<Reaped> {
        ensure!(
            self.exit_code == Some(0),
            "{what} failed (exit {:?}); stderr:\n{}\nstdout:\n{}",
            self.exit_code,
            tail(&self.stderr, 4000),
            tail(&self.stdout, 2000)
        );
        Ok(self)
    }

    /// The last JSON line of its stdout.
    pub fn truth(&self) -> Result<Value> {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .with_context(|| {
                format!(
                    "no JSON line on stdout {:?}; stderr:\n{}",
                    self.stdout,
                    tail(&self.stderr, 4000)
                )
            })?;
        serde_json::from_str(line).with_context(|| format!("ground truth {line:?}"))
    }
}

/// Runs `program args...` with the trace variables of the test's own environment
/// removed and `env` set, to completion (at most `timeout`), and reaps it with `wait4`.
pub fn run_reaped<S: AsRef<OsStr>>(
    program: impl AsRef<OsStr>,
    args: &[S],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Reaped> {
    let mut command = Command::new(program.as_ref());
    command.args(args);
    clear_trace_env(&mut command);
    for (k, v) in env {
        command.env(k, v);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = OffsetDateTime::now_utc();
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", program.as_ref().to_string_lossy()))?;
    let pid = child.id();
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut bytes);
            }
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let raw_pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    let deadline = Instant::now() + timeout;
    let (status, usage) = loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is valid.
        let mut usage: libc::rusage = unsafe { mem::zeroed() };
        // SAFETY: `status` and `usage` are valid and writable; `raw_pid` is our
        // unreaped child, so the call cannot reap anything else.
        let rc = unsafe { libc::wait4(raw_pid, &mut status, libc::WNOHANG, &mut usage) };
        if rc == raw_pid {
            break (status, usage);
        }
        if rc < 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{} ran over {timeout:?}; killed",
                program.as_ref().to_string_lossy()
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    let ended = OffsetDateTime::now_utc();
    let tv_ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1_000;
    let join = |h: thread::JoinHandle<String>| h.join().unwrap_or_default();
    Ok(Reaped {
        pid,
        exit_code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        rusage_cpu_ns: tv_ns(usage.ru_utime) + tv_ns(usage.ru_stime),
        stdout: join(stdout),
        stderr: join(stderr),
        started,
        ended,
    })
}

/// Runs `python3 py/SCRIPT args...` as [`run_reaped`] does.
pub fn run_python(
    script: &str,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Reaped> {
    let mut argv = vec![py_script(script).to_string_lossy().into_owned()];
    argv.extend(args.iter().map(|a| a.to_string()));
    run_reaped("python3", &argv, env, timeout)
}

/// The virtualenv's Python: `TEST_INSTRUMENTATIONS_PYTHON` (cargo xtask test sets
/// it), else where `cargo xtask setup` puts it.
pub fn instrumentations_python() -> PathBuf {
    let path = std::env::var_os("TEST_INSTRUMENTATIONS_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| {
                PathBuf::from(h).join(".local/share/mentat-agent/py-instrumentations/bin/python")
            })
        })
        .expect("HOME or TEST_INSTRUMENTATIONS_PYTHON");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo xtask setup` (it builds the instrumentations virtualenv \
         from tests/py/instrumentations.txt)",
        path.display()
    );
    path
}

/// Runs `py/otlp_client.py ARGS` (at most `timeout`) and checks that the receiver
/// refused none of its spans; its JSON summary.
pub fn send_spans(args: &[&str], timeout: Duration) -> Result<Value> {
    let summary = run_python("otlp_client.py", args, &[], timeout)?
        .ok("py/otlp_client.py")?
        .truth()?;
    anyhow::ensure!(
        summary["rejected_spans"] == 0,
        "the receiver refused spans: {summary}"
    );
    Ok(summary)
}

/// The `messages` of an `otlp_client.py` summary: what the receiver said about
/// the spans it refused (partial success, refusals).
pub fn summary_messages(summary: &Value) -> Vec<&str> {
    summary["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect()
}

/// A run id no other test run has used: the tests' pid, the time, and a tag.
pub fn unique_run_id(tag: &str) -> String {
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        OffsetDateTime::now_utc().unix_timestamp_nanos()
    )
}

/// A random-looking W3C trace id (32 lowercase hex, not all zeros) from the time and pid.
pub fn trace_id() -> String {
    let t = OffsetDateTime::now_utc().unix_timestamp_nanos() as u128;
    format!("{:032x}", (t ^ (u128::from(std::process::id()) << 64)) | 1)
}

/// A process's resident set, bytes (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS line")?
        .parse()
        .context("VmRSS is not a number")?;
    Ok(kb * 1024)
}
