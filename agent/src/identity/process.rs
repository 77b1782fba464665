//! Who a process is: metadata from procfs, and cgroup v2 id → path.
//!
//! Everything read from /proc is hostile input: names may hold newlines or
//! invalid UTF-8, and a process may vanish between two reads. Every reader
//! here returns `None` rather than failing a tick.

use std::{
    collections::HashMap,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// What procfs says about a process instance.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcStat {
    /// Parent process id.
    pub ppid: u32,
    /// Start time since boot, in ns (from clock ticks: 10 ms resolution at USER_HZ 100).
    pub start_since_boot_ns: u64,
    /// `comm` as the kernel shows it in stat.
    pub comm: String,
    /// The kernel's task flags (`PF_*`).
    pub flags: u32,
}

/// Parses `/proc/<pid>/stat` content. The comm field is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted from the last `)`.
pub fn parse_stat(content: &[u8]) -> Option<ProcStat> {
    let open = content.iter().position(|&b| b == b'(')?;
    let close = content.iter().rposition(|&b| b == b')')?;
    let comm = String::from_utf8_lossy(content.get(open + 1..close)?).into_owned();
    let rest = std::str::from_utf8(content.get(close + 1..)?).ok()?;
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    // After the comm: state(0) ppid(1) ... flags(6) ... starttime(19).
    let ppid = fields.get(1)?.parse().ok()?;
    let flags = fields.get(6)?.parse().ok()?;
    let start_ticks: u64 = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        ppid,
        start_since_boot_ns: start_ticks.saturating_mul(1_000_000_000 / clock_ticks_per_sec()),
        comm,
        flags,
    })
}

fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|&h| h > 0).unwrap_or(100)
}

/// The one scan of `/proc` for pids: every numeric entry, unsorted.
///
/// An empty list when `/proc` cannot be read (the caller then knows no process).
pub fn proc_pids(proc_root: &Path) -> Vec<u32> {
    let Ok(dir) = fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .collect()
}

/// Reads small procfs files with one `read` into a buffer reused across reads.
///
/// procfs reports size 0, so `fs::read_to_string` stats the file and reads in
/// small steps; every file the collector reads per tick (`statm`, `io`,
/// `cgroup`, `status`) fits one page, which the kernel's `seq_file` fills in
/// one call. A read that fills the buffer is continued, so nothing is cut.
///
/// Files stay open between ticks while they are read at every tick (the
/// processes that keep running): a `pread` at offset 0 makes the kernel
/// generate the file again, without the path walk, open and close, which
/// were about a third of the agent's CPU at 1,000 active processes (issue
/// 13). A file whose process is gone fails to read (ESRCH) and is opened
/// again by path, so a reused pid reads the new process, as an open would.
/// [`ProcReader::close_unused`] closes what was not read since its last
/// call; at most `cap` files are open (a quarter of the soft `RLIMIT_NOFILE`,
/// at most 4,096): beyond it files are opened and closed per read.
#[derive(Debug)]
pub struct ProcReader {
    root: PathBuf,
    path: PathBuf,
    buf: Vec<u8>,
    open: HashMap<(u32, &'static str), (fs::File, u64)>,
    generation: u64,
    cap: usize,
}

/// The buffer's starting size: a page holds every file read per tick.
const READ_BUF: usize = 4096;

/// The most procfs files kept open between ticks.
const MAX_OPEN: usize = 4096;

impl ProcReader {
    /// A reader of files under `proc_root`.
    pub fn new(proc_root: &Path) -> Self {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit, which `lim` is.
        let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur
        } else {
            0
        };
        Self {
            root: proc_root.to_path_buf(),
            path: PathBuf::with_capacity(64),
            buf: vec![0; READ_BUF],
            open: HashMap::new(),
            generation: 0,
            cap: usize::try_from(soft / 4).unwrap_or(MAX_OPEN).min(MAX_OPEN),
        }
    }

