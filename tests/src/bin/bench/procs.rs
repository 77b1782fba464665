//! Process and CPU plumbing for the workloads: forked children killed and reaped on drop,
//! pipes, per-thread rusage (context switches), and CPU pinning, so every workload runs on
//! the CPUs the report names.

use std::mem;
use std::os::fd::{FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

/// A forked child, killed and reaped when dropped unless reaped first.
pub(crate) struct Forked {
    pub(crate) pid: libc::pid_t,
}

impl Forked {
    /// Waits for a clean exit and returns the child's resource usage.
    pub(crate) fn reap(mut self) -> Result<libc::rusage> {
        let pid = mem::replace(&mut self.pid, 0);
        let mut status = 0;
        // SAFETY: zeroed rusage is valid; wait4 writes status and rusage we own.
        let mut usage: libc::rusage = unsafe { mem::zeroed() };
        let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        ensure!(
            rc == pid,
            "waiting for child {pid}: {}",
            std::io::Error::last_os_error()
        );
        ensure!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child {pid} failed (wait status {status:#x})"
        );
        Ok(usage)
    }

    pub(crate) fn into_pid(mut self) -> libc::pid_t {
        mem::replace(&mut self.pid, 0)
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.pid > 0 {
            // SAFETY: our own unreaped child, so the pid cannot have been reused.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
                libc::waitpid(self.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Forks a child that runs `body`, then exits; it is SIGKILLed if this process dies. `body`
/// must only make syscalls: this process has threads, whose locks the child inherits held or
/// not.
pub(crate) fn fork_child(body: impl FnOnce()) -> Result<Forked> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: the child only makes syscalls (see above) and leaves through _exit.
    match unsafe { libc::fork() } {
        -1 => bail!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            die_with_parent(parent);
            body();
            // SAFETY: leaving without the parent's destructors, as a forked child must.
            unsafe { libc::_exit(0) }
        }
        pid => Ok(Forked { pid }),
    }
}

/// In a forked child: have the kernel SIGKILL it when `parent` dies, so no workload outlives
/// the benchmark.
pub(crate) fn die_with_parent(parent: libc::pid_t) {
    // SAFETY: prctl, getppid and _exit have no memory-safety preconditions. The getppid
    // check closes the race where the parent died before prctl ran.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
        if libc::getppid() != parent {
            libc::_exit(1);
        }
    }
}

/// A pipe as (read end, write end), closed on exec so agents spawned later do not inherit it.
pub(crate) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe2: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub(crate) fn thread_rusage() -> Result<libc::rusage> {
    // SAFETY: zeroed rusage is valid; getrusage writes into it.
    let mut usage: libc::rusage = unsafe { mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) } != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    Ok(usage)
}

/// Pins the calling thread to one CPU until dropped, then restores its old affinity.
pub(crate) struct Pinned {
    pub(crate) old: libc::cpu_set_t,
}

impl Pinned {
    pub(crate) fn to(cpu: usize) -> Result<Self> {
        let old = affinity()?;
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
        let mut one: libc::cpu_set_t = unsafe { mem::zeroed() };
        unsafe { libc::CPU_SET(cpu, &mut one) };
        set_affinity(&one).with_context(|| format!("pinning to CPU {cpu}"))?;
        Ok(Self { old })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Err(e) = set_affinity(&self.old) {
            eprintln!("bench: WARNING: could not restore the CPU affinity: {e:#}");
        }
    }
}

fn affinity() -> Result<libc::cpu_set_t> {
    // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0 {
        bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(set)
}

fn set_affinity(set: &libc::cpu_set_t) -> Result<()> {
    // SAFETY: sched_setaffinity reads the set we pass.
    if unsafe { libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), set) } != 0 {
        bail!("sched_setaffinity: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Where the workloads run.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Cpus {
    /// The getppid loop, both sides of the ping-pong, and the TCP receiver.
    pub(crate) bench: usize,
    /// The TCP sender; `None` when the TCP workload is skipped.
    pub(crate) tcp_sender: Option<usize>,
}

/// The last CPU other than `cpu` this process may run on, if any.
pub(crate) fn other_cpu(cpu: usize) -> Result<Option<usize>> {
    let set = affinity()?;
    Ok((0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: CPU_ISSET reads within the set for indexes below CPU_SETSIZE.
        .find(|&c| c != cpu && unsafe { libc::CPU_ISSET(c, &set) }))
}

/// The last CPU this process may run on: CPU 0 usually takes more of the interrupts.
pub(crate) fn bench_cpu() -> Result<usize> {
    let set = affinity()?;
    (0..libc::CPU_SETSIZE as usize)
        .rev()
        // SAFETY: CPU_ISSET reads within the set for indexes below CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .context("this process may run on no CPU at all")
}
