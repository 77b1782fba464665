//! The workloads the probes are measured on: a getppid loop (one sys_enter per call), a
//! pipe ping-pong between two processes on one CPU (sched_switch plus syscalls), loopback TCP
//! throughput between two CPUs (the socket tracepoints), and the background load the
//! footprint runs under. Each returns ns per event or GiB/s, timed in chunks so a
//! neighbour's burst spoils one chunk and not the figure.

use std::hint::black_box;
use std::io::{ErrorKind, Read};
use std::mem;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::procs::{Pinned, die_with_parent, fork_child, pipe, thread_rusage};
use crate::report::Spread;
use crate::{TCP_IO, TCP_TIMEOUT, check_interrupted};

/// Each loop is timed in this many equal chunks. On a shared machine another task taking
/// the CPU for a few ms inflates the chunks it hits; the median chunk is what the loop costs
/// when it runs, the whole-loop mean what it cost with the interruptions.
pub(crate) const CHUNKS: u64 = 20;

/// Nanoseconds per operation: the median over chunks, and the whole-loop mean.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub(crate) median: f64,
    pub(crate) mean: f64,
}

impl Timing {
    /// From each chunk's elapsed time, `ops` operations per chunk.
    pub(crate) fn of(chunks: &[Duration], ops: u64) -> Self {
        let per_op: Vec<f64> = chunks
            .iter()
            .map(|d| d.as_nanos() as f64 / ops as f64)
            .collect();
        let total: Duration = chunks.iter().sum();
        Self {
            median: Spread::of(&per_op).map_or(f64::NAN, |s| s.median),
            mean: total.as_nanos() as f64 / (ops * chunks.len() as u64) as f64,
        }
    }
}

/// Nanoseconds per getppid call, and how often the loop was preempted.
pub(crate) fn getppid(iterations: u64, cpu: usize) -> Result<(Timing, u64)> {
    let _pin = Pinned::to(cpu)?;
    let per_chunk = iterations / CHUNKS;
    for _ in 0..per_chunk {
        // SAFETY: getppid takes no arguments and cannot fail.
        black_box(unsafe { libc::syscall(libc::SYS_getppid) });
    }
    let before = thread_rusage()?;
    let mut chunks = Vec::with_capacity(CHUNKS as usize);
    for _ in 0..CHUNKS {
        let start = Instant::now();
        for _ in 0..per_chunk {
            // SAFETY: as above. A raw syscall, as glibc may serve getppid without one.
            black_box(unsafe { libc::syscall(libc::SYS_getppid) });
        }
        chunks.push(start.elapsed());
    }
    let after = thread_rusage()?;
    let preempted = u64::try_from(after.ru_nivcsw - before.ru_nivcsw).unwrap_or(0);
    Ok((Timing::of(&chunks, per_chunk), preempted))
}

/// Round trips before the clock starts, so both processes are running in steady state.
const PINGPONG_WARMUP: u64 = 1000;