    /// The content of `/proc/<pid>/<file>`; `None` if it cannot be opened or read.
    pub fn read(&mut self, pid: u32, file: &'static str) -> Option<&[u8]> {
        use std::fmt::Write as _;
        let generation = self.generation;
        if let Some((f, used)) = self.open.get_mut(&(pid, file)) {
            *used = generation;
            match read_whole(f, &mut self.buf) {
                Some(len) if len > 0 => return self.buf.get(..len),
                _ => {}
            }
            // Gone (or the read failed): by path below, which sees a reused pid.
            self.open.remove(&(pid, file));
        }
        self.path.clear();
        self.path.push(&self.root);
        let mut name = String::with_capacity(16);
        let _ = write!(name, "{pid}");
        self.path.push(&name);
        self.path.push(file);
        let f = fs::File::open(&self.path).ok()?;
        let len = read_whole(&f, &mut self.buf)?;
        if self.open.len() < self.cap {
            self.open.insert((pid, file), (f, generation));
        }
        self.buf.get(..len)
    }

    /// As [`ProcReader::read`], as UTF-8 text (`None` if it is not).
    pub fn read_str(&mut self, pid: u32, file: &'static str) -> Option<&str> {
        std::str::from_utf8(self.read(pid, file)?).ok()
    }

    /// Closes the files not read since the last call (the collector calls it
    /// once a tick, so what stays open is what runs).
    pub fn close_unused(&mut self) {
        let generation = self.generation;
        self.open.retain(|_, (_, used)| *used == generation);
        self.generation += 1;
    }

    /// Files open now.
    pub fn open_files(&self) -> usize {
        self.open.len()
    }
}

/// Reads all of a procfs file from offset 0 into `buf`; its length, or
/// `None` when the read fails.
fn read_whole(f: &fs::File, buf: &mut Vec<u8>) -> Option<usize> {
    use std::os::unix::fs::FileExt;
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = f.read_at(buf.get_mut(len..)?, len as u64).ok()?;
        len += n;
        // A short read of a seq_file is the whole remaining content.
        if n == 0 || len < buf.len() {
            break;
        }
    }
    Some(len)
}

/// Reads `/proc/<pid>/stat`.
pub fn read_stat(proc_root: &Path, pid: u32) -> Option<ProcStat> {
    parse_stat(&fs::read(proc_root.join(pid.to_string()).join("stat")).ok()?)
}

/// Reads at most `limit` bytes of `/proc/<pid>/cmdline` (NUL-separated argv).
///
/// Command lines can be megabytes; what identity needs is near the front.
pub fn read_cmdline(proc_root: &Path, pid: u32, limit: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let f = fs::File::open(proc_root.join(pid.to_string()).join("cmdline")).ok()?;
    let mut buf = Vec::new();
    f.take(limit as u64).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// The process's pid in its own (innermost) pid namespace, from the `NSpid:`
/// line of `/proc/<pid>/status`; `None` in the host's namespace (one entry),
/// when gone, or on a kernel without the line.
pub fn read_ns_pid(proc_root: &Path, pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    parse_ns_pid(&status)
}

/// The innermost pid of an `NSpid:` line with more than one entry.
pub fn parse_ns_pid(status: &str) -> Option<u32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    let pids: Vec<&str> = line.split_whitespace().collect();
    if pids.len() < 2 {
        return None;
    }
    pids.last()?.parse().ok()
}

/// Reads the process's executable path (`/proc/<pid>/exe`), lossily as UTF-8.
pub fn read_exe(proc_root: &Path, pid: u32) -> Option<String> {
    let target = fs::read_link(proc_root.join(pid.to_string()).join("exe")).ok()?;
    Some(target.to_string_lossy().into_owned())
}

/// A process instance's start as the agent keys it: `start_boottime` cut to
/// the clock tick, which is exactly what /proc/<pid>/stat shows. Kernel keys
/// and procfs reads then name an instance identically; two processes with one
/// pid inside one tick (10 ms) would need the whole pid space to wrap in it.
pub fn instance_start(start_boottime_ns: u64) -> u64 {
    let tick = 1_000_000_000 / clock_ticks_per_sec();
    start_boottime_ns - start_boottime_ns % tick
}

