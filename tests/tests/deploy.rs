//! deploy/: the Kubernetes manifests validate offline against the Kubernetes schemas
//! (PyPI `kubernetes-validate`), the DaemonSet keeps the least-privilege model it
//! documents, the agent config it ships passes the real agent's `config check` (and a
//! broken one is refused at the right line), environment variables override config
//! keys by one rule, the Grafana dashboard and the Prometheus rules only query metrics
//! the agent exports, the rules pass `promtool check rules` and their own unit tests
//! (`promtool test rules`) and the PrometheusRule holds the same groups, and
//! the least-privilege claim holds for real: the agent, as root with every capability
//! but the DaemonSet's list dropped (`setpriv`), attaches its probes and meters another
//! user's workload exactly, and without CAP_BPF it refuses, naming it.
//!
//! No cluster: the manifests are rendered with `kubectl kustomize` where kubectl is
//! installed, and otherwise read from the files kustomization.yaml lists (the
//! ConfigMap generator is then expanded here, without kustomize's name hash).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use mentat_tests::daemon::{Daemon, DaemonOptions, LedgerDir, poll, run_workload};
use mentat_tests::{run_agent, run_agent_env};
use serde_json::{Value, json};

/// The oldest Kubernetes the manifests support (securityContext.appArmorProfile is a
/// field from 1.30 on), and the newest `kubernetes-validate` ships schemas for.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.30.0", "1.37.0"];

/// The capabilities the DaemonSet adds: exactly these, with ALL dropped.
const CAPABILITIES: [&str; 5] = [
    "BPF",
    "PERFMON",
    "SYS_RESOURCE",
    "SYS_PTRACE",
    "DAC_READ_SEARCH",
];

/// Host paths the agent only reads, and where they are mounted.
const READ_ONLY_HOST_PATHS: [&str; 2] = ["/sys/kernel/btf", "/sys/fs/cgroup"];

/// Host paths the agent writes: the ledger only (it pins no BPF object, so bpffs is not mounted).
const WRITABLE_HOST_PATHS: [&str; 1] = ["/var/lib/mentat-agent"];

const CONFIG_CHECK_TIMEOUT: Duration = Duration::from_secs(30);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy")
}

/// YAML (one or more documents) to JSON values, through PyYAML (a dependency of
/// kubernetes-validate, so present wherever this test can pass).
fn yaml_documents(text: &str, what: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 (run `cargo xtask setup`)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("writing YAML to python3");
    let out = child.wait_with_output().expect("python3 yaml");
    assert!(
        out.status.success(),
        "{what} is not valid YAML: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python3 printed JSON")
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn kubectl() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kubectl"))
            .find(|p| p.is_file())
    })
}

