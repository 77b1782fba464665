//! Memory GB-seconds and disk bytes per process instance, from procfs samples.
//!
//! Resident memory has no cheap kernel event to count (RSS changes on every
//! page fault), so it is sampled and integrated over time with the
//! trapezoid rule, from the process's start (RSS 0) to its exit. Disk bytes
//! are `/proc/<pid>/io` `read_bytes` / `write_bytes` deltas between samples
//! (bytes the process caused to be read from or written to storage, page
//! cache writeback included), completed at exit from the totals the exit
//! event carries, so I/O after the last sample is not lost.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use crate::identity::process::ProcReader;

/// One sample of a live process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcSample {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size so far (VmHWM), bytes.
    pub hwm_bytes: u64,
    /// Cumulative storage bytes read.
    pub read_bytes: u64,
    /// Cumulative storage bytes written.
    pub write_bytes: u64,
}

/// Parses `/proc/<pid>/status` for VmRSS and VmHWM (kB in the file).
pub fn parse_status_memory(status: &str) -> Option<(u64, u64)> {
    let kb = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n * 1024)
    };
    // Kernel threads have no VmRSS line: they hold no user memory.
    Some((kb("VmRSS:")?, kb("VmHWM:").unwrap_or(0)))
}

/// Parses `/proc/<pid>/io` for read_bytes and write_bytes.
pub fn parse_io(io: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        io.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    Some((field("read_bytes:")?, field("write_bytes:")?))
}

/// Parses `/proc/<pid>/statm` for the resident set, in bytes (the second
/// field, in pages). Kernel threads show all zeros: they hold no user memory.
pub fn parse_statm(statm: &str, page_size: u64) -> Option<u64> {
    let mut fields = statm.split_ascii_whitespace();
    let size: u64 = fields.next()?.parse().ok()?;
    let pages: u64 = fields.next()?.parse().ok()?;
    // No address space at all: a kernel thread (status has no VmRSS line for it).
    (size > 0).then(|| pages.saturating_mul(page_size))
}

/// The system page size in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// Samples one process through `reader`: `statm` (the cheapest file with the
/// resident set) and `io`, or with `peak`, `status` (which also has VmHWM,
/// but costs the kernel ~2.5× as much to generate) and `io`. `None` if the
/// process is gone or unreadable.
pub fn sample_with(
    reader: &mut ProcReader,
    pid: u32,
    peak: bool,
    page_size: u64,
) -> Option<ProcSample> {
    let (rss_bytes, hwm_bytes) = if peak {
        parse_status_memory(reader.read_str(pid, "status")?)?
    } else {
        (parse_statm(reader.read_str(pid, "statm")?, page_size)?, 0)
    };
    // /proc/<pid>/io needs ptrace-read access; without it, memory still counts.
    let (read_bytes, write_bytes) = reader
        .read_str(pid, "io")
        .and_then(parse_io)
        .unwrap_or((0, 0));
    Some(ProcSample {
        rss_bytes,
        hwm_bytes,
        read_bytes,
        write_bytes,
    })
}

/// Samples one process from `status` (RSS and peak) and `io`, with a buffer of
/// its own; `None` if it is gone, a kernel thread, or unreadable. The
/// collector reuses one [`ProcReader`] through [`sample_with`] instead.
pub fn read_sample(proc_root: &Path, pid: u32) -> Option<ProcSample> {
    sample_with(&mut ProcReader::new(proc_root), pid, true, page_size())
}

/// Memory and disk usage accumulated for one instance since the last take.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemDisk {
    /// ∫ RSS dt, in byte-nanoseconds (exact integer; GB-s at presentation).
    pub rss_byte_ns: u128,
    /// Largest VmHWM seen, bytes.
    pub peak_rss_bytes: u64,
    /// Storage bytes read.
    pub disk_read_bytes: u64,
    /// Storage bytes written.
    pub disk_write_bytes: u64,
}

impl MemDisk {
    /// Adds another amount (peaks take the maximum).
    pub fn add(&mut self, o: &MemDisk) {
        self.rss_byte_ns += o.rss_byte_ns;
        self.peak_rss_bytes = self.peak_rss_bytes.max(o.peak_rss_bytes);
        self.disk_read_bytes += o.disk_read_bytes;
        self.disk_write_bytes += o.disk_write_bytes;
    }
}

