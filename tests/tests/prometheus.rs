//! Prometheus: Debian's `prometheus` scrapes the daemon's `/metrics` every second, and
//! PromQL through its HTTP API returns the expected series, with the values the agent
//! exposed, and no per-run, per-user, per-trace or per-process labels.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mentat_tests::daemon::{
    Daemon, DaemonOptions, LedgerDir, free_port, poll, run_workload, tcp_workload,
};
use mentat_tests::exact::close;
use mentat_tests::http;
use serde_json::Value;

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Label names a mentat_ series may carry: the agent's bounded ones (DESIGN.md: no
/// per-run or per-user ids) and the two Prometheus adds to every scraped series.
const ALLOWED_LABELS: [&str; 11] = [
    "__name__",
    "job",
    "instance",
    "kind",
    "namespace",
    "pod",
    "container",
    "direction",
    "model",
    "type",
    "currency",
];

/// Labels that would make the series count grow with runs, users, traces or processes.
const FORBIDDEN_LABELS: [&str; 14] = [
    "run",
    "run_id",
    "flow_id",
    "user",
    "user_id",
    "trace",
    "trace_id",
    "pid",
    "process_pid",
    "comm",
    "agent_id",
    "customer_id",
    "project_id",
    "record_id",
];

/// Prometheus parses each sample as the f64 nearest the exposed decimal, exactly as
/// this test does; the two sums differ only in the order the f64s are added (a few
/// ulps). 1e-9 relative is far above that, and far below one window's increment.
const REL: f64 = 1e-9;