/// Every object `kubectl apply -k deploy/` would apply.
fn rendered() -> Vec<Value> {
    let dir = deploy_dir();
    if let Some(kubectl) = kubectl() {
        let out = Command::new(kubectl)
            .arg("kustomize")
            .arg(&dir)
            .output()
            .expect("running kubectl kustomize");
        assert!(
            out.status.success(),
            "kubectl kustomize deploy/ failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return yaml_documents(
            &String::from_utf8_lossy(&out.stdout),
            "kubectl kustomize output",
        );
    }
    // No kubectl: the files kustomization.yaml names, plus its ConfigMap generator.
    let k = yaml_documents(&read(&dir.join("kustomization.yaml")), "kustomization.yaml");
    let k = &k[0];
    let namespace = k["namespace"].as_str().map(str::to_owned);
    let mut docs = Vec::new();
    for r in k["resources"].as_array().expect("kustomization resources") {
        let file = r.as_str().expect("resource path");
        docs.extend(yaml_documents(&read(&dir.join(file)), file));
    }
    for g in k["configMapGenerator"].as_array().into_iter().flatten() {
        let mut data = serde_json::Map::new();
        for f in g["files"].as_array().expect("generator files") {
            let f = f.as_str().expect("file entry");
            let (key, file) = f.split_once('=').unwrap_or((f, f));
            data.insert(key.to_owned(), Value::String(read(&dir.join(file))));
        }
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": g["name"], "namespace": namespace},
            "data": data,
        }));
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn only<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(
        found.len(),
        1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    found[0]
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn write_temp(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    path
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let docs = rendered();
    assert!(docs.len() >= 8, "only {} objects rendered", docs.len());
    let dir = tempfile::tempdir().expect("tempdir");
    // One file per object, named after it, so a failure names the object.
    let mut files = Vec::new();
    for (i, d) in docs.iter().enumerate() {
        let name = format!(
            "{i:02}-{}-{}.json",
            d["kind"].as_str().unwrap_or("unknown"),
            d["metadata"]["name"].as_str().unwrap_or("unnamed")
        );
        files.push(write_temp(dir.path(), &name, &d.to_string()));
    }
    for version in KUBERNETES_VERSIONS {
        let out = Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
            ])
            .args(&files)
            .output()
            .expect("python3 -m kubernetes_validate (run `cargo xtask setup`)");
        assert!(
            out.status.success(),
            "the manifests do not validate against Kubernetes {version}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And the validator does refuse a broken object: a DaemonSet with an unknown field.
    let mut bad = only(&docs, "DaemonSet").clone();
    bad["spec"]["template"]["spec"]["hostPid"] = json!(true);
    let bad_file = write_temp(dir.path(), "bad.json", &bad.to_string());
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
        .arg(KUBERNETES_VERSIONS[0])
        .arg(&bad_file)
        .output()
        .expect("python3 -m kubernetes_validate");
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout).contains("hostPid"),
        "kubernetes-validate accepted a DaemonSet with an unknown field: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_daemonset_keeps_the_least_privilege_model() {
    let docs = rendered();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Secret",
        "DaemonSet",
        "Service",
        "NetworkPolicy",
    ] {
        assert!(
            !find(&docs, kind).is_empty(),
            "no {kind} in the rendered manifests"
        );
    }
    let ds = only(&docs, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(
        pod["hostPID"], true,
        "the agent needs the host's PID namespace"
    );
    assert_ne!(
        pod["hostNetwork"], true,
        "hostNetwork is not needed (hostPort is)"
    );
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    assert!(pod["initContainers"].is_null(), "no init containers");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(
        sc["privileged"], false,
        "privileged must be explicitly false"
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(
        strings(&sc["capabilities"]["drop"]),
        BTreeSet::from(["ALL".to_owned()])
    );
    let added = sc["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add");
    let added_set = strings(&sc["capabilities"]["add"]);
    assert_eq!(
        added.len(),
        added_set.len(),
        "a capability is added twice: {added:?}"
    );
    assert_eq!(
        added_set,
        CAPABILITIES
            .iter()
            .map(|s| (*s).to_owned())
            .collect::<BTreeSet<_>>(),
        "the added capabilities must be exactly the agent's list"
    );
    assert!(pod["securityContext"]["sysctls"].is_null());

    // Host paths: the read-only ones mounted read-only, the writable ones the only
    // others, and no other host path at all.
    let volumes = pod["volumes"].as_array().expect("volumes");
    let host_paths: BTreeMap<String, String> = volumes
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .map(|v| {
            (
                v["name"].as_str().expect("volume name").to_owned(),
                v["hostPath"]["path"]
                    .as_str()
                    .expect("hostPath path")
                    .to_owned(),
            )
        })
        .collect();
    let mut expected: BTreeSet<&str> = READ_ONLY_HOST_PATHS.into_iter().collect();
    expected.extend(WRITABLE_HOST_PATHS);
    assert_eq!(
        host_paths
            .values()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        expected,
        "host paths"
    );
    let mounts = c["volumeMounts"].as_array().expect("volumeMounts");
    for (volume, path) in &host_paths {
        let m = mounts
            .iter()
            .find(|m| m["name"] == volume.as_str())
            .unwrap_or_else(|| panic!("host path {path} is not mounted"));
        assert_eq!(
            m["mountPath"],
            path.as_str(),
            "{path} is mounted where the agent looks"
        );
        if READ_ONLY_HOST_PATHS.contains(&path.as_str()) {
            assert_eq!(m["readOnly"], true, "{path} must be mounted readOnly");
        }
    }
    for m in mounts {
        let volume = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("every mount has a volume");
        let writable = volume["emptyDir"].is_object()
            || volume["hostPath"]["path"]
                .as_str()
                .is_some_and(|p| WRITABLE_HOST_PATHS.contains(&p));
        if !writable {
            assert_eq!(
                m["readOnly"], true,
                "mount {} must be readOnly",
                m["mountPath"]
            );
        }
    }

    // Downward API, probes, scheduling, rollout, resources, ports.
    let env = c["env"].as_array().expect("env");
    let field = |name: &str| {
        env.iter()
            .find(|e| e["name"] == name)
            .map(|e| e["valueFrom"]["fieldRef"]["fieldPath"].clone())
            .unwrap_or(Value::Null)
    };
    assert_eq!(field("NODE_NAME"), "spec.nodeName");
    assert_eq!(field("HOST_IP"), "status.hostIP");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    let tolerations = pod["tolerations"].as_array().expect("tolerations");
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "a toleration for every taint: {tolerations:?}"
    );
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    for kind in ["requests", "limits"] {
        for r in ["cpu", "memory"] {
            assert!(
                c["resources"][kind][r].is_string(),
                "resources.{kind}.{r} is set"
            );
        }
    }
    let ports = c["ports"].as_array().expect("ports");
    for port in [4317, 4318] {
        assert!(
            ports
                .iter()
                .any(|p| p["containerPort"] == port && p["hostPort"] == port),
            "OTLP port {port} is a hostPort"
        );
    }
    assert!(
        ports
            .iter()
            .any(|p| p["containerPort"] == 9464 && p["hostPort"].is_null())
    );

    // OTLP Service stays on the node; the NetworkPolicy covers the API port.
    let otlp = find(&docs, "Service")
        .into_iter()
        .find(|s| {
            s["spec"]["ports"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["port"] == 4317))
        })
        .expect("a Service for OTLP");
    assert_eq!(otlp["spec"]["internalTrafficPolicy"], "Local");
    let np = only(&docs, "NetworkPolicy");
    assert_eq!(
        strings(&np["spec"]["policyTypes"]),
        BTreeSet::from(["Ingress".to_owned()])
    );
    let rules = np["spec"]["ingress"].as_array().expect("ingress rules");
    let api_rule = rules
        .iter()
        .find(|r| {
            r["ports"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["port"] == 9464))
        })
        .expect("an ingress rule for the API port");
    let from = api_rule["from"]
        .as_array()
        .expect("the API rule names its sources");
    assert!(
        !from.is_empty() && from.iter().all(|f| f["ipBlock"].is_null()),
        "the API is reachable only from pods in the cluster: {from:?}"
    );

    // RBAC is read-only, and pods are all it reads (the node name comes from the
    // downward API; nodes are never fetched).
    for role in find(&docs, "ClusterRole") {
        for rule in role["rules"].as_array().expect("rules") {
            assert_eq!(
                strings(&rule["resources"]),
                BTreeSet::from(["pods".to_owned()]),
                "ClusterRole {} reads more than pods",
                role["metadata"]["name"]
            );
            let verbs = strings(&rule["verbs"]);
            assert!(
                verbs.is_subset(&["get", "list", "watch"].map(str::to_owned).into()),
                "ClusterRole {} may do more than read: {verbs:?}",
                role["metadata"]["name"]
            );
        }
    }
}

