//! `record --group-by`: one record per container, pod, cgroup, workload or process
//! instead of one per process, each group the sum of its members; with `--all`, the
//! groups plus the four buckets add up to the summary's node totals for every metric.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use mentat_tests::truth::{Burn, Tcp, WriteFile};
use mentat_tests::{
    GroupRecord, Recording, ScratchCgroup, random_container_id, random_pod_uid, record_command,
    run_agent, storage_dir, workload_bin,
};
use serde::de::DeserializeOwned;

/// Bytes the client sends the server in the workloads below.
const TCP_BYTES: u64 = 8 << 20;
/// MiB each write-file writes.
const WRITE_MIB: u64 = 8;

fn text(path: &Path) -> String {
    path.to_str().expect("UTF-8 path").to_owned()
}

/// `sh -c SCRIPT sh ARGS...` under `record --all --group-by KEY`, which must exit 0,
/// conserve every metric, and print only groups by KEY.
fn record_grouped(key: &str, script: &str, args: &[String]) -> Recording {
    let mut command: Vec<OsString> = vec!["sh".into(), "-c".into(), script.into(), "sh".into()];
    command.extend(args.iter().map(OsString::from));
    let recording = record_command(&["--all", "--group-by", key], Some(&command))
        .unwrap_or_else(|e| panic!("recording with --group-by {key}: {e:#}"));
    recording
        .output
        .ensure_success(&recording.invocation)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let records = &recording.records;
    assert!(
        records.processes.is_empty() && !records.groups.is_empty(),
        "--group-by {key} printed {} process records and {} groups",
        records.processes.len(),
        records.groups.len()
    );
    assert!(
        records.groups.iter().all(|g| g.group_by == key),
        "--group-by {key} printed groups by something else: {:#?}",
        records.groups
    );
    // Exact for the integer metrics: each is a sum of integers the agent split among
    // the processes, so any difference is something lost or counted twice. memory
    // within 1e-9 relative: the same f64 terms summed in another order.
    let errors = records.conservation_errors();
    assert!(
        errors.is_empty(),
        "--group-by {key} --all: groups + buckets != summary:\n  {}\nsummary: {:#?}",
        errors.join("\n  "),
        records.summary
    );
    assert_eq!(
        records.summary.attributed_cpu_ns, records.summary.accounted_cpu_ns,
        "--group-by {key}: attributed_cpu_ns != accounted_cpu_ns"
    );
    recording
}

/// The workloads' ground truths, one per JSON line, in the order the script ran them.
fn truths(recording: &Recording) -> Vec<serde_json::Value> {
    recording
        .ground_truths()
        .expect("the workloads' ground truth lines")
}

fn truth<T: DeserializeOwned>(values: &[serde_json::Value], index: usize) -> T {
    let value = values
        .get(index)
        .unwrap_or_else(|| panic!("ground truth {index} missing: {values:?}"));
    serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("ground truth {index} ({value}): {e}"))
}

/// Runs `$2` (the workload) after moving this shell into the cgroup `$1`: a container's
/// init, which everything it runs inherits.
const IN_CGROUP: &str = r#"echo $$ > "$1/cgroup.procs" && shift && exec "$@""#;