/// A Prometheus server on loopback, storing in a temporary directory; killed on drop.
struct Prometheus {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, target_port: u16) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).is_file(),
            "{PROMETHEUS} is missing: install Debian's `prometheus` (cargo xtask setup)"
        );
        let config = dir.join("prometheus.yml");
        fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: mentat-agent\n    static_configs:\n      \
                 - targets: ['127.0.0.1:{target_port}']\n"
            ),
        )
        .expect("writing prometheus.yml");
        let port = free_port().expect("port");
        let log = dir.join("prometheus.log");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("prometheus log"))
            .spawn()
            .expect("starting prometheus");
        let p = Prometheus { child, port, log };
        poll(Duration::from_secs(30), || {
            let r = http::get(&format!("{}/-/ready", p.url()), &[], None)?;
            Ok(if r.status == 200 {
                Ok(())
            } else {
                Err(format!("/-/ready: HTTP {}", r.status))
            })
        })
        .unwrap_or_else(|e| panic!("prometheus not ready: {e:#}; log:\n{}", p.log()));
        p
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query's `data.result`.
    fn query(&self, promql: &str) -> Vec<Value> {
        let r = http::get(
            &format!("{}/api/v1/query", self.url()),
            &[("query", promql)],
            None,
        )
        .expect("querying prometheus");
        let body = r.json().expect("prometheus JSON");
        assert_eq!(body["status"], "success", "query {promql}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Σ of the exposition samples of `family` whose labels contain every `(k, v)` of
/// `with`, parsed as f64 each, as Prometheus does.
fn exposition_sum(text: &str, family: &str, with: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            (name == family
                && with
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

fn value_of(sample: &Value) -> f64 {
    sample[1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The raw samples of `selector` over the last `range`, summed per scrape (Prometheus
/// stamps every sample of one scrape with the scrape's time).
fn scrape_sums(prom: &Prometheus, selector: &str, range: &str) -> BTreeMap<i64, f64> {
    let mut sums: BTreeMap<i64, f64> = BTreeMap::new();
    for series in prom.query(&format!("{selector}[{range}]")) {
        for s in series["values"].as_array().into_iter().flatten() {
            let ms = (s[0].as_f64().unwrap_or(0.0) * 1000.0).round() as i64;
            *sums.entry(ms).or_default() += value_of(s);
        }
    }
    sums
}

/// Sets the flag when dropped.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[test]
fn promql_returns_the_series_and_values_the_agent_exposed() {
    let t0 = Instant::now();
    let dir = LedgerDir::new().expect("ledger dir");
    let daemon = Daemon::start(&dir, &DaemonOptions::default()).expect("daemon");
    let prom = Prometheus::start(dir.path(), daemon.port());

    // The agent's own /metrics, sampled every 100 ms: windows commit once a second, so
    // every value /metrics shows is seen here, and each Prometheus scrape must equal
    // one of them.
    let seen: Mutex<Vec<(i64, f64, f64)>> = Mutex::new(Vec::new());
    let done = AtomicBool::new(false);
    let give_up = Instant::now() + Duration::from_secs(120);
    let (tcp, sampled_from, sampled_to, cpu_now, rx_now, cpu_scrapes, rx_scrapes, series) =
        thread::scope(|s| {
            // Stops the sampler however this closure ends (a panic in it included:
            // the scope would otherwise wait for the sampler for ever).
            let _stop = StopOnDrop(&done);
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) && Instant::now() < give_up {
                    if let Ok(text) = daemon.metrics() {
                        let cpu = exposition_sum(&text, "mentat_cpu_seconds_total", &[]);
                        let rx = exposition_sum(
                            &text,
                            "mentat_network_bytes_total",
                            &[("direction", "receive")],
                        );
                        seen.lock().expect("lock").push((unix_ms(), cpu, rx));
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            });
            let sampled_from = unix_ms();
            let (_, tcp) = thread::scope(|w| {
                let burn = w.spawn(|| {
                    run_workload(&["burn", "--threads", "1", "--ms", "1500"]).expect("burn")
                });
                let tcp = w.spawn(|| tcp_workload(32 << 20).expect("tcp"));
                (
                    burn.join().expect("burn thread"),
                    tcp.join().expect("tcp thread"),
                )
            });
            // A few more scrapes after the workloads.
            poll(Duration::from_secs(30), || {
                let up = prom.query("up{job=\"mentat-agent\"}");
                Ok(match up.first().map(|s| value_of(&s["value"])) {
                    Some(1.0) => Ok(()),
                    other => Err(format!("up = {other:?}; prometheus log:\n{}", prom.log())),
                })
            })
            .expect("prometheus scraping the agent");
            thread::sleep(Duration::from_secs(4));
            let sampled_to = unix_ms();
            let cpu_now = prom.query("sum(mentat_cpu_seconds_total)");
            let rx_now = prom.query("sum(mentat_network_bytes_total{direction=\"receive\"})");
            let cpu_scrapes = scrape_sums(&prom, "mentat_cpu_seconds_total", "30s");
            let rx_scrapes = scrape_sums(
                &prom,
                "mentat_network_bytes_total{direction=\"receive\"}",
                "30s",
            );
            let series = {
                let r = http::get(
                    &format!("{}/api/v1/series", prom.url()),
                    &[("match[]", "{__name__=~\"mentat_.+\"}")],
                    None,
                )
                .expect("series");
                r.json().expect("series JSON")["data"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            };
            // The sampler ran through the queries; it stops as `_stop` drops.
            (
                tcp,
                sampled_from,
                sampled_to,
                cpu_now,
                rx_now,
                cpu_scrapes,
                rx_scrapes,
                series,
            )
        });
    let seen = seen.into_inner().expect("samples");
    let final_metrics = daemon.metrics().expect("/metrics");
    daemon.stop().expect("stopping the daemon");
    drop(prom);

    // The instant query: one series, a value /metrics showed.
    assert_eq!(cpu_now.len(), 1, "sum() gives one series: {cpu_now:?}");
    let cpu = value_of(&cpu_now[0]["value"]);
    let rx = rx_now.first().map_or(f64::NAN, |s| value_of(&s["value"]));
    let distinct = |which: fn(&(i64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = seen.iter().map(which).collect();
        v.dedup();
        v
    };
    let matches =
        |v: f64, which: fn(&(i64, f64, f64)) -> f64| seen.iter().any(|s| close(v, which(s), REL));
    assert!(
        matches(cpu, |s| s.1),
        "sum(mentat_cpu_seconds_total) = {cpu} is none of the values /metrics showed: {:?}",
        distinct(|s| s.1)
    );
    assert!(
        matches(rx, |s| s.2),
        "sum(mentat_network_bytes_total{{direction=\"receive\"}}) = {rx} is none of the values \
         /metrics showed: {:?}",
        distinct(|s| s.2)
    );
    assert!(
        rx >= tcp.bytes_received as f64,
        "Prometheus has {rx} B received, less than the {} B the tcp workload's server read",
        tcp.bytes_received
    );
    // Fresh: no older than the /metrics value from 3 s before the queries (1 s
    // scrapes of 1 s windows lag at most ~2 s).
    let recent = seen
        .iter()
        .rev()
        .find(|s| s.0 <= sampled_to - 3000)
        .map_or(0.0, |s| s.1);
    assert!(
        cpu >= recent,
        "sum(mentat_cpu_seconds_total) = {cpu} is older than /metrics' {recent} 3 s before"
    );

    // Every scrape while /metrics was being sampled equals a value /metrics showed.
    let window = (sampled_from + 500)..(sampled_to - 500);
    for (name, scrapes, which) in [
        (
            "mentat_cpu_seconds_total",
            &cpu_scrapes,
            (|s: &(i64, f64, f64)| s.1) as fn(&(i64, f64, f64)) -> f64,
        ),
        (
            "mentat_network_bytes_total{direction=\"receive\"}",
            &rx_scrapes,
            |s: &(i64, f64, f64)| s.2,
        ),
    ] {
        let inside: Vec<(&i64, &f64)> = scrapes
            .iter()
            .filter(|(ms, _)| window.contains(*ms))
            .collect();
        assert!(
            inside.len() >= 3,
            "only {} scrapes of {name} while /metrics was sampled ({scrapes:?})",
            inside.len()
        );
        let off: Vec<_> = inside
            .iter()
            .filter(|(_, v)| !matches(**v, which))
            .collect();
        assert!(
            off.is_empty(),
            "scrapes of {name} (ms, Σ) that /metrics never showed: {off:?}; /metrics showed {:?}",
            seen.iter().map(|s| (s.0, which(s))).collect::<Vec<_>>()
        );
    }

    // The series: expected labels, nothing unbounded.
    let mut families: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for s in &series {
        let name = s["__name__"].as_str().unwrap_or("?").to_string();
        families.entry(name).or_default().push(s);
        let labels: BTreeSet<&str> = s
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let forbidden: Vec<&&str> = labels
            .iter()
            .filter(|l| FORBIDDEN_LABELS.contains(l))
            .collect();
        assert!(forbidden.is_empty(), "series {s} has labels {forbidden:?}");
        let unknown: Vec<&&str> = labels
            .iter()
            .filter(|l| !ALLOWED_LABELS.contains(l))
            .collect();
        assert!(
            unknown.is_empty(),
            "series {s} has labels outside the bounded set {ALLOWED_LABELS:?}: {unknown:?}"
        );
    }
    let cpu_series = families
        .get("mentat_cpu_seconds_total")
        .unwrap_or_else(|| panic!("no mentat_cpu_seconds_total series: {families:?}"));
    // Prometheus drops empty labels: outside containers `namespace`, `pod` and
    // `container` are "" in the exposition and absent here.
    for s in cpu_series {
        for label in ["kind", "job", "instance"] {
            assert!(s.get(label).is_some(), "{s} lacks the label {label}");
        }
    }
    assert!(
        final_metrics.lines().any(|l| l.starts_with(
            "mentat_cpu_seconds_total{kind=\"process\",namespace=\"\",pod=\"\",container=\"\"}"
        )),
        "/metrics has no process series with the bounded label set: {final_metrics}"
    );
    assert!(
        cpu_series.iter().any(|s| s["kind"] == "process"),
        "no kind=\"process\" series: {cpu_series:?}"
    );
    // Dozens of processes ran (workloads, their children, this test), yet outside
    // containers the series are one per kind: processes, idle, kernel, irq_steal,
    // unattributed.
    assert!(
        cpu_series.len() <= 8,
        "{} mentat_cpu_seconds_total series: {cpu_series:?}",
        cpu_series.len()
    );
    let net = families
        .get("mentat_network_bytes_total")
        .unwrap_or_else(|| panic!("no mentat_network_bytes_total series"));
    assert!(
        net.iter().any(|s| s["direction"] == "receive")
            && net.iter().any(|s| s["direction"] == "transmit"),
        "network series by direction: {net:?}"
    );
    for family in ["mentat_cost_total", "mentat_agent_windows_total"] {
        assert!(
            families.contains_key(family),
            "no {family} series: {:?}",
            families.keys()
        );
    }
    println!(
        "prometheus: {} mentat_ series in {} families; cpu {cpu} s, rx {rx} B; {} scrapes matched \
         /metrics; final /metrics has {} lines; {:?}",
        series.len(),
        families.len(),
        cpu_scrapes.len(),
        final_metrics.lines().count(),
        t0.elapsed()
    );
}

/// The mentat_ usage series (not the agent's own `mentat_agent_*`) in an exposition.
fn usage_series(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("mentat_") && !l.starts_with("mentat_agent_"))
        .collect()
}

/// Series bounds end to end: 3,000 spans, each naming a different random model, do
/// not add a series per model (neither on /metrics nor in Prometheus, which scrapes
/// throughout), and a container that exited leaves /metrics and Prometheus' instant
/// queries once `series_grace` has passed.
#[test]
fn random_model_names_and_exited_containers_leave_the_series_bounded() {
    const MAX_SERIES: usize = 100;
    const SPANS: usize = 3_000;
    const TOKENS: u64 = 5;
    mentat_tests::traced::require_python_otel().expect("python OpenTelemetry packages");
    let dir = LedgerDir::new().expect("ledger dir");
    let grpc = free_port().expect("port");
    let http = free_port().expect("port");
    let metrics = format!("[metrics]\nmax_series = {MAX_SERIES}\nseries_grace = \"8s\"\n");
    let daemon =
        Daemon::start(&dir, &DaemonOptions::receiving("2s", grpc, http, &metrics)).expect("daemon");
    let prom = Prometheus::start(dir.path(), daemon.port());
    let since = unix_ms() as f64 / 1000.0;

    // A container: a process in a cgroup named as Docker's systemd driver names it.
    let id = mentat_tests::random_container_id().expect("container id");
    let root = mentat_tests::ScratchCgroup::create().expect("scratch cgroup");
    let cg = root
        .create_child(&format!("system.slice/docker-{id}.scope"))
        .expect("container cgroup");
    let label = format!("container=\"{id}\"");
    thread::scope(|s| {
        let cg = cg.to_string_lossy().into_owned();
        let burn = s.spawn(move || {
            run_workload(&["cgroup", "--path", &cg, "--ms", "1500"]).expect("container workload")
        });
        // The spans: 15 requests of 200, every span a model no book lists.
        let target = format!("127.0.0.1:{grpc}");
        let tokens = TOKENS.to_string();
        let summary = mentat_tests::traced::send_spans(
            &[
                "grpc",
                "--target",
                &target,
                "--spans",
                "200",
                "--requests",
                "15",
                "--tokens",
                &tokens,
                "--model",
                "random",
                "--span-ms",
                "100",
            ],
            Duration::from_secs(120),
        )
        .expect("py/otlp_client.py");
        assert_eq!(summary["spans_sent"], SPANS, "{summary}");
        burn.join().expect("burn thread");
    });

    // Every span's tokens reach /metrics, under one model value.
    let want = SPANS as u64 * TOKENS * 3;
    daemon
        .wait_counter(
            "mentat_agent_unpriced_tokens_total",
            Duration::from_secs(60),
            |got| got == want,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
    let text = daemon.metrics().expect("/metrics");
    let usage = usage_series(&text);
    let own = usage.iter().filter(|l| !l.contains("=\"other\"")).count();
    assert!(
        own <= MAX_SERIES,
        "{own} usage series on /metrics, above max_series {MAX_SERIES}"
    );
    assert!(
        !text.contains("model=\"m-"),
        "a random model name became a label value:\n{text}"
    );
    assert_eq!(
        exposition_sum(&text, "mentat_tokens_total", &[("model", "unpriced")]),
        (SPANS as u64 * TOKENS * 3) as f64,
        "{text}"
    );

    // The container's series: seen, then gone once it has been idle for the grace.
    poll(Duration::from_secs(60), || {
        let r = prom.query(&format!("mentat_cpu_seconds_total{{{label}}}"));
        Ok(if r.is_empty() {
            Err(format!("Prometheus has no series with {label} yet"))
        } else {
            Ok(())
        })
    })
    .unwrap_or_else(|e| panic!("{e:#}; /metrics:\n{}", daemon.metrics().unwrap_or_default()));
    root.remove().expect("removing the scratch cgroups");
    poll(Duration::from_secs(90), || {
        let text = daemon.metrics()?;
        Ok(if text.contains(&label) {
            Err(format!("/metrics still has {label}"))
        } else {
            Ok(())
        })
    })
    .expect("the exited container's series end");
    poll(Duration::from_secs(30), || {
        let r = prom.query(&format!("{{{label}}}"));
        Ok(if r.is_empty() {
            Ok(())
        } else {
            Err(format!("Prometheus still returns {r:?}"))
        })
    })
    .expect("Prometheus marks the ended series stale");
    let text = daemon.metrics().expect("/metrics");
    assert!(
        !text.contains("mentat_agent_metric_series_ended_total 0\n"),
        "{text}"
    );

    // Prometheus never stored a series per random model, and holds no more usage
    // series now than the cap (plus the `other` ones).
    let r = http::get(
        &format!("{}/api/v1/series", prom.url()),
        &[
            ("match[]", "mentat_tokens_total"),
            ("start", &since.to_string()),
        ],
        None,
    )
    .expect("series");
    let series = r.json().expect("series JSON")["data"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let models: BTreeSet<String> = series
        .iter()
        .filter_map(|s| s["model"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        models,
        BTreeSet::from(["unpriced".to_owned()]),
        "model label values Prometheus stored"
    );
    let now = prom
        .query("count({__name__=~\"mentat_.+\", __name__!~\"mentat_agent_.+\", kind!=\"other\"})");
    let count = now.first().map_or(0.0, |s| value_of(&s["value"]));
    assert!(
        count > 0.0 && count <= MAX_SERIES as f64,
        "Prometheus holds {count} usage series now (max_series {MAX_SERIES})"
    );
    println!(
        "prometheus bounds: {SPANS} random models → models {models:?}; {count} usage series in \
         Prometheus, {} on /metrics",
        usage_series(&text).len()
    );
    daemon.stop().expect("stopping the daemon");
}
