//! OTLP/gRPC export of priced usage, fed from the ledger's outbox.
//!
//! Records are sent as OTLP metrics and marked delivered only once the
//! receiver has accepted the request, so an outage delays usage but never
//! loses it. That needs a per-request acknowledgement, which the SDK's
//! periodic reader does not give; the requests are built here from
//! `opentelemetry-proto` and sent with tonic.
//!
//! Every series is a cumulative monotonic Sum whose start time is the true
//! start of what it counts: the process instance's start (or this export
//! stream's start, if the process is older), or the stream's start for node
//! buckets. A restart of the agent starts a new stream, so a backend sees a
//! reset, not lost data. Quantities and money are kept as exact `Decimal`
//! sums; they become f64 only on the wire, where OTLP's types require it.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    str::FromStr,
    time::{Duration, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::{
        ExportMetricsServiceRequest, metrics_service_client::MetricsServiceClient,
    },
    common::v1::{AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value},
    metrics::v1::{
        AggregationTemporality, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
        metric::Data, number_data_point::Value,
    },
    resource::v1::Resource,
};
use rust_decimal::{Decimal, prelude::ToPrimitive};
use serde::Deserialize;
use tonic::{
    metadata::{MetadataKey, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};
use tracing::{debug, info, warn};

use crate::usage::UsageRecord;

/// Where and how to send OTLP.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// gRPC endpoint, e.g. `http://collector:4317`. Empty: export is off
    /// unless `OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT` sets one (see `config`).
    pub endpoint: String,
    /// Extra request headers (e.g. an API key).
    pub headers: BTreeMap<String, String>,
    /// Per-request timeout, milliseconds (0: 10 s).
    pub timeout_ms: u64,
    /// PEM CA bundle for a TLS endpoint (`https://`); the system roots otherwise.
    pub ca_file: Option<PathBuf>,
}

impl OtlpConfig {
    fn timeout(&self) -> Duration {
        if self.timeout_ms == 0 {
            Duration::from_secs(10)
        } else {
            Duration::from_millis(self.timeout_ms)
        }
    }
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The endpoint or a header is not valid.
    #[error("OTLP config: {0}")]
    Config(String),
    /// The receiver could not be reached or refused the request.
    #[error("sending OTLP metrics to {endpoint}: {message}")]
    Send {
        /// The endpoint.
        endpoint: String,
        /// What went wrong.
        message: String,
    },
    /// The receiver accepted only part of the request.
    #[error("{endpoint} rejected {rejected} data points: {message}")]
    Partial {
        /// The endpoint.
        endpoint: String,
        /// How many.
        rejected: i64,
        /// Its reason.
        message: String,
    },
}