/// The shipped config and price book, as the ConfigMap carries them, with the price
/// book's in-cluster path pointed at a copy in `dir`.
fn shipped_config(dir: &Path) -> (PathBuf, String) {
    let docs = rendered();
    let cm = find(&docs, "ConfigMap")
        .into_iter()
        .find(|c| c["data"]["config.toml"].is_string())
        .expect("a ConfigMap with config.toml");
    let config = cm["data"]["config.toml"]
        .as_str()
        .expect("config.toml")
        .to_owned();
    let pricing = cm["data"]["pricing.toml"]
        .as_str()
        .expect("the ConfigMap carries pricing.toml");
    let pricing_path = write_temp(dir, "pricing.toml", pricing);
    assert!(
        config.contains("pricing_path = \"/etc/mentat-agent/pricing.toml\""),
        "the config names the ConfigMap's price book"
    );
    let config = config.replace(
        "\"/etc/mentat-agent/pricing.toml\"",
        &format!("{:?}", pricing_path.display().to_string()),
    );
    (write_temp(dir, "config.toml", &config), config)
}

#[test]
fn config_check_accepts_the_shipped_config_and_refuses_broken_ones_at_their_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, text) = shipped_config(dir.path());
    let out = run_agent(
        ["config".as_ref(), "check".as_ref(), path.as_os_str()],
        CONFIG_CHECK_TIMEOUT,
    )
    .expect("mentat-agent config check");
    assert_eq!(
        out.exit_code,
        Some(0),
        "the ConfigMap's config.toml is refused:\n{text}\n{}{}",
        out.stdout,
        out.describe()
    );

    // Settings the DaemonSet relies on.
    for needle in [
        "bind = \"0.0.0.0:9464\"",
        "token_file = \"/var/run/secrets/mentat/api/token\"",
        "grpc_bind = \"0.0.0.0:4317\"",
        "http_bind = \"0.0.0.0:4318\"",
        "ledger_path = \"/var/lib/mentat-agent/",
    ] {
        assert!(text.contains(needle), "config.toml lacks {needle:?}");
    }

    // An unknown key on a known line, and a bad value: refused, naming that line.
    let lines = text.lines().count();
    let cases = [
        (format!("{text}\nbogus_key = 1\n"), lines + 2, "bogus_key"),
        (
            text.replacen("tick = \"1s\"", "tick = \"soon\"", 1),
            text.lines()
                .position(|l| l.starts_with("tick = "))
                .expect("a tick line")
                + 1,
            "soon",
        ),
    ];
    for (i, (broken, line, named)) in cases.iter().enumerate() {
        let path = write_temp(dir.path(), &format!("broken-{i}.toml"), broken);
        let out = run_agent(
            ["config".as_ref(), "check".as_ref(), path.as_os_str()],
            CONFIG_CHECK_TIMEOUT,
        )
        .expect("mentat-agent config check");
        let said = format!("{}{}", out.stdout, out.stderr);
        assert_eq!(
            out.exit_code,
            Some(1),
            "a broken config is refused with 1: {said}"
        );
        assert!(
            said.contains(&format!("line {line}")) && said.contains(named),
            "config check must name line {line} and {named:?}: {said}"
        );
    }

    // A broken price book in the ConfigMap is refused too.
    let pricing = dir.path().join("pricing.toml");
    let book = read(&pricing);
    fs::write(&pricing, format!("{book}\nnot_a_price_key = \"1\"\n")).expect("writing pricing");
    let out = run_agent(
        ["config".as_ref(), "check".as_ref(), path.as_os_str()],
        CONFIG_CHECK_TIMEOUT,
    )
    .expect("mentat-agent config check");
    assert_eq!(
        out.exit_code,
        Some(1),
        "a price book with an unknown key is refused: {}{}",
        out.stdout,
        out.stderr
    );
    assert!(
        format!("{}{}", out.stdout, out.stderr).contains("not_a_price_key"),
        "the refusal names the key: {}",
        out.stderr
    );

    // `config default` prints a config that `config check` accepts.
    let out = run_agent(["config", "default"], CONFIG_CHECK_TIMEOUT).expect("config default");
    assert_eq!(out.exit_code, Some(0), "{}", out.describe());
    let default = write_temp(dir.path(), "default.toml", &out.stdout);
    let out = run_agent(
        ["config".as_ref(), "check".as_ref(), default.as_os_str()],
        CONFIG_CHECK_TIMEOUT,
    )
    .expect("config check of the default");
    assert_eq!(
        out.exit_code,
        Some(0),
        "`config default` is refused: {}",
        out.describe()
    );
}

