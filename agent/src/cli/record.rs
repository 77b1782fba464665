//! `mentat-agent record`: meter the node for a duration, or one command and
//! all its descendants (like `perf stat -- CMD`), then print the records.

use std::{
    ffi::OsString,
    fs::File,
    io::{self, IsTerminal, Write},
    path::PathBuf,
    process::Command,
    sync::atomic::{AtomicBool, AtomicI32, Ordering},
    thread,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use crate::{
    cli::output::{Format, write_report},
    collect::{
        Collector,
        gpu::{GpuConfig, GpuMeter},
        storage::StorageMeter,
    },
    identity::pods::{PodDirectory, PodSource},
    probes::{ProbeConfig, ProbeError, Probes},
    report::{GroupBy, WindowSum, descendants},
};

/// What to record and how to print it.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    /// Whole-node recording length (ignored with a command).
    pub duration: Duration,
    /// Output format; `None`: table on a terminal, JSON lines otherwise.
    pub format: Option<Format>,
    /// Where the records go (`None`: stdout).
    pub output: Option<PathBuf>,
    /// With a command: print every process on the node, not just the command's tree.
    pub all: bool,
    /// Sum the records by these keys instead of printing one per process.
    pub group_by: Vec<GroupBy>,
    /// How often a window is closed while recording (keeps kernel maps small).
    pub tick: Duration,
    /// How often memory and disk are sampled.
    pub sample: Duration,
    /// Probe settings.
    pub probes: ProbeConfig,
    /// Where pod names come from.
    pub pods: PodSource,
    /// The node's name in records.
    pub node: String,
    /// NVML library path (`None`: the system's, as the dynamic loader finds it).
    pub gpu_library: Option<PathBuf>,
    /// The command to meter, if any.
    pub command: Vec<OsString>,
}

/// Why `record` failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The probes could not be loaded or read.
    #[error(transparent)]
    Probe(#[from] ProbeError),
    /// The output file could not be created or written.
    #[error("writing records to {path}: {source}")]
    Output {
        /// The file, or "stdout".
        path: String,
        /// What went wrong.
        source: io::Error,
    },
}

/// How often lifecycle events are drained and children reaped.
const POLL: Duration = Duration::from_millis(20);

static STOP: AtomicBool = AtomicBool::new(false);
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(child, sig) };
    }
}

fn install_signal_handlers(with_command: bool) {
    // SAFETY: the handler only touches atomics and calls kill.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        if with_command {
            // The terminal sends SIGINT to the whole foreground group: the
            // command decides what it means, and we report when it is done.
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        } else {
            libc::signal(
                libc::SIGINT,
                on_stop_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }
}

/// Runs `record`; returns the exit code to exit with (the command's, or 0).
pub fn run(opts: &RecordOptions) -> Result<i32, RecordError> {
    let probes = Probes::load(&opts.probes)?;
    let pods = PodDirectory::start(opts.pods.clone(), &opts.node, Duration::from_secs(5));
    let mut collector = Collector::new(probes, opts.sample)
        .with_pods(pods)
        .with_storage(StorageMeter::start(Duration::from_secs(2)));
    // No NVML: records carry no GPU usage, as on any node without a driver.
    let gpu = GpuConfig {
        library_path: opts.gpu_library.clone(),
        ..GpuConfig::default()
    };
    match GpuMeter::open(&gpu) {
        Ok(gpu) => {
            info!(devices = gpu.devices().len(), "GPU metering on (NVML)");
            collector = collector.with_gpu(gpu);
        }
        // Asked for by name: say why it is not used.
        Err(e) if opts.gpu_library.is_some() => warn!(reason = %e, "GPU metering off"),
        Err(e) => debug!(reason = %e, "GPU metering off"),
    }
    // Everything charged before this point predates the recording (and the GPU
    // meter's first reading only sets its baselines).
    collector.close_window()?;

    let mut span = WindowSum::default();
    let mut next_tick = Instant::now() + opts.tick;
    let (root, exit_code) = if let Some((prog, args)) = opts.command.split_first() {
        let (pid, code) = run_command(prog, args, opts, &mut collector, &mut span, &mut next_tick)?;
        (pid, Some(code))
    } else {
        install_signal_handlers(false);
        let deadline = Instant::now() + opts.duration;
        info!(duration = ?opts.duration, "recording the whole node");
        while Instant::now() < deadline && !STOP.load(Ordering::SeqCst) {
            thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
            collector.poll();
            if Instant::now() >= next_tick {
                span.add(&collector.close_window()?);
                next_tick += opts.tick;
            }
        }
        (None, None)
    };
    span.add(&collector.close_last_window()?);

    let root_instance = root.and_then(|pid| {
        collector.live_instance(pid).map(|s| (pid, s)).or_else(|| {
            span.instances()
                .find(|k| k.tgid == pid)
                .map(|k| (k.tgid, k.start_ns))
        })
    });
    let tree = match (root, root_instance) {
        (Some(_), Some(r)) if !opts.all => Some(descendants(&collector, r, span.instances())),
        (Some(pid), None) if !opts.all => {
            debug!(pid, "the command's process left no usage and no events");
            Some(Default::default())
        }
        _ => None,
    };
    let report = span.report(
        &opts.node,
        |k| {
            tree.as_ref()
                .is_none_or(|t| t.contains(&(k.tgid, k.start_ns)))
        },
        &opts.group_by,
        None,
        exit_code,
    );
    write_output(opts, &report)?;
    Ok(exit_code.unwrap_or(0))
}

