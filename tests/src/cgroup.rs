//! The cgroup v2 hierarchy: where it is mounted, and scratch cgroups for tests.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The cgroup v2 mount point, from `/proc/self/mountinfo`.
///
/// Never assumed: on hybrid hosts v2 sits at `/sys/fs/cgroup/unified`, on unified
/// hosts at `/sys/fs/cgroup`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    find_cgroup2_mount(&mountinfo).context("no cgroup2 file system in /proc/self/mountinfo")
}

/// The first `cgroup2` mount of the hierarchy's root, else the first `cgroup2` mount.
fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    // Format (proc(5)): ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS
    let mounts: Vec<(&str, PathBuf)> = mountinfo
        .lines()
        .filter_map(|line| {
            let (mount, super_block) = line.split_once(" - ")?;
            if super_block.split(' ').next()? != "cgroup2" {
                return None;
            }
            let mut fields = mount.split(' ');
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            Some((root, PathBuf::from(unescape_octal(mount_point))))
        })
        .collect();
    let index = mounts
        .iter()
        .position(|(root, _)| *root == "/")
        .unwrap_or(0);
    mounts.into_iter().nth(index).map(|(_, path)| path)
}

/// Undoes mountinfo's `\ooo` escapes (space, tab, newline, backslash).
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|digits| bytes[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match escape {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A fresh, empty cgroup directly under the v2 root, removed (with every cgroup a test
/// made below it) when dropped.
#[derive(Debug)]
pub struct ScratchCgroup {
    path: PathBuf,
    name: String,
    removed: bool,
}

impl ScratchCgroup {
    /// Creates `<v2 mount>/mentat-test-<our pid>-<nanoseconds>`: unique across runs and
    /// recognisable if a crashed test leaves it behind.
    pub fn create() -> Result<Self> {
        let mount = cgroup2_mount()?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .context("the clock is before 1970")?
            .as_nanos();
        let name = format!("mentat-test-{}-{nanos}", std::process::id());
        let path = mount.join(&name);
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(ScratchCgroup {
            path,
            name,
            removed: false,
        })
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path records carry: relative to the v2 mount, with a leading `/`.
    pub fn relative_path(&self) -> String {
        format!("/{}", self.name)
    }

    /// Creates the cgroup `relative` (e.g. `system.slice/docker-<id>.scope`) below this
    /// one, with every missing parent, as a container runtime's tree would have it;
    /// returns its directory.
    pub fn create_child(&self, relative: &str) -> Result<PathBuf> {
        let path = self.path.join(relative.trim_matches('/'));
        fs::create_dir_all(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(path)
    }

    /// The path records carry for the cgroup `relative` below this one.
    pub fn relative_path_of(&self, relative: &str) -> String {
        format!("/{}/{}", self.name, relative.trim_matches('/'))
    }

    /// The cgroup's id as BPF sees it (`bpf_get_current_cgroup_id`): on cgroup v2 that
    /// is the kernfs node id, which is the directory's inode number.
    pub fn id(&self) -> Result<u64> {
        Ok(fs::metadata(&self.path)
            .with_context(|| format!("stat {}", self.path.display()))?
            .ino())
    }

    /// Removes the cgroup; call once the processes that were in it are gone.
    pub fn remove(mut self) -> Result<()> {
        self.try_remove()
    }

    fn try_remove(&mut self) -> Result<()> {
        remove_tree(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

/// Removes the cgroup at `path` and every cgroup below it, leaves first: a cgroup
/// directory goes only with rmdir, and only once it has no children.
fn remove_tree(path: &Path) -> Result<()> {
    let entries = match fs::read_dir(path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", path.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", path.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path())?;
        }
    }
    // A reaped task leaves its cgroup asynchronously, so rmdir can see EBUSY for a
    // moment after the last process in it was reaped.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
}

/// A random container id as runtimes make them: 64 lowercase hex digits.
pub fn random_container_id() -> Result<String> {
    Ok(hex(&random_bytes::<32>()?))
}

/// A random pod UID as Kubernetes makes them: a version 4 UUID, lowercase with dashes.
pub fn random_pod_uid() -> Result<String> {
    let mut bytes = random_bytes::<16>()?;
    bytes[6] = (bytes[6] & 0x0f) | 0x40; // version 4
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex = hex(&bytes);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    fs::File::open("/dev/urandom")
        .and_then(|mut urandom| std::io::Read::read_exact(&mut urandom, &mut bytes))
        .context("reading /dev/urandom")?;
    Ok(bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Drop for ScratchCgroup {
    fn drop(&mut self) {
        if !self.removed
            && let Err(e) = self.try_remove()
        {
            eprintln!("warning: scratch cgroup left behind: {e:#}");
        }
    }
}

/// `unshare` (util-linux) from PATH: how the tests give a workload a
/// container's own pid, mount and other namespaces.
pub fn unshare_bin() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("unshare"))
        .find(|path| path.is_file())
        .expect("no `unshare` on PATH: the container tests need util-linux's unshare")
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_v2_mount_of_a_hybrid_host() {
        assert_eq!(
            find_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn prefers_the_root_mount_and_unescapes() {
        let mountinfo = "\
50 1 0:40 /kubepods /host/cg rw shared:3 - cgroup2 cgroup2 rw
51 1 0:40 / /mnt/my\\040cgroups rw shared:3 master:1 - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            find_cgroup2_mount(mountinfo),
            Some(PathBuf::from("/mnt/my cgroups"))
        );
    }

    #[test]
    fn random_ids_have_the_runtimes_shapes() {
        let id = random_container_id().expect("a container id");
        assert!(crate::records::is_container_id(&id), "{id}");
        let uid = random_pod_uid().expect("a pod uid");
        assert!(crate::records::is_pod_uid(&uid), "{uid}");
        assert_eq!(&uid[14..15], "4", "UUID version of {uid}");
        assert_ne!(random_container_id().expect("another id"), id);
    }

    #[test]
    fn no_v2_mount() {
        assert_eq!(
            find_cgroup2_mount(&HYBRID.replace("cgroup2", "cgroup")),
            None
        );
    }
}
