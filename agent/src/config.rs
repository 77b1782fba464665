//! The daemon's configuration file (TOML).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    collect::gpu::GpuConfig,
    context::receiver::ReceiverConfig,
    identity::pods::PodSource,
    probes::{ProbeConfig, ProbeMode, VMLINUX_BTF},
    serve::{api::ApiConfig, otlp::OtlpConfig},
};

/// `mentat-agent run --config FILE`. Every key is optional.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The node's name in records; empty: `$NODE_NAME`, else the host name.
    pub node_name: String,
    /// Window length: one usage window per workload per tick.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub tick: Duration,
    /// Period of the per-CPU timer that charges tasks that never block.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub cpu_tick: Duration,
    /// How often memory and disk are sampled from procfs (≤ tick).
    #[serde(with = "crate::probes::clock::duration_str")]
    pub sample_interval: Duration,
    /// How often processes that did not run are read from procfs again (≥ tick).
    #[serde(with = "crate::probes::clock::duration_str")]
    pub idle_interval: Duration,
    /// Entries in the kernel's per-process usage map (≈ 2 × processes active per tick).
    pub proc_map_entries: u32,
    /// Kernel BTF.
    pub btf_path: PathBuf,
    /// Where pod names and namespaces come from (off by default).
    pub kubernetes: PodSource,
    /// How often the pod list is fetched.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub pod_refresh: Duration,
    /// The ledger's database file.
    pub ledger_path: PathBuf,
    /// How long usage is kept (as hourly rollups past `raw_retention`).
    #[serde(with = "crate::probes::clock::duration_str")]
    pub retention: Duration,
    /// How long windows are kept record by record before they are compacted
    /// into hourly rollups with exact totals. Raw windows cost ~270 bytes per
    /// record: at 1,000 workloads and 1 s ticks, about 1 GB an hour.
    #[serde(with = "crate::probes::clock::duration_str")]
    pub raw_retention: Duration,
    /// The price book; unset: the built-in book (deploy/pricing.toml). SIGHUP reloads it.
    pub pricing_path: Option<PathBuf>,
    /// The query API.
    pub api: ApiConfig,
    /// OTLP export (the `OTEL_EXPORTER_OTLP_*` variables override it).
    pub otlp: OtlpConfig,
    /// The OTLP trace receiver agents send their spans to.
    pub receiver: ReceiverConfig,
    /// GPU metering through NVML (off by itself where no driver is found).
    pub gpu: GpuConfig,
    /// How long a closed window waits for late spans before it is split
    /// between runs and committed (SDKs export spans in batches, every 5 s by default).
    #[serde(with = "crate::probes::clock::duration_str")]
    pub span_lag: Duration,
    /// Bounds on `/metrics`' series.
    pub metrics: crate::serve::prometheus::MetricsConfig,
    /// Where alert notifications go (`[[alert_channels]]`, see `alert::notify::config`).
    pub alert_channels: Vec<crate::alert::notify::ChannelConfig>,
    /// Alert rules evaluated after each committed window (besides `[alerting] rules_file`'s).
    pub alerts: Vec<crate::alert::rules::RuleConfig>,
    /// How alerts are evaluated and kept.
    pub alerting: crate::alert::rules::AlertingConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            tick: Duration::from_secs(1),
            cpu_tick: Duration::from_millis(100),
            sample_interval: Duration::from_secs(1),
            idle_interval: Duration::from_secs(60),
            proc_map_entries: 10_240,
            btf_path: PathBuf::from(VMLINUX_BTF),
            kubernetes: PodSource::default(),
            pod_refresh: Duration::from_secs(30),
            ledger_path: PathBuf::from("/var/lib/mentat-agent/ledger.db"),
            retention: Duration::from_secs(7 * 24 * 3600),
            raw_retention: Duration::from_secs(3600),
            pricing_path: None,
            api: ApiConfig::default(),
            otlp: OtlpConfig::default(),
            receiver: ReceiverConfig::default(),
            gpu: GpuConfig::default(),
            span_lag: Duration::from_secs(10),
            metrics: crate::serve::prometheus::MetricsConfig::default(),
            alert_channels: Vec::new(),
            alerts: Vec::new(),
            alerting: crate::alert::rules::AlertingConfig::default(),
        }
    }
}