/// Turns a fixed, NUL-padded kernel name buffer into a string.
pub fn c_name(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(buf.get(..end).unwrap_or_default()).into_owned()
}

/// Finds the cgroup v2 mount point in mountinfo content (`None` if there is none).
pub fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // Fields before " - " are mount info; the first after it is the fs type.
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = pre.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_mountinfo(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal `\ooo`.
pub fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(oct) = bytes.get(i + 1..i + 4)
            && let Ok(v) = u8::from_str_radix(std::str::from_utf8(oct).unwrap_or("x"), 8)
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Resolves cgroup v2 ids (directory inode numbers) to paths under the v2 mount.
#[derive(Debug)]
pub struct Cgroups {
    root: Option<PathBuf>,
    paths: HashMap<u64, String>,
    last_walk: Option<Instant>,
}

/// Walking the hierarchy on every unknown id would be quadratic in cgroup
/// churn; one walk per interval finds every new cgroup at once.
const MIN_WALK_INTERVAL: Duration = Duration::from_millis(200);

/// Bounds the walk on pathological hierarchies.
const MAX_WALK_DEPTH: usize = 32;

impl Cgroups {
    /// Finds the v2 mount from `/proc/self/mountinfo`.
    pub fn discover() -> Self {
        let root = fs::read_to_string("/proc/self/mountinfo")
            .ok()
            .and_then(|m| find_cgroup2_mount(&m));
        Self::with_root(root)
    }

    /// A resolver for a v2 hierarchy mounted at `root` (`None`: no v2 mount).
    pub fn with_root(root: Option<PathBuf>) -> Self {
        Self {
            root,
            paths: HashMap::new(),
            last_walk: None,
        }
    }

    /// The v2 mount point, if any.
    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }

    /// The path of cgroup `id` relative to the v2 mount ("/" for the root), if it still exists.
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        if let Some(p) = self.paths.get(&id) {
            return Some(p.clone());
        }
        let due = self
            .last_walk
            .is_none_or(|t| t.elapsed() >= MIN_WALK_INTERVAL);
        if due {
            self.walk();
        }
        self.paths.get(&id).cloned()
    }

    fn walk(&mut self) {
        self.last_walk = Some(Instant::now());
        let Some(root) = self.root.clone() else {
            return;
        };
        // Rebuilt from scratch: cgroups removed since the last walk are
        // forgotten, so the map is bounded by the cgroups that exist.
        self.paths.clear();
        let mut stack = vec![(root.clone(), 0usize)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(meta) = fs::metadata(&dir) else {
                continue;
            };
            let rel = match dir.strip_prefix(&root) {
                Ok(r) if r.as_os_str().is_empty() => String::from("/"),
                Ok(r) => format!("/{}", r.to_string_lossy()),
                Err(_) => continue,
            };
            self.paths.insert(meta.ino(), rel);
            if depth >= MAX_WALK_DEPTH {
                continue;
            }
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push((entry.path(), depth + 1));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn ns_pid_is_the_innermost_of_several() {
        assert_eq!(parse_ns_pid("Name:\tx\nNSpid:\t4321\t17\t1\n"), Some(1));
        assert_eq!(parse_ns_pid("NSpid:\t4321\n"), None, "host namespace only");
        assert_eq!(parse_ns_pid("Name:\tx\n"), None);
        assert_eq!(parse_ns_pid("NSpid:\t4321\tzz\n"), None);
    }

    use super::*;

    #[test]
    fn a_kept_file_is_read_afresh_and_a_gone_process_is_not_read_from_it() {
        let mut r = ProcReader::new(Path::new("/proc"));
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let first = r.read_str(pid, "status").expect("status").to_string();
        assert!(first.contains("State:"), "{first}");
        assert_eq!(r.open_files(), 1);
        // Kept open: a stopped child reads "T (stopped)" through the same file.
        // SAFETY: kill with a pid of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        let mut stopped = false;
        while Instant::now() < deadline && !stopped {
            stopped = r
                .read_str(pid, "status")
                .is_some_and(|t| t.contains("State:\tT"));
        }
        assert!(stopped, "the kept file is generated again at each read");
        assert_eq!(r.open_files(), 1);
        r.close_unused();
        assert_eq!(r.open_files(), 1, "read since the last call: kept");
        // Gone and reaped: its kept file reads nothing, and nothing else is read.
        child.kill().expect("kill");
        child.wait().expect("wait");
        assert!(
            r.read(pid, "status").is_none() || std::fs::metadata(format!("/proc/{pid}")).is_ok()
        );
        r.close_unused();
        r.close_unused();
        assert_eq!(r.open_files(), 0, "not read since the last call: closed");
    }

    #[test]
    fn stat_with_hostile_comm_parses() {
        let line = b"42 (a) b (c\n) S 7 42 42 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 1 0 12345 0 0";
        let st = parse_stat(line).expect("parses");
        assert_eq!(st.comm, "a) b (c\n");
        assert_eq!(st.ppid, 7);
        assert_eq!(st.flags, 4194560);
        assert_eq!(
            st.start_since_boot_ns,
            12345 * (1_000_000_000 / clock_ticks_per_sec())
        );
    }

    #[test]
    fn truncated_or_garbage_stat_is_none() {
        assert_eq!(parse_stat(b""), None);
        assert_eq!(parse_stat(b"1 (x) S"), None);
        assert_eq!(parse_stat(b"\xff\xfe (\xff) S x y"), None);
        let full = b"42 (a) S 7 42 42 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 1 0 12345 0 0";
        for n in 0..full.len() {
            // Never panics, whatever the cut.
            let _ = parse_stat(&full[..n]);
        }
    }

    #[test]
    fn reader_reads_whole_files_into_one_buffer() {
        let mut r = ProcReader::new(Path::new("/proc"));
        let me = std::process::id();
        // A file that cannot change while the test runs (status does: its
        // RSS lines move with the test's own allocations).
        let cmdline = r.read(me, "cmdline").expect("own cmdline").to_vec();
        assert_eq!(
            cmdline,
            fs::read(format!("/proc/{me}/cmdline")).expect("cmdline")
        );
        assert!(
            r.read_str(me, "status")
                .expect("own status")
                .starts_with("Name:")
        );
        // Bigger than the buffer: the read continues rather than cutting.
        let maps = r.read(me, "maps").expect("own maps").len();
        assert!(maps > 0);
        assert!(r.read(me, "no-such-file").is_none());
        assert!(proc_pids(Path::new("/proc")).contains(&me));
    }

    #[test]
    fn own_stat_matches_own_process() {
        let st = read_stat(Path::new("/proc"), std::process::id()).expect("own stat");
        assert_eq!(st.ppid, std::os::unix::process::parent_id());
    }

    #[test]
    fn cgroup2_mount_found_with_escapes() {
        let mi = "25 1 0:22 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n\
                  30 1 0:26 / /sys/fs/cgroup/uni\\040fied rw,nosuid - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/uni fied"))
        );
        assert_eq!(
            find_cgroup2_mount("25 1 0:22 / /x rw - cgroup c rw\n"),
            None
        );
    }

    #[test]
    fn c_name_stops_at_nul_and_tolerates_bad_utf8() {
        assert_eq!(c_name(b"bash\0\0\0"), "bash");
        assert_eq!(c_name(b"\xffx"), "\u{fffd}x");
        assert_eq!(c_name(b"full"), "full");
    }

    #[test]
    fn root_cgroup_resolves_to_slash() {
        let mut cg = Cgroups::discover();
        let Some(root) = cg.root().map(Path::to_path_buf) else {
            panic!("no cgroup v2 mount on this machine; the agent requires one");
        };
        let ino = fs::metadata(&root).expect("stat v2 root").ino();
        assert_eq!(cg.path_of(ino).as_deref(), Some("/"));
    }
}