#[test]
fn containers_are_groups_and_everything_is_conserved() {
    let root = ScratchCgroup::create().expect("creating the scratch root cgroup");
    let (id1, id2) = (
        random_container_id().expect("a container id"),
        random_container_id().expect("a container id"),
    );
    let (rel1, rel2) = (
        format!("system.slice/docker-{id1}.scope"),
        format!("system.slice/docker-{id2}.scope"),
    );
    let c1 = root
        .create_child(&rel1)
        .expect("creating container 1's cgroup");
    let c2 = root
        .create_child(&rel2)
        .expect("creating container 2's cgroup");
    let disk = storage_dir().expect("a scratch directory on storage");

    // Container 1: the TCP server, and a shell that moves in and execs write-file
    // (2 process instances). Container 2: the TCP client, and a shell that moves in and
    // execs burn, which forks its burning child there (3). On the host: this shell, the
    // tcp and burn parents, burn's child and a write-file.
    let script = format!(
        r#"set -e
W=$1 C1=$2 C2=$3 D=$4
"$W" tcp --bytes {TCP_BYTES} --family 4 --server-cgroup "$C1" --client-cgroup "$C2"
sh -c '{IN_CGROUP}' sh "$C1" "$W" write-file --mib {WRITE_MIB} --path "$D/in-container"
sh -c '{IN_CGROUP}' sh "$C2" "$W" burn --threads 1 --ms 150
"$W" burn --threads 1 --ms 50
"$W" write-file --mib {WRITE_MIB} --path "$D/on-host"
"#
    );
    let args = [
        text(&workload_bin().expect("the workload binary")),
        text(&c1),
        text(&c2),
        text(disk.path()),
    ];
    let recording = record_grouped("container", &script, &args);
    let values = truths(&recording);
    let tcp: Tcp = truth(&values, 0);
    let written_in_c1: WriteFile = truth(&values, 1);
    let burn_in_c2: Burn = truth(&values, 2);
    let written_on_host: WriteFile = truth(&values, 4);
    let records = &recording.records;

    for (id, rel, dir, processes) in [(&id1, &rel1, &c1, 2), (&id2, &rel2, &c2, 3)] {
        let group = records.group(Some(id)).unwrap_or_else(|| {
            panic!("no group for container {id}; groups: {:#?}", records.groups)
        });
        let inode = std::fs::metadata(dir)
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .expect("the container cgroup's inode");
        let got = (
            group.processes,
            group.workload_kind.as_deref(),
            group.container_runtime.as_deref(),
            group.cgroup_path.clone(),
            group.cgroup_id,
        );
        let want = (
            processes,
            Some("container"),
            Some("docker"),
            Some(root.relative_path_of(rel)),
            Some(inode),
        );
        assert_eq!(
            got, want,
            "container {id}: (processes, workload_kind, container_runtime, cgroup_path, cgroup_id), agent (left) vs built (right); group: {group:#?}"
        );
    }

    // The traffic between the containers: exact, as in network.rs.
    let (g1, g2) = (
        records.group(Some(&id1)).expect("container 1's group"),
        records.group(Some(&id2)).expect("container 2's group"),
    );
    assert_eq!(
        (
            g1.network_rx_bytes,
            g1.network_tx_bytes,
            g2.network_rx_bytes,
            g2.network_tx_bytes
        ),
        (tcp.bytes_received, 0, 0, tcp.bytes_sent),
        "(container 1 rx, tx, container 2 rx, tx): the server in 1 received {} bytes from the client in 2",
        tcp.bytes_received
    );
    // Disk: write-file's shell moved into container 1 before exec'ing it, so all it
    // wrote is container 1's (with the 1 MiB ceiling of resources.rs), none of it the
    // host's, where the same process spent its first moments.
    let mib = 1 << 20;
    let wrote = written_in_c1.bytes_written;
    assert!(
        (wrote..=wrote + mib).contains(&g1.disk_write_bytes),
        "container 1 (write-file pid {}) wrote and fsynced {wrote} bytes, but its group has disk_write_bytes = {} \
         (its /proc/self/io said {}); group: {g1:#?}",
        written_in_c1.pid,
        g1.disk_write_bytes,
        written_in_c1.proc_io_write_bytes
    );
    let host_written = records.group(None).map_or(0, |g| g.disk_write_bytes);
    assert!(
        host_written >= written_on_host.bytes_written,
        "the host's write-file wrote and fsynced {} bytes, but the null group has disk_write_bytes = {host_written}",
        written_on_host.bytes_written
    );
    // CPU: burn's child was born in container 2 and burned there; 1 % as in cpu.rs.
    assert!(
        g2.cpu_ns as f64 >= 0.99 * burn_in_c2.rusage_cpu_ns as f64,
        "container 2 has {} ns of CPU, less than the {} ns its burn child used alone",
        g2.cpu_ns,
        burn_in_c2.rusage_cpu_ns
    );

    let host = records.group(None).unwrap_or_else(|| {
        panic!(
            "no null group for the host processes: {:#?}",
            records.groups
        )
    });
    assert!(
        host.container_id.is_none() && host.processes >= 5,
        "the null group must hold the host processes (at least the 5 of the script) and no container: {host:#?}"
    );
    drop(disk);
    root.remove().expect("removing the scratch cgroup tree");
}