/// The full default configuration, every key with its default and what it
/// does (`mentat-agent config default`). A unit test keeps it equal to
/// `Config::default()`.
pub const DEFAULT_CONFIG_TOML: &str = r#"# mentat-agent configuration (TOML). Every key is optional; these are the defaults.
# Environment overrides: MENTAT_<KEY>, MENTAT_<TABLE>__<KEY> (MENTAT_TICK, MENTAT_API__BIND);
# precedence: defaults < this file < OTEL_EXPORTER_OTLP_* (for [otlp]) < MENTAT_*.

node_name = ""              # node name in records; empty: $NODE_NAME, else the host name
tick = "1s"                 # window length: one usage window per workload per tick (>= 100ms)
cpu_tick = "100ms"          # per-CPU timer that charges tasks that never block (1ms .. tick)
sample_interval = "1s"      # memory and disk sampling from procfs of processes that run (10ms .. tick)
idle_interval = "60s"       # processes that did not run are read again this often (tick .. 1h)
span_lag = "10s"            # how long a closed window waits for late spans before it is committed
proc_map_entries = 10240    # kernel per-process map entries (about 2 x processes active per tick)
btf_path = "/sys/kernel/btf/vmlinux"
ledger_path = "/var/lib/mentat-agent/ledger.db"
raw_retention = "1h"        # windows kept record by record, then compacted into exact hourly rollups
retention = "7d"            # how long usage is kept: older rollups and spans are deleted (>= raw_retention)
# pricing_path = "/etc/mentat-agent/pricing.toml"   # unset: the built-in book; SIGHUP reloads it
pod_refresh = "30s"         # how often the pod list is fetched (when [kubernetes] url is set)

[api]                       # read-only query API, /metrics, /healthz, /readyz
bind = "127.0.0.1:9464"
# token_file = "/var/run/secrets/mentat/api-token"  # required when bind is not loopback
stream_client_buffer = 256  # /v1/stream: messages queued per client; a client further behind is dropped (counted)
stream_max_clients = 64     # /v1/stream: clients at once; more get a 503

[otlp]                      # usage export; OTEL_EXPORTER_OTLP_* variables override these
endpoint = ""               # e.g. "http://otel-collector:4317"; empty: export off
timeout_ms = 0              # 0: 10 s
# ca_file = "/etc/ssl/collector-ca.pem"
[otlp.headers]              # e.g. api-key = "..."

[receiver]                  # where agents on this node send their spans
grpc_bind = "127.0.0.1:4317"
http_bind = "127.0.0.1:4318"
max_request_bytes = 4194304
max_pending_spans = 200000  # spans waiting for their window; past it, refused in the response
max_indexed_spans = 1000000 # spans with a run held to split windows; past it, refused in the response
max_indexed_spans_per_process = 250000  # of those, the most one sending process may hold
max_clock_skew = "60s"      # a span starting or ending further ahead of the node's clock is refused
max_span_duration = "24h"   # a longer span is refused
max_span_age = "30m"        # a span with tokens that started longer ago is refused (+ span_lag + 2 ticks <= raw_retention)
max_concurrent_requests = 4
forward_queue_bytes = 33554432
forward_message_content = false  # forward prompt/completion text upstream as received (default: stripped)
read_timeout = "10s"        # a request body must arrive within this, or the request is refused
max_concurrent_reads = 64   # request bodies read at once, all senders together
max_reads_per_sender = 8    # request bodies one sender (one cgroup) reads at once; beyond: 429 / UNAVAILABLE
token_dedupe_window = "5m"  # an LLM call's token span is remembered this long to bill a second report of it once
max_token_dedupe_calls = 50000   # calls remembered for that; past it, the oldest are forgotten (counted)
max_token_dedupe_links = 200000  # parent links remembered for its nesting rule; past it, the oldest (counted)
trusted_forwarders = []     # senders whose pid/container/pod claims are believed, e.g.
                            # ["cgroup:/system.slice/otelcol.service", "addr:10.0.0.7"]; see README "Trust model"
# [receiver.upstream]       # forward received spans, enriched with cost
# endpoint = "http://otel-collector:4317"

