//! Running the agent: binaries from the environment, a timeout, captured output.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use std::{env, fs};

use anyhow::{Context, Result, ensure};
use serde::de::DeserializeOwned;

use crate::records::Records;

/// Environment variable naming the `mentat-agent` binary under test.
pub const AGENT_ENV: &str = "TEST_AGENT_BIN";
/// Environment variable naming this crate's `workload` binary.
pub const WORKLOAD_ENV: &str = "TEST_WORKLOAD_BIN";

/// Longest any one agent run may take before the test gives up and kills it. The
/// longest workload burns ~2 s of CPU; the rest is loading probes on a noisy machine.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The agent under test, from `TEST_AGENT_BIN`.
pub fn agent_bin() -> Result<PathBuf> {
    binary_from_env(AGENT_ENV, "the mentat-agent binary")
}

/// The workload helper, from `TEST_WORKLOAD_BIN`.
pub fn workload_bin() -> Result<PathBuf> {
    binary_from_env(WORKLOAD_ENV, "this crate's `workload` binary")
}

fn binary_from_env(var: &str, what: &str) -> Result<PathBuf> {
    let path = env::var_os(var).map(PathBuf::from).with_context(|| {
        format!("{var} is not set: it must name {what}; run these tests through `cargo xtask test`, which builds both binaries and sets it")
    })?;
    ensure!(
        path.is_file(),
        "{var}={} does not name a file ({what})",
        path.display()
    );
    Ok(path)
}

/// How a process ended and what it printed.
#[derive(Clone, Debug)]
pub struct Output {
    /// `None` when a signal killed it (or the test did, on timeout).
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Exit status and the end of stderr, for failure messages.
    pub fn describe(&self) -> String {
        const TAIL: usize = 4000;
        let start = self.stderr.len().saturating_sub(TAIL);
        let start = (start..self.stderr.len())
            .find(|&i| self.stderr.is_char_boundary(i))
            .unwrap_or(self.stderr.len());
        let status = match (self.exit_code, self.signal) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "unknown exit status".to_owned(),
        };
        format!("{status}; stderr ends with:\n{}", &self.stderr[start..])
    }

    /// Fails unless it exited 0, naming `invocation` and how it ended.
    pub fn ensure_success(&self, invocation: &str) -> Result<()> {
        ensure!(
            self.exit_code == Some(0),
            "{invocation} failed: {}",
            self.describe()
        );
        Ok(())
    }
}

/// Runs `mentat-agent ARGS...` to completion (at most `timeout`), capturing its output.
pub fn run_agent<I, S>(args: I, timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(agent_bin()?);
    command.args(args);
    let invocation = describe_command(&command);
    run_with_timeout(command, timeout).with_context(|| format!("running {invocation}"))
}

/// Runs `mentat-agent ARGS...` like [`run_agent`], with `env` added to its environment.
pub fn run_agent_env<I, S>(args: I, env: &[(&str, &str)], timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(agent_bin()?);
    command.args(args).envs(env.iter().copied());
    let invocation = describe_command(&command);
    run_with_timeout(command, timeout).with_context(|| format!("running {invocation} with {env:?}"))
}

/// One `mentat-agent record` run and the records it wrote.
#[derive(Clone, Debug)]
pub struct Recording {
    /// The command line, for failure messages.
    pub invocation: String,
    pub output: Output,
    pub records: Records,
    /// Hypervisor steal time over all CPUs during the run, in ns (from `/proc/stat`, so
    /// in steps of 1/USER_HZ). `wait4`/`getrusage` exclude stolen time (paravirt steal
    /// accounting) while a meter that times context switches with the monotonic clock
    /// includes it: the first suspect when the agent reads higher than rusage on a VM.
    pub steal_ns: u64,
}

impl Recording {
    /// Every JSON line the command printed, in order: the ground truth of each workload
    /// a shell command ran.
    pub fn ground_truths<T: DeserializeOwned>(&self) -> Result<Vec<T>> {
        self.output
            .stdout
            .lines()
            .filter(|line| line.trim_start().starts_with('{'))
            .map(|line| {
                serde_json::from_str(line).with_context(|| {
                    format!(
                        "a workload's line on the stdout of {} is not ground truth: {line}",
                        self.invocation
                    )
                })
            })
            .collect()
    }

    /// The workload's ground truth: the last JSON line on the agent's stdout, through
    /// which the workload's stdout passes untouched.
    pub fn ground_truth<T: DeserializeOwned>(&self) -> Result<T> {
        let line = self
            .output
            .stdout
            .lines()
            .rev()
            .find(|line| line.trim_start().starts_with('{'))
            .with_context(|| {
                format!(
                    "no JSON line from the workload on the stdout of {}; stdout was {:?}",
                    self.invocation, self.output.stdout
                )
            })?;
        serde_json::from_str(line).with_context(|| {
            format!(
                "the workload's line on the stdout of {} is not the expected ground truth: {line}",
                self.invocation
            )
        })
    }
}

/// `mentat-agent record --format jsonl --output <tmp> AGENT_ARGS... [-- workload WORKLOAD_ARGS...]`,
/// whatever its exit code; the records are read back from `<tmp>` and parsed.
///
/// With `workload_args` `None` no command is given (the agent records the whole node).
pub fn record(agent_args: &[&str], workload_args: Option<&[&str]>) -> Result<Recording> {
    let command = workload_args.map(workload_command).transpose()?;
    record_command(agent_args, command.as_deref())
}

