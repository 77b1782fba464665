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

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use std::{env, fs, mem, process, thread};

use anyhow::{Context, Result, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use mentat_tests::truth::{
    Burn, CgroupHop, CgroupMove, Child, Gated, Getppid, HOSTILE_COMM, HoldMemory, Hostile, Prefork,
    PreforkClient, PreforkWorker, ReusePid, SpawnMany, Tcp, Udp, Wrap, WriteFile,
};
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
    /// Run in bursts of 200 µs of CPU, each followed by a 1 ms sleep (a switch-out), for
    /// PRE ms of CPU in the cgroup it started in, move into the cgroup v2 directory PATH,
    /// then the same for MS ms: nearly every nanosecond is charged at a switch-out.
    CgroupHop {
        #[arg(long)]
        path: PathBuf,
        #[arg(long)]
        pre: u64,
        #[arg(long)]
        ms: u64,
    },
    /// Move this process into the cgroup v2 directory PATH and print `ready`; on a line
    /// from stdin burn MS ms of CPU; exit when stdin closes.
    Gated {
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
    /// Fork a server and a client, each of which first moves itself into its cgroup; the
    /// client sends exactly BYTES over loopback TCP and shuts down, the server reads to EOF.
    Tcp {
        #[arg(long)]
        bytes: u64,
        #[arg(long, value_enum)]
        family: Family,
        #[arg(long)]
        server_cgroup: PathBuf,
        #[arg(long)]
        client_cgroup: PathBuf,
    },
    /// Like `tcp` with COUNT datagrams of SIZE bytes over loopback UDP; the server stops
    /// after COUNT datagrams or 2 s of silence.
    Udp {
        #[arg(long)]
        count: u64,
        #[arg(long)]
        size: usize,
        #[arg(long, value_enum)]
        family: Family,
        #[arg(long)]
        server_cgroup: PathBuf,
        #[arg(long)]
        client_cgroup: PathBuf,
    },
    /// Open a loopback TCP listener, fork WORKERS that each move into their own cgroup and
    /// serve exactly REQUESTS_PER_WORKER connections from that shared listener (read
    /// REQUEST_BYTES, reply REPLY_BYTES), and clients that connect until both are done.
    Prefork {
        #[arg(long)]
        workers: usize,
        /// One cgroup directory per worker, comma-separated.
        #[arg(long, value_delimiter = ',')]
        cgroups: Vec<PathBuf>,
        #[arg(long)]
        requests_per_worker: u64,
        #[arg(long)]
        request_bytes: usize,
        #[arg(long)]
        reply_bytes: usize,
    },
    /// Allocate MIB MiB, touch every page, hold it for MS ms, exit.
    HoldMemory {
        #[arg(long)]
        mib: u64,
        #[arg(long)]
        ms: u64,
    },
    /// Write MIB MiB of non-zero data to PATH and fsync it.
    WriteFile {
        #[arg(long)]
        mib: u64,
        #[arg(long)]
        path: PathBuf,
    },
    /// Give this process a comm with a newline, a comma, a quote and invalid UTF-8, then
    /// run `hostile-child` with ~1 MiB of equally hostile argv.
    Hostile,
    /// What `hostile` runs: checks its argv, sets the same comm, burns 50 ms of CPU.
    HostileChild {
        #[arg(allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Fork and exec COMMAND, wait4 it, print its pid, rusage and exit code.
    Wrap {
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<OsString>,
    },
}

/// An address family for the loopback tests.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Family {
    /// 127.0.0.1
    #[value(name = "4")]
    V4,
    /// ::1
    #[value(name = "6")]
    V6,
}

impl Family {
    fn loopback(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Family::V6 => IpAddr::V6(Ipv6Addr::LOCALHOST),
        }
    }
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Burn { threads, ms } => burn(threads, ms),
        Command::Getppid { count } => getppid(count),
        Command::SpawnMany { n, ms } => spawn_many(n, ms),
        Command::Cgroup { path, ms } => cgroup(&path, ms),
        Command::CgroupHop { path, pre, ms } => cgroup_hop(&path, pre, ms),
        Command::Gated { path, ms } => gated(&path, ms),
        Command::ExitCode { code } => exit_code(code),
        Command::ReusePid {
            first_ms,
            second_ms,
        } => reuse_pid(first_ms, second_ms),
        Command::Tcp {
            bytes,
            family,
            server_cgroup,
            client_cgroup,
        } => tcp(bytes, family, &server_cgroup, &client_cgroup),
        Command::Udp {
            count,
            size,
            family,
            server_cgroup,
            client_cgroup,
        } => udp(count, size, family, &server_cgroup, &client_cgroup),
        Command::Prefork {
            workers,
            cgroups,
            requests_per_worker,
            request_bytes,
            reply_bytes,
        } => prefork(
            workers,
            &cgroups,
            requests_per_worker,
            request_bytes,
            reply_bytes,
        ),
        Command::HoldMemory { mib, ms } => hold_memory(mib, ms),
        Command::WriteFile { mib, path } => write_file(mib, &path),
        Command::Hostile => hostile(),
        Command::HostileChild { args } => hostile_child(&args),
        Command::Wrap { command } => wrap(&command),
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
    move_into_cgroup(path)?;
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

fn cgroup_hop(path: &Path, pre: u64, ms: u64) -> Result<()> {
    let bursts = |ms: u64| {
        for _ in 0..ms * 5 {
            burn_cpu_us(200);
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    bursts(pre);
    let rusage_at_move_ns = self_rusage_ns()?;
    move_into_cgroup(path)?;
    bursts(ms);
    let cgroup_id = fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino();
    print_truth(&CgroupHop {
        pid: process::id(),
        cgroup_id,
        rusage_at_move_ns,
        rusage_cpu_ns: self_rusage_ns()?,
    })
}

fn burn_cpu_us(us: u64) {
    let target = thread_cpu_ns() + us * 1_000;
    while thread_cpu_ns() < target {
        std::hint::spin_loop();
    }
}

/// A process a test can name (to a stand-in GPU driver, say) before it does anything,
/// and that lives as long as the test needs it to.
fn gated(path: &Path, ms: u64) -> Result<()> {
    move_into_cgroup(path)?;
    let cgroup_id = fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino();
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "ready")
            .and_then(|()| stdout.flush())
            .context("writing `ready`")?;
    }
    let mut stdin = io::stdin().lock();
    let mut line = String::new();
    io::BufRead::read_line(&mut stdin, &mut line).context("reading the gate line")?;
    ensure!(!line.is_empty(), "stdin closed before the gate line");
    let rusage_at_gate_ns = self_rusage_ns()?;
    burn_cpu(ms);
    io::copy(&mut stdin, &mut io::sink()).context("waiting for stdin to close")?;
    print_truth(&Gated {
        pid: process::id(),
        cgroup_id,
        rusage_at_gate_ns,
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

/// Bytes per `read`/`write` call of the network and file workloads.
const CHUNK: usize = 64 * 1024;

fn tcp(bytes: u64, family: Family, server_cgroup: &Path, client_cgroup: &Path) -> Result<()> {
    let (mut from_server, mut to_parent) = pipe()?;
    let server = fork_try(move || {
        move_into_cgroup(server_cgroup)?;
        let listener =
            TcpListener::bind((family.loopback(), 0)).context("binding the TCP server")?;
        let port = listener
            .local_addr()
            .context("the server's address")?
            .port();
        send_counts(&mut to_parent, &[u64::from(port)])?;
        let (mut stream, _) = listener.accept().context("accepting the client")?;
        let received = read_counting(&mut stream, None)?;
        send_counts(&mut to_parent, &[received])
    })?;
    let [port] = receive_counts(&mut from_server, server, "TCP server")?;
    let address = SocketAddr::new(family.loopback(), u16::try_from(port)?);

    let (mut from_client, mut to_parent) = pipe()?;
    let client = fork_try(move || {
        move_into_cgroup(client_cgroup)?;
        let mut stream = TcpStream::connect(address)
            .with_context(|| format!("connecting to the server at {address}"))?;
        let sent = write_counting(&mut stream, bytes)?;
        stream
            .shutdown(Shutdown::Write)
            .context("shutting down the sending side")?;
        // The server closes once it has read to EOF; waiting for that ends the
        // connection in order instead of racing the server's last reads.
        read_counting(&mut stream, None)?;
        send_counts(&mut to_parent, &[sent])
    })?;
    let [bytes_sent] = receive_counts(&mut from_client, client, "TCP client")?;
    let [bytes_received] = receive_counts(&mut from_server, server, "TCP server")?;
    reap(client)?;
    reap(server)?;
    print_truth(&Tcp {
        parent_pid: process::id(),
        server_pid: to_u32(server)?,
        client_pid: to_u32(client)?,
        bytes_sent,
        bytes_received,
    })
}

fn udp(
    count: u64,
    size: usize,
    family: Family,
    server_cgroup: &Path,
    client_cgroup: &Path,
) -> Result<()> {
    // The largest UDP payload over IPv4; loopback's 64 KiB MTU carries it unfragmented.
    const MAX_DATAGRAM: usize = 65_507;
    // The receiver gives up after this much silence: the sender is done, and whatever
    // has not arrived was dropped.
    const SILENCE: Duration = Duration::from_secs(2);
    ensure!(
        (1..=MAX_DATAGRAM).contains(&size),
        "--size must be 1..={MAX_DATAGRAM}"
    );
    let (mut from_server, mut to_parent) = pipe()?;
    let server = fork_try(move || {
        move_into_cgroup(server_cgroup)?;
        let socket = UdpSocket::bind((family.loopback(), 0)).context("binding the receiver")?;
        enlarge_receive_buffer(&socket, 64 << 20)?;
        socket.set_read_timeout(Some(SILENCE))?;
        let port = socket
            .local_addr()
            .context("the receiver's address")?
            .port();
        send_counts(&mut to_parent, &[u64::from(port)])?;
        let mut buffer = vec![0u8; MAX_DATAGRAM + 1];
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        while datagrams < count {
            match socket.recv(&mut buffer) {
                Ok(n) => {
                    datagrams += 1;
                    bytes += n as u64;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("receiving a datagram"),
            }
        }
        send_counts(&mut to_parent, &[datagrams, bytes])
    })?;
    let [port] = receive_counts(&mut from_server, server, "UDP receiver")?;
    let address = SocketAddr::new(family.loopback(), u16::try_from(port)?);

    let (mut from_client, mut to_parent) = pipe()?;
    let client = fork_try(move || {
        move_into_cgroup(client_cgroup)?;
        let socket = UdpSocket::bind((family.loopback(), 0)).context("binding the sender")?;
        socket
            .connect(address)
            .with_context(|| format!("connecting to the receiver at {address}"))?;
        let payload = vec![0x5a_u8; size];
        let (mut datagrams, mut bytes) = (0u64, 0u64);
        while datagrams < count {
            // Pacing: the receiver drains its socket between bursts, so loopback
            // (which drops instead of blocking) rarely has to drop.
            if datagrams > 0 && datagrams % 100 == 0 {
                thread::sleep(Duration::from_micros(200));
            }
            match socket.send(&payload) {
                Ok(n) => {
                    datagrams += 1;
                    bytes += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("sending datagram {datagrams}"));
                }
            }
        }
        send_counts(&mut to_parent, &[datagrams, bytes])
    })?;
    let [datagrams_sent, bytes_sent] = receive_counts(&mut from_client, client, "UDP sender")?;
    let [datagrams_received, bytes_received] =
        receive_counts(&mut from_server, server, "UDP receiver")?;
    reap(client)?;
    reap(server)?;
    print_truth(&Udp {
        parent_pid: process::id(),
        server_pid: to_u32(server)?,
        client_pid: to_u32(client)?,
        datagrams_sent,
        bytes_sent,
        datagrams_received,
        bytes_received,
    })
}

/// Asks for `bytes` of receive buffer: SO_RCVBUFFORCE (root may exceed rmem_max), else
/// SO_RCVBUF (capped at rmem_max).
fn enlarge_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) -> Result<()> {
    let set = |option| {
        // SAFETY: the fd is open for the socket's lifetime and `bytes` is a valid c_int
        // whose size is passed along.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&bytes as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        }
    };
    if set(libc::SO_RCVBUFFORCE) == 0 || set(libc::SO_RCVBUF) == 0 {
        return Ok(());
    }
    Err(io::Error::last_os_error()).context("setting SO_RCVBUF")
}

fn prefork(
    workers: usize,
    cgroups: &[PathBuf],
    requests_per_worker: u64,
    request_bytes: usize,
    reply_bytes: usize,
) -> Result<()> {
    const CLIENTS: usize = 2;
    // Far more than the handful of seconds the exchange takes; a client past it means
    // a worker is stuck, and the test should fail rather than hang.
    const CLIENT_DEADLINE: Duration = Duration::from_secs(60);
    ensure!(workers > 0, "--workers must be at least 1");
    ensure!(
        cgroups.len() == workers,
        "--cgroups names {} directories for {workers} workers",
        cgroups.len()
    );
    let (request_bytes, reply_bytes) = (request_bytes as u64, reply_bytes as u64);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the listener")?;
    let address = listener.local_addr().context("the listener's address")?;

    let mut forked = Vec::with_capacity(workers);
    for cgroup in cgroups {
        let (from_worker, mut to_parent) = pipe()?;
        let listener = &listener;
        let pid = fork_try(move || {
            move_into_cgroup(cgroup)?;
            let (mut received, mut sent) = (0, 0);
            for served in 0..requests_per_worker {
                let (mut stream, _) = listener
                    .accept()
                    .with_context(|| format!("accepting after {served} connections"))?;
                received += read_counting(&mut stream, Some(request_bytes))?;
                sent += write_counting(&mut stream, reply_bytes)?;
            }
            send_counts(&mut to_parent, &[requests_per_worker, received, sent])
        })?;
        forked.push((pid, from_worker, cgroup));
    }
    // Only the workers hold the listener now. Once each has served its share and
    // exited it is closed, and a client's next connect is refused: that is how the
    // clients know to stop, and why each worker serves exactly its share.
    drop(listener);

    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        let (from_client, mut to_parent) = pipe()?;
        let pid = fork_try(move || {
            let deadline = Instant::now() + CLIENT_DEADLINE;
            let (mut connections, mut sent, mut received) = (0, 0, 0);
            loop {
                ensure!(
                    Instant::now() < deadline,
                    "the workers still accept after {CLIENT_DEADLINE:?}"
                );
                let mut stream = match TcpStream::connect(address) {
                    Ok(stream) => stream,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e).with_context(|| format!("connecting to {address}")),
                };
                // A connection still queued when the last worker left is reset unserved.
                let exchange = write_counting(&mut stream, request_bytes)
                    .and_then(|s| Ok((s, read_counting(&mut stream, None)?)));
                match exchange {
                    Ok((s, r)) if r == reply_bytes => {
                        connections += 1;
                        sent += s;
                        received += r;
                    }
                    Ok(_) => {}
                    Err(e) if is_reset(&e) => {}
                    Err(e) => return Err(e),
                }
            }
            send_counts(&mut to_parent, &[connections, sent, received])
        })?;
        clients.push((pid, from_client));
    }

    let mut worker_truth = Vec::with_capacity(workers);
    for (pid, mut pipe, cgroup) in forked {
        let [connections, bytes_received, bytes_sent] =
            receive_counts(&mut pipe, pid, "prefork worker")?;
        worker_truth.push(PreforkWorker {
            pid: to_u32(pid)?,
            cgroup: cgroup.display().to_string(),
            connections,
            bytes_received,
            bytes_sent,
        });
    }
    let mut client_truth = Vec::with_capacity(CLIENTS);
    for (pid, mut pipe) in clients {
        let [connections, bytes_sent, bytes_received] =
            receive_counts(&mut pipe, pid, "prefork client")?;
        client_truth.push(PreforkClient {
            pid: to_u32(pid)?,
            connections,
            bytes_sent,
            bytes_received,
        });
    }
    for pid in worker_truth
        .iter()
        .map(|w| w.pid)
        .chain(client_truth.iter().map(|c| c.pid))
    {
        reap(pid as libc::pid_t)?;
    }
    print_truth(&Prefork {
        parent_pid: process::id(),
        workers: worker_truth,
        clients: client_truth,
    })
}

/// Whether an I/O error (somewhere in `error`'s chain) is the peer resetting or closing.
fn is_reset(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause.downcast_ref::<io::Error>().is_some_and(|e| {
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
            )
        })
    })
}

