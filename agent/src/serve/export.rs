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
//!
//! # Running totals live in the ledger
//!
//! The cumulative value of each series is not kept in memory: it is read
//! from the ledger for the series a batch touches, and written back in the
//! same transaction that marks the batch delivered. So the totals are always
//! exactly what the receiver acknowledged: if marking fails after the
//! receiver's ack, neither moved, and the re-send carries the same values
//! (a receiver sees a duplicate, never a doubled total). Memory does not grow
//! with the series count, and nothing is cloned per batch. Series no
//! delivered record touched for [`SERIES_IDLE`] (their process exited) are
//! evicted; one seen again starts afresh with a later start time.
//!
//! # Failures
//!
//! Transient (the receiver down, `UNAVAILABLE`, `RESOURCE_EXHAUSTED`,
//! timeouts, and also authentication or server faults, which are the
//! operator's to fix and must not discard data): retried in order with
//! backoff. Permanent for the data (`INVALID_ARGUMENT`, `FAILED_PRECONDITION`,
//! `ALREADY_EXISTS`): the batch is halved until the refused record is alone,
//! and that record is set aside in the ledger's dead-letter table and counted.
//! A partial success (`rejected_data_points` > 0) is an answer, not a
//! failure: OTLP says not to retry it; the batch is marked delivered, its
//! records listed as dead letters with the receiver's message, and the
//! rejected points counted (the next cumulative point supersedes them).

use std::{
    collections::{BTreeMap, HashMap},
    sync::atomic::{AtomicU64, Ordering},
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
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use crate::{
    ledger::{LedgerError, SeriesId, SeriesState},
    report::record::UsageRecord,
    serve::otlp::{OtlpChannel, OtlpConfig},
};

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
    /// The receiver refused the request's data for good (a gRPC status such as INVALID_ARGUMENT): sending it again cannot succeed.
    #[error("{endpoint} refused the data ({code}): {message}")]
    Refused {
        /// The endpoint.
        endpoint: String,
        /// The gRPC status code.
        code: String,
        /// What it said.
        message: String,
    },
}

impl ExportError {
    /// Whether sending the same records again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(self, ExportError::Refused { .. })
    }
}

/// Whether a gRPC status refuses the data itself, for good. OTLP lists the
/// retryable codes (UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
/// ABORTED, CANCELLED, OUT_OF_RANGE, DATA_LOSS); of the rest, only those
/// about the request's content are treated as permanent. Authentication,
/// permission, UNIMPLEMENTED and server faults are the deployment's to fix:
/// setting every record aside for them would discard the export, so they
/// are retried with backoff (and logged) like an outage.
pub fn refuses_data(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists
    )
}

/// A receiver's acknowledgement.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Data points it rejected (OTLP partial success); 0 when all were taken.
    pub rejected_points: i64,
    /// Its message about them.
    pub message: String,
}

/// One metric of a record: name, unit, and the value's kind.
#[derive(Debug)]
struct Quantity {
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    integer: bool,
}

/// Defines each quantity once: a constant, and its place in `ALL` (every
/// quantity, in the order their metrics are built).
macro_rules! quantities {
    ($($id:ident = ($name:literal, $unit:literal, $description:literal, $integer:literal);)*) => {
        $(const $id: Quantity = Quantity {
            name: $name,
            unit: $unit,
            description: $description,
            integer: $integer,
        };)*
        const ALL: &[&Quantity] = &[$(&$id),*];
    };
}

quantities! {
    CPU = ("process.cpu.time", "s", "CPU time by the scheduler's clock", false);
    NODE_CPU = ("mentat.node.cpu.time", "s", "Node CPU time with no process: idle, irq_steal, kernel, unattributed", false);
    NET = ("process.network.io", "By", "Socket payload bytes", true);
    DISK = ("process.disk.io", "By", "Storage bytes read and written", true);
    MEMORY = ("mentat.usage.memory", "GiBy.s", "Resident memory over time", false);
    GPU = ("mentat.usage.gpu.time", "s", "GPU time", false);
    GPU_MEMORY = ("mentat.usage.gpu.memory", "GiBy.s", "GPU memory over time", false);
    GPU_ENERGY = ("mentat.usage.gpu.energy", "J", "GPU energy", false);
    SYSCALLS = ("mentat.usage.syscalls", "{syscall}", "Syscalls entered", true);
    TOKENS = ("mentat.usage.tokens", "{token}", "LLM tokens", true);
    COST = ("mentat.cost", "{currency}", "Cost by component, in the book's currency", false);
    COST_TOTAL = ("mentat.cost.total", "{currency}", "Total cost after discount", false);
}

/// What one batch adds to one series.
#[derive(Clone, Debug)]
pub struct Contribution {
    quantity: &'static Quantity,
    attrs: Vec<(String, String)>,
    /// The series' start if it is new: the process's start, or the stream's.
    start_ns: u64,
    /// The earliest window start that contributes (bounds a re-created series' start).
    first_ws_ns: u64,
    add: Decimal,
    /// The newest window end that contributes.
    last_ns: u64,
}

