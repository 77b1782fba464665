//! Bytes a container holds on its writable layer.
//!
//! A container's root is an overlayfs mount whose `upperdir` holds every file
//! the container wrote. Its size is the container's storage footprint, what
//! `storage_per_gb_month` prices. The upper directory is a host path, read
//! through `/proc/1/root` so the agent sees the host's filesystem even from
//! its own mount namespace (the DaemonSet runs with `hostPID`). Walking a
//! directory tree is slow, so sizes are measured in a background thread at
//! most once per `refresh` per layer; a tick only reads the last result.
//! Volumes are not counted yet. Where no writable layer is found, storage is
//! absent, not zero.

use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use tracing::{debug, warn};

/// The `upperdir` of the overlay mounted at the root of `pid`'s mount
/// namespace, from `/proc/<pid>/mountinfo` content.
pub fn root_upperdir(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        // Field 5 is the mount point, as the process sees it.
        if pre.split_whitespace().nth(4)? != "/" {
            return None;
        }
        let mut post = post.split_whitespace();
        if post.next()? != "overlay" {
            return None;
        }
        let options = post.nth(1)?;
        options
            .split(',')
            .find_map(|o| o.strip_prefix("upperdir="))
            .map(|p| PathBuf::from(crate::identity::process::unescape_mountinfo(p)))
    })
}

/// How long "this container has no overlay root" is believed.
const NO_LAYER_RETRY: Duration = Duration::from_secs(1);

/// Walks no more than this many entries per layer: a pathological layer
/// reports what was counted so far rather than stalling the thread.
const MAX_ENTRIES: usize = 2_000_000;

/// Allocated bytes (blocks × 512) under `dir`, hard links counted once.
///
/// A walk that reaches `MAX_ENTRIES` stops there and reports what it counted
/// (an undercount), counted in [`walks_truncated`] and logged.
pub fn allocated_bytes(dir: &Path) -> std::io::Result<u64> {
    let (total, complete) = allocated_bytes_upto(dir, MAX_ENTRIES)?;
    if !complete {
        let n = WALKS_TRUNCATED.fetch_add(1, Ordering::Relaxed) + 1;
        // One line per doubling: a layer re-measured every minute does not flood the log.
        if n.is_power_of_two() {
            warn!(
                path = %dir.display(),
                max_entries = MAX_ENTRIES,
                truncated_walks = n,
                "writable layer has more entries than the walk limit: storage_bytes undercounts it"
            );
        }
    }
    Ok(total)
}

/// Storage walks stopped at the entry limit (their layer's size is an undercount), since start.
pub fn walks_truncated() -> u64 {
    WALKS_TRUNCATED.load(Ordering::Relaxed)
}

static WALKS_TRUNCATED: AtomicU64 = AtomicU64::new(0);