fn hold_memory(mib: u64, ms: u64) -> Result<()> {
    let base_rss_bytes = proc_self_field("status", "VmRSS:")? * 1024;
    let len = usize::try_from(mib << 20).context("--mib is too large")?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
        .ok()
        .filter(|&page| page > 0)
        .context("sysconf(_SC_PAGESIZE) failed")?;
    // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing
    // touches no existing memory.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error()).with_context(|| format!("mmap of {mib} MiB"));
    }
    let touching = Instant::now();
    for offset in (0..len).step_by(page) {
        // SAFETY: `offset < len`, inside the writable mapping just made; a volatile write
        // so the page really is faulted in.
        unsafe { base.cast::<u8>().add(offset).write_volatile(1) };
    }
    let held = Instant::now();
    let touch_ns = u64::try_from((held - touching).as_nanos()).context("touch too long")?;
    thread::sleep(Duration::from_millis(ms));
    let vm_hwm_bytes = proc_self_field("status", "VmHWM:")? * 1024;
    // The mapping stays until exit, which follows right after the print.
    print_truth(&HoldMemory {
        pid: process::id(),
        mib,
        base_rss_bytes,
        touch_ns,
        hold_ns: u64::try_from(held.elapsed().as_nanos()).context("hold too long")?,
        vm_hwm_bytes,
    })
}

