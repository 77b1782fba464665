//! Containers and pods: a process in a cgroup named the way a container runtime or the
//! kubelet names it is recorded with that container's id and runtime, its pod's UID and
//! QoS class, and the right workload kind.
//!
//! Real runtimes cannot run here (podman fails on setrlimit, crun refuses hybrid
//! cgroups), so each test builds a container the way runtimes do: fresh namespaces from
//! `unshare` (util-linux), the process pid 1 of its own pid namespace with its own
//! /proc, moved into a cgroup v2 directory with the runtime's naming, nested as on a
//! real node. Ids are random per run, and every tree sits under one unique top-level
//! scratch cgroup, so nothing collides with a real runtime's directories; the agent
//! resolves the innermost match, so the scratch prefix does not hide the layout.

use std::ffi::OsString;

use mentat_tests::truth::CgroupMove;
use mentat_tests::{
    ScratchCgroup, percent_off, random_container_id, random_pod_uid, record_command, workload_bin,
};

/// What the agent must say about a process in the cgroup at `path`.
struct Expected<'a> {
    /// Below the scratch root, e.g. `system.slice/docker-<id>.scope`.
    path: String,
    workload_kind: &'a str,
    container_id: Option<&'a str>,
    container_runtime: Option<&'a str>,
    pod_uid: Option<&'a str>,
    qos_class: Option<&'a str>,
}

/// Runs `workload cgroup --path <scratch>/<path> --ms 200` as pid 1 of fresh pid, mount
/// (with its own /proc), UTS and IPC namespaces, under the agent, and checks its records.
fn assert_recorded_as(expected: &Expected) {
    const MS: u64 = 200;
    let root = ScratchCgroup::create().expect("creating the scratch root cgroup");
    let dir = root
        .create_child(&expected.path)
        .unwrap_or_else(|e| panic!("creating the container's cgroup: {e:#}"));
    let command: Vec<OsString> = vec![
        mentat_tests::unshare_bin().into(),
        "--fork".into(),
        "--pid".into(),
        "--mount-proc".into(),
        "--uts".into(),
        "--ipc".into(),
        workload_bin().expect("the workload binary").into(),
        "cgroup".into(),
        "--path".into(),
        dir.clone().into(),
        "--ms".into(),
        MS.to_string().into(),
    ];
    let recording = record_command(&[], Some(&command))
        .unwrap_or_else(|e| panic!("recording the container in {}: {e:#}", dir.display()));
    recording
        .output
        .ensure_success(&recording.invocation)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let truth: CgroupMove = recording.ground_truth().expect("cgroup's ground truth");
    // The workload saw itself as pid 1: it really ran in a pid namespace of its own.
    assert_eq!(
        truth.pid, 1,
        "the workload is not pid 1 of a new pid namespace"
    );

    let expected_path = root.relative_path_of(&expected.path);
    let records = recording.records.in_cgroup(truth.cgroup_id);
    assert!(
        !records.is_empty(),
        "no record in the container's cgroup {expected_path} (id {}); records: {:#?}",
        truth.cgroup_id,
        recording.records.processes
    );
    for record in &records {
        // Records carry pids as the node sees them, not the namespace's pid 1.
        assert_ne!(
            record.pid, 1,
            "a record of the container's process carries its in-namespace pid: {record:#?}"
        );
        let got = (
            record.cgroup_path.as_deref(),
            record.workload_kind.as_str(),
            record.container_id.as_deref(),
            record.container_runtime.as_deref(),
            record.pod_uid.as_deref(),
            record.qos_class.as_deref(),
        );
        let want = (
            Some(expected_path.as_str()),
            expected.workload_kind,
            expected.container_id,
            expected.container_runtime,
            expected.pod_uid,
            expected.qos_class,
        );
        assert_eq!(
            got, want,
            "(cgroup_path, workload_kind, container_id, container_runtime, pod_uid, qos_class) \
             of the process in {expected_path}: agent (left) vs the layout (right); record: {record:#?}"
        );
    }

    // The container is charged its CPU: at least 90 % of the process's rusage, as in
    // cgroup.rs (it spent a few ms in the host cgroup before moving, then burned 200 ms).
    let cpu_ns: u64 = records.iter().map(|r| r.cpu_ns).sum();
    assert!(
        cpu_ns as f64 >= 0.9 * truth.rusage_cpu_ns as f64,
        "the container in {expected_path} was charged {cpu_ns} ns, {:+.1} % off its getrusage of {} ns",
        percent_off(cpu_ns, truth.rusage_cpu_ns),
        truth.rusage_cpu_ns
    );

    root.remove()
        .expect("removing the scratch cgroup tree (leaves first)");
}

