//! A ledger that cannot be written (its filesystem full) loses no usage: the
//! daemon keeps the failing window, retries it, lets later windows wait behind
//! it, counts the failures on `/metrics`, and once space is back commits every
//! window in order, with no gap, and a workload metered during the outage
//! matches wait4.
//!
//! The ledger lives on a small tmpfs mounted for this test, filled to the last
//! byte by a filler file (root needed, as for every privileged test).

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use mentat_tests::daemon::{Daemon, DaemonOptions, LedgerDir, parse_time, rfc3339, run_workload};
use mentat_tests::truth::Burn;
use time::OffsetDateTime;

/// Room for the ledger's first windows; the filler takes the rest.
const TMPFS_SIZE: &str = "16m";

/// A tmpfs mounted for the test, unmounted (lazily, so a daemon still holding
/// files cannot keep it) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Result<Tmpfs> {
        let dir = tempfile::Builder::new().prefix("mentat-full-").tempdir()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={TMPFS_SIZE}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .context("running mount")?;
        ensure!(
            status.success(),
            "mount -t tmpfs on {} failed",
            dir.path().display()
        );
        Ok(Tmpfs { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// Writes `path` until the filesystem refuses more; returns the bytes written.
fn fill(path: &Path) -> Result<u64> {
    let mut f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let chunk = vec![0xa5u8; 64 << 10];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => bail!("filling {}: {e}", path.display()),
        }
    }
    // Smaller writes take the last partial chunk's worth.
    for size in [4096usize, 512, 1] {
        while f.write(&chunk[..size]).map(|n| n > 0).unwrap_or(false) {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    Ok(written)
}

/// Checkpoints the ledger's WAL into the database and truncates it to zero
/// bytes (Python's sqlite3, a second connection, as an operator's tool would).
fn truncate_wal(db: &Path) -> Result<()> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3, sys, time\n\
             con = sqlite3.connect(sys.argv[1], timeout=10)\n\
             for _ in range(50):\n\
             \x20   busy, _, _ = con.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()\n\
             \x20   if busy == 0: sys.exit(0)\n\
             \x20   time.sleep(0.1)\n\
             sys.exit('the WAL stayed busy')",
        ])
        .arg(db)
        .output()
        .context("python3 sqlite3")?;
    ensure!(
        out.status.success(),
        "truncating {}-wal: {}",
        db.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_full_ledger_disk_delays_windows_and_loses_none() -> Result<()> {
    let fs = Tmpfs::mount()?;
    let ledger_path: PathBuf = fs.path().join("ledger.db");
    let logs = LedgerDir::new()?;
    let daemon = Daemon::start(
        &logs,
        &DaemonOptions {
            env: vec![(
                "MENTAT_LEDGER_PATH".into(),
                ledger_path.display().to_string(),
            )],
            ..DaemonOptions::default()
        },
    )?;
    let started = rfc3339(daemon.started);
    // A few windows land before the disk fills.
    daemon.wait_counter("mentat_agent_windows_total", Duration::from_secs(20), |n| {
        n >= 2
    })?;

    // Empty the write-ahead log first: SQLite reuses the WAL's blocks, so with
    // a large WAL left over, commits would go on succeeding on a full disk.
    truncate_wal(&ledger_path)?;
    let filler = fs.path().join("filler");
    let filled = fill(&filler)?;
    eprintln!("filled the ledger's tmpfs with {filled} bytes");
    let burn: Burn = serde_json::from_str(
        run_workload(&["burn", "--threads", "1", "--ms", "1500"])?
            .lines()
            .last()
            .context("no ground truth")?,
    )?;
    let burn_ended = OffsetDateTime::now_utc();
    // The windows of the burn (and a few after it) fail to commit.
    daemon.wait_counter(
        "mentat_agent_commit_failures_total",
        Duration::from_secs(20),
        |n| n >= 3,
    )?;
    let windows_while_full = daemon.counter("mentat_agent_windows_total")?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        daemon.counter("mentat_agent_windows_total")? == windows_while_full,
        "windows were committed while the ledger's disk was full"
    );

    fs::remove_file(&filler)?;
    // Every held window goes in once there is room, and then new ones.
    let records = daemon.records_once_past(
        &started,
        burn_ended + time::Duration::seconds(2),
        Duration::from_secs(60),
    )?;

    // No gap: each window starts where the previous one ended. Read from the
    // node's bucket records, one per window each: a process's record may span
    // several windows (an idle process is billed once per idle_interval).
    let mut windows: Vec<(OffsetDateTime, OffsetDateTime)> = records
        .iter()
        .filter(|r| {
            matches!(
                r.record_kind.as_str(),
                "idle" | "kernel" | "irq_steal" | "unattributed"
            )
        })
        .map(|r| Ok((parse_time(&r.window_start)?, parse_time(&r.window_end)?)))
        .collect::<Result<_>>()?;
    windows.sort();
    windows.dedup();
    for pair in windows.windows(2) {
        ensure!(
            pair[0].1 == pair[1].0,
            "a gap in the ledger: a window ends at {} and the next starts at {}",
            rfc3339(pair[0].1),
            rfc3339(pair[1].0)
        );
    }
    // The burner ran while nothing could be written: all of it is there.
    let cpu_ns = mentat_tests::daemon::cpu_ns_of(&records, burn.child_pid)? as f64;
    let truth = burn.rusage_cpu_ns as f64;
    // 2 %: the agent meters a burner within 1 % of wait4 (tests/cpu.rs); the
    // outage adds nothing to that.
    ensure!(
        (cpu_ns - truth).abs() <= 0.02 * truth,
        "the burner (pid {}) metered during the outage: {cpu_ns} ns, wait4 {truth} ns",
        burn.child_pid
    );
    let stopped = daemon.stop()?;
    ensure!(stopped.status.success(), "{}", stopped.describe());
    ensure!(
        stopped.log.contains("later windows wait"),
        "the failure was logged: {}",
        stopped.describe()
    );
    Ok(())
}