/// Nanoseconds per context switch over `round_trips` round trips between this process and a
/// child on the same CPU (elapsed / 2 × round trips), and the switches per round trip the
/// two counted.
///
/// On one CPU each side blocks in read until the other has written, so a round trip is two
/// switches and no switch to idle; both sides' counters check that.
pub(crate) fn pingpong(round_trips: u64, cpu: usize) -> Result<(Timing, f64)> {
    let _pin = Pinned::to(cpu)?;
    let per_chunk = round_trips / CHUNKS;
    let round_trips = per_chunk * CHUNKS;
    let (to_child_rx, to_child_tx) = pipe()?;
    let (to_parent_rx, to_parent_tx) = pipe()?;
    let child = fork_child(|| {
        bounce(
            to_child_rx.as_raw_fd(),
            to_parent_tx.as_raw_fd(),
            Some(round_trips + PINGPONG_WARMUP),
            false,
        )
    })?;
    drop((to_child_rx, to_parent_tx));
    let (tx, rx) = (to_child_tx.as_raw_fd(), to_parent_rx.as_raw_fd());

    ensure!(
        bounce_checked(tx, rx, PINGPONG_WARMUP),
        "the ping-pong child stopped answering during warm-up"
    );
    let before = thread_rusage()?;
    let mut chunks = Vec::with_capacity(CHUNKS as usize);
    for _ in 0..CHUNKS {
        let start = Instant::now();
        let ok = bounce_checked(tx, rx, per_chunk);
        chunks.push(start.elapsed());
        ensure!(ok, "the ping-pong child stopped answering");
    }
    let after = thread_rusage()?;
    let child_usage = child.reap()?;

    let ours = (after.ru_nvcsw - before.ru_nvcsw) + (after.ru_nivcsw - before.ru_nivcsw);
    // The child's counters cover its warm-up too; scale to per round trip.
    let theirs = (child_usage.ru_nvcsw + child_usage.ru_nivcsw) as f64
        / (round_trips + PINGPONG_WARMUP) as f64;
    Ok((
        Timing::of(&chunks, 2 * per_chunk),
        ours as f64 / round_trips as f64 + theirs,
    ))
}

fn bounce_checked(tx: RawFd, rx: RawFd, round_trips: u64) -> bool {
    let mut byte = 0u8;
    for _ in 0..round_trips {
        // SAFETY: one byte to and from a valid local; the fds are open pipe ends we own.
        let ok = unsafe {
            libc::write(tx, (&raw const byte).cast(), 1) == 1
                && libc::read(rx, (&raw mut byte).cast(), 1) == 1
        };
        if !ok {
            return false;
        }
    }
    true
}

/// The forked side of a ping-pong: reads then writes (or writes then reads when `lead`),
/// `round_trips` times or until the pipe breaks, then exits. Only syscalls, as befits a
/// child forked from a multi-threaded process.
fn bounce(rx: RawFd, tx: RawFd, round_trips: Option<u64>, lead: bool) -> ! {
    let mut byte = 0u8;
    let mut done = 0u64;
    // SAFETY: one byte to and from a valid local; the fds are open pipe ends.
    unsafe {
        if lead && libc::write(tx, (&raw const byte).cast(), 1) != 1 {
            libc::_exit(1);
        }
        while round_trips != Some(done) {
            if libc::read(rx, (&raw mut byte).cast(), 1) != 1
                || libc::write(tx, (&raw const byte).cast(), 1) != 1
            {
                libc::_exit(1);
            }
            done += 1;
        }
        libc::_exit(0)
    }
}

/// Loopback TCP throughput in GiB/s: the median over chunks, and over the whole transfer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Throughput {
    pub(crate) median: f64,
    pub(crate) whole: f64,
    /// Involuntary switches away from the sender and the receiver: other work took their
    /// CPUs.
    pub(crate) preempted: u64,
    /// Context switches of the sender and the receiver, voluntary and involuntary.
    pub(crate) switches: u64,
    /// read calls the receiver made, the one that saw EOF included.
    pub(crate) reads: u64,
    /// CPU time of the sender (its whole life) and the receiver (from accept to EOF), ns.
    pub(crate) cpu_ns: u64,
}

pub(crate) const GIB: f64 = (1u64 << 30) as f64;