/// Identifies a series: metric name plus its attributes, sorted.
type SeriesKey = (&'static str, Vec<(String, String)>);

/// One metric of a record: name, unit, and the value's kind.
struct Quantity {
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    integer: bool,
}

const fn q(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    integer: bool,
) -> Quantity {
    Quantity {
        name,
        unit,
        description,
        integer,
    }
}

const CPU: Quantity = q(
    "process.cpu.time",
    "s",
    "CPU time by the scheduler's clock",
    false,
);
const NODE_CPU: Quantity = q(
    "mentat.node.cpu.time",
    "s",
    "Node CPU time with no process: idle, irq_steal, kernel, unattributed",
    false,
);
const NET: Quantity = q("process.network.io", "By", "Socket payload bytes", true);
const DISK: Quantity = q(
    "process.disk.io",
    "By",
    "Storage bytes read and written",
    true,
);
const MEMORY: Quantity = q(
    "mentat.usage.memory",
    "GiBy.s",
    "Resident memory over time",
    false,
);
const GPU: Quantity = q("mentat.usage.gpu.time", "s", "GPU time", false);
const GPU_MEMORY: Quantity = q(
    "mentat.usage.gpu.memory",
    "GiBy.s",
    "GPU memory over time",
    false,
);
const GPU_ENERGY: Quantity = q("mentat.usage.gpu.energy", "J", "GPU energy", false);
const SYSCALLS: Quantity = q(
    "mentat.usage.syscalls",
    "{syscall}",
    "Syscalls entered",
    true,
);
const TOKENS: Quantity = q("mentat.usage.tokens", "{token}", "LLM tokens", true);
const COST: Quantity = q(
    "mentat.cost",
    "{currency}",
    "Cost by component, in the book's currency",
    false,
);
const COST_TOTAL: Quantity = q(
    "mentat.cost.total",
    "{currency}",
    "Total cost after discount",
    false,
);

const ALL: [&Quantity; 12] = [
    &CPU,
    &NODE_CPU,
    &NET,
    &DISK,
    &MEMORY,
    &GPU,
    &GPU_MEMORY,
    &GPU_ENERGY,
    &SYSCALLS,
    &TOKENS,
    &COST,
    &COST_TOTAL,
];

/// Running cumulative sums per series, and each series' start time.
#[derive(Clone, Debug, Default)]
pub struct Cumulative {
    series: HashMap<SeriesKey, (u64, Decimal)>,
}

/// The point of one series after a batch.
struct Point {
    start_ns: u64,
    value: Decimal,
}

/// Builds OTLP requests from usage records, keeping the cumulative state.
#[derive(Clone, Debug)]
pub struct RequestBuilder {
    resource: Resource,
    stream_start_ns: u64,
}

impl RequestBuilder {
    /// A builder for node `node`; the stream starts now.
    pub fn new(node: &str) -> Self {
        let stream_start_ns = crate::clock::unix_ns(SystemTime::now());
        let kv = |k: &str, v: &str| kv(k, v);
        Self {
            resource: Resource {
                attributes: vec![
                    kv("service.name", "mentat-agent"),
                    kv("service.version", env!("CARGO_PKG_VERSION")),
                    kv("service.instance.id", &format!("{node}/{stream_start_ns}")),
                    kv("host.name", node),
                    kv("k8s.node.name", node),
                ],
                ..Default::default()
            },
            stream_start_ns,
        }
    }

    /// The request carrying `records` on top of `state`, and the state after it.
    /// The caller keeps the new state only if the request is accepted.
    pub fn build(
        &self,
        records: &[UsageRecord],
        state: &Cumulative,
    ) -> (ExportMetricsServiceRequest, Cumulative) {
        let mut next = state.clone();
        let mut touched: BTreeMap<SeriesKey, Point> = BTreeMap::new();
        let mut latest_ns = self.stream_start_ns;
        for r in records {
            let end_ns = parse_unix_ns(&r.window_end).unwrap_or(self.stream_start_ns);
            latest_ns = latest_ns.max(end_ns);
            let start_ns = r
                .process_start_time
                .as_deref()
                .and_then(parse_unix_ns)
                .map_or(self.stream_start_ns, |s| s.max(self.stream_start_ns));
            for (quantity, extra, value) in quantities(r) {
                if value.is_zero() {
                    continue;
                }
                let mut attrs = identity(r);
                attrs.extend(extra);
                attrs.sort();
                let key: SeriesKey = (quantity.name, attrs);
                let entry = next
                    .series
                    .entry(key.clone())
                    .or_insert((start_ns, Decimal::ZERO));
                entry.1 += value;
                touched.insert(
                    key,
                    Point {
                        start_ns: entry.0,
                        value: entry.1,
                    },
                );
            }
        }
        let mut metrics: Vec<Metric> = Vec::new();
        for quantity in ALL {
            let points: Vec<NumberDataPoint> = touched
                .iter()
                .filter(|((name, _), _)| *name == quantity.name)
                .map(|((_, attrs), p)| NumberDataPoint {
                    attributes: attrs.iter().map(|(k, v)| kv(k, v)).collect(),
                    start_time_unix_nano: p.start_ns,
                    time_unix_nano: latest_ns,
                    value: Some(if quantity.integer {
                        Value::AsInt(p.value.to_i64().unwrap_or(i64::MAX))
                    } else {
                        Value::AsDouble(p.value.to_f64().unwrap_or(f64::MAX))
                    }),
                    ..Default::default()
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            metrics.push(Metric {
                name: quantity.name.to_string(),
                description: quantity.description.to_string(),
                unit: quantity.unit.to_string(),
                data: Some(Data::Sum(Sum {
                    data_points: points,
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                })),
                ..Default::default()
            });
        }
        let request = ExportMetricsServiceRequest {
            resource_metrics: vec![ResourceMetrics {
                resource: Some(self.resource.clone()),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(InstrumentationScope {
                        name: "mentat-agent".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        // Delivery is at least once (a crash between the
                        // receiver's ack and marking the batch delivered
                        // sends it again); the ids let a receiver drop a
                        // batch it has already applied.
                        attributes: vec![KeyValue {
                            key: "mentat.record_ids".into(),
                            value: Some(AnyValue {
                                value: Some(any_value::Value::ArrayValue(ArrayValue {
                                    values: records
                                        .iter()
                                        .map(|r| AnyValue {
                                            value: Some(any_value::Value::StringValue(
                                                r.record_id.clone(),
                                            )),
                                        })
                                        .collect(),
                                })),
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        };
        (request, next)
    }
}

/// The attributes naming a record's workload and trace context.
fn identity(r: &UsageRecord) -> Vec<(String, String)> {
    let mut a = Vec::new();
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            a.push((k.to_string(), v.clone()));
        }
    };
    if r.record_kind != "process" {
        put("mentat.bucket", &Some(r.record_kind.clone()));
    }
    put("process.pid", &r.pid.map(|p| p.to_string()));
    put("process.executable.name", &r.comm);
    put("mentat.process.start_time", &r.process_start_time);
    put("mentat.workload.kind", &r.workload_kind);
    put("container.id", &r.container_id);
    put("container.runtime", &r.container_runtime);
    put("k8s.pod.uid", &r.pod_uid);
    put("k8s.pod.name", &r.k8s_pod_name);
    put("k8s.namespace.name", &r.k8s_namespace);
    put("mentat.wasm.module", &r.wasm_module);
    put("agent.id", &r.agent_id);
    put("flow.id", &r.flow_id);
    put("flow.run_id", &r.run_id);
    put("user.id", &r.user_id);
    put("project.id", &r.project_id);
    put("customer.id", &r.customer_id);
    a
}

type Extra = Vec<(String, String)>;

/// Every quantity of a record, with the attributes that split it.
fn quantities(r: &UsageRecord) -> Vec<(&'static Quantity, Extra, Decimal)> {
    let attr = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let cpu = if r.record_kind == "process" {
        &CPU
    } else {
        &NODE_CPU
    };
    let mut out = vec![
        (cpu, vec![], r.cpu_core_seconds),
        (
            &NET,
            attr("network.io.direction", "receive"),
            Decimal::from(r.network_rx_bytes),
        ),
        (
            &NET,
            attr("network.io.direction", "transmit"),
            Decimal::from(r.network_tx_bytes),
        ),
        (
            &DISK,
            attr("disk.io.direction", "read"),
            Decimal::from(r.disk_read_bytes),
        ),
        (
            &DISK,
            attr("disk.io.direction", "write"),
            Decimal::from(r.disk_write_bytes),
        ),
        (&MEMORY, vec![], r.memory_gb_seconds),
        (&GPU, vec![], r.gpu_seconds),
        (&GPU_MEMORY, vec![], r.gpu_memory_gb_seconds),
        (&GPU_ENERGY, vec![], r.gpu_energy_joules),
        (&SYSCALLS, vec![], Decimal::from(r.syscalls)),
    ];
    for t in &r.tokens {
        let model = |kind: &str| {
            vec![
                ("gen_ai.request.model".to_string(), t.model.clone()),
                ("gen_ai.token.type".to_string(), kind.to_string()),
            ]
        };
        out.push((&TOKENS, model("input"), Decimal::from(t.input)));
        out.push((&TOKENS, model("output"), Decimal::from(t.output)));
    }
    if let Some(c) = &r.cost {
        let priced = |component: &str| {
            vec![
                ("mentat.cost.component".to_string(), component.to_string()),
                ("mentat.cost.currency".to_string(), c.currency.clone()),
                (
                    "mentat.pricing.version".to_string(),
                    c.pricing_version.clone(),
                ),
            ]
        };
        for (component, value) in [
            ("cpu", c.cpu),
            ("memory", c.memory),
            ("gpu", c.gpu),
            ("network", c.network),
            ("storage", c.storage),
            ("token", c.token),
            ("discount", c.discount),
        ] {
            out.push((&COST, priced(component), value));
        }
        out.push((
            &COST_TOTAL,
            vec![
                ("mentat.cost.currency".to_string(), c.currency.clone()),
                (
                    "mentat.pricing.version".to_string(),
                    c.pricing_version.clone(),
                ),
            ],
            c.total,
        ));
    }
    out
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

fn parse_unix_ns(rfc3339: &str) -> Option<u64> {
    crate::clock::unix_ns_of(rfc3339).and_then(|n| u64::try_from(n).ok())
}

/// Sends records to one OTLP/gRPC endpoint.
pub struct OtlpExporter {
    endpoint: String,
    client: MetricsServiceClient<Channel>,
    headers: Vec<(
        MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
    builder: RequestBuilder,
    state: Cumulative,
}

impl OtlpExporter {
    /// An exporter for `config` (connections are made lazily, so a receiver
    /// that is down now does not fail start-up).
    pub fn new(config: &OtlpConfig, node: &str) -> Result<Self, ExportError> {
        let mut endpoint = Endpoint::from_str(&config.endpoint)
            .map_err(|e| ExportError::Config(format!("endpoint {:?}: {e}", config.endpoint)))?
            .timeout(config.timeout())
            .connect_timeout(config.timeout());
        if config.endpoint.starts_with("https://") {
            let mut tls = ClientTlsConfig::new().with_native_roots();
            if let Some(ca) = &config.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| ExportError::Config(format!("CA file {}: {e}", ca.display())))?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| ExportError::Config(format!("TLS for {}: {e}", config.endpoint)))?;
        }
        let headers = config
            .headers
            .iter()
            .map(|(k, v)| {
                let key = MetadataKey::from_str(k)
                    .map_err(|e| ExportError::Config(format!("header name {k:?}: {e}")))?;
                let value = MetadataValue::from_str(v)
                    .map_err(|e| ExportError::Config(format!("header {k:?} value: {e}")))?;
                Ok((key, value))
            })
            .collect::<Result<_, ExportError>>()?;
        Ok(Self {
            endpoint: config.endpoint.clone(),
            client: MetricsServiceClient::new(endpoint.connect_lazy()),
            headers,
            builder: RequestBuilder::new(node),
            state: Cumulative::default(),
        })
    }

    /// Sends `records`; returns once the receiver has accepted all of them.
    pub async fn send(&mut self, records: &[UsageRecord]) -> Result<(), ExportError> {
        let (request, next) = self.builder.build(records, &self.state);
        let mut request = tonic::Request::new(request);
        for (k, v) in &self.headers {
            request.metadata_mut().insert(k.clone(), v.clone());
        }
        let response = self
            .client
            .export(request)
            .await
            .map_err(|s| ExportError::Send {
                endpoint: self.endpoint.clone(),
                message: format!("{}: {}", s.code(), s.message()),
            })?
            .into_inner();
        if let Some(p) = response.partial_success
            && p.rejected_data_points > 0
        {
            return Err(ExportError::Partial {
                endpoint: self.endpoint.clone(),
                rejected: p.rejected_data_points,
                message: p.error_message,
            });
        }
        self.state = next;
        Ok(())
    }
}

/// Where an exporter takes records from and reports delivery to (the ledger).
pub trait Outbox {
    /// Up to `limit` undelivered records, oldest first.
    fn pending(&mut self, limit: usize) -> Result<Vec<UsageRecord>, String>;
    /// Marks records delivered.
    fn delivered(&mut self, record_ids: &[String]) -> Result<(), String>;
}

/// Records per request: large enough to drain a backlog quickly, small
/// enough that one request stays well under a receiver's 4 MiB default limit.
const BATCH: usize = 200;

/// Retries back off from this …
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// … to this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Drains `outbox` through `exporter` until `stop` is set; retries with
/// exponential backoff while the receiver is down. Once stopping, it sends
/// what is still pending (the daemon commits the last window before it sets
/// `stop`) and returns at the first failure: undelivered records stay in the
/// ledger and go out at the next start.
pub async fn drain(
    exporter: &mut OtlpExporter,
    outbox: &mut (dyn Outbox + Send),
    mut wake: tokio::sync::watch::Receiver<u64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        let stopping = *stop.borrow();
        let batch = match outbox.pending(BATCH) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "reading the outbox");
                Vec::new()
            }
        };
        if batch.is_empty() {
            if stopping {
                return;
            }
            // Nothing to do until the next window is committed, or the stop.
            tokio::select! {
                _ = wake.changed() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
            continue;
        }
        match exporter.send(&batch).await {
            Ok(()) => {
                let ids: Vec<String> = batch.iter().map(|r| r.record_id.clone()).collect();
                if let Err(e) = outbox.delivered(&ids) {
                    // Delivered but not marked: it will be sent again, which
                    // record ids and cumulative series make harmless downstream.
                    warn!(error = %e, "marking records delivered");
                }
                if failing {
                    info!(endpoint = %exporter.endpoint, "OTLP export recovered");
                    failing = false;
                }
                debug!(records = batch.len(), "exported");
                backoff = MIN_BACKOFF;
            }
            Err(e) => {
                if stopping {
                    warn!(error = %e, "stopping with records not yet exported; they stay in the ledger for the next start");
                    return;
                }
                if !failing {
                    warn!(error = %e, "OTLP export failing; usage stays in the ledger and is retried");
                    failing = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usage::Cost;

    fn record(id: &str, cpu: &str, rx: u64) -> UsageRecord {
        UsageRecord {
            record_id: id.into(),
            node: "n".into(),
            window_start: "2026-01-01T00:00:00Z".into(),
            window_end: "2026-01-01T00:00:01Z".into(),
            record_kind: "process".into(),
            pid: Some(42),
            comm: Some("py".into()),
            process_start_time: Some("2025-12-31T23:00:00Z".into()),
            cpu_core_seconds: Decimal::from_str(cpu).unwrap_or_default(),
            network_rx_bytes: rx,
            cost: Some(Cost {
                total: Decimal::new(1, 1),
                currency: "USD".into(),
                pricing_version: "v1".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn points(req: &ExportMetricsServiceRequest, name: &str) -> Vec<NumberDataPoint> {
        req.resource_metrics[0].scope_metrics[0]
            .metrics
            .iter()
            .filter(|m| m.name == name)
            .flat_map(|m| match &m.data {
                Some(Data::Sum(s)) => s.data_points.clone(),
                _ => vec![],
            })
            .collect()
    }

    #[test]
    fn series_are_cumulative_across_batches() {
        let b = RequestBuilder::new("n");
        let (req1, s1) = b.build(&[record("a", "0.25", 100)], &Cumulative::default());
        let (req2, _) = b.build(&[record("b", "0.5", 50)], &s1);
        let cpu1 = points(&req1, "process.cpu.time");
        let cpu2 = points(&req2, "process.cpu.time");
        assert_eq!(cpu1[0].value, Some(Value::AsDouble(0.25)));
        assert_eq!(cpu2[0].value, Some(Value::AsDouble(0.75)));
        assert_eq!(cpu1[0].start_time_unix_nano, cpu2[0].start_time_unix_nano);
        let rx2 = points(&req2, "process.network.io");
        assert_eq!(rx2[0].value, Some(Value::AsInt(150)));
        let total = points(&req2, "mentat.cost.total");
        assert!(matches!(total[0].value, Some(Value::AsDouble(v)) if (v - 0.2).abs() < 1e-12));
    }

    #[test]
    fn start_time_is_the_later_of_process_start_and_stream_start() {
        let b = RequestBuilder::new("n");
        let (req, _) = b.build(&[record("a", "1", 0)], &Cumulative::default());
        // The process started before the stream, so the stream's start is the series'.
        assert_eq!(
            points(&req, "process.cpu.time")[0].start_time_unix_nano,
            b.stream_start_ns
        );
    }

    #[test]
    fn bad_endpoint_is_a_config_error() {
        let c = OtlpConfig {
            endpoint: "not a url".into(),
            ..Default::default()
        };
        let e = OtlpExporter::new(&c, "n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("not a url"), "{e}");
    }
}