fn write_file(mib: u64, path: &Path) -> Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    let bytes_written = write_counting(&mut file, mib << 20)
        .with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync of {}", path.display()))?;
    print_truth(&WriteFile {
        pid: process::id(),
        path: path.display().to_string(),
        bytes_written,
        proc_io_write_bytes: proc_self_field("io", "write_bytes:")?,
    })
}

/// The number after `label` in `/proc/self/<file>` (its first word, so `kB` units are
/// the caller's to apply).
fn proc_self_field(file: &str, label: &str) -> Result<u64> {
    let path = format!("/proc/self/{file}");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .with_context(|| format!("no {label} in {path}"))?
        .parse()
        .with_context(|| format!("{label} in {path} is not a number"))
}

/// Arguments `hostile` passes to `hostile-child`.
const HOSTILE_ARGS: usize = 8;
/// MAX_ARG_STRLEN is 32 pages (128 KiB) including the terminating NUL: the longest
/// single argument exec accepts.
const HOSTILE_ARG_LEN: usize = 128 * 1024 - 1;

/// Argument `index` of `hostile-child`: newlines, quotes, separators and bytes that are
/// not UTF-8, HOSTILE_ARG_LEN bytes in all.
fn hostile_arg(index: usize) -> OsString {
    const PATTERN: &[u8] = b"ev\nil,\"\xff\xfe\r\t;'= $(x)\xc3";
    let mut arg = format!("{index}:").into_bytes();
    let rest = HOSTILE_ARG_LEN - arg.len();
    arg.extend(PATTERN.iter().cycle().take(rest));
    OsString::from_vec(arg)
}