#[derive(Clone, Copy, Debug)]
struct Last {
    /// Integrated up to here.
    at_ns: u64,
    /// When `sample` was read from procfs.
    read_ns: u64,
    sample: ProcSample,
    /// `sample` was a `status` reading (its VmHWM is current, not carried).
    peak_fresh: bool,
}

/// Integrates samples per process instance `(tgid, start_ns)`.
///
/// A process's `/proc/<pid>/io` also grows by the totals of every child it
/// reaps (the kernel folds them in at `wait`). Those bytes are the child's,
/// already counted from the child's own exit totals, so each reaped child's
/// totals become a debit against its parent's next deltas. The debit is
/// applied when the parent's counters grow, which is when the reap has
/// happened: the parent's lifetime total is exact, though a debit can meet
/// the parent's own I/O first when it reaps late (then its own bytes show
/// up one sample later).
#[derive(Debug, Default)]
pub struct Integrator {
    last: HashMap<(u32, u64), Last>,
    pending: HashMap<(u32, u64), MemDisk>,
    /// Reaped children's (read, write) bytes not yet taken off the parent.
    debit: HashMap<(u32, u64), (u64, u64)>,
}

impl Integrator {
    /// Records a sample of instance `(tgid, start_ns)` taken at `now_ns`.
    ///
    /// `born_metered`: the instance was born after metering began, so it had
    /// no memory and no I/O before its first sample; any other is integrated
    /// from its first sample, and its I/O before it is not ours.
    pub fn sample(
        &mut self,
        tgid: u32,
        start_ns: u64,
        now_ns: u64,
        s: ProcSample,
        born_metered: bool,
    ) {
        let key = (tgid, start_ns);
        let peak_fresh = s.hwm_bytes != 0;
        // A statm sample has no VmHWM: the last status reading's still holds.
        let s = match self.last.get(&key) {
            Some(prev) if s.hwm_bytes == 0 => ProcSample {
                hwm_bytes: prev.sample.hwm_bytes,
                ..s
            },
            _ => s,
        };
        let acc = self.pending.entry(key).or_default();
        acc.peak_rss_bytes = acc.peak_rss_bytes.max(s.hwm_bytes).max(s.rss_bytes);
        match self.last.get(&key) {
            Some(prev) => {
                let dt = u128::from(now_ns.saturating_sub(prev.at_ns));
                acc.rss_byte_ns += dt * u128::from(prev.sample.rss_bytes + s.rss_bytes) / 2;
                let io = (
                    s.read_bytes.saturating_sub(prev.sample.read_bytes),
                    s.write_bytes.saturating_sub(prev.sample.write_bytes),
                );
                add_io(acc, own_io(&mut self.debit, key, io));
            }
            None if born_metered => {
                // Born while metered: it had no memory and no I/O at start.
                let dt = u128::from(now_ns.saturating_sub(start_ns));
                acc.rss_byte_ns += dt * u128::from(s.rss_bytes) / 2;
                let io = (s.read_bytes, s.write_bytes);
                add_io(acc, own_io(&mut self.debit, key, io));
            }
            None => {}
        }
        self.last.insert(
            key,
            Last {
                at_ns: now_ns,
                read_ns: now_ns,
                sample: s,
                peak_fresh,
            },
        );
    }

    /// Carries every instance not sampled at `now_ns` forward to it at its
    /// last resident set: a process that did not run cannot have grown, so
    /// ∫ RSS dt is its last RSS × the time since (what a sample would add
    /// when the RSS is unchanged), without a procfs read.
    pub fn carry(&mut self, now_ns: u64) {
        self.carry_all(now_ns);
    }

