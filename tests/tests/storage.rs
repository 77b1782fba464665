//! Storage: a container's writable layer, measured from the overlay at its root.
//!
//! The container is built the way runtimes build one: a cgroup named per the
//! Docker convention, a private mount namespace, an overlay whose upper
//! directory receives every write, and a chroot into it. The ground truth is
//! the data the container writes.

use std::ffi::OsString;

use mentat_tests::{ScratchCgroup, random_container_id, record_command, storage_dir};

/// What the container writes into its root: 8 MiB.
const BLOB_BYTES: u64 = 8 << 20;

#[test]
fn a_containers_writable_layer_is_its_storage() {
    let cgroup = ScratchCgroup::create().expect("a scratch cgroup under the v2 mount");
    let id = random_container_id().expect("a container id");
    let leaf = cgroup
        .create_child(&format!("system.slice/docker-{id}.scope"))
        .expect("the container's cgroup");
    let dir = storage_dir().expect("a scratch directory on a real disk (overlay needs one)");
    let (upper, work, merged) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
    }
    // The container writes the blob, syncs, and stays up long enough for the
    // agent's storage thread (2 s refresh under `record`) to measure it again.
    // (Its root holds no /dev: the data comes from `yes`, not /dev/urandom.)
    let inner = format!("yes mentat | head -c {BLOB_BYTES} > /blob && sync && sleep 3");
    let script = format!(
        "echo $$ > {cg}/cgroup.procs && exec unshare -m sh -c 'mount -t overlay overlay \
         -o lowerdir=/,upperdir={u},workdir={w} {m} && exec chroot {m} sh -c \"{inner}\"'",
        cg = leaf.display(),
        u = upper.display(),
        w = work.display(),
        m = merged.display(),
    );
    let command: Vec<OsString> = ["sh", "-c", &script].iter().map(OsString::from).collect();
    let recording = record_command(&["--group-by", "container"], Some(&command))
        .unwrap_or_else(|e| panic!("recording the overlay container: {e:#}"));

    let group = recording
        .records
        .groups
        .iter()
        .find(|g| g.group.as_deref() == Some(id.as_str()))
        .unwrap_or_else(|| {
            panic!(
                "no group for container {id}: {:#?}",
                recording.records.groups
            )
        });
    let bytes = group
        .storage_bytes
        .unwrap_or_else(|| panic!("container {id} has no storage_bytes: {group:#?}"));
    // Allocated blocks of the blob, plus a few KiB of directories and the
    // overlay's metadata: at least the data, at most 1 MiB more.
    assert!(
        (BLOB_BYTES..BLOB_BYTES + (1 << 20)).contains(&bytes),
        "container {id}: storage_bytes {bytes}, wrote {BLOB_BYTES} bytes into its writable layer"
    );
    cgroup.remove().expect("removing the scratch cgroups");
}