#[test]
fn environment_variables_override_config_keys_by_one_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = shipped_config(dir.path());
    let check = |env: &[(&str, &str)]| {
        run_agent_env(
            ["config".as_ref(), "check".as_ref(), path.as_os_str()],
            env,
            CONFIG_CHECK_TIMEOUT,
        )
        .expect("mentat-agent config check")
    };

    // `config check` checks the environment the agent would run with, and says
    // which variables took effect.
    let out = check(&[
        ("MENTAT_API__BIND", "127.0.0.1:19999"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
    ]);
    assert_eq!(out.exit_code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("MENTAT_API__BIND")
            && out.stdout.contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "config check lists the overrides: {}",
        out.stdout
    );
    for (var, value, named) in [
        ("MENTAT_API__BINDD", "127.0.0.1:1", "api.bindd"),
        ("MENTAT_PROC_MAP_ENTRIES", "lots", "lots"),
        ("MENTAT_TICK", "10ms", "100ms"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "5s", "5s"),
    ] {
        let out = check(&[(var, value)]);
        assert_eq!(
            out.exit_code,
            Some(1),
            "{var}={value} is refused: {}",
            out.describe()
        );
        assert!(
            out.stderr.contains(var) && out.stderr.contains(named),
            "the refusal names {var} and {named:?}: {}",
            out.stderr
        );
    }

    // The daemon runs with what the environment says: its file names the node
    // `NODE`, the variable another name, and the records carry the variable's.
    let ledger = LedgerDir::new().expect("ledger dir");
    let daemon = Daemon::start(
        &ledger,
        &DaemonOptions {
            env: vec![("MENTAT_NODE_NAME".into(), "node-from-env".into())],
            ..DaemonOptions::default()
        },
    )
    .expect("daemon starts");
    let from = mentat_tests::daemon::now_rfc3339();
    let mut records = Vec::new();
    poll(Duration::from_secs(20), || {
        records = daemon.records(&from, "2200-01-01T00:00:00Z")?;
        Ok(if records.is_empty() {
            Err("no window committed yet".to_string())
        } else {
            Ok(())
        })
    })
    .expect("the daemon commits windows");
    assert!(
        records.iter().all(|r| r.node == "node-from-env"),
        "records carry the overriding node name: {:?}",
        records.iter().map(|r| &r.node).collect::<BTreeSet<_>>()
    );
    let stopped = daemon.stop().expect("daemon stops");
    assert!(
        stopped.log.contains("overridden by MENTAT_NODE_NAME"),
        "the daemon says what overrode its config: {}",
        stopped.describe()
    );

    // A variable that names no key stops the daemon before it meters anything.
    let err = Daemon::start(
        &ledger,
        &DaemonOptions {
            env: vec![("MENTAT_NODENAME".into(), "x".into())],
            ..DaemonOptions::default()
        },
    )
    .expect_err("an unknown MENTAT_ variable is refused");
    assert!(
        format!("{err:#}").contains("MENTAT_NODENAME"),
        "the error names the variable: {err:#}"
    );
}