fn ids() -> (String, String, String) {
    let id = random_container_id().expect("a random container id");
    let uid = random_pod_uid().expect("a random pod uid");
    // systemd reserves '-' in unit names for nesting; kubelet writes the UID with '_'.
    let uid_ = uid.replace('-', "_");
    (id, uid, uid_)
}

/// One cgroup layout a runtime or the kubelet writes, and what the agent must say about a
/// process in it; the ids are drawn per run by [`assert_layout`].
struct Layout {
    /// Below the scratch root, with `{id}` for the container id, `{uid}` for the pod UID
    /// and `{uid_}` for the UID as systemd unit names spell it.
    path: &'static str,
    workload_kind: &'static str,
    /// Whether the record carries the container id drawn for `{id}`.
    container: bool,
    container_runtime: Option<&'static str>,
    /// Whether the record carries the pod UID drawn for `{uid}`.
    pod: bool,
    qos_class: Option<&'static str>,
}

/// Draws fresh ids, builds `layout`'s cgroup path from them and checks the records.
fn assert_layout(layout: &Layout) {
    let (id, uid, uid_) = ids();
    assert_recorded_as(&Expected {
        path: layout
            .path
            .replace("{id}", &id)
            .replace("{uid_}", &uid_)
            .replace("{uid}", &uid),
        workload_kind: layout.workload_kind,
        container_id: layout.container.then_some(id.as_str()),
        container_runtime: layout.container_runtime,
        pod_uid: layout.pod.then_some(uid.as_str()),
        qos_class: layout.qos_class,
    });
}