    /// Takes what is due at `now_ns`: every instance with something
    /// accumulated since the last take (sampled or exited), every instance
    /// in `ran`, and with `all`, every instance; each carried to `now_ns`
    /// first (see [`Integrator::carry`]). Instances not due keep
    /// accumulating: their memory since their last take is taken, whole,
    /// when they are next due. Without `all` the work is proportional to
    /// what is due, not to the instances tracked (issue 13).
    pub fn take_due<'a>(
        &mut self,
        now_ns: u64,
        ran: impl IntoIterator<Item = &'a (u32, u64)>,
        all: bool,
    ) -> HashMap<(u32, u64), MemDisk> {
        if all {
            self.carry_all(now_ns);
        } else {
            let mut due: Vec<(u32, u64)> = self.pending.keys().copied().collect();
            due.extend(ran.into_iter().copied());
            for key in due {
                if let Some(last) = self.last.get_mut(&key) {
                    carry_one(&mut self.pending, key, last, now_ns);
                }
            }
        }
        self.take()
    }

    /// Carries every instance to `now_ns`.
    fn carry_all(&mut self, now_ns: u64) {
        for (key, last) in &mut self.last {
            carry_one(&mut self.pending, *key, last, now_ns);
        }
    }

    /// Whether the last reading of `key` had its peak (VmHWM from `status`):
    /// false when a `statm` reading came since, which carries the older peak.
    pub fn peak_fresh(&self, key: (u32, u64)) -> bool {
        self.last.get(&key).is_some_and(|l| l.peak_fresh)
    }

    /// When instance `key` was last read from procfs, if it is being integrated.
    pub fn read_at(&self, key: (u32, u64)) -> Option<u64> {
        self.last.get(&key).map(|l| l.read_ns)
    }

    /// Whether instance `key` is being integrated or has usage not yet taken.
    pub fn knows(&self, key: (u32, u64)) -> bool {
        self.last.contains_key(&key) || self.pending.contains_key(&key)
    }

    /// Instances being integrated (alive at their last reading).
    pub fn tracked(&self) -> usize {
        self.last.len()
    }

    /// Completes an instance at its exit: memory held until `exit_ns`, and the
    /// I/O since the last sample from the exit event's totals.
    pub fn exit(
        &mut self,
        tgid: u32,
        start_ns: u64,
        exit_ns: u64,
        read_total: u64,
        write_total: u64,
        born_metered: bool,
    ) {
        let key = (tgid, start_ns);
        let prev = self.last.remove(&key);
        let acc = self.pending.entry(key).or_default();
        match prev {
            Some(prev) => {
                let dt = u128::from(exit_ns.saturating_sub(prev.at_ns));
                acc.rss_byte_ns += dt * u128::from(prev.sample.rss_bytes);
                let io = (
                    read_total.saturating_sub(prev.sample.read_bytes),
                    write_total.saturating_sub(prev.sample.write_bytes),
                );
                add_io(acc, own_io(&mut self.debit, key, io));
            }
            // Never sampled: too short-lived to see its memory; its I/O is all
            // in the exit totals, if it was born while metered.
            None if born_metered => {
                add_io(acc, own_io(&mut self.debit, key, (read_total, write_total)));
            }
            None => {}
        }
        self.debit.remove(&key);
    }

    /// Notes that `parent` will reap a child whose exit totals were
    /// (`read_total`, `write_total`): its counters will grow by them.
    pub fn child_exited(&mut self, parent: (u32, u64), read_total: u64, write_total: u64) {
        if read_total == 0 && write_total == 0 {
            return;
        }
        let d = self.debit.entry(parent).or_default();
        d.0 += read_total;
        d.1 += write_total;
    }

    /// Takes everything accumulated since the last take.
    pub fn take(&mut self) -> HashMap<(u32, u64), MemDisk> {
        std::mem::take(&mut self.pending)
    }

    /// Forgets instances not read since `before_ns` (gone without an exit event).
    pub fn forget_stale(&mut self, before_ns: u64) {
        self.last.retain(|_, l| l.read_ns >= before_ns);
        let last = &self.last;
        self.debit.retain(|k, _| last.contains_key(k));
    }
}

/// What a process's counters grew by, less the reaped children's bytes it
/// still owes: what the process itself read and wrote.
fn own_io(
    debit: &mut HashMap<(u32, u64), (u64, u64)>,
    key: (u32, u64),
    io: (u64, u64),
) -> (u64, u64) {
    let Some(d) = debit.get_mut(&key) else {
        return io;
    };
    let taken = (io.0.min(d.0), io.1.min(d.1));
    d.0 -= taken.0;
    d.1 -= taken.1;
    (io.0 - taken.0, io.1 - taken.1)
}

/// Carries one instance to `now_ns` at its last resident set (nothing when
/// it is integrated that far already).
fn carry_one(
    pending: &mut HashMap<(u32, u64), MemDisk>,
    key: (u32, u64),
    last: &mut Last,
    now_ns: u64,
) {
    if last.at_ns >= now_ns {
        return;
    }
    let acc = pending.entry(key).or_default();
    let dt = u128::from(now_ns - last.at_ns);
    acc.rss_byte_ns += dt * u128::from(last.sample.rss_bytes);
    acc.peak_rss_bytes = acc
        .peak_rss_bytes
        .max(last.sample.hwm_bytes)
        .max(last.sample.rss_bytes);
    last.at_ns = now_ns;
}