/// Every `mentat_*` metric name in a PromQL expression: an identifier followed by a
/// selector (`{` or `[`); label names (`mentat_cost_currency` in `by (…)`) are not.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut rest = expr;
    while let Some(at) = rest.find("mentat_") {
        let boundary = !rest[..at].ends_with(is_ident);
        let tail = &rest[at..];
        let end = tail.find(|c: char| !is_ident(c)).unwrap_or(tail.len());
        if boundary && tail[end..].starts_with(['{', '[']) {
            into.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
}

fn dashboard_queries() -> Vec<String> {
    let text = read(&deploy_dir().join("grafana-dashboard.json"));
    let dash: Value = serde_json::from_str(&text).expect("grafana-dashboard.json parses");
    assert!(dash["title"].is_string() && dash["uid"].is_string());
    let mut exprs = Vec::new();
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if (k == "expr" || k == "definition") && v.is_string() {
                        out.push(v.as_str().unwrap_or_default().to_owned());
                    } else {
                        walk(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    walk(&dash, &mut exprs);
    let titles: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .filter_map(|p| p["title"].as_str().map(str::to_lowercase))
        .collect();
    for wanted in [
        "namespace",
        "pod",
        "agent",
        "runs",
        "gpu",
        "drops",
        "alerts",
        "export lag",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}: {titles:?}"
        );
    }
    exprs
}

/// Every `mentat_*` metric a rule's expression names: whole identifiers (a recording
/// rule's `level:metric:op` name is not one), wherever they stand.
fn rule_metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    for token in expr.split(|c: char| !is_ident(c)) {
        if token.starts_with("mentat_") && !token.contains(':') {
            into.insert(token.to_owned());
        }
    }
}

/// The rule groups of deploy/prometheus-rules.yaml.
fn rule_groups() -> Value {
    let docs = yaml_documents(
        &read(&deploy_dir().join("prometheus-rules.yaml")),
        "prometheus-rules.yaml",
    );
    docs[0]["groups"].clone()
}

