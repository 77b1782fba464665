//! `/proc` readers: the `procfs` crate against the agent's hand-written readers, in the
//! same run, on the same files of the same live processes.
//!
//! Decides whether the agent should switch to `procfs` (BENCHMARKS.md, "/proc readers").
//! It starts N idle children (`sleep`), then, round after round, reads for each of them
//! `status` (VmRSS, VmHWM), `io` (read_bytes, write_bytes), `statm` (resident pages) and
//! `cgroup` (the v2 path), three ways:
//!
//! - `agent`: what the agent does today: `fs::read_to_string` of a joined path, then its
//!   own parser (`memory::parse_status_memory`, `memory::parse_io`, the `0::` line of
//!   `collect.rs`); `sample` is `memory::read_sample` whole (status + io);
//! - `reused`: the same parsers over one `String` buffer reused for every read, the
//!   single-read, reused-buffer shape the cost work wants;
//! - `procfs`: `procfs::process::Process::new(pid)` and its `status()`, `io()`, `statm()`,
//!   `cgroups()` (a new `Process` per read, as pids come and go between ticks).
//!
//! Figures are ns per read (the median over rounds of the mean over all children) and heap
//! allocations per read, counted by a global allocator wrapper. Before timing, every way's
//! values are checked equal on every child, so all three do the same work.
//!
//! Run: `cargo bench -p mentat-tests --bench proc_readers [-- --procs N --rounds R]`
//! (no root needed: the children are this user's own).

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::hint::black_box;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use mentat_agent::collect::memory::{parse_io, parse_status_memory, read_sample};
use procfs::process::Process;

/// Counts every allocation, so a way's allocations per read can be reported.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards to the system allocator unchanged; the counter is a relaxed atomic.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is System's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's contract is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const PROC: &str = "/proc";

/// The values one reader returns for one child; equal across ways.
#[derive(Debug, PartialEq, Eq)]
enum Value {
    Memory(u64, u64),
    Io(u64, u64),
    Resident(u64),
    Cgroup(String),
    Sample(u64, u64, u64, u64),
}

type Reader = fn(u32, &mut String) -> Option<Value>;

/// (file, way, reader), in the order the report prints them.
const READERS: [(&str, &str, Reader); 14] = [
    ("status", "agent", |pid, _| {
        agent_way(pid, "status", status_value)
    }),
    ("status", "reused", |pid, buf| {
        reused_way(pid, "status", buf, status_value)
    }),
    ("status", "procfs", |pid, _| {
        let s = Process::new(pid as i32).ok()?.status().ok()?;
        Some(Value::Memory(s.vmrss? * 1024, s.vmhwm.unwrap_or(0) * 1024))
    }),
    ("io", "agent", |pid, _| agent_way(pid, "io", io_value)),
    ("io", "reused", |pid, buf| {
        reused_way(pid, "io", buf, io_value)
    }),
    ("io", "procfs", |pid, _| {
        let io = Process::new(pid as i32).ok()?.io().ok()?;
        Some(Value::Io(io.read_bytes, io.write_bytes))
    }),
    // The agent reads no statm today; this is the reader it would write.
    ("statm", "agent", |pid, _| {
        agent_way(pid, "statm", statm_value)
    }),
    ("statm", "reused", |pid, buf| {
        reused_way(pid, "statm", buf, statm_value)
    }),
    ("statm", "procfs", |pid, _| {
        let statm = Process::new(pid as i32).ok()?.statm().ok()?;
        Some(Value::Resident(statm.resident))
    }),
    ("cgroup", "agent", |pid, _| {
        agent_way(pid, "cgroup", cgroup_value)
    }),
    ("cgroup", "reused", |pid, buf| {
        reused_way(pid, "cgroup", buf, cgroup_value)
    }),
    ("cgroup", "procfs", |pid, _| {
        let cgroups = Process::new(pid as i32).ok()?.cgroups().ok()?;
        cgroups
            .into_iter()
            .find(|c| c.hierarchy == 0)
            .map(|c| Value::Cgroup(c.pathname))
    }),
    ("sample", "agent", |pid, _| {
        let s = read_sample(Path::new(PROC), pid)?;
        Some(Value::Sample(
            s.rss_bytes,
            s.hwm_bytes,
            s.read_bytes,
            s.write_bytes,
        ))
    }),
    ("sample", "procfs", |pid, _| {
        let p = Process::new(pid as i32).ok()?;
        let s = p.status().ok()?;
        let io = p.io().ok()?;
        Some(Value::Sample(
            s.vmrss? * 1024,
            s.vmhwm.unwrap_or(0) * 1024,
            io.read_bytes,
            io.write_bytes,
        ))
    }),
];

/// Today's shape: a joined path, a fresh `String` per read, then `parse`.
fn agent_way(pid: u32, file: &str, parse: fn(&str) -> Option<Value>) -> Option<Value> {
    parse(&fs::read_to_string(Path::new(PROC).join(pid.to_string()).join(file)).ok()?)
}