fn add_io(acc: &mut MemDisk, (read, write): (u64, u64)) {
    acc.disk_read_bytes += read;
    acc.disk_write_bytes += write;
}

/// Integrates cgroup memory counters (`memory.current` on v2,
/// `memory.usage_in_bytes` on v1) per counter file.
///
/// Keyed by the file, not the v2 cgroup: on a hybrid host several v2
/// cgroups can share one v1 memory cgroup, and its memory must count once.
/// The counter includes page cache and kernel memory charged to the cgroup,
/// which per-process RSS does not: it is what the cgroup's limit enforces.
#[derive(Debug, Default)]
pub struct CgroupIntegrator {
    last: HashMap<PathBuf, (u64, u64)>,
    pending: HashMap<PathBuf, u128>,
}

impl CgroupIntegrator {
    /// Reads `counter` at `now_ns` and integrates since its last read.
    pub fn sample(&mut self, counter: &Path, now_ns: u64) {
        let Some(bytes) = fs::read_to_string(counter)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
        else {
            self.last.remove(counter);
            return;
        };
        if let Some(&(at, prev)) = self.last.get(counter) {
            let dt = u128::from(now_ns.saturating_sub(at));
            *self.pending.entry(counter.to_path_buf()).or_default() +=
                dt * u128::from(prev + bytes) / 2;
        }
        self.last.insert(counter.to_path_buf(), (now_ns, bytes));
    }

    /// Takes what was integrated since the last take, per counter file.
    pub fn take(&mut self) -> HashMap<PathBuf, u128> {
        std::mem::take(&mut self.pending)
    }

    /// Forgets counters not read since `before_ns` (their cgroup is gone or idle).
    pub fn forget_stale(&mut self, before_ns: u64) {
        self.last.retain(|_, (at, _)| *at >= before_ns);
    }
}

/// The memory counter file for cgroup v2 path `v2_rel` (relative to
/// `v2_root`) of process `pid`: `memory.current` where the v2 memory
/// controller is on, else the v1 memory cgroup's `memory.usage_in_bytes`.
pub fn cgroup_memory_counter(
    v2_root: &Path,
    v2_rel: &str,
    v1_memory_root: Option<&Path>,
    proc_root: &Path,
    pid: u32,
) -> Option<PathBuf> {
    let v2 = v2_root
        .join(v2_rel.trim_start_matches('/'))
        .join("memory.current");
    if v2.is_file() {
        return Some(v2);
    }
    let v1_root = v1_memory_root?;
    let cgroups = fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup")).ok()?;
    // v1 lines are "N:controller[,controller...]:/path".
    let rel = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })?;
    let file = v1_root
        .join(rel.trim_start_matches('/'))
        .join("memory.usage_in_bytes");
    // The v1 root's counter is the whole machine, not a workload.
    (rel != "/" && file.is_file()).then_some(file)
}

/// Finds the v1 memory controller's mount in mountinfo content.
pub fn find_v1_memory_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut post = post.split_whitespace();
        if post.next()? != "cgroup" {
            return None;
        }
        let options = post.nth(1)?;
        options
            .split(',')
            .any(|o| o == "memory")
            .then(|| PathBuf::from(pre.split_whitespace().nth(4).unwrap_or_default()))
    })
}