/// Allocated bytes under `dir` and whether the walk saw every entry (at most `max_entries`).
fn allocated_bytes_upto(dir: &Path, max_entries: usize) -> std::io::Result<(u64, bool)> {
    let mut total = 0u64;
    let mut seen = HashSet::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut entries = 0usize;
    let root = fs::symlink_metadata(dir)?;
    total += root.blocks() * 512;
    while let Some(d) = stack.pop() {
        let Ok(read) = fs::read_dir(&d) else {
            continue;
        };
        for e in read.flatten() {
            entries += 1;
            if entries > max_entries {
                return Ok((total, false));
            }
            let Ok(m) = e.metadata() else {
                continue;
            };
            if m.nlink() > 1 && !m.is_dir() && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            total += m.blocks() * 512;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    Ok((total, true))
}

/// Writable-layer sizes by container id, measured in the background.
#[derive(Clone, Debug)]
pub struct StorageMeter {
    inner: Arc<Mutex<Inner>>,
    host_root: PathBuf,
}

#[derive(Debug, Default)]
struct Inner {
    /// container id → (upper dir, last size, when measured).
    layers: HashMap<String, (PathBuf, Option<u64>, Option<Instant>)>,
    /// Containers whose root was not an overlay when last looked at: a
    /// container's first process may not have entered its root yet, so the
    /// verdict expires after `NO_LAYER_RETRY`.
    none: HashMap<String, Instant>,
}

impl StorageMeter {
    /// Starts the measuring thread; layers are measured at most every `refresh`.
    pub fn start(refresh: Duration) -> Self {
        Self::start_with_host_root(PathBuf::from("/proc/1/root"), refresh)
    }

    /// As `start`, with the host's root at `host_root` (tests).
    pub fn start_with_host_root(host_root: PathBuf, refresh: Duration) -> Self {
        let meter = Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            host_root,
        };
        let worker = meter.clone();
        let spawned = thread::Builder::new()
            .name("storage".into())
            .spawn(move || {
                loop {
                    worker.measure_due(refresh);
                    thread::sleep(Duration::from_millis(250).min(refresh));
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "cannot start the storage thread; storage_bytes stays absent");
        }
        meter
    }

    /// Tells the meter that `container` has process `pid` (its root mount names the layer).
    pub fn note(&self, container: &str, pid: u32, proc_root: &Path) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.layers.contains_key(container)
            || inner
                .none
                .get(container)
                .is_some_and(|t| t.elapsed() < NO_LAYER_RETRY)
        {
            return;
        }
        let mountinfo = fs::read_to_string(proc_root.join(pid.to_string()).join("mountinfo"));
        match mountinfo.ok().as_deref().and_then(root_upperdir) {
            Some(upper) => {
                debug!(container, upper = %upper.display(), "writable layer");
                inner.none.remove(container);
                inner
                    .layers
                    .insert(container.to_string(), (upper, None, None));
            }
            None => {
                inner.none.insert(container.to_string(), Instant::now());
            }
        }
    }

    /// The last measured size of `container`'s writable layer, if any.
    pub fn bytes(&self, container: &str) -> Option<u64> {
        self.inner.lock().ok()?.layers.get(container)?.1
    }

    fn measure_due(&self, refresh: Duration) {
        let due: Vec<(String, PathBuf)> = match self.inner.lock() {
            Ok(inner) => inner
                .layers
                .iter()
                .filter(|(_, (_, _, at))| at.is_none_or(|t| t.elapsed() >= refresh))
                .map(|(c, (p, _, _))| (c.clone(), p.clone()))
                .collect(),
            Err(_) => return,
        };
        for (container, upper) in due {
            let on_host = self
                .host_root
                .join(upper.strip_prefix("/").unwrap_or(&upper));
            // Through the host's root first; where that is not readable (no
            // hostPID, or pid 1 is not ours to inspect), as this process sees
            // the path, which is the host's when the agent runs on the host.
            let size = match allocated_bytes(&on_host).or_else(|_| allocated_bytes(&upper)) {
                Ok(b) => Some(b),
                Err(e) => {
                    debug!(container, path = %on_host.display(), error = %e, "writable layer unreadable");
                    None
                }
            };
            if let Ok(mut inner) = self.inner.lock()
                && let Some(entry) = inner.layers.get_mut(&container)
            {
                entry.1 = size;
                entry.2 = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_root_overlay_upperdir() {
        let mi = "1 0 0:20 / / rw - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/var/lib/c/s\\040x/fs,workdir=/w\n\
                  2 1 0:5 / /proc rw - proc proc rw\n";
        assert_eq!(root_upperdir(mi), Some(PathBuf::from("/var/lib/c/s x/fs")));
        assert_eq!(root_upperdir("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"), None);
        // An overlay elsewhere is not the container's root.
        assert_eq!(
            root_upperdir("1 0 0:20 / /mnt rw - overlay overlay rw,upperdir=/u,workdir=/w\n"),
            None
        );
        assert_eq!(root_upperdir(""), None);
    }

    #[test]
    fn allocated_bytes_counts_blocks_and_hard_links_once() {
        let dir = std::env::temp_dir().join(format!("mentat-storage-{}", std::process::id()));
        fs::create_dir_all(dir.join("sub")).expect("mkdir");
        fs::write(dir.join("sub/a"), vec![7u8; 1 << 20]).expect("write");
        fs::hard_link(dir.join("sub/a"), dir.join("b")).expect("link");
        let bytes = allocated_bytes(&dir).expect("walk");
        // 1 MiB of data once (the link shares blocks), plus a few directory blocks.
        assert!(
            (1 << 20..(1 << 20) + (64 << 10)).contains(&bytes),
            "{bytes}"
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_walk_past_the_limit_says_it_stopped() {
        let dir = std::env::temp_dir().join(format!("mentat-storage-cap-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        for i in 0..10 {
            fs::write(dir.join(i.to_string()), [1u8]).expect("write");
        }
        assert!(!allocated_bytes_upto(&dir, 5).expect("walk").1);
        assert!(allocated_bytes_upto(&dir, 10).expect("walk").1);
        fs::remove_dir_all(&dir).expect("cleanup");
    }
}