/// A pod's container and a docker container on one node, for the other keys: the TCP
/// server in the pod's container, the client in the docker container, a write-file on
/// the host.
struct Node {
    root: ScratchCgroup,
    pod_uid: String,
    pod_container: String,
    pod_container_rel: String,
    docker: String,
    disk: tempfile::TempDir,
    script: String,
    args: Vec<String>,
}

fn node() -> Node {
    let root = ScratchCgroup::create().expect("creating the scratch root cgroup");
    let pod_uid = random_pod_uid().expect("a pod uid");
    let pod_container = random_container_id().expect("a container id");
    let docker = random_container_id().expect("a container id");
    let pod_container_rel = format!("kubepods/burstable/pod{pod_uid}/{pod_container}");
    let in_pod = root
        .create_child(&pod_container_rel)
        .expect("creating the pod container's cgroup");
    let in_docker = root
        .create_child(&format!("docker/{docker}"))
        .expect("creating the docker container's cgroup");
    let disk = storage_dir().expect("a scratch directory on storage");
    let script = format!(
        r#"set -e
"$1" tcp --bytes {TCP_BYTES} --family 6 --server-cgroup "$2" --client-cgroup "$3"
"$1" write-file --mib {WRITE_MIB} --path "$4/on-host"
"#
    );
    let args = vec![
        text(&workload_bin().expect("the workload binary")),
        text(&in_pod),
        text(&in_docker),
        text(disk.path()),
    ];
    Node {
        root,
        pod_uid,
        pod_container,
        pod_container_rel,
        docker,
        disk,
        script,
        args,
    }
}

impl Node {
    fn record(&self, key: &str) -> (Recording, Tcp) {
        let recording = record_grouped(key, &self.script, &self.args);
        let tcp = truth(&truths(&recording), 0);
        (recording, tcp)
    }

    fn remove(self) {
        drop(self.disk);
        self.root
            .remove()
            .expect("removing the scratch cgroup tree");
    }
}

#[test]
fn pods_are_groups() {
    let node = node();
    let (recording, tcp) = node.record("pod");
    let records = &recording.records;
    let pod = records
        .group(Some(&node.pod_uid))
        .unwrap_or_else(|| panic!("no group for pod {}: {:#?}", node.pod_uid, records.groups));
    assert_eq!(
        (
            pod.qos_class.as_deref(),
            pod.container_id.as_deref(),
            pod.network_rx_bytes,
            pod.processes
        ),
        (
            Some("burstable"),
            Some(node.pod_container.as_str()),
            tcp.bytes_received,
            1
        ),
        "pod {}: (qos_class, container_id, network_rx_bytes, processes); the TCP server alone ran in it: {pod:#?}",
        node.pod_uid
    );
    // The docker container is in no pod: its client is in the null group.
    let rest = records
        .group(None)
        .unwrap_or_else(|| panic!("no null group: {:#?}", records.groups));
    assert!(
        rest.network_tx_bytes >= tcp.bytes_sent,
        "the null group (outside every pod) holds the client's {} bytes sent, yet has network_tx_bytes = {}",
        tcp.bytes_sent,
        rest.network_tx_bytes
    );
    node.remove();
}