/// A batch's contributions by series, and the newest window end in it.
#[derive(Clone, Debug, Default)]
pub struct Contributions {
    series: BTreeMap<SeriesId, Contribution>,
    latest_ns: u64,
}

impl Contributions {
    /// The series the batch touches, for reading their state.
    pub fn keys(&self) -> Vec<SeriesId> {
        self.series.keys().copied().collect()
    }

    /// How many series the batch touches.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    /// Whether it touches none.
    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }
}

/// The id a series' running total is stored under: a 128-bit hash of its
/// metric name and sorted attributes (two independent 64-bit hashes of an
/// unambiguous encoding; a collision, ~10⁻²⁶ at a million series, would
/// merge two series). Only meaningful within one export stream (the ledger's
/// totals are reset when a stream starts), so the hash may change between
/// agent versions.
fn series_id(name: &str, attrs: &[(String, String)]) -> SeriesId {
    use std::hash::{BuildHasher, Hasher};
    let mut sip =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        // Length-prefixed, so no two attribute lists encode alike.
        let len = (bytes.len() as u64).to_le_bytes();
        for part in [&len[..], bytes] {
            sip.write(part);
            for &b in part {
                fnv ^= u64::from(b);
                fnv = fnv.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    };
    eat(name.as_bytes());
    for (k, v) in attrs {
        eat(k.as_bytes());
        eat(v.as_bytes());
    }
    let bits = |v: u64| i64::from_ne_bytes(v.to_ne_bytes());
    (bits(sip.finish()), bits(fnv))
}

/// Builds OTLP requests from usage records on top of the acknowledged running totals.
#[derive(Clone, Debug)]
pub struct RequestBuilder {
    resource: Resource,
    stream_start_ns: u64,
}

impl RequestBuilder {
    /// A builder for node `node`; the stream starts now.
    pub fn new(node: &str) -> Self {
        let stream_start_ns = crate::probes::clock::unix_ns(SystemTime::now());
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

    /// What `records` add to each series.
    pub fn contributions(&self, records: &[UsageRecord]) -> Contributions {
        let mut out = Contributions {
            series: BTreeMap::new(),
            latest_ns: self.stream_start_ns,
        };
        for r in records {
            let end_ns = parse_unix_ns(&r.window_end).unwrap_or(self.stream_start_ns);
            let ws_ns = parse_unix_ns(&r.window_start).unwrap_or(end_ns);
            out.latest_ns = out.latest_ns.max(end_ns);
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
                let key = series_id(quantity.name, &attrs);
                let c = out.series.entry(key).or_insert_with(|| Contribution {
                    quantity,
                    attrs,
                    start_ns,
                    first_ws_ns: ws_ns,
                    add: Decimal::ZERO,
                    last_ns: end_ns,
                });
                // A sum past Decimal's range (±7.9·10²⁸) cannot be shown anyway.
                c.add = c.add.checked_add(value).unwrap_or(Decimal::MAX);
                c.first_ws_ns = c.first_ws_ns.min(ws_ns);
                c.last_ns = c.last_ns.max(end_ns);
            }
        }
        out
    }

    /// The request carrying `records` on top of `state` (the acknowledged
    /// totals of the series they touch), and each touched series' state
    /// after it, to store when the request is acknowledged. A series not in
    /// `state` is new; if series were evicted before `evicted_before_ns`, a new
    /// one starts no earlier than that (or its first window), so a re-created
    /// series never reuses the start of the one it replaces.
    pub fn build(
        &self,
        records: &[UsageRecord],
        contributions: &Contributions,
        state: &HashMap<SeriesId, SeriesState>,
        evicted_before_ns: u64,
    ) -> (ExportMetricsServiceRequest, Vec<(SeriesId, SeriesState)>) {
        let latest_ns = contributions.latest_ns;
        let mut after: Vec<(SeriesId, SeriesState)> = Vec::with_capacity(contributions.len());
        let mut points: BTreeMap<&'static str, Vec<NumberDataPoint>> = BTreeMap::new();
        for (key, c) in &contributions.series {
            let next = match state.get(key) {
                Some(s) => SeriesState {
                    start_ns: s.start_ns,
                    value: s.value.checked_add(c.add).unwrap_or(Decimal::MAX),
                    last_ns: s.last_ns.max(c.last_ns),
                },
                None => SeriesState {
                    start_ns: c.start_ns.max(evicted_before_ns.min(c.first_ws_ns)),
                    value: c.add,
                    last_ns: c.last_ns,
                },
            };
            points
                .entry(c.quantity.name)
                .or_default()
                .push(NumberDataPoint {
                    attributes: c.attrs.iter().map(|(k, v)| kv(k, v)).collect(),
                    start_time_unix_nano: next.start_ns,
                    time_unix_nano: latest_ns,
                    value: Some(if c.quantity.integer {
                        Value::AsInt(next.value.to_i64().unwrap_or(i64::MAX))
                    } else {
                        Value::AsDouble(next.value.to_f64().unwrap_or(f64::MAX))
                    }),
                    ..Default::default()
                });
            after.push((*key, next));
        }
        let mut metrics: Vec<Metric> = Vec::new();
        for quantity in ALL {
            let Some(data_points) = points.remove(quantity.name) else {
                continue;
            };
            metrics.push(Metric {
                name: quantity.name.to_string(),
                description: quantity.description.to_string(),
                unit: quantity.unit.to_string(),
                data: Some(Data::Sum(Sum {
                    data_points,
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
        (request, after)
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
    put("container.id", &r.workload.container_id);
    put("container.runtime", &r.workload.container_runtime);
    put("k8s.pod.uid", &r.workload.pod_uid);
    put("k8s.pod.name", &r.workload.k8s_pod_name);
    put("k8s.namespace.name", &r.workload.k8s_namespace);
    put("mentat.wasm.module", &r.workload.wasm_module);
    put("agent.id", &r.context.agent_id);
    put("flow.id", &r.context.flow_id);
    put("flow.run_id", &r.context.run_id);
    put("user.id", &r.context.user_id);
    put("project.id", &r.context.project_id);
    put("customer.id", &r.context.customer_id);
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
    crate::probes::clock::unix_ns_of(rfc3339).and_then(|n| u64::try_from(n).ok())
}

/// Sends records to one OTLP/gRPC endpoint.
pub struct OtlpExporter {
    channel: OtlpChannel,
    client: MetricsServiceClient<Channel>,
    builder: RequestBuilder,
}

impl OtlpExporter {
    /// An exporter for `config` (connections are made lazily, so a receiver
    /// that is down now does not fail start-up).
    pub fn new(config: &OtlpConfig, node: &str) -> Result<Self, ExportError> {
        let channel = OtlpChannel::new(config).map_err(|e| ExportError::Config(e.to_string()))?;
        Ok(Self {
            client: MetricsServiceClient::new(channel.channel.clone()),
            channel,
            builder: RequestBuilder::new(node),
        })
    }
}

/// Where requests go: the OTLP/gRPC client, or a stand-in in tests.
pub trait Transport: Send {
    /// The endpoint, for logs.
    fn endpoint(&self) -> &str;
    /// The request builder of this export stream.
    fn builder(&self) -> &RequestBuilder;
    /// Sends one request; `Ok` once the receiver answered it.
    fn export(
        &mut self,
        request: ExportMetricsServiceRequest,
    ) -> impl Future<Output = Result<Accepted, ExportError>> + Send;
}

impl Transport for OtlpExporter {
    fn endpoint(&self) -> &str {
        &self.channel.endpoint
    }

    fn builder(&self) -> &RequestBuilder {
        &self.builder
    }

    async fn export(
        &mut self,
        request: ExportMetricsServiceRequest,
    ) -> Result<Accepted, ExportError> {
        let request = self.channel.request(request);
        let endpoint = &self.channel.endpoint;
        let response = self.client.export(request).await.map_err(|s| {
            if refuses_data(s.code()) {
                ExportError::Refused {
                    endpoint: endpoint.clone(),
                    code: format!("{:?}", s.code()),
                    message: s.message().to_string(),
                }
            } else {
                ExportError::Send {
                    endpoint: endpoint.clone(),
                    message: format!("{}: {}", s.code(), s.message()),
                }
            }
        })?;
        Ok(match response.into_inner().partial_success {
            Some(p) if p.rejected_data_points > 0 => Accepted {
                rejected_points: p.rejected_data_points,
                message: p.error_message,
            },
            _ => Accepted::default(),
        })
    }
}

/// Where an exporter takes records from and reports delivery to (the ledger).
pub trait Outbox {
    /// Up to `limit` undelivered records, oldest first.
    fn pending(&mut self, limit: usize) -> Result<Vec<UsageRecord>, LedgerError>;
    /// The acknowledged running totals of the series in `keys` that have one.
    fn series(&mut self, keys: &[SeriesId]) -> Result<HashMap<SeriesId, SeriesState>, LedgerError>;
    /// Marks records delivered and stores the series' totals after them, in
    /// one transaction; with `rejected`, also lists them as dead letters.
    fn delivered(
        &mut self,
        record_ids: &[String],
        series: &[(SeriesId, SeriesState)],
        rejected: Option<&str>,
    ) -> Result<(), LedgerError>;
    /// Takes records the receiver refused for good out of the queue, listed with `reason`.
    fn dead_letter(&mut self, record_ids: &[String], reason: &str) -> Result<(), LedgerError>;
    /// Forgets series idle since `idle_before_ns`; returns how many.
    fn evict_series(&mut self, idle_before_ns: u64) -> Result<u64, LedgerError>;
    /// Forgets every series (a new stream starts).
    fn reset_series(&mut self) -> Result<u64, LedgerError>;
}

/// The exporter's counters, for `/metrics`.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Data points receivers rejected in partial successes.
    pub rejected_points: AtomicU64,
    /// Records set aside as dead letters (refused for good, or in a batch with rejected points).
    pub dead_lettered: AtomicU64,
    /// Acknowledged batches whose delivery could not be recorded (re-sent with the same values).
    pub mark_failures: AtomicU64,
    /// Running-total series evicted after their process went idle or exited.
    pub evicted_series: AtomicU64,
    /// Export attempts that failed for a reason a retry can fix (receiver down, timeout).
    pub failures: AtomicU64,
    /// The latest window end (unix seconds) of a delivered batch: with the
    /// last committed window's end, the export lag.
    pub delivered_through_s: AtomicU64,
}

impl ExportStats {
    /// The counters as (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            (
                "mentat_agent_otlp_rejected_points_total",
                "Data points the OTLP receiver rejected in a partial success (not retried, as OTLP requires; the records are listed as dead letters).",
                get(&self.rejected_points),
            ),
            (
                "mentat_agent_otlp_dead_letter_records_total",
                "Records the OTLP receiver refused for good (INVALID_ARGUMENT and the like) or accepted only in part: out of the export queue, listed in GET /v1/quarantine.",
                get(&self.dead_lettered),
            ),
            (
                "mentat_agent_otlp_mark_failures_total",
                "Acknowledged OTLP batches whose delivery could not be written to the ledger: re-sent later with the same cumulative values (never added twice).",
                get(&self.mark_failures),
            ),
            (
                "mentat_agent_otlp_series_evicted_total",
                "OTLP running-total series dropped after no delivered record touched them for an hour (their process exited).",
                get(&self.evicted_series),
            ),
            (
                "mentat_agent_otlp_export_failures_total",
                "OTLP export attempts that failed and are retried (receiver down, timeout); the usage stays in the ledger.",
                get(&self.failures),
            ),
            (
                "mentat_agent_otlp_delivered_through_timestamp_seconds",
                "Window end (unix seconds) of the latest batch the OTLP receiver acknowledged; export lag is mentat_agent_last_window_end_timestamp_seconds minus this.",
                get(&self.delivered_through_s),
            ),
        ]
    }
}

/// Records per request: large enough to drain a backlog quickly, small
/// enough that one request stays well under a receiver's 4 MiB default limit.
const BATCH: usize = 200;

/// Retries back off from this …
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// … to this.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// A series no delivered record touched for this long (before now, or before
/// the oldest record still to send) is evicted.
pub const SERIES_IDLE: Duration = Duration::from_secs(3600);
/// How often idle series are looked for.
const EVICT_EVERY: Duration = Duration::from_secs(300);

/// Drains `outbox` through `exporter` until `stop` is set; retries with
/// exponential backoff while the receiver is down. Once stopping, it sends
/// what is still pending (the daemon commits the last window before it sets
/// `stop`) and returns at the first failure: undelivered records stay in the
/// ledger and go out at the next start.
pub async fn drain<T: Transport>(
    exporter: &mut T,
    outbox: &mut (dyn Outbox + Send),
    stats: &ExportStats,
    mut wake: tokio::sync::watch::Receiver<u64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    // A new stream: its series start from zero (the resource's instance id
    // changed, so a backend sees new series, as after any restart).
    if let Err(e) = outbox.reset_series() {
        warn!(error = %e, "clearing the previous stream's OTLP series");
    }
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    let mut batch_size = BATCH;
    let mut evicted_before_ns = 0u64;
    let mut last_evict = tokio::time::Instant::now();
    loop {
        let stopping = *stop.borrow();
        if last_evict.elapsed() >= EVICT_EVERY {
            last_evict = tokio::time::Instant::now();
            let mut cutoff = crate::probes::clock::unix_ns(SystemTime::now())
                .saturating_sub(u64::try_from(SERIES_IDLE.as_nanos()).unwrap_or(u64::MAX));
            // Idle relative to the backlog: while old windows are still being
            // sent (after an outage), their series are not idle.
            if let Some(oldest) = outbox
                .pending(1)
                .ok()
                .and_then(|p| p.first().and_then(|r| parse_unix_ns(&r.window_start)))
            {
                cutoff = cutoff.min(oldest);
            }
            match outbox.evict_series(cutoff) {
                Ok(n) => {
                    stats.evicted_series.fetch_add(n, Ordering::Relaxed);
                    evicted_before_ns = cutoff;
                }
                Err(e) => warn!(error = %e, "evicting idle OTLP series"),
            }
        }
        let batch = match outbox.pending(batch_size) {
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
        let contributions = exporter.builder().contributions(&batch);
        let state = match outbox.series(&contributions.keys()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "reading the OTLP running totals; retrying");
                if stopping {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (request, after) =
            exporter
                .builder()
                .build(&batch, &contributions, &state, evicted_before_ns);
        let ids: Vec<String> = batch.iter().map(|r| r.record_id.clone()).collect();
        match exporter.export(request).await {
            Ok(accepted) => {
                let rejected = (accepted.rejected_points > 0).then(|| {
                    format!(
                        "{} rejected {} data points: {}",
                        exporter.endpoint(),
                        accepted.rejected_points,
                        accepted.message
                    )
                });
                if let Some(why) = &rejected {
                    warn!(
                        records = batch.len(),
                        first_record = %ids[0],
                        reason = %why,
                        "OTLP partial success: not retried (OTLP forbids it); the batch's records are listed as dead letters"
                    );
                }
                match outbox.delivered(&ids, &after, rejected.as_deref()) {
                    Ok(()) => {
                        if rejected.is_some() {
                            stats.rejected_points.fetch_add(
                                accepted.rejected_points.unsigned_abs(),
                                Ordering::Relaxed,
                            );
                            stats
                                .dead_lettered
                                .fetch_add(ids.len() as u64, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        // Neither the marks nor the running totals moved: the
                        // re-send carries the same values, never added twice.
                        stats.mark_failures.fetch_add(1, Ordering::Relaxed);
                        warn!(error = %e, "marking records delivered failed; they will be sent again with the same cumulative values");
                        if stopping {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        continue;
                    }
                }
                if let Some(end) = batch
                    .iter()
                    .filter_map(|r| parse_unix_ns(&r.window_end))
                    .max()
                {
                    stats
                        .delivered_through_s
                        .fetch_max(end / 1_000_000_000, Ordering::Relaxed);
                }
                if failing {
                    info!(endpoint = %exporter.endpoint(), "OTLP export recovered");
                    failing = false;
                }
                debug!(records = batch.len(), "exported");
                backoff = MIN_BACKOFF;
                batch_size = BATCH;
            }
            Err(e) if e.is_permanent() && batch.len() > 1 => {
                // Find the refused record: halve until it is alone.
                batch_size = (batch.len() / 2).max(1);
                debug!(error = %e, batch_size, "OTLP receiver refused a batch; narrowing it down");
            }
            Err(e) if e.is_permanent() => {
                let reason = e.to_string();
                match outbox.dead_letter(&ids, &reason) {
                    Ok(()) => {
                        stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                        warn!(record_id = %ids[0], reason = %reason, "OTLP receiver refused a record for good; it is set aside as a dead letter (GET /v1/quarantine)");
                    }
                    Err(de) => {
                        warn!(error = %de, record_id = %ids[0], "setting a refused record aside failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
                batch_size = BATCH;
            }
            Err(e) => {
                if stopping {
                    warn!(error = %e, "stopping with records not yet exported; they stay in the ledger for the next start");
                    return;
                }
                stats.failures.fetch_add(1, Ordering::Relaxed);
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
    use crate::report::record::Cost;

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
            cpu_core_seconds: std::str::FromStr::from_str(cpu).unwrap_or_default(),
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

    /// One batch on top of `state`; `state` becomes the state after it.
    fn build(
        b: &RequestBuilder,
        records: &[UsageRecord],
        state: &mut HashMap<SeriesId, SeriesState>,
    ) -> ExportMetricsServiceRequest {
        let c = b.contributions(records);
        let (req, after) = b.build(records, &c, state, 0);
        state.extend(after);
        req
    }

    #[test]
    fn series_are_cumulative_across_batches() {
        let b = RequestBuilder::new("n");
        let mut state = HashMap::new();
        let req1 = build(&b, &[record("a", "0.25", 100)], &mut state);
        let req2 = build(&b, &[record("b", "0.5", 50)], &mut state);
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
        let req = build(&b, &[record("a", "1", 0)], &mut HashMap::new());
        // The process started before the stream, so the stream's start is the series'.
        assert_eq!(
            points(&req, "process.cpu.time")[0].start_time_unix_nano,
            b.stream_start_ns
        );
    }

    /// A series evicted and seen again must not reuse its old start: a
    /// backend would read the smaller new value as the old series falling.
    #[test]
    fn a_series_recreated_after_eviction_starts_later() {
        let b = RequestBuilder::new("n");
        let mut r = record("a", "1", 0);
        let ws = b.stream_start_ns + 7_200_000_000_000;
        r.window_start = crate::probes::clock::rfc3339_of_ns(i64::try_from(ws).unwrap_or(i64::MAX));
        r.window_end = crate::probes::clock::rfc3339_of_ns(
            i64::try_from(ws + 1_000_000_000).unwrap_or(i64::MAX),
        );
        let c = b.contributions(std::slice::from_ref(&r));
        let (fresh, _) = b.build(std::slice::from_ref(&r), &c, &HashMap::new(), 0);
        let evicted_at = b.stream_start_ns + 3_600_000_000_000;
        let (again, _) = b.build(std::slice::from_ref(&r), &c, &HashMap::new(), evicted_at);
        let start = |req: &ExportMetricsServiceRequest| {
            points(req, "process.cpu.time")[0].start_time_unix_nano
        };
        assert_eq!(start(&fresh), b.stream_start_ns);
        assert_eq!(start(&again), evicted_at);
    }

    #[test]
    fn only_refusals_of_the_data_are_permanent() {
        use tonic::Code;
        for c in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::AlreadyExists,
        ] {
            assert!(refuses_data(c), "{c:?}");
        }
        for c in [
            Code::Unavailable,
            Code::ResourceExhausted,
            Code::DeadlineExceeded,
            Code::Aborted,
            Code::Cancelled,
            Code::OutOfRange,
            Code::DataLoss,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::Unimplemented,
            Code::Internal,
            Code::Unknown,
        ] {
            assert!(!refuses_data(c), "{c:?}");
        }
    }

    /// The ledger's part, in memory: a queue, the running totals, dead
    /// letters; `delivered` is all-or-nothing, as the ledger's transaction.
    #[derive(Default)]
    struct FakeLedger {
        pending: Vec<UsageRecord>,
        series: HashMap<SeriesId, SeriesState>,
        fail_marks: u32,
        dead: Vec<(String, String)>,
    }

    struct FakeOutbox(Arc<Mutex<FakeLedger>>);

    use std::sync::{Arc, Mutex};

    impl FakeOutbox {
        fn l(&self) -> std::sync::MutexGuard<'_, FakeLedger> {
            self.0.lock().unwrap_or_else(|p| p.into_inner())
        }
    }

    impl Outbox for FakeOutbox {
        fn pending(&mut self, limit: usize) -> Result<Vec<UsageRecord>, LedgerError> {
            Ok(self.l().pending.iter().take(limit).cloned().collect())
        }
        fn series(
            &mut self,
            keys: &[SeriesId],
        ) -> Result<HashMap<SeriesId, SeriesState>, LedgerError> {
            let l = self.l();
            Ok(keys
                .iter()
                .filter_map(|k| l.series.get(k).map(|s| (*k, *s)))
                .collect())
        }
        fn delivered(
            &mut self,
            ids: &[String],
            series: &[(SeriesId, SeriesState)],
            rejected: Option<&str>,
        ) -> Result<(), LedgerError> {
            let mut l = self.l();
            if l.fail_marks > 0 {
                l.fail_marks -= 1;
                return Err(LedgerError::Io {
                    path: "fake".into(),
                    what: "marking delivered",
                    source: std::io::Error::other("disk I/O error"),
                });
            }
            l.pending.retain(|r| !ids.contains(&r.record_id));
            l.series.extend(series.iter().cloned());
            if let Some(why) = rejected {
                l.dead
                    .extend(ids.iter().map(|i| (i.clone(), why.to_string())));
            }
            Ok(())
        }
        fn dead_letter(&mut self, ids: &[String], reason: &str) -> Result<(), LedgerError> {
            let mut l = self.l();
            l.pending.retain(|r| !ids.contains(&r.record_id));
            l.dead
                .extend(ids.iter().map(|i| (i.clone(), reason.to_string())));
            Ok(())
        }
        fn evict_series(&mut self, _idle_before_ns: u64) -> Result<u64, LedgerError> {
            Ok(0)
        }
        fn reset_series(&mut self) -> Result<u64, LedgerError> {
            let mut l = self.l();
            let n = l.series.len() as u64;
            l.series.clear();
            Ok(n)
        }
    }

    type Answer = Box<
        dyn FnMut(&ExportMetricsServiceRequest, &mut FakeLedger) -> Result<Accepted, ExportError>
            + Send,
    >;

    /// A receiver that keeps every request and answers as `answer` says.
    struct FakeReceiver {
        builder: RequestBuilder,
        ledger: Arc<Mutex<FakeLedger>>,
        requests: Vec<ExportMetricsServiceRequest>,
        answer: Answer,
    }

    impl Transport for FakeReceiver {
        fn endpoint(&self) -> &str {
            "fake"
        }
        fn builder(&self) -> &RequestBuilder {
            &self.builder
        }
        async fn export(
            &mut self,
            request: ExportMetricsServiceRequest,
        ) -> Result<Accepted, ExportError> {
            let answer = {
                let mut l = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
                (self.answer)(&request, &mut l)
            };
            self.requests.push(request);
            answer
        }
    }

    fn ids_of(req: &ExportMetricsServiceRequest) -> Vec<String> {
        let attrs = &req.resource_metrics[0].scope_metrics[0]
            .scope
            .as_ref()
            .map(|s| s.attributes.clone())
            .unwrap_or_default();
        match attrs
            .first()
            .and_then(|kv| kv.value.as_ref()?.value.clone())
        {
            Some(any_value::Value::ArrayValue(a)) => a
                .values
                .iter()
                .filter_map(|v| match &v.value {
                    Some(any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .collect(),
            _ => vec![],
        }
    }

    /// Runs `drain` until the fake ledger's queue is empty (a minute at most).
    fn drain_all(
        ledger: &Arc<Mutex<FakeLedger>>,
        answer: Answer,
    ) -> (Vec<ExportMetricsServiceRequest>, ExportStats) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let mut receiver = FakeReceiver {
            builder: RequestBuilder::new("n"),
            ledger: ledger.clone(),
            requests: Vec::new(),
            answer,
        };
        let mut outbox = FakeOutbox(ledger.clone());
        let stats = ExportStats::default();
        let (_wake_tx, wake_rx) = tokio::sync::watch::channel(0u64);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        rt.block_on(async {
            let watch = async {
                loop {
                    let empty = ledger.lock().map(|l| l.pending.is_empty()).unwrap_or(true);
                    if empty {
                        let _ = stop_tx.send(true);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            };
            let both = async {
                tokio::join!(
                    drain(&mut receiver, &mut outbox, &stats, wake_rx, stop_rx),
                    watch
                )
            };
            tokio::time::timeout(Duration::from_secs(60), both)
                .await
                .expect("the outbox drains within a minute");
        });
        (receiver.requests, stats)
    }

    fn cpu_of(req: &ExportMetricsServiceRequest) -> f64 {
        match points(req, "process.cpu.time")
            .first()
            .and_then(|p| p.value)
        {
            Some(Value::AsDouble(v)) => v,
            other => panic!("no CPU point: {other:?}"),
        }
    }

    /// The receiver acknowledged, then marking the batch delivered failed:
    /// the batch goes again with the same cumulative values, and what comes
    /// after is added once. (Before, the totals had already moved in memory:
    /// the re-send said 1.5 core-seconds for 0.75, and every later point
    /// was 0.75 too high.)
    #[test]
    fn a_failed_mark_after_the_ack_resends_the_same_values_never_doubled() {
        let ledger = Arc::new(Mutex::new(FakeLedger {
            pending: vec![record("a", "0.25", 0), record("b", "0.5", 0)],
            fail_marks: 1,
            ..Default::default()
        }));
        let mut n = 0;
        let (requests, stats) = drain_all(
            &ledger,
            Box::new(move |_req, l| {
                n += 1;
                if n == 2 {
                    // A later window arrives after the re-send.
                    let mut c = record("c", "1", 0);
                    c.window_start = "2026-01-01T00:00:01Z".into();
                    c.window_end = "2026-01-01T00:00:02Z".into();
                    l.pending.push(c);
                }
                Ok(Accepted::default())
            }),
        );
        assert_eq!(requests.len(), 3, "sent, re-sent, then the next window");
        assert_eq!(ids_of(&requests[0]), ids_of(&requests[1]));
        assert_eq!(cpu_of(&requests[0]), 0.75);
        assert_eq!(cpu_of(&requests[1]), 0.75, "the re-send is not added again");
        assert_eq!(cpu_of(&requests[2]), 1.75);
        assert_eq!(stats.mark_failures.load(Ordering::Relaxed), 1);
    }

    /// A partial success is answered, not failed: OTLP says not to retry it.
    /// It used to be retried forever, and nothing behind it was ever sent.
    #[test]
    fn a_partial_success_is_not_retried_and_the_outbox_moves_on() {
        let ledger = Arc::new(Mutex::new(FakeLedger {
            pending: vec![record("a", "0.25", 0), record("b", "0.5", 0)],
            ..Default::default()
        }));
        let mut n = 0;
        let (requests, stats) = drain_all(
            &ledger,
            Box::new(move |_req, l| {
                n += 1;
                if n == 1 {
                    let mut c = record("c", "1", 0);
                    c.window_start = "2026-01-01T00:00:01Z".into();
                    l.pending.push(c);
                    return Ok(Accepted {
                        rejected_points: 3,
                        message: "3 points had an unknown unit".into(),
                    });
                }
                Ok(Accepted::default())
            }),
        );
        assert_eq!(requests.len(), 2, "no retry of the partial success");
        assert_eq!(ids_of(&requests[1]), ["c"]);
        assert_eq!(cpu_of(&requests[1]), 1.75);
        let l = ledger.lock().expect("lock");
        let dead: Vec<&str> = l.dead.iter().map(|(i, _)| i.as_str()).collect();
        assert_eq!(dead, ["a", "b"]);
        assert!(l.dead[0].1.contains("unknown unit"), "{:?}", l.dead);
        assert_eq!(stats.rejected_points.load(Ordering::Relaxed), 3);
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 2);
    }

    /// A receiver that refuses one record for good (INVALID_ARGUMENT): the
    /// batch is narrowed to it, it is set aside, and the rest is delivered,
    /// its totals without the refused record's.
    #[test]
    fn a_refused_record_is_set_aside_and_the_rest_delivered() {
        let mut pending: Vec<UsageRecord> =
            (0..7).map(|i| record(&format!("r{i}"), "1", 0)).collect();
        pending[3].cpu_core_seconds = Decimal::from(100);
        pending[3].record_id = "poison".into();
        let ledger = Arc::new(Mutex::new(FakeLedger {
            pending,
            ..Default::default()
        }));
        let (requests, stats) = drain_all(
            &ledger,
            Box::new(|req, _l| {
                if ids_of(req).iter().any(|i| i == "poison") {
                    return Err(ExportError::Refused {
                        endpoint: "fake".into(),
                        code: "InvalidArgument".into(),
                        message: "bad point".into(),
                    });
                }
                Ok(Accepted::default())
            }),
        );
        let l = ledger.lock().expect("lock");
        assert_eq!(l.dead.len(), 1);
        assert_eq!(l.dead[0].0, "poison");
        assert!(l.dead[0].1.contains("bad point"));
        assert_eq!(stats.dead_lettered.load(Ordering::Relaxed), 1);
        // The last point has the six good records' CPU, not the refused one's.
        let last = requests.last().expect("a request");
        assert_eq!(cpu_of(last), 6.0);
        // Bounded narrowing: at most log2(7) + 1 refused tries.
        let refused = requests
            .iter()
            .filter(|r| ids_of(r).iter().any(|i| i == "poison"))
            .count();
        assert!(refused <= 4, "{refused} refused requests");
    }

    /// The exporter's ledger work per record (no network): reading the touched
    /// series' totals, building the request, and marking delivered with the
    /// new totals in one transaction. `cargo test --release -p mentat-agent
    /// --lib export_path_benchmark -- --ignored --nocapture`.
    #[test]
    #[ignore = "benchmark"]
    fn export_path_benchmark() {
        use crate::ledger::{Ledger, sim::synthetic_window};
        let dir = std::env::temp_dir().join(format!("mentat-export-bench-{}", std::process::id()));
        let path = dir.join("ledger.db");
        let mut ledger = Ledger::open(&path, Duration::from_secs(7 * 86_400)).expect("open");
        let (workloads, windows) = (1000usize, 30i64);
        let t0 = 1_767_225_600_000_000_000i64;
        for w in 0..windows {
            let ws = t0 + w * 1_000_000_000;
            let batch = synthetic_window("n1", workloads, ws, 1_000_000_000, 600_000_000_000);
            let (s, e) = (&batch[0].window_start, &batch[0].window_end);
            ledger
                .commit_window(s, e, &batch, &["otlp"])
                .expect("commit");
        }
        let b = RequestBuilder::new("n1");
        let started = std::time::Instant::now();
        let (mut records, mut series_written) = (0usize, 0usize);
        let mut phases = [Duration::ZERO; 5];
        loop {
            let t = std::time::Instant::now();
            let batch = ledger.pending("otlp", BATCH).expect("pending");
            if batch.is_empty() {
                break;
            }
            phases[0] += t.elapsed();
            let t = std::time::Instant::now();
            let c = b.contributions(&batch);
            phases[1] += t.elapsed();
            let t = std::time::Instant::now();
            let state = ledger.export_series("otlp", &c.keys()).expect("series");
            phases[2] += t.elapsed();
            let t = std::time::Instant::now();
            let (_req, after) = b.build(&batch, &c, &state, 0);
            phases[3] += t.elapsed();
            let t = std::time::Instant::now();
            let ids: Vec<String> = batch.iter().map(|r| r.record_id.clone()).collect();
            ledger
                .mark_delivered_with("otlp", &ids, &after, None)
                .expect("deliver");
            phases[4] += t.elapsed();
            records += batch.len();
            series_written += after.len();
        }
        let took = started.elapsed();
        let per = |d: Duration| d.as_secs_f64() * 1e6 / records.max(1) as f64;
        println!(
            "µs/record: pending {:.1}, contributions {:.1}, read totals {:.1}, build {:.1}, deliver + store totals {:.1}",
            per(phases[0]),
            per(phases[1]),
            per(phases[2]),
            per(phases[3]),
            per(phases[4])
        );
        println!(
            "export path, {windows} windows × {workloads} records: {:.1} µs/record, {:.1} series updates/record, {} series kept",
            took.as_secs_f64() * 1e6 / records as f64,
            series_written as f64 / records as f64,
            ledger.export_series_count("otlp").expect("count")
        );
        drop(ledger);
        let _ = std::fs::remove_dir_all(&dir);
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

    #[test]
    fn identity_attributes_of_a_full_record_are_unchanged() {
        let r = crate::report::record::tests::full_record();
        let got: Vec<String> = identity(&r)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(got, GOLDEN_ATTRS);
    }

    /// What `identity` gave for `full_record` before the identity fields moved.
    const GOLDEN_ATTRS: &[&str] = &[
        "process.pid=4294967295",
        "process.executable.name=python3",
        "mentat.process.start_time=2025-12-31T23:59:59.99Z",
        "mentat.workload.kind=wasm",
        "container.id=cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
        "container.runtime=containerd",
        "k8s.pod.uid=1b4e28ba-2fa1-11d2-883f-0016d3cca427",
        "k8s.pod.name=agent-0",
        "k8s.namespace.name=team-a",
        "mentat.wasm.module=spin-app",
        "agent.id=agent-1",
        "flow.id=flow-1",
        "flow.run_id=run-1",
        "user.id=user-1",
        "project.id=project-1",
        "customer.id=customer-1",
    ];
}