[gpu]                       # NVML; no driver or no GPU: GPU metering is off (one log line)
# library_path = "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"   # default: libnvidia-ml.so.1
discovery_interval = "60s"  # how often GPUs are listed again (added/removed GPUs without a restart); "0s": every tick

[kubernetes]                # pod names and namespaces; empty url: off
url = ""                    # e.g. "https://kubernetes.default.svc/api/v1/pods?fieldSelector=spec.nodeName={node}"
# token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"

[metrics]                   # bounds on /metrics' usage series
max_series = 10000          # past it, new series are folded into namespace/pod/container/kind="other" (counted)
series_grace = "5m"         # a workload's series end this long after its last record (exited containers, pods, processes)

# [[alert_channels]]        # where alert notifications go (none by default); one table per channel,
# name = "alertmanager"     # unique; secrets only from files, never logged. Keys by kind:
# kind = "alertmanager"     # alertmanager | webhook | slack | pagerduty | smtp
# url = "http://alertmanager:9093"   # alertmanager (POST {url}/api/v2/alerts), webhook, pagerduty
#                                    # (default https://events.pagerduty.com/v2/enqueue)
# bearer_token_file = "..." # alertmanager
# secret_file = "..."       # webhook (required): HMAC-SHA256 key, header X-Mentat-Signature: sha256=<hex>
# headers = {}              # alertmanager, webhook: extra request headers
# webhook_url_file = "..."  # slack (required): the incoming webhook URL
# routing_key_file = "..."  # pagerduty (required): the integration's routing key
# host = ""                 # smtp (required), with port (0: 587 / 465 / 25), tls = "starttls" | "tls" |
# tls = "starttls"          #   "none" (loopback only), username + password_file, from, to = [...]
# ca_file = "..."           # PEM CAs trusted instead of the built-in web roots (https, smtp)
# timeout = "10s"           # one delivery attempt at most
[alerting]                  # alert rules, evaluated over the ledger after each committed window (README "Alerts")
# rules_file = "/etc/mentat-agent/alerts.toml"   # [[alerts]] tables, read at start and again on SIGHUP
repeat_interval = "4h"      # a firing alert is notified again this often
keep_resolved = "24h"       # resolved alerts stay listed (/v1/alerts) this long
max_alerts = 10000          # alerts tracked at once; past it, new ones are not tracked (counted)
slow_interval = "1m"        # long-range rules (budget, anomaly, lifetime, windows >= 1h) are evaluated at most this often

# [[alerts]]                # a rule; any number of them, here or in rules_file (README "Alerts")
# name = "run-cost"
# kind = "threshold"        # threshold | budget | anomaly | waste
# group = "run"             # run | flow | agent | customer | project | container | model
# measure = "cost_total"    # any summed column: cost_*, cpu_core_seconds, gpu_*, network_*, tokens_*, ...
# window = "5m"             # or "lifetime" (since the group began, within lookback)
# as = "total"              # total | per_second | per_hour
# op = ">"
# value = "5"               # exact decimal (a string or an integer)
# for = "0s"
# where = { customer_id = "acme" }
# labels = { severity = "warning" }
# annotations = { summary = "run {{ group }} cost {{ value }} > {{ threshold }}" }
# channels = []             # alert channel names; empty: every channel
"#;

/// Environment variables that override config keys: `MENTAT_` followed by the
/// key's path, upper-cased, with `__` between a table and its key
/// (`MENTAT_TICK`, `MENTAT_API__BIND`, `MENTAT_RECEIVER__UPSTREAM__ENDPOINT`).
pub const ENV_PREFIX: &str = "MENTAT_";