#[test]
fn the_prometheus_rules_check_pass_their_unit_tests_and_ship_as_a_prometheusrule() {
    let dir = deploy_dir();
    for args in [
        vec!["check", "rules", "prometheus-rules.yaml"],
        vec!["test", "rules", "prometheus-rules.test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("running promtool (Debian's prometheus package)");
        assert!(
            out.status.success(),
            "promtool {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let groups = rule_groups();
    let alerts: BTreeSet<&str> = groups
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "MentatAgentNotCommitting",
        "MentatAgentCommitFailures",
        "MentatAgentUsageDropped",
        "MentatAgentExportLag",
        "MentatAgentOverhead",
    ] {
        assert!(alerts.contains(wanted), "no {wanted} rule: {alerts:?}");
    }
    // The alerts whose logic is not a bare `increase > 0` are unit-tested.
    let tests = read(&dir.join("prometheus-rules.test.yaml"));
    for alert in [
        "MentatAgentNotCommitting",
        "MentatAgentUsageDropped",
        "MentatAgentExportLag",
        "MentatAgentOverhead",
        "MentatAgentAlertNotificationsFailing",
    ] {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "prometheus-rules.test.yaml does not test {alert}"
        );
    }
    let crd = &yaml_documents(
        &read(&dir.join("prometheusrule.yaml")),
        "prometheusrule.yaml",
    )[0];
    assert_eq!(crd["kind"], "PrometheusRule");
    assert_eq!(
        crd["spec"]["groups"], groups,
        "prometheusrule.yaml's groups differ from prometheus-rules.yaml's"
    );
}

#[test]
fn the_dashboard_and_the_rules_query_only_metrics_the_agent_exports() {
    let mut names = BTreeSet::new();
    for e in dashboard_queries() {
        metric_names(&e, &mut names);
    }
    assert!(
        names.len() >= 5,
        "the dashboard queries too few metrics: {names:?}"
    );
    for rule in rule_groups()
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
    {
        rule_metric_names(rule["expr"].as_str().expect("expr"), &mut names);
    }

    // A running agent's /metrics, after it metered some CPU.
    let dir = LedgerDir::new().expect("ledger dir");
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("daemon starts");
    run_workload(&["burn", "--threads", "1", "--ms", "300"]).expect("burn");
    let source = read(&repo_root().join("agent/src/serve/prometheus.rs"))
        + &read(&repo_root().join("agent/src/serve/export.rs"))
        + &read(&repo_root().join("agent/src/alert/notify/mod.rs"));
    // A family appears only once it is non-zero: GPU time needs a GPU, and memory
    // needs a second reading of some process (the first only sets where its
    // integral starts), so the families are awaited, not read after one window.
    let missing = |exposed: &str| -> Vec<String> {
        names
            .iter()
            .filter(|name| !exposed.contains(&format!("# TYPE {name} ")))
            // GPU time needs a GPU, the OTLP families an OTLP endpoint, the
            // notification families an alert channel: those must at least be
            // what the agent's source names.
            .filter(|name| {
                !((name.as_str() == "mentat_gpu_seconds_total"
                    || name.starts_with("mentat_agent_otlp_")
                    || name.starts_with("mentat_agent_alert_notification"))
                    && source.contains(&format!("\"{name}\"")))
            })
            .cloned()
            .collect()
    };
    let mut exposed = String::new();
    let waited = poll(Duration::from_secs(30), || {
        exposed = daemon.metrics()?;
        Ok(if missing(&exposed).is_empty() {
            Ok(())
        } else {
            Err("dashboard families missing".into())
        })
    });
    assert!(
        waited.is_ok(),
        "the dashboard queries {:?}, which the agent does not export:\n{exposed}",
        missing(&exposed)
    );
    drop(daemon);
}

#[test]
fn the_collector_prometheus_and_servicemonitor_configs_parse() {
    let dir = deploy_dir();
    let collector = &yaml_documents(
        &read(&dir.join("otel-collector.yaml")),
        "otel-collector.yaml",
    )[0];
    for pipeline in collector["service"]["pipelines"]
        .as_object()
        .expect("pipelines")
        .values()
    {
        for kind in ["receivers", "processors", "exporters"] {
            for name in pipeline[kind].as_array().into_iter().flatten() {
                let name = name.as_str().expect("component name");
                assert!(
                    collector[kind][name].is_object() || collector[kind].get(name).is_some(),
                    "pipeline uses {kind} {name}, which is not defined"
                );
            }
        }
    }
    assert!(collector["exporters"]["prometheusremotewrite"].is_object());
    let scrape = &yaml_documents(
        &read(&dir.join("prometheus-scrape.yaml")),
        "prometheus-scrape.yaml",
    )[0];
    assert_eq!(scrape["scrape_configs"][0]["job_name"], "mentat-agent");
    let sm = &yaml_documents(
        &read(&dir.join("servicemonitor.yaml")),
        "servicemonitor.yaml",
    )[0];
    assert_eq!(sm["kind"], "ServiceMonitor");
    assert_eq!(sm["spec"]["endpoints"][0]["port"], "api");
    // The ServiceMonitor selects the metrics Service and names an existing port.
    let docs = rendered();
    let selector = sm["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels");
    let svc = find(&docs, "Service")
        .into_iter()
        .find(|s| {
            selector
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k] == v)
        })
        .expect("a Service the ServiceMonitor selects");
    assert!(
        svc["spec"]["ports"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["name"] == "api")),
        "the selected Service has an `api` port"
    );
}

