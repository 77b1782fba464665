//! Workloads with known ground truth, for the end-to-end tests.
//!
//! Each subcommand does something whose cost the kernel reports back to the workload
//! independently of the agent (`wait4` rusage, its own pids, a cgroup's inode) and
//! prints that ground truth as one JSON line on stdout at the end (see
//! `mentat_tests::truth`).
//!
//! The workload is single-threaded whenever it forks, so a child owns a consistent copy
//! of the heap and of every lock; children leave through `_exit` and never return into
//! the parent's code.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use std::{fs, mem, process, thread};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand};
use mentat_tests::truth::{Burn, CgroupMove, Child, Getppid, ReusePid, SpawnMany};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "workload",
    about = "Workloads with known ground truth for mentat-agent's tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Fork one child whose THREADS threads each burn MS ms of CPU; print its wait4 rusage.
    Burn {
        #[arg(long)]
        threads: usize,
        #[arg(long)]
        ms: u64,
    },
    /// Fork one child that makes exactly COUNT getppid syscalls and nothing else.
    Getppid {
        #[arg(long)]
        count: u64,
    },
    /// Fork N children one after another, each burning MS ms of CPU; print each rusage.
    SpawnMany {
        #[arg(long)]
        n: usize,
        #[arg(long)]
        ms: u64,
    },
    /// Move this process into the cgroup v2 directory PATH, then burn MS ms of CPU.
    Cgroup {
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        ms: u64,
    },
    /// Print one line to stdout and one to stderr, then exit with CODE.
    ExitCode {
        #[arg(long)]
        code: i32,
    },
    /// Fork a child burning FIRST_MS ms, reap it, then fork a second child with the very
    /// same pid (clone3 set_tid, needs CAP_CHECKPOINT_RESTORE) burning SECOND_MS ms.
    ReusePid {
        #[arg(long)]
        first_ms: u64,
        #[arg(long)]
        second_ms: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Burn { threads, ms } => burn(threads, ms),
        Command::Getppid { count } => getppid(count),
        Command::SpawnMany { n, ms } => spawn_many(n, ms),
        Command::Cgroup { path, ms } => cgroup(&path, ms),
        Command::ExitCode { code } => exit_code(code),
        Command::ReusePid {
            first_ms,
            second_ms,
        } => reuse_pid(first_ms, second_ms),
    }
}

fn burn(threads: usize, ms: u64) -> Result<()> {
    ensure!(threads > 0, "--threads must be at least 1");
    let child_pid = fork_child(|| {
        let burners: Vec<_> = (0..threads)
            .map(|_| thread::spawn(move || burn_cpu(ms)))
            .collect();
        for burner in burners {
            burner.join().expect("a burner thread panicked");
        }
    })?;
    print_truth(&Burn {
        parent_pid: process::id(),
        child_pid: to_u32(child_pid)?,
        rusage_cpu_ns: reap(child_pid)?,
    })
}

fn getppid(count: u64) -> Result<()> {
    let child_pid = fork_child(|| {
        // Only getppid from here to _exit: no printing, no allocation (which could
        // mmap), so the child's syscall count is COUNT plus what fork and exit add.
        for _ in 0..count {
            // SAFETY: getppid takes no arguments and cannot fail.
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
    })?;
    reap(child_pid)?;
    print_truth(&Getppid {
        parent_pid: process::id(),
        child_pid: to_u32(child_pid)?,
        count,
    })
}

fn spawn_many(n: usize, ms: u64) -> Result<()> {
    let mut children = Vec::with_capacity(n);
    for _ in 0..n {
        let pid = fork_child(|| burn_cpu(ms))?;
        children.push(Child {
            pid: to_u32(pid)?,
            rusage_cpu_ns: reap(pid)?,
        });
    }
    print_truth(&SpawnMany {
        parent_pid: process::id(),
        total_rusage_cpu_ns: children.iter().map(|c| c.rusage_cpu_ns).sum(),
        children,
    })
}

fn cgroup(path: &Path, ms: u64) -> Result<()> {
    let pid = process::id();
    let procs = path.join("cgroup.procs");
    fs::write(&procs, format!("{pid}\n"))
        .with_context(|| format!("moving pid {pid} into {}", procs.display()))?;
    burn_cpu(ms);
    let cgroup_id = fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino();
    print_truth(&CgroupMove {
        pid,
        cgroup_id,
        rusage_cpu_ns: self_rusage_ns()?,
    })
}

fn exit_code(code: i32) -> Result<()> {
    println!("hello from workload");
    eprintln!("err from workload");
    io::stdout().flush().context("flushing stdout")?;
    process::exit(code)
}

fn reuse_pid(first_ms: u64, second_ms: u64) -> Result<()> {
    // set_tid fails with EEXIST if another process took the pid between the reap and
    // the clone; pids are handed out cyclically, so that needs a wrap-around in
    // between, and a few attempts make it vanishingly unlikely.
    const ATTEMPTS: usize = 5;
    for _ in 0..ATTEMPTS {
        let first_pid = fork_child(|| burn_cpu(first_ms))?;
        let first = Child {
            pid: to_u32(first_pid)?,
            rusage_cpu_ns: reap(first_pid)?,
        };
        let second_pid = match fork_child_with_pid(first_pid, || burn_cpu(second_ms)) {
            Ok(pid) => pid,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("clone3 with set_tid = {first_pid}"));
            }
        };
        ensure!(
            second_pid == first_pid,
            "clone3 set_tid = {first_pid} gave pid {second_pid}"
        );
        let second = Child {
            pid: first.pid,
            rusage_cpu_ns: reap(second_pid)?,
        };
        return print_truth(&ReusePid {
            parent_pid: process::id(),
            pid: first.pid,
            instances: vec![first, second],
        });
    }
    bail!("the reaped pid was taken by another process {ATTEMPTS} times in a row")
}