#[test]
fn cgroups_are_groups() {
    let node = node();
    let (recording, tcp) = node.record("cgroup");
    let records = &recording.records;
    let path = node.root.relative_path_of(&node.pod_container_rel);
    let group = records
        .group(Some(&path))
        .unwrap_or_else(|| panic!("no group for cgroup {path}: {:#?}", records.groups));
    assert_eq!(
        (
            group.cgroup_path.as_deref(),
            group.pod_uid.as_deref(),
            group.network_rx_bytes,
            group.processes
        ),
        (
            Some(path.as_str()),
            Some(node.pod_uid.as_str()),
            tcp.bytes_received,
            1
        ),
        "cgroup {path}: (cgroup_path, pod_uid, network_rx_bytes, processes): {group:#?}"
    );
    assert!(
        records.group(None).is_none_or(|g| g.cgroup_id.is_none()),
        "every process is in some cgroup, so a null cgroup group can only be ones whose cgroup is unknown: {:#?}",
        records.group(None)
    );
    node.remove();
}

#[test]
fn workloads_are_groups() {
    let node = node();
    let (recording, tcp) = node.record("workload");
    let records = &recording.records;
    assert!(
        records.group(None).is_none(),
        "every process has a workload key, yet there is a null group: {:#?}",
        records.group(None)
    );
    let pod_container = format!("container:{}", node.pod_container);
    let docker = format!("container:{}", node.docker);
    let (server, client) = (
        records
            .group(Some(&pod_container))
            .unwrap_or_else(|| panic!("no group {pod_container}: {:#?}", records.groups)),
        records
            .group(Some(&docker))
            .unwrap_or_else(|| panic!("no group {docker}: {:#?}", records.groups)),
    );
    assert_eq!(
        (server.network_rx_bytes, client.network_tx_bytes),
        (tcp.bytes_received, tcp.bytes_sent),
        "(rx of {pod_container}, tx of {docker}): the server and client ran in them"
    );
    // The tcp parent stayed on the host: a plain process is its own workload.
    let parent = format!("process:{}", tcp.parent_pid);
    let host = records.group(Some(&parent)).unwrap_or_else(|| {
        panic!(
            "no group {parent} for the tcp parent on the host; groups: {:#?}",
            records.groups
        )
    });
    assert_eq!(
        (
            host.processes,
            host.workload_kind.as_deref(),
            host.container_id.as_deref()
        ),
        (1, Some("process"), None),
        "group {parent}: (processes, workload_kind, container_id): {host:#?}"
    );
    node.remove();
}

#[test]
fn processes_are_groups() {
    let node = node();
    let (recording, tcp) = node.record("process");
    let records = &recording.records;
    // A group per process instance: each holds exactly one.
    let crowded: Vec<_> = records.groups.iter().filter(|g| g.processes != 1).collect();
    assert!(
        crowded.is_empty(),
        "--group-by process: groups with other than one process: {crowded:#?}"
    );
    // The server and the client each appear as one group with their own traffic.
    // (Their identity fields are null: each was in the host's cgroup for a moment
    // after fork, then in its container's.)
    for (what, bytes, received) in [
        ("server", tcp.bytes_received, true),
        ("client", tcp.bytes_sent, false),
    ] {
        let traffic = |g: &GroupRecord| {
            if received {
                g.network_rx_bytes
            } else {
                g.network_tx_bytes
            }
        };
        let carrying: Vec<_> = records
            .groups
            .iter()
            .filter(|g| traffic(g) == bytes)
            .collect();
        assert_eq!(
            carrying.len(),
            1,
            "--group-by process: not exactly one group with the TCP {what}'s {bytes} bytes; groups: {:#?}",
            records.groups
        );
    }
    node.remove();
}

#[test]
fn an_unknown_group_key_is_a_usage_error() {
    let output = run_agent(["record", "--group-by", "bogus"], Duration::from_secs(30))
        .expect("running mentat-agent record --group-by bogus");
    assert_eq!(
        output.exit_code,
        Some(2),
        "--group-by bogus is a usage error; {}",
        output.describe()
    );
    assert!(
        output.stderr.contains("bogus"),
        "--group-by bogus: stderr does not name the value: {}",
        output.stderr
    );
}