/// Converts byte-nanoseconds to GiB-seconds (the pricing unit: 1 GB = 1024³ bytes).
pub fn gib_seconds(byte_ns: u128) -> f64 {
    byte_ns as f64 / (1024.0 * 1024.0 * 1024.0) / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;
    const S: u64 = 1_000_000_000;

    fn mem(rss: u64) -> ProcSample {
        ProcSample {
            rss_bytes: rss,
            hwm_bytes: rss,
            ..Default::default()
        }
    }

    #[test]
    fn statm_gives_resident_pages_and_none_for_kernel_threads() {
        assert_eq!(
            parse_statm("2000 300 100 10 0 500 0\n", 4096),
            Some(300 * 4096)
        );
        assert_eq!(parse_statm("0 0 0 0 0 0 0\n", 4096), None);
        assert_eq!(parse_statm("12", 4096), None);
        assert_eq!(parse_statm("x y", 4096), None);
        let me = std::process::id();
        let mut r = ProcReader::new(Path::new("/proc"));
        let fast = sample_with(&mut r, me, false, page_size()).expect("own statm");
        let full = sample_with(&mut r, me, true, page_size()).expect("own status");
        assert!(fast.rss_bytes > 0 && fast.hwm_bytes == 0);
        assert!(full.hwm_bytes >= full.rss_bytes.min(fast.rss_bytes));
    }

    #[test]
    fn the_sweep_reads_the_peak_again_only_after_a_statm_reading() {
        let mut i = Integrator::default();
        let statm = |rss| ProcSample {
            rss_bytes: rss,
            hwm_bytes: 0,
            ..Default::default()
        };
        assert!(!i.peak_fresh((1, 0)), "never read: its peak is wanted");
        i.sample(1, 0, S, statm(GIB), true);
        assert!(!i.peak_fresh((1, 0)), "statm has no peak");
        i.sample(
            1,
            0,
            2 * S,
            ProcSample {
                rss_bytes: GIB,
                hwm_bytes: 3 * GIB,
                ..Default::default()
            },
            true,
        );
        assert!(i.peak_fresh((1, 0)), "a status reading is current");
        // It ran and was read with statm: the peak held is carried, not current.
        i.sample(1, 0, 3 * S, statm(GIB), true);
        assert!(!i.peak_fresh((1, 0)));
        assert_eq!(i.take()[&(1, 0)].peak_rss_bytes, 3 * GIB);
    }

    #[test]
    fn take_due_carries_only_what_is_due() {
        let mut i = Integrator::default();
        i.sample(1, 0, S, mem(GIB), true);
        i.sample(2, 0, S, mem(GIB), true);
        i.take();
        // 2 ran; 1 did not: it stays at its last reading, taken whole later.
        let due = i.take_due(3 * S, &[(2, 0)], false);
        assert_eq!(due.keys().collect::<Vec<_>>(), vec![&(2, 0)]);
        assert!((gib_seconds(due[&(2, 0)].rss_byte_ns) - 2.0).abs() < 1e-9);
        let due = i.take_due(4 * S, &[(1, 0)], false);
        assert!((gib_seconds(due[&(1, 0)].rss_byte_ns) - 3.0).abs() < 1e-9);
        // With `all`, every instance.
        let due = i.take_due(5 * S, &[], true);
        assert_eq!(due.len(), 2);
    }

    #[test]
    fn an_idle_process_is_carried_at_its_last_rss() {
        let mut i = Integrator::default();
        // Born at 0, read at 1 s with 1 GiB, then idle: carried to 3 s, read
        // again at 4 s (unchanged), exits at 5 s.
        i.sample(1, 0, S, mem(GIB), true);
        i.carry(2 * S);
        i.carry(3 * S);
        assert_eq!(i.read_at((1, 0)), Some(S), "a carry is not a reading");
        i.sample(1, 0, 4 * S, mem(GIB), true);
        i.exit(1, 0, 5 * S, 0, 0, true);
        let got = i.take()[&(1, 0)];
        // 0.5 (ramp) + 4 × 1 GiB·s.
        assert!((gib_seconds(got.rss_byte_ns) - 4.5).abs() < 1e-9, "{got:?}");
        // Only what is due is taken; the rest is taken whole later.
        i.sample(3, 0, S, mem(GIB), true);
        i.take();
        let due = i.take_due(3 * S, &[(9, 0)], false);
        assert!(due.is_empty(), "{due:?}");
        let due = i.take_due(5 * S, &[(3, 0)], false);
        assert!(
            (gib_seconds(due[&(3, 0)].rss_byte_ns) - 4.0).abs() < 1e-9,
            "{due:?}"
        );
        // A process not read since the cut-off is forgotten, carried or not.
        i.sample(2, 0, S, mem(GIB), true);
        i.carry(10 * S);
        i.forget_stale(2 * S);
        assert_eq!(i.tracked(), 0);
    }

    #[test]
    fn constant_rss_integrates_to_rss_times_time() {
        let mut i = Integrator::default();
        // Born at 10 s with 1 GiB at once; sampled each second; exits at 14 s.
        i.sample(1, 10 * S, 11 * S, mem(GIB), true);
        i.sample(1, 10 * S, 12 * S, mem(GIB), true);
        i.sample(1, 10 * S, 13 * S, mem(GIB), true);
        i.exit(1, 10 * S, 14 * S, 0, 0, true);
        let got = i.take()[&(1, 10 * S)];
        // The first second is a ramp from 0 (trapezoid): 0.5 + 1 + 1 + 1.
        assert!((gib_seconds(got.rss_byte_ns) - 3.5).abs() < 1e-9, "{got:?}");
        assert_eq!(got.peak_rss_bytes, GIB);
    }

    #[test]
    fn preexisting_processes_start_at_their_first_sample() {
        let mut i = Integrator::default();
        let sample = ProcSample {
            rss_bytes: GIB,
            hwm_bytes: 2 * GIB,
            read_bytes: 100,
            write_bytes: 200,
        };
        i.sample(1, S, 50 * S, sample, false);
        let first = i.take()[&(1, S)];
        assert_eq!(first.rss_byte_ns, 0);
        assert_eq!((first.disk_read_bytes, first.disk_write_bytes), (0, 0));
        assert_eq!(first.peak_rss_bytes, 2 * GIB);
        i.sample(
            1,
            S,
            51 * S,
            ProcSample {
                read_bytes: 150,
                write_bytes: 260,
                ..sample
            },
            false,
        );
        let second = i.take()[&(1, S)];
        assert_eq!((second.disk_read_bytes, second.disk_write_bytes), (50, 60));
    }

    #[test]
    fn exit_totals_complete_io_after_the_last_sample() {
        let mut i = Integrator::default();
        let s = ProcSample {
            write_bytes: 1000,
            ..Default::default()
        };
        i.sample(7, 5 * S, 6 * S, s, true);
        i.exit(7, 5 * S, 7 * S, 0, 64 << 20, true);
        assert_eq!(i.take()[&(7, 5 * S)].disk_write_bytes, 64 << 20);
        // A process never sampled: all its I/O comes from the exit event.
        i.exit(8, 5 * S, 6 * S, 10, 20, true);
        let got = i.take()[&(8, 5 * S)];
        assert_eq!((got.disk_read_bytes, got.disk_write_bytes), (10, 20));
        // One that was running before metering began: its totals are not ours.
        i.exit(9, 5 * S, 6 * S, 10, 20, false);
        let got = i.take()[&(9, 5 * S)];
        assert_eq!((got.disk_read_bytes, got.disk_write_bytes), (0, 0));
    }

    #[test]
    fn reaped_childrens_io_is_not_the_parents() {
        let mut i = Integrator::default();
        let io = |w| ProcSample {
            write_bytes: w,
            ..Default::default()
        };
        i.sample(1, 0, S, io(100), true);
        // The child wrote 64 MiB and exited; the parent reaps it, then writes 10 itself.
        i.child_exited((1, 0), 0, 64 << 20);
        i.sample(1, 0, 2 * S, io(100 + (64 << 20) + 10), true);
        assert_eq!(i.take()[&(1, 0)].disk_write_bytes, 100 + 10);
        // Nothing is owed any more: later writes are all the parent's.
        i.sample(1, 0, 3 * S, io(100 + (64 << 20) + 30), true);
        assert_eq!(i.take()[&(1, 0)].disk_write_bytes, 20);
    }

    #[test]
    fn status_and_io_parse() {
        let status = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(
            parse_status_memory(status),
            Some((1024 * 1024, 2048 * 1024))
        );
        assert_eq!(parse_status_memory("Name:\tkworker\n"), None);
        let io =
            "rchar: 5\nwchar: 6\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_io(io), Some((4096, 8192)));
        assert_eq!(parse_io("garbage"), None);
    }

    #[test]
    fn cgroup_counter_integrates_between_reads() {
        let dir = std::env::temp_dir().join(format!("mentat-cg-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("temp dir");
        let counter = dir.join("memory.current");
        let mut c = CgroupIntegrator::default();
        fs::write(&counter, "1073741824\n").expect("write");
        c.sample(&counter, S);
        fs::write(&counter, "1073741824\n").expect("write");
        c.sample(&counter, 3 * S);
        let got = c.take();
        assert!((gib_seconds(got[&counter]) - 2.0).abs() < 1e-9, "{got:?}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn v1_memory_mount_found() {
        let mi = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
                  32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n";
        assert_eq!(
            find_v1_memory_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/memory"))
        );
        assert_eq!(find_v1_memory_mount("1 2 3 / /x rw - cgroup2 c rw\n"), None);
    }

    #[test]
    fn own_process_samples() {
        let s = read_sample(Path::new("/proc"), std::process::id()).expect("own sample");
        assert!(s.rss_bytes > 0 && s.hwm_bytes >= s.rss_bytes, "{s:?}");
    }
}