/// One `#[test]` per row, named after its layout, so a failure names the layout and a
/// filter can run one.
macro_rules! layout_tests {
    ($($(#[doc = $doc:literal])* $name:ident: $layout:expr;)*) => {
        $(
            $(#[doc = $doc])*
            #[test]
            fn $name() {
                assert_layout(&$layout);
            }
        )*
    };
}

layout_tests! {
    docker_with_the_systemd_driver: Layout {
        path: "system.slice/docker-{id}.scope",
        workload_kind: "container",
        container: true,
        container_runtime: Some("docker"),
        pod: false,
        qos_class: None,
    };
    docker_with_the_cgroupfs_driver: Layout {
        path: "docker/{id}",
        workload_kind: "container",
        container: true,
        container_runtime: Some("docker"),
        pod: false,
        qos_class: None,
    };
    containerd_cri_under_kubelet_with_the_systemd_driver: Layout {
        path: "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope",
        workload_kind: "container",
        container: true,
        container_runtime: Some("containerd"),
        pod: true,
        qos_class: Some("burstable"),
    };
    cri_o_under_kubelet_with_the_systemd_driver: Layout {
        path: "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{id}.scope",
        workload_kind: "container",
        container: true,
        container_runtime: Some("cri-o"),
        pod: true,
        qos_class: Some("besteffort"),
    };
    podman_with_the_systemd_driver: Layout {
        path: "machine.slice/libpod-{id}.scope",
        workload_kind: "container",
        container: true,
        container_runtime: Some("podman"),
        pod: false,
        qos_class: None,
    };
    /// A bare id under the cgroupfs driver does not say which CRI runtime made it.
    kubelet_cgroupfs_driver_burstable: Layout {
        path: "kubepods/burstable/pod{uid}/{id}",
        workload_kind: "container",
        container: true,
        container_runtime: None,
        pod: true,
        qos_class: Some("burstable"),
    };
    kubelet_cgroupfs_driver_guaranteed: Layout {
        path: "kubepods/pod{uid}/{id}",
        workload_kind: "container",
        container: true,
        container_runtime: None,
        pod: true,
        qos_class: Some("guaranteed"),
    };
    a_pod_level_process_with_the_cgroupfs_driver: Layout {
        path: "kubepods/besteffort/pod{uid}",
        workload_kind: "pod",
        container: false,
        container_runtime: None,
        pod: true,
        qos_class: Some("besteffort"),
    };
    a_pod_level_process_with_the_systemd_driver: Layout {
        path: "kubepods.slice/kubepods-pod{uid_}.slice",
        workload_kind: "pod",
        container: false,
        container_runtime: None,
        pod: true,
        qos_class: Some("guaranteed"),
    };
    /// The runtime's daemon runs beside its containers, not in one; an agent matching
    /// "docker" or "containerd" anywhere in the path would call it a container.
    a_runtime_daemons_own_cgroup_is_no_container: Layout {
        path: "system.slice/containerd.service",
        workload_kind: "process",
        container: false,
        container_runtime: None,
        pod: false,
        qos_class: None,
    };
    /// Some shims write runc's systemd cgroup spec `slice:prefix:name` into the path as is
    /// instead of converting it to `slice/prefix-name.scope`: one directory whose name
    /// holds both the pod's slice and the container.
    a_systemd_slice_prefix_name_path_written_literally: Layout {
        path: "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice:cri-containerd:{id}",
        workload_kind: "container",
        container: true,
        container_runtime: Some("containerd"),
        pod: true,
        qos_class: Some("burstable"),
    };
}

/// A stand-in for the API server's pod list on loopback: answers every request with a
/// `PartialObjectMetadataList` naming one pod, and keeps each request's head.
struct FakeApiServer {
    url: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl FakeApiServer {
    fn start(uid: &str, namespace: &str, name: &str) -> FakeApiServer {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!(
            "http://{}/api/v1/pods?fieldSelector=spec.nodeName={{node}}",
            listener.local_addr().expect("addr")
        );
        let body = format!(
            r#"{{"kind":"PartialObjectMetadataList","apiVersion":"meta.k8s.io/v1","metadata":{{}},"items":[{{"kind":"PartialObjectMetadata","apiVersion":"meta.k8s.io/v1","metadata":{{"uid":"{uid}","name":"{name}","namespace":"{namespace}"}}}}]}}"#
        );
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let kept = heads.clone();
        // Detached: it serves until the test process exits.
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                kept.lock()
                    .expect("lock")
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeApiServer { url, heads }
    }
}

#[test]
fn pod_names_come_from_a_metadata_only_pod_list() {
    let (id, uid, _) = ids();
    let api = FakeApiServer::start(&uid, "shop", "web-0");
    let root = ScratchCgroup::create().expect("creating the scratch root cgroup");
    let dir = root
        .create_child(&format!("kubepods/burstable/pod{uid}/{id}"))
        .expect("the container's cgroup");
    let command: Vec<OsString> = vec![
        workload_bin().expect("the workload binary").into(),
        "cgroup".into(),
        "--path".into(),
        dir.clone().into(),
        "--ms".into(),
        "1500".into(),
    ];
    let recording = record_command(&["--k8s-pods-url", &api.url], Some(&command))
        .expect("recording the pod's container");
    let truth: CgroupMove = recording.ground_truth().expect("cgroup's ground truth");
    let records = recording.records.in_cgroup(truth.cgroup_id);
    assert!(!records.is_empty(), "no record in {}", dir.display());
    for r in &records {
        assert_eq!(
            (
                r.pod_uid.as_deref(),
                r.k8s_namespace.as_deref(),
                r.k8s_pod_name.as_deref()
            ),
            (Some(uid.as_str()), Some("shop"), Some("web-0")),
            "{r:#?}"
        );
    }
    let heads = api.heads.lock().expect("lock").clone();
    assert!(!heads.is_empty(), "the agent never asked for the pod list");
    for head in &heads {
        let accept = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("accept: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        // Metadata only: a full PodList carries every container's env values.
        assert!(
            accept.starts_with("application/json;as=partialobjectmetadatalist;g=meta.k8s.io;v=v1"),
            "the pod list was asked for without the metadata-only Accept: {head}"
        );
    }
    root.remove().expect("removing the scratch cgroups");
}