/// `workload ARGS...` as a command line for [`record_command`] or [`record_raw`].
pub fn workload_command(args: &[&str]) -> Result<Vec<OsString>> {
    Ok(std::iter::once(workload_bin()?.into_os_string())
        .chain(args.iter().map(OsString::from))
        .collect())
}

/// Like [`record`], with any command (`None`: the whole node).
pub fn record_command(agent_args: &[&str], command: Option<&[OsString]>) -> Result<Recording> {
    let raw = record_raw("jsonl", agent_args, command)?;
    let records = Records::parse(&raw.text).with_context(|| {
        format!(
            "the records of {} break the JSONL contract; the agent ended with {}",
            raw.invocation,
            raw.output.describe()
        )
    })?;
    Ok(Recording {
        invocation: raw.invocation,
        output: raw.output,
        records,
        steal_ns: raw.steal_ns,
    })
}

/// What one `record` run wrote to its `--output` file, unparsed, in any format.
#[derive(Clone, Debug)]
pub struct RawRecording {
    pub invocation: String,
    pub output: Output,
    /// The `--output` file's bytes, lossily decoded as UTF-8.
    pub text: String,
    /// As in [`Recording::steal_ns`].
    pub steal_ns: u64,
}

/// `mentat-agent record --format FORMAT --output <tmp> AGENT_ARGS... [-- COMMAND...]`,
/// whatever its exit code; `<tmp>` is read back unparsed.
pub fn record_raw(
    format: &str,
    agent_args: &[&str],
    command: Option<&[OsString]>,
) -> Result<RawRecording> {
    let dir = tempfile::Builder::new()
        .prefix("mentat-test-")
        .tempdir()
        .context("creating a temporary directory for the agent's records")?;
    let output_path = dir.path().join("records");
    let mut agent = Command::new(agent_bin()?);
    agent
        .args(["record", "--format", format, "--output"])
        .arg(&output_path)
        .args(agent_args);
    if let Some(command) = command {
        agent.arg("--").args(command);
    }
    let invocation = describe_command(&agent);
    let steal_before = node_steal_ns()?;
    let output =
        run_with_timeout(agent, RUN_TIMEOUT).with_context(|| format!("running {invocation}"))?;
    let steal_ns = node_steal_ns()?.saturating_sub(steal_before);
    let bytes = fs::read(&output_path).with_context(|| {
        format!(
            "reading the records of {invocation} from {}; the agent ended with {}",
            output_path.display(),
            output.describe()
        )
    })?;
    Ok(RawRecording {
        invocation,
        output,
        text: String::from_utf8_lossy(&bytes).into_owned(),
        steal_ns,
    })
}

/// [`record`] with a workload command that must succeed: the agent's exit code is the
/// command's, and every workload subcommand but `exit-code` exits 0.
pub fn record_workload(agent_args: &[&str], workload_args: &[&str]) -> Result<Recording> {
    let recording = record(agent_args, Some(workload_args))?;
    recording.output.ensure_success(&recording.invocation)?;
    Ok(recording)
}

/// [`record_workload`] and the workload's ground truth, for a test: panics
/// naming the command and what failed.
pub fn record_truth<T: DeserializeOwned>(
    agent_args: &[&str],
    workload_args: &[&str],
) -> (Recording, T) {
    let command = workload_args.join(" ");
    let recording = record_workload(agent_args, workload_args)
        .unwrap_or_else(|e| panic!("recording `workload {command}` with {agent_args:?}: {e:#}"));
    let truth = recording
        .ground_truth()
        .unwrap_or_else(|e| panic!("the ground truth of `workload {command}`: {e:#}"));
    (recording, truth)
}

/// Steal time of all CPUs since boot, in ns: the 8th value of `/proc/stat`'s `cpu` line.
pub fn node_steal_ns() -> Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let steal_ticks: u64 = stat
        .lines()
        .find_map(|line| line.strip_prefix("cpu "))
        .and_then(|values| values.split_whitespace().nth(7))
        .context("no steal time on /proc/stat's cpu line")?
        .parse()
        .context("steal time in /proc/stat is not a number")?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks_per_second = u64::try_from(ticks_per_second)
        .ok()
        .filter(|&hz| hz > 0)
        .context("sysconf(_SC_CLK_TCK) failed")?;
    Ok(steal_ticks * (1_000_000_000 / ticks_per_second))
}

fn run_with_timeout(mut command: Command, timeout: Duration) -> Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A process group of its own, so a timeout kills the agent and the command it
        // started together; otherwise an orphaned workload would keep the pipes open.
        .process_group(0);
    let mut child = command.spawn().context("starting the process")?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_until(&mut child, Instant::now() + timeout)?;
    let output = Output {
        exit_code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        stdout: join(stdout),
        stderr: join(stderr),
    };
    ensure!(
        status.is_some(),
        "no exit after {timeout:?}, killed; {}",
        output.describe()
    );
    Ok(output)
}

/// Waits for `child`; past `deadline` kills its process group and returns `None`.
fn wait_until(child: &mut Child, deadline: Instant) -> Result<Option<std::process::ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait().context("waiting for the process")? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            // The child is not reaped yet, so its pid (the group's id) cannot have been
            // reused: this signals only processes this test started.
            let group = i32::try_from(child.id()).context("pid out of range")?;
            // SAFETY: kill(2) has no memory-safety preconditions.
            unsafe { libc::kill(-group, libc::SIGKILL) };
            child.wait().context("reaping the killed process")?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            // A read error only truncates what a failure message can show.
            let _ = pipe.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

fn join(reader: JoinHandle<String>) -> String {
    reader
        .join()
        .unwrap_or_else(|_| "<output reader panicked>".to_owned())
}

fn describe_command(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}
