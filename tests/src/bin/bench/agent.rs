//! `mentat-agent` as a child process: started with `attach` or `run`, its stdout and stderr
//! read line by line on threads, waited for with deadlines, stopped with a signal, and
//! killed when dropped, so an interrupted bench never leaves probes attached.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{EXIT_TIMEOUT, INTERRUPTED, check_interrupted};

#[derive(Clone, Copy)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

/// A running `mentat-agent`, its output read line by line; killed when dropped.
pub(crate) struct AgentProcess {
    pub(crate) child: Child,
    pub(crate) what: String,
    pub(crate) stdout: Receiver<String>,
    pub(crate) stderr: Receiver<String>,
    exited: Option<ExitStatus>,
}

impl AgentProcess {
    pub(crate) fn spawn<const N: usize>(agent: &Path, args: [&str; N]) -> Result<Self> {
        Self::spawn_env(agent, args, &[])
    }

    pub(crate) fn spawn_env<const N: usize>(
        agent: &Path,
        args: [&str; N],
        env: &[(&str, String)],
    ) -> Result<Self> {
        let mut command = Command::new(agent);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a Ctrl-C reaches only this benchmark, which then
            // stops the agent itself.
            .process_group(0);
        // SAFETY: prctl is async-signal-safe; it makes the kernel stop the agent (and
        // detach its probes) if this benchmark dies without stopping it.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let what = std::iter::once(agent.as_os_str())
            .chain(args.iter().map(OsStr::new))
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let mut child = command
            .spawn()
            .with_context(|| format!("starting `{what}`"))?;
        let stdout = lines(child.stdout.take());
        let stderr = lines(child.stderr.take());
        Ok(Self {
            child,
            what,
            stdout,
            stderr,
            exited: None,
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn receiver(&self, stream: Stream) -> &Receiver<String> {
        match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        }
    }

    /// Waits for a line containing `needle`; fails naming the agent's exit and stderr if it
    /// exits first.
    pub(crate) fn wait_for_line(
        &mut self,
        stream: Stream,
        needle: &str,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            let left = deadline.saturating_duration_since(Instant::now());
            match self
                .receiver(stream)
                .recv_timeout(left.min(Duration::from_millis(200)))
            {
                Ok(line) if line.contains(needle) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) if !left.is_zero() => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("`{}` printed no `{needle}` within {timeout:?}", self.what)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.wait(EXIT_TIMEOUT)?;
                    bail!(
                        "`{}` exited ({}) before printing `{needle}`; stderr:\n{}",
                        self.what,
                        describe_status(status),
                        self.drain(Stream::Stderr).join("\n")
                    );
                }
            }
        }
    }

    pub(crate) fn running(&mut self) -> Result<bool> {
        if self.exited.is_none() {
            self.exited = self
                .child
                .try_wait()
                .with_context(|| format!("checking on `{}`", self.what))?;
        }
        Ok(self.exited.is_none())
    }

    /// Waits up to `timeout` for it to exit; past that kills it and fails.
    pub(crate) fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.running()? {
            if Instant::now() >= deadline {
                self.kill();
                bail!("`{}` did not exit within {timeout:?}; killed", self.what);
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                self.kill();
                bail!("interrupted");
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.exited
            .context("the agent's exit status vanished after it exited")
    }

    /// Sends `signal` and waits for the exit; returns a description of how it ended.
    pub(crate) fn signal_and_wait(&mut self, signal: libc::c_int) -> Result<ExitStatus> {
        if self.running()? {
            let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
            // SAFETY: our own unreaped child, so the pid cannot have been reused.
            unsafe { libc::kill(pid, signal) };
        }
        self.wait(EXIT_TIMEOUT)
    }

    /// Stops an `attach` early (it prints no statistics then).
    pub(crate) fn stop(&mut self) -> Result<String> {
        let status = self.signal_and_wait(libc::SIGTERM)?;
        Ok(describe_status(status))
    }

    pub(crate) fn kill(&mut self) {
        if self.exited.is_none() {
            // Errors only mean it is already gone.
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Every line received so far on `stream`, waiting briefly for the reader to catch up
    /// once the agent has exited.
    pub(crate) fn drain(&self, stream: Stream) -> Vec<String> {
        let rx = self.receiver(stream);
        if self.exited.is_some() {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut out = Vec::new();
            while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                out.push(line);
            }
            out
        } else {
            rx.try_iter().collect()
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Lines of a child's pipe, read on a thread so the child never blocks on a full pipe.
pub(crate) fn lines(pipe: Option<impl Read + Send + 'static>) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    if let Some(pipe) = pipe {
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

pub(crate) fn describe_status(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "unknown exit status".to_owned(),
    }
}