/// Streams `bytes` over a loopback TCP connection from a forked sender pinned to
/// `sender_cpu` to this process, the receiver, pinned to `receiver_cpu`, both in
/// [`TCP_IO`]-sized writes and reads.
///
/// Timed in the receiver, from the first byte received to EOF: that leaves out the fork, the
/// connection's setup and the sender's exit, which do not scale with the bytes, and counts
/// only bytes that arrived. The transfer after the first read is split into [`CHUNKS`] equal
/// byte ranges (to the nearest read), each timed; the median chunk is what the path carries
/// when nothing else takes the CPUs, as with the other workloads.
pub(crate) fn tcp_throughput(
    bytes: u64,
    sender_cpu: usize,
    receiver_cpu: usize,
) -> Result<Throughput> {
    let _pin = Pinned::to(receiver_cpu)?;
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding a TCP listener on 127.0.0.1")?;
    // accept honours SO_RCVTIMEO: a sender that never connects fails the measurement
    // instead of hanging it.
    set_receive_timeout(listener.as_raw_fd(), TCP_TIMEOUT)?;
    let SocketAddr::V4(addr) = listener
        .local_addr()
        .context("reading the listener's port")?
    else {
        bail!("the 127.0.0.1 listener has a non-IPv4 address");
    };
    // Built before the fork: the sender only makes syscalls.
    let target = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it.
    let mut sender_set: libc::cpu_set_t = unsafe { mem::zeroed() };
    unsafe { libc::CPU_SET(sender_cpu, &mut sender_set) };
    let payload = vec![0x5au8; TCP_IO];
    let sender = fork_child(|| tcp_send(&target, bytes, &payload, &sender_set))?;

    let before = thread_rusage()?;
    let (mut stream, _) = loop {
        match listener.accept() {
            Ok(accepted) => break accepted,
            Err(e) if e.kind() == ErrorKind::Interrupted => check_interrupted()?,
            Err(e) => return Err(e).context("accepting the TCP sender's connection"),
        }
    };
    drop(listener);
    stream
        .set_read_timeout(Some(TCP_TIMEOUT))
        .context("setting the TCP read timeout")?;
    let mut buf = vec![0u8; TCP_IO];
    let mut got = 0u64;
    // (when, bytes received by then) at the first read and at each chunk boundary.
    let mut marks: Vec<(Instant, u64)> = Vec::with_capacity(CHUNKS as usize + 2);
    let mut step = 0;
    let mut next = 0;
    let mut reads = 0u64;
    loop {
        reads += 1;
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {
                check_interrupted()?;
                continue;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("reading the loopback TCP stream after {got} of {bytes} bytes")
                });
            }
        };
        got += n;
        if marks.is_empty() {
            marks.push((Instant::now(), got));
            step = (bytes.saturating_sub(got) / CHUNKS).max(1);
            next = got + step;
        } else if got >= next {
            marks.push((Instant::now(), got));
            while next <= got {
                next += step;
            }
        }
    }
    let end = Instant::now();
    let after = thread_rusage()?;
    let sender = Usage::of(&sender.reap().context("the TCP sender failed")?);
    let receiver = Usage::of(&after).minus(Usage::of(&before));
    ensure!(
        got == bytes,
        "the TCP receiver got {got} bytes, the sender sent {bytes}"
    );
    if marks.last().is_some_and(|&(_, at)| at < got) {
        marks.push((end, got));
    }
    let rate = |(t0, b0): (Instant, u64), (t1, b1): (Instant, u64)| {
        (b1 - b0) as f64 / t1.duration_since(t0).as_secs_f64().max(1e-9) / GIB
    };
    let chunks: Vec<f64> = marks.windows(2).map(|w| rate(w[0], w[1])).collect();
    let (Some(&first), Some(&last)) = (marks.first(), marks.last()) else {
        bail!("the TCP receiver got no bytes");
    };
    ensure!(
        !chunks.is_empty(),
        "the TCP transfer was too short to time ({bytes} bytes)"
    );
    Ok(Throughput {
        median: Spread::of(&chunks).map_or(f64::NAN, |s| s.median),
        whole: rate(first, last),
        preempted: receiver.involuntary + sender.involuntary,
        switches: receiver.voluntary + receiver.involuntary + sender.voluntary + sender.involuntary,
        reads,
        cpu_ns: receiver.cpu_ns + sender.cpu_ns,
    })
}

/// CPU time and context switches from a `rusage`.
#[derive(Clone, Copy, Debug)]
struct Usage {
    pub(crate) cpu_ns: u64,
    voluntary: u64,
    involuntary: u64,
}