/// The separator between a table and its key in an override's name.
const ENV_SEPARATOR: &str = "__";

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file is not valid (the message names the line and key).
    #[error("config {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// toml's description, with line and column.
        message: String,
    },
    /// An environment override is not valid.
    #[error("environment variable {var}: {message}")]
    Env {
        /// The variable.
        var: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A config and where its keys came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolved {
    /// The configuration in effect.
    pub config: Config,
    /// The environment variables that overrode keys, in the order applied.
    pub overrides: Vec<String>,
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::resolve(Some(path), std::iter::empty()).map(|r| r.config)
    }

    /// The configuration in effect: the defaults, then `path` (if any), then
    /// the standard `OTEL_EXPORTER_OTLP_*` variables for `[otlp]`, then the
    /// `MENTAT_*` overrides, each later source winning key by key.
    pub fn resolve(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Resolved, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.map_or_else(|| PathBuf::from("(defaults)"), Path::to_path_buf),
            message,
        };
        let mut table = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                // Deserializing the text itself is what gives line-precise errors.
                toml::from_str::<Config>(&text).map_err(|e| invalid(e.to_string()))?;
                crate::alert::rules::parse_text(&text, &path.display().to_string())
                    .map_err(|e| invalid(e.to_string()))?;
                toml::from_str::<toml::Table>(&text).map_err(|e| invalid(e.to_string()))?
            }
            None => toml::Table::new(),
        };
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut overrides = Vec::new();
        for (var, key_path, value) in otel_overrides(&env)? {
            set_checked(&mut table, &var, &key_path, value)?;
            overrides.push(var);
        }
        let mut mentat: Vec<&(String, String)> = env
            .iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        mentat.sort();
        for (var, raw) in mentat {
            let key_path = env_key_path(var)?;
            // A value is taken as a string when the key takes one, else as a
            // TOML value (a number, a boolean, an array or an inline table).
            let as_string = toml::Value::String(raw.clone());
            if let Err(string_error) = set_checked(&mut table, var, &key_path, as_string) {
                let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                    .ok()
                    .and_then(|mut t| t.remove("v"));
                match parsed {
                    Some(value) => set_checked(&mut table, var, &key_path, value)?,
                    None => return Err(string_error),
                }
            }
            overrides.push(var.clone());
        }
        let config: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| invalid(e.to_string()))?;
        config.validate().map_err(|message| {
            if overrides.is_empty() {
                invalid(message)
            } else {
                invalid(format!("{message} (with {})", overrides.join(", ")))
            }
        })?;
        Ok(Resolved { config, overrides })
    }

    /// Parses and validates config text (errors name the file as "(text)").
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: PathBuf::from("(text)"),
            message,
        };
        let c: Config = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        c.validate().map_err(invalid)?;
        Ok(c)
    }

    /// Checks the constraints between keys that types alone cannot.
    fn validate(&self) -> Result<(), String> {
        let c = self;
        if c.tick < Duration::from_millis(100) {
            return Err(format!("tick = {:?} is below the 100ms minimum", c.tick));
        }
        if c.cpu_tick < Duration::from_millis(1) || c.cpu_tick > c.tick {
            return Err(format!(
                "cpu_tick = {:?} must be between 1ms and tick ({:?})",
                c.cpu_tick, c.tick
            ));
        }
        if c.sample_interval < Duration::from_millis(10) || c.sample_interval > c.tick {
            return Err(format!(
                "sample_interval = {:?} must be between 10ms and tick ({:?})",
                c.sample_interval, c.tick
            ));
        }
        if c.idle_interval < c.tick || c.idle_interval > Duration::from_secs(3600) {
            return Err(format!(
                "idle_interval = {:?} must be between tick ({:?}) and 1h",
                c.idle_interval, c.tick
            ));
        }
        if c.proc_map_entries == 0 {
            return Err("proc_map_entries must be at least 1".into());
        }
        crate::alert::notify::config::validate(&c.alert_channels)?;
        let r = &c.receiver;
        if r.max_pending_spans == 0
            || r.max_indexed_spans == 0
            || r.max_indexed_spans_per_process == 0
        {
            return Err(
                "[receiver] max_pending_spans, max_indexed_spans and max_indexed_spans_per_process must be at least 1"
                    .into(),
            );
        }
        if r.max_token_dedupe_calls == 0 || r.max_token_dedupe_links == 0 {
            return Err(
                "[receiver] max_token_dedupe_calls and max_token_dedupe_links must be at least 1"
                    .into(),
            );
        }
        // A token record's window starts at its span's start and is
        // committed up to span_lag + 2 ticks after receipt; the ledger
        // refuses records before its compaction watermark, which trails
        // now by at least raw_retention.
        let horizon = r.max_span_age + c.span_lag + c.tick * 2;
        if horizon > c.raw_retention {
            return Err(format!(
                "[receiver] max_span_age = {:?} plus span_lag ({:?}) and two ticks is {horizon:?}, over raw_retention ({:?}): a token record that old would lie in hours already compacted",
                r.max_span_age, c.span_lag, c.raw_retention
            ));
        }
        crate::alert::engine::compile_config(&c.alerts).map_err(|e| e.to_string())?;
        if c.retention < c.raw_retention {
            return Err(format!(
                "retention = {:?} is shorter than raw_retention ({:?}): rollups would be deleted before the records they replace",
                c.retention, c.raw_retention
            ));
        }
        Ok(())
    }

    /// The probe settings this config asks for.
    pub fn probe_config(&self) -> ProbeConfig {
        ProbeConfig {
            proc_map_entries: Some(self.proc_map_entries),
            cpu_tick: self.cpu_tick,
            btf_path: self.btf_path.clone(),
            mode: ProbeMode::Metering,
        }
    }
}