fn hostile() -> Result<()> {
    set_comm(HOSTILE_COMM)?;
    let exe = env::current_exe().context("finding this executable")?;
    let child = process::Command::new(&exe)
        .arg("hostile-child")
        .args((0..HOSTILE_ARGS).map(hostile_arg))
        .spawn()
        .with_context(|| format!("running {} hostile-child", exe.display()))?;
    let child_pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    reap(child_pid)?;
    print_truth(&Hostile {
        parent_pid: process::id(),
        child_pid: to_u32(child_pid)?,
    })
}

fn hostile_child(args: &[OsString]) -> Result<()> {
    let expected: Vec<OsString> = (0..HOSTILE_ARGS).map(hostile_arg).collect();
    ensure!(
        args == expected.as_slice(),
        "hostile-child got {} arguments of {:?} bytes, not the {HOSTILE_ARGS} of {HOSTILE_ARG_LEN} bytes `hostile` passed",
        args.len(),
        args.iter().map(|a| a.len()).collect::<Vec<_>>()
    );
    set_comm(HOSTILE_COMM)?;
    burn_cpu(50);
    Ok(())
}

/// Sets the calling thread's comm (the process's, in a single-threaded process).
fn set_comm(name: &[u8]) -> Result<()> {
    let name = std::ffi::CString::new(name).context("a comm cannot hold NUL")?;
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (cut at 15 bytes) from a
    // pointer that is valid for the call.
    if unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error()).context("prctl(PR_SET_NAME)");
    }
    Ok(())
}