impl Usage {
    pub(crate) fn of(u: &libc::rusage) -> Self {
        let ns = |t: libc::timeval| {
            u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_usec).unwrap_or(0) * 1000
        };
        Self {
            cpu_ns: ns(u.ru_utime) + ns(u.ru_stime),
            voluntary: u64::try_from(u.ru_nvcsw).unwrap_or(0),
            involuntary: u64::try_from(u.ru_nivcsw).unwrap_or(0),
        }
    }

    fn minus(self, earlier: Self) -> Self {
        Self {
            cpu_ns: self.cpu_ns.saturating_sub(earlier.cpu_ns),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
        }
    }
}

/// The forked sender of [`tcp_throughput`]: pins itself, connects, writes `bytes` from
/// `payload` and closes, or leaves with exit code 1. Only syscalls, as befits a child forked
/// from a multi-threaded process.
fn tcp_send(target: &libc::sockaddr_in, bytes: u64, payload: &[u8], cpu: &libc::cpu_set_t) {
    // SAFETY: every pointer is to a local or to `payload` with its own length; the fd is
    // the socket made here. Leaving through _exit, as a forked child must.
    unsafe {
        if libc::sched_setaffinity(0, mem::size_of::<libc::cpu_set_t>(), cpu) != 0 {
            libc::_exit(1);
        }
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0
            || libc::connect(
                fd,
                std::ptr::from_ref(target).cast(),
                mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            ) != 0
        {
            libc::_exit(1);
        }
        let mut left = bytes;
        while left > 0 {
            let n = payload
                .len()
                .min(usize::try_from(left).unwrap_or(usize::MAX));
            let written = libc::write(fd, payload.as_ptr().cast(), n);
            if written > 0 {
                left -= written as u64;
            } else if written == 0 || *libc::__errno_location() != libc::EINTR {
                libc::_exit(1);
            }
        }
        if libc::close(fd) != 0 {
            libc::_exit(1);
        }
    }
}

fn set_receive_timeout(fd: RawFd, timeout: Duration) -> Result<()> {
    let value = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).context("timeout out of range")?,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads the timeval we pass, of the size we pass.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::from_ref(&value).cast(),
            mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setting SO_RCVTIMEO: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A getppid loop and a pinned ping-pong pair running until dropped, as background load.
pub(crate) struct Load {
    pids: Vec<libc::pid_t>,
}

impl Load {
    pub(crate) fn start(cpu: usize) -> Result<Self> {
        let mut load = Load { pids: Vec::new() };
        load.pids.push(
            fork_child(|| {
                loop {
                    // SAFETY: getppid takes no arguments and cannot fail.
                    black_box(unsafe { libc::syscall(libc::SYS_getppid) });
                }
            })?
            .into_pid(),
        );
        let pinned = Pinned::to(cpu)?;
        let (a_rx, b_tx) = pipe()?;
        let (b_rx, a_tx) = pipe()?;
        // The leader forks the follower itself, so the follower dies with it. A bare fork:
        // fork_child's error path allocates, which a forked child must not.
        let leader = fork_child(|| {
            // SAFETY: getpid has no preconditions.
            let leader = unsafe { libc::getpid() };
            // SAFETY: the follower only makes syscalls and leaves through _exit.
            match unsafe { libc::fork() } {
                // SAFETY: leaving without the parent's destructors, as a forked child must.
                -1 => unsafe { libc::_exit(1) },
                0 => {
                    die_with_parent(leader);
                    bounce(b_rx.as_raw_fd(), b_tx.as_raw_fd(), None, false)
                }
                _ => bounce(a_rx.as_raw_fd(), a_tx.as_raw_fd(), None, true),
            }
        })?;
        load.pids.push(leader.into_pid());
        drop(pinned);
        Ok(load)
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: our own unreaped children, so the pids cannot have been reused.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}