/// The node name: `configured` if set, else `$NODE_NAME` (the DaemonSet's
/// downward API), else the kernel's host name.
pub fn node_name(configured: &str) -> String {
    if !configured.is_empty() {
        return configured.to_string();
    }
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return n;
    }
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| String::from("unknown-node"))
}

/// The key path a `MENTAT_*` variable names (`MENTAT_API__BIND` → `api.bind`).
fn env_key_path(var: &str) -> Result<Vec<String>, ConfigError> {
    let rest = &var[ENV_PREFIX.len()..];
    let path: Vec<String> = rest
        .split(ENV_SEPARATOR)
        .map(|s| s.to_ascii_lowercase())
        .collect();
    if path.iter().any(|s| s.is_empty()) {
        return Err(ConfigError::Env {
            var: var.to_string(),
            message: format!(
                "names no config key: expected {ENV_PREFIX}<KEY> or {ENV_PREFIX}<TABLE>{ENV_SEPARATOR}<KEY>, e.g. MENTAT_API__BIND"
            ),
        });
    }
    Ok(path)
}

/// Sets `key_path` in `table` to `value` if the result still deserializes as
/// a `Config`, naming `var` in the error otherwise.
fn set_checked(
    table: &mut toml::Table,
    var: &str,
    key_path: &[String],
    value: toml::Value,
) -> Result<(), ConfigError> {
    let env_error = |message: String| ConfigError::Env {
        var: var.to_string(),
        message,
    };
    let mut candidate = table.clone();
    let (key, tables) = key_path.split_last().expect("a key path is never empty");
    let mut at = &mut candidate;
    for (depth, name) in tables.iter().enumerate() {
        let entry = at
            .entry(name.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = entry.as_table_mut().ok_or_else(|| {
            env_error(format!(
                "`{}` is a value, not a table",
                key_path[..=depth].join(".")
            ))
        })?;
    }
    at.insert(key.clone(), value);
    toml::Value::Table(candidate.clone())
        .try_into::<Config>()
        .map_err(|e| {
            env_error(format!(
                "{} (key `{}`)",
                e.message().trim(),
                key_path.join(".")
            ))
        })?;
    *table = candidate;
    Ok(())
}

/// The standard OpenTelemetry exporter variables as `[otlp]` keys; the
/// metrics-specific variable wins over the general one.
fn otel_overrides(
    env: &[(String, String)],
) -> Result<Vec<(String, Vec<String>, toml::Value)>, ConfigError> {
    let get = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| (name.to_string(), v.clone()))
    };
    let pick = |key: &str| {
        get(&format!("OTEL_EXPORTER_OTLP_METRICS_{key}"))
            .or_else(|| get(&format!("OTEL_EXPORTER_OTLP_{key}")))
    };
    let otlp = |key: &str| vec!["otlp".to_string(), key.to_string()];
    let mut out = Vec::new();
    if let Some((var, v)) = pick("ENDPOINT") {
        out.push((var, otlp("endpoint"), toml::Value::String(v)));
    }
    if let Some((var, v)) = pick("HEADERS") {
        // Each header is its own key, so the file's other headers stay.
        for pair in v.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, val) = pair.split_once('=').ok_or_else(|| ConfigError::Env {
                var: var.clone(),
                message: format!("header {:?} is not key=value", pair.trim()),
            })?;
            let mut path = otlp("headers");
            path.push(k.trim().to_ascii_lowercase());
            out.push((
                var.clone(),
                path,
                toml::Value::String(val.trim().to_string()),
            ));
        }
    }
    if let Some((var, v)) = pick("TIMEOUT") {
        let ms: i64 = v.trim().parse().map_err(|_| ConfigError::Env {
            var: var.clone(),
            message: format!("{v:?} is not a whole number of milliseconds"),
        })?;
        out.push((var, otlp("timeout_ms"), toml::Value::Integer(ms)));
    }
    if let Some((var, v)) = pick("CERTIFICATE") {
        out.push((var, otlp("ca_file"), toml::Value::String(v)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readme_config_example_parses() {
        let readme = include_str!("../../README.md");
        let block = readme
            .split("```toml\n")
            .find(|b| b.starts_with("node_name"))
            .and_then(|b| b.split("```").next())
            .expect("README has a ```toml block starting with node_name");
        let c = Config::parse(block).unwrap_or_else(|e| panic!("README config: {e}"));
        assert_eq!(c.api.bind, "127.0.0.1:9464");
        assert_eq!(c.raw_retention, Duration::from_secs(3600));
    }

    #[test]
    fn the_printed_default_config_is_the_default() {
        let c = Config::parse(DEFAULT_CONFIG_TOML).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c, Config::default());
        // Keys with a serde default parse even when missing: the ones the
        // printed config must still document, since operators read it.
        for key in [
            "discovery_interval",
            "span_lag",
            "raw_retention",
            "pod_refresh",
        ] {
            assert!(
                DEFAULT_CONFIG_TOML.contains(&format!("\n{key} = ")),
                "`config default` does not document {key}"
            );
        }
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(Config::parse("").expect("parses"), Config::default());
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn resolve_env(pairs: &[(&str, &str)]) -> Result<Resolved, ConfigError> {
        Config::resolve(None, env(pairs))
    }

    #[test]
    fn mentat_variables_override_keys_by_their_type() {
        let r = resolve_env(&[
            ("MENTAT_TICK", "2s"),
            ("MENTAT_API__BIND", "0.0.0.0:9464"),
            ("MENTAT_PROC_MAP_ENTRIES", "500"),
            ("MENTAT_NODE_NAME", "12345"),
            ("MENTAT_PRICING_PATH", "/etc/book.toml"),
            ("MENTAT_OTLP__HEADERS", "{ api-key = \"k\" }"),
            ("PATH", "/usr/bin"),
            ("TEST_AGENT_BIN", "/x"),
        ])
        .expect("valid overrides");
        let c = &r.config;
        assert_eq!(c.tick, Duration::from_secs(2));
        assert_eq!(c.api.bind, "0.0.0.0:9464");
        assert_eq!(c.proc_map_entries, 500);
        // A digit string for a string key stays a string.
        assert_eq!(c.node_name, "12345");
        assert_eq!(c.pricing_path, Some(PathBuf::from("/etc/book.toml")));
        assert_eq!(c.otlp.headers.get("api-key").map(String::as_str), Some("k"));
        assert_eq!(r.overrides.len(), 6, "{:?}", r.overrides);
        assert!(!r.overrides.iter().any(|v| v == "PATH"));
    }

    #[test]
    fn the_environment_wins_over_the_file_key_by_key() {
        let path =
            std::env::temp_dir().join(format!("mentat-config-{}.agent.toml", std::process::id()));
        std::fs::write(
            &path,
            "tick = \"5s\"\n[api]\nbind = \"127.0.0.1:1\"\n[otlp]\nendpoint = \"http://file:4317\"\n[otlp.headers]\nx-file = \"f\"\n",
        )
        .expect("write");
        let r = Config::resolve(
            Some(&path),
            env(&[
                ("MENTAT_API__BIND", "127.0.0.1:2"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-env=e"),
            ]),
        )
        .expect("valid");
        assert_eq!(
            r.config.tick,
            Duration::from_secs(5),
            "the file's key stays"
        );
        assert_eq!(r.config.api.bind, "127.0.0.1:2");
        assert_eq!(r.config.otlp.endpoint, "http://file:4317");
        let h = &r.config.otlp.headers;
        assert_eq!(
            (
                h.get("x-file").map(String::as_str),
                h.get("x-env").map(String::as_str)
            ),
            (Some("f"), Some("e"))
        );
        // The file's own errors still name their line.
        std::fs::write(&path, "tick = \"5s\"\n\n[api]\nbind = 7\n").expect("write");
        let e = Config::resolve(Some(&path), env(&[]))
            .expect_err("bad type")
            .to_string();
        assert!(e.contains("line 4") && e.contains("agent.toml"), "{e}");
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn standard_otel_variables_set_otlp_and_mentat_ones_win() {
        let r = resolve_env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4317"),
            ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "http://metrics:4317"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "Api-Key=s3cret, x-tenant = t1",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/ca.pem"),
        ])
        .expect("valid");
        let o = &r.config.otlp;
        assert_eq!(o.endpoint, "http://metrics:4317");
        assert_eq!(o.headers.get("api-key").map(String::as_str), Some("s3cret"));
        assert_eq!(o.headers.get("x-tenant").map(String::as_str), Some("t1"));
        assert_eq!(o.timeout_ms, 2500);
        assert_eq!(o.ca_file, Some(PathBuf::from("/ca.pem")));
        let r = resolve_env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4317"),
            ("MENTAT_OTLP__ENDPOINT", "http://mentat:4317"),
        ])
        .expect("valid");
        assert_eq!(r.config.otlp.endpoint, "http://mentat:4317");
    }

    #[test]
    fn bad_overrides_name_the_variable() {
        // (environment, the variable the error must name, a detail it must give)
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            (&[("MENTAT_TIKC", "1s")], "MENTAT_TIKC", "tikc"),
            (
                &[("MENTAT_PROC_MAP_ENTRIES", "many")],
                "MENTAT_PROC_MAP_ENTRIES",
                "many",
            ),
            (&[("MENTAT_TICK", "soon")], "MENTAT_TICK", "soon"),
            (
                &[("MENTAT_API__BINDING", "x")],
                "MENTAT_API__BINDING",
                "binding",
            ),
            (&[("MENTAT_TICK__X", "1")], "MENTAT_TICK__X", "tick.x"),
            (&[("MENTAT_", "1")], "MENTAT_", "names no config key"),
            (
                &[("MENTAT_API____BIND", "x")],
                "MENTAT_API____BIND",
                "names no config key",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_TIMEOUT", "10s")],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
                "10s",
            ),
            (
                &[("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
                "OTEL_EXPORTER_OTLP_HEADERS",
                "novalue",
            ),
            (&[("MENTAT_TICK", "50ms")], "MENTAT_TICK", "100ms"),
        ];
        for (pairs, var, detail) in cases {
            let e = resolve_env(pairs).expect_err(var).to_string();
            assert!(e.contains(var) && e.contains(detail), "{var}: {e}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_problem() {
        // (config, what its error must name)
        let cases: &[(&str, &[&str])] = &[
            ("tick = \"1s\"\nbogus = 1\n", &["bogus", "line 2"]),
            ("tick = \"soon\"", &["soon"]),
            ("tick = \"10ms\"", &["100ms"]),
            ("proc_map_entries = 0", &["proc_map_entries"]),
            ("retention = \"30m\"", &["raw_retention"]),
            (
                "raw_retention = \"30m\"",
                &["max_span_age", "raw_retention"],
            ),
            ("[receiver]\nmax_indexed_spans = 0", &["max_indexed_spans"]),
        ];
        for (toml, names) in cases {
            let e = Config::parse(toml).expect_err(toml).to_string();
            assert!(names.iter().all(|n| e.contains(n)), "{toml}: {e}");
        }
        let c = Config::parse("raw_retention = \"30m\"\n[receiver]\nmax_span_age = \"20m\"")
            .expect("a span age inside raw_retention");
        assert_eq!(c.receiver.max_span_age, Duration::from_secs(1200));
    }
}