fn wrap(command: &[OsString]) -> Result<()> {
    let (program, args) = command.split_first().context("no command to wrap")?;
    let child = process::Command::new(program)
        .args(args)
        .spawn()
        .with_context(|| format!("running {}", program.to_string_lossy()))?;
    let child_pid = libc::pid_t::try_from(child.id()).context("pid out of range")?;
    let (status, rusage_cpu_ns) = wait_for(child_pid)?;
    print_truth(&Wrap {
        parent_pid: process::id(),
        child_pid: to_u32(child_pid)?,
        rusage_cpu_ns,
        exit_code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
    })
}

/// Moves the calling process into the cgroup v2 directory `path`.
fn move_into_cgroup(path: &Path) -> Result<()> {
    let pid = process::id();
    let procs = path.join("cgroup.procs");
    fs::write(&procs, format!("{pid}\n"))
        .with_context(|| format!("moving pid {pid} into {}", procs.display()))
}

/// Writes exactly `total` bytes of non-zero data in CHUNK-sized calls; returns the sum
/// of what the calls accepted (= `total`).
fn write_counting(out: &mut impl Write, total: u64) -> Result<u64> {
    let data = [0x5a_u8; CHUNK];
    let mut written = 0u64;
    while written < total {
        let n = usize::try_from(total - written).map_or(CHUNK, |left| left.min(CHUNK));
        match out.write(&data[..n]) {
            Ok(0) => bail!("write accepted nothing after {written} bytes"),
            Ok(n) => written += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("write after {written} bytes")),
        }
    }
    Ok(written)
}

