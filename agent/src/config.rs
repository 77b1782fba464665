//! The daemon's configuration file (TOML).

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{
    api::ApiConfig,
    export::OtlpConfig,
    gpu::GpuConfig,
    pods::PodSource,
    probes::{ProbeConfig, ProbeMode, VMLINUX_BTF},
    receiver::ReceiverConfig,
};

/// `mentat-agent run --config FILE`. Every key is optional.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The node's name in records; empty: `$NODE_NAME`, else the host name.
    pub node_name: String,
    /// Window length: one usage window per workload per tick.
    #[serde(with = "duration_str")]
    pub tick: Duration,
    /// Period of the per-CPU timer that charges tasks that never block.
    #[serde(with = "duration_str")]
    pub cpu_tick: Duration,
    /// How often memory and disk are sampled from procfs (≤ tick).
    #[serde(with = "duration_str")]
    pub sample_interval: Duration,
    /// Entries in the kernel's per-process usage map (≈ 2 × processes active per tick).
    pub proc_map_entries: u32,
    /// Kernel BTF.
    pub btf_path: PathBuf,
    /// Where pod names and namespaces come from (off by default).
    pub kubernetes: PodSource,
    /// How often the pod list is fetched.
    #[serde(with = "duration_str")]
    pub pod_refresh: Duration,
    /// The ledger's database file.
    pub ledger_path: PathBuf,
    /// How long usage is kept (as hourly rollups past `raw_retention`).
    #[serde(with = "duration_str")]
    pub retention: Duration,
    /// How long windows are kept record by record before they are compacted
    /// into hourly rollups with exact totals. Raw windows cost ~270 bytes per
    /// record: at 1,000 workloads and 1 s ticks, about 1 GB an hour.
    #[serde(with = "duration_str")]
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
    #[serde(with = "duration_str")]
    pub span_lag: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: String::new(),
            tick: Duration::from_secs(1),
            cpu_tick: Duration::from_millis(100),
            sample_interval: Duration::from_secs(1),
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
        }
    }
}

/// The full default configuration, every key with its default and what it
/// does (`mentat-agent config default`). A unit test keeps it equal to
/// `Config::default()`.
pub const DEFAULT_CONFIG_TOML: &str = r#"# mentat-agent configuration (TOML). Every key is optional; these are the defaults.

node_name = ""              # node name in records; empty: $NODE_NAME, else the host name
tick = "1s"                 # window length: one usage window per workload per tick (>= 100ms)
cpu_tick = "100ms"          # per-CPU timer that charges tasks that never block (1ms .. tick)
sample_interval = "1s"      # memory and disk sampling from procfs (10ms .. tick)
span_lag = "10s"            # how long a closed window waits for late spans before it is committed
proc_map_entries = 10240    # kernel per-process map entries (about 2 x processes active per tick)
btf_path = "/sys/kernel/btf/vmlinux"
ledger_path = "/var/lib/mentat-agent/ledger.db"
raw_retention = "1h"        # windows kept record by record, then compacted into exact hourly rollups
retention = "7d"            # how long usage is kept
# pricing_path = "/etc/mentat-agent/pricing.toml"   # unset: the built-in book; SIGHUP reloads it
pod_refresh = "30s"         # how often the pod list is fetched (when [kubernetes] url is set)

[api]                       # read-only query API, /metrics, /healthz, /readyz
bind = "127.0.0.1:9464"
# token_file = "/var/run/secrets/mentat/api-token"  # required when bind is not loopback

[otlp]                      # usage export; OTEL_EXPORTER_OTLP_* variables override these
endpoint = ""               # e.g. "http://otel-collector:4317"; empty: export off
timeout_ms = 0              # 0: 10 s
# ca_file = "/etc/ssl/collector-ca.pem"
[otlp.headers]              # e.g. api-key = "..."

[receiver]                  # where agents on this node send their spans
grpc_bind = "127.0.0.1:4317"
http_bind = "127.0.0.1:4318"
max_request_bytes = 4194304
max_pending_spans = 100000
max_concurrent_requests = 4
forward_queue_bytes = 33554432
# [receiver.upstream]       # forward received spans, enriched with cost
# endpoint = "http://otel-collector:4317"

[gpu]                       # NVML; no driver or no GPU: GPU metering is off (one log line)
# library_path = "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1"   # default: libnvidia-ml.so.1

[kubernetes]                # pod names and namespaces; empty url: off
url = ""                    # e.g. "https://kubernetes.default.svc/api/v1/pods?fieldSelector=spec.nodeName={node}"
# token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"
# ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
"#;

/// Why a config file was refused.
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
}

impl Config {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let c: Config = toml::from_str(text).map_err(|e| e.to_string())?;
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
        if c.proc_map_entries == 0 {
            return Err("proc_map_entries must be at least 1".into());
        }
        Ok(c)
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

/// Durations in the config are humantime strings ("1s", "250ms").
mod duration_str {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {s:?}: {e}")))
    }
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
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(Config::parse("").expect("parses"), Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_problem() {
        let e = Config::parse("tick = \"1s\"\nbogus = 1\n").expect_err("unknown key");
        assert!(e.contains("bogus") && e.contains("line 2"), "{e}");
        let e = Config::parse("tick = \"soon\"").expect_err("bad duration");
        assert!(e.contains("soon"), "{e}");
        let e = Config::parse("tick = \"10ms\"").expect_err("too short");
        assert!(e.contains("100ms"), "{e}");
        let e = Config::parse("proc_map_entries = 0").expect_err("zero");
        assert!(e.contains("proc_map_entries"), "{e}");
    }
}