/// Spins until the calling thread has had `ms` ms of CPU, by its own CPU clock.
///
/// A wall-clock deadline would burn less than asked whenever the thread is preempted
/// on this noisy 2-core machine; the thread CPU clock makes the amount independent of
/// load. Reading that clock is a syscall (the vDSO serves only wall clocks), so it is
/// read once per 50 µs of spinning on the (vDSO) monotonic clock.
fn burn_cpu(ms: u64) {
    const SLICE: Duration = Duration::from_micros(50);
    let target = thread_cpu_ns() + ms * 1_000_000;
    while thread_cpu_ns() < target {
        let slice = Instant::now();
        while slice.elapsed() < SLICE {
            std::hint::spin_loop();
        }
    }
}

fn thread_cpu_ns() -> u64 {
    // SAFETY: an all-zero timespec is valid.
    let mut now: libc::timespec = unsafe { mem::zeroed() };
    // SAFETY: `now` is a valid, writable timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Forks a child that runs `body` and `_exit`s: 0 if `body` returned, 101 if it panicked.
fn fork_child(body: impl FnOnce()) -> Result<libc::pid_t> {
    // SAFETY: the workload is single-threaded whenever it forks (see the module doc),
    // and the child never returns from here.
    match unsafe { libc::fork() } {
        -1 => Err(io::Error::last_os_error()).context("fork"),
        0 => run_child(body),
        pid => Ok(pid),
    }
}

/// `clone3`'s arguments (`struct clone_args`, up to `set_tid_size` and `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Like [`fork_child`], but the child gets exactly `pid` (which must be free).
///
/// A raw clone3 skips glibc's fork bookkeeping; the child only burns CPU through raw
/// clock reads and `_exit`s, which needs none of it.
fn fork_child_with_pid(pid: libc::pid_t, body: impl FnOnce()) -> io::Result<libc::pid_t> {
    let set_tid = [pid];
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..CloneArgs::default()
    };
    // SAFETY: `args` and `set_tid` outlive the call; with no CLONE_VM the child gets its
    // own copy of this single-threaded process and never returns from here.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            mem::size_of::<CloneArgs>(),
        )
    };
    match rc {
        -1 => Err(io::Error::last_os_error()),
        0 => run_child(body),
        pid => Ok(pid as libc::pid_t),
    }
}

fn run_child(body: impl FnOnce()) -> ! {
    let code = match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(()) => 0,
        Err(_) => 101,
    };
    // SAFETY: _exit ends the child without running the parent's destructors or
    // flushing stdio buffers it inherited.
    unsafe { libc::_exit(code) }
}

/// Reaps `pid`, which must have exited 0, and returns its CPU time from `wait4`.
fn reap(pid: libc::pid_t) -> Result<u64> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid.
    let mut usage: libc::rusage = unsafe { mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid and writable.
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if rc == pid {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error).with_context(|| format!("wait4({pid})"));
        }
    }
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child {pid} did not exit cleanly (wait status {status:#x})"
    );
    Ok(rusage_ns(&usage))
}

fn self_rusage_ns() -> Result<u64> {
    // SAFETY: an all-zero rusage is valid.
    let mut usage: libc::rusage = unsafe { mem::zeroed() };
    // SAFETY: `usage` is valid and writable.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Err(io::Error::last_os_error()).context("getrusage(RUSAGE_SELF)");
    }
    Ok(rusage_ns(&usage))
}

/// User + system time, in nanoseconds.
fn rusage_ns(usage: &libc::rusage) -> u64 {
    let ns = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1_000;
    ns(usage.ru_utime) + ns(usage.ru_stime)
}

fn to_u32(pid: libc::pid_t) -> Result<u32> {
    u32::try_from(pid).with_context(|| format!("negative pid {pid}"))
}

fn print_truth(truth: &impl Serialize) -> Result<()> {
    let line = serde_json::to_string(truth).context("serialising the ground truth")?;
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .context("writing the ground truth to stdout")
}