/// Reads until EOF, or until `limit` bytes; returns the sum of what the calls returned.
fn read_counting(input: &mut impl Read, limit: Option<u64>) -> Result<u64> {
    let mut buffer = [0u8; CHUNK];
    let mut read = 0u64;
    loop {
        let want = match limit {
            Some(limit) if read >= limit => return Ok(read),
            Some(limit) => usize::try_from(limit - read).map_or(CHUNK, |left| left.min(CHUNK)),
            None => CHUNK,
        };
        match input.read(&mut buffer[..want]) {
            Ok(0) => return Ok(read),
            Ok(n) => read += n as u64,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).with_context(|| format!("read after {read} bytes")),
        }
    }
}

/// A pipe, (read end, write end): how a forked child reports its counts to the parent.
fn pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error()).context("pipe2");
    }
    // SAFETY: pipe2 just opened both descriptors, and nothing else owns them.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

fn send_counts(pipe: &mut File, counts: &[u64]) -> Result<()> {
    let bytes: Vec<u8> = counts.iter().flat_map(|c| c.to_le_bytes()).collect();
    pipe.write_all(&bytes)
        .context("reporting counts to the parent")
}

/// Reads the N counts child `pid` reports; if it exits without, says how it ended.
///
/// Only the child holds the pipe's write end (the parent's copy went with the closure
/// `fork_try` consumed), so a child that dies early gives EOF rather than a hang.
fn receive_counts<const N: usize>(
    pipe: &mut File,
    pid: libc::pid_t,
    what: &str,
) -> Result<[u64; N]> {
    let mut bytes = vec![0u8; 8 * N];
    if let Err(e) = pipe.read_exact(&mut bytes) {
        let ended = match reap(pid) {
            Ok(_) => "it exited 0".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        bail!("the {what} (pid {pid}) ended without reporting its counts ({e}): {ended}");
    }
    let mut counts = [0u64; N];
    for (count, le) in counts.iter_mut().zip(bytes.chunks_exact(8)) {
        *count = u64::from_le_bytes(le.try_into().context("a count is 8 bytes")?);
    }
    Ok(counts)
}

/// [`fork_child`] for a body that can fail: the error goes to stderr, the child exits 1.
fn fork_try(body: impl FnOnce() -> Result<()>) -> Result<libc::pid_t> {
    fork_child(|| {
        if let Err(e) = body() {
            eprintln!("workload child {}: {e:#}", process::id());
            // SAFETY: as in run_child: leave without the parent's destructors.
            unsafe { libc::_exit(1) }
        }
    })
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
    let (status, cpu_ns) = wait_for(pid)?;
    ensure!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child {pid} did not exit cleanly (wait status {status:#x})"
    );
    Ok(cpu_ns)
}

/// Reaps `pid`: its wait status and its CPU time (with its reaped descendants') from `wait4`.
fn wait_for(pid: libc::pid_t) -> Result<(libc::c_int, u64)> {
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
    Ok((status, rusage_ns(&usage)))
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