/// Spawns the command and waits for it and every descendant, closing
/// windows on the way. Returns the command's pid (`None` if it could not
/// start) and exit code.
fn run_command(
    prog: &OsString,
    args: &[OsString],
    opts: &RecordOptions,
    collector: &mut Collector,
    span: &mut WindowSum,
    next_tick: &mut Instant,
) -> Result<(Option<u32>, i32), RecordError> {
    // Orphaned descendants are reparented to us, so waiting until we have no
    // children left means the whole tree has exited.
    // SAFETY: prctl with these arguments only sets a flag on this process.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let child = match Command::new(prog).args(args).spawn() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mentat-agent: cannot run {}: {e}", prog.to_string_lossy());
            // The shell convention: 127 not found, 126 not executable.
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            return Ok((None, code));
        }
    };
    let pid = child.id();
    CHILD.store(i32::try_from(pid).unwrap_or(0), Ordering::SeqCst);
    install_signal_handlers(true);
    // We reap with waitpid(-1) below, which also collects orphans; the Child
    // handle is not used again.
    drop(child);

    let mut exit_code = None;
    loop {
        thread::sleep(POLL);
        collector.poll();
        let (reaped, none_left) = reap_exited();
        if let Some(&(_, code)) = reaped.iter().find(|(p, _)| *p == pid) {
            exit_code = Some(code);
        }
        if none_left {
            break;
        }
        if Instant::now() >= *next_tick {
            span.add(&collector.close_window()?);
            *next_tick += opts.tick;
        }
    }
    CHILD.store(0, Ordering::SeqCst);
    Ok((Some(pid), exit_code.unwrap_or(0)))
}

/// Reaps every child that has exited: (pid, exit code) for each, and
/// whether no children are left at all.
fn reap_exited() -> (Vec<(u32, i32)>, bool) {
    let mut reaped = Vec::new();
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status int we pass.
        let r = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if r > 0 {
            reaped.push((r as u32, exit_code_of(status)));
            continue;
        }
        let none_left = r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD);
        return (reaped, none_left);
    }
}

/// A shell-style exit code: the status, or 128 + the signal that killed it.
fn exit_code_of(status: i32) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        1
    }
}

fn write_output(opts: &RecordOptions, report: &crate::report::Report) -> Result<(), RecordError> {
    let (mut sink, name, terminal): (Box<dyn Write>, String, bool) = match &opts.output {
        Some(path) => {
            let f = File::create(path).map_err(|source| RecordError::Output {
                path: path.display().to_string(),
                source,
            })?;
            (
                Box::new(io::BufWriter::new(f)),
                path.display().to_string(),
                false,
            )
        }
        None => (
            Box::new(io::BufWriter::new(io::stdout().lock())),
            "stdout".to_string(),
            io::stdout().is_terminal(),
        ),
    };
    let format = opts.format.unwrap_or(if terminal {
        Format::Table
    } else {
        Format::Jsonl
    });
    write_report(&mut *sink, format, report)
        .and_then(|()| sink.flush())
        .map_err(|source| RecordError::Output { path: name, source })
}