/// The same `parse` over `buf`, reused across reads.
fn reused_way(
    pid: u32,
    file: &str,
    buf: &mut String,
    parse: fn(&str) -> Option<Value>,
) -> Option<Value> {
    read_into(pid, file, buf)?;
    parse(buf)
}

/// The agent's status parser.
fn status_value(text: &str) -> Option<Value> {
    parse_status_memory(text).map(|(rss, hwm)| Value::Memory(rss, hwm))
}

/// The agent's io parser.
fn io_value(text: &str) -> Option<Value> {
    parse_io(text).map(|(r, w)| Value::Io(r, w))
}

/// The statm reader the agent would write (it reads no statm today).
fn statm_value(text: &str) -> Option<Value> {
    statm_resident(text).map(Value::Resident)
}

/// The v2 cgroup line, as the agent reads it.
fn cgroup_value(text: &str) -> Option<Value> {
    cgroup_v2(text).map(Value::Cgroup)
}

/// Reads /proc/<pid>/<file> into `buf` (cleared first), with one open and one read loop.
fn read_into(pid: u32, file: &str, buf: &mut String) -> Option<()> {
    // The path is one small allocation; a stack buffer could avoid it too.
    let mut path = String::new();
    write!(path, "/proc/{pid}/{file}").ok()?;
    buf.clear();
    File::open(&path).ok()?.read_to_string(buf).ok()?;
    Some(())
}

/// Resident pages: the second field of /proc/<pid>/statm.
fn statm_resident(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The v2 path of /proc/<pid>/cgroup (`0::/path`), as `collect.rs` reads it.
fn cgroup_v2(text: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

/// Idle children, killed and reaped when dropped.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn main() -> Result<()> {
    let (mut procs, mut rounds) = (64usize, 20usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--procs" => procs = args.next().context("--procs N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds R")?.parse()?,
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => bail!("unknown argument {other:?}: expected --procs N, --rounds R"),
        }
    }
    ensure!(
        procs > 0 && rounds > 0,
        "--procs and --rounds must be positive"
    );
    let children = Children(
        (0..procs)
            .map(|_| {
                Command::new("sleep")
                    .arg("600")
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting `sleep 600`")
            })
            .collect::<Result<_>>()?,
    );
    let pids: Vec<u32> = children.0.iter().map(Child::id).collect();
    let mut buf = String::new();

    // The three ways agree on every child, so they do the same work.
    for file in ["status", "io", "statm", "cgroup", "sample"] {
        let ways: Vec<_> = READERS.iter().filter(|r| r.0 == file).collect();
        for &pid in &pids {
            let want = (ways[0].2)(pid, &mut buf)
                .with_context(|| format!("{file} of pid {pid}: the agent's reader failed"))?;
            for w in &ways[1..] {
                let got = (w.2)(pid, &mut buf);
                ensure!(
                    got.as_ref() == Some(&want),
                    "{file} of pid {pid}: {} read {got:?}, the agent {want:?}",
                    w.1
                );
            }
        }
    }

    // ns per read and allocations per read, per reader, per round.
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); READERS.len()];
    let mut allocs = vec![0u64; READERS.len()];
    for _ in 0..rounds {
        // Interleaved, so drift on a shared machine hits every reader alike.
        for (i, &(_, _, read)) in READERS.iter().enumerate() {
            let a0 = ALLOCATIONS.load(Ordering::Relaxed);
            let t = Instant::now();
            for &pid in &pids {
                black_box(read(black_box(pid), &mut buf));
            }
            let elapsed = t.elapsed();
            allocs[i] = ALLOCATIONS.load(Ordering::Relaxed) - a0;
            ns[i].push(elapsed.as_nanos() as f64 / pids.len() as f64);
        }
    }
    drop(children);

    println!(
        "proc_readers: {procs} live processes, {rounds} rounds; ns per read (median over \
         rounds [min, max]), heap allocations per read"
    );
    println!(
        "{:<8} {:<7} {:>10} {:>22} {:>7} {:>9}",
        "file", "way", "ns/read", "[min, max]", "allocs", "vs agent"
    );
    let mut agent_ns = 0.0;
    for (i, &(file, way, _)) in READERS.iter().enumerate() {
        let v = &mut ns[i];
        v.sort_by(f64::total_cmp);
        let median = v[v.len() / 2];
        if way == "agent" {
            agent_ns = median;
        }
        println!(
            "{file:<8} {way:<7} {median:>10.0} {:>22} {:>7.1} {:>8.2}x",
            format!("[{:.0}, {:.0}]", v[0], v[v.len() - 1]),
            allocs[i] as f64 / pids.len() as f64,
            median / agent_ns
        );
    }
    Ok(())
}
