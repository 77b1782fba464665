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
//! | Podman with cgroupns | systemd | `/machine.slice/libpod-<id>.scope/container` | id (sub-cgroups keep it) | podman | – |
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
//! | anything else | – | `/`, `/init.scope`, `/user.slice/user-0.slice/session-1.scope`, `/system.slice/containerd.service` | None | None | None |
//!
//! Components are read from the root down and the innermost identity wins: a
//! container keeps the pod above it; a pod clears any container above it (a pod
//! inside a kind node is not the node's container); a conmon scope clears the
//! container but keeps the pod; cgroups below a container (podman's
//! `container`, a systemd service inside a kind node) keep its id.
//!
//! A static pod's UID is kubelet's 32-hex config hash, not a UUID; it is what
//! kubelet names the pod's cgroup and reports as the pod's UID, so it is kept
//! verbatim rather than dropped or dressed up as a UUID.
//!
//! # WASM runtimes
//!
//! `wasmtime`, `wasmedge`, `wasmer`, Fermyon `spin`, and containerd shims named
//! `containerd-shim-<engine>-v<N>` for a WASM engine (runwasi's wasmtime,
//! wasmedge, wasmer, wamr; spin, slight, wws, lunatic), recognised from the exe
//! basename, argv[0]'s basename or comm, in that order: comm is cut to 15 bytes
//! by the kernel, so every shim shows there as `containerd-shim`.

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

    let mut found = CgroupIdentity::default();
    let mut parent: Option<&str> = None;
    let mut grandparent: Option<&str> = None;
    for component in path.split('/').filter(|c| !c.is_empty()) {
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

/// What one path component says about the processes below it.
enum Component {
    Pod { uid: String, qos: QosClass },
    Container { id: String, runtime: Option<Runtime> },
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
    if MONITOR_PREFIXES
        .iter()
        .any(|p| unit.strip_prefix(p).is_some_and(|rest| container_id(rest).is_some()))
    {
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
    let argv0_name = argv
        .first()
        .map(|a| String::from_utf8_lossy(basename(a)));
    let launcher = [exe_name, argv0_name.as_deref(), Some(comm)]
        .into_iter()
        .flatten()
        .find_map(launcher_of)?;

    // A script wrapper runs as `<interpreter> <script> args…` with the script's
    // name as comm until it execs the real binary, so its args start later.
    let own_position = argv
        .iter()
        .take(2)
        .position(|a| launcher_of(&String::from_utf8_lossy(basename(a))).as_ref() == Some(&launcher));
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
            flags: &["--allow-precompiled", "--disable-cache", "--disable-logging"],
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
