//! `mentat-agent top` end to end (issue 15), driven in tmux against a real
//! daemon metering a real CPU-burning workload in a run: the run's row
//! appears while it burns, its CPU·s column ends equal to `wait4`'s rusage,
//! `g` switches the rows to agents, and `q` quits (the pane's process ends).
//!
//! Needs root (the daemon) and tmux (`cargo xtask setup` installs it). The
//! tmux server is a private one (`-L`), killed at the end.

use std::process::Command;
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mentat_tests::daemon::{Daemon, DaemonOptions, LedgerDir, poll};
use mentat_tests::traced::{run_reaped, trace_id, unique_run_id};
use mentat_tests::{agent_bin, percent_off, within, workload_bin};

/// The agent's CPU for the run against `wait4`'s: both read the scheduler's
/// clock (`sum_exec_runtime`), so they differ only at the edges of the
/// processes' lives, as in runs.rs; `top` shows CPU·s to the millisecond,
/// far below 2 % of the 3 s burned.
const CPU_TOLERANCE: f64 = 0.02;

/// A private tmux server running one command in a 160×40 pane.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(command: &str) -> Result<Tmux> {
        let socket = format!("mentat-top-{}", std::process::id());
        let tmux = Tmux { socket };
        let out = tmux
            .cmd(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "160",
                "-y",
                "40",
                command,
            ])
            .output()
            .context("tmux (run `cargo xtask setup`)")?;
        ensure!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(tmux)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket]).args(args);
        c
    }

    fn screen(&self) -> Result<String> {
        let out = self.cmd(&["capture-pane", "-p", "-t", "top"]).output()?;
        ensure!(out.status.success(), "the tmux session is gone");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn keys(&self, keys: &str) -> Result<()> {
        let s = self.cmd(&["send-keys", "-t", "top", keys]).status()?;
        ensure!(s.success(), "tmux send-keys {keys}");
        Ok(())
    }

    fn alive(&self) -> bool {
        self.cmd(&["has-session", "-t", "top"])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd(&["kill-server"]).output();
    }
}

/// The row whose first column is `key`: its columns.
fn row<'a>(screen: &'a str, key: &str) -> Option<Vec<&'a str>> {
    screen
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&key))
}

#[test]
fn top_shows_a_burning_run_switches_grouping_and_quits() -> Result<()> {
    let dir = LedgerDir::new()?;
    let d = Daemon::start(&dir, &DaemonOptions::default())?;
    let run_id = unique_run_id("top");
    let trace = trace_id();
    let attrs = format!("flow.id=top-flow,flow.run_id={run_id},agent.id=top-agent");
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    let workload = workload_bin()?;
    let burner = thread::spawn(move || {
        run_reaped(
            &workload,
            &["burn", "--threads", "1", "--ms", "3000"],
            &[
                ("TRACEPARENT", traceparent.as_str()),
                ("OTEL_RESOURCE_ATTRIBUTES", attrs.as_str()),
            ],
            Duration::from_secs(120),
        )
    });
    let tmux = Tmux::start(&format!(
        "{} top --url {} --since 10m",
        agent_bin()?.display(),
        d.url()
    ))?;
    let last_screen = |t: &Tmux| t.screen().unwrap_or_default();
    // While it burns, its row shows CPU.
    poll(Duration::from_secs(60), || {
        let s = tmux.screen()?;
        Ok(match row(&s, &run_id) {
            Some(cols)
                if cols
                    .get(3)
                    .and_then(|c| c.parse::<f64>().ok())
                    .is_some_and(|c| c > 0.0) =>
            {
                Ok(())
            }
            _ => Err(format!("no row with CPU for {run_id}:\n{s}")),
        })
    })
    .with_context(|| format!("daemon log:\n{}", d.log()))?;
    let reaped = match burner.join() {
        Ok(r) => r?.ok("workload burn")?,
        Err(_) => bail!("the burner thread panicked"),
    };
    // Once its last window is in, CPU·S is the run's CPU: wait4's.
    let mut shown = 0u64;
    poll(Duration::from_secs(60), || {
        let s = tmux.screen()?;
        let cpu_s = row(&s, &run_id)
            .and_then(|c| c.get(4).and_then(|v| v.parse::<f64>().ok()))
            .unwrap_or(0.0);
        shown = (cpu_s * 1e9).round() as u64;
        Ok(if within(shown, reaped.rusage_cpu_ns, CPU_TOLERANCE) {
            Ok(())
        } else {
            Err(format!(
                "CPU·S {cpu_s} s for {run_id}, wait4 {} ns ({:+.2} %):\n{s}",
                reaped.rusage_cpu_ns,
                percent_off(shown, reaped.rusage_cpu_ns)
            ))
        })
    })?;
    // `g`: rows by agent; the run's agent is there.
    tmux.keys("g")?;
    poll(Duration::from_secs(60), || {
        let s = tmux.screen()?;
        Ok(if s.contains("AGENT") && row(&s, "top-agent").is_some() {
            Ok(())
        } else {
            Err(format!("no agent row after `g`:\n{s}"))
        })
    })?;
    // `q`: top exits (its pane, the session's only one, closes).
    tmux.keys("q")?;
    poll(Duration::from_secs(20), || {
        Ok(if tmux.alive() {
            Err(format!("top still runs after q:\n{}", last_screen(&tmux)))
        } else {
            Ok(())
        })
    })?;
    Ok(())
}