#[test]
fn the_dockerfile_builds_with_the_build_script() {
    // `cargo xtask test` builds the agent the tests run with deploy/build-agent.sh
    // (stage b), so the script is exercised on every run; this test holds the
    // Dockerfile's build stage to doing nothing the script does not.
    let dockerfile = read(&deploy_dir().join("Dockerfile"));
    let build_stage = dockerfile
        .split("\nFROM ")
        .find(|stage| stage.contains(" AS build"))
        .expect("a build stage (FROM ... AS build)");
    // RUN instructions, continuation lines joined.
    let runs: Vec<String> = build_stage
        .replace("\\\n", " ")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("RUN "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    let script = read(&deploy_dir().join("build-agent.sh"));
    for run in &runs {
        let covered = if run.starts_with("rustup toolchain install") {
            // The script installs the nightly and rust-src itself where missing.
            script.contains("rustup toolchain install") && script.contains("rust-src")
        } else {
            run.contains("sh deploy/build-agent.sh")
                && run.split("&&").skip(1).all(|step| {
                    step.trim()
                        .starts_with("install -D -m 0755 target/release/mentat-agent")
                })
        };
        assert!(
            covered,
            "the build stage's `RUN {run}` is not what deploy/build-agent.sh does"
        );
    }
    assert!(
        runs.iter().any(|r| r.contains("sh deploy/build-agent.sh")),
        "the build stage runs deploy/build-agent.sh: {runs:?}"
    );
    let xtask = read(&repo_root().join("xtask/src/test.rs"));
    assert!(
        xtask.contains("deploy/build-agent.sh"),
        "cargo xtask test builds the agent with the image's script"
    );
    let out = Command::new("sh")
        .arg("-n")
        .arg(deploy_dir().join("build-agent.sh"))
        .output()
        .expect("sh -n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        repo_root().join("deploy/Dockerfile.dockerignore").is_file(),
        "the build context (the repository root) has its ignore file next to the Dockerfile"
    );
}

/// Capability numbers (linux/capability.h) of the names the DaemonSet uses.
fn capability_bit(name: &str) -> u32 {
    match name {
        "DAC_READ_SEARCH" => 2,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("no capability number for {other}"),
    }
}

/// A capability set (`CapEff:` and friends) from a /proc/<pid>/status.
fn status_caps(pid: u32, field: &str) -> u64 {
    let status = read(Path::new(&format!("/proc/{pid}/status")));
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {field}"));
    u64::from_str_radix(line.trim(), 16).expect("a hex capability set")
}

/// `setpriv` that leaves root (UID 0) with only `caps` as the bounding set, so the
/// exec'd agent's permitted and effective sets are `caps` ∩ what this test has, as
/// a container runtime gives a UID-0 container with `drop: [ALL]` and `add: caps`.
fn setpriv_with(caps: &[&str]) -> Vec<String> {
    let mut bounding = String::from("-all");
    for c in caps {
        bounding.push_str(&format!(",+{}", c.to_ascii_lowercase()));
    }
    [
        "setpriv",
        "--bounding-set",
        &bounding,
        "--inh-caps",
        "-all",
        "--",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn the_daemonsets_capabilities_are_enough_to_meter_another_users_workload() {
    let want: u64 = CAPABILITIES
        .iter()
        .map(|c| 1u64 << capability_bit(c))
        .fold(0, |a, b| a | b);
    // Where this test itself runs without one of them (some sandboxes lack
    // CAP_SYS_RESOURCE, which kernels from 5.11 on do not need), the agent gets
    // the rest: the claim is that nothing beyond the list is needed.
    let have = status_caps(std::process::id(), "CapBnd");
    let expected = want & have;
    assert!(
        expected & (1 << capability_bit("BPF")) != 0
            && expected & (1 << capability_bit("PERFMON")) != 0,
        "this test needs CAP_BPF and CAP_PERFMON in its own bounding set ({have:#x})"
    );

    let ledger = LedgerDir::new().expect("ledger dir");
    let daemon = Daemon::start(
        &ledger,
        &DaemonOptions {
            wrapper: setpriv_with(&CAPABILITIES),
            ..DaemonOptions::default()
        },
    )
    .expect("the agent starts with only the DaemonSet's capabilities");
    let pid = daemon.pid().expect("daemon pid");
    let eff = status_caps(pid, "CapEff");
    assert_eq!(
        eff, expected,
        "the agent runs with exactly the DaemonSet's capabilities ({eff:#x}, not {expected:#x})"
    );
    assert_eq!(
        eff & (1 << capability_bit("SYS_ADMIN")),
        0,
        "no CAP_SYS_ADMIN"
    );

    // A workload of another user (nobody), whose /proc/<pid>/exe and environ only
    // CAP_SYS_PTRACE opens to the agent, with its run context in its environment.
    let dir = tempfile::tempdir().expect("tempdir");
    let workload = dir.path().join("workload");
    fs::copy(mentat_tests::workload_bin().expect("workload"), &workload).expect("copy workload");
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let run_id = format!("least-privilege-{}", std::process::id());
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(&workload)
        .args(["burn", "--threads", "1", "--ms", "700"])
        .env(
            "OTEL_RESOURCE_ATTRIBUTES",
            format!("flow.run_id={run_id},agent.id=unprivileged"),
        )
        .stdin(Stdio::null())
        .output()
        .expect("setpriv workload");
    assert!(
        out.status.success(),
        "workload as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let burn: mentat_tests::truth::Burn = serde_json::from_str(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a ground-truth line"),
    )
    .expect("Burn JSON");

    let exited_at = time::OffsetDateTime::now_utc();
    let from = mentat_tests::daemon::rfc3339(daemon.started);
    let mine: Vec<_> = daemon
        .records_once_past(&from, exited_at, Duration::from_secs(30))
        .expect("the burner's windows are committed")
        .into_iter()
        .filter(|r| r.pid == Some(burn.child_pid))
        .collect();
    assert!(
        !mine.is_empty(),
        "no records of the burner (pid {})",
        burn.child_pid
    );
    let cpu_ns = mentat_tests::daemon::cpu_ns_of(&mine, burn.child_pid).expect("CPU") as f64;
    let truth = burn.rusage_cpu_ns as f64;
    // 2 %: the agent meters a burner within 1 % of wait4 with every capability
    // (tests/cpu.rs); fewer capabilities must not cost accuracy beyond that.
    assert!(
        (cpu_ns - truth).abs() <= 0.02 * truth,
        "CPU of nobody's burner (pid {}): agent {cpu_ns} ns, wait4 {truth} ns",
        burn.child_pid
    );
    for r in &mine {
        assert_eq!(
            r.raw["run_id"],
            json!(run_id),
            "the run context read from nobody's environ: {}",
            r.raw
        );
        assert!(
            r.raw["exe"]
                .as_str()
                .is_some_and(|e| e.ends_with("/workload")),
            "nobody's executable path is read: {}",
            r.raw
        );
    }
    let stopped = daemon.stop().expect("daemon stops");
    assert!(stopped.status.success(), "{}", stopped.describe());
}

#[test]
fn without_cap_bpf_the_agent_refuses_naming_it() {
    let without: Vec<&str> = CAPABILITIES.into_iter().filter(|c| *c != "BPF").collect();
    for args in [&["run"][..], &["check"][..]] {
        let wrapper = setpriv_with(&without);
        let out = Command::new(&wrapper[0])
            .args(&wrapper[1..])
            .arg(mentat_tests::agent_bin().expect("agent"))
            .args(args)
            .env("MENTAT_LEDGER_PATH", "/nonexistent/never-opened.db")
            .stdin(Stdio::null())
            .output()
            .expect("setpriv agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "`mentat-agent {}` without CAP_BPF exits 2: {stderr}",
            args.join(" ")
        );
        assert!(
            stderr.contains("missing capability CAP_BPF ("),
            "`mentat-agent {}` names CAP_BPF (and only it): {stderr}",
            args.join(" ")
        );
    }
}
