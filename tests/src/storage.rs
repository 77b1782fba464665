//! Scratch directories on storage, for workloads whose disk writes are metered.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// File systems whose writes never reach a block device.
const IN_MEMORY: &[&str] = &["tmpfs", "ramfs", "devtmpfs"];

/// A scratch directory on a file system backed by storage: in the temp dir unless that
/// is in memory (tmpfs), else in the workspace's target directory. Writes to tmpfs never
/// reach storage, so `/proc/<pid>/io` rightly does not count them as disk writes.
pub fn storage_dir() -> Result<tempfile::TempDir> {
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let candidates = [std::env::temp_dir(), target];
    let base = candidates
        .iter()
        .find(|dir| fs_type(dir).is_some_and(|fs| !IN_MEMORY.contains(&fs.as_str())))
        .with_context(|| format!("none of {candidates:?} is on a file system backed by storage"))?;
    tempfile::Builder::new()
        .prefix("mentat-test-disk-")
        .tempdir_in(base)
        .with_context(|| format!("creating a directory in {}", base.display()))
}

/// The type of the file system `dir` is on: that of the last-mounted of the deepest
/// mount points containing it, from `/proc/mounts`.
fn fs_type(dir: &Path) -> Option<String> {
    let dir = dir.canonicalize().ok()?;
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    find_fs_type(&mounts, &dir)
}

fn find_fs_type(mounts: &str, dir: &Path) -> Option<String> {
    let mut best: Option<(usize, String)> = None;
    for line in mounts.lines() {
        let mut fields = line.split(' ');
        let (Some(_), Some(point), Some(fs)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        // /proc/mounts writes a space in a path as \040.
        let point = PathBuf::from(point.replace("\\040", " "));
        let depth = point.components().count();
        if dir.starts_with(&point) && best.as_ref().is_none_or(|(d, _)| depth >= *d) {
            best = Some((depth, fs.to_owned()));
        }
    }
    best.map(|(_, fs)| fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deepest_and_latest_mount_wins() {
        let mounts = "\
/dev/vda / ext4 rw 0 0
tmpfs /tmp tmpfs rw 0 0
/dev/vdb /tmp/my\\040disk xfs rw 0 0
tmpfs /srv tmpfs rw 0 0
/dev/vdc /srv ext4 rw 0 0
";
        let fs = |dir: &str| find_fs_type(mounts, Path::new(dir));
        assert_eq!(fs("/tmp/x").as_deref(), Some("tmpfs"));
        assert_eq!(fs("/tmp/my disk/x").as_deref(), Some("xfs"));
        assert_eq!(fs("/tmpx").as_deref(), Some("ext4"));
        assert_eq!(fs("/srv/a").as_deref(), Some("ext4"));
    }
}
